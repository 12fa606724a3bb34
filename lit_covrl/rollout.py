"""Sampling G responses per prompt with a KV cache. Knows nothing about rewards.

Why our own loop instead of `generate`: at each step we already hold the logits, so we record
(a) log pi(token) at the training temperature, which *is* the PPO "old" log-prob (the rollout
policy has the same weights as the policy before the first update), and (b) the exact entropy
at temperature 1 (the `policy/entropy` metric). That saves a full forward pass per rollout.
Sampling is pure temperature + optional nucleus (top-p); there is no hidden top-k (HF's
`generate` defaults to top_k=50). Decoding stops as soon as every sequence has emitted EOS
(`all_done` lets distributed callers agree, so every rank runs the same number of forwards).
The prompt forward runs once per group of identical consecutive prompts (see `_prefill`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lit_covrl.policy import forward_with_cache, grouped_prompt_forward, position_ids_from_mask, prompt_groups
from lit_covrl.types import Rollout


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set to -inf the logits outside the smallest set whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the token that crosses top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _prefill(model: nn.Module, prompt_ids: Tensor, mask: Tensor):
    """Prompt forward (last-position logits) and its KV cache for every row.

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


@torch.no_grad()
def sample_responses(
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
    """Sample one response for each row of `prompt_ids` [N, P] (left-padded).

    Returns a Rollout whose `completions` are left empty (the caller decodes).
    """
    n = prompt_ids.shape[0]
    device = prompt_ids.device
    eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=device)
    mask = prompt_mask.long()
    logits, cache = _prefill(model, prompt_ids, mask)
    next_pos = position_ids_from_mask(mask)[:, -1:] + 1
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logps, ents, alive = [], [], [], []
    for step in range(max_new_tokens):
        z = logits[:, -1].float()  # [N, V]
        logp_t1 = torch.log_softmax(z, -1)
        entropy = -(logp_t1.exp() * logp_t1).sum(-1)
        logp_train = logp_t1 if temperature == 1.0 else torch.log_softmax(z / temperature, -1)
        probs = top_p_filter(z / temperature, top_p).softmax(-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        alive.append(~finished)
        tokens.append(tok)
        logps.append(logp_train.gather(-1, tok[:, None]).squeeze(-1))
        ents.append(entropy)
        finished = finished | torch.isin(tok, eos)
        if all_done(bool(finished.all())) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, alive[-1].long()[:, None]], dim=1)
        logits, cache = forward_with_cache(
            model, cache, input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos
        )
        next_pos = next_pos + 1
    response_mask = torch.stack(alive, 1)  # [N, T] True up to and including EOS
    response = torch.stack(tokens, 1)
    m = response_mask.float()
    return Rollout(
        input_ids=torch.cat([prompt_ids, response], 1),
        attention_mask=torch.cat([prompt_mask.long(), response_mask.long()], 1),
        response_mask=m,
        logp=torch.stack(logps, 1) * m,
        entropy=torch.stack(ents, 1) * m,
        truncated=~finished,
    )
