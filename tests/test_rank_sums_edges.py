"""Statistics that EPO, RLZVP and DCPOClip sum over ranks, checked with 2 gloo processes holding
unequal shares of one batch against one process holding it all (mutation review mut25: removing
the all-reduce of EPO's step entropy, of `StepSums.pop`, of RLZVP's metric sums or of DCPOClip's
bound means left every single-process test passing)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lit_covrl.regularizers import EPO, RLZVP, DCPOClip
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.types import PolicyBatch
from tests._dist import free_port, spawn

torch.set_num_threads(1)
F64 = torch.float64
G = 2
# 4 groups of 2: all correct, all wrong, mixed, all wrong; rank 0 holds group 0, rank 1 groups 1-3
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
LENGTHS = torch.tensor([4, 1, 2, 3, 4, 1, 2, 4])
MASK = (torch.arange(4)[None] < LENGTHS[:, None]).to(F64)
OLD_H = torch.linspace(0.2, 3.1, 32, dtype=F64).view(8, 4).flip(0).contiguous()
H = torch.linspace(0.4, 2.9, 32, dtype=F64).view(8, 4)
OLD_LOGP = -torch.linspace(0.01, 4.0, 32, dtype=F64).view(8, 4)
SHARES = {0: slice(0, 2), 1: slice(2, 8)}


def _metrics(rows: slice) -> dict[str, float]:
    """Every control's metrics of one step over the rows `rows` of this process (a collective)."""
    mask, n = MASK[rows], MASK[rows].shape[0]
    z = torch.zeros_like(mask)
    groups = torch.arange(n) // G
    out = {}
    epo = EPO(low_ratio=0.9, high_ratio=1.1)
    epo.observe_old_entropy(OLD_H[rows], mask, 0)
    epo.prepare(MiniBatchContext(0, 0, True, z, z, z, mask, None))
    epo.shape(PolicyBatch(torch.arange(n), z, z, z, mask, entropy=H[rows]))
    out.update(epo.pop_metrics())
    out["epo_history"] = epo.history
    zvp = RLZVP(alpha=0.1)
    zvp.observe_rewards(REWARDS[rows], G)
    zvp.prepare(MiniBatchContext(step=0, update=0, on_policy=True, logp=z, old_logp=z, advantages=z, mask=mask,
                                 clipped=None, groups=groups))
    zvp.shape(PolicyBatch(torch.arange(n), z, z, z, mask, H[rows]))
    out.update(zvp.pop_metrics())
    clip = DCPOClip()
    clip.prepare(MiniBatchContext(0, 0, False, OLD_LOGP[rows], OLD_LOGP[rows], z, mask, None))
    out.update(clip.pop_metrics())
    return {k: float(v) for k, v in out.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(_metrics(SHARES[rank]), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_of_unequal_shares_log_what_one_process_logs(tmp_path):
    one = _metrics(slice(0, 8))
    keys = {"epo_history", "reg/epo/step_entropy", "reg/epo/out_band_frac", "reg/rl_zvp/zvp_frac",
            "reg/rl_zvp/positive_frac", "reg/rl_zvp/adv_positive_mean", "reg/rl_zvp/adv_negative_mean",
            "reg/dcpo_clip/ratio_low_mean", "reg/dcpo_clip/ratio_high_mean"}
    assert keys <= set(one), sorted(one)
    # each metric of a share alone differs from the whole on some rank (or is missing there), else
    # the test could not see a missing all-reduce
    alone = [_metrics(rows) for rows in SHARES.values()]
    assert all(any(a.get(k) != pytest.approx(one[k], rel=1e-9) for a in alone) for k in keys)
    spawn(_worker, (free_port(), str(tmp_path)), timeout_s=120)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert {k: got[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, rel=1e-12), rank
