"""Sharded loading (`lit_covrl.sharding.load_sharded`, two gloo ranks) of a model whose layers hold
non-persistent buffers (RecurrentGemma keeps a rotary `inv_freq` in each layer), with activation
checkpointing wrapping those layers: rank 0 must find each buffer under its unwrapped name (it raised
KeyError and left rank 1 waiting in the broadcast), and every rank gets rank 0's values."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests import _dist


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("inv", torch.zeros(2), persistent=False)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])


def _full() -> Toy:
    model = Toy()
    for i, layer in enumerate(model.layers):
        layer.inv.copy_(torch.tensor([1.0, 2.0]) * (i + 1))
    return model


def _empty() -> Toy:
    with torch.device("meta"):
        return Toy()


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from lit_covrl.sharding import load_sharded

    _dist.elastic_env(rank, 2, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        model = load_sharded(_full, _empty, lambda m: apply_activation_checkpointing(
            m, check_fn=lambda x: isinstance(x, Layer)), torch.device("cpu"))
        message = repr({name: buf.tolist() for name, buf in model.named_buffers()})
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(message)


@pytest.mark.slow
def test_layer_buffers_load_through_activation_checkpointing_wrappers(tmp_path):
    _dist.spawn(_worker, (_dist.free_port(), str(tmp_path)), timeout_s=120, what="the sharded load")
    want = repr({"layers.0._checkpoint_wrapped_module.inv": [1.0, 2.0], "layers.1._checkpoint_wrapped_module.inv": [2.0, 4.0]})
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == [want, want]
