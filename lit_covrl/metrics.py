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


def rollout_metrics(
    rollout, rewards: Tensor, advantages: Tensor, zero_var: Tensor, *, group_size: int, seconds: float,
    correct_threshold: float,
) -> dict[str, Tensor]:
    """The rollout/, policy/entropy and cov/ metrics of one RL step.

    policy/entropy is the exact token-mean entropy (temperature 1) of the sampled responses under
    the rollout policy, over all ranks; policy/entropy_seq_mean is the paper's mean of per-sequence
    means. cov/ are the Table-1 statistics of Cui et al. on this rank's tokens.
    """
    from lit_covrl import distributed
    from lit_covrl.algorithms import covariance_group_means, token_covariance

    m = rollout.response_mask
    lengths = m.sum(1)
    tot = distributed.all_sum(torch.stack([(rollout.entropy * m).sum(), m.sum()]))
    per_seq = (rollout.entropy * m).sum(1) / lengths.clamp(min=1)
    metrics = {
        "rollout/reward_mean": rewards.mean(),
        "rollout/reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
        "rollout/accuracy": (rewards >= correct_threshold).float().mean(),
        "rollout/response_length": lengths.mean(),
        "rollout/response_length_max": lengths.max(),
        "rollout/truncated_frac": rollout.truncated.float().mean(),
        "rollout/zero_var_group_frac": zero_var.float().view(-1, group_size)[:, 0].mean(),
        "rollout/tokens_per_s": lengths.sum() / max(seconds, 1e-9),
        "policy/entropy": tot[0] / tot[1].clamp(min=1),
        "policy/entropy_seq_mean": per_seq.mean(),
    }
    cov = token_covariance(rollout.logp, advantages[:, None].expand_as(m), m)
    for frac, value in covariance_group_means(cov, m).items():
        metrics[f"cov/top{frac * 100:g}pct"] = value
    metrics["cov/mean"] = (cov * m).sum() / m.sum().clamp(min=1)
    return metrics
