"""Dense regularizers: they act on every valid token.

- EntropyBonus: loss_tok -= coef * H(pi(.|s_t)), the exact full-vocabulary entropy of the
  sampled and trained distribution softmax(z / temperature) (computed in row chunks by the module;
  the reference code's convention). Its stationary point on a bandit is
  softmax(r / coef), not the best arm: a persistent bias unless `coef` is annealed to 0.
- ReferenceKL: loss_tok += beta * s_t * KL_est(pi || pi_ref) with Schulman's k2 / k3 estimators on
  the sampled tokens (s_t = 1 unless a regularizer sets a per-token KL scale, `PolicyBatch.kl_scale`:
  Archer's high-entropy tokens) (as a loss, k2's expected gradient is that of KL(pi || pi_ref), k3's that of
  KL(pi_ref || pi); k1's is 0, so k1 is refused: `lit_covrl.algorithms.kl`); the module loads the
  reference model only when one exists. With `reset_every` (ProRL, Liu et al. 2025, arXiv 2505.24864)
  the reference is overwritten with the policy's weights every `reset_every` RL steps, or when
  `reset_patience` validations in a row bring no new best of `reset_monitor`, and the optimizer
  state is re-initialised (`reset_optimizer`): `lit_covrl.reference_reset`.
"""
from __future__ import annotations

import re

from lightning.pytorch.utilities import rank_zero_warn

from lit_covrl import reference_reset
from lit_covrl.algorithms import KL_ESTIMATORS, kl_penalty
from lit_covrl.regularizers.base import Regularizer, StepSums, check_nonnegative
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.types import PolicyBatch, TokenShaping


RESET_MONITORS = ("val/pass@1", "val/pass@k")  # what validation logs that reset_patience can watch


class EntropyBonus(Regularizer):
    """Entropy bonus; `schedule` anneals `coef`."""

    needs_entropy = True
    default_name = "entropy_bonus"

    def __init__(self, coef: float = 1e-3, schedule: Schedule | None = None, name: str | None = None) -> None:
        """
        Args:
            coef: bonus coefficient alpha (paper baselines: 1e-4 .. 1e-2).
            schedule: annealing of `coef` over RL steps.
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(schedule, name)
        check_nonnegative("EntropyBonus.coef", coef)
        self.coef = coef
        self._coef_now = coef

    def prepare(self, ctx) -> None:
        self._coef_now = self.scheduled(self.coef, ctx.step)
        self.record("coef", self._coef_now)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert batch.entropy is not None, "the module must compute entropy when needs_entropy is set"
        return TokenShaping(penalty=-self._coef_now * batch.entropy)


class ReferenceKL(Regularizer):
    """KL penalty to the frozen reference model; `schedule` anneals `beta`."""

    needs_reference = True
    default_name = "ref_kl"
    chart_metrics = {"Entropy": ("coef",), "Control": ("kl",)}

    def __init__(
        self, beta: float = 1e-3, estimator: str = "k3", schedule: Schedule | None = None, name: str | None = None,
        reset_every: int | None = None, reset_optimizer: bool = True, reset_patience: int | None = None,
        reset_monitor: str = "val/pass@1",
    ) -> None:
        """
        Args:
            beta: penalty coefficient.
            estimator: "k3" (GRPO's: unbiased value, gradient of KL(pi_ref || pi)) or "k2"
                (gradient of KL(pi || pi_ref)); "k1" is refused (zero expected gradient).
            schedule: annealing of `beta` over RL steps.
            name: metric namespace (reg/<name>/...).
            reset_every: ProRL's reference policy reset: before RL steps reset_every, 2 reset_every,
                ... the reference takes the policy's current weights (so that step's first,
                on-policy mini-batch has KL 0). null = never (a fixed reference). ProRL resets by
                hand between its runs, when validation stalls; it publishes no interval.
            reset_optimizer: with a reset, also re-initialise the optimizer state (ProRL does).
            reset_patience: ProRL's trigger: reset before the next RL step once this many
                validations in a row brought no new best of `reset_monitor` (the count then
                starts again; the best is kept). null = never on validation. With `reset_every`
                too, either one resets.
            reset_monitor: the held-out metric `reset_patience` watches, higher is better:
                "val/pass@1" or "val/pass@k" (pass@`model.eval.k`).
        """
        super().__init__(schedule, name)
        check_nonnegative("ReferenceKL.beta", beta)
        self.reset_every = check_reset_every(reset_every)
        if not isinstance(reset_optimizer, bool):
            raise ValueError(f"ReferenceKL.reset_optimizer={reset_optimizer!r}: must be true or false")
        self.reset_optimizer = reset_optimizer
        self.reset_patience = check_reset_every(reset_patience, "reset_patience", "validations without a new best")
        if reset_monitor not in RESET_MONITORS:
            raise ValueError(f"ReferenceKL.reset_monitor={reset_monitor!r}: must be one of {list(RESET_MONITORS)} "
                             "(held-out figures where higher is better; val/pass@k is pass@model.eval.k)")
        self.reset_monitor = reset_monitor
        self._stall = reference_reset.StallWatch(reset_patience) if reset_patience is not None else None
        self._resets = 0  # resets so far (checkpointed)
        self._last_reset_step: int | None = None
        self._pending_reference: dict | None = None  # a checkpoint's reset reference, until on_train_start
        self._module = None
        if estimator == "k1":
            raise ValueError(
                "ReferenceKL.estimator='k1': as a loss on tokens sampled from the policy, k1 = log pi - log pi_ref "
                "has zero expected gradient (E[grad log pi] = 0), so it would not pull toward the reference; "
                "use 'k2' (gradient of KL(pi || pi_ref)) or 'k3' (GRPO's; gradient of KL(pi_ref || pi))")
        if estimator not in KL_ESTIMATORS:
            raise ValueError(f"ReferenceKL.estimator={estimator!r}; valid: ['k2', 'k3']")
        self.beta, self.estimator = beta, estimator
        self._beta_now = beta
        self._kl_sums = StepSums("kl", "tokens")  # kl: summed over the valid tokens

    def prepare(self, ctx) -> None:
        self._beta_now = self.scheduled(self.beta, ctx.step)
        self.record("coef", self._beta_now)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert batch.ref_logp is not None, "the module must compute ref_logp when needs_reference is set"
        kl = kl_penalty(batch.logp, batch.ref_logp, self.estimator)
        self._kl_sums.add(kl=(kl * batch.mask).sum(), tokens=batch.mask.sum())
        beta = self._beta_now if batch.kl_scale is None else self._beta_now * batch.kl_scale.detach()
        return TokenShaping(penalty=beta * kl)

    def pop_metrics(self) -> dict[str, float]:
        """reg/<name>/kl: the token-mean KL over every update of the step and every rank (a
        collective: the module calls pop_metrics on every rank every step, even on a rank
        whose micro-batches were all fillers)."""
        total = self._kl_sums.pop()
        if total["tokens"] > 0:
            self.record("kl", total["kl"] / total["tokens"])
        if self.resetting:  # reg/<name>/resets: resets so far
            self.record("resets", float(self._resets))
        return super().pop_metrics()

    def charts(self) -> dict[str, list[str]]:
        out = super().charts()
        if self.resetting:
            out["Control"].append(f"reg/{re.escape(self.name)}/resets")
        return out

    # reference policy reset (ProRL) ------------------------------------------------------------
    @property
    def resetting(self) -> bool:
        """Whether this ReferenceKL ever resets its reference (`reset_every` or `reset_patience`)."""
        return self.reset_every is not None or self.reset_patience is not None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._module = pl_module
        if stage != "fit" or self.reset_patience is None:
            return
        if trainer.limit_val_batches == 0 or not getattr(getattr(trainer, "datamodule", None), "has_validation", True):
            raise ValueError(f"ReferenceKL.reset_patience={self.reset_patience}: resets when validation stalls, but "
                             "this run never validates (no held-out prompts, or trainer.limit_val_batches 0)")
        interval = getattr(trainer, "val_check_interval", None)
        useful = (trainer.max_steps - 1) // interval if isinstance(interval, int) and trainer.max_steps > 0 else None
        if useful is not None and useful <= self.reset_patience:  # a reset made due after the last step never happens
            rank_zero_warn(f"ReferenceKL.reset_patience={self.reset_patience}: this run validates {useful} time(s) "
                           f"before its last step (trainer.max_steps {trainer.max_steps}, val_check_interval "
                           f"{interval}), too few for {self.reset_patience + 1} validations, the first setting the "
                           "best: the reference is never reset")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.resetting:
            field = "reset_every" if self.reset_every is not None else "reset_patience"
            reference_reset.check_same_layout(pl_module._reference, pl_module.policy, f"ReferenceKL.{field}")
        # the checkpoint's reset reference, also when this run resets no more (resets turned off on
        # resume): the KL keeps pulling toward the reset reference, not back to the loaded model
        if self._pending_reference is not None:
            reference_reset.load_reference_weights(pl_module._reference, self._pending_reference)
            self._pending_reference = None

    def on_validation_end(self, trainer, pl_module) -> None:
        """With `reset_patience`: each fit validation's `reset_monitor` (the same on every rank:
        the evaluator's figures are global) goes to the stall watch."""
        if self._stall is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._stall.observe(float(trainer.callback_metrics[self.reset_monitor]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        periodic = self.reset_every is not None and step > 0 and step % self.reset_every == 0
        stalled = self._stall is not None and self._stall.due
        if not (periodic or stalled) or step == self._last_reset_step:
            return
        reference_reset.copy_policy_into(pl_module._reference, pl_module.policy)
        if self.reset_optimizer:
            reference_reset.clear_optimizer_state(trainer.optimizers)
        self._resets += 1
        self._last_reset_step = step
        if self._stall is not None:
            self._stall.done()

    def state_dict(self) -> dict:
        """Nothing without resets (set now or made earlier in the run); with them, the resets so
        far, the stall watch's state (`reset_patience`) and, once there was a reset, the
        reference's full weights, kept by every later checkpoint (the loaded
        model no longer gives them; under FSDP2 gathered into rank 0's CPU memory, a collective:
        Lightning asks every rank for its callbacks' state when it saves)."""
        if not self.resetting and not self._resets:  # a reset reference is kept after resets are turned off
            return {}
        out = {"resets": self._resets, "last_reset_step": self._last_reset_step}
        if self._stall is not None:
            out["stall"] = self._stall.state_dict()
        if self._resets and self._module is not None and self._module._reference is not None:
            out["reference"] = reference_reset.reference_weights(self._module._reference)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self._resets, self._last_reset_step = int(state_dict["resets"]), state_dict["last_reset_step"]
        self._pending_reference = state_dict.get("reference")
        if self._stall is not None and "stall" in state_dict:
            self._stall.load_state_dict(state_dict["stall"])


def check_reset_every(value, field: str = "reset_every", unit: str = "RL steps between reference resets") -> int | None:
    """`ReferenceKL.reset_every` (or `reset_patience`): null or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ReferenceKL.{field}={value!r}: must be an integer >= 1 ({unit}) or null (never reset)")
    return value
