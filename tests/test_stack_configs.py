"""Stacked method configs: what one does to another's settings is said or refused at start-up
(the pairs of every control: tests/test_stacking.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lit_covrl.cli import LitCovRLCLI
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK, CPU = CONFIGS / "quickstart.yaml", CONFIGS / "cpu"


def _cli(tmp_path, *configs: str, flags=()):
    args = ["--config", str(QUICK)]
    for name in configs:
        args += ["--config", str(CPU / f"{name}.yaml")]
    return LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                       args=[*args, *flags, "--trainer.logger.init_args.save_dir", str(tmp_path)])


def test_a_stacked_config_replacing_another_ones_loss_setting_is_said(tmp_path, caplog):
    """kl_cov.yaml trains KL-Cov on an unclipped surrogate (clip_low / clip_high null); steer.yaml,
    stacked after it, set clip_high 0.28 and the run was silently clipped above."""
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        objective = _cli(tmp_path, "kl_cov", "steer").model.objective
    assert (objective.clip_low, objective.clip_high) == (None, 0.28)  # the later file's value, as before
    said = [r.getMessage() for r in caplog.records if "model.loss.clip_high" in r.getMessage()]
    assert len(said) == 1 and f"--config {CPU / 'steer.yaml'} sets model.loss.clip_high=0.28 over --config " \
        f"{CPU / 'kl_cov.yaml'}'s None: the later file's value is trained" in said[0], caplog.text


@pytest.mark.parametrize("configs,flags", [(("steer",), ()), (("steer", "entropy_ratio_clip"), ()),
                                           (("kl_cov",), ("--model.loss.clip_high", "0.3"))],
                         ids=["over the base", "the same value", "a flag"])
def test_no_word_where_no_method_config_is_replaced(configs, flags, tmp_path, caplog):
    """A method config over the base config (its first file), two that agree, and a flag (explicit)."""
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        _cli(tmp_path, *configs, flags=flags)
    assert "the later file's value is trained" not in caplog.text, caplog.text


def test_two_stacked_configs_adding_the_same_callback_are_refused_naming_both(tmp_path):
    """archer.yaml and prorl.yaml each add a ReferenceKL: refused as "two regularizers are named
    'ref_kl'", naming neither file, with a remedy (name one ref_kl_2) that trains two KL penalties."""
    with pytest.raises(ValueError) as err:
        _cli(tmp_path, "archer", "prorl")
    assert str(err.value) == (f"--config {CPU / 'archer.yaml'} and --config {CPU / 'prorl.yaml'} both add a ReferenceKL: "
                              "stacked, the run would have two; keep the one you mean in a copy of one file (or give "
                              "the other init_args.name to train both)")


def test_one_config_adding_two_callbacks_of_one_class_is_left_to_the_stack_check(tmp_path):
    """Within one file two callbacks are the file's own choice: named apart, they stack."""
    two = tmp_path / "two.yaml"
    two.write_text("trainer:\n  callbacks:\n    - class_path: lit_covrl.regularizers.ClipCov\n"
                   "    - class_path: lit_covrl.regularizers.ClipCov\n      init_args:\n        name: clip_cov_2\n")
    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                      args=["--config", str(QUICK), "--config", str(CPU / "entropy_bonus.yaml"), "--config", str(two),
                            "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert [type(c).__name__ for c in cli.trainer.callbacks][:3] == ["EntropyBonus", "ClipCov", "ClipCov"]


@pytest.mark.parametrize("configs,message", [
    (("passk", "trajectory_gtpo"), "model.loss.pass_k=4 is invalid: is the k of model.loss.advantage='passk', not of "
     "'drgrpo' (model.loss.pass_k from --config {passk}; model.loss.advantage from --config {trajectory_gtpo})"),
    (("archer", "cispo"), "CISPO has no dual_clip: reset it with --model.loss.dual_clip null. (model.objective from "
     "--config {cispo}; model.loss.dual_clip from --config {archer})"),
], ids=["passk+trajectory_gtpo", "archer+cispo"])
def test_a_settings_refusal_of_two_stacked_configs_names_both_files(configs, message, tmp_path):
    """The refusal named the keys, not the files: after passk.yaml, trajectory_gtpo.yaml's `advantage:
    drgrpo` left passk's k behind, and the message never said where drgrpo came from."""
    with pytest.raises(ValueError) as err:
        _cli(tmp_path, *configs)
    assert str(err.value).endswith(message.format(**{name: CPU / f"{name}.yaml" for name in configs})), str(err.value)


def test_a_settings_refusal_of_one_config_is_left_as_it_was(tmp_path):
    with pytest.raises(ValueError) as err:
        _cli(tmp_path, "passk", flags=("--model.loss.unlikeliness", "0.25"))
    assert "--config" not in str(err.value)


def test_the_two_shifts_refusal_says_how_to_keep_one():
    """EntropyAdvantage beside TrajectoryGTPO (entropy_advantage.yaml + trajectory_gtpo.yaml) was told
    "keep one (raise its alpha instead)": TrajectoryGTPO has no alpha, and its shift goes with
    entropy_scale 0, which then stacks."""
    from lit_covrl.regularizers import EntropyAdvantage, TrajectoryGTPO
    from lit_covrl.regularizers.base import check_stack

    with pytest.raises(ValueError) as err:
        check_stack([EntropyAdvantage(), TrajectoryGTPO()])
    assert str(err.value) == (
        "2 regularizers shift the advantage ('entropy_advantage' (EntropyAdvantage), 'trajectory_gtpo' (TrajectoryGTPO)): "
        "their shifts add up and can flip the advantage's sign; keep one shift (of two EntropyAdvantage, one with a "
        "larger alpha; TrajectoryGTPO shifts nothing with entropy_scale 0)")
    check_stack([EntropyAdvantage(), TrajectoryGTPO(entropy_scale=0.0)])
