"""Rollout and update time per RL step on CPU: 1 process vs 2 gloo processes under FSDP2, with
parameters gathered per decoding forward or once per rollout (model.system.rollout_gather).

    python tools/bench_fsdp.py [model] [--steps 6] [--prompts 16]

Same global batch in every configuration (`--prompts` prompts x 8 responses per step); reports
the median over steps after the first of time/rollout_s and time/update_s (rank 0).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch import Callback

from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule


class _Times(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        m = trainer.callback_metrics
        self.rows.append((float(m["time/rollout_s"]), float(m["time/update_s"])))


def _run(model: str, world: int, gather: str, steps: int, prompts: int, out: str, rank: int = 0) -> None:
    torch.set_num_threads(1)
    from lit_covrl.sharding import FSDP2Strategy

    times = _Times()
    module = GRPOModule(
        model=model, rollout=dict(group_size=8, max_new_tokens=16), update=dict(micro_batch_size=64),
        system=dict(rollout_gather=gather),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=world, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        strategy=FSDP2Strategy(process_group_backend="gloo") if world > 1 else "auto", callbacks=[times],
    )
    trainer.fit(module, PromptDataModule(task="arithmetic", batch_size=prompts // world, seed=0))
    if rank == 0:
        torch.save(times.rows, os.path.join(out, f"{world}-{gather}.pt"))


def _worker(rank: int, port: int, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GROUP_RANK="0", TORCHELASTIC_RUN_ID="bench")
    _run(*args, rank=rank)
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="lit_covrl:tiny-arith")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=16)
    a = p.parse_args()
    out = tempfile.mkdtemp()
    _run(a.model, 1, "once", a.steps, a.prompts, out)
    for gather in ("per_forward", "once"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(port, a.model, 2, gather, a.steps, a.prompts, out), nprocs=2, start_method="spawn")
    print(f"{a.prompts} prompts x 8 responses x <=16 tokens per step, median of steps 2..{a.steps}")
    for name in ("1-once", "2-per_forward", "2-once"):
        rows = torch.load(os.path.join(out, f"{name}.pt"))[1:]
        print(f"{name:>14}: rollout {statistics.median(r[0] for r in rows):.3f} s   "
              f"update {statistics.median(r[1] for r in rows):.3f} s")


if __name__ == "__main__":
    main()
