"""The other modes of tools/profile_step.py (its default mode, the breakdown next to the floor,
is in profile_step.py itself):

- `--cprofile`: cProfile of the measured lit_covrl steps, top functions by cumulative time;
- `--ops`: torch.profiler aten op counts and self-CPU shares, lit_covrl steps then the floor;
- `--ab`: interleaved A/B of the sampler's prompt forward (every row vs once per group);
- `--ab-train`: interleaved A/B of `model.system.shared_prompt` (training and no-grad log-prob forwards
  on prompt+response for every row vs the prompt once per group), at `--updates` 1 or 4.

`--trl` adds TRL's GRPOTrainer blocks (tools/bench_trl.py) to the A/B modes.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics

from profile_floor import make_floor
from profile_lit import PROMPTS, T_MAX, run_lit


def cprofile_mode(args, tmp) -> None:
    prof = cProfile.Profile()
    run_lit(args.steps, args.warmup, tmp, profiler=prof)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
    print(s.getvalue())


def ab(args, tmp) -> None:
    runs = {"plain prefill": [], "shared prefill": [], "TRL": []}
    blocks = {"plain prefill": [], "shared prefill": []}
    for rep in range(args.reps):
        for name in ("plain prefill", "shared prefill"):
            r = run_lit(args.steps, args.warmup, tmp, plain_prefill=name == "plain prefill")
            runs[name] += r["per_step"]
            blocks[name].append(r)
        msg = ""
        if args.trl:
            import bench_trl

            got = [x["seconds"] for x in bench_trl.run_trl(1, args.steps, args.warmup, T_MAX, tmp)]
            runs["TRL"] += got
            msg = f", TRL {statistics.median(got) * 1e3:.1f}"
        print(f"rep {rep + 1}: plain {statistics.median(blocks['plain prefill'][-1]['per_step']) * 1e3:.1f} ms, "
              f"shared {statistics.median(blocks['shared prefill'][-1]['per_step']) * 1e3:.1f} ms{msg}; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    for k, v in med.items():
        print(f"{k}: median {v * 1e3:.1f} ms/rollout over {len(runs[k])}")
    print(f"plain / shared = {med['plain prefill'] / med['shared prefill']:.3f}")
    for name, rs in blocks.items():
        fwd = sum(r["timers"].excl.get("training_step/rollout/sampler/model forward (decode)/model forward", 0.0)
                  for r in rs) / sum(len(r["per_step"]) for r in rs)
        print(f"{name}: rollout model forwards {fwd * 1e3:.1f} ms/step")
    if "TRL" in med:
        for name in ("plain prefill", "shared prefill"):
            print(f"TRL / lit ({name}) = {med['TRL'] / med[name]:.3f}")
    print(f"load after: {[round(x, 2) for x in os.getloadavg()]}")


AB_TRAIN = {"shared_prompt off": False, "shared_prompt on": True}
UPDATE_TIMERS = {  # exclusive timer paths of the update's model work
    "training forward (model)": "training_step/update/training forward/model forward",
    "backward (autograd)": "training_step/update/backward (Lightning)/autograd backward",
}


def ab_train(args, tmp) -> None:
    """Interleaved blocks of lit_covrl with `shared_prompt` off and on (and TRL under --trl), at
    args.updates optimizer updates per rollout; medians of the per-rollout wall times."""
    import bench_trl

    mbs = None if args.updates == 1 else PROMPTS // args.updates
    runs = {name: [] for name in [*AB_TRAIN, "TRL"]}
    blocks = {name: [] for name in AB_TRAIN}
    for rep in range(args.reps):
        for name, on in AB_TRAIN.items():
            r = run_lit(args.steps, args.warmup, tmp, module_kw={"system": {"shared_prompt": on}, "update": {"mini_batch_size": mbs}})
            runs[name] += r["per_step"]
            blocks[name].append(r)
        if args.trl:
            runs["TRL"] += [x["seconds"] for x in bench_trl.run_trl(args.updates, args.steps, args.warmup, T_MAX, tmp)]
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {statistics.median(v[-args.steps:]) * 1e3:.1f} ms"
                                             for k, v in runs.items() if v) + f"; load {os.getloadavg()[0]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    print(f"\n{args.updates} update(s) per rollout, medians over {len(runs['shared_prompt on'])} rollouts per side:")
    for k, v in med.items():
        print(f"  {k}: {v * 1e3:.1f} ms/rollout")
    print(f"  off / on = {med['shared_prompt off'] / med['shared_prompt on']:.3f}")
    for name, rs in blocks.items():
        n = sum(len(r["per_step"]) for r in rs)
        parts = {lbl: sum(r["timers"].excl.get(path, 0.0) for r in rs) / n * 1e3 for lbl, path in UPDATE_TIMERS.items()}
        print(f"  {name}: " + ", ".join(f"{lbl} {ms:.1f} ms/step" for lbl, ms in parts.items()))
    if "TRL" in med:
        for name in AB_TRAIN:
            print(f"  TRL / lit ({name}) = {med['TRL'] / med[name]:.3f}")
    print(f"load after: {[round(x, 2) for x in os.getloadavg()]}")


def ops_profile(args, tmp) -> None:
    """torch.profiler over a few steps: aten op counts per step and self-CPU shares."""
    from torch.profiler import ProfilerActivity, profile

    holder = {}

    class P:
        def enable(self):
            holder["p"] = profile(activities=[ProfilerActivity.CPU])
            holder["p"].__enter__()

        def disable(self):
            holder["p"].__exit__(None, None, None)

    run_lit(args.steps, args.warmup, tmp, profiler=P())
    ka = holder["p"].key_averages()
    aten = [e for e in ka if e.key.startswith("aten::")]
    total_calls = sum(e.count for e in aten)
    print(f"aten op calls per RL step (all levels): {total_calls / args.steps:.0f}")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25))
    step, _ = make_floor()
    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as p2:
        for _ in range(args.steps):
            step()
    ka2 = p2.key_averages()
    print(f"floor: aten op calls per step (all levels): {sum(e.count for e in ka2 if e.key.startswith('aten::')) / args.steps:.0f}")
    print(ka2.table(sort_by="self_cpu_time_total", row_limit=15))
