"""Reward functions and fault-contained batch scoring."""
from __future__ import annotations

import logging
import math
import threading
import time

import pytest

from lit_covrl import rewards
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
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


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


def flaky(completion: str, answer: str):
    if completion == "raise":
        raise RuntimeError("boom")
    if completion == "hang":
        time.sleep(5)
        return 1.0
    return {"none": None, "nan": math.nan, "inf": math.inf, "str": "x", "list": [1], "bool": True}.get(completion, 0.5)


@pytest.mark.parametrize("timeout_s", [None, 2.0])
def test_score_completions_contains_failures(timeout_s, caplog):
    items = ["ok", "raise", "none", "nan", "inf", "str", "list", "bool", "ok"]
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        res = score_completions(flaky, items, ["a"] * len(items), timeout_s=timeout_s)
    assert res.rewards == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5]
    assert (res.errors, res.timeouts, res.invalid) == (1, 0, 5)
    assert "RuntimeError: boom" in caplog.text
    # the first five failures individually, then a summary of the whole batch
    assert caplog.text.count("item ") == 5
    assert "6 of 9 items scored 0.0 (errors=1, timeouts=0, invalid=5)" in caplog.text


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
