"""Clip-Cov and KL-Cov (Cui et al. 2025, arXiv 2505.22617): damp only the few tokens whose
log-prob and advantage covary most, the ones that drive the entropy collapse.

Cov_i = (logp_i - mean logp) (A_i - mean A) over the valid tokens of the optimizer mini-batch.
- Clip-Cov: among tokens the objective does not already zero (`Objective.clipped_tokens`: PPO
  clip, dual-clip, log-ratio clamp with the run's settings; GSPO's clipped sequences) with
  lb < Cov_i < ub, pick
  max(floor(ratio N), 1) uniformly at random; their surrogate loss (and gradient) is dropped,
  but they stay in the token-mean denominator.
- KL-Cov: the top max(floor(ratio N), 1) tokens by Cov get + beta |logp_i - old_logp_i|.

Selection happens once per optimizer mini-batch over all its tokens on all ranks (invariant to
micro-batch size and device count), with a seeded, checkpointed generator. Under update phases
(Lopti's), both treat the phase's tokens (`ctx.in_phase`) as the mini-batch: Cov's means (over the
phase's tokens on all ranks), the candidates, N and selected_frac's denominator are the phase's
(without phases: the mini-batch's, unchanged). Both act additively on
the module's objective (PPO, GSPO, CISPO). Every departure from the reference code (verl / PRIME-RL) and its
reason is in the README's table "Where we differ from the reference code".
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl.algorithms import clip_cov_select, kl_cov_select
from lit_covrl.regularizers.base import (
    MiniBatchContext,
    Regularizer,
    check_nonnegative,
    check_ratio,
    check_scheduled_ratio,
    global_token_covariance,
    select_globally,
    warn_inert_on_policy,
)
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.types import PolicyBatch, TokenShaping
from lit_covrl import distributed


class _CovarianceSelector(Regularizer):
    """Shared bookkeeping: keep the mini-batch selection, report what was selected."""

    needs_current_logp = True
    chart_metrics = {"Entropy": ("coef",), "Control": ("selected_frac", "selected_adv_mean")}

    def __init__(self, schedule: Schedule | None, name: str | None) -> None:
        super().__init__(schedule, name)
        self.selected: Tensor | None = None  # [n, T] bool for the current mini-batch

    def _record_selection(self, ctx: MiniBatchContext, selected: Tensor, mask: Tensor | None = None) -> None:
        """reg/<name>/selected_frac (of the valid tokens of `mask`, default ctx.mask, all ranks) and the
        mean advantage and log-prob of the selected tokens, all under this regularizer's own namespace
        (two stacked selectors never overwrite each other's metrics)."""
        s = selected.float()
        mask = ctx.mask if mask is None else mask
        stats = distributed.all_sum(
            torch.stack([s.sum(), mask.sum(), (s * ctx.advantages).sum(), (s * ctx.logp).sum()])
        )
        k = stats[0].clamp(min=1)
        self.record("selected_frac", stats[0] / stats[1].clamp(min=1))
        # means of the selected tokens: only over the mini-batches that selected some
        self.record("selected_adv_mean", stats[2] / k, when=stats[0] > 0)
        self.record("selected_logp_mean", stats[3] / k, when=stats[0] > 0)

    @staticmethod
    def _covariance(ctx: MiniBatchContext, mask: Tensor) -> Tensor:
        """Cov over `mask` = ctx.phase_mask(): under update phases (Lopti's) the phase's tokens are the
        mini-batch, centred on their means over all ranks; without phases the mini-batch's cached one."""
        return ctx.covariance() if ctx.in_phase is None else global_token_covariance(ctx.logp, ctx.advantages, mask)

    def _rows(self, batch: PolicyBatch) -> Tensor:
        assert self.selected is not None, "prepare() must run before shape()"
        return self.selected[batch.rows].to(batch.logp.dtype)


class ClipCov(_CovarianceSelector):
    """Clip-Cov. `schedule` anneals `ratio` (final 0.0 switches it off)."""

    default_name = "clip_cov"
    reads_zeroed = True  # never spends its ratio on tokens another control already zeroes

    def __init__(
        self,
        ratio: float = 2e-4,
        lb: float = 1.0,
        ub: float = 5.0,
        schedule: Schedule | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        """
        Args:
            ratio: fraction of the mini-batch's valid tokens to detach (paper: 2e-4; under Lopti's phases, of the phase's).
            lb: lower covariance bound of the candidates (strict).
            ub: upper covariance bound of the candidates (strict); must exceed lb.
            schedule: annealing of `ratio` over RL steps, e.g. {name: cosine, final: 0.0, steps: 500}.
            seed: seed of the selection's torch.Generator (saved in checkpoints).
            name: metric namespace (reg/<name>/...); set it to stack two ClipCov callbacks.
        """
        super().__init__(schedule, name)
        check_ratio("ClipCov.ratio", ratio)
        check_scheduled_ratio("ClipCov.ratio", self.schedule)
        if not lb < ub:
            raise ValueError(f"ClipCov needs lb < ub, got lb={lb!r}, ub={ub!r}")
        self.ratio, self.lb, self.ub, self.seed = ratio, lb, ub, seed
        self.generator = torch.Generator().manual_seed(seed)

    def prepare(self, ctx: MiniBatchContext) -> None:
        ratio = self.scheduled(self.ratio, ctx.step)
        self.record("coef", ratio)
        mask = ctx.phase_mask()  # the phase's tokens (Lopti's) are the mini-batch: Cov, N and selected_frac
        if ratio <= 0:
            self.selected = torch.zeros_like(ctx.mask, dtype=torch.bool)
        else:
            # the objective (clipped) or another control (zeroed, e.g. HighEntropyTokens' 80 %)
            # already gives the rest no gradient: detaching them would spend the ratio on nothing
            eligible = ctx.mask.bool() & ~ctx.clipped
            if ctx.zeroed is not None:
                eligible = eligible & ~ctx.zeroed
            self.selected = select_globally(
                [self._covariance(ctx, mask), mask, eligible],
                lambda cov, mask, elig: clip_cov_select(
                    cov, mask, elig, ratio=ratio, lb=self.lb, ub=self.ub, generator=self.generator
                ),
            )
        self._record_selection(ctx, self.selected, mask)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        return TokenShaping(weight=1.0 - self._rows(batch))

    def zeroed_tokens(self) -> Tensor | None:
        return self.selected

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["generator"])


class KLCov(_CovarianceSelector):
    """KL-Cov. `schedule` anneals `beta` by default (`schedule_on: ratio` anneals the ratio)."""

    SCHEDULE_TARGETS = ("beta", "ratio")
    default_name = "kl_cov"

    def __init__(
        self,
        ratio: float = 2e-3,
        beta: float = 1.0,
        schedule: Schedule | None = None,
        schedule_on: str = "beta",
        name: str | None = None,
    ) -> None:
        """
        Args:
            ratio: fraction of valid tokens penalized (paper: 2e-3 for 7B, 2e-4 for 32B; note
                PRIME-RL's `k_percent` is in percent).
            beta: penalty coefficient on |logp - old_logp| (paper: 1; verl's default is 0.1).
            schedule: annealing over RL steps, applied to `schedule_on`.
            schedule_on: "beta" or "ratio".
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(schedule, name)
        check_ratio("KLCov.ratio", ratio)
        check_nonnegative("KLCov.beta", beta)
        if schedule_on not in self.SCHEDULE_TARGETS:
            raise ValueError(f"KLCov.schedule_on={schedule_on!r}; valid: {list(self.SCHEDULE_TARGETS)}")
        if schedule_on == "ratio":
            check_scheduled_ratio("KLCov.ratio", self.schedule)
        self.ratio, self.beta, self.schedule_on = ratio, beta, schedule_on
        self._beta_now = beta
        self._inert = False

    def on_fit_start(self, trainer, pl_module) -> None:
        warn_inert_on_policy(self, pl_module, "old == current, so |logp - old_logp| = 0 with zero gradient")

    def prepare(self, ctx: MiniBatchContext) -> None:
        ratio, beta = self.ratio, self.beta
        if self.schedule_on == "beta":
            beta = self.scheduled(beta, ctx.step)
        else:
            ratio = self.scheduled(ratio, ctx.step)
        self._beta_now = beta
        # While no optimizer step has moved the weights since the rollout (the first update, or later
        # ones after filtered or skipped mini-batches, or after a zero-gradient step of a fresh
        # optimizer without weight decay: drivers.zero_step_moves_nothing) the policy *is* the rollout
        # policy: logp - old_logp is only float noise (sampler vs training forward, ~1e-7), and
        # d|x|/dx = sign(noise) would push every selected token by a random +-beta. The exact
        # penalty is 0 with 0 gradient there: nothing is selected and nothing applied.
        self._inert = ctx.on_policy
        self.record("coef", beta)
        self.record("ratio", ratio)
        # under update phases (Lopti's), the phase's tokens are the mini-batch: the covariance's means,
        # the candidates and the count N are theirs (without phases, mask is ctx.mask: unchanged)
        mask = ctx.phase_mask()
        if ratio <= 0 or beta <= 0 or self._inert:
            self.selected = torch.zeros_like(ctx.mask, dtype=torch.bool)
        else:
            self.selected = select_globally([self._covariance(ctx, mask), mask],
                                            lambda cov, mask: kl_cov_select(cov, mask, ratio=ratio))
        self._record_selection(ctx, self.selected, mask)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        if self._inert:
            return TokenShaping()
        return TokenShaping(penalty=self._beta_now * (batch.logp - batch.old_logp).abs() * self._rows(batch))
