"""Where each rank's prompts sit in the train stream, and where a resumed stream continues: pure
functions of integers, and `PromptStream`, the `PromptDataModule` side of them.

Layout. Step k's global batch is W*B prompts whatever the world size W (B = `data.batch_size`):
- a task: `task.sample` called W*B times on `random.Random(f"lit_covrl:train:{seed}:{k}")`, one
  generator per step shared by the ranks;
- rows: all train rows, concatenated over epochs e = 0, 1, ... each shuffled by
  `random.Random(f"lit_covrl:shuffle:{seed}:{e}")`; step k takes positions [k*W*B, (k+1)*W*B).
Rank r takes B of them (`rank_offsets`): the r-th block of B, or, when the module makes several
updates per rollout of m = `model.update.mini_batch_size` prompts each, the r-th m prompts of every
W*m, so that update j of W ranks trains on the prompts of one rank's update j with W*B prompts and
mini-batches of W*m. So W ranks see what one rank with W*B prompts per step (and W*m per update)
sees. (Older code seeded a task per rank's batch, `random.Random(f"...:{k*W + r}")` drawn B times:
the same stream for W = 1.)

Resume (`resume_index`). A checkpoint keeps the next step with the world size and batch size it
counts in. Rows resumed under another W or B continue at the first step whose positions were not
used (fewer than W*B skipped, none repeated); a task's step k has its own generator whatever W and
B, so it continues at the same step.

`PromptStream` is a mixin of `lit_covrl.data.PromptDataModule` (its only user), which holds the
rows, the task, the settings and `next_index`: it draws the batches at stream positions (`batch_at`,
`regen_batch`, `_stream`), advances `next_index` as batches reach the module
(`on_after_batch_transfer`) and saves and restores it with checkpoints (`state_dict`,
`load_state_dict`: the world and batch size it counts in, the seed, the train rows' count and
digest).
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

from lit_covrl.row_checks import changed_rows_warning, rows_digest
from lit_covrl.types import Example, PromptBatch

log = logging.getLogger("lit_covrl")

TASK_STREAM_UNIT = "step"  # saved with checkpoints; older ones (no such key) counted per rank's batch


def rank_offsets(rank: int, world: int, batch_size: int, minibatch: int | None = None) -> list[int]:
    """Positions, inside a step's global batch of world * batch_size prompts, of rank `rank`'s
    batch_size prompts: the r-th `minibatch` of every world * minibatch, or, when minibatch is None
    or does not divide batch_size, the r-th block of batch_size."""
    B, m = batch_size, minibatch
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    if not m or m >= B or B % m:
        m = B
    return [j * world * m + rank * m + i for j in range(B // m) for i in range(m)]


def resume_index(next_index: int, *, task: bool, world: int, batch_size: int, saved_world: int | None,
                 saved_batch_size: int | None, saved_unit: str | None) -> tuple[int, str | None]:
    """(the step to continue at, a warning or None) for a stream saved at `next_index` under
    `saved_world` x `saved_batch_size` (None: as now) and resumed under world x batch_size."""
    saved_world, saved_bs = saved_world or world, saved_batch_size or batch_size
    if task:
        if saved_unit != TASK_STREAM_UNIT and saved_world > 1:  # it used next_index * saved_world generators
            return next_index * saved_world, (f"prompt stream saved by older code with {saved_world} ranks: continuing "
                                              f"the task at step generator {next_index * saved_world} (none repeated)")
        return next_index, None
    if (saved_world, saved_bs) == (world, batch_size):
        return next_index, None
    used = next_index * saved_world * saved_bs
    resumed = -(-used // (world * batch_size))
    first = resumed * world * batch_size
    return resumed, (f"prompt stream saved with {saved_world} rank(s) x {saved_bs} prompts per batch, resuming with "
                     f"{world} x {batch_size}: continuing at stream position {first} ({first - used} skipped, none repeated)")


class PromptStream:
    """`PromptDataModule`'s train stream: its batches by position, and its position saved with
    checkpoints."""

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _perm(self, epoch: int, stream: str = "shuffle") -> list[int]:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            order = list(range(len(self._train_rows)))
            random.Random(f"lit_covrl:{stream}:{self.hparams.seed}:{epoch}").shuffle(order)
            self._perms[key] = order
        return self._perms[key]

    def batch_at(self, index: int, rank: int = 0, world: int = 1) -> PromptBatch:
        """Train batch `index` of rank `rank` out of `world` (a pure function of these, the seed and
        `minibatch_prompts`)."""
        if self._val_batches is None:
            self.setup("fit")
        return PromptBatch.from_examples(self._examples_at(index, self.rank_offsets(rank, world), world, "train", "shuffle"),
                                         index=index)

    def rank_offsets(self, rank: int, world: int, minibatch: bool = True) -> list[int]:
        """This rank's positions in a step's global batch (`lit_covrl.streams.rank_offsets`), laid
        out by the module's prompts per update (`minibatch=False`: in blocks of B regardless)."""
        return rank_offsets(rank, world, self.hparams.batch_size, self.minibatch_prompts if minibatch else None)

    def regen_batch(self, index: int, round: int, rounds: int) -> PromptBatch:
        """Prompts of extra generation round `round` (1 .. rounds - 1) of train batch `index` on
        this rank, for dynamic sampling (`lit_covrl.dynamic_sampling`): drawn from the same task
        or rows as the train stream but from a stream of their own, a pure function of (seed,
        index, round, rank, world size), so resumed runs draw the same prompts."""
        if not 1 <= round < rounds:
            raise ValueError(f"round must be in [1, {rounds}), got {round}")
        if self._val_batches is None:
            self.setup("fit")
        rank, world = self._rank_world()
        unit = index * (rounds - 1) + round - 1
        offsets = self.rank_offsets(rank, world, minibatch=False)  # filling in for filtered groups: no update layout
        return PromptBatch.from_examples(self._examples_at(unit, offsets, world, "regen", "regen-shuffle"), index=index)

    def _examples_at(self, unit: int, offsets: list[int], world: int, task_stream: str, row_stream: str) -> list[Example]:
        """The prompts at `offsets` of global batch `unit` (W*B prompts) of a stream: task samples
        from that batch's own seeded RNG, or rows at positions unit*W*B + offset of that stream's
        per-epoch shuffles."""
        size, seed = world * self.hparams.batch_size, self.hparams.seed
        if self.task is not None:
            rng = random.Random(f"lit_covrl:{task_stream}:{seed}:{unit}")
            drawn = [self.task.sample(rng) for _ in range(max(offsets) + 1)]  # every rank draws the same
            return [self._with_system(drawn[o]) for o in offsets]
        n = len(self._train_rows)
        return [self._train_rows[self._perm(p // n, row_stream)[p % n]] for p in (unit * size + o for o in offsets)]

    def _stream(self, rank: int, world: int, start: int = 0) -> Iterator[PromptBatch]:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        k = start
        while True:
            yield self.batch_at(k, rank, world)
            k += 1

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, PromptBatch) and batch.index >= 0:
            self.next_index = batch.index + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints by Lightning. `next_index` (with the world size and batch size it
        counts batches of) is restored; `skipped_rows` is for the record (counts are recomputed when
        the files are read); `seed` and, for file and HF sources, the train rows' count and digest
        are checked."""
        state = {"next_index": self.next_index, "world_size": self._rank_world()[1],
                 "batch_size": self.hparams.batch_size, "skipped_rows": self.skipped_rows, "seed": self.hparams.seed,
                 "task_stream_unit": TASK_STREAM_UNIT}
        if self._train_rows is not None:
            state.update(train_rows=len(self._train_rows), train_digest=self._train_digest())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `next_index`, moved on when rows are resumed under another world size or batch
        size so that no prompt repeats (`lit_covrl.streams.resume_index`); warn when the seed or
        the train rows changed since the checkpoint."""
        self.next_index, warning = resume_index(
            int(state_dict["next_index"]), task=self.task is not None, world=self._rank_world()[1],
            batch_size=self.hparams.batch_size, saved_world=state_dict.get("world_size"),
            saved_batch_size=state_dict.get("batch_size"), saved_unit=state_dict.get("task_stream_unit"))
        if warning:
            log.warning(warning)
        saved_seed = state_dict.get("seed", self.hparams.seed)
        if saved_seed != self.hparams.seed:
            log.warning("resuming a prompt stream saved with seed %s under seed %s", saved_seed, self.hparams.seed)
        if self.task is None and "train_rows" in state_dict:  # older checkpoints lack it: nothing to compare
            self._check_rows_unchanged(state_dict["train_rows"], state_dict.get("train_digest"))

    def _check_rows_unchanged(self, saved_n: int, saved_digest: str | None) -> None:
        """Warn when the train rows differ from those of the checkpoint (`changed_rows_warning`)."""
        if self._val_batches is None:
            self.setup("fit")
        warning = changed_rows_warning(saved_n, saved_digest, len(self._train_rows), self._train_digest())
        if warning and self._rank_world()[0] == 0:
            log.warning(warning)

    def _train_digest(self) -> str:
        if self._digest is None:
            self._digest = rows_digest(self._train_rows)
        return self._digest
