"""What the arithmetic and reasoning tasks share: left-to-right integer expressions "a+b-c=".

`ExpressionTask` is the base of `ArithmeticTask` (answer: the value) and `ReasoningTask` (answer:
the written steps, then the value). It holds their settings (operand digits, number of operands,
operators, split), validates them, draws an expression's operands and operators in one fixed RNG
order (all operands, then all operators), and gives both tasks the same train / held-out split: a
stable CRC-32 hash of the prompt text puts every distinct prompt in exactly one split (see
`lit_covrl.tasks.base`); `sample` rejects prompts of the other split, staying a pure function of
the rng state; `heldout(n, seed)` is a fixed, duplicate-free evaluation set.

A subclass sets its bounds (`DIGITS`, `NUM_TERMS`), its `name` and defaults, and `_draw(rng)`,
which turns `_draw_terms(rng)` into an `Example`.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import ClassVar

from lit_covrl.tasks.base import check_int, check_split, is_heldout, sample_split
from lit_covrl.types import Example

__all__ = ["OPS", "ExpressionTask", "format_expression"]

OPS = "+-"


def format_expression(terms: list[int], ops: list[str]) -> str:
    """The prompt of operands `terms` joined by `ops`, then "=", e.g. ([12, 34, 5], "+-") -> "12+34-5="."""
    return str(terms[0]) + "".join(op + str(t) for op, t in zip(ops, terms[1:])) + "="


@dataclass
class ExpressionTask:
    """Settings, validation, RNG draw and split of an expression task (see the module docstring).

    Args:
        digits: operands are drawn uniformly from [0, 10**digits - 1], digits within `DIGITS`.
        num_terms: operands per expression, within `NUM_TERMS`.
        ops: operators to draw from, a non-empty subset of "+-" (kept in canonical order).
        split: "train" (default), "test" (held-out prompts only) or "all".
        test_fraction: share of distinct prompts reserved for the held-out split (0 < f < 1).
    """

    DIGITS: ClassVar[tuple[int, int]]  # inclusive bounds, set by each subclass
    NUM_TERMS: ClassVar[tuple[int, int]]

    digits: int = 2
    num_terms: int = 2
    ops: str = "+"
    split: str = "train"
    test_fraction: float = 0.1
    name: str = field(default="expression", init=False)

    def __post_init__(self) -> None:
        check_int("digits", self.digits, *self.DIGITS)
        check_int("num_terms", self.num_terms, *self.NUM_TERMS)
        if not isinstance(self.ops, str) or not self.ops or any(c not in OPS for c in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {OPS!r}, got {self.ops!r}")
        check_split(self.split, self.test_fraction)
        self.ops = "".join(sorted(set(self.ops), key=OPS.index))  # canonical, no duplicates

    @property
    def max_prompt_chars(self) -> int:
        return self.num_terms * self.digits + (self.num_terms - 1) + 1

    def is_heldout(self, prompt: str) -> bool:
        """True if `prompt` belongs to the held-out split (stable across processes and runs)."""
        return is_heldout(prompt, self.test_fraction)

    def _draw_terms(self, rng: random.Random) -> tuple[list[int], list[str]]:
        """Operands, then operators: this draw order fixes every prompt of a seed, keep it."""
        high = 10**self.digits - 1
        terms = [rng.randint(0, high) for _ in range(self.num_terms)]
        ops = [rng.choice(self.ops) for _ in range(self.num_terms - 1)]
        return terms, ops

    def _draw(self, rng: random.Random) -> Example:
        """One example of either split (no rejection); a subclass builds its answer."""
        raise NotImplementedError

    def sample(self, rng: random.Random) -> Example:
        """One example of this task's split; a pure function of the rng state."""
        return sample_split(self._draw, lambda ex: ex.prompt, rng, self.split, self.test_fraction)

    def heldout(self, n: int, seed: int | str = 0) -> list[Example]:
        """A fixed evaluation set: `n` distinct held-out examples drawn with `random.Random(seed)`.

        Raises ValueError if the held-out split has fewer than `n` distinct prompts.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        test = dataclasses.replace(self, split="test")
        rng = random.Random(seed)
        seen: dict[str, Example] = {}
        for _ in range(50 * n + 1000):  # coupon collector margin; bounded if the split is small
            if len(seen) >= n:
                break
            ex = test.sample(rng)
            seen.setdefault(ex.prompt, ex)
        if len(seen) < n:
            raise ValueError(f"the held-out split has only {len(seen)} distinct prompts (test_fraction="
                             f"{self.test_fraction}), fewer than n={n}: ask for fewer or raise test_fraction")
        return list(seen.values())
