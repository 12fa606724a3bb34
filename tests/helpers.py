"""Test helpers: run a short fit and read back what was written to TensorBoard."""
from __future__ import annotations

from pathlib import Path

import lightning as L


def merge_settings(defaults: dict, overrides: dict) -> dict:
    """GRPOModule keyword arguments: `overrides` on top of `defaults`, where a settings group
    given as a dict in both (`rollout=dict(...)`) is merged key by key."""
    out = dict(defaults)
    for key, value in overrides.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if both_dicts else value
    return out


def fit(module, datamodule, *, steps: int, callbacks=(), log_dir: Path | None = None, ckpt_path=None,
        **trainer_kwargs):
    logger = L.pytorch.loggers.TensorBoardLogger(str(log_dir), name="t") if log_dir else False
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=logger, callbacks=list(callbacks),
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
        check_val_every_n_epoch=None, **trainer_kwargs,
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return trainer


def scalar_tags(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series in the TensorBoard event files under log_dir: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def cli_fit_tags(tmp_path: Path, config: str, *flags: str, steps: int = 3) -> dict[str, list[float]]:
    """Run `lit-covrl fit` on configs/quickstart.yaml with `config` (a path under the repository
    root, e.g. configs/cpu/lp_reg.yaml) and the command-line `flags` for `steps` RL steps, one torch
    thread, no validation and no progress bar, its checkpoints in tmp_path / "ck" and its TensorBoard
    run under tmp_path; the scalars written: tag -> its values (`scalar_tags` without the steps)."""
    from lit_covrl.cli import main

    root = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(root / "configs/quickstart.yaml"), "--config", str(root / config),
          "--torch_threads", "1", *flags,
          "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--checkpoint.dirpath", str(tmp_path / "ck"), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    return {k: [v for _, v in series] for k, series in scalar_tags(tmp_path).items()}


def cli_start_up_error(tmp_path: Path, capsys, config: str, *flags: str) -> str:
    """`cli_fit_tags` for a setting the run must refuse at start-up: it exits with code 2 before
    the first rollout, with a one-line message and no traceback; returns stderr."""
    import pytest

    with pytest.raises(SystemExit) as exit_:
        cli_fit_tags(tmp_path, config, *flags, steps=1)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err, err
    return err


def resumed_series(tmp_path: Path, tiny_model_dir, regs, compared: list[str], state_prefix: str):
    """A 4-step fit and a 2-step one saved and resumed to step 4, each with fresh `regs()`: (the full
    run's tags, the resumed run's, the checkpoint's states of the callbacks whose key starts with
    `state_prefix`), each run's tags {tag: {step: value}}."""
    import torch

    from tests.test_module import make_data, make_module
    from tests.test_resume import _series, _trainer

    _trainer(tmp_path / "full", 4, regs()).fit(make_module(tiny_model_dir), make_data())
    first = _trainer(tmp_path / "a", 2, regs())
    first.fit(make_module(tiny_model_dir), make_data())
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    saved = [v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith(state_prefix)]
    _trainer(tmp_path / "b", 4, regs()).fit(make_module(tiny_model_dir), make_data(), ckpt_path=str(ckpt))
    return _series(tmp_path / "full", compared), _series(tmp_path / "b", compared), saved
