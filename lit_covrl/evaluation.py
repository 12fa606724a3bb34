"""Held-out evaluation: `samples` answers per held-out prompt at the evaluation temperature, from a
sampler reseeded identically at every evaluation (successive evaluations differ only by the
policy), giving pass@1, pass@k (unbiased estimator, summed over ranks by torchmetrics), the
token-mean entropy of the sampled distribution over all ranks and the count of reward errors
(items scored 0 for a reward that raised, timed out or returned a non-number) over all ranks, and
of responses sampled from non-finite logits (scored as failures, their entropy left out).

Every rank sees the same held-out batches and evaluates its own share of each (rows rank,
rank + W, ...), so each prompt is evaluated once, not W times. The ranks stay in lock-step (an
FSDP forward and the reward sums are collectives): a rank whose share of a batch is empty
samples and scores the batch's first prompt and does not count it.

`Evaluator` has explicit inputs: how to sample and how to score (GRPOModule's `generate` and
`score`, whose statistics are over all ranks and leave out a rank's items scored with
`counted=False`), the pass@k metric (a torchmetrics child of the module, so Lightning places and
syncs it), the evaluation settings (`model.eval`, `lit_covrl.settings.EvalSettings`), the correctness
threshold and the seed. GRPOModule's validation and test hooks (`EvaluationHooks`, a mixin of
the module) call `start`, `step` and `compute` and log the result under `val/` or `test/`.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from lit_covrl import distributed, resume_check
from lit_covrl.metrics import PassAtK
from lit_covrl.settings import EvalSettings
from lit_covrl.types import PromptBatch, Rollout

log = logging.getLogger("lit_covrl")


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
        self._nonfinite = 0.0  # this rank's counted responses sampled from non-finite logits
        self._generator: torch.Generator | None = None
        self._rank, self._world = 0, 1

    def start(self, device: torch.device, rank: int, world: int = 1) -> None:
        """Reset the metrics; the same sampler seed at every evaluation."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.pass_at_k.reset()
        self._entropy = [0.0, 0.0]
        self._reward_errors = 0.0
        self._nonfinite = 0.0
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
        # a response sampled from NaN / inf logits is a failure whatever its text scored, and its
        # entropy is left out (training stops on them: `guards.stop_on_nonfinite_logits`)
        bad = rollout.nonfinite.to(rewards.device)
        self.pass_at_k.update(((rewards >= self.correct_threshold) & ~bad).view(-1, n))
        kept = rollout.response_mask * ~rollout.nonfinite.view(-1, 1)
        self._entropy[0] += float(torch.where(kept.bool(), rollout.entropy, 0.0).sum())
        self._entropy[1] += float(kept.sum())
        self._nonfinite += float(rollout.nonfinite.sum())

    def compute(self) -> dict[str, float]:
        """{"pass@1", "pass@k", "entropy", "reward_errors"} over all ranks (a collective: call on
        every rank)."""
        res = self.pass_at_k.compute()  # torchmetrics: summed over ranks
        ent = distributed.all_sum(torch.tensor([*self._entropy, self._nonfinite], dtype=torch.float64))
        return {
            "pass@1": float(res["pass@1"]),
            "pass@k": float(res[f"pass@{self.settings.k}"]),
            "entropy": float(ent[0] / max(float(ent[1]), 1.0)),
            "reward_errors": self._reward_errors,
            "nonfinite": float(ent[2]),
        }


def _rows(batch: PromptBatch, rows: list[int]) -> PromptBatch:
    """The batch restricted to `rows` (all of it when that is every row)."""
    if len(rows) == len(batch):
        return batch
    columns = [batch.columns[i] for i in rows] if batch.columns else []
    return PromptBatch([batch.prompts[i] for i in rows], [batch.answers[i] for i in rows], batch.index, columns)


class EvaluationHooks:
    """GRPOModule's validation and test hooks (a mixin of `lit_covrl.module.GRPOModule`, which sets
    `evaluator`): each evaluation starts, steps and computes its `Evaluator`, and logs the result
    under `val/` or `test/`; evaluating a checkpoint warns when the data or reward settings differ
    from the checkpoint's run (`resume_check.warn_on_evaluation_changes`)."""

    def on_validation_start(self) -> None:
        self._warn_if_evaluating_other_data()

    def on_validation_epoch_start(self) -> None:
        self.evaluator.start(self.device, self.global_rank, self.trainer.world_size)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.evaluator.step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_start(self) -> None:
        self._warn_if_evaluating_other_data()

    def on_test_epoch_start(self) -> None:
        self.evaluator.start(self.device, self.global_rank, self.trainer.world_size)

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.evaluator.step(batch)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, prefix: str) -> None:
        res = self.evaluator.compute()  # already global: no sync_dist
        values = {f"{prefix}/{k}": res[k] for k in ("pass@1", "pass@k", "entropy", "reward_errors", "nonfinite")}
        if res["nonfinite"] and self.trainer.is_global_zero:
            log.warning("%s: %d held-out response(s) were sampled from non-finite (NaN / inf) logits: scored as "
                        "failures, their entropy left out (%s/nonfinite)", prefix, int(res["nonfinite"]), prefix)
        in_fit = self.trainer.state.fn == "fit"
        for name, v in values.items():  # callbacks and the progress bar; the loggers below in a fit
            self.log(name, v, prog_bar=name == "val/pass@1", sync_dist=False, logger=not in_fit)
        if in_fit and not self.trainer.sanity_checking:
            # at the RL step just taken, as the training metrics (`log_step`): Lightning's own step
            # counter is one ahead in a run extended from an end-of-fit checkpoint. `epoch` as
            # Lightning adds it to what it logs at its own step
            for logger in self.trainer.loggers:
                logger.log_metrics({**values, "epoch": float(self.current_epoch)}, step=self.global_step - 1)
        # outside a fit (`validate` / `test` of a checkpoint) Lightning's step counter is 0: the
        # figures go to the loggers at the checkpoint's last RL step, where its fit logged them
        if not in_fit and self._checkpoint_step:
            # a logged "step" is the x-axis of the others (Lightning pops it from the metrics)
            self.log("step", float(self._checkpoint_step - 1), sync_dist=False)


    def _warn_if_evaluating_other_data(self) -> None:
        if self._resumed_from is not None and self.trainer.state.fn != "fit":  # a fit compares in on_train_start
            resume_check.warn_on_evaluation_changes(self._resumed_from, self, self.trainer, self.trainer.ckpt_path)
            self._resumed_from = None
