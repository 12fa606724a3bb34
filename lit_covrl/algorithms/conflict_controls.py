"""GTPO's gradient and entropy control (Simoni, Fontana, Rossolini, Saracino, Mori 2025, "GTPO:
Stabilizing Group Relative Policy Optimization via Gradient and Entropy Control", arXiv 2508.03772;
the authors' code winstonsmith1897/GTPO, gtpo/gtpo_training.py), as pure tensor functions. Not Tan
et al.'s "GTPO and GRPO-S" (arXiv 2508.04349), an unrelated token-entropy reward shaping.

Conflict tokens (`gtpo_conflicts`): within one prompt's group, a token of a response with A != 0
conflicts when the same token id stands at the same position in a response with A > 0 and in one
with A < 0 of the group (the response itself counts). Positions are counted twice, from each
response's first token (left-aligned) and from its last one (right-aligned), and in each alignment
only the run of conflicting tokens that starts at the response's edge counts: the shared opening
(cumulative product from the first token) and the shared ending (from the last one). Position k
is the k-th valid token of the response (its raw position when the mask is a prefix, as the
reference's completion mask is).

Weights (`gtpo_conflict_weights`): on a conflict token of a response with A > 0 the objective
weighs `positive_weight` per alignment in which it conflicts (the reference's W_RAW 2; a token in
both runs weighs its square, the product of the two alignments' masks), on one with A < 0 it
weighs 0 (the negative update is skipped); every other token weighs 1. The reference also divides
each response's objective by its count of conflict tokens as it computes it (max of the two runs'
lengths, at least 1): `gtpo_conflict_counts`.

Entropy filter (`gtpo_response_entropy`, `gtpo_filter`): H_i, the mean token entropy of response
i; a response with H_i > threshold is dropped (its objective weighs 0; the reference's
ENT_THRESHOLD 0.7, about ln 2), and a kept one's advantage becomes A_i - scale H_i (the
reference's ENT_SCALE 0.1; H detached), the A = 0 responses included.
Shapes: n responses of T tokens, `mask` [n, T] the valid ones, `groups` [n] each one's prompt.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl.algorithms.entropy import masked_mean

__all__ = ["gtpo_conflict_counts", "gtpo_conflict_weights", "gtpo_conflicts", "gtpo_filter",
           "gtpo_response_entropy"]


def _valid_ranks(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(k from the start, k from the end) [n, T] of each valid token among its row's valid tokens."""
    m = mask.bool().long()
    from_start = m.cumsum(-1) - 1
    return from_start, m.sum(-1, keepdim=True) - 1 - from_start


def _edge_runs(token_ids: Tensor, valid: Tensor, rank: Tensor, positive: Tensor, negative: Tensor,
               groups: Tensor) -> Tensor:
    """bool [n, T]: the valid tokens in the run of conflicting positions that starts at each row's
    edge, positions counted by `rank` (one alignment)."""
    r, t = valid.nonzero(as_tuple=True)
    k = rank[r, t]
    # one key per (group, position, token), the entries that share one holding the same token at the
    # same position of the alignment in responses of one group (the row itself included); < n T V
    group = torch.unique(groups, return_inverse=True)[1][r]
    tok = token_ids[r, t].long()
    keys, same = torch.unique((group * valid.shape[1] + k) * (int(tok.max()) + 1) + tok, return_inverse=True)
    in_positive = torch.zeros(len(keys), dtype=torch.bool, device=valid.device)
    in_negative = in_positive.clone()
    in_positive[same[positive[r]]] = True
    in_negative[same[negative[r]]] = True
    conflict = torch.zeros_like(valid)  # row i's position k of the alignment
    conflict[r, k] = in_positive[same] & in_negative[same]
    run = conflict.long().cumprod(-1).bool()  # from the edge until the first non-conflicting position
    out = torch.zeros_like(valid)
    out[r, t] = run[r, k]
    return out


def gtpo_conflicts(token_ids: Tensor, mask: Tensor, advantages: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """(leading, trailing) bool [n, T]: the conflict tokens of the responses with A != 0
    (`advantages` [n], one per response) in the left- and in the right-aligned positions."""
    valid = mask.bool()
    positive, negative = advantages > 0, advantages < 0
    active = (positive | negative)[:, None] & valid
    if not valid.any():
        return torch.zeros_like(valid), torch.zeros_like(valid)
    from_start, from_end = (k.clamp(min=0) for k in _valid_ranks(valid))  # invalid tokens: never read
    lead = _edge_runs(token_ids, valid, from_start, positive, negative, groups) & active
    trail = _edge_runs(token_ids, valid, from_end, positive, negative, groups) & active
    return lead, trail


def gtpo_conflict_weights(lead: Tensor, trail: Tensor, advantages: Tensor, *, positive_weight: float) -> Tensor:
    """float64 [n, T]: `positive_weight` per alignment in which a token of an A > 0 response
    conflicts (squared in both), 0 on a conflict token of an A < 0 response, 1 elsewhere."""
    positive = (advantages > 0)[:, None]
    per_run = [torch.where(run, torch.where(positive, positive_weight, 0.0), 1.0).double() for run in (lead, trail)]
    return per_run[0] * per_run[1]


def gtpo_conflict_counts(lead: Tensor, trail: Tensor) -> Tensor:
    """float64 [n]: the divisor of each response's objective, max(opening run's length, closing
    run's length), at least 1: the reference's count, which ORs the closing run's mask, still in
    right-aligned positions, with the opening run's in left-aligned ones (so a response whose runs
    hold a and b tokens counts max(a, b), not a + b)."""
    return torch.maximum(lead.sum(-1), trail.sum(-1)).double().clamp(min=1)


def gtpo_response_entropy(entropy: Tensor, mask: Tensor) -> Tensor:
    """float64 [n]: each response's mean token entropy over its valid tokens (0 with none)."""
    return masked_mean(entropy.double(), mask, dim=-1)


def gtpo_filter(response_entropy: Tensor, *, threshold: float, scale: float) -> tuple[Tensor, Tensor]:
    """(kept bool [n], float64 [n] the advantage shift): a response is kept when its entropy is
    <= `threshold`; a kept one's advantage moves by -scale H (the shift, whatever A: the reference
    shapes the A = 0 responses too), a dropped one's shift is 0 (its objective weighs 0)."""
    kept = response_entropy <= threshold
    shift = torch.where(kept, -scale * response_entropy, torch.zeros_like(response_entropy))
    return kept, shift
