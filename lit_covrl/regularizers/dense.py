"""Dense regularizers: they act on every valid token.

- EntropyBonus: loss_tok -= coef * H(pi(.|s_t)), the exact full-vocabulary entropy of the
  sampled and trained distribution softmax(z / temperature) (computed in row chunks by the module;
  the reference code's convention). Its stationary point on a bandit is
  softmax(r / coef), not the best arm: a persistent bias unless `coef` is annealed to 0.
- ReferenceKL: loss_tok += beta * s_t * KL_est(pi || pi_ref) with Schulman's k2 / k3 estimators on
  the sampled tokens (s_t = 1 unless a regularizer sets a per-token KL scale, `PolicyBatch.kl_scale`:
  Archer's high-entropy tokens) (as a loss, k2's expected gradient is that of KL(pi || pi_ref), k3's that of
  KL(pi_ref || pi); k1's is 0, so k1 is refused: `lit_covrl.algorithms.kl`); the module loads the
  reference model only when one exists.
"""
from __future__ import annotations

from lit_covrl.algorithms import KL_ESTIMATORS, kl_penalty
from lit_covrl.regularizers.base import Regularizer, StepSums, check_nonnegative
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.types import PolicyBatch, TokenShaping


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
        self, beta: float = 1e-3, estimator: str = "k3", schedule: Schedule | None = None, name: str | None = None
    ) -> None:
        """
        Args:
            beta: penalty coefficient.
            estimator: "k3" (GRPO's: unbiased value, gradient of KL(pi_ref || pi)) or "k2"
                (gradient of KL(pi || pi_ref)); "k1" is refused (zero expected gradient).
            schedule: annealing of `beta` over RL steps.
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(schedule, name)
        check_nonnegative("ReferenceKL.beta", beta)
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
        return super().pop_metrics()
