"""Outcome-based exploration (Song, Kempe, Munos 2025, "Outcome-based Exploration for LLM
Reasoning", arXiv 2509.06941): exploration terms that depend only on each response's final answer.

- historical exploration: + historical / sqrt(N(x, a)), a UCB-style bonus for answers rarely seen
  for their prompt x over training; N(x, a) counts the responses to x with final answer a over
  every RL step so far, this one included (so the first sighting gets the whole coefficient);
- batch exploration: - batch * (share of the group's other G - 1 responses with the same answer),
  a penalty for answers repeated within the group.

The final answer is the run's reward function's `final_answer(completion)` (built in:
ExactMatchReward, MathVerifyReward, ReasoningReward; refused at start-up when no reward has one);
a response without one gets neither term and is not counted, nor does one whose `final_answer`
raised (warned once, counted in reg/<name>/answer_errors); a `final_answer` that returns neither a
str nor None is refused (the counts are checkpointed as text), at start-up where the data's sample
answers show it (`check_final_answers`). `apply` says where the terms enter:
`reward` adds them to each response's reward before the run's advantage estimator (the bonus in its
RL sense), `advantage` adds them, minus their group mean, to the estimator's advantages.
`responses` restricts them to the correct (or incorrect) responses. Only the abstract and summaries
of the paper could be read here: the form of the bonus (1/sqrt N, no log t term), where it enters,
which responses get it and the baseline are this module's choices, and the coefficients have no
paper default (they are required).

N(x, a) counts every answered response the step generated: under dynamic sampling
(`filter_groups` with `max_gen_rounds` > 1) every round's, the groups left out of the batch
included (`count_outcomes`, once per round); the terms are computed for the batch trained on
(`outcome_shift`, once per step). The counts are over all ranks (each round's (prompt, answer)
pairs gathered in rank order, so every rank holds the same counts) and are computed before the
update, so the terms do not depend on the micro-batch size or the device count. They are checkpointed (`state_dict`) and
resume exactly; a state saved mid-step (nonfinite-stop.ckpt) drops that step's answers when the
resumed run redoes it. The terms act before the update: reg/<name>/loss stays 0.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import distinct_answers, outcome_shaping
from lit_covrl.regularizers.base import Regularizer, check_number
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.types import PolicyBatch, TokenShaping

log = logging.getLogger("lit_covrl")

APPLY = ("reward", "advantage")
RESPONSES = ("all", "correct", "incorrect")


def prompt_key(prompt: Any) -> str:
    """A prompt as a dict key: its text, or a chat prompt's messages as sorted JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


def group_answer_ids(answers: list[str | None], group_size: int) -> Tensor:
    """[N] long: each answer's index among its group's distinct answers (first seen first); -1 for None."""
    ids = []
    for start in range(0, len(answers), group_size):
        seen: dict[str, int] = {}
        ids += [-1 if a is None else seen.setdefault(a, len(seen)) for a in answers[start:start + group_size]]
    return torch.tensor(ids, dtype=torch.long)


class OutcomeExploration(Regularizer):
    """Historical (UCB count bonus) and batch (repetition penalty) outcome-based exploration (see
    the module docstring)."""

    default_name = "outcome"
    shapes_outcome = True
    chart_metrics = {"Entropy": ("bonus_mean", "distinct_answers", "novel_frac")}

    def __init__(self, historical: float, batch: float, apply: str = "reward", responses: str = "all",
                 schedule: Schedule | None = None, name: str | None = None) -> None:
        """
        Args:
            historical: coefficient of the historical bonus 1/sqrt(N(x, a)) (>= 0; no paper value read).
            batch: coefficient of the batch penalty, the share of the group's other responses with
                the same answer (>= 0; no paper value read). One of the two must be > 0.
            apply: `reward` (added to the rewards before the advantage estimator) or `advantage`
                (added, minus the group mean, to the advantages).
            responses: `all`, `correct` or `incorrect`: the responses that get the terms (correct:
                score >= model.correct_threshold). Every answered response is counted.
            schedule: a schedule of both coefficients over RL steps (default constant).
        """
        super().__init__(schedule, name)
        self.historical = check_number(f"{type(self).__name__}.historical", historical)
        self.batch = check_number(f"{type(self).__name__}.batch", batch)
        if self.historical == 0 and self.batch == 0:
            raise ValueError(f"{type(self).__name__}.historical and .batch are both 0: the control does nothing; "
                             "set one > 0")
        for field, value, valid in (("apply", apply, APPLY), ("responses", responses, RESPONSES)):
            if value not in valid:
                raise ValueError(f"{type(self).__name__}.{field}={value!r} is invalid: must be one of {valid}")
        self.apply, self.responses = apply, responses
        self.counts: dict[str, dict[str, int]] = {}  # prompt key -> final answer -> responses so far
        self._namer: Callable[[str], str | None] | None = None
        self._namer_name = "model.reward's final_answer"  # for messages (check_rewards names the reward's)
        self._step: int | None = None  # the RL step counted last
        self._added: dict[str, dict[str, int]] = {}  # that step's part of `counts`, all its rounds
        # that step's completions (this rank's) -> (final answer, whether final_answer raised)
        self._answers: dict[str, tuple[str | None, bool]] = {}
        self._errors = 0  # that step's responses (all rounds, all ranks) whose final_answer raised
        self._warned = False  # a final_answer that raised was warned about
        self._restarting = False  # loaded from a checkpoint, no step counted since

    def check_rewards(self, rewards, binary_for: str | None) -> None:
        self._namer = rewards.answer_namer()
        self._namer_name = f"model.reward's {getattr(self._namer, '__qualname__', repr(self._namer))}"
        if self._namer is None:
            names = ", ".join(rewards.names)
            raise ValueError(
                f"{type(self).__name__} ({self.name!r}) needs each response's final answer, but no reward of "
                f"model.reward ({names}) of nonzero weight names one: give a reward a "
                "`final_answer(completion) -> str | None` "
                "method (built in: ExactMatchReward, MathVerifyReward, ReasoningReward)")
        if self.apply == "reward" and binary_for:
            raise ValueError(f"{type(self).__name__}.apply='reward' adds non-binary terms to the rewards, which "
                             f"{binary_for} needs in {{0, 1}}: set apply: advantage")

    def count_outcomes(self, step: int, prompts: list, completions: list[str], group_size: int) -> None:
        """Add one generation round's answered responses, this rank's n = len(prompts) * group_size
        (prompt-major), over all ranks, to N(x, a): every round of step `step`, chosen for the
        batch or not (a collective: every rank runs the same rounds)."""
        self._begin(step)
        keys = [prompt_key(p) for p in prompts for _ in range(group_size)]
        for c in completions:
            if c not in self._answers:
                self._answers[c] = self._final_answer(c)
        rows, _ = distributed.gather_objects([(k, *self._answers[c]) for k, c in zip(keys, completions)])
        refused = next((a for _, a, _ in rows if isinstance(a, tuple)), None)
        if refused is not None:  # on every rank: the rows are gathered
            raise ValueError(refused[0])
        self._errors += sum(err for _, _, err in rows)
        for k, a, _ in rows:
            if a is not None:
                for counts in (self.counts, self._added):
                    per_prompt = counts.setdefault(k, {})
                    per_prompt[a] = per_prompt.get(a, 0) + 1

    def outcome_shift(self, step: int, prompts: list, completions: list[str], correct: Tensor,
                      group_size: int) -> Tensor:
        """[n] float64 terms of this rank's n = len(prompts) * group_size responses of the batch
        trained on (prompt-major), from the counts after step `step`'s rounds (`count_outcomes`)."""
        if step != self._step or any(c not in self._answers for c in completions):
            raise RuntimeError(f"{type(self).__name__}: count_outcomes() must count step {step}'s responses first")
        keys = [prompt_key(p) for p in prompts for _ in range(group_size)]
        local = list(zip(keys, [self._answers[c][0] for c in completions], correct.tolist()))
        rows, offset = distributed.gather_objects(local)
        counts = torch.tensor([self._count(self.counts, k, a) for k, a, _ in rows], dtype=torch.float64)
        before = counts - torch.tensor([self._count(self._added, k, a) for k, a, _ in rows], dtype=torch.float64)
        ids = group_answer_ids([a for _, a, _ in rows], group_size)
        eligible = (ids >= 0) & self._chosen(torch.tensor([c for _, _, c in rows], dtype=torch.bool))
        hist, pen = outcome_shaping(counts, ids, eligible, group_size, historical=self.scheduled(self.historical, step),
                                    batch=self.scheduled(self.batch, step))
        self._record(hist, pen, ids, before, group_size)
        return (hist + pen)[offset:offset + len(local)]

    def _begin(self, step: int) -> None:
        """Start counting step `step` (its rounds' answers so far, `_added`; its completions' answers).
        The first call after `load_state_dict` for the step the state was saved in drops that step's
        answers: a state saved mid-step (nonfinite-stop.ckpt) holds the aborted attempt's, and the
        resumed run redoes the step with a new rollout."""
        if self._namer is None:
            raise RuntimeError(f"{type(self).__name__}: check_rewards() must run before the first step")
        if self._restarting and step == self._step:
            for key, answers in self._added.items():
                per_prompt = self.counts[key]
                for a, n in answers.items():
                    per_prompt[a] -= n
                    if not per_prompt[a]:
                        del per_prompt[a]
                if not per_prompt:
                    del self.counts[key]
            self._step = None
        self._restarting = False
        if step != self._step:
            self._step, self._added, self._answers, self._errors = step, {}, {}, 0

    def _final_answer(self, completion: str) -> tuple[str | None | tuple[str], bool]:
        """(the reward's final answer, whether it raised): an exception is no answer (warned once,
        counted in answer_errors); a result neither a str nor None comes back as a 1-tuple holding
        the error message (raised once the round's rows are gathered, on every rank)."""
        try:
            answer = self._namer(completion)
        except Exception as e:  # noqa: BLE001 - a reward's parse error: no answer, as a reward's is score 0
            if not self._warned:
                self._warned = True
                log.warning("%s raised %s: %s (completion %r): such a response counts as having no final answer "
                            "(reg/%s/answer_errors counts them)", self._namer_name, type(e).__name__, e,
                            completion[:80], self.name)
            return None, True
        if answer is None or isinstance(answer, str):
            return answer, False
        return (f"{type(self).__name__}: {self._namer_name} returned {type(answer).__name__} {answer!r} for the "
                f"completion {completion[:80]!r}: it must return a str or None (the answers are checkpointed as "
                "text, and a checkpoint must load with weights_only): return str() of it",), False

    def check_final_answers(self, completions: list[str]) -> None:
        """Start-up check of the reward's final_answer on sample texts (the data's reference answers
        and ""): a result neither a str nor None is refused (ValueError); one that raises is warned."""
        for c in [*completions, ""]:
            answer, _ = self._final_answer(c)
            if isinstance(answer, tuple):
                raise ValueError(answer[0])

    @staticmethod
    def _count(counts: dict[str, dict[str, int]], key: str, answer: str | None) -> int:
        return 0 if answer is None else counts.get(key, {}).get(answer, 0)

    def _chosen(self, correct: Tensor) -> Tensor:
        return {"all": torch.ones_like(correct), "correct": correct, "incorrect": ~correct}[self.responses]

    def _record(self, hist: Tensor, pen: Tensor, ids: Tensor, before: Tensor, group_size: int) -> None:
        answered = ids >= 0
        self.record("bonus_mean", float((hist + pen).mean()))
        self.record("historical_mean", float(hist.mean()))
        self.record("batch_penalty_mean", float(-pen.mean()))
        self.record("distinct_answers", float(distinct_answers(ids, group_size).mean()))
        self.record("answered_frac", float(answered.double().mean()))
        self.record("answer_errors", float(self._errors))
        if answered.any():
            self.record("novel_frac", float((before[answered] == 0).double().mean()))
        self.record("tracked_answers", float(sum(len(v) for v in self.counts.values())))

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        return TokenShaping()  # the terms act on the step's rewards or advantages (`outcome_shift`)

    def state_dict(self) -> dict:
        """The counts, and the step counted last with its part of them (`_begin` drops it when a
        resumed run redoes that step)."""
        return {"counts": _copy(self.counts), "step": self._step, "added": _copy(self._added)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.counts = _copy(state_dict["counts"])
        self._step, self._added = state_dict.get("step"), _copy(state_dict.get("added", {}))
        self._answers, self._restarting = {}, True


def _copy(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {k: dict(v) for k, v in counts.items()}
