"""The CLI's run folders: `default_version` names a run `<method>-<config stems>-v<N>` (e.g.
`clip_cov-quickstart-v0`) instead of Lightning's `version_N`, `name_run` gives a configured logger
that name (and reserves its folder), and `last_checkpoint` finds the checkpoint `--ckpt_path last`
means: the newest earlier run of the same name's `checkpoints/last.ckpt`."""
from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

from lit_covrl.dashboard import method_name
from lit_covrl.regularizers.base import Regularizer


def _config_class(entry) -> type | None:
    """The class a parsed config entry names (`class_path`), or None (jsonargparse reports a bad one)."""
    module, _, attr = str(getattr(entry, "class_path", None)).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def _regularizer_name(callback) -> str | None:
    """The metric name of a `trainer.callbacks` entry of a parsed config, if it is a Regularizer."""
    if getattr(callback, "class_path", None) is None:
        return callback.name if isinstance(callback, Regularizer) else None
    cls = _config_class(callback)
    if cls is None or not issubclass(cls, Regularizer):
        return None
    init = getattr(callback, "init_args", None)
    return (init.get("name") if init is not None else None) or cls.default_name


def run_prefix(config_files: list, callbacks: list, model=None) -> str:
    """`<method>-<config stems>`: `method_name` of the parsed `model` config (objective, quantile
    baseline, pass@k advantage, unlikeliness reward) and callbacks (or 'grpo'), then the stems of
    the config files not already named (quickstart + clip_cov.yaml -> clip_cov-quickstart)."""
    objective = _config_class(getattr(model, "objective", None)) if model is not None else None
    loss = getattr(model, "loss", None) if model is not None else None
    quantile, advantage, unlikeliness = (loss.get(k) if hasattr(loss, "get") else getattr(loss, k, None)
                                         for k in ("baseline_quantile", "advantage", "unlikeliness"))
    method = method_name([n for n in (_regularizer_name(cb) for cb in callbacks or []) if n],
                         getattr(objective, "run_name", None), quantile, advantage, unlikeliness)
    parts = [method]
    for f in config_files or []:
        stem = Path(str(f)).stem
        if stem not in parts and stem not in method.split("+"):
            parts.append(stem)
    return "-".join(parts)


def _versions(log_root: Path, prefix: str) -> list[int]:
    """The N of every `<prefix>-v<N>` folder in log_root."""
    pattern = re.compile(re.escape(prefix) + r"-v(\d+)")
    return [int(m.group(1)) for p in (log_root.iterdir() if log_root.is_dir() else [])
            if (m := pattern.fullmatch(p.name))]


def default_version(config_files: list, callbacks: list, log_root: Path, model=None, reserve: bool = False) -> str:
    """`<prefix>-v<N>` (`run_prefix`), N the first N >= 0 above every existing `<prefix>-v<M>`
    folder in log_root (never overwrites). With `reserve` the folder is made here (log_root too),
    the next N taken when it already exists: two runs started at once (seeds launched with `&`)
    then get two folders instead of logging into one."""
    prefix = run_prefix(config_files, callbacks, model)
    taken = _versions(log_root, prefix)
    n = max(taken, default=-1) + 1
    if reserve:
        log_root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (log_root / f"{prefix}-v{n}").mkdir()  # atomic: one of two runs racing for N gets it
                break
            except FileExistsError:
                n += 1
    return f"{prefix}-v{n}"


def _named_logger_root(cfg):
    """(init_args, <save_dir>/<name>) of `cfg`'s TensorBoardLogger or CSVLogger, None for another
    logger or none: the folder that holds its runs' version folders."""
    logger = cfg.get("trainer", {}).get("logger") if hasattr(cfg, "get") else None
    if logger is None or not str(getattr(logger, "class_path", "")).endswith(("TensorBoardLogger", "CSVLogger")):
        return None
    init = logger.init_args
    # $VARS and ~ expanded as the loggers expand them: the folder made is the one they write to
    return init, Path(os.path.expanduser(os.path.expandvars(str(init.get("save_dir"))))) / str(init.get("name") or "")


def name_run(cfg, reserve: bool = False) -> tuple[str | None, list[Path]]:
    """Give a TensorBoardLogger or CSVLogger configured without a version the `default_version` name
    (an explicit version, even "" as tools/compare.py passes, is kept), its folder made now with
    `reserve`. Returns the name given, or None, and the folders made for it: the run folder, then
    those above it that did not exist (the CLI removes them again when the run fails at start-up).
    The CLI keeps the name out of the saved config.yaml, so that re-running that file names a
    new run rather than reusing (and overwriting) the folder of the run that saved it."""
    if (named := _named_logger_root(cfg)) is None or named[0].get("version") is not None:
        return None, []
    init, root = named
    made = [p for p in (root, *root.parents) if not p.is_dir()] if reserve else []
    init.version = default_version(cfg.get("config"), cfg.trainer.get("callbacks"), root, cfg.get("model"), reserve)
    return init.version, [root / init.version, *made] if reserve else []


def last_checkpoint(cfg) -> str | None:
    """What `--ckpt_path last` means for the run `cfg` (a subcommand's parsed config) would start:
    the `checkpoints/last.ckpt` of the newest earlier run of the same name (`<prefix>-v<N>`, the
    highest N holding one), or of the logger's explicit version. Lightning looks for it only in the
    new run's own folder, which every fit makes anew, so it found none and trained from scratch
    after a warning. With an explicit `checkpoint.dirpath` (where every run of the config saves),
    the last.ckpt there; None for another logger or none (Lightning's own search, in the checkpoint
    folder it makes); ValueError naming where it looked when no such checkpoint exists."""
    if dirpath := (cfg.get("checkpoint") or {}).get("dirpath"):
        folder = Path(os.path.expanduser(os.path.expandvars(str(dirpath))))
        if os.path.lexists(ckpt := folder / "last.ckpt"):
            return str(ckpt)
        raise ValueError(f"ckpt_path=last: no last.ckpt in checkpoint.dirpath {folder}; "
                         "give the checkpoint's path: --ckpt_path <folder>/<file>.ckpt")
    if (named := _named_logger_root(cfg)) is None:
        return None
    init, root = named
    version = init.get("version")
    if version is not None:
        folders, looked = [root / (version if isinstance(version, str) else f"version_{version}")], None
    else:
        prefix = run_prefix(cfg.get("config"), cfg.trainer.get("callbacks"), cfg.get("model"))
        folders, looked = [root / f"{prefix}-v{n}" for n in sorted(_versions(root, prefix), reverse=True)], prefix
    for folder in folders:
        if os.path.lexists(ckpt := folder / "checkpoints" / "last.ckpt"):
            return str(ckpt)
    where = f"{root}/{looked}-v<N>/checkpoints" if looked else f"{folders[0]}/checkpoints"
    raise ValueError(f"ckpt_path=last: no last.ckpt in {where} (the runs of this config); "
                     "give the checkpoint's path: --ckpt_path <run>/checkpoints/last.ckpt")
