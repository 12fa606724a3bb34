"""Built-in synthetic verifiable tasks (seeded, unlimited train prompts, fixed held-out sets)."""
from __future__ import annotations

from typing import Any

from lit_covrl.tasks.base import Task

__all__ = ["Task", "TASKS", "get_task"]


def _registry() -> dict[str, type]:
    from lit_covrl.tasks.arithmetic import ArithmeticTask
    from lit_covrl.tasks.reasoning import ReasoningTask
    from lit_covrl.tasks.word_problems import WordProblemTask

    return {"arithmetic": ArithmeticTask, "reasoning": ReasoningTask, "word_problems": WordProblemTask}


TASKS = tuple(sorted(["arithmetic", "reasoning", "word_problems"]))


def get_task(name: Any, **kwargs: Any) -> Task:
    """A task from a built-in name, the dotted path of a task class (built with `kwargs`), or a
    task object (returned as is). Anything else raises ValueError listing the valid names."""
    registry = _registry()
    if isinstance(name, str) and name in registry:
        return registry[name](**kwargs)
    if is_mapping_text(name):
        name, kwargs = _class_path_mapping(name, kwargs)
    if isinstance(name, str) and "." in name:
        import importlib

        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"data.task={name!r}: cannot import it ({e})") from e
        name = cls(**kwargs)
    elif isinstance(name, str):
        raise ValueError(f"data.task: unknown task {name!r}; valid tasks: {sorted(registry)} "
                         "or the dotted path of a task class")
    elif kwargs:
        raise ValueError("data.task_kwargs applies to a task name or class path, not to a built task (use init_args)")
    if not callable(getattr(name, "sample", None)):
        raise ValueError(f"data.task: {type(name).__name__} has no sample(rng) method (see lit_covrl.tasks.base.Task)")
    return name


def is_mapping_text(task: Any) -> bool:
    """`{class_path: X, init_args: {...}}` as text: `data.task` is a str-or-task setting, so a
    mapping typed on the command line arrives as a string."""
    return isinstance(task, str) and task.lstrip().startswith("{")


def _class_path_mapping(text: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(class path, constructor arguments) of a task mapping given as text (`is_mapping_text`)."""
    import yaml

    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"data.task={text!r}: not a valid mapping ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str) or set(spec) - {"class_path", "init_args"}:
        raise ValueError(f"data.task={text!r}: a mapping must be {{class_path: X, init_args: {{...}}}}")
    if kwargs:
        raise ValueError("data.task_kwargs applies to a task name or class path; a class_path mapping takes init_args")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"data.task={text!r}: init_args must be a mapping")
    return spec["class_path"], init_args
