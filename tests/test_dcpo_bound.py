"""DCPOAdvantage's `max_prompts`: the least recently trained prompts' statistics are dropped first
(by hand, and against the float64 loop of test_dcpo_advantage with the same bound), a dropped prompt
starts again as new, the state resumes exactly (at a step's end, and a mid-step state whose step is
redone), None is the unbounded state, and a bad value is refused naming the field (2 gloo processes:
test_dcpo_advantage's test_two_processes_hold_the_statistics_of_one with a bound)."""
from __future__ import annotations

import hashlib

import pytest
import torch

from lit_covrl.regularizers import DCPOAdvantage
from tests.test_dcpo_advantage import _reference, _run, _saved, _steps

torch.set_num_threads(1)

G = 2
MIXED = [0.0, 1.0]  # a group of unequal rewards: mean 0.5, Bessel std sqrt(0.5)


def _step(reg: DCPOAdvantage, step: int, prompts: str) -> torch.Tensor:
    """One step with one group of G = 2 rewards 0, 1 per prompt (a letter each)."""
    return reg.step_advantages(step, list(prompts), torch.tensor(MIXED * len(prompts), dtype=torch.float64), G)


def test_least_recently_trained_prompts_are_dropped_first_by_hand():
    reg = DCPOAdvantage(max_prompts=2)
    _step(reg, 0, "ab")
    assert list(reg.stats) == ["a", "b"]
    _step(reg, 1, "c")  # a is the least recently trained
    assert list(reg.stats) == ["b", "c"]
    _step(reg, 2, "b")  # b becomes the most recent: c is now the least
    assert list(reg.stats) == ["c", "b"] and reg.stats["b"][0] == 2
    _step(reg, 3, "d")
    assert list(reg.stats) == ["b", "d"]
    _step(reg, 4, "cea")  # one step over the bound: its groups in the step's hash order a, c, e, the last two kept
    assert sorted("cea", key=lambda k: hashlib.blake2b(f"4\0{k}".encode(), digest_size=8).digest()) == list("ace")
    assert list(reg.stats) == ["c", "e"]
    assert [v[0] for v in reg.stats.values()] == [1, 1]  # c was dropped at step 3: it starts again as new
    dropped = [v for k, v in reg.pop_metrics().items() if k == "reg/dcpo_adv/dropped_prompts"]
    assert dropped == [pytest.approx((0 + 1 + 0 + 1 + 3) / 5)]


def test_a_dropped_prompt_is_standardized_as_new_again():
    """a's second visit after being dropped: GRPO's standardization (its first-visit value), where the
    unbounded state mixes in a's earlier statistics."""
    bounded, unbounded = DCPOAdvantage(max_prompts=1), DCPOAdvantage()
    rewards = [torch.tensor(r, dtype=torch.float64) for r in ([0.0, 1.0], [1.0, 1.0], [1.0, 1.0])]
    for reg in (bounded, unbounded):
        reg.step_advantages(0, ["a"], rewards[0], G)
        reg.step_advantages(1, ["b"], rewards[1], G)
    assert bounded.step_advantages(2, ["a"], rewards[2], G).tolist() == [0.0, 0.0]  # equal rewards, new prompt
    assert all(v > 0 for v in unbounded.step_advantages(2, ["a"], rewards[2], G).tolist())  # w A_total


@pytest.mark.parametrize("max_prompts", [1, 3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_float64_loop_with_the_same_bound(seed, max_prompts):
    steps = _steps(seed, num_steps=10)
    got = _run(DCPOAdvantage(max_prompts=max_prompts), steps)
    want = _reference(steps, 4, max_prompts=max_prompts)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    unbounded = _reference(steps, 4)
    assert any(a != b for a, b in zip(want, unbounded))  # the bound changes the advantages here


@pytest.mark.parametrize("seed", range(3))
def test_none_and_a_bound_never_reached_are_the_unbounded_state(seed):
    steps = _steps(seed, num_steps=8)
    default, none, large = DCPOAdvantage(), DCPOAdvantage(max_prompts=None), DCPOAdvantage(max_prompts=7)
    assert default.max_prompts is None
    runs = [_run(reg, steps) for reg in (default, none, large)]
    for step in zip(*runs):
        assert torch.equal(step[0], step[1]) and torch.equal(step[0], step[2])
    assert default.stats == none.stats == large.stats and len(default.stats) == 7
    assert "reg/dcpo_adv/dropped_prompts" not in default.pop_metrics()
    assert large.pop_metrics()["reg/dcpo_adv/dropped_prompts"] == 0


@pytest.mark.parametrize("max_prompts", [2, 3])
def test_resume_is_exact_and_a_redone_step_restores_the_dropped(max_prompts):
    """A state saved at the end of step 2 resumes as the straight run (advantages, statistics and their
    order); one saved inside step 3 (after its pooling and dropping) puts back what step 3 dropped and
    the order before it when the resumed run redoes the step."""
    steps = _steps(3, num_steps=7)
    straight = DCPOAdvantage(max_prompts=max_prompts)
    want = _run(straight, steps)
    early = DCPOAdvantage(max_prompts=max_prompts)
    _run(early, steps[:3])
    resumed = DCPOAdvantage(max_prompts=max_prompts)
    resumed.load_state_dict(_saved(early.state_dict()))
    for g, w in zip(_run(resumed, steps[3:], first=3), want[3:]):
        assert torch.equal(g, w)
    assert list(resumed.stats.items()) == list(straight.stats.items())
    before = DCPOAdvantage(max_prompts=max_prompts)
    _run(before, steps[:3])
    mid = DCPOAdvantage(max_prompts=max_prompts)
    _run(mid, steps[:4])
    assert any(k not in mid.stats for k in before.stats)  # step 3 dropped some
    redone = DCPOAdvantage(max_prompts=max_prompts)
    redone.load_state_dict(_saved(mid.state_dict()))
    redone._begin(3)  # what the redone step does first: step 3's part taken back out
    assert list(redone.stats.items()) == list(before.stats.items())
    for g, w in zip(_run(redone, steps[3:], first=3), want[3:]):  # step 3 again, with the same rollout here
        assert torch.equal(g, w)
    assert list(redone.stats.items()) == list(straight.stats.items())


def test_a_state_saved_before_the_bound_loads_in_its_order():
    """A checkpoint of [steps, mean, std] entries (no recency): its prompts count as pooled in the
    order it holds them, so a bound drops its first ones."""
    reg = DCPOAdvantage(max_prompts=2)
    reg.load_state_dict({"stats": {"x": [1, 0.5, 0.1], "y": [2, 0.25, 0.2]}, "step": 0, "undo": {}})
    assert reg.stats == {"x": [1, 0.5, 0.1, 1], "y": [2, 0.25, 0.2, 2]}
    _step(reg, 1, "z")
    assert list(reg.stats) == ["y", "z"] and reg.stats["z"][3] == 3


def test_an_old_mid_step_state_redoes_its_step_as_the_state_before_it():
    """A mid-step checkpoint of the code before the bound (3-value stats and undo entries: a existed
    before step 5 and was pooled in it, b was new in it) redoes step 5 as the state saved before step 5
    does: same advantages and statistics (it crashed: its undo entries had no recency)."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    for max_prompts in (None, 1):
        mid = DCPOAdvantage(max_prompts=max_prompts)
        mid.load_state_dict({"stats": {"x": [3, 0.5, 0.5], "a": [2, 0.5, 0.5], "b": [1, 1.0, 0.0]}, "step": 5,
                             "undo": {"a": [1, 0.25, 0.5], "b": None}})
        before = DCPOAdvantage(max_prompts=max_prompts)
        before.load_state_dict({"stats": {"x": [3, 0.5, 0.5], "a": [1, 0.25, 0.5]}, "step": 4, "undo": {}})
        want = before.step_advantages(5, ["a", "c"], rewards, 4)
        assert torch.equal(mid.step_advantages(5, ["a", "c"], rewards, 4), want)
        assert list(mid.stats.items()) == list(before.stats.items())


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_a_bad_bound_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"DCPOAdvantage\.max_prompts=.* is invalid: must be a positive integer"):
        DCPOAdvantage(max_prompts=bad)


def test_a_bad_bound_is_refused_through_the_cli(tmp_path, capsys):
    from tests.helpers import cli_start_up_error

    from pathlib import Path

    line = "    - class_path: lit_covrl.regularizers.DCPOAdvantage"
    text = (Path(__file__).parents[1] / "configs/cpu/dcpo.yaml").read_text()
    assert line in text
    bounded = tmp_path / "dcpo_bounded.yaml"  # the shipped config with max_prompts: 0
    bounded.write_text(text.replace(line, line + "\n      init_args:\n        max_prompts: 0  #", 1))
    err = cli_start_up_error(tmp_path, capsys, str(bounded))
    assert "DCPOAdvantage.max_prompts=0 is invalid: must be a positive integer" in err, err


# ------------------------------------------------ device count, with several updates per step (review left23 F1)
_PER_STEP, _PER_UPDATE, _BOUND = 8, 4, 4  # global prompts per step and per update, max_prompts


def _layout_run(rank: int, world: int) -> tuple[dict, list]:
    """3 steps of the same 8 prompts (unequal rewards from (step, prompt) alone), each rank holding its
    prompts where the datamodule puts them (`rank_offsets`: the r-th 2 of every 4 prompts on 2 ranks):
    ({(step, position): advantages}, the kept prompts in recency order)."""
    from lit_covrl.streams import rank_offsets

    reg, out = DCPOAdvantage(max_prompts=_BOUND), {}
    where = rank_offsets(rank, world, _PER_STEP // world, _PER_UPDATE // world)
    for step in range(3):
        rewards = []
        for i in where:
            r = (torch.rand(4, generator=torch.Generator().manual_seed(100 * step + i)) > 0.5).double()
            rewards.append(torch.cat([torch.tensor([1.0, 0.0], dtype=torch.float64), r[2:]]))
        adv = reg.step_advantages(step, [f"p{i}" for i in where], torch.cat(rewards), 4)
        out.update({(step, i): adv[j * 4:(j + 1) * 4] for j, i in enumerate(where)})
    return out, list(reg.stats.items())


def _layout_worker(rank: int, port: int, out: str) -> None:
    from tests import _dist

    _dist.elastic_env(rank, 2, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.save(_layout_run(rank, 2), f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_with_interleaved_prompts_keep_what_one_process_keeps(tmp_path):
    """2 gloo processes holding a step's prompts interleaved by update (as the datamodule lays them out
    when a step makes several updates) keep the prompts one process keeps and give the same advantages
    (the gathered rank order, p0 p1 p4 p5 | p2 p3 p6 p7, once decided the recency: another set survived)."""
    from tests import _dist
    from lit_covrl.streams import rank_offsets

    assert rank_offsets(0, 2, 4, 2) == [0, 1, 4, 5]  # interleaved, not the first block
    one, kept = _layout_run(0, 1)
    assert len(kept) == _BOUND and any(v[0] > 1 for _, v in kept)  # survivors carry statistics across steps
    _dist.spawn(_layout_worker, (_dist.free_port(), str(tmp_path)), timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0][1] == ranks[1][1] == kept
    two = {**ranks[0][0], **ranks[1][0]}
    assert two.keys() == one.keys()
    for key in one:
        assert torch.equal(two[key], one[key]), key
