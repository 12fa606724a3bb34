"""`StepEntropy` by hand (mutation review mut25): an empty step closes as no measurement (not NaN),
`pop_measured` reports a step's mean once per new mini-batch, and the sums of the step being
measured survive `state_dict` / `load_state_dict`."""
from __future__ import annotations

import torch

from lit_covrl.regularizers.step_state import StepEntropy

F64 = torch.float64


def test_a_step_that_measured_no_token_closes_as_none_not_nan():
    """Kills mut25 SS2 (sums[1] >= 0: 0 / 0 = NaN handed to the controller)."""
    se = StepEntropy()
    assert se.begin(0) is None
    se.add(torch.tensor([0.0, 0.0], dtype=F64))  # every group filtered: no token
    assert se.begin(1) is None
    se.add(torch.tensor([6.0, 4.0], dtype=F64))
    assert se.begin(2) == 1.5


def test_pop_measured_reports_once_per_added_mini_batch():
    """Kills mut25 SS3 (the measured flag ignored) and SS8 (the flag never cleared)."""
    se = StepEntropy()
    se.begin(0)
    assert se.pop_measured() is None
    se.add(torch.tensor([3.0, 2.0], dtype=F64))
    assert se.pop_measured() == 1.5
    assert se.pop_measured() is None  # nothing added since
    se.add(torch.tensor([3.0, 4.0], dtype=F64))
    assert se.pop_measured() == 1.0


def test_the_measured_sums_survive_a_state_round_trip():
    """A state saved at the end of step 3 (its sums [6, 3]) closes step 3 as 2.0 when the resumed
    run begins step 4, as the straight run does. Kills mut25 SS7 (the sums not saved)."""
    straight = StepEntropy()
    straight.begin(3)
    straight.add(torch.tensor([6.0, 3.0], dtype=F64))
    resumed = StepEntropy()
    resumed.load_state_dict({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                             for k, v in straight.state_dict().items()})
    assert resumed.begin(4) == straight.begin(4) == 2.0
