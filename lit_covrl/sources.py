"""The prompt sources of `lit_covrl.data.PromptDataModule`: their start-up checks, reading prompt
files and Hugging Face datasets with the row accounting, and a synthetic task's held-out prompts.

Exactly one source feeds training: a synthetic task (`lit_covrl.tasks`), prompt files (JSON
lines or Parquet, decoded and validated by `lit_covrl.rows`) or a Hugging Face dataset (the
optional `datasets` package). `check_sources` rejects a bad combination or a missing file at
start-up, naming the setting. `RowReader` turns files and dataset splits into `Example`s and keeps
the counts the datamodule reports: rows seen, rows used, rows skipped and every skipped row's
"file:line: reason" (listed in `skipped_rows.txt` in the run's log folder). `task_heldout` gives
a task's validation prompts.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import random
from typing import Any

from lit_covrl.rows import jsonl_rows, narrow_floats_meant, parquet_rows, read_rows
from lit_covrl.types import Example

__all__ = ["SUFFIXES", "RowReader", "check_sources", "file_list", "task_heldout"]

log = logging.getLogger("lit_covrl")

SUFFIXES = (".jsonl", ".json", ".parquet")


_NEEDS_DATASETS = ("needs the `datasets` package: pip install datasets "
                   "(or `pip install -e '.[datasets]'` in a lit_covrl checkout)")

def file_list(files: Any) -> Any:
    """`train_files` / `val_files` as a list of str paths: a single path (a str or a Path, from the
    Python API) is a one-file list, not a sequence of one-character paths; None stays None."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    return None if files is None else [os.fspath(f) if isinstance(f, os.PathLike) else f for f in files]


def unused_settings(task: Any, task_kwargs: dict | None, val_files: list[str] | None, hf_val_split: str | None,
                    val_size: int, prompt_field: str, answer_field: str) -> list[str]:
    """Warnings about data settings the chosen source ignores (a run that silently did not do what
    its config says): val_size without a task (the run then has no held-out prompts unless
    val_files / hf_val_split), task_kwargs without a task, prompt_field / answer_field with one."""
    out = []
    if task is None and val_size > 0 and not val_files and hf_val_split is None:
        out.append(f"data.val_size={val_size} draws held-out prompts from a synthetic task, and this run reads its "
                   "prompts from files or a HF dataset: it has no held-out prompts and does not validate (set "
                   "data.val_files or data.hf_val_split; data.val_size 0 silences this)")
    if task is None and task_kwargs:
        out.append(f"data.task_kwargs={task_kwargs!r} is ignored: data.task is null")
    for name, value, default in (("prompt_field", prompt_field, "prompt"), ("answer_field", answer_field, "answer")):
        if task is not None and value != default:
            out.append(f"data.{name}={value!r} is ignored: a synthetic task (data.task) makes its own prompts")
    return out


def check_sources(task: Any, train_files: list[str] | None, val_files: list[str] | None,
                  hf_dataset: str | None, hf_val_split: str | None, hf_config: str | None = None,
                  hf_train_split: str = "train") -> None:
    """ValueError (FileNotFoundError, ImportError) naming the setting unless exactly one source is
    set, the validation source fits it, the HF settings have a dataset, every file exists with a
    known suffix, and `datasets` is installed when a HF dataset is asked for."""
    sources = {"task": task, "train_files": train_files, "hf_dataset": hf_dataset}
    chosen = [k for k, v in sources.items() if v is not None]
    if len(chosen) != 1:
        hint = " (task defaults to 'arithmetic': set task to None / null to use files or HF)" \
            if "task" in chosen else ""
        raise ValueError(
            f"set exactly one prompt source of task, train_files, hf_dataset; got {chosen or 'none'}{hint}")
    for name, value, unset in (("hf_val_split", hf_val_split, None), ("hf_config", hf_config, None),
                               ("hf_train_split", hf_train_split, "train")):
        if value != unset and hf_dataset is None:
            raise ValueError(f"{name} needs hf_dataset")
    if hf_val_split is not None and val_files:
        raise ValueError("set at most one of val_files, hf_val_split")
    if train_files is not None and not train_files:
        raise ValueError("train_files is empty")
    for name, files in (("data.train_files", train_files), ("data.val_files", val_files)):
        for i, path in enumerate(files or []):
            if not str(path).endswith(SUFFIXES):
                raise ValueError(f"{name}[{i}]: {path!r} has an unsupported extension; use one of {SUFFIXES}")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name}[{i}]: no such file: {path!r}")
    if hf_dataset is not None and importlib.util.find_spec("datasets") is None:
        raise ImportError(f"hf_dataset={hf_dataset!r} {_NEEDS_DATASETS}")
    if hf_dataset is not None:
        _check_local_dataset(hf_dataset, hf_val_split)


def saved_to_disk(dataset: str) -> str | None:
    """"dict" / "dataset": a folder written by `DatasetDict.save_to_disk` / `Dataset.save_to_disk`
    (read with `datasets.load_from_disk`; `load_dataset` refuses them); None otherwise."""
    if os.path.isfile(os.path.join(dataset, "dataset_dict.json")):
        return "dict"
    if os.path.isfile(os.path.join(dataset, "state.json")):
        return "dataset"
    return None


def _check_local_dataset(dataset: str, val_split: str | None) -> None:
    if dataset.startswith(("/", "./", "../")) and not os.path.exists(dataset):
        # a path, not a hub name: said here, not by the hub's "Repo id must be in the form ..."
        raise FileNotFoundError(f"data.hf_dataset: no such folder: {dataset!r}")
    if val_split is not None and saved_to_disk(dataset) == "dataset":
        raise ValueError(
            f"data.hf_val_split={val_split!r}, but data.hf_dataset={dataset!r} is a single Dataset saved with "
            "save_to_disk (no splits): save a DatasetDict with the splits, or give held-out rows as data.val_files")


def task_heldout(task: Any, n: int, seed: str) -> list[Example]:
    """Held-out prompts of a task: its `heldout(n, seed)` if it has one (distinct prompts from
    the split that training never samples), else its "test" split if it is a dataclass with a
    `split` field, else plain samples from a seed of their own (which may repeat train prompts)."""
    if hasattr(task, "heldout"):
        return task.heldout(n, seed)
    rng = random.Random(seed)
    if dataclasses.is_dataclass(task) and "split" in {f.name for f in dataclasses.fields(task)}:
        task = dataclasses.replace(task, split="test")
    else:
        log.warning("task %r has no held-out split: validation prompts may also appear in training", task)
    return [task.sample(rng) for _ in range(n)]


class RowReader:
    """Reads prompt files and HF dataset splits into Examples, counting what it read and skipped.

    Args:
        prompt_field, answer_field: the row fields (dotted paths allowed), see `lit_covrl.rows`.
        strict: raise on the first malformed row instead of skipping it.
    """

    def __init__(self, prompt_field: str, answer_field: str, strict: bool = False) -> None:
        self.prompt_field, self.answer_field, self.strict = prompt_field, answer_field, strict
        self.rows_seen = 0
        self.rows_used = 0
        self.skipped_rows = 0
        self.skipped: list[str] = []  # "file:line: reason" of every skipped row

    def read_file(self, path: str) -> list[Example]:
        """The valid rows of a .jsonl / .json / .parquet file, in file order."""
        if path.endswith(".parquet"):
            rows, columns = parquet_rows(path)
            return self._count(path, rows, columns)
        return self._count(path, list(jsonl_rows(path)))

    def read_hf(self, dataset: str, config: str | None, split: str) -> list[Example]:
        """The valid rows of split `split` of `datasets.load_dataset(dataset, config)`."""
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"hf_dataset {_NEEDS_DATASETS}") from e
        ds = _load_split(datasets, dataset, config, split)
        label = f"{dataset}[{split}]"
        values = narrow_floats_meant(list(ds), ds.features.arrow_schema)  # float32 columns: 0.3, not 0.30000001...
        values = class_label_names(values, ds.features)  # ClassLabel columns: "positive", not 1
        rows = [(f"{label}:row {n}", row) for n, row in enumerate(values, 1)]
        return self._count(label, rows, list(ds.column_names))

    def _count(self, label: str, rows: list[tuple[str, Any]], columns: list[str] | None = None) -> list[Example]:
        examples, skipped = read_rows(label, rows, self.prompt_field, self.answer_field, strict=self.strict,
                                      columns=columns)
        self.rows_seen += len(rows)
        self.rows_used += len(examples)
        self.skipped_rows += len(skipped)
        self.skipped += skipped
        return examples

    def drop(self, rejected: list[tuple[Example, str]]) -> None:
        """Count rows dropped after reading (e.g. prompts the tokenizer cannot represent) as skipped."""
        self.skipped_rows += len(rejected)
        self.rows_used -= len(rejected)
        self.skipped += [f"{ex.source or 'prompt'}: {reason}" for ex, reason in rejected]

    def write_skipped(self, trainer: Any) -> str | None:
        """Every skipped row ("file:line: reason") to `skipped_rows.txt` in the run's log folder,
        written by rank 0 (every rank must call this: the folder is a broadcast); its path on rank
        0, None on other ranks, without a trainer or when nothing was skipped."""
        if not self.skipped or trainer is None:
            return None
        folder = trainer.log_dir or trainer.default_root_dir  # a broadcast: every rank asks
        if not trainer.is_global_zero:
            return None
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "skipped_rows.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in self.skipped)
        log.warning("all %d skipped rows (file:line: reason) are listed in %s", len(self.skipped), path)
        return path


def class_label_names(rows: list[dict], features: Any) -> list[dict]:
    """`rows` with each value of a HF `ClassLabel` column (also inside structs and lists) as its label
    name (`ClassLabel.int2str`): a classification set's answer column gave the reward the class
    index ("1"), never its label ("positive"; review byo25 F10). -1, datasets' "no label", is None.
    `features` is the split's `datasets.Features` (a dict of column features)."""
    def named(v: Any, feature: Any) -> Any:
        if v is None:
            return None
        if callable(getattr(feature, "int2str", None)) and isinstance(v, int):
            return feature.int2str(v) if v >= 0 else None
        if isinstance(feature, dict) and isinstance(v, dict):
            return {k: named(x, feature[k]) if k in feature else x for k, x in v.items()}
        inner = getattr(feature, "feature", None)  # a Sequence / List of labels
        return [named(x, inner) for x in v] if inner is not None and isinstance(v, list) else v

    def has_labels(feature: Any) -> bool:
        if callable(getattr(feature, "int2str", None)):
            return True
        inner = getattr(feature, "feature", None)
        parts = feature.values() if isinstance(feature, dict) else [inner] if inner is not None else []
        return any(has_labels(f) for f in parts)

    labelled = {name: f for name, f in (features if isinstance(features, dict) else {}).items() if has_labels(f)}
    if not labelled:
        return rows
    return [{k: named(v, labelled[k]) if k in labelled else v for k, v in row.items()} for row in rows]


def _load_split(datasets: Any, dataset: str, config: str | None, split: str) -> Any:
    """Split `split` of a hub dataset, a local folder of data files, or a `save_to_disk` folder (a
    single Dataset is the one split there is, whatever its name)."""
    kind = saved_to_disk(dataset)
    if kind is None:
        return datasets.load_dataset(dataset, config, split=split)
    saved = datasets.load_from_disk(dataset)
    if kind == "dataset":
        return saved
    if split not in saved:
        raise ValueError(f"data.hf_dataset={dataset!r} (saved with save_to_disk) has no split {split!r}; "
                         f"its splits: {sorted(saved)}")
    return saved[split]
