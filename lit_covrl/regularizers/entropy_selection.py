"""Entropy-based token selection and weighting, decided once per optimizer mini-batch over all
its tokens on all ranks (so the result does not depend on micro-batch size or device count, up to
float rounding at EntropyRatioClip's fixed band edges, which no tie tolerance can absorb):

- HighEntropyTokens (Wang et al. 2025, "Beyond the 80/20 rule", arXiv 2506.01939): policy
  gradient only on the tokens whose entropy is in the top `top_frac` of the mini-batch (paper:
  20%); the others get weight 0 but stay in the token-mean denominator (the paper's objective
  keeps the 1 / sum |o_i| normalizer). No reference code was released.
- SteerWeights (STEER, Hao et al. 2025, arXiv 2510.10150): weight each token's objective by
  its estimated one-step entropy change |Omega| mapped to [w_min, w_max] (the reference's
  run_linear.sh: 0.8, 1.2, linear), the largest change getting the smallest weight
  (github.com/zz-haooo/STEER).
- EntropyRatioClip (Su et al. 2025, arXiv 2512.05591): drop the objective's gradient on
  tokens whose entropy ratio H / H_old leaves (1 - low, 1 + high) (paper: 0.05, 0.05;
  github.com/Kwai-Klear/ERC).

The math is in `lit_covrl.algorithms.entropy_controls`. H is the current policy's entropy of the
sampled distribution (`ctx.entropy`: the rollout's while on policy, else a no-grad forward, or the
training forward when the mini-batch is one micro-batch), except in STEER's |Omega|, which reads the
rollout policy's (`ctx.old_entropy`), as the reference does.

Where we differ from the reference code, on purpose: the quantile (80/20) and STEER's min/max
normalization are over the whole optimizer mini-batch on all ranks, not per micro-batch per GPU
(TRL's and miles' 80/20 quantile, the STEER and ERC code compute them per micro-batch); H_old is
the entropy the sampler recorded, not a second training-engine forward, unless
`model.update.recompute_logprobs` is on (the default under bf16, where the sampler's entropies
differ from the training forward's by whole bf16 steps and ERC would clip unmoved tokens): then
it is the no-grad training forward's, the forward that gives the later updates' H (in float32
the two differ by ~1e-6, float rounding); ERC zeroes the token's loss instead of detaching it (same
gradient; the token stays in the denominator either way).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import STEER_MAPPINGS, entropy_ratio_keep, high_entropy_mask, steer_metric, steer_weights
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, check_ratio, select_globally, warn_inert_on_policy
from lit_covrl.types import PolicyBatch, TokenShaping


def _global_frac(selected: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the valid tokens of all ranks that `selected` marks."""
    s = distributed.all_sum(torch.stack([(selected.double() * mask.double()).sum(), mask.double().sum()]))
    return s[0] / s[1].clamp(min=1)


class _TokenWeights(Regularizer):
    """Keeps a [n, T] weight per token of the mini-batch, applied to the objective in `shape`."""

    def __init__(self, name: str | None) -> None:
        super().__init__(None, name)
        self.weights: Tensor | None = None

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self.weights is not None, "prepare() must run before shape()"
        return TokenShaping(weight=self.weights[batch.rows].to(batch.logp.dtype))

    def zeroed_tokens(self) -> Tensor | None:
        return None if self.weights is None else self.weights == 0


class HighEntropyTokens(_TokenWeights):
    """Policy gradient only on the top `top_frac` entropy tokens of each optimizer mini-batch."""

    needs_current_entropy = True
    default_name = "high_entropy_tokens"
    chart_metrics = {"Control": ("selected_frac",)}

    def __init__(self, top_frac: float = 0.2, name: str | None = None) -> None:
        """
        Args:
            top_frac: fraction of the mini-batch's valid tokens (highest entropy) that keep their
                policy gradient (paper: 0.2; 1.0 keeps all).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(name)
        check_ratio("HighEntropyTokens.top_frac", top_frac)
        self.top_frac = top_frac

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.entropy is not None, "the module must fill ctx.entropy when needs_current_entropy is set"
        tau = []

        def select(h: Tensor, m: Tensor) -> Tensor:
            keep = high_entropy_mask(h, m, top_frac=self.top_frac)
            tau.append(float(h[keep].min()) if keep.any() else float("nan"))
            return keep

        keep = select_globally([ctx.entropy, ctx.mask], select)
        self.weights = keep.to(ctx.mask.dtype)
        self.record("selected_frac", _global_frac(keep, ctx.mask))
        if tau[0] == tau[0]:  # not NaN
            self.record("entropy_threshold", tau[0])


class SteerWeights(_TokenWeights):
    """STEER: per-token weights from the estimated one-step entropy change, with p the current
    policy's probability of the sampled token and H the rollout policy's entropy (`ctx.old_entropy`),
    as the reference computes it: its update recomputes only the log-probs and reads the entropies
    stored by the old-log-prob pass (a later update of the rollout is off policy, where the two
    entropies differ)."""

    needs_current_logp = True
    default_name = "steer"
    chart_metrics = {"Control": ("weight_mean",)}

    def __init__(self, w_min: float = 0.8, w_max: float = 1.2, mapping: str = "linear",
                 name: str | None = None) -> None:
        """
        Args:
            w_min: weight of the token with the largest |Omega| (the reference recipes: 0.8).
            w_max: weight of the token with the smallest |Omega| (run_linear.sh: 1.2; ignored, 1.0, by
                the exponential mapping).
            mapping: "linear" (the reference's run_linear.sh) or "exponential" (its run_exp.sh, w_max 1.0).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(name)
        if not 0 < w_min <= w_max:
            raise ValueError(f"SteerWeights needs 0 < w_min <= w_max, got w_min={w_min!r}, w_max={w_max!r}")
        if mapping not in STEER_MAPPINGS:
            raise ValueError(f"SteerWeights.mapping={mapping!r}; valid: {list(STEER_MAPPINGS)}")
        self.w_min, self.w_max, self.mapping = w_min, w_max, mapping

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.old_entropy is not None, "the module must provide the rollout entropy"
        metric = steer_metric(ctx.advantages, ctx.old_entropy, ctx.logp, ctx.old_logp, ctx.mask).double()
        m = ctx.mask.bool()
        big = torch.finfo(torch.float64).max
        lo = torch.where(m, metric, big).min() if metric.numel() else torch.tensor(big, dtype=torch.float64)
        hi = torch.where(m, metric, -big).max() if metric.numel() else torch.tensor(-big, dtype=torch.float64)
        ext = distributed.all_max(torch.stack([-lo, hi]).to(metric.device))  # global min and max
        if ext[1] < 0:  # no valid token on any rank
            self.weights = torch.zeros_like(ctx.mask)
            return
        w = steer_weights(metric, ctx.mask, w_min=self.w_min, w_max=self.w_max, mapping=self.mapping,
                          bounds=(float(-ext[0]), float(ext[1])))
        self.weights = w.to(ctx.mask.dtype)
        s = distributed.all_sum(torch.stack([(w * ctx.mask).sum(), ctx.mask.double().sum()]))
        self.record("weight_mean", s[0] / s[1].clamp(min=1))
        self.record("omega_max", ext[1])


class EntropyRatioClip(_TokenWeights):
    """Entropy Ratio Clipping: no objective gradient where H / H_old leaves (1 - low, 1 + high)."""

    needs_current_entropy = True
    default_name = "entropy_ratio_clip"
    chart_metrics = {"Control": ("clipped_frac",)}

    def __init__(self, low: float = 0.05, high: float = 0.05, name: str | None = None) -> None:
        """
        Args:
            low: the ratio must exceed 1 - low (paper: 0.05).
            high: the ratio must stay below 1 + high (paper: 0.05).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(name)
        if not 0 < low <= 1 or not high > 0:
            raise ValueError(f"EntropyRatioClip needs 0 < low <= 1 and high > 0, got low={low!r}, high={high!r}")
        self.low, self.high = low, high

    def on_fit_start(self, trainer, pl_module) -> None:
        warn_inert_on_policy(self, pl_module, "the entropy ratio H / H_old is 1, so no token is ever clipped")

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.entropy is not None and ctx.old_entropy is not None, "needs ctx.entropy and ctx.old_entropy"
        keep = entropy_ratio_keep(ctx.entropy, ctx.old_entropy, ctx.mask, low=self.low, high=self.high)
        self.weights = keep.to(ctx.mask.dtype)
        self.record("clipped_frac", _global_frac(ctx.mask.bool() & ~keep, ctx.mask))
