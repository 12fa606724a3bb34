"""Exact entropy dynamics of tabular softmax policies (claims 1 and 2 of the theory lab).

Policies are logits z [S, K] (S states, K actions), pi = softmax(z), all in float64.

- First-order entropy change (Cui et al. 2025, Lemma; docs/science.md section 1):
      H(z + dz) - H(z) = -Cov_{a~pi}(log pi(a), dz(a)) + O(|dz|^2)
  per state. Exact policy gradient of J(s) = pi . r:  dz = eta pi (r - J)  (PG);
  natural policy gradient:                              dz = eta (r - J)     (NPG).
  Since the error is O(eta^2) and the change itself O(eta), the *absolute* error falls 100x and
  the *relative* error 10x per decade of eta.
- Entropy bonus on a bandit: maximizing pi . r + alpha H(pi) has the unique stationary point
  softmax(r / alpha); its reward gap to the best arm, max r - softmax(r/alpha) . r, is at most
  alpha log K (because pi . r + alpha H(pi) >= max r for the optimum, and H <= log K).

Entropies use the project's ``lit_covrl.algorithms.token_entropy``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_covrl.algorithms import token_entropy

__all__ = [
    "policy_entropy",
    "first_order_entropy_change",
    "pg_direction",
    "npg_direction",
    "entropy_step_errors",
    "boltzmann",
    "bonus_reward_gap",
    "bonus_gradient",
    "train_entropy_bonus_exact",
    "log_slope",
]


def policy_entropy(z: Tensor) -> Tensor:
    """H(softmax(z)) per state: [S, K] -> [S]."""
    return token_entropy(z)


def first_order_entropy_change(z: Tensor, dz: Tensor) -> Tensor:
    """-Cov_{a~pi}(log pi(a), dz(a)) per state, pi = softmax(z): [S, K] x [S, K] -> [S]."""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    mean_lp = (p * logp).sum(-1, keepdim=True)
    mean_dz = (p * dz).sum(-1, keepdim=True)
    return -(p * (logp - mean_lp) * (dz - mean_dz)).sum(-1)


def _advantage(z: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    p = torch.softmax(z, dim=-1)
    return p, r - (p * r).sum(-1, keepdim=True)


def pg_direction(z: Tensor, r: Tensor) -> Tensor:
    """Exact policy gradient of pi . r w.r.t. the logits: pi (r - pi . r), [S, K]."""
    p, adv = _advantage(z, r)
    return p * adv


def npg_direction(z: Tensor, r: Tensor) -> Tensor:
    """Natural policy gradient direction for softmax logits: r - pi . r, [S, K]."""
    return _advantage(z, r)[1]


def entropy_step_errors(z: Tensor, r: Tensor, etas: list[float], kind: str) -> dict[str, list[float]]:
    """For each eta: exact dH of one step dz = eta * direction vs the first-order prediction.

    Returns lists over etas of: ``abs_err`` (sum over states |dH - pred|), ``rel_err``
    (sum |dH - pred| / sum |dH|, an aggregate relative error robust to states with dH ~ 0),
    ``median_rel_err`` (median over states of |dH - pred| / |dH|).
    """
    direction = {"pg": pg_direction, "npg": npg_direction}[kind](z, r)
    h0 = policy_entropy(z)
    out = {"eta": [], "abs_err": [], "rel_err": [], "median_rel_err": []}
    for eta in etas:
        dz = eta * direction
        exact = policy_entropy(z + dz) - h0
        err = (exact - first_order_entropy_change(z, dz)).abs()
        out["eta"].append(eta)
        out["abs_err"].append(float(err.sum()))
        out["rel_err"].append(float(err.sum() / exact.abs().sum()))
        out["median_rel_err"].append(float((err / exact.abs().clamp(min=1e-300)).median()))
    return out


def boltzmann(r: Tensor, alpha: float) -> Tensor:
    """softmax(r / alpha): the stationary policy of the entropy-regularized bandit."""
    return torch.softmax(r / alpha, dim=-1)


def bonus_reward_gap(r: Tensor, alpha: float) -> float:
    """Closed-form reward lost by the entropy bonus: max r - softmax(r / alpha) . r (1-D r)."""
    return float(r.max() - (boltzmann(r, alpha) * r).sum())


def bonus_gradient(z: Tensor, r: Tensor, alpha: Tensor | float) -> Tensor:
    """Exact gradient of J(z) = pi . r + alpha H(pi) w.r.t. the logits, pi = softmax(z):
    pi (q - pi . q) with q = r - alpha log pi. z [S, K], r [K] or [S, K], alpha scalar or [S, 1].
    (Checked against autograd through ``token_entropy`` in the tests.)"""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    q = r - alpha * logp
    return p * (q - (p * q).sum(-1, keepdim=True))


def train_entropy_bonus_exact(
    r: Tensor, alphas: list[float], *, steps: int, lr: float
) -> tuple[Tensor, Tensor]:
    """Exact-gradient ascent on pi . r + alpha H(pi) from uniform logits, one row per alpha
    (float64), step size min(lr, 2 / alpha) (the objective's curvature grows with alpha).
    r [K]. Returns the final policies [A, K] and the reward gaps [steps, A]."""
    r = r.double()
    a = torch.tensor(alphas, dtype=torch.float64)[:, None]
    lr = (2.0 / a).clamp(max=lr)
    z = torch.zeros(len(alphas), r.numel(), dtype=torch.float64)
    gaps = torch.empty(steps, len(alphas), dtype=torch.float64)
    for t in range(steps):
        gaps[t] = r.max() - (torch.softmax(z, dim=-1) * r).sum(-1)
        z += lr * bonus_gradient(z, r, a)
    return torch.softmax(z, dim=-1), gaps


def log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-300)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
