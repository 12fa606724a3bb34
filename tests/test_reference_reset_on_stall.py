"""ProRL's trigger for its reference reset, `ReferenceKL(reset_patience, reset_monitor)`: the
reference takes the policy's weights (and the optimizer state is cleared) before the RL step that
follows the `reset_patience`-th validation in a row without a new best of `reset_monitor`. The
watch by hand; a fit whose resets fall exactly where a replay of its own validation figures puts
them; the watch's state through a checkpoint; settings refused at construction and at start-up."""
from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

from lit_covrl.reference_reset import StallWatch
from lit_covrl.regularizers import ReferenceKL
from tests.test_reference_reset import _Probe


def test_the_watch_by_hand():
    """patience 2: 0.3 (best), 0.4 (best), 0.4 (no new best: 1), 0.35 (2: due, count restarts),
    NaN (1), 0.5 (best, 0), 0.2 (1), 0.45 (2: due again; the best 0.5 was kept)."""
    w, due = StallWatch(2), []
    for v in (0.3, 0.4, 0.4, 0.35, math.nan, 0.5, 0.2, 0.45):
        w.observe(v)
        due.append(w.due)
        if w.due:
            w.done()
    assert due == [False, False, False, True, False, False, False, True]
    assert w.best == 0.5 and w.stalls == 0
    copy = StallWatch(2)
    w.observe(0.1)
    copy.load_state_dict(w.state_dict())
    assert (copy.best, copy.stalls, copy.due) == (0.5, 1, False)


def test_bad_settings_are_refused_naming_the_field():
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"ReferenceKL.reset_patience=.*must be an integer >= 1 \(validations"):
            ReferenceKL(reset_patience=bad)
    for bad in ("pass@1", "val/pass@8", "val/reward", "val/entropy", "policy/entropy", 3):  # val/pass@8: not logged
        with pytest.raises(ValueError, match=r"ReferenceKL.reset_monitor=.*must be one of \['val/pass@1', 'val/pass@k'\]"):
            ReferenceKL(reset_patience=2, reset_monitor=bad)
    assert ReferenceKL(reset_patience=2, reset_monitor="val/pass@k").reset_monitor == "val/pass@k"
    assert ReferenceKL().reset_patience is None and ReferenceKL().state_dict() == {}


class _StallProbe(_Probe):
    """_Probe that also keeps each fit validation's monitored value and the step it followed."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self.seen.append((trainer.global_step, float(trainer.callback_metrics[self.reset_monitor])))


def _fit(tiny_model_dir, **reg_kw):
    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    torch.manual_seed(0)
    reg = _StallProbe(beta=0.1, **reg_kw)
    module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                         update=dict(mini_batch_size=2, ppo_epochs=1, grad_clip=None))
    fit(module, make_data(), steps=8, callbacks=[reg], val_check_interval=1)
    return reg


def test_resets_follow_the_validations_that_bring_no_new_best(tiny_model_dir):
    """Validation after every step, patience 1: a reset before each step that follows a validation
    without a new best of val/pass@1, and only there (a replay of the watch on the fit's own
    figures); at those steps the reference equals the policy and the optimizer holds no state,
    at the others (after step 0) it does not."""
    reg = _fit(tiny_model_dir, reset_patience=1)
    replay, expected = StallWatch(1), set()
    for step, value in reg.seen:
        replay.observe(value)
        if replay.due:
            expected.add(step)  # the next step is step `step` (global_step counts the steps done)
            replay.done()
    expected.discard(8)  # due after the last step: no step left to reset before
    assert expected, f"the run never stalled: {reg.seen}"  # a test of the trigger needs one
    assert len(expected) < len(reg.seen) - 1, reg.seen  # ... and steps without a reset
    reset_at = {s for s, (same, n_state) in reg.at_start.items() if s > 0 and same}
    assert reset_at == expected and reg._resets == len(expected)
    assert all(reg.at_start[s][1] == 0 for s in expected)
    assert all(reg.at_start[s][1] > 0 for s in reg.at_start if s > 0 and s not in expected)


def test_a_pending_reset_survives_a_checkpoint():
    """A checkpoint saved after the validation that made a reset due (before the next step)
    resumes with it due: the resumed run resets at its first step, and only once."""
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1, momentum=0.9)
    policy(torch.ones(1, 3)).sum().backward()
    opt.step()
    reg = ReferenceKL(beta=0.1, reset_patience=2)
    for v in (0.5, 0.4, 0.3):
        reg._stall.observe(v)
    state = reg.state_dict()
    assert state["stall"] == {"best": 0.5, "stalls": 0, "due": True}
    resumed = ReferenceKL(beta=0.1, reset_patience=2)
    resumed.load_state_dict(state)
    module = types.SimpleNamespace(_reference=reference, policy=policy)
    resumed.on_train_batch_start(types.SimpleNamespace(global_step=7, optimizers=[opt]), module, None, 0)
    assert resumed._resets == 1 and torch.equal(policy.weight, reference.weight) and len(opt.state) == 0
    policy.weight.data += 1
    resumed.on_train_batch_start(types.SimpleNamespace(global_step=8, optimizers=[opt]), module, None, 0)
    assert resumed._resets == 1 and not torch.equal(policy.weight, reference.weight)


def test_a_run_that_never_validates_is_refused_at_start_up(tmp_path, capsys):
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/prorl.yaml",  # (its runs: limit_val_batches 0)
                             "--trainer.callbacks.init_args.reset_patience", "2")
    assert "ReferenceKL.reset_patience=2: resets when validation stalls, but this run never validates" in err


def test_a_run_with_too_few_validations_to_ever_reset_is_warned_at_start_up(tiny_model_dir):
    """Patience 2 needs 3 validations (the first sets the best) before the last step; a 4-step run
    validating every 2 steps has 1 (the one after step 4 makes a reset due that never happens):
    warned before training, naming the setting and the counts (review newest21, mutation21). A
    6-step run validating every step has 5: no warning."""
    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    with pytest.warns(UserWarning, match=r"ReferenceKL.reset_patience=2: this run validates 1 time\(s\) before its "
                                         r"last step \(trainer.max_steps 4, val_check_interval 2\)"):
        fit(make_module(tiny_model_dir), make_data(), steps=4, val_check_interval=2,
            callbacks=[ReferenceKL(beta=0.1, reset_patience=2)])
    reg = ReferenceKL(reset_patience=2)
    for steps, interval, warned in ((4, 1, False), (3, 1, True), (5, 2, True), (7, 2, False)):
        trainer = types.SimpleNamespace(limit_val_batches=1.0, datamodule=None, val_check_interval=interval,
                                        max_steps=steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reg.setup(trainer, None, "fit")
        assert any("never reset" in str(w.message) for w in caught) == warned, (steps, interval)


def test_a_resume_from_the_checkpoint_of_a_stalled_validation_resets_as_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """Validation and a checkpoint after every step (the save waits for the validation), patience
    1: resumed from the step-6 checkpoint, whose validation made a reset due, steps 6-7 reset and
    train as in the run that went on (resets, KL, loss), and the weights and reference end equal."""
    from lit_covrl.checkpointing import AtomicCheckpoint
    from tests.helpers import fit
    from tests.test_module import make_data, make_module
    from tests.test_resume import _series

    def run(log_dir, ckpt_path=None):
        torch.manual_seed(0)
        module = make_module(tiny_model_dir, update=dict(mini_batch_size=2))
        saver = AtomicCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=1, save_top_k=-1)
        fit(module, make_data(), steps=8, callbacks=[ReferenceKL(beta=0.5, reset_patience=1), saver],
            log_dir=log_dir, val_check_interval=1, enable_checkpointing=True, ckpt_path=ckpt_path)
        return module

    compared = ["reg/ref_kl/resets", "reg/ref_kl/kl", "reg/ref_kl/loss", "policy/loss", "val/pass@1"]
    full = run(tmp_path / "full")
    ckpt = next((tmp_path / "ck").glob("*step=6.ckpt"))
    stall = torch.load(ckpt, weights_only=False)["callbacks"]["ReferenceKL[ref_kl]"]["stall"]
    assert stall["due"], stall  # the test needs a reset pending at the save
    resumed = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    a, b = _series(tmp_path / "full", compared), _series(tmp_path / "resumed", compared)
    assert a["reg/ref_kl/resets"][6] == a["reg/ref_kl/resets"][5] + 1
    for tag in compared:
        for s in (6, 7):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])
    for m_full, m_res in ((full.policy, resumed.policy), (full._reference, resumed._reference)):
        for (k, v), (_, u) in zip(m_full.state_dict().items(), m_res.state_dict().items()):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7, msg=k)
