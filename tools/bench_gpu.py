"""GPU throughput of real RL steps on randomly initialised Qwen2 models (Qwen2.5-0.5B and -1.5B
shapes) with each rollout sampler, next to Hugging Face `generate` (static cache + torch.compile):
rollout tokens/s and ms per decoding step, update tokens/s and MFU, the RL step's wall time and
peak memory. One process per run (a clean CUDA context and peak-memory counter), runs one after
the other on the same GPU.

    python tools/bench_gpu.py --json --out bench_gpu.json        # the measured run (default runs)
    python tools/bench_gpu.py --device cpu --runs tiny:kv_cache tiny:static_eager --steps 2 \
        --prompts 4 --new-tokens 8 --prompt-len 8 --updates 2 --micro 8     # smoke test

No weights can be downloaded on the GPU machines, so the models are random (same shapes and FLOPs
as Qwen2.5: 0.5B = 24 layers, hidden 896, 14 / 2 heads; 1.5B = 28 layers, hidden 1536, 12 / 2
heads; vocabulary 151,936) over a character tokenizer of the same vocabulary size. A random policy
almost never samples EOS (p = 1/151,936 per token), so every response runs to --new-tokens.
Rewards are a hash of the completion (0 or 1), so advantages are non-zero and the update is real.

Runs (`--runs shape:config ...`); each sampler run is `GRPOModule` under a Lightning Trainer for
--steps RL steps, `precision: bf16-mixed` (autocast, fp32 weights and AdamW state), medians over
the steps after the first (warm-up, graph capture, compilation):
- kv_cache:       `KVCacheSampler` (the dynamic-cache loop, one host sync per token);
- static_graph:   `StaticCacheSampler(graphs="cuda_graph")`;
- static_compile: `StaticCacheSampler(graphs="compile")` (torch.compile mode="reduce-overhead");
- static_eager:   `StaticCacheSampler(graphs="none")`;
- hf_generate:    rollout only: `model.generate(do_sample=True, top_k=0, top_p=1,
                  cache_implementation="static")` on a bf16 copy of the model (transformers
                  compiles the decoding forward itself, mode="reduce-overhead"), --steps calls;
- fsdp_once:      FSDP2Strategy on one device (bf16 gather, fp32 master weights), default sampler.
Any sampler config with `+compile_update` appended (e.g. `0.5B:static_compile+compile_update`) runs
the same with `model.system.compile_update: true` (the update's policy forward through torch.compile,
dynamic shapes; compiled in the warm-up step). The default runs compare `0.5B:static_graph` with
`0.5B:static_graph+compile_update`; on its own:

    bash tools/gpu_check.sh --steps 3 --runs 0.5B:static_graph 0.5B:static_graph+compile_update

Figures: rollout_tok_s = generated tokens / rollout time (prefill included); decode_ms_per_step =
rollout time / decoding steps (prefill amortized in; the static sampler's own split is in
`sampler_stats`); update_tok_s = (prompt + response) tokens through the training forward+backward
(all updates) / update time; update_mfu = model FLOPs of the update / update time / the device's
dense bf16 peak, with model FLOPs per sequence = 3 x (2 x non-embedding params x (P + T) + 2 x d x
V x (T + 1) [LM head on response positions only] + 2 x layers x d x (P + T)^2 [causal attention]);
step_s = wall time of the whole RL step (rollout, scoring, update, logging); peak_gib =
torch.cuda.max_memory_allocated over the run.

`--profile` runs the last RL step of every sampler run under torch.profiler and adds `profile` to
its entry: the step's wall ms, the device's busy ms (the kernels' own time, summed; CUDA only) and
the top operators by their own device time (CPU: own CPU time), so a missed target comes with where
each millisecond went: `device_busy_ms` far below `step_wall_ms` means launch and Python overhead,
not arithmetic. The profiled step is left out of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from gpu_profile import matmul_tflops, profile_summary, step_profiler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # Qwen2.5-0.5B's and Qwen2.5-1.5B's architectures (random weights)
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=1e6),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=1e6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, rope_theta=1e4),
}
SAMPLERS = {  # config -> (sampler class in lit_covrl.sampling, init_args); None = the module's default
    "kv_cache": ("KVCacheSampler", {}),
    "static_graph": ("StaticCacheSampler", dict(graphs="cuda_graph", timing=True)),
    "static_compile": ("StaticCacheSampler", dict(graphs="compile", timing=True)),
    "static_eager": ("StaticCacheSampler", dict(graphs="none", timing=True)),
    "fsdp_once": None,
}
CONFIGS = (*SAMPLERS, "hf_generate")
COMPILE_UPDATE = "+compile_update"  # suffix of a sampler config: model.system.compile_update on
# In order of what a short GPU loan should measure first (each result is written as soon as its run
# ends, so a run cut by gpu_check.sh's time limit loses only the runs after it): the captured-graph
# sampler (never measured), the compiled one and `generate` it is compared with, the compiled update
# forward (the update MFU target), today's loop (the baseline), then the 1.5B shapes.
DEFAULT_RUNS = ("0.5B:static_graph", "0.5B:static_compile", "0.5B:hf_generate", "0.5B:static_graph+compile_update",
                "0.5B:kv_cache", "1.5B:static_graph", "1.5B:hf_generate", "1.5B:kv_cache")
# dense bf16 tensor-core peak (no sparsity), by device name
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class HashReward:
    """0 or 1 from a hash of the completion: random-looking but deterministic rewards."""

    def __call__(self, completion: str, answer: str) -> float:
        return float(zlib.crc32(completion.encode("utf-8", "replace")) & 1)


def build_model(folder: Path, shape: str) -> Path:
    """Random-init Qwen2 of SHAPES[shape] + a character tokenizer with exactly its vocabulary."""
    from bench_common import save_random_qwen2

    dims = dict(SHAPES[shape])
    vocab = dims.pop("vocab_size")
    base = "0123456789+-="
    extra = (chr(c) for c in range(0x21, 0x110000) if not 0xD800 <= c <= 0xDFFF and chr(c) not in base)
    alphabet = base + "".join(next(extra) for _ in range(vocab - 4 - len(base)))  # + 4 special tokens
    save_random_qwen2(folder, alphabet, max_positions=4096, **dims)
    return folder


def write_prompts(path: Path, n: int, length: int) -> Path:
    """n distinct digit strings of `length` characters (= tokens), answer "0"."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "".join(rng.choice("0123456789") for _ in range(length)), "answer": "0"}) + "\n")
    return path


def model_flops_per_seq(cfg, P: int, T: int) -> float:
    """Training (forward + backward = 3 x forward) model FLOPs of one sequence, see module doc."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size  # q, o, k, v, MLP
    S = P + T
    fwd = 2 * L * per_layer * S + 2 * d * V * (T + 1) + 2 * L * d * S * S
    return 3.0 * fwd


def _peak(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(name: str, args) -> dict:
    """One sampler configuration, in this process: fit --steps RL steps, return the figures."""
    import lightning as L
    from lightning.pytorch import Callback

    import lit_covrl.sampling as S
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule
    from lit_covrl.sharding import FSDP2Strategy

    rows: list[dict] = []
    profile: dict = {}
    name, compiled = name.removesuffix(COMPILE_UPDATE), name.endswith(COMPILE_UPDATE)
    spec = SAMPLERS[name]
    sampler = getattr(S, spec[0])(**spec[1]) if spec else None
    fsdp = name.startswith("fsdp")
    system = {**(dict(fsdp_mixed_precision="bf16", rollout_gather="once") if fsdp else {}),
              **(dict(compile_update=True) if compiled else {})}

    class Record(Callback):
        profiler = None

        def on_train_batch_start(self, trainer, module, *a) -> None:
            _sync(args.device)
            if args.profile and trainer.global_step == args.steps - 1:  # the last step
                self.profiler = step_profiler(args.device)
                self.profiler.__enter__()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, *a) -> None:
            _sync(args.device)
            if self.profiler is not None:
                wall = time.perf_counter() - self.t0
                self.profiler.__exit__(None, None, None)
                profile.update(profile_summary(self.profiler, wall, args.device))
                self.profiler = None
                return
            m = trainer.callback_metrics
            rows.append({"step_s": time.perf_counter() - self.t0,
                         **{k: float(m[k]) for k in ("time/rollout_s", "time/update_s", "rollout/response_length",
                                                     "rollout/response_length_max", "policy/loss")},
                         **{f"sampler_{k}": float(v) for k, v in getattr(sampler, "last_stats", {}).items()}})

    module = GRPOModule(
        model=str(args.model_dir), reward=HashReward(), seed=0, sampler=sampler,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.0),
        rollout=dict(group_size=args.group, max_new_tokens=args.new_tokens, max_prompt_length=args.prompt_len),
        update=dict(mini_batch_size=args.prompts // args.updates, micro_batch_size=args.micro),
        system=system,
    )
    data = PromptDataModule(task=None, train_files=[str(args.prompts_file)], batch_size=args.prompts, seed=0)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, strategy=FSDP2Strategy() if fsdp else "auto",
        precision="32-true" if fsdp or args.device == "cpu" else "bf16-mixed", max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Record()],
    )
    trainer.fit(module, data)
    out = summarize(rows[1:] or rows, module.policy.config, args)
    out["sampler"] = repr(module.sampler)
    if profile:
        out["profile"] = profile
    if getattr(module.sampler, "capture_error", None):
        out["capture_error"] = module.sampler.capture_error
    return out


def summarize(rows: list[dict], cfg, args) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    n, P = args.prompts * args.group, args.prompt_len
    T = int(med["rollout/response_length_max"])
    upd_s = med["time/update_s"]
    flops = n * model_flops_per_seq(cfg, P, T)
    peak = _peak(torch.cuda.get_device_name()) if args.device == "cuda" else None
    out = {
        "steps_measured": len(rows),
        "rollout_s": round(med["time/rollout_s"], 3),
        "rollout_tok_s": round(med["rollout/response_length"] * n / med["time/rollout_s"]),
        "decode_ms_per_step": round(1e3 * med["time/rollout_s"] / T, 2),
        "update_s": round(upd_s, 3),
        "update_tok_s": round(n * (P + T) / upd_s),
        "update_tflops": round(flops / upd_s / 1e12, 1),
        "update_mfu": round(flops / upd_s / peak, 3) if peak else None,
        "step_s": round(med["step_s"], 3),
        "loss_finite": all(abs(r["policy/loss"]) < float("inf") for r in rows),
    }
    stats = {k[8:]: round(v, 4) for k, v in med.items() if k.startswith("sampler_")}
    if stats:
        out["sampler_stats"] = stats
    return out


def run_hf_generate(args) -> dict:
    """Hugging Face `generate` with a static cache (auto-compiled decoding forward) on a bf16 copy."""
    from transformers import AutoModelForCausalLM

    from lit_covrl.policy import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.bfloat16).to(args.device).eval()
    tok = load_tokenizer(str(args.model_dir))
    rows = [json.loads(line)["prompt"] for line in open(args.prompts_file)][: args.prompts]
    enc = tok(rows, return_tensors="pt", padding=True)
    ids = enc.input_ids.repeat_interleave(args.group, 0).to(args.device)
    mask = enc.attention_mask.repeat_interleave(args.group, 0).to(args.device)
    times, lengths = [], []
    for _ in range(args.steps):
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=args.new_tokens, cache_implementation="static", pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        _sync(args.device)
        times.append(time.perf_counter() - t0)
        lengths.append(out.shape[1] - ids.shape[1])
    t, T = statistics.median(times[1:] or times), statistics.median(lengths[1:] or lengths)
    return {"sampler": "transformers generate (static cache, auto-compiled, bf16 weights)",
            "steps_measured": len(times[1:] or times), "first_call_s": round(times[0], 1), "rollout_s": round(t, 3),
            "rollout_tok_s": round(ids.shape[0] * T / t), "decode_ms_per_step": round(1e3 * t / T, 2),
            "update_tok_s": None, "update_mfu": None, "step_s": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS), help="shape:config, e.g. 0.5B:static_graph")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--group", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="response tokens")
    p.add_argument("--updates", type=int, default=4, help="optimizer updates per rollout")
    p.add_argument("--micro", type=int, default=32,
                   help="sequences per forward/backward (default: one update's 4 prompts x 8, a single micro-batch; "
                        "the H200 runs of docs/scaling.md used 16)")
    p.add_argument("--steps", type=int, default=3, help="RL steps per run (the first is warm-up)")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds per run before it is killed")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="seconds for all runs together: each run gets at most what is left, and a run with "
                        "under 30 s left is skipped (listed with an error), so a time limit outside loses nothing written")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too (after every run)")
    p.add_argument("--profile", action="store_true",
                   help="profile the last RL step of every sampler run (torch.profiler; needs --steps >= 3)")
    p.add_argument("--json", action="store_true", help="print only the JSON on stdout (progress on stderr)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config here
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.profile and args.steps < 3:
        p.error("--profile needs --steps >= 3 (a warm-up step, a measured step, the profiled step)")
    for r in args.runs:
        shape, _, conf = r.partition(":")
        sampler_conf = conf.removesuffix(COMPILE_UPDATE)
        if shape not in SHAPES or conf not in CONFIGS and (sampler_conf not in SAMPLERS or sampler_conf == "fsdp_once"):
            p.error(f"--runs {r!r}: want shape:config with shape in {sorted(SHAPES)} and config in {list(CONFIGS)}, "
                    f"optionally with {COMPILE_UPDATE} after a sampler config (not fsdp_once)")
    return args


ARGS = ("device", "prompts", "group", "prompt_len", "new_tokens", "updates", "micro", "steps")


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.one:
        torch.set_float32_matmul_precision("high")
        res = run_hf_generate(args) if args.one == "hf_generate" else run_one(args.one, args)
        if args.device == "cuda":
            res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print("RESULT " + json.dumps(res), flush=True)
        return None
    log = sys.stderr if args.json else sys.stdout
    import transformers

    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "settings": {k: getattr(args, k) for k in ARGS[1:]},
               "matmul_bf16_tflops": matmul_tflops(args.device), "configs": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models, prompts = {}, write_prompts(Path(tmp) / "prompts.jsonl", args.prompts * (args.steps + 1), args.prompt_len)
        for run in args.runs:
            shape, _, conf = run.partition(":")
            left = None if args.deadline_s is None else args.deadline_s - (time.perf_counter() - start)
            if left is not None and left < 30:
                _record(results, args.out, log, {"name": run, "shape": shape, "config": conf, "wall_s": 0.0,
                                                 "error": f"skipped: {max(left, 0):.0f} s left of --deadline-s {args.deadline_s:g}"})
                continue
            if shape not in models:
                t0 = time.perf_counter()
                models[shape] = build_model(Path(tmp) / shape, shape)
                print(f"{shape} model built in {time.perf_counter() - t0:.0f} s", file=log, flush=True)
            cmd = [sys.executable, __file__, "--one", conf, "--model-dir", str(models[shape]), "--prompts-file",
                   str(prompts), *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in ARGS), []),
                   *(["--profile"] if args.profile else [])]
            t0 = time.perf_counter()
            timeout = args.run_timeout
            if args.deadline_s is not None:
                timeout = min(timeout, args.deadline_s - (time.perf_counter() - start))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                res = json.loads(line[7:]) if line else {"error": proc.stderr[-3000:]}
            except subprocess.TimeoutExpired:
                res = {"error": f"killed after {timeout:.0f} s (--run-timeout {args.run_timeout:g}, --deadline-s {args.deadline_s})"}
            _record(results, args.out, log, {"name": run, "shape": shape, "config": conf,
                                             "wall_s": round(time.perf_counter() - t0, 1), **res})
    print(json.dumps(results, indent=1))
    return results


# every entry of `configs` has these; a run that failed or was skipped has them as null
FIGURES = ("rollout_tok_s", "decode_ms_per_step", "update_tok_s", "update_mfu", "step_s", "peak_gib")


def _record(results: dict, out: Path | None, log, res: dict) -> None:
    res.setdefault("sampler", res["config"])
    for key in FIGURES:
        res.setdefault(key, None)
    print(json.dumps(res), file=log, flush=True)
    results["configs"].append(res)
    if out:
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
