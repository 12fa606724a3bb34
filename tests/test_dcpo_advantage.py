"""DCPO's smooth advantage standardization (`DCPOAdvantage`): hand values, a float64 loop of the
reference's procedure (lime-RL/DCPO compute_dcpo_outcome_advantage and get_mean_std, statistics
kept per prompt across steps), the state in checkpoints (a resume, and a mid-step state whose step
is redone), 2 gloo processes against one, micro-batch invariance of a fit with both DCPO callbacks,
and the start-up refusals naming the field."""
from __future__ import annotations

import hashlib
import io
import math
import random
import statistics

import pytest
import torch

from lit_covrl.algorithms import pooled_reward_stats, smooth_advantages
from lit_covrl.regularizers import DCPOAdvantage, DCPOClip
from lit_covrl.regularizers.base import check_stack
from lit_covrl.settings import LossSettings, RolloutSettings
from tests.test_outcome import TwoPrompts

torch.set_num_threads(1)


def _reference(steps: list[tuple[list[str], list[float]]], group_size: int,
               max_prompts: int | None = None) -> list[list[float]]:
    """The reference's advantages of each step, one group at a time in Python floats: every
    prompt's (times, mean, std) carried across steps, pooled with the group's mean and Bessel std;
    with `max_prompts` (ours, not the reference's), after each step only that many most recently
    pooled prompts keep theirs (a dict in pooling order, its first keys dropped), a step's prompts
    pooled in the order of blake2b-8 of "<step>\0<prompt>" (one group per prompt and step here)."""
    state: dict[str, tuple[int, float, float]] = {}
    out = []
    for step, (prompts, rewards) in enumerate(steps):
        step_adv, pooled = [], {}
        for i, p in enumerate(prompts):
            scores = rewards[i * group_size:(i + 1) * group_size]
            times, old_mean, old_std = state.get(p, (0, 0.0, 0.0))
            new_mean, new_std = statistics.fmean(scores), statistics.stdev(scores)
            if times == 0:
                mean, std = new_mean, new_std
            else:
                mean = (old_mean * times + new_mean) / (times + 1)
                spread = times / (times + 1) * (new_mean - old_mean) ** 2
                std = math.sqrt((times * old_std ** 2 + new_std ** 2 + spread) / (times + 1))
            w = 1 / (times + 1)
            for s in scores:
                a_new = (s - new_mean) / new_std if new_std > 0 else 0.0
                a_old = (s - mean) / std if std > 0 else 0.0
                s1, s2 = w * a_old + (1 - w) * a_new, w * a_new + (1 - w) * a_old
                step_adv.append(s1 if abs(s1) < abs(s2) else s2)
            pooled[p] = (times + 1, mean, std)
        for p in sorted(pooled, key=lambda p: hashlib.blake2b(f"{step}\0{p}".encode(), digest_size=8).digest()):
            state.pop(p, None)
            state[p] = pooled[p]
        while max_prompts is not None and len(state) > max_prompts:
            del state[next(iter(state))]
        out.append(step_adv)
    return out


def test_hand_values():
    """Step 0, [1, 0, 0, 0]: mean 0.25, Bessel std 0.5: GRPO's 1.5 / -0.5 (no eps). Step 1 of a prompt
    seen once (mean 0.5, std 0.5) with [1, 1, 1, 1]: its own std is 0, the pooled mean 0.75 and std
    sqrt((0.25 + 0 + 0.5 * 0.25) / 2) = 0.433, so each gets 0.5 x 0.25 / 0.433 = 0.2887, not GRPO's 0."""
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv, mean, std = smooth_advantages(r, 4, torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5]),
                                       torch.tensor([0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5] + [0.5 * 0.25 / math.sqrt(0.1875)] * 4))
    assert mean.tolist() == [0.25, 1.0] and std.tolist() == [0.5, 0.0]
    pm, ps = pooled_reward_stats(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5], dtype=torch.float64),
                                 torch.tensor([0.0, 0.5], dtype=torch.float64), mean, std)
    assert pm.tolist() == [0.25, 0.75] and ps.tolist() == pytest.approx([0.5, math.sqrt(0.1875)])


def test_a_tie_in_size_takes_sa_total_as_the_reference_does():
    """|SA_new| == |SA_total| with opposite signs (a_new = -a_total): the reference keeps SA_new only
    where it is strictly smaller, so the tie takes SA_total. Rewards [1, 1, 1, 3] of a prompt seen
    twice before (mean 0, std 0.5): mean 1.5, Bessel std 1; pooled mean 0.5, std 1 (w = 1/3):
    the 1s have a_new = -0.5, a_total = 0.5, so SA_new = -1/6 and SA_total = +1/6 (exactly, in
    float64); the 3 has SA_new = 11/6 < 13/6.
    Kills mut25 A8 (`<` read as `<=`: the three 1s' sign flipped)."""
    adv, _, _ = smooth_advantages(torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64), 4,
                                  torch.tensor([2.0]), torch.tensor([0.0], dtype=torch.float64),
                                  torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(adv, torch.tensor([1 / 6, 1 / 6, 1 / 6, 11 / 6], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_equal_rewards_of_rounding_noise_give_zero():
    """Three rewards of 0.7 have a float64 mean off by one ulp and a std of 1.4e-16: read as 0, the
    group (first step, and again with equal history) gets advantage 0, not an O(1) one."""
    r = torch.full((3,), 0.7, dtype=torch.float64)
    assert float(r.std()) > 0
    adv, _, std = smooth_advantages(r, 3, torch.zeros(1), torch.zeros(1, dtype=torch.float64),
                                    torch.zeros(1, dtype=torch.float64))
    assert adv.tolist() == [0.0] * 3 and std.tolist() == [0.0]
    adv, _, _ = smooth_advantages(r, 3, torch.full((1,), 5.0), torch.full((1,), 0.7, dtype=torch.float64),
                                  torch.zeros(1, dtype=torch.float64))
    assert adv.tolist() == [0.0] * 3


def _steps(seed: int, num_steps: int = 6, group_size: int = 4):
    rng = random.Random(seed)
    out = []
    for _ in range(num_steps):
        prompts = rng.sample(list("abcdefg"), 4)  # recurring prompts, one group each per step
        rewards = [float(rng.random() < p) for p in (0.1, 0.5, 0.9, 0.5) for _ in range(group_size)]
        out.append((prompts, rewards))
    return out


def _run(reg: DCPOAdvantage, steps, group_size: int = 4, first: int = 0) -> list[torch.Tensor]:
    return [reg.step_advantages(first + s, p, torch.tensor(r, dtype=torch.float64), group_size)
            for s, (p, r) in enumerate(steps)]


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_float64_loop_of_the_reference(seed):
    steps = _steps(seed)
    got = _run(DCPOAdvantage(), steps)
    want = _reference(steps, 4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_the_loop_covers_revisited_equal_reward_groups():
    """The oracle comparison above must see equal-reward groups of revisited prompts get a gradient."""
    reg = DCPOAdvantage()
    for s, (p, r) in enumerate(_steps(0)):
        reg.step_advantages(s, p, torch.tensor(r), 4)
        m = reg.pop_metrics()
        if m.get("reg/dcpo_adv/equal_reward_trained_frac", 0) > 0 and m["reg/dcpo_adv/revisited_frac"] > 0:
            return
    raise AssertionError("no revisited equal-reward group was trained")


def test_groups_the_step_does_not_train_are_not_pooled():
    """filter_groups drops an equal-reward group (keep False on all its rows): it is not trained, so
    its prompt's statistics stay as they were, as the reference filters before its advantages (it
    was pooled, and counted as trained in equal_reward_trained_frac). A group with one row kept
    (overlong: mask) is trained and pooled."""
    reg = DCPOAdvantage()
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    keep = torch.tensor([False] * 4 + [True] * 4 + [False, False, False, True])
    reg.step_advantages(0, ["a", "b", "c"], rewards, 4, keep=keep)
    assert sorted(reg.stats) == ["b", "c"] and reg.stats["b"][:2] == [1, 0.5]
    assert reg.pop_metrics()["reg/dcpo_adv/equal_reward_frac"] == 0.0  # over the trained groups only
    reg.step_advantages(1, ["a"], rewards[:4], 4)  # no keep: every group trained
    assert reg.stats["a"][:2] == [1, 1.0]


def test_metrics_by_hand():
    """Step 0: "a" [1, 0, 0, 0] (GRPO's 1.5 / -0.5: 4 nonzero), "b" [1, 1, 1, 1] (first step: all 0):
    nonzero_adv_frac 4/8, revisited_frac 0 (neither seen before), equal_reward_frac 1/2,
    equal_reward_trained_frac 0/1. Step 1: "b" [1, 1, 1, 1] again (seen once: its pooled std is 0,
    still 0), "c" [0, 0, 0, 0] (new): revisited 1/2, equal 2/2, trained 0/2; step 2: "a" [1, 1, 1, 1]
    (seen once, with unequal rewards: 4 nonzero) and "c" again: revisited 2/2, trained 1/2.
    Kills mut25 D11 (revisited counted with t >= 0) and D16 (the equal groups read as s != 0)."""
    reg = DCPOAdvantage()
    ones, zeros = [1.0] * 4, [0.0] * 4
    want = [{"nonzero_adv_frac": 0.5, "revisited_frac": 0.0, "equal_reward_frac": 0.5, "equal_reward_trained_frac": 0.0},
            {"nonzero_adv_frac": 0.0, "revisited_frac": 0.5, "equal_reward_frac": 1.0, "equal_reward_trained_frac": 0.0},
            {"nonzero_adv_frac": 0.5, "revisited_frac": 1.0, "equal_reward_frac": 1.0, "equal_reward_trained_frac": 0.5}]
    steps = [(["a", "b"], [1.0, 0.0, 0.0, 0.0] + ones), (["b", "c"], ones + zeros), (["a", "c"], ones + zeros)]
    for step, ((prompts, rewards), expected) in enumerate(zip(steps, want)):
        reg.step_advantages(step, prompts, torch.tensor(rewards, dtype=torch.float64), 4)
        metrics = reg.pop_metrics()
        assert {k: metrics[f"reg/dcpo_adv/{k}"] for k in expected} == pytest.approx(expected), step


def _saved(state: dict):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_round_trip_and_a_redone_step_pools_once():
    """A state saved at the end of step 1 resumes as the straight run; one saved inside step 2 (after
    its advantages, as nonfinite-stop.ckpt is) drops step 2's part when the resumed run redoes it."""
    steps = _steps(1, num_steps=4)
    straight = DCPOAdvantage()
    want = _run(straight, steps)
    early = DCPOAdvantage()
    _run(early, steps[:2])
    resumed = DCPOAdvantage()
    resumed.load_state_dict(_saved(early.state_dict()))
    for g, w in zip(_run(resumed, steps[2:], first=2), want[2:]):
        assert torch.equal(g, w)
    assert resumed.stats == straight.stats
    mid = DCPOAdvantage()
    _run(mid, steps[:3])
    redone = DCPOAdvantage()
    redone.load_state_dict(_saved(mid.state_dict()))
    for g, w in zip(_run(redone, steps[2:], first=2), want[2:]):  # step 2 again, with the same rollout here
        assert torch.equal(g, w)
    assert redone.stats == straight.stats


def _gather_worker(rank: int, port: int, out: str, max_prompts: int | None) -> None:
    from tests import _dist

    _dist.elastic_env(rank, 2, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    reg, adv = DCPOAdvantage(max_prompts=max_prompts), []
    for s, (prompts, rewards) in enumerate(_steps(2)):
        adv.append(reg.step_advantages(s, prompts[rank * 2:(rank + 1) * 2],
                                       torch.tensor(rewards[rank * 8:(rank + 1) * 8], dtype=torch.float64), 4))
    torch.save({"adv": adv, "stats": list(reg.stats.items()), "metrics": reg.pop_metrics()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("max_prompts", [None, 3])
def test_two_processes_hold_the_statistics_of_one(tmp_path, max_prompts):
    """2 gloo processes with half the prompts each: each rank's advantages are one process's rows
    and every rank ends with the one process's statistics (gathered each step), in the same order;
    with `max_prompts` every rank drops what the one process drops."""
    from tests import _dist

    single = DCPOAdvantage(max_prompts=max_prompts)
    whole = _run(single, _steps(2))
    metrics = single.pop_metrics()
    assert max_prompts is None or metrics["reg/dcpo_adv/dropped_prompts"] > 0
    _dist.spawn(_gather_worker, (_dist.free_port(), str(tmp_path), max_prompts), timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for s, w in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0]["adv"][s], ranks[1]["adv"][s]]), w)
    assert ranks[0]["stats"] == ranks[1]["stats"] == list(single.stats.items())
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == metrics


def test_startup_refusals_name_the_fields(caplog):
    reg = DCPOAdvantage()
    reg.check_loss(LossSettings(), RolloutSettings())
    for kw, field in ((dict(advantage="rloo"), "model.loss.advantage"),
                      (dict(baseline_quantile=0.4), "model.loss.baseline_quantile"),
                      (dict(advantage="passk", pass_k=2), "model.loss.advantage"),
                      (dict(unlikeliness=0.25), "model.loss.unlikeliness")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.") + ".* is invalid with DCPOAdvantage"):
            reg.check_loss(LossSettings(**kw), RolloutSettings())
    with pytest.raises(ValueError, match="2 regularizers compute the advantages"):
        check_stack([DCPOAdvantage(), DCPOAdvantage(name="other")])
    reg.check_loss(LossSettings(), RolloutSettings(filter_groups=True))
    assert "the equal-reward groups it gives a gradient are dropped" in caplog.text


def test_a_replaced_estimator_is_refused_through_the_cli(tmp_path, capsys):
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/dcpo.yaml", "--model.loss.advantage", "rloo")
    assert "model.loss.advantage='rloo' is invalid with DCPOAdvantage" in err


# ------------------------------------------------------------------------------ through the module

def _module(model_dir, micro=64):
    from tests.test_module import make_module
    from lit_covrl.rewards import ExactMatchReward

    return make_module(model_dir, reward=ExactMatchReward(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                       loss=dict(dual_clip=10.0, loss_agg_mode="seq-mean-token-mean"),
                       update=dict(micro_batch_size=micro, mini_batch_size=2, ppo_epochs=2, grad_clip=None))


def _data():
    from lit_covrl.data import PromptDataModule

    return PromptDataModule(task=TwoPrompts(), batch_size=4, val_size=0)


def _regs():
    return [DCPOClip(), DCPOAdvantage()]


def _fit(model_dir, micro, steps=3):
    from tests._dist import Recorder
    from tests.helpers import fit

    torch.manual_seed(0)
    rec = Recorder()
    module = _module(model_dir, micro)
    fit(module, _data(), steps=steps, callbacks=[*_regs(), rec], limit_val_batches=0)
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}, rec.steps


_REF: dict = {}


@pytest.mark.parametrize("micro", [1, 3])
def test_fit_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """Three RL steps over two recurring prompts, 2 epochs per rollout (the clip acts off policy):
    the weights and every policy/ and reg/ metric are the same for micro-batches of 1, 3 or all 16."""
    if "ref" not in _REF:
        _REF["ref"] = _fit(tiny_model_dir, 64)
    from tests.test_aent import _assert_same_fit

    ref_m = _REF["ref"][1]
    assert ref_m[3]["reg/dcpo_adv/revisited_frac"] == 1.0 and ref_m[3]["reg/dcpo_adv/tracked_prompts"] == 2
    _assert_same_fit(_REF["ref"], _fit(tiny_model_dir, micro))


def test_the_step_trains_on_its_advantages(tiny_model_dir, monkeypatch):
    """The update gets DCPOAdvantage's advantages, not the run's estimator's (which it replaces:
    on step 1 a revisited equal-reward group differs from GRPO's 0)."""
    from tests.helpers import fit

    reg, given, trained = DCPOAdvantage(), [], []
    real = reg.step_advantages
    monkeypatch.setattr(reg, "step_advantages", lambda *a, **kw: given.append(real(*a, **kw)) or given[-1])
    module = _module(tiny_model_dir)
    module.configure_model()
    real_update = module.learner.update
    monkeypatch.setattr(module.learner, "update",
                        lambda ro, adv, *a, **kw: trained.append(adv.clone()) or real_update(ro, adv, *a, **kw))
    fit(module, _data(), steps=3, callbacks=[reg], limit_val_batches=0)
    assert len(given) == len(trained) == 3
    for g, t in zip(given, trained):
        assert torch.equal(g, t)


def test_statistics_resume_exactly(tiny_model_dir, tmp_path):
    """The statistics travel in the checkpoint: a resume at step 2 that lost them would standardise
    steps 2-3 as first visits (revisited_frac 0 and other advantages)."""
    from tests.test_resume import straight_and_resumed

    compared = ["reg/dcpo_adv/revisited_frac", "reg/dcpo_adv/nonzero_adv_frac", "reg/dcpo_adv/tracked_prompts",
                "policy/loss", "policy/grad_norm"]
    a, b, ckpt = straight_and_resumed(tmp_path, _regs, lambda: _module(tiny_model_dir), _data, compared)
    saved = [v for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items() if k.startswith("DCPOAdvantage")]
    assert len(saved) == 1 and set(saved[0]["stats"]) == {"1+1=", "2+2="}
    assert a["reg/dcpo_adv/revisited_frac"][2] == 1.0
    for tag in compared:
        assert sorted(b[tag]) == [2, 3], tag
        for s in (2, 3):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def _dcpo_fit(model_dir, prompts, root, devices, strategy=None):
    """3 RL steps of `_dist`'s rank-invariant module (samples a function of prompt and step, 2 epochs
    per rollout) with both DCPO callbacks, exact-match rewards and no group filter: every step's metrics."""
    from lit_covrl.rewards import ExactMatchReward
    from tests import _dist

    rec = _dist.Recorder()
    module = _dist.make_module(model_dir, reward=ExactMatchReward(), rollout=dict(filter_groups=False),
                               loss=dict(dual_clip=10.0, loss_agg_mode="seq-mean-token-mean"))
    _dist.trainer(3, [rec, *_regs()], devices, root, strategy=strategy).fit(
        module, _dist.make_data(prompts, _dist.B * 2 // devices))
    return rec.steps


def _fit_worker(rank: int, port: int, model_dir: str, prompts: str, out: str) -> None:
    from tests import _dist

    _dist.save_ddp_fit(_dcpo_fit, rank, port, model_dir, prompts, out)


def test_two_ddp_processes_train_as_one_process(tiny_model_dir, tmp_path):
    """Through the module: 2 gloo DDP processes with B prompts each train as one process with 2B.
    Three of each step's four prompts are the same, so from step 1 on every group revisits a
    prompt whose statistics were pooled from groups of both ranks."""
    from tests import _dist

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{a}+1=", "answer": "{a + 1}"}}\n' for a in [10, 11, 10, 10] * 6))
    single = _dcpo_fit(tiny_model_dir, prompts, tmp_path / "s", 1)
    _dist.spawn(_fit_worker, (_dist.free_port(), tiny_model_dir, str(prompts), str(tmp_path)), timeout_s=180)
    assert single[2]["reg/dcpo_adv/revisited_frac"] == 1.0 and single[2]["reg/dcpo_adv/tracked_prompts"] == 2
    _dist.assert_ranks_match(tmp_path, single, "reg/dcpo")
