"""The TensorBoard overview of a run (lit_covrl.dashboard), read back from the event files:
the Custom Scalars layout, the configuration text, the hparams with the final figures, and the
CLI's run names."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from lightning.pytorch import Callback

from lit_covrl.dashboard import CATEGORIES, FINAL_METRICS, layout
from lit_covrl.run_names import default_version
from lit_covrl.regularizers import ClipCov, EntropyBonus, Regularizer
from tests.helpers import fit, scalar_tags
from tests.test_module import make_data, make_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def read_events(log_dir: Path):
    """(layout proto, {text tag: markdown}, experiment proto, session start info) of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import metadata as hp_meta

    [events] = list(Path(log_dir).rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    lay = layout_pb2.Layout()
    lay.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    texts = {t.removesuffix("/text_summary"): acc.Tensors(t)[0].tensor_proto.string_val[0].decode()
             for t in acc.Tags()["tensors"] if t.endswith("/text_summary")}
    content = acc.PluginTagToContent(hp_meta.PLUGIN_NAME)
    experiment = hp_meta.parse_experiment_plugin_data(content[hp_meta.EXPERIMENT_TAG])
    start = hp_meta.parse_session_start_info_plugin_data(content[hp_meta.SESSION_START_INFO_TAG])
    # TensorBoard keeps the first summary of a tag: there must be one experiment, ours
    assert hparams_summaries(events, hp_meta.EXPERIMENT_TAG) == 1
    return lay, texts, experiment, start


def hparams_summaries(events: Path, tag: str) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(v.tag == tag for e in EventFileLoader(str(events)).Load() for v in e.summary.value)


def session_status(log_dir: Path) -> str:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import metadata as hp_meta

    [events] = list(Path(log_dir).rglob("events.out.tfevents.*"))
    ends = [hp_meta.parse_session_end_info_plugin_data(v.metadata.plugin_data.content)
            for e in EventFileLoader(str(events)).Load() for v in e.summary.value
            if v.tag == hp_meta.SESSION_END_INFO_TAG]
    assert len(ends) == 1
    return api_pb2.Status.Name(ends[0].status)


def test_a_fit_writes_layout_config_text_and_hparams_with_final_figures(tiny_model_dir, tmp_path):
    regs = [ClipCov(ratio=0.25, lb=-1e9, ub=1e9, name="clip.a"), EntropyBonus(coef=0.01)]
    fit(make_module(tiny_model_dir, rollout=dict(group_size=4)), make_data(), steps=3, callbacks=regs, log_dir=tmp_path,
        val_check_interval=1)
    lay, texts, experiment, start = read_events(tmp_path)
    logged = scalar_tags(tmp_path)

    charts = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in lay.category}
    assert list(charts) == list(CATEGORIES)
    assert charts["Learning"]["train reward"] == ["rollout/reward_mean$"]
    assert charts["Learning"]["held-out pass@k"] == ["val/pass@k$"]
    assert charts["Entropy"]["held-out entropy"] == ["val/entropy$"]
    assert charts["Speed"]["peak memory GiB"] == ["time/peak_mem_gib$"]
    # the regularizers' own charts, the custom name's '.' escaped so it matches only itself
    assert charts["Entropy"]["reg/clip.a/coef"] == [r"reg/clip\.a/coef$"]
    assert charts["Entropy"]["reg/entropy_bonus/coef"] == ["reg/entropy_bonus/coef$"]
    assert {"reg/clip.a/selected_frac", "reg/clip.a/loss", "reg/entropy_bonus/loss"} <= set(charts["Control"])
    # no empty chart: every regex matches a logged tag (TensorBoard uses re.match)
    for category, by_title in charts.items():
        for title, regexes in by_title.items():
            for rx in regexes:
                assert any(re.match(rx, tag) for tag in logged), (category, title, rx)
    assert not re.match(charts["Entropy"]["reg/clip.a/coef"][0], "reg/clipXa/coef")
    assert not re.match("policy/entropy$", "policy/entropy_seq_mean")

    config = texts["config"]
    assert config.startswith("```yaml") and "group_size: 4" in config and "clip.a(ratio=0.25" in config

    assert {m.name.tag for m in experiment.metric_infos} == set(FINAL_METRICS)
    assert {h.name for h in experiment.hparam_infos} == set(start.hparams)
    assert start.hparams["method"].string_value == "clip.a+entropy_bonus"
    assert start.hparams["group_size"].number_value == 4
    assert start.hparams["lr"].number_value == pytest.approx(3e-2)
    # what final/val_pass@k is: pass@2 of 4 samples per prompt at temperature 1 (make_module's eval)
    assert [start.hparams[f"eval_{k}"].number_value for k in ("k", "samples", "temperature")] == [2, 4, 1.0]
    assert "hp_metric" not in logged  # Lightning's placeholder is off: our summary is the one kept

    def last(tag):
        return logged[tag][-1][1]

    assert len(logged["val/pass@1"]) == 3
    assert last("final/entropy") == pytest.approx(last("policy/entropy"))
    assert last("final/accuracy") == pytest.approx(last("rollout/accuracy"))
    for k in ("pass@1", "pass@k"):
        assert last(f"final/val_{k}") == pytest.approx(last(f"val/{k}"))
        assert last(f"final/best_val_{k}") == pytest.approx(max(v for _, v in logged[f"val/{k}"]))
    assert last("final/val_entropy") == pytest.approx(last("val/entropy"))
    # at the last RL step, with its step metrics and its validation (it was one step past them)
    assert logged["final/entropy"][-1][0] == logged["policy/entropy"][-1][0] == logged["val/pass@1"][-1][0] == 2
    assert session_status(tmp_path) == "STATUS_SUCCESS"


class _StopAt(Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2:
            raise RuntimeError("boom")


def test_a_fit_stopped_by_an_exception_still_writes_its_figures_and_a_failed_session(tiny_model_dir, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(make_module(tiny_model_dir), make_data(), steps=5, callbacks=[_StopAt()], log_dir=tmp_path,
            val_check_interval=1)
    logged = scalar_tags(tmp_path)
    assert [s for s, _ in logged["policy/entropy"]] == [0, 1]
    assert logged["final/entropy"] == [(1, pytest.approx(logged["policy/entropy"][-1][1]))]
    assert logged["final/val_pass@1"][-1][1] == pytest.approx(logged["val/pass@1"][-1][1])
    assert session_status(tmp_path) == "STATUS_FAILURE"


def test_without_validation_only_the_training_figures_are_final(tiny_model_dir, tmp_path):
    fit(make_module(tiny_model_dir), make_data(), steps=1, log_dir=tmp_path, limit_val_batches=0)
    logged = scalar_tags(tmp_path)
    assert {t for t in logged if t.startswith("final/")} == {
        "final/entropy", "final/reward_mean", "final/accuracy"}
    _, _, _, start = read_events(tmp_path)
    assert start.hparams["method"].string_value == "grpo"
    assert start.hparams["regularizers"].string_value == "none"
    assert start.hparams["objective"].string_value == "PPOClip"


def test_hparams_name_the_objective_and_its_clip_range(tiny_model_dir, tmp_path):
    """A GSPO run showed as PPO with model.loss's clip range (0.2 / 0.2), which stays at its
    defaults when an objective is given: the columns come from the objective now."""
    from lit_covrl.objectives import GSPO

    fit(make_module(tiny_model_dir, objective=GSPO()), make_data(), steps=1, log_dir=tmp_path, limit_val_batches=0)
    _, _, _, start = read_events(tmp_path)
    assert start.hparams["objective"].string_value == "GSPO"
    assert start.hparams["clip_low"].number_value == pytest.approx(3e-4)
    assert start.hparams["clip_high"].number_value == pytest.approx(4e-4)


def test_the_regularizers_column_describes_settings_not_running_state():
    """AdaptiveEntropyBonus read `coef=0, active=True` in a run and `coef=0, active=False` in its
    resumed continuation (the column split one run in two), and its init_coef was not shown."""
    import torch

    from lit_covrl.dashboard import _describe
    from lit_covrl.regularizers import AdaptiveEntropyBonus
    from lit_covrl.regularizers.schedules import Schedule

    reg = AdaptiveEntropyBonus(init_coef=0.001)
    shown = "adaptive_entropy(target=0.2, delta=0.0001, init_coef=0.001, min_coef=0, max_coef=0.005)"
    assert _describe(reg) == shown
    reg.load_state_dict({"coef": 0.004, "active": False, "step": 3, "sums": torch.zeros(2)})  # a resume
    assert _describe(reg) == shown and (reg.coef, reg.active, reg.coef_now) == (0.004, False, 0.0)
    bonus = EntropyBonus(coef=0.01, schedule=Schedule("linear", final=0.0, steps=10))
    assert _describe(bonus) == "entropy_bonus(coef=0.01, schedule=linear->0@10)"


class _Probe(Regularizer):
    default_name = "probe"

    def charts(self):
        out = super().charts()
        out["Diagnostics"] = [f"reg/{self.name}/.*_norm"]  # a new category, a regex over several tags
        return out


def test_regularizer_charts_extend_the_layout_without_touching_it():
    lay = layout([_Probe(name="p1"), _Probe(name="p2")])
    assert list(lay) == [*CATEGORIES, "Diagnostics"]
    assert lay["Diagnostics"] == {"reg/p1/.*_norm": ["Multiline", ["reg/p1/.*_norm$"]],
                                  "reg/p2/.*_norm": ["Multiline", ["reg/p2/.*_norm$"]]}
    assert lay["Control"] == {"reg/p1/loss": ["Multiline", ["reg/p1/loss$"]],
                              "reg/p2/loss": ["Multiline", ["reg/p2/loss$"]]}
    assert "Control" not in layout([])  # no regularizer: no empty category


def test_the_unlikeliness_reward_gets_a_chart_when_it_is_on(tiny_model_dir):
    """model.loss.unlikeliness logs adv/unlikeliness_* from the module, not from a regularizer: no
    chart showed them; none is added when the setting is off (it would stay empty)."""
    from lit_covrl.dashboard import _settings_on
    from tests.test_module import make_module

    on = layout([], _settings_on(make_module(tiny_model_dir, loss=dict(unlikeliness=0.25))))
    charts = [t for c in on["Control"].values() for t in c[1]]
    assert charts == ["adv/unlikeliness_penalty$", "adv/unlikeliness_correct_seq_logp$"]
    assert "Control" not in layout([], _settings_on(make_module(tiny_model_dir)))


def _cb(class_path, **init_args):
    from jsonargparse import Namespace

    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def test_the_method_name_says_the_objective_and_a_quantile_baseline():
    from lit_covrl.dashboard import method_name

    assert method_name([]) == "grpo" and method_name(["clip_cov"]) == "clip_cov"
    assert method_name([], "gspo") == "gspo" and method_name(["kl_cov"], "cispo", 0.4) == "cispo+qae+kl_cov"
    assert method_name(["w_reinforce"], None, 0.4) == "qae+w_reinforce"
    assert method_name(["clip_cov"], None, None, "passk") == "passk+clip_cov" and method_name([], None, None, "rloo") == "grpo"
    # the HPARAMS column of a module built with them
    import types

    from lit_covrl.dashboard import run_hparams
    from lit_covrl.module import GRPOModule
    from lit_covrl.objectives import CEGPPO

    trainer = types.SimpleNamespace(callbacks=[], datamodule=None, optimizers=[], max_steps=1, world_size=1)
    module = GRPOModule(objective=CEGPPO(), loss=dict(baseline_quantile=0.4))
    assert run_hparams(trainer, module)["method"] == "ce_gppo+qae"
    hp = run_hparams(trainer, GRPOModule(loss=dict(advantage="passk", pass_k=4)))
    assert (hp["method"], hp["pass_k"], hp["advantage"]) == ("passk", 4, "passk")
    assert method_name(["clip_cov"], None, 0.4, "grpo", 0.25) == "qae+unlikeliness+clip_cov"
    hp = run_hparams(trainer, GRPOModule(loss=dict(unlikeliness=0.25)))
    assert (hp["method"], hp["unlikeliness"], hp["advantage"]) == ("unlikeliness", 0.25, "grpo")
    assert run_hparams(trainer, GRPOModule())["unlikeliness"] == "none"  # off: a column every run has


def test_default_version_names_the_method_and_configs_and_never_reuses_a_folder(tmp_path):
    quick, clip = CONFIGS / "quickstart.yaml", CONFIGS / "cpu" / "clip_cov.yaml"
    clip_cb = _cb("lit_covrl.regularizers.ClipCov", name=None)
    bonus_cb = _cb("lit_covrl.regularizers.EntropyBonus", name="bonus")
    other = _cb("lightning.pytorch.callbacks.LearningRateMonitor")
    assert default_version([quick, clip], [clip_cb], tmp_path) == "clip_cov-quickstart-v0"
    assert default_version([quick], [], tmp_path) == "grpo-quickstart-v0"
    assert default_version([quick], [clip_cb, other, bonus_cb], tmp_path) == "clip_cov+bonus-quickstart-v0"
    assert default_version([], [], tmp_path / "missing") == "grpo-v0"
    for name in ("clip_cov-quickstart-v0", "clip_cov-quickstart-v3", "clip_cov-quickstart-other-v9", "version_0"):
        (tmp_path / name).mkdir()
    assert default_version([quick, clip], [clip_cb], tmp_path) == "clip_cov-quickstart-v4"
    assert default_version([quick], [], tmp_path) == "grpo-quickstart-v0"


def test_default_version_reserves_its_folder_and_takes_the_next_number_if_another_run_made_it(tmp_path, monkeypatch):
    root = tmp_path / "runs" / "quickstart"  # made with the run folder
    assert default_version([CONFIGS / "quickstart.yaml"], [], root, reserve=True) == "grpo-quickstart-v0"
    assert [p.name for p in root.iterdir()] == ["grpo-quickstart-v0"]
    # another run makes -v1 between this run's listing of the folders and its own mkdir
    mkdir = Path.mkdir

    def racing(self, *args, **kwargs):
        if self.name == "grpo-quickstart-v1" and not self.exists():
            mkdir(self)
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing)
    assert default_version([CONFIGS / "quickstart.yaml"], [], root, reserve=True) == "grpo-quickstart-v2"
    assert sorted(p.name for p in root.iterdir()) == [f"grpo-quickstart-v{n}" for n in range(3)]


def test_two_runs_named_before_either_logs_get_two_folders(tmp_path):
    """Two `lit-covrl fit` started at once (seeds launched in a shell loop with `&`) both chose
    -v0 from the folders listed before either logger wrote: TensorBoard showed one run with doubled
    points, one config.yaml survived and the checkpoints interleaved as last.ckpt / last-v1.ckpt."""
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    first, second = (LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"},
                                 args=args, run=False).trainer.logger.log_dir for _ in range(2))
    assert (Path(first).name, Path(second).name) == ("grpo-quickstart-v0", "grpo-quickstart-v1")
    assert sorted(p.name for p in (tmp_path / "quickstart").iterdir()) == ["grpo-quickstart-v0", "grpo-quickstart-v1"]


def test_the_reserved_folder_is_the_one_the_logger_writes_to(tmp_path, monkeypatch):
    """save_dir with $VARS or ~ (expanded by the loggers): the folder reserved is the expanded
    one, so a second run takes -v1 and a start-up clean-up finds the logger's folder; it was a
    literal './$RUNS/...' folder beside the real one."""
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    monkeypatch.setenv("LIT_COVRL_TEST_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.logger.init_args.save_dir", "$LIT_COVRL_TEST_RUNS"]
    dirs = [LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"},
                        args=args, run=False).trainer.logger.log_dir for _ in range(2)]
    assert dirs == [str(tmp_path / "runs" / "quickstart" / f"grpo-quickstart-v{i}") for i in range(2)]
    assert all(Path(d).is_dir() for d in dirs) and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_fast_dev_run_reserves_no_folder(tmp_path):
    """fast_dev_run swaps the logger for a dummy that writes nothing: a reserved folder stayed
    empty and each smoke run took a version number."""
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                args=["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.fast_dev_run", "1",
                      "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert not list(tmp_path.rglob("*-v0"))


def test_only_rank_0_of_a_multi_process_run_makes_its_folder(monkeypatch):
    """The other ranks (started by Lightning's launcher or torchrun with a rank set) log into rank
    0's folder: a folder of their own would be a stray empty run beside it."""
    from lit_covrl.cli import _first_process

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert _first_process()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _first_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not _first_process()


def test_cli_runs_are_named_by_method_and_an_explicit_version_is_kept(tmp_path):
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    def logger(*extra):
        args = ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "cpu" / "clip_cov.yaml"),
                "--trainer.logger.init_args.save_dir", str(tmp_path), *extra]
        cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, args=args,
                          run=False)
        return cli.trainer.logger

    assert Path(logger().log_dir) == tmp_path / "clip_cov" / "clip_cov-quickstart-v0"
    assert logger().version == "clip_cov-quickstart-v1"  # the first one's folder was made when it was named
    # tools/compare.py passes version "" (logs straight into <save_dir>/<method>-s<seed>)
    assert Path(logger("--trainer.logger.init_args.version", "").log_dir) == tmp_path / "clip_cov"
    # an objective other than PPO and a quantile baseline are part of what ran (a CE-GPPO or QAE run
    # set by flags was named grpo-quickstart-vN, beside plain GRPO's runs)
    assert logger("--model.objective", "CEGPPO").version == "ce_gppo+clip_cov-quickstart-v0"
    assert logger("--model.loss.baseline_quantile", "0.4").version == "qae+clip_cov-quickstart-v0"
    assert logger("--model.loss.advantage", "passk", "--model.loss.pass_k", "4").version == "passk+clip_cov-quickstart-v0"


def test_cli_fit_writes_its_saved_config_as_the_config_text(tmp_path):
    from lit_covrl.cli import main

    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_steps", "1",
          "--trainer.val_check_interval", "1000", "--data.val_size", "8", "--trainer.enable_progress_bar", "false",
          "--checkpoint.save_last", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    run = tmp_path / "quickstart" / "grpo-quickstart-v0"
    _, texts, _, start = read_events(run)
    saved = (run / "config.yaml").read_text()
    assert texts["config"] == f"```yaml\n{saved.rstrip()}\n```"
    assert "version: null" in saved  # the generated name is the folder's, not the config's
    assert start.hparams["method"].string_value == "grpo"


def test_re_running_a_saved_config_names_a_new_run_and_a_given_version_is_saved(tmp_path):
    """A run's config.yaml named its own (generated) folder as the version: running it again
    logged into that folder and overwrote its config.yaml and checkpoints."""
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    def cli(*args):
        return LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, args=list(args),
                           run=False)

    first = cli("--config", str(CONFIGS / "quickstart.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path))
    run = Path(first.trainer.logger.log_dir)
    assert run == tmp_path / "quickstart" / "grpo-quickstart-v0"
    assert first.config.trainer.logger.init_args.version is None  # what SaveConfigCallback writes
    assert run.is_dir()  # made when the run was named
    saved = run / "config.yaml"
    saved.write_text(first.parser.dump(first.config, skip_none=False))
    again = Path(cli("--config", str(saved)).trainer.logger.log_dir)
    assert again.parent == run.parent and again != run
    given = cli("--config", str(saved), "--trainer.logger.init_args.version", "mine")
    assert given.trainer.logger.version == given.config.trainer.logger.init_args.version == "mine"


class _BestAtStart(Callback):
    """Records RunDashboard's best values when training starts (after a checkpoint is restored)."""

    def on_train_start(self, trainer, pl_module) -> None:
        from lit_covrl.dashboard import RunDashboard

        [dash] = [cb for cb in trainer.callbacks if isinstance(cb, RunDashboard)]
        self.best = dict(dash.best)


def test_best_held_out_figures_survive_a_resume(tiny_model_dir, tmp_path):
    first = fit(make_module(tiny_model_dir), make_data(), steps=2, log_dir=tmp_path / "a", val_check_interval=1)
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    import lightning as L

    probe = _BestAtStart()
    resumed = L.Trainer(
        accelerator="cpu", max_steps=4, logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path / "b"), name="t"),
        callbacks=[probe], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, check_val_every_n_epoch=None, val_check_interval=1,
    )
    resumed.fit(make_module(tiny_model_dir), make_data(), ckpt_path=str(ckpt))
    a, b = scalar_tags(tmp_path / "a"), scalar_tags(tmp_path / "b")
    assert probe.best == {k: max(v for _, v in a[k]) for k in ("val/pass@1", "val/pass@k")}
    for k in ("pass@1", "pass@k"):
        every = [v for _, v in a[f"val/{k}"] + b[f"val/{k}"]]
        assert len(every) == 4 and b[f"final/best_val_{k}"] == [(3, pytest.approx(max(every)))]


def test_every_shipped_regularizer_charts_what_it_records(tiny_model_dir, tmp_path):
    """Each regularizer's charts (`chart_metrics` + coef/loss) match tags that a short fit logs."""
    import re as _re

    from lit_covrl.regularizers import (
        AEPO, AEnt, AdaptiveEntropyBonus, ClipCov, EntropyAdvantage, EntropyRatioClip, HighEntropyTokens, KLCov,
        ReferenceKL, SteerWeights, TrajectoryGTPO,
    )
    from tests.helpers import fit, scalar_tags
    from tests.test_module import make_data, make_module

    regs = [ClipCov(ratio=0.2, lb=-1e9, ub=1e9), KLCov(ratio=0.1), HighEntropyTokens(), SteerWeights(),
            EntropyRatioClip(), AdaptiveEntropyBonus(target=5.0), EntropyAdvantage(), AEnt(), AEPO(),
            TrajectoryGTPO(entropy_threshold=2.8, entropy_scale=0.0),  # no shift: EntropyAdvantage shifts
            ReferenceKL(reset_every=1)]
    fit(make_module(tiny_model_dir, update=dict(mini_batch_size=2)), make_data(val_size=0), steps=2, callbacks=regs,
        log_dir=tmp_path, limit_val_batches=0)
    tags = list(scalar_tags(tmp_path))
    for reg in regs:
        for category, patterns in reg.charts().items():
            for pattern in patterns:
                assert any(_re.fullmatch(pattern, t) for t in tags), (type(reg).__name__, category, pattern)


def test_a_fit_without_a_tensorboard_logger_needs_no_tensorboard(tiny_model_dir, monkeypatch):
    # tools/gpu_check.sh runs the GPU benchmark (logger=False) on machines that have torch and
    # transformers but not tensorboard: the dashboard must not import it when it writes nothing.
    import sys

    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    trainer = fit(make_module(tiny_model_dir), make_data(), steps=1, limit_val_batches=0)
    assert trainer.global_step == 1


def test_first_process_reads_every_launchers_rank(monkeypatch):
    """srun sets only SLURM_PROCID before the CLI parses (Lightning's SLURM environment reads it
    later); the second node's first process has LOCAL_RANK 0 but NODE_RANK 1."""
    from lit_covrl.cli import _first_process

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert not _first_process()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not _first_process()


def test_other_ranks_cli_makes_no_run_folder(tmp_path, monkeypatch):
    """A non-zero rank names the run but makes no folder (it logs into rank 0's): the CLI must pass
    reserve=_first_process() to name_run."""
    from pathlib import Path

    from lit_covrl import cli
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    monkeypatch.setattr(cli, "_first_process", lambda: False)
    quick = Path(cli.__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    c = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"},
                    args=["--config", str(quick), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], run=False)
    assert Path(c.trainer.logger.log_dir).name == "grpo-quickstart-v0"
    assert not (tmp_path / "runs").exists()


def test_name_run_without_reserving_claims_no_folder(tmp_path):
    """A rank that does not reserve (not the first process) names the run but returns no folder:
    the start-up clean-up removes only the folders listed, and this rank made none (a folder of that
    name may be another run's)."""
    from jsonargparse import Namespace

    from lit_covrl.run_names import name_run

    def cfg():
        logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                           init_args=Namespace(save_dir=str(tmp_path / "runs"), name="quick", version=None))
        return Namespace(config=[], model=None, trainer=Namespace(logger=logger, callbacks=[]))

    assert name_run(cfg(), reserve=False) == ("grpo-v0", [])
    assert not (tmp_path / "runs").exists()
    version, made = name_run(cfg(), reserve=True)
    assert version == "grpo-v0" and made == [tmp_path / "runs" / "quick" / "grpo-v0", tmp_path / "runs" / "quick",
                                             tmp_path / "runs"]


def test_start_up_error_with_an_explicit_new_version_leaves_no_folder(tmp_path, capsys):
    """An explicit logger version whose folders do not exist yet: the logger makes them, and an error
    found in setup (inside fit) removes the run folder and the name folder made with it."""
    import pytest

    from lit_covrl.cli import main
    from pathlib import Path

    quick = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": 3, "answer": "4"}\n')
    with pytest.raises(SystemExit):  # save_dir new too: every folder the logger made goes (it left new/runs)
        main(["fit", "--config", str(quick), "--data.task", "null", "--data.strict", "true", "--data.train_files",
              f'["{rows}"]', "--trainer.logger.init_args.save_dir", str(tmp_path / "new" / "runs"),
              "--trainer.logger.init_args.version", "exp1"])
    assert "field 'prompt' is int" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
