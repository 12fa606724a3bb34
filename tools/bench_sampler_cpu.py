"""CPU: the quickstart's per-step phase times with each rollout sampler (tools/bench.py's phase
measurement: a real Lightning fit, medians over the steps after a warm-up), one JSON line.

    python tools/bench_sampler_cpu.py --sampler default     # model.sampler: null (what the quickstart uses)
    python tools/bench_sampler_cpu.py --sampler static      # StaticCacheSampler (no graphs on CPU)

`--sampler default` passes no sampler argument, so the same file also measures a checkout from
before samplers existed (docs/benchmarks.md compares them interleaved, same load).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sampler", choices=("default", "kv", "static"), default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from bench_common import QUICKSTART, _quiet
    from bench_measure import bench_phases

    _quiet()
    torch.set_num_threads(1)
    kw = {}
    if args.sampler != "default":
        from lit_covrl.sampling import KVCacheSampler, StaticCacheSampler

        kw["sampler"] = KVCacheSampler() if args.sampler == "kv" else StaticCacheSampler(graphs="none")
    with tempfile.TemporaryDirectory() as tmp:
        res = bench_phases(QUICKSTART, steps=args.steps, warmup=args.warmup, log_dir=tmp, **kw)
    res = {"sampler": args.sampler, "load_1min": round(os.getloadavg()[0], 2), **res}
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
