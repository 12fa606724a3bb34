"""GRPOModule: the LightningModule that owns the policy (and, when asked, the reference model)
and runs one RL step per `training_step`, with manual optimization:

  rollout (G samples per prompt; more rounds under dynamic sampling) -> score -> advantages
  -> [a regularizer's extra responses spliced into the first rows (`control_rows`, AEPO's)]
  -> [reference log-probs] -> `Learner.update`: for each epoch, for each mini-batch, the
     regularizers select over the whole mini-batch, micro-batches accumulate the gradients of
     the loss written in `Learner.loss`, one optimizer step -> log.
Generation and scoring are a `RolloutGenerator` (`lit_covrl.generation`), held-out evaluation
an `Evaluator`; the module only wires these pieces to Lightning. Its set-up hooks (tokenizer,
models, start-up checks, optimizer) are the mixin `lit_covrl.setup_hooks.SetupHooks`, its
validation and test hooks `lit_covrl.evaluation.EvaluationHooks`, the batch one RL step trains on
(generation rounds, scores, kept rows, old log-probs, advantages, a regularizer's extra rows)
`lit_covrl.step_batch.StepBatch`.

`trainer.global_step` counts RL steps (rollouts), not optimizer updates: only the last update of
a rollout goes through Lightning's optimizer wrapper. So `trainer.max_steps`, schedules and the
TensorBoard x-axis are all in rollouts, as in the papers.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_covrl import distributed, guards, resume_check
from lit_covrl.data import TASK_CHECK_SAMPLES
from lit_covrl.drivers import LightningDriver
from lit_covrl.evaluation import EvaluationHooks, Evaluator
from lit_covrl.generation import RolloutGenerator
from lit_covrl.learner import Learner, LearnerSettings
from lit_covrl.metrics import (PassAtK, PhaseTimer, as_floats, peak_memory_gib, publish_step_metrics, rollout_metrics,
                               unlikeliness_metrics)
from lit_covrl.objectives import Objective, resolve_objective
from lit_covrl.policy import absolute_local_path, resolve_dtype
from lit_covrl.progress import fit_end_message
from lit_covrl.prompts import PromptTooLongError
from lit_covrl.regularizers.base import Regularizer
from lit_covrl.reward_set import RewardSet
from lit_covrl.rewards import ExactMatchReward
from lit_covrl.rollout_rng import RolloutRNG
from lit_covrl.sampling import Sampler, default_sampler
from lit_covrl.settings import (
    GROUPS, EvalSettings, LossSettings, RolloutSettings, SystemSettings, UpdateSettings, as_group,
)
from lit_covrl.settings_checks import check_module_settings, check_passk_reward_weights, check_resume_length
from lit_covrl.setup_hooks import SetupHooks
from lit_covrl.step_batch import StepBatch
from lit_covrl.types import PromptBatch, Rollout

# the policy is kept in eval mode on purpose (no dropout in RL: rollout policy == trained policy)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# Lightning warns (with a code listing) that under manual optimization a checkpoint holds the weights
# after the optimizer step: for an RL step that is the state to save (the rollout's updates are done)
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")


@dataclasses.dataclass(frozen=True)
class ModuleSettings:
    """GRPOModule's settings groups as typed objects (`self.settings.rollout.group_size`)."""

    rollout: RolloutSettings
    loss: LossSettings
    update: UpdateSettings
    eval: EvalSettings
    system: SystemSettings


class GRPOModule(SetupHooks, EvaluationHooks, StepBatch, L.LightningModule):
    def __init__(
        self,
        model: str = "lit_covrl:tiny-arith",
        tokenizer: str | None = None,
        reference_model: str | None = None,
        dtype: str = "float32",
        reward: list[Callable] | Callable | None = None,
        reward_weights: list[float] | None = None,
        reward_timeout_s: float | None = 10.0,
        correct_threshold: float = 1.0,
        objective: Objective | None = None,
        sampler: Sampler | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        rollout: RolloutSettings = RolloutSettings(),
        loss: LossSettings = LossSettings(),
        update: UpdateSettings = UpdateSettings(),
        eval: EvalSettings = EvalSettings(),
        system: SystemSettings = SystemSettings(),
    ) -> None:
        """
        Args:
            model: Hugging Face hub name, local directory, `.gguf` file, `package:<pkg>/<file>`, or
                `lit_covrl:tiny-arith` (the shipped tiny model).
            tokenizer: tokenizer name/path if it differs from `model` (of the same vocabulary as
                `model`'s own tokenizer, when that folder has one).
            reference_model: frozen reference for ReferenceKL; null = a copy of `model`'s weights.
                Loaded only when a regularizer needs it; its own tokenizer, if it has one, must have
                the policy tokenizer's vocabulary.
            dtype: parameter dtype: float32, bfloat16 or float16. Train float32 weights (with
                trainer.precision: bf16-mixed for bf16 compute): bfloat16 weights lose updates
                below ~1/256 of a weight (a warning says how many), float16 ones refuse Adam-style
                optimizers (their state underflows); both are fine to evaluate.
            reward: a reward function, or a list of them (summed with `reward_weights`): dotted
                path of a function, `class_path` (+ `init_args`) of a class, item-level or
                batched (see `lit_covrl.reward_set`); default exact match.
            reward_weights: one weight per reward (null = all 1.0); with advantage passk or the
                unlikeliness reward, 1 for one reward and 0 for any others.
            reward_timeout_s: per-item time limit of the reward function (null = none); a
                batched reward gets this times its number of items.
            correct_threshold: a response counts as correct (accuracy, pass@k) if reward >= this
                (its reward as scored, before an overlong penalty).
            objective: the policy objective (`class_path`: lit_covrl.objectives.PPOClip, GSPO,
                CISPO, CEGPPO or ASPO). null = PPOClip with the clip settings of `loss`, which must stay at their
                defaults when an objective is given.
            sampler: the rollout and validation sampler (`class_path`: lit_covrl.sampling.KVCacheSampler
                or StaticCacheSampler). null = the fastest measured for the device
                (`lit_covrl.sampling.default_sampler`: StaticCacheSampler with a compiled decoding
                step on CUDA, KVCacheSampler on CPU; docs/scaling.md).
            optimizer: optimizer factory (`class_path` + `init_args`), default AdamW(lr=1e-5).
            lr_scheduler: LR scheduler factory, stepped once per RL step.
            seed: seed of the rollout sampler (offset by rank).
            trust_remote_code: run the modeling code a model folder or hub model ships (`auto_map`
                in its config.json) when loading the model, tokenizer and reference, and in export.
                Off: such a model is refused at start-up. That code runs with your rights.
            rollout: sampling and filtering (`lit_covrl.settings.RolloutSettings`).
            loss: advantages and the loss (`lit_covrl.settings.LossSettings`).
            update: optimizer updates per rollout (`lit_covrl.settings.UpdateSettings`).
            eval: held-out evaluation (`lit_covrl.settings.EvalSettings`).
            system: memory and speed switches (`lit_covrl.settings.SystemSettings`).

        Each group may also be given as a plain dict of its keys (`rollout={"group_size": 4}`).
        """
        super().__init__()
        # a local folder by its absolute path in the hparams: checkpoints are read from elsewhere
        model, tokenizer, reference_model = (absolute_local_path(x) for x in (model, tokenizer, reference_model))
        groups = {name: as_group(cls, value) for (name, cls), value in
                  zip(GROUPS.items(), (rollout, loss, update, eval, system))}
        check_module_settings(groups["rollout"], groups["loss"], reward_timeout_s, correct_threshold)
        self.settings = ModuleSettings(**groups)
        # hparams (and so checkpoints) hold the groups as plain dicts: they load with weights_only
        # and `load_from_checkpoint` passes them back as dicts
        rollout, loss, update, eval, system = (dataclasses.asdict(g) for g in groups.values())
        self.save_hyperparameters(ignore=["reward", "optimizer", "lr_scheduler", "objective", "sampler"])
        self.automatic_optimization = False
        self.objective = resolve_objective(objective, self.settings.loss)
        self.reward = reward if reward is not None else ExactMatchReward()
        rewards = self.reward if isinstance(self.reward, (list, tuple)) else [self.reward]
        self.rewards = RewardSet(rewards, reward_weights)
        check_passk_reward_weights(self.settings.loss, self.rewards.weights, reward_weights)
        self._sampler = sampler  # null: chosen for the device at the first rollout
        self._generation: RolloutGenerator | None = None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        resolve_dtype(dtype)
        self._tokenizer = None  # loaded on first use: instantiating a config touches no files
        self.policy: torch.nn.Module | None = None
        self._reference = None  # plain attribute: frozen, never saved in checkpoints
        self.val_pass = PassAtK(self.settings.eval.k)  # a child module: Lightning places it and syncs it
        self.evaluator = Evaluator(self.generate, self.score, self.val_pass, self.settings.eval,
                                   correct_threshold=correct_threshold, seed=seed)
        self.rollout_rng = RolloutRNG(seed)
        self._learner: Learner | None = None
        self._restored_skips = (0, 0)  # (skipped_steps, consecutive_skips) of a loaded checkpoint
        self._checkpoint_step: int | None = None  # RL steps taken by the loaded checkpoint's run
        self._resumed_from: dict | None = None  # the restored checkpoint's run description, until on_train_start
        self.configured_schedulers: list[dict] | None = None  # the LR schedulers as configured (resume_check)

    @property
    def learner(self) -> Learner:
        """The policy update (`lit_covrl.learner`), built once the policy is loaded; its device-
        dependent switches follow the module if it moves."""
        resolved = dict(shared_prompt=self.shared_prompt_on, skip_padding=self.skip_padding_on)
        if self._learner is None:
            assert self.policy is not None, "configure_model() must run first"
            cfg = self.settings
            settings = LearnerSettings(cfg.rollout, cfg.loss, cfg.update, compile_update=cfg.system.compile_update,
                                       **resolved)
            self._learner = Learner(self.policy, settings, self.objective, self.regularizers, LightningDriver(self))
            self._learner.skipped_steps, self._learner.consecutive_skips = self._restored_skips
        elif any(getattr(self._learner.settings, k) != v for k, v in resolved.items()):
            self._learner.settings = dataclasses.replace(self._learner.settings, **resolved)
        return self._learner

    @property
    def rollout_generator(self) -> torch.Generator:
        """This rank's rollout sampler generator (`lit_covrl.rollout_rng`)."""
        return self.rollout_rng.generator

    @property
    def skipped_steps(self) -> int:
        """Optimizer updates dropped for a non-finite gradient over the run."""
        return self._skip_counts[0]

    @property
    def _skip_counts(self) -> tuple[int, int]:
        """(skipped_steps, the current run of consecutive skips), both saved in checkpoints."""
        if self._learner is None:
            return self._restored_skips
        return self._learner.skipped_steps, self._learner.consecutive_skips

    @property
    def shared_prompt_on(self) -> bool:
        """`model.system.shared_prompt` resolved for this module's device (null: on for the CPU,
        off on GPU, where it measured slower; `SystemSettings.shared_prompt_for`)."""
        return self.settings.system.shared_prompt_for(self.device.type)

    @property
    def skip_padding_on(self) -> bool:
        """`model.system.skip_padding` resolved for this module's device (null: on for CUDA only)."""
        return self.settings.system.skip_padding_for(self.device.type)

    @property
    def recompute_logprobs_on(self) -> bool:
        """`model.update.recompute_logprobs` resolved (null: on when the policy computes in a
        16-bit float, bfloat16 or float16, where the sampler's log-probs are off by whole rounding
        steps now and then)."""
        precision = str(getattr(self._trainer, "precision", "") if self._trainer is not None else "")
        half = (torch.bfloat16, torch.float16)
        weights = self.policy is not None and any(p.dtype in half for p in self.policy.parameters())
        fsdp = self.settings.system.fsdp_mixed_precision in ("bf16", "fp16")
        return self.settings.update.recompute_for(precision.startswith(("16", "bf16")) or weights or fsdp)

    # setup (set-up hooks: lit_covrl.setup_hooks) -----------------------------------------------
    @property
    def regularizers(self) -> list[Regularizer]:
        if self._trainer is None:
            return []
        return [cb for cb in self.trainer.callbacks if isinstance(cb, Regularizer)]


    # rollout -----------------------------------------------------------------------------------
    @property
    def generation(self) -> RolloutGenerator:
        """Generation and scoring (`lit_covrl.generation`), built on first use (tokenizer, sampler)."""
        if self._generation is None:
            self._generation = self._make_generation(RolloutGenerator)
        return self._generation

    def _make_generation(self, cls: type[RolloutGenerator], **extra) -> RolloutGenerator:
        return cls(self.tokenizer, self.sampler, self.rewards, self.settings.rollout,
                   gather_once=self.settings.system.rollout_gather == "once",
                   reward_timeout_s=self.hparams.reward_timeout_s, **extra)

    @property
    def sampler(self) -> Sampler:
        if self._sampler is None:
            self._sampler = default_sampler(self.device, self.policy)
        return self._sampler

    def generate(self, prompts: list[str], n: int, *, temperature: float, generator: torch.Generator) -> Rollout:
        """Sample n responses per prompt with the policy (rows prompt-major: row i belongs to prompt i // n)."""
        try:
            return self.generation.generate(self.policy, prompts, n, temperature=temperature, generator=generator,
                                            device=self.device)
        except PromptTooLongError as err:
            if self._trainer is None or not self.trainer.training:
                raise
            # only a task's generated prompts get here: start-up checks every prompt of the data files
            raise PromptTooLongError(
                f"{err}. It was drawn at RL step {self.global_step} (start-up checks a sample of "
                f"{TASK_CHECK_SAMPLES} of a task's prompts); the run is stopped. Resume from the last checkpoint, "
                f"{self.last_checkpoint() or 'none saved yet'}, with one of those settings changed") from err

    def score(self, completions: list[str], answers: list[str], prompts: list | None = None,
              columns: list[dict] | None = None, counted: bool = True) -> tuple[Tensor, dict[str, float]]:
        """Rewards and reward metrics (`RolloutGenerator.score`) on this module's device."""
        return self.generation.score(completions, answers, prompts, columns, device=self.device, counted=counted)

    # training ----------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        cfg, G, timer, step = self.settings, self.settings.rollout.group_size, PhaseTimer(), self.global_step
        sampled, reward_stats = self._sample_batch(batch, timer)
        rollout, rewards = sampled.rollout, sampled.rewards
        if cfg.loss.binary_rewards_for:
            guards.stop_on_non_binary_rewards(rewards, step=step, rank=self.global_rank, trainer=self._trainer,
                                              setting=cfg.loss.binary_rewards_for)
        trained, advantages, zero_var, seq_logp, ranks = self._trained_batch(sampled, timer)
        ref_logp = None
        if any(r.needs_reference for r in self.regularizers):  # time/ref_logp_s only where there is one
            with timer("ref_logp"):
                ref_logp = self._reference_logprobs(trained[0])
        with timer("update"):
            self.learner.regularizers = self.regularizers
            update_metrics = self.learner.update(*trained, ref_logp, step=self.global_step)
        guards.stop_on_nonfinite_weights(self.policy, step=step, rank=self.global_rank, trainer=self.trainer)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        metrics = {
            **rollout_metrics(
                rollout, rewards, advantages, zero_var, group_size=G, seconds=timer.seconds["rollout"],
                correct_threshold=self.hparams.correct_threshold, generated_tokens=timer.counts["rollout_tokens"],
                scores=sampled.scores,
            ),
            **reward_stats,
            **update_metrics,
            **{f"time/{k}_s": v for k, v in timer.seconds.items()},
            "time/peak_mem_gib": distributed.all_max(torch.tensor(peak_memory_gib(self.device), dtype=torch.float64)),
        }
        if cfg.loss.unlikeliness:
            metrics.update(unlikeliness_metrics(rewards, seq_logp, G, cfg.loss.unlikeliness, ranks))
        for reg in self.regularizers:
            metrics.update(reg.pop_metrics())
        skipped_rows = getattr(getattr(self.trainer, "datamodule", None), "skipped_rows", None)
        if skipped_rows is not None:
            metrics["data/skipped_rows"] = skipped_rows
        self.log_step(metrics)

    def last_checkpoint(self) -> str:
        """The checkpoint callback's latest file (saved between RL steps), else the file the fit
        resumed from, or "" (`guards.last_checkpoint`)."""
        return guards.last_checkpoint(self._trainer)

    def _reference_logprobs(self, rollout: Rollout) -> Tensor:
        ref = self._reference
        if next(ref.parameters()).device != self.device:
            ref.to(self.device)
        return self.learner.logprobs(ref, rollout.input_ids, rollout.attention_mask, rollout.response_mask)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Every update of a rollout passes here, after the precision plugin unscaled."""
        self.learner.before_optimizer_step(optimizer)

    # logging, checkpoint -----------------------------------------------------------------------
    def log_step(self, metrics: dict) -> None:
        """Every metric is already global (reduced across ranks where it is computed, see
        rollout_metrics and _update_minibatch): the same value on every rank, so no sync_dist.
        The progress bar gets its two through `self.log`; all of them reach callbacks and loggers
        in one batch (`publish_step_metrics`: `self.log` per metric is slow, docs/benchmarks.md), at
        the RL step just taken (this step's last update has already advanced global_step)."""
        values = as_floats(metrics)
        for short, k in (("reward", "rollout/reward_mean"), ("entropy", "policy/entropy")):  # fit the bar
            self.log(short, values[k], on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1)
        publish_step_metrics(self.trainer, values, step=self.global_step - 1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.rollout_rng.save(checkpoint)  # collective: every rank runs this hook
        # with the current run of skips, a resumed run stops where model.update.max_consecutive_skips stops it
        checkpoint["skipped_steps"], checkpoint["consecutive_skips"] = self._skip_counts
        if self._trainer is not None:
            checkpoint[resume_check.CKPT_KEY] = resume_check.run_components(self, self.trainer, in_effect=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is None and self.policy is None:
            # `GRPOModule.load_from_checkpoint(path)` outside a fit: build the policy that the
            # checkpoint's state dict is loaded into next (a fit builds it in configure_model)
            self.configure_model()
        self.rollout_rng.load(checkpoint, self.global_rank, self.trainer.world_size if self._trainer is not None else 1)
        self._restored_skips = (checkpoint.get("skipped_steps", 0), checkpoint.get("consecutive_skips", 0))
        self._checkpoint_step = checkpoint.get("global_step")
        check_resume_length(self._trainer, self._checkpoint_step)
        if self._learner is not None:
            self._learner.skipped_steps, self._learner.consecutive_skips = self._restored_skips
        if self._trainer is not None and self.trainer.optimizers:  # a strategy that restores after setup
            resume_check.check_optimizer_class(checkpoint, self.trainer.optimizers)
        keep = (resume_check.CKPT_KEY, "hyper_parameters", "datamodule_hyper_parameters")
        self._resumed_from = {k: checkpoint[k] for k in keep if k in checkpoint}

    def on_train_start(self) -> None:
        self.rollout_rng.apply_pending()
        if self._resumed_from is not None:  # compared once the optimizer and callbacks are restored
            resume_check.warn_on_changes(self._resumed_from, self, self.trainer, self.trainer.ckpt_path)
            self._resumed_from = None

    def configure_callbacks(self):
        """The TensorBoard overview of every fit (layout, config text, hparams, final figures)."""
        from lit_covrl.dashboard import RunDashboard

        return [] if any(isinstance(cb, RunDashboard) for cb in self.trainer.callbacks) else [RunDashboard()]

    def on_fit_end(self) -> None:
        # a `trainer.test()` / `validate()` after this fit, in the same process, logs at its last step
        self._checkpoint_step = self.global_step
        if self.trainer.is_global_zero:
            print(fit_end_message(self.trainer), flush=True)
