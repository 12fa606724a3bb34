"""Token-level entropy controls of the RLVR literature, as pure tensor functions.

Each returns a per-token selection, weight or advantage change; the callbacks in
`lit_covrl.regularizers` decide over which tokens (the whole optimizer mini-batch on all ranks)
and feed it to the learner. H_t is the entropy of the policy's distribution at token t,
logp_t the log-prob of the sampled token, A_t its advantage; N sequences, T response tokens.

- high_entropy_mask (Wang et al. 2025, "Beyond the 80/20 rule", arXiv 2506.01939):
  keep the policy gradient of the tokens with H_t >= tau, tau the (1 - top_frac) quantile of H
  over the valid tokens of the batch.
- adaptive_entropy_coef (Skywork-OR1, He et al. 2025, arXiv 2505.22312): the entropy-bonus
  coefficient moves by `delta` toward the target (up while the measured entropy is below it,
  down otherwise), clamped to [min_coef, max_coef]; the bonus is active only below the target.
- steer_metric / steer_weights (STEER, Hao et al. 2025, arXiv 2510.10150): the estimated
  one-step entropy change of a token, |Omega_t| = |A_t / pi_old(y_t) * pi(y_t) (1 - pi(y_t))
  (log pi(y_t) + H_t)|, mapped linearly (or exponentially) to a weight in [w_min, w_max], the
  largest change getting the smallest weight.
- entropy_advantage_shift (Cheng et al. 2025, arXiv 2506.14758): psi_t = min(alpha H_t,
  |A_t| / kappa) (H detached), added to A_t; with kappa > 1 it never flips the sign of A_t.
- entropy_ratio_keep (Entropy Ratio Clipping, Su et al. 2025, arXiv 2512.05591): keep the
  tokens whose entropy ratio H_t / H_old_t lies strictly inside (1 - low, 1 + high).
- sample_sign_weights (W-REINFORCE, Zhu et al. 2025, "The Surprising Effectiveness of Negative
  Reinforcement", arXiv 2506.01347): weight lambda on the tokens of responses with A > 0 (positive
  sample reinforcement, which sharpens the policy), 1 on those with A < 0 (negative sample
  reinforcement, which spreads the removed mass over the other tokens by the model's prior).
- archer_high_entropy (Archer, Wang et al. 2025, "Stabilizing Knowledge, Promoting Reasoning:
  Dual-Token Constraints for RLVR", arXiv 2507.15778; wizard-III/ArcherCodeR): a token is
  high-entropy when H_t exceeds the `quantile` quantile (0.8) of the entropies of its own
  response's valid tokens (strictly: a token equal to it is low-entropy). Archer gives those
  tokens a wide clip range (`clip_controls.archer_clip_bounds`); SimKO and SIREN select with it too.
- entropic_alpha / entropic_high_prob / entropic_weights / entropic_token_loss (EntroPIC, Yang
  et al. 2025, arXiv 2511.15248; github.com/yk7333/EntroPIC): a PI controller on the entropy
  error e = H - H_target sets alpha = clip(K_p e + K_i sum of the earlier e, -1, 1), and the loss
  gains alpha * agg_{p_t > 0.95}(-r_t |A_t|), aggregated like the objective but over the tokens
  whose probability exceeds the threshold only (r_t = pi / pi_old). On those tokens the policy
  gradient of a response with A > 0 weighs 1 + alpha x (the two denominators' ratio), that of a
  response with A < 0 weighs 1 - alpha x (the same): entropy below the target (alpha < 0) damps the
  sharpening of confident positive tokens and pushes harder on confident negative ones.
- lp_reg_lowest / lp_reg_kl (Lp-Reg, Huang et al. 2025, "Low-probability Tokens Sustain
  Exploration in RLVR", arXiv 2510.03222; github.com/CarlanLark/Lp-Reg-dev,
  compute_policy_loss_lp_reg): among the valid tokens of one advantage sign, the
  k = max(1, floor(n ratio)) with the lowest log-prob (none when k = 1, as the reference); those
  whose proxy log-prob exceeds their own (kept by the min-p filter, some mass filtered out) get
  beta * clamp(exp(q - l) - (q - l) - 1, -10, 10), l = log pi(y_t), q = log pi_proxy(y_t): the
  reference's low-variance KL estimate of the sampled token toward the proxy.
- siren_row_weights / siren_agg_factor / siren_token_penalty (SIREN, 2025,
  "Rethinking Entropy Regularization in Large Reasoning Models", arXiv 2509.25133; Linn3a/siren):
  the entropy of each token's top-p nucleus (`token_topp_entropy`), kept on the tokens strictly above
  their response's `quantile` quantile of it (the peak-entropy mask, `archer_high_entropy`),
  averaged per response over those tokens and over the responses (H_bar), is held near an anchor
  a by the loss coef * (H_bar - a)^2, written as a per-token penalty whose aggregate with the
  loss's own mode has that value and that gradient.
- aent_coef (AEnt, Shen 2025, "On Entropy Control in LLM-RL Algorithms", arXiv 2509.03493;
  antgroup/AEnt and the author's AReaL recipe/AEnt): the bonus coefficient on the clamped entropy
  (`entropy.token_clamped_entropy`) takes a projected step toward the band [low, high] of the
  measured clamped entropy, coef - lr (min(0, H - low) + max(0, H - high)), clamped to a box.

The clip-range controls (Archer's per-token range, BAPO's searched bounds) are in
`lit_covrl.algorithms.clip_controls`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_covrl.algorithms.advantages import per_token_advantages
from lit_covrl.algorithms.losses import AGG_MODES, _denominator_parts, row_denominators

__all__ = [
    "siren_agg_factor",
    "siren_row_weights",
    "siren_token_penalty",
    "adaptive_entropy_coef",
    "aent_coef",
    "archer_high_entropy",
    "entropic_alpha",
    "entropic_high_prob",
    "entropic_token_loss",
    "entropic_weights",
    "entropy_advantage_shift",
    "entropy_ratio_keep",
    "high_entropy_mask",
    "sample_sign_weights",
    "simko_logp_grad",
    "simko_tokens",
    "steer_metric",
    "steer_weights",
    "STEER_MAPPINGS",
]

STEER_MAPPINGS = ("linear", "exponential")
TIE_TOL = 1e-5  # relative: entropies this close to the 80/20 threshold count as tied with it (fp32 rounding)


@torch.no_grad()
def high_entropy_mask(entropy: Tensor, mask: Tensor, *, top_frac: float) -> Tensor:
    """BoolTensor [N, T]: valid tokens with H >= the (1 - top_frac) quantile of the valid H
    (linear interpolation between order statistics, as torch.quantile, which refuses inputs over
    2^24 elements; ties at the threshold are kept). Entropies within a relative `TIE_TOL` below the
    threshold count as ties: tokens with the same context (every row's first response token in a
    group, at least) have equal entropies in exact arithmetic but not when computed in forwards of
    different micro-batch shapes or padding, and which of them passed the threshold then depended
    on that rounding. top_frac = 1 keeps every valid token. No valid token -> all False."""
    m = mask.bool()
    valid = torch.sort(entropy.detach()[m].double()).values
    n = valid.numel()
    if n == 0:
        return torch.zeros_like(m)
    pos = (1.0 - top_frac) * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    tau = float(valid[lo] + (pos - lo) * (valid[hi] - valid[lo]))
    return m & (entropy.detach().double() >= tau - TIE_TOL * abs(tau))


def row_quantile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """[N] float64: the q quantile of each row's valid values, linear interpolation between order
    statistics (torch.nanquantile's default, without its 2^24-element limit); NaN for an empty row."""
    m = mask.bool()
    if values.shape[-1] == 0:
        return torch.full(values.shape[:-1], math.nan, dtype=torch.float64, device=values.device)
    v = torch.where(m, values.detach().double(), torch.full_like(values, math.inf, dtype=torch.float64))
    ordered = torch.sort(v, dim=-1).values
    k = m.sum(-1)
    pos = q * (k - 1).clamp(min=0).double()
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (k - 1).clamp(min=0))
    a = ordered.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    b = ordered.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    out = a + (pos - lo.double()) * (b - a)
    return torch.where(k > 0, out, torch.full_like(out, math.nan))


@torch.no_grad()
def archer_high_entropy(entropy: Tensor, mask: Tensor, *, quantile: float) -> Tensor:
    """BoolTensor [N, T]: valid tokens whose entropy exceeds the `quantile` quantile of their own
    response's valid entropies (`row_quantile`), strictly, as the reference (a token equal to the
    quantile is low-entropy). Entropies within a relative `TIE_TOL` above the quantile count as
    equal to it: the same token computed in forwards of different micro-batch shapes differs in
    its last bits. quantile 1 selects no token; an empty row none."""
    tau = row_quantile(entropy, mask, quantile).unsqueeze(-1)
    return mask.bool() & (entropy.detach().double() > tau + TIE_TOL * tau.abs())


def adaptive_entropy_coef(
    coef: float, entropy: float, *, target: float, delta: float, min_coef: float, max_coef: float
) -> tuple[float, bool]:
    """(next coefficient, bonus active): coef + delta if entropy < target else coef - delta,
    clamped to [min_coef, max_coef]; active = entropy < target."""
    below = entropy < target
    nxt = coef + delta if below else coef - delta
    return float(min(max(nxt, min_coef), max_coef)), bool(below)


def aent_coef(coef: float, entropy: float, *, low: float, high: float, lr: float, min_coef: float,
              max_coef: float) -> float:
    """AEnt's next coefficient (Shen 2025; the author's verl recipe antgroup/AEnt,
    recipe/aent/ray_aent_trainer.py, without its optional L2 term entropy_coeff_reg, 0 in its runs;
    the AReaL port's recipe/AEnt/actor.py takes the same step): a projected step on the clamped
    entropy's distance to the band [low, high],
        coef - lr * (min(0, entropy - low) + max(0, entropy - high)),
    clamped to [min_coef, max_coef]: up by lr (low - entropy) below the band, down by
    lr (entropy - high) above it, unchanged (but clamped) inside it."""
    step = min(0.0, entropy - low) + max(0.0, entropy - high)
    return float(min(max(coef - lr * step, min_coef), max_coef))


@torch.no_grad()
def steer_metric(advantages: Tensor, entropy: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """|Omega_t| [N, T] (0 outside mask): |A_t / pi_old(y_t) * p (1 - p) (log p + H_t)| with
    p = pi(y_t); probabilities clamped to [1e-8, 1 - 1e-8] (p) and [1e-8, 1] (pi_old), as in
    the reference code; non-finite values count as 0."""
    dtype = torch.promote_types(logp.dtype, torch.float32)
    p = logp.detach().to(dtype).exp().clamp(1e-8, 1.0 - 1e-8)
    old_p = old_logp.detach().to(dtype).exp().clamp(1e-8, 1.0)
    adv = per_token_advantages(advantages, p)
    omega = (adv / old_p * p * (1.0 - p) * (p.log() + entropy.detach().to(dtype))).abs()
    omega = torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega))
    return torch.where(mask.bool(), omega, torch.zeros_like(omega))


@torch.no_grad()
def steer_weights(
    metric: Tensor,
    mask: Tensor,
    *,
    w_min: float,
    w_max: float,
    mapping: str = "linear",
    bounds: tuple[float, float] | None = None,
) -> Tensor:
    """Weights [N, T] in [w_min, w_max] from |Omega| (0 outside mask).

    linear:      w = w_max - (m - lo) (w_max - w_min) / (hi - lo)   ((w_min + w_max) / 2 if hi == lo)
    exponential: w = clamp(exp(-k m), w_min, 1),  k = -ln(w_min) / max(hi, 0.02)
    lo, hi: min and max of the metric over the valid tokens, or `bounds` (e.g. over all ranks).
    """
    if mapping not in STEER_MAPPINGS:
        raise ValueError(f"unknown STEER mapping {mapping!r}; valid: {list(STEER_MAPPINGS)}")
    m = mask.bool()
    if bounds is None:
        valid = metric[m]
        if valid.numel() == 0:
            return torch.zeros_like(metric)
        bounds = (float(valid.min()), float(valid.max()))
    lo, hi = bounds
    if mapping == "linear":
        if hi > lo:
            w = w_max - (metric - lo) * ((w_max - w_min) / (hi - lo))
        else:
            w = torch.full_like(metric, (w_min + w_max) / 2)
        w = w.clamp(w_min, w_max)
    else:
        k = -math.log(w_min) / max(hi, 0.02)
        w = torch.exp(-k * metric).clamp(w_min, 1.0)
    return torch.where(m, w, torch.zeros_like(w))


@torch.no_grad()
def entropy_advantage_shift(advantages: Tensor, entropy: Tensor, *, alpha: float, kappa: float) -> Tensor:
    """psi [N, T] = min(alpha * H, |A| / kappa), detached (>= 0 since H >= 0). A + psi keeps the
    sign of A for kappa > 1: for A < 0, A + psi <= A (1 - 1/kappa) < 0; psi = 0 where A = 0."""
    adv = per_token_advantages(advantages, entropy)
    return torch.minimum(alpha * entropy.detach().clamp(min=0.0), adv.abs() / kappa)


@torch.no_grad()
def entropy_ratio_keep(entropy: Tensor, old_entropy: Tensor, mask: Tensor, *, low: float, high: float) -> Tensor:
    """BoolTensor [N, T]: valid tokens with 1 - low < (H + 1e-8) / (H_old + 1e-8) < 1 + high
    (strict, the 1e-8 as in the reference code). No tie tolerance: nothing ties at a fixed edge
    (a tolerance would only move it), so a ratio within float rounding of an edge can be decided
    either way by forwards of different micro-batch shapes."""
    ratio = (entropy.detach().double() + 1e-8) / (old_entropy.detach().double() + 1e-8)
    return mask.bool() & (ratio > 1.0 - low) & (ratio < 1.0 + high)


@torch.no_grad()
def sample_sign_weights(advantages: Tensor, mask: Tensor, *, positive: float, negative: float) -> Tensor:
    """Weight [N, T]: `positive` on valid tokens with A > 0, `negative` where A < 0, 1 where A = 0
    (no gradient to weigh), 0 on padding."""
    adv = per_token_advantages(advantages, mask)
    w = torch.where(adv > 0, positive, torch.where(adv < 0, negative, 1.0)).to(mask.dtype)
    return w * mask


ENTROPIC_ALPHA_LIMIT = 1.0  # |alpha| <= 1: the reference code's np.clip(control_alpha, -1.0, 1.0)
ENTROPIC_LOGRATIO_CLAMP = 20.0  # the reference clamps log(pi / pi_old) to [-20, 20] before exp


def entropic_alpha(error: float, integral: float, *, kp: float, ki: float) -> float:
    """EntroPIC's control: clip(kp * error + ki * integral, -1, 1), where error = measured entropy
    - target and integral = the sum of the errors measured before this one (the reference adds
    the current error to its accumulator after computing alpha; the accumulator itself is not
    clamped)."""
    alpha = kp * error + ki * integral
    return float(min(max(alpha, -ENTROPIC_ALPHA_LIMIT), ENTROPIC_ALPHA_LIMIT))


@torch.no_grad()
def entropic_high_prob(logp: Tensor, mask: Tensor, *, threshold: float) -> Tensor:
    """BoolTensor [N, T]: valid tokens with log pi > log(threshold) (strict, as the reference; no
    tie tolerance, as `entropy_ratio_keep`)."""
    return mask.bool() & (logp.detach().double() > math.log(threshold))


@torch.no_grad()
def entropic_weights(
    high: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | Tensor,
    num_seqs: float | Tensor,
    num_high: float | Tensor,
    num_high_seqs: float | Tensor,
) -> Tensor:
    """Weights c [N, T] (float64, 0 off `high`) such that aggregate(c * x, mask, mode, num_tokens,
    num_seqs) equals x aggregated over the `high` tokens alone with the same mode, as the reference
    code's agg_loss(x, loss_mask=prob_mask) does: it divides by the high tokens' own counts.

    token-mean:              c = num_tokens / num_high
    seq-mean-token-sum:      c = num_seqs / num_high_seqs    (rows with >= 1 high token)
    seq-mean-token-mean:     c = (len_n / high_n) * num_seqs / num_high_seqs
    seq-mean-token-sum-norm: c = 1                           (the same fixed denominator)

    That is c = d_n / d_high_n: the loss's `row_denominators` over those of the high tokens with
    their own counts (in seq-mean-token-sum-norm the same d_n). num_*: the counts of the whole
    mini-batch on all ranks (the loss's denominators); len_n, high_n: row n's valid and high
    tokens. No high token -> all 0."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid: {list(AGG_MODES)}")
    h = (high.bool() & mask.bool()).double()
    if float(num_high) <= 0:
        return torch.zeros_like(h)
    if mode == "seq-mean-token-sum-norm":
        return h
    row, shared = _denominator_parts(mask, mode, num_tokens, num_seqs, None, h)
    row_high, shared_high = _denominator_parts(h, mode, num_high, num_high_seqs, None, h)
    c = h if row is None else h * (row / row_high)
    return c * (shared / shared_high)


def entropic_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, *, alpha: float) -> Tensor:
    """EntroPIC's added token loss [N, T]: -alpha * c_t * r_t * |A_t|, r_t = exp(clamp(logp - old,
    -20, 20)) with the gradient of logp, c_t = `weights` (`entropic_weights`). Unclipped, as the
    reference's term; its gradient on a token is -alpha c_t sign(A_t) times the policy gradient
    r_t A_t grad log pi."""
    adv = per_token_advantages(advantages, logp)
    ratio = torch.exp((logp - old_logp.detach().to(logp.dtype)).clamp(-ENTROPIC_LOGRATIO_CLAMP, ENTROPIC_LOGRATIO_CLAMP))
    return -alpha * weights.detach().to(logp.dtype) * ratio * adv.abs()


def simko_tokens(entropy: Tensor, mask: Tensor, advantages: Tensor, top1: Tensor, *,
                 tau: float) -> tuple[Tensor, Tensor]:
    """SimKO's two token sets (Peng et al. 2025; CLR-Lab/SimKO, compute_policy_loss_simko), among
    each response's high-entropy tokens (entropy strictly above the `tau` quantile of its own
    response's valid entropies, `archer_high_entropy`): (top-K mixed: A > 0, the verified-correct
    responses; top-1 penalized: A < 0 and the sampled token is the current policy's most probable).
    Both BoolTensor [n, T]."""
    high = archer_high_entropy(entropy, mask, quantile=tau)
    return high & (advantages > 0), high & (advantages < 0) & top1.bool()


def simko_logp_grad(logp: Tensor, topk_logp: Tensor, mixed: Tensor, *, coef: float) -> Tensor:
    """[n, T], value 0: coef * (mean_k(topk - sg(topk)) - (logp - sg(logp))) on the `mixed` tokens.
    Added to the log-probs the objective reads, it turns each mixed token's gradient c grad(logp)
    into c ((1 - coef) grad(logp) + coef / K sum_k grad(topk_k)), SimKO's mixed ratio
    (1 - coef) r + coef / K sum_k r_k with r_k's value r (its reference divides by
    exp(topk - old_topk) + 1e-8; we leave the 1e-8 out, and with it the old top-K log-probs)."""
    moved = (topk_logp - topk_logp.detach()).mean(-1) - (logp - logp.detach())
    return torch.where(mixed, coef * moved, torch.zeros_like(moved))


def lp_reg_lowest(logp: Tensor, advantages: Tensor, mask: Tensor, *, ratio: float, sign: int) -> Tensor:
    """bool [n, T]: among the valid tokens with sign(A) == `sign` (+1 or -1; A = 0 is neither),
    the k = max(1, int(count * ratio)) with the lowest `logp`, or none when k == 1 (the reference
    selects only for k > 1). Ties are broken by position (row-major), lowest first."""
    cand = (mask > 0) & ((advantages > 0) if sign > 0 else (advantages < 0))
    out, count = torch.zeros_like(cand), int(cand.sum())
    k = max(1, int(count * ratio))
    if k <= 1:
        return out
    picked = torch.zeros(count, dtype=torch.bool, device=cand.device)
    picked[torch.sort(logp[cand], stable=True).indices[:k]] = True
    out[cand] = picked
    return out


def lp_reg_kl(logp: Tensor, proxy_logp: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """(k3 [n, T], regularized [n, T] bool): on the selected tokens whose proxy log-prob is above
    their current one (the token survives the filter and the proxy raised it), the low-variance KL
    estimate k3 = exp(q - l) - (q - l) - 1 of l = log pi(y) (with grad) toward q = log pi_proxy(y)
    (detached), clamped to [-10, 10] as the reference's kl_penalty; 0 elsewhere. Its gradient,
    (1 - pi_proxy / pi) d log pi, raises the token's probability toward the proxy's."""
    regularized = selected & (logp.detach() < proxy_logp)
    q = torch.where(regularized, proxy_logp, logp.detach())  # finite everywhere: no inf / NaN in backward
    d = q - logp
    k3 = (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
    return torch.where(regularized, k3, torch.zeros_like(k3)), regularized
def siren_row_weights(selected: Tensor, mask: Tensor) -> Tensor:
    """[N, T] float64: 1 / c_n on row n's selected valid tokens (c_n of them), 0 elsewhere, so that
    sum_t w_t H_t / num_seqs is SIREN's H_bar: the mean over responses of each response's mean over
    its selected tokens (the reference's entropy aggregation, seq-mean-token-mean; a response with
    no selected token adds 0 and still counts in num_seqs, as its agg_loss)."""
    sel = (selected.bool() & mask.bool()).double()
    return sel / sel.sum(-1, keepdim=True).clamp(min=1.0)


def siren_agg_factor(mask: Tensor, mode: str, *, num_tokens: float | Tensor, num_seqs: float | Tensor,
                     norm_length: float) -> Tensor:
    """[N, 1] float64 f_n such that aggregate(f * x, mask, mode, num_tokens, num_seqs, norm_length)
    = sum_t x_t / num_seqs (x zero off the mask): the row's `row_denominators` over num_seqs, i.e.
    token-mean num_tokens / num_seqs, seq-mean-token-sum 1, seq-mean-token-mean the row's valid
    length, seq-mean-token-sum-norm norm_length (each denominator clamped to >= 1, as `aggregate`)."""
    d = row_denominators(mask, mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    return d / max(float(num_seqs), 1.0)


def siren_token_penalty(entropy: Tensor, weights: Tensor, *, deviation: float, covered: float) -> Tensor:
    """[n, T]: weights * (2 d (H - sg(H)) + d^2 / covered), d = `deviation` = H_bar - anchor (a
    number, measured over the whole mini-batch), `weights` = coef * f * w (`siren_agg_factor`,
    `siren_row_weights`), `covered` = sum_t w_t / num_seqs (the share of responses with a
    selected token). Aggregated with the loss's mode over the mini-batch its value is
    coef * d^2 and its gradient coef * 2 d grad(H_bar): that of coef * (H_bar - anchor)^2 with H_bar
    of the current policy. No selected token (covered 0): zero."""
    if covered <= 0:
        return torch.zeros_like(entropy)
    w = weights.to(entropy.dtype)
    return w * (2.0 * deviation * (entropy - entropy.detach()) + deviation * deviation / covered)
