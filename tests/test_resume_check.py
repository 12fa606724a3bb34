"""Resuming with another configuration is said: the checkpoint keeps its run's components, and a
resume that changes the objective, a reward, the optimizer, a regularizer or a setting warns once,
naming each difference (and nothing when the run is resumed as it was started)."""
from __future__ import annotations

import pytest
import torch

from lit_covrl.objectives import CISPO
from lit_covrl.regularizers import ClipCov, EntropyBonus, KLCov
from lit_covrl.resume_check import CKPT_KEY, describe, differences
from tests.test_module import make_data, make_module
from tests.test_resume import _trainer


def _regs():
    return [ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=1), EntropyBonus(coef=0.01, schedule={"name": "linear", "final": 0.0})]


def _checkpoint(tiny_model_dir, tmp_path, **module_kw):
    first = _trainer(tmp_path / "a", 2, _regs())
    first.fit(make_module(tiny_model_dir, **module_kw), make_data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    return ckpt


def _resume(tiny_model_dir, tmp_path, ckpt, caplog, regs=None, **module_kw) -> str:
    caplog.clear()
    with caplog.at_level("WARNING", logger="lit_covrl.resume_check"):
        _trainer(tmp_path / "b", 3, regs if regs is not None else _regs()).fit(
            make_module(tiny_model_dir, **module_kw), make_data(), ckpt_path=str(ckpt))
    return caplog.text


def test_resume_names_each_changed_component_and_setting(tiny_model_dir, tmp_path, caplog):
    ckpt = _checkpoint(tiny_model_dir, tmp_path, objective=CISPO(clip_high=4.0))
    saved = torch.load(ckpt, weights_only=True)[CKPT_KEY]  # plain data: loads without pickled classes
    assert saved["model.objective"]["class_path"] == "lit_covrl.objectives.cispo.CISPO"
    assert saved["model.objective"]["init_args"]["clip_high"] == 4.0
    assert set(k for k in saved if k.startswith("trainer.callbacks")) == {
        "trainer.callbacks[clip_cov]", "trainer.callbacks[entropy_bonus]"}

    # resumed exactly as started: not a word (the whole-run schedule, the sampler resolved for
    # the device and the optimizer's defaults all compare equal)
    assert "differ from the checkpoint" not in _resume(tiny_model_dir, tmp_path, ckpt, caplog, objective=CISPO(clip_high=4.0))

    text = _resume(
        tiny_model_dir, tmp_path, ckpt, caplog,
        regs=[ClipCov(ratio=0.2, lb=-1e9, ub=1e9, seed=1), KLCov(ratio=0.1)],
        rollout=dict(group_size=2),
    )
    assert "differ from the checkpoint" in text
    assert "model.objective: lit_covrl.objectives.cispo.CISPO -> lit_covrl.objectives.base.PPOClip" in text
    assert "trainer.callbacks[clip_cov].init_args.ratio: 0.1 -> 0.2" in text
    assert "trainer.callbacks[entropy_bonus]: removed (lit_covrl.regularizers.dense.EntropyBonus)" in text
    assert "trainer.callbacks[kl_cov]: added (lit_covrl.regularizers.covariance.KLCov)" in text
    assert "model.rollout.group_size: 4 -> 2" in text


def test_a_changed_learning_rate_is_said_to_take_no_effect(tiny_model_dir, tmp_path, caplog):
    """The restored optimizer state brings the checkpoint's learning rate back (torch's
    load_state_dict replaces the param groups' hyperparameters): the warning says so, and it is true."""
    ckpt = _checkpoint(tiny_model_dir, tmp_path)
    seen = {}

    module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
    orig = module.on_train_start

    def spy():
        orig()
        seen["lr"] = module.trainer.optimizers[0].param_groups[0]["lr"]

    module.on_train_start = spy
    with caplog.at_level("WARNING", logger="lit_covrl.resume_check"):
        _trainer(tmp_path / "b", 3, _regs()).fit(module, make_data(), ckpt_path=str(ckpt))
    assert "take no effect" in caplog.text
    assert caplog.text.index("take no effect") < caplog.text.index("model.optimizer.init_args.lr: 0.03 -> 0.005")
    assert seen["lr"] == 0.03  # what the note claims


def test_describe_keeps_constructor_arguments_not_runtime_state():
    reg = EntropyBonus(coef=0.5)
    reg._coef_now = 0.25  # runtime state, under a private name
    assert describe(reg)["init_args"]["coef"] == 0.5
    assert "_coef_now" not in describe(reg)["init_args"]
    assert describe(describe) == {"class_path": "lit_covrl.resume_check.describe"}


def test_describe_has_every_constructor_argument_of_each_shipped_regularizer():
    """HPARAMS' regularizers column and the resume warning read `describe`: a setting kept under
    another name (Archer's clip ranges as tuples, SimKO's top_k as needs_topk) was missing from
    both, so a sweep over it gave runs that could not be told apart."""
    import inspect

    import lit_covrl.regularizers as R

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for cls in [getattr(R, n) for n in R.__all__]:
        if not (inspect.isclass(cls) and issubclass(cls, R.Regularizer)) or cls is R.Regularizer:
            continue
        params = [n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind in kinds]
        required = {"OutcomeExploration": dict(historical=1.0, batch=0.5)}.get(cls.__name__, {})  # no paper default
        missing = [n for n in params if n not in describe(cls(**required))["init_args"]]
        assert not missing, f"{cls.__name__}: {missing}"
    before = {"trainer.callbacks[archer]": describe(R.Archer()), "trainer.callbacks[simko]": describe(R.SimKO())}
    after = {"trainer.callbacks[archer]": describe(R.Archer(high_entropy_clip_high=0.3)),
             "trainer.callbacks[simko]": describe(R.SimKO(top_k=5))}
    assert differences(before, after) == ["trainer.callbacks[archer].init_args.high_entropy_clip_high: 0.5 -> 0.3",
                                          "trainer.callbacks[simko].init_args.top_k: 3 -> 5"]


def test_differences_by_hand():
    a = {"model.objective": {"class_path": "x.PPOClip", "init_args": {"clip_low": 0.2, "clip_high": 0.2}},
         "model.rollout.group_size": 8, "trainer.callbacks[kl]": {"class_path": "x.KLCov", "init_args": {}}}
    b = {"model.objective": {"class_path": "x.PPOClip", "init_args": {"clip_low": 0.2, "clip_high": 0.28}},
         "model.rollout.group_size": 8, "data.seed": 1}
    assert differences(a, b) == [
        "model.objective.init_args.clip_high: 0.2 -> 0.28",
        "trainer.callbacks[kl]: removed (x.KLCov)",
        "data.seed: added (1)",
    ]
    assert differences(a, a) == []


def test_cli_resume_with_another_config_names_the_objective(tmp_path, caplog):
    """The README's resume command after a run started with configs/cpu/cispo.yaml: the objective is
    not a saved hyperparameter, so the plain command silently trained PPOClip from then on."""
    from pathlib import Path

    from lit_covrl.cli import main

    root = Path(__file__).resolve().parents[1]
    quick, cispo = str(root / "configs/quickstart.yaml"), str(root / "configs/cpu/cispo.yaml")
    common = ["--trainer.val_check_interval", "1000", "--trainer.enable_progress_bar", "false", "--torch_threads", "1"]
    main(["fit", "--config", quick, "--config", cispo, "--trainer.max_steps", "1",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "a"), *common])
    ckpt = next((tmp_path / "a").rglob("last.ckpt"))
    for configs, expect in (([quick, cispo], False), ([quick], True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="lit_covrl"):
            main(["fit", *[a for c in configs for a in ("--config", c)], "--trainer.max_steps", "2",
                  "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", str(tmp_path / "b"), *common])
        assert ("model.objective: lit_covrl.objectives.cispo.CISPO -> lit_covrl.objectives.base.PPOClip" in caplog.text) is expect
        assert ("differ from the checkpoint" in caplog.text) is expect, caplog.text


def test_resuming_every_regularizer_unchanged_says_nothing(tiny_model_dir, tmp_path, caplog):
    """No false alarm: each shipped regularizer's description (constructor arguments it keeps
    under their own names) must not change by training, or every resume would warn."""
    from lit_covrl.regularizers import (
        AdaptiveEntropyBonus, EntropyAdvantage, EntropyRatioClip, HighEntropyTokens, ReferenceKL, SteerWeights,
    )

    def regs():
        return [ClipCov(ratio=0.1, lb=-1e9, ub=1e9), KLCov(ratio=0.1), EntropyBonus(coef=0.01),
                ReferenceKL(beta=0.01), AdaptiveEntropyBonus(target=5.0, delta=0.01), EntropyAdvantage(),
                HighEntropyTokens(), SteerWeights(), EntropyRatioClip()]

    kw = dict(update=dict(mini_batch_size=2))
    first = _trainer(tmp_path / "a", 2, regs())
    first.fit(make_module(tiny_model_dir, **kw), make_data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    assert len([k for k in torch.load(ckpt, weights_only=True)[CKPT_KEY] if k.startswith("trainer.callbacks")]) == 9
    assert "differ from the checkpoint" not in _resume(tiny_model_dir, tmp_path, ckpt, caplog, regs=regs(), **kw)


def test_a_setting_newer_than_the_checkpoint_is_not_called_a_change(tiny_model_dir, tmp_path, caplog):
    """A checkpoint written before a setting existed (here: rollout.sampling_batch_size and the
    data's seed taken out of it) lacks the key; that run behaved as the default does. Resuming it
    said `model.rollout.sampling_batch_size: added (None)`; a real change is still said."""
    ckpt = _checkpoint(tiny_model_dir, tmp_path)
    old = torch.load(ckpt, weights_only=False)
    del old["hyper_parameters"]["rollout"]["sampling_batch_size"]
    del old["datamodule_hyper_parameters"]["seed"]
    torch.save(old, ckpt)
    assert "differ from the checkpoint" not in _resume(tiny_model_dir, tmp_path, ckpt, caplog)
    text = _resume(tiny_model_dir, tmp_path, ckpt, caplog, rollout=dict(group_size=2))
    assert "model.rollout.group_size: 4 -> 2" in text and "sampling_batch_size" not in text
    # set to other than its default now: that is a change from how the old run behaved
    text = _resume(tiny_model_dir, tmp_path, ckpt, caplog, rollout=dict(sampling_batch_size=8))
    assert "model.rollout.sampling_batch_size: None -> 8" in text


def test_an_older_explicit_recompute_setting_is_compared_with_what_null_means_here(tiny_model_dir, tmp_path, caplog,
                                                                                   monkeypatch):
    """Checkpoints before recompute_logprobs defaulted to null saved False: resumed in float32
    (null = off) nothing changes, and the warning said `False -> None`; resumed in bf16 it is on,
    and the warning says so (the run's old log-probs now come from the training forward)."""
    from lit_covrl.module import GRPOModule

    ckpt = _checkpoint(tiny_model_dir, tmp_path)
    old = torch.load(ckpt, weights_only=False)
    old["hyper_parameters"]["update"]["recompute_logprobs"] = False
    torch.save(old, ckpt)
    assert "differ from the checkpoint" not in _resume(tiny_model_dir, tmp_path, ckpt, caplog)
    with monkeypatch.context() as patch:
        patch.setattr(GRPOModule, "recompute_logprobs_on", property(lambda self: True))  # null resolved under bf16
        text = _resume(tiny_model_dir, tmp_path, ckpt, caplog)
        assert "model.update.recompute_logprobs: False -> True" in text and "(resolved)" not in text  # said once
    old["hyper_parameters"]["update"]["recompute_logprobs"] = True
    torch.save(old, ckpt)
    assert "model.update.recompute_logprobs: True -> False" in _resume(tiny_model_dir, tmp_path, ckpt, caplog)


def test_a_changed_precision_is_named_with_what_null_recompute_now_means(tiny_model_dir, tmp_path, caplog):
    """A float32 run resumed with trainer.precision bf16-mixed: the compute precision changes and
    `recompute_logprobs: null` turns on from the resumed step, and the resume said nothing (the
    checkpoint's settings keep null either way). A checkpoint from before they were kept lacks both:
    not called a change."""
    ckpt = _checkpoint(tiny_model_dir, tmp_path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lit_covrl.resume_check"):
        _trainer(tmp_path / "b", 3, _regs(), precision="bf16-mixed").fit(
            make_module(tiny_model_dir), make_data(), ckpt_path=str(ckpt))
    assert "take effect from now on" in caplog.text
    assert "trainer.precision: '32-true' -> 'bf16-mixed'" in caplog.text
    assert "model.update.recompute_logprobs (resolved): False -> True" in caplog.text
    saved = torch.load(ckpt, weights_only=True)[CKPT_KEY]
    assert saved["trainer.precision"] == "32-true" and saved["model.update.recompute_logprobs (resolved)"] is False
    old = torch.load(ckpt, weights_only=False)
    del old[CKPT_KEY]["trainer.precision"], old[CKPT_KEY]["model.update.recompute_logprobs (resolved)"]
    torch.save(old, ckpt)
    assert "differ from the checkpoint" not in _resume(tiny_model_dir, tmp_path, ckpt, caplog)


def test_changed_optimizer_arguments_are_said_to_take_no_effect_and_saved_as_used(tiny_model_dir, tmp_path, caplog):
    """torch's load_state_dict replaces every hyperparameter of the param groups, not only lr: a
    weight_decay or betas changed for the resume was listed as 'take effect from now on' while the run
    trained with the checkpoint's, and its own checkpoints then recorded the unused values. So is a
    regularizer's seed (its random state is restored)."""
    ckpt = _checkpoint(tiny_model_dir, tmp_path)
    regs = [ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=2), EntropyBonus(coef=0.01, schedule={"name": "linear", "final": 0.0})]
    module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=0.03, weight_decay=0.1, betas=(0.8, 0.9)))
    caplog.clear()
    with caplog.at_level("WARNING", logger="lit_covrl.resume_check"):
        trainer = _trainer(tmp_path / "b", 3, regs)
        trainer.fit(module, make_data(), ckpt_path=str(ckpt))
    text = caplog.text
    moot = text[text.index("take no effect"):]
    for line in ("model.optimizer.init_args.weight_decay: 0.01 -> 0.1", "model.optimizer.init_args.betas: [0.9, 0.999] -> [0.8, 0.9]",
                 "trainer.callbacks[clip_cov].init_args.seed: 1 -> 2"):
        assert line in moot, line
    group = trainer.optimizers[0].param_groups[0]
    assert group["weight_decay"] == 0.01 and tuple(group["betas"]) == (0.9, 0.999)  # what the warning claims
    resaved = tmp_path / "resaved.ckpt"
    trainer.save_checkpoint(resaved)
    args = torch.load(resaved, weights_only=True)[CKPT_KEY]["model.optimizer"][0]["init_args"]
    assert args["weight_decay"] == 0.01 and args["betas"] == [0.9, 0.999] and args["lr"] == 0.03


def test_another_optimizer_class_is_refused_on_resume(tiny_model_dir, tmp_path):
    """AdamW -> SGD failed after a whole rollout with KeyError: 'momentum'; AdamW -> Adam silently
    stayed AdamW (the restored param groups)."""
    ckpt = _checkpoint(tiny_model_dir, tmp_path)
    module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.03))
    with pytest.raises(ValueError, match=r"model.optimizer: torch.optim.sgd.SGD cannot continue the checkpoint's "
                                         r"torch.optim.adamw.AdamW"):
        _trainer(tmp_path / "b", 3, _regs()).fit(module, make_data(), ckpt_path=str(ckpt))


def test_an_argument_on_one_side_only_is_the_codes_change_not_the_runs():
    """A checkpoint of an older version describes AdaptiveEntropyBonus with its running state (coef,
    active) and without init_coef: resumed unchanged, that is not a difference; a changed value is."""
    from lit_covrl.regularizers import AdaptiveEntropyBonus

    path = "lit_covrl.regularizers.entropy_shaping.AdaptiveEntropyBonus"
    old = {"trainer.callbacks[adaptive_entropy]": {"class_path": path, "init_args": {
        "target": 0.2, "delta": 1e-4, "min_coef": 0.0, "max_coef": 0.005, "coef": 0.004, "active": True,
        "name": "adaptive_entropy"}}}
    now = {"trainer.callbacks[adaptive_entropy]": describe(AdaptiveEntropyBonus(target=0.2))}
    assert differences(old, now) == []
    now = {"trainer.callbacks[adaptive_entropy]": describe(AdaptiveEntropyBonus(target=0.3, init_coef=0.001))}
    assert differences(old, now) == [
        "trainer.callbacks[adaptive_entropy].init_args.target: 0.2 -> 0.3",
        "trainer.callbacks[adaptive_entropy].init_args.init_coef: 0.0 -> 0.001",
    ]


def _cosine(t_max):
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)


def test_changed_scheduler_arguments_are_said_to_take_no_effect_and_another_class_is_refused(tiny_model_dir, tmp_path,
                                                                                              caplog):
    """The restored scheduler state brings back its arguments: T_max 4 -> 400 on resume was not listed
    at all (the checkpoint kept the class path only) and the run went on with T_max 4; a class swap
    left the learning rate at the restored value, neither schedule (review resume25 F2). So does an
    adaptive coefficient's init_coef (its coefficient is restored, F3)."""
    from lit_covrl.regularizers import AdaptiveEntropyBonus

    def regs(init):
        return [AdaptiveEntropyBonus(target=0.5, init_coef=init, max_coef=0.1)]

    first = _trainer(tmp_path / "a", 2, regs(0.01))
    first.fit(make_module(tiny_model_dir, lr_scheduler=_cosine(4)), make_data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)[CKPT_KEY]["model.lr_scheduler"]
    assert saved == [{"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 4, "eta_min": 0.0}}]
    caplog.clear()
    module = make_module(tiny_model_dir, lr_scheduler=_cosine(400))
    with caplog.at_level("WARNING", logger="lit_covrl.resume_check"):
        trainer = _trainer(tmp_path / "b", 3, regs(0.05))
        trainer.fit(module, make_data(), ckpt_path=str(ckpt))
    moot = caplog.text[caplog.text.index("take no effect"):]
    for line in ("model.lr_scheduler.init_args.T_max: 4 -> 400", "trainer.callbacks[adaptive_entropy].init_args.init_coef: 0.01 -> 0.05"):
        assert line in moot, line
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == 4  # what the warning says
    swap = make_module(tiny_model_dir, lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0))
    with pytest.raises(ValueError, match=r"model.lr_scheduler: torch.optim.lr_scheduler.ConstantLR cannot continue the "
                                         r"checkpoint's torch.optim.lr_scheduler.CosineAnnealingLR"):
        _trainer(tmp_path / "c", 3, regs(0.01)).fit(swap, make_data(), ckpt_path=str(ckpt))


def test_a_changed_global_seed_is_said_to_take_no_effect(tiny_model_dir, tmp_path, caplog, monkeypatch):
    """`--seed_everything 1` on resume was not mentioned; the run is the checkpoint's, every random
    state restored (review resume25 F4)."""
    from lightning.pytorch import seed_everything

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    seed_everything(0)
    ckpt = _checkpoint(tiny_model_dir, tmp_path)
    assert torch.load(ckpt, weights_only=True)[CKPT_KEY]["seed_everything"] == "0"
    seed_everything(1)
    text = _resume(tiny_model_dir, tmp_path, ckpt, caplog)
    assert "seed_everything: '0' -> '1'" in text[text.index("take no effect"):], text
