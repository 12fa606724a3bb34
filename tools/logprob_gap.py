"""How far the sampler's recorded old log-probs are from the training forward's.

The sampler records log pi_old(token) while decoding (KV cache, one token at a time); verl instead
recomputes them with a full-sequence forward. Both are the same quantity in exact arithmetic; this
prints how much float rounding separates them, per dtype, on the shipped tiny model (or --model):

    python tools/logprob_gap.py [--model lit_covrl:tiny-arith] [--dtypes float32,bfloat16] [--device cuda]

`model.update.recompute_logprobs: true` makes the first update's PPO ratio exactly 1 where this matters.
"""
from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints the table; returns its rows ({dtype, temperature, max, mean, tokens})."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lit_covrl:tiny-arith")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="where to sample and forward (cuda: the GPU kernels' gap)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from lit_covrl.policy import load_policy, load_tokenizer, response_logprobs
    from lit_covrl.prompts import encode_prompts
    from lit_covrl.rollout import sample_responses
    from lit_covrl.tasks import get_task

    tok = load_tokenizer(args.model)
    task = get_task("arithmetic")
    import random

    rng = random.Random(0)
    prompts = [task.sample(rng).prompt for _ in range(args.prompts)]
    ids, mask = encode_prompts(tok, prompts, chat_template=False)
    ids, mask = ids.repeat_interleave(args.group, 0).to(args.device), mask.repeat_interleave(args.group, 0).to(args.device)
    print(f"{args.model} on {args.device}: {len(prompts)} prompts x {args.group} samples, <= {args.max_new_tokens} new tokens")
    print("dtype      temperature  max|sampler - forward|  mean|sampler - forward|  tokens")
    rows = []
    for dtype in args.dtypes.split(","):
        model = load_policy(args.model, dtype=dtype).to(args.device).eval()
        for temp in (1.0, 0.7):
            ro = sample_responses(model, ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, temperature=temp,
                                  generator=torch.Generator(device=args.device).manual_seed(0))
            with torch.no_grad():
                lp, _ = response_logprobs(model, ro.input_ids, ro.attention_mask, ro.response_mask.shape[1], temperature=temp)
            m = ro.response_mask.bool()
            gap = (lp - ro.logp)[m].abs()
            rows.append(dict(dtype=dtype, temperature=temp, max=gap.max().item(), mean=gap.mean().item(), tokens=int(m.sum())))
            print(f"{dtype:10s} {temp:11.1f}  {rows[-1]['max']:22.2e}  {rows[-1]['mean']:23.2e}  {rows[-1]['tokens']:6d}")
    return rows


if __name__ == "__main__":
    main()
