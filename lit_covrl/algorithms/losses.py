"""PPO clipped surrogate per token, its diagnostics, and loss aggregation.

Per valid token, with r = exp(clamp(logp - old_logp, -c, c)) and advantage A:

    L1 = -A r,   L2 = -A clamp(r, 1 - eps_low, 1 + eps_high),   loss = max(L1, L2)

(Schulman et al. 2017, PPO; decoupled eps_low/eps_high is DAPO's "clip-higher", Yu et al. 2025).
Dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games"): for A < 0 the loss is
additionally capped, loss = min(loss, -A c_dual) with c_dual > 1, so a huge ratio on a negative
token cannot blow up the update.

Aggregation turns the [N, T] token losses into the scalar that is differentiated:
token-mean (DAPO / Clip-Cov recipes), seq-mean-token-sum, seq-mean-token-mean (original GRPO)
and seq-mean-token-sum-norm (Dr.GRPO, Liu et al. 2025: divide by a constant length).

``aggregate`` takes optional global denominators (tokens / sequences of the whole optimizer
mini-batch) so that the sum of micro-batch aggregates equals the mini-batch aggregate exactly,
independent of micro-batch size and world size. Departures from verl's ``core_algos`` (the
log-ratio clamp, seq-mean-token-sum-norm's denominator) are in the README's table "Where we
differ from the reference code".
Shapes: N sequences, T response tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl.algorithms.advantages import per_token_advantages

__all__ = ["ppo_token_loss", "ppo_clipped_tokens", "ppo_stats", "AGG_MODES", "aggregate", "row_denominators"]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")




def _ratio(logp: Tensor, old_logp: Tensor, logratio_clamp: float | None) -> Tensor:
    logratio = logp - old_logp.detach()
    if logratio_clamp is not None:
        logratio = logratio.clamp(-logratio_clamp, logratio_clamp)
    return torch.exp(logratio)


def _surrogates(ratio: Tensor, adv: Tensor, clip_low: float | Tensor | None, clip_high: float | Tensor | None):
    """(L1, L2): unclipped and clipped PPO terms; L2 is L1 when both bounds are None."""
    l1 = -adv * ratio
    if clip_low is None and clip_high is None:
        return l1, l1
    lo = None if clip_low is None else 1.0 - clip_low
    hi = None if clip_high is None else 1.0 + clip_high
    return l1, -adv * ratio.clamp(min=lo, max=hi)


def ppo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | Tensor | None,
    clip_high: float | Tensor | None,
    dual_clip: float | None = None,
    logratio_clamp: float | None = 20.0,
) -> Tensor:
    """Per-token PPO loss [N, T] (0 outside ``mask``); gradient flows through ``logp`` only.

    logp, old_logp [N, T]; advantages [N] (broadcast over tokens) or [N, T]; mask [N, T] bool/float.
    clip_low / clip_high: eps of the clip range; None = no clipping on that side; a [N, T] tensor
    gives each token its own (a per-token clip range, Archer's; the clipped_tokens and stats take
    the same).
    dual_clip: c > 1; for A < 0 the loss is capped at -A c. logratio_clamp: None disables it.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    adv = per_token_advantages(advantages, logp)
    ratio = _ratio(logp, old_logp, logratio_clamp)
    l1, l2 = _surrogates(ratio, adv, clip_low, clip_high)
    loss = torch.maximum(l1, l2)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))


@torch.no_grad()
def ppo_clipped_tokens(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | Tensor | None,
    clip_high: float | Tensor | None,
    dual_clip: float | None = None,
    logratio_clamp: float | None = 20.0,
) -> Tensor:
    """BoolTensor [N, T]: valid tokens to which ``ppo_token_loss`` (same settings) gives zero
    gradient: the clipped term is active (L2 > L1), dual-clip caps the loss (A < 0 and
    -A c_dual < max(L1, L2)), or the log-ratio lies outside the clamp.

    Clip-Cov excludes these tokens from its candidates (detaching them would change nothing).
    """
    adv = per_token_advantages(advantages, logp)
    logratio = (logp - old_logp).detach()
    l1, l2 = _surrogates(_ratio(logp.detach(), old_logp, logratio_clamp), adv, clip_low, clip_high)
    inert = l2 > l1
    if dual_clip is not None:
        inert = inert | ((adv < 0) & (-adv * dual_clip < torch.maximum(l1, l2)))
    if logratio_clamp is not None:
        inert = inert | (logratio.abs() > logratio_clamp)
    return inert & mask.bool()


@torch.no_grad()
def ppo_stats(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | Tensor | None,
    clip_high: float | Tensor | None,
    logratio_clamp: float | None = 20.0,
    num_tokens: float | Tensor | None = None,
) -> dict[str, Tensor]:
    """Detached scalar diagnostics of the PPO update, token-mean over ``mask``.

    approx_kl: k3 estimate of KL(pi_old || pi) from tokens sampled by pi_old,
        mean of (r - 1) - log r, r = pi / pi_old (>= 0 per token, unbiased; Schulman 2020).
    clip_frac: fraction of valid tokens whose clipped term is active (L2 > L1);
    clip_frac_low: r < 1 - eps_low with A < 0;  clip_frac_high: r > 1 + eps_high with A > 0.
    num_tokens: optional global denominator (e.g. tokens of the whole mini-batch), so that
        micro-batch stats sum to the mini-batch stat; default mask.sum(). Clamped to >= 1.
    """
    m = mask.bool()
    adv = per_token_advantages(advantages, logp)
    logratio = _token_logratio(logp, old_logp, logratio_clamp)
    ratio = torch.exp(logratio)
    l1, l2 = _surrogates(ratio, adv, clip_low, clip_high)
    low = torch.zeros_like(m) if clip_low is None else (ratio < 1.0 - clip_low) & (adv < 0)
    high = torch.zeros_like(m) if clip_high is None else (ratio > 1.0 + clip_high) & (adv > 0)
    return _clip_stats(logratio, low, high, l2 > l1, mask, num_tokens, logp)


def _token_logratio(logp: Tensor, old_logp: Tensor, logratio_clamp: float | None) -> Tensor:
    """Detached log pi / pi_old per token, clamped to +-logratio_clamp (None: unclamped)."""
    lr = (logp - old_logp).detach()
    return lr if logratio_clamp is None else lr.clamp(-logratio_clamp, logratio_clamp)


def _clip_stats(token_logratio, low, high, clipped, mask, num_tokens, like) -> dict[str, Tensor]:
    """approx_kl (k3) and the clip fractions, token means over ``mask`` with the denominator
    ``num_tokens`` (default mask.sum()), in ``like``'s dtype: every objective's diagnostics."""
    m = mask.bool()
    denom = _denominator(num_tokens, m.sum(), like)

    def mean(x: Tensor) -> Tensor:
        return torch.where(m, x.to(like.dtype), torch.zeros_like(like)).sum() / denom

    return {
        "approx_kl": mean(torch.exp(token_logratio) - 1.0 - token_logratio),
        "clip_frac": mean(clipped),
        "clip_frac_low": mean(low),
        "clip_frac_high": mean(high),
    }


def _denominator(given: float | Tensor | None, default: Tensor | float, like: Tensor) -> Tensor:
    """A denominator as a tensor of ``like``'s dtype/device, clamped to >= 1 (counts)."""
    d = default if given is None else given
    return torch.as_tensor(d, dtype=like.dtype, device=like.device).clamp(min=1.0)


def _denominator_parts(mask: Tensor, mode: str, num_tokens, num_seqs, norm_length, like: Tensor
                       ) -> tuple[Tensor | None, Tensor]:
    """(row [N, 1] or None, shared []): `aggregate`'s denominators, in ``like``'s dtype/device, as
    d_n = row_n * shared (row None: 1): aggregate = sum_n (sum_t loss_nt / row_n) / shared.

    token-mean:              row 1,                shared num_tokens (default mask.sum())
    seq-mean-token-sum:      row 1,                shared num_seqs (default N)
    seq-mean-token-mean:     row len_n (valid),    shared num_seqs
    seq-mean-token-sum-norm: row 1,                shared num_seqs * norm_length (default T)

    Each count clamped to >= 1. Kept in two parts so that the callers' arithmetic (aggregate's,
    and `entropic_weights`' ratios of two sets of denominators) rounds as it always has."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid: {list(AGG_MODES)}")
    m = mask.bool()
    if mode == "token-mean":
        return None, _denominator(num_tokens, m.sum(), like)
    seqs = _denominator(num_seqs, mask.shape[0], like)
    if mode == "seq-mean-token-sum":
        return None, seqs
    if mode == "seq-mean-token-mean":
        return m.sum(dim=-1, keepdim=True).to(like.dtype).clamp(min=1.0), seqs
    length = float(mask.shape[-1] if norm_length is None else norm_length)
    return None, seqs * max(length, 1.0)


def row_denominators(
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    norm_length: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """[N, 1] d_n such that aggregate(x, mask, mode, num_tokens, num_seqs, norm_length) equals
    sum_n sum_t x_nt mask_nt / d_n: num_tokens (token-mean), num_seqs (seq-mean-token-sum),
    len_n * num_seqs (seq-mean-token-mean, len_n the row's valid tokens), num_seqs * norm_length
    (seq-mean-token-sum-norm); same defaults and clamping as `aggregate`. The one place the modes'
    denominators are written: SIREN's and EntroPIC's per-token weights are built on it."""
    row, shared = _denominator_parts(mask, mode, num_tokens, num_seqs, norm_length,
                                     torch.empty((), dtype=dtype, device=mask.device))
    return (torch.ones(mask.shape[0], 1, dtype=dtype, device=mask.device) if row is None else row) * shared


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """Reduce token losses [N, T] to a scalar.

    token-mean:              sum(loss*mask) / num_tokens            (default num_tokens = mask.sum())
    seq-mean-token-sum:      sum_n sum_t loss*mask / num_seqs        (default num_seqs = N)
    seq-mean-token-mean:     sum_n [sum_t loss*mask / max(len_n, 1)] / num_seqs
    seq-mean-token-sum-norm: sum(loss*mask) / (num_seqs * norm_length) (default norm_length = T)

    Pass the optimizer mini-batch totals as num_tokens / num_seqs (and a fixed norm_length) when
    calling on micro-batches: the micro-batch aggregates then sum exactly to the mini-batch one.
    Denominators are counts and are clamped to >= 1 (per row: `row_denominators`).
    """
    row, shared = _denominator_parts(mask, mode, num_tokens, num_seqs, norm_length, loss)
    masked = torch.where(mask.bool(), loss, torch.zeros_like(loss))
    if row is None:
        return masked.sum() / shared
    return (masked.sum(dim=-1) / row.squeeze(-1)).sum() / shared
