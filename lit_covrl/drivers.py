"""How the learner steps the optimizer: the `OptimizerDriver` protocol (all `Learner` needs from a
training framework), `LightningDriver`, its implementation for `GRPOModule`'s manual
optimization, and `PlainDriver`, a bare optimizer's (a `Learner` without Lightning: tools, tests)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lit_covrl.module import GRPOModule


class OptimizerDriver(Protocol):
    """What the learner needs from the training framework."""

    def zero_grad(self) -> None: ...
    def backward(self, loss: Tensor) -> None: ...
    def step(self, last: bool) -> None:
        """One optimizer step on the accumulated gradients; it must call
        `Learner.before_optimizer_step(optimizer)` after any gradient unscaling, before stepping.
        `last`: the last update of the rollout (GRPOModule counts RL steps with it)."""
    def skip_step(self) -> float:
        """Count the rollout's closing update without stepping: it has no gradient (its
        mini-batch was filtered), and a gradient scaler refuses a step with none. Returns the
        learning rate."""
    def save_checkpoint(self, filename: str) -> str: ...
    def last_checkpoint(self) -> str:
        """The last checkpoint saved between RL steps, else the file the fit resumed from (what a
        stopped run resumes from), or ""."""


class LightningDriver:
    """The learner's `OptimizerDriver` for GRPOModule (manual optimization): backward through
    Lightning (precision scaling, strategy), every optimizer step through the strategy and its
    precision plugin, which calls `on_before_optimizer_step` (-> the learner's clipping) after
    unscaling. Only the last step of a rollout goes through Lightning's optimizer wrapper, whose
    step counter is `trainer.global_step`: one per RL step (`skip_step` counts it when the last
    mini-batch was filtered and there is nothing to step)."""

    def __init__(self, module: GRPOModule) -> None:
        self.module = module

    def zero_grad(self) -> None:
        self.module.optimizers().zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        self.module.manual_backward(loss)

    def step(self, last: bool) -> None:
        opt = self.module.optimizers()
        if last:
            opt.step()
        else:
            self.module.trainer.strategy.optimizer_step(opt.optimizer, _no_closure, model=self.module)

    def skip_step(self) -> float:
        opt = self.module.optimizers()
        # what LightningOptimizer.step does around the strategy's step: manual optimization counts
        # trainer.global_step there (private hooks; tests/test_learner_correctness.py checks them)
        opt._on_before_step()
        opt._on_after_step()
        return opt.optimizer.param_groups[0]["lr"]

    def save_checkpoint(self, filename: str) -> str:
        """Into the run's checkpoint folder (else its log folder), not the working directory."""
        trainer = self.module.trainer
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or trainer.log_dir  # log_dir: collective, as the save is
        path = os.path.join(folder, filename)
        trainer.save_checkpoint(path)
        return path

    def last_checkpoint(self) -> str:
        return self.module.last_checkpoint()


def zero_step_moves_nothing(optimizer, grad_norm: Tensor) -> bool:
    """Whether an optimizer step on gradients of norm `grad_norm` surely leaves every weight as it
    is: a zero gradient, an optimizer of a class known to move weights only through the gradient,
    its momentum and weight decay (torch's Adam, AdamW, SGD) that has no state yet (its first step,
    or the first after a reset) and no weight decay. Such a step does not take the policy off the
    rollout's (the weights stay bitwise equal), so the learner still counts it on policy. Any other
    optimizer counts as moving: ASGD shrinks the weights on a zero gradient, and a wrapper such as
    ZeroRedundancyOptimizer keeps its state where `optimizer.state` does not show it."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD) or float(grad_norm) != 0.0:
        return False
    if any(len(state) for state in optimizer.state.values()):
        return False
    return all(not group.get("weight_decay") for group in optimizer.param_groups)


def _no_closure() -> None:
    """Manual optimization: the backward already ran before the step."""


class PlainDriver:
    """The `OptimizerDriver` of a `Learner` without Lightning: plain backward, the learner's clipping
    (`before_optimizer_step`, so set `learner` once it is built), then `optimizer.step()`; counts the
    steps taken. No checkpoints."""

    def __init__(self, optimizer) -> None:
        self.optimizer, self.learner, self.steps = optimizer, None, 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self, last: bool) -> None:
        self.learner.before_optimizer_step(self.optimizer)
        self.optimizer.step()
        self.steps += 1

    def skip_step(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save_checkpoint(self, filename: str) -> str:
        raise RuntimeError(f"PlainDriver saves no checkpoint ({filename})")

    def last_checkpoint(self) -> str:
        return ""
