"""Token covariance (Eq. 10) and the Clip-Cov / KL-Cov selections."""
import math

import pytest
import torch

from lit_covrl.algorithms import (
    clip_cov_select,
    covariance_group_means,
    covariance_sums,
    kl_cov_select,
    token_covariance,
)

F64 = torch.float64


def test_covariance_hand_values():
    # valid logp -1, -2, -3 -> mean -2; valid A 1, 1, -2 -> mean 0
    # Cov = (1)(1) = 1, (0)(1) = 0, (-1)(-2) = 2, and 0 on the padded token (logp -inf there)
    logp = torch.tensor([[-1.0, -2.0], [-3.0, float("-inf")]], dtype=F64)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    cov = token_covariance(logp, adv, mask)
    torch.testing.assert_close(cov, torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64), rtol=0, atol=1e-12)


def _oracle_cov(logp, adv, mask, means=None):
    N, T = logp.shape
    valid = [(n, t) for n in range(N) for t in range(T) if mask[n, t]]
    if means is None:
        m_lp = sum(float(logp[n, t]) for n, t in valid) / len(valid)
        m_a = sum(float(adv[n, t]) for n, t in valid) / len(valid)
    else:
        m_lp, m_a = means
    out = torch.zeros(N, T, dtype=F64)
    for n, t in valid:
        out[n, t] = (float(logp[n, t]) - m_lp) * (float(adv[n, t]) - m_a)
    return out


def _batch(seed, N=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(N, T, generator=g, dtype=F64)
    adv = torch.randn(N, T, generator=g, dtype=F64)
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[0, 0] = True
    return logp, adv, mask


def test_covariance_matches_loop_oracle_and_is_detached():
    logp, adv, mask = _batch(0)
    lp = logp.clone().requires_grad_(True)
    cov = token_covariance(lp, adv, mask.double())
    assert not cov.requires_grad
    torch.testing.assert_close(cov, _oracle_cov(logp, adv, mask), rtol=0, atol=1e-12)
    cov2 = token_covariance(logp, adv, mask, means=(torch.tensor(-1.0), 0.5))
    torch.testing.assert_close(cov2, _oracle_cov(logp, adv, mask, means=(-1.0, 0.5)), rtol=0, atol=1e-12)


def test_global_means_across_ranks_equal_concatenated():
    logp, adv, mask = _batch(1, N=6)
    full = token_covariance(logp, adv, mask)
    shards = [slice(0, 2), slice(2, 6)]  # two "ranks"
    s = sum(covariance_sums(logp[sh], adv[sh], mask[sh]) for sh in shards)  # the all-reduce
    means = (s[0] / s[2], s[1] / s[2])
    got = torch.cat([token_covariance(logp[sh], adv[sh], mask[sh], means=means) for sh in shards])
    torch.testing.assert_close(got, full, rtol=0, atol=1e-12)
    local = torch.cat([token_covariance(logp[sh], adv[sh], mask[sh]) for sh in shards])
    assert (local - full).abs().max() > 1e-3  # local means really differ


def test_bf16_logp_computed_in_float32():
    logp, adv, mask = _batch(2)
    cov = token_covariance(logp.bfloat16(), adv.float(), mask)
    assert cov.dtype == torch.float32
    want = _oracle_cov(logp.bfloat16().double(), adv.float().double(), mask)
    torch.testing.assert_close(cov.double(), want, rtol=0, atol=1e-5)


def _candidates_batch(n_cand=100, N=10, T=40):
    # mask: 300 valid tokens; cov 2.0 (inside (1, 5)) on the first n_cand valid ones, 0 elsewhere
    mask = torch.zeros(N, T, dtype=torch.bool)
    mask.view(-1)[:300] = True
    cov = torch.zeros(N, T)
    cov.view(-1)[:n_cand] = 2.0
    return cov, mask


def test_clip_cov_count_and_subset():
    cov, mask = _candidates_batch()
    eligible = torch.ones_like(mask)
    for ratio, want in ((0.02, 6), (0.0002, 1), (0.1, 30), (0.5, 100), (0.29, 87)):
        # k = min(max(floor(ratio * 300), 1), 100): 6, 1 (floor 0.06 = 0 -> 1), 30, 100 (150 capped), 87
        sel = clip_cov_select(cov, mask, eligible, ratio=ratio, lb=1.0, ub=5.0,
                              generator=torch.Generator().manual_seed(0))
        assert sel.dtype == torch.bool and sel.shape == cov.shape
        assert int(sel.sum()) == want
        assert (cov[sel] == 2.0).all() and mask[sel].all()
    # global token count drives k: floor(0.01 * 1000) = 10
    sel = clip_cov_select(cov, mask, eligible, ratio=0.01, lb=1.0, ub=5.0, num_tokens=1000.0)
    assert int(sel.sum()) == 10


def test_clip_cov_strict_bounds_eligibility_and_mask():
    cov = torch.tensor([[1.0, 5.0, 1.5, 4.9, 3.0, 3.0, 0.5, 6.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1, 1]])
    eligible = torch.tensor([[True, True, True, True, False, True, True, True]])
    # candidates: 1.5 and 4.9 only (1.0 and 5.0 excluded by strictness, 3.0 ineligible or padded)
    sel = clip_cov_select(cov, mask, eligible, ratio=1.0, lb=1.0, ub=5.0)
    assert sel.tolist() == [[False, False, True, True, False, False, False, False]]
    none = clip_cov_select(cov, mask, eligible, ratio=1.0, lb=10.0, ub=20.0)
    assert not none.any()


def test_clip_cov_seeded():
    cov, mask = _candidates_batch()
    eligible = torch.ones_like(mask)

    def draw(seed):
        return clip_cov_select(cov, mask, eligible, ratio=0.03, lb=1.0, ub=5.0,
                               generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))  # 9 of 100: P(equal) = 1 / C(100, 9)
    g = torch.Generator().manual_seed(7)
    first = clip_cov_select(cov, mask, eligible, ratio=0.03, lb=1.0, ub=5.0, generator=g)
    second = clip_cov_select(cov, mask, eligible, ratio=0.03, lb=1.0, ub=5.0, generator=g)
    assert not torch.equal(first, second)  # the generator advances


def test_clip_cov_uniform():
    # 10 candidates, 30 valid tokens, ratio 0.1 -> k = 3; each candidate is picked with p = 0.3.
    # 2000 draws: count ~ Binomial(2000, 0.3), mean 600, sd 20.5; +-100 is ~5 sd.
    cov = torch.zeros(1, 30)
    cov[0, ::3] = 2.0
    mask = torch.ones(1, 30)
    eligible = torch.ones(1, 30, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(1, 30)
    for _ in range(2000):
        counts += clip_cov_select(cov, mask, eligible, ratio=0.1, lb=1.0, ub=5.0, generator=g)
    assert counts.sum() == 6000
    assert (counts[0, 1::3] == 0).all() and (counts[0, 2::3] == 0).all()
    assert ((counts[0, ::3] - 600).abs() < 100).all(), counts[0, ::3]


def _oracle_topk(cov, mask, k):
    valid = [(float(cov.view(-1)[i]), i) for i in range(cov.numel()) if mask.view(-1)[i]]
    valid.sort(key=lambda x: (-x[0], x[1]))  # highest cov first, ties by position
    out = torch.zeros(cov.numel(), dtype=torch.bool)
    for _, i in valid[:k]:
        out[i] = True
    return out.view_as(cov)


def test_kl_cov_matches_topk_oracle():
    g = torch.Generator().manual_seed(4)
    cov = torch.randn(6, 50, generator=g)
    mask = torch.rand(6, 50, generator=g) > 0.25
    cov[~mask] = 100.0  # invalid tokens with huge cov are never picked
    n_valid = int(mask.sum())
    for ratio in (0.0002, 0.02, 0.2, 1.0, 3.0):
        k = min(max(math.floor(ratio * n_valid), 1), n_valid)
        sel = kl_cov_select(cov, mask, ratio=ratio)
        assert int(sel.sum()) == k
        assert mask[sel].all()
        assert torch.equal(sel, _oracle_topk(cov, mask, k))
    # global count: floor(0.01 * 500) = 5 tokens
    assert int(kl_cov_select(cov, mask, ratio=0.01, num_tokens=500).sum()) == 5


def test_kl_cov_deterministic_ties_and_empty():
    cov = torch.zeros(2, 5)
    mask = torch.ones(2, 5)
    sel = kl_cov_select(cov, mask, ratio=0.3)  # k = 3 among 10 ties: the first three positions
    assert sel.view(-1).tolist() == [True] * 3 + [False] * 7
    assert not kl_cov_select(cov, torch.zeros(2, 5), ratio=0.5).any()


def test_group_means_hand_values():
    # valid cov 1..10 (a padded 99 is ignored): top 10% = {10}, top 20% = {10, 9} -> 9.5,
    # top 50% = 10..6 -> 8, top 0.02% -> at least one token -> 10, top 100% -> 5.5
    cov = torch.tensor([[float(i) for i in range(1, 11)] + [99.0]])
    mask = torch.tensor([[1] * 10 + [0]])
    got = covariance_group_means(cov, mask, fractions=(0.1, 0.2, 0.5, 0.0002, 1.0))
    assert {f: v.item() for f, v in got.items()} == pytest.approx({0.1: 10.0, 0.2: 9.5, 0.5: 8.0, 0.0002: 10.0, 1.0: 5.5})
    default = covariance_group_means(cov, mask)
    assert list(default) == [0.0002, 0.002, 0.02, 0.2]
    assert default[0.2].item() == pytest.approx(9.5)
    empty = covariance_group_means(cov, torch.zeros_like(mask))
    assert all(v.item() == 0.0 for v in empty.values())


def test_selection_count_survives_float_rounding_below_an_integer():
    """0.29 * 100 is 28.999999999999996 in floating point: k must be 29, not 28 (both selectors)."""
    assert 0.29 * 100 < 29
    cov = torch.arange(100, dtype=torch.float32).view(4, 25)
    mask = torch.ones(4, 25)
    assert int(kl_cov_select(cov, mask, ratio=0.29).sum()) == 29
    sel = clip_cov_select(cov, mask, torch.ones(4, 25, dtype=torch.bool), ratio=0.29, lb=-1.0, ub=1e9,
                          generator=torch.Generator().manual_seed(0))
    assert int(sel.sum()) == 29
