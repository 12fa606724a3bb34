"""Token covariance and the token selections of Clip-Cov and KL-Cov.

Cui et al. 2025 ("The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617), Eq. 10:
for the valid tokens i of a batch, with the current log-prob logp_i of the sampled token and its
advantage A_i,

    Cov_i = (logp_i - mean_j logp_j) * (A_i - mean_j A_j)        (token-weighted means)

Under natural policy gradient the entropy change is ~ -eta Cov(log pi, A), so tokens with large
positive Cov drive the entropy collapse. Clip-Cov detaches a random few tokens with
lb < Cov < ub; KL-Cov penalizes the top-k tokens by Cov. Cov only *selects*: it is computed on
detached inputs.

How we differ from the reference code (verl ``compute_policy_loss_clip_cov/_kl_cov``):
- selection is meant to run once over the whole optimizer mini-batch (optionally across ranks:
  pass global ``means`` / ``num_tokens``), not per micro-batch, so it does not depend on the
  micro-batch size or world size;
- Clip-Cov's random choice takes an explicit ``torch.Generator`` (reproducible runs);
- KL-Cov's top-k stays on the device (no ``.cpu()`` of tensors) and breaks ties by position;
- k = floor(ratio * n) is computed with a 1e-9 slack so that e.g. 0.29 * 100 gives 29, not 28.
Shapes: N sequences, T response tokens.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_covrl.algorithms.advantages import per_token_advantages

__all__ = [
    "covariance_sums",
    "token_covariance",
    "clip_cov_select",
    "kl_cov_select",
    "covariance_group_means",
]


def _num_selected(ratio: float, n_valid: float) -> int:
    """max(floor(ratio * n_valid), 1), robust to float rounding just below an integer."""
    return max(math.floor(ratio * float(n_valid) + 1e-9), 1)


@torch.no_grad()
def covariance_sums(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Tensor [3] = (sum logp, sum A, count) over valid tokens (float64).

    All-reduce (sum) it across ranks, then ``means = (s[0] / s[2], s[1] / s[2])`` are the global
    token means to pass to ``token_covariance``.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=logp.device)
    lp = torch.where(m, logp.detach().double(), zero)
    a = torch.where(m, per_token_advantages(advantages, logp, torch.float64), zero)
    return torch.stack([lp.sum(), a.sum(), m.sum().double()])


@torch.no_grad()
def token_covariance(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    means: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Cov_i [N, T] = (logp_i - mean logp) (A_i - mean A); exactly 0 outside ``mask``.

    logp [N, T]; advantages [N] (broadcast) or [N, T]; mask [N, T]. ``means`` = (mean logp,
    mean A) over the valid tokens of a larger set (e.g. all ranks, see ``covariance_sums``);
    default: token means over this batch's valid tokens. Computed in at least float32.
    """
    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.bool()
    lp = logp.detach().to(dtype)
    adv = per_token_advantages(advantages, lp)
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    lp = torch.where(m, lp, zero)
    adv = torch.where(m, adv, zero)
    if means is None:
        n = m.sum().to(dtype).clamp(min=1.0)
        mean_lp, mean_adv = lp.sum() / n, adv.sum() / n
    else:
        mean_lp, mean_adv = (torch.as_tensor(x, dtype=dtype, device=lp.device) for x in means)
    return torch.where(m, (lp - mean_lp) * (adv - mean_adv), zero)


@torch.no_grad()
def clip_cov_select(
    cov: Tensor,
    mask: Tensor,
    eligible: Tensor,
    *,
    ratio: float,
    lb: float,
    ub: float,
    generator: torch.Generator | None = None,
    num_tokens: float | Tensor | None = None,
) -> Tensor:
    """Clip-Cov selection: BoolTensor [N, T] of tokens whose gradient is to be detached.

    candidates = mask & eligible & (lb < cov < ub)  (strict; ``eligible`` excludes PPO-clipped
    tokens); k = min(max(floor(ratio * n_valid), 1), n_candidates) with n_valid = mask.sum() or
    ``num_tokens`` (global count); k candidates drawn uniformly without replacement with
    ``torch.randperm(n_candidates, generator=generator)``: same generator state, same selection.
    """
    cand = (mask.bool() & eligible.bool() & (cov > lb) & (cov < ub)).reshape(-1)
    n_valid = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens)
    n_cand, n_valid = torch.stack([cand.sum().double(), n_valid.double().to(cand.device)]).tolist()
    n_cand = int(n_cand)
    selected = torch.zeros_like(cand)
    if n_cand == 0:
        return selected.view_as(cov)
    k = min(_num_selected(ratio, n_valid), n_cand)
    # candidate positions in increasing order, without a nonzero() sync: stable sort puts the
    # True entries first, in their original order
    cand_idx = torch.argsort(cand.to(torch.int8), descending=True, stable=True)[:n_cand]
    gen_device = generator.device if generator is not None else cand.device
    perm = torch.randperm(n_cand, generator=generator, device=gen_device)[:k].to(cand.device)
    selected[cand_idx[perm]] = True
    return selected.view_as(cov)


@torch.no_grad()
def kl_cov_select(
    cov: Tensor, mask: Tensor, *, ratio: float, num_tokens: float | Tensor | None = None
) -> Tensor:
    """KL-Cov selection: BoolTensor [N, T] of the top max(1, floor(ratio * n_valid)) valid tokens
    by covariance (never more than the valid tokens present). Deterministic: ties are broken by
    position (stable sort). n_valid = mask.sum() or ``num_tokens`` (global count).
    """
    m = mask.bool().reshape(-1)
    n_global = m.sum() if num_tokens is None else torch.as_tensor(num_tokens)
    n_local, n_global = torch.stack([m.sum().double(), n_global.double().to(m.device)]).tolist()
    selected = torch.zeros_like(m)
    if n_local == 0:
        return selected.view_as(cov)
    k = min(_num_selected(ratio, n_global), int(n_local))
    scores = torch.where(m, cov.reshape(-1), float("-inf"))
    top = torch.sort(scores, descending=True, stable=True).indices[:k]
    selected[top] = True
    return selected.view_as(cov)


@torch.no_grad()
def covariance_group_means(
    cov: Tensor, mask: Tensor, fractions: tuple[float, ...] = (0.0002, 0.002, 0.02, 0.2)
) -> dict[float, Tensor]:
    """{fraction: mean Cov of the top ``fraction`` of valid tokens (>= 1 token)}: Table 1 of [C]
    (top 0.02% / 0.2% / 2% / 20%). Values are 0 when there is no valid token.
    """
    vals = cov.detach()[mask.bool()].double()
    n = vals.numel()
    if n == 0:
        zero = torch.zeros((), dtype=cov.dtype, device=cov.device)
        return {f: zero.clone() for f in fractions}
    csum = torch.sort(vals, descending=True).values.cumsum(0)
    out = {}
    for f in fractions:
        k = min(_num_selected(f, n), n)
        out[f] = (csum[k - 1] / k).to(cov.dtype)
    return out
