"""Multi-digit integer arithmetic: the built-in verifiable task of the CPU quickstart.

A prompt is a plain-text expression followed by "=", the answer is its exact integer value in
decimal (a leading "-" when negative), e.g. prompt "47+85=" answer "132". No chat template: the
tiny character-level tokenizer (`lit_covrl.tokenizer`) has one token per character.

Train / held-out split. Every distinct prompt belongs to exactly one split, decided by a stable
hash of its text (CRC-32, not Python's salted `hash`), so that held-out prompts never appear in
training however many prompts are drawn. `split="train"` samples only train prompts, `"test"`
only held-out prompts (by rejection: `sample` stays a pure function of the rng state), `"all"`
both. `heldout(n, seed)` gives a fixed, duplicate-free evaluation set.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from lit_covrl.tasks.base import check_split, is_heldout, sample_split
from lit_covrl.types import Example

__all__ = ["ArithmeticTask", "evaluate_expression"]

_OPS = "+-"


def evaluate_expression(expression: str) -> int:
    """Value of "a+b-c" (non-negative integer terms, + and -, left to right; a trailing "=" is
    ignored). Written independently of the generator so tests can check its answers."""
    text = expression.rstrip("=")
    total, sign, number = 0, 1, ""
    for ch in text + "+":
        if ch.isdigit():
            number += ch
        elif ch in _OPS:
            if not number:
                raise ValueError(f"malformed expression {expression!r}")
            total += sign * int(number)
            sign, number = (1 if ch == "+" else -1), ""
        else:
            raise ValueError(f"unexpected character {ch!r} in {expression!r}")
    return total


@dataclass
class ArithmeticTask:
    """Seeded generator of "a+b=" style prompts.

    Args:
        digits: operands are drawn uniformly from [0, 10**digits - 1] (1..9).
        num_terms: number of operands in the expression (2..6).
        ops: operators to draw from, a non-empty subset of "+-"; with "-" answers may be negative.
        split: "train" (default), "test" (held-out prompts only) or "all".
        test_fraction: share of distinct prompts reserved for the held-out split (0 < f < 1).
    """

    digits: int = 2
    num_terms: int = 2
    ops: str = "+"
    split: str = "train"
    test_fraction: float = 0.1
    name: str = field(default="arithmetic", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 9:
            raise ValueError(f"digits must be an int in [1, 9], got {self.digits!r}")
        if not isinstance(self.num_terms, int) or not 2 <= self.num_terms <= 6:
            raise ValueError(f"num_terms must be an int in [2, 6], got {self.num_terms!r}")
        if not isinstance(self.ops, str) or not self.ops or any(c not in _OPS for c in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {_OPS!r}, got {self.ops!r}")
        check_split(self.split, self.test_fraction)
        self.ops = "".join(sorted(set(self.ops), key=_OPS.index))  # canonical, no duplicates

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

    @property
    def max_prompt_chars(self) -> int:
        return self.num_terms * self.digits + (self.num_terms - 1) + 1

    # ------------------------------------------------------------------ sampling
    def is_heldout(self, prompt: str) -> bool:
        """True if `prompt` belongs to the held-out split (stable across processes and runs)."""
        return is_heldout(prompt, self.test_fraction)

    def _draw(self, rng: random.Random) -> Example:
        high = 10**self.digits - 1
        terms = [rng.randint(0, high) for _ in range(self.num_terms)]
        ops = [rng.choice(self.ops) for _ in range(self.num_terms - 1)]
        value = terms[0]
        prompt = str(terms[0])
        for op, term in zip(ops, terms[1:]):
            value = value + term if op == "+" else value - term
            prompt += op + str(term)
        return Example(prompt=prompt + "=", answer=str(value))

    def sample(self, rng: random.Random) -> Example:
        """One example of this task's split; a pure function of the rng state."""
        return sample_split(self._draw, lambda ex: ex.prompt, rng, self.split, self.test_fraction)

    def heldout(self, n: int, seed: int | str = 0) -> list[Example]:
        """A fixed evaluation set: `n` distinct held-out examples drawn with `random.Random(seed)`.

        Raises ValueError if the held-out split has fewer than `n` distinct prompts.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        test = ArithmeticTask(self.digits, self.num_terms, self.ops, "test", self.test_fraction)
        rng = random.Random(seed)
        seen: dict[str, Example] = {}
        for _ in range(50 * n + 1000):  # coupon collector margin; bounded if the split is small
            if len(seen) >= n:
                break
            ex = test.sample(rng)
            seen.setdefault(ex.prompt, ex)
        if len(seen) < n:
            raise ValueError(f"held-out split has fewer than n={n} distinct prompts")
        return list(seen.values())
