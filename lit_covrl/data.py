"""Prompt streams for RL: a LightningDataModule yielding `PromptBatch`es forever.

Sources (exactly one): a built-in synthetic task (seeded, unlimited), local prompt files
(JSON lines or Parquet), or a Hugging Face dataset (optional `datasets` package). They are checked
and read, with the row accounting, by `lit_covrl.sources`; the row files' format is in
`lit_covrl.rows`.

Determinism. Train batch k on rank r of W is a pure function of (seed, k, r, W, m): step k's
global batch is W*B prompts whatever W, laid out over the ranks so that their update j together is
one rank's update j (`lit_covrl.streams`; m = the module's prompts per update, handed over at
start-up as `minibatch_prompts`). The datamodule's stream methods below (`batch_at`, `regen_batch`,
`on_after_batch_transfer`, `state_dict`, `load_state_dict`) are its mixin
`lit_covrl.streams.PromptStream`'s.

Resume. `next_index` (this rank's next stream position) advances in `on_after_batch_transfer`.
In Lightning 2.6 the training epoch loop calls it on the batch returned by `next(data_fetcher)`,
i.e. the batch about to enter `training_step` — the fetcher's one-batch look-ahead happens
*before* that and does not trigger the hook — so the count is exact. It is saved and restored
with checkpoints through `state_dict`/`load_state_dict`, and the next iteration of the train
dataloader starts there. The world size and batch size it counts in are saved with it: resumed
under others, rows continue at the first stream position not yet used, with a warning
(`lit_covrl.streams.resume_index`). The train rows' count and digest are saved too: resumed on
changed rows (a malformed line fixed, rows added or reordered), the epochs' shuffles differ and it
warns. (If both the LightningModule and this datamodule override the hook,
Lightning calls only the datamodule's; the module should not override it.)
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from lit_covrl.row_checks import reuse_warnings
from lit_covrl.rows import MAX_ROW_WARNINGS
from lit_covrl.sources import RowReader, check_sources, file_list, task_heldout, unused_settings
from lit_covrl.streams import PromptStream
from lit_covrl.tasks.base import Task
from lit_covrl.types import Example, PromptBatch, SystemPrompted

__all__ = ["PromptDataModule"]

log = logging.getLogger("lit_covrl")

UNENCODABLE = ("error", "skip")
TASK_CHECK_SAMPLES = 256  # prompts of a task without held-out prompts that start-up checks


# ----------------------------------------------------------------------------- datasets


class _TrainStream(IterableDataset):
    """Endless PromptBatches from the datamodule's current `next_index` on this rank."""

    def __init__(self, dm: "PromptDataModule") -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[PromptBatch]:
        rank, world = self.dm._rank_world()
        return self.dm._stream(rank, world, start=self.dm.next_index)


class _FixedBatches(IterableDataset):
    """A fixed list of batches (iterable, so Lightning never injects a distributed sampler)."""

    def __init__(self, batches: list[PromptBatch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[PromptBatch]:
        return iter(self.batches)


def _batched(examples: list[Example], size: int) -> list[PromptBatch]:
    return [PromptBatch.from_examples(examples[i : i + size]) for i in range(0, len(examples), size)]


# ----------------------------------------------------------------------------- datamodule


class PromptDataModule(PromptStream, L.LightningDataModule):
    """Streams prompt batches from a synthetic task, prompt files or a Hugging Face dataset.

    Args:
        task: a synthetic task: a built-in name (see `lit_covrl.tasks`), the dotted path of your
            own task class (built with `task_kwargs`), or `class_path` + `init_args`; any object
            with `sample(rng: random.Random) -> Example` (and optionally `heldout(n, seed)`).
            Set it to None (YAML `null`) to use `train_files` or `hf_dataset` instead: exactly
            one source may be set.
        task_kwargs: keyword arguments for the task's constructor (built-in names, dotted paths).
        train_files: training prompt files (.jsonl/.json/.parquet), concatenated in order (a single
            path is a one-file list).
        val_files: held-out prompt files (likewise); with a file or HF source and no val_files (and no
            hf_val_split) there is no validation. Usable with any source.
        hf_dataset: Hugging Face dataset name, local folder of data files or `save_to_disk`
            folder (needs `pip install datasets`, or the `[datasets]` extra).
        hf_config: its configuration name, if any.
        hf_train_split: split used for training.
        hf_val_split: split used for validation (None: no validation unless val_files).
        prompt_field: row field holding the prompt: text, or a list of `{role, content}` messages.
            A dotted path reaches into nested objects (`extra_info.question`).
        answer_field: row field holding the reference answer (string or number), or a dotted
            path (`reward_model.ground_truth`).
        system_prompt: a system message put before every string prompt (conversation prompts
            keep their own messages); needs a tokenizer with a chat template.
        batch_size: prompts per training step per device.
        val_size: held-out prompts drawn from a synthetic task (0: no validation).
        val_batch_size: prompts per validation batch.
        seed: seed of the train stream and (unless val_seed is given) of the task's held-out set.
        strict: raise on the first malformed row instead of skipping it.
        unencodable_prompts: a prompt the policy's tokenizer cannot represent (it encodes to the
            unknown token or to nothing; checked at start-up by the module): "error" (ValueError
            naming its file:line) or "skip" (dropped, warned about and counted like a malformed row).
        val_seed: seed of a synthetic task's held-out set; null (default) = `seed`, so each training
            seed also draws its own held-out prompts. Fix it to score runs of different seeds on one
            held-out set (e.g. `tools/compare.py --set data.val_seed=0`).
    """

    def __init__(
        self,
        task: str | Task | None = "arithmetic",
        task_kwargs: dict[str, Any] | None = None,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_train_split: str = "train",
        hf_val_split: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        system_prompt: str | None = None,
        batch_size: int = 16,
        val_size: int = 64,
        val_batch_size: int = 16,
        seed: int = 0,
        strict: bool = False,
        unencodable_prompts: str = "error",
        val_seed: int | None = None,
    ) -> None:
        super().__init__()
        train_files, val_files = file_list(train_files), file_list(val_files)  # saved as lists below
        self.save_hyperparameters()
        check_sources(task, train_files, val_files, hf_dataset, hf_val_split, hf_config, hf_train_split)
        for warning in unused_settings(task, task_kwargs, val_files, hf_val_split, val_size, prompt_field, answer_field):
            rank_zero_warn(warning)
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1, got {val_batch_size}")
        if val_size < 0:
            raise ValueError(f"data.val_size must be >= 0, got {val_size}")
        if unencodable_prompts not in UNENCODABLE:
            raise ValueError(f"data.unencodable_prompts={unencodable_prompts!r}; valid: {list(UNENCODABLE)}")
        self.task = None
        if task is not None:
            from lit_covrl.tasks import get_task, is_mapping_text

            try:
                self.task = get_task(task, **(task_kwargs or {}))
            except TypeError as e:  # a keyword the task's constructor does not take
                raise ValueError(f"data.task_kwargs={task_kwargs!r} does not fit data.task={task!r}: {e}") from e
            if not isinstance(task, str) or is_mapping_text(task):  # plain data: the class path names it
                self.hparams["task"] = f"{type(self.task).__module__}.{type(self.task).__qualname__}"
        self.next_index = 0
        self.reader = RowReader(prompt_field, answer_field, strict=strict)
        self._train_rows: list[Example] | None = None
        self._val_examples: list[Example] = []
        self._val_read = False  # held-out prompts read from files / a HF split (not a task's)
        self._val_batches: list[PromptBatch] | None = None
        self._task_sample: list[Example] | None = None  # task_sample(), drawn once
        self._perms: dict[tuple[str, int], list[int]] = {}
        self._read = {"train": (0, 0), "held-out": (0, 0)}  # (rows read, malformed) of files / HF splits
        self._unencodable = {"train": 0, "held-out": 0}  # rows dropped by reject_prompts
        self._digest: str | None = None  # rows_digest of _train_rows, computed when first needed
        # prompts per optimizer update, set by the module at start-up (None: one update per rollout)
        self.minibatch_prompts: int | None = None

    # --------------------------------------------------------------------- loading

    def setup(self, stage: str | None = None) -> None:
        """Read all rows (once; later calls are no-ops) and build the held-out batches."""
        if self._val_batches is not None:
            return
        hp = self.hparams
        val: list[Example] = []
        if self.task is not None:
            try:
                val = task_heldout(self.task, hp.val_size, f"lit_covrl:val:{self.held_out_seed}")
            except ValueError as e:  # e.g. more than the task's held-out split holds
                kwargs = f" (data.task_kwargs={hp.task_kwargs})" if hp.task_kwargs else ""
                raise ValueError(f"data.val_size={hp.val_size} held-out prompts of task {hp.task!r}{kwargs}: {e}") from e
        elif hp.train_files:
            self._train_rows = [ex for path in hp.train_files for ex in self.reader.read_file(path)]
        else:
            self._train_rows = self.reader.read_hf(hp.hf_dataset, hp.hf_config, hp.hf_train_split)
        train_read = (self.reader.rows_seen, self.reader.skipped_rows)
        if hp.hf_val_split is not None:  # with hf_dataset, the source
            val = self.reader.read_hf(hp.hf_dataset, hp.hf_config, hp.hf_val_split)
        if hp.val_files:
            val = [ex for path in hp.val_files for ex in self.reader.read_file(path)]
        held_out_read = (self.reader.rows_seen - train_read[0], self.reader.skipped_rows - train_read[1])
        self._read = {"train": train_read, "held-out": held_out_read}
        self._val_read = bool(hp.val_files) or (self.task is None and hp.hf_val_split is not None)
        if hp.system_prompt is not None and self._train_rows is not None:
            self._train_rows = [self._with_system(ex) for ex in self._train_rows]
        self._val_examples = [self._with_system(ex) for ex in val]
        self._val_batches = _batched(self._val_examples, hp.val_batch_size)
        self._task_sample = None
        self._write_skipped()
        self._check_rows_left()
        self._warn_about_rows()
        log.info(self.describe())

    def _warn_about_rows(self) -> None:
        """Warnings about train rows that validation or a step's batch would use twice."""
        rank, world = self._rank_world()
        if self._train_rows is not None and rank == 0:  # every rank holds the same rows: said once
            held_out = self._val_examples if self._val_read else None
            for warning in reuse_warnings(self._train_rows, held_out, self.hparams.batch_size, world):
                log.warning(warning)

    def _with_system(self, ex: Example) -> Example:
        """A string prompt as [system, user] messages when `system_prompt` is set (rewards still
        get the string: `types.SystemPrompted`)."""
        sp = self.hparams.system_prompt
        if sp is None or not isinstance(ex.prompt, str):
            return ex
        return dataclasses.replace(ex, prompt=SystemPrompted(sp, ex.prompt))

    def _write_skipped(self) -> None:
        """The skipped rows' listing in the run's log folder (see `RowReader.write_skipped`)."""
        path = self.reader.write_skipped(self.trainer)
        if path is not None:
            self.skipped_rows_file = path

    # row accounting of file and HF sources, kept by the reader
    rows_seen = property(lambda self: self.reader.rows_seen, doc="rows read from files / HF splits")
    rows_used = property(lambda self: self.reader.rows_used, doc="rows kept (valid and encodable)")
    skipped_rows = property(lambda self: self.reader.skipped_rows, doc="rows skipped (malformed or unencodable)")
    skipped = property(lambda self: self.reader.skipped, doc='"file:line: reason" of every skipped row')

    def describe(self) -> str:
        """One line for logs: the source, batch sizes and row counts (train and held-out apart)."""
        hp = self.hparams
        if self.task is not None:
            source = f"task {hp.task!r} (synthetic)"
        else:
            source = f"{len(hp.train_files)} train file(s)" if hp.train_files else f"HF {hp.hf_dataset!r}"
            source += f", train {self._row_counts('train', self._train_rows)}"
        if self._val_read:
            source += f", held-out {self._row_counts('held-out', self._val_examples)}"
        n_val = sum(len(b) for b in self._val_batches or [])
        seeds = f"seed {hp.seed}" + (f" (held-out {hp.val_seed})" if hp.get("val_seed") is not None else "")
        return f"prompts: {source}, {seeds}, {hp.batch_size}/step/device, {n_val} held-out"

    def _row_counts(self, part: str, used: list[Example]) -> str:
        """"used/read rows used (N malformed, M unencodable)" of the train or held-out rows read."""
        read, malformed = self._read[part]
        unencodable = f", {self._unencodable[part]} unencodable" if self._unencodable[part] else ""
        return f"{len(used)}/{read} rows used ({malformed} malformed{unencodable})"

    @property
    def hparams_initial(self):
        """The hparams the loggers get, with `seed` as `data_seed`: Lightning merges these with the
        module's and refuses a key the two hold with different values, and `data.seed` and
        `model.seed` are independent settings (a run with only one of them changed stopped with a
        traceback). Checkpoints keep `seed` (`hparams`)."""
        hp = super().hparams_initial
        if "seed" in hp:
            hp["data_seed"] = hp.pop("seed")
        return hp

    @property
    def held_out_seed(self) -> int:
        """The seed a synthetic task's held-out prompts are drawn with (`val_seed`, else `seed`)."""
        val_seed = self.hparams.get("val_seed")
        return self.hparams.seed if val_seed is None else val_seed

    # --------------------------------------------------------------------- dataloaders
    # (the stream's batches by position, next_index and its checkpoint state: streams.PromptStream)

    def train_dataloader(self) -> DataLoader:
        if self._val_batches is None:
            self.setup("fit")
        return DataLoader(_TrainStream(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        """Fixed held-out batches (index -1), the same on every rank; [] when there are none (a fit
        then does not validate; `validate` / `test` of such data is refused: they printed no figure
        and exited 0)."""
        if self._val_batches is None:
            self.setup("validate")
        if not self._val_batches:
            fn = getattr(getattr(getattr(self, "trainer", None), "state", None), "fn", None)
            if fn in ("validate", "test"):
                raise ValueError(f"nothing to {'validate' if fn == 'validate' else 'test'}: the data has no held-out "
                                 "prompts; set data.val_files (or data.hf_val_split), or data.val_size > 0 with a built-in task")
            return []
        return DataLoader(_FixedBatches(self._val_batches), batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader | list:
        """`lit-covrl test` evaluates on the same held-out batches as validation."""
        return self.val_dataloader()

    # --------------------------------------------------------------------- start-up checks' rows, batch transfer

    @property
    def has_validation(self) -> bool:
        """True when there are held-out prompts (after setup)."""
        return bool(self._val_batches)

    def known_prompts(self) -> list[str]:
        """Every prompt read from files or HF datasets (train and held-out), so the module can check
        prompt lengths at start-up; an unlimited synthetic task's prompts are not among them (its
        held-out prompts are, when they come from val_files)."""
        return [ex.prompt for ex in self.known_examples()]

    def known_examples(self) -> list[Example]:
        """`known_prompts` as Examples, each with its `source` (file:line) when read from a file."""
        if self._val_batches is None:
            raise RuntimeError("call setup() first")
        return (self._train_rows or []) + (self._val_examples if self._val_read else [])

    def task_sample(self) -> list[Example]:
        """A synthetic task's prompts for start-up checks, each labelled with the task's name: its
        held-out prompts, then TASK_CHECK_SAMPLES prompts drawn from a generator of their own (a
        sample of what training draws; the train stream is untouched); [] for file and HF sources.
        Held-out prompts from val_files are not repeated (they are in `known_examples`)."""
        if self.task is None or self._val_batches is None:
            return []
        if self._task_sample is None:
            rng = random.Random(f"lit_covrl:start-up check:{self.hparams.seed}")
            drawn = [self._with_system(self.task.sample(rng)) for _ in range(TASK_CHECK_SAMPLES)]
            task = f"task {self.hparams.task!r}"
            held_out = [] if self._val_read else self._val_examples
            self._task_sample = [dataclasses.replace(ex, source=f"{task}, {label} {i}")
                                 for label, examples in (("held-out prompt", held_out), ("sampled prompt", drawn))
                                 for i, ex in enumerate(examples, 1)]
        return self._task_sample

    def reject_prompts(self, rejected: list[tuple[Example, str]]) -> None:
        """Prompts of `known_examples()` the tokenizer cannot represent, with the reason (from the
        module's start-up check): ValueError naming the first (unencodable_prompts: error), or
        dropped from the train rows and held-out batches and counted in `skipped_rows` (skip)."""
        if not rejected:
            return
        if self.hparams.unencodable_prompts == "error":
            ex, reason = rejected[0]
            more = f" ({len(rejected) - 1} more unencodable prompt(s) in the data)" if len(rejected) > 1 else ""
            raise ValueError(f"{ex.source or 'a prompt'}: {reason}{more}; fix the file or set "
                             "data.unencodable_prompts: skip")
        for ex, reason in rejected[:MAX_ROW_WARNINGS]:
            log.warning("skipping unencodable prompt %s: %s", ex.source or "", reason)
        drop = {id(ex) for ex, _ in rejected}
        n_train, n_val = len(self._train_rows or []), len(self._val_examples)
        if self._train_rows is not None:  # None: a task, with held-out prompts from val_files
            self._train_rows = [ex for ex in self._train_rows if id(ex) not in drop]
        self._val_examples = [ex for ex in self._val_examples if id(ex) not in drop]
        self._unencodable["train"] += n_train - len(self._train_rows or [])
        self._unencodable["held-out"] += n_val - len(self._val_examples)
        self._val_batches = _batched(self._val_examples, self.hparams.val_batch_size)
        self._perms.clear()
        self._digest = None
        self.reader.drop(rejected)
        log.warning("skipped %d prompt(s) the tokenizer cannot represent (data.unencodable_prompts: skip)",
                    len(rejected))
        self._write_skipped()  # the listing in the run's folder includes them (every rank calls this)
        self._check_rows_left()

    def _check_rows_left(self) -> None:
        """ValueError when a source was read and none of its rows is valid: training stops, and
        held-out data given but all malformed ran a whole fit with no validation, exit 0."""
        hp = self.hparams
        if self._train_rows is not None and not self._train_rows:
            raise ValueError(f"no valid training rows in {hp.train_files or hp.hf_dataset} ({self.skipped_rows} skipped)")
        if self._val_read and not self._val_examples:
            source = hp.val_files or f"{hp.hf_dataset}[{hp.hf_val_split}]"
            raise ValueError(f"no valid held-out rows in {source} ({self.skipped_rows} rows skipped in all, "
                             "the first ones warned above with their reasons)")

    def transfer_batch_to_device(self, batch: Any, device, dataloader_idx: int) -> Any:
        # prompt batches are strings: nothing to move (and no slow recursive walk over them)
        if isinstance(batch, PromptBatch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
