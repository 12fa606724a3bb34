"""The few collectives the RL step needs, as no-ops in a single process.

Selection and token means must be global over the optimizer mini-batch across ranks (unlike the
reference code, which selects per micro-batch per GPU), so that results do not depend on the
number of devices. Rank r's rows come after rank r-1's in the global order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a tensor must live for this process group's collectives: NCCL only moves CUDA
    tensors, gloo takes CPU ones (and a single process anything). The helpers below move their
    input there and the result back, so callers may pass tensors from any device."""
    if not _active():
        return torch.device("cpu")
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def _all_reduce(x: Tensor, op) -> Tensor:
    if not _active():
        return x
    y = x.detach().to(collective_device(), copy=True)  # e.g. a CPU tensor under NCCL
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def all_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (a new tensor; `x` is untouched)."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_max(x: Tensor) -> Tensor:
    """Elementwise max of `x` over ranks (a new tensor; `x` is untouched)."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def all_max_int(x: int) -> int:
    if not _active():
        return x
    return int(all_max(torch.tensor([x], dtype=torch.long)).item())


def all_true(flag: bool) -> bool:
    """True only when every rank says True (used to stop decoding in lock-step)."""
    if not _active():
        return flag
    return int(all_sum(torch.tensor([0 if flag else 1], dtype=torch.long)).item()) == 0


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate every rank's [n_r, ...] tensor along dim 0 (n_r may differ; trailing dims must
    match). Returns the global tensor and this rank's row offset in it."""
    if not _active():
        return x, 0
    dev = collective_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=dev))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    full = torch.cat([p[:s] for p, s in zip(parts, sizes)], 0).to(x.device)
    return full, sum(sizes[: dist.get_rank()])


def gather_objects(items: list) -> tuple[list, int]:
    """Concatenate every rank's list of picklable items (in rank order); also this rank's offset
    in the result."""
    if not _active():
        return list(items), 0
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part], sum(len(p) for p in parts[: dist.get_rank()])
