"""Archer (Wang et al. 2025, "Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints for
RLVR", arXiv 2507.15778; the authors' code wizard-III/ArcherCodeR): dual-token constraints. Within
each response, the tokens whose entropy exceeds the response's `quantile` quantile (0.8: about the
top 20 %) are high-entropy "reasoning" tokens, the others low-entropy "knowledge" tokens. The
high-entropy tokens get a wider clip range (eps 0.5 / 0.5 against 0.2 / 0.2) and their KL to the
reference model is scaled by `high_entropy_kl_scale` (0: none), so they move further while the
low-entropy ones stay near the reference.

As the reference code computes it (dp_actor.py, `use_token_entropy_separate`; core_algos.py,
`compute_policy_loss`): the quantile is torch.nanquantile over each response's valid tokens (per
response, so no micro-batch or device count changes it), of the current policy's entropy (the
training forward's, detached); a token is high-entropy when H > quantile, strictly; the clip range
replaces PPO's per token, and dual-clip (the recipe's c = 10, set on the objective) applies to
every A < 0 token alike. The clip acts only off policy: with one update per rollout the ratio is 1
and only the KL scaling acts (a start-up warning says so).

How it composes: the clip range is a `TokenShaping.clip_low / clip_high` (per-token eps) that the
objective takes in place of its own (PPOClip, CEGPPO: also the kept gradient's scale, CISPO: the IS
weight's cap; GSPO refused at start-up); the KL scaling is a per-token scale (`kl_scale`) that
ReferenceKL applies to its own penalty, so the run keeps one KL implementation and its estimator,
beta and schedule.

Defaults: the reference recipe (scripts/train/run_archer_qwen2.5_1.5b_code.sh: quantile 0.8,
low-entropy 0.2 / 0.2, high-entropy 0.5 / 0.5, high_entropy_kl_loss_scale_coef 0, with
kl_loss_coef 0.001 low_var_kl, i.e. ReferenceKL beta 0.001 k3, and clip_ratio_c 10).

Where we differ from the reference code: its high-entropy tokens' KL coefficient is
`high_entropy_kl_loss_scale_coef` itself, ours `high_entropy_kl_scale` x ReferenceKL's beta (the same
at the recipe's 0); it averages each group's KL over that group's own tokens
(agg_loss(kld, low-entropy mask)), per micro-batch, where ours is ReferenceKL's term over the loss's
own denominators (all tokens of the mini-batch), so a low-entropy token's KL weighs beta / (all
tokens) rather than beta / (low-entropy tokens of the micro-batch), about 0.8x; the selection uses
`ctx.entropy`, the rollout's entropy while on policy (the reference recomputes it in the training
forward; the same in float32 up to rounding, see `model.update.recompute_logprobs` under bf16);
entropies within a relative 1e-5 above the quantile count as equal to it (rounding of different
micro-batch shapes).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from lit_covrl.algorithms import archer_clip_bounds, archer_high_entropy
from lit_covrl.regularizers.base import ClipRangeRegularizer, MiniBatchContext
from lit_covrl.regularizers.checks import check_number
from lit_covrl.regularizers.entropy_selection import _global_frac

log = logging.getLogger("lit_covrl")


class Archer(ClipRangeRegularizer):
    """Dual-token constraints: a wide clip range (and a scaled KL to the reference) for each
    response's high-entropy tokens, a narrow one for the others."""

    needs_current_entropy = True
    default_name = "archer"
    chart_metrics = {"Control": ("high_entropy_frac",)}

    def __init__(
        self,
        quantile: float = 0.8,
        low_entropy_clip_low: float = 0.2,
        low_entropy_clip_high: float = 0.2,
        high_entropy_clip_low: float = 0.5,
        high_entropy_clip_high: float = 0.5,
        high_entropy_kl_scale: float = 0.0,
        name: str | None = None,
    ) -> None:
        """
        Args:
            quantile: a token is high-entropy when its entropy exceeds this quantile of its
                response's token entropies (reference recipe: 0.8; in [0, 1]).
            low_entropy_clip_low / low_entropy_clip_high: clip eps of the low-entropy tokens
                (recipe: 0.2 / 0.2).
            high_entropy_clip_low / high_entropy_clip_high: clip eps of the high-entropy tokens
                (recipe: 0.5 / 0.5).
            high_entropy_kl_scale: factor on ReferenceKL's beta for the high-entropy tokens
                (recipe: 0, no KL on them; 1 = plain ReferenceKL); needs a ReferenceKL in the run.
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.quantile = check_number("Archer.quantile", quantile, high=1.0, must="in [0, 1]")
        # kept under the constructor's names, so the run's description (HPARAMS, resume) has them
        low_side = "a finite number >= 0 and <= 1 (the ratio is clipped at 1 - clip_low >= 0)"
        self.low_entropy_clip_low = check_number("Archer.low_entropy_clip_low", low_entropy_clip_low, high=1.0,
                                                 must=low_side)
        self.low_entropy_clip_high = check_number("Archer.low_entropy_clip_high", low_entropy_clip_high)
        self.high_entropy_clip_low = check_number("Archer.high_entropy_clip_low", high_entropy_clip_low, high=1.0,
                                                  must=low_side)
        self.high_entropy_clip_high = check_number("Archer.high_entropy_clip_high", high_entropy_clip_high)
        self.high_entropy_kl_scale = check_number("Archer.high_entropy_kl_scale", high_entropy_kl_scale)
        self._high: Tensor | None = None

    @property
    def low_entropy(self) -> tuple[float, float]:
        """(clip_low, clip_high) of the low-entropy tokens."""
        return self.low_entropy_clip_low, self.low_entropy_clip_high

    @property
    def high_entropy(self) -> tuple[float, float]:
        """(clip_low, clip_high) of the high-entropy tokens."""
        return self.high_entropy_clip_low, self.high_entropy_clip_high

    def on_fit_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "updates_per_rollout", None) == 1:
            log.warning("Archer's clip ranges have no effect with a single on-policy update per rollout: the ratio is 1, "
                        "so no token is clipped (its KL scaling of the high-entropy tokens still acts). "
                        "Use several mini-batches or ppo_epochs > 1.")
        from lit_covrl.regularizers.dense import ReferenceKL

        if self.high_entropy_kl_scale != 1 and not any(isinstance(c, ReferenceKL) for c in trainer.callbacks):
            log.warning("Archer.high_entropy_kl_scale=%g has no effect: the run has no ReferenceKL (the reference "
                        "recipe has one, beta 0.001, estimator k3)", self.high_entropy_kl_scale)

    def clip_values(self) -> tuple[list[float], list[float]]:
        return [self.low_entropy[0], self.high_entropy[0]], [self.low_entropy[1], self.high_entropy[1]]

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.entropy is not None, "the module must fill ctx.entropy when needs_current_entropy is set"
        high = archer_high_entropy(ctx.entropy, ctx.mask, quantile=self.quantile)
        self._high = high
        self._bounds = archer_clip_bounds(high, low_entropy=self.low_entropy, high_entropy=self.high_entropy,
                                          dtype=ctx.mask.dtype)
        self.record("high_entropy_frac", _global_frac(high, ctx.mask))

    def kl_scale(self) -> Tensor | None:
        if self._high is None or self.high_entropy_kl_scale == 1:
            return None
        return torch.where(self._high, self.high_entropy_kl_scale, 1.0).to(torch.float32)
