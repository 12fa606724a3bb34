"""Distributed (FSDP2) checkpoint folders are replaced whole: a disk that fills up on one rank while
it writes its shards stops every rank with a CheckpointWriteError, leaves the previous `last.ckpt`
folder (and no temporary folder) behind, and the run resumes from it; resumed with another optimizer
class, it is refused before the state is loaded. 2 gloo processes on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from tests import _dist

STEPS = 2


def _trainer(ck: Path, steps: int) -> L.Trainer:
    from lit_covrl.checkpointing import AtomicCheckpoint
    from lit_covrl.sharding import FSDP2Strategy

    return L.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(process_group_backend="gloo"), max_steps=steps,
        callbacks=[AtomicCheckpoint(dirpath=ck, every_n_train_steps=1, save_last=True, save_top_k=0)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _step(ck: Path) -> int:
    return torch.load(ck / "last.ckpt" / "meta.pt", weights_only=False)["global_step"]


def _worker(rank: int, port: int, model_dir: str, prompts: str, out: str) -> None:
    from lit_covrl.checkpointing import CheckpointWriteError
    from tests.faults import faulty_folder

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    out, res = Path(out), {}
    ck = out / "ck"
    data = lambda: _dist.make_data(Path(prompts), _dist.B)  # noqa: E731
    _trainer(ck, STEPS).fit(_dist.make_module(model_dir), data())
    res["before"] = _step(ck)

    disk = faulty_folder(ck, capacity=4096) if rank == 1 else faulty_folder(out / "elsewhere")
    try:
        with disk:  # rank 1's disk fills up while it writes its shards of step 3
            _trainer(ck, STEPS + 1).fit(_dist.make_module(model_dir), data(), ckpt_path=str(ck / "last.ckpt"))
        res["error"] = None
    except CheckpointWriteError as err:
        res["error"] = str(err)
    res["after_failure"] = _step(ck)
    res["listing"] = sorted(p.name for p in ck.iterdir())

    tr = _trainer(ck, STEPS + 1)
    tr.fit(_dist.make_module(model_dir), data(), ckpt_path=str(ck / "last.ckpt"))
    res["resumed"] = [tr.global_step, _step(ck)]

    # another optimizer class: this strategy restores after building the optimizer, so the check in
    # configure_optimizers never ran (Adam took SGD's state and param groups, or a missing-key error)
    try:
        adam = _dist.make_module(model_dir, optimizer=lambda p: torch.optim.Adam(p, lr=0.1))
        _trainer(ck, STEPS + 2).fit(adam, data(), ckpt_path=str(ck / "last.ckpt"))
        res["other_optimizer"] = None
    except ValueError as err:
        res["other_optimizer"] = str(err)

    # validate builds no optimizer: the check must not take that for another optimizer class
    from lit_covrl.data import PromptDataModule
    from lit_covrl.sharding import FSDP2Strategy

    held_out = PromptDataModule(task=None, train_files=[prompts], val_files=[prompts], batch_size=_dist.B, seed=0)
    figures = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(process_group_backend="gloo"), logger=False,
                        enable_progress_bar=False, enable_model_summary=False).validate(
        _dist.make_module(model_dir), held_out, ckpt_path=str(ck / "last.ckpt"))
    res["validated"] = sorted(figures[0])
    (out / f"rank{rank}.json").write_text(json.dumps(res))


@pytest.mark.slow
def test_distributed_checkpoint_folder_survives_a_full_disk_on_one_rank(tiny_model_dir, tmp_path):
    prompts = _dist.write_prompts(tmp_path / "prompts.jsonl", 2 * _dist.B * (STEPS + 1))
    _dist.spawn(_worker, (_dist.free_port(), tiny_model_dir, str(prompts), str(tmp_path)),
                timeout_s=500, what="the 2-process run")
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["before"] == STEPS
        err = res["error"]
        assert err is not None and err.startswith("could not write distributed checkpoint") and "last.ckpt" in err, err
        assert "RL step 3" in err, err
        assert res["after_failure"] == STEPS  # the previous folder, intact
        assert res["listing"] == ["last.ckpt"], res["listing"]  # no temporary folder left
        assert res["resumed"] == [STEPS + 1, STEPS + 1]
        # every rank names the rank that failed and why, in one line
        assert "rank 1: OSError: [Errno 28] No space left on device" in err and "Traceback" not in err, err
        assert res["other_optimizer"] is not None and res["other_optimizer"].startswith(
            "model.optimizer: torch.optim.adam.Adam cannot continue the checkpoint's torch.optim.sgd.SGD"), res
        assert "val/pass@1" in res["validated"], res["validated"]
