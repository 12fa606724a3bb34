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

The cutting itself is here too: `MiniBatch` (the rows of a rollout one optimizer update trains
on) and `lockstep_chunks` (its micro-batches, as many on every rank).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.types import Rollout


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


def chunks(n: int, size: int) -> list[Tensor]:
    """Row indices [0, n) in consecutive pieces of at most `size`."""
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def lockstep_chunks(n: int, size: int) -> list[Tensor | None]:
    """`chunks(n, size)` padded with None up to the largest count over all ranks.

    Under FSDP (and DDP) every forward/backward is a collective: all ranks must run the same
    number of them, even when filtering left them different numbers of rows (or none). A None
    entry is a filler pass: a forward (and, in training, a zero-weighted backward) on one row.
    """
    own = chunks(n, size)
    return own + [None] * (distributed.all_max_int(len(own)) - len(own))


def pad_columns(x: Tensor, T: int) -> Tensor:
    """[n, T', ...] -> [n, T, ...] with zeros (False) on the right (the response columns
    `trim_padding` dropped)."""
    if x.shape[1] == T:
        return x
    pad = (0, 0) * (x.dim() - 2) + (0, T - x.shape[1])  # [n, T', k]: the last dim is left as is
    if x.dtype == torch.bool:  # SimKO's top-1 flag
        return torch.nn.functional.pad(x.to(torch.uint8), pad).bool()
    return torch.nn.functional.pad(x, pad)


class MiniBatch:
    """The rows `idx` of a rollout that one optimizer update trains on (gathered copies of the
    [N, P+T] and [N, T] tensors; nothing vocabulary-sized)."""

    def __init__(self, rollout: Rollout, advantages: Tensor, ref_logp: Tensor | None, idx: Tensor,
                 group_size: int) -> None:
        self.rows = idx  # the rows' indices in the rollout
        self.groups = rollout.prompt_of(idx, group_size)  # the prompt each row answers
        self.input_ids = rollout.input_ids[idx]
        self.attention_mask = rollout.attention_mask[idx]
        self.mask = rollout.response_mask[idx]
        self.old_logp = rollout.logp[idx]
        self.old_entropy = rollout.entropy[idx]
        self.advantages = advantages[idx, None].expand_as(self.mask)
        self._ref = None if ref_logp is None else ref_logp[idx]
        # one row of the rollout for filler passes when this rank's mini-batch is empty
        self.filler = (rollout.input_ids[:1], rollout.attention_mask[:1])

    def inputs_or_filler(self) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) of the rows, or the filler row when there are none (the
        caller still runs its forwards for the collectives; results for 0 rows are empty)."""
        if len(self):
            return self.input_ids, self.attention_mask
        return self.filler

    def __len__(self) -> int:
        return self.mask.shape[0]

    def ref_rows(self, rows: Tensor) -> Tensor | None:
        return None if self._ref is None else self._ref[rows]
