"""Multi-step arithmetic with written steps: the built-in task whose answers need reasoning tokens.

A prompt is a left-to-right expression of `num_terms` operands, e.g. "12+34+5-7=". A correct
response writes every intermediate result, one step per operator, separated by ",", then "|" and
the final value:

    prompt   "12+34+5-7="
    response "12+34=46,46+5=51,51-7=44|44"

Step i is "<previous result><op><operand i+1>=<result>" (the first step starts from operand 1),
all in decimal with a leading "-" for negative numbers. The solution is therefore unique: with 4
terms of up to 2 digits a response is 19-39 characters (tokens with the character tokenizer, EOS
excluded), about 31 on average, so a policy must emit ~30 tokens of steps before the answer.

Verification (`verify`, `ReasoningReward`). The reference `Example.answer` is the full canonical
solution. `verify(prompt, response)` parses the response and reports whether it is well formed,
whether every written step is the canonical one (right operands copied from the prompt, right
arithmetic, each step starting from the previous result) and whether the final answer after "|"
is the exact value. The reward (1.0 / 0.0) requires BOTH the steps and the final answer to be
right -- which, the solution being unique, is exact string match with the reference, so the
default `ExactMatchReward` gives the same reward. We check the steps, not only the answer,
because an answer-only reward would pay a response that skips or garbles the steps and guesses,
and RL would then shorten the responses towards the 3-token answers this task exists to avoid.
`ReasoningReward(check_steps=False)`, for comparison, pays a well-formed response whose final
answer is right, without checking that its steps are the canonical ones (a malformed response,
e.g. the answer alone or steps with spaces, still scores 0).

Train / held-out split as in `ArithmeticTask` (both from `lit_covrl.tasks.expression`): a stable
CRC-32 hash of the prompt text puts every distinct prompt in exactly one split; `sample` rejects
prompts of the other split (a pure function of the rng state); `heldout(n, seed)` is a fixed
duplicate-free evaluation set.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import ClassVar

from lit_covrl.tasks.expression import ExpressionTask, format_expression
from lit_covrl.types import Example

__all__ = ["ReasoningTask", "ReasoningReward", "Verdict", "solution", "verify"]

STEP_SEP = ","
ANSWER_SEP = "|"
_NAT = r"(?:0|[1-9]\d*)"  # canonical decimal: no leading zeros
_NUM = r"(?:0|-?[1-9]\d*)"  # and no "-0"
_STEP = re.compile(rf"({_NUM})([+-])({_NAT})=({_NUM})")
_PROMPT = re.compile(r"\d+(?:[+-]\d+)+=")


def _terms(prompt: str) -> tuple[list[int], list[str]]:
    """Operands and operators of a prompt such as "12+34+5-7=" (ValueError if malformed)."""
    if not _PROMPT.fullmatch(prompt):
        raise ValueError(f"malformed prompt {prompt!r}: expected operands joined by + or -, then '='")
    parts = re.split(r"([+-])", prompt[:-1])
    return [int(p) for p in parts[0::2]], parts[1::2]


def solution(prompt: str) -> str:
    """The canonical response to `prompt`: its steps left to right, then "|" and the value."""
    terms, ops = _terms(prompt)
    value, steps = terms[0], []
    for op, term in zip(ops, terms[1:]):
        new = value + term if op == "+" else value - term
        steps.append(f"{value}{op}{term}={new}")
        value = new
    return STEP_SEP.join(steps) + ANSWER_SEP + str(value)


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: the response parses, its steps are the canonical ones, its answer is exact."""

    well_formed: bool
    steps_correct: bool
    answer_correct: bool

    @property
    def correct(self) -> bool:
        return self.well_formed and self.steps_correct and self.answer_correct


def _parse(response: str) -> tuple[list[tuple[int, str, int, int]], int] | None:
    """[(left, op, right, result)] and the final answer, or None if the response is malformed."""
    text = response.strip()
    if text.count(ANSWER_SEP) != 1:
        return None
    body, answer = text.split(ANSWER_SEP)
    if not re.fullmatch(_NUM, answer) or not body:
        return None
    steps = []
    for chunk in body.split(STEP_SEP):
        m = _STEP.fullmatch(chunk)
        if m is None:
            return None
        steps.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    return steps, int(answer)


def verify(prompt: str, response: str) -> Verdict:
    """Check a response against the prompt, independently of the generator.

    steps_correct: one step per operator of the prompt; step i uses the prompt's operator i and
    operand i+1, starts from operand 1 (i = 0) or the previous step's written result, and its
    written result is the exact value. answer_correct: the number after "|" is the expression's
    value. A malformed response (bad characters, no or several "|", a step that does not parse,
    a leading "+", leading zeros, "-0" or spaces inside) is wrong on all three counts, so a
    response is correct exactly when it equals `solution(prompt)` (up to surrounding whitespace).
    """
    terms, ops = _terms(prompt)
    value = terms[0]
    for op, term in zip(ops, terms[1:]):
        value = value + term if op == "+" else value - term
    parsed = _parse(response)
    if parsed is None:
        return Verdict(False, False, False)
    steps, answer = parsed
    ok = len(steps) == len(ops)
    previous = terms[0]
    for i, (left, op, right, result) in enumerate(steps):
        if not ok:
            break
        exact = left + right if op == "+" else left - right
        ok = left == previous and op == ops[i] and right == terms[i + 1] and result == exact
        previous = result
    return Verdict(True, ok, answer == value)


class ReasoningReward:
    """1.0 if the response is right, else 0.0; the reference `answer` is the canonical solution.

    Args:
        check_steps: require every written step to be right as well as the final answer (the
            default, see the module docstring); False pays any well-formed response whose final answer
            after "|" is right, whatever its steps compute (a malformed one still scores 0).
    """

    def __init__(self, check_steps: bool = True) -> None:
        self.check_steps = check_steps

    def __call__(self, completion: str, answer: str) -> float:
        ref = _parse(answer)
        if ref is None:
            raise ValueError(f"reference {answer!r} is not a solution of the reasoning task")
        got = _parse(completion)
        if got is None:
            return 0.0
        if self.check_steps:
            return 1.0 if got == ref else 0.0
        return 1.0 if got[1] == ref[1] else 0.0

    def final_answer(self, completion: str) -> str | None:
        """The outcome (outcome-based exploration): the value after "|" of a well-formed response
        (its steps aside), or None for a malformed one."""
        got = _parse(completion)
        return None if got is None else str(got[1])


@dataclass
class ReasoningTask(ExpressionTask):
    """Seeded generator of "a+b-c+d=" prompts whose reference answer is the written solution
    (settings, split and `heldout` from `lit_covrl.tasks.expression.ExpressionTask`).

    Args:
        digits: operands are drawn uniformly from [0, 10**digits - 1] (1..4).
        num_terms: operands per expression (4..8; 4 terms = 3 written steps, >= 19 characters).
        ops: operators to draw from, a non-empty subset of "+-".
        split: "train" (default), "test" (held-out prompts only) or "all".
        test_fraction: share of distinct prompts reserved for the held-out split (0 < f < 1).
    """

    DIGITS: ClassVar[tuple[int, int]] = (1, 4)
    NUM_TERMS: ClassVar[tuple[int, int]] = (4, 8)

    num_terms: int = 4
    ops: str = "+-"
    name: str = field(default="reasoning", init=False)

    @property
    def alphabet(self) -> str:
        """Every character of a prompt or a response (the model's character tokenizer)."""
        return "0123456789+-=" + STEP_SEP + ANSWER_SEP

    @property
    def max_response_chars(self) -> int:
        """An upper bound on the longest canonical response, in characters (tokens with the char
        tokenizer, EOS excluded): every result is given its widest sign and digits (4 terms of 2
        digits: 42; the longest that occurs is 39)."""
        big = 10**self.digits - 1
        width = lambda k: len(str(k * big)) + (1 if "-" in self.ops else 0)  # noqa: E731  |value| <= k * big
        steps = sum(width(k) + 1 + self.digits + 1 + width(k + 1) for k in range(1, self.num_terms))
        return steps + (self.num_terms - 2) + 1 + width(self.num_terms)

    def _draw(self, rng: random.Random) -> Example:
        prompt = format_expression(*self._draw_terms(rng))
        return Example(prompt=prompt, answer=solution(prompt))
