"""RENT (Prabhudesai et al. 2025, arXiv 2505.22660; the authors' code satrams/rent-rl): the reward
-H_i, H_i each response's mean token entropy under the rollout policy, against hand-worked values
and a float64 loop oracle; the step's advantages estimated from it (not from the task reward); its
independence of the other responses of the batch; its metrics; the start-up refusals naming the field."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lit_covrl.algorithms import compute_advantages, rent_rewards, response_entropy_means
from lit_covrl.dynamic_sampling import Round
from lit_covrl.regularizers import AEPO, RENT, RLZVP, OutcomeExploration, SimKO, WeightedReinforce
from lit_covrl.regularizers.base import check_stack
from lit_covrl.settings import LossSettings, RolloutSettings
from lit_covrl.step_batch import StepBatch
from lit_covrl.types import PromptBatch, Rollout
from tests.helpers import cli_fit_tags, cli_start_up_error


def _oracle(rewards, entropy, mask, coef: float, reward_weight: float) -> torch.Tensor:
    """reward_weight r_i - coef * (mean of H over the response's valid tokens; 0 without any), in plain loops."""
    out = []
    for i in range(len(rewards)):
        valid = [float(entropy[i, t]) for t in range(entropy.shape[1]) if mask[i, t] > 0]
        h = sum(valid) / len(valid) if valid else 0.0
        out.append(reward_weight * float(rewards[i]) - coef * h)
    return torch.tensor(out, dtype=torch.float64)


def test_hand_worked():
    """H (1, 3) with a padded 99 -> mean 2; H (2, 2, 2) -> 2; an empty response -> 0. RENT: -H;
    with reward_weight 0.5 and coef 2: 0.5 r - 2 H."""
    ent = torch.tensor([[1.0, 3.0, 99.0], [2.0, 2.0, 2.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert response_entropy_means(ent, mask).tolist() == [2.0, 2.0, 0.0]
    assert rent_rewards(rewards, ent, mask).tolist() == [-2.0, -2.0, 0.0]
    assert rent_rewards(rewards, ent, mask, coef=2.0, reward_weight=0.5).tolist() == [-3.5, -4.0, 0.5]


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_float64_loop_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    n, t = 10, 7
    lengths = torch.randint(0, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    ent = torch.rand(n, t, generator=g, dtype=torch.float64) * 4
    rewards = (torch.rand(n, generator=g) < 0.5).double()
    for coef, weight in [(1.0, 0.0), (0.3, 1.0)]:
        got = rent_rewards(rewards, ent, mask, coef=coef, reward_weight=weight)
        torch.testing.assert_close(got, _oracle(rewards, ent, mask, coef, weight), rtol=0, atol=1e-12)


def test_a_response_reward_ignores_the_other_responses():
    """Per response: the same response gets the same reward beside any other (no batch statistic)."""
    ent = torch.tensor([[0.5, 1.5, 0.0], [9.0, 8.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = torch.zeros(2)
    assert rent_rewards(r, ent, mask)[:1].tolist() == rent_rewards(r[:1], ent[:1], mask[:1]).tolist() == [-1.0]


def test_entropy_is_detached_and_dtype_kept():
    ent = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    out = rent_rewards(torch.zeros(2, dtype=torch.float32), ent, torch.ones(2, 4))
    assert not out.requires_grad and out.dtype == torch.float32


def _rollout(seed: int = 0, n: int = 6, t: int = 5) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    ent = torch.rand(n, t, generator=g) * 2 * mask
    ids = torch.zeros(n, t + 2, dtype=torch.long)
    return Rollout(ids, torch.ones_like(ids), mask, -ent, ent, torch.zeros(n, dtype=torch.bool), ["x"] * n)


def test_callback_rewards_and_metrics():
    rollout = _rollout()
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # two groups that GRPO would not train
    reg = RENT()
    got = reg.step_rewards(0, rewards, rollout)
    expected = _oracle(rewards, rollout.entropy, rollout.response_mask, 1.0, 0.0)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    m = reg.pop_metrics()
    assert m["reg/rent/coef"] == 1.0
    assert m["reg/rent/reward_mean"] == pytest.approx(float(expected.mean()))
    assert m["reg/rent/response_entropy"] == pytest.approx(float(-expected.mean()))
    assert reg.pop_metrics() == {}  # the sums start again at zero


def test_schedule_anneals_coef():
    reg = RENT(coef=2.0, reward_weight=1.0, schedule={"name": "linear", "final": 0.0, "steps": 10})
    rollout, rewards = _rollout(seed=1), torch.ones(6)
    got = reg.step_rewards(5, rewards, rollout)
    torch.testing.assert_close(got.double(), _oracle(rewards, rollout.entropy, rollout.response_mask, 1.0, 1.0),
                               rtol=0, atol=1e-6)
    assert reg.pop_metrics()["reg/rent/coef"] == pytest.approx(1.0)


def _step_batch(regs, group_size: int = 3) -> StepBatch:
    sb = StepBatch()
    sb.settings = SimpleNamespace(rollout=RolloutSettings(group_size=group_size), loss=LossSettings())
    sb.regularizers, sb.recompute_logprobs_on, sb.global_step = regs, False, 0
    return sb


def test_the_step_advantages_come_from_the_entropy_rewards():
    """Through `StepBatch._trained_batch`: with RENT the estimator (GRPO) sees -H_i, so the two groups
    whose task rewards are all alike (advantage 0 under GRPO) train, the more confident responses
    with A > 0; without it, the task rewards' advantages."""
    rollout = _rollout(seed=2)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    sampled = Round(PromptBatch(["p", "q"], ["a", "b"]), rollout, rewards)
    (_, adv, keep), logged, _, _, _ = _step_batch([RENT()])._trained_batch(sampled, None)
    h = response_entropy_means(rollout.entropy, rollout.response_mask)
    torch.testing.assert_close(adv, compute_advantages((-h).float(), 3, "grpo"))
    assert keep.all() and (adv != 0).all() and logged is adv
    assert ((adv > 0) == (h < h.view(2, 3).mean(1).repeat_interleave(3))).all()
    (_, plain, _), _, _, _, _ = _step_batch([])._trained_batch(sampled, None)
    assert (plain == 0).all()


@pytest.mark.parametrize("field,value", [("coef", 0.0), ("coef", -1.0), ("coef", float("nan")), ("coef", True),
                                         ("reward_weight", -0.5), ("reward_weight", float("inf")), ("reward_weight", "1")])
def test_settings_are_validated_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"RENT\.{field}="):
        RENT(**{field: value})


@pytest.mark.parametrize("loss,rollout,field", [
    (LossSettings(advantage="passk", pass_k=2), RolloutSettings(), r"model\.loss\.advantage='passk' is invalid with RENT"),
    (LossSettings(unlikeliness=0.25), RolloutSettings(), r"model\.loss\.unlikeliness=0\.25 is invalid with RENT"),
    (LossSettings(), RolloutSettings(filter_groups=True), r"model\.rollout\.filter_groups=True is invalid with RENT"),
])
def test_settings_needing_task_rewards_are_refused(loss, rollout, field):
    RENT().check_loss(LossSettings(), RolloutSettings())
    with pytest.raises(ValueError, match=field):
        RENT().check_loss(loss, rollout)


@pytest.mark.parametrize("other", [OutcomeExploration(historical=0.5, batch=0.5), RLZVP(), AEPO(), SimKO(),
                                   WeightedReinforce()], ids=lambda r: type(r).__name__)
def test_refused_beside_a_control_that_reads_the_task_reward(other):
    for stack in ([RENT(), other], [other, RENT()]):
        with pytest.raises(ValueError, match=rf"RENT \('rent'\) and {type(other).__name__} .* cannot be stacked"):
            check_stack(stack)


def test_one_reward_shaper_per_run():
    check_stack([RENT()])
    with pytest.raises(ValueError, match="2 regularizers compute the rewards"):
        check_stack([RENT(), RENT(name="rent_2")])


def test_cli_refuses_dynamic_sampling(tmp_path, capsys):
    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/rent.yaml", "--model.rollout.filter_groups", "true")
    assert "model.rollout.filter_groups" in err and "RENT" in err


def test_cli_run_logs_the_entropy_reward(tmp_path):
    """Through the real CLI on the quickstart task: the reward the estimator got is -H (reward_mean =
    -response_entropy < 0), while rollout/reward_mean stays the task reward."""
    tags = cli_fit_tags(tmp_path, "configs/cpu/rent.yaml", steps=3)
    assert len(tags["reg/rent/reward_mean"]) == 3 and all(v > 0 for v in tags["reg/rent/response_entropy"])
    for r, h in zip(tags["reg/rent/reward_mean"], tags["reg/rent/response_entropy"]):
        assert r == pytest.approx(-h, rel=1e-5)
    assert all(v >= 0 for v in tags["rollout/reward_mean"])
