"""OutcomeExploration's start-up checks and its guards on the reward's `final_answer`: settings
refused naming the field, a final_answer that raises (no answer, counted, warned once) or returns
no str (refused, naming it), through the regulariser and the CLI."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lit_covrl.reward_set import RewardSet
from lit_covrl.regularizers import OutcomeExploration
from lit_covrl.rewards import ExactMatchReward
from tests.test_outcome import _ready, _step


class RaisingAnswer(ExactMatchReward):
    """Exact match whose final_answer reads an int and raises on anything else (a parse error)."""

    def final_answer(self, completion: str) -> str | None:
        return str(int(completion))


class FractionAnswer(ExactMatchReward):
    """Exact match whose final_answer returns a Fraction (not a str), None for text it cannot read."""

    def final_answer(self, completion: str):
        try:
            return Fraction(completion.strip())
        except (ValueError, ZeroDivisionError):
            return None


def test_a_final_answer_that_raises_is_no_answer_counted_and_warned_once(caplog):
    """Rows whose final_answer raises get no term and are not counted, as rows without an answer;
    reg/outcome/answer_errors counts them over the step's rounds; one warning names the method."""
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.5), RaisingAnswer())
    with caplog.at_level("WARNING", logger="lit_covrl"):
        reg.count_outcomes(0, ["x"], ["3", "x", "3", "y"], 4)
        reg.count_outcomes(0, ["z"], ["1", "1", "q", "1"], 4)
        got = reg.outcome_shift(0, ["x"], ["3", "x", "3", "y"], torch.zeros(4, dtype=torch.bool), 4)
    assert got.tolist() == pytest.approx([1 / math.sqrt(2) - 0.5 / 3, 0, 1 / math.sqrt(2) - 0.5 / 3, 0])
    assert reg.counts == {"x": {"3": 2}, "z": {"1": 3}}
    assert reg.pop_metrics()["reg/outcome/answer_errors"] == 3.0
    warned = [r for r in caplog.records if "RaisingAnswer.final_answer raised ValueError" in r.getMessage()]
    assert len(warned) == 1 and "counts as having no final answer" in warned[0].getMessage()
    _step(reg, 1, ["x"], ["3", "3", "3", "3"], torch.zeros(4, dtype=torch.bool), 4)
    assert reg.pop_metrics()["reg/outcome/answer_errors"] == 0.0


def test_a_final_answer_that_returns_no_str_is_refused_naming_it():
    """A Fraction key would be written into every checkpoint, which then fails to load with
    weights_only: refused at the first such answer, at start-up when the sample shows it."""
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.0), FractionAnswer())
    message = r"model\.reward's FractionAnswer\.final_answer returned Fraction Fraction\(1, 2\) .* must return a str or None"
    with pytest.raises(ValueError, match=message):
        reg.count_outcomes(0, ["x"], ["x", "1/2"], 2)
    with pytest.raises(ValueError, match=r"FractionAnswer\.final_answer returned Fraction"):
        reg.check_final_answers(["4"])
    reg.check_final_answers(["not a number"])  # None is an answer's absence: fine


def test_settings_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"OutcomeExploration\.historical=-1 is invalid: must be a finite number >= 0"):
        OutcomeExploration(historical=-1, batch=0.1)
    with pytest.raises(ValueError, match=r"OutcomeExploration\.batch=nan is invalid"):
        OutcomeExploration(historical=0.1, batch=float("nan"))
    with pytest.raises(ValueError, match=r"OutcomeExploration\.historical and \.batch are both 0"):
        OutcomeExploration(historical=0, batch=0.0)
    with pytest.raises(ValueError, match=r"OutcomeExploration\.apply='rewards' is invalid: must be one of"):
        OutcomeExploration(historical=1, batch=0, apply="rewards")
    with pytest.raises(ValueError, match=r"OutcomeExploration\.responses='wrong' is invalid"):
        OutcomeExploration(historical=1, batch=0, responses="wrong")
    reg = OutcomeExploration(historical=1, batch=0)
    with pytest.raises(ValueError, match=r"no reward of model\.reward \(.*\) of nonzero weight names one: give a "
                                         r"reward a `final_answer"):
        reg.check_rewards(RewardSet([lambda completion, answer: 0.0]), None)
    with pytest.raises(ValueError, match=r"\(exact_match\) of nonzero weight names one"):
        reg.check_rewards(RewardSet([ExactMatchReward()], weights=[0.0]), None)
    with pytest.raises(ValueError, match=r"apply='reward' adds non-binary terms .*model\.loss\.advantage='passk'"):
        reg.check_rewards(RewardSet([ExactMatchReward()]), "model.loss.advantage='passk'")
    OutcomeExploration(historical=1, batch=0, apply="advantage").check_rewards(
        RewardSet([ExactMatchReward()]), "model.loss.advantage='passk'")
    with pytest.raises(RuntimeError, match=r"check_rewards\(\) must run before the first step"):
        OutcomeExploration(historical=1, batch=0).count_outcomes(0, ["x"], ["1"], 1)
    counted = _ready(OutcomeExploration(historical=1, batch=0))
    counted.count_outcomes(0, ["x"], ["1"], 1)
    with pytest.raises(RuntimeError, match=r"count_outcomes\(\) must count step 1's responses first"):
        counted.outcome_shift(1, ["x"], ["1"], torch.zeros(1, dtype=torch.bool), 1)


def test_the_outcome_comes_from_the_first_reward_of_nonzero_weight():
    """ExactMatch at weight 0 beside MathVerify: the outcome is MathVerify's boxed answer, so four
    solutions ending in \\boxed{4} repeat one answer (each -0.5 x 3/3), not four distinct completions."""
    from lit_covrl.rewards import MathVerifyReward

    rewards = RewardSet([ExactMatchReward(), MathVerifyReward()], weights=[0.0, 1.0])
    assert rewards.answer_namer().__self__ is rewards.rewards[1]
    reg = OutcomeExploration(historical=0.0, batch=0.5)
    reg.check_rewards(rewards, None)
    texts = [f"{a}+{b}=4 so \\boxed{{4}}" for a, b in ((1, 3), (2, 2), (3, 1), (0, 4))]
    assert _step(reg, 0, ["x"], texts, torch.zeros(4, dtype=torch.bool), 4).tolist() == [-0.5] * 4
    both = RewardSet([ExactMatchReward(), MathVerifyReward()])  # weights 1 and 1: the first
    assert both.answer_namer().__self__ is both.rewards[0]


@pytest.mark.parametrize("apply,responses", [("reward", "all"), ("advantage", "correct"), ("reward", "incorrect")])
def test_stacked_with_a_control_that_reads_a_positive_advantage_as_correct_is_refused(apply, responses):
    """SimKO and WeightedReinforce take A > 0 for verified correct; the outcome terms give wrong answers
    A > 0 (and repeated right ones A < 0) whatever apply and responses say: refused, naming both."""
    from lit_covrl.regularizers import SimKO, WeightedReinforce
    from lit_covrl.regularizers.base import check_stack

    for other in (SimKO(), WeightedReinforce()):
        reg = OutcomeExploration(historical=0.5, batch=0.5, apply=apply, responses=responses)
        with pytest.raises(ValueError, match=rf"OutcomeExploration \('outcome'\) and {type(other).__name__} "
                                             rf"\('{other.name}'\) cannot be stacked: .* reads A > 0 as a verified"):
            check_stack([other, reg])
        check_stack([other])
    check_stack([OutcomeExploration(historical=0.5, batch=0.5)])


@pytest.mark.parametrize("flags,message", [
    (("--trainer.callbacks.init_args.historical", "-1"),
     "OutcomeExploration.historical=-1.0 is invalid: must be a finite number >= 0"),
    (("--model.loss.advantage", "passk", "--model.loss.pass_k", "2"),
     "OutcomeExploration.apply='reward' adds non-binary terms to the rewards"),
    (("--model.reward", "tests.test_module.HasOneReward"), "needs each response's final answer"),
    (("--model.reward", "tests.test_outcome_checks.FractionAnswer"), "FractionAnswer.final_answer returned Fraction"),
])
def test_bad_settings_are_refused_at_start_up(tmp_path, capsys, flags, message):
    from tests.helpers import cli_start_up_error

    assert message in cli_start_up_error(tmp_path, capsys, "configs/cpu/outcome.yaml", *flags)
