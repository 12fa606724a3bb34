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
        a = compute_advantages(r, 2, name, **({"pass_k": 1} if name == "passk" else {}))
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
    for name in set(ADVANTAGE_ESTIMATORS) - {"passk"}:  # passk refuses rewards other than 0 / 1
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


def _passk_subset_oracle(group: list[float], k: int, eps: float = 1e-6) -> list[float]:
    """Pass@k advantages by brute force: every k-subset of the group scores its best reward; rho and
    sigma are the mean and (population) std of those scores, and a response's advantage is the mean
    of (score - rho) / (sigma + eps) over the subsets that hold it (float64 Python floats)."""
    import itertools

    subsets = list(itertools.combinations(range(len(group)), k))
    score = {s: max(group[i] for i in s) for s in subsets}
    rho = sum(score.values()) / len(subsets)
    sigma = math.sqrt(sum((v - rho) ** 2 for v in score.values()) / len(subsets))
    out = []
    for i in range(len(group)):
        held = [(score[s] - rho) / (sigma + eps) for s in subsets if i in s]
        out.append(sum(held) / len(held))
    return out


def test_passk_hand_values():
    """G = 4, k = 2 (C(4, 2) = 6 subsets, each failure is in C(3, 1) = 3 of them):
    one success: 3 of the 6 subsets miss it, rho = 1/2, sigma = 1/2, A_pos = 1; a failure's 3
    subsets hold the success in 1, so it scores 1/3 on average: A_neg = (1/3 - 1/2) / (1/2) = -1/3.
    Two successes: 1 subset of 6 misses them, rho = 5/6, sigma = sqrt(5)/6, A_pos = (1/6) / sigma =
    1/sqrt(5); a failure's subsets score 2/3: A_neg = (2/3 - 5/6) / sigma = -1/sqrt(5).
    Three successes (1 failure < k): every subset passes, all 0; as all-0 and all-1 groups."""
    r = torch.tensor([1, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float64)
    a = compute_advantages(r, 4, "passk", pass_k=2).view(5, 4)
    eps, s5 = 1e-6, math.sqrt(5) / 6
    want = torch.tensor([
        [0.5 / (0.5 + eps), -(1 / 6) / (0.5 + eps), -(1 / 6) / (0.5 + eps), -(1 / 6) / (0.5 + eps)],
        [-(1 / 6) / (s5 + eps), (1 / 6) / (s5 + eps), -(1 / 6) / (s5 + eps), (1 / 6) / (s5 + eps)],
        [0.0] * 4, [0.0] * 4, [0.0] * 4,
    ], dtype=torch.float64)
    torch.testing.assert_close(a, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3], dtype=torch.float64), rtol=0, atol=1e-5)
    assert a[2:].eq(0).all()  # exactly 0, not a rounding residue divided by eps


@pytest.mark.parametrize("G", [2, 3, 5, 8])
def test_passk_matches_a_brute_force_oracle_over_all_k_subsets(G):
    """Every k in [1, G - 1] and every success count, responses in a random order."""
    gen = torch.Generator().manual_seed(G)
    for k in range(1, G):
        groups = []
        for c in range(G + 1):
            groups.append([1.0] * c + [0.0] * (G - c))
            groups[-1] = [groups[-1][j] for j in torch.randperm(G, generator=gen).tolist()]
        r = torch.tensor([x for g in groups for x in g], dtype=torch.float64)
        want = torch.tensor([x for g in groups for x in _passk_subset_oracle(g, k)], dtype=torch.float64)
        got = compute_advantages(r, G, "passk", pass_k=k)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=f"G={G} k={k}")


def test_passk_is_grpo_times_a_per_group_weight_and_k1_is_population_std_grpo():
    """Each subset is counted k times over its members, so a group's advantages sum to 0: with two
    values they are r - mean times a weight of the success count. k = 1: the weight is
    1 / population std, i.e. GRPO with std over G instead of G - 1."""
    gen = torch.Generator().manual_seed(0)
    G = 8
    r = (torch.rand(64 * G, generator=gen) < 0.4).double()
    for k in (1, 2, 4, 7):
        a = compute_advantages(r, G, "passk", pass_k=k).view(-1, G)
        torch.testing.assert_close(a.sum(dim=1), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-12)
    centered = r.view(-1, G) - r.view(-1, G).mean(dim=1, keepdim=True)
    pop_std = r.view(-1, G).std(dim=1, unbiased=False, keepdim=True)
    want = (centered / (pop_std + 1e-6)).reshape(-1)
    torch.testing.assert_close(compute_advantages(r, G, "passk", pass_k=1), want, rtol=0, atol=1e-12)


def test_passk_matches_the_reference_calc_adv_formula():
    """The reference's per-group formula (RUCAIBox/Passk_Training code/passk_adv.py, restated
    with Python's exact binomials), for G = 16 and k = 4, every success count."""
    G, k = 16, 4
    for c in range(G + 1):
        rho = 1 - math.comb(G - c, k) / math.comb(G, k)
        sigma = math.sqrt(rho * (1 - rho))
        pos = (1 - rho) / (sigma + 1e-6)
        neg = (1 - rho - (math.comb(G - c - 1, k - 1) if c < G else 0) / math.comb(G - 1, k - 1)) / (sigma + 1e-6)
        r = torch.tensor([1.0] * c + [0.0] * (G - c), dtype=torch.float64)
        want = torch.tensor([pos] * c + [neg] * (G - c), dtype=torch.float64)
        torch.testing.assert_close(compute_advantages(r, G, "passk", pass_k=k), want, rtol=0, atol=1e-9)


def test_passk_dtypes_and_errors():
    r = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.int64)
    a = compute_advantages(r, 3, "passk", pass_k=2)
    assert a.dtype == torch.float32  # integer rewards: float32, as every estimator
    assert compute_advantages(r.float(), 3, "passk", pass_k=2).dtype == torch.float32
    with pytest.raises(ValueError, match=r"rewards in \{0, 1\}.*got 0\.5"):
        compute_advantages(torch.tensor([1.0, 0.5, 0.0]), 3, "passk", pass_k=1)
    # a reward just short of 1 is named with its digits, not rounded to a "1" the message refuses
    with pytest.raises(ValueError, match=r"got 0\.99999"):
        compute_advantages(torch.tensor([0.9999999, 0.0, 0.0]), 3, "passk", pass_k=1)
    with pytest.raises(ValueError, match=r"pass_k must be in \[1, group_size - 1\] = \[1, 2\].*got 3"):
        compute_advantages(r, 3, "passk", pass_k=3)
    for k in (0, -1):
        with pytest.raises(ValueError, match=r"pass_k must be in"):
            compute_advantages(r, 3, "passk", pass_k=k)
    for k in (2.0, True):
        with pytest.raises(ValueError, match=r"pass_k must be an integer"):
            compute_advantages(r, 3, "passk", pass_k=k)
    with pytest.raises(ValueError, match=r"estimator 'passk' \(which needs it\).*pass_k=None"):
        compute_advantages(r, 3, "passk")
    with pytest.raises(ValueError, match=r"pass_k=2 with 'grpo'"):
        compute_advantages(r, 3, "grpo", pass_k=2)
    with pytest.raises(ValueError, match=r"not 'passk'"):
        compute_advantages(r, 3, "passk", pass_k=2, baseline_quantile=0.4)
    assert min_group_size("passk") == 2


def test_passk_refuses_a_negative_reward():
    """A -1 format penalty is neither 0 nor 1: pass@k would count it as a failure and train on
    advantages that are not Pass@k Training's."""
    from lit_covrl.algorithms import first_non_binary

    assert first_non_binary(torch.tensor([0.0, -1.0, 1.0])) == -1.0
    assert first_non_binary(torch.tensor([0.0, 1.0, 1.0])) is None
    with pytest.raises(ValueError, match=r"rewards in \{0, 1\}.*got -1\.0"):
        compute_advantages(torch.tensor([0.0, -1.0, 1.0, 0.0]), 4, "passk", pass_k=2)


# ---- unlikeliness reward (He, Fried, Welleck 2025) ------------------------------------------------

def test_unlikeliness_hand_values():
    """G = 4, rewards [1, 0, 1, 1], mean log-probs [-1, -3, -2, -0.5]: ascending ranks [2, 0, 1, 3]
    (-3 < -2 < -1 < -0.5); beta 0.25 scales each reward by 1 - rank / 16: [0.875, 0, 0.9375, 0.8125]
    (the likeliest correct response keeps the least). GRPO on those: mean 2.625 / 4 = 0.65625,
    deviations [0.21875, -0.65625, 0.28125, 0.15625], Bessel variance 0.58203125 / 3."""
    from lit_covrl.algorithms import likelihood_ranks, unlikeliness_rewards

    r = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    lp = torch.tensor([-1.0, -3.0, -2.0, -0.5], dtype=torch.float64)
    assert likelihood_ranks(lp, 4).tolist() == [2.0, 0.0, 1.0, 3.0]
    assert unlikeliness_rewards(r, lp, 4, 0.25).tolist() == [0.875, 0.0, 0.9375, 0.8125]
    std = math.sqrt(0.58203125 / 3)
    want = torch.tensor([0.21875, -0.65625, 0.28125, 0.15625], dtype=torch.float64) / (std + 1e-6)
    got = compute_advantages(r, 4, "grpo", unlikeliness=0.25, seq_logp=lp)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # Dr.GRPO: the deviations themselves; RLOO: G / (G - 1) times them
    torch.testing.assert_close(compute_advantages(r, 4, "drgrpo", unlikeliness=0.25, seq_logp=lp),
                               want * (std + 1e-6), rtol=0, atol=1e-12)
    torch.testing.assert_close(compute_advantages(r, 4, "rloo", unlikeliness=0.25, seq_logp=lp),
                               want * (std + 1e-6) * 4 / 3, rtol=0, atol=1e-12)
    # the correct responses' advantages are ordered against their likelihood; GRPO gives them one value
    assert got[2] > got[0] > got[3] > 0 > got[1]
    plain = compute_advantages(r, 4, "grpo")
    assert plain[0] == plain[2] == plain[3]


def test_unlikeliness_sequence_means_and_ties():
    """The rank is by each response's mean token log-prob over its valid tokens (padding left
    out); equal means rank by position in the group (stable): the earlier one is 'less likely'."""
    from lit_covrl.algorithms import likelihood_ranks, sequence_logprob_means

    logp = torch.tensor([[-1.0, -3.0, 5.0], [-2.0, 7.0, 7.0], [-0.5, -0.5, -0.5], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    means = sequence_logprob_means(logp, mask)
    assert means.dtype == torch.float64 and means.tolist() == [-2.0, -2.0, -0.5, -2.0]
    assert likelihood_ranks(means, 4).tolist() == [0.0, 1.0, 3.0, 2.0]
    assert sequence_logprob_means(logp[:1], torch.zeros(1, 3)).tolist() == [0.0]  # no valid token


@pytest.mark.parametrize("G", [32, 512])
def test_unlikeliness_ties_rank_by_position_in_large_groups(G):
    """Tied mean log-probs (identical responses, common at low entropy) rank by position in groups
    of 32 and 512 too, where an unstable sort no longer keeps ties in order (on CPU it does up to
    G = 16). Every third response at -1, the rest at 0: the k-th of the -1s ranks k - 1, the k-th
    of the 0s ranks (the number of -1s) + k - 1; two groups, each ranked on its own."""
    from lit_covrl.algorithms import likelihood_ranks

    s = torch.zeros(G, dtype=torch.float64)
    s[::3] = -1.0
    n_low = (G + 2) // 3  # 11 for 32, 171 for 512
    low, high = iter(range(n_low)), iter(range(n_low, G))
    want = [float(next(low) if i % 3 == 0 else next(high)) for i in range(G)]
    assert likelihood_ranks(torch.cat([s, s]), G).tolist() == want + want


def _unlikeliness_oracle(rewards, seq_logp, G, beta, estimator):
    """Per group, in float64 Python: rank = how many of the group are less likely (+ the equal ones
    before it), r' = r (1 - beta rank / G), then the estimator on r'; 0 for a group of equal r."""
    out = []
    r_all, s_all = rewards.tolist(), seq_logp.tolist()
    for g in range(len(r_all) // G):
        r, s = r_all[g * G:(g + 1) * G], s_all[g * G:(g + 1) * G]
        if len(set(r)) == 1:
            out += [0.0] * G
            continue
        ranks = [sum(s[j] < s[i] or (s[j] == s[i] and j < i) for j in range(G)) for i in range(G)]
        x = [r[i] * (1 - beta * ranks[i] / G) for i in range(G)]
        mean = sum(x) / G
        if estimator == "grpo":
            out += [(v - mean) / (statistics.stdev(x) + 1e-6) for v in x]
        elif estimator == "drgrpo":
            out += [v - mean for v in x]
        else:  # rloo
            out += [v - (sum(x) - v) / (G - 1) for v in x]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("G,beta", [(2, 1.0), (5, 0.25), (8, 0.6)])
def test_unlikeliness_matches_a_loop_oracle(estimator, G, beta):
    gen = torch.Generator().manual_seed(G)
    B = 40
    r = (torch.rand(B * G, generator=gen) < 0.5).double()
    r[:G] = 1.0  # an all-correct group keeps advantage 0 (the reference recipe drops it)
    s = -torch.rand(B * G, generator=gen, dtype=torch.float64) * 3
    s[G:2 * G] = -1.0  # a group of equal likelihoods: ranks by position
    got = compute_advantages(r, G, estimator, unlikeliness=beta, seq_logp=s)
    torch.testing.assert_close(got, _unlikeliness_oracle(r, s, G, beta, estimator), rtol=0, atol=1e-9)
    assert got[:G].abs().max() == 0


def test_unlikeliness_is_per_group_and_composes_with_a_quantile_baseline():
    """Groups are independent: any split of the batch into whole groups (micro-batches, ranks)
    gives the same advantages; a within-group permutation permutes them (no ties); with QAE the
    quantile is taken of the scaled rewards."""
    from lit_covrl.algorithms import unlikeliness_rewards

    G, gen = 4, torch.Generator().manual_seed(1)
    r = (torch.rand(12 * G, generator=gen) < 0.5).float()
    s = -torch.rand(12 * G, generator=gen)
    whole = compute_advantages(r, G, "grpo", unlikeliness=0.5, seq_logp=s)
    parts = torch.cat([compute_advantages(r[a:b], G, "grpo", unlikeliness=0.5, seq_logp=s[a:b])
                       for a, b in ((0, G), (G, 5 * G), (5 * G, 12 * G))])
    assert whole.dtype == torch.float32 and torch.equal(whole, parts)
    perm = torch.cat([g * G + torch.randperm(G, generator=gen) for g in range(12)])
    torch.testing.assert_close(compute_advantages(r[perm], G, "grpo", unlikeliness=0.5, seq_logp=s[perm]), whole[perm])
    qae = compute_advantages(r, G, "grpo", unlikeliness=0.5, seq_logp=s, baseline_quantile=0.4)
    want = group_advantages(unlikeliness_rewards(r, s, G, 0.5), G, baseline_quantile=0.4)
    want = want.masked_fill(zero_variance_groups(r, G), 0.0).float()
    torch.testing.assert_close(qae, want)


def test_unlikeliness_errors():
    r, s = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([-1.0, -2.0, -3.0])
    for beta in (0.0, -0.1, 1.5, True, "0.25"):
        with pytest.raises(ValueError, match=r"unlikeliness must be in \(0, 1\]"):
            compute_advantages(r, 3, "grpo", unlikeliness=beta, seq_logp=s)
    with pytest.raises(ValueError, match=r"'passk' needs them in \{0, 1\}"):
        compute_advantages(r, 3, "passk", pass_k=1, unlikeliness=0.25, seq_logp=s)
    with pytest.raises(ValueError, match=r"needs seq_logp shaped like the rewards \(3,\), got None"):
        compute_advantages(r, 3, "grpo", unlikeliness=0.25)
    with pytest.raises(ValueError, match=r"got \(2,\)"):
        compute_advantages(r, 3, "grpo", unlikeliness=0.25, seq_logp=s[:2])
    # off: the rewards go to the estimator unchanged, seq_logp or not
    assert torch.equal(compute_advantages(r, 3, "grpo", seq_logp=s), compute_advantages(r, 3, "grpo"))
