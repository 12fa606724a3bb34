"""Checkpoint files are atomic: a write that fails part-way (a full disk, injected with
tests/faults.py), a kill -9 during a slow write, or a temporary folder on another filesystem never
leaves an unreadable file at a checkpoint name, and the latest complete checkpoint resumes.

The system temporary folder is put on /dev/shm (tmpfs) while checkpoints go under pytest's
tmp_path (another filesystem here): Lightning's default IO would then *copy* its temporary file over
the checkpoint in place, which is exactly what loses `last.ckpt` on a full disk or a kill.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_covrl.checkpointing import (
    AtomicCheckpoint, AtomicCheckpointIO, CheckpointWriteError, atomic_write, is_temporary_name, temporary_name,
)
from lit_covrl.data import PromptDataModule
from tests import _dist
from tests.faults import faulty_folder
from tests.test_module import make_data, make_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmp_on_other_fs(tmp_path, monkeypatch):
    """The system temporary folder on /dev/shm, on another filesystem than tmp_path."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    shm = tempfile.mkdtemp(dir="/dev/shm")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and tmp_path are on the same filesystem")
    monkeypatch.setattr(tempfile, "tempdir", shm)
    monkeypatch.setenv("TMPDIR", shm)
    yield shm
    import shutil

    shutil.rmtree(shm, ignore_errors=True)


def _trainer(ckdir: Path, steps: int, **ckpt_kw) -> L.Trainer:
    ckpt_kw = {"dirpath": ckdir, "every_n_train_steps": 1, "save_last": True, **ckpt_kw}
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, callbacks=[AtomicCheckpoint(**ckpt_kw)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _fit(model_dir, ckdir: Path, steps: int, ckpt_path: Path | None = None, **ckpt_kw) -> L.Trainer:
    trainer = _trainer(ckdir, steps, **ckpt_kw)
    trainer.fit(make_module(model_dir), make_data(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer


def _stray_temporaries(ckdir: Path) -> list[str]:
    return [p.name for p in ckdir.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_failure_removes_the_temporary_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_write(target, lambda f: f.write(b"complete"))

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt.*No space left on device"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_checkpoint_file_permissions_follow_the_umask_and_temporary_names_are_recognised(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.ckpt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o644  # as a plain open() would make it
    name = os.path.basename(temporary_name(tmp_path / "last.ckpt"))
    assert name.startswith(".last.ckpt.") and is_temporary_name(name)
    assert not any(is_temporary_name(n) for n in ["last.ckpt", "epoch=0-step=3.ckpt", ".last.ckpt.tmp", "x.tmp"])


def test_temporary_file_is_in_the_checkpoint_folder_whatever_tmpdir_says(tmp_path, tmp_on_other_fs):
    target = tmp_path / "ck" / "epoch=0-step=1.ckpt"
    with faulty_folder(target.parent) as opened:
        AtomicCheckpointIO().save_checkpoint({"w": torch.arange(5)}, target)
    assert opened and all(os.path.dirname(p) == os.path.realpath(target.parent) for p in opened), opened
    assert torch.equal(torch.load(target)["w"], torch.arange(5))
    assert os.listdir(tmp_on_other_fs) == []


def test_disk_full_during_a_checkpoint_keeps_the_last_complete_one_and_resumes(
    tiny_model_dir, tmp_path, tmp_on_other_fs
):
    ck = tmp_path / "ck"
    _fit(tiny_model_dir, ck, 2)
    size = (ck / "last.ckpt").stat().st_size
    # step 3: epoch=0-step=3.ckpt (one checkpoint's bytes) fits, last.ckpt fills the disk half-way
    with faulty_folder(ck, capacity=int(1.5 * size)):
        with pytest.raises(CheckpointWriteError, match=r"last\.ckpt.*No space left on device.*RL step 3"):
            _fit(tiny_model_dir, ck, 3, ckpt_path=ck / "last.ckpt")
    assert _step(ck / "last.ckpt") == 2  # the previous last.ckpt, intact
    assert _step(ck / "epoch=0-step=3.ckpt") == 3
    assert _stray_temporaries(ck) == []
    trainer = _fit(tiny_model_dir, ck, 4, ckpt_path=ck / "last.ckpt")
    assert trainer.global_step == 4 and _step(ck / "last.ckpt") == 4


def test_on_write_error_warn_goes_on_and_deletes_no_checkpoint(tiny_model_dir, tmp_path, tmp_on_other_fs, caplog):
    ck = tmp_path / "ck"
    _fit(tiny_model_dir, ck, 2)
    assert sorted(os.listdir(ck)) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    size = (ck / "last.ckpt").stat().st_size
    with faulty_folder(ck, capacity=size // 2), caplog.at_level(logging.WARNING, logger="lit_covrl"):
        trainer = _fit(tiny_model_dir, ck, 4, ckpt_path=ck / "last.ckpt", on_write_error="warn")
    assert trainer.global_step == 4  # training went on
    # step file + last.ckpt at steps 3 and 4, and both once more at the end of fit (retried there
    # because no save of step 4 succeeded)
    assert trainer.checkpoint_callback.failed_writes == 6
    failures = [r.getMessage() for r in caplog.records if "checkpoint write failed" in r.getMessage()]
    assert len(failures) == 6 and all("No space left on device" in m for m in failures), failures
    assert any("epoch=0-step=3.ckpt" in m for m in failures)
    # the step-2 file was not deleted to make room for the step-3 one that never got written
    assert sorted(os.listdir(ck)) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert _step(ck / "last.ckpt") == 2 and _step(ck / "epoch=0-step=2.ckpt") == 2


def _disk_full(f) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("monitor", [None, "step"])  # Lightning's two top-k paths: latest, best by a metric
def test_on_write_error_warn_keeps_tracking_the_checkpoint_it_kept(tiny_model_dir, tmp_path, monkeypatch, monitor):
    """save_top_k=1: Lightning names the new file best (and stops tracking the one it replaces)
    before writing it; step 3's file fails, so step 2's stays, and must be the best until step 4
    replaces it (and then be removed)."""
    save = AtomicCheckpointIO.save_checkpoint

    def step_3_fails(self, checkpoint, path, storage_options=None):
        if os.path.basename(path) == "epoch=0-step=3.ckpt":
            return atomic_write(path, _disk_full)
        return save(self, checkpoint, path, storage_options)

    class BestAfterStep3(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 3:  # step 3's saves are done
                cb = trainer.checkpoint_callback
                self.best = [os.path.basename(cb.best_model_path), list(map(os.path.basename, cb.best_k_models))]

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", step_3_fails)
    ck, spy = tmp_path / "ck", BestAfterStep3()
    trainer = _trainer(ck, 4, save_top_k=1, monitor=monitor, mode="max", on_write_error="warn")
    trainer.callbacks.insert(0, spy)
    trainer.fit(make_module(tiny_model_dir), make_data())
    cb = trainer.checkpoint_callback
    assert cb.failed_writes == 1
    tracked = ["epoch=0-step=2.ckpt"] if monitor else []
    assert spy.best == ["epoch=0-step=2.ckpt", tracked]  # not the step-3 file that was never written
    assert sorted(os.listdir(ck)) == ["epoch=0-step=4.ckpt", "last.ckpt"]  # step 2's went once replaced
    assert os.path.basename(cb.best_model_path) == "epoch=0-step=4.ckpt" and os.path.exists(cb.best_model_path)


class _DiskFullFrom(L.Callback):
    """From RL step `step` on, every checkpoint file write of this process fails (a full disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:  # before this step's saves
            io = trainer.strategy.checkpoint_io
            io.save_checkpoint = lambda checkpoint, path, **_: atomic_write(path, _disk_full)


def _ddp_worker(rank: int, port: int, model_dir: str, prompts: str, out: str) -> None:
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    out, res = Path(out), {}

    def fit(ck: Path, **ckpt_kw) -> AtomicCheckpoint:
        # a collective timeout shorter than the spawn's: ranks left in different collectives fail
        # within the test (60 s once timed out a healthy run on 2 cores shared with other jobs)
        ddp = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=150))
        callbacks = [_DiskFullFrom(2), AtomicCheckpoint(dirpath=ck, every_n_train_steps=1, **ckpt_kw)]
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=ddp, max_steps=3, callbacks=callbacks, logger=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )
        trainer.fit(_dist.make_module(model_dir), _dist.make_data(Path(prompts), _dist.B))
        return trainer.checkpoint_callback

    # link: at the end of the epoch a rank that did not count its step-3 save as failed skips the
    # relink (and its collectives) that the others make
    cb = fit(out / "warn", save_last="link", on_write_error="warn")
    res["warn"] = [cb.failed_writes, os.path.basename(cb.best_model_path), cb._last_global_step_saved]
    try:
        fit(out / "stop", save_last=True, on_write_error="stop")
        res["stop"] = None
    except CheckpointWriteError as err:
        res["stop"] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(res))


@pytest.mark.slow
def test_a_write_that_fails_on_rank_0_fails_on_every_rank(tiny_model_dir, tmp_path):
    """DDP writes single files on rank 0 alone: its failed writes count on rank 1 too (warn), so
    both ranks go on with the same bookkeeping and finish, and stop stops both."""
    prompts = _dist.write_prompts(tmp_path / "prompts.jsonl", 2 * _dist.B * 3)
    _dist.spawn(_ddp_worker, (_dist.free_port(), tiny_model_dir, str(prompts), str(tmp_path)), timeout_s=400)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # steps 2 and 3 failed, and step 3's file once more at the end of fit, on both ranks
        assert res["warn"] == [3, "epoch=0-step=1.ckpt", 1], (rank, res)
        assert "No space left on device" in res["stop"] and "RL step 2" in res["stop"], (rank, res)
    assert sorted(os.listdir(tmp_path / "warn")) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert os.readlink(tmp_path / "warn" / "last.ckpt") == "epoch=0-step=1.ckpt"
    assert sorted(os.listdir(tmp_path / "stop")) == ["epoch=0-step=1.ckpt", "last.ckpt"]


def test_save_last_link_replaces_the_link_atomically(tiny_model_dir, tmp_path):
    ck = tmp_path / "ck"
    _fit(tiny_model_dir, ck, 2, save_last="link", save_top_k=-1)
    assert os.path.islink(ck / "last.ckpt") and os.readlink(ck / "last.ckpt") == "epoch=0-step=2.ckpt"
    assert _step(ck / "last.ckpt") == 2 and _stray_temporaries(ck) == []


def test_save_last_link_never_names_a_deleted_file(tiny_model_dir, tmp_path, monkeypatch):
    """save_top_k=1: Lightning deleted the previous step's file before moving the link off it, so
    `last.ckpt` dangled in between (a kill there left nothing to resume from)."""
    from lit_covrl.checkpointing import AtomicCheckpoint

    dangling = []
    link = AtomicCheckpoint._link_checkpoint

    def spy(trainer, filepath, linkpath):
        if os.path.islink(linkpath):
            dangling.append(not os.path.exists(linkpath))
        return link(trainer, filepath, linkpath)

    monkeypatch.setattr(AtomicCheckpoint, "_link_checkpoint", staticmethod(spy))
    ck = tmp_path / "ck"
    _fit(tiny_model_dir, ck, 3, save_last="link", save_top_k=1)
    assert dangling == [False, False]  # before the relinks of steps 2 and 3
    assert sorted(os.listdir(ck)) == ["epoch=0-step=3.ckpt", "last.ckpt"]  # the old files did go
    assert os.readlink(ck / "last.ckpt") == "epoch=0-step=3.ckpt" and _step(ck / "last.ckpt") == 3


_CHILD = """
import sys
sys.path.insert(0, {root!r})
from tests.faults import faulty_folder
from lit_covrl.cli import main
with faulty_folder({ck!r}, stall_on_file=3, marker={marker!r}):
    main({args!r})
"""


def _cli_args(model_dir: str, ck: Path, steps: int) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--torch_threads", "1",
        "--model.model", model_dir, "--model.rollout.group_size", "2", "--model.rollout.max_new_tokens", "3",
        "--data.batch_size", "2", "--model.update.mini_batch_size", "null", "--trainer.logger", "false",
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", str(ck),
        "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "0",
    ]


@pytest.mark.slow
def test_kill_9_during_a_slow_checkpoint_write_keeps_the_last_complete_one(tiny_model_dir, tmp_path, tmp_on_other_fs):
    ck, marker = tmp_path / "ck", tmp_path / "stalled"
    ck.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": tmp_on_other_fs}
    code = _CHILD.format(root=str(ROOT), ck=str(ck), marker=str(marker), args=_cli_args(tiny_model_dir, ck, 6))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # cwd: the CLI writes config.yaml there (no logger)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert marker.exists(), "the third checkpoint write never started"
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of writing step 3's last.ckpt
    proc.wait()

    assert _step(ck / "last.ckpt") == 2  # the last complete checkpoint, readable
    assert len(_stray_temporaries(ck)) == 1  # the half-written temporary file the kill left behind
    resumed = subprocess.run(
        [sys.executable, "-m", "lit_covrl.cli", *_cli_args(tiny_model_dir, ck, 4),
         "--ckpt_path", str(ck / "last.ckpt")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _step(ck / "last.ckpt") == 4
    assert _stray_temporaries(ck) == []  # the leftover was removed when the resumed fit started


def test_cli_checkpoint_section_takes_on_write_error(tiny_model_dir, tmp_path):
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    args = ["--config", str(ROOT / "configs/quickstart.yaml"), "--model.model", tiny_model_dir,
            "--trainer.logger", "false", "--checkpoint.on_write_error", "warn"]
    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False, args=args)
    cb = cli.trainer.checkpoint_callback
    assert isinstance(cb, AtomicCheckpoint) and cb.on_write_error == "warn"
    assert cb.state_key.startswith("ModelCheckpoint{")  # resumes the state of runs saved before it
    with pytest.raises(ValueError, match="on_write_error"):
        AtomicCheckpoint(on_write_error="ignore")


def test_settings_groups_survive_save_load_and_resume(tiny_model_dir, tmp_path):
    """Checkpoints store the settings groups as plain dicts: the file loads with weights_only=True,
    its hyper_parameters rebuild the same typed groups (as `load_from_checkpoint` would pass
    them), and a fit resumes from it."""
    from lit_covrl.module import GRPOModule

    ck = tmp_path / "ck"
    module = make_module(tiny_model_dir, rollout=dict(max_new_tokens=3), update=dict(mini_batch_size=2, ppo_epochs=2))
    _trainer(ck, 2).fit(module, make_data())
    saved = torch.load(ck / "last.ckpt", map_location="cpu", weights_only=True)  # no pickled dataclasses
    hp = saved["hyper_parameters"]
    assert (hp["update"]["mini_batch_size"], hp["update"]["ppo_epochs"], hp["rollout"]["max_new_tokens"]) == (2, 2, 3)
    loaded = GRPOModule(**hp, reward=module.reward, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))
    assert loaded.settings == module.settings and loaded.settings.update.ppo_epochs == 2
    trainer = _trainer(ck, 3)
    trainer.fit(loaded, make_data(), ckpt_path=str(ck / "last.ckpt"))
    assert trainer.global_step == 3 and _step(ck / "last.ckpt") == 3
    # and Lightning's own loader, outside any fit: the policy holds the trained weights
    standalone = GRPOModule.load_from_checkpoint(ck / "last.ckpt", map_location="cpu")
    assert standalone.settings == module.settings
    trained = torch.load(ck / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for name, value in standalone.state_dict().items():
        if name.startswith("policy."):
            assert torch.equal(value, trained[name]), name
    from lit_covrl.policy import load_policy

    initial = load_policy(tiny_model_dir).state_dict()  # training moved the weights: the check above has teeth
    assert any(not torch.equal(initial[k[len("policy."):]], v) for k, v in trained.items() if k.startswith("policy."))


def _fit_validating(model_dir, root: Path, name: str, steps: int, ckpt_path: Path | None = None, data=None,
                    callbacks=(), module=None) -> L.Trainer:
    """Saved every 2 RL steps and validated every 2, as the shipped configs do (50 and 25)."""
    ck = AtomicCheckpoint(dirpath=root / name / "ck", every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=L.pytorch.loggers.TensorBoardLogger(str(root / name), name="t"),
        callbacks=[ck, *callbacks], enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=1, check_val_every_n_epoch=None, val_check_interval=2,
    )
    trainer.fit(module or make_module(model_dir), data or make_data(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer


def test_last_ckpt_holds_the_final_step_and_a_run_extended_from_it_is_exact(tiny_model_dir, tmp_path):
    """max_steps 5, saved every 2: last.ckpt held step 4 (Lightning writes it at the end of fit only
    when nothing was saved before), so the final step was in no file although the fit printed
    last.ckpt as its checkpoint. Extended from it to 7 steps, the run equals an uninterrupted 7-step one."""
    trainer = _fit_validating(tiny_model_dir, tmp_path, "a", 5)
    ck = tmp_path / "a" / "ck"
    assert _step(ck / "last.ckpt") == 5 and trainer.global_step == 5
    assert _step(ck / "epoch=0-step=5.ckpt") == 5  # a step file too, named as periodic saves are
    extended = _fit_validating(tiny_model_dir, tmp_path, "b", 7, ckpt_path=ck / "last.ckpt")
    full = _fit_validating(tiny_model_dir, tmp_path, "full", 7)
    for p, q in zip(extended.lightning_module.policy.parameters(), full.lightning_module.policy.parameters()):
        assert torch.equal(p, q)


def test_a_run_extended_from_a_checkpoint_saved_after_its_fit_logs_validation_at_the_same_steps(tiny_model_dir, tmp_path):
    """A 4-step run validating at its last step, saved once its fit returned (`trainer.save_checkpoint`)
    and extended to 6 steps: step 6's validation was logged at step 6 instead of the uninterrupted
    run's 5 (Lightning's own step counter, which val/* used, is one ahead in such a checkpoint; the
    training metrics, logged at the RL step, were right)."""
    from tests.helpers import scalar_tags

    first = _fit_validating(tiny_model_dir, tmp_path, "first", 4)
    first.save_checkpoint(tmp_path / "end.ckpt")
    _fit_validating(tiny_model_dir, tmp_path, "extended", 6, ckpt_path=tmp_path / "end.ckpt")
    _fit_validating(tiny_model_dir, tmp_path, "full", 6)
    a, b = scalar_tags(tmp_path / "full"), scalar_tags(tmp_path / "extended")
    assert [s for s, _ in a["val/pass@1"]] == [1, 3, 5]  # steps 2, 4, 6 validated, at the RL step taken
    for tag in ("val/pass@1", "val/pass@k", "val/entropy", "val/reward_errors", "policy/loss"):
        assert b[tag] == [x for x in a[tag] if x[0] >= 4], tag


def test_the_sanity_check_validation_is_not_logged(tiny_model_dir, tmp_path):
    """With Lightning's default sanity check on (num_sanity_val_steps; the shipped configs set 0),
    its figures would go to the loggers at step -1, before any RL step; only step 2's validation
    is logged (at the RL step taken, 1), and val/pass@1 is on the progress bar."""
    from tests.helpers import scalar_tags

    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="t"),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
        log_every_n_steps=1, check_val_every_n_epoch=None, val_check_interval=2,
    )
    trainer.fit(make_module(tiny_model_dir), make_data())
    assert [s for s, _ in scalar_tags(tmp_path)["val/pass@1"]] == [1]
    assert "val/pass@1" in trainer.progress_bar_metrics


def test_a_checkpoint_at_a_validating_step_is_written_after_that_validation(tiny_model_dir, tmp_path):
    """Saved every 2 steps and validated every 2 (as every shipped config: checkpoints on validation
    steps): the step-2 file was written before step 2's validation, which a run resumed from it
    skips (Lightning counts the step done), so its best-so-far validation figures left it out."""
    from tests.helpers import scalar_tags

    _fit_validating(tiny_model_dir, tmp_path, "full", 3)
    saved = torch.load(tmp_path / "full" / "ck" / "epoch=0-step=2.ckpt", weights_only=False)
    dashboard = [v for k, v in saved["callbacks"].items() if "RunDashboard" in k]
    assert dashboard and dashboard[0]["best"], dashboard  # the step-2 validation is in the file
    _fit_validating(tiny_model_dir, tmp_path, "resumed", 3, ckpt_path=tmp_path / "full" / "ck" / "epoch=0-step=2.ckpt")
    a, b = scalar_tags(tmp_path / "full"), scalar_tags(tmp_path / "resumed")
    for tag in ("final/best_val_pass@1", "final/best_val_pass@k", "final/val_pass@1"):
        assert tag in b and b[tag] == a[tag], tag
    assert "val/pass@1" not in b  # not validated twice


class _FolderAtStep(L.Callback):
    """The checkpoint folder's files as they were at the end of RL step `step` (1-based)."""

    def __init__(self, folder: Path, step: int) -> None:
        self.folder, self.step, self.files = folder, step, None

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self.files = sorted(os.listdir(self.folder)) if self.folder.is_dir() else []


@pytest.mark.parametrize("data", ["task_val_size_0", "file_without_val_files"])
def test_a_run_without_held_out_data_writes_its_periodic_checkpoints(tiny_model_dir, tmp_path, data):
    """No held-out data (a task with val_size 0, a train file without val_files: the BYO example),
    saved every 2 steps and 'validated' every 2: each save was deferred to a validation that returns
    at once without calling a hook, so nothing was written until the fit ended (a kill lost the run)."""
    if data == "task_val_size_0":
        dm = make_data(val_size=0)
    else:
        rows = tmp_path / "train.jsonl"
        rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
        dm = PromptDataModule(task=None, train_files=[str(rows)], batch_size=4, seed=0)
    peek = _FolderAtStep(tmp_path / "run" / "ck", 3)
    _fit_validating(tiny_model_dir, tmp_path, "run", 4, data=dm, callbacks=[peek])
    assert peek.files is not None and "epoch=0-step=2.ckpt" in peek.files and "last.ckpt" in peek.files, peek.files
    assert torch.load(tmp_path / "run" / "ck" / "epoch=0-step=2.ckpt", weights_only=False)["global_step"] == 2


def test_a_validation_that_fails_on_a_checkpoint_step_leaves_that_steps_checkpoint(tiny_model_dir, tmp_path, caplog):
    """The save of a validating step waits for its validation: when that validation raised (an
    out-of-memory error in a long held-out pass), the step's checkpoint was never written and the
    run lost every step since the previous one. It is written on the exception now, the message
    names it, and a run resumed from it redoes the validation: as an uninterrupted run."""
    from tests.helpers import scalar_tags

    class Boom(Exception):
        pass

    module = make_module(tiny_model_dir)
    step = module.validation_step

    def failing(batch, batch_idx):
        if module.global_step == 4:
            raise Boom("out of memory")
        return step(batch, batch_idx)

    module.validation_step = failing
    with caplog.at_level("WARNING", logger="lit_covrl"), pytest.raises(Boom):
        _fit_validating(tiny_model_dir, tmp_path, "failed", 6, module=module)
    folder = tmp_path / "failed" / "ck"
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 4
    assert (folder / "epoch=0-step=4.ckpt").exists()
    assert f"after 4 complete RL step(s); resume from its last checkpoint with --ckpt_path {folder / 'last.ckpt'}" in caplog.text

    resumed = _fit_validating(tiny_model_dir, tmp_path, "resumed", 6, ckpt_path=folder / "last.ckpt")
    full = _fit_validating(tiny_model_dir, tmp_path, "full", 6)
    a, b = scalar_tags(tmp_path / "full"), scalar_tags(tmp_path / "resumed")
    assert b["val/pass@1"] == [x for x in a["val/pass@1"] if x[0] >= 3]  # step 4's validation redone
    for p, q in zip(resumed.lightning_module.policy.parameters(), full.lightning_module.policy.parameters()):
        assert torch.equal(p, q)


def test_a_resumed_run_stopped_before_its_first_save_names_the_file_it_resumed_from(tiny_model_dir, tmp_path, caplog):
    """Resumed from step 2 with another checkpoint interval (its callback starts afresh in a new
    folder) and stopped at step 3, before its own first save: the stop said 'no checkpoint was saved
    yet', although the step-2 file it resumed from is the one to resume from."""

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("stopped")

    _fit_validating(tiny_model_dir, tmp_path, "a", 2)
    resumed_from = tmp_path / "a" / "ck" / "last.ckpt"
    ck = AtomicCheckpoint(dirpath=tmp_path / "b" / "ck", every_n_train_steps=100, save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, callbacks=[ck, Stop()], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    with caplog.at_level("WARNING", logger="lit_covrl"), pytest.raises(RuntimeError, match="stopped"):
        trainer.fit(make_module(tiny_model_dir), make_data(), ckpt_path=str(resumed_from))
    assert not (tmp_path / "b" / "ck").exists()
    assert f"after 3 complete RL step(s); resume from its last checkpoint with --ckpt_path {resumed_from}" in caplog.text


def test_an_error_at_start_up_is_not_reported_as_a_stopped_run(tiny_model_dir, tmp_path, caplog):
    """'run stopped by ValueError after 0 complete RL step(s); no checkpoint was saved yet' came
    before the CLI's one-line start-up error (a bad data field, a mistyped --ckpt_path)."""
    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    dm = PromptDataModule(task=None, train_files=[str(rows)], batch_size=1, seed=0)  # no 'prompt' field
    with caplog.at_level("WARNING", logger="lit_covrl"), pytest.raises(ValueError):
        _fit_validating(tiny_model_dir, tmp_path, "bad", 2, data=dm)
    assert "run stopped" not in caplog.text
