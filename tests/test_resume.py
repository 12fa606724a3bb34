"""Resume is exact: a run checkpointed at step 2 and resumed with ckpt_path produces the same
metrics for steps 3-4 as an uninterrupted run (same prompts, same samples, same selection)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_covrl.regularizers import SIREN, AdaptiveEntropyBonus, ClipCov, EntroPIC, KLCov
from tests.helpers import scalar_tags
from tests.test_module import make_data, make_module

COMPARED = ["rollout/reward_mean", "policy/entropy", "policy/loss", "reg/clip_cov/selected_frac", "policy/grad_norm"]


def _trainer(log_dir, steps, callbacks=None, **kw):
    callbacks = callbacks if callbacks is not None else [ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=1), KLCov(ratio=0.1)]
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=L.pytorch.loggers.TensorBoardLogger(str(log_dir), name="r"),
        callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, limit_val_batches=0,
        enable_checkpointing=False, **kw,
    )


def _series(log_dir, compared=COMPARED):
    tags = scalar_tags(log_dir)
    return {t: dict(tags[t]) for t in compared}


def straight_and_resumed(tmp_path, regs, module, data, compared):
    """(the `compared` series of 4 straight RL steps, those of a run resumed at step 2, the step-2
    checkpoint's file): `regs()`, `module()` and `data()` build each run's callbacks, module and data."""
    _trainer(tmp_path / "full", 4, regs()).fit(module(), data())
    first = _trainer(tmp_path / "a", 2, regs())
    first.fit(module(), data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    _trainer(tmp_path / "b", 4, regs()).fit(module(), data(), ckpt_path=str(ckpt))
    return _series(tmp_path / "full", compared), _series(tmp_path / "b", compared), ckpt


def test_resume_continues_the_same_run(tiny_model_dir, tmp_path):
    kw = dict(update=dict(mini_batch_size=2))
    full = _trainer(tmp_path / "full", 4)
    full.fit(make_module(tiny_model_dir, **kw), make_data())

    first = _trainer(tmp_path / "a", 2)
    first.fit(make_module(tiny_model_dir, **kw), make_data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    torch.manual_seed(12345)  # the resumed run must not depend on the global RNG state
    resumed = _trainer(tmp_path / "b", 4)
    resumed.fit(make_module(tiny_model_dir, **kw), make_data(), ckpt_path=str(ckpt))

    a, b = _series(tmp_path / "full"), _series(tmp_path / "b")
    for tag in COMPARED:
        steps = sorted(b[tag])
        assert len(steps) == 2, (tag, steps)  # only the two resumed steps were run
        for s in steps:
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def test_adaptive_entropy_coefficient_resumes_exactly(tiny_model_dir, tmp_path):
    """AdaptiveEntropyBonus's coefficient (and its pending measurement) travel in the checkpoint:
    a target far above the entropy makes it grow every step, so a resume that restarted it from
    init_coef would apply 0 at step 3 instead of 0.02."""
    def regs():
        return [AdaptiveEntropyBonus(target=50.0, delta=0.01, init_coef=0.0, max_coef=1.0)]

    compared = ["reg/adaptive_entropy/coef", "policy/loss", "policy/grad_norm"]
    _trainer(tmp_path / "full", 4, regs()).fit(make_module(tiny_model_dir), make_data())
    first = _trainer(tmp_path / "a", 2, regs())
    first.fit(make_module(tiny_model_dir), make_data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    _trainer(tmp_path / "b", 4, regs()).fit(make_module(tiny_model_dir), make_data(), ckpt_path=str(ckpt))
    a, b = _series(tmp_path / "full", compared), _series(tmp_path / "b", compared)
    assert [round(a["reg/adaptive_entropy/coef"][s], 6) for s in range(4)] == [0.0, 0.01, 0.02, 0.03]
    for tag in compared:
        assert sorted(b[tag]) == [2, 3], tag
        for s in (2, 3):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def test_entropic_controller_resumes_exactly(tiny_model_dir, tmp_path):
    """EntroPIC's alpha, integral and pending measurement travel in the checkpoint: resumed at step
    2, alpha (its I term included) and the loss of steps 2-3 equal the uninterrupted run's; a
    controller restarted from scratch would apply alpha 0 at step 2."""
    def regs():
        return [EntroPIC(target=50.0, kp=0.001, ki=0.002, threshold=0.05)]

    compared = ["reg/entropic/alpha", "reg/entropic/integral", "reg/entropic/loss", "policy/loss", "policy/grad_norm"]
    _trainer(tmp_path / "full", 4, regs()).fit(make_module(tiny_model_dir), make_data())
    first = _trainer(tmp_path / "a", 2, regs())
    first.fit(make_module(tiny_model_dir), make_data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    _trainer(tmp_path / "b", 4, regs()).fit(make_module(tiny_model_dir), make_data(), ckpt_path=str(ckpt))
    a, b = _series(tmp_path / "full", compared), _series(tmp_path / "b", compared)
    assert a["reg/entropic/alpha"][0] == 0 and a["reg/entropic/alpha"][3] < a["reg/entropic/alpha"][2] < 0
    for tag in compared:
        assert sorted(b[tag]) == [2, 3], tag
        for s in (2, 3):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def test_siren_anchor_resumes_exactly(tiny_model_dir, tmp_path):
    """SIREN's measured anchor (H_bar of the run's first rollout) travels in the checkpoint:
    resumed at step 2, the anchor, its deviation and the loss of steps 2-3 equal the uninterrupted
    run's; a resume that re-measured it on step 2's rollout would hold a different anchor."""
    def regs():
        return [SIREN(coef=5.0, top_p=0.9, top_k=8, quantile=0.5)]

    compared = ["reg/siren/anchor", "reg/siren/deviation", "reg/siren/loss", "policy/loss", "policy/grad_norm"]
    kw = dict(update=dict(mini_batch_size=2))
    _trainer(tmp_path / "full", 4, regs()).fit(make_module(tiny_model_dir, **kw), make_data())
    first = _trainer(tmp_path / "a", 2, regs())
    first.fit(make_module(tiny_model_dir, **kw), make_data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    saved = [v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("SIREN")]
    assert len(saved) == 1 and saved[0]["anchor"] > 0
    _trainer(tmp_path / "b", 4, regs()).fit(make_module(tiny_model_dir, **kw), make_data(), ckpt_path=str(ckpt))
    a, b = _series(tmp_path / "full", compared), _series(tmp_path / "b", compared)
    assert len({round(a["reg/siren/anchor"][s], 12) for s in range(4)}) == 1
    assert a["reg/siren/anchor"][0] == pytest.approx(saved[0]["anchor"], rel=1e-6)
    assert all(a["reg/siren/deviation"][s] != 0 for s in (2, 3))
    for tag in compared:
        assert sorted(b[tag]) == [2, 3], tag
        for s in (2, 3):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def test_extending_a_finished_run_keeps_its_whole_run_schedule(tiny_model_dir, tmp_path, caplog):
    """A `steps: null` schedule is resolved when the run starts (a 3-step run: `final` at step 2).
    Extending a finished 3-step run to 5 steps must keep that anneal (the coefficient stays at
    `final`); re-resolving against the new max_steps would jump it back to mid-anneal (0.25 at step 3)."""
    from lit_covrl.regularizers import EntropyBonus

    def regs():
        return [EntropyBonus(coef=1.0, schedule={"name": "linear", "final": 0.0})]

    first = _trainer(tmp_path / "a", 3, regs())
    first.fit(make_module(tiny_model_dir), make_data())
    ckpt = tmp_path / "step3.ckpt"
    first.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["regularizer_schedule_steps"] == {"entropy_bonus": 2}
    with caplog.at_level("WARNING", logger="lit_covrl"):
        _trainer(tmp_path / "b", 5, regs()).fit(make_module(tiny_model_dir), make_data(), ckpt_path=str(ckpt))
    assert "annealed its schedule over 2 RL steps; keeping that length, not the 4 of this run's trainer.max_steps=5" in caplog.text
    coef = _series(tmp_path / "a", ["reg/entropy_bonus/coef"])["reg/entropy_bonus/coef"]
    assert [coef[s] for s in (0, 1, 2)] == [1.0, 0.5, 0.0]  # the first run: 1 -> 0 at its last step
    coef = _series(tmp_path / "b", ["reg/entropy_bonus/coef"])["reg/entropy_bonus/coef"]
    assert coef == {3: 0.0, 4: 0.0}


def _lr_warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))


@pytest.mark.parametrize("case", ["dynamic_sampling", "lr_warmup_and_annealed_bonus", "stacked_controls", "lopti_phases"])
def test_resume_is_bitwise_on_the_paths_with_more_state(case, tiny_model_dir, tmp_path):
    """Resumed at step 2 of 5, the run ends with the same weights, bit for bit, and logs the same
    metrics for steps 2-4 as the uninterrupted one: dynamic sampling (fresh prompt batches drawn per
    round), an LR scheduler's warmup with an annealed bonus, and five stacked controls with two
    PPO epochs (STEER, entropy advantage, 80/20 tokens, entropy-ratio clip, cosine-annealed Clip-Cov),
    and Lopti's two phases (4 optimizer updates per RL step, with AR and an LR warmup stepped per RL step)."""
    from lit_covrl.regularizers import (
        AdvantageReweighting, EntropyAdvantage, EntropyBonus, EntropyRatioClip, HighEntropyTokens, Lopti, SteerWeights,
    )

    module_kw, regs = {
        "dynamic_sampling": (dict(rollout=dict(filter_groups=True, max_gen_rounds=3)),
                             lambda: [ClipCov(ratio=0.2, lb=-1e9, ub=1e9)]),
        "lr_warmup_and_annealed_bonus": (dict(lr_scheduler=_lr_warmup, update=dict(mini_batch_size=2)),
                                         lambda: [EntropyBonus(coef=0.01, schedule={"name": "linear", "steps": 5})]),
        "stacked_controls": (dict(update=dict(mini_batch_size=2, ppo_epochs=2)),
                             lambda: [SteerWeights(), EntropyAdvantage(), HighEntropyTokens(top_frac=0.5), EntropyRatioClip(),
                                      ClipCov(ratio=0.2, lb=-1e9, ub=1e9, schedule={"name": "cosine", "steps": 5})]),
        "lopti_phases": (dict(lr_scheduler=_lr_warmup, update=dict(mini_batch_size=2)),
                         lambda: [AdvantageReweighting(alpha=0.3), Lopti(eta=0.06)]),
    }[case]
    full_module = make_module(tiny_model_dir, **module_kw)
    _trainer(tmp_path / "full", 5, regs()).fit(full_module, make_data())
    first = _trainer(tmp_path / "a", 2, regs())
    first.fit(make_module(tiny_model_dir, **module_kw), make_data())
    first.save_checkpoint(tmp_path / "step2.ckpt")
    torch.manual_seed(4321)
    resumed_module = make_module(tiny_model_dir, **module_kw)
    _trainer(tmp_path / "b", 5, regs()).fit(resumed_module, make_data(), ckpt_path=str(tmp_path / "step2.ckpt"))

    for p, q in zip(full_module.policy.parameters(), resumed_module.policy.parameters()):
        assert torch.equal(p, q)
    a, b = scalar_tags(tmp_path / "full"), scalar_tags(tmp_path / "b")
    timing = ("time/", "rollout/tokens_per_s")
    compared = [t for t in b if not t.startswith(timing)]
    assert len(compared) > 15
    for tag in compared:
        full = dict(a[tag])
        assert sorted(s for s, _ in b[tag]) == [s for s in sorted(full) if s >= 2], tag  # none missing or doubled
        for s, v in b[tag]:
            assert v == pytest.approx(full[s], rel=1e-6, abs=1e-7), (tag, s)
    if case == "dynamic_sampling":  # more than one round was drawn, so the regenerated batches resumed too
        assert max(v for _, v in a["rollout/gen_rounds"]) > 1


def test_a_checkpoint_from_before_last_step_schedules_keeps_its_timing_and_says_so(caplog):
    """A whole-run schedule used to be resolved to trainer.max_steps (final one step after the end);
    a checkpoint of such a run resumed with the same max_steps keeps that timing, and the warning
    says why instead of claiming another trainer.max_steps."""
    from types import SimpleNamespace

    from lit_covrl.regularizers import EntropyBonus

    reg = EntropyBonus(coef=1.0, schedule={"name": "linear", "final": 0.0})
    trainer = SimpleNamespace(max_steps=10)
    reg.setup(trainer, None, "fit")
    assert reg.schedule.steps == 9
    with caplog.at_level("WARNING", logger="lit_covrl"):
        reg.on_load_checkpoint(trainer, None, {"regularizer_schedule_steps": {"entropy_bonus": 10}})
    assert reg.schedule.steps == 10
    assert "not the 9 of this run's trainer.max_steps=10 (a checkpoint written before" in caplog.text
