"""Build the tiny warm-started policy shipped in lit_covrl/assets/tiny-arith/.

A small Qwen2ForCausalLM over a character tokenizer is trained by supervised teacher forcing on
`ArithmeticTask()` train prompts (loss on answer + EOS tokens only) and stopped EARLY, at the
first evaluation where its pure-sampling accuracy (temperature 1, top_k 0, top_p 1) on held-out
prompts reaches `--target-sample-acc`. At that point greedy decoding is clearly better than
sampling and the per-token entropy of sampled answers is substantial: the regime where GRPO can
raise the sampled accuracy quickly by sharpening, and where entropy control matters.

Deterministic: fixed seeds, a fixed thread count (`--threads`, default 2) and no data-dependent
nondeterminism; the same command gives the same weights on the same machine.

    python tools/make_tiny_model.py                 # writes lit_covrl/assets/tiny-arith/
    python tools/make_tiny_model.py --out /tmp/x    # elsewhere
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

try:
    import lit_covrl  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from lit_covrl.assets import TINY_MODEL_DIR  # noqa: E402
from lit_covrl.tasks.arithmetic import ArithmeticTask  # noqa: E402
from lit_covrl.tokenizer import build_char_tokenizer  # noqa: E402


def sft_parser(doc: str, *, out: Path, threads: int, batch_size: int, eval_every: int,
               eval_n: int) -> argparse.ArgumentParser:
    """The arguments every tiny-model SFT script shares (model size, optimizer, steps, evaluation);
    the defaults that differ between scripts are parameters."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=out, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and evaluation")
    p.add_argument("--threads", type=int, default=threads, help="torch CPU threads (fixed for determinism)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--batch-size", type=int, default=batch_size, help="SFT sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--max-steps", type=int, default=3000, help="give up after this many steps")
    p.add_argument("--eval-every", type=int, default=eval_every, help="steps between held-out evaluations")
    p.add_argument("--eval-n", type=int, default=eval_n, help="held-out prompts per evaluation")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = sft_parser(__doc__, out=TINY_MODEL_DIR, threads=2, batch_size=256, eval_every=20, eval_n=512)
    p.add_argument("--target-sample-acc", type=float, default=0.2,
                   help="stop at the first evaluation whose sampled accuracy reaches this")
    p.add_argument("--no-stop", action="store_true", help="train to --max-steps (for exploring)")
    p.add_argument("--no-save", action="store_true", help="do not write the output folder")
    return p.parse_args(argv)


def build_model(vocab_size: int, tok, hidden: int, layers: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * hidden,
        max_position_embeddings=64, tie_word_embeddings=True, rope_theta=10000.0,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, use_cache=True,
    )
    return Qwen2ForCausalLM(cfg)


def sft_batch(examples, tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer+EOS ids, attention mask, labels (-100 except answer+EOS)."""
    seqs, labels = [], []
    for ex in examples:
        p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        a = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(l)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(l), 1
    return ids, mask, lab


@torch.no_grad()
def sft_optimizer(model, lr: float, warmup: int):
    """AdamW (betas 0.9 / 0.98, weight decay 0.01) with a linear warmup to `lr` over `warmup` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def sft_step(model, opt, sched, batch) -> torch.Tensor:
    """One supervised step on `sft_batch`'s (ids, mask, labels): loss, backward, clip at 1, step."""
    ids, mask, lab = batch
    loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss


def generate(model, tok, prompts: list[str], max_new_tokens: int, greedy: bool,
             gen: torch.Generator) -> tuple[list[str], float]:
    """Left-padded batched decoding (pure sampling at temperature 1 unless greedy).

    Returns the decoded completions (up to EOS, special tokens dropped) and the mean per-token
    entropy (nats) of the policy over the generated tokens (EOS included, padding excluded).
    """
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    ent_sum, ent_cnt, out = 0.0, 0, []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        ent_sum += ent[~done].sum().item()
        ent_cnt += int((~done).sum())
        nxt = logits.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        out.append(nxt)
        done |= nxt == tok.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():
            break
    texts = tok.batch_decode(torch.stack(out, 1), skip_special_tokens=True)
    return texts, ent_sum / max(ent_cnt, 1)


def evaluate(model, tok, heldout, max_new_tokens: int, seed: int, group: int = 8,
             n_groups: int = 64) -> dict[str, float]:
    """Held-out accuracy (one pure sample per prompt, and greedy), mean token entropy of the
    samples, and what GRPO sees: over `n_groups` prompts x `group` samples, the mean number of
    distinct answers per group and the fraction of groups whose rewards are not all equal."""
    model.eval()
    prompts = [e.prompt for e in heldout]
    gen = torch.Generator().manual_seed(seed)
    sampled, entropy = generate(model, tok, prompts, max_new_tokens, greedy=False, gen=gen)
    greedy, _ = generate(model, tok, prompts, max_new_tokens, greedy=True, gen=gen)
    sub = heldout[:n_groups]
    grouped, _ = generate(model, tok, [e.prompt for e in sub for _ in range(group)],
                          max_new_tokens, greedy=False, gen=gen)
    model.train()
    hit = lambda outs: sum(o.strip() == e.answer for o, e in zip(outs, heldout)) / len(heldout)  # noqa: E731
    groups = [grouped[i * group:(i + 1) * group] for i in range(len(sub))]
    mixed = [len({o.strip() == e.answer for o in g}) == 2 for g, e in zip(groups, sub)]
    return {"sample_acc": hit(sampled), "greedy_acc": hit(greedy), "entropy": entropy,
            "group_distinct": sum(len(set(g)) for g in groups) / len(groups),
            "group_mixed_frac": sum(mixed) / len(mixed)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    task = ArithmeticTask()
    tok = build_char_tokenizer(task.alphabet)
    model = build_model(len(tok), tok, args.hidden, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}  vocab: {len(tok)}  task: {task}")

    heldout = task.heldout(args.eval_n, seed=args.seed + 1)
    max_new = task.max_answer_chars + 1  # answer + EOS
    rng = random.Random(args.seed)
    opt, sched = sft_optimizer(model, args.lr, args.warmup)
    model.train()
    metrics: dict = {}
    step = 0
    for step in range(1, args.max_steps + 1):
        loss = sft_step(model, opt, sched, sft_batch([task.sample(rng) for _ in range(args.batch_size)], tok))
        if step % args.eval_every == 0:
            metrics = evaluate(model, tok, heldout, max_new, seed=args.seed + 2)
            print(f"step {step:5d}  loss {loss.item():.4f}  sample_acc {metrics['sample_acc']:.3f}  "
                  f"greedy_acc {metrics['greedy_acc']:.3f}  entropy {metrics['entropy']:.3f}  "
                  f"distinct/8 {metrics['group_distinct']:.2f}  mixed {metrics['group_mixed_frac']:.2f}  "
                  f"({time.time() - start:.0f}s)",
                  flush=True)
            if not args.no_stop and metrics["sample_acc"] >= args.target_sample_acc:
                break
    else:
        if not args.no_stop:
            raise SystemExit(f"sampled accuracy never reached {args.target_sample_acc}")

    summary = {"sft_steps": step, "params": n_params, "heldout_n": len(heldout),
               "heldout_seed": args.seed + 1, "max_new_tokens": max_new,
               **{k: round(v, 4) for k, v in metrics.items()},
               "seconds": round(time.time() - start, 1)}
    print(json.dumps(summary))
    if not args.no_save:
        save(model, tok, args.out)
        size = sum(f.stat().st_size for f in args.out.iterdir())
        print(f"saved to {args.out} ({size / 1e6:.2f} MB)")
    return summary


def save(model: Qwen2ForCausalLM, tok, out: Path, max_new_tokens: int = 8) -> None:
    """The model (with a pure-sampling generation config) and its tokenizer as a HF folder."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


if __name__ == "__main__":
    main()
