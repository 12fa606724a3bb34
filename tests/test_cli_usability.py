"""The command line without surprises: `fsdp2` as a strategy name, `lit-covrl export`, one-line
start-up errors, and a progress bar in RL steps."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_covrl.cli import LitCovRLCLI, main
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule
from lit_covrl.sharding import FSDP2Strategy
from tests.test_configs import QUICK

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
    assert errors == ["lit-covrl: error: model.loss.advantage='ppo' is invalid: valid estimators: ['drgrpo', 'grpo', 'rloo'] "
                      "(LIT_COVRL_DEBUG=1 shows the traceback)"]
    loud = _run(args, {"LIT_COVRL_DEBUG": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "lit-covrl: error" not in loud.stderr


@pytest.mark.parametrize("extra,message", [
    (["--model.rollout.group_size", "abc"], 'Parser key "model.rollout.group_size": Expected a <class \'int\'>. Got value: abc'),
    (["--model.nope", "1"], "unrecognized arguments: --model.nope 1"),
    (["--data.task", "null", "--data.train_files", '["missing.jsonl"]'], "data.train_files[0]: no such file: 'missing.jsonl'"),
    (["--trainer.accelerator", "gpu"], "MisconfigurationException: No supported gpu backend found"),  # Lightning's check
    (["--data.task", "null", "--data.strict", "true"], "ROWS:2: field 'prompt' is int"),  # found in setup, inside fit
])
def test_start_up_errors_in_process(extra, message, tmp_path, capsys):
    if "gpu" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present: Lightning accepts the accelerator")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": 3, "answer": "4"}\n')
    if "--data.strict" in extra:
        extra = [*extra, "--data.train_files", f'["{rows}"]']
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICK), *extra, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lit-covrl: error: ") and message.replace("ROWS", str(rows)) in err[-1]


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
