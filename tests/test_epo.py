"""EPO (Xu et al. 2025, arXiv 2509.22576; the authors' code github.com/WujiangXu/EPO): the band
penalty and the phase weight by hand and against naive float64 loops of the reference's rules, the
history through the regularizer (a cumulative mean including the current step, a redone step
replacing its entry), the term's value and gradient (the bonus only: the smoothing carries none),
micro-batch splits, start-up refusals, fits invariant to the micro-batch size, an exact resume, and a
CLI fit whose reg/epo/ tags move."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import AGG_MODES, aggregate, epo_band_penalty, epo_phase_weight
from lit_covrl.regularizers import EPO
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.types import PolicyBatch

F64 = torch.float64


# --- the math ------------------------------------------------------------------------------------
def test_band_penalty_by_hand():
    h = torch.tensor([[0.5, 0.8, 0.81, 1.0, 1.19, 1.2, 1.5]], dtype=F64)
    # band (0.8, 1.2) around 1: both ends are outside (the code's strict comparisons)
    assert epo_band_penalty(h, 1.0, low=0.8, high=1.2, penalty=0.1).tolist() == [[0.1, 0.1, 0.0, 0.0, 0.0, 0.1, 0.1]]
    # around 0.5: (0.4, 0.6) holds only 0.5
    assert epo_band_penalty(h, 0.5, low=0.8, high=1.2, penalty=2.0).tolist() == [[0.0] + [2.0] * 6]
    # an empty band (low == high) penalizes every token
    assert epo_band_penalty(h, 1.0, low=1.0, high=1.0, penalty=1.0).tolist() == [[1.0] * 7]


def test_phase_weight_by_hand():
    assert epo_phase_weight(0, 150) == 1.0
    assert epo_phase_weight(75, 150) == pytest.approx(1 - 0.2 * (1 - math.exp(-2)), rel=1e-12)  # 0.8271
    assert epo_phase_weight(76, 150) == pytest.approx(0.8 * math.exp(-3 / 75), rel=1e-12)  # the drop to 0.8
    assert epo_phase_weight(150, 150) == pytest.approx(0.8 * math.exp(-3), rel=1e-12)  # 0.0398
    assert epo_phase_weight(400, 150) == epo_phase_weight(150, 150) and epo_phase_weight(-3, 150) == 1.0
    assert epo_phase_weight(0, 1) == 1.0 and epo_phase_weight(1, 1) == pytest.approx(0.8 * math.exp(-3))


def _weight_oracle(epoch: int, total: int) -> float:
    """The reference's rule written out: progress within the half, slow decay then fast."""
    epoch = max(0, min(epoch, total))
    half = total // 2
    if epoch <= half:
        return 1.0 if half == 0 else 1.0 - 0.2 * (1 - math.exp(-2.0 * (epoch / half)))
    return 0.8 * math.exp(-3.0 * ((epoch - half) / (total - half)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_float64_loops(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(4, 9, generator=g, dtype=F64) * 3
    hist, low, high, pen = 0.5 + float(torch.rand(1, generator=g)), 0.7, 1.4, 0.3
    got = epo_band_penalty(h, hist, low=low, high=high, penalty=pen)
    for i in range(4):
        for t in range(9):
            v = float(h[i, t])
            assert float(got[i, t]) == (0.0 if low * hist < v < high * hist else pen)
    for total in (1, 2, 7, 150):
        for e in range(-1, total + 3):
            assert epo_phase_weight(e, total) == pytest.approx(_weight_oracle(e, total), rel=1e-13, abs=0)


def test_band_penalty_is_detached():
    h = torch.rand(2, 3, dtype=F64, requires_grad=True)
    assert not epo_band_penalty(h, 0.5, low=0.8, high=1.2, penalty=0.1).requires_grad


# --- through the regularizer ---------------------------------------------------------------------
def _ctx(step: int, mask: torch.Tensor) -> MiniBatchContext:
    z = torch.zeros_like(mask)
    return MiniBatchContext(step, 0, True, z, z, z, mask, None)


def _batch(h: torch.Tensor, mask: torch.Tensor, rows=None) -> PolicyBatch:
    rows = torch.arange(h.shape[0]) if rows is None else rows
    z = torch.zeros_like(h)
    return PolicyBatch(rows, z, z, z, mask, entropy=h)


def _run_step(reg: EPO, step: int, old_h, h, mask):
    reg.observe_old_entropy(old_h, mask, step)
    reg.prepare(_ctx(step, mask))
    return reg.shape(_batch(h, mask)), reg.pop_metrics()


def test_history_is_the_mean_of_the_steps_including_the_current_one():
    """Each step's rollout entropy E_k (token mean over the valid tokens) joins the history before
    its update; the band is drawn around the mean of E_0 .. E_k, and the term is -c H + c cs w pen 1[out]."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    reg = EPO(entropy_coef=0.01, smooth_coef=2.0, penalty=0.1, phase_steps=4)
    means = []
    for step, level in enumerate([1.0, 2.0, 0.6]):
        old = torch.full((2, 3), level, dtype=F64)
        old[0, 2] = 100.0  # padding: not measured
        h = torch.tensor([[1.0, 1.3, 9.0], [1.2, 1.5, 1.49]], dtype=F64)
        shaping, metrics = _run_step(reg, step, old, h, mask)
        means.append(level)
        hist = sum(means) / len(means)
        assert metrics["reg/epo/step_entropy"] == pytest.approx(level)
        assert metrics["reg/epo/history_entropy"] == pytest.approx(hist)
        w = _weight_oracle(step, 4)
        assert metrics["reg/epo/weight"] == pytest.approx(w)
        out = [[0.0 if 0.8 * hist < float(v) < 1.2 * hist else 1.0 for v in row] for row in h]
        expected = -0.01 * h + 0.01 * 2.0 * w * 0.1 * torch.tensor(out, dtype=F64)
        torch.testing.assert_close(shaping.penalty, expected, rtol=1e-12, atol=1e-15)
        valid_out = sum(out[i][t] for i in range(2) for t in range(3) if mask[i, t])
        assert metrics["reg/epo/out_band_frac"] == pytest.approx(valid_out / 5)
    # histories 1.0, 1.5, 1.2: bands (0.8, 1.2), (1.2, 1.8), (0.96, 1.44)
    assert reg.history == pytest.approx(1.2)


def test_only_the_bonus_carries_gradient():
    mask = torch.ones(2, 4, dtype=F64)
    reg = EPO(entropy_coef=0.05, penalty=3.0)
    reg.observe_old_entropy(torch.full((2, 4), 1.0, dtype=F64), mask, 0)
    reg.prepare(_ctx(0, mask))
    h = (torch.rand(2, 4, dtype=F64) * 2).requires_grad_()
    pen = reg.shape(_batch(h, mask)).penalty
    (grad,) = torch.autograd.grad(pen.sum(), h)
    torch.testing.assert_close(grad, torch.full_like(h, -0.05))  # the smoothing term moves no parameter
    assert (pen.detach() != -0.05 * h.detach()).any()  # but it is in the value (tokens outside the band)


def test_phase_weighting_off_and_no_history_yet():
    mask = torch.ones(1, 2, dtype=F64)
    reg = EPO(phase_weighting=False)
    reg.prepare(_ctx(0, mask))  # no rollout observed: the bonus alone
    h = torch.tensor([[0.1, 5.0]], dtype=F64)
    torch.testing.assert_close(reg.shape(_batch(h, mask)).penalty, -1e-3 * h)
    shaping, metrics = _run_step(reg, 100, torch.ones(1, 2, dtype=F64), h, mask)
    assert metrics["reg/epo/weight"] == 1.0
    torch.testing.assert_close(shaping.penalty, -1e-3 * h + 1e-3 * 0.1)  # both tokens outside (0.8, 1.2)


def test_a_redone_step_replaces_its_entry_and_an_empty_step_adds_nothing():
    mask = torch.ones(1, 2, dtype=F64)
    reg = EPO()
    reg.observe_old_entropy(torch.full((1, 2), 1.0, dtype=F64), mask, 0)
    reg.observe_old_entropy(torch.full((1, 2), 3.0, dtype=F64), mask, 1)
    reg.observe_old_entropy(torch.full((1, 2), 5.0, dtype=F64), mask, 1)  # step 1 again (a restored run)
    assert reg.history == pytest.approx(3.0)
    reg.observe_old_entropy(torch.zeros(0, 2, dtype=F64), torch.zeros(0, 2, dtype=F64), 2)  # all filtered
    assert reg.history == pytest.approx(3.0)


def test_micro_batches_give_the_same_terms_and_metrics():
    g = torch.Generator().manual_seed(3)
    h, mask = torch.rand(6, 5, generator=g, dtype=F64) * 2, (torch.rand(6, 5, generator=g) > 0.3).to(F64)
    out = []
    for splits in ([torch.arange(6)], [torch.arange(0, 1), torch.arange(1, 4), torch.arange(4, 6)]):
        reg = EPO()
        reg.observe_old_entropy(h, mask, 0)
        reg.prepare(_ctx(0, mask))
        pens = torch.cat([reg.shape(_batch(h[r], mask[r], r)).penalty for r in splits])
        out.append((pens, reg.pop_metrics()))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-12) and 0 < out[0][1]["reg/epo/out_band_frac"] < 1
    for mode in AGG_MODES:  # the term aggregates like the loss in every mode
        ref = aggregate(-1e-3 * h, mask, mode, norm_length=5)
        reg = EPO()
        reg.prepare(_ctx(0, mask))
        torch.testing.assert_close(aggregate(reg.shape(_batch(h, mask)).penalty, mask, mode, norm_length=5), ref)


def test_a_redone_step_gives_the_history_bit_for_bit():
    """A step redone after a mid-step restore gives exactly the history of a run that took it once
    (review epo24: subtracting the aborted entry, (S + E1) - E1 + E2, missed S + E2 by an ulp in
    ~2 % of cases); the sum before the entry is restored instead."""
    import random

    def observe(reg, value, step):
        reg.observe_old_entropy(torch.tensor([[value]], dtype=F64), torch.ones(1, 1, dtype=F64), step)

    rng = random.Random(1)
    for _ in range(200):
        values = [rng.uniform(0.2, 2.0) for _ in range(40)]
        aborted, redo = rng.uniform(0.2, 2.0), rng.uniform(0.2, 2.0)
        straight, first = EPO(), EPO()
        for k, v in enumerate(values):
            observe(straight, v, k)
            observe(first, v, k)
        observe(straight, redo, 40)
        observe(first, aborted, 40)  # step 40's first attempt, saved mid-step
        resumed = EPO()
        resumed.load_state_dict(first.state_dict())
        observe(resumed, redo, 40)
        assert resumed.history == straight.history


def test_state_round_trip_and_settings_refused():
    mask = torch.ones(1, 2, dtype=F64)
    reg = EPO()
    for step, level in enumerate([1.0, 2.5]):
        reg.observe_old_entropy(torch.full((1, 2), level, dtype=F64), mask, step)
    state = reg.state_dict()
    assert state == {"hist_sum": 3.5, "hist_count": 2, "last": [1, 1.0]}  # step 1 and the sum before it
    back = EPO()
    back.load_state_dict(state)
    assert back.history == reg.history == 1.75
    back.observe_old_entropy(torch.full((1, 2), 0.5, dtype=F64), mask, 1)  # step 1 redone after the restore
    assert back.history == pytest.approx(0.75)
    bad = {
        "entropy_coef": (0.0, "EPO.entropy_coef=0.0 is invalid: must be a finite number > 0"),
        "smooth_coef": (math.nan, "EPO.smooth_coef=nan is invalid: must be a finite number >= 0"),
        "low_ratio": (-0.1, "EPO.low_ratio=-0.1 is invalid: must be a finite number >= 0"),
        "high_ratio": (0.5, "EPO.high_ratio=0.5 is invalid: must be a finite number >= low_ratio (0.8)"),
        "penalty": (math.inf, "EPO.penalty=inf is invalid: must be a finite number >= 0"),
        "phase_weighting": ("yes", "EPO.phase_weighting='yes' is invalid: must be true or false"),
        "phase_steps": (0, "EPO.phase_steps=0 is invalid: must be an integer >= 1"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ValueError) as err:
            EPO(**{field: value})
        assert str(err.value) == message


# --- through the learner -------------------------------------------------------------------------
def _epo_fit(tiny_model_dir, micro, steps=3):
    """`steps` RL steps of 4 updates (2 mini-batches x 2 epochs), a large bonus and penalty, a band
    narrow enough for the tiny model's entropies (~2.7-2.8) to straddle it: (weights, every step's metrics by trainer.global_step, 1 for step 0)."""
    from tests.helpers import fit
    from tests.test_aent import _Steps
    from tests.test_module import make_data, make_module

    torch.manual_seed(0)
    rec = _Steps()
    module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                         update=dict(micro_batch_size=micro, mini_batch_size=2, ppo_epochs=2, grad_clip=None))
    fit(module, make_data(), steps=steps, callbacks=[EPO(entropy_coef=0.2, penalty=1.0, phase_steps=4, low_ratio=0.98, high_ratio=1.02), rec],
        limit_val_batches=0)
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}, rec.steps


_REF: dict = {}


@pytest.mark.parametrize("micro", [1, 3])
def test_epo_fit_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """The weights and every policy/ and reg/ metric of each step are the same for micro-batches of
    1, 3 or all; the history is the running mean of the steps' entropies."""
    from tests.test_aent import _assert_same_fit

    if "ref" not in _REF:
        _REF["ref"] = _epo_fit(tiny_model_dir, 64)
    m = _REF["ref"][1]
    e = [m[s]["reg/epo/step_entropy"] for s in (1, 2, 3)]
    assert [m[s]["reg/epo/history_entropy"] for s in (1, 2, 3)] == pytest.approx(
        [e[0], (e[0] + e[1]) / 2, sum(e) / 3], rel=1e-6)
    assert m[3]["reg/epo/weight"] == pytest.approx(_weight_oracle(2, 4)) and all(0 < m[s]["reg/epo/out_band_frac"] < 1 for s in m)
    _assert_same_fit(_REF["ref"], _epo_fit(tiny_model_dir, micro))


def test_epo_history_resumes_exactly(tiny_model_dir, tmp_path):
    """The history travels in the checkpoint: a resume that restarted it would draw step 2's band
    around step 2's entropy alone (history_entropy and the term's value would differ)."""
    from tests.helpers import resumed_series

    def regs():
        return [EPO(entropy_coef=0.05, penalty=1.0, phase_steps=4, low_ratio=0.98, high_ratio=1.02)]

    compared = ["reg/epo/history_entropy", "reg/epo/step_entropy", "reg/epo/loss", "reg/epo/out_band_frac",
                "policy/loss", "policy/grad_norm"]
    a, b, saved = resumed_series(tmp_path, tiny_model_dir, regs, compared, "EPO")
    e = [a["reg/epo/step_entropy"][s] for s in range(4)]
    assert saved[0]["hist_count"] == 2 and saved[0]["hist_sum"] == pytest.approx(e[0] + e[1], rel=1e-6)
    assert a["reg/epo/history_entropy"][3] == pytest.approx(sum(e) / 4, rel=1e-6)
    for tag in compared:
        assert sorted(b[tag]) == [2, 3], tag
        for s in (2, 3):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def test_epo_config_runs_through_the_cli(tmp_path):
    """configs/cpu/epo.yaml on the quickstart through `lit-covrl fit`: EPO is built from the YAML and
    its tags are written every step."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/epo.yaml")
    keys = {"reg/epo/history_entropy", "reg/epo/step_entropy", "reg/epo/weight", "reg/epo/out_band_frac",
            "reg/epo/loss"}
    assert keys <= set(tags) and all(len(tags[k]) == 3 for k in keys)
    assert tags["reg/epo/weight"][0] == 1.0 and tags["reg/epo/weight"][2] < 1.0
    assert all(v < 0 for v in tags["reg/epo/loss"])


def test_a_bad_setting_is_refused_at_start_up_naming_the_field(tmp_path, capsys):
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/epo.yaml", "--trainer.callbacks.init_args.high_ratio", "0.5")
    assert "EPO.high_ratio=0.5 is invalid: must be a finite number >= low_ratio (0.8)" in err
