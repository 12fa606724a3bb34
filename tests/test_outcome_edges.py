"""OutcomeExploration edges (mutation review mut25): the redone step after a mid-step restore starts
its own part of the counts afresh once the aborted attempt's answers are taken back out (so an
answer of the aborted attempt is not subtracted twice), and the start-up check of final_answer
tries the empty completion."""
from __future__ import annotations

import pytest
import torch

from lit_covrl.regularizers import OutcomeExploration
from lit_covrl.rewards import ExactMatchReward
from tests.test_outcome import _ready, _saved, _step


def test_the_redone_step_counts_its_own_part_only():
    """Step 0 answers 6 and 8; step 1's aborted attempt 6 and 9 (saved mid-step); the redone step 1
    answers 6 and 7. "6" was seen once before step 1 (not novel), "7" never: novel_frac 1/2, and
    the step's part of the counts is {6: 1, 7: 1}. Kills mut25 OC9 (the step not restarted after
    the undo: the aborted part stays in it, "6" reads as seen 0 times before and the part is
    {6: 2, 9: 1, 7: 1})."""
    zero = torch.zeros(2, dtype=torch.bool)
    aborted = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    _step(aborted, 0, ["x"], ["6", "8"], zero, 2)
    aborted.pop_metrics()
    aborted.count_outcomes(1, ["x"], ["6", "9"], 2)  # stopped before the update
    resumed = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    resumed.load_state_dict(torch.load(_saved(aborted.state_dict()), weights_only=True))
    _step(resumed, 1, ["x"], ["6", "7"], zero, 2)
    assert resumed.pop_metrics()["reg/outcome/novel_frac"] == 0.5
    assert resumed.counts == {"x": {"6": 2, "8": 1, "7": 1}}
    assert resumed.state_dict()["added"] == {"x": {"6": 1, "7": 1}}


class _EmptyIsZero(ExactMatchReward):
    """Exact match whose final_answer returns an int for an empty completion only (a str otherwise)."""

    def final_answer(self, completion: str):
        return 0 if not completion.strip() else completion.strip()


def test_the_start_up_check_tries_the_empty_completion_too():
    """`check_final_answers` adds "" to the data's sample answers: a final_answer that returns a
    non-str only for an empty completion (which a model does generate) is refused at start-up, not
    at the first empty response hours in. Kills mut25 OC12 (the "" sample dropped)."""
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.0), _EmptyIsZero())
    with pytest.raises(ValueError, match=r"returned int 0 for the completion ''"):
        reg.check_final_answers(["4", "1/2"])
