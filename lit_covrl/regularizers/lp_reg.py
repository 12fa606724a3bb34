"""Lp-Reg, Low-probability Regularization (Huang et al. 2025, "Low-probability Tokens Sustain
Exploration in Reinforcement Learning with Verifiable Reward", arXiv 2510.03222; the authors'
code CarlanLark/Lp-Reg-dev: `compute_policy_loss_lp_reg` in verl/trainer/ppo/core_algos.py,
`apply_min_p` and the `lp_reg` branch of `update_policy` in verl/workers/actor/dp_actor.py).

RLVR extinguishes the low-probability tokens that start new lines of reasoning ("reasoning
sparks"): negative advantages keep pushing them down. Lp-Reg pulls them toward a proxy of the
policy that has the noise filtered out: at each position the proxy keeps the tokens whose
probability is at least `min_p` times the most probable one's and renormalises over them, so a
kept low-probability token has a larger probability under the proxy than under the policy, and a
filtered one none (it is left alone). Per optimizer mini-batch:

1. selection: among the valid tokens with A < 0, the k = max(1, int(n * neg_ratio)) with the
   lowest current log-prob (none when k = 1, as the reference); likewise `pos_ratio` among A > 0
   (recipe 0: none);
2. on each selected token whose proxy log-prob q exceeds its current log-prob l (kept by the filter,
   some of the position's mass filtered out), a penalty beta * clamp(exp(q - l) - (q - l) - 1,
   -10, 10), the reference's `kl_penalty(..., "low_var_kl")` of the sampled token toward the proxy,
   whose gradient beta (1 - pi_proxy / pi) d log pi raises the token's probability.

How it composes: a per-token `TokenShaping.penalty` added to the objective's token loss and
aggregated with it, so any objective (PPOClip, GSPO, CISPO, CEGPPO) and any other control stacks.
The selection is made in `prepare` over the whole mini-batch on all ranks (the k lowest of every
rank's tokens), so it does not depend on the micro-batch size or the number of devices; the proxy
log-probs come from the training forward's logits (`Regularizer.needs_min_p`, a no-grad chunked
pass, `token_proxy_logprobs`).

Defaults: the reference recipes recipe/lp_reg/*.sh (min_p 0.02 "minp_p_threshold" with the
config's regular_type "minp", i.e. relative to the largest probability; neg_ratio 0.01
"logp_neg_k_percent" of the Qwen3-14B recipes, 0.005 in the Qwen2.5-32B ones; pos_ratio 0
"logp_pos_k_percent"; beta 1 "ppo_kl_coef"; kl_type "low_var_kl").

Where we differ from the reference code: the proxy is the current policy's (the training forward's,
detached); the recipes set minp_old_log_prob, the proxy of the policy that sampled the rollout,
computed once before the update: the same on an update on policy (the on-policy recipes: one
update per rollout), the current policy's after an earlier update of the rollout. The selection is
over the optimizer mini-batch on all ranks (the reference: each micro-batch of each GPU, its
token-budget micro-batches), ties broken by position. On the regularized tokens the reference
replaces the clipped surrogate by the unclipped -A r; we keep the objective's own, which is the
same on A < 0 tokens under the recipe's clip range (eps_low 1.0, eps_high 9.0; its lp_reg loss has
no dual-clip), the only tokens the recipe selects.
"""
from __future__ import annotations

import logging

import torch

from lit_covrl import distributed
from lit_covrl.algorithms import lp_reg_kl, lp_reg_lowest
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, StepSums, select_globally
from lit_covrl.regularizers.checks import check_number
from lit_covrl.types import PolicyBatch, TokenShaping

log = logging.getLogger(__name__)


class LpReg(Regularizer):
    """A KL pull toward the min-p proxy on the lowest-probability negative-advantage tokens."""

    needs_current_logp = True  # the selection ranks the current log-probs of the mini-batch
    default_name = "lp_reg"
    chart_metrics = {"Control": ("selected_frac", "regularized_frac"), "Entropy": ("kl",)}

    def __init__(self, beta: float = 1.0, min_p: float = 0.02, neg_ratio: float = 0.01, pos_ratio: float = 0.0,
                 name: str | None = None) -> None:
        """
        Args:
            beta: coefficient of the KL term (recipe ppo_kl_coef: 1; >= 0).
            min_p: the proxy keeps the tokens with probability >= min_p x the largest (recipe
                minp_p_threshold: 0.02; in (0, 1]).
            neg_ratio: fraction of the mini-batch's A < 0 valid tokens, the lowest-probability ones,
                that may be regularized (recipe logp_neg_k_percent: 0.01; in [0, 1]).
            pos_ratio: the same among A > 0 tokens (recipe logp_pos_k_percent: 0; in [0, 1]).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.beta = check_number("LpReg.beta", beta)
        self.min_p = check_number("LpReg.min_p", min_p, high=1.0, low_open=True)
        self.neg_ratio = check_number("LpReg.neg_ratio", neg_ratio, high=1.0)
        self.pos_ratio = check_number("LpReg.pos_ratio", pos_ratio, high=1.0)
        self.selected: torch.Tensor | None = None  # [n, T] bool for the current mini-batch
        self._sums = StepSums("regularized", "kl", "tokens")  # kl: of the regularized tokens
        self._checked_empty = False

    @property
    def needs_min_p(self) -> float:  # the learner's proxy request (Regularizer.needs_min_p)
        return self.min_p

    def prepare(self, ctx: MiniBatchContext) -> None:
        def select(logp, adv, mask):
            out = lp_reg_lowest(logp, adv, mask, ratio=self.neg_ratio, sign=-1)
            return out | lp_reg_lowest(logp, adv, mask, ratio=self.pos_ratio, sign=1) if self.pos_ratio else out

        self.selected = select_globally([ctx.logp, ctx.advantages, ctx.mask], select)
        neg = ((ctx.mask > 0) & (ctx.advantages < 0)).sum()
        s = distributed.all_sum(torch.stack([(self.selected & (ctx.mask > 0)).sum(), ctx.mask.sum(), neg]).double())
        self.record("selected_frac", s[0] / s[1].clamp(min=1))
        # checked on the run's first mini-batch with negative tokens only (a host sync), the same
        # decision on every rank (sums over all of them)
        if not self._checked_empty and self.neg_ratio > 0 and s[2] > 0:
            self._checked_empty = True
            if s[0] == 0:
                log.warning("LpReg selected no token in a mini-batch of %d negative-advantage tokens: k = int(%d x "
                            "neg_ratio %g) = %d, and it selects only for k > 1 (as the reference); raise "
                            "LpReg.neg_ratio or the mini-batch size (model.update.mini_batch_size) for it to act",
                            int(s[2]), int(s[2]), self.neg_ratio, int(s[2] * self.neg_ratio))

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self.selected is not None, "prepare() must run before shape()"
        assert batch.proxy_logp is not None, "the module must fill batch.proxy_logp when needs_min_p is set"
        k3, regularized = lp_reg_kl(batch.logp, batch.proxy_logp, self.selected[batch.rows])
        r = regularized.to(batch.mask.dtype) * batch.mask
        self._sums.add(regularized=r.sum(), kl=(k3.detach() * r).sum(), tokens=batch.mask.sum())
        return TokenShaping(penalty=self.beta * k3)

    def pop_metrics(self) -> dict[str, float]:
        """reg/<name>/regularized_frac (of the valid tokens, every update of the step) and kl (the
        mean clamped k3 of the regularized tokens, before beta), over all ranks (a collective: the
        module calls pop_metrics on every rank every step); selected_frac from `prepare`."""
        total = self._sums.pop()
        if total["tokens"] > 0:
            self.record("regularized_frac", total["regularized"] / total["tokens"])
        if total["regularized"] > 0:
            self.record("kl", total["kl"] / total["regularized"])
        return super().pop_metrics()
