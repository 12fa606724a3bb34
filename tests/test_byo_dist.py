"""Two processes (DDP, gloo): the skipped-rows file is written once without a collective out of
step (the log folder is a broadcast every rank must join), and `rollout/reward/<name>` is the
mean over all ranks' completions."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests import _dist


def rank_reward(completion, answer):
    """0 on rank 0, 1 on rank 1: the global mean over equal-sized ranks is 0.5."""
    return float(os.environ["RANK"])


def _worker(rank: int, port: int, model_dir: str, rows: str, out: str) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    rec = _dist.Recorder()
    module = GRPOModule(
        model=model_dir, reward=[rank_reward, rank_reward], reward_weights=[1.0, 2.0],
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0), rollout=dict(group_size=2, max_new_tokens=2),
    )
    data = PromptDataModule(task=None, train_files=[rows], batch_size=2)
    logger = L.pytorch.loggers.TensorBoardLogger(out, name="t")
    L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=1,
              callbacks=[rec], logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, data)
    torch.save(rec.steps, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_skipped_rows_file_and_global_reward_means(tmp_path, tiny_model_dir):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8))
                    + '{"prompt": "9+1="}\n')
    _dist.spawn(_worker, (_dist.free_port(), tiny_model_dir, str(rows), str(tmp_path)),
                timeout_s=240, what="the 2-process run")
    assert (tmp_path / "t" / "version_0" / "skipped_rows.txt").read_text() == f"{rows}:9: missing field 'answer'\n"
    assert not (tmp_path / "t" / "version_1").exists()
    for r in range(2):
        m = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)[1]
        assert m["rollout/reward/rank_reward"] == pytest.approx(0.5)  # (0 + 1) / 2 over the ranks
        assert m["rollout/reward/rank_reward_2"] == pytest.approx(0.5)
        assert m["rollout/reward_mean"] == pytest.approx(1.5)  # 1.0 * 0.5 + 2.0 * 0.5


def _failing_worker(rank: int, port: int, model_dir: str, rows: str, out: str) -> None:
    from datetime import timedelta

    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    module = GRPOModule(model=model_dir, rollout=dict(group_size=2, max_new_tokens=2))
    if rank == 1:  # what the stuck-call limit raises, on one rank only
        def fail(*args, **kwargs):
            raise RuntimeError("reward 'slow' has 9 timed-out calls still running")
        module.rewards.score = fail
    data = PromptDataModule(task=None, train_files=[rows], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=600)),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    try:
        trainer.fit(module, data)
        Path(out, f"rank{rank}.txt").write_text("finished")
    except Exception as e:
        Path(out, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    # rank 1 stays up until rank 0 is done, as a failed rank whose process lingers does (on gloo an
    # exited peer closes the connection and the others fail fast; NCCL waits for the timeout)
    deadline = time.monotonic() + 300
    while rank == 1 and not Path(out, "rank0.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.mark.slow
def test_a_rewards_error_on_one_rank_stops_every_rank(tmp_path, tiny_model_dir):
    """Rank 1's rewards raise (not an item-level fault): rank 0 used to wait in the reward sums'
    collective until its timeout (30 min by default; 600 s here, past the test's limit), now both
    stop at once, rank 0 saying why."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    _dist.spawn(_failing_worker, (_dist.free_port(), tiny_model_dir, str(rows), str(tmp_path)),
                timeout_s=150, what="the 2-process run with a failing rank")
    assert (tmp_path / "rank1.txt").read_text() == "RuntimeError: reward 'slow' has 9 timed-out calls still running"
    assert (tmp_path / "rank0.txt").read_text() == ("RuntimeError: scoring failed on 1 other rank(s) (their logs say why); "
                                                   "stopping this one too")
