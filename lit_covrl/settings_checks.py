"""The settings checks that look beyond one group: across `model.rollout` and `model.loss` and the
flat `model.*` settings when GRPOModule is built (`check_module_settings`, `check_passk_reward_weights`),
and against the trainer and the datamodule at setup (`check_run_length`, `check_fit_plan`, called by
`lit_covrl.startup_checks`). Each group checks its own keys when built (`lit_covrl.settings`); the
errors name the full key in the same form (`model.rollout.group_size=1 is invalid: ...`).
"""
from __future__ import annotations

import math

from lit_covrl.algorithms import min_group_size
from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings, _bad


def check_module_settings(rollout: RolloutSettings, loss: LossSettings, reward_timeout_s: float | None,
                          correct_threshold: float = 1.0) -> None:
    """The checks that span two groups, and the flat settings' own."""
    need = min_group_size(loss.advantage)
    if rollout.group_size < need:
        _bad(f"{RolloutSettings.KEY}.group_size", rollout.group_size,
             f"{LossSettings.KEY}.advantage={loss.advantage!r} needs >= {need}")
    if loss.pass_k is not None and loss.pass_k >= rollout.group_size:
        _bad(f"{LossSettings.KEY}.pass_k", loss.pass_k, f"must be < {RolloutSettings.KEY}.group_size="
             f"{rollout.group_size} (k = the group size makes every k-subset the whole group: every advantage 0)")
    binary = loss.binary_rewards_for
    if binary and rollout.overlong == "penalize" and rollout.overlong_reward not in (0, 1):
        _bad(f"{RolloutSettings.KEY}.overlong_reward", rollout.overlong_reward,
             f"{binary} needs rewards in {{0, 1}}: use 0.0 (a truncated response fails)")
    if reward_timeout_s is not None and not 0 < reward_timeout_s < math.inf:  # NaN fails it too
        _bad("model.reward_timeout_s", reward_timeout_s, "must be a finite number > 0, or null (no limit)")
    if isinstance(correct_threshold, bool) or not isinstance(correct_threshold, (int, float)) \
            or not math.isfinite(correct_threshold):  # NaN counted no response correct, silently
        _bad("model.correct_threshold", correct_threshold, "must be a finite number")


def check_passk_reward_weights(loss: LossSettings, weights: list[float], given) -> None:
    """advantage 'passk' and the unlikeliness reward need rewards in {0, 1}: a weighted sum of 0/1
    rewards stays there for every outcome only with weights of 0 or 1, at most one of them 1
    (`weights`: one per reward, as used; `given`: model.reward_weights as set, null = 1.0 each)."""
    binary = loss.binary_rewards_for
    if binary is None:
        return
    need = f"{binary} needs rewards in {{0, 1}}: weight 1 for one 0/1 reward, 0 for the others"
    for i, w in enumerate(weights):
        if w not in (0, 1):
            _bad(f"model.reward_weights[{i}]", w, need)
    if sum(weights) > 1:
        _bad("model.reward_weights", given, need + (f" (null weighs each of the {len(weights)} rewards 1)" if given is None else ""))


def check_run_length(max_steps: int | None, val_check_interval, limit_val_batches, has_validation: bool) -> str | None:
    """The prompt stream is endless (an epoch never ends): a fit needs trainer.max_steps, and
    validation runs only every int `val_check_interval` RL steps. Raises for the first; returns a
    warning for held-out prompts that would never be evaluated, else None."""
    if max_steps is None or max_steps < 1:
        _bad("trainer.max_steps", max_steps, "the prompt stream is endless, so an epoch never ends and "
             "trainer.max_epochs cannot stop the fit: set trainer.max_steps (RL steps)")
    if isinstance(val_check_interval, (int, float)) and not isinstance(val_check_interval, bool) and val_check_interval <= 0:
        _bad("trainer.val_check_interval", val_check_interval, "must be >= 1 RL step (to never validate: "
             "trainer.limit_val_batches 0, or no held-out data)")  # Lightning's loop divided by it after step 1
    if has_validation and limit_val_batches != 0 and not isinstance(val_check_interval, int):
        return (f"held-out prompts are set but trainer.val_check_interval={val_check_interval!r} waits for an epoch "
                "end that never comes, so validation will not run: set it to a number of RL steps (e.g. 25) "
                "and trainer.check_val_every_n_epoch: null")
    return None


def check_resume_length(trainer, checkpoint_steps: int | None) -> None:
    """A fit resumed from a checkpoint that has taken trainer.max_steps RL steps or more would train
    none: it finished at once, with a new, empty run folder and no word why. Raises instead (a
    start-up error: the checkpoint is read before the first batch)."""
    if trainer is None or checkpoint_steps is None or getattr(trainer.state, "fn", None) != "fit":
        return
    max_steps = trainer.max_steps
    if max_steps is not None and 0 < max_steps <= checkpoint_steps:
        _bad("trainer.max_steps", max_steps, f"the checkpoint resumed from ({trainer.ckpt_path}) has taken "
             f"{checkpoint_steps} RL steps already, so this fit would train none: raise trainer.max_steps "
             f"(e.g. --trainer.max_steps {checkpoint_steps + max(max_steps, 1)}) to go on")


def check_fit_plan(rollout: RolloutSettings, update: UpdateSettings, *, prompts_per_step: int | None,
                   datamodule, stage: str) -> None:
    """The checks against the datamodule, at setup: mini-batches must tile the prompts of a step,
    and dynamic sampling needs a datamodule that can draw fresh prompts."""
    mbs = update.mini_batch_size
    if prompts_per_step is not None and mbs is not None and prompts_per_step % mbs:
        raise ValueError(f"{UpdateSettings.KEY}.mini_batch_size={mbs} must divide data.batch_size={prompts_per_step} "
                         "(prompts per step per device)")
    if stage == "fit" and rollout.max_gen_rounds > 1 and not hasattr(datamodule, "regen_batch"):  # implies filter_groups
        raise ValueError(
            f"{RolloutSettings.KEY}.max_gen_rounds={rollout.max_gen_rounds} (dynamic sampling) needs a datamodule with "
            "regen_batch(index, round, rounds) to draw fresh prompts, such as lit_covrl.data.PromptDataModule"
        )
