"""Generation and scoring: prompts -> n sampled responses per prompt (a `Rollout`) -> rewards.

`RolloutGenerator` has explicit inputs: the tokenizer, the sampler (`lit_covrl.sampling`), the
reward set (`lit_covrl.reward_set`) and the rollout settings (`model.rollout`). It knows nothing
of Lightning: the policy, the device and the sampler's random generator come with each call.
GRPOModule builds one on first use and calls it for training rollouts (`generate` then `score`)
and, through its `generate` / `score` methods, for held-out evaluation.

A prompt is encoded (chat template, length limit, left padding), repeated n times (rows
prompt-major: row i belongs to prompt i // n), sampled with the policy in eval mode (no dropout
in RL: the rollout policy is the trained one), cut after the first stop string, and decoded.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lit_covrl import distributed
from lit_covrl.policy import learned_position_limit
from lit_covrl.prompts import encode_prompts
from lit_covrl.reward_set import RewardSet
from lit_covrl.sampling import Sampler
from lit_covrl.settings import RolloutSettings
from lit_covrl.sharding import gathered_for_rollout
from lit_covrl.stopping import eos_token_ids, truncate_at_stop_strings
from lit_covrl.types import Rollout

log = logging.getLogger(__name__)


class RolloutGenerator:
    """Sample responses and score them.

    Args:
        tokenizer: the policy's tokenizer (encodes prompts, decodes responses, pad id).
        sampler: draws the responses and records their log-probs and entropy.
        rewards: the weighted reward functions.
        settings: `model.rollout` (max_new_tokens, top_p, stop strings, prompt encoding).
        gather_once: under FSDP2, keep the parameters gathered for the whole rollout
            (`model.system.rollout_gather: once`).
        reward_timeout_s: per-item time limit of the reward functions (null = none).
    """

    def __init__(self, tokenizer, sampler: Sampler, rewards: RewardSet, settings: RolloutSettings, *,
                 gather_once: bool, reward_timeout_s: float | None) -> None:
        self.tokenizer, self.sampler, self.rewards, self.settings = tokenizer, sampler, rewards, settings
        self.gather_once, self.reward_timeout_s = gather_once, reward_timeout_s
        self._warned_context = False  # a rollout past the model's trained context was warned about

    def _warn_past_context(self, policy: nn.Module, positions: int) -> None:
        """Warn once when a rollout may run past `max_position_embeddings` of a model without a
        position table (rotary, ALiBi): it runs, but past the context it was trained on it degrades."""
        context = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
        if self._warned_context or not isinstance(context, int) or positions <= context:
            return
        self._warned_context = True
        log.warning("a prompt of this rollout + model.rollout.max_new_tokens=%d need up to %d positions, past the "
                    "model's max_position_embeddings=%d (the context it was trained on): its output degrades there; "
                    "shorten the prompts (model.rollout.max_prompt_length with prompt_overflow: truncate_left) or "
                    "max_new_tokens (warned once)", self.settings.max_new_tokens, positions, context)

    def generate(self, policy: nn.Module, prompts: list, n: int, *, temperature: float,
                 generator: torch.Generator, device: torch.device) -> Rollout:
        """Sample n responses per prompt (rows prompt-major: row i belongs to prompt i // n)."""
        tok, ro = self.tokenizer, self.settings
        ids, mask = encode_prompts(
            tok, prompts, chat_template=ro.chat_template,
            max_prompt_length=ro.max_prompt_length, overflow=ro.prompt_overflow,
        )
        longest, limit = int(mask.sum(1).max()), learned_position_limit(policy)
        if limit is not None and longest + ro.max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens + model.rollout.max_new_tokens={ro.max_new_tokens} need more "
                             f"than the {limit} positions the model's position table holds: lower max_new_tokens "
                             "or set model.rollout.max_prompt_length")
        self._warn_past_context(policy, longest + ro.max_new_tokens)
        ids, mask = ids.repeat_interleave(n, 0).to(device), mask.repeat_interleave(n, 0).to(device)
        policy.eval()  # no dropout anywhere in RL: the rollout policy must equal the trained one
        try:
            with gathered_for_rollout(policy, self.gather_once):
                out = self._sample_in_batches(policy, ids, mask, temperature, generator)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"out of memory while sampling {ids.shape[0]} sequences of up to {ids.shape[1]} + "
                f"{ro.max_new_tokens} tokens. Set model.rollout.sampling_batch_size, or lower data.batch_size, model.rollout.group_size or "
                "model.rollout.max_new_tokens (or model.eval.samples / data.val_batch_size during validation)."
            ) from err
        if ro.stop:
            truncate_at_stop_strings(out, tok, ids.shape[1], ro.stop, tok.pad_token_id)
        out.completions = tok.batch_decode(out.input_ids[:, ids.shape[1]:], skip_special_tokens=True)
        return out

    def _sample_in_batches(self, policy: nn.Module, ids: Tensor, mask: Tensor, temperature: float,
                           generator: torch.Generator) -> Rollout:
        """`sample` over consecutive batches of `sampling_batch_size` rows, joined (all rows at once
        when it is null or not smaller). Every rank makes as many sampler calls as the rank with the
        most rows needs (the decoding steps are collectives under several ranks): one whose rows ran
        out (a held-out batch that does not split evenly) samples its first rows again, discarded.
        Every rank holds at least one row."""
        size, n = self.settings.sampling_batch_size, ids.shape[0]
        most = distributed.all_max_int(n)
        if size is None or most <= size:
            return self.sample(policy, ids, mask, temperature, generator)
        parts = []
        for i in range(0, most, size):
            if i < n:
                parts.append(self.sample(policy, ids[i:i + size], mask[i:i + size], temperature, generator))
            else:  # keeps this rank in step with the others; not part of its rollout
                self.sample(policy, ids[:size], mask[:size], temperature, generator)
        return join_rollouts(parts, self.tokenizer.pad_token_id)

    def sample(self, policy: nn.Module, ids: Tensor, mask: Tensor, temperature: float,
               generator: torch.Generator) -> Rollout:
        """The sampler's draw for encoded, left-padded prompts ids/mask [N, P]."""
        tok, ro = self.tokenizer, self.settings
        return self.sampler.sample(
            policy, ids, mask, max_new_tokens=ro.max_new_tokens,
            eos_token_id=eos_token_ids(policy, tok),  # every EOS id of the generation config
            pad_token_id=tok.pad_token_id, temperature=temperature, top_p=ro.top_p,
            generator=generator, all_done=distributed.all_true,
        )

    def score(self, completions: list[str], answers: list[str], prompts: list | None = None,
              columns: list[dict] | None = None, *, device: torch.device,
              counted: bool = True) -> tuple[Tensor, dict[str, float]]:
        """Weighted total reward per completion, and, over all ranks, `rollout/reward_errors` (count)
        and each reward's mean as `rollout/reward/<name>`. prompts/columns: per completion.
        counted=False: this rank scores only to keep in step with the others (held-out evaluation's
        rank with an empty share); its items are left out of the statistics.
        A rewards error that stops the run (not an item-level fault) stops it on every rank: the
        others learn of it in the sum below instead of waiting in it for the collective timeout."""
        try:
            total, per_name, res = self.rewards.score(completions, answers, prompts, columns,
                                                      timeout_s=self.reward_timeout_s)
            failure, errors = None, res.errors + res.timeouts + res.invalid
        except Exception as e:
            if distributed.world_size() == 1:
                raise
            failure, errors = e, 0
            total, per_name = [], {name: [] for name in self.rewards.names}
        mine = [sum(v) for v in per_name.values()] + [len(total), errors] if counted else [0.0] * (len(per_name) + 2)
        sums = distributed.all_sum(torch.tensor(mine + [failure is not None], dtype=torch.float64, device=device)).tolist()
        if failure is not None:
            raise failure
        if sums[-1]:
            raise RuntimeError(f"scoring failed on {int(sums[-1])} other rank(s) (their logs say why); stopping this one too")
        stats = {"rollout/reward_errors": sums[-2]}  # over all ranks, like the means
        stats.update({f"rollout/reward/{k}": v / max(sums[-3], 1.0) for k, v in zip(per_name, sums)})
        return torch.tensor(total, dtype=torch.float32, device=device), stats

    def penalize_overlong(self, rollout: Rollout, rewards: Tensor) -> Tensor:
        """Under `overlong: penalize`, a truncated response's reward := `overlong_reward`."""
        if self.settings.overlong != "penalize":
            return rewards
        return torch.where(rollout.truncated, torch.full_like(rewards, self.settings.overlong_reward), rewards)


def join_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rollouts of the same prompt width stacked row-wise, responses right-padded to the longest
    (pad token, masks and recorded values 0 in the padding)."""
    T = max(p.response_mask.shape[1] for p in parts)

    def right(x: Tensor, width: int, value) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    def cat(get, value) -> Tensor:
        return torch.cat([right(get(p), get(p).shape[1] + T - p.response_mask.shape[1], value) for p in parts])

    return Rollout(
        input_ids=cat(lambda p: p.input_ids, pad_token_id),
        attention_mask=cat(lambda p: p.attention_mask, 0),
        response_mask=cat(lambda p: p.response_mask, 0),
        logp=cat(lambda p: p.logp, 0.0),
        entropy=cat(lambda p: p.entropy, 0.0),
        truncated=torch.cat([p.truncated for p in parts]),
        nonfinite=torch.cat([p.nonfinite for p in parts]),
    )
