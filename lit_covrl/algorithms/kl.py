"""Per-token estimators of KL(pi || pi_ref) from tokens sampled by pi (Schulman 2020,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html).

With d = logp - ref_logp for the sampled token:

    k1 = d                          (unbiased, high variance, can be negative)
    k2 = 0.5 d^2                    (biased, low variance, >= 0)
    k3 = exp(-d) - (-d) - 1         (unbiased, low variance, >= 0; GRPO's reference-KL term)

How we differ from reference code: the log-ratio is clamped to [-20, 20] before exp in k3 (and in
its linear term, which keeps k3 >= 0), and ``ref_logp`` is detached (gradient through ``logp``
only). One lookup tuple; an unknown name raises a ValueError listing the valid ones.
Shapes: any, usually [N, T]; the caller masks and aggregates.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "kl_penalty"]

KL_ESTIMATORS = ("k1", "k2", "k3")
_LOGRATIO_CLAMP = 20.0


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate, same shape as ``logp``; estimator in KL_ESTIMATORS."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {list(KL_ESTIMATORS)}")
    d = logp - ref_logp.detach()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    neg = (-d).clamp(-_LOGRATIO_CLAMP, _LOGRATIO_CLAMP)  # log(pi_ref / pi)
    return torch.exp(neg) - neg - 1.0
