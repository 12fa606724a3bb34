"""Entropy controls that act through extra responses drawn for the update, as pure functions.

- aepo_temperature / aepo_choose (AEPO, Wang et al. 2025, "Arbitrary Entropy Policy Optimization",
  arXiv 2510.08141; 597358816/AEPO, verl/trainer/ray_trainer.py `fit`, `trainer.algorithm=AEPO`):
  besides the GRPO rollout, responses are drawn at the temperature T_high while the measured
  entropy is at or below the target H (T_low above it); of those, the ones whose group advantage
  exceeds a threshold are trained on with advantage 1 (REINFORCE on temperature-adjusted
  samples: sharper samples lower the entropy, flatter ones raise it), at most `sample_num` of
  them, half as many while the entropy is above the target.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor


def aepo_prompts(num_prompts: int, frac: float) -> int:
    """floor(frac * num_prompts), the prompts that get extra responses, with `frac` read as the
    decimal it was written as (0.29 * 100 is 28.999999999999996 in floating point: 29, not 28)."""
    return math.floor(Fraction(repr(float(frac))) * num_prompts)


def aepo_temperature(entropy: float | None, *, target: float, high: float, low: float) -> float:
    """The temperature of a step's extra samples: `high` while the measured `entropy` is at or
    below `target` (also when nothing is measured yet: the reference starts its measurement at
    0), else `low`."""
    return high if entropy is None or entropy <= target else low


def aepo_choose(advantages: Tensor, *, threshold: float, sample_num: int, halve: bool) -> Tensor:
    """bool [M]: the extra responses trained on, of M with these sequence advantages: the first
    (in row order) min(sample_num, P) // 2**halve of the P whose advantage exceeds `threshold`."""
    positive = advantages > threshold
    take = min(sample_num, int(positive.sum())) // (2 if halve else 1)
    return positive & (torch.cumsum(positive.long(), 0) <= take)
