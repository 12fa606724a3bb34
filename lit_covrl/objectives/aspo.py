"""ASPO (Wang, Liu, Lin, Hu, Li, Zhang, Zhou, Gai 2025, "ASPO: Asymmetric Importance Sampling Policy
Optimization", arXiv 2510.06062): under token-level clipping the IS ratio r = pi / pi_old of a
positive-advantage token weighs tokens whose probability already rose more and those it fell less
(by the abstract: low-probability tokens are under-updated, already likely ones over-amplified,
and the entropy collapses). ASPO flips it: a token of A > 0 is weighted by 1 / r, one of A < 0
keeps r, and a soft dual-clip caps either weight at c while keeping its gradient
(`lit_covrl.algorithms.aspo_token_loss`):

    grad loss_t = -A_t w_t grad log pi_t,
    A < 0: w = 0 if r < 1 - eps_low, min(r, c) otherwise;
    A > 0: w = 0 if r > 1 + eps_high, min(1 / r, c) otherwise.

Follows the reference code (wizard-III/Archer2.0, `compute_policy_loss_archer` in
`verl/trainer/ppo/core_algos.py`, called from `dp_actor.py`); the paper's method section could
not be read, only its abstract. Defaults: eps_low = eps_high = 0.2 (the recipe's
`clip_ratio_low` / `clip_ratio_high` and the loss's low-entropy range), c = 3 (`clip_ratio_c` in
the recipe, both signs' constant in the loss). The reference's clip range is per token (0.2,
0.4 on each response's top-20% entropy tokens): that is Archer's per-token range
(`lit_covrl.regularizers.Archer`, `high_entropy_clip_low/high: 0.4`), which ASPO takes in
place of its clip_low / clip_high. Where we differ: the value of a capped token is -c A (the
reference's -c A log pi has the same gradient); a token whose log-ratio lies beyond
`logratio_clamp` keeps the gradient of its (clamped) ratio's weight (the reference gives its
unclipped tokens there none; with the default clamp 20 both are nil or absent).
`clipped_tokens` holds the tokens it clips (w = 0), not the capped ones, so Clip-Cov may draw
those. BAPO, which balances PPO's r-weighted contributions, is refused with it at start-up.
"""
from __future__ import annotations

import math

from lit_covrl.algorithms import aspo_clipped_tokens, aspo_stats, aspo_token_loss
from lit_covrl.objectives.base import Objective, check_clip, clip_kw


class ASPO(Objective):
    """Asymmetric IS: flipped ratio on positive-advantage tokens, soft dual-clip on both signs."""

    run_name = "aspo"
    token_clip = True  # a per-token range moves each token's clip edges (the cap c stays the objective's)
    ratio_weighted_positive = False  # A > 0 tokens weigh 1 / r, not PPO's r
    ppo_on_policy = True  # at r = 1 it is PPOClip: a run with one update per rollout is warned at start-up

    def __init__(self, clip_low: float | None = 0.2, clip_high: float | None = 0.2, dual_clip: float = 3.0,
                 logratio_clamp: float | None = 20.0) -> None:
        """
        Args:
            clip_low: A < 0 tokens with r < 1 - clip_low get no gradient (recipe: 0.2; null = none).
            clip_high: A > 0 tokens with r > 1 + clip_high get no gradient (recipe: 0.2; null = none).
            dual_clip: c > 1, the cap of both weights r (A < 0) and 1 / r (A > 0), gradient kept (recipe: 3).
            logratio_clamp: clamp of logp - old_logp before exp (null = off; reference: 20).
        """
        check_clip("ASPO", clip_low, clip_high, logratio_clamp)
        if (isinstance(dual_clip, bool) or not isinstance(dual_clip, (int, float))
                or not dual_clip > 1 or math.isinf(dual_clip)):
            raise ValueError(f"ASPO.dual_clip={dual_clip!r} is invalid: must be a finite number > 1 "
                             "(the soft dual-clip is part of ASPO: it caps the weights r and 1 / r)")
        self.clip_low, self.clip_high = clip_low, clip_high
        self.dual_clip, self.logratio_clamp = float(dual_clip), logratio_clamp

    def _all(self, clip=None) -> dict:
        return dict(clip_kw(self, clip), dual_clip=self.dual_clip)

    def token_loss(self, logp, old_logp, advantages, mask, clip=None):
        return aspo_token_loss(logp, old_logp, advantages, mask, **self._all(clip))

    def clipped_tokens(self, logp, old_logp, advantages, mask, clip=None):
        return aspo_clipped_tokens(logp, old_logp, advantages, mask, **self._all(clip))

    def stats(self, logp, old_logp, advantages, mask, num_tokens=None, clip=None):
        return aspo_stats(logp, old_logp, advantages, mask, num_tokens=num_tokens, **self._all(clip))
