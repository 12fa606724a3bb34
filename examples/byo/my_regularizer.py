"""Your own regularizer: a callback subclassing `lit_covrl.regularizers.Regularizer`.

SampledTokenPenalty adds coef * logp to every response token's loss: minimizing it lowers the
probability of the tokens the policy sampled, a dense push towards exploration (a crude cousin
of the entropy bonus, here to show the contract, not as a recommended method).

The contract (lit_covrl/regularizers/base.py):
- `__init__` calls `super().__init__(schedule, name)`; the constructor arguments kept under their
  own names are what a resumed run compares;
- `prepare(ctx)` (optional) sees the whole optimizer mini-batch, detached, on every rank: select
  tokens there (`ctx.logp`, `ctx.advantages`, `ctx.mask`, ...; `ctx.token_ids` the response tokens
  and `ctx.groups` each row's prompt, as TrajectoryGTPO compares a group's responses), so that the
  result does not depend on the micro-batch size;
- `shape(batch)` returns a `TokenShaping` whose fields are all per token, [n, T] like
  `batch.logp`: `weight` (multiplies the objective's token loss), `penalty` (added, with gradient)
  and/or `advantage_shift` (detached, added to the advantage inside the objective);
- flags ask the learner for more: `needs_entropy` (batch.entropy with grad), `needs_reference`,
  `needs_current_logp` / `needs_current_entropy` (ctx.logp / ctx.entropy of the current policy),
  `needs_topk = k` (batch.topk_logp [n, T, k] with grad, batch.top1), `needs_min_p = kappa`
  (batch.proxy_logp [n, T], the sampled tokens' log-probs under the min-p proxy, detached),
  `needs_topp_entropy = (top_p, top_k)` (ctx.topp_entropy, batch.topp_entropy with grad: the
  nucleus' entropy), `needs_logit_scales = (s_1, ...)` (batch.scaled_logp [n, T, S] with grad: the
  sampled tokens' log-probs under the logits scaled by each s), `needs_clamped_entropy = clamp_p`
  (batch.clamped_entropy with grad: the entropy renormalised over all but the int(V clamp_p)
  lowest-logit tokens, AEnt's); `draws_rollout` with `rollout_request` / `choose_extra` has the
  module draw extra responses at a temperature it names and train the chosen ones in place of the
  batch's first rows with advantage 1 (AEPO's);
- `self.record(key, value)` logs the step's mean under reg/<name>/<key>.
"""
from __future__ import annotations

from lit_covrl.regularizers import Regularizer, Schedule
from lit_covrl.types import PolicyBatch, TokenShaping


class SampledTokenPenalty(Regularizer):
    default_name = "sampled_token_penalty"

    def __init__(self, coef: float = 0.01, schedule: Schedule | None = None, name: str | None = None) -> None:
        super().__init__(schedule, name)
        if coef < 0:
            raise ValueError(f"SampledTokenPenalty.coef must be >= 0, got {coef!r}")
        self.coef = coef

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        coef = self.scheduled(self.coef, self._step)
        self.record("coef", coef)
        return TokenShaping(penalty=coef * batch.logp * batch.mask)

    def prepare(self, ctx) -> None:
        self._step = ctx.step  # the RL step, for the schedule
