"""No compute on padding: trim each micro-batch to its own extent, and group rows of similar length.

A rollout is one [N, P + T] tensor: prompts left-padded to the longest prompt P, responses
right-padded to the longest response T. A micro-batch cut from it carries all of that padding,
although its own rows may be much shorter (a long-tailed response length is the rule in reasoning
RL). Two pure steps remove it without changing any result:

- `trim_padding`: drop the leading columns that are padding in every row of the micro-batch and
  the trailing response columns that are padding in every row. Positions come from the attention
  mask (`position_ids_from_mask`), masked keys take no attention weight, and a causal model's
  earlier positions never see later columns, so the kept tokens' log-probs are the same (to the
  rounding of differently shaped kernels); the caller pads the [n, T'] results back to [n, T]
  with zeros, as the dropped columns are outside the response mask anyway.
- `length_order`: the order in which to cut micro-batches, longest first, so that each
  micro-batch holds rows of similar length and trimming drops the most. The learner keeps each
  prompt group's rows together (blocks ordered by their longest row, rows longest first inside),
  so that the shared-prompt forward still sees runs of identical prompts and the micro-batches are
  the same whether it is on or off.

The loss is aggregated with the mini-batch's denominators, so the order of micro-batches changes
nothing but the floating-point order of the gradient sums.
"""
from __future__ import annotations

import torch
from torch import Tensor


def trim_padding(input_ids: Tensor, attention_mask: Tensor, response_len: int,
                 min_response: int = 1) -> tuple[Tensor, Tensor, int]:
    """(input_ids, attention_mask, response_len) with the all-padding leading columns and
    trailing response columns of these rows dropped.

    At least one prompt column and one response column are kept, so the result is always a valid
    input of `response_logprobs` (the response's first token is predicted from the last prompt
    column). The kept response columns are the first `response_len'` of the original ones, at least
    `min_response` of them (when there are that many)."""
    P = input_ids.shape[1] - response_len
    any_real = attention_mask.bool().any(0)
    real = torch.nonzero(any_real).squeeze(-1)
    if real.numel() == 0:
        return input_ids, attention_mask, response_len
    start = min(int(real[0]), max(P - 1, 0))
    end = max(int(real[-1]) + 1, P + min(max(min_response, 1), response_len))  # exclusive
    return input_ids[:, start:end], attention_mask[:, start:end], end - P


def length_order(attention_mask: Tensor, groups: Tensor | None = None) -> Tensor:
    """A permutation of the rows, longest first (valid tokens per row; ties keep their order).

    groups: [n] group id per row (consecutive rows with the same prompt share an id, as
    `prompt_groups` returns). Given, each group moves as one block, the blocks ordered by their
    longest row and the rows inside a block longest first: runs of identical prompts stay
    contiguous (one prompt forward per run) and a micro-batch smaller than a group still gets
    rows of similar length."""
    lengths = attention_mask.sum(1)
    order = torch.sort(lengths, descending=True, stable=True).indices
    if groups is None or len(groups) == 0:
        return order
    n_groups = int(groups.max()) + 1
    longest = lengths.new_zeros(n_groups).scatter_reduce(0, groups, lengths, reduce="amax")
    rank = torch.empty_like(longest)
    rank[torch.sort(longest, descending=True, stable=True).indices] = torch.arange(n_groups, device=longest.device)
    return order[torch.sort(rank[groups[order]], stable=True).indices]
