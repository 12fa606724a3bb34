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
epoch and mini-batch of the run's update schedule, in that order, which is the same schedule.
Its "portion" variant (`seperate_portion`: the threshold is a quantile of the batch's pi_old
instead of eta) is `portion`: each RL step's threshold is the linearly interpolated quantile of
pi_old over the tokens the step trains on all ranks (`observe_old_logp`, before the first update;
the reference takes torch.quantile of the whole training batch's nonzero probabilities, in float32),
computed in float64, and kept for both phases. Its other reweighting methods (sigmoid, masks, RAFT)
are not implemented.
"""
from __future__ import annotations

from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import low_probability_tokens, probability_quantile, probability_weights
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
    chart_metrics = {"Control": ("low_frac", "threshold")}

    def __init__(self, eta: float | None = None, low_first: bool = True, portion: float | None = None,
                 name: str | None = None) -> None:
        """
        Args:
            eta: tokens with pi_old(y_t) < eta are the low-probability ones (reference: 0.4 alone, 0.5
                beside AR); in (0, 1]; None (not given): 0.5, or `portion`'s quantile when that is set.
            low_first: True trains the low-probability tokens in the first phase (the paper's order);
                False the high-probability ones first (the reference's negative eta or portion).
            portion: in place of eta, the threshold of each RL step is this quantile of pi_old over the
                step's trained tokens on all ranks (the reference's `seperate_portion`, 0.5 in its config;
                None: eta); in (0, 1); not with eta.
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.eta = 0.5 if eta is None else check_number("Lopti.eta", eta, low=0.0, high=1.0, low_open=True)
        if not isinstance(low_first, bool):
            raise ValueError(f"Lopti.low_first={low_first!r} is invalid: must be true or false")
        self.portion = None if portion is None else check_number(
            "Lopti.portion", portion, low=0.0, high=1.0, low_open=True, high_open=True)
        if portion is not None and eta is not None:
            raise ValueError(f"Lopti.eta={eta!r} with Lopti.portion={portion!r}: the split is by one of them (portion "
                             "sets each step's threshold in place of eta); leave eta out with portion")
        self.low_first = low_first
        self.threshold: float | None = None if portion is not None else self.eta  # this step's split
        self.scope: Tensor | None = None

    def check_objective(self, objective) -> None:
        if not getattr(objective, "token_clip", False):
            raise ValueError(
                f"Lopti (regularizer {self.name!r}) isolates tokens of one sequence from each other, which the "
                f"objective {type(objective).__name__} cannot (GSPO's one ratio per sequence carries every token's "
                "gradient); use PPOClip, CEGPPO or CISPO with Lopti, or leave Lopti out")

    def observe_old_logp(self, old_logp: Tensor, mask: Tensor) -> None:
        """With `portion`: this step's threshold, the quantile of every rank's trained tokens' pi_old."""
        if self.portion is None:
            self.record("threshold", self.eta)
            return
        probs, _ = distributed.gather_rows(old_logp.detach().double().exp()[mask.bool()])
        q = probability_quantile(probs, self.portion)
        self.threshold = 0.0 if q is None else q  # no valid token on any rank: nothing below it
        self.record("threshold", self.threshold, when=q is not None)

    def _low(self, ctx: MiniBatchContext) -> Tensor:
        assert self.threshold is not None, "Lopti with portion: observe_old_logp() must run before the updates"
        return low_probability_tokens(ctx.old_logp, ctx.mask, eta=self.threshold)

    def phase_tokens(self, ctx: MiniBatchContext) -> Tensor:
        low = self._low(ctx)
        first = low if self.low_first else ctx.mask.bool() & ~low
        return first if ctx.phase == 0 else ctx.mask.bool() & ~first

    def prepare(self, ctx: MiniBatchContext) -> None:
        self.scope = self.phase_tokens(ctx).to(ctx.mask.dtype)
        self.record("low_frac", _global_frac(self._low(ctx), ctx.mask))

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self.scope is not None, "prepare() must run before shape()"
        return TokenShaping(scope=self.scope[batch.rows].to(batch.logp.dtype))

    def zeroed_tokens(self) -> Tensor | None:
        return None if self.scope is None else self.scope == 0
