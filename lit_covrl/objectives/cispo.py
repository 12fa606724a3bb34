"""CISPO (MiniMax-M1, arXiv 2506.13585): no token loses its gradient; each is weighted by the
detached, clipped importance ratio w = clamp(r, 1 - eps_low, 1 + eps_high)
(`lit_covrl.algorithms.cispo_token_loss`).

Defaults: the paper imposes no lower bound (eps_low "a large value": here null) and tunes only
eps_high without publishing it; we default to 0.28 (DAPO's clip-higher, also Trinity-RFT's CISPO
default). Where we differ: the loss is written -sg(w) A exp(logp - sg(logp)) rather than
-sg(w) A logp (same gradient; its value -w A is comparable with PPO's surrogate in policy/loss);
the log-ratio is clamped before exp. `clipped_tokens` is empty: CISPO zeroes no token, so
Clip-Cov may pick any valid token.
"""
from __future__ import annotations

import torch

from lit_covrl.algorithms import cispo_stats, cispo_token_loss
from lit_covrl.objectives.base import Objective, check_clip, clip_kw


class CISPO(Objective):
    """Clipped IS-weight policy optimization."""

    run_name = "cispo"

    def __init__(self, clip_low: float | None = None, clip_high: float | None = 0.28,
                 logratio_clamp: float | None = 20.0) -> None:
        """
        Args:
            clip_low: lower bound 1 - clip_low of the IS weight (paper: none, null).
            clip_high: upper bound 1 + clip_high of the IS weight (paper: tuned, unpublished).
            logratio_clamp: clamp of logp - old_logp before exp (null = off).
        """
        check_clip("CISPO", clip_low, clip_high, logratio_clamp)
        self.clip_low, self.clip_high, self.logratio_clamp = clip_low, clip_high, logratio_clamp

    token_clip = True  # a per-token range caps each token's IS weight at its own bounds

    def token_loss(self, logp, old_logp, advantages, mask, clip=None):
        return cispo_token_loss(logp, old_logp, advantages, mask, **clip_kw(self, clip))

    def clipped_tokens(self, logp, old_logp, advantages, mask, clip=None):
        return torch.zeros_like(mask, dtype=torch.bool)

    def stats(self, logp, old_logp, advantages, mask, num_tokens=None, clip=None):
        return cispo_stats(logp, old_logp, advantages, mask, num_tokens=num_tokens, **clip_kw(self, clip))
