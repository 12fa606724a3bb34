"""FSDP2 (`fully_shard`) for the policy and the reference model, as pure helpers.

Used by `load_model` (`GRPOModule.configure_model`) when the trainer runs Lightning's
`ModelParallelStrategy` (which hands the module a device mesh); every other strategy leaves the
models alone.

    shard_model(model, mesh, mixed_precision="bf16", activation_checkpointing=True)

shards each decoder layer, then the root (embeddings, final norm, LM head), over the mesh's data-
parallel dimension. Parameters stay in their loaded dtype (fp32 master weights, sharded, as the
optimizer sees them); with `mixed_precision="bf16"` each forward all-gathers them in bf16 and
gradients are reduce-scattered in fp32.

Rollouts under sharding: by default every forward all-gathers each layer's parameters and frees
them afterwards, so a T-token rollout gathers the whole model T times. `gathered_for_rollout`
instead keeps the gathered parameters from the first decoding forward to the end of the rollout
(one all-gather per layer per rollout; costs one unsharded copy of the model in memory while
sampling). Both are exact; see docs/scaling.md for measurements.
"""
from __future__ import annotations

import os

from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator

import torch
from torch import nn

from lit_covrl.policy import empty_policy, load_policy

MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
ROLLOUT_GATHER = ("per_forward", "once")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (the FSDP / checkpoint units):
    modules whose class is named in `model._no_split_modules`, else `model.model.layers`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    inner = getattr(getattr(model, "model", None), "layers", None)
    if inner is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    return list(inner)


def data_parallel_mesh(mesh):
    """The 1-D data-parallel sub-mesh of Lightning's ("data_parallel", "tensor_parallel") mesh."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError("lit_covrl shards over data parallelism only: use tensor_parallel_size=1")
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_model(
    model: nn.Module,
    mesh,
    *,
    mixed_precision: str | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Apply activation checkpointing (optional) and `fully_shard` to every decoder layer, then to
    the root. Returns the same module object (FSDP2 shards in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": data_parallel_mesh(mesh)}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=MIXED_PRECISION[mixed_precision], reduce_dtype=torch.float32
        )
    if activation_checkpointing:
        checkpoint_layers(model)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def load_sharded(
    load_full: Callable[[], nn.Module],
    build_empty: Callable[[], nn.Module],
    shard: Callable[[nn.Module], None],
    device: torch.device,
) -> nn.Module:
    """A sharded model whose full weights only rank 0 ever holds (`empty_init`-style loading).

    Every rank builds the architecture on the meta device (`build_empty()`: no memory), shards it
    (`shard(model)`) and allocates only its own shards on `device`; rank 0 alone reads the full
    model (`load_full()`, on the CPU) and broadcasts it tensor by tensor, every rank keeping its
    shard. Peak memory on rank 0: one full CPU copy + its shards; on every other rank: its shards
    + one full tensor in flight, so a 7B fp32 model is never materialized on every rank.
    Buffers are broadcast too (non-persistent ones, e.g. rotary `inv_freq`, are in no state dict).
    A collective: every rank must call it. If rank 0 cannot load the model (a missing file,
    non-finite weights, ...), every rank raises (the others name rank 0's error) instead of waiting
    for a broadcast that never comes.
    """
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full, error = None, [None]
    if dist.get_rank() == 0:
        try:
            full = load_full()
        except Exception as err:  # re-raised below; the other ranks raise too
            error = [f"{type(err).__name__}: {err}"]
            dist.broadcast_object_list(error, src=0)
            raise
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"rank 0 could not load the model: {error[0]}")
    model = build_empty()
    shard(model)
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full.state_dict() if full is not None else {}, options=options)
    source = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if full is not None:  # the sharded model's names may carry activation checkpointing's wrapper
                buf.copy_(source[name.replace(_CHECKPOINT_PREFIX, "")])
            dist.broadcast(buf, src=0)
    return model


def load_model(spec: str, *, dtype: str, frozen: bool, system, mesh=None,
               device: torch.device | None = None) -> nn.Module:
    """The policy (`frozen=False`) or a frozen reference model (eval mode, no gradients), ready to
    train: with a device mesh, sharded with FSDP2 (`shard_model`, rank 0 alone reading the full
    weights, `load_sharded`; a collective); without one, loaded whole. `system` (the module's
    `SystemSettings`) gives the mixed precision and activation checkpointing, which only the
    policy gets (a frozen model has nothing to recompute)."""
    checkpointed = system.activation_checkpointing and not frozen

    def build(loader) -> nn.Module:
        model = loader(spec, dtype=dtype)
        return model.eval().requires_grad_(False) if frozen else model

    if mesh is None:
        model = build(load_policy)
        if checkpointed:
            checkpoint_layers(model)
        return model

    def shard(model: nn.Module) -> None:
        shard_model(model, mesh, mixed_precision=system.fsdp_mixed_precision, activation_checkpointing=checkpointed)

    return load_sharded(lambda: build(load_policy), lambda: build(empty_policy), shard, device)


def shard_loaded(model: nn.Module, mesh, *, system, frozen: bool) -> nn.Module:
    """Shard in place a model that every rank already holds whole: one built before the trainer
    handed the module its device mesh (`module.configure_model()` called before `trainer.fit`).
    Rank 0's weights and buffers are broadcast into every rank's shards, as `load_model` loads them,
    so the run is the one a module built inside the fit makes. A collective: every rank must call it."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, CheckpointWrapper
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    def plain(name: str) -> str:
        return name.replace(_CHECKPOINT_PREFIX, "")

    # rank 0's tensors as loaded (sharding replaces the parameters; it moves the buffers as they are)
    full = {plain(k): v for k, v in model.state_dict().items()} if dist.get_rank() == 0 else {}
    checkpointed = system.activation_checkpointing and not frozen  # once: a policy loaded whole has it
    checkpointed = checkpointed and not any(isinstance(m, CheckpointWrapper) for m in model.modules())
    shard_model(model, mesh, mixed_precision=system.fsdp_mixed_precision, activation_checkpointing=checkpointed)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    with torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
    return model


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing), with
    or without sharding. Works in eval mode too (the policy is kept in eval mode: no dropout in
    RL), unlike HF's `gradient_checkpointing_enable`, which only acts in train mode."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    ids = {id(m) for m in decoder_layers(model)}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in ids)


def check_strategy(strategy, system) -> None:
    """Start-up check of the trainer's strategy against the module's `model.system` settings."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    name = type(strategy).__name__
    if isinstance(strategy, FSDPStrategy) or "DeepSpeed" in name:
        raise ValueError(
            f"trainer.strategy={name} is not supported: it wraps the whole LightningModule, while "
            "lit_covrl samples rollouts inside training_step with the policy's own forward. Use "
            "`class_path: lit_covrl.sharding.FSDP2Strategy` (sharded) or `ddp` (replicated)."
        )
    if system.fsdp_mixed_precision is not None and not isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            f"model.system.fsdp_mixed_precision={system.fsdp_mixed_precision!r} needs trainer.strategy "
            f"lit_covrl.sharding.FSDP2Strategy (got {name}); without sharding use "
            "trainer.precision: bf16-mixed and model.system.fsdp_mixed_precision: null"
        )
    processes = getattr(strategy, "world_size", 1)
    if system.compile_update and (isinstance(strategy, ModelParallelStrategy) or processes > 1):
        raise ValueError(
            f"model.system.compile_update=True is not supported with trainer.strategy={name} "
            f"({processes} process(es)): the compiled update forward was tested on one device without "
            "FSDP2 only. Turn model.system.compile_update off, or train on one device without sharding."
        )


def check_checkpoint_strategy(ckpt_path: str | None, strategy) -> None:
    """A sharded checkpoint folder (FSDP2's distributed checkpoint) loads only under FSDP2: other
    strategies read a checkpoint *file* and fail deep in the restore with IsADirectoryError."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if ckpt_path and os.path.isdir(ckpt_path) and not isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            f"--ckpt_path {ckpt_path} is a sharded checkpoint folder (FSDP2's distributed checkpoint), which "
            f"trainer.strategy={type(strategy).__name__} cannot load: resume it with trainer.strategy: fsdp2 "
            "(one device works too), or write a plain model folder with `lit-covrl export`"
        )


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gathered_for_rollout(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Keep every FSDP unit's parameters gathered from its first forward until the block ends
    (one all-gather per layer per rollout instead of one per decoding step), then free them."""
    if not enabled or not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


def full_state_dict(model: nn.Module, *, rank0_cpu: bool = False) -> dict[str, torch.Tensor]:
    """A plain full state dict of a possibly sharded model: CPU tensors when it is not sharded,
    full tensors on the model's device when it is (a collective then: every rank must call it, and
    every rank gets the full dict). With `rank0_cpu`, a sharded model's tensors are gathered one
    at a time into CPU memory of rank 0 alone, the other ranks getting an empty dict (no full
    copy on any device: what a checkpoint written by rank 0 needs)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_cpu))


def _strategy_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(_strategy_base()):
    """Lightning's `ModelParallelStrategy` with pure data parallelism over every process of every
    node (its "auto" default would make the devices of a node a tensor-parallel group), so that
    `trainer.num_nodes` is the only knob a multi-node launch needs. GRPOModule then shards with
    FSDP2 in `configure_model`. `process_group_backend` defaults to nccl on GPU, gloo on CPU.

        trainer:
          strategy:
            class_path: lit_covrl.sharding.FSDP2Strategy

    or, with the defaults, `strategy: fsdp2` (`--trainer.strategy fsdp2`).
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        """
        Args:
            save_distributed_checkpoint: one shard file per rank (true) or one full `.ckpt` (false).
            process_group_backend: null = nccl on GPU, gloo on CPU.
            timeout: collective timeout (null = torch's default).
        """
        from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout or default_pg_timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """This strategy restores a checkpoint after building the optimizer, loading its state into
        the one configured: another optimizer class failed there with a missing-key error (SGD after
        AdamW) or, worse, took the state and AdamW's param groups (Adam after AdamW trained on as
        AdamW). The saved run's optimizer is compared first (`resume_check.check_optimizer_class`),
        from the folder's metadata file or, memory-mapped, the single file."""
        from pathlib import Path

        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME

        from lit_covrl.resume_check import check_optimizer_class

        path = Path(self.broadcast(str(checkpoint_path)))
        meta = path / _METADATA_FILENAME if path.is_dir() else path
        if self.optimizers and meta.is_file():  # a fit (validate and test build no optimizer)
            saved = torch.load(meta, map_location="cpu", weights_only=False, mmap=not path.is_dir())
            check_optimizer_class(saved, self.optimizers)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A distributed checkpoint folder is written whole into `.<name>.<random>.tmp` next to
        it, fsynced, then swapped in (`lit_covrl.checkpointing.replace_path`): a failed write on
        any rank, or a kill, leaves the previous checkpoint at the name. Single files go through
        the strategy's CheckpointIO (atomic with `AtomicCheckpointIO`)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        import shutil
        from pathlib import Path

        from torch.distributed.checkpoint.api import CheckpointException

        from lit_covrl import distributed
        from lit_covrl.atomic_files import CheckpointWriteError, fsync_tree, replace_path, temporary_name

        path = Path(self.broadcast(str(filepath))).absolute()
        tmp = Path(self.broadcast(temporary_name(path)))
        error = None
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)
        except (Exception, CheckpointException) as err:  # (a BaseException) reported on every rank below
            error = err
        ok = distributed.all_true(error is None)
        if self.global_rank == 0:
            try:
                if ok:
                    fsync_tree(tmp)
                    replace_path(tmp, path)
            except OSError as err:
                error, ok = err, False
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        ok = distributed.all_true(ok)
        if not ok:
            if isinstance(error, CheckpointException):  # one line per failed rank, not their tracebacks
                cause = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(error.failures.items()))
            else:
                cause = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
            raise CheckpointWriteError(
                f"could not write distributed checkpoint {str(path)!r}: {cause} (temporary folder {str(tmp)!r} "
                "removed; the checkpoint at that name, if any, is the previous complete one)"
            ) from error

# Lightning names its strategies in a registry: `strategy: fsdp2` (YAML) and `--trainer.strategy
# fsdp2` select FSDP2Strategy with its defaults, and so does the dotted class path given as a plain
# string (the `class_path:` form, which takes init_args, works without the registry). Lightning
# lower-cases strategy names before the lookup.
STRATEGY_NAMES = ("fsdp2", "lit_covrl.sharding.fsdp2strategy")


def register_strategy() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    for name in STRATEGY_NAMES:
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, FSDP2Strategy, description="lit_covrl FSDP2: data-parallel fully_shard")


register_strategy()
