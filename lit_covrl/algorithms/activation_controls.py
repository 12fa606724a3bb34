"""ERA, an entropy control by an output activation (Kang, Liao, Xu, Xu 2025, "Entropy Regularizing
Activation", arXiv 2510.08549; nothingbutbut/era, ERA-LLM: the `era` loss mode of
verl/workers/actor/dp_actor.py), as pure tensor functions. The callback
(`lit_covrl.regularizers.ERA`) decides per optimizer mini-batch; these functions take its tensors.

For LLMs the activation acts on the logits z of the responses with a positive advantage, by the
response's entropy H_resp (the mean of its top `top_frac` token entropies):

    z' = k z    where H_resp < low  and A_t > 0   (sharpened: the trained policy is more peaked
                                                   than the sampling one, so the sampling one's
                                                   entropy stays above the trained one's)
    z' = z / k  where H_resp > high and A_t > 0   (flattened)
    z' = z      otherwise

The loss reads log softmax(z')(y) in place of log pi(y), and the advantage of a modified token is
scaled inversely (A / k where sharpened, k A where flattened) so that the gradient keeps its size
(d log softmax(k z)[y] / dz = k (e_y - softmax(k z))). Tokens are sampled from the raw policy.
"A_t > 0" is the float advantage of each token, the paper's objective: the reference code's
activation reads the advantage after an int64 buffer has truncated it toward 0, so it activates
only A_t >= 1 (and still scales every A > 0 response's advantage), a flaw not repeated here.
Shapes: [n, T] tokens of n responses, `mask` the valid ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["era_advantage_weight", "era_logp", "era_logp_grad", "era_modes", "era_response_entropy"]


def era_response_entropy(entropy: Tensor, mask: Tensor, *, top_frac: float = 0.2) -> Tensor:
    """H_resp [n] (float64): the mean of each response's max(1, floor(top_frac L)) largest token
    entropies among its L valid tokens (the reference's `0.2 * length` truncated, at least 1);
    0 for a response with no valid token."""
    m = mask > 0
    h = entropy.detach().double().masked_fill(~m, float("-inf"))
    ranked = torch.sort(h, dim=-1, descending=True).values
    length = m.sum(-1)
    k = torch.floor(top_frac * length.double()).long().clamp(min=1)
    top = torch.arange(h.shape[-1], device=h.device) < k[:, None]
    top = top & (length > 0)[:, None]
    return torch.where(top, ranked, torch.zeros_like(ranked)).sum(-1) / k


def era_modes(h_resp: Tensor, advantages: Tensor, mask: Tensor, *, low: float, high: float) -> tuple[Tensor, Tensor]:
    """(sharpened [n, T], flattened [n, T]) bool: the valid A_t > 0 tokens of the responses whose
    H_resp is below `low`, resp. above `high` (strictly, as the reference; no tie tolerance, as
    `entropy_ratio_keep`); A_t > 0 in float (the reference's activation: its advantage truncated
    to an integer, >= 1)."""
    positive = (advantages > 0) & (mask > 0)
    return positive & (h_resp < low)[:, None], positive & (h_resp > high)[:, None]


def era_logp(logp: Tensor, scaled_logp: Tensor, sharpened: Tensor, flattened: Tensor) -> Tensor:
    """log pi'(y) [n, T]: the log-prob under the activated logits, `scaled_logp[..., 0]` (scale k)
    where sharpened, `scaled_logp[..., 1]` (scale 1 / k) where flattened, `logp` elsewhere."""
    return torch.where(sharpened, scaled_logp[..., 0], torch.where(flattened, scaled_logp[..., 1], logp))


def era_logp_grad(logp: Tensor, scaled_logp: Tensor, sharpened: Tensor, flattened: Tensor) -> Tensor:
    """A term of value 0 [n, T] which, added to the log-probs the objective reads, makes the
    gradient of each modified token that of log pi'(y) instead of log pi(y) (the value, and so the
    ratio and its clipping, stay the raw policy's); 0 with no gradient on the other tokens."""
    d = era_logp(logp, scaled_logp, sharpened, flattened) - logp
    return torch.where(sharpened | flattened, d - d.detach(), torch.zeros_like(d))


def era_advantage_weight(sharpened: Tensor, flattened: Tensor, *, k: float, dtype: torch.dtype) -> Tensor:
    """The inverse scale of the advantage [n, T]: 1 / k where sharpened, k where flattened, 1
    elsewhere (a positive factor on A is one on the token loss of an objective linear in A)."""
    w = torch.ones(sharpened.shape, dtype=dtype, device=sharpened.device)
    return w.masked_fill(sharpened, 1.0 / k).masked_fill(flattened, k)
