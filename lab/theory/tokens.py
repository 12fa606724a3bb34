"""Synthetic RL token batches and where the first-order entropy drop sits (claim 4).

A batch holds B prompts x G responses x T tokens over a vocabulary of V. Most positions are
"peaked" (one token takes ~97-99.9% of the mass), a few are "forking" (a handful of plausible
tokens). Rewards are Bernoulli with a per-prompt difficulty, raised by picking the likely token at
forking positions and lowered by every low-probability token sampled at a peaked position, so
that, as in real rollouts, rare tokens concentrate in below-average responses.
GRPO advantages come from the project's ``group_advantages``, Cov_i from ``token_covariance``,
the Table-1 group means from ``covariance_group_means``.

First-order entropy drop of token i: one policy-gradient step on its own loss -A_i log pi(a_i)
moves that position's logits by dz = eta A_i (e_{a_i} - pi), so (Lemma of Cui et al.)

    -dH_i / eta = A_i Cov_{b~pi}(log pi(b), e_{a_i}(b) - pi(b))
                = A_i [ pi(a_i)(log pi(a_i) + H) - sum_b pi(b)^2 (log pi(b) + H) ].
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lit_covrl.algorithms import (
    clip_cov_select,
    covariance_group_means,
    group_advantages,
    kl_cov_select,
    token_covariance,
    token_entropy,
)

__all__ = ["TokenBatch", "synthetic_batch", "first_order_drop", "drop_shares", "selection_cost", "elements_written"]


@dataclass
class TokenBatch:
    logits: Tensor  # [N, T, V]
    actions: Tensor  # [N, T] sampled token ids
    logp: Tensor  # [N, T] log pi of the sampled tokens
    advantages: Tensor  # [N, T] GRPO advantage broadcast over tokens
    mask: Tensor  # [N, T]
    forking: Tensor  # [N, T] bool
    rewards: Tensor  # [N]


def synthetic_batch(
    *, prompts: int = 32, group: int = 8, length: int = 128, vocab: int = 256, fork_frac: float = 0.1, seed: int = 0
) -> TokenBatch:
    """A rollout-shaped batch (float32; N = prompts * group sequences), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    N, T, V = prompts * group, length, vocab
    logits = torch.randn(N, T, V, generator=g)
    forking = torch.rand(N, T, generator=g) < fork_frac
    top = torch.randint(V, (N, T), generator=g)
    # peaked: top logit 9.5-13.5 above the noise; forking: 3 tokens within ~1 nat of each other
    boost = torch.where(forking, 2.5 + torch.rand(N, T, generator=g), 9.5 + 4.0 * torch.rand(N, T, generator=g))
    logits.scatter_add_(-1, top[..., None], boost[..., None])
    alt = torch.randint(V, (N, T, 2), generator=g)
    logits.scatter_add_(-1, alt, (forking[..., None] * (2.0 + torch.rand(N, T, 2, generator=g))).float())
    logprobs = torch.log_softmax(logits, -1)
    actions = torch.multinomial(logprobs.exp().reshape(-1, V), 1, generator=g).view(N, T)
    logp = logprobs.gather(-1, actions[..., None]).squeeze(-1)
    lengths = torch.randint(T // 2, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rare = ((~forking) & (logp < -3.0)).float() * mask  # a slip at a peaked position
    good_fork = (forking & (actions == top)).float() * mask
    difficulty = torch.logit(0.3 + 0.6 * torch.rand(prompts, generator=g)).repeat_interleave(group)
    score = difficulty + 1.5 * (good_fork.sum(1) - 0.4 * (forking.float() * mask).sum(1)) / 4.0 - 1.0 * rare.sum(1)
    rewards = (torch.rand(N, generator=g) < torch.sigmoid(score)).float()
    adv = group_advantages(rewards, group)[:, None].expand(N, T) * mask
    return TokenBatch(logits, actions, logp * mask, adv.contiguous(), mask, forking, rewards)


@torch.no_grad()
def first_order_drop(b: TokenBatch) -> Tensor:
    """-dH_i / eta per token [N, T] (0 outside the mask), see the module docstring."""
    logprobs = torch.log_softmax(b.logits.double(), -1)
    p = logprobs.exp()
    h = token_entropy(b.logits.double())[..., None]
    centered = logprobs + h  # log pi(b) + H
    own = (p * centered).gather(-1, b.actions[..., None]).squeeze(-1)
    return b.advantages.double() * (own - (p * p * centered).sum(-1)) * b.mask


@torch.no_grad()
def drop_shares(b: TokenBatch, fractions: tuple[float, ...]) -> dict:
    """Covariance table and how much of the first-order entropy drop the top-Cov tokens carry."""
    cov = token_covariance(b.logp, b.advantages, b.mask)
    groups = covariance_group_means(cov, b.mask, fractions=fractions)
    drop = first_order_drop(b)
    total, positive = float(drop.sum()), float(drop.clamp(min=0).sum())
    n = int(b.mask.sum())
    out = {"num_tokens": n, "cov_mean_all": float(cov.sum() / n), "group_means": {}, "drop_share": {},
           "drop_share_of_positive": {}, "drop_total_per_token": total / n}
    for f in fractions:
        k = int(f * n + 1e-9) or 1
        sel = kl_cov_select(cov, b.mask, ratio=f)  # the project's top-k by Cov
        assert int(sel.sum()) == k
        out["group_means"][f] = float(groups[f])
        out["drop_share"][f] = float(drop[sel].sum()) / total
        out["drop_share_of_positive"][f] = float(drop[sel].clamp(min=0).sum()) / positive
    top = kl_cov_select(cov, b.mask, ratio=0.002)
    out["top0.2pct_profile"] = {
        "frac_negative_advantage": float((b.advantages[top] < 0).float().mean()),
        "frac_logp_below_mean": float((b.logp[top] < b.logp[b.mask.bool()].mean()).float().mean()),
        "mean_prob": float(b.logp[top].exp().mean()),
        "frac_forking": float(b.forking[top].float().mean()),
    }
    return out


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class _ElementCounter(TorchDispatchMode):
    """Counts the tensor elements written by the aten operations run inside it, forward and
    backward (an output that shares storage with an input, a view, is not counted): the work
    done, independent of the machine's speed and load."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        self.elements += sum(t.numel() for t in tree_leaves(out)
                             if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs)
        return out


def elements_written(fn) -> int:
    """Tensor elements that ``fn()`` writes (see ``_ElementCounter``)."""
    with _ElementCounter() as counter:
        fn()
    return counter.elements


def selection_cost(sizes: list[tuple[int, int]], *, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Wall time (best of ``repeats``, 1 thread) and work (tensor elements written) of the
    covariance selections vs the full-vocabulary entropy bonus (forward + backward of
    ``token_entropy`` over [N, V] logits), per (N, V).

    Selection needs only the sampled tokens' log-probs (already computed for the PPO loss):
    O(N log N), independent of V. The bonus is O(N V) and needs the [N, V] logits with grad."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, v in sizes:
        logp = -torch.rand(n, 1, generator=g) * 5
        adv = torch.randn(n, 1, generator=g)
        mask = torch.ones(n, 1)
        eligible = torch.ones(n, 1, dtype=torch.bool)
        gen = torch.Generator().manual_seed(seed)

        def select():
            cov = token_covariance(logp, adv, mask)
            clip_cov_select(cov, mask, eligible, ratio=2e-4, lb=1.0, ub=5.0, generator=gen)
            kl_cov_select(cov, mask, ratio=2e-3)

        logits = torch.randn(n, v, generator=g).requires_grad_(True)

        def bonus():
            token_entropy(logits).sum().backward()
            logits.grad = None

        rows.append({"N": n, "V": v, "select_s": _best_time(select, repeats), "entropy_bonus_s": _best_time(bonus, repeats),
                     "select_elements": elements_written(select), "entropy_bonus_elements": elements_written(bonus)})
    return rows
