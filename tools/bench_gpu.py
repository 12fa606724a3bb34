"""GPU throughput of real RL steps on a randomly initialised Qwen2 (Qwen2.5-0.5B shape): rollout
and update tokens/s, training MFU and peak memory, for one device with and without FSDP2.

    python tools/bench_gpu.py --out bench_gpu.json                          # the measured run
    python tools/bench_gpu.py --shape tiny --device cpu --steps 2 --new-tokens 8   # smoke test

No weights can be downloaded on the GPU machines, so the model is random (same shapes and FLOPs
as Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads, vocabulary 151,936) over a
character tokenizer of the same vocabulary size. A random policy almost never samples EOS
(p = 1/151,936 per token), so every response runs to --new-tokens: fixed shapes, no early stop.
Rewards are a hash of the completion (0 or 1), so advantages are non-zero and the update is real.

Each configuration runs `GRPOModule` under a Lightning Trainer in its own process (a clean CUDA
context and peak-memory counter) for --steps RL steps and reports medians over the steps after
the first (warm-up):
- single:          one device, `precision: bf16-mixed` (autocast), fp32 weights and AdamW state;
- single_no_shared_prompt: the same with `shared_prompt: false` (prompt+response forward per row);
- fsdp_per_forward: FSDP2Strategy on one device, bf16 parameter all-gather / fp32 reduce,
                   fp32 sharded master weights, parameters gathered at every decoding forward;
- fsdp_once:       the same, parameters gathered once per rollout (`rollout_gather: once`);
- fsdp_once_ac:    fsdp_once with activation checkpointing.
On one device FSDP2 has nothing to shard across: the fsdp_* rows measure the cost of its
machinery (per-forward gathers, casts, hooks), not multi-GPU scaling.

Figures: rollout tokens/s = generated tokens / rollout time (prefill included); update tokens/s =
(prompt + response) tokens through the training forward+backward (all updates) / update time;
MFU = model FLOPs of the update / update time / the device's dense bf16 peak, with model FLOPs per
sequence = 3 x (2 x non-embedding params x (P + T) + 2 x d x V x (T + 1) [LM head on response
positions only] + 2 x layers x d x (P + T)^2 [causal attention]); activation recomputation is
not counted (the usual MFU convention).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # Qwen2.5-0.5B's architecture (random weights)
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=1e6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, rope_theta=1e4),
}
CONFIGS = {
    "single": dict(strategy="auto", precision="bf16-mixed", module={}),
    "single_no_shared_prompt": dict(strategy="auto", precision="bf16-mixed", module=dict(shared_prompt=False)),
    "fsdp_per_forward": dict(strategy="fsdp", precision="32-true",
                             module=dict(fsdp_mixed_precision="bf16", rollout_gather="per_forward")),
    "fsdp_once": dict(strategy="fsdp", precision="32-true",
                      module=dict(fsdp_mixed_precision="bf16", rollout_gather="once")),
    "fsdp_once_ac": dict(strategy="fsdp", precision="32-true",
                         module=dict(fsdp_mixed_precision="bf16", rollout_gather="once", activation_checkpointing=True)),
}
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


def run_one(name: str, args) -> dict:
    """One configuration, in this process: fit --steps RL steps, return the figures."""
    import lightning as L
    from lightning.pytorch import Callback

    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule
    from lit_covrl.sharding import FSDP2Strategy

    conf = CONFIGS[name]
    rows: list[dict] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, module, *a) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()
            m = trainer.callback_metrics
            rows.append({k: float(m[k]) for k in ("time/rollout_s", "time/update_s", "rollout/response_length",
                                                    "rollout/response_length_max", "policy/loss")})

    module = GRPOModule(
        model=str(args.model_dir), group_size=args.group, max_new_tokens=args.new_tokens,
        max_prompt_length=args.prompt_len, reward=HashReward(), mini_batch_size=args.prompts // args.updates,
        micro_batch_size=args.micro, seed=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.0), **conf["module"],
    )
    data = PromptDataModule(task=None, train_files=[str(args.prompts_file)], batch_size=args.prompts, seed=0)
    strategy = FSDP2Strategy() if conf["strategy"] == "fsdp" else "auto"
    trainer = L.Trainer(
        accelerator=args.device, devices=1, strategy=strategy, precision=conf["precision"], max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Record()],
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - t0
    return summarize(name, rows[1:] or rows, module, args, wall)


def summarize(name: str, rows: list[dict], module, args, wall: float) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    cfg = module.policy.config
    n = args.prompts * args.group
    T, P = int(med["rollout/response_length_max"]), args.prompt_len
    gen_tokens = med["rollout/response_length"] * n
    upd_tokens = n * (P + T)
    flops = n * model_flops_per_seq(cfg, P, T)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = _peak(dev)
    out = {
        "config": name, "device": dev, "steps_measured": len(rows), "wall_s": round(wall, 1),
        "rollout_s": round(med["time/rollout_s"], 3), "update_s": round(med["time/update_s"], 3),
        "rollout_tokens_per_s": round(gen_tokens / med["time/rollout_s"]),
        "update_tokens_per_s": round(upd_tokens / med["time/update_s"]),
        "update_tflops": round(flops / med["time/update_s"] / 1e12, 1),
        "mfu": round(flops / med["time/update_s"] / peak, 3) if peak else None,
        "loss_finite": all(abs(r["policy/loss"]) < float("inf") for r in rows),
    }
    if args.device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def matmul_tflops(device: str) -> float | None:
    """Achieved bf16 TFLOP/s of a large square matmul: what 100% MFU is realistically compared to."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return round(2 * 8192**3 * reps / (time.perf_counter() - t0) / 1e12, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5B")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", nargs="*", default=[c for c in CONFIGS if c != "single_no_shared_prompt"],
                   choices=list(CONFIGS))
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--group", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=512, help="response tokens")
    p.add_argument("--updates", type=int, default=4, help="optimizer updates per rollout")
    p.add_argument("--micro", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--steps", type=int, default=4, help="RL steps per configuration (the first is warm-up)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config here
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        torch.set_float32_matmul_precision("high")
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    results = {"shape": args.shape, "settings": {k: getattr(args, k) for k in (
        "prompts", "group", "prompt_len", "new_tokens", "updates", "micro", "steps")},
        "torch": torch.__version__, "matmul_bf16_tflops": matmul_tflops(args.device), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = build_model(Path(tmp) / "model", args.shape)
        prompts = write_prompts(Path(tmp) / "prompts.jsonl", args.prompts * (args.steps + 1), args.prompt_len)
        print(f"model built in {time.perf_counter() - t0:.0f} s", flush=True)
        for name in args.configs:
            cmd = [sys.executable, __file__, "--one", name, "--model-dir", str(model_dir), "--prompts-file", str(prompts),
                   *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in (
                       "shape", "device", "prompts", "group", "prompt_len", "new_tokens", "updates", "micro", "steps")), [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"config": name, "error": proc.stderr[-3000:]}
            print(json.dumps(res), flush=True)
            results["runs"].append(res)
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
