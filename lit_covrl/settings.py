"""GRPOModule's typed settings groups: `model.rollout`, `model.loss`, `model.update`, `model.eval`
and `model.system` (as litgpt groups its `--train.*` / `--eval.*` arguments).

Each group is a frozen dataclass that checks itself when built and names the full key in its
error (`model.rollout.group_size=0 is invalid: must be >= 1`). LightningCLI reads them from YAML
(`model: {rollout: {group_size: 8}}`) and from the command line (`--model.rollout.group_size 8`);
in Python a group is passed as the dataclass or as a plain dict of its keys (`as_group`).
The checks that span two groups, or look at the trainer and the datamodule, are in
`lit_covrl.settings_checks`. The learner, the evaluator and the rollout
code take these groups directly: each setting is declared and documented once, here.

Keys that moved out of the flat `model.*` namespace are listed in `MOVED_KEYS`; an old key given
in a config or on the command line fails at start-up with a hint naming the new key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lit_covrl.algorithms import ADVANTAGE_ESTIMATORS, AGG_MODES, QUANTILE_ESTIMATORS
from lit_covrl.prompts import PROMPT_OVERFLOW
from lit_covrl.sharding import MIXED_PRECISION, ROLLOUT_GATHER

OVERLONG = ("keep", "mask", "penalize")


def _bad(key: str, value, allowed: str):
    raise ValueError(f"{key}={value!r} is invalid: {allowed}")


def _at_least_one(group, key: str, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        if value is not None and value < 1:
            _bad(f"{key}.{name}", value, "must be >= 1" + (" or null" if name in ("mini_batch_size", "sampling_batch_size") else ""))


@dataclass(frozen=True)
class RolloutSettings:
    """model.rollout: how responses are sampled and which of them are trained on.

    Args:
        group_size: G, responses sampled per prompt.
        max_new_tokens: response length limit.
        temperature: sampling temperature (the loss uses the same temperature).
        top_p: nucleus sampling mass (1.0 = off). No top-k is ever applied.
        stop: stop strings: a response ends after the token that completes the first of them
            (masked after it, counted as finished). Decoding still runs to EOS or
            max_new_tokens for such rows (see `lit_covrl.stopping`).
        max_prompt_length: prompt length limit in tokens.
        prompt_overflow: "error" or "truncate_left" for prompts over the limit (files and HF
            rows are all checked at start-up, "truncate_left" warning how many it will cut; a
            synthetic task's prompts on a sample at start-up (its held-out prompts and 256
            drawn ones), the others when drawn, where "error" stops the run naming the RL step
            and the last checkpoint).
        chat_template: null = use the tokenizer's chat template if it has one.
        filter_groups: drop groups whose G rewards are all equal (zero advantage: no signal).
        max_gen_rounds: with filter_groups, DAPO's dynamic sampling: generate for fresh prompts
            again, up to this many rounds in all, until the batch holds data.batch_size
            informative groups (1 = no re-generation: filtered batches just shrink).
        overlong: responses that hit max_new_tokens: "keep" (train on them as scored),
            "mask" (exclude them from the loss) or "penalize" (their reward := overlong_reward).
        overlong_reward: the reward of a truncated response under overlong: penalize.
        sampling_batch_size: sequences sampled at once (null = all of a rollout's rows, data.batch_size
            x group_size per device). Smaller bounds the KV cache to this many sequences; the
            rows are then sampled in consecutive batches from the same generator.
    """

    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    max_prompt_length: int = 512
    prompt_overflow: str = "error"
    chat_template: bool | None = None
    filter_groups: bool = False
    max_gen_rounds: int = 1
    overlong: str = "keep"
    overlong_reward: float = 0.0
    sampling_batch_size: int | None = None

    KEY = "model.rollout"

    def __post_init__(self) -> None:
        _at_least_one(self, self.KEY, "group_size", "max_new_tokens", "max_prompt_length", "max_gen_rounds",
                      "sampling_batch_size")
        if not 0 < self.temperature < math.inf:  # here and below: NaN fails the check too
            _bad(f"{self.KEY}.temperature", self.temperature, "must be a finite number > 0")
        if not math.isfinite(self.overlong_reward):
            _bad(f"{self.KEY}.overlong_reward", self.overlong_reward, "must be a finite number")
        if not 0 < self.top_p <= 1:
            _bad(f"{self.KEY}.top_p", self.top_p, "must be in (0, 1]")
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            _bad(f"{self.KEY}.prompt_overflow", self.prompt_overflow, f"valid: {list(PROMPT_OVERFLOW)}")
        if self.overlong not in OVERLONG:
            _bad(f"{self.KEY}.overlong", self.overlong, f"valid: {list(OVERLONG)}")
        if self.max_gen_rounds > 1 and not self.filter_groups:
            _bad(f"{self.KEY}.max_gen_rounds", self.max_gen_rounds,
                 f"dynamic sampling refills the batch with informative groups: set {self.KEY}.filter_groups: true, or 1")


@dataclass(frozen=True)
class LossSettings:
    """model.loss: advantages and the default PPO-clip objective's loss.

    Args:
        advantage: "grpo" (group mean/std), "drgrpo" (mean only), "rloo" or "passk" (Pass@k
            Training's analytical advantage, Chen et al. 2025: the expected pass@k of a random
            k-subset of the group, for 0/1 rewards; `lit_covrl.algorithms.advantages`).
        baseline_quantile: K in (0, 1): the group's K-quantile replaces the mean of grpo / drgrpo
            (QAE, Wu et al. 2025; paper: 0.4); null = the mean.
        pass_k: k of advantage "passk" (needed there, refused with any other), an integer in
            [1, model.rollout.group_size - 1] (k = group size trains nothing); k = 1 is GRPO with
            the population std. Rewards must be 0 or 1: the run stops at the first other value.
        unlikeliness: beta of the unlikeliness reward (He et al. 2025, "Rewarding the Unlikely";
            the reference code's rank_penalty, 0.25 in its recipe), in (0, 1]; null = off. Before
            the baseline each reward r_i becomes r_i (1 - beta rank_i / G), rank_i the response's
            place (0 = least likely) in its group by mean token log-prob under the rollout policy,
            so rare correct responses get more credit; a group of equal rewards keeps advantage 0.
            Rewards must be 0 or 1, as for passk (refused with it: its formula needs them unscaled).
        clip_low: PPO lower clip epsilon (null = no lower clip).
        clip_high: PPO upper clip epsilon (null = no upper clip; 0.28 = DAPO clip-higher).
        dual_clip: dual-clip constant c > 1 for negative advantages (null = off).
        logratio_clamp: clamp of logp - old_logp before exp (null = off).
        loss_agg_mode: token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm.

    clip_low / clip_high / dual_clip / logratio_clamp configure the default objective (PPOClip)
    only: with `model.objective` given they must stay at their defaults.
    """

    advantage: str = "grpo"
    baseline_quantile: float | None = None
    pass_k: int | None = None
    unlikeliness: float | None = None
    clip_low: float | None = 0.2
    clip_high: float | None = 0.2
    dual_clip: float | None = None
    logratio_clamp: float | None = 20.0
    loss_agg_mode: str = "token-mean"

    KEY = "model.loss"

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            _bad(f"{self.KEY}.advantage", self.advantage, f"valid estimators: {sorted(ADVANTAGE_ESTIMATORS)}")
        if self.baseline_quantile is not None:
            if not 0 < self.baseline_quantile < 1:
                _bad(f"{self.KEY}.baseline_quantile", self.baseline_quantile, "must be in (0, 1) or null (the mean)")
            if self.advantage not in QUANTILE_ESTIMATORS:
                _bad(f"{self.KEY}.baseline_quantile", self.baseline_quantile,
                     f"replaces the group mean of advantage {list(QUANTILE_ESTIMATORS)}, not {self.advantage!r}")
        self._check_pass_k()
        self._check_unlikeliness()
        if self.loss_agg_mode not in AGG_MODES:
            _bad(f"{self.KEY}.loss_agg_mode", self.loss_agg_mode, f"valid modes: {list(AGG_MODES)}")
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # here and below: NaN fails the check too
                _bad(f"{self.KEY}.{name}", value, "must be >= 0 or null")
        if self.clip_low is not None and not self.clip_low <= 1:
            _bad(f"{self.KEY}.clip_low", self.clip_low, "must be <= 1 (the ratio is clipped at 1 - clip_low >= 0)")
        if self.dual_clip is not None and not self.dual_clip > 1:
            _bad(f"{self.KEY}.dual_clip", self.dual_clip, "must be > 1 or null")
        if self.logratio_clamp is not None and not self.logratio_clamp > 0:
            _bad(f"{self.KEY}.logratio_clamp", self.logratio_clamp, "must be > 0 or null")

    def _check_pass_k(self) -> None:
        key, k = f"{self.KEY}.pass_k", self.pass_k
        if self.advantage == "passk" and k is None:
            _bad(key, k, f"{self.KEY}.advantage='passk' needs k, the size of the response subsets whose "
                 "pass@k it trains (configs/cpu/passk.yaml: 4)")
        if k is None:
            return
        if self.advantage != "passk":
            _bad(key, k, f"is the k of {self.KEY}.advantage='passk', not of {self.advantage!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            _bad(key, k, "must be an integer >= 1")

    def _check_unlikeliness(self) -> None:
        key, beta = f"{self.KEY}.unlikeliness", self.unlikeliness
        if beta is None:
            return
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
            _bad(key, beta, "must be in (0, 1] (the reference recipe: 0.25) or null (off): up to 1 a correct "
                 "response's reward stays above an incorrect one's 0")
        if self.advantage == "passk":
            _bad(key, beta, f"scales the rewards before the baseline; {self.KEY}.advantage='passk' needs them in "
                 "{0, 1}: use grpo, drgrpo or rloo")

    @property
    def binary_rewards_for(self) -> str | None:
        """The setting that needs every reward in {0, 1} (None: none does)."""
        if self.advantage == "passk":
            return f"{self.KEY}.advantage='passk'"
        if self.unlikeliness is not None:
            return f"{self.KEY}.unlikeliness={self.unlikeliness}"
        return None

    def clip_args(self) -> dict:
        """The default PPOClip objective's arguments."""
        return {k: getattr(self, k) for k in ("clip_low", "clip_high", "dual_clip", "logratio_clamp")}


@dataclass(frozen=True)
class UpdateSettings:
    """model.update: the optimizer updates of one rollout.

    Args:
        mini_batch_size: prompts per optimizer update (null = the whole batch: one update per epoch).
        micro_batch_size: sequences per forward/backward (gradient accumulation; the same math up to
            float rounding).
        ppo_epochs: passes over the rollout.
        grad_clip: max gradient norm (null = no clipping, norm still logged).
        logprob_chunk_size: rows per chunk for log-prob/entropy over the vocabulary.
        max_consecutive_skips: stop (after saving a checkpoint) when this many optimizer
            updates in a row had a non-finite gradient.
        recompute_logprobs: recompute the old (rollout-policy) log-probs with a no-grad
            training forward after sampling, as verl does, instead of using the ones the
            sampler recorded (free). The two differ by float rounding only (sampler decoding
            vs a full-sequence forward; `python tools/logprob_gap.py`); turn this on where the
            first update's PPO ratio must be exactly 1 (comparisons at bit level). The same
            forward recomputes the old entropies (H_old of EntropyRatioClip, the entropies of
            HighEntropyTokens' and SteerWeights' on-policy updates and of AdaptiveEntropyBonus,
            and policy/entropy), so that H / H_old is exactly 1 while the policy has not moved. Each
            mini-batch's rows are forwarded in the micro-batches its update cuts (rounding
            depends on the batch layout), so the first update's ratio is exactly 1 whatever
            skip_padding, filter_groups and mini_batch_size are. null (default): on when the
            policy computes in a 16-bit float (trainer.precision bf16-mixed / bf16-true /
            16-mixed / 16-true, bfloat16 or float16 weights, system.fsdp_mixed_precision bf16 or
            fp16), where the sampler's log-probs differ by whole rounding steps now and then (up
            to 1e-1 measured on the CPU in bf16; under fp16 GSPO's narrow sequence clip caught
            ~20 % of sequences on an unmoved policy); off in float32.
    """

    mini_batch_size: int | None = None
    micro_batch_size: int = 64
    ppo_epochs: int = 1
    grad_clip: float | None = 1.0
    logprob_chunk_size: int = 1024
    max_consecutive_skips: int = 10
    recompute_logprobs: bool | None = None

    def recompute_for(self, computes_in_half: bool) -> bool:
        """`recompute_logprobs` resolved: null = on when the policy computes in a 16-bit float."""
        return computes_in_half if self.recompute_logprobs is None else bool(self.recompute_logprobs)

    KEY = "model.update"

    def __post_init__(self) -> None:
        _at_least_one(self, self.KEY, "mini_batch_size", "micro_batch_size", "ppo_epochs", "logprob_chunk_size",
                      "max_consecutive_skips")
        if self.grad_clip is not None and not self.grad_clip > 0:  # NaN fails it too
            _bad(f"{self.KEY}.grad_clip", self.grad_clip, "must be > 0 or null")


@dataclass(frozen=True)
class EvalSettings:
    """model.eval: held-out evaluation (validation and test).

    Args:
        samples: n answers sampled per held-out prompt.
        k: k of pass@k (<= samples).
        temperature: evaluation sampling temperature. Everything else of the sampling is the
            training rollout's (`model.rollout`: top_p, max_new_tokens, stop strings).
    """

    samples: int = 8
    k: int = 8
    temperature: float = 1.0

    KEY = "model.eval"

    def __post_init__(self) -> None:
        _at_least_one(self, self.KEY, "samples", "k")
        if self.k > self.samples:
            _bad(f"{self.KEY}.k", self.k, f"must be <= {self.KEY}.samples={self.samples}")
        if not 0 < self.temperature < math.inf:  # NaN fails it too
            _bad(f"{self.KEY}.temperature", self.temperature, "must be a finite number > 0")


@dataclass(frozen=True)
class SystemSettings:
    """model.system: memory and speed switches; none of them changes the math.

    Args:
        fsdp_mixed_precision: with `ModelParallelStrategy` (FSDP2) only: "bf16" gathers
            parameters in bf16 for compute and reduces gradients in fp32, while the sharded
            master weights keep `dtype` (null = compute in `dtype`).
        activation_checkpointing: recompute decoder-layer activations in backward (any strategy).
        rollout_gather: with FSDP2 only: "once" keeps parameters gathered for a whole rollout
            (one all-gather per layer per rollout), "per_forward" gathers at every decoding step.
        shared_prompt: in the training and no-grad log-prob forwards, run each group's prompt
            once per micro-batch and only the response tokens per sample, on the prompt's KV
            cache repeated over the group (same math, fewer FLOPs). Off = one forward over
            prompt+response per row. null (default) = on for CPU, off on GPU, where it
            measured faster and slower respectively (docs/benchmarks.md). Ignored (off) with
            activation_checkpointing.
        skip_padding: cut micro-batches from the rows sorted by length (each prompt group a
            block) and trim each to its own extent, so no forward computes padding
            (`lit_covrl.packing`; measured in docs/benchmarks.md). The same math; on the CPU not bit-identical across
            micro_batch_size (right-trimming changes the attention kernel's rounding).
            null (default) = on for CUDA, off on the CPU.
        compile_update: run the policy forward of the update's log-prob/entropy passes (training,
            and the no-grad old/reference passes) through `torch.compile` with dynamic shapes,
            compiled once per model (`lit_covrl.compiled`). The same math to float rounding.
            Off by default until a GPU measurement says it pays (docs/scaling.md). Not with
            activation_checkpointing, shared_prompt: true, FSDP2 or several processes (untested
            combinations, refused at start-up); shared_prompt null resolves to off with it.
    """

    fsdp_mixed_precision: str | None = None
    activation_checkpointing: bool = False
    rollout_gather: str = "once"
    shared_prompt: bool | None = None
    skip_padding: bool | None = None
    compile_update: bool = False

    KEY = "model.system"

    def shared_prompt_for(self, device_type: str) -> bool:
        """`shared_prompt` resolved for a device type ("cpu", "cuda", ...): null = on for the CPU,
        off elsewhere; always off under activation_checkpointing and with compile_update."""
        if self.activation_checkpointing or self.compile_update:
            return False
        return device_type == "cpu" if self.shared_prompt is None else bool(self.shared_prompt)

    def skip_padding_for(self, device_type: str) -> bool:
        """`skip_padding` resolved for a device type: null = on for CUDA only (on the CPU it would
        break bit-level micro-batch invariance, and the configs use one micro-batch anyway)."""
        return device_type == "cuda" if self.skip_padding is None else bool(self.skip_padding)

    def __post_init__(self) -> None:
        if self.fsdp_mixed_precision is not None and self.fsdp_mixed_precision not in MIXED_PRECISION:
            _bad(f"{self.KEY}.fsdp_mixed_precision", self.fsdp_mixed_precision, f"valid: {sorted(MIXED_PRECISION)} or null")
        if self.rollout_gather not in ROLLOUT_GATHER:
            _bad(f"{self.KEY}.rollout_gather", self.rollout_gather, f"valid: {list(ROLLOUT_GATHER)}")
        if not isinstance(self.compile_update, bool):
            _bad(f"{self.KEY}.compile_update", self.compile_update, "must be true or false")
        if self.compile_update:
            for name, on in (("activation_checkpointing", self.activation_checkpointing),
                             ("shared_prompt", self.shared_prompt is True)):
                if on:
                    _bad(f"{self.KEY}.compile_update", True,
                         f"not supported with {self.KEY}.{name}=true (untested combination); turn one of them off")


GROUPS = {"rollout": RolloutSettings, "loss": LossSettings, "update": UpdateSettings,
          "eval": EvalSettings, "system": SystemSettings}

# old flat key -> new key (the flat keys of GRPOModule before the groups)
MOVED_KEYS = {
    **{f: f"rollout.{f}" for f in (
        "group_size", "max_new_tokens", "temperature", "top_p", "stop", "max_prompt_length", "prompt_overflow",
        "chat_template", "filter_groups", "max_gen_rounds", "overlong", "overlong_reward")},
    **{f: f"loss.{f}" for f in ("advantage", "clip_low", "clip_high", "dual_clip", "logratio_clamp", "loss_agg_mode")},
    **{f: f"update.{f}" for f in (
        "mini_batch_size", "micro_batch_size", "ppo_epochs", "grad_clip", "logprob_chunk_size",
        "max_consecutive_skips", "recompute_logprobs")},
    "val_samples": "eval.samples", "val_k": "eval.k", "val_temperature": "eval.temperature",
    **{f: f"system.{f}" for f in ("fsdp_mixed_precision", "activation_checkpointing", "rollout_gather",
                                  "shared_prompt", "skip_padding")},
}


def moved_key_hint(key: str) -> str | None:
    """For an old flat key, the one-line hint `model.group_size moved to model.rollout.group_size`;
    None for any other key."""
    new = MOVED_KEYS.get(key)
    return None if new is None else f"model.{key} moved to model.{new}"


def as_group(cls, value):
    """`value` as the settings group `cls`: the dataclass itself, a plain dict of its keys, or None
    (the defaults). An unknown key is an error naming the full key (and the new place of an old one)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{cls.KEY} must be a {cls.__name__} or a dict of its keys, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in names:
            old = MOVED_KEYS.get(key)
            hint = f" ({key} is model.{old})" if old else ""
            raise ValueError(f"{cls.KEY}.{key} is not a setting{hint}; valid: {sorted(names)}")
    return cls(**value)
