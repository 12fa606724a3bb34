"""EPO's entropy smoothing and phase weight (Xu et al. 2025, "EPO: Entropy-regularized Policy
Optimization for LLM Agents Reinforcement Learning", arXiv 2509.22576), as the authors' code computes
them (github.com/WujiangXu/EPO, verl/workers/actor/dp_actor.py `generate_entropy_penalty` and
`_calculate_epoch_based_entropy_weight`; the paper's method section could not be read):

    p_t = 0        if  low H_bar < H_t < high H_bar   (strict on both sides)
          penalty  otherwise

H_t a token's entropy, H_bar the historical mean entropy. p_t is a constant per token: it carries no
gradient (the code builds it with `torch.where` on python scalars), so in the loss it shifts the
value, never the update. The phase weight w(e) of training epoch e out of E (the code's E = 150):

    e <= E // 2:  w = 1 - 0.2 (1 - exp(-2 e / (E // 2)))       1 -> ~0.827
    e >  E // 2:  w = 0.8 exp(-3 (e - E // 2) / (E - E // 2))  0.8 -> ~0.04

e clamped to [0, E]. No state, no config objects.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def epo_band_penalty(entropy: Tensor, history: float, *, low: float, high: float, penalty: float) -> Tensor:
    """[n, T] p_t: 0 where low * history < entropy < high * history, `penalty` elsewhere (detached,
    in entropy's dtype; padding is the caller's to mask)."""
    h = entropy.detach()
    inside = (h > low * history) & (h < high * history)
    return torch.where(inside, torch.zeros_like(h), torch.full_like(h, penalty))


def epo_phase_weight(epoch: int, total: int) -> float:
    """w(e) above for epoch `epoch` of `total` (>= 1)."""
    e = max(0, min(epoch, total))
    half = total // 2
    if e <= half:
        return 1.0 if half == 0 else 1.0 - 0.2 * (1.0 - math.exp(-2.0 * e / half))
    return 0.8 * math.exp(-3.0 * (e - half) / (total - half))
