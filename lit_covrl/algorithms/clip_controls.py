"""Clip-range controls of the RLVR literature, as pure tensor functions: the PPO clip range set
per token (Archer, DCPO) or searched per optimizer mini-batch (BAPO). The callbacks in
`lit_covrl.regularizers` decide over which tokens (the whole optimizer mini-batch on all ranks)
and hand the range to the objective as a per-token clip range. r = pi / pi_old, A the advantage.

- archer_clip_bounds (Archer, Wang et al. 2025, "Stabilizing Knowledge, Promoting Reasoning:
  Dual-Token Constraints for RLVR", arXiv 2507.15778; wizard-III/ArcherCodeR): the high-entropy
  tokens (`entropy_controls.archer_high_entropy`: H_t above the `quantile` quantile of its own
  response's valid entropies) get a wide clip range, the others a narrow one (per-token
  eps_low / eps_high).
- bapo_grid / bapo_contribution_sums / bapo_search (BAPO, Xi et al. 2025, "Balanced Policy
  Optimization with Adaptive Clipping", arXiv 2510.18927; WooooDyy/BAPO, recipe/bapo/policy_loss.py):
  the ratio bounds c_low / c_high (explicit bounds on r, not 1 -/+ eps) are raised step by step,
  c_low over its range first, then c_high, until the positive tokens' value of the clipped
  objective, P = sum_{A>0} min(r, c_high) A, reaches `target` times the negative tokens',
  N = sum_{A<0} max(r, c_low) |A|: P / (N + eps) >= target (inf when N = 0).
- dcpo_clip_bounds (DCPO, Yang et al. 2025, "DCPO: Dynamic Clipping Policy Optimization", arXiv
  2509.02333; lime-RL/DCPO, verl/trainer/ppo/core_algos.py, get_clip_low_high): each token's ratio
  bounds follow from its old probability q = exp(old_logp) under |(r - 1) r q| <= eps, i.e.
  0.5 + 0.5 sqrt(max(1 - 4 eps_low / q, 0)) <= r <= min(0.5 + 0.5 sqrt(1 + 4 eps_high / q), max_ratio):
  the lower the token's probability, the wider its range (a q -> 0 token: [0.5, max_ratio]).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["archer_clip_bounds", "bapo_contribution_sums", "bapo_grid", "bapo_search", "dcpo_clip_bounds"]


def archer_clip_bounds(high: Tensor, *, low_entropy: tuple[float, float], high_entropy: tuple[float, float],
                       dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(eps_low [N, T], eps_high [N, T]): `high_entropy` = (eps_low, eps_high) where `high`, else
    `low_entropy`."""
    lo = torch.where(high, high_entropy[0], low_entropy[0]).to(dtype)
    hi = torch.where(high, high_entropy[1], low_entropy[1]).to(dtype)
    return lo, hi


def bapo_grid(start: float, stop: float, step: float) -> list[float]:
    """The bounds the reference's search visits, in order: `start`, then min(previous + step, stop)
    while the previous one is below `stop` (just `start` when step <= 0 or start >= stop). Python
    floats added as the reference adds them (0.8 + 0.05 is 0.8500000000000001)."""
    out, cur = [float(start)], float(start)
    while step > 0 and cur < stop:
        cur = min(cur + step, float(stop))
        out.append(cur)
    return out


@torch.no_grad()
def bapo_contribution_sums(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                           lows: list[float], highs: list[float], logratio_clamp: float | None = 20.0) -> Tensor:
    """float64 [len(lows) + len(highs)]: the negative tokens' contribution N(c) = sum over valid
    A < 0 tokens of max(r, c) |A| at each c in `lows`, then the positive tokens' P(c) = sum over
    valid A > 0 tokens of min(r, c) A at each c in `highs` (r = exp(clamp(logp - old_logp,
    +-logratio_clamp)), the objective's ratio; None: no clamp), the two signs of the PPO-clipped
    objective's value. Sums: add them over micro-batches or ranks before `bapo_search`."""
    logratio = logp.detach().double() - old_logp.detach().double()
    if logratio_clamp is not None:
        logratio = logratio.clamp(-logratio_clamp, logratio_clamp)
    r = torch.exp(logratio)
    a = advantages.detach().double() * mask.detach().double()
    pos, neg = a.clamp(min=0), (-a).clamp(min=0)
    n = [(torch.clamp(r, min=c) * neg).sum() for c in lows]
    p = [(torch.clamp(r, max=c) * pos).sum() for c in highs]
    return torch.stack(n + p)


def bapo_search(sums: Tensor | list[float], lows: list[float], highs: list[float], *, target: float,
                eps: float = 1e-8) -> tuple[int, int, float]:
    """(index into `lows`, index into `highs`, achieved P / (N + eps)) of the reference's search over
    the summed `bapo_contribution_sums`: start at (lows[0], highs[0]); while the ratio is below
    `target`, step c_low up its grid, then, if still below, c_high up its grid; stop as soon as it
    is met or both grids are spent. N <= 0 gives an infinite ratio (met by any target)."""
    vals = [float(v) for v in sums]
    neg, pos = vals[: len(lows)], vals[len(lows):]

    def ratio(i: int, j: int) -> float:
        return math.inf if neg[i] <= 0 else pos[j] / (neg[i] + eps)

    i = j = 0
    rho = ratio(i, j)
    while rho < target and i < len(lows) - 1:
        i += 1
        rho = ratio(i, j)
    while rho < target and j < len(highs) - 1:
        j += 1
        rho = ratio(i, j)
    return i, j, rho


@torch.no_grad()
def dcpo_clip_bounds(old_logp: Tensor, *, eps_low: float, eps_high: float, max_ratio: float,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(eps_low [N, T], eps_high [N, T]), the objective's per-token clip range (the ratio clipped to
    [1 - eps_low, 1 + eps_high]) of DCPO's dynamic-adaptive bounds at q = exp(old_logp), computed
    in float64: eps_low = 0.5 - 0.5 sqrt(max(1 - 4 eps_low / q, 0)) in [0, 0.5], eps_high =
    min(0.5 sqrt(1 + 4 eps_high / q) - 0.5, max_ratio - 1). A token of q = 0 gets the reference's
    0 and max_ratio - 1 (its 4 eps / q read as 0 below and inf above)."""
    q = old_logp.detach().double().exp()
    seen = q > 0
    low = torch.where(seen, 1 - 4 * eps_low / q, 1.0).clamp(min=0).sqrt()
    high = torch.where(seen, (1 + 4 * eps_high / q).sqrt(), math.inf)
    return (0.5 - 0.5 * low).to(dtype), (0.5 * high - 0.5).clamp(max=max_ratio - 1).to(dtype)
