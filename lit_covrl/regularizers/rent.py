"""RENT, reinforcement learning via entropy minimization (Prabhudesai, Chen, Ippoliti, Fragkiadaki,
Liu, Pathak 2025, "Maximizing Confidence Alone Improves Reasoning", arXiv 2505.22660), as its
authors' code (satrams/rent-rl, `trainer.minimize_entropy`) computes it: each response's reward is
its negative mean token entropy under the rollout policy, r_i = -H_i, in place of the task reward;
the group baseline (GRPO's) then turns these rewards into advantages, so that the more confident
responses of a group are reinforced and the entropy falls.

The entropy is the rollout's (`Rollout.entropy`: the sampler's, or the training forward's with
`recompute_logprobs`, whose recomputation runs first), a per-response mean over the response's own
valid tokens, computed on the rank that sampled it: no statistic spans responses, ranks or
micro-batches. Controls that read the task reward as correctness are refused beside it
(`check_reward_shapers`), as are the settings that need 0/1 rewards and `filter_groups`.
The math is in `lit_covrl.algorithms.rent_controls`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl.algorithms import rent_rewards, response_entropy_means
from lit_covrl.regularizers.base import Regularizer, StepSums, check_number
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.types import PolicyBatch, TokenShaping


class RENT(Regularizer):
    """Negative mean response entropy as the reward (`step_rewards`); `schedule` anneals `coef`."""

    shapes_rewards = True
    default_name = "rent"
    chart_metrics = {"Entropy": ("coef", "response_entropy"), "Control": ("reward_mean",)}

    def __init__(self, coef: float = 1.0, reward_weight: float = 0.0, schedule: Schedule | None = None,
                 name: str | None = None) -> None:
        """
        Args:
            coef: weight of the entropy reward -H_i (paper and code: 1, the reward is -H_i).
            reward_weight: weight of the task reward kept beside it (paper: 0, RENT uses no task
                reward; > 0 is our extension).
            schedule: annealing of `coef` over RL steps (the paper keeps it fixed).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(schedule, name)
        self.coef = check_number("RENT.coef", coef, low_open=True)
        self.reward_weight = check_number("RENT.reward_weight", reward_weight)
        self._sums = StepSums("responses", "entropy", "reward")

    def check_loss(self, loss, rollout) -> None:
        """Settings that need 0/1 rewards (Pass@k's advantage, the unlikeliness reward) and
        `model.rollout.filter_groups` (drops groups by their task rewards, whatever their entropy
        rewards) are refused, naming the field."""
        binary = loss.binary_rewards_for
        if binary is not None:
            raise ValueError(f"{binary} is invalid with {type(self).__name__} ({self.name!r}): it needs every reward in "
                             "{0, 1}, and RENT's rewards are negative mean entropies; unset it")
        if rollout.filter_groups:
            raise ValueError(f"model.rollout.filter_groups=True is invalid with {type(self).__name__} ({self.name!r}): "
                             "it drops the groups whose task rewards are all equal, whose entropy rewards differ "
                             "and train; set model.rollout.filter_groups: false")

    def step_rewards(self, step: int, rewards: Tensor, rollout) -> Tensor:
        coef = self.scheduled(self.coef, step)
        shaped = rent_rewards(rewards, rollout.entropy, rollout.response_mask, coef=coef,
                              reward_weight=self.reward_weight)
        h = response_entropy_means(rollout.entropy, rollout.response_mask)
        self._sums.add(responses=torch.tensor(float(len(h)), dtype=torch.float64, device=h.device),
                       entropy=h.sum(), reward=shaped.double().sum())
        self.record("coef", coef)
        return shaped

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        return TokenShaping()  # acts on the step's rewards (`step_rewards`)

    def pop_metrics(self) -> dict[str, float]:
        """reg/<name>/response_entropy (the mean over the step's responses on every rank of their
        mean token entropy, H_i) and reward_mean (of the rewards the estimator got), a collective:
        called on every rank."""
        total = self._sums.pop()
        if total["responses"] > 0:
            self.record("response_entropy", total["entropy"] / total["responses"])
            self.record("reward_mean", total["reward"] / total["responses"])
        return super().pop_metrics()
