"""Lopti's quantile split (`portion`, the reference's `seperate_portion`): the quantile by hand and
against numpy / torch.quantile, the split it gives, the two-phase update with the threshold taken over
the whole step's tokens against the naive float64 loop of test_probability_controls, 2 gloo processes
against one, and the refusals naming the field."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_covrl.algorithms import probability_quantile
from lit_covrl.regularizers import AdvantageReweighting, Lopti
from lit_covrl.regularizers.base import MiniBatchContext
from tests._dist import free_port
from tests.test_probability_controls import MASK, P, _ctx, _learner_params, _naive, _rollout

torch.set_num_threads(1)


def test_quantile_hand_values_and_edges():
    v = torch.tensor([0.8, 0.1, 0.4, 0.2], dtype=torch.float64)  # sorted 0.1 0.2 0.4 0.8
    assert probability_quantile(v, 0.5) == pytest.approx(0.3)  # position 1.5
    assert probability_quantile(v, 0.25) == pytest.approx(0.175)  # position 0.75: 0.1 + 0.75 (0.2 - 0.1)
    assert probability_quantile(v, 0.0) == 0.1 and probability_quantile(v, 1.0) == 0.8
    assert probability_quantile(torch.tensor([0.3]), 0.7) == pytest.approx(0.3)
    assert probability_quantile(torch.zeros(0), 0.5) is None


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0.05, 0.3, 0.5, 0.99])
def test_quantile_is_numpy_s_and_torch_s_linear_quantile(n, q):
    v = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert probability_quantile(v, q) == pytest.approx(float(np.quantile(v.numpy(), q)), rel=1e-12, abs=1e-15)
    assert probability_quantile(v, q) == pytest.approx(float(torch.quantile(v, q)), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("portion, low", [(0.5, [[True, False, False], [True, False, False]]),
                                          (0.6, [[True, True, False], [True, False, False]])])
def test_the_split_by_hand(portion, low):
    """The valid probabilities 0.1, 0.45, 0.9 | 0.3, 0.8 (sorted 0.1 0.3 0.45 0.8 0.9): the median is 0.45,
    and a token at the threshold is not below it; the 0.6 quantile is 0.45 + 0.4 (0.8 - 0.45) = 0.59."""
    lopti = Lopti(portion=portion)
    lopti.observe_old_logp(P.log() * MASK, MASK)
    assert lopti.threshold == pytest.approx({0.5: 0.45, 0.6: 0.59}[portion])
    phases = []
    for phase in (0, 1):
        lopti.prepare(_ctx(phase))
        phases.append(lopti.scope.bool().tolist())
    valid = MASK.bool().tolist()
    assert phases[0] == low
    assert phases[1] == [[v and not lo for v, lo in zip(vr, lr)] for vr, lr in zip(valid, low)]
    m = lopti.pop_metrics()
    assert m["reg/lopti/threshold"] == pytest.approx(lopti.threshold)
    assert m["reg/lopti/low_frac"] == pytest.approx(sum(map(sum, low)) / 5)
    high_first = Lopti(portion=portion, low_first=False)  # the reference's negative portion
    high_first.observe_old_logp(P.log() * MASK, MASK)
    high_first.prepare(_ctx(0))
    assert high_first.scope.bool().tolist() == phases[1]


@pytest.mark.parametrize("micro", [1, 3, 64])
def test_two_phase_update_with_the_step_s_quantile_equals_the_naive_loop(tiny_model_dir, micro):
    """Lopti(portion 0.4) + AR over 2 mini-batches: the threshold is the 0.4 quantile of every trained
    token of the step (numpy's, float64), not each mini-batch's, and the 4 SGD steps equal the naive
    loop's with that threshold as eta, for micro-batches of 1, 3 or all rows."""
    from lit_covrl.policy import load_policy

    probe = _rollout(load_policy(tiny_model_dir).double())
    valid = probe.logp.exp()[probe.response_mask.bool()].numpy()
    eta = float(np.quantile(valid, 0.4))
    halves = [float(np.quantile(probe.logp[r].exp()[probe.response_mask[r].bool()].numpy(), 0.4))
              for r in (slice(0, 2), slice(2, 4))]  # each mini-batch's own quantile: another split
    assert any(((valid < h) != (valid < eta)).any() for h in halves)
    lopti = Lopti(portion=0.4)
    model, rollout, adv, steps, _ = _learner_params(tiny_model_dir, [AdvantageReweighting(alpha=0.3), lopti], micro)
    assert steps == 4 and lopti.threshold == pytest.approx(eta, rel=1e-12)
    assert lopti.pop_metrics()["reg/lopti/threshold"] == pytest.approx(eta, rel=1e-12)
    naive = _naive(tiny_model_dir, rollout, adv, eta, alpha=0.3)
    for k, v in naive.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-9, atol=1e-12)


# --- across ranks ------------------------------------------------------------------------------------
def _probs(rows: slice):
    g = torch.Generator().manual_seed(5)
    mask = (torch.arange(6)[None, :] < torch.randint(1, 7, (8,), generator=g)[:, None]).double()
    old = -torch.rand(8, 6, generator=g, dtype=torch.float64) * 3 * mask
    return old[rows], mask[rows]


def _split(rows: slice) -> dict[str, torch.Tensor]:
    old, mask = _probs(rows)
    lopti = Lopti(portion=0.3)
    lopti.observe_old_logp(old, mask)
    lopti.prepare(MiniBatchContext(0, 0, True, old, old, old * 0, mask, None))
    return {"threshold": torch.tensor(lopti.threshold, dtype=torch.float64), "phase0": lopti.scope}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:  # rank 0 holds 3 rows, rank 1 the other 5
        torch.save(_split(slice(0, 3) if rank == 0 else slice(3, 8)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_split_at_the_quantile_of_both(tmp_path):
    single = _split(slice(0, 8))
    old, mask = _probs(slice(0, 8))
    assert float(single["threshold"]) == pytest.approx(float(np.quantile(old.exp()[mask.bool()].numpy(), 0.3)))
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for p in parts:
        assert torch.equal(p["threshold"], single["threshold"])
    assert torch.equal(torch.cat([p["phase0"] for p in parts]), single["phase0"])
    assert _split(slice(0, 3))["threshold"] != single["threshold"]  # one rank's tokens alone: another threshold


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_a_bad_portion_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"Lopti\.portion=.* is invalid: must be a finite number in \(0, 1\)"):
        Lopti(portion=bad)


def test_eta_beside_portion_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"Lopti\.eta=0\.4 with Lopti\.portion=0\.5"):
        Lopti(eta=0.4, portion=0.5)
    with pytest.raises(ValueError, match=r"Lopti\.eta=0\.5 with Lopti\.portion=0\.5"):  # eta given, even at 0.5
        Lopti(eta=0.5, portion=0.5)
    assert Lopti(portion=0.5).eta == 0.5 and Lopti().portion is None and Lopti().threshold == 0.5


def test_a_bad_portion_is_refused_through_the_cli(tmp_path, capsys):
    from pathlib import Path

    from tests.helpers import cli_start_up_error

    text = (Path(__file__).parents[1] / "configs/cpu/lopti.yaml").read_text()
    assert "        eta: 0.4" in text
    config = tmp_path / "lopti_portion.yaml"  # the shipped config with portion 1.5 in place of eta
    config.write_text(text.replace("        eta: 0.4", "        portion: 1.5  #", 1))
    err = cli_start_up_error(tmp_path, capsys, str(config))
    assert "Lopti.portion=1.5 is invalid" in err, err
