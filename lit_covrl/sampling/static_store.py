"""The static KV cache that `StaticCacheSampler` decodes in (lit_covrl.sampling.static_cache):
which models it can serve (`static_cache_unsupported`: full attention in every layer), the batch
bucket policy (`batch_bucket`), the one cache per model and KV dtypes (`_Store`), each slot's views
of its leading rows with the mask, positions and captured step (`_Slot`), and the cache layers'
update that casts new states to the layer's dtypes (`_casting_update`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


def static_cache_unsupported(config) -> str | None:
    """Why this model config cannot decode through the static cache (None when it can): every layer
    must be a plain full-attention `StaticLayer` (not sliding-window, chunked or linear attention)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    try:
        cache = StaticCache(config=config, max_cache_len=1)  # layers are allocated lazily: cheap
    except Exception as err:  # noqa: BLE001 (any reason transformers gives is the answer)
        return f"transformers builds no static cache for it ({type(err).__name__}: {err})"
    other = {i: type(layer).__name__ for i, layer in enumerate(cache.layers) if type(layer) is not StaticLayer}
    if other:
        first = next(iter(other))
        return (f"{len(other)} of its {len(cache.layers)} layers are not full attention "
                f"(layer {first}: {other[first]}), and one key mask serves every layer")
    return None


def kv_dtypes(layers, device) -> tuple:
    """(key dtype, value dtype) per layer that the static cache stores: the prefill's dynamic cache's,
    but a float32 state in the autocast dtype while autocast is on (the rotary embedding makes keys
    float32 under bf16 autocast; transformers 5.17 also promotes values). Attention reads them in
    the autocast dtype anyway (autocast casts the inputs of SDPA and of eager attention's matmuls),
    so casting on the way in gives the same attention, and the keys take half the memory."""
    import torch

    low = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None

    def stored(dtype):
        return low if low is not None and dtype == torch.float32 else dtype

    return tuple((stored(dl.keys.dtype), stored(dl.values.dtype)) for dl in layers)


def batch_bucket(n: int) -> int:
    """Rows rounded up: the next power of two up to 64, then the next multiple of 64."""
    return 1 << max(n - 1, 0).bit_length() if n <= 64 else -(-n // 64) * 64


@dataclass
class _Store:
    """A model's KV cache: per layer keys and values [rows, kv_heads, length, head_dim], the largest
    batch bucket x the longest (bucketed) P + T seen. Every slot of the model decodes in its leading
    rows, so the sampler holds one cache per model (and KV dtypes: rollouts with and without
    autocast keep one each), not one per slot."""

    keys: list
    values: list

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def fits(self, nb: int, lb: int, layers, dtypes: tuple) -> bool:
        """Whether nb rows of lb positions fit, in the prefill cache's layers' shapes and the stored
        dtypes (`kv_dtypes`)."""
        def like(a: Tensor, b: Tensor, dtype) -> bool:  # all but rows and length
            return (a.shape[1], a.shape[3], a.dtype) == (b.shape[1], b.shape[3], dtype)

        return nb <= self.rows and lb <= self.length and len(layers) == len(self.keys) and all(
            like(k, dl.keys, kd) and like(v, dl.values, vd)
            for k, v, dl, (kd, vd) in zip(self.keys, self.values, layers, dtypes))


@dataclass
class _Slot:
    """Everything one (batch bucket, temperature, top-p) needs, kept across rollouts: views of the
    leading rows of the model's `_Store` (its full length), the mask, positions and the captured
    graph or compiled step, which read the store's addresses and are only valid while it lives."""

    store: _Store
    cache: object
    tok: Tensor         # [N_b, 1] token fed at this step
    pos: Tensor         # [N_b, 1] its position id
    key_valid: Tensor   # [N_b, L_b] bool: which cache positions a query may attend to
    mask: Tensor        # [N_b, 1, 1, L_b] what the model gets (bool, or additive float for eager)
    lengths: list = field(default_factory=list)  # every layer's cumulative_length (write position)
    cache_kw: str = "cache"  # the model's name for its cache argument (transformers 4 / 5)
    weights: dict | None = None  # low-precision Linear weights used instead of the model's (cast_weights_once)
    graph: object = None
    compiled: object = None
    outputs: tuple | None = None


def _casting_update(layer):
    """`layer.update` with the new key / value states cast to the layer's own dtypes first."""
    update = layer.update

    def cast_then_update(key_states: Tensor, value_states: Tensor, *args, **kwargs):
        return update(key_states.to(layer.keys.dtype), value_states.to(layer.values.dtype), *args, **kwargs)

    return cast_then_update
