"""Rollout samplers: one interface (`Sampler.sample -> Rollout`), chosen in YAML as `model.sampler`.

    model:
      sampler:
        class_path: lit_covrl.sampling.StaticCacheSampler
        init_args: {graphs: compile}

- `KVCacheSampler`: the model's dynamic KV cache, one forward and one host sync per token.
- `StaticCacheSampler`: a preallocated static KV cache, fixed (bucketed) shapes, the decoding
  step compiled (torch.compile reduce-overhead) or captured as a CUDA graph on CUDA, the
  finished-check read back every few steps.

`default_sampler(device, model)` is what `model.sampler: null` uses: the faster one measured for
the device type (docs/scaling.md, docs/benchmarks.md), among those that can decode the model.
"""
from __future__ import annotations

import logging

import torch

from lit_covrl.sampling.base import Sampler, draw_token, eos_ids, sample_token, token_distribution, top_p_filter
from lit_covrl.sampling.kv_cache import KVCacheSampler
from lit_covrl.sampling.static_cache import StaticCacheSampler
from lit_covrl.sampling.static_store import static_cache_unsupported

log = logging.getLogger("lit_covrl")

__all__ = [
    "Sampler", "KVCacheSampler", "StaticCacheSampler", "default_sampler", "draw_token", "eos_ids",
    "sample_token", "static_cache_unsupported", "token_distribution", "top_p_filter",
]


def default_sampler(device: torch.device | str, model: torch.nn.Module | None = None) -> Sampler:
    """The fastest sampler measured for this device type (figures in docs/scaling.md and
    docs/benchmarks.md): on CUDA the static cache with its decoding step compiled (torch.compile
    reduce-overhead; the hand-captured CUDA graph has not been timed on a GPU yet); on CPU the
    dynamic KV cache (no graphs to gain, and the static cache attends over its whole bucketed
    length at every step). A model the static cache cannot decode (sliding-window layers,
    `static_cache_unsupported`) gets the dynamic KV cache on CUDA too."""
    if torch.device(device).type == "cuda":
        config = getattr(model, "config", None)
        reason = None if config is None else static_cache_unsupported(config)
        if reason is None:
            return StaticCacheSampler(graphs="compile")
        log.info("rollout sampler: KVCacheSampler (the static cache cannot decode this model: %s)", reason)
    return KVCacheSampler()
