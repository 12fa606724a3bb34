"""Reward functions and fault-contained batch scoring."""
from __future__ import annotations

import logging
import math
import threading
import time

import pytest

from lit_covrl import answers, rewards
from lit_covrl.rewards import (
    REWARDS,
    ExactMatchReward,
    MathVerifyReward,
    RewardFunction,
    ScoreResult,
    extract_answer,
    get_reward,
    score_completions,
)


@pytest.fixture(autouse=True)
def fresh_warning_budget(monkeypatch):
    monkeypatch.setattr(rewards, "_item_warnings_emitted", 0)


def test_exact_match():
    r = ExactMatchReward()
    assert isinstance(r, RewardFunction)
    assert r("  42\n", "42") == 1.0
    assert r("42.0", "42") == 0.0
    assert r("", "") == 1.0


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{1} then \\boxed{ {a}+{b} }", "{a}+{b}"),  # the last one wins
        ("\\boxed{2} and an unclosed \\boxed{3", "2"),  # unbalanced is skipped
        ("\\boxed {7}", "7"),
        ("we get 3 apples, then 12.5", "12.5"),  # fallback: last number
        ("1,000 and -4", "-4"),
        ("5-3", "3"),  # a binary minus is not a sign
        ("half is 1 / 2", "1/2"),
        ("no digits here", None),
        # without \\boxed: numbers inside LaTeX are not read on their own; the last math span wins
        ("So the probability is $\\frac{1}{4}$.", "\\frac{1}{4}"),
        ("The result is $2^{10}$.", "2^{10}"),
        ("It is \\(\\sqrt{16}\\)", "\\sqrt{16}"),
        ("$$x = 5$$", "x = 5"),
        ("\\[ 3 \\] and then \\[ \\frac{7}{2} \\]", "\\frac{7}{2}"),
        ("We compute $2+3$ and get 5.", "5"),  # a number after the last span is later
        ("It costs \\$5 and \\$6", "6"),  # an escaped dollar is not a math delimiter
        ("$ $ then 7", "7"),  # a blank span is no answer
        ("So x = \u22125.", "-5"),  # Unicode minus sign
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("\\boxed{\\boxed{5}}", "5"),  # nested: the inner one starts last
        ("\\boxed{a{b}c} \\boxed{x{", "a{b}c"),  # the unbalanced last one is skipped
        ("\\boxed{1} \\boxed{2 \\boxed{3}", "3"),  # `\\boxed{2` never closes
        ("} \\boxed{4} }", "4"),  # stray closing braces
        ("answer is \\boxed{5}. (I put the final answer in \\boxed{}.)", "5"),  # empty skipped
        ("\\boxed{5} \\boxed{ }", "5"),
        ("\\boxed{}", None),
        ("\\boxed{" * 20000 + "\\boxed{9}", "9"),  # many unclosed: one linear pass
        ("\\boxed{8}" + "\\boxed{" * 20000, "8"),
    ],
)
def test_last_boxed(completion, expected):
    assert answers._last_boxed(completion) == expected


class CountingStr(str):
    """A string that counts the characters read by indexing or slicing it."""

    reads = 0

    def __getitem__(self, key):
        out = super().__getitem__(key)
        CountingStr.reads += len(out)
        return out


def test_last_boxed_reads_each_character_a_bounded_number_of_times(monkeypatch):
    # a degenerate policy repeating an unclosed \boxed{: rescanning the rest of the text for every
    # one of them made this quadratic (4000 repeats took 8.7 s); count the reads, not the time
    text = CountingStr("\\boxed{8}" + "\\boxed{" * 300)
    monkeypatch.setattr(CountingStr, "reads", 0)
    assert answers._last_boxed(text) == "8"
    assert CountingStr.reads <= 2 * len(text)


@pytest.mark.parametrize(
    "completion,answer",
    [
        ("The answer is \\boxed{132}.", "132"),
        ("\\boxed{\\frac{1}{2}}", "1/2"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{2}{4}}", "0.5"),
        ("it is 1/2", "0.5"),
        ("\\boxed{x^{2}+1}", "1+x^2"),
        ("total 1,000", "1000"),
        ("\\boxed{\\sqrt{4}}", "2"),
        ("The total is \\boxed{\\$18}.", "18"),  # `\\$` is a dollar sign, not a math delimiter
        ("The total is \\boxed{18}.", "\\$18"),
        ("\\boxed{32348}", "\\$32,\\!348"),
        ("So the probability is $\\frac{3}{4}$.", "3/4"),
        ("The result is $2^{10}$.", "1024"),
        ("So x = \u22125.", "-5"),
        ("answer is \\boxed{5}. (I put the final answer in \\boxed{}.)", "5"),
    ],
)
def test_math_verify_equivalent(completion, answer):
    assert MathVerifyReward()(completion, answer) == 1.0


@pytest.mark.parametrize(
    "completion,answer",
    [
        ("\\boxed{133}", "132"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{1} then \\boxed{2}", "1"),  # only the last boxed answer counts
        ("I don't know", "7"),
        ("\\boxed{-2}", "2"),
        ("So the probability is $\\frac{1}{4}$.", "4"),  # not the 4 of the LaTeX
        ("The result is $2^{10}$.", "10"),
        ("It is $\\sqrt{16}$", "16"),
        ("So x = \u22125.", "5"),
    ],
)
def test_math_verify_not_equivalent(completion, answer):
    assert MathVerifyReward()(completion, answer) == 0.0


def test_math_verify_off_main_thread():
    # math_verify's SIGALRM timeout raises off the main thread; we must disable it there.
    out = []
    t = threading.Thread(target=lambda: out.append(MathVerifyReward()("\\boxed{\\frac{1}{2}}", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]
    res = score_completions(MathVerifyReward(), ["\\boxed{3}", "\\boxed{4}"], ["3", "3"], timeout_s=5.0)
    assert res == ScoreResult([1.0, 0.0], 0, 0, 0)


@pytest.mark.parametrize(
    "text,huge",
    [
        ("x^2+y^2", False),
        ("2^{10}", False),
        ("2^{2024}", False),
        ("e^{i\\pi}", False),
        ("10^{-3}", False),
        ("(x^2)+1", False),
        ("2^", False),
        ("10^{10^{7}}", True),  # a power in an exponent: 10^7 digits
        ("2^(10^7)", True),
        ("10^{-10^{7}}", True),
        ("10^10^7", True),  # a tower
        ("10**10**7", True),
        ("2^{10}^{7}", True),
        ("(10^{999})^{999}", True),  # a power of a power
        ("\\left(10^{999}\\right) ^ {999}", True),
        ("10^{123456}", True),  # more than 10^5 digits
        ("10^123456", True),
        ("2^{400000}", True),
        ("10^{10{,}000{,}000}", True),
        ("\\sqrt{2}^{10^{9}}", True),
        ("\\frac{1}{2}^{10^{7}}", True),  # 1 / 2^(10^7): as many digits
        ("2^{100!}", True),
        ("x^{10^{10^7}}", True),  # a huge numeric power inside a symbolic one
        # small values, however written (they were refused by their shape): sympy computes them at once
        ("2^{3^2}", False),
        ("(2^3)^2", False),
        ("2^{3}^{4}", False),
        ("(10^{2})^{3}", False),
        ("2^{2^{2^{2^{2}}}}", True),  # 2^65536: 19,729 digits, but an exponent that is a power above 2^10
        ("2^{2^{11}}", True),  # math_verify took 7 s to compare it with 2^{2048}
        ("2^{10^{4}}", True),  # ... and over a minute with 2^{10000} (the flat 2^{10000} is fast)
        ("2^{2^{10}}", False),
        ("2^{10000}", False),
        ("10^{-10000}", False),
        ("10^{99999}", False),
        ("(-1)^{10001}", False),
        ("1^{10^{99}}", False),  # a base of 1 stays 1
        ("x^{2^{3}}", False),
        ("e^{2^{3}}", False),
        ("e^{10^7}", False),  # symbolic: exp(10000000)
        # symbolic powers stay symbolic in sympy: ordinary answers, never refused
        ("e^{x^2}", False),
        ("e^{-x^2/2}", False),
        ("2x e^{x^2}", False),
        ("(x^2+1)^2", False),
        ("\\left(x^{2}+1\\right)^{3}", False),
        ("(1+x^2)^{3/2}", False),
        ("\\frac{1}{(x^2+1)^2}", False),
        ("2^{2^n}", False),
        ("e^{0.12345}", False),  # digits after a decimal point are not an integer exponent
        ("(\\sin x)^2", False),
    ],
)
def test_huge_power(text, huge):
    assert answers._huge_power(text) is huge


def test_a_nested_power_written_like_the_reference_is_checked():
    """The nested-exponent rule refused `2^{2^{11}}` even against the reference `2^{2^{11}}`, which
    compares at once; against a flat `2^{2048}` it stays refused (math_verify took 7 s)."""
    assert answers._huge_power("2^{2^{11}}") and answers._huge_power("2^{2^{11}}", "2^{2048}")
    assert not answers._huge_power("2^{2^{11}}", "2^{2^{11}}")
    assert MathVerifyReward()("\\boxed{2^{2^{11}}}", "2^{2^{11}}") == 1.0
    assert answers._huge_power("10^{10^{7}}", "10^{10^{7}}")  # too large to compute, whatever the reference


def test_math_verify_refuses_huge_powers_unparsed(monkeypatch):
    """sympy would compute 10^(10^7) in C, holding the GIL, past any time limit: never parsed."""
    import math_verify

    def no_parse(*args, **kwargs):
        raise AssertionError("math_verify.parse called")

    r = MathVerifyReward()
    monkeypatch.setattr(math_verify, "parse", no_parse)
    for completion in ["The answer is \\boxed{10^{10^{7}}}", "so $10^10^7$", "\\boxed{(10^{999})^{999}}"]:
        assert r(completion, "5") == 0.0


@pytest.mark.parametrize("completion,answer", [
    ("\\boxed{2^{3^2}}", "512"), ("\\boxed{(2^3)^2}", "64"), ("\\boxed{x^{2^{3}}}", "x^8"),
    ("\\boxed{(-1)^{10001}}", "-1"), ("\\boxed{2^{10000}}", "2^{10000}"), ("\\boxed{(10^{2})^{3}}", "10^6"),
])
def test_math_verify_checks_small_powers_of_powers(completion, answer):
    # the power guard refused these by their shape (a power in an exponent or in a base, an
    # exponent of more than 4 digits) and scored the correct answers 0
    assert MathVerifyReward()(completion, answer) == 1.0


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\frac{\\sqrt{3}}{2}", (2, 0)),
        ("\\left(\\frac{1}{2}, \\frac{\\sqrt{3}}{2}\\right)", (3, 0)),
        ("\\sin(\\cos(x))", (2, 2)),
        ("\\sin \\cos x", (0, 2)),
        ("\\sin x \\cos x", (0, 2)),  # math_verify reads `\\sin x \\cdot \\cos x` as sin(x cos(x))
        ("\\sin x + \\cos x", (0, 1)),
        ("\\sin(x)\\cos(x)", (1, 1)),
        ("\\sin -\\sin -\\sin x", (0, 3)),  # a sign right after a function ends nothing
        ("\\sin^2 -x + \\sin y", (0, 1)),
        ("\\log_2(\\log_3(\\log_4 x))", (2, 3)),
        ("\\sin^{2}\\left(\\cos^{2}(x)\\right)", (2, 2)),
        ("e^{x^2}", (1, 1)),
        ("e^{e^{e^{e}}}", (3, 3)),
        ("\\sin(" * 10 + "1" + ")" * 10, (10, 10)),
        ("{" * 20 + "5" + "}" * 20, (20, 0)),
        ("x \\in [1, 10)", (0, 0)),  # unmatched brackets do not count
    ],
)
def test_nesting(text, expected):
    assert answers._nesting(text) == expected


# Final answers of GSM8K / MATH-style problems: never refused by the complexity guard.
REALISTIC = [
    "18", "-\\frac{3}{4}", "\\frac{\\sqrt{3}}{2}", "\\left(\\frac{1}{2}, \\frac{\\sqrt{3}}{2}\\right)",
    "\\sqrt{2+\\sqrt{2+\\sqrt{2+\\sqrt{2}}}}", "\\dfrac{1}{1+\\dfrac{1}{1+\\dfrac{1}{2}}}", "\\sin(\\arctan(2))",
    "\\log_2(\\log_3 x)", "e^{-x^2/2}", "2\\sin x\\cos x", "\\frac{1}{2}\\left(\\sqrt{\\frac{a}{b}}\\right)^{2}",
    "(-\\infty, -2] \\cup [3, \\infty)", "\\text{(C)}", "x^4-4x^3+6x^2-4x+1", "\\$32,\\!348",
    "\\begin{pmatrix} \\frac{1}{\\sqrt{2}} & -\\frac{1}{\\sqrt{2}} \\\\ \\frac{1}{\\sqrt{2}} & \\frac{1}{\\sqrt{2}} "
    "\\end{pmatrix}",
    "\\{" + ", ".join(str(k) for k in range(1, 51)) + "\\}",
]


@pytest.mark.parametrize("answer", REALISTIC)
def test_realistic_answers_pass_the_complexity_guard(answer):
    assert not answers._too_complex(answer)


def test_realistic_answers_still_verify():
    r = MathVerifyReward()
    for answer in ["\\frac{\\sqrt{3}}{2}", "\\sqrt{2+\\sqrt{2+\\sqrt{2+\\sqrt{2}}}}", "\\log_2(\\log_3 x)",
                   REALISTIC[-1]]:
        assert r(f"so \\boxed{{{answer}}}", answer) == 1.0, answer
    assert r("\\boxed{\\dfrac{1}{1+\\dfrac{1}{1+\\dfrac{1}{2}}}}", "\\frac{3}{5}") == 1.0


NESTED = [  # math_verify took seconds to minutes on each (its time limit is off on a worker thread)
    "\\boxed{" + "\\sin(" * 10 + "1" + ")" * 10 + "}",
    "\\boxed{" + "{" * 20 + "5" + "}" * 20 + "}",
    "\\boxed{" + "(" * 50 + "5" + ")" * 50 + "}",
    "\\boxed{\\sin \\sin \\sin \\sin \\sin \\sin \\sin 1}",
    "\\boxed{\\sin(\\cos(\\tan(\\sin(\\cos(\\tan(1))))))}",
    "\\boxed{e^{e^{e^{e^{e}}}}}",
    "\\boxed{(" + ",".join(str(k) for k in range(1000)) + ")}",  # 3.9k characters: 8 s
    "\\boxed{\\{" + ",".join(str(k) for k in range(1000)) + "\\}}",
]


def test_math_verify_refuses_deeply_nested_or_long_answers_unparsed(monkeypatch):
    import math_verify

    def no_parse(*args, **kwargs):
        raise AssertionError("math_verify.parse called")

    r = MathVerifyReward()
    monkeypatch.setattr(math_verify, "parse", no_parse)
    for completion in NESTED:
        assert r(completion, "5") == 0.0


def test_complexity_limits_rise_to_the_reference():
    deep = "\\sin(\\cos(\\tan(\\sin(\\cos(x)))))"
    long = "+".join(f"x_{{{k}}}" for k in range(60))
    assert answers._too_complex(deep) and answers._too_complex(long)
    assert not answers._too_complex(deep, deep) and not answers._too_complex(long, long)
    assert answers._too_complex(deep, "\\sin(\\cos(\\tan(\\sin(x))))")
    tower = "e^{e^{e^{e^{e}}}}"  # against a number, math_verify ran for minutes
    assert answers._too_complex(tower) and not answers._too_complex(tower, tower)
    assert not answers._too_complex("e^{e^{e^{e}}}")


@pytest.mark.parametrize("answer,reference", [
    ("\\sin x \\cos x \\cos 2x \\cos 4x", "\\frac{1}{8}\\sin 8x"),  # four functions side by side: 4 deep
    ("(" + ", ".join(str(k) for k in range(83)) + ")", "(" + ",".join(str(k) for k in range(83)) + ")"),
])
def test_correct_answers_near_the_limits_are_checked(answer, reference):
    """A product of four functions (0.3 s in math_verify) was refused at a depth limit of 3; a tuple
    of 83 numbers written with ', ' (323 characters, 241 without the spaces) by its length."""
    assert not answers._too_complex(answer, reference)
    assert MathVerifyReward()(f"\\boxed{{{answer}}}", reference) == 1.0


def test_nested_answers_no_longer_stop_the_run():
    # 9 calls of minutes each outlived the 2 s limit and stopped the run ("Fix the reward where it hangs")
    from lit_covrl.reward_set import RewardSet

    total, _, res = RewardSet([MathVerifyReward()]).score(NESTED[:1] * 9 + ["\\boxed{5}"], ["5"] * 10, timeout_s=2.0)
    assert total == [0.0] * 9 + [1.0]
    assert res.failures == 0


def flaky(completion: str, answer: str):
    if completion == "raise":
        raise RuntimeError("boom")
    if completion == "hang":
        time.sleep(5)
        return 1.0
    values = {"none": None, "nan": math.nan, "inf": math.inf, "str": "x", "list": [1], "bool": True,
              "overflow": 10**400, "float32": 1e39, "big": -3e38, "huge_int": 10**5000}
    return values.get(completion, 0.5)


@pytest.mark.parametrize("timeout_s", [None, 2.0])
def test_score_completions_contains_failures(timeout_s, caplog):
    # 10**400: float() raises OverflowError; 1e39: inf in the float32 reward tensor; 10**5000: its
    # repr() raises too; -3e38 is within float32's range
    items = ["ok", "raise", "none", "nan", "inf", "str", "list", "bool",
             "overflow", "float32", "big", "huge_int", "ok"]
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        res = score_completions(flaky, items, ["a"] * len(items), timeout_s=timeout_s)
    assert res.rewards == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -3e38, 0.0, 0.5]
    assert (res.errors, res.timeouts, res.invalid) == (1, 0, 8)
    assert "RuntimeError: boom" in caplog.text
    # the first five failures individually, then a summary of the whole batch
    assert caplog.text.count("item ") == 5
    assert "9 of 13 items scored 0.0 (errors=1, timeouts=0, invalid=8)" in caplog.text


def test_score_completions_hang_times_out_and_goes_on():
    t0 = time.monotonic()
    res = score_completions(flaky, ["ok", "hang", "raise", "ok"], ["a"] * 4, timeout_s=0.2)
    elapsed = time.monotonic() - t0
    assert res.rewards == [0.5, 0.0, 0.0, 0.5]
    assert (res.errors, res.timeouts, res.invalid) == (1, 1, 0)
    assert elapsed < 3.0  # the 5 s sleep was not waited for
    hung = [t for t in threading.enumerate() if t.name == "lit_covrl-reward" and t.is_alive()]
    assert hung and all(t.daemon for t in hung)  # abandoned, but cannot block interpreter exit


def test_score_completions_validates_inputs():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score_completions(ExactMatchReward(), ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="timeout_s"):
        score_completions(ExactMatchReward(), ["a"], ["a"], timeout_s=0)
    assert score_completions(ExactMatchReward(), [], []) == ScoreResult([], 0, 0, 0)


def test_registry():
    assert set(REWARDS) == {"exact_match", "math_verify"}
    assert isinstance(get_reward("exact_match"), ExactMatchReward)
    assert get_reward("math_verify", timeout_s=1.0).timeout_s == 1.0
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*\['exact_match', 'math_verify'\]"):
        get_reward("nope")


def test_process_exits_despite_hung_reward():
    import subprocess
    import sys

    code = (
        "import time\n"
        "from lit_covrl.rewards import score_completions\n"
        "r = score_completions(lambda c, a: time.sleep(60), ['x'], ['y'], timeout_s=0.1)\n"
        "print(r.timeouts)\n"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert time.monotonic() - t0 < 20  # far less than the 60 s the reward would take


def test_too_many_timed_out_calls_still_running_stop_the_run_naming_the_reward(monkeypatch):
    """A reward that hangs in Python code on wrong answers: each timed-out call's thread keeps running
    (Python cannot stop it) and competes for the GIL; a review measured the update going 2 s -> 140 s
    in 3 RL steps, with no word. Past rewards.MAX_STUCK_CALLS still-running calls it stops, naming
    the reward; calls that end by themselves are not counted."""
    import threading

    monkeypatch.setattr(rewards, "_stuck", [])  # not the calls other tests left running (they count in a run)
    release = threading.Event()

    def spins_if_wrong(completion, answer):
        while completion != answer and not release.is_set():
            sum(range(100))  # busy in Python, holding the GIL in turns
        return 1.0

    try:
        n = rewards.MAX_STUCK_CALLS + 1
        with pytest.raises(RuntimeError, match=r"9 reward calls that outlived model.reward_timeout_s=0.02 .* by reward: spins_if_wrong \(9\)"):
            rewards.score_completions(spins_if_wrong, ["x"] * n, ["y"] * n, timeout_s=0.02)
    finally:
        release.set()  # let the abandoned threads finish
    time.sleep(0.2)
    # finished threads no longer count: the same number of short timeouts is fine now
    assert rewards.score_completions(lambda c, a: time.sleep(0.05) or 1.0, ["x"] * 3, ["x"] * 3, timeout_s=0.01).timeouts == 3
