"""The rollout sampler's random state: one generator per rank, saved and restored with checkpoints.

Ranks sample with different seeds (`seed + 1_000_003 * rank`) so that their responses differ. A
checkpoint holds every rank's state (gathered, because a sharded checkpoint keeps only rank 0's
copy of the module's extra state); a resume with the same world size continues every rank's
stream exactly, one with another world size reseeds every rank from its seed and the step
(`resumed_seed`; the prompt stream continues without repeating a batch,
`PromptDataModule.load_state_dict`).
"""
from __future__ import annotations

import hashlib
import logging

import torch
from torch import Tensor

from lit_covrl import distributed

log = logging.getLogger("lit_covrl")

RANK_STRIDE = 1_000_003  # seed offset between ranks


class RolloutRNG:
    """This rank's rollout generator (`.generator`), its checkpoint entries and their restore.

    Restoring is two-step, as Lightning's hooks are: `load` (from `on_load_checkpoint`, before the
    generator is placed on its device) keeps the saved state aside, `apply_pending` (from
    `on_train_start`) sets it.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._pending: Tensor | int | None = None  # a saved state, or a seed (`resumed_seed`)
        self._reseed = seed  # the seed to use instead of a saved state this generator cannot take

    def place(self, device: torch.device, rank: int) -> None:
        """A fresh generator on `device`, seeded for `rank`."""
        self.generator = torch.Generator(device=device).manual_seed(self.seed + RANK_STRIDE * rank)

    def save(self, checkpoint: dict) -> None:
        """Every rank's state under "rollout_generators" (collective: every rank calls it), and this
        rank's alone under "rollout_generator" for older readers."""
        state = self.generator.get_state()
        checkpoint["rollout_generators"] = distributed.gather_rows(state[None])[0]
        checkpoint["rollout_generator"] = state

    def load(self, checkpoint: dict, rank: int, world_size: int) -> None:
        """Keep this rank's saved state for `apply_pending`; when the world size changed, a seed of
        this rank and the checkpoint's step instead (`resumed_seed`)."""
        states = checkpoint.get("rollout_generators")
        reseed = self._reseed = self.resumed_seed(rank, int(checkpoint.get("global_step", 0)))
        if states is not None and len(states) == world_size:
            self._pending = states[rank].clone()
        elif states is not None:
            log.warning("checkpoint saved with %d ranks, resuming with %d: rollout samplers reseeded "
                        "(the prompt stream continues, samples start afresh)", len(states), world_size)
            self._pending = reseed
        elif world_size == 1:  # a checkpoint from before the states were gathered: rank 0's only
            self._pending = checkpoint.get("rollout_generator")
        else:  # ... which must not become every rank's stream (identical samples on all ranks)
            log.warning("checkpoint holds one rollout sampler state, resuming with %d ranks: samplers reseeded",
                        world_size)
            self._pending = reseed

    def resumed_seed(self, rank: int, step: int) -> int:
        """The seed of `rank` resuming at RL step `step` without a saved state; at step 0 the rank's
        usual seed, later a hash of (seed, rank, step), so that the resumed samples do not replay
        the run's first draws (a hash, not high bits: the CPU generator keeps 32 bits of a seed)."""
        if step == 0:
            return self.seed + RANK_STRIDE * rank
        digest = hashlib.blake2b(f"lit_covrl:rollout:{self.seed}:{rank}:{step}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def apply_pending(self) -> None:
        pending = self._pending
        if pending is not None and not isinstance(pending, int) and pending.numel() != self.generator.get_state().numel():
            # a state of another device type (a CUDA generator's is 16 bytes, a CPU one's 5,056):
            # a GPU run resumed on the CPU, or the reverse
            log.warning("checkpoint's rollout sampler state is not one a %s generator takes: sampler reseeded "
                        "(the prompt stream continues, samples start afresh)", self.generator.device.type)
            pending = self._reseed
        if isinstance(pending, int):
            self.generator.manual_seed(pending)
        elif pending is not None:
            self.generator.set_state(pending)
        self._pending = None
