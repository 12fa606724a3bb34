"""Atomic checkpoint files: a failed or killed write never leaves an unreadable file at a
checkpoint name, and never destroys the previous checkpoint.

Lightning 2.6 writes a checkpoint file through the strategy's `CheckpointIO`; its default
`TorchCheckpointIO` serializes into memory and writes through an fsspec transaction whose
temporary file lives in the *system* temporary folder. When that folder is on another filesystem
than the checkpoint folder (a node-local /tmp, shared checkpoint storage), the final move is a
copy that truncates and rewrites the target in place: a full disk or a kill during the copy
leaves a truncated `last.ckpt`, and the previous good one is gone.

Here every file is written by `lit_covrl.atomic_files.atomic_write` (a temporary name in the target
folder, fsync, rename; on failure a `CheckpointWriteError` and the previous file kept). A kill -9
can leave a stray temporary file (`.<name>.<random>.tmp`, never matching `*.ckpt`), never a broken
checkpoint; `AtomicCheckpoint` removes such leftovers when the next fit starts in that folder.

- `AtomicCheckpointIO`: a `TorchCheckpointIO` whose local saves use it (remote URLs keep
  Lightning's fsspec path; object stores publish whole objects anyway).
- `AtomicCheckpoint`: Lightning's `ModelCheckpoint` (the CLI's `checkpoint:` section) that installs
  `AtomicCheckpointIO` when the strategy has Lightning's default IO, makes `save_last: link`
  atomic too, and decides what a failed write does (`on_write_error`: stop, or warn and go on).

The file primitives (`atomic_write`, `replace_path`, `fsync_tree`, `CheckpointWriteError`) live in
`lit_covrl.atomic_files` and are importable from here too.

Distributed checkpoint folders (FSDP2 with `save_distributed_checkpoint: true`) bypass the
CheckpointIO: `lit_covrl.sharding.FSDP2Strategy` writes them into a temporary folder next to the
target and swaps it in with `replace_path` once every rank has written its shards.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_covrl import guards
from lit_covrl.atomic_files import (
    CheckpointWriteError, _remove, atomic_write, fsync_tree, is_temporary_name, replace_path, temporary_name,
)

__all__ = ["CheckpointWriteError", "atomic_write", "replace_path", "fsync_tree", "AtomicCheckpointIO",
           "AtomicCheckpoint", "ON_WRITE_ERROR"]

log = logging.getLogger("lit_covrl")

ON_WRITE_ERROR = ("stop", "warn")


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves go through `atomic_write` (see the module docstring).
    `torch.save` streams into the temporary file: no second in-memory copy of the checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        log.debug("saving checkpoint %s", path)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def _copy_into(src: str) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            while block := s.read(1 << 22):
                f.write(block)
    return write


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (every argument is the same) with atomic files.

    Args:
        on_write_error: what a checkpoint file that cannot be written (disk full, permissions, a
            vanished mount) does: "stop" raises `CheckpointWriteError` and ends training (the
            default); "warn" logs a warning naming the file and the cause and training goes on,
            keeping the previous checkpoints (none is deleted to make room for the failed one).
            In a multi-process run a write that fails on any rank (a single file is written by
            rank 0 alone) stops, or is counted in `failed_writes`, on every rank alike.
        **kwargs: `ModelCheckpoint`'s arguments.
    """

    def __init__(self, *args: Any, on_write_error: str = "stop", **kwargs: Any) -> None:
        if on_write_error not in ON_WRITE_ERROR:
            raise ValueError(f"checkpoint.on_write_error={on_write_error!r}; valid: {list(ON_WRITE_ERROR)}")
        super().__init__(*args, **kwargs)
        self.on_write_error = on_write_error
        self.failed_writes = 0
        self._last_write_failed = False
        self._linking = False
        self._removals_after_link: list[str] = []

    @property
    def state_key(self) -> str:
        # the same key as a plain ModelCheckpoint: checkpoints resume across the two classes
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            self._remove_stale_temporaries()
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a user's plugin
            strategy.checkpoint_io = AtomicCheckpointIO()
        elif not isinstance(strategy.checkpoint_io, AtomicCheckpointIO):
            log.info("checkpoint IO %s kept as configured: checkpoint files are written by it, not atomically "
                     "by lit_covrl", type(strategy.checkpoint_io).__name__)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files and folders a killed write left in the checkpoint folder."""
        folder = self.dirpath
        if not folder or not _is_local_file_protocol(folder) or not os.path.isdir(folder):
            return
        for name in sorted(os.listdir(folder)):
            if is_temporary_name(name):
                log.info("removing %s, left by an interrupted checkpoint write", os.path.join(folder, name))
                _remove(os.path.join(folder, name))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """A periodic save that falls on a step that validates is made after that validation
        (Lightning's deferred save, `on_validation_end`), so the checkpoint includes it: saved
        before, the resumed run skipped that validation (Lightning counts the step as done) and its
        best-so-far figures (final/best_val_*) left it out."""
        if self._saves_at(trainer) and self._validates_after_this_step(trainer):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _saves_at(self, trainer) -> bool:
        n = self._every_n_train_steps
        return (n >= 1 and trainer.global_step % n == 0 and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer))

    @staticmethod
    def _validates_after_this_step(trainer) -> bool:
        """Whether a validation runs right after this step. The epoch loop's decision alone is not
        enough: it is True whenever `val_dataloader` is defined, also when it returns no batches (no
        held-out data), and the validation that then returns at once calls no hook, so a save
        deferred to `on_validation_end` was never made: a run without held-out data wrote no
        checkpoint until it ended."""
        loop = trainer.fit_loop
        try:  # the decision the epoch loop makes right after this hook
            if not loop.epoch_loop._should_check_val_fx(loop._data_fetcher):
                return False
            val_loop = loop.epoch_loop.val_loop
            val_loop.setup_data()  # what that validation does first (a no-op once its data is set up)
            return not val_loop.skip
        except AttributeError:  # a Lightning without these internals: save now, as Lightning does
            return False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A fit that stops on an exception once training has begun (or on Ctrl-C) says which
        checkpoint to resume from; an error at start-up is the CLI's one line alone.
        A save deferred to a validation that then failed (an out-of-memory error, a reward crash) is
        written now, in a single-process run: the step's training is complete, and without it the
        run lost every step since the previous checkpoint. A run resumed from that file runs the
        failed validation again. (With several processes the others may be inside a collective that
        a save would wait on forever: the save is left out there.)"""
        if self._defer_save_until_validation and trainer.world_size == 1 and not isinstance(exception, CheckpointWriteError):
            self._defer_save_until_validation = False
            log.warning("the validation after RL step %d failed (%s: %s): writing that step's checkpoint now",
                        trainer.global_step, type(exception).__name__, exception)
            try:
                candidates = self._monitor_candidates(trainer)
                self._save_topk_checkpoint(trainer, candidates)
                self._save_last_checkpoint(trainer, candidates)
            except Exception as err:  # the original exception is the one to raise
                log.warning("could not write it: %s", err)
        latest = guards.last_checkpoint(trainer, self)  # else the file it resumed from
        started = trainer.fit_loop.epoch_loop.batch_progress.total.started > 0  # else a start-up error
        if trainer.is_global_zero and trainer.state.fn == "fit" and (started or isinstance(exception, KeyboardInterrupt)):
            log.warning("run stopped by %s after %d complete RL step(s); %s", type(exception).__name__, trainer.global_step,
                        f"resume from its last checkpoint with --ckpt_path {latest}" if latest else
                        "no checkpoint was saved yet")

    def on_train_end(self, trainer, pl_module) -> None:
        """The last steps are saved too: `last.ckpt` was only written at the last multiple of
        every_n_train_steps (40 steps saved every 25: step 25), except when nothing had been saved."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and trainer.global_step > 0:
            candidates = self._monitor_candidates(trainer)
            # the file is named after the epoch its last step ran in: Lightning has closed it by now
            # (current_epoch counts it done), so `epoch=1-step=N` beside periodic `epoch=0-step=M`
            candidates["epoch"] = torch.tensor(max(trainer.current_epoch - 1, 0))
            if self.monitor is None:  # a step-numbered file too, as a periodic save makes (`link` targets it)
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            return
        super().on_train_end(trainer, pl_module)

    # what Lightning records of a checkpoint before it writes it (the top-k and last names, popping
    # from best_k_models the file the new one replaces) or once it has written it (the step saved)
    _BOOKKEEPING = ("best_model_path", "best_model_score", "best_k_models", "kth_best_model_path", "kth_value",
                    "current_score", "last_model_path", "_last_global_step_saved", "_last_checkpoint_saved")

    @contextlib.contextmanager
    def _undone_if_a_write_fails(self) -> Iterator[None]:
        """A write that failed (on_write_error: warn) leaves Lightning's bookkeeping as it was before
        the attempt: nothing names the file that was not written, the file kept in its place stays
        tracked (and is removed later as usual), and the save is retried as if never made."""
        before = {name: getattr(self, name) for name in self._BOOKKEEPING}
        before["best_k_models"] = dict(self.best_k_models)
        failed = self.failed_writes
        yield
        if self.failed_writes != failed:
            self.__dict__.update(before)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        with self._undone_if_a_write_fails():
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self._last_write_failed = False
        with self._undone_if_a_write_fails():
            error = None
            try:
                super()._save_checkpoint(trainer, filepath)
            except CheckpointWriteError as err:
                error = err
                trainer.strategy.barrier("AtomicCheckpoint.failed_write")  # the one Trainer.save_checkpoint skipped
            # rank 0 alone writes a single file: every rank takes the outcome of the save, or their
            # bookkeeping, hence their next collectives (a save only rank 0 retries), diverge
            if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
                self._write_failed(trainer, filepath, error)

    def _write_failed(self, trainer, filepath: str, error: CheckpointWriteError | None) -> None:
        """Every rank, once a write failed on any (`error`: this rank's, None where its part went
        through): all stop, or all count it and go on."""
        if self.on_write_error == "stop":
            reason = trainer.strategy.broadcast(str(error) if error is not None else None)  # rank 0's
            if error is not None:
                reason = str(error)
            elif reason is None:
                reason = f"could not write checkpoint {filepath!r} on another rank"
            raise CheckpointWriteError(
                f"{reason}. Training stopped at RL step {trainer.global_step}; free space or fix the folder and "
                "resume from the last complete checkpoint (ckpt_path), or set checkpoint.on_write_error: warn "
                "to go on without checkpoints when a write fails."
            ) from error
        self.failed_writes += 1
        self._last_write_failed = True
        if error is not None:  # logged where it failed
            log.warning("checkpoint write failed at RL step %d, training goes on (checkpoint.on_write_error: warn): "
                        "%s", trainer.global_step, error)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if self._last_write_failed:  # the checkpoint meant to replace it was not written: keep it
            if trainer.is_global_zero:  # the rank that removes files
                log.warning("keeping %s: the checkpoint that was to replace it could not be written", filepath)
            return
        if self.save_last == "link" and not self._linking and self._links_to(filepath):
            # Lightning removes the previous step's file before it moves the link to the new one:
            # `last.ckpt` would name a deleted file until then (a kill there leaves nothing to
            # resume from). Removed once the link has moved (`_save_last_checkpoint`).
            self._removals_after_link.append(filepath)
            return
        super()._remove_checkpoint(trainer, filepath)

    def _links_to(self, filepath: str) -> bool:
        last = self.last_model_path
        return bool(last) and os.path.islink(last) and os.path.realpath(last) == os.path.realpath(filepath)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        self._linking = True
        try:
            with self._undone_if_a_write_fails():
                super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._linking = False
        pending, self._removals_after_link = self._removals_after_link, []
        for filepath in pending:
            if self._links_to(filepath):  # the link did not move (its write failed): keep its target
                self._removals_after_link.append(filepath)
            else:
                super()._remove_checkpoint(trainer, filepath)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        """`save_last: link`: the link (or, where links are refused, a copy) replaces `linkpath` by
        a rename, so `last.ckpt` always names a complete checkpoint."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            folder = os.path.dirname(os.path.abspath(linkpath))
            tmp = temporary_name(linkpath)
            try:
                os.symlink(os.path.relpath(filepath, folder), tmp)
            except OSError:  # no symlinks here (e.g. Windows without the privilege): an atomic copy
                atomic_write(linkpath, _copy_into(filepath))
            else:
                replace_path(tmp, linkpath)  # also over a distributed checkpoint folder
        trainer.strategy.barrier()
