"""Start-up checks of GRPOModule's settings: everything knowable before training is checked
when the module is built, and each error names the field, the value and what is allowed."""
from __future__ import annotations

from lit_covrl.algorithms import ADVANTAGE_ESTIMATORS, AGG_MODES, min_group_size
from lit_covrl.prompts import PROMPT_OVERFLOW

OVERLONG = ("keep", "mask", "penalize")


def check_module_args(hp) -> None:
    """Start-up checks of everything knowable before training (the field is named in each error)."""
    def bad(field: str, value, allowed: str):
        raise ValueError(f"model.{field}={value!r} is invalid: {allowed}")

    if hp.advantage not in ADVANTAGE_ESTIMATORS:
        bad("advantage", hp.advantage, f"valid estimators: {sorted(ADVANTAGE_ESTIMATORS)}")
    if hp.group_size < min_group_size(hp.advantage):
        bad("group_size", hp.group_size, f"advantage={hp.advantage!r} needs >= {min_group_size(hp.advantage)}")
    if hp.loss_agg_mode not in AGG_MODES:
        bad("loss_agg_mode", hp.loss_agg_mode, f"valid modes: {list(AGG_MODES)}")
    if hp.overlong not in OVERLONG:
        bad("overlong", hp.overlong, f"valid: {list(OVERLONG)}")
    if hp.prompt_overflow not in PROMPT_OVERFLOW:
        bad("prompt_overflow", hp.prompt_overflow, f"valid: {list(PROMPT_OVERFLOW)}")
    for field in ("max_new_tokens", "max_prompt_length", "micro_batch_size", "ppo_epochs", "val_samples", "val_k",
                  "logprob_chunk_size", "max_consecutive_skips", "max_gen_rounds"):
        if getattr(hp, field) < 1:
            bad(field, getattr(hp, field), "must be >= 1")
    if hp.mini_batch_size is not None and hp.mini_batch_size < 1:
        bad("mini_batch_size", hp.mini_batch_size, "must be >= 1 or null")
    if hp.val_k > hp.val_samples:
        bad("val_k", hp.val_k, f"must be <= val_samples={hp.val_samples}")
    for field in ("clip_low", "clip_high"):
        v = getattr(hp, field)
        if v is not None and v < 0:
            bad(field, v, "must be >= 0 or null")
    if hp.clip_low is not None and hp.clip_low > 1:
        bad("clip_low", hp.clip_low, "must be <= 1 (the ratio is clipped at 1 - clip_low >= 0)")
    if hp.dual_clip is not None and hp.dual_clip <= 1:
        bad("dual_clip", hp.dual_clip, "must be > 1 or null")
    for field in ("temperature", "val_temperature"):
        if getattr(hp, field) <= 0:
            bad(field, getattr(hp, field), "must be > 0")
    if not 0 < hp.top_p <= 1:
        bad("top_p", hp.top_p, "must be in (0, 1]")
    if hp.grad_clip is not None and hp.grad_clip <= 0:
        bad("grad_clip", hp.grad_clip, "must be > 0 or null")
    if hp.reward_timeout_s is not None and hp.reward_timeout_s <= 0:
        bad("reward_timeout_s", hp.reward_timeout_s, "must be > 0 or null")
