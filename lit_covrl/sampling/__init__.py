"""Rollout samplers: one interface (`Sampler.sample -> Rollout`), chosen in YAML as `model.sampler`.

    model:
      sampler:
        class_path: lit_covrl.sampling.StaticCacheSampler
        init_args: {graphs: cuda_graph}

- `KVCacheSampler`: the model's dynamic KV cache, one forward and one host sync per token.
- `StaticCacheSampler`: a preallocated static KV cache, fixed (bucketed) shapes, the decoding
  step captured as a CUDA graph on CUDA, the finished-check read back every few steps.

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
    """The fastest sampler measured for this device type: on CUDA the static cache with CUDA
    graphs; on CPU the dynamic KV cache (no graphs to gain there, and the static cache attends
    over its whole bucketed length at every step)."""
    if torch.device(device).type == "cuda":
        return StaticCacheSampler(graphs="cuda_graph")
    return KVCacheSampler()
