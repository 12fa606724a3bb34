"""Where each rank's prompts sit in the train stream, and where a resumed stream continues: pure
functions of integers, used by `PromptDataModule`.

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
"""
from __future__ import annotations

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
