"""lit_covrl vs Hugging Face TRL's GRPOTrainer, side by side in one process run.

    pip install -e '.[trl]'
    python tools/bench_trl.py [--json] [--rollouts 10] [--warmup 2] [--reps 2] [--max-new-tokens 5]

Identical setup on both sides: the shipped tiny policy (`lit_covrl:tiny-arith`, char tokenizer),
the same arithmetic prompts (the first prompts of lit_covrl's seed-0 train stream), 16 prompts x
8 generations = 128 completions per rollout, the same completion length limit, temperature 1 with
no top-k / top-p, exact-match reward, GRPO group-normalized advantages, token-mean loss, clip
0.2, no KL / reference model (TRL's default beta = 0), AdamW lr 1e-4, grad clip 1, float32 on the
CPU with one torch thread, and the same number of optimizer updates per rollout:
- 1 update: lit_covrl `mini_batch_size: null`; TRL `per_device_train_batch_size=128,
  steps_per_generation=1`;
- 4 updates: lit_covrl `mini_batch_size: 4` (the quickstart); TRL `per_device_train_batch_size=32,
  steps_per_generation=4` (one generation of 128 completions feeds 4 optimizer steps).
TRL runs with `gradient_checkpointing=False` (its default is True, which only adds recomputation:
the models are tiny) and `use_cpu=True, bf16=False`.

Measured: wall time per rollout, start to start, so everything either trainer does counts
(logging, data): TRL from the `on_step_begin` of the step that generates to the next such one;
lit_covrl from one `on_train_batch_start` to the next (one RL step)
and completion tokens per rollout (valid tokens up to and including EOS on both sides). Blocks
run interleaved (lit 1, TRL 1, lit 4, TRL 4, repeated `--reps` times); each block drops its first
`--warmup` rollouts; the figure is the median over all kept rollouts. Ratio = lit_covrl completion
tokens/s / TRL completion tokens/s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import bench  # noqa: E402  (tools/bench.py)

PROMPTS_PER_ROLLOUT = 16
GROUP = 8
LR = 1e-4


def prompts(n: int) -> list:
    """The first n examples of lit_covrl's seed-0 arithmetic train stream (what lit_covrl trains on)."""
    dm = bench.make_data(PROMPTS_PER_ROLLOUT)
    out = []
    for batch in dm._stream(0, 1, start=0):
        out += list(zip(batch.prompts, batch.answers))
        if len(out) >= n:
            return out[:n]
    return out


# ----------------------------------------------------------------------------- lit_covrl side


def run_lit(updates: int, rollouts: int, warmup: int, max_new_tokens: int, log_dir: str) -> list[dict]:
    module = bench.make_module(
        bench.QUICKSTART, rollout=dict(max_new_tokens=max_new_tokens),
        update=dict(mini_batch_size=None if updates == 1 else PROMPTS_PER_ROLLOUT // updates),
    )
    rec = bench.PhaseRecorder()
    bench._fit(module, bench.make_data(PROMPTS_PER_ROLLOUT), warmup + rollouts + 1, [rec], log_dir)
    st = rec.steps  # one extra rollout so that every measured one has a next start
    return [{"seconds": b["t_start"] - a["t_start"], "tokens": a["completion_tokens"]}
            for a, b in zip(st[warmup:-1], st[warmup + 1:])]


# ----------------------------------------------------------------------------- TRL side


def run_trl(updates: int, rollouts: int, warmup: int, max_new_tokens: int, out_dir: str) -> list[dict]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lit_covrl.policy import load_policy, load_tokenizer
    from lit_covrl.rewards import ExactMatchReward

    total = warmup + rollouts + 1  # one extra rollout so that every measured one has a next start
    rows = prompts(PROMPTS_PER_ROLLOUT * total)
    data = Dataset.from_dict({"prompt": [p for p, _ in rows], "answer": [a for _, a in rows]})
    tokens: list[int] = []
    exact = ExactMatchReward()

    def reward(prompts, completions, completion_ids, answer, **_):
        tokens.append(sum(len(ids) for ids in completion_ids))  # once per generation (128 completions)
        return [float(exact(c, a)) for c, a in zip(completions, answer)]

    per_step = PROMPTS_PER_ROLLOUT * GROUP // updates
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=per_step, steps_per_generation=updates, gradient_accumulation_steps=1,
        num_generations=GROUP, num_iterations=1, max_completion_length=max_new_tokens,
        temperature=1.0, top_k=0, top_p=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", max_steps=total * updates, logging_steps=1, save_strategy="no", report_to="none",
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False,
    )
    starts: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            starts.append(time.perf_counter())

    model = load_policy(bench.QUICKSTART)
    tok = load_tokenizer(bench.QUICKSTART)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    first = starts[::updates]  # the step that generates starts each rollout
    per_rollout = [b - a for a, b in zip(first, first[1:])]
    return [{"seconds": s, "tokens": t} for s, t in list(zip(per_rollout, tokens))[warmup:]]


# ----------------------------------------------------------------------------- main


def summarize(samples: list[dict]) -> dict:
    return {
        "rollout_s": round(statistics.median(s["seconds"] for s in samples), 5),
        "tokens_per_rollout": round(statistics.median(s["tokens"] for s in samples), 1),
        "tokens_per_s": round(statistics.median(s["tokens"] / s["seconds"] for s in samples), 1),
        "rollouts_measured": len(samples),
    }


def run(rollouts: int = 10, warmup: int = 2, reps: int = 2, max_new_tokens: int = 5, updates=(1, 4),
        progress=None) -> dict:
    bench._quiet()
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    res: dict = {"machine": bench.machine(), "setup": {
        "model": bench.QUICKSTART, "prompts_per_rollout": PROMPTS_PER_ROLLOUT, "generations": GROUP,
        "max_new_tokens": max_new_tokens, "rollouts_per_block": rollouts, "warmup_per_block": warmup, "reps": reps}}
    samples = {(side, u): [] for u in updates for side in ("lit_covrl", "trl")}
    with tempfile.TemporaryDirectory(prefix="lit_covrl_trl_") as tmp:
        for rep in range(reps):
            for u in updates:
                for side, fn in (("lit_covrl", run_lit), ("trl", run_trl)):
                    if progress:
                        progress(f"rep {rep + 1}/{reps}: {side}, {u} update(s) per rollout")
                    samples[(side, u)] += fn(u, rollouts, warmup, max_new_tokens, tmp)
    for u in updates:
        lit, trl = summarize(samples[("lit_covrl", u)]), summarize(samples[("trl", u)])
        res[f"updates_{u}"] = {"lit_covrl": lit, "trl": trl, "ratio": round(lit["tokens_per_s"] / trl["tokens_per_s"], 3),
                               "ratio_rollout_time": round(trl["rollout_s"] / lit["rollout_s"], 3)}
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rollouts", type=int, default=10, help="measured rollouts per block")
    ap.add_argument("--warmup", type=int, default=2, help="rollouts dropped at the start of each block")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of the interleaved blocks")
    ap.add_argument("--max-new-tokens", type=int, default=5, help="completion length limit (quickstart: 5)")
    args = ap.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("TRL is not installed: pip install -e '.[trl]'")
    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(sys.stderr):
        res = run(args.rollouts, args.warmup, args.reps, args.max_new_tokens,
                  progress=lambda s: print(f"[bench_trl] {s}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(res))
        return
    m = res["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, 1 thread; load {m['loadavg_1_5_15']} -> {m['loadavg_end']}")
    for key in (k for k in res if k.startswith("updates_")):
        r = res[key]
        print(f"{key}: lit_covrl {r['lit_covrl']['tokens_per_s']} tok/s ({r['lit_covrl']['rollout_s']} s/rollout), "
              f"TRL {r['trl']['tokens_per_s']} tok/s ({r['trl']['rollout_s']} s/rollout)  ->  ratio {r['ratio']}x")


if __name__ == "__main__":
    main()
