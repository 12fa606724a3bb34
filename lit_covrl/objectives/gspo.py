"""GSPO (Zheng et al. 2025, arXiv 2507.18071): the importance ratio and its clipping are taken per
sequence, s_i = exp(mean_t log(pi / pi_old)), so a sequence is kept or clipped as a whole
(`lit_covrl.algorithms.gspo_token_loss`, token form with the sequence ratio's gradient).

Paper defaults: eps_low = 3e-4, eps_high = 4e-4, and the sequence-mean aggregation
(`model.loss.loss_agg_mode: seq-mean-token-mean`, set in configs/cpu/gspo.yaml; the objective does not
force it). Where we differ: the sequence log-ratio is clamped to +-logratio_clamp before exp
(verl clamps it at 10 from above only); tokens of the advantage shifted by a regularizer keep
their own advantage (GSPO-token form).
"""
from __future__ import annotations

from lit_covrl.algorithms import gspo_clipped_tokens, gspo_stats, gspo_token_loss
from lit_covrl.objectives.base import Objective, check_clip


class GSPO(Objective):
    """Sequence-level ratio and clipping."""

    run_name = "gspo"

    def __init__(self, clip_low: float | None = 3e-4, clip_high: float | None = 4e-4,
                 logratio_clamp: float | None = 20.0) -> None:
        """
        Args:
            clip_low: lower clip epsilon of the sequence ratio (paper: 3e-4; null = none).
            clip_high: upper clip epsilon of the sequence ratio (paper: 4e-4; null = none).
            logratio_clamp: clamp of the sequence log-ratio before exp (null = off).
        """
        check_clip("GSPO", clip_low, clip_high, logratio_clamp)
        self.clip_low, self.clip_high, self.logratio_clamp = clip_low, clip_high, logratio_clamp

    def _kw(self) -> dict:
        return dict(clip_low=self.clip_low, clip_high=self.clip_high, logratio_clamp=self.logratio_clamp)

    def token_loss(self, logp, old_logp, advantages, mask):
        return gspo_token_loss(logp, old_logp, advantages, mask, **self._kw())

    def clipped_tokens(self, logp, old_logp, advantages, mask):
        return gspo_clipped_tokens(logp, old_logp, advantages, mask, **self._kw())

    def stats(self, logp, old_logp, advantages, mask, num_tokens=None):
        return gspo_stats(logp, old_logp, advantages, mask, num_tokens=num_tokens, **self._kw())
