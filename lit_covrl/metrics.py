"""Metric helpers: a per-step running-mean accumulator and the pass@k torchmetrics Metric."""
from __future__ import annotations

from collections import defaultdict
from math import comb

import torch
from torch import Tensor
from torchmetrics import Metric


class StepMetrics:
    """Collects scalars over the mini-batch updates of one RL step; `means()` averages them."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: float | Tensor) -> None:
        self._sums[name] += float(value)
        self._counts[name] += 1

    def update(self, values: dict[str, float | Tensor]) -> None:
        for k, v in values.items():
            self.add(k, v)

    def pop(self) -> dict[str, float]:
        out = {k: self._sums[k] / self._counts[k] for k in self._sums}
        self._sums.clear()
        self._counts.clear()
        return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n < k:
        raise ValueError(f"pass@k needs n >= k samples, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


class PassAtK(Metric):
    """Mean pass@1 and unbiased pass@k over prompts; `update(correct[B, n])`, n samples per prompt."""

    full_state_update = False

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.add_state("pass1_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("passk_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        n = correct.shape[1]
        c = correct.long().sum(1).tolist()
        self.pass1_sum += sum(ci / n for ci in c)
        self.passk_sum += sum(pass_at_k(n, ci, self.k) for ci in c)
        self.prompts += len(c)

    def compute(self) -> dict[str, Tensor]:
        denom = self.prompts.clamp(min=1).double()
        return {"pass@1": (self.pass1_sum / denom).float(), f"pass@{self.k}": (self.passk_sum / denom).float()}
