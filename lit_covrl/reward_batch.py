"""A batched reward's call for `lit_covrl.reward_set.RewardSet`: `fn(**kwargs)` once per batch, on a
daemon thread abandoned after `timeout_s * N` (the item-level budget of its N items; see
`lit_covrl.rewards` on abandoned threads), and the list it returns checked. A call that raises,
times out or returns no list of N values scores the whole batch 0.0 (counted as N failures); a
non-finite or non-numeric entry scores its item 0.0. Failures are logged as `score_completions`
logs them.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from lit_covrl.rewards import ScoreResult, _log_failures, _safe_repr, _to_reward, abandon


def _score_batched(fn, kwargs: dict, n: int, timeout_s) -> ScoreResult:
    status, value = _run(fn, kwargs, None if timeout_s is None else timeout_s * max(n, 1))
    if status == "ok":
        try:
            if isinstance(value, (Mapping, str, bytes)):  # iterable, but as its keys or characters
                raise TypeError
            values = list(value)
        except Exception:  # noqa: BLE001 - not iterable, or an iterator that raises
            status, value = "invalid", (f"returned {_safe_repr(value)} (type {type(value).__name__}), "
                                        f"expected a list of {n} numbers")
        else:
            if len(values) != n:
                status, value = "invalid", f"returned {len(values)} values for {n} completions"
    res = ScoreResult(rewards=[0.0] * n)
    failed: list[tuple[int, str, str]] = []
    if status != "ok":
        setattr(res, {"error": "errors", "timeout": "timeouts"}.get(status, "invalid"), n)
        failed.append((0, status, f"whole batch of {n}: {value}"))
    else:
        for i, v in enumerate(values):
            r = _to_reward(v)
            if r is None:
                res.invalid += 1
                failed.append((i, "invalid", f"returned {_safe_repr(v)} (type {type(v).__name__})"))
            else:
                res.rewards[i] = r
    if failed:
        _log_failures(fn, failed, res, n)
    return res


def _run(fn: Callable, kwargs: dict, timeout_s: float | None) -> tuple[str, Any]:
    """('ok', value) | ('error', message) | ('timeout', message): one call, optionally on a daemon
    thread that is abandoned after timeout_s (see lit_covrl.rewards on abandoned threads)."""
    def call() -> tuple[str, Any]:
        try:
            return "ok", fn(**kwargs)
        except Exception as e:  # noqa: BLE001 - contained by design
            return "error", f"{type(e).__name__}: {e}"

    if timeout_s is None:
        return call()
    box: queue.SimpleQueue = queue.SimpleQueue()
    thread = threading.Thread(target=lambda: box.put(call()), name="lit_covrl-reward", daemon=True)
    thread.start()
    try:
        return box.get(timeout=timeout_s)
    except queue.Empty:
        abandon(thread, fn, timeout_s)
        return "timeout", f"no result within {timeout_s:g} s (thread abandoned)"
