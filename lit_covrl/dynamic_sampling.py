"""DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476): keep generating until the batch is
full of informative groups.

A group whose G rewards are all equal has zero advantage under group baselines: it adds nothing
to the policy gradient. With `filter_groups` alone such groups are dropped and the batch shrinks
(late in training, when most prompts are solved, mini-batches can empty). With dynamic sampling
(`max_gen_rounds` > 1) the module samples another batch of prompts and generates again, up to
`max_gen_rounds` rounds in all, then trains on the first B informative groups in generation
order. If the rounds run out first, the batch is completed with uninformative groups of the first
round, which `filter_groups` then drops as before (the run never stalls).

Every rank runs the same number of rounds (the decision is global), since generation is a
collective under FSDP. The extra prompts come from `PromptDataModule.regen_batch`, a pure
function of (seed, step, round, rank, world size), so a resumed run makes the same choices.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import zero_variance_groups
from lit_covrl.types import PromptBatch, Rollout

# Rollout fields laid out as [N, P + T] (left-padded prompt, right-padded response) and [N, T]
_PROMPT_AND_RESPONSE = ("input_ids", "attention_mask")
_RESPONSE = ("response_mask", "logp", "entropy")


@dataclass
class Round:
    """One generation round: its prompts, the sampled rollout (prompt-major, G rows per prompt)
    and the scores of its rows: `rewards`, trained on, and `scores`, the rewards as scored,
    before `overlong: penalize` (what correctness is judged on; null: the same as `rewards`)."""

    batch: PromptBatch
    rollout: Rollout
    rewards: Tensor  # [B_round * G]
    scores: Tensor | None = None  # [B_round * G]

    def __post_init__(self) -> None:
        if self.scores is None:
            self.scores = self.rewards

    def informative(self, group_size: int) -> Tensor:
        """BoolTensor [B_round]: groups whose rewards are not all equal."""
        return ~zero_variance_groups(self.rewards, group_size)[::group_size]


def sample_rounds(
    batch: PromptBatch,
    run_round: Callable[[PromptBatch], tuple[Round, dict[str, float]]],
    fresh_prompts: Callable[[int], PromptBatch],
    *,
    group_size: int,
    max_rounds: int,
    pad_token_id: int,
) -> tuple[Round, dict[str, float]]:
    """Generate for `batch`, then for `fresh_prompts(r)` (r = 1, 2, ...) while fewer than
    len(batch) informative groups are held on some rank and fewer than `max_rounds` rounds ran;
    return the chosen groups and the step's statistics. `run_round` samples and scores one batch
    (returning its Round and its reward statistics: `rollout/reward_errors` counts, which add up,
    and per-reward means, averaged over the equal-sized rounds); `rollout/gen_rounds` counts rounds."""
    rounds: list[Round] = []
    sums: dict[str, float] = {}
    while True:
        rnd, stats = run_round(batch if not rounds else fresh_prompts(len(rounds)))
        rounds.append(rnd)
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in stats.items()}
        if len(rounds) >= max_rounds:
            break
        # decided globally: every rank runs the same number of rounds (generation is a collective)
        if distributed.all_true(sum(int(r.informative(group_size).sum()) for r in rounds) >= len(batch)):
            break
    out = {k: v if k == "rollout/reward_errors" else v / len(rounds) for k, v in sums.items()}
    out["rollout/gen_rounds"] = float(len(rounds))
    if len(rounds) == 1:
        return rounds[0], out
    return assemble(rounds, choose_groups(rounds, len(batch), group_size), group_size, pad_token_id), out


def choose_groups(rounds: list[Round], batch_size: int, group_size: int) -> list[tuple[int, int]]:
    """(round, group) pairs of the batch to train on: the first `batch_size` informative groups in
    generation order, completed with the first round's uninformative groups if there are fewer."""
    informative = [(i, g) for i, r in enumerate(rounds) for g in torch.nonzero(r.informative(group_size)).flatten().tolist()]
    chosen = informative[:batch_size]
    if len(chosen) < batch_size:
        spare = [(0, g) for g in range(len(rounds[0].batch)) if (0, g) not in chosen]
        chosen += spare[: batch_size - len(chosen)]
    return chosen


def assemble(rounds: list[Round], chosen: list[tuple[int, int]], group_size: int, pad_token_id: int) -> Round:
    """One Round made of the chosen groups (rows re-padded to the widest prompt, and to the widest
    response of *all* rounds: rounds decode in lock-step across ranks, so that width is the same on
    every rank even when ranks draw their groups from different rounds, and the cross-rank gathers of
    per-token tensors need equal widths)."""
    rows = [torch.arange(g * group_size, (g + 1) * group_size) for _, g in chosen]
    parts = [(rounds[i].rollout, r) for (i, _), r in zip(chosen, rows)]
    prompts = [rounds[i].batch.prompts[g] for i, g in chosen]
    answers = [rounds[i].batch.answers[g] for i, g in chosen]
    rewards = torch.cat([rounds[i].rewards[r] for (i, _), r in zip(chosen, rows)])
    scores = torch.cat([rounds[i].scores[r] for (i, _), r in zip(chosen, rows)])
    columns = [rounds[i].batch.columns[g] if rounds[i].batch.columns else {} for i, g in chosen]
    columns = columns if any(columns) else []  # PromptBatch: [] when no row has extra columns
    batch = dataclasses.replace(rounds[0].batch, prompts=prompts, answers=answers, columns=columns)
    width = max(r.rollout.response_mask.shape[1] for r in rounds)
    return Round(batch, concat_rollouts(parts, pad_token_id, width), rewards, scores)


def concat_rollouts(parts: list[tuple[Rollout, Tensor]], pad_token_id: int, min_width: int = 0) -> Rollout:
    """Rows `idx` of each rollout, stacked. Prompts stay left-padded and responses right-padded:
    each part is padded to the widest prompt (P) and response (T, at least `min_width`) first."""
    T = max(min_width, *(r.response_mask.shape[1] for r, _ in parts))
    P = max(r.input_ids.shape[1] - r.response_mask.shape[1] for r, _ in parts)
    out: dict[str, object] = {}
    for f in dataclasses.fields(Rollout):
        values = [getattr(r, f.name) for r, _ in parts]
        if f.name in _PROMPT_AND_RESPONSE:
            fill = pad_token_id if f.name == "input_ids" else 0
            out[f.name] = torch.cat([_repad(v[idx], r.response_mask.shape[1], P, T, fill) for (r, idx), v in zip(parts, values)])
        elif f.name in _RESPONSE:
            out[f.name] = torch.cat([torch.nn.functional.pad(v[idx], (0, T - v.shape[1])) for (_, idx), v in zip(parts, values)])
        elif isinstance(values[0], Tensor):  # per-row tensors, e.g. truncated [N]
            out[f.name] = torch.cat([v[idx] for (_, idx), v in zip(parts, values)])
        elif isinstance(values[0], list):  # per-row lists, e.g. completions
            out[f.name] = [v[i] for (_, idx), v in zip(parts, values) if v for i in idx.tolist()]
        else:
            out[f.name] = values[0]
    return Rollout(**out)


def _repad(x: Tensor, t: int, P: int, T: int, fill: int) -> Tensor:
    """[n, p + t] -> [n, P + T]: pad the prompt part on the left, the response part on the right."""
    p = x.shape[1] - t
    prompt = torch.nn.functional.pad(x[:, :p], (P - p, 0), value=fill)
    response = torch.nn.functional.pad(x[:, p:], (0, T - t), value=fill)
    return torch.cat([prompt, response], 1)
