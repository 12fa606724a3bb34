"""Per-token estimators of KL(pi || pi_ref) from tokens sampled by pi (Schulman 2020,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html).

With d = logp - ref_logp for the sampled token:

    k1 = d                          (unbiased, high variance, can be negative)
    k2 = 0.5 d^2                    (biased, low variance, >= 0)
    k3 = exp(-d) - (-d) - 1         (unbiased, low variance, >= 0; GRPO's reference-KL term)

"Unbiased" is about the value. Differentiated as a loss on tokens sampled from pi, their expected
gradients differ from what the values estimate: k2's is the gradient of KL(pi || pi_ref); k3's is
the gradient of the reverse KL(pi_ref || pi) (it still pulls pi toward pi_ref, and is what GRPO
trains with); k1's is 0 (E_pi[grad log pi] = 0), so it is no penalty at all and ReferenceKL refuses
it (it stays here for measuring).

As in the reference code (verl's ``kl_penalty``): in k3 the log-ratio is clamped to [-20, 20]
before exp (and in its linear term, which keeps k3 >= 0), and k3 itself is bounded to
[-10, 10] (so to [0, 10]): without the bound one token at log-ratio -15 costs 3.3e6 with a
gradient of -3.3e6; past the bound the token's gradient is 0. ``ref_logp`` is detached (gradient
through ``logp`` only). One lookup tuple; an unknown name raises a ValueError listing the valid ones.
Shapes: any, usually [N, T]; the caller masks and aggregates.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "kl_penalty"]

KL_ESTIMATORS = ("k1", "k2", "k3")
_LOGRATIO_CLAMP = 20.0
K3_BOUND = 10.0


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
    return (torch.exp(neg) - neg - 1.0).clamp(-K3_BOUND, K3_BOUND)
