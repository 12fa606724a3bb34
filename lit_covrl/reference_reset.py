"""ProRL's reference policy reset (Liu et al. 2025, arXiv 2505.24864): the frozen reference model
of a KL penalty is overwritten with the online policy's current weights, and the optimizer's
state is cleared, so that the KL term does not come to dominate a long run. `ReferenceKL`
(`reset_every`, or `reset_patience` through `StallWatch`) calls these between RL steps.

The reference is `GRPOModule._reference`, a plain attribute that checkpoints leave out while it
is the loaded model; once reset it is no longer reproducible from `model.reference_model`, so
`ReferenceKL` saves its weights in its callback state from the first reset on. Under FSDP2 the
reference is sharded like the policy (`lit_covrl.sharding`): each rank copies its own shards, and
the saved weights are the gathered full tensors (a collective), loaded back into the shards.
"""
from __future__ import annotations

import torch

from lit_covrl.sharding import full_state_dict, is_sharded

# wrappers that rename parameters without changing them (activation checkpointing, torch.compile)
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _plain(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {_plain(n): p for n, p in model.named_parameters()}


def _reshard(model: torch.nn.Module) -> None:
    """Every FSDP2 unit of a sharded model back to its sharded parameters: the root unit keeps the
    gathered ones after a forward (the reference's, which runs no backward)."""
    if is_sharded(model):
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def check_same_layout(reference: torch.nn.Module, policy: torch.nn.Module, field: str) -> None:
    """Refuse a reference whose parameters (names and shapes) are not the policy's: a reset copies
    the policy into it tensor by tensor. `field` names the setting in the error."""
    ref = {n: tuple(p.shape) for n, p in _params(reference).items()}
    pol = {n: tuple(p.shape) for n, p in _params(policy).items()}
    if ref != pol:
        diff = sorted(set(ref.items()) ^ set(pol.items()))[:3]
        raise ValueError(f"{field}: a reset copies the policy's weights into the reference model, but their "
                         f"parameters differ (first differences: {diff}); leave model.reference_model null "
                         "(a copy of model.model) or give it the policy's architecture")


@torch.no_grad()
def copy_policy_into(reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    """reference <- policy, parameter by parameter, each cast to the reference's dtype (its device
    kept); sharded (FSDP2 DTensors), shard by shard: the two are sharded alike, which is checked.
    The policy's buffers are left alone: they are constants of the architecture."""
    _reshard(reference)
    _reshard(policy)
    params = _params(policy)
    for name, ref_param in _params(reference).items():
        src = params[name].detach()
        if hasattr(ref_param, "placements") or hasattr(src, "placements"):
            if getattr(ref_param, "placements", None) != getattr(src, "placements", None) or \
                    ref_param.device_mesh != src.device_mesh:
                raise RuntimeError(f"reference reset: {name} is sharded unlike the policy's "
                                   f"({getattr(ref_param, 'placements', None)} vs {getattr(src, 'placements', None)})")
            ref_param.to_local().copy_(src.to_local())
        else:
            ref_param.copy_(src)


def clear_optimizer_state(optimizers) -> None:
    """Re-initialise every optimizer's per-parameter state (Adam's moments and step count start
    again at their first step); the parameter groups (learning rate, schedule) are kept."""
    for opt in optimizers:
        opt.state.clear()


def reference_weights(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's full state dict on the CPU, for a checkpoint (sharded: gathered tensor by
    tensor into rank 0's CPU memory, a collective that every rank calls; the other ranks get an
    empty dict: rank 0's callback state is the one a checkpoint keeps, and every rank loads it)."""
    return {k: v.detach().cpu().clone() for k, v in full_state_dict(reference, rank0_cpu=True).items()}


def load_reference_weights(reference: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load `reference_weights`' full state dict back (sharded: each rank keeps its shards)."""
    if not is_sharded(reference):
        reference.load_state_dict(weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(reference, weights, options=StateDictOptions(full_state_dict=True))


class StallWatch:
    """ProRL's trigger: a reset once held-out performance stalls. `observe` takes each validation's
    value of the monitored metric (higher is better); after `patience` validations in a row
    without a new best (a NaN is none), `due` turns true until the reset (`done`), and the count
    starts again. The best so far is kept across resets: a reset policy must beat it too."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: float | None = None
        self.stalls = 0
        self.due = False

    def observe(self, value: float) -> None:
        if value == value and (self.best is None or value > self.best):  # value == value: not NaN
            self.best, self.stalls = value, 0
            return
        self.stalls += 1
        if self.stalls >= self.patience:
            self.due, self.stalls = True, 0

    def done(self) -> None:
        self.due = False

    def state_dict(self) -> dict:
        return {"best": self.best, "stalls": self.stalls, "due": self.due}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.stalls, self.due = state["best"], int(state["stalls"]), bool(state["due"])
