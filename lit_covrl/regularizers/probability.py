"""Controls by the sampled token's probability under the rollout policy (Yang, Luo, Wang, Han, He,
Li, Xu 2025, "Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs", arXiv 2505.12929,
ICLR 2026; reference code github.com/zhyang2226/AR-Lopti). A token's gradient norm scales with
1 - pi(y_t), so the low-probability tokens dominate an update and suppress the learning of the
high-probability ones:

- AdvantageReweighting (AR): each token's objective weighs alpha pi_old(y_t) + 1 - alpha, which
  for the objectives here (linear in the advantage, or PPO's min / dual clip of it, scaled by a
  positive weight) is the reference's A'_t = (alpha pi_old + 1 - alpha) A_t (its
  `both_linear_normal`; recipes: alpha 0.2 alone, 0.3 with Lopti).
- Lopti: every update of the rollout runs twice (`update_phases` 2): first on the tokens with
  pi_old(y_t) < eta only, then, from the weights phase 0 left, on the others (recipes: eta 0.4
  alone, 0.5 with AR). Outside its phase a token's whole loss (objective, entropy bonus, KL to the
  reference, every penalty) is 0 while it stays in the denominators, as the reference zeroes the
  advantage and masks its entropy and KL terms but keeps the response mask for the means.

pi_old is the rollout policy's probability (`ctx.old_logp`, the reference's `old_log_probs`), fixed
over both phases: the selection is per token, so it does not depend on the micro-batch size or the
device count. The math is in `lit_covrl.algorithms.probability_controls`.

Where we differ from the reference code: the reference calls its whole actor update twice (all
mini-batches with the low-probability tokens, then all with the others); here each phase is every
epoch and mini-batch of the run's update schedule, in that order, which is the same schedule. The
reference's "portion" variant (a quantile of the probabilities instead of eta) and its other
reweighting methods (sigmoid, masks, RAFT) are not implemented.
"""
from __future__ import annotations

from torch import Tensor

from lit_covrl.algorithms import low_probability_tokens, probability_weights
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, check_number
from lit_covrl.regularizers.entropy_selection import _global_frac, _TokenWeights
from lit_covrl.types import PolicyBatch, TokenShaping


class AdvantageReweighting(_TokenWeights):
    """AR: each token's objective weighs alpha pi_old(y_t) + 1 - alpha."""

    default_name = "ar"
    chart_metrics = {"Control": ("weight_mean",)}

    def __init__(self, alpha: float = 0.2, name: str | None = None) -> None:
        """
        Args:
            alpha: the weight's slope in pi_old (reference recipes: 0.2 alone, 0.3 beside Lopti; 0 = no
                reweighting); in [0, 1], so that every weight is in [1 - alpha, 1].
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(name)
        self.alpha = check_number("AdvantageReweighting.alpha", alpha, low=0.0, high=1.0)

    def prepare(self, ctx: MiniBatchContext) -> None:
        w = probability_weights(ctx.old_logp, ctx.mask, alpha=self.alpha)
        self.weights = w.to(ctx.mask.dtype)
        m = ctx.mask.double()
        self.record("weight_mean", _global_frac(w, m))  # sum(w m) / sum(m) over all ranks


class Lopti(Regularizer):
    """Low-Probability Token Isolation: the low-probability tokens' update, then the others'."""

    update_phases = 2
    default_name = "lopti"
    chart_metrics = {"Control": ("low_frac",)}

    def __init__(self, eta: float = 0.5, low_first: bool = True, name: str | None = None) -> None:
        """
        Args:
            eta: tokens with pi_old(y_t) < eta are the low-probability ones (reference: 0.4 alone, 0.5
                beside AR); in (0, 1].
            low_first: True trains the low-probability tokens in the first phase (the paper's order);
                False the high-probability ones first (the reference's negative eta).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.eta = check_number("Lopti.eta", eta, low=0.0, high=1.0, low_open=True)
        if not isinstance(low_first, bool):
            raise ValueError(f"Lopti.low_first={low_first!r} is invalid: must be true or false")
        self.low_first = low_first
        self.scope: Tensor | None = None

    def check_objective(self, objective) -> None:
        if not getattr(objective, "token_clip", False):
            raise ValueError(
                f"Lopti (regularizer {self.name!r}) isolates tokens of one sequence from each other, which the "
                f"objective {type(objective).__name__} cannot (GSPO's one ratio per sequence carries every token's "
                "gradient); use PPOClip, CEGPPO or CISPO with Lopti, or leave Lopti out")

    def phase_tokens(self, ctx: MiniBatchContext) -> Tensor:
        low = low_probability_tokens(ctx.old_logp, ctx.mask, eta=self.eta)
        first = low if self.low_first else ctx.mask.bool() & ~low
        return first if ctx.phase == 0 else ctx.mask.bool() & ~first

    def prepare(self, ctx: MiniBatchContext) -> None:
        self.scope = self.phase_tokens(ctx).to(ctx.mask.dtype)
        self.record("low_frac", _global_frac(low_probability_tokens(ctx.old_logp, ctx.mask, eta=self.eta), ctx.mask))

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self.scope is not None, "prepare() must run before shape()"
        return TokenShaping(scope=self.scope[batch.rows].to(batch.logp.dtype))

    def zeroed_tokens(self) -> Tensor | None:
        return None if self.scope is None else self.scope == 0
