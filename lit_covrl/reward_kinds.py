"""Reward callables that return no score when called, refused when the reward set is built
(`lit_covrl.reward_set.RewardSet`): an `async def` reward returns a coroutine, a generator function
a generator; contained per item, each call scored 0, every step, while the run went on (review
byo25 F12). A batched generator stays valid: its values are collected as the batch's list."""
from __future__ import annotations

import inspect
from collections.abc import Callable


def not_a_value(fn: Callable, batched: bool) -> str | None:
    """What `fn` (a function, or an object whose class has such a `__call__`) is when calling it
    returns no score: "an async def function", "an async generator", "an item-level generator"
    (`batched` False); None otherwise."""
    tests = ((inspect.iscoroutinefunction, "an async def function"), (inspect.isasyncgenfunction, "an async generator"),
             (lambda f: not batched and inspect.isgeneratorfunction(f), "an item-level generator"))
    for f in (fn, None if inspect.isroutine(fn) else getattr(type(fn), "__call__", None)):
        for test, kind in tests:
            if f is not None and test(f):
                return kind
    return None
