"""The learner's hand-off of the rollout to the regularizers before the first update
(`Learner._observe_rollout`): only the kept rows (those the step trains on) and the RL step
(mutation review mut25: passing every row, or step 0, left the existing tests passing)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_covrl.learner import Learner
from lit_covrl.regularizers import EPO, Lopti

F64 = torch.float64


def _observed(keep: torch.Tensor, step: int):
    logp = -torch.tensor([[0.1, 0.2, 0.3], [3.0, 4.0, 5.0], [0.5, 0.7, 9.0], [6.0, 7.0, 8.0]], dtype=F64)
    entropy = torch.tensor([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [4.0, 5.0, 50.0], [8.0, 8.0, 8.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    rollout = SimpleNamespace(logp=logp, entropy=entropy, response_mask=mask)
    learner = Learner.__new__(Learner)  # only the regularizers and the step are read here
    lopti, epo = Lopti(portion=0.5), EPO()
    learner.regularizers, learner.step = [lopti, epo], step
    learner._observe_rollout(rollout, keep)
    return lopti, epo, logp, entropy, mask


def test_only_the_kept_rows_and_the_step_reach_the_regularizers():
    """Rows 1 and 3 filtered out (keep False): Lopti's portion quantile is over the valid tokens of
    rows 0 and 2 (probabilities e^-0.1, e^-0.2, e^-0.3, e^-0.5, e^-0.7: median e^-0.3) and EPO's
    step entropy is their token mean (1 + 2 + 3 + 4 + 5) / 5 = 3, entered as RL step 7. Kills
    mut25 L4 (every row's log-probs) and L7 (every row's entropies) and L5 (the step read as 0)."""
    keep = torch.tensor([True, False, True, False])
    lopti, epo, logp, _, mask = _observed(keep, step=7)
    kept = logp[keep].exp()[mask[keep].bool()].numpy()
    assert lopti.threshold == pytest.approx(float(np.quantile(kept, 0.5)), rel=1e-12)
    assert lopti.threshold == pytest.approx(float(np.exp(-0.3)), rel=1e-12)
    assert epo.history == pytest.approx(3.0, rel=1e-12)
    assert epo.state_dict()["last"][0] == 7
    every = _observed(torch.ones(4, dtype=torch.bool), step=7)
    assert every[0].threshold != pytest.approx(lopti.threshold) and every[1].history != pytest.approx(3.0)
