"""Stopping a run that cannot go on, before it saves anything broken, with a message that says
where to resume from.

- non-finite logits while sampling (on any rank): the weights are already broken, there is
  nothing to train on;
- a reward other than 0 or 1 under `model.loss.advantage: passk` or `model.loss.unlikeliness`,
  whose formulas count correct responses (checked before the step's advantages, on every rank);
- non-finite weights after a step's updates: finite gradients can still give them (an optimizer
  state that over- or underflows), so they are checked before the step's end can checkpoint them,
  and every checkpoint the run wrote, the last one named in the message included, holds finite
  weights.

Both checks are collective (every rank reaches the same decision), so no rank is left waiting in a
later collective.
"""
from __future__ import annotations

import torch

from lit_covrl import distributed
from lit_covrl.algorithms import first_non_binary
from lit_covrl.policy import first_nonfinite
from lit_covrl.types import Rollout

__all__ = ["last_checkpoint", "stop_on_non_binary_rewards", "stop_on_nonfinite_logits", "stop_on_nonfinite_weights"]


def last_checkpoint(trainer, ckpt=None) -> str:
    """The latest file of the checkpoint callback `ckpt` (default: the trainer's; saved between RL
    steps), else the file this fit was resumed from (nothing saved since: it is still the one to
    resume from), or ""."""
    if trainer is None:
        return ""
    ckpt = ckpt if ckpt is not None else getattr(trainer, "checkpoint_callback", None)
    latest = (getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")) if ckpt else ""
    return latest or str(getattr(trainer, "ckpt_path", None) or "")


def _resume_hint(trainer) -> str:
    return f"Last good checkpoint: {last_checkpoint(trainer) or 'none saved yet'}."


def stop_on_nonfinite_logits(rollout: Rollout, *, step: int, rank: int, trainer) -> None:
    """RuntimeError if any rank sampled a sequence with NaN/inf logits (`Rollout.nonfinite`)."""
    if distributed.all_true(not bool(rollout.nonfinite.any())):
        return
    raise RuntimeError(
        f"non-finite logits (NaN or inf) while sampling the rollout of RL step {step} "
        f"({int(rollout.nonfinite.sum())} of {len(rollout.nonfinite)} sequences on rank {rank}); "
        f"the run is stopped. {_resume_hint(trainer)} Lower the learning rate or check the reward and data."
    )


def stop_on_nonfinite_weights(policy: torch.nn.Module, *, step: int, rank: int, trainer) -> None:
    """RuntimeError if any rank's policy weights (its shards, under FSDP) hold a NaN or an inf after
    the updates of RL step `step`: one (min, max) per parameter and one sync (`first_nonfinite`)."""
    bad = first_nonfinite(policy.named_parameters())
    if distributed.all_true(bad is None):
        return
    raise RuntimeError(
        f"non-finite weights (NaN or inf) after the updates of RL step {step}"
        + (f" (parameter {bad!r} on rank {rank})" if bad else "")
        + f"; the run is stopped before saving them. {_resume_hint(trainer)} "
        "Lower the learning rate, or check the optimizer's precision (model.dtype, trainer.precision)."
    )


# why each setting needs rewards in {0, 1}, and its other way out than a 0/1 reward
_BINARY_NEEDS = {
    "model.loss.advantage": ("it counts correct responses", "or another advantage"),
    "model.loss.unlikeliness": ("it ranks the correct responses by likelihood",
                                "or turn it off with --model.loss.unlikeliness null"),
}


def stop_on_non_binary_rewards(rewards: torch.Tensor, *, step: int, rank: int, trainer,
                               setting: str = "model.loss.advantage='passk'") -> None:
    """ValueError if any rank scored a reward other than 0 or 1 (Pass@k Training's advantage and
    the unlikeliness reward are defined for correct / incorrect responses only); `setting` names
    the one that needs them (`key=value`), the message its reason and remedy."""
    bad = first_non_binary(rewards)
    if distributed.all_true(bad is None):
        return
    reason, remedy = _BINARY_NEEDS[setting.split("=")[0]]
    raise ValueError(
        f"{setting} needs rewards in {{0, 1}} ({reason}), but RL step "
        f"{step} scored " + (f"{bad!r} on rank {rank}" if bad is not None else "one on another rank")
        + f"; the run is stopped. Use a 0/1 reward (model.reward, model.reward_weights) {remedy}. "
        + _resume_hint(trainer)
    )
