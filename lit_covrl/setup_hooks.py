"""GRPOModule's set-up hooks, the part of the module that builds what a fit trains before its first
RL step: the tokenizer, the policy and the reference model (`configure_model`: loaded, checked
against the tokenizer, sharded under a device mesh), the start-up checks (`setup`,
`lit_covrl.startup_checks`), the run plan read from the datamodule (prompts per step, updates per
rollout) and the optimizer with its LR scheduler (`configure_optimizers`).

`SetupHooks` is a mixin of `lit_covrl.module.GRPOModule` (its only user): it reads the module's
`hparams`, `settings`, `regularizers` and the attributes `GRPOModule.__init__` sets.
"""
from __future__ import annotations

import math

import torch

from lit_covrl import resume_check
from lit_covrl.errors import naming_the_setting
from lit_covrl.model_specs import remote_code
from lit_covrl.policy import load_tokenizer
from lit_covrl.regularizers.checks import update_phases
from lit_covrl.sharding import is_sharded, load_model, shard_loaded
from lit_covrl.startup_checks import check_before_start, check_optimizer_precision, check_position_table, check_topk
from lit_covrl.vocab_check import check_same_vocab, check_vocab


class SetupHooks:
    """`tokenizer`, `configure_model`, `setup`, `updates_per_rollout`, `prompts_per_step` and
    `configure_optimizers` of GRPOModule."""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            hp = self.hparams
            field = "model.tokenizer" if hp.tokenizer else "model.model"
            with naming_the_setting(field, hp.tokenizer or hp.model), self._remote_code():
                tokenizer = load_tokenizer(hp.tokenizer or hp.model)
            if hp.tokenizer:  # the policy folder's own tokenizer, if it has one, must be this one
                with naming_the_setting("model.model", hp.model), self._remote_code():
                    check_same_vocab(tokenizer, field, hp.tokenizer, "model.model", hp.model)
            self._tokenizer = tokenizer
        return self._tokenizer

    def configure_model(self) -> None:
        """Load the policy (and the reference model when a regularizer needs it). Under Lightning's
        `ModelParallelStrategy` (a device mesh is set) both are sharded with FSDP2 here, before the
        optimizer is built, so the optimizer holds only this rank's shards; their full weights are
        read by rank 0 alone and broadcast into the other ranks' empty shards (`load_sharded`).
        Models this hook loaded before the fit (called early, without a mesh: every rank holds them
        whole) are sharded in place then, rank 0's weights winning (`shard_loaded`)."""
        hp = self.hparams
        if self.policy is None:
            self.policy = self._load("model.model", hp.model, frozen=False)
            check_vocab(self.tokenizer, self.policy, hp.model, hp.tokenizer)
        elif self.device_mesh is not None and not is_sharded(self.policy):
            self.policy = shard_loaded(self.policy, self.device_mesh, system=self.settings.system, frozen=False)
        check_topk(self.policy, self.regularizers, hp.model)
        check_position_table(self.policy, self.settings.rollout, hp.model)
        if self._reference is not None and self.device_mesh is not None and not is_sharded(self._reference):
            shard_loaded(self._reference, self.device_mesh, system=self.settings.system, frozen=True)
        if self._reference is None and any(r.needs_reference for r in self.regularizers):
            field = "model.reference_model" if hp.reference_model else "model.model"
            if hp.reference_model:  # before its weights are read: a reference of another vocabulary
                with naming_the_setting(field, hp.reference_model), self._remote_code():
                    check_same_vocab(self.tokenizer, "model.tokenizer" if hp.tokenizer else "model.model",
                                     hp.tokenizer or hp.model, field, hp.reference_model)
            ref = self._load(field, hp.reference_model or hp.model, frozen=True)
            check_vocab(self.tokenizer, ref, hp.reference_model or hp.model, hp.tokenizer, model_field=field)
            # the precision plugin converts the policy after this hook (`*-true` precisions cast it);
            # the reference gets the same cast, so that at step 0 its log-probs equal the policy's
            ref = self.trainer.precision_plugin.convert_module(ref)
            # a plain attribute: the strategy never sees it and checkpoints never save it
            object.__setattr__(self, "_reference", ref)

    def _load(self, field: str, spec: str, *, frozen: bool) -> torch.nn.Module:
        """The model `spec` given by setting `field` (named in a loading error)."""
        device = self.trainer.strategy.root_device if self.device_mesh is not None else None
        with naming_the_setting(field, spec), self._remote_code():
            return load_model(spec, dtype=self.hparams.dtype, frozen=frozen, system=self.settings.system,
                              mesh=self.device_mesh, device=device)

    def _remote_code(self):
        """Loads that run a model's own modeling code only with model.trust_remote_code."""
        return remote_code(self.hparams.get("trust_remote_code", False))

    def setup(self, stage: str) -> None:
        check_before_start(self, stage)
        self.rollout_rng.place(self.device, self.global_rank)

    @property
    def updates_per_rollout(self) -> int | None:
        mbs = self.settings.update.mini_batch_size
        epochs = self.settings.update.ppo_epochs * update_phases(self.regularizers)
        if mbs is None:
            return epochs
        batch = self.prompts_per_step()
        return None if batch is None else epochs * math.ceil(batch / mbs)

    def prompts_per_step(self) -> int | None:
        """Prompts per RL step per device, when the datamodule says (`batch_size` hparam)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "hparams", {}).get("batch_size") if dm is not None else None

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        check_optimizer_precision(opt)
        if self._resumed_from is not None:  # the checkpoint's modules are restored before this hook
            resume_check.check_optimizer_class(self._resumed_from, [opt])
        self.configured_schedulers = []  # as configured, before a resume restores the checkpoint's state
        if self.lr_scheduler_factory is None:
            return opt
        scheduler = self.lr_scheduler_factory(opt)
        self.configured_schedulers = [resume_check.describe_scheduler(scheduler)]
        if self._resumed_from is not None:
            resume_check.check_scheduler_class(self._resumed_from, [scheduler])
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):  # step() needs a metric
            raise ValueError("model.lr_scheduler: ReduceLROnPlateau is not supported (it steps on a monitored "
                             "metric; the module steps its scheduler once per RL step): use a step-based "
                             "scheduler such as torch.optim.lr_scheduler.CosineAnnealingLR")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
