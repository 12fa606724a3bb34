"""Multi-digit integer arithmetic: the built-in verifiable task of the CPU quickstart.

A prompt is a plain-text expression followed by "=", the answer is its exact integer value in
decimal (a leading "-" when negative), e.g. prompt "47+85=" answer "132". No chat template: the
tiny character-level tokenizer (`lit_covrl.tokenizer`) has one token per character.

Train / held-out split (shared with the reasoning task in `lit_covrl.tasks.expression`). Every
distinct prompt belongs to exactly one split, decided by a stable hash of its text (CRC-32, not
Python's salted `hash`), so that held-out prompts never appear in training however many prompts
are drawn. `split="train"` samples only train prompts, `"test"` only held-out prompts (by
rejection: `sample` stays a pure function of the rng state), `"all"` both. `heldout(n, seed)`
gives a fixed, duplicate-free evaluation set.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

from lit_covrl.tasks.expression import OPS, ExpressionTask, format_expression
from lit_covrl.types import Example

__all__ = ["ArithmeticTask", "evaluate_expression"]


def evaluate_expression(expression: str) -> int:
    """Value of "a+b-c" (non-negative integer terms, + and -, left to right; a trailing "=" is
    ignored). Written independently of the generator so tests can check its answers."""
    text = expression.rstrip("=")
    total, sign, number = 0, 1, ""
    for ch in text + "+":
        if ch.isdigit():
            number += ch
        elif ch in OPS:
            if not number:
                raise ValueError(f"malformed expression {expression!r}")
            total += sign * int(number)
            sign, number = (1 if ch == "+" else -1), ""
        else:
            raise ValueError(f"unexpected character {ch!r} in {expression!r}")
    return total


@dataclass
class ArithmeticTask(ExpressionTask):
    """Seeded generator of "a+b=" style prompts (settings, split and `heldout` from `ExpressionTask`).

    Args:
        digits: operands are drawn uniformly from [0, 10**digits - 1] (1..9).
        num_terms: number of operands in the expression (2..6).
        ops: operators to draw from, a non-empty subset of "+-"; with "-" answers may be negative.
        split: "train" (default), "test" (held-out prompts only) or "all".
        test_fraction: share of distinct prompts reserved for the held-out split (0 < f < 1).
    """

    DIGITS: ClassVar[tuple[int, int]] = (1, 9)
    NUM_TERMS: ClassVar[tuple[int, int]] = (2, 6)

    num_terms: int = 2
    ops: str = "+"
    name: str = field(default="arithmetic", init=False)

    # ------------------------------------------------------------------ vocabulary helpers
    @property
    def alphabet(self) -> str:
        """Every character that can occur in a prompt or an answer."""
        return "0123456789" + self.ops + "="

    @property
    def max_answer_chars(self) -> int:
        """Longest possible answer, in characters (= tokens with the char tokenizer, EOS excluded)."""
        largest = self.num_terms * (10**self.digits - 1)
        return len(str(largest)) + (1 if "-" in self.ops else 0)

    # ------------------------------------------------------------------ sampling
    def _draw(self, rng: random.Random) -> Example:
        terms, ops = self._draw_terms(rng)
        value = terms[0]
        for op, term in zip(ops, terms[1:]):
            value = value + term if op == "+" else value - term
        return Example(prompt=format_expression(terms, ops), answer=str(value))
