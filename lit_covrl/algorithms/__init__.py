"""Pure tensor math: advantages, PPO / GSPO / CISPO losses and aggregation, token covariance and
selection, entropy controls, entropy and log-probs, KL estimators. No state, no config objects."""
from lit_covrl.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    QUANTILE_ESTIMATORS,
    compute_advantages,
    group_advantages,
    min_group_size,
    per_token_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from lit_covrl.algorithms.covariance import (
    clip_cov_select,
    covariance_group_means,
    covariance_sums,
    kl_cov_select,
    token_covariance,
)
from lit_covrl.algorithms.entropy import masked_entropy, masked_mean, token_entropy, token_logprobs
from lit_covrl.algorithms.entropy_controls import (
    STEER_MAPPINGS,
    adaptive_entropy_coef,
    entropy_advantage_shift,
    entropy_ratio_keep,
    high_entropy_mask,
    sample_sign_weights,
    steer_metric,
    steer_weights,
)
from lit_covrl.algorithms.kl import KL_ESTIMATORS, kl_penalty
from lit_covrl.algorithms.losses import (
    AGG_MODES,
    aggregate,
    ppo_clipped_tokens,
    ppo_stats,
    ppo_token_loss,
)
from lit_covrl.algorithms.objectives import (
    cispo_stats,
    cispo_token_loss,
    gspo_clipped_tokens,
    gspo_stats,
    gspo_token_loss,
    sequence_logratio,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "QUANTILE_ESTIMATORS",
    "STEER_MAPPINGS",
    "adaptive_entropy_coef",
    "aggregate",
    "cispo_stats",
    "cispo_token_loss",
    "clip_cov_select",
    "compute_advantages",
    "covariance_group_means",
    "covariance_sums",
    "entropy_advantage_shift",
    "entropy_ratio_keep",
    "group_advantages",
    "gspo_clipped_tokens",
    "gspo_stats",
    "gspo_token_loss",
    "high_entropy_mask",
    "kl_cov_select",
    "kl_penalty",
    "masked_entropy",
    "masked_mean",
    "min_group_size",
    "per_token_advantages",
    "ppo_clipped_tokens",
    "ppo_stats",
    "ppo_token_loss",
    "rloo_advantages",
    "sample_sign_weights",
    "sequence_logratio",
    "steer_metric",
    "steer_weights",
    "token_covariance",
    "token_entropy",
    "token_logprobs",
    "zero_variance_groups",
]
