"""EntroPIC (Yang et al. 2025, "EntroPIC: Towards Stable Long-Term Training of LLMs via Entropy
Stabilization with Proportional-Integral Control", arXiv 2511.15248; reference code
github.com/yk7333/EntroPIC, `core_algos.compute_policy_loss_entropic` and `dp_actor.py`):

    e_k     = H_k - target                                  (H_k: measured entropy of RL step k)
    alpha   = clip(K_p e_k + K_i sum_{j<k} e_j, -1, 1)
    loss   += alpha * agg_{high}(-r_t |A_t|),   high = valid tokens with pi(y_t) > threshold

agg_{high} aggregates over the high-probability tokens alone, with the loss's aggregation mode (the
reference's `agg_loss(..., loss_mask=prob_mask)`), r_t = pi / pi_old (log-ratio clamped to
[-20, 20]), unclipped. On a high-probability token the policy gradient of a response with A > 0
thus weighs 1 + alpha c and that of one with A < 0 weighs 1 - alpha c (c: the ratio of the two
denominators, e.g. valid / high tokens for token-mean): when entropy is below the target
(alpha < 0) confident positive tokens are sharpened less and confident negative ones pushed down
harder, which raises entropy; above the target the reverse. Low-probability tokens keep their
gradient. Defaults from the reference recipe (`run_entropic.sh`: target_entropy 0.1,
entropy_control_p 1, entropy_control_i 0.01; the threshold 0.95 is the loss function's default).

Where we differ from the reference code:
- H_k is the token-mean entropy of the rollout (the sampler's, at the training temperature) of the
  tokens RL step k trains on, over all ranks, and the alpha it gives acts from step k + 1 on, as
  AdaptiveEntropyBonus; the reference measures the actor's entropy on each micro-batch during the
  update (the rollout policy's in its on-policy recipe), uses it at once in the P term, and adds it
  to the integral weighted by the micro-batch's share of the mini-batch, i.e. once per optimizer
  step. Step 0 runs with alpha = 0.
- The high-probability tokens and the aggregation's counts are those of the whole optimizer
  mini-batch on all ranks, not of one micro-batch on one GPU, so the term does not depend on the
  micro-batch size or the device count, except for a token whose pi is within float rounding
  (~1e-7 relative) of `threshold`, which forwards of other shapes can put on the other side.
- alpha, the integral and the pending measurement are saved in checkpoints (`state_dict`) and
  resume exactly; the reference keeps the integral in the actor object only.
- The term adds to any objective (PPO clip, GSPO, CISPO, CE-GPPO); the reference adds it to its
  own PPO loss (`loss_mode: entropic`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import entropic_alpha, entropic_high_prob, entropic_token_loss, entropic_weights
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, StepEntropy
from lit_covrl.types import PolicyBatch, TokenShaping


class EntroPIC(Regularizer):
    """EntroPIC: a PI controller on the entropy error re-weights the high-probability tokens'
    policy gradient by advantage sign (see the module docstring)."""

    needs_current_logp = True  # the high-probability tokens are the current policy's (the reference's)
    default_name = "entropic"
    chart_metrics = {"Entropy": ("alpha", "measured_entropy"), "Control": ("error", "integral", "high_frac")}

    def __init__(self, target: float = 0.1, kp: float = 1.0, ki: float = 0.01, threshold: float = 0.95,
                 name: str | None = None) -> None:
        """
        Args:
            target: target token-mean entropy in nats (reference recipe: 0.1).
            kp: proportional gain, alpha per nat of error (reference recipe: 1).
            ki: integral gain, alpha per nat of summed error per RL step (reference recipe: 0.01).
            threshold: tokens with pi(y_t) > threshold are re-weighted (reference: 0.95).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        for field, value in (("target", target), ("kp", kp), ("ki", ki)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"EntroPIC.{field}={value!r}: must be a finite number >= 0")
        if kp == ki == 0:
            raise ValueError("EntroPIC: kp and ki are both 0 (alpha would stay 0: no control at all)")
        if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ValueError(f"EntroPIC.threshold={threshold!r}: must be a probability in (0, 1)")
        self.target, self.kp, self.ki, self.threshold = float(target), float(kp), float(ki), float(threshold)
        # running state (saved by state_dict), private: the settings above describe the run
        self._alpha = 0.0  # applied now
        self._integral = 0.0  # sum of the errors of the closed steps
        self._entropy = StepEntropy()  # the step's measurement, moving alpha for the next
        self.weights: Tensor | None = None  # c_t of the prepared mini-batch (entropic_weights)

    @property
    def alpha(self) -> float:
        """The control coefficient applied in this RL step."""
        return self._alpha

    @property
    def integral(self) -> float:
        """Sum of the entropy errors of the RL steps closed so far."""
        return self._integral

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.old_entropy is not None, "the module must provide the rollout entropy"
        if (entropy := self._entropy.begin(ctx.step)) is not None:  # the previous step, closed
            error = entropy - self.target
            self._alpha = entropic_alpha(error, self._integral, kp=self.kp, ki=self.ki)
            self._integral += error
        m = ctx.mask.double()
        high = entropic_high_prob(ctx.logp, ctx.mask, threshold=self.threshold)
        rows = m.new_tensor(float(m.shape[0]))
        local = torch.stack([(ctx.old_entropy.double() * m).sum(), m.sum(), high.sum().double(),
                             (high.sum(-1) > 0).sum().double(), rows])
        sums = distributed.all_sum(local)  # [sum H, valid tokens, high tokens, rows with a high token, rows]
        self._entropy.add(sums[:2])
        self.weights = entropic_weights(high, ctx.mask, ctx.agg_mode, num_tokens=sums[1], num_seqs=sums[4],
                                        num_high=sums[2], num_high_seqs=sums[3])
        self.record("alpha", self._alpha)
        self.record("high_frac", sums[2] / sums[1].clamp(min=1))

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self.weights is not None, "prepare() must run before shape()"
        if self._alpha == 0.0:
            return TokenShaping()
        w = self.weights[batch.rows]
        return TokenShaping(penalty=entropic_token_loss(batch.logp, batch.old_logp, batch.advantages, w, alpha=self._alpha))

    def pop_metrics(self) -> dict[str, float]:
        """Also, for a step that measured something: reg/<name>/measured_entropy (the step's
        token-mean rollout entropy), error (it minus the target) and integral (the errors of the
        steps before it): alpha at the next step is clip(kp * error + ki * integral, -1, 1)."""
        if (entropy := self._entropy.pop_measured()) is not None:
            self.record("measured_entropy", entropy)
            self.record("error", entropy - self.target)
            self.record("integral", self._integral)
        return super().pop_metrics()

    def state_dict(self) -> dict:
        return {"alpha": self._alpha, "integral": self._integral, **self._entropy.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._alpha, self._integral = float(state_dict["alpha"]), float(state_dict["integral"])
        self._entropy.load_state_dict(state_dict)
