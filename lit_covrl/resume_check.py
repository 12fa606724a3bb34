"""What a resumed run changed, said once when training starts.

Lightning restores the weights, the optimizer state and the callbacks' state from a checkpoint, but
nothing compares the configuration: a run started with `configs/cpu/cispo.yaml` and resumed with the
plain quickstart command trains with PPOClip from then on, and a learning rate changed for the
resume is overwritten by the restored optimizer state, both without a word. A checkpoint therefore
keeps a description of the run's components (objective, rewards, sampler, optimizer, scheduler,
regularizers, the trainer's precision and what `recompute_logprobs: null` resolved to under it);
resuming compares it, and the settings Lightning saves (`hyper_parameters` of the module and the
datamodule), with the run being started and warns once, naming every difference.
Changing a component on purpose (another objective after some steps) stays possible: it is said,
not refused.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)

CKPT_KEY = "lit_covrl_components"
RECOMPUTE = "model.update.recompute_logprobs"
RECOMPUTE_RESOLVED = f"{RECOMPUTE} (resolved)"  # what null means under the run's precision
_PLAIN = (bool, int, float, str, type(None))


def plain(value: Any) -> Any:
    """A value a checkpoint can hold under `weights_only` loading: numbers, strings, lists, dicts;
    dataclasses become dicts, anything else its class path."""
    if isinstance(value, _PLAIN):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return class_path(value)


def class_path(obj: Any) -> str:
    """`package.module.Name` of a function, or of an object's class."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    return f"{target.__module__}.{target.__qualname__}"


def describe(obj: Any) -> dict[str, Any]:
    """`{"class_path": ..., "init_args": {...}}` of a component, as in a YAML config: the
    constructor's parameters that the object keeps under the same name (runtime state, kept under
    private names by convention, is left out). A function has only its class_path."""
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return {"class_path": class_path(obj)}
    try:
        params = inspect.signature(type(obj).__init__).parameters
    except (TypeError, ValueError):
        params = {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    args = {name: plain(getattr(obj, name)) for name, p in params.items()
            if name != "self" and p.kind in kinds and hasattr(obj, name)}
    return {"class_path": class_path(obj), "init_args": args}


def _describe_optimizer(opt: Any, in_effect: bool = False) -> dict[str, Any]:
    """The optimizer's constructor arguments as configured (`defaults`), or, `in_effect`, as its
    first param group holds them: after a resume those are the checkpoint's (torch's
    `load_state_dict` replaces the param groups' hyperparameters), whatever the new run configured.
    The learning rate is always the configured one (a scheduler moves the param group's)."""
    args = dict(getattr(opt, "defaults", {}))
    if in_effect and getattr(opt, "param_groups", None):
        group = opt.param_groups[0]
        args.update({k: group[k] for k in args if k in group and k != "lr"})
    return {"class_path": class_path(opt), "init_args": plain(args)}


def describe_scheduler(scheduler: Any) -> dict[str, Any]:
    """An LR scheduler's class and constructor arguments, without its optimizer and its position
    (`last_epoch`: runtime state under a constructor name)."""
    out = describe(scheduler)
    out["init_args"] = {k: v for k, v in out["init_args"].items() if k not in ("optimizer", "last_epoch", "verbose")}
    return out


def run_components(module: Any, trainer: Any, in_effect: bool = False) -> dict[str, Any]:
    """The description of a run's components that a checkpoint keeps (`CKPT_KEY`; `in_effect`:
    the optimizer's hyperparameters the run trains with, see `_describe_optimizer`)."""
    from lit_covrl.regularizers import Regularizer

    out: dict[str, Any] = {
        "model.objective": describe(module.objective),
        "model.reward": [describe(fn) for fn in module.rewards.rewards],
        "model.sampler": describe(module.sampler),
        "model.optimizer": [_describe_optimizer(o, in_effect) for o in trainer.optimizers],
    }
    # the LR schedulers as configured (described when built: a resume then restores the checkpoint's
    # arguments into them), or, `in_effect` (or not built by the module), as they run
    configured = None if in_effect else getattr(module, "configured_schedulers", None)
    out["model.lr_scheduler"] = configured if configured is not None else \
        [describe_scheduler(c.scheduler) for c in trainer.lr_scheduler_configs]
    for cb in trainer.callbacks:
        if isinstance(cb, Regularizer):
            out[f"trainer.callbacks[{cb.name}]"] = describe(cb)
    # how the run computes: the precision, and what `recompute_logprobs: null` means under it
    out["trainer.precision"] = str(trainer.precision)
    # the global seed (`seed_everything`): a resume restores every random state it seeded
    out["seed_everything"] = os.environ.get("PL_GLOBAL_SEED")
    if hasattr(module, "recompute_logprobs_on"):
        out[RECOMPUTE_RESOLVED] = module.recompute_logprobs_on
    return out


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts as dotted keys (lists stay values: a changed list is one difference)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def _show(value: Any) -> str:
    if isinstance(value, dict) and set(value) <= {"class_path", "init_args"}:
        return str(value.get("class_path"))
    return repr(value)


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per setting that differs (`key: before -> now`); a component whose class changed is
    one line (its arguments differ with it); a component present on one side only is said so."""
    lines: list[str] = []
    for key in list(saved) + [k for k in now if k not in saved]:
        before, after = saved.get(key, _MISSING), now.get(key, _MISSING)
        if before == after:
            continue
        if before is _MISSING or after is _MISSING:
            lines.append(f"{key}: {'added' if before is _MISSING else 'removed'} "
                         f"({_show(after if before is _MISSING else before)})")
            continue
        if _same_class(before, after):
            b, a = _flat("", before.get("init_args", {}), {}), _flat("", after.get("init_args", {}), {})
            # an argument on one side only is the code's change, not the run's (a checkpoint of an
            # older version): one the checkpoint lacks is compared with the class's default
            b.update({k: v for k, v in _init_defaults(after["class_path"]).items() if k in a and k not in b})
            lines += [f"{key}.init_args.{k}: {b[k]!r} -> {a[k]!r}" for k in b if k in a and b[k] != a[k]]
            continue
        lines.append(f"{key}: {_show(before)} -> {_show(after)}")
    return lines


def _init_defaults(path: Any) -> dict[str, Any]:
    """The constructor defaults (but None) of the class at `path` (a dotted class path), flattened
    like a description's init_args; {} when it cannot be imported."""
    module, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    # a None default is usually resolved by the constructor (a regularizer's name): not comparable
    return _flat("", {k: plain(v) for k, v in _constructor_defaults(cls).items() if v is not None}, {})


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


_MISSING = _Missing()


def _same_class(a: Any, b: Any) -> bool:
    return (isinstance(a, dict) and isinstance(b, dict) and "class_path" in a
            and a.get("class_path") == b.get("class_path"))


def settings_of(checkpoint_or_hparams: dict[str, Any], group: str) -> dict[str, Any]:
    return _flat(group, plain(dict(checkpoint_or_hparams)), {})


def resume_differences(checkpoint: dict[str, Any], module: Any, trainer: Any) -> list[str]:
    """Everything the run being started changes relative to the checkpoint's run."""
    saved_settings = settings_of(checkpoint.get("hyper_parameters", {}), "model")
    now_settings = settings_of(module.hparams, "model")
    defaults = _defaults(module, "model")
    dm = getattr(trainer, "datamodule", None)
    if "datamodule_hyper_parameters" in checkpoint and dm is not None:
        saved_settings.update(settings_of(checkpoint["datamodule_hyper_parameters"], "data"))
        now_settings.update(settings_of(getattr(dm, "hparams", {}), "data"))
        defaults.update(_defaults(dm, "data"))
    # every setting is saved: one the checkpoint lacks is newer than the code that wrote it, and
    # that run behaved as its default does: compared with the default (unknown: left out)
    for key in [k for k in now_settings if k not in saved_settings]:
        if key in defaults:
            saved_settings[key] = defaults[key]
        else:
            del now_settings[key]
    # null resolved at run time (on in bf16): an older checkpoint's explicit value is compared with
    # what null means in this run (False -> null in float32 changes nothing)
    if (now_settings.get(RECOMPUTE, False) is None and saved_settings.get(RECOMPUTE) is not None
            and hasattr(module, "recompute_logprobs_on")):
        now_settings[RECOMPUTE] = module.recompute_logprobs_on
    if CKPT_KEY not in checkpoint:  # a checkpoint from before this check: compare settings only
        return differences(saved_settings, now_settings)
    saved = {**_flat_components(checkpoint[CKPT_KEY]), **saved_settings}
    components = run_components(module, trainer)
    if any(isinstance(s, str) for s in checkpoint[CKPT_KEY].get("model.lr_scheduler", [])):  # older: class paths
        components["model.lr_scheduler"] = [s["class_path"] for s in components["model.lr_scheduler"]]
    now = {**_flat_components(components), **now_settings}
    for k in ("trainer.precision", RECOMPUTE_RESOLVED, "seed_everything"):  # not in a checkpoint from before they were kept
        if k not in saved:
            now.pop(k, None)
    lines = differences(saved, now)
    if any(line.startswith(f"{RECOMPUTE}:") for line in lines):  # the setting's own line says it already
        lines = [line for line in lines if not line.startswith(RECOMPUTE_RESOLVED)]
    return lines


def _constructor_defaults(cls: type) -> dict[str, Any]:
    """{parameter: default} of `cls`'s constructor ({} if it has no readable signature)."""
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.name != "self" and p.default is not p.empty}


def _defaults(obj: Any, group: str) -> dict[str, Any]:
    """The constructor defaults of `obj`'s class, flattened like its saved settings."""
    return settings_of(_constructor_defaults(type(obj)), group)


def _flat_components(components: dict[str, Any]) -> dict[str, Any]:
    # lists of one component (a single reward, optimizer) compare as that component
    return {k: (v[0] if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) else v)
            for k, v in components.items()}


# settings whose effect a resume cannot change: the restored optimizer and LR scheduler states bring
# back their hyperparameters, a regularizer's restored random state its seed, and an adaptive
# coefficient's restored value (AdaptiveEntropyBonus, AEnt) its init_coef
_NO_EFFECT = re.compile(r"^(model\.(optimizer|lr_scheduler)\.init_args\.|seed_everything:|"
                        r"trainer\.callbacks\[[^]]*\]\.init_args\.(seed|init_coef):)")


def check_optimizer_class(checkpoint: dict[str, Any], optimizers: list[Any]) -> None:
    """ValueError if the run being started builds another optimizer class than the checkpoint's
    run: the restored state belongs to the checkpoint's optimizer (AdamW -> SGD failed after a
    whole rollout with `KeyError: 'momentum'`; AdamW -> Adam silently stayed AdamW)."""
    saved = [o.get("class_path") for o in checkpoint.get(CKPT_KEY, {}).get("model.optimizer", [])]
    now = [class_path(o) for o in optimizers]
    if saved and saved != now:
        raise ValueError(
            f"model.optimizer: {', '.join(now)} cannot continue the checkpoint's {', '.join(saved)} (a resume "
            "restores that optimizer's state): resume with the checkpoint's optimizer, or start a new run from "
            "its weights (export them, then model.model=<exported folder>)"
        )


def check_scheduler_class(checkpoint: dict[str, Any], schedulers: list[Any]) -> None:
    """ValueError if the run being started swaps the checkpoint's LR scheduler class for another:
    torch loads the restored state into the new class's object (`__dict__.update`), which then
    holds the old one's arguments and the restored learning rate, neither schedule."""
    saved = checkpoint.get(CKPT_KEY, {}).get("model.lr_scheduler", [])
    saved = [s if isinstance(s, str) else s.get("class_path") for s in saved]  # older checkpoints: class paths
    now = [class_path(s) for s in schedulers]
    if saved and now and saved != now:
        raise ValueError(
            f"model.lr_scheduler: {', '.join(now)} cannot continue the checkpoint's {', '.join(saved)} (a resume "
            "restores that scheduler's state): resume with the checkpoint's scheduler, or start a new run from "
            "its weights (export them, then model.model=<exported folder>)")


def warn_on_changes(checkpoint: dict[str, Any], module: Any, trainer: Any, ckpt_path: str | None) -> list[str]:
    """Log one warning listing the differences (rank 0), those that take effect apart from those
    the restored state overrides; returns them."""
    lines = resume_differences(checkpoint, module, trainer)
    if lines and trainer.is_global_zero:
        moot = [line for line in lines if _NO_EFFECT.match(line)]
        used = [line for line in lines if line not in moot]
        parts = [f"resuming from {ckpt_path or 'a checkpoint'} with settings that differ from the checkpoint's run; "
                 "the weights, optimizer state and sampling state continue from the checkpoint."]
        if used:
            parts.append("These take effect from now on:\n  " + "\n  ".join(used))
        if moot:
            parts.append(
                "These take no effect: the optimizer state and the random states restored from the checkpoint keep "
                "its values (start a new run from the exported weights, model.model=<exported folder>, to use "
                "others):\n  " + "\n  ".join(moot))
        log.warning("\n".join(parts))
    return lines


# what an evaluation of a checkpoint scores with: its prompts and its rewards
_EVALUATION_KEYS = ("data.", "model.reward")


def warn_on_evaluation_changes(checkpoint: dict[str, Any], module: Any, trainer: Any, ckpt_path: str | None) -> list[str]:
    """`validate` / `test` of a checkpoint restore its model settings, not its data source or
    rewards: given without the run's config, they scored the built-in arithmetic task with exact
    match (a reasoning run's pass@k read 0.0), without a word. One warning (rank 0) lists the data
    and reward settings that differ from the checkpoint's run; returns them."""
    lines = [line for line in resume_differences(checkpoint, module, trainer) if line.startswith(_EVALUATION_KEYS)]
    if lines and trainer.is_global_zero:
        log.warning("evaluating %s with data or rewards that differ from its run's (give the run's --config, e.g. "
                    "its config.yaml, to score what it trained on; intended when evaluating on other data):\n  %s",
                    ckpt_path or "a checkpoint", "\n  ".join(lines))
    return lines
