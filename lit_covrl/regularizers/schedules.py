"""Annealing schedules for regularizer coefficients.

value(initial, t), T = ``steps``, t clipped to [0, T]:

    constant:    initial
    linear:      initial + (final - initial) t / T
    cosine:      final + (initial - final) 0.5 (1 + cos(pi t / T))
    exponential: final + (initial - final) 0.5^(t / half_life)     (half_life default T / 5)

Every schedule except ``constant`` returns ``final`` once t >= T (for exponential this cuts the
remaining 1/32 of the gap at T with the default half-life). Annealing a covariance or entropy
coefficient to 0 makes the control asymptotically unbiased (Lei & Baehr 2026).
A plain dataclass, so jsonargparse reads it from YAML:
``schedule: {name: cosine, final: 0.0, steps: 500}``. ``steps: null`` (or no ``steps``) anneals over
the whole run: the regularizer fills in ``trainer.max_steps - 1`` when the fit starts
(``Schedule.over``), so that the first RL step (0) takes the initial value and the last one that
runs (``max_steps - 1``) takes ``final``: an annealed-to-0 control is off on the run's last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["SCHEDULES", "Schedule"]

SCHEDULES = ("constant", "linear", "cosine", "exponential")


@dataclass
class Schedule:
    """How a coefficient moves from its initial value to ``final`` over ``steps`` steps.

    name: one of SCHEDULES. final: value reached at ``steps`` (>= 0; ignored by constant).
    steps: annealing length in RL steps (rollouts, = trainer.global_step; an integer >= 1), or None,
    the default, for the whole run (resolved by `over` when the fit starts: ``final`` on its last step).
    half_life: exponential only, > 0, default steps / 5.
    """

    name: str = "constant"
    final: float = 0.0
    steps: int | None = None
    half_life: float | None = None

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name must be one of {list(SCHEDULES)}, got {self.name!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"schedule.steps must be an integer >= 1 or null (the whole run), got {self.steps!r}")
        if self.final < 0:
            raise ValueError(f"schedule.final must be >= 0, got {self.final}")
        if self.half_life is not None and self.half_life <= 0:
            raise ValueError(f"schedule.half_life must be > 0, got {self.half_life}")

    def over(self, max_steps: int | None) -> Schedule:
        """This schedule with ``steps: null`` resolved to a run of ``max_steps`` RL steps: ``steps =
        max_steps - 1`` (at least 1), so that the run's last step (``max_steps - 1``, 0-based) takes
        ``final``; unchanged when ``steps`` is set or the schedule is constant."""
        if self.steps is not None or self.name == "constant":
            return self
        if max_steps is None or max_steps < 1:
            raise ValueError(
                f"schedule.steps is null (anneal over the whole run) but trainer.max_steps is {max_steps}: "
                "set trainer.max_steps or give schedule.steps explicitly"
            )
        return replace(self, steps=max(int(max_steps) - 1, 1))

    def value(self, initial: float, step: int) -> float:
        """Coefficient at RL step ``step`` (0-based rollout index) starting from ``initial``."""
        if self.name == "constant":
            return float(initial)
        if self.steps is None:
            raise RuntimeError("schedule.steps is null and was not resolved: call Schedule.over(max_steps) first")
        if step >= self.steps:
            return float(self.final)
        t = max(step, 0)
        gap = initial - self.final
        if self.name == "linear":
            return initial - gap * t / self.steps
        if self.name == "cosine":
            return self.final + gap * 0.5 * (1.0 + math.cos(math.pi * t / self.steps))
        half_life = self.half_life if self.half_life is not None else self.steps / 5.0
        return self.final + gap * 0.5 ** (t / half_life)
