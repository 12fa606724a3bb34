"""KVCacheSampler: sampling with the model's own (dynamic) KV cache, one forward per token.

Why our own loop instead of `generate`: at each step we already hold the logits, so we record
log pi(token) at the training temperature (the PPO "old" log-prob) and the exact entropy of the
sampled distribution (`base.sample_token`), which saves a full forward pass per rollout.
The prompt forward runs once per group of identical consecutive prompts (`prefill`). After each
token the finished-check is read back (one host sync per step), so decoding stops at the first
step where every row (on every rank, `all_done`) has emitted an EOS id.

Simple and exact on any device and any cache class; on a GPU every step pays Python and kernel
launches (see `StaticCacheSampler` for the CUDA-graph path).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lit_covrl.policy import forward_with_cache, grouped_prompt_forward, position_ids_from_mask, prompt_groups
from lit_covrl.sampling.base import Sampler, eos_ids, finish_rollout, sample_token
from lit_covrl.types import Rollout


def prefill(model: nn.Module, prompt_ids: Tensor, mask: Tensor):
    """Prompt forward (last-position logits [N, 1, V]) and its KV cache for every row.

    GRPO repeats each prompt G times in consecutive rows: the prompt forward runs once per run of
    identical rows (same ids and mask) and its cache rows are repeated (`grouped_prompt_forward`),
    instead of G identical forwards. Falls back to the plain forward when no row repeats or the
    model's cache rows cannot be selected."""
    first, rows = prompt_groups(prompt_ids, mask)
    if len(first) < len(rows):
        out = grouped_prompt_forward(model, prompt_ids, mask, first, rows)
        if out is not None:
            return out
        # another cache class: a second, per-row prompt forward. Caveat: under FSDP a rank with
        # repeated rows then runs one forward more than a rank without (with GRPO groups, G > 1,
        # every rank has repeats; only such exotic caches with G = 1 could get out of step)
    return forward_with_cache(
        model, None, input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
        logits_to_keep=1,
    )


class KVCacheSampler(Sampler):
    """One model forward per new token on a growing KV cache; stops at the first all-done step."""

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        all_done: Callable[[bool], bool] = lambda done: done,
    ) -> Rollout:
        n, device = prompt_ids.shape[0], prompt_ids.device
        eos = eos_ids(eos_token_id, device)
        mask = prompt_mask.long()
        logits, cache = prefill(model, prompt_ids, mask)
        next_pos = position_ids_from_mask(mask)[:, -1:] + 1
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        nonfinite = torch.zeros(n, dtype=torch.bool, device=device)
        tokens, logps, ents, alive = [], [], [], []
        for step in range(max_new_tokens):
            tok, logp, entropy, bad = sample_token(logits[:, -1], temperature, top_p, generator, eos[0])
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            nonfinite |= bad & ~finished
            alive.append(~finished)
            tokens.append(tok)
            logps.append(logp)
            ents.append(entropy)
            finished = finished | torch.isin(tok, eos)
            if all_done(bool(finished.all())) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, alive[-1].long()[:, None]], dim=1)
            logits, cache = forward_with_cache(
                model, cache, input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos
            )
            next_pos = next_pos + 1
        return finish_rollout(prompt_ids, prompt_mask, torch.stack(tokens, 1), torch.stack(alive, 1),
                              torch.stack(logps, 1), torch.stack(ents, 1), finished, nonfinite)
