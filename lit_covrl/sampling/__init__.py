"""Rollout samplers: one interface (`Sampler.sample -> Rollout`), chosen in YAML as `model.sampler`.

    model:
      sampler:
        class_path: lit_covrl.sampling.StaticCacheSampler
        init_args: {graphs: compile}

- `KVCacheSampler`: the model's dynamic KV cache, one forward and one host sync per token.
- `StaticCacheSampler`: a preallocated static KV cache, fixed (bucketed) shapes, the decoding
  step compiled (torch.compile reduce-overhead) or captured as a CUDA graph on CUDA, the
  finished-check read back every few steps.

`default_sampler(device)` is what `model.sampler: null` uses: the faster one measured for the
device type (docs/scaling.md, docs/benchmarks.md).
"""
from __future__ import annotations

import torch

from lit_covrl.sampling.base import Sampler, draw_token, eos_ids, sample_token, token_distribution, top_p_filter
from lit_covrl.sampling.kv_cache import KVCacheSampler
from lit_covrl.sampling.static_cache import StaticCacheSampler

__all__ = [
    "Sampler", "KVCacheSampler", "StaticCacheSampler", "default_sampler", "draw_token", "eos_ids",
    "sample_token", "token_distribution", "top_p_filter",
]


def default_sampler(device: torch.device | str) -> Sampler:
    """The fastest sampler measured for this device type (figures in docs/scaling.md and
    docs/benchmarks.md): on CUDA the static cache with its decoding step compiled (torch.compile
    reduce-overhead; the hand-captured CUDA graph has not been timed on a GPU yet); on CPU the
    dynamic KV cache (no graphs to gain, and the static cache attends over its whole bucketed
    length at every step)."""
    if torch.device(device).type == "cuda":
        return StaticCacheSampler(graphs="compile")
    return KVCacheSampler()
