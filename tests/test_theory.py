"""Theory lab (lab.theory, tools/theory_lab.py): closed forms and reduced experiments."""
import math

import pytest
import torch

from lit_covrl.algorithms import token_entropy
from lit_covrl.regularizers import ClipCov, KLCov, Schedule
from lit_covrl.regularizers import covariance as cov_callbacks
from lab.theory import claims as C
from lab.theory.bandit import BanditSpec, train_bandit
from lab.theory.softmax import (
    boltzmann,
    bonus_gradient,
    bonus_reward_gap,
    entropy_step_errors,
    first_order_entropy_change,
    npg_direction,
    train_entropy_bonus_exact,
)
from lab.theory.tokens import elements_written, first_order_drop, selection_cost, synthetic_batch

F64 = torch.float64


def _policies(seed=0, n=32, k=8):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, k, generator=g, dtype=F64), torch.rand(n, k, generator=g, dtype=F64)


# claim 1 ------------------------------------------------------------------------------------------
def test_first_order_formula_is_the_directional_derivative_of_the_entropy():
    # d/dt H(z + t dz) at t = 0, by autograd through the project's token_entropy
    z, dz = _policies(1)
    t = torch.zeros((), dtype=F64, requires_grad=True)
    (deriv,) = torch.autograd.grad(token_entropy(z + t * dz).sum(), t)
    torch.testing.assert_close(first_order_entropy_change(z, dz).sum(), deriv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["pg", "npg"])
def test_first_order_error_is_second_order_in_eta(kind):
    z, r = _policies(2)
    e = entropy_step_errors(z, r, [0.02, 0.002], kind)
    # error = c eta^2 + O(eta^3): 100x smaller for a 10x smaller step; relative to dH = O(eta): 10x
    assert 95 < e["abs_err"][0] / e["abs_err"][1] < 105
    assert 9.5 < e["rel_err"][0] / e["rel_err"][1] < 10.5
    assert e["rel_err"][1] < 1e-3


def test_npg_entropy_change_is_minus_eta_cov_logpi_advantage():
    # 2 arms, z = (0, log 3): pi = (1/4, 3/4); r = (1, 0): pi.r = 1/4, A = r - pi.r = (3/4, -1/4)
    # Cov(log pi, A) = sum pi (log pi - E log pi)(A - E A), E A = 3/16 - 3/16 = 0:
    #   = 1/4 (log 1/4 - m)(3/4) + 3/4 (log 3/4 - m)(-1/4),  m = 1/4 log 1/4 + 3/4 log 3/4
    z = torch.tensor([[0.0, math.log(3.0)]], dtype=F64)
    r = torch.tensor([[1.0, 0.0]], dtype=F64)
    m = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    cov = 0.25 * (math.log(0.25) - m) * 0.75 - 0.75 * (math.log(0.75) - m) * 0.25
    assert float(first_order_entropy_change(z, 0.1 * npg_direction(z, r))) == pytest.approx(-0.1 * cov, rel=1e-12)


def test_claim_entropy_change_is_covariance_holds():
    res = C.entropy_change_is_covariance(instances=8)
    assert res["holds"]
    assert res["npg"]["abs_err_ratio_per_decade"] == pytest.approx(100, rel=0.05)


# claim 2 ------------------------------------------------------------------------------------------
def test_bonus_gradient_matches_autograd_through_token_entropy():
    z, r = _policies(3, n=4)
    zz = z.clone().requires_grad_(True)
    obj = (torch.softmax(zz, -1) * r).sum() + 0.3 * token_entropy(zz).sum()
    (grad,) = torch.autograd.grad(obj, zz)
    torch.testing.assert_close(bonus_gradient(z, r, 0.3), grad, rtol=1e-10, atol=1e-12)


def test_entropy_bonus_converges_to_softmax_r_over_alpha():
    r = torch.linspace(0, 1, 10, dtype=F64)
    alphas = [0.2, 0.5, 1.0]
    pis, gaps = train_entropy_bonus_exact(r, alphas, steps=4000, lr=40.0)
    for i, a in enumerate(alphas):
        assert (pis[i] - boltzmann(r, a)).abs().max() < 1e-4
        assert float(gaps[-1, i]) == pytest.approx(bonus_reward_gap(r, a), abs=1e-4)
        assert 1e-3 < bonus_reward_gap(r, a) <= a * math.log(10)


def test_bonus_gap_hand_value():
    # r = (0, 1), alpha = 1: pi = softmax(0, 1) = (1, e) / (1 + e); gap = 1 - e / (1 + e) = 1 / (1 + e)
    assert bonus_reward_gap(torch.tensor([0.0, 1.0], dtype=F64), 1.0) == pytest.approx(1 / (1 + math.e), rel=1e-12)


# claim 3 ------------------------------------------------------------------------------------------
SMALL = BanditSpec(steps=40)


def _counting(monkeypatch, name):
    calls = []
    original = getattr(cov_callbacks, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("ratio"))
        return original(*args, **kwargs)

    monkeypatch.setattr(cov_callbacks, name, wrapper)  # the name the callbacks resolve at call time
    return calls


def test_lab_loop_calls_the_projects_selection_functions(monkeypatch):
    clip_calls = _counting(monkeypatch, "clip_cov_select")
    kl_calls = _counting(monkeypatch, "kl_cov_select")
    spec = BanditSpec(steps=6, updates=3)
    train_bandit(spec, C.make_regularizers("clip_cov", 0.2, anneal_steps=4), seed=0)
    train_bandit(spec, C.make_regularizers("kl_cov", 1.0, anneal_steps=None), seed=0)
    # annealed Clip-Cov: cosine ratio 0.2 -> 0 over 4 steps; at steps >= 4 the ratio is 0 (no call)
    assert len(clip_calls) == 4 * 3 and clip_calls[0] == pytest.approx(0.2) and min(clip_calls) > 0
    # KL-Cov selects nothing while on policy (the first of the 3 updates of each step)
    assert len(kl_calls) == 6 * 2 and set(kl_calls) == {0.1}


def test_selection_drives_the_update(monkeypatch):
    # if Clip-Cov selected every token, every gradient would be detached: the policy never moves
    monkeypatch.setattr(cov_callbacks, "clip_cov_select", lambda cov, mask, elig, **kw: mask.bool())
    traj = train_bandit(BanditSpec(steps=5), [ClipCov(0.5, seed=0)], seed=0)
    assert max(traj.entropy) == min(traj.entropy) == pytest.approx(math.log(16))


def test_kl_cov_is_inert_with_one_update_and_runs_are_deterministic():
    spec = BanditSpec(steps=20, updates=1)
    plain = train_bandit(spec, [], seed=3)
    assert train_bandit(spec, [KLCov(0.2, 5.0)], seed=3).entropy == plain.entropy  # old == current
    assert train_bandit(BanditSpec(steps=20), [KLCov(0.2, 5.0)], seed=3).entropy != plain.entropy
    a = train_bandit(SMALL, [ClipCov(0.2, schedule=Schedule("cosine", 0.0, 20), seed=1)], seed=1)
    b = train_bandit(SMALL, [ClipCov(0.2, schedule=Schedule("cosine", 0.0, 20), seed=1)], seed=1)
    assert a.entropy == b.entropy and a.regret == b.regret


def test_matched_entropy_comparison_hand_values():
    # reference curve (entropy, regret): (1, 0.1), (3, 0.5), given unsorted; a point at entropy 2
    # with regret 0.25 sits at the midpoint: reference 0.1 + (0.5 - 0.1) (2 - 1) / (3 - 1) = 0.3.
    # Points outside [1, 3] are not compared (no extrapolation).
    ref = [{"mean_entropy": 3.0, "mean_regret": 0.5}, {"mean_entropy": 1.0, "mean_regret": 0.1}]
    pts = [{"coef": 0.2, "mean_entropy": 2.0, "mean_regret": 0.25},
           {"coef": 0.5, "mean_entropy": 3.5, "mean_regret": 0.0}]
    (m,) = C._matched(pts, ref, "mean_regret")
    assert m["coef"] == 0.2 and m["value"] == 0.25 and m["reference"] == pytest.approx(0.3, abs=1e-12)


def test_annealed_covariance_control_reaches_the_best_arm_constant_bonus_does_not():
    spec = BanditSpec(steps=60)
    # bonus coefs chosen so that its (entropy, regret) curve brackets both annealed covariance runs
    coefs = {"entropy_bonus": (0.03, 1.0), "entropy_bonus_annealed": (1.0,), "clip_cov_annealed": (0.2,),
             "kl_cov_annealed": (3.0,), "grpo_lower_lr": (1.0,)}
    res = C.annealed_covariance_control_is_unbiased(spec, anneal_steps=30, seeds=(0,), coefs=coefs)
    assert res["reaches_best_arm"]
    assert res["worst_final_regret"]["clip_cov_annealed"] < 0.01
    assert res["worst_final_regret"]["kl_cov_annealed"] < 0.01
    assert res["worst_final_regret"]["entropy_bonus_annealed"] < 0.01
    assert res["worst_final_regret"]["entropy_bonus"] > 0.1  # a constant bonus keeps its bias
    # the matched-entropy verdict, recomputed by hand from the runs: interpolate the bonus's regret
    # linearly between its two coefficients at each covariance run's mean entropy
    lo, hi = sorted(res["runs"]["entropy_bonus"], key=lambda r: r["mean_entropy"])
    diffs = []
    for m in ("clip_cov_annealed", "kl_cov_annealed"):
        (p,) = res["runs"][m]
        assert lo["mean_entropy"] <= p["mean_entropy"] <= hi["mean_entropy"]  # the comparison is not vacuous
        w = (p["mean_entropy"] - lo["mean_entropy"]) / (hi["mean_entropy"] - lo["mean_entropy"])
        diff = p["mean_regret"] - (lo["mean_regret"] + w * (hi["mean_regret"] - lo["mean_regret"]))
        assert res["matched"][f"{m}_vs_entropy_bonus"]["mean_regret_diff"] == pytest.approx(diff, rel=1e-9, abs=1e-12)
        diffs.append(diff)
    assert res["less_regret_than_constant_bonus"] == all(d < 0 for d in diffs)
    assert res["holds"] == (res["reaches_best_arm"] and all(d < 0 for d in diffs))


# claim 4 ------------------------------------------------------------------------------------------
def test_first_order_drop_matches_autograd():
    # token i's PG step dz = A_i (e_a - pi) (eta = 1); -dH_i = -<grad H, dz>
    b = synthetic_batch(prompts=2, group=4, length=8, vocab=16, seed=0)
    z = b.logits.double().requires_grad_(True)
    (grad_h,) = torch.autograd.grad(token_entropy(z).sum(), z)
    p = torch.softmax(b.logits.double(), -1)
    dz = b.advantages.double()[..., None] * (torch.nn.functional.one_hot(b.actions, 16).double() - p)
    expected = -(grad_h * dz).sum(-1) * b.mask
    torch.testing.assert_close(first_order_drop(b), expected, rtol=1e-8, atol=1e-12)


def test_claim_high_covariance_tokens_are_sparse_holds_on_a_small_batch():
    res = C.high_covariance_tokens_are_sparse(prompts=16, length=64, seeds=(0,),
                                              cost_sizes=((128, 256), (128, 2048), (512, 256), (512, 2048)), repeats=1)
    g = list(res["group_means"].values())
    assert all(a > b for a, b in zip(g, g[1:]))  # heavy tail, top 0.02% > ... > all
    assert res["drop_share_of_positive"]["top2%"] > 5 * 0.02
    assert res["top0.2pct_profile"]["frac_negative_advantage"] > 0.9
    # the verdict follows its criterion (timings enter only through the reported speed-up)
    means = res["group_means"]
    heavy = all(a > b for a, b in zip(g, g[1:])) and means["top0.2%"] >= 10 * abs(means["all"])
    shares = res["drop_share_of_positive"]
    concentrated = shares["top2%"] >= 5 * 0.02 and shares["top0.2%"] >= 5 * 0.002
    assert res["holds"] == (heavy and concentrated and res["speedup_at_largest"] >= 10)
    assert heavy and concentrated
    # the work (elements written) behind the speed-up: bonus ~ N V, selection independent of V
    assert abs(res["work_slope"]["select_elements"]["V"]) < 0.02
    assert res["work_slope"]["entropy_bonus_elements"]["V"] == pytest.approx(1, abs=0.02)
    assert res["work_slope"]["entropy_bonus_elements"]["N"] == pytest.approx(1, abs=0.02)
    assert res["work_ratio_at_largest"] > 100


def test_selection_work_is_independent_of_the_vocabulary():
    # work = tensor elements written (forward + backward), not wall time. The bonus's entropy
    # forward and backward write a fixed number of [N, V] tensors: work ~ N V (slope 1 in each).
    # The selection reads the N sampled log-probs only: the same work for V = 256 and 2048.
    rows = selection_cost([(128, 256), (128, 2048), (512, 256), (512, 2048)], repeats=1)
    sel = {(r["N"], r["V"]): r["select_elements"] for r in rows}
    bonus = {(r["N"], r["V"]): r["entropy_bonus_elements"] for r in rows}
    for n in (128, 512):
        assert sel[n, 2048] == pytest.approx(sel[n, 256], rel=0.02)
        assert bonus[n, 2048] / bonus[n, 256] == pytest.approx(8, rel=0.02)
    assert bonus[512, 2048] / bonus[128, 2048] == pytest.approx(4, rel=0.02)
    assert sel[512, 256] / sel[128, 256] == pytest.approx(4, rel=0.1)  # O(N)
    # the bonus writes at least 2 N V elements (the entropy's probabilities and the logits' gradient)
    assert all(r["entropy_bonus_elements"] >= 2 * r["N"] * r["V"] for r in rows)
    assert all(r["select_elements"] < 0.1 * r["entropy_bonus_elements"] for r in rows)


def test_elements_written_hand_values():
    # x + 1 writes 3 elements, x.view(3) none (a view), torch.cat of two 3-vectors 6: 9 in all
    x = torch.zeros(3)
    assert elements_written(lambda: torch.cat([x + 1, x.view(3)])) == 3 + 6


# claim 5 ------------------------------------------------------------------------------------------
def test_trajectory_stats_hand_values():
    zigzag = C.trajectory_stats([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], window=2)
    assert zigzag["sign_flip_rate"] == 1.0 and zigzag["window_std"] == pytest.approx(0.5)
    mono = C.trajectory_stats([3.0, 2.0, 1.5, 1.2, 1.1, 1.05], window=2)
    assert mono["sign_flip_rate"] == 0.0


def test_stability_bonus_has_a_threshold():
    res = C.stability(BanditSpec(steps=40), coefs={"entropy_bonus": (0.1, 2.0), "clip_cov": (0.05, 0.5),
                                                   "kl_cov": (1.0, 3.0)})
    bonus = res["methods"]["entropy_bonus"]["runs"]
    assert bonus[0]["final_entropy_frac"] < 0.3 < 0.8 < bonus[1]["final_entropy_frac"]
    assert res["smoother_than_bonus"]
