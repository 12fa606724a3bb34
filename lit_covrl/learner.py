"""The learner half of an RL step: every optimizer update of one rollout.

For each phase (one, or a regularizer's `update_phases`: Lopti's; every update of phase 0 first),
epoch and mini-batch (whole prompt groups): plan the micro-batches, let the regularizers select
over the whole mini-batch (all ranks), accumulate the gradients of one aggregated loss whose
denominators are the mini-batch's (so the result does not depend on micro_batch_size), step. The
whole loss is written in one function, `Learner.loss` (`lit_covrl.loss.compose`):

    agg( (objective.token_loss(A + sum(advantage shifts)) * prod(weights) + sum(penalties)) * scope )

With `skip_padding`, micro-batches are cut from the rows sorted by length and each is trimmed to
its own extent, so no forward computes padding (`lit_covrl.packing`); each group's prompt is forwarded once per
micro-batch (`shared_prompt`, see `_logprobs`). A
non-finite gradient drops that update whole. Every update goes through the driver's optimizer
step (GRPOModule: the strategy's precision plugin, so AMP's GradScaler unscales before the
gradients are clipped); `trainer.global_step` counts rollouts.

`Learner` has explicit inputs: the policy, its `LearnerSettings`, the policy objective
(`lit_covrl.objectives`), the regularizers and an `OptimizerDriver`. `Learner.update(...)` runs
every update of one rollout and returns its metrics; `Learner.logprobs(...)` is the no-grad
forward the module uses for reference log-probs, `Learner.recompute_old_logprobs(...)` the one
for recomputed old log-probs and entropies (in the update's own micro-batches). Departures from
the reference code are listed once, in the README's table "Where we differ from the reference code".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_covrl import distributed
from lit_covrl.compiled import CompiledForwards
from lit_covrl.drivers import OptimizerDriver, zero_step_moves_nothing
from lit_covrl.loss import CTX_FLAGS, clip_kwargs, compose, explained, loss_parts, metric_keys
from lit_covrl.metrics import StepMetrics
from lit_covrl.objectives import Objective
from lit_covrl.packing import MiniBatch, length_order, lockstep_chunks, pad_columns, trim_padding
from lit_covrl.policy import prompt_groups, response_logprobs, shared_prompt_logprobs
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer
from lit_covrl.regularizers.checks import update_phases
from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings
from lit_covrl.types import ForwardAsks, PolicyBatch, Rollout, TokenShaping, TokenStats

log = logging.getLogger("lit_covrl")


@dataclass(frozen=True)
class LearnerSettings:
    """The module's settings groups the update reads (`lit_covrl.settings`), and the resolved
    `shared_prompt` (True runs each group's prompt once, see `_logprobs`) and `skip_padding`
    choices."""

    rollout: RolloutSettings  # group_size, max_new_tokens (norm length), temperature (of the loss)
    loss: LossSettings  # loss_agg_mode
    update: UpdateSettings
    shared_prompt: bool = False
    skip_padding: bool = False  # resolved: True sorts rows by length and trims each micro-batch (`_plan`)
    compile_update: bool = False  # True: the forwards of `_logprobs` run compiled (`lit_covrl.compiled`)


class Learner:
    """Every optimizer update of one rollout (see the module docstring).

    Args:
        policy: the model being trained.
        settings: update settings.
        objective: the base policy loss (`lit_covrl.objectives`: PPOClip, GSPO, CISPO).
        regularizers: callbacks asked for per-token shaping, in order (reassignable).
        driver: backward and optimizer steps.
    """

    def __init__(self, policy: nn.Module, settings: LearnerSettings, objective: Objective,
                 regularizers: list[Regularizer], driver: OptimizerDriver) -> None:
        self.policy, self.settings, self.objective = policy, settings, objective
        self.regularizers, self.driver = list(regularizers), driver
        self.skipped_steps = 0  # non-finite updates dropped over the run (saved in checkpoints)
        self.consecutive_skips = 0  # the current run of them (saved too: a resumed run stops where this one would)
        self._on_policy = True
        self._step_stats: dict | None = None
        self._kl_scale: Tensor | None = None  # the prepared mini-batch's KL-to-reference scale (Regularizer.kl_scale)
        self.step = 0
        self.compiled = CompiledForwards()  # used only with settings.compile_update; compiles on first use

    def update(self, rollout: Rollout, advantages: Tensor, keep: Tensor, ref_logp: Tensor | None, *, step: int) -> dict:
        """Every optimizer update of one rollout (RL step `step`); returns step metrics averaged
        over updates.

        rollout: N = B*G sequences; advantages [N]; keep [N] bool (False rows are filtered out);
        ref_logp [N, T] or None (reference model's log-probs, for ReferenceKL)."""
        self.step, n, epochs = step, rollout.input_ids.shape[0], self.settings.update.ppo_epochs
        passes = update_phases(self.regularizers) * epochs  # phase-major (see the module doc)
        schedule = [(p // epochs, mb) for p in range(passes) for mb in self.minibatches(rollout, keep)]
        metrics = StepMetrics()
        self._on_policy = True  # no optimizer step taken since this rollout (see MiniBatchContext)
        self._observe_rollout(rollout, keep)
        for i, (phase, mb) in enumerate(schedule):
            batch = MiniBatch(rollout, advantages, ref_logp, mb, self.settings.rollout.group_size)
            metrics.update(self._update_minibatch(batch, index=i, last=i == len(schedule) - 1, phase=phase))
        out = metrics.pop()
        out.setdefault("policy/grad_norm", 0.0)  # every mini-batch filtered: no gradient at all
        kept = distributed.all_sum(torch.stack([keep.float().sum(), torch.tensor(float(n), device=keep.device)]))
        out["policy/kept_frac"] = kept[0] / kept[1]  # over all ranks' sequences
        out["policy/skipped_steps"] = float(self.skipped_steps)
        return out

    def minibatches(self, rollout: Rollout, keep: Tensor) -> list[Tensor]:
        """The rows of each mini-batch of one epoch: those answering prompts j m .. (j + 1) m - 1
        (m = `mini_batch_size`; rows j m G .. (j + 1) m G - 1 of a rollout in prompt order), from
        which the filtered rows (`keep` False) just drop out. Groups stay whole also after an AEPO
        splice, whose extra responses (the batch's first rows) join their own prompts' mini-batches."""
        n, G = len(keep), self.settings.rollout.group_size
        m = self.settings.update.mini_batch_size or n // G
        slot = rollout.prompt_of(torch.arange(n, device=keep.device), G) // m
        rows = torch.nonzero(keep).squeeze(-1)
        return [rows[slot[rows] == j] for j in range(-(-n // (m * G)))]

    def _observe_rollout(self, rollout: Rollout, keep: Tensor) -> None:
        """Before any update: every regularizer's `observe_old_logp` and `observe_old_entropy` (the kept
        rows' rollout log-probs, entropies); then for the regularizers whose `observes_rollout()` is
        true (SIREN's anchor) the nucleus entropy [n, T] of those rows under the rollout policy, one
        no-grad pass forwarding each mini-batch with its update's micro-batch plan, and their
        `observe_rollout` (a collective: the decision to observe is the same on every rank)."""
        rows, topp = torch.nonzero(keep).squeeze(-1), self.forward_asks().topp
        mask = rollout.response_mask[rows].to(rollout.logp.dtype)
        for reg in self.regularizers:
            reg.observe_old_logp(rollout.logp[rows], mask)
            reg.observe_old_entropy(rollout.entropy[rows], mask, self.step)
        if not (watching := [r for r in self.regularizers if r.observes_rollout()]):
            return
        h = torch.zeros_like(mask)
        for mb in self.minibatches(rollout, keep):
            ids, att = (rollout.input_ids[mb], rollout.attention_mask[mb]) if len(mb) else \
                (rollout.input_ids[:1], rollout.attention_mask[:1])
            where = torch.searchsorted(rows, mb)
            h[where] = self._nograd_forward(self.policy, ids, att, mask[where], False, topp=topp).topp_entropy
        for reg in watching:
            reg.observe_rollout(h, mask)

    def recompute_old_logprobs(self, rollout: Rollout, keep: Tensor) -> None:
        """Replace `rollout.logp` and `rollout.entropy` by the policy's no-grad log-probs and
        entropies (`recompute_logprobs`), each mini-batch's kept rows forwarded with the micro-batch
        plan its update uses (`_plan`: the same rows, order, cuts and trims), so that the first
        update's forward gives the same values to the bit and its ratio is exactly 1. The entropy
        is replaced too, whatever the regularizers: H_old then comes from the forward that gives
        the later updates' H (under bf16 the sampler's differs by whole bf16 steps, and
        EntropyRatioClip clipped tokens the policy had not moved), and policy/entropy reports the
        same forward in every run (its cost: a few % of the forward with a 150k-token vocabulary).
        The filtered rows (read by the rollout metrics) follow in a plan of their own: as many rows
        in all as one pass over the rollout."""
        logp, entropy = torch.zeros_like(rollout.logp), torch.zeros_like(rollout.entropy)
        for rows in [*self.minibatches(rollout, keep), torch.nonzero(~keep).squeeze(-1)]:
            out = self.policy_stats(rollout, rows)
            logp[rows], entropy[rows] = out.logp, out.entropy
        rollout.logp, rollout.entropy = logp, entropy

    def policy_stats(self, rollout: Rollout, rows: Tensor) -> TokenStats:
        """The policy's no-grad log-probs and entropies of `rollout`'s `rows`, in a micro-batch plan
        of their own; every rank calls it together, a rank with no rows running filler forwards
        on row 0 (see _nograd_forward)."""
        ids, att = (rollout.input_ids[rows], rollout.attention_mask[rows]) if len(rows) else \
            (rollout.input_ids[:1], rollout.attention_mask[:1])
        return self._nograd_forward(self.policy, ids, att, rollout.response_mask[rows], True)

    def _update_minibatch(self, mb: "MiniBatch", *, index: int, last: bool, phase: int = 0) -> dict:
        """One optimizer update: plan the micro-batches, let the regularizers select over the whole
        mini-batch, accumulate the gradients of one aggregated loss whose denominators are the
        mini-batch's (over all ranks, so the result does not depend on micro_batch_size), step."""
        self.driver.zero_grad()
        # decided globally so that all ranks take the same branch (a rank may hold no rows)
        if int(distributed.all_sum(torch.tensor(float(len(mb)), device=mb.mask.device))) == 0:  # all filtered
            # no gradient: no step (its norm, 0, is not averaged with the real updates' either);
            # the rollout's closing update is still counted (one RL step)
            return {"policy/lr": self.driver.skip_step()} if last else {}
        plan = self._plan(mb.input_ids, mb.attention_mask, mb.mask.shape[1])  # same length on every rank
        early = self._select(mb, plan, index, phase)
        metrics = self._accumulate(mb, plan, early)
        return {**metrics, **self._optimizer_step(last)}

    def _select(self, mb: "MiniBatch", plan: list, index: int, phase: int = 0):
        """Every regularizer's `prepare` on the whole mini-batch (detached, all ranks). Returns the
        training forward when it had to run early (see `_selection_logprobs`), else None."""
        need_ent = any(r.needs_entropy for r in self.regularizers)
        current, current_ent, topp_ent, early = self._selection_logprobs(mb, plan, need_ent)
        ctx = MiniBatchContext(
            step=self.step, update=index, on_policy=self._on_policy, logp=current, old_logp=mb.old_logp,
            advantages=mb.advantages, mask=mb.mask, clipped=None, old_entropy=mb.old_entropy, entropy=current_ent,
            zeroed=torch.zeros_like(mb.mask, dtype=torch.bool), agg_mode=self.settings.loss.loss_agg_mode,
            norm_length=self.settings.rollout.max_new_tokens, topp_entropy=topp_ent,
            logratio_clamp=getattr(self.objective, "logratio_clamp", None),
            token_ids=mb.input_ids[:, mb.input_ids.shape[1] - mb.mask.shape[1]:], groups=mb.groups, phase=phase,
        )
        ctx.in_phase = next((t for reg in self.regularizers if (t := reg.phase_tokens(ctx)) is not None), None)
        # the clip-range setter first (ctx.clipped follows its range), ctx.zeroed's readers last (stable: callback order)
        clip = None
        for reg in sorted(self.regularizers, key=lambda r: (not r.sets_clip_range, r.reads_zeroed)):
            if ctx.clipped is None and not reg.sets_clip_range:
                ctx.clipped = self.objective.clipped_tokens(current, mb.old_logp, mb.advantages, mb.mask,
                                                            **clip_kwargs(clip))
            explained(reg, "prepare", ctx, CTX_FLAGS)
            if reg.sets_clip_range:
                clip = reg.clip_bounds()
            if (zeroed := reg.zeroed_tokens()) is not None:
                ctx.zeroed = ctx.zeroed | zeroed.bool()
        scales = [s for reg in self.regularizers if (s := reg.kl_scale()) is not None]
        self._kl_scale = None if not scales else torch.stack(scales).prod(0)
        return early

    def _accumulate(self, mb: "MiniBatch", plan: list, early) -> dict:
        """Backward of every micro-batch's share of the mini-batch loss; returns the update's loss
        metrics, summed over micro-batches and ranks (one collective)."""
        hp, regs = self.settings, self.regularizers
        need_ent = any(r.needs_entropy for r in regs)
        totals = distributed.all_sum(torch.stack([mb.mask.sum(), torch.tensor(float(len(mb)), device=mb.mask.device)]))
        agg = dict(mode=hp.loss.loss_agg_mode, num_tokens=totals[0], num_seqs=totals[1],
                   norm_length=hp.rollout.max_new_tokens)
        scale = distributed.world_size()  # gradients are averaged over ranks; we want the global mean
        sums: dict[str, Tensor] = {}
        asks = self.forward_asks()
        for r in plan:
            if r is None:  # filler: keeps this rank's collectives in step, contributes nothing
                out = early if early is not None else self._logprobs(*mb.filler, mb.mask.shape[1], False)
                self.driver.backward(out.logp.sum() * 0.0)
                continue
            out = early if early is not None else self._logprobs(mb.input_ids[r], mb.attention_mask[r], mb.mask.shape[1],
                                                                 need_ent, asks=asks)
            batch = self._policy_batch(mb, r, out)
            loss, shapings, base = self.loss(batch, agg)
            self.driver.backward(loss * scale)
            with torch.no_grad():  # micro-batch terms with mini-batch denominators: they add up
                for k, v in loss_parts(self.objective, regs, batch, loss, shapings, base, agg, totals[0]).items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
        # every part is this rank's share of a global mean (mini-batch denominators over all
        # ranks): the global value is their sum over ranks. One collective for all of them.
        keys = metric_keys(self.objective, regs)
        zero = mb.mask.new_zeros((), dtype=torch.float32)
        local = torch.stack([sums.get(k, zero).to(zero) for k in keys])
        return dict(zip(keys, distributed.all_sum(local).tolist()))

    def _policy_batch(self, mb: "MiniBatch", r: Tensor, out: TokenStats) -> PolicyBatch:
        """The `PolicyBatch` of the rows `r` of `mb`: the training forward's `out` (log-probs with
        grad, and what the regularizers asked of it: entropy, top-k, min-p proxy, nucleus entropy,
        clamped entropy;
        the fields share their names) with the rows' rollout tensors and the prepared KL scale."""
        kl_scale = None if self._kl_scale is None else self._kl_scale[r].to(out.logp.dtype)
        return PolicyBatch(rows=r, old_logp=mb.old_logp[r], advantages=mb.advantages[r], mask=mb.mask[r],
                           ref_logp=mb.ref_rows(r), old_entropy=mb.old_entropy[r], kl_scale=kl_scale, **out._asdict())

    def loss(self, b: PolicyBatch, agg: dict) -> tuple[Tensor, list[TokenShaping], Tensor]:
        """The whole loss of one micro-batch `b` (log-probs with grad) under this learner's objective
        and regularizers: `lit_covrl.loss.compose`. Returns (loss, shapings, base)."""
        return compose(self.objective, self.regularizers, b, agg)

    def _selection_logprobs(self, mb: "MiniBatch", plan: list, need_ent: bool):
        """(current log-probs [n, T], current entropy [n, T] or None, nucleus entropy [n, T] or
        None, the training forward if it was run early), detached, for the regularizers' `prepare`.

        While no optimizer step has been taken since the rollout, the log-probs and entropy are the
        rollout's. A forward of the current policy runs when a regularizer needs the current
        log-probs or entropy off policy, or the nucleus entropy (the sampler records none): the
        training forward, run early and reused for the update, when the mini-batch is one
        micro-batch; else one no-grad forward over the mini-batch. A rank with no rows runs its
        filler forward here too (FSDP lock-step)."""
        regs = self.regularizers
        want_ent = any(r.needs_current_entropy for r in regs)
        current = not self._on_policy and (want_ent or any(r.needs_current_logp for r in regs))
        topp = (asks := self.forward_asks()).topp
        logp, ent = mb.old_logp, (mb.old_entropy if want_ent else None)
        if not (current or topp):
            return logp, ent, None, None
        if len(plan) == 1:
            real = plan[0] is not None
            rows = (mb.input_ids[plan[0]], mb.attention_mask[plan[0]]) if real else mb.filler
            early = self._logprobs(*rows, mb.mask.shape[1], (need_ent or (want_ent and current)) and real,
                                   asks=asks if real else ForwardAsks())
            if not real:
                return logp, ent, (torch.zeros_like(mb.mask) if topp else None), early
            if current:
                logp = early.logp.detach() * mb.mask
                ent = early.entropy.detach() * mb.mask if want_ent else None
            topp_ent = early.topp_entropy.detach().to(mb.mask.dtype) * mb.mask if topp else None
            return logp, ent, topp_ent, early
        out = self._nograd_forward(self.policy, *mb.inputs_or_filler(), mb.mask, want_ent and current, topp=topp)
        if current:
            logp, ent = out.logp, out.entropy
        return logp, ent, out.topp_entropy, None

    def logprobs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, mask: Tensor) -> Tensor:
        """No-grad log-probs [n, T] of the response tokens under `model` (the policy, or the
        reference model), at the training temperature, micro-batch by micro-batch, through the
        same forward as training (so they match its rounding)."""
        return self._nograd_forward(model, input_ids, attention_mask, mask, False).logp

    def _plan(self, input_ids: Tensor, attention_mask: Tensor, T: int) -> list[Tensor | None]:
        """The micro-batches of n rows: `lockstep_chunks` over the rows in `length_order` (groups of
        identical prompts as blocks, longest first), so that each micro-batch is trimmed to rows of
        similar length. One micro-batch keeps the rows' own order."""
        plan = lockstep_chunks(len(input_ids), self.settings.update.micro_batch_size)
        if not self.settings.skip_padding or sum(r is not None for r in plan) <= 1:
            return plan
        P = input_ids.shape[1] - T
        order = length_order(attention_mask, prompt_groups(input_ids[:, :P], attention_mask[:, :P])[1])
        return [order[r] if r is not None else None for r in plan]

    @torch.no_grad()
    def _nograd_forward(self, model, input_ids: Tensor, attention_mask: Tensor, mask: Tensor,
                        with_entropy: bool, topp: tuple[float, int] | None = None) -> TokenStats:
        """The log-probs [n, T] of the response tokens under `model`, micro-batch by micro-batch,
        0 outside `mask`; with `with_entropy` the entropy, with `topp` the nucleus entropy
        (`token_topp_entropy`), the other fields None."""
        n, T = mask.shape  # input_ids holds only a filler row when this rank has no rows (inputs_or_filler)
        asked = {"logp": True, "entropy": with_entropy, "topp_entropy": bool(topp)}
        asks = ForwardAsks(topp=topp)
        full = {k: mask.new_zeros(n, T) for k, on in asked.items() if on}
        for r in self._plan(input_ids[:n], attention_mask[:n], T):
            if r is None:  # filler forward (see lockstep_chunks); needs a row of some rank's batch
                self._logprobs(input_ids[:1], attention_mask[:1], T, False, model=model)
                continue
            out = self._logprobs(input_ids[r], attention_mask[r], T, with_entropy, model=model, asks=asks)
            for k, x in full.items():
                x[r] = getattr(out, k).to(x.dtype)
        return TokenStats(**{k: x * mask for k, x in full.items()})

    def forward_asks(self) -> ForwardAsks:
        """What the regularizers ask of the training forward besides log-probs and entropy (top-k,
        min-p proxy, nucleus entropy, scaled log-probs, clamped entropy: `ForwardAsks.of`, which
        refuses two different requests of one kind, as `check_stack` did at start-up)."""
        return ForwardAsks.of(self.regularizers)

    def _logprobs(self, ids: Tensor, att: Tensor, T: int, with_entropy: bool, model=None,
                  asks: ForwardAsks = ForwardAsks()) -> TokenStats:
        """The `TokenStats` [n, T] of a micro-batch under `model` (default the policy): the response
        log-probs, and the entropy (`with_entropy`) and what `asks` asks for (top-k, min-p proxy,
        nucleus entropy, scaled log-probs, clamped entropy) when asked (`response_logprobs`); with
        `skip_padding` computed on the micro-batch trimmed of its all-padding columns
        (`trim_padding`); the prompt forward shared over each group (`shared_prompt_logprobs`) when
        `shared_prompt` is on and activation checkpointing off; through the compiled forward
        (`lit_covrl.compiled`) with `compile_update`. Every call, filler passes included, then runs
        the same two forwards on every rank when there are several (FSDP lock-step)."""
        hp, model = self.settings, (model if model is not None else self.policy)
        kw = dict(temperature=hp.rollout.temperature, with_entropy=with_entropy, chunk_size=hp.update.logprob_chunk_size,
                  asks=asks)
        lockstep = distributed.world_size() > 1
        # the shared-prompt split forwards a tail only for >= 2 response columns: keep 2 on every
        # rank, or a rank whose rows all end after one token would run one forward to the others' two
        min_cols = 2 if lockstep and hp.shared_prompt and not hp.compile_update else 1
        ids, att, kept = trim_padding(ids, att, T, min_cols) if hp.skip_padding else (ids, att, T)
        if hp.compile_update:  # one full forward per row (shared_prompt resolves off with it)
            out = response_logprobs(self.compiled(model), ids, att, kept, **kw)
        elif not hp.shared_prompt:
            out = response_logprobs(model, ids, att, kept, **kw)
        else:
            out = shared_prompt_logprobs(model, ids, att, kept, always_split=lockstep, **kw)
        return TokenStats._make(None if x is None else pad_columns(x, T) for x in out)

    def _optimizer_step(self, last: bool) -> dict:
        """One optimizer update through the driver (GRPOModule: the strategy and its precision
        plugin, so AMP's GradScaler unscales before `before_optimizer_step` clips), every update
        of the rollout alike."""
        self._step_stats = None
        self.driver.step(last)
        stats = self._step_stats
        assert stats is not None, "the optimizer driver did not call Learner.before_optimizer_step"
        if stats.pop("applied"):
            self._on_policy = False
        return stats

    def before_optimizer_step(self, optimizer) -> None:
        """After any gradient unscaling, before the step: clip the gradients (the norm is logged
        whether or not it clips) and drop a non-finite update whole."""
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_clip = self.settings.update.grad_clip
        max_norm = grad_clip if grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # applied: the step may change weights (a zero gradient on a fresh optimizer moves nothing)
        applied = bool(torch.isfinite(grad_norm)) and len(params) > 0 and not zero_step_moves_nothing(optimizer, grad_norm)
        if not torch.isfinite(grad_norm):
            self._skip_update(optimizer, float(grad_norm))
        else:
            self.consecutive_skips = 0
        self._step_stats = {"policy/grad_norm": grad_norm, "policy/lr": optimizer.param_groups[0]["lr"], "applied": applied}

    def _skip_update(self, opt, grad_norm: float) -> None:
        """Drop a non-finite update whole (nothing is half-applied); stop after too many in a row."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        log.warning("non-finite gradient norm (%s): optimizer update skipped (%d in a row)", grad_norm, self.consecutive_skips)
        opt.zero_grad(set_to_none=True)  # params without grad are left untouched by the step
        if self.consecutive_skips >= self.settings.update.max_consecutive_skips:
            # saved mid-step: for inspection; resuming from it would skip the rest of this RL step
            path = self.driver.save_checkpoint("nonfinite-stop.ckpt")
            raise RuntimeError(
                f"{self.consecutive_skips} consecutive optimizer updates had non-finite gradients "
                f"(model.update.max_consecutive_skips={self.settings.update.max_consecutive_skips}); the run is stopped. "
                f"Resume from the last checkpoint: {self.driver.last_checkpoint() or 'none saved yet'}. The state at the "
                f"stop, in the middle of RL step {self.step}, is saved for inspection to {path}. "
                "Lower the learning rate or check the reward and data."
            )

