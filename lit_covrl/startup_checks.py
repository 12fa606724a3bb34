"""Everything `GRPOModule` can check before the first RL step, in one place: in `setup`, the
strategy and the callback stack, the run plan (batch, mini-batch and group sizes against the
data), the run length against validation, the chat template, every known prompt against the
tokenizer and the rewards' signatures against the data's rows; in `configure_model`, the
regularizers' top-k requests against the policy's vocabulary; in `configure_optimizers`,
the optimizer against the weights' precision. Each failure names the setting to change, at minute
zero rather than hours into a run. Also hands the datamodule what it lays out by: the module's
prompts per update."""
from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_covrl.policy import learned_position_limit
from lit_covrl.prompt_check import check_datamodule_prompts
from lit_covrl.prompts import uses_chat_template
from lit_covrl.regularizers.base import check_lookalikes, check_objective_stack, check_stack
from lit_covrl.settings_checks import check_fit_plan, check_run_length
from lit_covrl.sharding import check_strategy

REWARD_CHECK_ROWS = 64  # data rows (or a task's held-out sample) the rewards' signatures are bound on


def check_before_start(module, stage: str) -> None:
    """Start-up checks of `module` (a GRPOModule) attached to its trainer for `stage`; also hands
    the rewards the data's answer field name (rewards asking for TRL's `solution` get it)."""
    trainer, cfg = module.trainer, module.settings
    check_strategy(trainer.strategy, cfg.system)
    check_lookalikes(trainer.callbacks)
    check_stack(module.regularizers)
    for reg in module.regularizers:
        reg.check_rewards(module.rewards, cfg.loss.binary_rewards_for)
        reg.check_loss(cfg.loss, cfg.rollout)  # DCPOAdvantage: the estimator stays GRPO's; RLZVP: no filter_groups
    # non-default clip keys of model.loss: the objective is the PPOClip built from them (resolve_objective)
    from_loss = cfg.loss.clip_args() != type(cfg.loss)().clip_args()
    check_objective_stack(module.objective, module.regularizers, "model.loss" if from_loss else "model.objective.init_args")
    if stage == "fit" and getattr(module.objective, "ppo_on_policy", False) and module.updates_per_rollout == 1:
        rank_zero_warn(f"{type(module.objective).__name__} is PPOClip on policy (r = 1) and this run takes a single "
                       "update per rollout, so it trains as PPOClip; use several mini-batches or ppo_epochs > 1")
    dm, ro = getattr(trainer, "datamodule", None), cfg.rollout
    module.rewards.answer_field = getattr(dm, "hparams", {}).get("answer_field") if dm is not None else None
    if hasattr(dm, "minibatch_prompts"):  # ranks' updates laid out as one rank's (PromptDataModule.rank_offsets)
        dm.minibatch_prompts = cfg.update.mini_batch_size
    check_fit_plan(ro, cfg.update, prompts_per_step=module.prompts_per_step(), datamodule=dm, stage=stage)
    if stage == "fit":
        # a time-based interval (a timedelta or dict) leaves no `val_check_interval` on the trainer
        timed = getattr(trainer, "_val_check_time_interval", None) is not None
        interval = 1 if timed else getattr(trainer, "val_check_interval", None)
        if warning := check_run_length(trainer.max_steps, interval, trainer.limit_val_batches,
                                       bool(getattr(dm, "has_validation", False))):
            rank_zero_warn(warning)
    if ro.chat_template:  # a missing template is known now, whatever prompts the data has in advance
        uses_chat_template(module.tokenizer, True)
    if hasattr(dm, "known_prompts"):
        check_datamodule_prompts(module.tokenizer, dm, chat_template=ro.chat_template,
                                 max_prompt_length=ro.max_prompt_length, truncate=ro.prompt_overflow == "truncate_left")
    rows = check_reward_calls(module.rewards, dm)
    for reg in module.regularizers:  # a final_answer that returns no str fails now, not at the first step
        if reg.shapes_outcome:
            reg.check_final_answers([str(ex.answer) for ex in rows])


def check_reward_calls(rewards, dm) -> list:
    """A reward that cannot take what the data gives it fails now, not at the first rollout: bound
    on a sample of the data's rows (up to REWARD_CHECK_ROWS file rows, else a task's sample), then
    on one row of each set of columns among all the file rows, train and held-out, naming the first
    row (file:line) of a set that cannot fill it: a later file without a column the reward needs
    scored 0 on each of its rows, all run (review byo25 F5). Returns the sample."""
    known = dm.known_examples() if hasattr(dm, "known_examples") else []
    rows = known[:REWARD_CHECK_ROWS] or (dm.task_sample() if hasattr(dm, "task_sample") else [])[:REWARD_CHECK_ROWS]
    rewards.check_calls([ex.answer for ex in rows], [ex.prompt for ex in rows], [ex.columns for ex in rows])
    firsts = {}
    for ex in known:
        firsts.setdefault(frozenset(ex.columns), ex)
    for ex in firsts.values():
        try:
            rewards.check_calls([ex.answer], [ex.prompt], [ex.columns], warn=False)
        except TypeError as err:
            raise TypeError(f"{ex.source or 'a data row'}: {err}") from None
    return rows


def check_position_table(policy, rollout, model_spec: str) -> None:
    """A model with a learned position table (GPT-2's, OPT's) embeds at most its table's positions:
    a rollout needs up to model.rollout.max_prompt_length + max_new_tokens of them. Checked from the
    settings, so a long prompt drawn hours in (or at the first validation) cannot stop the run
    there; rotary / ALiBi models have no table and are not limited here."""
    limit = learned_position_limit(policy)
    if limit is not None and rollout.max_prompt_length + rollout.max_new_tokens > limit:
        room = limit - rollout.max_new_tokens
        fix = (f"set model.rollout.max_prompt_length <= {room} (prompt_overflow: truncate_left cuts longer ones)"
               if room > 0 else "lower model.rollout.max_new_tokens")
        raise ValueError(f"model.rollout.max_prompt_length={rollout.max_prompt_length} + model.rollout.max_new_tokens="
                         f"{rollout.max_new_tokens} positions exceed the {limit} that the position table of "
                         f"model.model={model_spec!r} holds: {fix}")


def check_topk(policy, regularizers, model_spec: str) -> None:
    """A regularizer's top-k request (`needs_topk`, SimKO's top_k) against the policy's vocabulary:
    k above it failed at the first update, after a whole rollout, with a traceback."""
    vocab = getattr(getattr(policy, "config", None), "vocab_size", None)
    for reg in regularizers:
        k = int(reg.needs_topk)
        if vocab is not None and k > vocab:
            field = "top_k" if getattr(reg, "top_k", None) == k else "needs_topk"
            raise ValueError(f"{type(reg).__name__}.{field}={k} is invalid: must be <= the vocabulary size of the "
                             f"policy model.model={model_spec!r}, {vocab}")


def check_optimizer_precision(opt: torch.optim.Optimizer) -> None:
    """The optimizer against the weights' precision (no float32 master copy is kept):

    - float16 weights with an Adam-style optimizer (a second-moment state, `betas`) are refused:
      the state is kept in float16, where the squared gradients underflow and eps (1e-8) rounds to
      0, so the first update divides by zero and every weight turns NaN;
    - bfloat16 weights get a warning: an update smaller than half a weight's bfloat16 spacing
      (|w|/512 .. |w|/256) rounds away, and RL learning rates (1e-6 .. 1e-5) are below that for
      most weights. For an Adam-style optimizer, whose first step moves every weight by about lr,
      the warning says what fraction of the weights that step would leave unchanged (none below 1 %)."""
    bf16, lost, seen, lr = False, 0, 0, 0.0
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if "betas" in group and any(p.dtype == torch.float16 for p in params):
            raise ValueError(
                f"{type(opt).__name__} on float16 weights (model.dtype: float16 or trainer.precision: 16-true): its "
                "state underflows in float16 and the first update turns the weights to NaN. Train float32 weights "
                "(model.dtype: float32) with trainer.precision: bf16-mixed (or 16-mixed), which computes in half "
                "precision and keeps the updates"
            )
        low = [p for p in params if p.dtype == torch.bfloat16]
        if low:
            bf16, lr = True, max(lr, float(group.get("lr", 0.0)))
            if "betas" in group and float(group.get("lr", 0.0)) > 0:
                n_lost, n = _rounded_away(low, float(group["lr"]))
                lost, seen = lost + n_lost, seen + n
    if not bf16 or (seen and lost < 0.01 * seen):  # a learning rate high enough for bfloat16
        return
    share = f" At lr={lr:g} the first {type(opt).__name__} step (about lr per weight) would leave " \
            f"{lost / seen:.0%} of them unchanged." if seen else ""
    rank_zero_warn(
        "training bfloat16 weights (model.dtype: bfloat16 or trainer.precision: bf16-true) without a float32 "
        f"copy: an update smaller than ~1/256 of a weight rounds away.{share} Train float32 weights with "
        "trainer.precision: bf16-mixed (bfloat16 compute; every shipped config does), or raise the learning rate."
    )


def _rounded_away(params: list[torch.Tensor], lr: float, chunk: int = 1 << 24) -> tuple[int, int]:
    """(elements where a step of size `lr` rounds away in bfloat16, elements), over this rank's
    shards. A bfloat16 w in [2^e, 2^(e+1)) has spacing 2^(e-7): a step below half of it, 2^(e-8),
    is lost, i.e. for every |w| >= T, T the least power of two above 256 * lr."""
    threshold = 2.0 ** (math.floor(math.log2(256 * lr)) + 1)
    lost = total = 0
    with torch.no_grad():
        for p in params:
            flat = (p.to_local() if hasattr(p, "to_local") else p).detach().reshape(-1)
            for start in range(0, flat.numel(), chunk):  # no temporary the size of an embedding
                lost += int(torch.count_nonzero(flat[start:start + chunk].abs() >= threshold))
            total += flat.numel()
    return lost, total
