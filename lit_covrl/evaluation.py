"""Validation and test of GRPOModule: `val_samples` answers per held-out prompt at
`val_temperature`, from a sampler reseeded identically at every evaluation (successive
evaluations differ only by the policy), giving `<prefix>/pass@1`, `<prefix>/pass@k` (unbiased
estimator, summed over ranks by torchmetrics) and `<prefix>/entropy` (token mean over all ranks).

`EvaluationMixin` is mixed into GRPOModule; it uses its `generate`, `score`, `val_pass`,
`hparams` and `log`.
"""
from __future__ import annotations

import torch

from lit_covrl import distributed
from lit_covrl.types import PromptBatch


class EvaluationMixin:
    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def _eval_start(self) -> None:
        self.val_pass.reset()
        self._val_entropy = [0.0, 0.0]
        # the same seed at every evaluation: successive evaluations differ only by the policy
        self._val_generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 12345 + self.global_rank)

    def _eval_step(self, batch: PromptBatch) -> None:
        """val_samples answers per held-out prompt: pass@1, pass@k and the sampled entropy."""
        n = self.hparams.val_samples
        rollout = self.generate(batch.prompts, n, temperature=self.hparams.val_temperature, generator=self._val_generator)
        answers = [a for a in batch.answers for _ in range(n)]
        rewards, _ = self.score(rollout.completions, answers, [p for p in batch.prompts for _ in range(n)],
                                [c for c in batch.columns for _ in range(n)])
        self.val_pass.update((rewards >= self.hparams.correct_threshold).view(-1, n))
        self._val_entropy[0] += float((rollout.entropy * rollout.response_mask).sum())
        self._val_entropy[1] += float(rollout.response_mask.sum())

    def _eval_end(self, prefix: str) -> None:
        res = self.val_pass.compute()  # torchmetrics: summed over ranks
        ent = distributed.all_sum(torch.tensor(self._val_entropy, dtype=torch.float64))
        self.log(f"{prefix}/pass@1", res["pass@1"], prog_bar=prefix == "val", sync_dist=False)
        self.log(f"{prefix}/pass@k", res[f"pass@{self.hparams.val_k}"], sync_dist=False)
        self.log(f"{prefix}/entropy", float(ent[0] / max(float(ent[1]), 1.0)), sync_dist=False)

