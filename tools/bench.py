"""Benchmarks of one GRPO step on this machine (see docs/benchmarks.md), and the one entry point
of every benchmark and profile.

    python tools/bench.py            # full run: quickstart model, ~10M and ~100M random Qwen2
    python tools/bench.py --json     # the same, one JSON object on stdout
    python tools/bench.py --quick    # small and fast (quickstart model only, fewer repeats)
    python tools/bench.py list       # the other benchmarks
    python tools/bench.py NAME ...   # run one of them with its own arguments (NAME --help)

This file is the command line: `run` (every figure as one dict), the table and `main`. The
measurements, and how each is taken (phase timing in a real fit, regularizer overhead on one
fixed rollout, ...), are in tools/bench_measure.py; the shared setup (quickstart model, random
Qwen2 shapes, `make_module` / `make_data` / `_fit`, `machine`) in tools/bench_common.py. Both
are re-exported here, so `bench.make_module`, `bench.PhaseRecorder`, ... keep working.

One torch thread (`torch.set_num_threads(1)`), as the quickstart config sets.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench_common import (  # noqa: E402, F401  (re-exported: bench.QUICKSTART, bench.make_module, ...)
    MODEL_SHAPES, QUICKSTART, REG_NAMES, REPO, _cpu_name, _fit, _quiet, build_random_model, machine, make_data,
    make_module, num_params,
)
from bench_measure import (  # noqa: E402, F401  (re-exported: bench.PhaseRecorder, bench.check_passes, ...)
    OverheadProbe, PhaseRecorder, _make_reg, _median_steps, _tokens_after_eos, bench_overhead, bench_phases,
    bench_selection, check_passes, entropy_fp32_peak_fraction, quickstart_peak_rss_mb,
)

# --------------------------------------------------------------------------- main


def run(quick: bool = False, sizes: tuple[str, ...] | None = None, progress=None, model: str = QUICKSTART) -> dict:
    """All figures as one dict. `model` replaces the quickstart model (tests use a tinier one)."""
    _quiet()
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            progress(f"{time.perf_counter() - t_start:6.1f}s {msg}")

    if sizes is None:
        sizes = () if quick else ("10M", "100M")
    res: dict = {"machine": machine(), "quick": quick}
    with tempfile.TemporaryDirectory(prefix="lit_covrl_bench_") as tmp:
        say("peak RSS (quickstart child process)")
        res["peak_rss_mb"] = quickstart_peak_rss_mb(2 if quick else 20, tmp, model=model, fork=quick)
        res["peak_rss_method"] = "fork" if quick else "subprocess"
        say("phases: quickstart model")
        models = {"quickstart": bench_phases(model, steps=2 if quick else 20, warmup=1 if quick else 3, log_dir=tmp)}
        for size in sizes:
            path = build_random_model(Path(tmp) / f"qwen2-{size}", size)
            steps, warmup = {"10M": (8, 2), "100M": (3, 1)}.get(size, (3, 1))
            say(f"phases: random {size}")
            models[size] = bench_phases(path, steps=steps, warmup=warmup, log_dir=tmp)
        res["models"] = models
        rounds = 2 if quick else 15
        say("overhead (quickstart config: 4 updates per rollout)")
        res["overhead"] = bench_overhead(model, rounds=rounds, log_dir=tmp)
        say("overhead (1 update per rollout)")
        res["overhead_1update"] = bench_overhead(model, rounds=rounds, log_dir=tmp, update={"mini_batch_size": None})
        say("selection")
        res["selection_ms"] = bench_selection(repeats=2 if quick else 9)
        say("wasted-pass checks")
        res["checks"] = check_passes(model, tmp, steps=1 if quick else 2)
        res["checks"]["entropy_fp32_peak_fraction_of_NTV"] = round(entropy_fp32_peak_fraction(), 4)
        say("done")
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    return res


def _print_table(res: dict) -> None:
    m = res["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} thread; "
          f"load {m['loadavg_1_5_15']} -> {m['loadavg_end']}")
    print(f"\n{'model':<11}{'params':>11}{'step_s':>9}{'rollout':>9}{'score':>8}{'ref':>8}{'update':>9}{'other':>8}{'tok/s':>9}")
    for name, r in res["models"].items():
        print(f"{name:<11}{r['params']:>11,}{r['step_s']:>9.4f}{r['rollout_s']:>9.4f}{r['score_s']:>8.4f}"
              f"{r['ref_logp_s']:>8.4f}{r['update_s']:>9.4f}{r['other_s']:>8.4f}{r['tokens_per_s']:>9.1f}")
    for key in ("overhead", "overhead_1update"):
        o = res[key]
        print(f"\n{key}: update none {o['update_s_none']:.4f}s; " + ", ".join(f"{k} x{o[k]:.3f}" for k in REG_NAMES))
    print("\nselection_ms:", json.dumps(res["selection_ms"]))
    print("peak_rss_mb:", res["peak_rss_mb"])
    print("checks:", json.dumps(res["checks"], indent=1))


# the other benchmarks and profiles, each a script of its own in tools/ (name -> file, what it measures)
BENCHMARKS = {
    "trl": ("bench_trl.py", "lit_covrl vs Hugging Face TRL's GRPOTrainer on the same work (needs .[trl])"),
    "gpu": ("bench_gpu.py", "GPU rollout / update throughput, MFU and memory per sampler and strategy (--json)"),
    "fsdp": ("bench_fsdp.py", "CPU: 1 process vs 2 gloo processes under FSDP2"),
    "logging": ("bench_logging.py", "per-step cost of publishing the step metrics"),
    "sampler-cpu": ("bench_sampler_cpu.py", "CPU quickstart phase times per rollout sampler"),
    "padding": ("bench_padding.py", "learner forward+backward with and without skip_padding (long-tailed lengths)"),
    "checkpoint-io": ("bench_checkpoint_io.py", "one checkpoint save: Lightning's IO vs the atomic one"),
    "profile": ("profile_step.py", "where the time of one RL step goes, next to the floor"),
    "logprob-gap": ("logprob_gap.py", "sampler vs training-forward old log-probs, per dtype, sampler, bf16 autocast"),
    "reg-passes": ("bench_reg_passes.py", "CPU: the extra training-forward passes of Lp-Reg, SIREN, ERA and AEnt"),
}


def _dispatch(argv: list[str]) -> bool:
    """`bench.py list` or `bench.py NAME args...`: run that benchmark as its own script."""
    if not argv or argv[0] not in (*BENCHMARKS, "list"):
        return False
    if argv[0] == "list":
        width = max(map(len, BENCHMARKS))
        print("\n".join(f"{name:{width}s}  {what}" for name, (_, what) in BENCHMARKS.items()))
        return True
    import runpy

    script = Path(__file__).resolve().parent / BENCHMARKS[argv[0]][0]
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return True


def main(argv: list[str] | None = None) -> None:
    if _dispatch(list(sys.argv[1:] if argv is None else argv)):
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="other benchmarks: " + ", ".join(BENCHMARKS) + " (python tools/bench.py list)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="quickstart model only, few repeats")
    ap.add_argument("--sizes", nargs="*", default=None, help="random models to add (10M 100M)")
    args = ap.parse_args(argv)
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # Lightning's and the module's prints
        res = run(quick=args.quick, sizes=tuple(args.sizes) if args.sizes is not None else None,
                  progress=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(res))
    else:
        _print_table(res)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
