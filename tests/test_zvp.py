"""RL-ZVP (Le et al. 2025, arXiv 2509.21880): the zero-variance groups' entropy-guided advantage
(eq. 5) against hand-worked values and a float64 loop oracle, the callback's shift inside the
objective (it replaces the estimator's advantage on those groups, leaves the others alone), its
independence of the micro-batch split, its metrics, and the start-up refusals naming the field."""
from __future__ import annotations

import pytest
import torch

from lit_covrl.algorithms import zvp_advantages, zvp_group_signs
from lit_covrl.regularizers import AEPO, DCPOAdvantage, EntropyAdvantage, OutcomeExploration, RLZVP
from lit_covrl.regularizers.base import MiniBatchContext, check_stack
from lit_covrl.settings import LossSettings, RolloutSettings
from lit_covrl.types import PolicyBatch, TokenShaping
from tests.helpers import cli_fit_tags, cli_start_up_error


def _signs_oracle(rewards: list[float], group_size: int) -> list[float]:
    out = []
    for j in range(0, len(rewards), group_size):
        group = rewards[j:j + group_size]
        out.append(0.0 if any(r != group[0] for r in group) else (1.0 if group[0] > 0 else -1.0))
    return out


def _adv_oracle(entropy, mask, signs, alpha: float) -> torch.Tensor:
    """Eq. 5 in plain float64 loops: alpha H on a positive response, -alpha (max H - H) on a
    negative one (the max over its valid tokens), 0 elsewhere."""
    n, t = entropy.shape
    out = torch.zeros(n, t, dtype=torch.float64)
    for i in range(n):
        valid = [float(entropy[i, k]) for k in range(t) if mask[i, k] > 0]
        top = max(valid) if valid else 0.0
        for k in range(t):
            if mask[i, k] == 0 or signs[i] == 0:
                continue
            h = float(entropy[i, k])
            out[i, k] = alpha * h if signs[i] > 0 else -alpha * (top - h)
    return out


def test_group_signs_hand_worked():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, -0.5, -0.5, -0.5, 0.2, 0.2, 0.2])
    assert zvp_group_signs(rewards, 3).tolist() == [1.0, -1.0, 0.0, -1.0, 1.0]  # R <= 0: negative; any R > 0: positive


def test_advantages_hand_worked():
    """alpha 0.1: a positive response 0.1 H; a negative one with H (1, 3, 2) and its max 3 (the
    padded 99 not counted): -0.1 (3 - H) = (-0.2, 0, -0.1); a mixed group's response 0."""
    ent = torch.tensor([[1.0, 3.0, 99.0], [1.0, 3.0, 2.0], [2.0, 5.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    adv = zvp_advantages(ent, mask, torch.tensor([1.0, -1.0, 0.0]), alpha=0.1)
    torch.testing.assert_close(adv, torch.tensor([[0.1, 0.3, 0.0], [-0.2, 0.0, -0.1], [0.0, 0.0, 0.0]]))


def test_max_is_per_response_not_over_the_batch():
    """Each negative response subtracts from its own max: the same tokens give the same advantages
    beside a response of much larger entropy (a max over the batch would move them)."""
    ent = torch.tensor([[0.5, 1.5, 0.0], [9.0, 8.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    alone = zvp_advantages(ent[:1], mask[:1], torch.tensor([-1.0]), alpha=0.2)
    both = zvp_advantages(ent, mask, torch.tensor([-1.0, -1.0]), alpha=0.2)
    torch.testing.assert_close(both[:1], alone)
    torch.testing.assert_close(alone, torch.tensor([[-0.2, 0.0, 0.0]]))


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_float64_loop_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    n, t, group = 12, 9, 4
    rewards = (torch.rand(n, generator=g) < 0.5).double()
    rewards[:group] = 1.0  # at least one all-correct and one all-wrong group
    rewards[group:2 * group] = 0.0
    signs = zvp_group_signs(rewards, group)
    assert signs.tolist() == _signs_oracle(rewards.tolist(), group)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    ent = torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    row_signs = signs.repeat_interleave(group)
    adv = zvp_advantages(ent, mask, row_signs, alpha=0.15)
    torch.testing.assert_close(adv, _adv_oracle(ent, mask, row_signs, 0.15), rtol=0, atol=1e-12)
    assert (adv[row_signs > 0] >= 0).all() and (adv[row_signs < 0] <= 0).all() and (adv[row_signs == 0] == 0).all()


def test_entropy_is_detached():
    ent = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    adv = zvp_advantages(ent, torch.ones(2, 4), torch.tensor([1.0, -1.0]), alpha=0.1)
    assert not adv.requires_grad


def _step(seed: int = 0, n_groups: int = 4, group: int = 3, t: int = 6):
    """A mini-batch of 4 groups: all correct, all wrong, mixed, all wrong; GRPO-like advantages (0 on
    the equal groups except where `bump` says), entropies with grad."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.tensor([1.0] * group + [0.0] * group + [1.0, 0.0, 0.0] + [0.0] * group)
    n = n_groups * group
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    seq_adv = torch.zeros(n, dtype=torch.float64)
    seq_adv[2 * group:3 * group] = torch.tensor([1.15, -0.58, -0.58], dtype=torch.float64)
    adv = seq_adv[:, None].expand(n, t) * mask
    ent = (torch.rand(n, t, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    return rewards, mask, adv, ent, logp, torch.arange(n) // group


def _shaped(reg: RLZVP, rewards, mask, adv, ent, logp, groups, splits) -> torch.Tensor:
    reg.observe_rewards(rewards, 3)
    reg.prepare(MiniBatchContext(step=0, update=0, on_policy=True, logp=logp, old_logp=logp, advantages=adv,
                                 mask=mask, clipped=None, groups=groups))
    shifts = []
    for rows in torch.arange(len(mask)).split(splits):
        s = reg.shape(PolicyBatch(rows, logp[rows], logp[rows], adv[rows], mask[rows], ent[rows]))
        assert s.weight is None and s.penalty is None and not s.advantage_shift.requires_grad
        shifts.append(TokenShaping.shifted_advantages([s], adv[rows]))
    return torch.cat(shifts)


def test_callback_replaces_the_zero_advantage_of_equal_groups_only():
    rewards, mask, adv, ent, logp, groups = _step()
    reg = RLZVP(alpha=0.1)
    shifted = _shaped(reg, rewards, mask, adv, ent, logp, groups, len(mask))
    row_signs = torch.tensor([1.0, -1.0, 0.0, -1.0]).repeat_interleave(3)
    expected = _adv_oracle(ent.detach(), mask, row_signs, 0.1)
    expected[6:9] = adv[6:9]  # the mixed group keeps the estimator's advantage
    torch.testing.assert_close(shifted, expected, rtol=0, atol=1e-12)
    m = reg.pop_metrics()
    pos, neg = mask[:3].sum(), mask[3:6].sum() + mask[9:].sum()
    assert m["reg/rl_zvp/zvp_frac"] == pytest.approx(9 / 12) and m["reg/rl_zvp/positive_frac"] == pytest.approx(3 / 12)
    assert m["reg/rl_zvp/adv_positive_mean"] == pytest.approx(float(expected[:3].sum() / pos))
    assert m["reg/rl_zvp/adv_negative_mean"] == pytest.approx(float((expected[3:6].sum() + expected[9:].sum()) / neg))
    assert m["reg/rl_zvp/coef"] == 0.1


def test_callback_replaces_whatever_the_estimator_gave_an_equal_group():
    """A' = A_zvp on an all-equal group even where its advantage was not 0 (the paper replaces
    GRPO's zero): the shift is A_zvp - A there."""
    rewards, mask, adv, ent, logp, groups = _step(seed=1)
    bumped = adv.clone()
    bumped[:3] = 0.7 * mask[:3]
    shifted = _shaped(RLZVP(alpha=0.1), rewards, mask, bumped, ent, logp, groups, len(mask))
    torch.testing.assert_close(shifted[:3], 0.1 * ent.detach()[:3] * mask[:3], rtol=0, atol=1e-12)


@pytest.mark.parametrize("splits", [1, 3, 5])
def test_micro_batch_split_changes_nothing(splits):
    rewards, mask, adv, ent, logp, groups = _step(seed=2)
    whole, split = RLZVP(alpha=0.2), RLZVP(alpha=0.2)
    a = _shaped(whole, rewards, mask, adv, ent, logp, groups, len(mask))
    b = _shaped(split, rewards, mask, adv, ent, logp, groups, splits)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert whole.pop_metrics() == pytest.approx(split.pop_metrics())


def test_schedule_anneals_alpha():
    rewards, mask, adv, ent, logp, groups = _step(seed=3)
    reg = RLZVP(alpha=0.2, schedule={"name": "linear", "final": 0.0, "steps": 10})
    reg.observe_rewards(rewards, 3)
    reg.prepare(MiniBatchContext(step=5, update=0, on_policy=True, logp=logp, old_logp=logp, advantages=adv,
                                 mask=mask, clipped=None, groups=groups))
    assert reg.pop_metrics()["reg/rl_zvp/coef"] == pytest.approx(0.1)


@pytest.mark.parametrize("alpha", [-0.1, float("inf"), float("nan"), True, "0.1", None])
def test_alpha_is_validated_naming_the_field(alpha):
    with pytest.raises(ValueError, match=r"RLZVP\.alpha"):
        RLZVP(alpha=alpha)


def test_filter_groups_is_refused_naming_the_field():
    RLZVP().check_loss(LossSettings(), RolloutSettings())
    with pytest.raises(ValueError, match=r"model\.rollout\.filter_groups=True is invalid with RLZVP"):
        RLZVP().check_loss(LossSettings(), RolloutSettings(filter_groups=True))


@pytest.mark.parametrize("other", [DCPOAdvantage(), OutcomeExploration(historical=0.5, batch=0.5), AEPO()],
                         ids=lambda r: type(r).__name__)
def test_refused_beside_a_control_that_sets_equal_groups_advantages(other):
    with pytest.raises(ValueError, match=rf"RLZVP \('rl_zvp'\) and {type(other).__name__} .* cannot be stacked"):
        check_stack([RLZVP(), other])
    with pytest.raises(ValueError, match="cannot be stacked"):
        check_stack([other, RLZVP()])


def test_one_advantage_shift_per_run():
    with pytest.raises(ValueError, match="2 regularizers shift the advantage"):
        check_stack([RLZVP(), EntropyAdvantage()])


def test_cli_refuses_dynamic_sampling(tmp_path, capsys):
    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/rl_zvp.yaml", "--model.rollout.filter_groups", "true")
    assert "model.rollout.filter_groups" in err and "RLZVP" in err


def test_cli_run_trains_the_equal_groups(tmp_path):
    """Through the real CLI on the quickstart task: the all-alike groups are found (zvp_frac > 0)
    and the control changes the objective (reg/rl_zvp/loss != 0); positive responses get A > 0,
    negative ones A < 0."""
    tags = cli_fit_tags(tmp_path, "configs/cpu/rl_zvp.yaml", steps=3)
    assert all(0 < v <= 1 for v in tags["reg/rl_zvp/zvp_frac"])
    assert any(v != 0 for v in tags["reg/rl_zvp/loss"])
    assert all(v > 0 for v in tags.get("reg/rl_zvp/adv_positive_mean", []))
    assert all(v < 0 for v in tags.get("reg/rl_zvp/adv_negative_mean", []))
    assert tags.get("reg/rl_zvp/adv_positive_mean") or tags.get("reg/rl_zvp/adv_negative_mean")


def test_an_empty_response_gets_zeros_not_nan():
    """A response with no valid token (mask all 0: a filler row) gets advantage 0 whatever its sign:
    its max over no token is read as 0, not -inf (-inf would give inf * 0 = NaN on its padding).
    Kills mut25 Z9 (the max's clamp(min=0) dropped)."""
    ent = torch.tensor([[0.4, 0.7], [0.4, 0.7], [0.3, 0.9]], dtype=torch.float64)
    mask = torch.tensor([[0, 0], [0, 0], [1, 1]])
    adv = zvp_advantages(ent, mask, torch.tensor([-1.0, 1.0, -1.0]), alpha=0.5)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0], [0.0, 0.0], [-0.3, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_a_negative_entropy_of_rounding_noise_counts_as_zero():
    """An entropy a little below 0 (float rounding of a peaked distribution) is read as 0, so the
    advantage's sign follows correctness: 0, never negative, on a positive response; on a negative
    one the gap to the max is from 0. Kills mut25 Z10 (the entropy's clamp(min=0) dropped)."""
    ent = torch.tensor([[-1e-3, 0.5], [-1e-3, -2e-3]], dtype=torch.float64)
    mask = torch.ones(2, 2)
    adv = zvp_advantages(ent, mask, torch.tensor([1.0, -1.0]), alpha=0.1)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.05], [0.0, 0.0]], dtype=torch.float64), rtol=0, atol=0)
    assert (adv[0] >= 0).all()
