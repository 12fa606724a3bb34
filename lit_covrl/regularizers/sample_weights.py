"""Weights by the sign of a response's advantage:

- WeightedReinforce (W-REINFORCE, Zhu et al. 2025, "The Surprising Effectiveness of Negative
  Reinforcement in LLM Reasoning", arXiv 2506.01347): the objective of the tokens of responses
  with a positive advantage (positive sample reinforcement, PSR) weighs `positive_weight` (paper:
  lambda = 0.1), that of responses with a negative one (NSR) `negative_weight` (1). PSR sharpens
  the policy onto the sampled answer and collapses its entropy; NSR pushes mass off a wrong answer
  onto the other tokens in proportion to the model's prior and keeps it. positive_weight 0 trains
  on the failures alone (the paper's NSR), negative_weight 0 on the successes alone (PSR).

Where we differ from the reference code (github.com/TianHongZXY/RLVR-Decomposed): the paper's
objective is REINFORCE with rewards +lambda / -1 and no baseline; here the weights multiply the
run's objective (PPO clip, GSPO, CISPO) with the run's advantages, split by the sign of the
advantage. With 0/1 rewards and a group baseline (grpo, drgrpo, rloo) that sign is the reward's
whenever the group is mixed; the magnitudes are the estimator's, not +-1.
"""
from __future__ import annotations

from lit_covrl.algorithms import sample_sign_weights
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.regularizers.entropy_selection import _global_frac, _TokenWeights


class WeightedReinforce(_TokenWeights):
    """W-REINFORCE: the positive-advantage responses' objective weighs `positive_weight`."""

    default_name = "w_reinforce"
    reads_sign_as_correct = True  # verified-correct is A > 0: refused beside OutcomeExploration
    chart_metrics = {"Control": ("positive_frac",)}

    def __init__(self, positive_weight: float = 0.1, negative_weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            positive_weight: weight of the objective on tokens of responses with A > 0 (paper: 0.1;
                0 = negative samples only, NSR).
            negative_weight: weight on tokens of responses with A < 0 (paper: 1; 0 = PSR only).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(name)
        for field, value in (("positive_weight", positive_weight), ("negative_weight", negative_weight)):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"WeightedReinforce.{field}={value!r}: must be a finite number >= 0")
        if positive_weight == negative_weight == 0:
            raise ValueError("WeightedReinforce: positive_weight and negative_weight are both 0 (no gradient at all)")
        self.positive_weight, self.negative_weight = positive_weight, negative_weight

    def prepare(self, ctx: MiniBatchContext) -> None:
        self.weights = sample_sign_weights(ctx.advantages, ctx.mask, positive=self.positive_weight,
                                           negative=self.negative_weight)
        self.record("positive_frac", _global_frac(ctx.advantages > 0, ctx.mask))
