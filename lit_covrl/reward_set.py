"""Several reward functions, weighted, in the forms TRL and verl users write them.

    r_total(i) = sum_k w_k * r_k(i)          (w_k = 1 unless `weights` says otherwise)

Each reward is any callable (a plain function or an object with `__call__`, annotated or not),
in one of three forms:

- item-level: `fn(completion, answer, **columns) -> float`, called once per completion. The first
  two arguments are positional; the keyword arguments are `prompt` (the row's prompt as in the
  data: a string or a list of `{role, content}` messages) and every other column of the data row,
  each passed only if `fn` has a parameter of that name (or `**kwargs`). The first two parameters
  may have any names but those that say they get something else (`check_calls` refuses them at
  start-up): a column's, the answer field's (see below; as the second it is the answer), the
  names RewardSet passes (`answer`, `prompt`, ... ; `completion` only first, `answer` only second)
  and verl's `data_source`, `extra_info` (and `ground_truth` first). Faults are contained per item
  by `score_completions`: an exception, a non-finite or non-numeric value or a call that outlives
  `timeout_s` scores that item 0.0 and is counted. Async and item-level generator rewards are refused.
- verl's form, an item-level reward with parameters named `solution_str` and `ground_truth`:
  `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float`, called once
  per completion, all by keyword: `solution_str` is the completion, `ground_truth` the reference
  answer, `data_source` and `extra_info` the row's columns of those names; without an `extra_info`
  column, `extra_info` is the row's columns as a dict. Other parameters get columns and `prompt`
  as above; faults are contained the same way.
- batched: `fn(completions, answers, prompts, **columns) -> list[float]`, called once per batch,
  all arguments by keyword, each column as a list (TRL's convention). A reward is batched if it
  has an attribute `batched = True`, or, without that attribute, a parameter named `completions`.
  A batched call that raises, returns a list of the wrong length (or no list: a dict, a string)
  or outlives `timeout_s * N` (the item-level budget of its N items) scores the whole batch 0.0
  (counted as N failures); a
  non-finite or non-numeric entry (or one beyond float32's range) scores its item 0.0.

The answer field is not a column (the reader takes it out of the row), so a reward that names
the last component of the data's answer field as a parameter (`solution` for `answer_field:
solution`, `ground_truth` for `reward_model.ground_truth`) gets the reference answers under that
name as well (`RewardSet(answer_field=...)`), unless the row has a column of that name; the names
RewardSet passes itself (`completion(s)`, `answer(s)`, `prompt(s)`) are never aliased.

Completions are always plain strings (the decoded response), also for conversational prompts:
never TRL's conversational form, a list of `{role, content}` messages per completion. So a TRL
reward function for standard (non-conversational) data, e.g. `def f(completions, solution,
**kwargs)`, works unchanged; one written for conversational data (`c[0]["content"]`) needs
`c` in place of `c[0]["content"]`.

The module's `reward` field is typed `list[Callable] | Callable`, not the `RewardFunction`
Protocol: jsonargparse accepts a class for a Protocol only if its `__call__` signature matches the
Protocol's, annotations included, so an unannotated class was rejected ("does not implement
protocol"). (The list comes first in the union so that a saved config.yaml can write it back.)

The accuracy and pass@k compare the weighted total with `model.correct_threshold`.

Names (for `rollout/reward/<name>`): the reward's `name` attribute if it is a string, else the
function's `__name__`, else its class name in snake case without a trailing "Reward"
(`ExactMatchReward` -> `exact_match`); repeated names get `_2`, `_3`, ...
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lit_covrl.reward_batch import _score_batched
from lit_covrl.reward_kinds import not_a_value
from lit_covrl.rewards import ScoreResult, score_completions
from lit_covrl.types import data_prompt

__all__ = ["RewardSet", "reward_name", "is_batched", "is_verl"]

log = logging.getLogger(__name__)

RESERVED = ("completion", "completions", "answer", "answers")
# Names RewardSet passes itself: never used for the answers under the answer field's name.
PASSED = (*RESERVED, "prompt", "prompts")
# verl's custom reward: compute_score(data_source, solution_str, ground_truth, extra_info=None)
VERL = ("data_source", "solution_str", "ground_truth", "extra_info")


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def is_batched(fn: Callable) -> bool:
    """True for a batched reward (lists in, list out): see the module docstring."""
    flag = getattr(fn, "batched", None)
    if flag is not None:
        return bool(flag)
    sig = _signature(fn)
    return sig is not None and "completions" in sig.parameters


def is_verl(fn: Callable) -> bool:
    """True for an item-level reward in verl's form (parameters `solution_str` and `ground_truth`): see
    the module docstring. (`solution_str` alone, e.g. `r(solution_str, answer)`, is an ordinary
    item-level reward: its first two arguments are positional.)"""
    sig = _signature(fn)
    return not is_batched(fn) and sig is not None and {"solution_str", "ground_truth"} <= set(sig.parameters)


def _first_two(fn: Callable) -> list[str]:
    """The names of the parameters an item-level reward's completion and answer fill (by position)."""
    sig = _signature(fn)
    if sig is None:
        return []
    params = sig.parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]


def _accepted(fn: Callable) -> tuple[set[str] | None, set[str]]:
    """(keyword names `fn` accepts, None if it takes **kwargs; names never to pass as columns:
    an item-level reward's first two parameters, which get the completion and the answer, or
    verl's `solution_str` and `ground_truth`)."""
    sig = _signature(fn)
    if sig is None:
        return None, set()
    params = sig.parameters.values()
    skip = set() if is_batched(fn) else {"solution_str", "ground_truth"} if is_verl(fn) else set(_first_two(fn))
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None, skip
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - skip, skip


def _named(fn: Callable) -> set[str]:
    """Parameter names `fn` spells out (not **kwargs), but an item-level reward's first two."""
    sig = _signature(fn)
    if sig is None:
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in sig.parameters.values() if p.kind in kinds} - _accepted(fn)[1]


def reward_name(fn: Callable) -> str:
    name = getattr(fn, "name", None)
    if not isinstance(name, str) or not name:
        name = getattr(fn, "__name__", None) or type(fn).__name__
        if not hasattr(fn, "__name__"):
            name = re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Reward") or name).lower()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _unique(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        k, cand = 1, n
        while cand in out:
            k += 1
            cand = f"{n}_{k}"
        out.append(cand)
    return out


class RewardSet:
    """A weighted sum of reward functions.

    Args:
        rewards: the reward callables (item-level or batched).
        weights: one weight per reward (None = all 1.0).
        answer_field: the data's answer field (`data.answer_field`, dotted paths allowed); a reward
            with a parameter named like its last component (`solution`, `ground_truth`) gets the
            reference answers under that name too, unless a column of that name exists or the name
            is one RewardSet passes anyway (`answer`, `prompt`, ...). Settable as an attribute.
    """

    def __init__(self, rewards: Sequence[Callable], weights: Sequence[float] | None = None,
                 answer_field: str | None = None) -> None:
        self.rewards = list(rewards)
        if not self.rewards:
            raise ValueError("model.reward: give at least one reward function")
        for i, fn in enumerate(self.rewards):
            if not callable(fn):
                raise ValueError(f"model.reward[{i}]: {fn!r} is not callable")
            if (kind := not_a_value(fn, is_batched(fn))) is not None:
                raise TypeError(f"model.reward[{i}] {reward_name(fn)!r} is {kind}: each call would give no score "
                                "(every item scored 0); write it as a plain def returning the score(s) (a coroutine "
                                "can be run inside one by asyncio.run)")
        if weights is None:
            weights = [1.0] * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise ValueError(f"model.reward_weights has {len(weights)} weights for {len(self.rewards)} rewards")
        self.weights = [float(w) for w in weights]
        for i, w in enumerate(self.weights):
            if not math.isfinite(w):  # every total would be NaN (inf x a reward of 0)
                raise ValueError(f"model.reward_weights[{i}] must be a finite number, got {w}")
        self.names = _unique([reward_name(fn) for fn in self.rewards])
        self._accepts = [_accepted(fn) for fn in self.rewards]
        self._named = [_named(fn) for fn in self.rewards]
        self.answer_field = answer_field

    def answer_namer(self) -> Callable[[str], str | None] | None:
        """The first reward's `final_answer(completion) -> str | None` (the outcome it judges, for
        outcome-based exploration) among the rewards of nonzero weight (a weight-0 reward judges
        nothing the run trains on), or None when none has one."""
        return next((fn.final_answer for fn, w in zip(self.rewards, self.weights)
                     if w != 0 and callable(getattr(fn, "final_answer", None))), None)

    def _answer_alias(self) -> str | None:
        """The name under which rewards that ask for it also get the answers, or None."""
        name = self.answer_field.rsplit(".", 1)[-1] if self.answer_field else None
        return name if name and name not in PASSED else None

    def _rows(self, answers: list[str], columns: list[dict]) -> list[list[dict]]:
        """Each reward's column rows: with the answers under the answer field's name for a reward
        that asks for them (`_answer_alias`), unless a column has that name."""
        alias = self._answer_alias()
        out = []
        for named in self._named:
            ask = alias in named and not any(alias in row for row in columns)
            out.append([{**row, alias: a} for row, a in zip(columns, answers)] if ask else columns)
        return out

    def _calls(self, completions: list[str], answers: list[str], prompts: list[Any],
               columns: list[dict]) -> list[tuple[Callable, str, list[dict], Any]]:
        """Per reward: (fn, name, its column rows, its keyword arguments: one dict per item, or the
        batched call's one dict), built once for the check and the scoring. Prompts are given as in
        the data (a string shown with `data.system_prompt` stays that string)."""
        prompts = [data_prompt(p) for p in prompts]
        out = []
        for fn, accepts, named, name, rows in zip(self.rewards, self._accepts, self._named, self.names,
                                                  self._rows(answers, columns)):
            if is_batched(fn):
                kwargs = _batch_kwargs(accepts[0], completions, answers, prompts, rows)
            else:
                kwargs = [_item_kwargs(*accepts, p, c) for p, c in zip(prompts, rows)]
            if is_verl(fn):
                if "extra_info" in named:  # verl's extra_info: the column, else the row's columns
                    kwargs = [kw if "extra_info" in row else {**kw, "extra_info": dict(row)}
                              for kw, row in zip(kwargs, columns)]
                fn = _VerlCall(fn)
            out.append((fn, name, rows, kwargs))
        return out

    def _check_names(self, columns: list[dict]) -> None:
        """TypeError naming an item-level reward whose first or second parameter, which get the
        completion and the answer, is named as if it got something else."""
        alias = self._answer_alias()
        cols = {k for row in columns for k in row}
        first = (cols - {"completion", "completions"}) | ({alias} if alias else set()) | {
            "answer", "answers", "prompt", "prompts", "data_source", "ground_truth", "extra_info"}
        second = (cols - {"answer", "answers"}) | {
            "completion", "completions", "prompt", "prompts", "data_source", "extra_info"}
        for fn, name in zip(self.rewards, self.names):
            if is_batched(fn) or is_verl(fn):
                continue
            for param, wrong, gets in zip(_first_two(fn), (first, second), ("completion", "reference answer")):
                if param in wrong:
                    what = ("a column of the data" if param in cols else "the reference answer"
                            if param in ("answer", "answers", "ground_truth", alias) else "the completion"
                            if param in ("completion", "completions") else "the prompt"
                            if param in ("prompt", "prompts") else "a column in verl's compute_score")
                    raise TypeError(
                        f"model.reward {name!r}: its parameter {param!r} gets the {gets} (an item-level reward's "
                        f"first two parameters get the completion and the reference answer, whatever their names), "
                        f"but {param!r} names {what}; rename it (verl's compute_score(data_source, solution_str, "
                        "ground_truth, extra_info) is called by keyword)")

    def check_calls(self, answers: list[str], prompts: list[Any], columns: list[dict] | None = None,
                    warn: bool = True) -> None:
        """TypeError naming a reward that cannot take the arguments `score` would give it for any
        of these rows of the data (strict: a required parameter no row's column fills counts), or
        an item-level one whose first two parameters are named as if they got something else than
        the completion and the answer (see the module docstring): the module calls it at start-up,
        also on one row of each set of columns (`warn` False: no warning about shadowed columns)."""
        n = len(answers)
        columns = columns if columns else [{} for _ in range(n)]
        self._check_names(columns)
        shadowed = sorted({k for row in columns for k in row} & set(PASSED))
        if shadowed and warn:  # a reward's completion / answer / prompt arguments are those, never these columns
            log.warning("data column(s) %s are not passed to the rewards: a reward's %s argument(s) get the "
                        "completion(s), the reference answer(s) (data.answer_field) and the prompt(s) "
                        "(data.prompt_field); rename the column(s) to pass them", shadowed, shadowed)
        if n:
            calls = self._calls([""] * n, answers, prompts, columns)
            _check_calls(calls, [""] * n, answers, strict=True)

    def score(
        self,
        completions: list[str],
        answers: list[str],
        prompts: list[Any] | None = None,
        columns: list[dict] | None = None,
        *,
        timeout_s: float | None = 10.0,
    ) -> tuple[list[float], dict[str, list[float]], ScoreResult]:
        """(weighted totals [N], each reward's values by name, failures summed over rewards)."""
        n = len(completions)
        prompts = prompts if prompts is not None else [None] * n
        columns = columns if columns else [{} for _ in range(n)]
        total = [0.0] * n
        per_name: dict[str, list[float]] = {}
        failed = ScoreResult(rewards=[])
        calls = self._calls(completions, answers, prompts, columns)
        _check_calls(calls, completions, answers, strict=False)
        for (fn, name, _, kwargs), w in zip(calls, self.weights):
            # each call gets its own copies of the prompts and columns: a reward that edits them
            # (appends to a conversation, pops a key) must not change the data for the other calls
            # of the step, or for every later epoch of that row
            if is_batched(fn):
                res = _score_batched(fn, copy.deepcopy(kwargs), n, timeout_s)
            else:
                kwargs = [copy.deepcopy(kw) for kw in kwargs]
                res = score_completions(fn, completions, answers, timeout_s=timeout_s,
                                        kwargs=kwargs if any(kwargs) else None)
            per_name[name] = res.rewards
            total = [t + w * r for t, r in zip(total, res.rewards)]
            failed.errors += res.errors
            failed.timeouts += res.timeouts
            failed.invalid += res.invalid
        failed.rewards = total
        return total, per_name, failed


def _check_calls(calls: list, completions: list[str], answers: list[str], strict: bool) -> None:
    """`_check_call` of every reward of `RewardSet._calls`."""
    for fn, name, rows, kwargs in calls:
        if is_batched(fn):
            _check_call(fn, name, [((), kwargs)], rows, strict, "fn(completions=, answers=, prompts=, **columns)")
        elif isinstance(fn, _VerlCall) and answers:
            _check_call(fn.fn, name, [((), {"solution_str": c, "ground_truth": a, **kw})
                                      for c, a, kw in zip(completions, answers, kwargs)], rows, strict,
                        "fn(solution_str=completion, ground_truth=answer, **columns)")
        elif answers:
            _check_call(fn, name, [((c, a), kw) for c, a, kw in zip(completions, answers, kwargs)], rows, strict,
                        "fn(completion, answer, **columns)")


class _VerlCall:
    """A reward in verl's form called as an item-level one: `fn(solution_str=completion,
    ground_truth=answer, **columns)`. Like verl, it may return a number or a dict holding it under
    "score" (verl's DAPO-style scorers return `{"score": ..., "acc": ...}`)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, completion: str, answer: str, **columns: Any) -> Any:
        value = self.fn(solution_str=completion, ground_truth=answer, **columns)
        return value["score"] if isinstance(value, Mapping) and "score" in value else value


def _check_call(fn: Callable, name: str, calls: list[tuple[tuple, dict]], rows: list[dict], strict: bool,
                form: str) -> None:
    """TypeError now, naming the reward, if `fn` cannot take the arguments of any of its `calls`:
    contained per item, such a reward scored every completion 0 for the whole run. `strict`
    (start-up, on rows of the data): a required parameter no row's column fills counts too;
    otherwise (each scored batch) only what no data could mend, a wrong arity: a batch whose rows
    happen to lack a column stays an item-level fault. The signature bound is the callable's own
    (not that of a function it wraps with functools.wraps)."""
    try:
        sig = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):  # builtins without a signature
        return
    if not calls:
        return
    errors = []
    for args, kwargs in calls:
        if not strict:  # what columns could fill: every required keyword the call lacks
            kwargs = {**{p.name: None for p in sig.parameters.values() if p.default is p.empty
                         and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs}, **kwargs}
            kwargs = {k: v for k, v in kwargs.items() if k not in _positional_names(sig, len(args))}
        try:
            sig.bind(*args, **kwargs)
            return
        except TypeError as err:
            errors.append(err)
    columns = ", ".join(dict.fromkeys(k for row in rows for k in row)) or "none"
    raise TypeError(f"model.reward {name!r} cannot be called as {form} ({errors[0]}); the data's columns: "
                    f"{columns}") from None


def _positional_names(sig: inspect.Signature, n: int) -> set[str]:
    """The names of the parameters that `n` positional arguments fill."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name for p in list(sig.parameters.values())[:n] if p.kind in kinds}


def _item_kwargs(accepts: set[str] | None, skip: set[str], prompt: Any, row: dict) -> dict:
    kw = {k: v for k, v in row.items() if k not in RESERVED and k not in skip}
    if "prompt" not in skip:
        kw["prompt"] = prompt
    return kw if accepts is None else {k: v for k, v in kw.items() if k in accepts}


def _batch_kwargs(accepts: set[str] | None, completions, answers, prompts, columns: list[dict]) -> dict:
    names = dict.fromkeys(k for row in columns for k in row)  # first-seen order
    kw: dict[str, Any] = {k: [row.get(k) for row in columns] for k in names if k not in PASSED}
    kw.update(completions=list(completions), answers=list(answers), prompts=list(prompts))
    return kw if accepts is None else {k: v for k, v in kw.items() if k in accepts}
