"""The batch one RL step trains on, a mixin of `GRPOModule` (`lit_covrl.module`): the generation
rounds (one, or more under dynamic sampling) and their scores, the rows kept (DAPO's group filter,
`overlong: mask`), the old log-probs (the training forward's with `recompute_logprobs`), the
advantages (with a regularizer's outcome terms on the rewards or advantages, OutcomeExploration's;
or a regularizer's in place of the estimator's, DCPOAdvantage's),
and a drawing regularizer's extra responses in the first rows (`lit_covrl.control_rows`,
AEPO's). `training_step` calls `_sample_batch`, then `_trained_batch`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl import guards
from lit_covrl.algorithms import (compute_advantages, group_centered, likelihood_ranks, sequence_logprob_means,
                                  zero_variance_groups)
from lit_covrl.control_rows import drawing_regularizer, splice_control_rows
from lit_covrl.dynamic_sampling import Round, sample_rounds
from lit_covrl.metrics import PhaseTimer
from lit_covrl.types import PromptBatch, Rollout


class StepBatch:
    """`GRPOModule`'s rollout-to-batch part (settings, learner, generate and score are the module's)."""

    def _trained_batch(
        self, sampled: Round, timer: PhaseTimer,
    ) -> tuple[tuple[Rollout, Tensor, Tensor], Tensor, Tensor, Tensor | None, Tensor | None]:
        """The update's (rollout, advantages, keep), with a drawing regularizer's extra responses
        in its first rows (AEPO's); then, for the metrics, the rollout's own advantages, its
        zero-variance groups, and the unlikeliness reward's sequence log-probs and ranks (or None)."""
        cfg, G, rollout, rewards = self.settings, self.settings.rollout.group_size, sampled.rollout, sampled.rewards
        zero_var = zero_variance_groups(rewards, G)
        for reg in self.regularizers:  # RLZVP's all-equal groups and their sign
            reg.observe_rewards(rewards, G)
        keep = ~zero_var if cfg.rollout.filter_groups else torch.ones_like(zero_var)
        if cfg.rollout.overlong == "mask":
            keep = keep & ~rollout.truncated
        drawing = drawing_regularizer(self.regularizers)
        # a drawing regularizer's splice recomputes the batch (and the rollout rows it keeps) itself:
        # a first pass over the rollout only where the unlikeliness reward ranks by its log-probs
        first_pass = self.recompute_logprobs_on and (drawing is None or bool(cfg.loss.unlikeliness))
        if first_pass:  # old log-probs from the training forward instead of the sampler
            with timer("old_logp"):  # in the update's micro-batches (so its first ratio is exactly 1)
                self.learner.recompute_old_logprobs(rollout, keep)
        # after the recomputation: the unlikeliness reward ranks by the old log-probs trained against
        seq_logp = sequence_logprob_means(rollout.logp, rollout.response_mask) if cfg.loss.unlikeliness else None
        ranks = likelihood_ranks(seq_logp, G) if cfg.loss.unlikeliness else None  # the advantages' and metrics'
        outcome = self._outcome_regularizer()
        shift = self._outcome_shift(outcome, sampled) if outcome is not None else None
        on_rewards = shift is not None and outcome.apply == "reward"
        shaped = (rewards.double() + shift).to(rewards.dtype) if on_rewards else rewards
        replacing = next((r for r in self.regularizers if r.replaces_advantages), None)  # DCPOAdvantage's
        if replacing is not None:
            advantages = replacing.step_advantages(self.global_step, sampled.batch.prompts, shaped, G, keep=keep)
        else:
            advantages = compute_advantages(shaped, G, cfg.loss.advantage, baseline_quantile=cfg.loss.baseline_quantile,
                                            pass_k=cfg.loss.pass_k, unlikeliness=cfg.loss.unlikeliness,
                                            seq_logp=seq_logp, ranks=ranks)
        if shift is not None and outcome.apply == "advantage":
            advantages = (advantages.double() + group_centered(shift, G)).to(advantages.dtype)
        trained = (rollout, advantages, keep)
        if drawing is not None:
            trained = splice_control_rows(self, drawing, sampled.batch, *trained, timer,
                                          recompute_rollout=self.recompute_logprobs_on and not first_pass)
        return trained, advantages, zero_var, seq_logp, ranks

    def _outcome_regularizer(self):
        """The one regularizer that shapes outcomes (`shapes_outcome`; `check_stack` refuses two), or None."""
        return next((r for r in self.regularizers if r.shapes_outcome), None)

    def _outcome_shift(self, reg, sampled: Round) -> Tensor:
        """The outcome-shaping regularizer's terms of this rank's rows (OutcomeExploration's): by
        each response's final answer, correct meaning a score >= correct_threshold."""
        scores = sampled.scores if sampled.scores is not None else sampled.rewards
        correct = (scores >= self.hparams.correct_threshold).cpu()
        return reg.outcome_shift(self.global_step, sampled.batch.prompts, sampled.rollout.completions, correct,
                                 self.settings.rollout.group_size).to(sampled.rewards.device)

    def _generation_round(self, batch: PromptBatch, timer: PhaseTimer) -> tuple[Round, dict[str, float]]:
        rollout, rewards, scores, reward_stats = self.generate_scored(
            batch, timer, temperature=self.settings.rollout.temperature)
        timer.count("rollout_tokens", rollout.response_mask.sum())  # every round's, for rollout/tokens_per_s
        outcome = self._outcome_regularizer()
        if outcome is not None:  # every round's answers, chosen for the batch or not (a collective per round)
            outcome.count_outcomes(self.global_step, batch.prompts, rollout.completions, self.settings.rollout.group_size)
        return Round(batch, rollout, rewards, scores), reward_stats

    def generate_scored(self, batch: PromptBatch, timer: PhaseTimer, *, temperature: float, phase: str = "",
                        counted: bool = True) -> tuple[Rollout, Tensor, Tensor, dict[str, float]]:
        """group_size responses per prompt of `batch` at `temperature` with the rollout generator
        (timed as `<phase>rollout`), stopped on non-finite logits, scored (`<phase>score`,
        `score_rollout`): (rollout, rewards, scores, reward metrics)."""
        with timer(f"{phase}rollout"):
            rollout = self.generate(batch.prompts, self.settings.rollout.group_size, temperature=temperature,
                                    generator=self.rollout_generator)
        guards.stop_on_nonfinite_logits(rollout, step=self.global_step, rank=self.global_rank, trainer=self._trainer)
        with timer(f"{phase}score"):
            rewards, scores, reward_stats = self.score_rollout(batch, rollout, counted=counted)
        return rollout, rewards, scores, reward_stats

    def score_rollout(self, batch: PromptBatch, rollout: Rollout,
                      counted: bool = True) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(rewards, scores, reward metrics) of `rollout`'s group_size responses per prompt of
        `batch`: the scores as the reward functions give them, the rewards after the overlong penalty."""
        G = self.settings.rollout.group_size
        answers, prompts, columns = ([x for x in xs for _ in range(G)]
                                     for xs in (batch.answers, batch.prompts, batch.columns))
        scores, reward_stats = self.score(rollout.completions, answers, prompts, columns, counted=counted)
        return self.generation.penalize_overlong(rollout, scores), scores, reward_stats

    def _sample_batch(self, batch: PromptBatch, timer: PhaseTimer) -> tuple[Round, dict[str, float]]:
        """One generation round; under dynamic sampling (`filter_groups` with `max_gen_rounds` > 1)
        more rounds of fresh prompts (`lit_covrl.dynamic_sampling.sample_rounds`)."""
        ro = self.settings.rollout
        rounds = ro.max_gen_rounds if ro.filter_groups else 1
        return sample_rounds(
            batch, lambda b: self._generation_round(b, timer),
            lambda r: self.trainer.datamodule.regen_batch(batch.index, r, rounds),
            group_size=ro.group_size, max_rounds=rounds, pad_token_id=self.tokenizer.pad_token_id,
        )
