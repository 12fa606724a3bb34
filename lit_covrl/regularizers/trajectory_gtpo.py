"""TrajectoryGTPO: GTPO, Group-relative Trajectory-based Policy Optimization (Simoni, Fontana,
Rossolini, Saracino, Mori 2025, "GTPO: Stabilizing Group Relative Policy Optimization via Gradient
and Entropy Control", arXiv 2508.03772; the authors' code winstonsmith1897/GTPO,
gtpo/gtpo_training.py, defaults from its config.yaml `gtpo_runtime`). Not Tan et al.'s "GTPO and
GRPO-S" (arXiv 2508.04349), a token-entropy reward shaping of the same acronym.

Two controls, both decided per optimizer mini-batch in `prepare` (the math in
`lit_covrl.algorithms.conflict_controls`):

- conflict tokens: a token of a response with A != 0 that stands, with the same id at the same
  position, in a positively and in a negatively rewarded response of its group, within the run
  that opens the responses (positions from the first token) or the run that closes them (positions
  from the last token). Its negative update is skipped (weight 0 on A < 0 responses) and its
  positive one amplified (`positive_weight` on A > 0 responses, per run it belongs to); with
  `count_norm` each such response's objective is divided by its number of conflict tokens (the
  reference's loss does so).
- entropy filter: a response whose mean token entropy H (current policy: the rollout's while on
  policy) exceeds `entropy_threshold` is dropped (objective weight 0); a kept one's advantage
  becomes A - `entropy_scale` H (a detached advantage shift, A = 0 responses included).

The weights are a `TokenShaping.weight` and the shift a `TokenShaping.advantage_shift`, so the
control stacks on any objective. GTPO drops the KL to a reference model: leave ReferenceKL out.
Groups are whole inside one rank's mini-batch, so the decisions do not depend on the micro-batch
size or the number of devices (except for a response whose mean entropy is within float rounding,
~1e-7 relative, of `entropy_threshold`: forwards of other shapes can put it on the other side);
the metrics are summed over all ranks.
"""
from __future__ import annotations

import torch

from lit_covrl import distributed
from lit_covrl.algorithms import (gtpo_conflict_counts, gtpo_conflict_weights, gtpo_conflicts, gtpo_filter,
                                  gtpo_response_entropy)
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer
from lit_covrl.regularizers.checks import check_number
from lit_covrl.types import PolicyBatch, TokenShaping


class TrajectoryGTPO(Regularizer):
    """GTPO (Simoni et al. 2025): protect conflict tokens (skip their negative update, amplify the
    positive one) and drop responses whose mean entropy exceeds a threshold."""

    needs_current_entropy = True
    default_name = "trajectory_gtpo"
    chart_metrics = {"Entropy": ("response_entropy",), "Control": ("conflict_frac", "filtered_frac")}

    def __init__(self, positive_weight: float = 2.0, entropy_threshold: float = 0.7, entropy_scale: float = 0.1,
                 count_norm: bool = True, name: str | None = None) -> None:
        """
        Args:
            positive_weight: weight of a conflict token of an A > 0 response, per run (opening,
                closing) it belongs to (reference W_RAW: 2; >= 0, 1: no amplification).
            entropy_threshold: responses whose mean token entropy exceeds it are dropped, nats
                (reference ENT_THRESHOLD: 0.7, about the paper's ln 2; > 0).
            entropy_scale: a kept response's advantage becomes A - entropy_scale H (reference
                ENT_SCALE: 0.1; >= 0, 0: no shift).
            count_norm: divide the objective of each response with A != 0 by its number of
                conflict tokens, at least 1 (the reference's loss: true; false: the paper's
                formula, which shows no such division).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.positive_weight = check_number("TrajectoryGTPO.positive_weight", positive_weight,
                                            must="a finite number >= 0 (1: no amplification)")
        self.entropy_threshold = check_number("TrajectoryGTPO.entropy_threshold", entropy_threshold, low_open=True,
                                              must="an entropy > 0 (nats)")
        self.entropy_scale = check_number("TrajectoryGTPO.entropy_scale", entropy_scale,
                                          must="a finite number >= 0 (0: no advantage shift)")
        if not isinstance(count_norm, bool):
            raise ValueError(f"TrajectoryGTPO.count_norm={count_norm!r} is invalid: must be true or false")
        self.count_norm = count_norm
        self.shifts_advantage = self.entropy_scale > 0
        self.weights: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.entropy is not None, "the module must fill ctx.entropy when needs_current_entropy is set"
        assert ctx.token_ids is not None and ctx.groups is not None, "the learner must fill ctx.token_ids and groups"
        n, T = ctx.mask.shape
        adv = ctx.advantages[:, 0] if T else ctx.mask.new_zeros(n)
        lead, trail = gtpo_conflicts(ctx.token_ids, ctx.mask, adv, ctx.groups)
        w = gtpo_conflict_weights(lead, trail, adv, positive_weight=self.positive_weight)
        if self.count_norm:
            w = w / gtpo_conflict_counts(lead, trail)[:, None]
        h = gtpo_response_entropy(ctx.entropy, ctx.mask)
        kept, shift = gtpo_filter(h, threshold=self.entropy_threshold, scale=self.entropy_scale)
        self.weights = (w * kept[:, None]).to(ctx.mask.dtype)
        self.shift = (shift[:, None] * ctx.mask).to(ctx.mask.dtype) if self.shifts_advantage else None
        self._record(ctx.mask, lead | trail, kept, h)

    def _record(self, mask: torch.Tensor, conflict: torch.Tensor, kept: torch.Tensor, h: torch.Tensor) -> None:
        rows = mask.sum(-1) > 0
        m = mask.double()
        sums = distributed.all_sum(torch.stack([
            rows.double().sum(), (rows & ~kept).double().sum(), (h * rows).sum(),
            (conflict.double() * m).sum(), m.sum(),
        ]))
        self.record("filtered_frac", sums[1] / sums[0].clamp(min=1), when=sums[0] > 0)
        self.record("response_entropy", sums[2] / sums[0].clamp(min=1), when=sums[0] > 0)
        self.record("conflict_frac", sums[3] / sums[4].clamp(min=1), when=sums[4] > 0)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self.weights is not None, "prepare() must run before shape()"
        dtype = batch.logp.dtype
        shift = None if self.shift is None else self.shift[batch.rows].to(dtype)
        return TokenShaping(weight=self.weights[batch.rows].to(dtype), advantage_shift=shift)

    def zeroed_tokens(self) -> torch.Tensor | None:
        return None if self.weights is None else self.weights == 0
