"""Kept for older imports: the sampling loop now lives in `lit_covrl.sampling`
(`KVCacheSampler` is this module's former `sample_responses`)."""
from __future__ import annotations

from lit_covrl.sampling import KVCacheSampler, top_p_filter
from lit_covrl.sampling.kv_cache import prefill as _prefill

__all__ = ["sample_responses", "top_p_filter", "_prefill"]


def sample_responses(model, prompt_ids, prompt_mask, **kwargs):
    """`KVCacheSampler().sample(model, prompt_ids, prompt_mask, **kwargs)` (same keyword arguments)."""
    return KVCacheSampler().sample(model, prompt_ids, prompt_mask, **kwargs)
