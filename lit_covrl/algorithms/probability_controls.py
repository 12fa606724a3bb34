"""Controls by the probability of the sampled token under the rollout policy (Yang et al. 2025,
"Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs", arXiv 2505.12929): a token's
gradient norm grows with 1 - pi, so the low-probability tokens dominate an update.

- Advantage Reweighting: A'_t = (alpha pi_old(y_t) + 1 - alpha) A_t, as a weight on the token's
  objective (`probability_weights`).
- Lopti: the tokens with pi_old(y_t) < eta are trained in an update of their own, before (or after)
  the others (`low_probability_tokens` marks them); eta may be a quantile of the step's pi_old
  (`probability_quantile`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def probability_weights(old_logp: Tensor, mask: Tensor, *, alpha: float) -> Tensor:
    """Advantage Reweighting's weight [n, T], alpha exp(old_logp) + 1 - alpha, 0 outside `mask`
    (float64; alpha 0 gives 1 on every valid token)."""
    p = old_logp.detach().double().exp()
    return (alpha * p + (1.0 - alpha)) * mask.double()


def low_probability_tokens(old_logp: Tensor, mask: Tensor, *, eta: float) -> Tensor:
    """bool [n, T]: the valid tokens whose rollout probability exp(old_logp) is below `eta`."""
    return (old_logp.detach().double().exp() < eta) & mask.bool()


def probability_quantile(probs: Tensor, q: float) -> float | None:
    """The `q`-quantile (0 <= q <= 1) of the values of the 1-D `probs`, in float64, interpolated
    linearly between order statistics as torch.quantile and numpy do by default: with v sorted
    ascending and n values, position q (n - 1) between v[floor] and v[ceil]. None without values.
    A sort, not torch.quantile, so that there is no cap on the number of values."""
    n = probs.numel()
    if n == 0:
        return None
    v = torch.sort(probs.detach().double().reshape(-1)).values
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    below, above = float(v[lo]), float(v[hi])
    return below + (pos - lo) * (above - below)
