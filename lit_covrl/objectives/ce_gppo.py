"""CE-GPPO (Su et al. 2025, "CE-GPPO: Coordinating Entropy via Gradient-Preserving Clipping Policy
Optimization", arXiv 2509.20712; it generalises GPPO of Klear-Reasoner, arXiv 2508.07629, which is
beta1 = beta2 = 1): PPO's clipped surrogate whose clipped tokens keep a bounded gradient,
-beta1 (1 - eps_low) A grad log pi where A < 0 and r < 1 - eps_low, -beta2 (1 + eps_high) A grad log pi
where A > 0 and r > 1 + eps_high (`lit_covrl.algorithms.ce_gppo_token_loss`; the rule as the
authors' code computes it). By the paper's analysis (as its abstract and the reference README
state it) the first are mostly low-probability tokens of negative advantage, whose gradient
lowers the entropy (a larger beta1 converges faster), the second low-probability tokens of
positive advantage, whose gradient raises it (a larger beta2 explores more); PPO drops both.
beta1 = beta2 = 0 is PPOClip.

Defaults: the reference code's (Kwai-Klear/CE-GPPO, `compute_gppo_loss_general_beta`): beta1 = 0.75,
beta2 = 1, eps_low = eps_high = 0.2 (its 7B recipe; the 1.5B recipe uses beta1 = 0.5); the recipes'
dual-clip c = 10 is set in configs/cpu/ce_gppo.yaml, not here (null = off, as PPOClip). Where we
differ: the value of a clipped token is PPO's clipped value -(1 -+ eps) A (the reference's is
-beta (1 -+ eps) A: same gradient, a constant apart), so policy/loss compares with PPO's; the
log-ratio is clamped before exp for PPO's part, while the preserved gradient goes through
log pi itself and the clipped tokens are told by the unclamped ratio (the reference does not
clamp), so no `logratio_clamp` removes it. `clipped_tokens` holds only the tokens still given
no gradient (dual-capped ones, unclipped ones beyond the clamp, and a side whose beta is 0), so
Clip-Cov may draw the tokens outside the clip range whose gradient CE-GPPO keeps.
"""
from __future__ import annotations

from lit_covrl.algorithms import ce_gppo_clipped_tokens, ce_gppo_token_loss, ppo_stats
from lit_covrl.objectives.base import Objective, check_clip, clip_kw


class CEGPPO(Objective):
    """Gradient-preserving clipping: PPO's clip with bounded gradients on the clipped tokens."""

    run_name = "ce_gppo"

    def __init__(
        self,
        clip_low: float | None = 0.2,
        clip_high: float | None = 0.2,
        beta1: float = 0.75,
        beta2: float = 1.0,
        dual_clip: float | None = None,
        logratio_clamp: float | None = 20.0,
    ) -> None:
        """
        Args:
            clip_low: lower clip epsilon (paper: 0.2; null = no lower clip).
            clip_high: upper clip epsilon (paper: 0.2; null = no upper clip).
            beta1: gradient scale of the tokens clipped below (A < 0, r < 1 - clip_low); >= 0.
            beta2: gradient scale of the tokens clipped above (A > 0, r > 1 + clip_high); >= 0.
            dual_clip: dual-clip constant c > 1 for negative advantages (null = off).
            logratio_clamp: clamp of logp - old_logp before exp (null = off).
        """
        check_clip("CEGPPO", clip_low, clip_high, logratio_clamp)
        for field, v in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"CEGPPO.{field}={v!r} is invalid: must be a finite number >= 0")
        if dual_clip is not None and not dual_clip > 1:  # NaN included
            raise ValueError(f"CEGPPO.dual_clip={dual_clip!r} is invalid: must be > 1 or null")
        if dual_clip is not None and clip_low is not None and beta1 * (1 - clip_low) >= dual_clip:
            # the reference code caps the scaled value at -c A: its gradient would then be 0 there
            raise ValueError(f"CEGPPO.beta1={beta1!r} with clip_low={clip_low!r} and dual_clip={dual_clip!r}: "
                             "beta1 * (1 - clip_low) >= dual_clip, where the reference code's dual-clip removes the "
                             "gradient beta1 keeps; lower beta1 or raise dual_clip")
        self.clip_low, self.clip_high = clip_low, clip_high
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.dual_clip, self.logratio_clamp = dual_clip, logratio_clamp

    token_clip = True  # a per-token range moves both the clip and the kept gradient's scale beta (1 -+ eps)

    def check_token_clip(self, lows, highs, owner):
        """The dual-clip refusal of __init__, for each eps_low a per-token range may set."""
        bad = [lo for lo in lows if self.dual_clip is not None and self.beta1 * (1 - lo) >= self.dual_clip]
        if bad:
            raise ValueError(f"CEGPPO.beta1={self.beta1!r} with {owner}'s per-token clip_low {min(bad)!r} and "
                             f"dual_clip={self.dual_clip!r}: beta1 * (1 - clip_low) >= dual_clip, where the reference "
                             "code's dual-clip removes the gradient beta1 keeps; lower beta1 or raise dual_clip")

    def _all(self, clip=None) -> dict:
        return dict(clip_kw(self, clip), beta1=self.beta1, beta2=self.beta2, dual_clip=self.dual_clip)

    def token_loss(self, logp, old_logp, advantages, mask, clip=None):
        return ce_gppo_token_loss(logp, old_logp, advantages, mask, **self._all(clip))

    def clipped_tokens(self, logp, old_logp, advantages, mask, clip=None):
        return ce_gppo_clipped_tokens(logp, old_logp, advantages, mask, **self._all(clip))

    def stats(self, logp, old_logp, advantages, mask, num_tokens=None, clip=None):
        # clip_frac: tokens outside the clip range on the side PPO clips (their value is clipped,
        # their gradient scaled by beta), as PPOClip's
        return ppo_stats(logp, old_logp, advantages, mask, num_tokens=num_tokens, **clip_kw(self, clip))
