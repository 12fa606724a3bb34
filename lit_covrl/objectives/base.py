"""The policy objective: the per-token loss the learner aggregates, before regularizer shaping.

An `Objective` answers three questions about one micro-batch (or mini-batch) of tokens:

    token_loss(logp, old_logp, advantages, mask)    -> [n, T] loss (0 outside mask, grad via logp)
    clipped_tokens(logp, old_logp, advantages, mask) -> [n, T] bool: valid tokens it gives zero
                                                       gradient (fills MiniBatchContext.clipped,
                                                       so e.g. Clip-Cov's candidates follow it)
    stats(logp, old_logp, advantages, mask, num_tokens) -> {approx_kl, clip_frac, clip_frac_low,
                                                       clip_frac_high}, logged under policy/

`GRPOModule(objective=...)` takes one by `class_path` (`model.objective` in YAML); without it the
module builds `PPOClip` from its own `clip_low` / `clip_high` / `dual_clip` / `logratio_clamp`.
Regularizers compose with every objective: the learner feeds the objective the advantages plus
every regularizer's advantage shift, multiplies its token loss by their weights, adds their
penalties. A regularizer may also set a per-token clip range (`TokenShaping.clip_low` /
`clip_high`, eps per token; Archer's): the learner passes it as `clip=(eps_low, eps_high)` to all
three methods, where it replaces the objective's clip_low / clip_high on both sides (PPOClip's
clip, CE-GPPO's clip and kept gradient, CISPO's IS-weight cap; dual-clip and the log-ratio clamp
stay the objective's). Objectives with `token_clip = False` (GSPO, which clips whole sequences,
and any objective that does not take `clip`) are refused with such a regularizer at start-up.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from lit_covrl.algorithms import ppo_clipped_tokens, ppo_stats, ppo_token_loss

__all__ = ["Objective", "PPOClip", "clip_kw", "resolve_objective"]


def check_clip(owner: str, clip_low: float | None, clip_high: float | None, logratio_clamp: float | None) -> None:
    for field, v in (("clip_low", clip_low), ("clip_high", clip_high)):
        if v is not None and not v >= 0:  # NaN included
            raise ValueError(f"{owner}.{field}={v!r} is invalid: must be >= 0 or null")
    if clip_low is not None and not clip_low <= 1:
        raise ValueError(f"{owner}.clip_low={clip_low!r} is invalid: must be <= 1 "
                         "(the ratio is clipped at 1 - clip_low >= 0)")
    if logratio_clamp is not None and not logratio_clamp > 0:
        raise ValueError(f"{owner}.logratio_clamp={logratio_clamp!r} is invalid: must be > 0 or null")


class Objective:
    """Base class of policy objectives (see the module docstring)."""

    run_name: str | None = None  # its part of a run's method name (`dashboard.method_name`); None: GRPO's
    token_clip: bool = False  # its methods take clip=(eps_low, eps_high) per token (see the module docstring)
    ratio_weighted_positive: bool = True  # its A > 0 tokens weigh PPO's min(r, 1 + eps_high) (ASPO's: 1 / r)

    def check_token_clip(self, lows: list[float], highs: list[float], owner: str) -> None:
        """Start-up check of the per-token clip range that regularizer `owner` may set, eps_low in
        `lows`, eps_high in `highs`: refused where the objective does not take one."""
        if not self.token_clip:
            why = ("GSPO clips whole sequences by their sequence ratio, not tokens" if type(self).__name__ == "GSPO"
                   else "its token_clip is False")
            short = owner.split(" (")[0]  # "Archer (regularizer 'archer')": named in full once
            raise ValueError(f"{owner} sets a per-token clip range, which the objective {type(self).__name__} does not "
                             f"take ({why}); use PPOClip, CEGPPO or CISPO with {short}, or leave {short} out")

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def clipped_tokens(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def stats(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
              num_tokens: float | Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def stat_names(self) -> list[str]:
        """The keys of `stats`, in a fixed order (the same on every rank)."""
        z = torch.zeros(1, 1)
        return list(self.stats(z, z, z, z))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class PPOClip(Objective):
    """PPO's clipped surrogate (Schulman et al. 2017), decoupled clip range (DAPO clip-higher),
    optional dual-clip (Ye et al. 2020) and log-ratio clamp: `lit_covrl.algorithms.ppo_token_loss`."""

    def __init__(
        self,
        clip_low: float | None = 0.2,
        clip_high: float | None = 0.2,
        dual_clip: float | None = None,
        logratio_clamp: float | None = 20.0,
    ) -> None:
        """
        Args:
            clip_low: lower clip epsilon (null = no lower clip).
            clip_high: upper clip epsilon (null = no upper clip; 0.28 = DAPO clip-higher).
            dual_clip: dual-clip constant c > 1 for negative advantages (null = off).
            logratio_clamp: clamp of logp - old_logp before exp (null = off).
        """
        check_clip("PPOClip", clip_low, clip_high, logratio_clamp)
        if dual_clip is not None and not dual_clip > 1:  # NaN included
            raise ValueError(f"PPOClip.dual_clip={dual_clip!r} is invalid: must be > 1 or null")
        self.clip_low, self.clip_high = clip_low, clip_high
        self.dual_clip, self.logratio_clamp = dual_clip, logratio_clamp

    token_clip = True

    def _kw(self, clip=None) -> dict:
        return clip_kw(self, clip)

    def token_loss(self, logp, old_logp, advantages, mask, clip=None):
        return ppo_token_loss(logp, old_logp, advantages, mask, dual_clip=self.dual_clip, **self._kw(clip))

    def clipped_tokens(self, logp, old_logp, advantages, mask, clip=None):
        return ppo_clipped_tokens(logp, old_logp, advantages, mask, dual_clip=self.dual_clip, **self._kw(clip))

    def stats(self, logp, old_logp, advantages, mask, num_tokens=None, clip=None):
        return ppo_stats(logp, old_logp, advantages, mask, num_tokens=num_tokens, **self._kw(clip))


def clip_kw(objective, clip) -> dict:
    """The clip keyword arguments of `objective`'s algorithm functions: its clip_low / clip_high,
    or the per-token (eps_low, eps_high) `clip` in their place; its logratio_clamp."""
    low, high = (objective.clip_low, objective.clip_high) if clip is None else clip
    return dict(clip_low=low, clip_high=high, logratio_clamp=objective.logratio_clamp)


def resolve_objective(objective: Objective | None, loss) -> Objective:
    """The module's objective: `objective` as given, else PPOClip from the clip settings of
    `loss` (`lit_covrl.settings.LossSettings`). Setting both an explicit objective and a
    non-default clip setting is refused (the clip keys would silently do nothing)."""
    clip = loss.clip_args()
    if objective is None:
        return PPOClip(**clip)
    if not isinstance(objective, Objective):
        raise ValueError(f"model.objective={objective!r} is invalid: must be a lit_covrl.objectives.Objective "
                         "(class_path: lit_covrl.objectives.PPOClip, GSPO, CISPO, CEGPPO or ASPO)")
    defaults = type(loss)().clip_args()
    changed = [k for k, v in clip.items() if v != defaults[k]]
    if changed:
        cls = type(objective)
        params = inspect.signature(cls.__init__).parameters

        def advice(k: str) -> str:
            reset = f"--model.loss.{k} {'null' if defaults[k] is None else defaults[k]}"
            if k in params:
                return f"set model.objective.init_args.{k} instead and reset it with {reset}"
            return f"{cls.__name__} has no {k}: reset it with {reset}"

        raise ValueError(
            f"model.objective={objective!r} is set together with "
            f"{', '.join(f'model.loss.{k}={clip[k]!r}' for k in changed)}: the clip settings of model.loss only "
            f"configure the default PPOClip objective; {'; '.join(advice(k) for k in changed)}."
        )
    return objective
