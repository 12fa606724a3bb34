"""Multi-step arithmetic word problems: short generated stories with an exact integer answer.

A story follows one quantity of one item through `num_steps` operations, e.g.

    Maya has 14 marbles. She buys 6 more marbles. Then she splits the marbles into 4 equal
    groups and keeps only one group. How many marbles does Maya have now? Solve the problem step
    by step and put the final answer in \\boxed{}.

answer "5" ((14 + 6) / 4). Operations: add, subtract, multiply (by 2..`max_factor`) and exact
division (by 2..`max_factor`, only when it divides evenly); every intermediate value stays in
[0, `max_value`]. The prompt is plain text (the module applies the policy's chat template) and
asks for the answer in `\\boxed{}`, which `lit_covrl.rewards.MathVerifyReward` checks.

Every number in the story text is, in order, the starting quantity and then the operand of each
step (numbers are written in digits, and no other digit appears): `problem(rng)` returns the
structured `WordProblem` (start, steps, answer) so that tests can re-evaluate the arithmetic
independently of the generator, and `sample(rng)` is its `Example`.

Train / held-out split as in `ArithmeticTask`: a stable CRC-32 hash of the prompt text puts every
distinct prompt in exactly one split; `sample` rejects prompts of the other split, staying a pure
function of the rng state.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from lit_covrl.tasks.base import check_int, check_split, is_heldout, sample_split
from lit_covrl.types import Example

__all__ = ["OPERATIONS", "WordProblem", "WordProblemTask"]

OPERATIONS = ("add", "subtract", "multiply", "divide")

# (name, subject pronoun, object pronoun)
_PEOPLE = (
    ("Maya", "She", "her"), ("Liam", "He", "him"), ("Sofia", "She", "her"), ("Noah", "He", "him"),
    ("Aisha", "She", "her"), ("Kenji", "He", "him"), ("Elena", "She", "her"), ("Omar", "He", "him"),
    ("Priya", "She", "her"), ("Lucas", "He", "him"), ("Zoe", "She", "her"), ("Mateo", "He", "him"),
)
_FRIENDS = ("a friend", "a neighbour", "a classmate", "a cousin", "the teacher")
# (singular, plural)
_ITEMS = (
    ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("coin", "coins"),
    ("book", "books"), ("pencil", "pencils"), ("shell", "shells"), ("card", "cards"),
    ("cookie", "cookies"), ("stamp", "stamps"), ("toy car", "toy cars"), ("balloon", "balloons"),
)
# Templates per operation; {n} is the operand, {N} {P} {O} name / subject / object pronoun,
# {one} {many} the item's singular / plural, {items_n} "<n> <item(s)>", {more_n} "<n> more
# <item(s)>", {friend} / {Friend} someone.
_TEMPLATES = {
    "add": (
        "{P} buys {more_n}.",
        "{Friend} gives {O} {items_n}.",
        "{P} finds {more_n}.",
        "{P} wins {items_n} in a game.",
    ),
    "subtract": (
        "{P} gives {items_n} to {friend}.",
        "{P} loses {items_n}.",
        "{P} sells {items_n}.",
        "{P} uses {items_n} for a school project.",
    ),
    "multiply": (
        "Then the number of {many} {N} has becomes {n} times as large.",
        "{P} trades every {one} for {n} new {many}.",
    ),
    "divide": (
        "Then {p} splits the {many} into {n} equal groups and keeps only one group.",
        "{P} shares the {many} equally among {n} boxes and keeps only the {many} of one box.",
    ),
}
_QUESTION = (
    "How many {many} does {N} have now? Solve the problem step by step and put the final "
    "answer in \\boxed{{}}."
)


@dataclass(frozen=True)
class WordProblem:
    """One story: the start quantity, the (operation, operand) steps in order, and the answer."""

    prompt: str
    start: int
    steps: tuple[tuple[str, int], ...]
    answer: int

    @property
    def example(self) -> Example:
        return Example(prompt=self.prompt, answer=str(self.answer))


def _apply(op: str, value: int, n: int) -> int:
    if op == "add":
        return value + n
    if op == "subtract":
        return value - n
    if op == "multiply":
        return value * n
    return value // n  # divide: only drawn when exact


@dataclass
class WordProblemTask:
    """Seeded generator of multi-step arithmetic word problems.

    Args:
        num_steps: operations after the starting quantity (1..6).
        max_value: largest starting quantity and largest intermediate value (>= 10).
        max_factor: largest multiplier / divisor (2..9).
        ops: operations to draw from: "add", "subtract" and optionally "multiply", "divide"
            (an operation that is not possible at some point, e.g. an exact division of 7, is
            not drawn for that step).
        split: "train" (default), "test" (held-out prompts only) or "all".
        test_fraction: share of distinct prompts reserved for the held-out split (0 < f < 1).
    """

    num_steps: int = 2
    max_value: int = 50
    max_factor: int = 5
    ops: tuple[str, ...] = OPERATIONS
    split: str = "train"
    test_fraction: float = 0.1
    name: str = field(default="word_problems", init=False)

    def __post_init__(self) -> None:
        check_int("num_steps", self.num_steps, 1, 6)
        check_int("max_value", self.max_value, 10)
        check_int("max_factor", self.max_factor, 2, 9)
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        if not ops or any(op not in OPERATIONS for op in ops):
            raise ValueError(f"ops must be a non-empty subset of {OPERATIONS}, got {self.ops!r}")
        if "add" not in ops or "subtract" not in ops:
            # with both, some step is always possible (values stay in [1, max_value])
            raise ValueError(f"ops must include 'add' and 'subtract', got {self.ops!r}")
        self.ops = tuple(op for op in OPERATIONS if op in ops)  # canonical order, no duplicates
        check_split(self.split, self.test_fraction)

    # ------------------------------------------------------------------ generation
    def _operands(self, op: str, value: int) -> list[int]:
        """Every operand that keeps the value in [0, max_value] (divisions exact, results >= 1)."""
        top, factors = self.max_value, range(2, self.max_factor + 1)
        if op == "add":
            return list(range(1, top - value + 1))
        if op == "subtract":
            return list(range(1, value))  # leave at least one item: the story stays sensible
        if op == "multiply":
            return [k for k in factors if 0 < value * k <= top]
        return [k for k in factors if value >= k and value % k == 0]

    def problem(self, rng: random.Random) -> WordProblem:
        """One story of either split (no rejection); a pure function of the rng state."""
        name, subj, obj = rng.choice(_PEOPLE)
        one, many = rng.choice(_ITEMS)
        value = rng.randint(2, self.max_value)
        sentences = [f"{name} has {value} {many}."]
        start, steps = value, []
        for _ in range(self.num_steps):
            options = {op: self._operands(op, value) for op in self.ops}
            op = rng.choice([op for op in self.ops if options[op]])
            n = rng.choice(options[op])
            friend = rng.choice(_FRIENDS)
            items = one if n == 1 else many
            words = dict(
                n=n, N=name, P=subj, p=subj.lower(), O=obj, one=one, many=many, items_n=f"{n} {items}",
                more_n=f"{n} more {items}", friend=friend, Friend=friend[0].upper() + friend[1:],
            )
            sentences.append(rng.choice(_TEMPLATES[op]).format(**words))
            steps.append((op, n))
            value = _apply(op, value, n)
        sentences.append(_QUESTION.format(many=many, N=name))
        return WordProblem(" ".join(sentences), start, tuple(steps), value)

    def is_heldout(self, prompt: str) -> bool:
        """True if `prompt` belongs to the held-out split (stable across processes and runs)."""
        return is_heldout(prompt, self.test_fraction)

    def sample_problem(self, rng: random.Random) -> WordProblem:
        """One story of this task's split; a pure function of the rng state."""
        return sample_split(self.problem, lambda p: p.prompt, rng, self.split, self.test_fraction)

    def sample(self, rng: random.Random) -> Example:
        return self.sample_problem(rng).example
