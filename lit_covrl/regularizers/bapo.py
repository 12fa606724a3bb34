"""BAPO (Xi et al. 2025, "BAPO: Stabilizing Off-Policy Reinforcement Learning for LLMs via Balanced
Policy Optimization with Adaptive Clipping", arXiv 2510.18927; the authors' code WooooDyy/BAPO):
adaptive clipping. Off policy, negative-advantage tokens dominate the PPO objective and the fixed
clip range blocks the entropy-raising updates (low-probability positive tokens above 1 + eps, and
it keeps low-probability negative ones). Per optimizer mini-batch, BAPO raises the ratio bounds
c_low, c_high step by step until the positive tokens' share of the clipped objective is large
enough: a higher c_low clips (removes the gradient of) more negative tokens whose ratio fell, a
higher c_high lets more positive tokens whose ratio rose keep their gradient.

As the reference code computes it (recipe/bapo/policy_loss.py, compute_policy_loss_bapo): with
r = exp(clamp(logp - old_logp, -20, 20)) and the response tokens, P = sum_{A>0} min(r, c_high) A and
N = sum_{A<0} max(r, c_low) |A| (each sign's value of the clipped objective); starting at
(low_start, high_start), while P / (N + eps) < target, c_low = min(c_low + low_step, low_max), then,
if still below, c_high = min(c_high + high_step, high_max); the bounds found are the PPO clip
range of every token (dual-clip, set on the objective, applies as usual). `algorithms.bapo_*`.

How it composes: the range is a uniform `TokenShaping.clip_low / clip_high` (eps_low = 1 - c_low,
eps_high = c_high - 1) that the objective takes in place of its own (PPOClip, CEGPPO, CISPO; GSPO
and ASPO, whose A > 0 tokens do not weigh r, refused at start-up; one clip-range regularizer per run). The clip acts only off policy: with one
update per rollout r = 1, nothing clips and the search changes nothing (a start-up warning).

Defaults: the reference recipe recipe/bapo/run_bapo_example.sh (target_pos_ratio 0.5, low 0.8 ->
0.95 step 0.05, high 1.2 -> 2.0 step 0.1) and config.py's eps 1e-8.

Where we differ from the reference code: the search runs once per optimizer mini-batch over all
its micro-batches and ranks (the reference runs it in each micro-batch's loss, its sums all-reduced
over data-parallel ranks but not over micro-batches, so its bounds depend on the micro-batch size);
the sums are float64 (float32 there; only exact ties to the target can differ); the contributions of
every grid bound are summed in one all-reduce instead of one per search step (the same search); r's
log-ratio is clamped to the run's objective's `logratio_clamp` (`MiniBatchContext.logratio_clamp`;
default 20, the reference's fixed value; null: no clamp), so P and N are the objective's own values.
Beside Lopti (which the reference does not combine with BAPO) P and N sum the tokens the update's
phase trains (`ctx.in_phase`), not the whole mini-batch's: the bounds balance what the phase trains.
"""
from __future__ import annotations

import math

import torch

from lit_covrl import distributed
from lit_covrl.algorithms import bapo_contribution_sums, bapo_grid, bapo_search
from lit_covrl.regularizers.base import ClipRangeRegularizer, MiniBatchContext
from lit_covrl.regularizers.checks import check_number, warn_inert_on_policy


_MAX_GRID = 1000  # search steps per bound (the recipe's: 3 and 8); a larger grid is a typo, not a search


class BAPO(ClipRangeRegularizer):
    """Adaptive clipping: per mini-batch, the PPO ratio bounds are raised (c_low first, then c_high)
    until the positive tokens' clipped-objective contribution reaches `target` x the negative ones'."""

    needs_current_logp = True
    default_name = "bapo"
    chart_metrics = {"Control": ("clip_low", "clip_high", "pos_contribution")}

    def __init__(
        self,
        target: float = 0.5,
        low_start: float = 0.8,
        low_max: float = 0.95,
        low_step: float = 0.05,
        high_start: float = 1.2,
        high_max: float = 2.0,
        high_step: float = 0.1,
        eps: float = 1e-8,
        name: str | None = None,
    ) -> None:
        """
        Args:
            target: the ratio P / N of the positive to the negative tokens' contribution to reach
                (recipe: target_pos_ratio 0.5, the code's adv_ratio_target; >= 0).
            low_start / low_max / low_step: the lower ratio bound c_low's start, largest value and
                step (recipe: 0.8, 0.95, 0.05; 0 <= start <= max <= 1, step >= 0).
            high_start / high_max / high_step: the upper ratio bound c_high's (recipe: 1.2, 2.0,
                0.1; 1 <= start <= max, step >= 0).
            eps: added to N in the ratio (reference config: 1e-8).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.target = check_number("BAPO.target", target)
        self.low_start = check_number("BAPO.low_start", low_start, high=1.0)
        self.low_max = check_number("BAPO.low_max", low_max, high=1.0)
        self.low_step = check_number("BAPO.low_step", low_step)
        self.high_start = check_number("BAPO.high_start", high_start, low=1.0)
        self.high_max = check_number("BAPO.high_max", high_max, low=1.0)
        self.high_step = check_number("BAPO.high_step", high_step)
        self.eps = check_number("BAPO.eps", eps)
        if self.low_max < self.low_start:
            raise ValueError(f"BAPO.low_max={low_max!r} is below BAPO.low_start={low_start!r}: c_low only rises")
        if self.high_max < self.high_start:
            raise ValueError(f"BAPO.high_max={high_max!r} is below BAPO.high_start={high_start!r}: c_high only rises")
        for side, start, stop, step in (("low", self.low_start, self.low_max, self.low_step),
                                        ("high", self.high_start, self.high_max, self.high_step)):
            if step > 0 and (stop - start) / step > _MAX_GRID:  # each grid bound costs a sum per mini-batch
                raise ValueError(f"BAPO.{side}_step={step!r} is invalid: ({side}_max - {side}_start) / {side}_step "
                                 f"is {(stop - start) / step:.3g} search steps, more than {_MAX_GRID}")
        self.lows = bapo_grid(self.low_start, self.low_max, self.low_step)
        self.highs = bapo_grid(self.high_start, self.high_max, self.high_step)

    def on_fit_start(self, trainer, pl_module) -> None:
        warn_inert_on_policy(self, pl_module, "the ratio is 1, so no token is clipped whatever bounds it finds")

    def check_objective(self, objective) -> None:
        if not getattr(objective, "ratio_weighted_positive", True):
            raise ValueError(
                f"BAPO (regularizer {self.name!r}) balances the A > 0 tokens' PPO contribution min(r, c_high) A against "
                f"the A < 0 tokens', which the objective {type(objective).__name__} does not weigh its A > 0 tokens by "
                f"(ASPO takes 1 / r): its bounds would chase a balance the loss does not have; use PPOClip, CEGPPO or "
                f"CISPO with BAPO, or leave BAPO out")

    def clip_values(self) -> tuple[list[float], list[float]]:
        return [1.0 - c for c in self.lows], [c - 1.0 for c in self.highs]

    def prepare(self, ctx: MiniBatchContext) -> None:
        # under update phases (Lopti's) P and N sum the phase's tokens only (ctx.mask without phases)
        sums = distributed.all_sum(bapo_contribution_sums(ctx.logp, ctx.old_logp, ctx.advantages, ctx.phase_mask(),
                                                          lows=self.lows, highs=self.highs,
                                                          logratio_clamp=ctx.logratio_clamp))
        i, j, rho = bapo_search(sums.tolist(), self.lows, self.highs, target=self.target, eps=self.eps)
        c_low, c_high = self.lows[i], self.highs[j]
        dtype = ctx.mask.dtype if ctx.mask.is_floating_point() else torch.float32
        self._bounds = (torch.full(ctx.mask.shape, 1.0 - c_low, dtype=dtype, device=ctx.mask.device),
                        torch.full(ctx.mask.shape, c_high - 1.0, dtype=dtype, device=ctx.mask.device))
        neg, pos = float(sums[i]), float(sums[len(self.lows) + j])
        self.record("clip_low", c_low)
        self.record("clip_high", c_high)
        if pos + neg > 0:  # a mini-batch of A = 0 tokens only has none
            self.record("pos_contribution", pos / (pos + neg))
        self.record("pos_neg_ratio", rho, when=math.isfinite(rho))
