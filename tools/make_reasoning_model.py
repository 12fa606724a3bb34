"""Build the warm-started policy shipped in lit_covrl/assets/tiny-reasoning/.

A small Qwen2ForCausalLM over a character tokenizer is trained by supervised teacher forcing on
`ReasoningTask()` train prompts (loss on the written solution + EOS only: "12+34+5-7=" ->
"12+34=46,46+5=51,51-7=44|44<eos>") and stopped EARLY, at the first held-out evaluation whose
sampled accuracy is in the target window: pass@1 in [--pass1-low, --pass1-high] and pass@8 at
least --min-pass8, with pure sampling (temperature 1, top_k 0, top_p 1) and the exact reward
(every step and the answer right). That is a starting point where RL has room: most prompts are
solved by some of 8 samples and not by most of them.

Deterministic: fixed seeds, a fixed thread count (`--threads`, default 1) and no data-dependent
nondeterminism; the same command gives the same weights on the same machine.

    python tools/make_reasoning_model.py                 # writes lit_covrl/assets/tiny-reasoning/
    python tools/make_reasoning_model.py --out /tmp/x    # elsewhere
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lit_covrl first
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the shared SFT helpers

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from lit_covrl.assets import TINY_REASONING_DIR  # noqa: E402
from lit_covrl.tasks.reasoning import ReasoningTask, verify  # noqa: E402
from lit_covrl.tokenizer import build_char_tokenizer  # noqa: E402
from make_tiny_model import save, sft_batch, sft_optimizer, sft_parser, sft_step  # noqa: E402  (the same SFT loop, arguments and folder layout)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = sft_parser(__doc__, out=TINY_REASONING_DIR, threads=1, batch_size=128, eval_every=25, eval_n=128)
    p.add_argument("--final-eval-n", type=int, default=512, help="held-out prompts of the final report")
    p.add_argument("--samples", type=int, default=8, help="samples per held-out prompt (pass@k, k = this)")
    p.add_argument("--pass1-low", type=float, default=0.1, help="target window: lowest pass@1")
    p.add_argument("--pass1-high", type=float, default=0.3, help="target window: highest pass@1")
    p.add_argument("--min-pass8", type=float, default=0.45, help="target window: lowest pass@k")
    p.add_argument("--no-stop", action="store_true", help="train to --max-steps (for exploring)")
    p.add_argument("--no-save", action="store_true", help="do not write the output folder")
    return p.parse_args(argv)


def build_model(tok, hidden: int, layers: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * hidden,
        max_position_embeddings=128, tie_word_embeddings=True, rope_theta=10000.0,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, use_cache=True,
    )
    return Qwen2ForCausalLM(cfg)


@torch.no_grad()
def sample(model, tok, prompts: list[str], max_new_tokens: int, seed: int,
           greedy: bool = False) -> tuple[list[str], float, float]:
    """HF `generate` (KV cache) at temperature 1, top_k 0, top_p 1 (or greedy), seeded.

    Returns the completions, the mean per-token entropy (nats) of the sampled distribution over
    the generated tokens (EOS included, padding excluded) and the mean response length in tokens.
    """
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    knobs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    out = model.generate(**enc, **knobs,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, output_scores=True,
                         return_dict_in_generate=True)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    # a generated token is real up to and including the first EOS
    is_eos = new == tok.eos_token_id
    real = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
    ent = -(logp.exp() * logp).nan_to_num().sum(-1)[:, : new.shape[1]]
    entropy = (ent * real).sum().item() / max(real.sum().item(), 1)
    return tok.batch_decode(new, skip_special_tokens=True), entropy, real.sum().item() / len(prompts)


def evaluate(model, tok, heldout, max_new_tokens: int, samples: int, seed: int,
             greedy: bool = False) -> dict[str, float]:
    """Held-out pass@1 (mean correct fraction over `samples` draws) and pass@`samples` (any
    correct; with n = k the unbiased estimator is exactly this), the fraction of well-formed
    samples, their mean token entropy and length, and optionally the greedy accuracy."""
    model.eval()
    prompts = [e.prompt for e in heldout for _ in range(samples)]
    texts, entropy, length = sample(model, tok, prompts, max_new_tokens, seed)
    verdicts = [verify(p, t) for p, t in zip(prompts, texts)]
    hits = [[verdicts[i * samples + j].correct for j in range(samples)] for i in range(len(heldout))]
    out = {"pass1": sum(map(sum, hits)) / (samples * len(heldout)),
           f"pass{samples}": sum(max(h) for h in hits) / len(heldout),
           "well_formed": sum(v.well_formed for v in verdicts) / len(verdicts),
           "answer_only_acc": sum(v.well_formed and v.answer_correct for v in verdicts) / len(verdicts),
           "entropy": entropy, "response_tokens": length}
    if greedy:
        g, _, _ = sample(model, tok, [e.prompt for e in heldout], max_new_tokens, seed, greedy=True)
        out["greedy_acc"] = sum(verify(e.prompt, t).correct for t, e in zip(g, heldout)) / len(heldout)
    model.train()
    return out


def in_window(m: dict, args) -> bool:
    return args.pass1_low <= m["pass1"] <= args.pass1_high and m[f"pass{args.samples}"] >= args.min_pass8


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    task = ReasoningTask()
    tok = build_char_tokenizer(task.alphabet)
    model = build_model(tok, args.hidden, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}  vocab: {len(tok)}  task: {task}", flush=True)

    heldout = task.heldout(args.eval_n, seed=args.seed + 1)
    max_new = task.max_response_chars + 1  # solution + EOS
    rng = random.Random(args.seed)
    opt, sched = sft_optimizer(model, args.lr, args.warmup)
    model.train()
    metrics: dict = {}
    step = 0
    for step in range(1, args.max_steps + 1):
        loss = sft_step(model, opt, sched, sft_batch([task.sample(rng) for _ in range(args.batch_size)], tok))
        if step % args.eval_every == 0:
            metrics = evaluate(model, tok, heldout, max_new, args.samples, seed=args.seed + 2)
            print(f"step {step:5d}  loss {loss.item():.4f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                  + f"  ({time.time() - start:.0f}s)", flush=True)
            if not args.no_stop and in_window(metrics, args):
                break
            if not args.no_stop and metrics["pass1"] > args.pass1_high:
                raise SystemExit(f"pass@1 jumped past {args.pass1_high} at step {step}: "
                                 "evaluate more often (--eval-every) or lower --lr")
    else:
        if not args.no_stop:
            raise SystemExit(f"never reached the target window in {args.max_steps} steps")

    train_seconds = time.time() - start
    final = task.heldout(args.final_eval_n, seed=args.seed + 1)  # a superset of the stopping set
    metrics = evaluate(model, tok, final, max_new, args.samples, seed=args.seed + 3, greedy=True)
    summary = {"sft_steps": step, "params": n_params, "heldout_n": len(final),
               "heldout_seed": args.seed + 1, "eval_seed": args.seed + 3,
               "samples": args.samples, "max_new_tokens": max_new,
               **{k: round(v, 4) for k, v in metrics.items()},
               "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - start, 1)}
    print(json.dumps(summary))
    if not args.no_save:
        save(model, tok, args.out, max_new)
        size = sum(f.stat().st_size for f in args.out.iterdir())
        print(f"saved to {args.out} ({size / 1e6:.2f} MB)")
    return summary


if __name__ == "__main__":
    main()
