"""The rollout generator's per-rank seeding and its checkpoint round trip (lit_covrl.rollout_rng);
the multi-rank resume itself is exercised in tests/test_fsdp.py."""
from __future__ import annotations

import logging

import torch

from lit_covrl.rollout_rng import RANK_STRIDE, RolloutRNG


def _draw(rng: RolloutRNG) -> list[float]:
    return torch.rand(4, generator=rng.generator).tolist()


def test_ranks_draw_from_their_own_seed():
    a, b = RolloutRNG(7), RolloutRNG(7)
    a.place(torch.device("cpu"), 0)
    b.place(torch.device("cpu"), 1)
    assert _draw(a) == torch.rand(4, generator=torch.Generator().manual_seed(7)).tolist()
    assert _draw(b) == torch.rand(4, generator=torch.Generator().manual_seed(7 + RANK_STRIDE)).tolist()


def test_a_resume_continues_the_stream_exactly():
    rng = RolloutRNG(3)
    rng.place(torch.device("cpu"), 0)
    _draw(rng)
    ckpt: dict = {}
    rng.save(ckpt)  # one process: the gathered states are this rank's alone
    assert ckpt["rollout_generators"].shape[0] == 1
    expected = _draw(rng)

    resumed = RolloutRNG(3)
    resumed.load(ckpt, rank=0, world_size=1)
    resumed.place(torch.device("cpu"), 0)  # setup runs between the checkpoint load and the train start
    resumed.apply_pending()
    assert _draw(resumed) == expected
    resumed.apply_pending()  # applied once only
    assert _draw(resumed) != expected


def test_another_world_size_reseeds_and_says_so(caplog):
    rng = RolloutRNG(3)
    ckpt: dict = {}
    rng.save(ckpt)
    _draw(rng)
    other = RolloutRNG(3)
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        other.load(ckpt, rank=0, world_size=2)
    assert "saved with 1 ranks, resuming with 2" in caplog.text
    other.apply_pending()
    assert _draw(other) == torch.rand(4, generator=torch.Generator().manual_seed(3)).tolist()


def test_an_older_checkpoint_with_this_ranks_state_only():
    rng = RolloutRNG(5)
    _draw(rng)
    old = {"rollout_generator": rng.generator.get_state()}
    expected = _draw(rng)
    resumed = RolloutRNG(5)
    resumed.load(old, rank=0, world_size=1)
    resumed.apply_pending()
    assert _draw(resumed) == expected


def test_an_older_checkpoint_on_several_ranks_reseeds_instead_of_sharing_rank_0s_stream(caplog):
    rng = RolloutRNG(5)
    _draw(rng)
    old = {"rollout_generator": rng.generator.get_state()}  # rank 0's state only
    resumed = RolloutRNG(5)
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        resumed.load(old, rank=1, world_size=2)
    assert "one rollout sampler state, resuming with 2 ranks" in caplog.text
    assert resumed._pending == resumed.resumed_seed(1, 0) == 5 + RANK_STRIDE


def test_a_reseeded_resume_does_not_replay_the_first_steps_draws():
    rng = RolloutRNG(3)
    ckpt: dict = {"global_step": 40}
    rng.save(ckpt)
    other = RolloutRNG(3)
    other.load(ckpt, rank=1, world_size=2)
    other.apply_pending()
    got = _draw(other)
    fresh = [torch.rand(4, generator=torch.Generator().manual_seed(3 + RANK_STRIDE * r)).tolist() for r in range(2)]
    assert got not in fresh  # neither rank's step-0 stream
    assert got == torch.rand(4, generator=torch.Generator().manual_seed(other.resumed_seed(1, 40))).tolist()
    assert other.resumed_seed(1, 40) != other.resumed_seed(0, 40) != other.resumed_seed(1, 41)


def test_a_state_saved_on_another_device_type_reseeds_instead_of_crashing(caplog):
    # a CUDA generator's state is 16 bytes, a CPU one's 5,056: a GPU checkpoint resumed on the CPU
    cuda_like = {"rollout_generators": torch.zeros(1, 16, dtype=torch.uint8), "global_step": 3}
    resumed = RolloutRNG(3)
    resumed.load(cuda_like, rank=0, world_size=1)
    resumed.place(torch.device("cpu"), 0)
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        resumed.apply_pending()
    assert "not one a cpu generator takes" in caplog.text
    assert _draw(resumed) == torch.rand(4, generator=torch.Generator().manual_seed(resumed.resumed_seed(0, 3))).tolist()
