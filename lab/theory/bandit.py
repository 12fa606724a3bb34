"""A multi-prompt bandit trained with the project's own GRPO update and regularizer callbacks
(claims 3 and 5 of the theory lab).

S prompts ("states"), K answers ("arms") each, fixed rewards r [S, K]. One RL step samples G
answers per prompt (N = S*G one-token sequences: tensors [N, 1]), computes GRPO advantages with
``group_advantages``, and runs ``updates`` optimizer updates on that batch, each exactly as
``GRPOModule._update_minibatch`` does it: ``MiniBatchContext`` -> ``reg.prepare`` ->
``ppo_token_loss`` -> ``reg.shape(PolicyBatch)`` -> ``TokenShaping.combine`` -> ``aggregate``
(token-mean) -> backward -> SGD step on the logits z [S, K]. Nothing of Clip-Cov / KL-Cov /
the entropy bonus is re-implemented here: the callbacks select and shape the tokens.

Because the policy is tabular, the exact entropy H(pi_s) and expected reward pi_s . r_s are
known at every step; the trajectory records their means over prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from lit_covrl.algorithms import aggregate, group_advantages, ppo_clipped_tokens, ppo_token_loss, token_entropy
from lit_covrl.regularizers import MiniBatchContext, Regularizer
from lit_covrl.types import PolicyBatch, TokenShaping

__all__ = ["BanditSpec", "Trajectory", "bandit_rewards", "train_bandit"]


@dataclass
class BanditSpec:
    """The bandit and the GRPO recipe (shared by every method of a comparison)."""

    states: int = 4
    arms: int = 16
    group_size: int = 16
    steps: int = 200
    updates: int = 4  # optimizer updates per rollout (KL-Cov acts from the 2nd on)
    lr: float = 1.0  # SGD on the logits
    clip_low: float | None = 0.2
    clip_high: float | None = 0.2
    reward_seed: int = 0


@dataclass
class Trajectory:
    """Per RL step (before its update): mean entropy over prompts (nats), mean regret
    (max r - pi . r), and the fraction of tokens the regularizers selected (if any)."""

    entropy: list[float] = field(default_factory=list)
    regret: list[float] = field(default_factory=list)
    selected_frac: list[float] = field(default_factory=list)

    def mean_entropy(self) -> float:
        return sum(self.entropy) / len(self.entropy)

    def mean_regret(self) -> float:
        return sum(self.regret) / len(self.regret)

    def final_regret(self) -> float:
        return self.regret[-1]


def bandit_rewards(spec: BanditSpec) -> Tensor:
    """Rewards r [S, K] in [0, 1]: uniform draws with a unique best arm per prompt (float64)."""
    g = torch.Generator().manual_seed(spec.reward_seed)
    return torch.rand(spec.states, spec.arms, generator=g, dtype=torch.float64)


def _exact_stats(z: Tensor, r: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        p = torch.softmax(z, dim=-1)
        return float(token_entropy(z).mean()), float((r.max(-1).values - (p * r).sum(-1)).mean())


def train_bandit(
    spec: BanditSpec,
    regularizers: list[Regularizer],
    *,
    seed: int,
    lr: float | None = None,
    on_update: Callable[[MiniBatchContext], None] | None = None,
) -> Trajectory:
    """Train the bandit from uniform logits with GRPO + ``regularizers``; deterministic given
    ``seed`` (sampling) and the regularizers' own seeds. ``lr`` overrides ``spec.lr``."""
    r = bandit_rewards(spec)
    S, G = spec.states, spec.group_size
    z = torch.zeros(S, spec.arms, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([z], lr=spec.lr if lr is None else lr)
    gen = torch.Generator().manual_seed(seed)
    state = torch.arange(S).repeat_interleave(G)  # [N] prompt of each sequence (prompt-major)
    mask = torch.ones(S * G, 1, dtype=torch.float64)
    rows = torch.arange(S * G)
    need_entropy = any(reg.needs_entropy for reg in regularizers)
    traj = Trajectory()
    for step in range(spec.steps):
        h, regret = _exact_stats(z, r)
        traj.entropy.append(h)
        traj.regret.append(regret)
        with torch.no_grad():
            actions = torch.multinomial(torch.softmax(z, -1), G, replacement=True, generator=gen).reshape(-1)
            adv = group_advantages(r[state, actions], G)[:, None]  # [N, 1]
            old = torch.log_softmax(z, -1)[state, actions][:, None]  # [N, 1]
        sel = 0.0
        for update in range(spec.updates):
            with torch.no_grad():
                cur = torch.log_softmax(z, -1)[state, actions][:, None]
            clipped = ppo_clipped_tokens(cur, old, adv, mask, clip_low=spec.clip_low, clip_high=spec.clip_high)
            ctx = MiniBatchContext(step, update, update == 0, cur, old, adv, mask, clipped)
            for reg in regularizers:
                reg.prepare(ctx)
                chosen = getattr(reg, "selected", None)
                if chosen is not None:
                    sel += float(chosen.float().mean()) / spec.updates
            if on_update is not None:
                on_update(ctx)
            logits = z[state]  # [N, K] (rows share their prompt's logits)
            logp = torch.log_softmax(logits, -1).gather(-1, actions[:, None])  # [N, 1]
            ent = token_entropy(z)[state][:, None] if need_entropy else None  # H of each row's prompt
            base = ppo_token_loss(logp, old, adv, mask, clip_low=spec.clip_low, clip_high=spec.clip_high)
            batch = PolicyBatch(rows, logp, old, adv, mask, ent, None)
            loss = aggregate(TokenShaping.combine([reg.shape(batch) for reg in regularizers], base), mask, "token-mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        traj.selected_frac.append(sel)
    h, regret = _exact_stats(z, r)
    traj.entropy.append(h)
    traj.regret.append(regret)
    return traj


def max_entropy(spec: BanditSpec) -> float:
    return math.log(spec.arms)
