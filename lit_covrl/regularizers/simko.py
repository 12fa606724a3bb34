"""SimKO (Peng et al. 2025, "SimKO: Simple Pass@K Policy Optimization", arXiv 2510.14807; the
authors' code CLR-Lab/SimKO, verl's `compute_policy_loss_simko` in trainer/ppo/core_algos.py and
the top-K forward in workers/actor/dp_actor.py). RLVR concentrates each position's probability on
its top-1 candidate; SimKO spreads it, asymmetrically, at each response's high-entropy tokens
(entropy strictly above the `tau` quantile of its own response's valid tokens, the current
policy's entropy from the training forward):

- verified-correct responses (A > 0): the gradient of the sampled token's log-prob is mixed with
  the top-K candidates' (indices of the current policy's K largest logits):
  (1 - mix_topk_coef) grad log pi(y) + mix_topk_coef / K sum_k grad log pi(top_k), times the
  token's objective coefficient (the reference's ratio (1 - c) r + c / K sum_k r_k, each r_k with
  the value r and the gradient r grad log pi(top_k));
- verified-incorrect responses (A < 0) where the sampled token is the current policy's top-1: the
  token's objective weighs `incorrect_top1_scale` (the reference scales A by 1.1).

How it composes: the mix is a `TokenShaping.logp_grad` term of value 0 added to the log-probs the
objective reads, so the loss's value, the clip decisions and the statistics are the objective's
own and only the gradient's direction changes, under any token-level objective (PPOClip, the
reference's; CEGPPO, CISPO); GSPO (one ratio per sequence) is refused at start-up. Another
redirection of the same token adds to it: under ERA's activation the token's gradient is that of
log pi'(y) - c log pi(y) + c mean_k log pi(top_k), the mix taken against the raw log-prob. The
top-1 penalty is a `TokenShaping.weight` (a positive factor on A is one on the token loss of every
objective that is linear in A). The current top-K log-probs come from the training forward's
chunked log-softmax (`Regularizer.needs_topk`).

Defaults: the reference recipe run_qwen2.5-math-7b_SimKO.sh (top_k 3, tau 0.8, mix_topk_coef
0.01) and core_algos.py's constant 1.1 for the top-1 penalty.

Where we differ from the reference code: "verified-correct" is A > 0 (the reference: the reward
equals 1; with 0/1 rewards and a group baseline the two differ only on A = 0 responses, which get
no gradient either way); each r_k is r exactly (the reference divides by
exp(log pi(top_k) - log pi_old(top_k)) + 1e-8, a relative 1e-8 that needs the old policy's top-K
log-probs, which we do not keep); the high-entropy test treats entropies within a relative 1e-5
above the quantile as equal to it (rounding of different micro-batch shapes, as Archer).
"""
from __future__ import annotations

import torch

from lit_covrl.algorithms import simko_logp_grad, simko_tokens
from lit_covrl.regularizers.base import Regularizer, StepSums
from lit_covrl.regularizers.checks import check_number
from lit_covrl.types import PolicyBatch, TokenShaping


class SimKO(Regularizer):
    """Top-K mixing on correct responses, a stronger top-1 penalty on incorrect ones, at each
    response's high-entropy tokens."""

    needs_entropy = True
    reads_sign_as_correct = True  # verified-correct is A > 0: refused beside OutcomeExploration
    default_name = "simko"
    chart_metrics = {"Control": ("mixed_frac", "top1_penalized_frac"), "Entropy": ("top1_prob",)}

    def __init__(self, top_k: int = 3, mix_topk_coef: float = 0.01, tau: float = 0.8,
                 incorrect_top1_scale: float = 1.1, name: str | None = None) -> None:
        """
        Args:
            top_k: K, candidates whose log-probs share a correct token's gradient (recipe: 3).
            mix_topk_coef: their share of it (recipe: 0.01; in [0, 1]).
            tau: a token is high-entropy when its entropy exceeds this quantile of its response's
                token entropies (recipe: 0.8; in [0, 1], 1 selects none).
            incorrect_top1_scale: weight of a high-entropy top-1 token of an A < 0 response
                (reference code: 1.1; >= 0).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"SimKO.top_k={top_k!r} is invalid: must be an integer >= 1")
        self.top_k = int(top_k)
        unit = "a finite number >= 0 and <= 1"
        self.mix_topk_coef = check_number("SimKO.mix_topk_coef", mix_topk_coef, high=1.0, must=unit)
        self.tau = check_number("SimKO.tau", tau, high=1.0, must=unit)
        self.incorrect_top1_scale = check_number("SimKO.incorrect_top1_scale", incorrect_top1_scale)
        self._sums = StepSums("mixed_frac", "top1_penalized_frac", "top1_prob", "tokens")

    @property
    def needs_topk(self) -> int:  # the learner's top-k request (Regularizer.needs_topk)
        return self.top_k

    def check_objective(self, objective) -> None:
        if not getattr(objective, "token_clip", False):
            raise ValueError(
                f"SimKO (regularizer {self.name!r}) mixes each token's own ratio with its top-K candidates', which the "
                f"objective {type(objective).__name__} has no per-token form of (GSPO takes one ratio per sequence); "
                f"use PPOClip, CEGPPO or CISPO with SimKO, or leave SimKO out")

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert batch.topk_logp is not None, "the module must fill batch.topk_logp when needs_topk is set"
        mixed, penalized = simko_tokens(batch.entropy.detach(), batch.mask, batch.advantages, batch.top1, tau=self.tau)
        m = batch.mask
        self._sums.add(mixed_frac=(mixed * m).sum(), top1_penalized_frac=(penalized * m).sum(),
                       top1_prob=(batch.topk_logp[..., 0].detach().exp() * m).sum(), tokens=m.sum())
        weight = torch.ones_like(batch.logp, requires_grad=False).masked_fill(penalized, self.incorrect_top1_scale)
        return TokenShaping(weight=weight, logp_grad=simko_logp_grad(batch.logp, batch.topk_logp, mixed,
                                                                     coef=self.mix_topk_coef))

    def pop_metrics(self) -> dict[str, float]:
        """reg/<name>/mixed_frac, top1_penalized_frac (of the valid tokens) and top1_prob (the
        current policy's mean top-1 probability) over every update of the step and every rank (a
        collective: the module calls pop_metrics on every rank every step)."""
        total = self._sums.pop()
        if total["tokens"] > 0:
            for key in ("mixed_frac", "top1_penalized_frac", "top1_prob"):
                self.record(key, total[key] / total["tokens"])
        return super().pop_metrics()
