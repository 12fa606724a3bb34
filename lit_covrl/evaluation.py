"""Held-out evaluation: `samples` answers per held-out prompt at the evaluation temperature, from a
sampler reseeded identically at every evaluation (successive evaluations differ only by the
policy), giving pass@1, pass@k (unbiased estimator, summed over ranks by torchmetrics), the
token-mean entropy of the sampled distribution over all ranks and the count of reward errors
(items scored 0 for a reward that raised, timed out or returned a non-number) over all ranks.

Every rank sees the same held-out batches and evaluates its own share of each (rows rank,
rank + W, ...), so each prompt is evaluated once, not W times. The ranks stay in lock-step (an
FSDP forward and the reward sums are collectives): a rank whose share of a batch is empty
samples and scores the batch's first prompt and does not count it.

`Evaluator` has explicit inputs: how to sample and how to score (GRPOModule's `generate` and
`score`, whose statistics are over all ranks and leave out a rank's items scored with
`counted=False`), the pass@k metric (a torchmetrics child of the module, so Lightning places and
syncs it), the evaluation settings (`model.eval`, `lit_covrl.settings.EvalSettings`), the correctness
threshold and the seed. GRPOModule's validation and test hooks call `start`, `step` and
`compute` and log the result under `val/` or `test/`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.metrics import PassAtK
from lit_covrl.settings import EvalSettings
from lit_covrl.types import PromptBatch, Rollout


class Evaluator:
    def __init__(
        self,
        generate: Callable[..., Rollout],
        score: Callable[..., tuple[Tensor, dict]],
        pass_at_k: PassAtK,
        settings: EvalSettings,
        *,
        correct_threshold: float,
        seed: int,
    ) -> None:
        self.generate, self.score, self.pass_at_k, self.settings = generate, score, pass_at_k, settings
        self.correct_threshold = correct_threshold  # a reward >= this counts as correct
        self.seed = seed  # evaluation sampler seed = seed + 12345 + rank
        self._entropy = [0.0, 0.0]
        self._reward_errors = 0.0  # already summed over ranks by `score`
        self._generator: torch.Generator | None = None
        self._rank, self._world = 0, 1

    def start(self, device: torch.device, rank: int, world: int = 1) -> None:
        """Reset the metrics; the same sampler seed at every evaluation."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.pass_at_k.reset()
        self._entropy = [0.0, 0.0]
        self._reward_errors = 0.0
        self._rank, self._world = rank, world
        self._generator = torch.Generator(device=device).manual_seed(self.seed + 12345 + rank)

    def step(self, batch: PromptBatch) -> None:
        """`samples` answers per prompt of this rank's share of `batch`: pass@1, pass@k, entropy."""
        rows = list(range(self._rank, len(batch), self._world))
        # a rank with no rows still samples and scores (both are collectives) one prompt, uncounted
        self._evaluate(_rows(batch, rows or [0]), counted=bool(rows))

    def _evaluate(self, batch: PromptBatch, counted: bool) -> None:
        n = self.settings.samples
        rollout = self.generate(batch.prompts, n, temperature=self.settings.temperature, generator=self._generator)
        answers = [a for a in batch.answers for _ in range(n)]
        rewards, stats = self.score(rollout.completions, answers, [p for p in batch.prompts for _ in range(n)],
                                    [c for c in batch.columns for _ in range(n)], counted=counted)
        self._reward_errors += stats["rollout/reward_errors"]  # every rank's counted items
        if not counted:
            return
        self.pass_at_k.update((rewards >= self.correct_threshold).view(-1, n))
        self._entropy[0] += float((rollout.entropy * rollout.response_mask).sum())
        self._entropy[1] += float(rollout.response_mask.sum())

    def compute(self) -> dict[str, float]:
        """{"pass@1", "pass@k", "entropy", "reward_errors"} over all ranks (a collective: call on
        every rank)."""
        res = self.pass_at_k.compute()  # torchmetrics: summed over ranks
        ent = distributed.all_sum(torch.tensor(self._entropy, dtype=torch.float64))
        return {
            "pass@1": float(res["pass@1"]),
            "pass@k": float(res[f"pass@{self.settings.k}"]),
            "entropy": float(ent[0] / max(float(ent[1]), 1.0)),
            "reward_errors": self._reward_errors,
        }


def _rows(batch: PromptBatch, rows: list[int]) -> PromptBatch:
    """The batch restricted to `rows` (all of it when that is every row)."""
    if len(rows) == len(batch):
        return batch
    columns = [batch.columns[i] for i in rows] if batch.columns else []
    return PromptBatch([batch.prompts[i] for i in rows], [batch.answers[i] for i in rows], batch.index, columns)
