"""Entropy terms that act on every valid token:

- AdaptiveEntropyBonus (Skywork-OR1, He et al. 2025, arXiv 2505.22312, "adaptive entropy
  control"): loss_tok -= c_k 1[e_k < target] H_t, where e_k is the measured entropy and the
  coefficient moves c_{k+1} = clamp(c_k +- delta, min_coef, max_coef) toward the target (up while
  e_k < target). Defaults from the released Skywork-OR1 recipes (target 0.2, delta 1e-4,
  c_0 = 0, [0, 0.005]; the paper's text also mentions delta = 0.005). Where we differ: e_k is
  the token-mean entropy of the tokens the RL step trains on, over all ranks (the recorded
  sampler entropy, the current policy's on the step's first update; groups dropped by
  `filter_groups` and responses masked by `overlong: mask` are left out, so it can differ from
  `policy/entropy`, which covers the whole rollout), and the coefficient it gives acts from the
  next RL step on, like the reference code, which updates its controller after each step from
  the actor's measured entropy. The coefficient and the pending measurement are saved in
  checkpoints (`state_dict`) and resume exactly.
- EntropyAdvantage (Cheng et al. 2025, arXiv 2506.14758): A'_t = A_t + min(alpha H_t, |A_t| /
  kappa), H detached, applied inside the objective (a `TokenShaping.advantage_shift`), so clipping
  sees the shifted advantage; with kappa > 1 it never flips the advantage's sign (paper: alpha 0.4,
  kappa 2). H is the current policy's entropy from the training forward.

The math is in `lit_covrl.algorithms.entropy_controls`.
"""
from __future__ import annotations

import math

import torch

from lit_covrl import distributed
from lit_covrl.algorithms import adaptive_entropy_coef, entropy_advantage_shift
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, StepEntropy, StepSums, check_nonnegative
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.types import PolicyBatch, TokenShaping


class AdaptiveEntropyBonus(Regularizer):
    """Entropy bonus whose coefficient steers the entropy toward `target`."""

    needs_entropy = True
    default_name = "adaptive_entropy"
    chart_metrics = {"Entropy": ("coef", "measured_entropy")}

    def __init__(
        self,
        target: float = 0.2,
        delta: float = 1e-4,
        init_coef: float = 0.0,
        min_coef: float = 0.0,
        max_coef: float = 0.005,
        name: str | None = None,
    ) -> None:
        """
        Args:
            target: target token-mean entropy (nats; Skywork-OR1: 0.2).
            delta: coefficient change per RL step (released recipes: 1e-4).
            init_coef: coefficient before the first measurement (recipes: 0).
            min_coef: lower clamp of the coefficient (recipes: 0).
            max_coef: upper clamp of the coefficient (recipes: 0.005).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        for field, v in (("target", target), ("delta", delta), ("init_coef", init_coef), ("min_coef", min_coef)):
            check_nonnegative(f"AdaptiveEntropyBonus.{field}", v)
        if not min_coef <= init_coef <= max_coef:
            raise ValueError("AdaptiveEntropyBonus needs min_coef <= init_coef <= max_coef, got "
                             f"{min_coef!r}, {init_coef!r}, {max_coef!r}")
        self.target, self.delta, self.min_coef, self.max_coef = target, delta, min_coef, max_coef
        self.init_coef = init_coef
        # running state (saved by state_dict), private: the settings above describe the run
        self._coef, self._active = float(init_coef), True  # the reference code starts enabled
        self._entropy = StepEntropy()  # the step's measurement, moving the coefficient of the next

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.old_entropy is not None, "the module must provide the rollout entropy"
        if (entropy := self._entropy.begin(ctx.step)) is not None:  # the previous step, closed
            self._coef, self._active = adaptive_entropy_coef(
                self._coef, entropy, target=self.target, delta=self.delta, min_coef=self.min_coef, max_coef=self.max_coef
            )
        m = ctx.mask.double()
        self._entropy.add(distributed.all_sum(torch.stack([(ctx.old_entropy.double() * m).sum(), m.sum()])))
        self.record("coef", self.coef_now)
        self.record("coef_state", self._coef)

    def pop_metrics(self) -> dict[str, float]:
        """Also reg/<name>/measured_entropy: the step's own measurement (the token-mean entropy of
        the tokens trained on, filtered groups left out), logged with the step (it moves the
        coefficient of the next one); not logged for a step that measured nothing (every group
        filtered out), whose sums are still the previous step's."""
        if (entropy := self._entropy.pop_measured()) is not None:
            self.record("measured_entropy", entropy)
        return super().pop_metrics()

    @property
    def coef(self) -> float:
        """The coefficient kept (moved by each measurement, applied only while `active`)."""
        return self._coef

    @property
    def active(self) -> bool:
        """Whether the last measured entropy was below the target."""
        return self._active

    @property
    def coef_now(self) -> float:
        """The coefficient applied now: 0 while the last measured entropy is at or above the target."""
        return self._coef if self._active else 0.0

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert batch.entropy is not None, "the module must compute entropy when needs_entropy is set"
        if self.coef_now == 0.0:
            return TokenShaping()
        return TokenShaping(penalty=-self.coef_now * batch.entropy)

    def state_dict(self) -> dict:
        return {"coef": self._coef, "active": self._active, **self._entropy.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._coef, self._active = float(state_dict["coef"]), bool(state_dict["active"])
        self._entropy.load_state_dict(state_dict)


class EntropyAdvantage(Regularizer):
    """Entropy-based advantage: A + min(alpha H, |A| / kappa) inside the objective; `schedule`
    anneals alpha."""

    needs_entropy = True
    shifts_advantage = True
    default_name = "entropy_advantage"
    chart_metrics = {"Entropy": ("coef",), "Control": ("capped_frac",)}

    def __init__(self, alpha: float = 0.4, kappa: float = 2.0, schedule: Schedule | None = None,
                 name: str | None = None) -> None:
        """
        Args:
            alpha: scale of the entropy term (paper: 0.4).
            kappa: the term is capped at |A| / kappa; must be > 1 so that the sign of A never
                flips (paper: 2).
            schedule: annealing of `alpha` over RL steps.
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(schedule, name)
        check_nonnegative("EntropyAdvantage.alpha", alpha)
        if not 1 < kappa < math.inf:  # inf caps every shift at 0: a no-op
            raise ValueError(f"EntropyAdvantage.kappa must be finite and > 1 (else A + psi can flip sign), got {kappa!r}")
        self.alpha, self.kappa = alpha, kappa
        self._alpha_now = alpha
        self._sums = StepSums("psi", "capped", "tokens")  # over the valid tokens

    def prepare(self, ctx: MiniBatchContext) -> None:
        self._alpha_now = self.scheduled(self.alpha, ctx.step)
        self.record("coef", self._alpha_now)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert batch.entropy is not None, "the module must compute entropy when needs_entropy is set"
        m = batch.mask.to(batch.entropy.dtype)
        psi = entropy_advantage_shift(batch.advantages, batch.entropy, alpha=self._alpha_now, kappa=self.kappa) * m
        cap = batch.advantages.abs() / self.kappa  # 0 where A = 0: no shift there, nothing capped
        capped = ((self._alpha_now * batch.entropy.detach() > cap) & (cap > 0)).to(m.dtype) * m
        self._sums.add(psi=psi.sum(), capped=capped.sum(), tokens=m.sum())
        return TokenShaping(advantage_shift=psi)

    def pop_metrics(self) -> dict[str, float]:
        """reg/<name>/shift_mean (token mean of psi) and capped_frac (the share of valid tokens where
        |A| / kappa binds, counting only tokens with A != 0: a zero-advantage token, e.g. of a group
        that scored alike, gets no shift either way), over every update of the step and every rank
        (a collective: called on every rank)."""
        total = self._sums.pop()
        if total["tokens"] > 0:
            self.record("shift_mean", total["psi"] / total["tokens"])
            self.record("capped_frac", total["capped"] / total["tokens"])
        return super().pop_metrics()
