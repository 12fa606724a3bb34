"""DCPO (Yang, Dou, Guo, Lu, Ju, Deng, Xin 2025, "DCPO: Dynamic Clipping Policy Optimization",
arXiv 2509.02333; the authors' code lime-RL/DCPO): two callbacks, one per part of the method, so
that each composes with the rest of the run (and either can be run alone).

- `DCPOClip`, dynamic-adaptive clipping: each token's PPO ratio bounds follow from its old
  probability q under |(r - 1) r q| <= eps, 0.5 + 0.5 sqrt(max(1 - 4 eps_low / q, 0)) <= r <=
  min(0.5 + 0.5 sqrt(1 + 4 eps_high / q), max_ratio) (`algorithms.dcpo_clip_bounds`): a
  low-probability token may move further, so fewer tokens are clipped. As the reference code
  computes it (verl/trainer/ppo/core_algos.py, get_clip_low_high and compute_policy_loss_dcpo with
  clip_type "dynamic"): q = exp(old_log_prob); the upper bound is clamped to max(clip_ratio_c, 10)
  (our `max_ratio`), and dual-clip (clip_ratio_c 10, set on the objective) applies to A < 0 tokens.
  It is a per-token `TokenShaping.clip_low / clip_high` (eps_low = 1 - lower bound, eps_high =
  upper bound - 1) that the objective takes in place of its own (PPOClip, CEGPPO, CISPO; GSPO
  refused; one clip-range regularizer per run). A pure function of each token's old log-prob: no
  micro-batch size or device count changes it. It acts only off policy (ratio 1 on policy: a
  start-up warning).
- `DCPOAdvantage`, smooth advantage standardization: each prompt's rewards are standardised by
  its group and by its statistics over every step it was trained on, mixed by the step count
  (`algorithms.smooth_advantages`), in place of `model.loss.advantage` (which must stay grpo,
  without QAE, pass@k or the unlikeliness reward). The statistics (steps, mean, std per prompt,
  keyed by its text as OutcomeExploration keys its counts) are gathered over all ranks each step,
  so every rank holds the same, and are checkpointed (`state_dict`): a resume is exact, and a
  state saved mid-step (nonfinite-stop.ckpt) drops that step's part when the resumed run redoes it.
  `max_prompts` bounds them: past it the least recently trained prompts are dropped first (None,
  the default: no bound, as the reference); recency is by step, then by an order of the step's
  prompts that no layout changes (`_recency_order`), so 1 and W devices keep the same prompts.

Defaults: the reference recipe recipe/dcpo/run_dcpo.sh (clip_ratio_low 0.2 from run_base.sh,
clip_ratio_high 0.28, clip_ratio_c 10, clip_type dynamic, adv_estimator dcpo, loss_agg_mode
only-token-mean, no KL loss, no entropy bonus). The paper itself could not be read here beyond its
abstract; the rules follow the reference code and its README's formulas.

Where we differ from the reference code: the bounds are computed in float64 (the old log-probs'
dtype there); the statistics are float64 (float32 tensors and Python floats there), and a std of
rounding noise (below 1e-9 x max(1, |mean|)) counts as 0, where the reference would divide by it;
the recipe's `use_old_mean` switch, which keeps the statistics across steps, is off in
run_base.sh / run_dcpo.sh unless USE_OLD_MEAN_ENABLE is set (then every step is GRPO's
standardization without eps): DCPOAdvantage always keeps them, as the paper describes;
its `coeff` (user_old_mean_ratio, a factor on the old mean and std, 1 by default) is left out; a
prompt drawn twice in one step reads the same earlier statistics for both groups and then pools
both, in the order of their values (the reference keeps the last group's pooling).
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import dcpo_clip_bounds, pooled_reward_stats, smooth_advantages
from lit_covrl.regularizers.base import ClipRangeRegularizer, MiniBatchContext, Regularizer
from lit_covrl.regularizers.checks import check_number, warn_inert_on_policy
from lit_covrl.regularizers.outcome import prompt_key
from lit_covrl.types import PolicyBatch, TokenShaping

log = logging.getLogger("lit_covrl")


class DCPOClip(ClipRangeRegularizer):
    """Dynamic-adaptive clipping: each token's ratio bounds widen as its old probability falls."""

    default_name = "dcpo_clip"
    chart_metrics = {"Control": ("ratio_low_mean", "ratio_high_mean")}

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.28, max_ratio: float = 10.0,
                 name: str | None = None) -> None:
        """
        Args:
            eps_low: eps of the lower bound's |(r - 1) r q| <= eps (recipe: clip_ratio_low 0.2; >= 0).
            eps_high: eps of the upper bound's (recipe: clip_ratio_high 0.28; >= 0).
            max_ratio: cap on the upper ratio bound (the reference's max(clip_ratio_c, 10) = 10; > 1).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.eps_low = check_number("DCPOClip.eps_low", eps_low)
        self.eps_high = check_number("DCPOClip.eps_high", eps_high)
        self.max_ratio = check_number("DCPOClip.max_ratio", max_ratio, low=1.0, low_open=True)

    def on_fit_start(self, trainer, pl_module) -> None:
        warn_inert_on_policy(self, pl_module, "the ratio is 1, so no token is clipped whatever its bounds")

    def clip_values(self) -> tuple[list[float], list[float]]:
        """The extremes of each eps: at q = 1 (the narrowest range) and q -> 0 (the widest)."""
        lo, hi = dcpo_clip_bounds(torch.zeros(1), eps_low=self.eps_low, eps_high=self.eps_high,
                                  max_ratio=self.max_ratio, dtype=torch.float64)
        return [float(lo), 0.5], [float(hi), self.max_ratio - 1.0]

    def prepare(self, ctx: MiniBatchContext) -> None:
        dtype = ctx.mask.dtype if ctx.mask.is_floating_point() else torch.float32
        lo, hi = dcpo_clip_bounds(ctx.old_logp, eps_low=self.eps_low, eps_high=self.eps_high,
                                  max_ratio=self.max_ratio, dtype=dtype)
        self._bounds = (lo, hi)
        m = ctx.mask.double()
        sums = distributed.all_sum(torch.stack([((1 - lo.double()) * m).sum(), ((1 + hi.double()) * m).sum(), m.sum()]))
        tokens = sums[2].clamp(min=1)
        self.record("ratio_low_mean", sums[0] / tokens, when=sums[2] > 0)
        self.record("ratio_high_mean", sums[1] / tokens, when=sums[2] > 0)


class DCPOAdvantage(Regularizer):
    """Smooth advantage standardization: the step's advantages from each prompt's group and its
    statistics over every step it was trained on (replaces model.loss.advantage)."""

    default_name = "dcpo_adv"
    replaces_advantages = True
    chart_metrics = {"Control": ("nonzero_adv_frac", "equal_reward_trained_frac")}

    def __init__(self, max_prompts: int | None = None, name: str | None = None) -> None:
        """
        Args:
            max_prompts: the most prompts whose statistics are kept (None: every prompt ever trained, the
                reference's); past it, after each step's pooling, the least recently trained prompts are
                dropped first (a dropped prompt starts again as new when it recurs). Recency is the order of
                pooling: by step, then within the step by a hash of (step, prompt) (`_recency_order`), which
                depends neither on the rank nor on where a rank holds the prompt, so every rank, and a run on
                any device count, drops the same prompts. A positive integer.
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        if max_prompts is not None and (isinstance(max_prompts, bool) or not isinstance(max_prompts, int)
                                        or max_prompts < 1):
            raise ValueError(f"DCPOAdvantage.max_prompts={max_prompts!r} is invalid: must be a positive integer, "
                             "or null to keep every prompt")
        self.max_prompts = max_prompts
        # prompt key -> [steps, mean, std, seen] of its rewards so far, least recently pooled first; seen:
        # the count of poolings (of any prompt) when it was last pooled, which orders a restored state
        self.stats: OrderedDict[str, list] = OrderedDict()
        self._seen = 0  # poolings so far (the largest `seen`)
        self._step: int | None = None  # the RL step pooled last
        self._undo: dict[str, list | None] = {}  # that step's pooled or dropped prompts before it (None: new)
        self._restarting = False  # loaded from a checkpoint, no step pooled since

    def check_loss(self, loss, rollout) -> None:
        """Start-up check against model.loss / model.rollout: the settings it replaces stay at GRPO's."""
        for field, default in (("advantage", "grpo"), ("baseline_quantile", None), ("pass_k", None),
                               ("unlikeliness", None)):
            value = getattr(loss, field)
            if value != default:
                raise ValueError(f"model.loss.{field}={value!r} is invalid with {type(self).__name__} ({self.name!r}), "
                                 f"which computes the advantages in its place: leave it at {default!r}")
        if rollout.filter_groups:
            log.warning("%s with model.rollout.filter_groups: the equal-reward groups it gives a gradient are "
                        "dropped (the DCPO recipe keeps them: filter_groups false)", type(self).__name__)

    def step_advantages(self, step: int, prompts: list, rewards: Tensor, group_size: int,
                        keep: Tensor | None = None) -> Tensor:
        """[B*G] advantages of this rank's B = len(prompts) groups of RL step `step` (prompt-major),
        from each prompt's statistics before the step; then every rank's trained groups (with a
        row in `keep` [B*G], default all: the groups filter_groups drops are not trained, so not
        pooled, as the reference filters before its advantages), gathered, are pooled into the
        statistics in `_recency_order` (a collective: every rank calls it once per step)."""
        self._begin(step)
        keys = [prompt_key(p) for p in prompts]
        prior = torch.tensor([self.stats.get(k, [0, 0.0, 0.0])[:3] for k in keys], dtype=torch.float64).view(-1, 3)
        times, mean, std = prior.to(rewards.device).unbind(1)
        adv, new_mean, new_std = smooth_advantages(rewards, group_size, times, mean, std)
        nonzero = (adv.view(-1, group_size) != 0).sum(dim=1)
        trained = [True] * len(keys) if keep is None else keep.view(-1, group_size).any(dim=1).tolist()
        rows, _ = distributed.gather_objects(list(zip(keys, new_mean.tolist(), new_std.tolist(), nonzero.tolist(),
                                                      times.tolist(), trained)))
        rows = sorted((row[:5] for row in rows if row[5]), key=lambda row: _recency_order(step, row))
        self._record(rows, group_size)
        for key, m, s, _, _ in rows:
            self._pool(key, m, s)
        self._drop_least_recent()
        self.record("tracked_prompts", float(len(self.stats)))
        return adv

    def _pool(self, key: str, new_mean: float, new_std: float) -> None:
        before = self.stats.pop(key, None)  # re-inserted last: the most recently pooled
        self._undo.setdefault(key, None if before is None else list(before))
        t, m, s = (before or [0, 0.0, 0.0])[:3]
        pm, ps = pooled_reward_stats(*(torch.tensor([v], dtype=torch.float64) for v in (t, m, s, new_mean, new_std)))
        self._seen += 1
        self.stats[key] = [int(t) + 1, float(pm), float(ps), self._seen]

    def _drop_least_recent(self) -> None:
        """Keep the `max_prompts` most recently pooled prompts (a step's undo keeps the dropped ones)."""
        dropped = 0
        while self.max_prompts is not None and len(self.stats) > self.max_prompts:
            key, before = self.stats.popitem(last=False)
            self._undo.setdefault(key, before)
            dropped += 1
        if self.max_prompts is not None:
            self.record("dropped_prompts", float(dropped))

    def _record(self, rows: list, group_size: int) -> None:
        groups = max(len(rows), 1)
        equal = [n for _, _, s, n, _ in rows if s == 0]
        self.record("nonzero_adv_frac", sum(n for *_, n, _ in rows) / (groups * group_size))
        self.record("revisited_frac", sum(t > 0 for *_, t in rows) / groups)
        self.record("equal_reward_frac", len(equal) / groups)
        self.record("equal_reward_trained_frac", sum(n > 0 for n in equal) / max(len(equal), 1), when=bool(equal))

    def _begin(self, step: int) -> None:
        """Start pooling step `step`; a resumed run redoing the step its state was saved in (a
        mid-step checkpoint) first takes that step's part back out."""
        if self._restarting and step == self._step:
            for key, before in self._undo.items():
                if before is None:
                    self.stats.pop(key, None)
                else:
                    self.stats[key] = list(before)
            self._order_by_recency()
        self._restarting = False
        self._step, self._undo = step, {}

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        return TokenShaping()  # acts on the step's advantages (`step_advantages`)

    def state_dict(self) -> dict:
        return {"stats": {k: list(v) for k, v in self.stats.items()}, "step": self._step,
                "undo": {k: None if v is None else list(v) for k, v in self._undo.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        # A state saved before `seen` existed (3-value entries) holds its prompts in the order they were
        # first pooled (that code updated an entry in place): they count as pooled in that order, so the
        # first drop after such a resume takes the earliest introduced prompts, not the least recently
        # trained (once per upgraded run; later steps order by recency). Its undo entries (a mid-step
        # state) take their prompt's place in that order, where the prompt stood before the step too.
        self.stats = OrderedDict((k, list(v) if len(v) > 3 else [*v, i]) for i, (k, v) in
                                 enumerate(state_dict["stats"].items(), 1))
        self._step = state_dict.get("step")
        self._undo = {k: None if v is None else list(v) if len(v) > 3 else [*v, self.stats.get(k, [0] * 4)[3]]
                      for k, v in state_dict.get("undo", {}).items()}
        self._restarting = True
        self._order_by_recency()  # (a smaller max_prompts than the saved run's drops at the next step's pooling)

    def _order_by_recency(self) -> None:
        self.stats = OrderedDict(sorted(self.stats.items(), key=lambda kv: kv[1][3]))
        self._seen = max((v[3] for v in self.stats.values()), default=0)


def _recency_order(step: int, row: tuple) -> tuple:
    """The sort key of a pooled group (prompt key, new mean, new std, ...) inside step `step`: a hash of
    (step, prompt key), then the group's values (a prompt drawn twice in the step). The gathered rows
    come in rank order, and W ranks hold a step's prompts interleaved by mini-batch when it makes
    several updates (`lit_covrl.streams.rank_offsets`), so that order changes with the device count;
    this one does not. Hashed with the step, no prompt is dropped first step after step (the key
    itself would always drop the alphabetically first of a step's prompts)."""
    return hashlib.blake2b(f"{step}\0{row[0]}".encode(), digest_size=8).digest(), row
