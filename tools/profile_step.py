"""Where the time of one lit_covrl RL step goes (1 update per rollout), and the floor.

    python tools/profile_step.py [--steps 20] [--warmup 3] [--reps 3] [--cprofile] [--ops]
    python tools/profile_step.py --ab-train [--updates 1|4] [--trl]   # shared_prompt off vs on

Setting: the TRL side-by-side benchmark's 1-update case (tools/bench_trl.py): the shipped tiny
Qwen2 (`lit_covrl:tiny-arith`), 16 prompts x 8 generations, <= 5 new tokens, `mini_batch_size:
null` (one optimizer update per rollout), micro-batch 128, AdamW, grad clip 1, a real Lightning
Trainer with a TensorBoard logger, one torch thread.

1. Breakdown (default): functions of the step are wrapped with perf_counter timers (about a
   microsecond each: the breakdown is not distorted the way a tracing profiler distorts
   op-bound code). Times are exclusive (a region's time minus its timed children), summed over
   the measured steps and shown as a share of the wall time start to start (on_train_batch_start
   to the next one, as bench_trl.py measures). "lightning loop" is everything outside
   `training_step`: Lightning's loop, hooks, data loading, the logger.
2. Floor: the least any GRPO implementation on this Hugging Face model must run per rollout:
   one prefill forward (last-position logits) + one KV-cache forward per further token, a
   log-softmax + multinomial per token, one training forward (response logits only) with a
   clipped-ratio token-mean loss, backward, grad-norm clip and one AdamW step; no Lightning,
   no metrics, no logging. Timed in blocks interleaved with lit_covrl blocks (A B A B ...).
3. `--ab`: interleaved A/B of the sampler's prompt forward (every row vs once per group);
   `--ab-train`: interleaved A/B of `model.system.shared_prompt` (the training and no-grad log-prob
   forwards: prompt+response on every row vs the prompt once per group), at `--updates` 1 or 4
   optimizer updates per rollout, with TRL blocks at the same setting under `--trl`.
4. `--cprofile`: cProfile of the measured steps, top functions by cumulative time (detail of
   the Lightning / logging side). `--ops`: torch.profiler op counts and self-CPU shares per region.

Layout: this file is the command line and the default mode (the breakdown, the floors, TRL under
`--trl`); tools/profile_lit.py holds the timers and the instrumented lit_covrl blocks,
tools/profile_floor.py the bare floor loops, tools/profile_modes.py the `--cprofile`, `--ops`,
`--ab` and `--ab-train` modes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import bench  # noqa: E402  (tools/bench.py)
from profile_floor import make_floor, run_floor  # noqa: E402, F401
from profile_lit import G, PROMPTS, T_MAX, TIMERS, Timers, instrument, run_lit  # noqa: E402, F401
from profile_modes import ab, ab_train, cprofile_mode, ops_profile  # noqa: E402

# ----------------------------------------------------------------------------- breakdown


GROUPS = [  # (row label, [exclusive timer paths that belong to it]) -- paths matched by suffix
    ("rollout: model forwards (prefill + decode)", ["rollout/sampler/model forward (decode)/model forward", "rollout/sampler/model forward"]),
    ("rollout: sampler math + bookkeeping", ["rollout/sampler", "rollout/sampler/model forward (decode)"]),
    ("rollout: encode prompts + decode completions", ["rollout/encode prompts", "rollout/decode completions", "rollout"]),
    ("score (reward)", ["score"]),
    ("advantages", ["advantages"]),
    ("update: training forward (model)", ["update/training forward/model forward"]),
    ("update: log-prob gather", ["update/training forward/log-prob gather", "update/training forward"]),
    ("update: loss", ["update/loss"]),
    ("update: backward (autograd)", ["update/backward (Lightning)/autograd backward"]),
    ("update: backward (Lightning wrapper)", ["update/backward (Lightning)"]),
    ("update: clip_grad_norm", ["update/optimizer step (Lightning)/clip_grad_norm",
                                 "update/optimizer step (Lightning)/AdamW step/clip_grad_norm"]),
    ("update: AdamW step", ["update/optimizer step (Lightning)/AdamW step"]),
    ("update: optimizer step (Lightning wrapper)", ["update/optimizer step (Lightning)"]),
    ("update: metrics + rest of Learner.update", ["update/update metrics (objective stats)", "update"]),
    ("rollout metrics", ["rollout metrics"]),
    ("self.log (logging)", ["self.log (logging)", "self.log (logging)/TensorBoard log_metrics"]),
    ("training_step rest", [""]),
]


def breakdown(res: dict) -> list[tuple[str, float, float]]:
    tm: Timers = res["timers"]
    wall = res["wall"]
    excl = {k[len("training_step/"):] if k.startswith("training_step/") else ("" if k == "training_step" else "@" + k): v
            for k, v in tm.excl.items()}
    used = set()
    rows = []
    for label, keys in GROUPS:
        s = 0.0
        for k in keys:
            if k in excl:
                s += excl[k]
                used.add(k)
        rows.append((label, s))
    tb = sum(v for k, v in excl.items() if k.startswith("@") and "log_metrics" in k)
    inside = sum(v for k, v in excl.items() if not k.startswith("@"))
    other = [k for k in excl if k not in used and not k.startswith("@")]
    if other:
        rows.append(("(unassigned: " + ", ".join(other) + ")", sum(excl[k] for k in other)))
    rows.append(("Lightning loop, hooks, data (outside training_step)", wall - inside - tb))
    rows.append(("TensorBoard log_metrics (in the loop)", tb))
    return [(lbl, s / wall * 100, s / len(res["per_step"]) * 1e3) for lbl, s in rows]


def _run_blocks(args, tmp: str) -> tuple[list, list, list, list]:
    """Interleaved blocks: lit_covrl, floor, shared-prompt floor (and TRL under --trl), args.reps times."""
    lit_runs, floor_runs, shared_runs, trl_steps = [], [], [], []
    for rep in range(args.reps):
        lit_runs.append(run_lit(args.steps, args.warmup, tmp))
        floor_runs.append(run_floor(args.steps, args.warmup))
        shared_runs.append(run_floor(args.steps, args.warmup, shared_prompt=True))
        msg = ""
        if args.trl:
            import bench_trl

            got = [x["seconds"] for x in bench_trl.run_trl(1, args.steps, args.warmup, T_MAX, tmp)]
            trl_steps += got
            msg = f", TRL {statistics.median(got) * 1e3:.1f}"
        print(f"rep {rep + 1}: lit {statistics.median(lit_runs[-1]['per_step']) * 1e3:.1f} ms/step, "
              f"floor {statistics.median(floor_runs[-1]['per_step']) * 1e3:.1f}, "
              f"shared-prompt floor {statistics.median(shared_runs[-1]['per_step']) * 1e3:.1f}{msg}; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    return lit_runs, floor_runs, shared_runs, trl_steps


def _report(lit_runs: list, floor_runs: list, shared_runs: list, trl_steps: list) -> None:
    """The breakdown pooled over the lit_covrl blocks, each floor's parts, and TRL / lit."""
    pooled = Timers()
    for r in lit_runs:
        for k, v in r["timers"].excl.items():
            pooled.excl[k] += v
    allsteps = [x for r in lit_runs for x in r["per_step"]]
    rows = breakdown({"timers": pooled, "wall": sum(r["wall"] for r in lit_runs), "per_step": allsteps})
    lit_med = statistics.median(allsteps)
    print(f"\nlit_covrl step (start to start): median {lit_med * 1e3:.1f} ms over {len(allsteps)} steps")
    print(f"{'region':58s} {'share %':>8s} {'ms/step':>8s}")
    for lbl, pct, ms in rows:
        print(f"{lbl:58s} {pct:8.1f} {ms:8.2f}")
    for name, runs in (("floor", floor_runs), ("shared-prompt floor", shared_runs)):
        fsteps = [x for r in runs for x in r["per_step"]]
        fwall = sum(r["wall"] for r in runs)
        parts = defaultdict(float)
        for r in runs:
            for k, v in r["parts"].items():
                parts[k] += v
        f_med = statistics.median(fsteps)
        print(f"\n{name} step: median {f_med * 1e3:.1f} ms over {len(fsteps)} steps; lit / {name} = {lit_med / f_med:.2f}")
        for k, v in parts.items():
            print(f"  {k:40s} {v / fwall * 100:6.1f} % {v / len(fsteps) * 1e3:8.2f} ms")
    if trl_steps:
        t_med = statistics.median(trl_steps)
        print(f"\nTRL GRPOTrainer (1 update) s/rollout: median {t_med * 1e3:.1f} ms over {len(trl_steps)}; "
              f"TRL / lit = {t_med / lit_med:.2f}")
    print(f"load after: {[round(x, 2) for x in os.getloadavg()]}")


# ----------------------------------------------------------------------------- main


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="interleaved lit / floor blocks")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--ab", action="store_true",
                    help="interleaved A/B: prompt forward on every row (before) vs once per group (now)")
    ap.add_argument("--ab-train", action="store_true",
                    help="interleaved A/B of model.system.shared_prompt: training forward on every row vs prompt once per group")
    ap.add_argument("--updates", type=int, default=1, choices=(1, 4), help="optimizer updates per rollout (--ab-train)")
    ap.add_argument("--trl", action="store_true", help="also TRL's GRPOTrainer blocks (tools/bench_trl.py)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = _parse_args(argv)
    bench._quiet()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"load before: {[round(x, 2) for x in os.getloadavg()]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lit_covrl_prof_") as tmp:
        if args.cprofile:
            return cprofile_mode(args, tmp)
        if args.ops:
            return ops_profile(args, tmp)
        if args.ab:
            return ab(args, tmp)
        if args.ab_train:
            return ab_train(args, tmp)
        runs = _run_blocks(args, tmp)
    _report(*runs)


if __name__ == "__main__":
    main()
