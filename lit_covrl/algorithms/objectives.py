"""Sequence-level and IS-weight policy objectives (the alternatives to PPO's clipped surrogate
in `losses.py`), per token, so that the learner aggregates them like PPO's.

GSPO (Zheng et al. 2025, arXiv 2507.18071), in its token form (GSPO-token with the sequence
advantage broadcast, which has the same value and gradient as GSPO):

    s_i = exp( mean_{t in y_i} (logp_t - old_logp_t) )             sequence importance ratio
    s_it = sg(s_i) * exp(logp_t - sg(logp_t))                       value s_i, d s_it / d logp_t = s_i
    loss_t = max(-A_t s_it, -A_t clamp(s_it, 1 - eps_low, 1 + eps_high))

so a sequence is clipped as a whole; aggregated with seq-mean-token-mean this is the paper's
objective (its default clip range eps_low = 3e-4, eps_high = 4e-4).

CISPO (MiniMax-M1, arXiv 2506.13585): every token keeps a gradient, weighted by the clipped,
detached importance ratio w_t = clamp(r_t, 1 - eps_low, 1 + eps_high):

    grad loss_t = -w_t A_t grad logp_t

The paper writes it as -sg(w_t) A_t logp_t; we write loss_t = -sg(w_t) A_t exp(logp_t - sg(logp_t))
(same gradient, and a value -w_t A_t comparable with PPO's surrogate -r_t A_t).

CE-GPPO (Su et al. 2025, arXiv 2509.20712; GPPO of Klear-Reasoner, arXiv 2508.07629, is
beta1 = beta2 = 1): PPO's clipped surrogate, but the tokens PPO clips keep a bounded gradient.
With r_t the ratio and sg the stop-gradient, per token

    A < 0 and r < 1 - eps_low:   grad loss_t = -beta1 (1 - eps_low)  A_t grad logp_t
    A > 0 and r > 1 + eps_high:  grad loss_t = -beta2 (1 + eps_high) A_t grad logp_t
    otherwise:                   PPO's (-A_t r_t, its gradient -A_t r_t grad logp_t)

(the authors' code, Kwai-Klear/CE-GPPO, writes the loss -beta (1 -+ eps) r / sg(r) A on those
tokens, whose gradient that is). We write loss_t = PPO's loss_t - A_t k_t (exp(logp_t - sg(logp_t)) - 1),
k_t = beta1 (1 - eps_low) or beta2 (1 + eps_high) on those tokens, else 0: the value is PPO's
clipped value (the reference's differs from it by a constant without gradient), so
beta1 = beta2 = 0 is PPO. Dual-clip caps A < 0 tokens with r > c_dual as PPO does; the reference
code caps its scaled value too, which zeroes the kept gradient when beta1 (1 - eps_low) >= c_dual,
a combination `lit_covrl.objectives.CEGPPO` refuses (below it both agree).

ASPO (Wang et al. 2025, arXiv 2510.06062; the rule of its reference code, wizard-III/Archer2.0
`compute_policy_loss_archer`): a token of negative advantage keeps PPO's IS weight r, one of
positive advantage takes the flipped weight 1 / r, and a weight beyond the dual-clip constant c
is capped at c with its gradient kept (soft dual-clip). Per token, gradient -A_t w_t grad logp_t:

    A < 0:  r < 1 - eps_low: w = 0 (PPO's clip)   1 - eps_low <= r <= c: w = r   r > c: w = c
    A > 0:  r > 1 + eps_high: w = 0 (PPO's clip)  1 / c <= r <= 1 + eps_high: w = 1 / r
            r < 1 / c: w = c

We write loss_t = -A_t v_t exp(logp_t - sg(logp_t)) (the exp only where w_t > 0), v_t the weight
clamped into [1 - eps_low, c] (A < 0) or [1 / (1 + eps_high), c] (A > 0): the value -A v is the
reference's (-A r, -A / r and their clipped values) except where the weight is capped, where the
reference's -c A logp_t has the same gradient and ours is -c A, continuous in r.

All clamp the log-ratio before exp (`logratio_clamp`, as `ppo_token_loss` does); the preserved
gradient of CE-GPPO goes through logp itself and its tokens are told by the unclamped ratio, so a
clipped token beyond the clamp keeps it, whatever the clamp (one inside the clip range, which
gives PPOClip's tokens beyond it no gradient, leaves CE-GPPO's kept gradient as it is).
Shapes: N sequences, T response tokens; advantages [N] or [N, T]; 0 outside ``mask``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl.algorithms.advantages import per_token_advantages
from lit_covrl.algorithms.losses import _clip_stats, _denominator, _ratio, _surrogates, _token_logratio, ppo_clipped_tokens, ppo_token_loss

__all__ = [
    "aspo_clipped_tokens",
    "aspo_stats",
    "aspo_token_loss",
    "ce_gppo_clipped_tokens",
    "ce_gppo_token_loss",
    "cispo_stats",
    "cispo_token_loss",
    "gspo_clipped_tokens",
    "gspo_stats",
    "gspo_token_loss",
    "sequence_logratio",
]


def sequence_logratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """[N]: mean over the valid tokens of each sequence of logp - old_logp (0 for an empty row)."""
    m = mask.bool()
    diff = torch.where(m, logp - old_logp.detach(), torch.zeros_like(logp))
    return diff.sum(-1) / m.sum(-1).clamp(min=1).to(logp.dtype)


def _gspo_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, logratio_clamp: float | None) -> Tensor:
    """log s_it [N, T]: value log s_i on every token, gradient 1 w.r.t. its own logp_t."""
    seq = sequence_logratio(logp.detach(), old_logp, mask)
    log_s = logp - logp.detach() + seq.unsqueeze(-1)
    if logratio_clamp is not None:
        log_s = log_s.clamp(-logratio_clamp, logratio_clamp)  # a clamped sequence gets no gradient
    return log_s


def gspo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | None,
    clip_high: float | None,
    logratio_clamp: float | None = 20.0,
) -> Tensor:
    """Per-token GSPO loss [N, T] (0 outside mask); gradient through logp only."""
    adv = per_token_advantages(advantages, logp)
    l1, l2 = _surrogates(torch.exp(_gspo_log_ratio(logp, old_logp, mask, logratio_clamp)), adv, clip_low, clip_high)
    loss = torch.maximum(l1, l2)
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))


@torch.no_grad()
def gspo_clipped_tokens(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | None,
    clip_high: float | None,
    logratio_clamp: float | None = 20.0,
) -> Tensor:
    """BoolTensor [N, T]: valid tokens GSPO gives zero gradient: the clipped term is active for
    the sequence ratio (L2 > L1), or the sequence log-ratio lies outside the clamp."""
    adv = per_token_advantages(advantages, logp)
    seq = sequence_logratio(logp, old_logp, mask).unsqueeze(-1).expand_as(logp)
    s = torch.exp(seq if logratio_clamp is None else seq.clamp(-logratio_clamp, logratio_clamp))
    l1, l2 = _surrogates(s, adv, clip_low, clip_high)
    inert = l2 > l1
    if logratio_clamp is not None:
        inert = inert | (seq.abs() > logratio_clamp)
    return inert & mask.bool()


@torch.no_grad()
def gspo_stats(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | None,
    clip_high: float | None,
    logratio_clamp: float | None = 20.0,
    num_tokens: float | None = None,
) -> dict[str, Tensor]:
    """Token means over mask (denominator `num_tokens`, default mask.sum()): approx_kl (k3 of the
    token ratios, as in `ppo_stats`), clip_frac (tokens of sequences whose clipped term is
    active), clip_frac_low (s_i < 1 - eps_low, A < 0), clip_frac_high (s_i > 1 + eps_high, A > 0)."""
    adv = per_token_advantages(advantages, logp)
    seq = sequence_logratio(logp, old_logp, mask).unsqueeze(-1).expand_as(logp)
    s = torch.exp(seq if logratio_clamp is None else seq.clamp(-logratio_clamp, logratio_clamp))
    l1, l2 = _surrogates(s, adv, clip_low, clip_high)
    zero = torch.zeros_like(mask.bool())
    low = zero if clip_low is None else (s < 1.0 - clip_low) & (adv < 0)
    high = zero if clip_high is None else (s > 1.0 + clip_high) & (adv > 0)
    return _clip_stats(_token_logratio(logp, old_logp, logratio_clamp), low, high, l2 > l1, mask, num_tokens, logp)


def _cispo_weight(logp: Tensor, old_logp: Tensor, clip_low: float | Tensor | None, clip_high: float | Tensor | None,
                  logratio_clamp: float | None) -> Tensor:
    lo = None if clip_low is None else 1.0 - clip_low
    hi = None if clip_high is None else 1.0 + clip_high
    r = _ratio(logp.detach(), old_logp, logratio_clamp)
    return r if lo is None and hi is None else r.clamp(min=lo, max=hi)


def cispo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | Tensor | None,
    clip_high: float | Tensor | None,
    logratio_clamp: float | None = 20.0,
) -> Tensor:
    """Per-token CISPO loss [N, T] = -sg(w) A exp(logp - sg(logp)) (0 outside mask): value -w A,
    gradient -w A d logp. No token ever has zero gradient (except where A = 0)."""
    adv = per_token_advantages(advantages, logp)
    w = _cispo_weight(logp, old_logp, clip_low, clip_high, logratio_clamp)
    loss = -w * adv * torch.exp(logp - logp.detach())
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))


@torch.no_grad()
def cispo_stats(
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
    """Token means over mask: approx_kl (as `ppo_stats`), clip_frac (tokens whose IS weight is
    capped), clip_frac_low (r < 1 - eps_low), clip_frac_high (r > 1 + eps_high), whatever the
    advantage's sign (CISPO caps the weight, not the objective)."""
    lr = _token_logratio(logp, old_logp, logratio_clamp)
    r = torch.exp(lr)
    zero = torch.zeros_like(mask.bool())
    low = zero if clip_low is None else r < 1.0 - clip_low
    high = zero if clip_high is None else r > 1.0 + clip_high
    return _clip_stats(lr, low, high, low | high, mask, num_tokens, logp)


def _ce_gppo_scale(ratio: Tensor, adv: Tensor, clip_low: float | Tensor | None, clip_high: float | Tensor | None,
                   beta1: float, beta2: float) -> Tensor:
    """k_t [N, T]: beta1 (1 - eps_low) where A < 0 and r < 1 - eps_low, beta2 (1 + eps_high) where
    A > 0 and r > 1 + eps_high (the tokens PPO clips), 0 elsewhere; r unclamped (`_clipped_scale`)."""
    k = torch.zeros_like(ratio)
    if clip_low is not None:
        k = torch.where((ratio < 1.0 - clip_low) & (adv < 0), beta1 * (1.0 - clip_low), k)
    if clip_high is not None:
        k = torch.where((ratio > 1.0 + clip_high) & (adv > 0), beta2 * (1.0 + clip_high), k)
    return k


def _clipped_scale(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_low: float | Tensor | None, clip_high: float | Tensor | None,
                   beta1: float, beta2: float) -> Tensor:
    """`_ce_gppo_scale` of the unclamped ratio: a clamp inside the clip range would keep every
    clamped ratio inside it and drop the kept gradient (clamp 0.1: r in [0.905, 1.105])."""
    return _ce_gppo_scale(_ratio(logp.detach(), old_logp, None), adv, clip_low, clip_high, beta1, beta2)


def ce_gppo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | Tensor | None,
    clip_high: float | Tensor | None,
    beta1: float,
    beta2: float,
    dual_clip: float | None = None,
    logratio_clamp: float | None = 20.0,
) -> Tensor:
    """Per-token CE-GPPO loss [N, T] (0 outside mask): PPO's value; on the tokens PPO clips the
    gradient -beta (1 -+ eps) A d logp instead of 0 (see the module docstring)."""
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, logratio_clamp=logratio_clamp)
    loss = ppo_token_loss(logp, old_logp, advantages, mask, **kw)  # dual-clip caps no k > 0 token while beta1 (1 - eps_low) < c
    adv = per_token_advantages(advantages, logp)
    k = _clipped_scale(logp, old_logp, adv, clip_low, clip_high, beta1, beta2)
    loss = loss - adv * k * (torch.exp(logp - logp.detach()) - 1.0)  # value + 0, gradient -k A
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))


@torch.no_grad()
def ce_gppo_clipped_tokens(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | Tensor | None,
    clip_high: float | Tensor | None,
    beta1: float,
    beta2: float,
    dual_clip: float | None = None,
    logratio_clamp: float | None = 20.0,
) -> Tensor:
    """BoolTensor [N, T]: valid tokens `ce_gppo_token_loss` gives zero gradient: PPO's (clipped
    term active, dual-clip cap, log-ratio outside the clamp) less those whose gradient it
    preserves (k_t > 0). With beta1, beta2 > 0 only dual-capped tokens and unclipped tokens
    beyond the clamp remain."""
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, logratio_clamp=logratio_clamp)
    inert = ppo_clipped_tokens(logp, old_logp, advantages, mask, **kw)
    adv = per_token_advantages(advantages, logp)
    k = _clipped_scale(logp, old_logp, adv, clip_low, clip_high, beta1, beta2)
    return inert & ~(k > 0)


def _aspo_weights(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_low: float | Tensor | None,
                  clip_high: float | Tensor | None, dual_clip: float, logratio_clamp: float | None):
    """(v, low, high, capped) [N, T], detached: ASPO's clamped weight v (the value's), the tokens
    it clips below (A < 0) and above (A > 0), where w = 0, and those whose weight is capped at c
    (soft dual-clip)."""
    lr = _token_logratio(logp, old_logp, logratio_clamp)
    r, inv = torch.exp(lr), torch.exp(-lr)  # inf beyond float range: clamped to c below
    neg, pos = adv < 0, adv > 0
    v_neg = r if clip_low is None else r.clamp(min=1.0 - clip_low)
    v_pos = inv if clip_high is None else inv.clamp(min=1.0 / (1.0 + clip_high))
    v = torch.where(neg, v_neg, v_pos).clamp(max=dual_clip)
    zero = torch.zeros_like(neg)
    low = zero if clip_low is None else neg & (r < 1.0 - clip_low)
    high = zero if clip_high is None else pos & (r > 1.0 + clip_high)
    capped = (neg & (r > dual_clip)) | (pos & (inv > dual_clip))
    return v, low, high, capped


def aspo_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                    clip_low: float | Tensor | None, clip_high: float | Tensor | None, dual_clip: float,
                    logratio_clamp: float | None = 20.0) -> Tensor:
    """Per-token ASPO loss [N, T] (0 outside mask): value -A v, gradient -A v d logp on the tokens
    it does not clip, 0 on those it clips (see the module docstring)."""
    adv = per_token_advantages(advantages, logp)
    v, low, high, _ = _aspo_weights(logp, old_logp, adv, clip_low, clip_high, dual_clip, logratio_clamp)
    grad = torch.exp(torch.where(low | high, torch.zeros_like(logp), logp - logp.detach()))
    loss = -adv * v * grad
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))


@torch.no_grad()
def aspo_clipped_tokens(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                        clip_low: float | Tensor | None, clip_high: float | Tensor | None, dual_clip: float,
                        logratio_clamp: float | None = 20.0) -> Tensor:
    """BoolTensor [N, T]: valid tokens ASPO gives zero gradient: A < 0 with r < 1 - eps_low, A > 0
    with r > 1 + eps_high (the soft dual-clip keeps its tokens' gradient)."""
    adv = per_token_advantages(advantages, logp)
    _, low, high, _ = _aspo_weights(logp, old_logp, adv, clip_low, clip_high, dual_clip, logratio_clamp)
    return (low | high) & mask.bool()


@torch.no_grad()
def aspo_stats(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
               clip_low: float | Tensor | None, clip_high: float | Tensor | None, dual_clip: float,
               logratio_clamp: float | None = 20.0, num_tokens: float | Tensor | None = None) -> dict[str, Tensor]:
    """Token means over mask: approx_kl (as `ppo_stats`), clip_frac (the tokens ASPO clips),
    clip_frac_low (A < 0, r < 1 - eps_low), clip_frac_high (A > 0, r > 1 + eps_high) and
    soft_clip_frac (the tokens whose weight the soft dual-clip caps at c: A < 0 with r > c, A > 0
    with r < 1 / c)."""
    adv = per_token_advantages(advantages, logp)
    _, low, high, capped = _aspo_weights(logp, old_logp, adv, clip_low, clip_high, dual_clip, logratio_clamp)
    lr = _token_logratio(logp, old_logp, logratio_clamp)
    stats = _clip_stats(lr, low, high, low | high, mask, num_tokens, logp)
    denom = _denominator(num_tokens, mask.bool().sum(), logp)
    stats["soft_clip_frac"] = (capped & mask.bool()).sum().to(logp.dtype) / denom
    return stats
