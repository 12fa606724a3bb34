"""MathVerifyReward.final_answer's written-text path (mutation review mut25): an answer the scoring
never parses (a huge power, a too complex one) is not parsed for the outcome either, and its outcome
is its text without whitespace, so that spacing never splits one outcome in two."""
from __future__ import annotations

from lit_covrl.rewards import MathVerifyReward


def _no_parse(reward: MathVerifyReward, calls: list) -> None:
    def parse(text, timeout):
        calls.append(text)
        raise AssertionError(f"parsed {text!r}")

    reward._parse = parse


def test_an_answer_scoring_never_parses_is_not_parsed_and_is_its_text_without_whitespace():
    """`10^{10^{7}}` (ten million digits) is refused unparsed by the scoring's guard (`_huge_power`),
    so final_answer takes its written text without parsing; written with spaces it is the same
    outcome. Kills mut25 R1 (whitespace kept) and R2 (the guard dropped: the parse is attempted,
    which math_verify bounds only by its timeout)."""
    reward, calls = MathVerifyReward(), []
    _no_parse(reward, calls)
    assert reward.final_answer("\\boxed{10^{10^{7}}}") == "10^{10^{7}}"
    assert reward.final_answer("\\boxed{10 ^ {10 ^ {7}}}") == "10^{10^{7}}"
    assert calls == []


def test_an_answer_whose_parse_fails_is_its_text_without_whitespace():
    """A parse that raises (math_verify's timeout, a sympy error) leaves the written text, without
    whitespace. Kills mut25 R1 on the exception path too."""
    reward, calls = MathVerifyReward(), []
    _no_parse(reward, calls)
    assert reward.final_answer("\\boxed{x + y}") == "x+y"
    assert calls == ["x + y"]
