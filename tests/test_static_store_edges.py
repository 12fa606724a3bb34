"""`kv_dtypes` (the static cache's stored dtypes) by hand (mutation review mut25): under autocast only
a float32 state is stored in the autocast dtype; a state of another dtype is stored as it is."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from lit_covrl.sampling.static_store import kv_dtypes


def _layer(key_dtype, value_dtype):
    return SimpleNamespace(keys=torch.zeros(1, 1, 1, 2, dtype=key_dtype), values=torch.zeros(1, 1, 1, 2, dtype=value_dtype))


def test_only_float32_states_take_the_autocast_dtype():
    """Kills mut25 S4 (every dtype cast to the autocast dtype)."""
    layers = [_layer(torch.float32, torch.bfloat16), _layer(torch.float64, torch.float16)]
    cpu = torch.device("cpu")
    assert kv_dtypes(layers, cpu) == ((torch.float32, torch.bfloat16), (torch.float64, torch.float16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kv_dtypes(layers, cpu) == ((torch.bfloat16, torch.bfloat16), (torch.float64, torch.float16))
