"""RL-ZVP's entropy-guided advantage for zero-variance prompts (Le, Jeon, Vu, Lai, Yang 2025,
"No Prompt Left Behind", arXiv 2509.21880, eq. 5): a group whose G rewards are all equal gets,
in place of GRPO's zero advantage, a token-level one whose sign is the responses' correctness
and whose size is the token's entropy:

    R_i > 0 (all correct):    A_{i,t} =  alpha H_{i,t}
    R_i <= 0 (all incorrect): A_{i,t} = -alpha (max_k H_{i,k} - H_{i,t})

the max over the response's own tokens k = 1 .. |o_i|, H detached (the paper's footnote 3).
Groups with unequal rewards keep the estimator's advantage. No state, no config objects.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl.algorithms.advantages import zero_variance_groups


def zvp_group_signs(rewards: Tensor, group_size: int) -> Tensor:
    """Float [B]: +1 for a group whose G rewards are all equal and > 0 (a positive prompt), -1 for
    one whose rewards are all equal and <= 0 (a negative prompt), 0 for a group whose rewards differ."""
    flat = zero_variance_groups(rewards, group_size).view(-1, group_size)[:, 0]
    first = rewards.double().view(-1, group_size)[:, 0]
    return torch.where(first > 0, 1.0, -1.0).to(torch.float64) * flat.to(torch.float64)


def zvp_advantages(entropy: Tensor, mask: Tensor, signs: Tensor, *, alpha: float) -> Tensor:
    """[n, T] RL-ZVP advantages of n responses given each one's group sign `signs` [n] (+1, -1, 0:
    `zvp_group_signs` of its group) and their token entropies [n, T] (detached here): alpha H on a
    positive response, -alpha (max H - H) on a negative one, the max over the response's valid
    tokens (`mask` [n, T]); 0 on a response whose group's rewards differ and on padding."""
    h = entropy.detach().to(torch.float64).clamp(min=0.0)
    valid = mask.bool()
    top = h.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True).clamp(min=0.0)  # 0 for an empty row
    s = signs.to(torch.float64).view(-1, 1)
    adv = torch.where(s > 0, alpha * h, torch.where(s < 0, -alpha * (top - h), torch.zeros_like(h)))
    return (adv * valid).to(entropy.dtype)
