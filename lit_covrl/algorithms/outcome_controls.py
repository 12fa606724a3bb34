"""Outcome-based exploration (Song, Kempe, Munos 2025, "Outcome-based Exploration for LLM
Reasoning", arXiv 2509.06941) as pure functions: exploration terms that depend only on each
response's final answer (its outcome), not on its tokens.

- historical exploration: a UCB-style bonus for answers rarely seen for their prompt over
  training, c_hist / sqrt(N(x, a)), with N(x, a) the number of responses to prompt x whose final
  answer was a, counted over every RL step so far including the current one (so N >= 1 and the
  bonus is at most c_hist; `historical_bonus`);
- batch exploration: a penalty for answers repeated within the group, c_batch times the share of
  the group's other G - 1 responses with the same final answer (`batch_repeats`).

A response without a final answer (its reward function names none, answer id -1) gets neither
term and is not counted. `outcome_shaping` combines them; `group_centered` subtracts each group's
mean (the baseline of the `apply: advantage` route). What the paper's method section says beyond
its abstract could not be read here: see the README row for what was chosen.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _grouped(x: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or x.dim() != 1 or x.numel() % group_size:
        raise ValueError(f"expected a flat [B*G] tensor with G={group_size}, got shape {tuple(x.shape)}")
    return x.view(-1, group_size)


def historical_bonus(counts: Tensor) -> Tensor:
    """1 / sqrt(N) for each response's count N(x, a) >= 1 (float64); 0 where N = 0 (no answer)."""
    n = counts.double()
    return torch.where(n > 0, n.clamp(min=1).rsqrt(), torch.zeros_like(n))


def batch_repeats(answer_ids: Tensor, group_size: int) -> Tensor:
    """[B*G] float64: the share of the other G - 1 responses of each response's group whose answer
    id equals its own (ids >= 0; -1, no answer, matches nothing); 0 for G = 1."""
    ids = _grouped(answer_ids, group_size)
    same = (ids[:, :, None] == ids[:, None, :]) & (ids >= 0)[:, :, None]
    repeats = same.sum(dim=2).double() - (ids >= 0).double()  # minus the response itself
    return (repeats / max(group_size - 1, 1)).reshape(-1)


def distinct_answers(answer_ids: Tensor, group_size: int) -> Tensor:
    """[B] float64: the number of distinct answers (ids >= 0) of each group."""
    ids = _grouped(answer_ids, group_size)
    first = ids[:, :, None] == ids[:, None, :]
    earlier = torch.tril(first, diagonal=-1).any(dim=2)  # the same id occurs at an earlier position
    return ((ids >= 0) & ~earlier).sum(dim=1).double()


def outcome_shaping(counts: Tensor, answer_ids: Tensor, eligible: Tensor, group_size: int, *,
                    historical: float, batch: float) -> tuple[Tensor, Tensor]:
    """(historical term, batch term) [B*G] float64 of eligible responses (0 elsewhere):
    historical * historical_bonus(counts) and -batch * batch_repeats(answer_ids); their sum is the
    shaping added to each response's reward (or, group-centred, to its advantage)."""
    keep = eligible.double()
    hist = historical * historical_bonus(counts) * keep
    pen = -batch * batch_repeats(answer_ids, group_size) * keep
    return hist, pen


def group_centered(x: Tensor, group_size: int) -> Tensor:
    """x minus its group's mean, [B*G] float64."""
    g = _grouped(x.double(), group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)
