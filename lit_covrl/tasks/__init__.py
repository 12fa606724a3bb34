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


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate a built-in task by name; unknown names raise ValueError listing the valid ones."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(registry)}")
    return registry[name](**kwargs)
