"""The command line without surprises: `fsdp2` as a strategy name, `lit-covrl export`, one-line
start-up errors, and a progress bar in RL steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_covrl.cli import LitCovRLCLI, main
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule
from lit_covrl.sharding import FSDP2Strategy
from tests.test_configs import CONFIGS, QUICK

ROOT = Path(__file__).resolve().parents[1]


def _cli(tmp_path, *extra):
    return LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                       args=["--config", str(QUICK), *extra, "--trainer.logger.init_args.save_dir", str(tmp_path)])


@pytest.mark.parametrize("form", ["flag", "flag_dotted", "yaml"])
def test_fsdp2_strategy_by_name(form, tmp_path):
    if form == "yaml":
        overlay = tmp_path / "fsdp2.yaml"
        overlay.write_text("trainer:\n  strategy: fsdp2\n")
        extra = ["--config", str(overlay)]
    else:
        extra = ["--trainer.strategy", "fsdp2" if form == "flag" else "lit_covrl.sharding.FSDP2Strategy"]
    cli = _cli(tmp_path, *extra)
    assert type(cli.trainer.strategy) is FSDP2Strategy


def _run(args, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lit_covrl.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_a_start_up_error_is_one_line_and_status_2_unless_debugging(tmp_path):
    args = ["fit", "--config", str(QUICK), "--model.loss.advantage", "ppo", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    quiet = _run(args)
    assert quiet.returncode == 2
    assert "Traceback" not in quiet.stderr
    errors = [ln for ln in quiet.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["lit-covrl: error: model.loss.advantage='ppo' is invalid: valid estimators: ['drgrpo', 'grpo', 'passk', 'rloo'] "
                      "(LIT_COVRL_DEBUG=1 shows the traceback)"]
    loud = _run(args, {"LIT_COVRL_DEBUG": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "lit-covrl: error" not in loud.stderr


@pytest.mark.parametrize("extra,message", [
    (["--model.rollout.group_size", "abc"], 'Parser key "model.rollout.group_size": Expected a <class \'int\'>. Got value: abc'),
    (["--model.nope", "1"], "lit-covrl: error: --model.nope: no such setting (LIT_COVRL_DEBUG"),
    # an abbreviation is not a setting (argparse took --model.loss.unlik for --model.loss.unlikeliness)
    (["--model.loss.unlik", "0.5"], "lit-covrl: error: --model.loss.unlik: no such setting (did you mean "
     "--model.loss.unlikeliness?) (LIT_COVRL_DEBUG"),
    # a misspelt setting: was jsonargparse's "unrecognized arguments: --model.loss.clip_hgh 0.28"
    (["--model.loss.clip_hgh", "0.28"], "lit-covrl: error: --model.loss.clip_hgh: no such setting (did you mean "
     "--model.loss.clip_high?) (LIT_COVRL_DEBUG"),
    (["--model.rollout.group_sise=4"], "error: --model.rollout.group_sise: no such setting (did you mean "
     "--model.rollout.group_size?) (LIT_COVRL_DEBUG"),
    (["--model.updat.mini_batch_size", "2"], "error: --model.updat.mini_batch_size: no such setting (did you mean "
     "--model.update.mini_batch_size?) (LIT_COVRL_DEBUG"),
    (["--model.init_args.loss.clip_hgh", "0.28"], "error: --model.init_args.loss.clip_hgh: no such setting (did you "
     "mean --model.loss.clip_high?)"),
    # a setting spelt right but written with init_args (as a class's argument is): no hint was given
    (["--model.loss.init_args.clip_high", "0.3"], "error: --model.loss.init_args.clip_high: no such setting (did "
     "you mean --model.loss.clip_high?) (LIT_COVRL"),
    (["--model.init_args.loss.clip_high", "0.3"], "error: --model.init_args.loss.clip_high: no such setting (did "
     "you mean --model.loss.clip_high?) (LIT_COVRL"),
    (["--config", "INIT_ARGS_YAML"], "error: INIT_ARGS_YAML: model.loss.init_args.clip_high: no such setting (did "
     "you mean model.loss.clip_high?) (LIT_COVRL"),
    (["--trainer.max_stepz", "3", "--data.batch_sise", "2"], "error: --trainer.max_stepz: no such setting (did you "
     "mean --trainer.max_steps?); --data.batch_sise: no such setting (did you mean --data.batch_size?) (LIT_COVRL"),
    # only settings, not groups, and for a short part only a close one (was model.system, lr_scheduler,
    # min_steps alone); else the setting of that last part, under the groups given or anywhere
    (["--model.temp", "0.7"], "error: --model.temp: no such setting (did you mean --model.eval.temperature or "
     "--model.rollout.temperature?) (LIT_COVRL"),
    (["--model.lr", "1e-6"], "error: --model.lr: no such setting (LIT_COVRL"),
    (["--lr", "1e-6"], "error: --lr: no such setting (LIT_COVRL"),
    (["--trainer.steps", "3"], "error: --trainer.steps: no such setting (did you mean --trainer.max_steps or "
     "--trainer.min_steps?) (LIT_COVRL"),
    (["--model.system_prompt", "Be brief."], "error: --model.system_prompt: no such setting (did you mean "
     "--data.system_prompt?) (LIT_COVRL"),
    # an appending flag: was '--trainer.callbackz+: ... (did you mean --trainer.callbacks?)', which replaces
    (["--trainer.callbackz+=lit_covrl.regularizers.ERA"], "error: --trainer.callbackz: no such setting (did you mean "
     "--trainer.callbacks+=?) (LIT_COVRL"),
    # a word that is no flag's value is named (was left out); a value with spaces is one value
    (["--trainer.max_stepz", "3", "stray"], "error: --trainer.max_stepz: no such setting (did you mean "
     "--trainer.max_steps?); 'stray': not a setting nor a setting's value (LIT_COVRL"),
    (["--data.system_promt", "Be brief, please.", "--trainer.max_stepz=3"], "error: --data.system_promt: no such "
     "setting (did you mean --data.system_prompt?); --trainer.max_stepz: no such setting (did you mean "
     "--trainer.max_steps?) (LIT_COVRL"),
    # ... or key of a config file: was "Subcommand 'fit' does not accept option 'model.loss.clip_hgh'"
    (["--config", "TYPO_YAML"], "lit-covrl: error: TYPO_YAML: model.loss.clip_hgh: no such setting (did you mean "
     "model.loss.clip_high?) (LIT_COVRL_DEBUG"),
    (["--model", "{loss: {clip_hgh: 0.28}}"], "lit-covrl: error: model.loss.clip_hgh: no such setting (did you mean "
     "model.loss.clip_high?) (LIT_COVRL_DEBUG"),
    (["--data.task", "null", "--data.train_files", '["missing.jsonl"]'], "data.train_files[0]: no such file: 'missing.jsonl'"),
    (["--trainer.accelerator", "gpu"], "MisconfigurationException: No supported gpu backend found"),  # Lightning's check
    (["--data.task", "null", "--data.strict", "true"], "ROWS:2: field 'prompt' is int"),  # found in setup, inside fit
    (["--torch_threads", "-1"], "torch_threads=-1 must be >= 1 (or null: torch's default)"),
    # LightningCLI's top-level optimizer / scheduler: the scheduler alone was ignored (rc 0, and the
    # saved config.yaml listed it); the optimizer failed with "optimizer got an empty parameter list"
    (["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"],
     "--lr_scheduler: lit-covrl reads the lr scheduler from --model.lr_scheduler"),
    (["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.5"], "--optimizer: lit-covrl reads the optimizer from --model.optimizer"),
    (["--config", "TOPLEVEL"], "TOPLEVEL: top-level `optimizer:` is not read by lit-covrl; put it under `model.optimizer:`"),
    (["--config", "BADYAML"], "--config BADYAML: not valid YAML: while parsing a flow mapping"),  # was PyYAML's traceback, rc 1
    # a built-in task's argument by init_args: was the parser's union paragraph ending in NestedArg(...)
    (["--data.task.init_args.digits", "2"], "data.task: the built-in task 'arithmetic' takes its arguments from "
     "--data.task_kwargs '{digits: 2}'"),
    # a misspelt class: was jsonargparse's paragraph of union alternatives, saying the same thing twice
    (["--trainer.callbacks+=lit_covrl.regularizers.ClipCovv"], "lit-covrl: error: trainer.callbacks: no class "
     "'lit_covrl.regularizers.ClipCovv' (module 'lit_covrl.regularizers' has no attribute 'ClipCovv'); did you mean "
     "lit_covrl.regularizers.ClipCov? (LIT_COVRL_DEBUG"),
    # a callbacks flag reaches the last callback listed so far (ReferenceKL in archer.yaml), and a
    # misspelt argument: both were jsonargparse's paragraph of union alternatives ending in NestedArg(...)
    (["--config", "ARCHER", "--trainer.callbacks.quantile=0.5"], "lit-covrl: error: trainer.callbacks: "
     "--trainer.callbacks.quantile=0.5 sets an argument of the last callback listed so far, "
     "lit_covrl.regularizers.ReferenceKL, which has no argument 'quantile'; to set an earlier callback's argument, "
     "edit a copy of the YAML, or list the callbacks on the command line, each --trainer.callbacks+=Class followed by "
     "its own --trainer.callbacks.X=... flags (LIT_COVRL_DEBUG"),
    # the flag as given (was echoed as --trainer.callbacks.warmup_step=1, init_args dropped)
    (["--config", "AENT_YAML", "--trainer.callbacks.init_args.warmup_step", "1"], "lit-covrl: error: trainer.callbacks: "
     "--trainer.callbacks.init_args.warmup_step 1 sets an argument of the last callback listed so far, "
     "lit_covrl.regularizers.AEnt, which has no argument 'warmup_step' (did you mean 'warmup_steps'?); to set"),
    (["--trainer.callbacks+=lit_covrl.regularizers.ClipCov", "--trainer.callbacks.ratoi=0.1"], "which has no "
     "argument 'ratoi' (did you mean 'ratio'?); to set"),
    # a bad value of an argument the class takes: its own complaint (a later union member's "not
    # accepted" had been read as the class lacking the argument)
    (["--config", "CLIPCOV_YAML", "--trainer.callbacks.ratio", "abc"], "lit-covrl: error: trainer.callbacks: "
     "lit_covrl.regularizers.ClipCov argument 'ratio': Expected a <class 'float'>. Got value: abc (LIT_COVRL_DEBUG"),
    (["--config", "CISPO_YAML", "--model.objective.init_args.clip_hgh", "5"], "lit-covrl: error: model.objective: "
     "lit_covrl.objectives.CISPO has no argument 'clip_hgh' (did you mean 'clip_high'?) (LIT_COVRL_DEBUG"),
    (["--model.sampler", "lit_covrl.sampling.StaticCacheSampler", "--model.sampler.zzz", "3"],
     "lit-covrl: error: model.sampler: lit_covrl.sampling.StaticCacheSampler has no argument 'zzz' (LIT_COVRL_DEBUG"),
    # ... in a --config file (under the class's init_args): was the union paragraph ending in
    # "Given value: {...}", where a flag's ends in NestedArg(...); a callback's without the flag advice
    (["--config", "CLIPLO_YAML"], "lit-covrl: error: CLIPLO_YAML: model.objective: lit_covrl.objectives.GSPO has no "
     "argument 'clip_lo' (did you mean 'clip_low'?) (LIT_COVRL_DEBUG"),
    (["--config", "WARMUP_YAML"], "lit-covrl: error: WARMUP_YAML: trainer.callbacks: lit_covrl.regularizers.AEnt has "
     "no argument 'warmup_step' (did you mean 'warmup_steps'?) (LIT_COVRL_DEBUG"),
    (["--config", "LR_YAML"], "lit-covrl: error: LR_YAML: model.optimizer: torch.optim.AdamW has no argument 'lr_' "
     "(did you mean 'lr'?) (LIT_COVRL_DEBUG"),
    # ... in a dict given to the class's flag, and an optimizer's / lr scheduler's flag (a callable
    # type, which jsonargparse words otherwise)
    (["--model.objective", "{class_path: lit_covrl.objectives.GSPO, init_args: {clip_lo: 0.1}}"], "lit-covrl: error: "
     "model.objective: lit_covrl.objectives.GSPO has no argument 'clip_lo' (did you mean 'clip_low'?) (LIT_COVRL_DEBUG"),
    (["--model.optimizer.init_args.lr_", "0.1"], "lit-covrl: error: model.optimizer: torch.optim.AdamW has no "
     "argument 'lr_' (did you mean 'lr'?) (LIT_COVRL_DEBUG"),
    (["--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.gama", "0.5"], "lit-covrl: "
     "error: model.lr_scheduler: torch.optim.lr_scheduler.StepLR has no argument 'gama' (did you mean 'gamma'?)"),
])
def test_start_up_errors_in_process(extra, message, tmp_path, capsys):
    if "gpu" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present: Lightning accepts the accelerator")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": 3, "answer": "4"}\n')
    if "--data.strict" in extra:
        extra = [*extra, "--data.train_files", f'["{rows}"]']
    files = {"ROWS": rows, "TOPLEVEL": tmp_path / "top.yaml", "BADYAML": tmp_path / "bad.yaml",
             "ARCHER": CONFIGS / "cpu" / "archer.yaml", "AENT_YAML": CONFIGS / "cpu" / "aent.yaml",
             "CISPO_YAML": CONFIGS / "cpu" / "cispo.yaml",
             "CLIPCOV_YAML": CONFIGS / "cpu" / "clip_cov.yaml", "TYPO_YAML": tmp_path / "typo.yaml",
             "CLIPLO_YAML": tmp_path / "clip_lo.yaml", "WARMUP_YAML": tmp_path / "warmup.yaml",
             "LR_YAML": tmp_path / "lr.yaml", "INIT_ARGS_YAML": tmp_path / "init_args.yaml"}
    files["TOPLEVEL"].write_text("optimizer:\n  class_path: torch.optim.SGD\n")
    files["TYPO_YAML"].write_text("model:\n  loss:\n    clip_hgh: 0.28\n")
    files["INIT_ARGS_YAML"].write_text("model:\n  loss:\n    init_args:\n      clip_high: 0.3\n")
    files["CLIPLO_YAML"].write_text("model:\n  objective:\n    class_path: lit_covrl.objectives.GSPO\n"
                                    "    init_args:\n      clip_lo: 0.1\n")
    files["WARMUP_YAML"].write_text("trainer:\n  callbacks:\n    - class_path: lit_covrl.regularizers.AEnt\n"
                                    "      init_args:\n        warmup_step: 1\n")
    files["LR_YAML"].write_text("model:\n  optimizer:\n    class_path: torch.optim.AdamW\n"
                                "    init_args:\n      lr_: 0.1\n")
    files["BADYAML"].write_text("model:\n  rollout: {group_size: 4\n")  # an unclosed flow mapping
    extra = [str(files[a]) if a in files else a for a in extra]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICK), *extra, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    for name, path in files.items():
        message = message.replace(name, str(path))
    assert err[-1].startswith("lit-covrl: error: ") and message in err[-1]
    # no version folder left behind (each failed attempt took a version number: the README's -v0
    # commands then named an empty folder), nor the logger's name folder and save_dir made with it
    inputs = {path.name for path in files.values() if path.parent == tmp_path}
    assert {p.name for p in tmp_path.iterdir()} == {"rows.jsonl", *inputs}


def test_a_start_up_error_keeps_a_run_folder_that_existed_before(tmp_path, capsys):
    """A folder made for the run (an explicit logger version, holding the run's own `tee` log) was
    removed with that log by the start-up error's clean-up."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": 3, "answer": "4"}\n')
    folder = tmp_path / "quickstart" / "exp1"
    folder.mkdir(parents=True)
    (folder / "train.log").write_text("the run's own log\n")
    later = time.time() + 60  # as if `tee` appended to it during the run
    os.utime(folder / "train.log", (later, later))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICK), "--data.task", "null", "--data.strict", "true", "--data.train_files",
              f'["{rows}"]', "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.logger.init_args.version", "exp1"])
    assert "field 'prompt' is int" in capsys.readouterr().err
    assert (folder / "train.log").read_text() == "the run's own log\n"
    with pytest.raises(SystemExit):  # a new version of an existing name: the name folder stays
        main(["fit", "--config", str(QUICK), "--data.task", "null", "--data.strict", "true", "--data.train_files",
              f'["{rows}"]', "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert sorted(p.name for p in (tmp_path / "quickstart").iterdir()) == ["exp1"]


def _stop_after_reserving(monkeypatch, stop, write=None):
    """Make the CLI raise `stop` right after it reserved the run folder (its name chosen, the model
    not loaded yet), after writing `write` into the folder if given; returns the folders reserved."""
    from lit_covrl.cli import _RUN

    reserved, original = [], LitCovRLCLI.before_instantiate_classes

    def reserve_then_stop(self):
        original(self)
        reserved.append(_RUN["new_folders"][0])
        if write is not None:
            (reserved[-1] / "train.log").write_text(write)
        raise stop("stopped right after the run folder was reserved")

    monkeypatch.setattr(LitCovRLCLI, "before_instantiate_classes", reserve_then_stop)
    return reserved


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_before_writing_removes_its_empty_reserved_folder(stop, tmp_path, monkeypatch):
    """Ctrl-C (or an error that is not a start-up error) between reserving the run folder and
    writing into it (while the model loads) left an empty `-v0`: the next run was `-v1`."""
    reserved = _stop_after_reserving(monkeypatch, stop)
    with pytest.raises(stop):
        main(["fit", "--config", str(QUICK), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert reserved == [tmp_path / "runs" / "quickstart" / "grpo-quickstart-v0"]
    assert list(tmp_path.iterdir()) == []  # the folder, and the save_dir and name folders made with it


def test_a_stopped_run_removes_only_the_folder_it_made_before_its_first_batch(tmp_path, monkeypatch):
    """What the run wrote into its own folder before its first batch goes with it (the rule of a
    start-up error: a run that never began); an earlier run's empty folder stays."""
    _stop_after_reserving(monkeypatch, KeyboardInterrupt, write="written before the stop\n")
    with pytest.raises(KeyboardInterrupt):
        main(["fit", "--config", str(QUICK), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "quickstart" / "grpo-quickstart-v0").mkdir(parents=True)  # an earlier run's, empty
    monkeypatch.undo()
    reserved = _stop_after_reserving(monkeypatch, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):  # removes its own empty -v1, not another run's empty -v0
        main(["fit", "--config", str(QUICK), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert reserved == [tmp_path / "quickstart" / "grpo-quickstart-v1"]
    assert [p.name for p in (tmp_path / "quickstart").iterdir()] == ["grpo-quickstart-v0"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_while_the_model_loads_removes_its_run_folder(stop, tmp_path, monkeypatch):
    """Ctrl-C (or an error that is not a start-up error, e.g. out of memory) while the policy loads,
    after Lightning wrote config.yaml and an empty event file into the run folder: the run never
    began, so the folder goes (it stayed, and the next run was `-v1`)."""
    import lit_covrl.setup_hooks

    def interrupted(*args, **kwargs):
        raise stop("stopped while the model loads")

    monkeypatch.setattr(lit_covrl.setup_hooks, "load_model", interrupted)
    with pytest.raises((stop, SystemExit)):  # Lightning turns a Ctrl-C inside fit into an exit
        main(["fit", "--config", str(QUICK), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert list(tmp_path.iterdir()) == []


def test_an_error_after_start_up_keeps_its_traceback(tmp_path, monkeypatch):
    calls = []
    original = GRPOModule.training_step

    def step(self, batch, batch_idx):
        calls.append(batch_idx)
        if len(calls) == 2:
            raise ValueError("a bug in the second step")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GRPOModule, "training_step", step)
    with pytest.raises(ValueError, match="a bug in the second step"):
        main(["fit", "--config", str(QUICK), "--trainer.max_steps", "3", "--trainer.val_check_interval", "1000",
              "--trainer.logger.init_args.save_dir", str(tmp_path)])


def test_progress_bar_counts_rl_steps_and_export_subcommand(tmp_path, capsys):
    main(["fit", "--config", str(QUICK), "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000",
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "RL step" in out and "2/2" in out and "Epoch" not in out and "/-2" not in out
    ckpt = next(tmp_path.rglob("last.ckpt"))

    main(["export", str(ckpt), str(tmp_path / "hf")])  # the installed script's subcommand
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert exported["model.embed_tokens.weight"].equal(saved["policy.model.embed_tokens.weight"])
    assert all(exported[k].equal(v) for k, v in ((k[len("policy."):], v) for k, v in saved.items()) if k in exported)


def test_the_rl_progress_bar_is_not_forced_on_configs_without_one(tmp_path):
    from lit_covrl.progress import RLProgressBar

    assert any(isinstance(c, RLProgressBar) for c in _cli(tmp_path).trainer.callbacks)
    off = _cli(tmp_path, "--trainer.enable_progress_bar", "false").trainer
    assert not any(isinstance(c, RLProgressBar) for c in off.callbacks) and off.progress_bar_callback is None


def test_two_stateful_regularizers_with_one_name_get_a_one_line_error(tmp_path, capsys):
    # Clip-Cov keeps state, so Lightning's own state_key check would fail first with a long RuntimeError
    overlay = tmp_path / "two.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n"
        "    - {class_path: lit_covrl.regularizers.ClipCov, init_args: {ratio: 0.01}}\n"
        "    - {class_path: lit_covrl.regularizers.ClipCov, init_args: {ratio: 0.02}}\n"
    )
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICK), "--config", str(overlay), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lit-covrl: error: two regularizers are named 'clip_cov'") and "init_args.name" in err[-1]
    assert "[0] ClipCov and [1] ClipCov" in err[-1] and "name: clip_cov_2" in err[-1]  # not object addresses


def test_one_line_joins_lines_drops_type_lists_and_names_unexpected_classes():
    from argparse import ArgumentError

    from lit_covrl.errors import one_line

    typed = ArgumentError(None, 'Parser key "model.x":\n  Expected an int.\n  Subtypes: [int]\n  Given value type: str')
    assert one_line(typed) == 'Parser key "model.x": Expected an int.'
    assert one_line(ValueError("model.y must be > 0\n  got -1")) == "model.y must be > 0 got -1"
    assert one_line(FileNotFoundError("no such file: a.ckpt")) == "FileNotFoundError: no such file: a.ckpt"
    assert one_line(OSError()) == "OSError: OSError()"


def test_a_sharded_checkpoint_folder_without_fsdp2_is_a_one_line_error_naming_the_fix(tmp_path, capsys):
    """Lightning's non-FSDP2 strategies read a checkpoint *file*; an FSDP2 folder failed deep in the
    restore with a bare IsADirectoryError traceback."""
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICK), "--ckpt_path", str(folder), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lit-covrl: error: --ckpt_path {folder} is a sharded checkpoint folder")
    assert "trainer.strategy: fsdp2" in err[-1]


@pytest.mark.parametrize("given,stop", [
    (["--model.rollout.stop+=####"], ["</answer>", "####"]),  # GSM8K's marker: a YAML comment (null) before
    (["--model.rollout.stop+=# Answer:"], ["</answer>", "# Answer:"]),
    (["--model.rollout.stop+", "####"], ["</answer>", "####"]),
    (["--model.rollout.stop+=~"], ["</answer>", "~"]),
    (["--model.rollout.stop+=null"], ["</answer>", "null"]),
    (['--model.rollout.stop+="####"'], ["</answer>", "####"]),  # quoted: a YAML string, quotes off
    (['--model.rollout.stop+="\\n\\n"'], ["</answer>", "\n\n"]),
    (["--model.rollout.stop+=x "], ["</answer>", "x "]),
    (["--model.rollout.stop+=[END]"], ["</answer>", "END"]),  # a list literal stays one
    (['--model.rollout.stop+=["[END]"]'], ["</answer>", "[END]"]),
    (["--model.rollout.stop=####"], ["####"]),
    (["--model.rollout.stop", "# Answer:"], ["# Answer:"]),
    (["--model.rollout.stop", "null"], None),  # null still clears the list
    (["--model.rollout.stop=~"], None),
])
def test_a_bare_value_of_a_string_list_key_is_one_string(given, stop, tmp_path):
    cli = _cli(tmp_path, "--model.rollout.stop=[</answer>]", *given)
    assert cli.model.settings.rollout.stop == stop


def test_a_bare_data_file_is_a_one_file_list(tmp_path):
    rows = tmp_path / "rows #1.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cli = _cli(tmp_path, "--data.task", "null", f"--data.train_files={rows}", "--data.val_files", str(rows))
    assert cli.datamodule.hparams.train_files == [str(rows)] and cli.datamodule.hparams.val_files == [str(rows)]


def test_stacked_callbacks_keep_yaml_values_json_lacks(tmp_path):
    """The stacked files' callbacks are passed on as one YAML flow list: .inf, nan and strings
    with YAML's special characters survive (JSON turned .inf into 'Infinity')."""
    import yaml

    from lit_covrl.cli_args import stack_config_callbacks

    odd = "a: #b, 'c' \"d\" [e] {f} - &x *y ! % @ `"
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("trainer:\n  callbacks:\n    - {class_path: A, init_args: {ub: .inf, lb: -.inf}}\n")
    second.write_text("trainer:\n  callbacks:\n    - class_path: B\n      init_args: {x: .nan, d: {k: [1, 2.5]}, "
                      f"s: {json.dumps(odd)}, n: null}}\n")
    args = stack_config_callbacks(["--config", str(first), "--config", str(second), "--trainer.max_steps=1"])
    assert args[:4] == ["--config", str(first), "--config", str(second)] and args[-1] == "--trainer.max_steps=1"
    [a, b] = yaml.safe_load(args[4].removeprefix("--trainer.callbacks="))
    assert a == {"class_path": "A", "init_args": {"ub": float("inf"), "lb": float("-inf")}}
    assert b["init_args"]["x"] != b["init_args"]["x"]  # nan
    assert b["init_args"]["d"] == {"k": [1, 2.5]} and b["init_args"]["n"] is None and b["init_args"]["s"] == odd


def test_a_stacked_clip_cov_without_upper_bound_parses(tmp_path):
    overlay = tmp_path / "clip_cov_noub.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: lit_covrl.regularizers.ClipCov\n"
                       "      init_args: {ratio: 0.02, ub: .inf}\n")
    [reg] = [c for c in _cli(tmp_path, "--config", str(overlay)).trainer.callbacks if type(c).__name__ == "ClipCov"]
    assert reg.ub == float("inf")


@pytest.mark.parametrize("switch", [
    ["--model.objective", "lit_covrl.objectives.CISPO"],
    ["--model.objective=CISPO"],
    ["--model.objective", '{"class_path": "lit_covrl.objectives.CISPO"}'],
    ["--model.objective.class_path", "lit_covrl.objectives.CISPO"],
    ["--config", "CISPO_FILE"],
])
def test_switching_the_objective_class_starts_from_its_defaults(switch, tmp_path, caplog):
    """gspo.yaml's clip range (3e-4, 4e-4) belongs to GSPO: CISPO given after it gets its own defaults.
    Two config files naming objectives do not stack (one is trained): said, naming both files; a
    flag is explicit and passes without a word."""
    import logging

    from lit_covrl.objectives import CISPO

    cispo = tmp_path / "cispo.yaml"
    cispo.write_text("model:\n  objective:\n    class_path: lit_covrl.objectives.CISPO\n")
    switch = [str(cispo) if a == "CISPO_FILE" else a for a in switch]
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        objective = _cli(tmp_path, "--config", str(CONFIGS / "cpu" / "gspo.yaml"), *switch).model.objective
    assert type(objective) is CISPO and vars(objective) == vars(CISPO())
    said = "objectives do not stack, only CISPO is trained" in caplog.text
    assert said == (switch[0] == "--config") and (not said or "gspo.yaml's GSPO" in caplog.text), caplog.text


@pytest.mark.parametrize("flag,config,message", [
    (["--model.objective", "lit_covrl.objectives.CISPO"], "cpu/gspo.yaml", "--model.objective CISPO: given before "
     "--config {}, whose model.objective GSPO replaces it"),
    (["--model.objective=null"], "cpu/gspo.yaml", "--model.objective null: given before --config {}, whose "
     "model.objective GSPO replaces it"),
    (["--model.sampler.class_path", "lit_covrl.sampling.KVCacheSampler"], "samplers/static_cache.yaml",
     "--model.sampler.class_path KVCacheSampler: given before --config {}, whose model.sampler StaticCacheSampler "
     "replaces it"),
], ids=["objective", "null objective", "sampler"])
def test_a_class_flag_before_a_config_naming_another_class_is_refused(flag, config, message, tmp_path, caplog):
    """`--model.objective CISPO --config gspo.yaml` trained GSPO without a word (the later file
    wins); refused as a callbacks flag there is, naming both classes and where the flag goes (and
    not said as two files, one of them empty: "over --config 's")."""
    import logging

    path = str(CONFIGS / config)
    with caplog.at_level(logging.WARNING, logger="lit_covrl"), pytest.raises(ValueError) as err:
        _cli(tmp_path, *flag, "--config", path)
    assert str(err.value) == message.format(path) + "; put it after the last --config"
    assert "objectives do not stack" not in caplog.text, caplog.text


def test_a_class_flag_before_a_config_naming_the_same_class_passes(tmp_path):
    objective = _cli(tmp_path, "--model.objective", "lit_covrl.objectives.GSPO",
                     "--config", str(CONFIGS / "cpu" / "gspo.yaml")).model.objective
    assert (type(objective).__name__, objective.clip_low) == ("GSPO", 3e-4)


def test_init_args_of_the_same_objective_class_still_stack(tmp_path):
    gspo = CONFIGS / "cpu" / "gspo.yaml"
    objective = _cli(tmp_path, "--config", str(gspo), "--model.objective", "lit_covrl.objectives.GSPO",
                     "--model.objective.init_args.clip_high=0.001").model.objective
    assert (objective.clip_low, objective.clip_high) == (3e-4, 0.001)


@pytest.mark.parametrize("first", [[], ["--config", "CLIP_COV"]])
def test_a_callbacks_flag_before_a_config_that_sets_callbacks_is_refused(first, tmp_path, capsys):
    """quickstart.yaml's `callbacks: []` would replace (drop) the flag given before it."""
    first = [str(CONFIGS / "cpu" / "clip_cov.yaml") if a == "CLIP_COV" else a for a in first]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *first, "--trainer.callbacks+=lit_covrl.regularizers.EntropyBonus", "--config", str(QUICK),
              "--print_config"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lit-covrl: error: --trainer.callbacks+: given before --config {QUICK}")
    assert "put it after the last --config" in err[-1]


def test_a_callbacks_flag_between_config_files_stays_when_a_later_file_sets_none(tmp_path):
    """Two files set callbacks, then the flag, then a file that sets none: the merged list was
    passed after the last file, i.e. after the flag, and dropped it without a word."""
    args = ["--config", str(CONFIGS / "cpu" / "clip_cov.yaml"),
            "--trainer.callbacks+=lit_covrl.regularizers.KLCov", "--config", str(CONFIGS / "cpu" / "cispo.yaml")]
    names = [type(c).__name__ for c in _cli(tmp_path, *args).trainer.callbacks]
    assert names.count("ClipCov") == 1 and names.count("KLCov") == 1, names


def test_the_short_config_flag_stacks_callbacks_too(tmp_path):
    """Lightning's CLI takes `-c` for `--config`: stacked files' callbacks add up with it too."""
    import yaml

    from lit_covrl.cli_args import stack_config_callbacks

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("trainer:\n  callbacks:\n    - {class_path: A}\n")
    second.write_text("trainer:\n  callbacks:\n    - {class_path: B}\n")
    for short in (["-c", str(first), "-c", str(second)], ["-c=" + str(first), "--config", str(second)]):
        args = stack_config_callbacks(short)
        merged = yaml.safe_load(args[-1].removeprefix("--trainer.callbacks="))
        assert merged == [{"class_path": "A"}, {"class_path": "B"}], args


def test_adding_a_reward_keeps_the_default_exact_match(tmp_path):
    """The module's default reward (exact match) was implicit (`reward: null`), so
    `--model.reward+=X` on the quickstart trained on X alone; it is now the parser's explicit default."""
    from lit_covrl.rewards import ExactMatchReward, MathVerifyReward

    assert type(_cli(tmp_path).model.reward) is ExactMatchReward
    added = _cli(tmp_path, "--model.reward+=lit_covrl.rewards.MathVerifyReward").model.reward
    assert [type(r) for r in added] == [ExactMatchReward, MathVerifyReward]


def test_a_csv_logger_run_gets_the_method_name(tmp_path):
    """Runs are named `<method>-<config stems>-v<N>` for a CSV logger too (it got version_0)."""
    cli = _cli(tmp_path, "--config", str(QUICK.parent / "cpu/clip_cov.yaml"), "--trainer.logger",
               "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert type(cli.trainer.logger).__name__ == "CSVLogger"
    assert Path(cli.trainer.logger.log_dir).name == "clip_cov-quickstart-v0"


def test_a_bracketed_stop_string_warns_how_to_keep_its_brackets(caplog):
    """`--model.rollout.stop+=[/INST]` adds `/INST` (a YAML list): it says so, once, with the form
    that keeps the brackets; a real list or the quoted form says nothing."""
    import logging

    from lit_covrl.cli_args import one_string_lists

    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        one_string_lists(["--model.rollout.stop+=[/INST]"])
    assert """for the string [/INST] itself write '["[/INST]"]'""" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        one_string_lists(["--model.rollout.stop+=[a, b]", '--model.rollout.stop=["[/INST]"]'])
        # the README's own file-list form: a file name, not a stop string (it warned on every run)
        one_string_lists(["--data.train_files", "[path/to/train.jsonl]", "--data.val_files=[v.jsonl]"])
    assert not caplog.records


def test_the_end_of_fit_message_offers_tensorboard_only_for_event_files(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lit_covrl.progress import fit_end_message

    ckpt = SimpleNamespace(last_model_path="runs/x/checkpoints/last.ckpt")
    tb = fit_end_message(SimpleNamespace(logger=TensorBoardLogger(str(tmp_path)), checkpoint_callback=ckpt))
    assert "tensorboard --logdir" in tb and "checkpoint:  runs/x/checkpoints/last.ckpt" in tb
    csv = fit_end_message(SimpleNamespace(logger=CSVLogger(str(tmp_path)), checkpoint_callback=None))
    assert "logs:" in csv and "tensorboard" not in csv and "checkpoint" not in csv


def test_predict_is_not_offered(capsys):
    """`predict` was listed by --help and failed with "Trainer.predict requires forward"."""
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--config", str(QUICK)])
    assert exit_.value.code == 2
    assert "invalid choice: 'predict' (choose from 'fit', 'validate', 'test')" in capsys.readouterr().err


def test_a_saved_config_with_null_top_level_optimizer_keys_is_accepted(tmp_path):
    """Every run's config.yaml lists LightningCLI's `optimizer: null` / `lr_scheduler: null`:
    running it again must not trip the check that refuses a top-level optimizer."""
    from lit_covrl.cli_args import check_moved_keys

    saved = tmp_path / "config.yaml"
    saved.write_text("optimizer: null\nlr_scheduler: null\nmodel:\n  seed: 1\n")
    check_moved_keys(["fit", "--config", str(saved)])
    saved.write_text("optimizer: null\nlr_scheduler:\n  class_path: torch.optim.lr_scheduler.StepLR\n")
    with pytest.raises(ValueError, match="top-level `lr_scheduler:` is not read by lit-covrl"):
        check_moved_keys(["fit", "--config", str(saved)])


def _printed(capsys, *args):
    """The `fit --print_config` output for `args`."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err
    return out


def _read_back(printed):
    """A printed config as omegaconf loads it (as `--config` reads files)."""
    from omegaconf import OmegaConf
    import yaml

    return OmegaConf.to_container(OmegaConf.create(yaml.safe_load(printed)), resolve=True)


def test_a_printed_config_reads_back_with_a_dollar_brace_string_from_the_command_line(tmp_path, capsys):
    """Files are read with omegaconf, which resolves `${...}`; a command-line string holding `${`
    was printed as given, and the printed file (or the run's config.yaml) then failed to load:
    `Interpolation key 'x' not found`. Printed escaped, it reads back to the same config."""
    first = _printed(capsys, "--config", str(QUICK), "--data.system_prompt", "Cost is ${x} dollars")
    assert _read_back(first)["data"]["system_prompt"] == "Cost is ${x} dollars"
    (tmp_path / "printed.yaml").write_text(first)
    assert _printed(capsys, "--config", str(tmp_path / "printed.yaml")) == first


@pytest.mark.parametrize("prompt", ["a\\${x} b", "a\\\\${x} b", "no \\ dollar"])
def test_a_command_line_string_with_a_backslash_before_dollar_brace_reads_back_unchanged(capsys, prompt):
    """`--data.system_prompt 'a\\${x} b'` (a literal backslash) trains with that prompt, but was
    printed `a\\${x} b`, which omegaconf reads back as `a${x} b`: re-running from the run's
    config.yaml silently used another prompt. The backslashes before `${` are doubled when printed."""
    first = _printed(capsys, "--config", str(QUICK), "--data.system_prompt", prompt)
    assert _read_back(first)["data"]["system_prompt"] == prompt


def test_a_printed_config_reads_back_with_escaped_dollar_braces_in_a_list_and_a_dict(tmp_path, capsys):
    """A config file's escaped `\\${x}` inside a list (data.train_files) or a dict
    (data.task_kwargs) is a literal `${x}` once loaded; printed unescaped, the run's config.yaml
    failed to load: `Interpolation key 'x' not found`."""
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  train_files: ['a\\${x}.jsonl']\n  task_kwargs: {k: 'v\\${x}', n: 1}\n")
    first = _printed(capsys, "--config", str(QUICK), "--config", str(extra))
    data = _read_back(first)["data"]
    assert data["train_files"] == ["a${x}.jsonl"] and data["task_kwargs"] == {"k": "v${x}", "n": 1}
    (tmp_path / "printed.yaml").write_text(first)
    assert _printed(capsys, "--config", str(tmp_path / "printed.yaml")) == first


def test_saving_a_run_config_raises_no_deprecation_warning():
    """Lightning's config saver calls dump(..., skip_none=False), a name jsonargparse deprecated;
    through our parser the warning pointed at lit_covrl/cli.py and `python -m lit_covrl.cli fit`
    printed it on every run."""
    import warnings

    from lit_covrl.cli import _ArgumentParser

    parser = _ArgumentParser()
    parser.add_argument("--x", type=str, default="${y}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parser.dump(parser.parse_args([]), skip_none=False).strip() == "x: \\${y}"


def test_a_callbacks_knob_flag_edits_the_last_callback_as_the_readme_says(tmp_path):
    """README "Running methods": a --trainer.callbacks.X flag edits the last callback of the list so
    far (so Archer's knobs in configs/cpu/archer.yaml, before its ReferenceKL, are not reachable),
    and the stack built on the command line, each += followed by its knobs, sets each one's."""
    readme = (CONFIGS.parent / "README.md").read_text()
    assert "a --trainer.callbacks.X flag edits the LAST callback" in readme
    cbs = _cli(tmp_path, "--trainer.callbacks+=lit_covrl.regularizers.Archer", "--trainer.callbacks.quantile=0.5",
               "--trainer.callbacks+=lit_covrl.regularizers.ReferenceKL", "--trainer.callbacks.beta=0.001",
               "--trainer.callbacks.estimator=k3", "--model.loss.dual_clip", "10").trainer.callbacks
    archer, kl = [c for c in cbs if type(c).__name__ in ("Archer", "ReferenceKL")]
    assert (type(archer).__name__, archer.quantile, kl.beta, kl.estimator) == ("Archer", 0.5, 0.001, "k3")
    with pytest.raises(SystemExit) as exit_:  # ReferenceKL, the config's last callback, has no quantile
        _cli(tmp_path, "--config", str(CONFIGS / "cpu" / "archer.yaml"), "--trainer.callbacks.quantile=0.5")
    assert exit_.value.code == 2


def test_ckpt_path_last_resumes_the_newest_earlier_run_of_the_config(tmp_path, capsys):
    """`--ckpt_path last` (Lightning's keyword) resumes from the newest earlier run of the same
    config that holds checkpoints/last.ckpt. Lightning looked only in the new run's folder, which
    every fit makes anew (`-v1`), found nothing and trained from step 0 after a warning; `validate
    --ckpt_path last` scored the untrained model. Without an earlier run it is a one-line error."""
    from tests.helpers import scalar_tags

    runs = tmp_path / "runs"
    common = ["--config", str(QUICK), "--torch_threads", "1", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(runs)]
    with pytest.raises(SystemExit):
        main(["fit", *common, "--ckpt_path", "last", "--trainer.max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lit-covrl: error: ckpt_path=last: no last.ckpt in "), err[-1]
    assert "grpo-quickstart-v<N>/checkpoints" in err[-1]
    main(["fit", *common, "--trainer.max_steps", "1"])
    main(["fit", *common, "--ckpt_path", "last", "--trainer.max_steps", "2"])
    second = scalar_tags(runs / "quickstart" / "grpo-quickstart-v1")
    assert {step for step, _ in second["policy/loss"]} == {1}  # resumed after step 0 (was 0 and 1)
    main(["fit", *common, "--ckpt_path", "last", "--trainer.max_steps", "3"])  # the newest: -v1's
    assert {step for step, _ in scalar_tags(runs / "quickstart" / "grpo-quickstart-v2")["policy/loss"]} == {2}


def test_ckpt_path_last_with_a_checkpoint_folder_reads_that_folder(tmp_path, capsys):
    """With an explicit checkpoint.dirpath every run of the config saves there: `--ckpt_path last`
    is its last.ckpt, or a one-line error when it holds none (Lightning trained from scratch)."""
    runs, ck = tmp_path / "runs", tmp_path / "ck"
    common = ["--config", str(QUICK), "--torch_threads", "1", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(runs),
              "--checkpoint.dirpath", str(ck)]
    with pytest.raises(SystemExit):
        main(["fit", *common, "--ckpt_path", "last", "--trainer.max_steps", "1"])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"lit-covrl: error: ckpt_path=last: no last.ckpt in checkpoint.dirpath {ck}")
    main(["fit", *common, "--trainer.max_steps", "1"])
    main(["fit", *common, "--ckpt_path", "last", "--trainer.max_steps", "2"])
    from tests.helpers import scalar_tags

    assert {step for step, _ in scalar_tags(runs / "quickstart" / "grpo-quickstart-v1")["policy/loss"]} == {1}


@pytest.mark.parametrize("version, folder", [(3, "version_3"), ("myrun", "myrun")])
def test_ckpt_path_last_with_an_explicit_logger_version_reads_its_folder(tmp_path, version, folder):
    """An explicit logger version names the run folder: Lightning's version_N for an integer, the
    name itself for a string (review mutation20: the branch was untested)."""
    from jsonargparse import Namespace

    from lit_covrl.run_names import last_checkpoint

    ck = tmp_path / "quickstart" / folder / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "last.ckpt").write_bytes(b"")
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(tmp_path), name="quickstart", version=version))
    cfg = Namespace(config=None, checkpoint=None, model=None, trainer=Namespace(callbacks=None, logger=logger))
    assert last_checkpoint(cfg) == str(ck / "last.ckpt")



def test_the_data_seed_and_the_model_seed_are_independent(tmp_path):
    """`--data.seed 1` with the default `model.seed` stopped with a traceback at the logger
    (Lightning refuses to merge module and datamodule hparams that share the key `seed` with
    different values: review newcomer24); the loggers now get it as `data_seed`."""
    import yaml

    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/quickstart.yaml", "--data.seed", "1", "--model.rollout.max_new_tokens", "4",
                        steps=1)
    assert "policy/entropy" in tags
    (hp_file,) = tmp_path.rglob("hparams.yaml")
    hp = yaml.safe_load(hp_file.read_text())
    assert hp["data_seed"] == 1 and hp["seed"] != 1


def test_resuming_a_finished_run_without_raising_max_steps_is_a_start_up_error(tmp_path, capsys):
    """The README's resume line re-run on a finished run (max_steps not raised) trained nothing,
    exited 0 and left a new, empty run folder (review newcomer24 F3): now one line naming
    trainer.max_steps, and no new folder."""
    from tests.helpers import cli_fit_tags, cli_start_up_error

    flags = ("--model.rollout.max_new_tokens", "4")
    cli_fit_tags(tmp_path, "configs/quickstart.yaml", *flags, steps=1)
    runs_before = sorted(p.parent for p in tmp_path.rglob("events.out.tfevents.*"))
    err = cli_start_up_error(tmp_path, capsys, "configs/quickstart.yaml", *flags,
                             "--ckpt_path", str(tmp_path / "ck" / "last.ckpt"))
    assert "trainer.max_steps=1 is invalid" in err and "has taken 1 RL steps already" in err, err
    assert sorted(p.parent for p in tmp_path.rglob("events.out.tfevents.*")) == runs_before


def needs_col(completion, answer, difficulty):  # a reward reading a column the test's data lacks
    return 1.0


def test_a_start_up_error_says_the_skipped_rows_listing_went_with_the_run_folder(tmp_path, capsys, caplog):
    """The data's skipped rows are listed in <run>/skipped_rows.txt (its path logged), then a start-up
    error removed that folder, file included, without a word (review newcomer24 F4)."""
    import logging

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n{"prompt": "2+2=", "answer": "4"}\n')
    with caplog.at_level(logging.WARNING, logger="lit_covrl"), pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICK), "--data.task", "null", "--data.train_files", f"[{data}]",
              "--data.val_size", "0", "--data.batch_size", "2", "--model.reward", f"{__name__}.needs_col",
              "--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert "is removed, with the skipped_rows.txt named above" in caplog.text, caplog.text
    assert not list((tmp_path / "runs").rglob("skipped_rows.txt"))


def test_a_base_config_without_log_every_n_steps_logs_every_rl_step(tmp_path):
    """Lightning's default of 50 gave a user's own base config one point per 50 RL steps, with no
    warning (review tags25 F1); the CLI's default is 1."""
    from pathlib import Path

    from lit_covrl.cli import main
    from tests.helpers import scalar_tags

    text = (Path(__file__).resolve().parents[1] / "configs/quickstart.yaml").read_text()
    assert "  log_every_n_steps: 1\n" in text
    (tmp_path / "base.yaml").write_text(text.replace("  log_every_n_steps: 1\n", ""))
    main(["fit", "--config", str(tmp_path / "base.yaml"), "--torch_threads", "1", "--trainer.max_steps", "3",
          "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--checkpoint.dirpath", str(tmp_path / "ck"), "--trainer.logger.init_args.save_dir", str(tmp_path / "tb")])
    tags = scalar_tags(tmp_path / "tb")
    assert [s for s, _ in tags["rollout/reward_mean"]] == [0, 1, 2] and len(tags["policy/entropy"]) == 3
