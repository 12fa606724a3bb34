"""RENT's entropy reward (Prabhudesai, Chen, Ippoliti, Fragkiadaki, Liu, Pathak 2025, "Maximizing
Confidence Alone Improves Reasoning", arXiv 2505.22660; the authors' code, satrams/rent-rl,
`trainer.minimize_entropy`): each response's reward is its negative mean token entropy under the
rollout policy,

    r_i = -H_i,   H_i = (1 / |o_i|) sum_t H(pi_old(. | q, o_i,<t))

the mean over the response's valid tokens (EOS included), detached: a reward, fed to the group
baseline like any other. RENT replaces the task reward by it (unsupervised); `reward_weight` keeps
a share of the task reward beside it (our extension, 0 = the paper's). No state, no config objects.
"""
from __future__ import annotations

from torch import Tensor

from lit_covrl.algorithms.advantages import sequence_logprob_means


def response_entropy_means(entropy: Tensor, mask: Tensor) -> Tensor:
    """Each response's mean token entropy over its valid tokens: entropy [N, T], mask [N, T] -> [N]
    float64, detached (0 for a response with no valid token)."""
    return sequence_logprob_means(entropy.detach(), mask)  # a masked row mean, whatever the per-token value


def rent_rewards(rewards: Tensor, entropy: Tensor, mask: Tensor, *, coef: float = 1.0,
                 reward_weight: float = 0.0) -> Tensor:
    """[N] rewards the group baseline sees: reward_weight r_i - coef H_i (RENT: reward_weight 0, coef 1),
    H_i `response_entropy_means`; computed in float64, returned in `rewards`' dtype."""
    shaped = reward_weight * rewards.double() - coef * response_entropy_means(entropy, mask).to(rewards.device)
    return shaped.to(rewards.dtype)
