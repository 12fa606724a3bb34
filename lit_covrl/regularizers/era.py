"""ERA, Entropy Regularizing Activation (Kang, Liao, Xu, Xu 2025, "Entropy Regularizing Activation:
Boosting Continuous Control, Large Language Models, and Image Classification with Activation as
Entropy Constraints", arXiv 2510.08549, ICLR 2026; the authors' code nothingbutbut/era, ERA-LLM, a
verl fork: the `era` loss mode of `update_policy` and `_forward_micro_batch` in
verl/workers/actor/dp_actor.py, recipes qwen_7b_era_topk.sh and qwen_7b_era_topk_scale.sh).

Instead of an entropy term in the loss, ERA applies an activation to the logits the loss reads:
for a response with a positive advantage whose entropy H_resp (the mean of its top 20 % token
entropies under the current policy) is below `low`, the loss trains softmax(k z), a sharper policy
than the one that samples, so the sampling policy keeps more entropy than the trained one; above
`high` it trains softmax(z / k). The advantage of a modified token is scaled inversely (A / k,
resp. k A) to keep the update's size (`algorithms.activation_controls`). Tokens are sampled from
the raw policy: neither sampler changes.

How it composes: the activated log-prob's gradient replaces the raw one's through a value-0
`TokenShaping.logp_grad` term, and the inverse advantage scale is a `TokenShaping.weight`, so the
objective's value, ratio, clipping and statistics stay the raw policy's and any objective and any
other control stack (a second redirection of the same token adds: with SimKO's top-K mix, the
gradient of log pi'(y) - c log pi(y) + c mean_k log pi(top_k), the mix taken against the raw
log-prob, not rebuilt on the activated one). The log-probs under k z and z / k come from the
training forward's logits (`Regularizer.needs_logit_scales` = (k, 1 / k)); the decision is per
response, made in `prepare` from the current entropy of the mini-batch (`needs_current_entropy`:
the rollout's while on policy), so it does not depend on the micro-batch size or the number of
devices, except for a response whose H_resp is within float rounding (~1e-7 relative) of `low` or
`high`: its entropies, computed in forwards of other shapes, differ in their last bits and can
decide it the other way (a fixed threshold has no tie tolerance to give: it would move the edge).

Defaults: the reference recipe qwen_7b_era_topk_scale.sh (era_lb 0.45, era_ub 3.0, era_k 2,
adv_scale True; the repository's latest recipe, the inverse scaling of the paper's and the README's
objective) and dp_actor.py's top 20 % (`0.2 * length`, at least one token).

Where we differ from the reference code: the ratio is the raw policy's, pi / pi_old, where the
reference recomputes the old log-probs under the activation (with the old policy's entropy
deciding) and takes pi' / pi'_old: the same on an update on policy (the recipes': one update per
rollout, ratio 1, and the same decision), and off policy ours is the importance weight of the
paper's objective E_{a ~ pi}[A' log pi'(a)] for samples of the raw pi_old. The activation and the
advantage scale both act on every valid token with A_t > 0, the paper's objective, on purpose: the
reference scales the advantage of the responses whose first token's float advantage is > 0, but
activates only the tokens whose advantage truncates to >= 1 (it is copied into an int64 buffer,
`advantages_pad = torch.zeros_like(input_ids)`), so a positive advantage in (0, 1) is rescaled
there and not activated (with verl's GRPO advantages over 8 samples, the positive responses of
every group with 4 or more correct; with advantages below 1 in size, every response). The recipes'
`topk` log-probs (softmax renormalised over the 20 largest logits, for every token, ERA's or not)
are left out.
"""
from __future__ import annotations

import torch

from lit_covrl import distributed
from lit_covrl.algorithms import era_advantage_weight, era_logp_grad, era_modes, era_response_entropy
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer
from lit_covrl.regularizers.checks import check_number
from lit_covrl.types import PolicyBatch, TokenShaping


class ERA(Regularizer):
    """Sharpen (k z) or flatten (z / k) the logits the loss reads on positive-advantage responses
    whose top-entropy mean is below `low` or above `high`, advantages scaled inversely."""

    needs_current_entropy = True
    default_name = "era"
    chart_metrics = {"Entropy": ("response_entropy",),
                     "Control": ("sharpened_frac", "flattened_frac", "low_frac", "high_frac")}

    def __init__(self, low: float = 0.45, high: float = 3.0, k: float = 2.0, top_frac: float = 0.2,
                 scale_advantages: bool = True, name: str | None = None) -> None:
        """
        Args:
            low: H_resp below it sharpens a positive response's logits (recipe era_lb: 0.45 nats; >= 0).
            high: H_resp above it flattens them (recipe era_ub: 3.0 nats; >= low).
            k: the activation's factor (recipe era_k: 2; >= 1, 1 changes nothing).
            top_frac: H_resp is the mean of each response's max(1, floor(top_frac L)) largest token
                entropies (reference: 0.2; in (0, 1]).
            scale_advantages: scale a modified token's advantage inversely, A / k or k A (the
                paper's objective and recipe adv_scale True; False: the earlier recipe's).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.low = check_number("ERA.low", low, must="an entropy >= 0 (nats)")
        self.high = check_number("ERA.high", high, must="an entropy >= 0 (nats)")
        if self.high < self.low:
            raise ValueError(f"ERA.high={high!r} is invalid: must be >= ERA.low ({low!r})")
        self.k = check_number("ERA.k", k, low=1.0, must="a finite number >= 1 (1: no activation)")
        self.top_frac = check_number("ERA.top_frac", top_frac, high=1.0, low_open=True, must="in (0, 1]")
        if not isinstance(scale_advantages, bool):
            raise ValueError(f"ERA.scale_advantages={scale_advantages!r} is invalid: must be true or false")
        self.scale_advantages = scale_advantages
        self._modes: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def needs_logit_scales(self) -> tuple[float, float]:  # the learner's scaled log-probs request
        return (self.k, 1.0 / self.k)

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.entropy is not None, "the module must fill ctx.entropy when needs_current_entropy is set"
        h = era_response_entropy(ctx.entropy, ctx.mask, top_frac=self.top_frac)
        sharpened, flattened = era_modes(h, ctx.advantages, ctx.mask, low=self.low, high=self.high)
        self._modes = (sharpened, flattened)
        rows = ctx.mask.sum(-1) > 0
        sums = distributed.all_sum(torch.stack([
            rows.double().sum(), (rows & (h < self.low)).double().sum(), (rows & (h > self.high)).double().sum(),
            sharpened.any(-1).double().sum(), flattened.any(-1).double().sum(), (h * rows).sum(),
        ]))
        n = sums[0].clamp(min=1)
        for i, key in enumerate(("low_frac", "high_frac", "sharpened_frac", "flattened_frac", "response_entropy")):
            self.record(key, sums[i + 1] / n, when=sums[0] > 0)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self._modes is not None, "prepare() must run before shape()"
        assert batch.scaled_logp is not None, "the module must fill batch.scaled_logp when needs_logit_scales is set"
        sharpened, flattened = (m[batch.rows] for m in self._modes)
        weight = era_advantage_weight(sharpened, flattened, k=self.k, dtype=batch.logp.dtype) \
            if self.scale_advantages else None
        return TokenShaping(weight=weight, logp_grad=era_logp_grad(batch.logp, batch.scaled_logp, sharpened, flattened))
