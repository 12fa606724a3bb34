"""How far the sampler's recorded old log-probs are from the training forward's.

The sampler records log pi_old(token) while decoding (KV cache, one token at a time); verl instead
recomputes them with a full-sequence forward. Both are the same quantity in exact arithmetic; this
prints how much float rounding separates them, per dtype, on the shipped tiny model (or --model):

    python tools/logprob_gap.py [--model lit_covrl:tiny-arith] [--dtypes float32,bfloat16] [--device cuda]
    python tools/logprob_gap.py --device cuda --sampler static_compile --autocast   # a GPU fit's default

--sampler picks the rollout sampler (kv: `KVCacheSampler`; static: `StaticCacheSampler(graphs="none")`;
static_compile / static_graph: its decoding step compiled / captured as a CUDA graph, on CUDA only:
elsewhere the sampler decodes eagerly). --autocast loads fp32 weights and runs the sampler and the
forward under bf16 `torch.autocast`, as Lightning's `precision: bf16-mixed` does in a fit (rows
labelled bf16-mixed; --dtypes does not apply).

`model.update.recompute_logprobs: true` makes the first update's PPO ratio exactly 1 where this matters.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

SAMPLERS = {  # --sampler -> (class in lit_covrl.sampling, init_args)
    "kv": ("KVCacheSampler", {}),
    "static": ("StaticCacheSampler", dict(graphs="none")),
    "static_compile": ("StaticCacheSampler", dict(graphs="compile")),
    "static_graph": ("StaticCacheSampler", dict(graphs="cuda_graph")),
}


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints the table; returns its rows ({sampler, dtype, temperature, max, mean, tokens})."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lit_covrl:tiny-arith")
    ap.add_argument("--dtypes", default=None, help="weight dtypes, comma-separated (default float32,bfloat16)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="where to sample and forward (cuda: the GPU kernels' gap)")
    ap.add_argument("--sampler", choices=list(SAMPLERS), default="kv", help="the rollout sampler (default kv)")
    ap.add_argument("--autocast", action="store_true",
                    help="fp32 weights under bf16 torch.autocast (precision bf16-mixed) instead of --dtypes")
    args = ap.parse_args(argv)
    if args.autocast and args.dtypes is not None:
        ap.error("--autocast runs fp32 weights under bf16 autocast: leave out --dtypes")
    torch.set_num_threads(1)
    from lit_covrl import sampling
    from lit_covrl.policy import load_policy, load_tokenizer, response_logprobs
    from lit_covrl.prompts import encode_prompts
    from lit_covrl.tasks import get_task

    tok = load_tokenizer(args.model)
    task = get_task("arithmetic")
    import random

    rng = random.Random(0)
    prompts = [task.sample(rng).prompt for _ in range(args.prompts)]
    ids, mask = encode_prompts(tok, prompts, chat_template=False)
    ids, mask = ids.repeat_interleave(args.group, 0).to(args.device), mask.repeat_interleave(args.group, 0).to(args.device)
    cls, init_args = SAMPLERS[args.sampler]
    sampler = getattr(sampling, cls)(**init_args)
    print(f"{args.model} on {args.device}: {len(prompts)} prompts x {args.group} samples, "
          f"<= {args.max_new_tokens} new tokens, {sampler!r}")
    print("dtype       temperature  max|sampler - forward|  mean|sampler - forward|  tokens")
    rows = []
    for dtype in ["float32"] if args.autocast else (args.dtypes or "float32,bfloat16").split(","):
        label = "bf16-mixed" if args.autocast else dtype
        model = load_policy(args.model, dtype=dtype).to(args.device).eval()
        for temp in (1.0, 0.7):
            autocast = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.autocast
                        else contextlib.nullcontext())
            with autocast, torch.no_grad():
                ro = sampler.sample(model, ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, temperature=temp,
                                    generator=torch.Generator(device=args.device).manual_seed(0))
                lp = response_logprobs(model, ro.input_ids, ro.attention_mask, ro.response_mask.shape[1], temperature=temp).logp
            m = ro.response_mask.bool()
            gap = (lp.float() - ro.logp.float())[m].abs()
            rows.append(dict(sampler=args.sampler, dtype=label, temperature=temp, max=gap.max().item(),
                             mean=gap.mean().item(), tokens=int(m.sum())))
            print(f"{label:11s} {temp:11.1f}  {rows[-1]['max']:22.2e}  {rows[-1]['mean']:23.2e}  {rows[-1]['tokens']:6d}")
    return rows


if __name__ == "__main__":
    main()
