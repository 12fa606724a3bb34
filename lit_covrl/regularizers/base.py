"""The regularizer contract: a Lightning callback that the module asks for per-token shaping.

A Lightning callback cannot replace the loss, so `GRPOModule` finds every `Regularizer` in
`trainer.callbacks` and, for each optimizer mini-batch:

1. calls `prepare(ctx)` once with the whole mini-batch (detached tensors, all micro-batches,
   global across ranks): covariance-based selection happens here, so the selected set does not
   depend on the micro-batch size or on the number of devices;
   (Before a step's first mini-batch, a regularizer whose `observes_rollout()` is true sees the
   whole rollout's nucleus entropy in `observe_rollout`: SIREN measures its anchor there.)
2. calls `shape(batch)` per micro-batch (tensors with grad) and combines the returned
   `TokenShaping`s: loss_tok = objective(logp + sum(logp_grad), A + sum(shifts); clip range)
   * prod(weights) + sum(penalties), aggregated once (`lit_covrl.loss.compose`).

Coefficients follow a `Schedule` of the RL step (rollout index), a pure function of the step,
so they resume exactly. Regularizers never see config objects; the math is in `algorithms/`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

from lightning.pytorch import Callback
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import covariance_sums, token_covariance
from lit_covrl.regularizers.checks import (  # noqa: F401 (re-exported: imported from here)
    check_lookalikes,
    check_nonnegative,
    check_number,
    check_objective_stack,
    check_ratio,
    check_scheduled_ratio,
    check_stack,
    check_unique_names,
    warn_inert_on_policy,
)
from lit_covrl.regularizers.schedules import Schedule
from lit_covrl.regularizers.step_state import StepEntropy, StepSums  # noqa: F401 (re-exported: imported from here)
from lit_covrl.types import PolicyBatch, TokenShaping

log = logging.getLogger("lit_covrl")


@dataclass
class MiniBatchContext:
    """One optimizer mini-batch, as seen by `Regularizer.prepare` (all tensors detached).

    step        RL step (rollout index)
    update      index of this mini-batch update within the rollout (0, 1, ...)
    on_policy   True while no optimizer step has moved the weights since the rollout: the policy is
                still the rollout policy (a filtered or skipped update keeps it True, as does a
                zero-gradient step of a fresh optimizer: `drivers.zero_step_moves_nothing`)
    logp        [n, T]  current-policy log-probs of the sampled tokens (the rollout's while on
                        policy; otherwise a no-grad forward when a regularizer needs them)
    old_logp    [n, T]  rollout-policy log-probs
    advantages  [n, T]  sequence advantages broadcast over tokens
    mask        [n, T]  response mask (float)
    clipped     [n, T]  bool: tokens whose gradient the policy objective already zeroes
                        (`Objective.clipped_tokens`: for PPOClip its clip range, dual-clip and
                        log-ratio clamp; for GSPO whole clipped sequences; none for CISPO;
                        for CEGPPO only dual-capped and clamped unclipped tokens), under the
                        per-token clip range of the regularizer that sets one (Archer's); None
                        while that regularizer itself is prepared (it is prepared first)
    old_entropy [n, T] | None  rollout-policy entropy of the sampled distribution (the sampler's,
                        or the training forward's with `recompute_logprobs`)
    entropy     [n, T] | None  current-policy entropy (== old_entropy while on policy), when a
                        regularizer sets `needs_current_entropy`
    zeroed      [n, T] | None  bool: tokens whose objective weight an earlier regularizer of this
                        mini-batch set to 0 (`Regularizer.zeroed_tokens`); the learner prepares
                        the regularizers that read it (`reads_zeroed`) after all the others
    agg_mode    the loss's aggregation (`model.loss.loss_agg_mode`), for a regularizer whose term
                must divide by counts of its own (EntroPIC: the high-probability tokens')
    norm_length the loss's fixed length of seq-mean-token-sum-norm (`rollout.max_new_tokens`)
    topp_entropy [n, T] | None  current-policy entropy of each position's top-p nucleus, when a
                        regularizer sets `needs_topp_entropy` (always from a forward of the
                        current policy: the sampler records none)
    logratio_clamp  the objective's clamp of logp - old_logp before exp (its `logratio_clamp`;
                None: no clamp), so that a regularizer rebuilding the ratio (BAPO) gets the
                objective's own
    token_ids   [n, T] | None  the sampled response tokens (the learner fills it)
    groups      [n] | None  each row's prompt (its group) on this rank: rows of one group share
                the value (a mini-batch holds whole groups, less their filtered rows)
    phase       the pass over the rollout's updates this one belongs to (0, 1, ...: `update_phases`)
    in_phase    [n, T] | None  bool: the tokens this phase trains (the phase-splitting regularizer's
                `phase_tokens`, Lopti's), set by the learner before any `prepare`; None without one
                (every valid token trains). A mini-batch-wide selection restricts itself to them
                with `phase_mask()` (KL-Cov's candidates, BAPO's sums)
    """

    step: int
    update: int
    on_policy: bool
    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    clipped: Tensor | None
    old_entropy: Tensor | None = None
    entropy: Tensor | None = None
    zeroed: Tensor | None = None
    agg_mode: str = "token-mean"
    norm_length: float | None = None
    topp_entropy: Tensor | None = None
    logratio_clamp: float | None = 20.0
    token_ids: Tensor | None = None
    groups: Tensor | None = None
    phase: int = 0
    in_phase: Tensor | None = None
    _cov: Tensor | None = field(default=None, repr=False)

    def covariance(self) -> Tensor:
        """Eq. 10 of Cui et al. with means over the valid tokens of the mini-batch on all ranks."""
        if self._cov is None:
            self._cov = global_token_covariance(self.logp, self.advantages, self.mask)
        return self._cov

    def phase_mask(self) -> Tensor:
        """The response mask restricted to the tokens this phase trains (`mask` itself without phases)."""
        return self.mask if self.in_phase is None else self.mask * self.in_phase.to(self.mask.dtype)

    def num_tokens(self) -> int:
        """Valid tokens of the mini-batch over all ranks."""
        return int(distributed.all_sum(self.mask.sum()).item())


def global_token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Cov_i [n, T] of this rank's tokens, centred by the token means over all ranks' valid tokens."""
    sums = distributed.all_sum(covariance_sums(logp, advantages, mask))
    count = sums[2].clamp(min=1)
    return token_covariance(logp, advantages, mask, means=(sums[0] / count, sums[1] / count))


def select_globally(local: list[Tensor], select) -> Tensor:
    """Run `select(*tensors)` on the concatenation of every rank's rows and return this rank's
    part of the result, so the choice is the one a single process would make."""
    gathered = [distributed.gather_rows(t) for t in local]
    offset = gathered[0][1]
    chosen = select(*[g for g, _ in gathered])
    return chosen[offset : offset + local[0].shape[0]]


class Regularizer(Callback):
    """Base class. Subclasses set the `needs_*` flags and implement `shape` (and maybe `prepare`)."""

    needs_entropy: bool = False  # module computes per-token entropy (with grad) only if asked
    needs_reference: bool = False  # module loads and runs the reference model only if asked
    needs_current_logp: bool = False  # module provides ctx.logp of the current policy
    needs_current_entropy: bool = False  # module provides ctx.entropy of the current policy
    # needs_topk ... needs_clamped_entropy: requests to the training forward, gathered by `types.ForwardAsks.of`
    # (a new request: a field of ForwardAsks naming its flag)
    needs_topk: int = 0  # k > 0: module fills batch.topk_logp [n, T, k] (with grad) and batch.top1 in `shape`
    needs_min_p: float = 0.0  # kappa > 0: module fills batch.proxy_logp [n, T] (min-p proxy, detached) in `shape`
    # (top_p, top_k): module fills ctx.topp_entropy (detached) in `prepare` and batch.topp_entropy
    # (with grad) in `shape`, the entropy of each position's nucleus (`algorithms.token_topp_entropy`)
    needs_topp_entropy: tuple[float, int] | None = None
    # (s_1, ...): module fills batch.scaled_logp [n, T, S] (with grad) in `shape`, the sampled tokens'
    # log-probs under softmax(s z / temperature) for each s (`algorithms.token_scaled_logprobs`; ERA's)
    needs_logit_scales: tuple[float, ...] = ()
    # clamp_p > 0: module fills batch.clamped_entropy [n, T] (with grad) in `shape`, the entropy
    # renormalised over all but the int(V clamp_p) lowest-logit tokens (`algorithms.token_clamped_entropy`)
    needs_clamped_entropy: float = 0.0
    reads_zeroed: bool = False  # prepared after the others, with their weight-0 tokens in ctx.zeroed
    # asks the module for extra responses before each update (`rollout_request`, `choose_extra`;
    # AEPO's; at most one per run): the chosen ones replace the rollout's first rows, advantage 1
    draws_rollout: bool = False
    shifts_advantage: bool = False  # returns TokenShaping.advantage_shift (at most one per run)
    shapes_outcome: bool = False  # shapes rewards / advantages by final answers (OutcomeExploration's; one)
    replaces_advantages: bool = False  # computes the step's advantages (`step_advantages`; DCPOAdvantage's; one)
    reads_sign_as_correct: bool = False  # A > 0 is "verified correct" (SimKO, ...): refused beside shapes_outcome
    # sets the advantage of the groups whose rewards are all equal (RL-ZVP's; `observe_rewards`): refused
    # beside another control that gives them one (replaces_advantages, shapes_outcome, draws_rollout)
    shapes_equal_groups: bool = False
    sets_clip_range: bool = False  # returns TokenShaping.clip_low / clip_high (at most one per run; see clip_bounds)
    update_phases: int = 1  # > 1: the rollout's updates run that many times, ctx.phase 0 (all its updates), 1, ...;
    # `shape` returns TokenShaping.scope, the tokens each phase trains (Lopti's; at most one per run)
    default_name: str = "regularizer"  # metric namespace reg/<name>/ unless `name` is given
    # dashboard charts of recorded keys, category -> keys (reg/<name>/loss is always charted)
    chart_metrics: dict[str, tuple[str, ...]] = {"Entropy": ("coef",)}

    def __init__(self, schedule: Schedule | None = None, name: str | None = None) -> None:
        if schedule is not None and not isinstance(schedule, Schedule):
            schedule = Schedule(**schedule)
        self.schedule = schedule or Schedule("constant")
        self.name = name or self.default_name
        self._run_length: int | None = None  # steps of a whole-run schedule, once resolved (setup)
        self._metrics: dict[str, list[tuple[float | Tensor, bool | Tensor]]] = {}

    @property
    def state_key(self) -> str:
        # default_name when __init__ skipped super(): Lightning reads this while handling check_stack's error
        return f"{type(self).__qualname__}[{getattr(self, 'name', self.default_name)}]"

    def _check_initialized(self) -> None:
        if not hasattr(self, "_metrics"):
            raise ValueError(f"{type(self).__name__}.__init__ does not call super().__init__(schedule, name): "
                             "a Regularizer needs it (its name, schedule and metrics)")

    def scheduled(self, initial: float, step: int) -> float:
        return self.schedule.value(initial, step)

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Resolve a whole-run schedule (``steps: null``) to trainer.max_steps before the fit starts."""
        self._check_initialized()
        if stage == "fit":
            resolved = self.schedule.over(trainer.max_steps)
            self._run_length = resolved.steps if resolved is not self.schedule else None
            self.schedule = resolved

    # A whole-run schedule's length is fixed by the run that started it: a checkpoint keeps it, so
    # that resuming with a larger trainer.max_steps (extending a finished run) does not re-anneal a
    # coefficient that has already reached `final`. Kept in the checkpoint dict, not `state_dict`,
    # so that stateless regularizers stay stateless for Lightning.
    _CKPT_KEY = "regularizer_schedule_steps"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._run_length is not None:
            checkpoint.setdefault(self._CKPT_KEY, {})[self.name] = self._run_length

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(self._CKPT_KEY, {}).get(self.name)
        if saved is None or self._run_length is None or saved == self.schedule.steps:
            return
        older = saved == trainer.max_steps  # code before whole-run schedules reached `final` on the last step
        log.warning(
            "%s: the checkpoint's run annealed its schedule over %d RL steps; keeping that length, not the %d "
            "of this run's trainer.max_steps=%d (%s)", self.name, saved, self.schedule.steps, trainer.max_steps,
            "a checkpoint written before a whole-run schedule reached `final` on the last step: its timing is kept"
            if older else "set schedule.steps to anneal over a different length",
        )
        self.schedule = replace(self.schedule, steps=int(saved))
        self._run_length = int(saved)

    def prepare(self, ctx: MiniBatchContext) -> None:
        """Called once per optimizer mini-batch, before its micro-batches."""

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        raise NotImplementedError

    def clip_bounds(self) -> tuple[Tensor, Tensor] | None:
        """With `sets_clip_range`: the per-token clip range (eps_low, eps_high) [n, T] of the prepared
        mini-batch, whose rows `shape` returns as TokenShaping.clip_low / clip_high. The learner
        prepares these regularizers first (ctx.clipped is None for them) and computes ctx.clipped
        for the others with it, so Clip-Cov's candidates follow the per-token range."""
        return None

    def clip_values(self) -> tuple[list[float], list[float]]:
        """With `sets_clip_range`: every eps_low and eps_high it may set, for the objective's
        start-up check (`Objective.check_token_clip`)."""
        return [], []

    def observe_old_logp(self, old_logp: Tensor, mask: Tensor) -> None:
        """Before each RL step's first update, on every rank: the rollout log-probs [n, T] and response
        mask of this rank's trained rows (a decision over the step's tokens on all ranks is a
        collective here: Lopti's `portion` quantile). Default: nothing."""

    def observe_old_entropy(self, entropy: Tensor, mask: Tensor, step: int) -> None:
        """Right after `observe_old_logp`, on every rank: the rollout entropy [n, T] (`Rollout.entropy`)
        and mask of this rank's trained rows of RL step `step` (EPO's history). Default: nothing."""

    def observes_rollout(self) -> bool:
        """True when this RL step's `observe_rollout` is wanted (the same on every rank). Default: never."""
        return False

    def observe_rollout(self, topp_entropy: Tensor, mask: Tensor) -> None:
        """With `observes_rollout()`: the nucleus entropy (`needs_topp_entropy`'s) [n, T] and mask of this rank's
        kept rows of the whole rollout under the rollout policy, before the step's first update (SIREN's anchor)."""

    def rollout_request(self, step: int, num_prompts: int) -> tuple[int, float] | None:
        """With `draws_rollout`: called on every rank before RL step `step`'s update with its number
        of prompts; (n, temperature): its first n prompts get group_size more responses each, drawn
        at that temperature with the rollout generator and scored like the rollout; None: none this
        step. The same on every rank (sampling is a collective)."""
        return None

    def choose_extra(self, advantages: Tensor) -> Tensor:
        """With `draws_rollout`: bool [M] over this rank's M extra responses, given their sequence
        advantages (the run's estimator over their own groups): the ones the update trains on, with
        advantage 1, in place of as many of this rank's first rollout rows (called on every rank:
        a choice over all ranks' responses is a collective)."""
        raise NotImplementedError

    def check_rewards(self, rewards, binary_for: str | None) -> None:
        """Start-up check of the run's `RewardSet` (and of `binary_for`, the setting that needs 0/1
        rewards, or None): raise a ValueError naming the field. Default: any rewards."""

    def check_loss(self, loss, rollout) -> None:
        """Start-up check against `model.loss` and `model.rollout` (`LossSettings`, `RolloutSettings`):
        raise a ValueError naming the field. Default: any settings."""

    def observe_rewards(self, rewards: Tensor, group_size: int) -> None:
        """Before each RL step's update, on every rank: the rewards [B*G] (prompt-major, after the
        overlong penalty, before any outcome shaping) of this rank's B prompts, row j answering
        prompt j // G, the index that `MiniBatchContext.groups` holds. Default: nothing."""

    def check_objective(self, objective) -> None:
        """Start-up check of the run's policy objective (`check_objective_stack`): raise a
        ValueError naming both where this regularizer cannot act on it. Default: any objective."""

    def kl_scale(self) -> Tensor | None:
        """A per-token scale [n, T] of the prepared mini-batch for ReferenceKL's penalty (all multiply), or None."""
        return None

    def phase_tokens(self, ctx: MiniBatchContext) -> Tensor | None:
        """With `update_phases` > 1: bool [n, T], the valid tokens that phase `ctx.phase` of this
        mini-batch trains (the learner puts them in `ctx.in_phase` before any `prepare`). Default: None."""
        return None

    def zeroed_tokens(self) -> Tensor | None:
        """The prepared mini-batch's tokens whose objective weight this sets to 0 (None: none), for `reads_zeroed`."""
        return None

    def charts(self) -> dict[str, list[str]]:
        """This regularizer's TensorBoard Custom Scalars charts (lit_covrl.dashboard): category ->
        tag regexes, one chart each, matched from the start of a tag to its end: the loss
        contribution under "Control" and the recorded keys listed in `chart_metrics` (default: the
        coefficient under "Entropy"; categories not yet in the layout are added after it)."""
        n = re.escape(self.name)
        out: dict[str, list[str]] = {"Control": [f"reg/{n}/loss"]}
        for category, keys in self.chart_metrics.items():
            out.setdefault(category, []).extend(f"reg/{n}/{re.escape(k)}" for k in keys)
        return out

    # metrics -----------------------------------------------------------------------------------
    def record(self, key: str, value: float | Tensor, *, when: bool | Tensor = True) -> None:
        """Keep a scalar for this RL step; the module logs the mean under reg/<name>/<key>
        (keys that already contain a '/' are logged as given). A tensor stays on its device until
        the step's metrics are popped (no host sync per mini-batch); `when` (a bool, or a 0-dim
        bool tensor read then too) leaves the value out of the mean where false, and the key is
        not logged for a step where it is false every time."""
        if isinstance(value, Tensor):
            value = value.detach()
        self._metrics.setdefault(key, []).append((value, when))

    def pop_metrics(self) -> dict[str, float]:
        out = {}
        for k, recorded in self._metrics.items():
            kept = [float(v) for v, when in recorded if bool(when)]
            if kept:
                out[k if "/" in k else f"reg/{self.name}/{k}"] = sum(kept) / len(kept)
        self._metrics.clear()
        return out


class ClipRangeRegularizer(Regularizer):
    """A regularizer that sets every token's clip range (`sets_clip_range`; Archer, BAPO): its
    `prepare` stores the mini-batch's per-token (eps_low, eps_high) [n, T] in `_bounds`, which
    `clip_bounds` returns and `shape` gives, for the micro-batch's rows, as TokenShaping.clip_low /
    clip_high. A subclass still defines `clip_values` (every bound it may set)."""

    sets_clip_range = True
    _bounds: tuple[Tensor, Tensor] | None = None

    def clip_bounds(self) -> tuple[Tensor, Tensor] | None:
        return self._bounds

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self._bounds is not None, "prepare() must run before shape()"
        lo, hi = self._bounds
        return TokenShaping(clip_low=lo[batch.rows].to(batch.logp.dtype), clip_high=hi[batch.rows].to(batch.logp.dtype))
