"""Every YAML under configs/ parses and instantiates through the real CLI (no training run).

Method overlays are stacked on their base (quickstart or the 7B recipe), as the README shows.
Paper recipes name hub models and data files that do not exist offline: the test points them
at a local tiny model and a temp JSONL file, which is all that instantiation needs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_covrl.cli import LitCovRLCLI
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule
from lit_covrl.regularizers import Regularizer
from lit_covrl.tasks.reasoning import ReasoningReward

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = CONFIGS / "quickstart.yaml"
R7 = CONFIGS / "paper" / "qwen2.5-7b.yaml"
F7 = CONFIGS / "fsdp" / "qwen2.5-7b.yaml"
CPU_METHODS = ("grpo", "entropy_bonus", "clip_cov", "kl_cov", "high_entropy_tokens", "adaptive_entropy", "steer",
               "entropy_advantage", "entropy_ratio_clip", "gspo", "cispo", "ce_gppo", "qae", "w_reinforce", "passk",
               "entropic", "archer", "simko", "lp_reg", "unlikeliness", "siren", "bapo", "era", "aent", "aepo",
               "trajectory_gtpo", "prorl", "outcome", "dcpo", "dcpo_no_smoothing", "ar", "lopti", "ar_lopti", "aspo",
               "rl_zvp", "epo")
REASONING_METHODS = ("grpo", "grpo_low_lr", "entropy_bonus", "entropy_bonus_high", "adaptive_entropy", "clip_cov",
                     "clip_cov_high", "clip_cov_annealed", "kl_cov", "kl_cov_high", "high_entropy_tokens", "steer",
                     "entropy_advantage", "entropy_ratio_clip", "budget_1h", "budget_collapse", "qae", "w_reinforce", "w_reinforce_high_lr", "gspo", "cispo",
                     "ce_gppo", "passk", "entropic", "entropic_kp50", "archer", "simko", "lp_reg", "unlikeliness", "siren", "bapo",
                     "era", "aent", "aepo", "trajectory_gtpo", "prorl", "outcome", "outcome_advantage", "dcpo",
                     "dcpo_clip_only", "ar", "lopti", "ar_lopti", "aspo", "rl_zvp", "epo")
EXPERIMENTS = ("grpo_low_lr", "entropy_bonus_high", "clip_cov_annealed", "clip_cov_high", "clip_cov_lowlb", "kl_cov_high",
               "entropic_kp5", "lp_reg_neg10", "siren_high", "prorl_without_kl", "prorl_on_stall",
               "prorl_beta01_fixed", "prorl_beta01_every50", "prorl_beta01_on_stall", "aspo_archer")
STACKS = {
    "quickstart.yaml": [QUICK],
    "reasoning.yaml": [CONFIGS / "reasoning.yaml"],
    **{f"reasoning/{m}.yaml": [CONFIGS / "reasoning.yaml", CONFIGS / "reasoning" / f"{m}.yaml"]
       for m in REASONING_METHODS},
    **{f"cpu/{m}.yaml": [QUICK, CONFIGS / "cpu" / f"{m}.yaml"] for m in CPU_METHODS},
    **{f"experiments/{m}.yaml": [QUICK, CONFIGS / "experiments" / f"{m}.yaml"] for m in EXPERIMENTS},
    "samplers/static_cache.yaml": [QUICK, CONFIGS / "samplers" / "static_cache.yaml"],
    "paper/qwen2.5-7b.yaml": [R7],
    "paper/qwen2.5-32b.yaml": [R7, CONFIGS / "paper" / "qwen2.5-32b.yaml"],
    "paper/clip_cov_7b.yaml": [R7, CONFIGS / "paper" / "clip_cov_7b.yaml"],
    "paper/kl_cov_7b.yaml": [R7, CONFIGS / "paper" / "kl_cov_7b.yaml"],
    "paper/kl_cov_32b.yaml": [R7, CONFIGS / "paper" / "kl_cov_32b.yaml"],
    "fsdp/qwen2.5-7b.yaml": [R7, F7],
    "fsdp/qwen2.5-32b.yaml": [R7, CONFIGS / "paper" / "qwen2.5-32b.yaml", F7, CONFIGS / "fsdp" / "qwen2.5-32b.yaml"],
    "fsdp/nodes-2.yaml": [R7, F7, CONFIGS / "fsdp" / "nodes-2.yaml"],
    "fsdp/nodes-4.yaml": [R7, F7, CONFIGS / "fsdp" / "nodes-4.yaml"],
    "fsdp/qwen2.5-1.5b-1gpu.yaml": [R7, CONFIGS / "fsdp" / "qwen2.5-1.5b-1gpu.yaml"],
}


def test_every_config_file_is_covered():
    on_disk = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    extra = {"smollm2_math.yaml"} & on_disk  # owned by tests/test_smollm2.py
    assert on_disk - extra == set(STACKS), "add new configs to STACKS"


@pytest.mark.parametrize("name", sorted(STACKS))
def test_config_instantiates(name, tmp_path, tiny_model_dir):
    args = []
    for cfg in STACKS[name]:
        args += ["--config", str(cfg)]
    if STACKS[name][0] == R7:
        rows = tmp_path / "math.jsonl"
        rows.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
        args += ["--model.model", tiny_model_dir, "--data.train_files", json.dumps([str(rows)]),
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.precision", "32-true"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, args=args, run=False)
    assert isinstance(cli.model, GRPOModule) and isinstance(cli.datamodule, PromptDataModule)
    regs = [cb for cb in cli.trainer.callbacks if isinstance(cb, Regularizer)]
    expected = {"experiments/aspo_archer.yaml": 2, "cpu/archer.yaml": 2, "reasoning/archer.yaml": 2, "cpu/dcpo.yaml": 2, "reasoning/dcpo.yaml": 2, "cpu/grpo.yaml": 0, "experiments/grpo_low_lr.yaml": 0, "experiments/prorl_without_kl.yaml": 0, "cpu/gspo.yaml": 0, "cpu/cispo.yaml": 0, "reasoning/gspo.yaml": 0, "reasoning/cispo.yaml": 0, "cpu/ce_gppo.yaml": 0, "reasoning/ce_gppo.yaml": 0, "cpu/aspo.yaml": 0, "reasoning/aspo.yaml": 0, "quickstart.yaml": 0, "reasoning.yaml": 0, "reasoning/grpo_low_lr.yaml": 0, "reasoning/grpo.yaml": 0, "reasoning/budget_1h.yaml": 0,
                "reasoning/budget_collapse.yaml": 0, "cpu/qae.yaml": 0, "reasoning/qae.yaml": 0,
                "cpu/passk.yaml": 0, "reasoning/passk.yaml": 0, "cpu/unlikeliness.yaml": 0, "reasoning/unlikeliness.yaml": 0,
                "paper/qwen2.5-7b.yaml": 0, "paper/qwen2.5-32b.yaml": 0, "cpu/ar_lopti.yaml": 2,
                "reasoning/ar_lopti.yaml": 2}
    expected["samplers/static_cache.yaml"] = 0  # an overlay choosing the sampler, no regularizer
    expected.update({k: 0 for k in STACKS if k.startswith("fsdp/")})  # base recipes, no method
    assert len(regs) == expected.get(name, 1)
    if name == "paper/qwen2.5-32b.yaml":
        assert cli.model.settings.update.micro_batch_size == 2
    if name.endswith(("/gspo.yaml", "/cispo.yaml")):  # the objective is built from its class_path
        assert type(cli.model.objective).__name__ == name.split("/")[-1].split(".")[0].upper()
        assert cli.model.objective.clip_high == (4e-4 if name.endswith("gspo.yaml") else 0.28)
    if name.endswith("ce_gppo.yaml"):  # the reference recipe's values (Kwai-Klear/CE-GPPO, 7B)
        obj = cli.model.objective
        assert type(obj).__name__ == "CEGPPO" and (obj.beta1, obj.beta2, obj.dual_clip) == (0.75, 1.0, 10.0)
        assert (obj.clip_low, obj.clip_high) == (0.2, 0.2)
    if name.endswith(("/ar.yaml", "/lopti.yaml", "/ar_lopti.yaml")):  # the reference scripts' alpha and eta
        knobs = {type(r).__name__: getattr(r, "alpha", getattr(r, "eta", None)) for r in regs}
        assert knobs == {"ar.yaml": {"AdvantageReweighting": 0.2}, "lopti.yaml": {"Lopti": 0.4},
                         "ar_lopti.yaml": {"AdvantageReweighting": 0.3, "Lopti": 0.5}}[name.split("/")[-1]]
    if name.endswith("/rl_zvp.yaml"):  # the paper's alpha, and nothing that drops its all-equal groups
        assert [(type(r).__name__, r.alpha) for r in regs] == [("RLZVP", 0.1)]
        assert not cli.model.settings.rollout.filter_groups
    if name.endswith("/epo.yaml"):  # the authors' ppo_trainer.yaml values, smoothing weighted over 150 steps
        (reg,) = regs
        assert (type(reg).__name__, reg.entropy_coef, reg.smooth_coef, reg.low_ratio, reg.high_ratio, reg.penalty,
                reg.phase_weighting, reg.phase_steps) == ("EPO", 1e-3, 1.0, 0.8, 1.2, 0.1, True, 150)
    if name.endswith("aspo.yaml"):  # the reference code's values (wizard-III/Archer2.0)
        obj = cli.model.objective
        assert type(obj).__name__ == "ASPO" and (obj.clip_low, obj.clip_high, obj.dual_clip) == (0.2, 0.2, 3.0)
    if name.endswith("entropic.yaml"):  # the reference recipe's gains and threshold; the target per task
        (reg,) = regs
        assert (reg.kp, reg.ki, reg.threshold) == (1.0, 0.01, 0.95)
        assert reg.target == (0.5 if name.startswith("cpu/") else 0.085)
    if name.endswith("simko.yaml"):  # the reference recipe's values (CLR-Lab/SimKO) and its code's 1.1
        (simko,) = regs
        assert (simko.needs_topk, simko.mix_topk_coef, simko.tau, simko.incorrect_top1_scale) == (3, 0.01, 0.8, 1.1)
    if name.endswith("lp_reg.yaml"):  # the reference recipes' values (CarlanLark/Lp-Reg-dev, Qwen3-14B)
        (lp,) = regs
        assert (lp.beta, lp.needs_min_p, lp.neg_ratio, lp.pos_ratio) == (1.0, 0.02, 0.01, 0.0)
    if name.endswith("siren.yaml"):  # the reference recipe's values (Linn3a/siren, exp_scripts/siren.sh)
        (siren,) = regs
        assert (siren.coef, siren.top_p, siren.top_k, siren.quantile, siren.anchor) == (0.005, 0.8, 10000, 0.8, None)
        assert siren.needs_topp_entropy == (0.8, 10000)
    if name.endswith("archer.yaml"):  # the reference recipe's values (wizard-III/ArcherCodeR), with its ref KL
        archer, kl = regs
        aspo = name.endswith("aspo_archer.yaml")  # Archer2.0's loss: ASPO, 0.4 on high-entropy tokens, no dual_clip key
        assert (archer.quantile, archer.low_entropy, archer.high_entropy) == (0.8, (0.2, 0.2), (0.4,) * 2 if aspo else (0.5,) * 2)
        assert archer.high_entropy_kl_scale == 0.0 and (kl.beta, kl.estimator) == (1e-3, "k3")
        assert cli.model.settings.loss.dual_clip == (None if aspo else 10.0)
        assert type(cli.model.objective).__name__ == ("ASPO" if aspo else "PPOClip")
    if name.endswith("dcpo.yaml"):  # the reference recipe's values (lime-RL/DCPO, run_dcpo.sh / run_base.sh)
        clip, adv = regs
        assert (type(clip).__name__, type(adv).__name__) == ("DCPOClip", "DCPOAdvantage")
        assert (clip.eps_low, clip.eps_high, clip.max_ratio) == (0.2, 0.28, 10.0)
        loss = cli.model.settings.loss
        assert (loss.dual_clip, loss.loss_agg_mode, loss.advantage) == (10.0, "seq-mean-token-mean", "grpo")
    if name.endswith("bapo.yaml"):  # the reference recipe's values (WooooDyy/BAPO, run_bapo_example.sh)
        (bapo,) = regs
        assert (bapo.target, bapo.low_start, bapo.low_max, bapo.low_step) == (0.5, 0.8, 0.95, 0.05)
        assert (bapo.high_start, bapo.high_max, bapo.high_step, bapo.eps) == (1.2, 2.0, 0.1, 1e-8)
        assert cli.model.settings.loss.dual_clip == 3.0 and type(cli.model.objective).__name__ == "PPOClip"
    if name.endswith("era.yaml"):  # the reference recipe's values (nothingbutbut/era, qwen_7b_era_topk_scale.sh)
        (era,) = regs
        assert (era.low, era.high, era.k, era.top_frac, era.scale_advantages) == (0.45, 3.0, 2.0, 0.2, True)
        assert era.needs_logit_scales == (2.0, 0.5) and type(cli.model.objective).__name__ == "PPOClip"
    if name.endswith("aepo.yaml"):  # the authors' TrainerConfig / qwen-math-7b-AEPO.sh and ray_trainer.py's constants
        (aepo,) = regs
        assert (aepo.target_entropy, aepo.temperature_high, aepo.temperature_low) == (0.5, 1.2, 0.8)
        assert (aepo.sample_num, aepo.prompt_frac, aepo.adv_threshold, aepo.draws_rollout) == (60, 0.25, 0.05, True)
    if name.endswith("aent.yaml"):  # the author's MATH run (antgroup/AEnt, recipe/aent/run_aent_math.sh)
        (aent,) = regs
        assert (aent.init_coef, aent.clamp_p, aent.needs_clamped_entropy, aent.adaptive) == (2e-3, 0.33, 0.33, True)
        assert (aent.entropy_low, aent.entropy_high, aent.coef_lr) == (0.15, 0.24, 2e-3)
        assert (aent.min_coef, aent.max_coef, aent.warmup_steps, aent.needs_entropy) == (6e-4, 9e-3, 30, False)
    if name.endswith("trajectory_gtpo.yaml"):  # the authors' code (winstonsmith1897/GTPO, config.yaml gtpo_runtime)
        (gtpo,) = regs
        assert (gtpo.positive_weight, gtpo.entropy_threshold, gtpo.entropy_scale, gtpo.count_norm) == (2.0, 0.7, 0.1, True)
        assert cli.model.settings.loss.advantage == "drgrpo" and type(cli.model.objective).__name__ == "PPOClip"
        assert not any(type(r).__name__ == "ReferenceKL" for r in regs)  # GTPO drops the KL to a reference
    if name.endswith("prorl.yaml"):  # ProRL (Liu et al. 2025): resets of the reference; the paper's clip and temperature
        (kl,) = regs
        assert (kl.beta, kl.estimator, kl.reset_optimizer) == (1e-3, "k3", True)
        assert kl.reset_every == (50 if name.startswith("cpu/") else 25)
        ro, loss = cli.model.settings.rollout, cli.model.settings.loss
        assert (ro.temperature, ro.filter_groups, loss.clip_low, loss.clip_high) == (1.2, True, 0.2, 0.4)
        assert loss.loss_agg_mode == "token-mean" and type(cli.model.objective).__name__ == "PPOClip"
    if name.endswith("outcome.yaml"):  # chosen here: the paper's values could not be read (README)
        (oe,) = regs
        assert (oe.historical, oe.batch, oe.apply, oe.responses, oe.shapes_outcome) == (0.5, 0.5, "reward", "all", True)
    if name.endswith("qae.yaml"):
        assert cli.model.settings.loss.baseline_quantile == 0.4 and cli.model.settings.loss.advantage == "grpo"
    if name.endswith("passk.yaml"):  # k of the paper's main setting, below the testbeds' group size 8
        loss = cli.model.settings.loss
        assert (loss.advantage, loss.pass_k, cli.model.settings.rollout.group_size) == ("passk", 4, 8)
    if name.endswith("unlikeliness.yaml"):  # the reference recipe's rank_penalty, on top of the testbed's GRPO
        loss = cli.model.settings.loss
        assert (loss.unlikeliness, loss.advantage, cli.model.settings.update.ppo_epochs) == (0.25, "grpo", 1)
    if name.startswith("reasoning"):
        assert isinstance(cli.model.reward, ReasoningReward) and cli.model.reward.check_steps
        assert cli.datamodule.task.name == "reasoning" and cli.model.hparams.model == "lit_covrl:tiny-reasoning"
    if name.endswith("kl_cov.yaml") or "kl_cov_" in name:
        assert cli.model.settings.loss.clip_low is None and cli.model.settings.loss.clip_high is None


@pytest.mark.parametrize("stack,nodes,batch,mini", [
    ([R7, F7], 1, 32, 4),
    ([R7, F7, CONFIGS / "fsdp" / "nodes-2.yaml"], 2, 16, 2),
    ([R7, F7, CONFIGS / "fsdp" / "nodes-4.yaml"], 4, 8, 1),
])
def test_fsdp_overlays_keep_the_paper_global_batch(stack, nodes, batch, mini):
    """The FSDP recipes as written (strategy not overridden): FSDP2 strategy, 8 GPUs x nodes,
    and per-device sizes whose product with the world size is the paper's 256 / 32 prompts."""
    import yaml

    from lit_covrl.sharding import FSDP2Strategy

    merged: dict = {}
    for path in stack:
        _merge(merged, yaml.safe_load(path.read_text()))
    strategy = merged["trainer"]["strategy"]
    cls = strategy["class_path"].rsplit(".", 1)
    assert cls == ["lit_covrl.sharding", "FSDP2Strategy"]
    assert isinstance(FSDP2Strategy(**strategy.get("init_args", {})), FSDP2Strategy)
    world = merged["trainer"]["devices"] * merged["trainer"]["num_nodes"]
    assert merged["trainer"]["num_nodes"] == nodes
    assert (merged["data"]["batch_size"], merged["model"]["update"]["mini_batch_size"]) == (batch, mini)
    assert batch * world == 256 and mini * world == 32
    assert merged["model"]["system"]["fsdp_mixed_precision"] == "bf16" and merged["trainer"]["precision"] == "32-true"


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and "class_path" not in v:
            _merge(into[k], v)
        else:
            into[k] = v


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.loss.advantage", "foo"], "model.loss.advantage='foo' is invalid"),
        (["--config", str(CONFIGS / "cpu" / "clip_cov.yaml"), "--trainer.callbacks.lb", "6"], "ClipCov needs lb < ub"),
        (["--config", str(CONFIGS / "cpu" / "kl_cov.yaml"), "--trainer.callbacks.ratio", "0"], "KLCov.ratio must be in (0, 1]"),
        (["--config", str(CONFIGS / "cpu" / "entropy_bonus.yaml"), "--trainer.callbacks.schedule",
          '{"name": "step", "steps": 10}'], "schedule.name"),
        (["--data.task", "null", "--data.train_files", '["nope.jsonl"]'], "train_files[0]: no such file"),
        (["--model.loss.loss_agg_mode", "mean"], "valid modes"),
        (["--model.eval.temperature", "0"], "model.eval.temperature=0"),
        (["--model.reward", "lit_covrl.rewards.NoSuchReward"], "NoSuchReward"),
        (["--config", str(CONFIGS / "cpu" / "era.yaml"), "--trainer.callbacks.init_args.k", "0.5"],
         "ERA.k=0.5 is invalid: must be a finite number >= 1"),
    ],
)
def test_bad_settings_stop_the_cli_at_start_up_naming_the_field(extra, message, tmp_path, capsys):
    args = ["--config", str(QUICK), *extra, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as err:
        LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, args=args, run=False)
    assert message in str(err.value) + capsys.readouterr().err


def _cli(args: list[str], tmp_path) -> LitCovRLCLI:
    return LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"},
                       args=[*args, "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)


def test_stacked_method_configs_give_every_regularizer(tmp_path):
    """README: method configs stack on a base config. A later file's `trainer.callbacks` list
    used to replace the earlier one (only EntropyBonus survived this stack)."""
    from lit_covrl.regularizers import ClipCov, EntropyBonus

    cli = _cli(["--config", str(QUICK), "--config", str(CONFIGS / "cpu" / "clip_cov.yaml"),
                "--config=" + str(CONFIGS / "cpu" / "entropy_bonus.yaml")], tmp_path)
    regs = [cb for cb in cli.trainer.callbacks if isinstance(cb, Regularizer)]
    assert [type(r) for r in regs] == [ClipCov, EntropyBonus]
    assert regs[0].ratio == pytest.approx(0.02)  # clip_cov.yaml's own setting, not a default


def test_annealed_clip_cov_anneals_over_the_stacked_budget(tmp_path):
    """configs/reasoning/clip_cov_annealed.yaml says `steps: null`: the ratio reaches 0 on the last
    RL step of the budget overlay's trainer.max_steps (200 for budget_collapse, 40 for budget_1h)."""
    for budget, steps in (("budget_collapse", 200), ("budget_1h", 40)):
        cli = _cli(["--config", str(CONFIGS / "reasoning.yaml"), "--config", str(CONFIGS / "reasoning" / f"{budget}.yaml"),
                    "--config", str(CONFIGS / "reasoning" / "clip_cov_annealed.yaml")], tmp_path)
        (reg,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, Regularizer)]
        reg.setup(cli.trainer, cli.model, "fit")
        assert reg.schedule.steps == steps - 1  # RL steps 0 .. steps - 1
        assert reg.scheduled(reg.ratio, 0) == reg.ratio
        assert reg.scheduled(reg.ratio, (steps - 1) / 2) == pytest.approx(reg.ratio / 2)  # cosine half-way
        assert reg.scheduled(reg.ratio, steps - 2) > 0.0 and reg.scheduled(reg.ratio, steps - 1) == 0.0


def test_command_line_callbacks_still_apply_on_top_of_stacked_configs(tmp_path):
    from lit_covrl.regularizers import ClipCov, EntropyBonus, KLCov

    cli = _cli(["--config", str(QUICK), "--config", str(CONFIGS / "cpu" / "clip_cov.yaml"),
                "--config", str(CONFIGS / "cpu" / "entropy_bonus.yaml"), "--trainer.callbacks+=lit_covrl.regularizers.KLCov",
                "--trainer.callbacks.ratio=0.05"], tmp_path)
    regs = [cb for cb in cli.trainer.callbacks if isinstance(cb, Regularizer)]
    assert [type(r) for r in regs] == [ClipCov, EntropyBonus, KLCov]
    assert regs[2].ratio == pytest.approx(0.05)


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_subcommands_evaluate_a_checkpoint(subcommand, tmp_path, capsys, caplog):
    import logging

    from lit_covrl.cli import main

    from tests.helpers import scalar_tags

    main(["fit", "--config", str(QUICK), "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000",
          "--data.val_size", "8", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main([subcommand, "--config", str(QUICK), "--data.val_size", "8", "--ckpt_path", str(ckpt),
              "--trainer.logger.init_args.save_dir", str(tmp_path / subcommand)])
    assert "differ from its run's" not in caplog.text  # the run's own data and reward: nothing to say
    out = capsys.readouterr().out
    prefix = "val" if subcommand == "validate" else "test"
    assert f"{prefix}/pass@k" in out and f"{prefix}/entropy" in out
    # logged at the checkpoint's last RL step (1), as its fit logs it, not at 0; and no
    # Lightning placeholder hparams (hp_metric), which took over the HPARAMS tab of the folder
    tags = scalar_tags(tmp_path / subcommand)
    assert [s for s, _ in tags[f"{prefix}/pass@1"]] == [1] and "hp_metric" not in tags
    # another task or reward than the run's (its config not given again) is scored with a warning
    # naming them; it was silent, and a reasoning run's checkpoint read pass@k 0.0
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main([subcommand, "--data.val_size", "4", "--model.reward", "lit_covrl.rewards.MathVerifyReward",
              "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "o")])
    assert "data or rewards that differ from its run's" in caplog.text
    assert "data.val_size: 8 -> 4" in caplog.text and "model.reward" in caplog.text


def test_arguments_given_with_a_checkpoint_file_override_its_hyperparameters(tmp_path, caplog):
    """Lightning parsed the checkpoint's hyperparameters over the command line: `validate
    --ckpt_path X --model.eval.samples 2` evaluated with the checkpoint's 8 samples, silently. The
    checkpoint's values are now defaults (the model path, here, comes from it) under what is given."""
    import logging

    from lit_covrl.cli import _RUN, main

    main(["fit", "--config", str(QUICK), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1000",
          "--data.val_size", "4", "--model.eval.temperature", "0.7", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main(["validate", "--data.task", "arithmetic", "--data.val_size", "4", "--ckpt_path", str(ckpt),
              "--model.eval.samples", "2", "--model.eval.k", "2", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path / "v"), "--trainer.callbacks+=lit_covrl.regularizers.ClipCov",
              "--model.reward+=lit_covrl.rewards.ExactMatchReward"])
    assert sum(isinstance(cb, Regularizer) for cb in _RUN["trainer"].callbacks) == 1  # appended once, not per parse
    assert len(_RUN["trainer"].lightning_module.rewards.rewards) == 2  # the default's and the one appended
    settings = _RUN["trainer"].lightning_module.settings
    assert (settings.eval.samples, settings.eval.k) == (2, 2)  # given
    assert settings.eval.temperature == 0.7  # from the checkpoint (the parser's default is 1.0)
    assert "change 2 of the checkpoint's model settings: model.eval.k, model.eval.samples" in caplog.text


def test_a_passk_checkpoint_resumes_and_validates_with_the_quickstart_config(tmp_path, caplog):
    """The README's plain resume command on a Pass@k run: quickstart.yaml's `advantage: grpo`
    switches the advantage, and the checkpoint's pass_k (the k of 'passk' only) goes with it. It
    stayed as a default and the run stopped at start-up on `model.loss.pass_k=4 ... not of 'grpo'`."""
    import logging

    from lit_covrl.cli import _RUN, main

    main(["fit", "--config", str(QUICK), "--config", str(CONFIGS / "cpu" / "passk.yaml"), "--trainer.max_steps", "1",
          "--trainer.val_check_interval", "1000", "--data.val_size", "4", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main(["validate", "--config", str(QUICK), "--data.val_size", "4", "--ckpt_path", str(ckpt),
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "v")])
    assert "change 2 of the checkpoint's model settings: model.loss.advantage, model.loss.pass_k" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main(["fit", "--config", str(QUICK), "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000",
              "--data.val_size", "4", "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", str(tmp_path / "r")])
    assert "model.loss.advantage: 'passk' -> 'grpo'" in caplog.text and "model.loss.pass_k: 4 -> None" in caplog.text
    module = _RUN["trainer"].lightning_module
    assert (module.settings.loss.advantage, module.settings.loss.pass_k) == ("grpo", None)
    assert _RUN["trainer"].global_step == 2  # one more RL step, from the checkpoint's


def test_a_checkpoint_of_several_rewards_validates_and_resumes_with_the_quickstart_config(tmp_path, caplog, monkeypatch):
    """A checkpoint saves model.reward_weights but not the rewards: without the run's config the
    README's validate command scores exact match (with the warning naming the rewards) and drops
    the run's weights. They stayed as a default and it stopped on `model.reward_weights has 3
    weights for 1 rewards`. The run's config.yaml keeps both; a resume drops them, as validate."""
    import logging

    from lit_covrl.cli import _RUN, main

    monkeypatch.chdir(CONFIGS.parent)  # examples.byo.my_rewards, as the README runs it
    common = ["--trainer.val_check_interval", "1000", "--data.val_size", "4"]
    main(["fit", "--config", str(QUICK), "--config", "examples/byo/rewards.yaml", "--trainer.max_steps", "1", *common,
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main(["validate", "--config", str(QUICK), "--data.val_size", "4", "--ckpt_path", str(ckpt),
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "v")])
    assert "differ from its run's" in caplog.text and "model.reward_weights: [1.0, 0.1, 0.1] -> None" in caplog.text
    assert _RUN["trainer"].lightning_module.rewards.weights == [1.0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):  # rewards of another count, no weights: the same
        main(["validate", "--config", str(QUICK), "--data.val_size", "4", "--ckpt_path", str(ckpt),
              "--model.reward", "[lit_covrl.rewards.ExactMatchReward, examples.byo.my_rewards.all_digits]",
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "v2")])
    assert _RUN["trainer"].lightning_module.rewards.weights == [1.0, 1.0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main(["validate", "--config", str(ckpt.parents[1] / "config.yaml"), "--ckpt_path", str(ckpt),
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "own")])
    assert "differ from its run's" not in caplog.text and "reward_weights" not in caplog.text
    assert _RUN["trainer"].lightning_module.rewards.weights == [1.0, 0.1, 0.1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main(["fit", "--config", str(QUICK), "--trainer.max_steps", "2", *common, "--ckpt_path", str(ckpt),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "r")])
    assert "model.reward_weights: [1.0, 0.1, 0.1] -> None" in caplog.text
    assert _RUN["trainer"].lightning_module.rewards.weights == [1.0] and _RUN["trainer"].global_step == 2


def test_an_unlikeliness_checkpoint_resumes_as_it_ran_with_the_quickstart_config(tmp_path, caplog):
    """As QAE's baseline_quantile: the README's plain resume command (quickstart.yaml does not set
    model.loss.unlikeliness) goes on with the checkpoint's beta and no 'settings differ' warning;
    --model.loss.unlikeliness null turns it off and the warning names it."""
    import logging

    from lit_covrl.cli import _RUN, main

    common = ["--trainer.val_check_interval", "1000", "--data.val_size", "4"]
    main(["fit", "--config", str(QUICK), "--config", str(CONFIGS / "cpu" / "unlikeliness.yaml"), "--trainer.max_steps",
          "1", *common, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main(["fit", "--config", str(QUICK), "--trainer.max_steps", "2", *common, "--ckpt_path", str(ckpt),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "r")])
    assert "model.loss.unlikeliness" not in caplog.text
    assert _RUN["trainer"].lightning_module.settings.loss.unlikeliness == 0.25 and _RUN["trainer"].global_step == 2
    assert "adv/unlikeliness_penalty" in _RUN["trainer"].callback_metrics
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        main(["fit", "--config", str(QUICK), "--trainer.max_steps", "2", *common, "--ckpt_path", str(ckpt),
              "--model.loss.unlikeliness", "null", "--trainer.logger.init_args.save_dir", str(tmp_path / "off")])
    assert "model.loss.unlikeliness: 0.25 -> None" in caplog.text
    assert _RUN["trainer"].lightning_module.settings.loss.unlikeliness is None
    assert "adv/unlikeliness_penalty" not in _RUN["trainer"].callback_metrics


@pytest.mark.parametrize(
    "method,name,tags",
    [
        ("entropy_bonus.yaml", "entropy_bonus", ["coef", "loss"]),
        ("clip_cov.yaml", "clip_cov", ["coef", "loss", "selected_frac"]),
        ("kl_cov.yaml", "kl_cov", ["coef", "loss", "selected_frac"]),
    ],
)
def test_a_short_fit_of_each_method_config_logs_its_regularizer(method, name, tags, tmp_path):
    from lit_covrl.cli import main
    from tests.helpers import scalar_tags

    main(["fit", "--config", str(QUICK), "--config", str(CONFIGS / "cpu" / method), "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "1000", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    logged = scalar_tags(tmp_path)
    for tag in [f"reg/{name}/{t}" for t in tags] + ["cov/top0.2pct", "policy/entropy"]:
        assert len(logged.get(tag, [])) == 2, tag
    if name == "kl_cov":  # inert on the first of the 4 updates, active on the others
        assert any(v > 0 for _, v in logged["reg/kl_cov/loss"])


# ---------------------------------------------------------------- settings groups
def test_nested_group_keys_override_from_the_command_line(tmp_path):
    """`--model.rollout.group_size 4` overrides one key of a group; the file's other keys of
    that group stay (quickstart: max_new_tokens 5, eval.samples 8)."""
    cli = _cli(["--config", str(QUICK), "--model.rollout.group_size", "4", "--model.eval.k", "2",
                "--model.update.mini_batch_size", "null", "--model.system.shared_prompt", "false"], tmp_path)
    cfg = cli.model.settings
    assert (cfg.rollout.group_size, cfg.rollout.max_new_tokens) == (4, 5)
    assert (cfg.eval.samples, cfg.eval.k) == (8, 2)
    assert cfg.update.mini_batch_size is None and cfg.update.micro_batch_size == 128
    assert cfg.system.shared_prompt is False and not cli.model.shared_prompt_on
    assert cli.model.hparams.rollout["group_size"] == 4  # hparams: plain dicts


@pytest.mark.parametrize(
    "where,old,new",
    [("cli", "group_size", "rollout.group_size"), ("cli", "val_k", "eval.k"),
     ("cli", "fsdp_mixed_precision", "system.fsdp_mixed_precision"),
     ("yaml", "mini_batch_size", "update.mini_batch_size"), ("yaml", "clip_high", "loss.clip_high")],
)
def test_an_old_flat_key_fails_at_start_up_naming_the_new_key(where, old, new, tmp_path, capsys):
    from lit_covrl.cli import main

    if where == "cli":
        extra = [f"--model.{old}", "2"]
    else:
        overlay = tmp_path / "old.yaml"
        overlay.write_text(f"model:\n  {old}: 2\n")
        extra = ["--config", str(overlay)]
    args = ["fit", "--config", str(QUICK), *extra, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert f"model.{old} moved to model.{new}" in capsys.readouterr().err


def test_a_refused_regularizer_argument_is_the_whole_error_line(tmp_path, capsys):
    """jsonargparse wraps a regularizer's own ValueError in the failures of every other member of
    the callbacks union (a paragraph of subclass rules and the given Namespace); the line is the
    regularizer's message alone."""
    from lit_covrl.cli import main

    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(QUICK), "--config", str(CONFIGS / "cpu" / "kl_cov.yaml"),
              "--trainer.callbacks.ratio", "0", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "lit-covrl: error: KLCov.ratio must be in (0, 1], got 0.0 (LIT_COVRL_DEBUG=1 shows the traceback)"
