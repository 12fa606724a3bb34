"""RL-ZVP (Le, Jeon, Vu, Lai, Yang 2025, "No Prompt Left Behind: Exploiting Zero-Variance Prompts
in LLM Reinforcement Learning via Entropy-Guided Advantage Shaping", arXiv 2509.21880, eqs. 5-6):
GRPO on the groups whose rewards differ; on a group whose G rewards are all equal (a
zero-variance prompt, advantage 0 under GRPO) each token's advantage becomes

    alpha H_t                   all rewards > 0 (a positive prompt)
    -alpha (max_k H_k - H_t)    all rewards <= 0 (a negative prompt; the max over the response's tokens)

H the current policy's entropy from the training forward, detached (the paper's footnote 3), applied
inside the objective (a `TokenShaping.advantage_shift`, so the clipped surrogate of eq. 6 sees it).
The groups and their sign come from the step's rewards (`observe_rewards`); `filter_groups`, which
drops exactly those groups, is refused at start-up. The math is in `lit_covrl.algorithms.zvp_controls`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl.algorithms import per_token_advantages, zvp_advantages, zvp_group_signs
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, StepSums, check_number
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.types import PolicyBatch, TokenShaping


class RLZVP(Regularizer):
    """Entropy-guided advantage on zero-variance prompts (replaces their advantage 0); `schedule`
    anneals alpha."""

    needs_entropy = True
    shifts_advantage = True
    shapes_equal_groups = True
    default_name = "rl_zvp"
    chart_metrics = {"Entropy": ("coef",), "Control": ("zvp_frac", "adv_positive_mean", "adv_negative_mean")}

    def __init__(self, alpha: float = 0.1, schedule: Schedule | None = None, name: str | None = None) -> None:
        """
        Args:
            alpha: scale of the entropy advantage (paper: 0.1; its Table 3 also tries 0.05, 0.2, 0.3).
            schedule: annealing of `alpha` over RL steps (the paper keeps it fixed).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(schedule, name)
        self.alpha = check_number("RLZVP.alpha", alpha)
        self._alpha_now = self.alpha
        self._signs: Tensor | None = None  # [B] this rank's groups of the step: +1, -1, 0 (`zvp_group_signs`)
        self._rows: Tensor | None = None  # [n] the prepared mini-batch's rows' signs
        self._sums = StepSums("rows", "pos_rows", "neg_rows", "pos_adv", "pos_tokens", "neg_adv", "neg_tokens")

    def check_loss(self, loss, rollout) -> None:
        """`model.rollout.filter_groups` drops every group RL-ZVP acts on (and dynamic sampling refills
        the batch with unequal ones): refused, naming the field."""
        if rollout.filter_groups:
            raise ValueError(f"model.rollout.filter_groups=True is invalid with {type(self).__name__} ({self.name!r}): "
                             "it drops the groups whose rewards are all equal, the only ones RL-ZVP acts on; set "
                             "model.rollout.filter_groups: false")

    def observe_rewards(self, rewards: Tensor, group_size: int) -> None:
        self._signs = zvp_group_signs(rewards, group_size)

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert self._signs is not None and ctx.groups is not None, "observe_rewards runs before the step's updates"
        self._alpha_now = self.scheduled(self.alpha, ctx.step)
        self._rows = self._signs.to(ctx.mask.device)[ctx.groups.long()]
        self.record("coef", self._alpha_now)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert batch.entropy is not None, "the module must compute entropy when needs_entropy is set"
        signs = self._rows[batch.rows]
        target = zvp_advantages(batch.entropy, batch.mask, signs, alpha=self._alpha_now)
        on = (signs != 0).view(-1, 1) & batch.mask.bool()  # the estimator's advantage (0) replaced there
        shift = torch.where(on, target - per_token_advantages(batch.advantages, target), torch.zeros_like(target))
        m = batch.mask.to(target.dtype)
        pos, neg = (signs > 0).to(m.dtype), (signs < 0).to(m.dtype)
        self._sums.add(rows=torch.tensor(float(len(signs)), device=m.device), pos_rows=pos.sum(), neg_rows=neg.sum(),
                       pos_adv=(target * pos.view(-1, 1)).sum(), pos_tokens=(m * pos.view(-1, 1)).sum(),
                       neg_adv=(target * neg.view(-1, 1)).sum(), neg_tokens=(m * neg.view(-1, 1)).sum())
        return TokenShaping(advantage_shift=shift)

    def pop_metrics(self) -> dict[str, float]:
        """reg/<name>/zvp_frac (share of the trained responses in all-equal groups), positive_frac (in
        all-correct ones), adv_positive_mean and adv_negative_mean (token means of the RL-ZVP
        advantage over those responses), over every update of the step and every rank (a collective:
        called on every rank)."""
        total = self._sums.pop()
        if total["rows"] > 0:
            self.record("zvp_frac", (total["pos_rows"] + total["neg_rows"]) / total["rows"])
            self.record("positive_frac", total["pos_rows"] / total["rows"])
        if total["pos_tokens"] > 0:
            self.record("adv_positive_mean", total["pos_adv"] / total["pos_tokens"])
        if total["neg_tokens"] > 0:
            self.record("adv_negative_mean", total["neg_adv"] / total["neg_tokens"])
        return super().pop_metrics()
