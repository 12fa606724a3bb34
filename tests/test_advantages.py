"""Advantage estimators: hand-worked values, loop oracles, errors."""
import math
import statistics

import pytest
import torch

from lit_covrl.algorithms import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    group_advantages,
    min_group_size,
    rloo_advantages,
    zero_variance_groups,
)


def test_grpo_hand_values_g2():
    # groups [1, 0] and [0, 1]: mean 0.5, Bessel std = sqrt((0.25 + 0.25) / 1) = sqrt(0.5)
    # A = +-0.5 / sqrt(0.5) = +-sqrt(0.5) = +-0.70711
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    a = group_advantages(r, 2, eps=0.0)
    s = math.sqrt(0.5)
    torch.testing.assert_close(a, torch.tensor([s, -s, -s, s], dtype=torch.float64), rtol=0, atol=1e-12)


def test_grpo_hand_values_g4_and_eps():
    # [1, 0, 0, 0]: mean 0.25, Bessel var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5
    # A = [0.75, -0.25, -0.25, -0.25] / (0.5 + eps)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(
        group_advantages(r, 4, eps=0.0),
        torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        group_advantages(r, 4, eps=0.5),  # denominator 1.0
        torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64), rtol=0, atol=1e-12)


def test_drgrpo_and_rloo_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    # Dr.GRPO: r - 0.25
    torch.testing.assert_close(compute_advantages(r, 4, "drgrpo"),
                               torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64))
    # RLOO: A_0 = 1 - mean(0, 0, 0) = 1; A_1 = 0 - mean(1, 0, 0) = -1/3
    torch.testing.assert_close(rloo_advantages(r, 4),
                               torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3], dtype=torch.float64))


def test_estimators_match_loop_oracles():
    g = torch.Generator().manual_seed(0)
    B, G = 5, 6
    r = torch.rand(B * G, generator=g, dtype=torch.float64)
    grpo, drgrpo, rloo = [], [], []
    for b in range(B):
        grp = r[b * G:(b + 1) * G].tolist()
        mu, sd = statistics.mean(grp), statistics.stdev(grp)
        for i, x in enumerate(grp):
            grpo.append((x - mu) / (sd + 1e-6))
            drgrpo.append(x - mu)
            rloo.append(x - statistics.mean(grp[:i] + grp[i + 1:]))
    for name, want in (("grpo", grpo), ("drgrpo", drgrpo), ("rloo", rloo)):
        got = compute_advantages(r, G, name)
        assert got.shape == (B * G,)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-10)


def test_zero_variance_group_gives_zero_not_nan():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])
    for name in ADVANTAGE_ESTIMATORS:
        a = compute_advantages(r, 2, name)
        assert torch.isfinite(a).all()
        assert a[:2].abs().max() == 0


def test_integer_rewards_accepted():
    a = compute_advantages(torch.tensor([1, 0, 0, 0]), 4, "drgrpo")
    torch.testing.assert_close(a, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_zero_variance_groups_mask():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    assert zero_variance_groups(r, 2).tolist() == [True, True, False, False, True, True]
    assert zero_variance_groups(r, 3).tolist() == [False] * 3 + [False] * 3
    assert zero_variance_groups(torch.tensor([0.5, 0.5, 0.5]), 3).tolist() == [True] * 3


def test_group_size_errors():
    r = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match=">= 2"):
        rloo_advantages(r, 1)
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), 2)
    assert all(min_group_size(n) == 2 for n in ("grpo", "drgrpo", "rloo"))


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError) as e:
        compute_advantages(torch.zeros(4), 2, "ppo")
    for name in ("grpo", "drgrpo", "rloo", "ppo"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="grpo"):
        min_group_size("nope")


def test_per_token_advantages_broadcasts_sequence_values_and_keeps_token_values():
    import torch

    from lit_covrl.algorithms import per_token_advantages

    like = torch.zeros(2, 3, dtype=torch.float64)
    a = torch.tensor([1.5, -2.0], requires_grad=True)
    got = per_token_advantages(a, like)
    assert got.dtype == torch.float64 and not got.requires_grad
    assert got.tolist() == [[1.5, 1.5, 1.5], [-2.0, -2.0, -2.0]]
    tok = torch.arange(6.0).view(2, 3)
    assert per_token_advantages(tok, like, torch.float32).tolist() == tok.tolist()


@pytest.mark.parametrize("value", [0.1, 0.2, 0.9, 1.2, 10.1, 100.3, -0.7])
@pytest.mark.parametrize("group_size", [3, 5, 8, 16])
def test_a_group_of_equal_non_binary_rewards_has_exactly_zero_advantage(value, group_size):
    """float32 rewards of 0.1 (or 1.2: a correct answer with two format rewards weighted 0.1) gave
    a group mean one ulp off and a std of rounding noise: GRPO divided the two into a same-signed
    advantage (-0.0074 for 8 x 0.1, +0.106 for 8 x 1.2) that trained the model on a constant reward."""
    r = torch.cat([torch.full((group_size,), value), torch.arange(group_size, dtype=torch.float32)])
    for name in ADVANTAGE_ESTIMATORS:
        a = compute_advantages(r, group_size, name)
        assert a.dtype == torch.float32
        assert a[:group_size].abs().max() == 0, (name, a[:group_size])
        assert a[group_size:].abs().max() > 0.5  # the varied group keeps its signal


def test_quantile_baseline_hand_values_two_regimes():
    """QAE with K = 0.4, G = 8 (position K (G-1) = 2.8 in the sorted group, linear interpolation):
    a hard prompt (1 success) gets baseline 0, so only the success moves; an easy one (1 failure)
    baseline 1, so only the failure moves; 5 of 8 correct: sorted[2] = 0, sorted[3] = 1 -> 0.8."""
    r = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1], dtype=torch.float64)
    a = compute_advantages(r, 8, "drgrpo", baseline_quantile=0.4).view(3, 8)
    torch.testing.assert_close(a[0], torch.tensor([0.0] * 7 + [1.0], dtype=torch.float64))
    torch.testing.assert_close(a[1], torch.tensor([0.0] * 7 + [-1.0], dtype=torch.float64))
    torch.testing.assert_close(a[2], r[16:] - 0.8)
    std_one_of_8 = math.sqrt((1 - 8 / 64) / 7)  # Bessel std of seven 0s and one 1 (or seven 1s and one 0)
    g = compute_advantages(r, 8, "grpo", baseline_quantile=0.4).view(3, 8)
    torch.testing.assert_close(g[0], a[0] / (std_one_of_8 + 1e-6))
    torch.testing.assert_close(g[1], a[1] / (std_one_of_8 + 1e-6))


@pytest.mark.parametrize("k", [0.1, 0.4, 0.5, 0.9])
def test_quantile_baseline_matches_a_loop_oracle(k):
    g = torch.Generator().manual_seed(1)
    B, G = 4, 7
    r = torch.rand(B * G, generator=g, dtype=torch.float64)
    want = []
    for b in range(B):
        grp = sorted(r[b * G:(b + 1) * G].tolist())
        pos = k * (G - 1)
        lo = math.floor(pos)
        q = grp[lo] + (pos - lo) * (grp[min(lo + 1, G - 1)] - grp[lo])
        want += [x - q for x in r[b * G:(b + 1) * G].tolist()]
    got = compute_advantages(r, G, "drgrpo", baseline_quantile=k)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    equal = torch.full((G,), 0.3)  # an equal group stays exactly 0
    assert compute_advantages(equal, G, "grpo", baseline_quantile=k).eq(0).all()


def test_quantile_baseline_errors():
    r = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="not 'rloo'"):
        compute_advantages(r, 2, "rloo", baseline_quantile=0.4)
    for k in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            compute_advantages(r, 2, "grpo", baseline_quantile=k)
