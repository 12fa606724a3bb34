"""Extra responses a regularizer draws for the update (`Regularizer.draws_rollout`; AEPO's).

Before the update, the regularizer names how many of this rank's first prompts get group_size
more responses and at which temperature (`rollout_request`); they are sampled with the rollout
generator, scored like the rollout, given the run's advantages over their own groups (its
estimator and baseline; without the unlikeliness reward, which ranks by the rollout's log-probs),
and the regularizer chooses some (`choose_extra`). The k chosen on a rank take the place of its first k
rollout rows (so the batch keeps its size and its mini-batches), with advantage 1 and kept; the
old log-probs and entropies of the whole spliced batch are then recomputed by the training
forward (the extra responses were drawn at another temperature; the rollout's own rows get the
training forward's values, as with `recompute_logprobs`). The rollout's metrics stay the
rollout's own; the update, the reference log-probs and the regularizers see the spliced batch.
With `recompute_logprobs` the rollout is not forwarded a second time for them: the rows the
splice keeps take the spliced batch's values, the k it replaced are forwarded alone (N + k rows
in all; 2N with the unlikeliness reward, which ranks by the rollout's recomputed log-probs first).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import compute_advantages
from lit_covrl.dynamic_sampling import concat_rollouts
from lit_covrl.types import PromptBatch, Rollout


def drawing_regularizer(regularizers: list):
    """The one regularizer that draws extra responses, or None (`check_stack` refuses two)."""
    return next((r for r in regularizers if r.draws_rollout), None)


def splice_control_rows(module, reg, batch: PromptBatch, rollout: Rollout, advantages: Tensor, keep: Tensor,
                        timer, recompute_rollout: bool = False) -> tuple[Rollout, Tensor, Tensor]:
    """(rollout, advantages, keep) of the update with `reg`'s chosen extra responses in place of
    this rank's first rollout rows; the inputs themselves when it draws none this step. With
    `recompute_rollout` (`recompute_logprobs`, its first pass left to this) the rollout's own
    log-probs and entropies become the training forward's too, in one pass with the splice's:
    its rows the splice keeps take their values from the spliced batch's recompute, the rows
    it replaced are forwarded on their own; the whole rollout when nothing is spliced."""
    request = reg.rollout_request(module.global_step, len(batch))
    if request is None:
        return _unspliced(module, rollout, advantages, keep, timer, recompute_rollout)
    n, temperature = request
    # scored like the rollout, left out of its reward statistics
    extra, rewards, _, _ = module.generate_scored(
        PromptBatch(batch.prompts[:n], batch.answers[:n], batch.index, batch.columns[:n]), timer,
        temperature=temperature, phase="control_", counted=False)
    ro, loss = module.settings.rollout, module.settings.loss
    adv = compute_advantages(rewards, ro.group_size, loss.advantage, baseline_quantile=loss.baseline_quantile,
                             pass_k=loss.pass_k)
    if ro.overlong == "mask":  # a truncated response is never trained on
        adv = adv.masked_fill(extra.truncated, float("-inf"))
    chosen = reg.choose_extra(adv)
    if distributed.all_max_int(int(chosen.any())) == 0:  # none on any rank: the rollout as sampled
        return _unspliced(module, rollout, advantages, keep, timer, recompute_rollout)
    spliced = _splice(module, extra, chosen, rollout, advantages, keep, timer)
    if recompute_rollout:
        with timer("old_logp"):
            _rollout_values_from(module.learner, rollout, spliced[0], int(chosen.sum()))
    return spliced


def _unspliced(module, rollout: Rollout, advantages: Tensor, keep: Tensor, timer,
               recompute: bool) -> tuple[Rollout, Tensor, Tensor]:
    if recompute:
        with timer("old_logp"):
            module.learner.recompute_old_logprobs(rollout, keep)
    return rollout, advantages, keep


def _rollout_values_from(learner, rollout: Rollout, spliced: Rollout, k: int) -> None:
    """The rollout's training-forward log-probs and entropies (its metrics'): rows k.. are rows
    k.. of the spliced batch (responses padded to its width), the k rows it replaced a forward
    of their own (on every rank, in lock-step, k may be 0)."""
    T = rollout.logp.shape[1]
    logp, entropy = spliced.logp[:, :T].clone(), spliced.entropy[:, :T].clone()
    out = learner.policy_stats(rollout, torch.arange(k, device=logp.device))
    logp[:k], entropy[:k] = out.logp, out.entropy
    rollout.logp, rollout.entropy = logp, entropy


def _splice(module, extra: Rollout, chosen: Tensor, rollout: Rollout, advantages: Tensor, keep: Tensor,
            timer) -> tuple[Rollout, Tensor, Tensor]:
    rows = torch.nonzero(chosen).squeeze(-1)
    k, n = len(rows), len(keep)
    assert k <= n, f"{k} extra responses chosen for a rollout of {n} rows"
    rest = torch.arange(k, n, device=rows.device)
    # both widths are the same on every rank (decoding runs in lock-step), so the spliced one is too
    width = max(rollout.response_mask.shape[1], extra.response_mask.shape[1])
    G = module.settings.rollout.group_size

    def with_prompts(r: Rollout) -> Rollout:  # each row keeps the prompt it answers
        return dataclasses.replace(r, prompt_index=r.prompt_of(torch.arange(len(r.truncated), device=rows.device), G))

    spliced = concat_rollouts([(with_prompts(extra), rows), (with_prompts(rollout), rest)],
                              module.tokenizer.pad_token_id, width)
    advantages = torch.cat([torch.ones(k, dtype=advantages.dtype, device=advantages.device), advantages[k:]])
    keep = torch.cat([torch.ones(k, dtype=torch.bool, device=keep.device), keep[k:]])
    with timer("old_logp"):  # at the training temperature, in the update's micro-batches
        module.learner.recompute_old_logprobs(spliced, keep)
    return spliced, advantages, keep
