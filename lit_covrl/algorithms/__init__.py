"""Pure tensor math: advantages, PPO losses and aggregation, token covariance and selection,
entropy and log-probs, KL estimators. No state, no config objects."""
from lit_covrl.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    group_advantages,
    min_group_size,
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
from lit_covrl.algorithms.kl import KL_ESTIMATORS, kl_penalty
from lit_covrl.algorithms.losses import (
    AGG_MODES,
    aggregate,
    ppo_clipped_tokens,
    ppo_stats,
    ppo_token_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "aggregate",
    "clip_cov_select",
    "compute_advantages",
    "covariance_group_means",
    "covariance_sums",
    "group_advantages",
    "kl_cov_select",
    "kl_penalty",
    "masked_entropy",
    "masked_mean",
    "min_group_size",
    "ppo_clipped_tokens",
    "ppo_stats",
    "ppo_token_loss",
    "rloo_advantages",
    "token_covariance",
    "token_entropy",
    "token_logprobs",
    "zero_variance_groups",
]
