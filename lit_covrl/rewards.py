"""Reward functions: completion text + reference answer -> scalar reward.

A reward function is item-level (`reward(completion, answer) -> float`) so that one bad item
cannot spoil a batch: `score_completions` scores each item independently, turning exceptions,
non-numeric or non-finite results (or beyond float32's range) and per-item timeouts into a reward
of 0.0 and counting them.
Keyword arguments (the prompt, the row's other columns), batched rewards and several weighted
rewards are handled by `lit_covrl.reward_set.RewardSet`, which calls `score_completions` for the
item-level ones.

Built-ins:
- `ExactMatchReward`: 1.0 iff the stripped strings are equal.
- `MathVerifyReward`: extracts the final answer of the completion (`lit_covrl.answers.extract_answer`: the last
  non-empty balanced `\\boxed{...}`, else the last math span or a number after it) and checks
  mathematical equivalence with the reference via the `math_verify` library ("1/2",
  "\\frac{1}{2}" and "0.5" are all equal).

Timeouts. Python cannot kill a thread. `score_completions(..., timeout_s=t)` runs the items on a
daemon worker thread and stops waiting for an item after `t` seconds; the stuck thread is
abandoned (it keeps running in the background and its late result is discarded) and a fresh
worker scores the remaining items. Daemon threads never block interpreter exit, but an abandoned
thread that is busy in pure Python still competes for the GIL until it finishes. math_verify's
own timeout uses SIGALRM, which only works in the main thread; `MathVerifyReward` therefore uses
it only when called on the main thread (i.e. `timeout_s=None` in `score_completions`) and relies
on the caller's per-item timeout otherwise.

Neither limit can interrupt C code that holds the GIL: while sympy computes a huge integer (say
`10^{10^{7}}`) in C, no other Python thread runs, so `score_completions` cannot stop waiting (it
returns late, after the computation) and a SIGALRM handler runs only afterwards. Hence the cheap
guards of `MathVerifyReward`: an extracted answer with a numeric power of more than 10^5 digits
(`lit_covrl.answers._huge_power`) scores 0.0 without being parsed, and so does one that
math_verify could work on for minutes in Python (on the worker thread, where its own limit is
off): longer than 300 characters, or nested deeper than any realistic answer
(`lit_covrl.answers._too_complex`), or with an exponent that is itself a large power (`_huge_power`).
"""
from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from lit_covrl.answers import _BOXED, _DOLLAR, _huge_power, _too_complex, extract_answer

__all__ = [
    "RewardFunction",
    "ExactMatchReward",
    "MathVerifyReward",
    "ScoreResult",
    "score_completions",
    "extract_answer",
    "REWARDS",
    "get_reward",
]

log = logging.getLogger("lit_covrl")

# At most this many failures are logged one by one per process; afterwards one summary per call.
_MAX_ITEM_WARNINGS = 5
_item_warnings_emitted = 0


@runtime_checkable
class RewardFunction(Protocol):
    """Scores one completion against its reference answer; higher is better (usually 0 or 1)."""

    def __call__(self, completion: str, answer: str) -> float: ...


class ExactMatchReward:
    """1.0 if `completion.strip() == answer.strip()`, else 0.0."""

    def __call__(self, completion: str, answer: str) -> float:
        return 1.0 if completion.strip() == answer.strip() else 0.0

    def final_answer(self, completion: str) -> str | None:
        """The outcome this reward judges (outcome-based exploration): the stripped completion, or
        None if it is blank."""
        return completion.strip() or None


class MathVerifyReward:
    """1.0 if the completion's final answer is mathematically equal to the reference, else 0.0.

    The final answer is `extract_answer(completion)`. One that sympy might evaluate for unbounded
    time in C code (a numeric power of more than 10^5 digits, such as `10^{10^{7}}`, `10^10^7` or
    `(10^{999})^{999}`: see `_huge_power`; `2^{3^2}` or `2^{10000}` are fine) scores 0.0 without
    being parsed, since no time limit can interrupt that computation. So does one math_verify may
    take seconds to minutes on (`_too_complex`): longer than 300 characters (whitespace aside),
    brackets nested more than 6 deep or functions (`\\sin`, `\\log`, `e^{...}`, ...) more than 4
    deep, unless the reference answer is as long or as deep; or a numeric exponent that is itself
    a power above 2^10 (`2^{10^{4}}`: `_huge_power`).

    Args:
        timeout_s: math_verify's own parse/verify time limit (SIGALRM, whole seconds, rounded up),
            applied only when called on the main thread; elsewhere bound the call from outside
            (`score_completions(timeout_s=...)`).
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError as e:  # pragma: no cover - it is a hard dependency
            raise ImportError("MathVerifyReward needs `pip install math-verify`") from e
        self.timeout_s = timeout_s

    def _signal_timeout(self) -> int | None:
        if self.timeout_s is None or self.timeout_s <= 0:
            return None
        if threading.current_thread() is not threading.main_thread():
            return None
        return max(1, math.ceil(self.timeout_s))

    def _parse(self, text: str, timeout: int | None) -> list:
        from math_verify import parse

        text = text.strip()
        if not text:
            return []
        # Bare LaTeX ("\frac12", "2\pi") only parses inside math delimiters.
        if not _DOLLAR.search(text) and _BOXED not in text:
            parsed = parse(f"${text}$", parsing_timeout=timeout)
            if parsed:
                return parsed
        return parse(text, parsing_timeout=timeout)

    def final_answer(self, completion: str) -> str | None:
        """The outcome this reward judges (outcome-based exploration), or None without a final answer:
        `extract_answer`'s text in a canonical form, so that forms of one value are one outcome.
        A number (`\\frac{1}{2}`, `1/2`, `0.5`, `50\\%`, `\\sqrt{8}` and `2\\sqrt{2}`) is sympy's exact
        value of math_verify's parse, floats made exact rationals (`1/2`, `2*sqrt(2)`; `0.999999999`
        is not `1`); another expression, set or interval is sympy's printed form of the parse (`a+b`
        and `b+a` are `a + b`; integrals, sums, limits and factorials unevaluated: `_canonical`); an
        answer math_verify cannot read, one too complex to parse safely (the limits of scoring) or
        too long to print is its text without whitespace. Forms that only `verify` equates (`x=2`
        and `2`, `5!` and `120`, a float near an irrational) stay apart."""
        answer = extract_answer(completion)
        if answer is None:
            return None
        written = "".join(answer.split())
        if _too_complex(answer) or _huge_power(answer):
            return written
        try:
            parsed = self._parse(answer, self._signal_timeout())
        except Exception:  # math_verify's own timeout or a sympy error: the text is the outcome
            return written
        return (_canonical(parsed[0]) if parsed else None) or written

    def __call__(self, completion: str, answer: str) -> float:
        from math_verify import verify

        predicted = extract_answer(completion)
        if predicted is None or _too_complex(predicted, answer) or _huge_power(predicted, answer):  # never parsed
            return 0.0
        timeout = self._signal_timeout()
        gold = self._parse(answer, timeout)
        if not gold:  # reference math_verify cannot read: fall back to text equality
            return 1.0 if predicted.strip() == answer.strip() else 0.0
        pred = self._parse(predicted, timeout)
        if not pred:
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


def _canonical(expr) -> str | None:
    """A parsed answer's canonical text: its floats made exact rationals (0.5 -> 1/2, 0.999999999
    stays 999999999/1000000000: no rounding to a nearby value the reward scores apart) and its
    arithmetic evaluated (`sqrt(8)` -> `2*sqrt(2)`, 50% -> 1/2), printed by sympy; None where that
    fails (a value too long to print, over Python's 4300-digit int limit). Integrals, sums,
    products, limits, derivatives and factorials are printed as parsed, never evaluated: sympy
    may take minutes on them (`\\int_0^1 e^{x^2}\\sin(x^3)dx`, `4000000!`), unbounded by any timeout."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return "".join(str(expr).split())
    try:
        unevaluated = (sympy.Integral, sympy.Sum, sympy.Product, sympy.Limit, sympy.Derivative, sympy.factorial)
        if not any(expr.has(kind) for kind in unevaluated):
            expr = expr.xreplace({f: sympy.Rational(str(f)) for f in expr.atoms(sympy.Float)}).doit()
        return str(expr)
    except Exception:  # noqa: BLE001 (sympy's errors, the int-to-str digit limit): the written text
        return None


# ----------------------------------------------------------------------------- batch scoring


@dataclass
class ScoreResult:
    """Rewards of a batch (0.0 for every failed item) and how many items failed, by kind."""

    rewards: list[float]
    errors: int = 0  # the reward function raised
    timeouts: int = 0  # it did not return within timeout_s
    invalid: int = 0  # it returned None, NaN/inf, a non-number or a value beyond float32's range

    @property
    def failures(self) -> int:
        return self.errors + self.timeouts + self.invalid


# The largest finite float32: rewards go into a float32 tensor, where anything larger is inf.
_FLOAT32_MAX = 3.4028234663852886e38


def _to_reward(value: Any) -> float | None:
    """float(value) for a real number within float32's finite range (bools count as 0/1), else None
    (also when float() raises, e.g. OverflowError for 10**400)."""
    if value is None or isinstance(value, (str, bytes, complex)):
        return None
    try:
        out = float(value)
    except Exception:  # noqa: BLE001 - any failure to convert makes the value invalid
        return None
    return out if math.isfinite(out) and abs(out) <= _FLOAT32_MAX else None


def _call(fn: RewardFunction, completion: str, answer: str, kwargs: dict | None = None) -> tuple[str, Any]:
    """('ok', reward) | ('invalid', repr) | ('error', message)."""
    try:
        value = fn(completion, answer, **(kwargs or {}))
        reward = _to_reward(value)  # in the guarded region too: it must not end the worker thread
    except Exception as e:  # noqa: BLE001 - contained per item by design
        return "error", f"{type(e).__name__}: {e}"
    if reward is None:
        return "invalid", f"returned {_safe_repr(value)} (type {type(value).__name__})"
    return "ok", reward


def _short(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _safe_repr(value: Any) -> str:
    """Shortened repr(value), which may itself raise (10**5000: too many digits for str())."""
    try:
        return _short(repr(value))
    except Exception as e:  # noqa: BLE001
        return f"<unprintable: {type(e).__name__}>"


class _Worker:
    """A daemon thread scoring items[start:] in order, posting (i, status, value) to its own queue.

    When abandoned (after a timeout) it stops at its next item and posts nothing further.
    """

    def __init__(self, fn: RewardFunction, completions: list[str], answers: list[str], start: int,
                 kwargs: list[dict] | None = None):
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False
        self._args = (fn, completions, answers, start, kwargs)
        self.thread = threading.Thread(target=self._run, name="lit_covrl-reward", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fn, completions, answers, start, kwargs = self._args
        for i in range(start, len(completions)):
            if self.abandoned:
                return
            status, value = _call(fn, completions[i], answers[i], kwargs[i] if kwargs else None)
            if self.abandoned:
                return
            self.results.put((i, status, value))


# Abandoned reward calls still running: each competes for the GIL, so a reward that hangs in
# Python code on many items starves training (measured: an update 2 s -> 140 s after 3 steps).
MAX_STUCK_CALLS = 8
_stuck: list[tuple[threading.Thread, str]] = []  # (thread, reward name), process-wide: all share the GIL
_stuck_lock = threading.Lock()


def abandon(thread: threading.Thread, fn: Any, timeout_s: float) -> None:
    """Count a timed-out call's thread; RuntimeError, naming the rewards they belong to, once more
    than MAX_STUCK_CALLS of them are still running (Python cannot stop them)."""
    with _stuck_lock:
        _stuck[:] = [(t, n) for t, n in _stuck if t.is_alive()]
        if thread.is_alive():
            _stuck.append((thread, getattr(fn, "__name__", type(fn).__name__)))
        by_reward: dict[str, int] = {}
        for _, name in _stuck:
            by_reward[name] = by_reward.get(name, 0) + 1
    if sum(by_reward.values()) > MAX_STUCK_CALLS:
        which = ", ".join(f"{name} ({k})" for name, k in sorted(by_reward.items(), key=lambda kv: -kv[1]))
        raise RuntimeError(
            f"{sum(by_reward.values())} reward calls that outlived model.reward_timeout_s={timeout_s:g} are still "
            f"running in the background (Python cannot stop a thread), by reward: {which}; they slow training "
            "down more with every step, so the run is stopped. Fix the reward where it hangs, or raise "
            "model.reward_timeout_s if it is only slow")


def _score_threaded(
    fn: RewardFunction, completions: list[str], answers: list[str], timeout_s: float, kwargs: list[dict] | None = None
) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    worker = _Worker(fn, completions, answers, 0, kwargs)
    i = 0
    while i < len(completions):
        # Item i starts as soon as item i-1 was posted, so measuring from here is (barely) strict.
        try:
            j, status, value = worker.results.get(timeout=timeout_s)
        except queue.Empty:
            worker.abandoned = True
            abandon(worker.thread, fn, timeout_s)
            out.append(("timeout", f"no result within {timeout_s:g} s (thread abandoned)"))
            i += 1
            if i < len(completions):
                worker = _Worker(fn, completions, answers, i, kwargs)
            continue
        assert j == i
        out.append((status, value))
        i += 1
    return out


def score_completions(
    reward_fn: RewardFunction | Callable[[str, str], Any],
    completions: list[str],
    answers: list[str],
    *,
    timeout_s: float | None = 10.0,
    kwargs: list[dict] | None = None,
) -> ScoreResult:
    """Score each (completion, answer) pair independently; failures score 0.0 and are counted.

    Args:
        reward_fn: item-level reward function.
        completions: N completion texts.
        answers: N reference answers (same order).
        timeout_s: per-item time limit in seconds; None scores inline on the calling thread
            (no thread overhead, no protection against hangs).
        kwargs: N dicts of extra keyword arguments, one per item (`reward_fn(c, a, **kwargs[i])`).
    """
    if len(completions) != len(answers) or (kwargs is not None and len(kwargs) != len(answers)):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers"
                         + (f" and {len(kwargs)} keyword sets" if kwargs is not None else ""))
    if timeout_s is None:
        outcomes = [_call(reward_fn, c, a, kwargs[i] if kwargs else None)
                    for i, (c, a) in enumerate(zip(completions, answers))]
    else:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        outcomes = _score_threaded(reward_fn, completions, answers, timeout_s, kwargs)

    result = ScoreResult(rewards=[])
    failed: list[tuple[int, str, str]] = []
    for i, (status, value) in enumerate(outcomes):
        if status == "ok":
            result.rewards.append(value)
            continue
        result.rewards.append(0.0)
        if status == "error":
            result.errors += 1
        elif status == "timeout":
            result.timeouts += 1
        else:
            result.invalid += 1
        failed.append((i, status, value))
    if failed:
        _log_failures(reward_fn, failed, result, len(completions))
    return result


def _log_failures(reward_fn: Any, failed: list, result: ScoreResult, n: int) -> None:
    global _item_warnings_emitted
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    shown = 0
    for i, status, message in failed:
        if _item_warnings_emitted >= _MAX_ITEM_WARNINGS:
            break
        _item_warnings_emitted += 1
        shown += 1
        log.warning("reward %s, item %d: %s: %s", name, i, status, _short(str(message), 300))
    if len(failed) > shown:
        log.warning(
            "reward %s: %d of %d items scored 0.0 (errors=%d, timeouts=%d, invalid=%d)%s",
            name,
            result.errors + result.timeouts + result.invalid,  # a batched call's one failure is its n items
            n,
            result.errors,
            result.timeouts,
            result.invalid,
            "" if shown else "; per-item messages are no longer shown",
        )


# ----------------------------------------------------------------------------- registry

REWARDS: dict[str, type] = {"exact_match": ExactMatchReward, "math_verify": MathVerifyReward}


def get_reward(name: str, **kwargs: Any) -> RewardFunction:
    """Instantiate a built-in reward by name; unknown names raise ValueError listing the valid ones."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {sorted(REWARDS)}")
    return REWARDS[name](**kwargs)
