"""Group-relative advantage estimators (outcome rewards, one scalar per sequence).

A batch holds B prompts with G sampled responses each, laid out prompt-major: sequence n belongs
to prompt n // G, so ``rewards`` is a flat ``[B*G]`` tensor viewed as ``[B, G]``.

- GRPO (Shao et al. 2024, DeepSeekMath):  A_i = (r_i - mean_g r) / (std_g r + eps),
  std with Bessel's correction (divide by G-1), as in the public GRPO implementations.
- Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"):  A_i = r_i - mean_g r
  (no std division, which up-weights low-variance groups).
- RLOO (Ahmadian et al. 2024; Kool et al. 2019):  A_i = r_i - mean_{j != i} r_j
  = G/(G-1) * (r_i - mean_g r).
- Quantile baseline (QAE, Wu et al. 2025, "Quantile Advantage Estimation", arXiv 2509.22611):
  GRPO or Dr.GRPO with the group's K-quantile (linear interpolation, as ``torch.quantile``)
  in place of the mean. With 0/1 rewards and success rate p it is a two-regime gate: on hard
  prompts (p <= 1 - K) the baseline is 0 and only successes get an advantage, on easy ones it is
  1 and only failures do, which bounds the entropy change of a step from both sides; except for
  the one success count whose interpolation position (G - 1) K lies between the last failure and
  the first success: G = 8, K = 0.4 (position 2.8) gives 5 successes the baseline 0.8, not 1.
- Pass@k (Chen et al. 2025, "Pass@k Training", arXiv 2508.10751, analytical derivation): 0/1
  rewards, a group of N with N_neg failures; a k-subset drawn without replacement scores its best
  reward. Its expected score and the Bernoulli std of that score are
      rho = 1 - C(N_neg, k) / C(N, k),     sigma = sqrt(rho (1 - rho)),
  and each response gets the mean normalised score of the k-subsets holding it:
      A_pos = (1 - rho) / (sigma + eps),
      A_neg = (1 - rho - C(N_neg - 1, k - 1) / C(N - 1, k - 1)) / (sigma + eps)
  (C(N_neg - 1, k - 1) / C(N - 1, k - 1): the share of a failure's k-subsets with no success).
  k = 1 is GRPO with the population std (divide by N); a group with fewer than k failures (every
  k-subset passes) gets advantage 0, so does k = N for every group.
- Unlikeliness reward (He, Fried, Welleck 2025, "Rewarding the Unlikely", arXiv 2506.02355; the
  reference code's ``_compute_advantages`` in AndreHe02/rewarding-unlikely-release): before the
  baseline, each reward is scaled by 1 - beta * rank_i / G, where rank_i in {0, ..., G-1} is the
  position of response i among its group's G responses sorted by ascending mean token log-prob
  under the rollout policy (0 = the least likely). With 0/1 rewards only correct responses change:
  the likeliest keeps the least, so the estimator credits rare correct answers more. A group whose
  rewards are all equal keeps advantage 0 (the reference recipe drops such groups before this).
- Smooth advantage standardization (DCPO, Yang et al. 2025, arXiv 2509.02333): each prompt's
  rewards standardised both by its group and by its statistics over every step it was trained on,
  mixed by the step count (`smooth_advantages`; the per-prompt state is the callback's,
  `lit_covrl.regularizers.DCPOAdvantage`), so a group of equal rewards keeps a gradient once its
  prompt has had unequal ones.

Difference from reference code: estimators are plain functions looked up in one dict whose error
lists the valid names; group size 1 is rejected instead of silently producing 0 or NaN advantages.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "group_advantages",
    "rloo_advantages",
    "ADVANTAGE_ESTIMATORS",
    "QUANTILE_ESTIMATORS",
    "passk_advantages",
    "check_pass_k",
    "first_non_binary",
    "sequence_logprob_means",
    "likelihood_ranks",
    "unlikeliness_rewards",
    "check_unlikeliness",
    "compute_advantages",
    "min_group_size",
    "zero_variance_groups",
    "per_token_advantages",
    "pooled_reward_stats",
    "smooth_advantages",
]


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """View flat rewards [B*G] as [B, G] in float64, checking the layout."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be a flat [B*G] tensor with B*G divisible by group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards.double().view(-1, group_size)


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def _zero_equal_groups(centered: Tensor, r: Tensor) -> Tensor:
    """Exactly 0 for a group whose rewards are all equal: a mean rounded by one ulp, divided by a
    std of rounding noise (+ eps), is otherwise a same-signed advantage for the whole group (8
    rewards of 0.1 in float32 gave -0.0074 each, 8 of 1.2 gave +0.106), which trains the model on a
    constant reward."""
    return centered.masked_fill((r == r[:, :1]).all(dim=1, keepdim=True), 0.0)


def group_advantages(
    rewards: Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6,
    baseline_quantile: float | None = None,
) -> Tensor:
    """GRPO (``normalize_std=True``) or Dr.GRPO (``False``) advantages.

    rewards [B*G] -> advantages [B*G] (rewards' float dtype; float32 for integer rewards):
    (r - group mean) / (group std (Bessel) + eps), or r - group mean without the std; computed
    in float64, and exactly 0 for a group of equal rewards. The std needs G >= 2 (ValueError otherwise).
    ``baseline_quantile`` K in (0, 1): the group's K-quantile replaces the mean (QAE).
    """
    if normalize_std and group_size < 2:
        raise ValueError(f"group std needs group_size >= 2, got {group_size}")
    check_baseline_quantile(baseline_quantile)
    r = _groups(rewards, group_size)  # [B, G]
    if baseline_quantile is None:
        baseline = r.mean(dim=1, keepdim=True)
    else:
        baseline = torch.quantile(r, baseline_quantile, dim=1, keepdim=True)
    centered = r - baseline
    if normalize_std:
        centered = centered / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
    return _zero_equal_groups(centered, r).reshape(-1).to(_out_dtype(rewards))


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline: A_i = r_i - mean of the other G-1 rewards of its group (G >= 2);
    computed in float64, exactly 0 for a group of equal rewards."""
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    r = _groups(rewards, group_size)  # [B, G]
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return _zero_equal_groups(r - others, r).reshape(-1).to(_out_dtype(rewards))


def check_baseline_quantile(k: float | None) -> None:
    if k is not None and not 0 < k < 1:
        raise ValueError(f"baseline_quantile must be in (0, 1) or None (the mean), got {k}")


def check_pass_k(k, group_size: int) -> None:
    """ValueError unless k is an integer in [1, group_size - 1]: k = group_size makes every
    k-subset the whole group, so every advantage is 0 (nothing is trained)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"pass_k must be an integer, got {k!r}")
    if not 1 <= k < group_size:
        raise ValueError(f"pass_k must be in [1, group_size - 1] = [1, {group_size - 1}] (k = group_size "
                         f"gives every advantage 0), got {k}")


def first_non_binary(rewards: Tensor) -> float | None:
    """The first reward that is neither 0 nor 1, or None when all are."""
    bad = (rewards != 0) & (rewards != 1)
    return float(rewards[bad][0]) if bool(bad.any()) else None


def check_unlikeliness(beta) -> None:
    """ValueError unless beta is None (off) or a number in (0, 1]: up to 1 a correct response's
    scaled reward, >= 1 - beta (G - 1) / G, stays above an incorrect one's 0."""
    if beta is None:
        return
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise ValueError(f"unlikeliness must be in (0, 1] or None (off), got {beta!r}")


def sequence_logprob_means(logp: Tensor, mask: Tensor) -> Tensor:
    """Mean log-prob of each response over its valid tokens: logp [N, T], mask [N, T] -> [N]
    float64 (0 for a response with no valid token)."""
    m = mask.double()
    return (logp.double() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def likelihood_ranks(seq_logp: Tensor, group_size: int) -> Tensor:
    """Each response's rank in its group by ascending `seq_logp` [B*G] -> [B*G] float64 in
    {0, ..., G-1}: 0 for the least likely, G-1 for the likeliest; ties go by position in the group
    (the earlier response ranks lower), a stable sort."""
    s = _groups(seq_logp, group_size)  # [B, G]
    order = torch.sort(s, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(group_size, device=s.device).expand_as(order))
    return ranks.reshape(-1).double()


def unlikeliness_rewards(rewards: Tensor, seq_logp: Tensor, group_size: int, beta: float,
                         ranks: Tensor | None = None) -> Tensor:
    """The unlikeliness reward: r_i (1 - beta rank_i / G) with `likelihood_ranks` of `seq_logp`
    (each response's mean token log-prob under the rollout policy), rewards [B*G] -> [B*G] float64.
    `ranks`: those ranks when the caller already has them (the module, which logs them too)."""
    check_unlikeliness(beta)
    r = _groups(rewards, group_size).reshape(-1)
    if ranks is None:
        ranks = likelihood_ranks(seq_logp, group_size)
    return r * (1 - beta * ranks / group_size)


def _passk_tables(group_size: int, k: int, device) -> tuple[Tensor, Tensor]:
    """For every success count c = 0..G of a group of G: rho[c] = P(a random k-subset holds a
    success) and miss[c] = P(a random k-subset holding a given failure holds no success), from
    exact integer binomials (math.comb is 0 for k > n), so a ratio is correctly rounded."""
    from math import comb

    G = group_size
    rho = [1 - comb(G - c, k) / comb(G, k) for c in range(G + 1)]
    miss = [comb(G - c - 1, k - 1) / comb(G - 1, k - 1) if c < G else 0.0 for c in range(G + 1)]
    as_t = lambda v: torch.tensor(v, dtype=torch.float64, device=device)  # noqa: E731
    return as_t(rho), as_t(miss)


def passk_advantages(rewards: Tensor, group_size: int, k: int, *, eps: float = 1e-6) -> Tensor:
    """Pass@k Training's analytical advantages (Chen et al. 2025; module docstring).

    rewards [B*G] in {0, 1} (ValueError otherwise) -> advantages [B*G] (rewards' float dtype;
    float32 for integer rewards), computed in float64; 1 <= k < G (`check_pass_k`)."""
    check_pass_k(k, group_size)
    r = _groups(rewards, group_size)  # [B, G]
    bad = first_non_binary(r)
    if bad is not None:
        raise ValueError(f"pass@k advantages need rewards in {{0, 1}} (a response is correct or not), got {bad!r}")
    rho_of, miss_of = _passk_tables(group_size, k, r.device)
    successes = r.sum(dim=1).long()  # [B]
    rho, miss = rho_of[successes].unsqueeze(1), miss_of[successes].unsqueeze(1)  # [B, 1]
    scale = (rho * (1 - rho)).sqrt() + eps
    adv = torch.where(r == 1, (1 - rho) / scale, (1 - rho - miss) / scale)
    return _zero_equal_groups(adv, r).reshape(-1).to(_out_dtype(rewards))


def _grpo(rewards: Tensor, group_size: int, **kw) -> Tensor:
    return group_advantages(rewards, group_size, normalize_std=True, **kw)


def _drgrpo(rewards: Tensor, group_size: int, **kw) -> Tensor:
    return group_advantages(rewards, group_size, normalize_std=False, **kw)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": _grpo,
    "drgrpo": _drgrpo,
    "rloo": rloo_advantages,
    "passk": passk_advantages,
}
QUANTILE_ESTIMATORS = ("grpo", "drgrpo")  # a baseline to replace; RLOO's is the others' mean by definition

_MIN_GROUP_SIZE = {"grpo": 2, "drgrpo": 2, "rloo": 2, "passk": 2}


def _check_name(estimator: str) -> None:
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}"
        )


def compute_advantages(rewards: Tensor, group_size: int, estimator: str, *,
                       baseline_quantile: float | None = None, pass_k: int | None = None,
                       unlikeliness: float | None = None, seq_logp: Tensor | None = None,
                       ranks: Tensor | None = None) -> Tensor:
    """Dispatch to ``ADVANTAGE_ESTIMATORS[estimator]``; unknown names raise a ValueError, as does a
    ``baseline_quantile`` (QAE) for an estimator not in QUANTILE_ESTIMATORS, and ``pass_k`` (the k
    of "passk", which needs it) for any other estimator. ``unlikeliness`` beta (with ``seq_logp``
    [B*G], each response's mean token log-prob under the rollout policy) feeds the estimator
    `unlikeliness_rewards` instead of the rewards (``ranks``: `likelihood_ranks(seq_logp)` when the
    caller already has them), and keeps 0 for a group of equal rewards; refused with "passk", whose
    formula needs 0/1 rewards."""
    if unlikeliness is None:
        return _estimate(rewards, group_size, estimator, baseline_quantile=baseline_quantile, pass_k=pass_k)
    _check_name(estimator)
    if estimator == "passk":
        raise ValueError("the unlikeliness reward scales the rewards the estimator sees; 'passk' needs them in {0, 1}")
    if seq_logp is None or seq_logp.shape != rewards.shape:
        raise ValueError(f"unlikeliness needs seq_logp shaped like the rewards {tuple(rewards.shape)}, got "
                         f"{None if seq_logp is None else tuple(seq_logp.shape)}")
    scaled = unlikeliness_rewards(rewards, seq_logp, group_size, unlikeliness, ranks)
    adv = _estimate(scaled, group_size, estimator, baseline_quantile=baseline_quantile, pass_k=pass_k)
    return adv.masked_fill(zero_variance_groups(rewards, group_size), 0.0).to(_out_dtype(rewards))


def _estimate(rewards: Tensor, group_size: int, estimator: str, *,
              baseline_quantile: float | None, pass_k: int | None) -> Tensor:
    _check_name(estimator)
    if (estimator == "passk") != (pass_k is not None):
        raise ValueError(f"pass_k is the k of estimator 'passk' (which needs it), got pass_k={pass_k!r} "
                         f"with {estimator!r}")
    if estimator == "passk":
        if baseline_quantile is not None:
            raise ValueError(f"a baseline quantile replaces the group mean of {list(QUANTILE_ESTIMATORS)}, "
                             "not 'passk'")
        return passk_advantages(rewards, group_size, pass_k)
    if baseline_quantile is None:
        return ADVANTAGE_ESTIMATORS[estimator](rewards, group_size)
    if estimator not in QUANTILE_ESTIMATORS:
        raise ValueError(f"a baseline quantile replaces the group mean of {list(QUANTILE_ESTIMATORS)}, "
                         f"not {estimator!r}")
    return ADVANTAGE_ESTIMATORS[estimator](rewards, group_size, baseline_quantile=baseline_quantile)


def min_group_size(estimator: str) -> int:
    """Smallest G the estimator is defined for (2: Dr.GRPO with G=1 gives all-zero advantages)."""
    _check_name(estimator)
    return _MIN_GROUP_SIZE[estimator]


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """BoolTensor [B*G]: True for every sequence whose group's rewards are all equal.

    Such groups carry no learning signal under group baselines (DAPO dynamic sampling drops them).
    """
    r = _groups(rewards, group_size)  # [B, G]
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # [B, 1]
    return flat.expand_as(r).reshape(-1)


def per_token_advantages(advantages: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Detached advantages, one per sequence [N] or already per token [N, T], as [N, T] (``like``'s
    shape) in ``dtype`` (default ``like.dtype``): the one broadcast every token-level rule uses."""
    adv = advantages.detach().to(like.dtype if dtype is None else dtype)
    if adv.dim() == like.dim() - 1:
        adv = adv.unsqueeze(-1)
    return adv.expand(like.shape)


_STD_TOL = 1e-9  # a std below this (times max(1, |mean|)) is rounding noise of equal rewards: read as 0


def _std_or_zero(std: Tensor, mean: Tensor) -> Tensor:
    """`std`, or exactly 0 where it is rounding noise (8 rewards of 0.1 have a float64 std of ~1e-17,
    whose quotient would train a group of equal rewards as an O(1) advantage)."""
    return torch.where(std > _STD_TOL * mean.abs().clamp(min=1.0), std, torch.zeros_like(std))


def pooled_reward_stats(times: Tensor, mean: Tensor, std: Tensor, new_mean: Tensor,
                        new_std: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) [B] float64 of each prompt's rewards over its steps so far, this one included
    (DCPO's cumulative statistics): `times` earlier steps of statistics (mean, std) pooled with
    this step's group (new_mean, new_std), every step's group weighing the same:
        mean' = (T mean + new_mean) / (T + 1)
        std'^2 = (T std^2 + new_std^2 + T / (T + 1) (new_mean - mean)^2) / (T + 1)
    and (new_mean, new_std) itself at T = 0; a std of rounding noise is 0 (`_std_or_zero`)."""
    t = times.double()
    pooled = (mean * t + new_mean) / (t + 1)
    var = (t * std ** 2 + new_std ** 2 + t / (t + 1) * (new_mean - mean) ** 2) / (t + 1)
    first = t == 0
    out_mean = torch.where(first, new_mean, pooled)
    return out_mean, _std_or_zero(torch.where(first, new_std, var.sqrt()), out_mean)


def _standardized(r: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(r - mean) / std per group [B, G], 0 for a group of std 0."""
    std = std.unsqueeze(1)
    return torch.where(std > 0, (r - mean.unsqueeze(1)) / std.clamp(min=torch.finfo(r.dtype).tiny), 0.0)


def smooth_advantages(rewards: Tensor, group_size: int, times: Tensor, mean: Tensor,
                      std: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DCPO's smooth advantage standardization (Yang et al. 2025, arXiv 2509.02333; lime-RL/DCPO,
    compute_dcpo_outcome_advantage): rewards [B*G] of B prompts, each seen on `times` [B] earlier
    steps with cumulative reward statistics (mean [B], std [B]). With A_new the group's own
    standardization (Bessel std), A_total the one by the cumulative statistics this step included
    (`pooled_reward_stats`; 0 where a std is 0) and w = 1 / (times + 1):
        SA_new = (1 - w) A_new + w A_total,   SA_total = w A_new + (1 - w) A_total,
    and the advantage is SA_new where |SA_new| < |SA_total|, else SA_total (GRPO's, without its
    eps, on a prompt's first step). Returns (advantages [B*G] in the rewards' float dtype, the
    group's mean [B] and std [B], float64: the statistics to pool into the prompt's)."""
    if group_size < 2:
        raise ValueError(f"the group std needs group_size >= 2, got {group_size}")
    r = _groups(rewards, group_size)
    new_mean = r.mean(dim=1)
    new_std = _std_or_zero(r.std(dim=1, unbiased=True), new_mean)
    total_mean, total_std = pooled_reward_stats(times, mean, std, new_mean, new_std)
    a_new, a_total = _standardized(r, new_mean, new_std), _standardized(r, total_mean, total_std)
    w = 1.0 / (times.double() + 1).unsqueeze(1)
    sa_new = w * a_total + (1 - w) * a_new
    sa_total = w * a_new + (1 - w) * a_total
    adv = torch.where(sa_new.abs() < sa_total.abs(), sa_new, sa_total)
    return adv.reshape(-1).to(_out_dtype(rewards)), new_mean, new_std
