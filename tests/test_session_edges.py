"""Edges of this session's code that no other test reached (review mutation21: each test kills a
mutation that survived the suite): OutcomeExploration's responses / schedule / metrics through
StepBatch, a second outcome regularizer, ReferenceKL's reset_patience (the monitor watched, sanity
and validate runs ignored, a patience-only resume loading the reset reference, refusals, a
checkpoint without a stall watch), StallWatch's NaN, StepEntropy after a resume, RewardSet's
answer namer."""
from __future__ import annotations

import math
import types

import pytest
import torch

from lit_covrl.regularizers import OutcomeExploration, ReferenceKL
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.reward_set import RewardSet
from lit_covrl.rewards import ExactMatchReward
from lit_covrl.step_batch import StepBatch


def _ready(reg):
    reg.check_rewards(RewardSet([ExactMatchReward()]), None)
    return reg


def _shift_through_step_batch(reg, rewards, scores=None, threshold=1.0, step=0):
    """StepBatch._outcome_shift on a fake module: one prompt 'x', G = len(rewards), answers '1', '2', ..."""
    G = len(rewards)
    me = types.SimpleNamespace(hparams=types.SimpleNamespace(correct_threshold=threshold), global_step=step,
                               settings=types.SimpleNamespace(rollout=types.SimpleNamespace(group_size=G)))
    sampled = types.SimpleNamespace(scores=scores, rewards=rewards, batch=types.SimpleNamespace(prompts=["x"]),
                                    rollout=types.SimpleNamespace(completions=[str(i + 1) for i in range(G)]))
    reg.count_outcomes(step, sampled.batch.prompts, sampled.rollout.completions, G)
    return StepBatch._outcome_shift(me, reg, sampled)


def test_correct_means_score_at_least_the_threshold():  # kills S3
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.0, responses="correct"))
    got = _shift_through_step_batch(reg, torch.tensor([1.0, 0.0]))
    assert got.tolist() == [1.0, 0.0]


def test_incorrect_responses_only():  # kills R3
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.0, responses="incorrect"))
    got = _shift_through_step_batch(reg, torch.tensor([1.0, 0.0]))
    assert got.tolist() == [0.0, 1.0]


def test_correct_is_judged_on_the_scores_not_the_shaped_rewards():  # kills S4
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.0, responses="correct"))
    got = _shift_through_step_batch(reg, torch.tensor([0.5, 0.0]), scores=torch.tensor([1.0, 0.0]))
    assert got.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("which", ["historical", "batch"])
def test_schedule_moves_both_coefficients(which):  # kills R14, R15, S5
    kw = dict(historical=1.0, batch=0.0) if which == "historical" else dict(historical=0.0, batch=1.0)
    reg = _ready(OutcomeExploration(**kw, schedule=Schedule(name="linear", final=0.0, steps=10)))
    reg.setup(types.SimpleNamespace(max_steps=11), None, "fit")
    # step 5 through the module path: half the coefficient
    got = _shift_through_step_batch(reg, torch.zeros(2), step=5) if which == "historical" else None
    if which == "historical":
        assert got.tolist() == pytest.approx([0.5, 0.5])
    else:
        reg.count_outcomes(5, ["y"], ["1", "1"], 2)
        out = reg.outcome_shift(5, ["y"], ["1", "1"], torch.zeros(2, dtype=torch.bool), 2)
        assert out.tolist() == pytest.approx([-0.5, -0.5])


def test_metrics_by_hand():  # kills R8, R10, R11
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.6))
    reg.count_outcomes(0, ["x", "y"], ["5", "5", "6", " ", "7", "7", "7", "7"], 4)
    reg.outcome_shift(0, ["x", "y"], ["5", "5", "6", " ", "7", "7", "7", "7"], torch.zeros(8, dtype=torch.bool), 4)
    m = reg.pop_metrics()
    assert m["reg/outcome/batch_penalty_mean"] == pytest.approx((0.2 + 0.2 + 4 * 0.6) / 8)
    assert m["reg/outcome/answered_frac"] == pytest.approx(7 / 8)
    assert m["reg/outcome/tracked_answers"] == 3.0


def test_two_outcome_regularizers_are_refused():  # kills K1
    from lit_covrl.regularizers.checks import check_stack

    with pytest.raises(ValueError, match="shape the outcome rewards"):
        check_stack([OutcomeExploration(historical=1.0, batch=0.0, name="a"),
                     OutcomeExploration(historical=1.0, batch=0.0, name="b")])


def test_patience_only_resume_loads_the_reset_reference():  # kills D9
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    saved = {k: torch.full_like(v, 7.0) for k, v in reference.state_dict().items()}
    reg = ReferenceKL(beta=0.1, reset_patience=2)
    reg.load_state_dict({"resets": 1, "last_reset_step": 3, "stall": {"best": 0.5, "stalls": 0, "due": False},
                         "reference": saved})
    reg.on_train_start(None, types.SimpleNamespace(_reference=reference, policy=policy))
    assert torch.equal(reference.weight, saved["weight"])


def test_a_nan_first_validation_sets_no_best():  # kills W4
    from lit_covrl.reference_reset import StallWatch

    w = StallWatch(1)
    w.observe(math.nan)
    w.done()
    w.observe(0.5)
    assert w.best == 0.5 and not w.due


def test_the_monitor_named_is_the_one_watched():  # kills D16
    reg = ReferenceKL(beta=0.1, reset_patience=1, reset_monitor="val/pass@k")
    trainer = types.SimpleNamespace(sanity_checking=False, state=types.SimpleNamespace(fn="fit"),
                                    callback_metrics={"val/pass@1": torch.tensor(0.1), "val/pass@k": torch.tensor(0.9)})
    reg.on_validation_end(trainer, None)
    assert reg._stall.best == pytest.approx(0.9)


def test_sanity_check_and_validate_are_not_watched():  # kills D3, D4
    reg = ReferenceKL(beta=0.1, reset_patience=1)
    for sanity, fn in ((True, "fit"), (False, "validate")):
        trainer = types.SimpleNamespace(sanity_checking=sanity, state=types.SimpleNamespace(fn=fn),
                                        callback_metrics={"val/pass@1": torch.tensor(0.9)})
        reg.on_validation_end(trainer, None)
    assert reg._stall.best is None


def test_a_resumed_mid_step_measurement_adds_every_mini_batch():  # kills E2
    from tests.test_aepo import F64, MiniBatchContext, AEPO

    def ctx(step, value):
        mask = torch.ones(2, 3)
        zero = torch.zeros_like(mask)
        return MiniBatchContext(step, 0, True, zero, zero, zero, mask, None, torch.full_like(mask, value, dtype=F64))

    aborted = AEPO(target_entropy=0.5)
    for step, values in ((0, (0.4,)), (1, (0.1,))):
        aborted.rollout_request(step, 8)
        for v in values:
            aborted.prepare(ctx(step, v))
    resumed = AEPO(target_entropy=0.5)
    resumed.load_state_dict(aborted.state_dict())
    resumed.rollout_request(1, 8)
    for v in (0.2, 0.6):
        resumed.prepare(ctx(1, v))
    resumed.rollout_request(2, 8)
    assert resumed.measured_entropy == pytest.approx(0.4, abs=1e-12)


def test_advantage_route_leaves_the_rewards_raw(tiny_model_dir, monkeypatch):  # kills S6
    from tests.helpers import fit
    from tests.test_outcome import _data, _module
    import lit_covrl.step_batch as step_batch

    real_adv, seen, raw = step_batch.compute_advantages, [], []
    real_shift = step_batch.StepBatch._outcome_shift
    monkeypatch.setattr(step_batch.StepBatch, "_outcome_shift",
                        lambda self, reg, sampled: raw.append(sampled.rewards.clone()) or real_shift(self, reg, sampled))
    monkeypatch.setattr(step_batch, "compute_advantages", lambda r, *a, **kw: seen.append(r.clone()) or real_adv(r, *a, **kw))
    fit(_module(tiny_model_dir), _data(), steps=2, callbacks=[OutcomeExploration(historical=1.0, batch=0.5, apply="advantage")],
        limit_val_batches=0)
    assert len(seen) == len(raw) == 2
    for r, w in zip(seen, raw):
        torch.testing.assert_close(r, w, rtol=0, atol=0)


def test_the_first_reward_names_the_answer():  # kills F3
    class A(ExactMatchReward):
        def final_answer(self, completion):
            return "first"

    class B(ExactMatchReward):
        def final_answer(self, completion):
            return "second"

    assert RewardSet([A(), B()]).answer_namer()("x") == "first"


def test_a_datamodule_without_held_out_prompts_is_refused():  # kills D6
    reg = ReferenceKL(beta=0.1, reset_patience=1)
    trainer = types.SimpleNamespace(limit_val_batches=1.0, datamodule=types.SimpleNamespace(has_validation=False),
                                    val_check_interval=1, max_steps=10)
    with pytest.raises(ValueError, match="never validates"):
        reg.setup(trainer, None, "fit")


def test_a_state_without_a_stall_watch_loads():  # kills D17 (a reset_every checkpoint resumed with reset_patience)
    reg = ReferenceKL(beta=0.1, reset_patience=2)
    reg.load_state_dict({"resets": 1, "last_reset_step": 4})
    assert reg._resets == 1 and reg._stall.best is None


def test_a_fractional_val_check_interval_is_not_counted_as_steps():  # kills D18
    import warnings

    reg = ReferenceKL(beta=0.1, reset_patience=5)
    trainer = types.SimpleNamespace(limit_val_batches=1.0, datamodule=types.SimpleNamespace(has_validation=True),
                                    val_check_interval=1.0, max_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.setup(trainer, None, "fit")


def test_no_novel_frac_when_nothing_is_answered():  # kills R19
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.5))
    reg.count_outcomes(0, ["x"], [" ", " "], 2)
    reg.outcome_shift(0, ["x"], [" ", " "], torch.zeros(2, dtype=torch.bool), 2)
    m = reg.pop_metrics()
    assert "reg/outcome/novel_frac" not in m and m["reg/outcome/answered_frac"] == 0.0
