"""CPU: the quickstart's per-step phase times with each rollout sampler (tools/bench.py's phase
measurement: a real Lightning fit, medians over the steps after a warm-up), one JSON line.

    python tools/bench_sampler_cpu.py --sampler default     # model.sampler: null (what the quickstart uses)
    python tools/bench_sampler_cpu.py --sampler static      # StaticCacheSampler (no graphs on CPU)

`--sampler default` passes no sampler argument, so the same file also measures a checkout from
before samplers existed (docs/benchmarks.md compares them interleaved, same load).

    python tools/bench_sampler_cpu.py --interleaved 40 [--baseline OLD/lit_covrl/rollout.py]

times the quickstart rollout alone (16 prompts x 8 samples, <= 5 new tokens, the shipped model;
no Lightning), cycling KVCacheSampler / StaticCacheSampler / (a `sample_responses` loaded from
another checkout's rollout.py) in one process for that many rounds: median and min ms each.
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
    ap.add_argument("--interleaved", type=int, default=0, help="rounds of the rollout-only comparison")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout's lit_covrl/rollout.py")
    args = ap.parse_args(argv)
    if args.interleaved:
        return interleaved(args.interleaved, args.baseline)
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


def interleaved(rounds: int, baseline: Path | None) -> dict:
    import importlib.util
    import statistics
    import time

    import torch

    from bench_common import QUICKSTART
    from lit_covrl.policy import load_policy, load_tokenizer
    from lit_covrl.prompts import encode_prompts
    from lit_covrl.sampling import KVCacheSampler, StaticCacheSampler
    from lit_covrl.tasks import get_task

    torch.set_num_threads(1)
    model, tok = load_policy(QUICKSTART).eval(), load_tokenizer(QUICKSTART)
    import random

    task, rng = get_task("arithmetic"), random.Random(0)
    prompts = [task.sample(rng).prompt for _ in range(16)]
    ids, mask = encode_prompts(tok, prompts, chat_template=None)
    ids, mask = ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0)
    kw = dict(max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    runs = {"KVCacheSampler": KVCacheSampler().sample, "StaticCacheSampler": StaticCacheSampler().sample}
    if baseline is not None:
        spec = importlib.util.spec_from_file_location("baseline_rollout", baseline)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        runs["baseline sample_responses"] = mod.sample_responses
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 2):  # 2 warm-up rounds
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(model, ids, mask, generator=torch.Generator().manual_seed(r), **kw)
            if r >= 2:
                times[name].append(1e3 * (time.perf_counter() - t0))
    res = {"rounds": rounds, "load_1min": round(os.getloadavg()[0], 2),
           **{k: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2)} for k, v in times.items()}}
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
