"""The entropy controls of the literature: pure functions against hand-worked values and naive
loops, and their callbacks (selection over the mini-batch, shaping, state, metrics)."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import (
    adaptive_entropy_coef,
    aggregate,
    entropic_alpha,
    entropic_high_prob,
    entropic_token_loss,
    entropic_weights,
    entropy_advantage_shift,
    entropy_ratio_keep,
    high_entropy_mask,
    ppo_clipped_tokens,
    ppo_token_loss,
    sample_sign_weights,
    steer_metric,
    steer_weights,
)
from lit_covrl.regularizers import (
    AdaptiveEntropyBonus,
    EntroPIC,
    EntropyAdvantage,
    EntropyBonus,
    EntropyRatioClip,
    HighEntropyTokens,
    KLCov,
    ReferenceKL,
    SteerWeights,
)
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.types import PolicyBatch, TokenShaping


def _rand(n=6, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.1 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t).clone()
    ent = torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    old_ent = ent * (1 + 0.1 * torch.randn(n, t, generator=g, dtype=torch.float64))
    return logp, old, adv, mask, ent, old_ent.clamp(min=0)


def _ctx(logp, old, adv, mask, ent, old_ent, step=0, on_policy=False):
    clipped = ppo_clipped_tokens(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    return MiniBatchContext(step=step, update=1, on_policy=on_policy, logp=logp, old_logp=old, advantages=adv,
                            mask=mask, clipped=clipped, old_entropy=old_ent, entropy=ent)


# ---------------------------------------------------------------- pure functions
def test_high_entropy_mask_hand_worked():
    # valid H = 0.1, 0.3, 0.5, 0.7, 0.9; the 0.6 quantile (top 40%) interpolates at position
    # 0.6 * 4 = 2.4: 0.5 + 0.4 * (0.7 - 0.5) = 0.58 -> keep 0.7 and 0.9 (2 of 5 = 40%)
    h = torch.tensor([[0.1, 0.5, 0.9, 0.3, 0.7, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert high_entropy_mask(h, mask, top_frac=0.4).tolist() == [[False, False, True, False, True, False]]
    assert high_entropy_mask(h, mask, top_frac=1.0).tolist() == [[True] * 5 + [False]]  # the padded 5.0 never


def test_high_entropy_mask_keeps_ties_broken_by_float_rounding_together():
    # three tokens with one context (entropy 2.5 in exact arithmetic) computed in forwards of other
    # shapes: +-2e-7 of rounding. The 0.5 quantile falls inside them (2.5 - 1e-7); all three are
    # kept, whichever of them the rounding made the smallest (it used to drop exactly that one)
    others = [0.5, 1.0, 1.5, 2.0, 3.0, 3.5, 4.0]
    for noise in ([0.0, 2e-7, -2e-7], [-2e-7, 0.0, 2e-7], [2e-7, -2e-7, 0.0]):
        h = torch.tensor([[2.5 + e for e in noise] + others], dtype=torch.float64)
        keep = high_entropy_mask(h, torch.ones_like(h), top_frac=0.5)
        assert keep[0, :3].tolist() == [True, True, True], noise
        assert keep[0, 3:].tolist() == [v > 2.5 for v in others]


def test_high_entropy_mask_tie_tolerance_is_relative_at_low_entropy():
    # a collapsed policy: entropies in [0, 1e-5). An absolute 1e-5 would keep every token
    h = torch.linspace(0, 1e-5, 1001, dtype=torch.float64)[None, :-1]
    keep = high_entropy_mask(h, torch.ones_like(h), top_frac=0.2)
    assert int(keep.sum()) == 200  # the top 20 % (an absolute 1e-5 kept all 1,000)


def _naive_quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] if lo + 1 >= len(v) else v[lo] + (pos - lo) * (v[lo + 1] - v[lo])


@pytest.mark.parametrize("top_frac", [0.05, 0.2, 0.5, 0.9])
def test_high_entropy_mask_matches_a_naive_loop(top_frac):
    _, _, _, mask, ent, _ = _rand(9, 11, seed=3)
    tau = _naive_quantile([ent[i, j].item() for i in range(9) for j in range(11) if mask[i, j]], 1 - top_frac)
    expect = [[bool(mask[i, j]) and ent[i, j].item() >= tau for j in range(11)] for i in range(9)]
    got = high_entropy_mask(ent, mask, top_frac=top_frac)
    assert got.tolist() == expect
    assert got.sum() == pytest.approx(top_frac * mask.sum(), abs=1.0)  # ~top_frac of the tokens


def test_adaptive_entropy_coef_hand_worked():
    kw = dict(target=0.2, delta=1e-4, min_coef=0.0, max_coef=0.005)
    assert adaptive_entropy_coef(0.001, 0.1, **kw) == (pytest.approx(0.0011), True)  # below: up, active
    assert adaptive_entropy_coef(0.001, 0.3, **kw) == (pytest.approx(0.0009), False)  # above: down, inactive
    assert adaptive_entropy_coef(0.005, 0.1, **kw) == (0.005, True)  # clamped at max
    assert adaptive_entropy_coef(0.0, 0.2, **kw) == (0.0, False)  # at the target: down, clamped at min


def test_steer_metric_hand_worked():
    # A = 1, p = 0.5, pi_old = 0.25, H = 1: |1 / 0.25 * 0.5 * 0.5 * (ln 0.5 + 1)| = 1 - ln 2
    logp, old = torch.tensor([[math.log(0.5), 0.0]]), torch.tensor([[math.log(0.25), 0.0]])
    m = steer_metric(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]]), logp, old, torch.tensor([[1.0, 0.0]]))
    assert m[0, 0].item() == pytest.approx(1 - math.log(2), rel=1e-6) and m[0, 1] == 0


def test_steer_metric_matches_a_naive_loop():
    logp, old, adv, mask, ent, _ = _rand(seed=5)
    got = steer_metric(adv, ent, logp, old, mask)
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            p = min(max(math.exp(logp[i, j]), 1e-8), 1 - 1e-8)
            want = abs(adv[i, j] / math.exp(old[i, j]) * p * (1 - p) * (math.log(p) + ent[i, j])) if mask[i, j] else 0.0
            assert got[i, j].item() == pytest.approx(float(want), rel=1e-9, abs=1e-12)


def test_steer_weights_hand_worked():
    metric, mask = torch.tensor([[0.0, 1.0, 2.0, 7.0]]), torch.tensor([[1, 1, 1, 0]])
    # linear: w = 1.2 - m (1.2 - 0.8) / (2 - 0) -> 1.2, 1.0, 0.8 (the padded token: 0)
    lin = steer_weights(metric, mask, w_min=0.8, w_max=1.2)
    assert lin[0].tolist() == pytest.approx([1.2, 1.0, 0.8, 0.0])
    # exponential: k = -ln 0.8 / 2, w = 0.8^(m / 2) -> 1, sqrt(0.8), 0.8
    exp = steer_weights(metric, mask, w_min=0.8, w_max=1.2, mapping="exponential")
    assert exp[0].tolist() == pytest.approx([1.0, math.sqrt(0.8), 0.8, 0.0])
    # below 0.02 the scale's floor holds: hi = 0.01 -> k = -ln 0.8 / 0.02, so the largest token
    # keeps sqrt(0.8), not w_min (the reference code's guard against a vanishing maximum)
    small = steer_weights(torch.tensor([[0.0, 0.01]]), torch.ones(1, 2), w_min=0.8, w_max=1.2, mapping="exponential")
    assert small[0].tolist() == pytest.approx([1.0, math.sqrt(0.8)])
    # equal metrics: the middle of the range; global bounds given by the caller win
    assert steer_weights(torch.ones(1, 2), torch.ones(1, 2), w_min=0.8, w_max=1.2)[0].tolist() == pytest.approx([1.0, 1.0])
    assert steer_weights(metric, mask, w_min=0.8, w_max=1.2, bounds=(0.0, 4.0))[0].tolist() == pytest.approx([1.2, 1.1, 1.0, 0.0])


def test_entropy_advantage_shift_hand_worked():
    # alpha H = 0.2, 1.2, 0.8, 0.4; |A| / kappa = 0.5, 0.5, 0, 0.1 -> psi = their min
    adv, ent = torch.tensor([[1.0, -1.0, 0.0, 0.2]]), torch.tensor([[0.5, 3.0, 2.0, 1.0]])
    psi = entropy_advantage_shift(adv, ent, alpha=0.4, kappa=2.0)
    assert psi[0].tolist() == pytest.approx([0.2, 0.5, 0.0, 0.1])
    assert (adv + psi)[0].tolist() == pytest.approx([1.2, -0.5, 0.0, 0.3])


def test_entropy_advantage_never_flips_the_sign():
    g = torch.Generator().manual_seed(0)
    adv, ent = torch.randn(200, 5, generator=g), torch.rand(200, 5, generator=g) * 10
    for kappa in (1.01, 2.0, 5.0):
        shifted = adv + entropy_advantage_shift(adv, ent, alpha=10.0, kappa=kappa)
        assert torch.equal(torch.sign(shifted), torch.sign(adv)), kappa


def test_entropy_ratio_keep_hand_worked():
    h = torch.tensor([[0.94, 0.96, 1.0, 1.04, 1.06, 1.0]])
    keep = entropy_ratio_keep(h, torch.ones(1, 6), torch.tensor([[1, 1, 1, 1, 1, 0]]), low=0.05, high=0.05)
    assert keep.tolist() == [[False, True, True, True, False, False]]  # strict (0.95, 1.05); padding never


def test_sample_sign_weights_hand_worked_with_a_zero_advantage_row():
    """W-REINFORCE's weights: A > 0 rows get lambda, A < 0 rows 1, A = 0 rows 1 (not lambda, not 0),
    padding 0. Under NSR (lambda 0) only the positive rows are zeroed: Clip-Cov and KL-Cov read the
    zeroed tokens (`ctx.zeroed`) and would otherwise skip the A = 0 rows too."""
    adv = torch.tensor([0.5, 0.0, -0.5])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    w = sample_sign_weights(adv, mask, positive=0.1, negative=1.0)
    torch.testing.assert_close(w, torch.tensor([[0.1, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    nsr = sample_sign_weights(adv, mask, positive=0.0, negative=1.0)
    assert (nsr == 0).tolist() == [[True, True], [False, False], [False, False]]


# ---------------------------------------------------------------- callbacks
def test_high_entropy_tokens_keeps_the_top_fraction_of_the_minibatch():
    logp, old, adv, mask, ent, old_ent = _rand(8, 9, seed=1)
    reg = HighEntropyTokens(top_frac=0.2)
    reg.prepare(_ctx(logp, old, adv, mask, ent, old_ent))
    assert torch.equal(reg.weights.bool(), high_entropy_mask(ent, mask, top_frac=0.2))
    m = reg.pop_metrics()
    assert m["reg/high_entropy_tokens/selected_frac"] == pytest.approx(float(reg.weights.sum() / mask.sum()))
    assert m["reg/high_entropy_tokens/entropy_threshold"] == pytest.approx(float(ent[reg.weights.bool()].min()))
    # per micro-batch the rows get the mini-batch's decision, not their own quantile
    rows = torch.tensor([2, 5])
    z = logp[rows].clone().requires_grad_(True)
    s = reg.shape(PolicyBatch(rows, z, old[rows], adv[rows], mask[rows]))
    assert torch.equal(s.weight, reg.weights[rows])


def test_high_entropy_tokens_zero_the_gradient_of_the_rest():
    logp, old, adv, mask, ent, old_ent = _rand(seed=2)
    reg = HighEntropyTokens(top_frac=0.3)
    reg.prepare(_ctx(logp, old, adv, mask, ent, old_ent))
    z = logp.clone().requires_grad_(True)
    base = ppo_token_loss(z, old, adv, mask, clip_low=None, clip_high=None)
    TokenShaping.combine([reg.shape(PolicyBatch(torch.arange(len(z)), z, old, adv, mask))], base).sum().backward()
    kept = reg.weights.bool()
    assert (z.grad[~kept] == 0).all() and (z.grad[kept & (adv != 0)] != 0).all()


def test_steer_weights_callback_uses_minibatch_bounds():
    logp, old, adv, mask, ent, old_ent = _rand(seed=4)
    reg = SteerWeights()
    assert not SteerWeights.needs_current_entropy  # H is the rollout's: no extra forward for it
    reg.prepare(_ctx(logp, old, adv, mask, ent, old_ent))
    # the reference's H: the rollout policy's entropy (stored by its old-log-prob pass), p the current
    want = steer_weights(steer_metric(adv, old_ent, logp, old, mask), mask, w_min=0.8, w_max=1.2)
    assert (want - steer_weights(steer_metric(adv, ent, logp, old, mask), mask, w_min=0.8, w_max=1.2)).abs().max() > 0.01
    torch.testing.assert_close(reg.weights, want)
    valid = reg.weights[mask.bool()]
    assert valid.min() == pytest.approx(0.8) and valid.max() == pytest.approx(1.2)
    assert reg.pop_metrics()["reg/steer/weight_mean"] == pytest.approx(float(valid.mean()))


def test_entropy_ratio_clip_callback_and_on_policy():
    logp, old, adv, mask, ent, old_ent = _rand(seed=6)
    reg = EntropyRatioClip(low=0.05, high=0.05)
    reg.prepare(_ctx(logp, old, adv, mask, ent, old_ent))
    keep = entropy_ratio_keep(ent, old_ent, mask, low=0.05, high=0.05)
    assert torch.equal(reg.weights.bool(), keep) and 0 < keep.sum() < mask.sum()
    assert reg.pop_metrics()["reg/entropy_ratio_clip/clipped_frac"] == pytest.approx(float(1 - keep.sum() / mask.sum()))
    reg.prepare(_ctx(logp, old, adv, mask, old_ent, old_ent, on_policy=True))  # current == rollout: ratio 1
    assert torch.equal(reg.weights.bool(), mask.bool())


def _adaptive_run(reg, entropies, steps):
    """prepare() of two mini-batches per step with constant entropy `entropies[step]`; returns
    the coefficient applied at each step."""
    logp, old, adv, mask, _, _ = _rand(seed=7)
    applied = []
    for step in steps:
        for half in (slice(0, 3), slice(3, 6)):
            e = torch.full_like(logp[half], entropies[step])
            reg.prepare(_ctx(logp[half], old[half], adv[half], mask[half], e, e, step=step))
        applied.append(reg.coef_now)
    return applied


def test_adaptive_entropy_bonus_follows_the_measured_entropy():
    reg = AdaptiveEntropyBonus(target=0.2, delta=1e-3, init_coef=0.0, max_coef=0.0025)
    entropies = [0.1, 0.1, 0.1, 0.1, 0.5, 0.1]
    # step k applies the coefficient measured up to step k-1: up 1e-3 per step below the target,
    # clamped at 0.0025; off (0) after the step at 0.5, whose measurement also lowered it
    assert _adaptive_run(reg, entropies, range(6)) == pytest.approx([0.0, 0.001, 0.002, 0.0025, 0.0025, 0.0])
    assert reg.coef == pytest.approx(0.0015)
    logp = torch.zeros(2, 3, requires_grad=True)
    ent = torch.ones(2, 3, requires_grad=True)
    assert reg.shape(PolicyBatch(torch.arange(2), logp, logp, logp, torch.ones(2, 3), ent)).penalty is None


def test_adaptive_entropy_bonus_resumes_exactly():
    entropies = [0.1, 0.3, 0.1, 0.1, 0.1, 0.3]
    straight = AdaptiveEntropyBonus(delta=1e-3)
    full = _adaptive_run(straight, entropies, range(6))
    first = AdaptiveEntropyBonus(delta=1e-3)
    head = _adaptive_run(first, entropies, range(3))
    state = first.state_dict()  # a checkpoint between steps 2 and 3: step 2's measurement pending
    resumed = AdaptiveEntropyBonus(delta=1e-3)
    resumed.load_state_dict(state)
    tail = _adaptive_run(resumed, entropies, range(3, 6))
    assert head + tail == full and len(set(full)) > 2
    fresh = AdaptiveEntropyBonus(delta=1e-3)  # without the state the resumed run would differ
    assert _adaptive_run(fresh, entropies, range(3, 6)) != tail


def test_entropy_advantage_callback_shifts_inside_the_objective():
    logp, old, adv, mask, ent, _ = _rand(seed=8)
    reg = EntropyAdvantage(alpha=0.4, kappa=2.0)
    reg.prepare(_ctx(logp, old, adv, mask, ent, ent))
    s = reg.shape(PolicyBatch(torch.arange(len(logp)), logp, old, adv, mask, ent))
    torch.testing.assert_close(s.advantage_shift, entropy_advantage_shift(adv, ent, alpha=0.4, kappa=2.0) * mask)
    assert s.weight is None and s.penalty is None
    shifted = TokenShaping.shifted_advantages([s], adv)
    assert torch.equal(torch.sign(shifted[mask.bool()]), torch.sign(adv[mask.bool()]))
    m = reg.pop_metrics()
    assert m["reg/entropy_advantage/shift_mean"] == pytest.approx(float(s.advantage_shift.sum() / mask.sum()))
    with pytest.raises(ValueError, match="kappa"):
        EntropyAdvantage(kappa=1.0)


def test_adaptive_entropy_measurement_is_logged_with_its_own_step():
    """measured_entropy at step k was step k-1's (recorded when the next step closed it), so on a
    chart it sat one step right of policy/entropy and the last step's was never logged."""
    reg = AdaptiveEntropyBonus(target=0.2, delta=1e-3)
    logged = []
    for step, e in enumerate([0.1, 0.3, 0.5]):
        _adaptive_run(reg, {step: e}, [step])
        logged.append(reg.pop_metrics().get("reg/adaptive_entropy/measured_entropy"))
    assert logged == pytest.approx([0.1, 0.3, 0.5])


def test_a_step_that_measured_nothing_logs_no_entropy():
    """A step whose groups were all filtered out never calls prepare: it must not log the previous
    step's measurement again as its own (the coefficient stays where it was, as before)."""
    reg = AdaptiveEntropyBonus(target=0.2, delta=1e-3)
    logged = []
    for step, e in ((0, 0.1), (1, None), (2, 0.3)):
        if e is not None:
            _adaptive_run(reg, {step: e}, [step])
        logged.append(reg.pop_metrics().get("reg/adaptive_entropy/measured_entropy"))
    assert logged == [pytest.approx(0.1), None, pytest.approx(0.3)]
    assert reg.coef == pytest.approx(1e-3)  # moved once (step 0's 0.1); step 2's measurement is pending


# ---------------------------------------------------------------- EntroPIC
def _entropic_state(alpha: float, integral: float = 0.0) -> dict:
    """A controller that already applies `alpha` (as after a few measured steps)."""
    return {"alpha": alpha, "integral": integral, "step": None, "sums": torch.zeros(2, dtype=torch.float64)}


def _agg_over_high_loop(x, high, mask, mode, norm_length):
    """The reference's agg_loss(x, loss_mask=high) written as loops over tokens (float64); for
    seq-mean-token-sum-norm the denominator is the loss's own (the same for both terms)."""
    n, t = x.shape
    if mode == "token-mean":
        num = sum(float(x[i, j]) for i in range(n) for j in range(t) if high[i, j])
        cnt = sum(1 for i in range(n) for j in range(t) if high[i, j])
        return num / cnt if cnt else 0.0
    if mode == "seq-mean-token-sum-norm":
        return sum(float(x[i, j]) for i in range(n) for j in range(t) if high[i, j]) / (n * norm_length)
    per_row = []
    for i in range(n):
        vals = [float(x[i, j]) for j in range(t) if high[i, j]]
        if vals:
            per_row.append(sum(vals) / (len(vals) if mode == "seq-mean-token-mean" else 1))
    return sum(per_row) / len(per_row) if per_row else 0.0


def test_entropic_alpha_hand_worked():
    kw = dict(kp=1.0, ki=0.01)
    assert entropic_alpha(0.05, 0.0, **kw) == pytest.approx(0.05)  # P only
    assert entropic_alpha(-0.2, -3.0, **kw) == pytest.approx(-0.23)  # P + I: -0.2 + 0.01 * -3
    assert entropic_alpha(0.1, 5.0, kp=0.0, ki=0.1) == pytest.approx(0.5)  # I only
    assert entropic_alpha(2.0, 0.0, **kw) == 1.0 and entropic_alpha(-0.5, -100.0, **kw) == -1.0  # clipped to [-1, 1]


def test_entropic_high_prob_is_strictly_above_the_threshold_on_valid_tokens():
    p = torch.tensor([[0.99, 0.9500001, 0.9499999, 0.3, 0.999]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert entropic_high_prob(p.log(), mask, threshold=0.95).tolist() == [[True, True, False, False, False]]
    at = torch.tensor([[math.log(0.95), math.log(0.96)]], dtype=torch.float64)  # exactly at it: not high
    assert entropic_high_prob(at, torch.ones(1, 2), threshold=0.95).tolist() == [[False, True]]


def test_entropic_weights_hand_worked():
    # 2 rows: row 0 has 3 valid tokens (2 high), row 1 4 valid (1 high); 7 valid, 3 high in all
    high = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    kw = dict(num_tokens=7, num_seqs=2, num_high=3, num_high_seqs=2)
    assert entropic_weights(high, mask, "token-mean", **kw).tolist() == [[7 / 3, 7 / 3, 0, 0], [0, 7 / 3, 0, 0]]
    assert entropic_weights(high, mask, "seq-mean-token-sum", **kw).tolist() == [[1, 1, 0, 0], [0, 1, 0, 0]]
    # per row len / high: 3 / 2 and 4 / 1
    assert entropic_weights(high, mask, "seq-mean-token-mean", **kw).tolist() == [[1.5, 1.5, 0, 0], [0, 4, 0, 0]]
    assert entropic_weights(high, mask, "seq-mean-token-sum-norm", **kw).tolist() == high.double().tolist()
    assert entropic_weights(high & False, mask, "token-mean", **{**kw, "num_high": 0}).sum() == 0
    with pytest.raises(ValueError, match="aggregation mode"):
        entropic_weights(high, mask, "token-sum", **kw)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_entropic_weights_aggregate_over_the_high_tokens_like_the_reference(mode):
    """aggregate(c * x, mask, mode) with the loss's denominators equals x aggregated over the
    high-probability tokens alone (a loop over tokens), rows without a high token included."""
    logp, _, _, mask, _, _ = _rand(n=8, t=6, seed=11)
    high = entropic_high_prob(logp, mask, threshold=0.3)
    high[2] = False  # a row without a high token
    assert 0 < high.sum() < mask.sum() and high.any(-1).sum() < len(mask)
    x = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    counts = dict(num_tokens=mask.sum(), num_seqs=len(mask), num_high=high.sum(), num_high_seqs=high.any(-1).sum())
    c = entropic_weights(high, mask, mode, **counts)
    got = aggregate(c * x, mask, mode, num_tokens=mask.sum(), num_seqs=len(mask), norm_length=6)
    assert float(got) == pytest.approx(_agg_over_high_loop(x, high, mask, mode, 6), rel=1e-12)


def test_entropic_token_loss_gradient_matches_a_token_loop():
    """d/dlogp of -alpha c r |A| is -alpha c r |A| per token (r = exp(logp - old), unclipped)."""
    logp, old, adv, mask, _, _ = _rand(seed=12)
    logp = logp.clone().requires_grad_(True)
    c = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * mask
    (g,) = torch.autograd.grad(entropic_token_loss(logp, old, adv, c, alpha=-0.3).sum(), logp)
    n, t = mask.shape
    for i in range(n):
        for j in range(t):
            expected = 0.3 * float(c[i, j]) * math.exp(float(logp[i, j].detach() - old[i, j])) * abs(float(adv[i, j]))
            assert float(g[i, j]) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_entropic_token_loss_clamps_the_log_ratio_at_20():
    """The reference clamps log(pi / pi_old) to [-20, 20] before exp: an off-policy token at
    log-ratio 5 keeps r = e^5 (term -alpha e^5 |A| = -0.5 x 148.41 x 2), one at 25 is capped at e^20."""
    logp = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-5.0, -26.0]], dtype=torch.float64)  # log-ratios 5 and 25
    adv = torch.tensor([[-2.0, 1.0]], dtype=torch.float64)
    got = entropic_token_loss(logp, old, adv, torch.ones(1, 2, dtype=torch.float64), alpha=0.5)
    want = torch.tensor([[-0.5 * math.exp(5) * 2, -0.5 * math.exp(20) * 1]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_entropic_defaults_are_the_reference_recipe_s():
    """run_entropic.sh: target_entropy 0.1, entropy_control_p 1, entropy_control_i 0.01; the loss
    function's default probability threshold 0.95."""
    reg = EntroPIC()
    assert (reg.target, reg.kp, reg.ki, reg.threshold) == (0.1, 1.0, 0.01, 0.95)


def _entropic_grad(reg, logp, old, adv, mask, mode="token-mean"):
    """d(PPO-clip + the regularizer's terms, aggregated)/d logp, and the regularizer's shaping."""
    logp = logp.clone().requires_grad_(True)
    reg.prepare(MiniBatchContext(step=0, update=0, on_policy=False, logp=logp.detach(), old_logp=old, advantages=adv,
                                 mask=mask, clipped=torch.zeros_like(mask, dtype=torch.bool), old_entropy=mask * 0.5,
                                 agg_mode=mode))
    shaping = reg.shape(PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask))
    base = ppo_token_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss = aggregate(TokenShaping.combine([shaping], base), mask, mode, num_seqs=len(mask), norm_length=mask.shape[1])
    (g,) = torch.autograd.grad(loss, logp)
    return g, shaping


def test_entropic_on_policy_reweights_high_probability_tokens_by_advantage_sign():
    """On policy (ratio 1, nothing clipped) EntroPIC's gradient is the objective's with weight
    1 + alpha c sign(A) on the tokens above the threshold (c = valid / high tokens) and 1 elsewhere:
    alpha < 0 damps confident positive tokens and pushes confident negative ones harder."""
    logp, _, adv, mask, _, _ = _rand(n=8, t=6, seed=13)
    logp = logp / 4  # probabilities 0.47-1: some above 0.8, some below
    reg = EntroPIC(target=0.1, threshold=0.8)
    reg.load_state_dict(_entropic_state(-0.4))
    g, _ = _entropic_grad(reg, logp, logp, adv, mask)
    high = entropic_high_prob(logp, mask, threshold=0.8)
    assert 0 < high.sum() < mask.sum() and (adv[high] > 0).any() and (adv[high] < 0).any()
    w = torch.where(high, 1.0 - 0.4 * float(mask.sum() / high.sum()) * torch.sign(adv), torch.ones_like(adv))
    (g_weighted,) = torch.autograd.grad(
        aggregate(ppo_token_loss(z := logp.clone().requires_grad_(True), logp, adv, mask, clip_low=0.2, clip_high=0.2)
                  * w, mask, "token-mean"), z)
    torch.testing.assert_close(g, g_weighted)
    g_base, _ = _entropic_grad(EntroPIC(), logp, logp, adv, mask)  # alpha 0 before any measurement
    torch.testing.assert_close(g[~high], g_base[~high])
    assert not torch.allclose(g[high], g_base[high])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_entropic_off_policy_term_is_unclipped_as_the_reference(mode):
    """Off policy the term is alpha * agg_high(-r |A|) with the unclipped ratio, as the reference
    adds it: tokens the PPO clip zeroes keep EntroPIC's gradient. Checked against a loop."""
    logp, old, adv, mask, _, _ = _rand(n=8, t=6, seed=14)
    logp = logp / 4
    old = logp + 0.4 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * mask
    reg = EntroPIC(threshold=0.8)
    reg.load_state_dict(_entropic_state(0.3))
    g, shaping = _entropic_grad(reg, logp, old, adv, mask, mode)
    g_base, _ = _entropic_grad(EntroPIC(threshold=0.8), logp, old, adv, mask, mode)
    high = entropic_high_prob(logp, mask, threshold=0.8)
    clipped = ppo_clipped_tokens(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert (high & clipped).any() and (high & ~clipped).any()
    ratio = (logp - old).exp()
    term = aggregate(shaping.penalty.detach(), mask, mode, num_seqs=len(mask))
    assert float(term) == pytest.approx(0.3 * _agg_over_high_loop(-ratio * adv.abs(), high, mask, mode, 6), rel=1e-12)
    n, t = mask.shape
    rows_high = high.any(-1)
    for i in range(n):
        for j in range(t):
            extra = 0.0
            if high[i, j]:  # d/dlogp of alpha * (-r |A|) / (the high tokens' denominator)
                denom = float(high.sum()) if mode == "token-mean" else float(rows_high.sum()) * float(high[i].sum())
                extra = -0.3 * float(ratio[i, j]) * abs(float(adv[i, j])) / denom
            assert float(g[i, j] - g_base[i, j]) == pytest.approx(extra, rel=1e-10, abs=1e-15), (i, j)


def test_entropic_selects_by_the_current_policy_probability():
    """The high-probability tokens are the current policy's (ctx.logp), as the reference's log_prob."""
    logp, _, adv, mask, _, _ = _rand(seed=15)
    current = logp / 4
    reg = EntroPIC(threshold=0.8)
    reg.prepare(MiniBatchContext(step=0, update=1, on_policy=False, logp=current, old_logp=logp, advantages=adv,
                                 mask=mask, clipped=torch.zeros_like(mask, dtype=torch.bool), old_entropy=mask))
    assert torch.equal(reg.weights > 0, entropic_high_prob(current, mask, threshold=0.8))
    assert not torch.equal(reg.weights > 0, entropic_high_prob(logp, mask, threshold=0.8))


def _entropic_run(reg, entropies, steps):
    """prepare() of two mini-batches per step with constant rollout entropy `entropies[step]`;
    returns the alpha applied at each step."""
    logp, old, adv, mask, _, _ = _rand(seed=7)
    applied = []
    for step in steps:
        for half in (slice(0, 3), slice(3, 6)):
            e = torch.full_like(logp[half], entropies[step])
            reg.prepare(_ctx(logp[half], old[half], adv[half], mask[half], e, e, step=step))
        applied.append(reg.alpha)
    return applied


def test_entropic_controller_follows_the_measured_entropy():
    """alpha of step k = clip(kp e_{k-1} + ki (e_0 + ... + e_{k-2}), -1, 1), e = H - target."""
    reg = EntroPIC(target=0.5, kp=1.0, ki=0.1)
    # e = -0.2, -0.2, +0.1, 0, +2.5: alpha 0 (nothing measured), -0.2, -0.2 - 0.02, 0.1 - 0.04, 0 - 0.03
    assert _entropic_run(reg, [0.3, 0.3, 0.6, 0.5, 3.0, 0.5], range(6)) == pytest.approx(
        [0.0, -0.2, -0.22, 0.06, -0.03, 1.0])  # the last: 2.5 - 0.03 clipped to 1
    assert reg.integral == pytest.approx(2.2)  # errors up to step 4 (unclamped); step 5's pending


def test_entropic_logs_its_own_steps_measurement():
    reg = EntroPIC(target=0.5, kp=1.0, ki=0.1, threshold=0.5)
    logged = []
    for step, e in ((0, 0.3), (1, None), (2, 0.9)):  # step 1: every group filtered, nothing measured
        if e is not None:
            _entropic_run(reg, {step: e}, [step])
        logged.append(reg.pop_metrics())
    assert logged[0]["reg/entropic/measured_entropy"] == pytest.approx(0.3)
    assert logged[0]["reg/entropic/error"] == pytest.approx(-0.2) and logged[0]["reg/entropic/integral"] == 0.0
    assert logged[0]["reg/entropic/alpha"] == 0.0 and 0 < logged[0]["reg/entropic/high_frac"] < 1
    assert logged[1] == {}
    assert logged[2]["reg/entropic/alpha"] == pytest.approx(-0.2)  # from step 0's error
    assert logged[2]["reg/entropic/error"] == pytest.approx(0.4) and logged[2]["reg/entropic/integral"] == pytest.approx(-0.2)
    logp, old, adv, mask, _, _ = _rand(seed=7)
    high = entropic_high_prob(logp, mask, threshold=0.5)
    fracs = [float(high[h].sum() / mask[h].sum()) for h in (slice(0, 3), slice(3, 6))]  # a mean over the updates
    assert logged[0]["reg/entropic/high_frac"] == pytest.approx(sum(fracs) / 2)


def test_entropic_counts_and_entropy_are_summed_over_ranks(monkeypatch):
    """Under DDP the weights and the measured entropy are the whole batch's: here another rank
    adds 10 valid tokens of entropy 1 (none high) and 2 rows. Token-mean weight (4 + 10) / 2 = 7
    on the 2 high tokens, measured entropy (4 x 0.5 + 10) / 14, high_frac 2 / 14."""
    from lit_covrl import distributed

    other = torch.tensor([10.0, 10.0, 0.0, 0.0, 2.0], dtype=torch.float64)  # [sum H, tokens, high, high rows, rows]
    monkeypatch.setattr(distributed, "all_sum", lambda t: t + other.to(t.dtype))
    logp = torch.tensor([[0.99, 0.2], [0.97, 0.3]], dtype=torch.float64).log()
    mask, ent = torch.ones(2, 2, dtype=torch.float64), torch.full((2, 2), 0.5, dtype=torch.float64)
    reg = EntroPIC(target=0.1)
    reg.prepare(MiniBatchContext(step=0, update=1, on_policy=True, logp=logp, old_logp=logp, advantages=torch.ones(2, 2),
                                 mask=mask, clipped=None, old_entropy=ent, entropy=ent, agg_mode="token-mean"))
    torch.testing.assert_close(reg.weights, torch.tensor([[7.0, 0.0], [7.0, 0.0]], dtype=torch.float64))
    m = reg.pop_metrics()
    assert m["reg/entropic/measured_entropy"] == pytest.approx(12 / 14)
    assert m["reg/entropic/high_frac"] == pytest.approx(2 / 14)


def test_entropic_resumes_exactly():
    entropies = [0.3, 0.7, 0.2, 0.2, 0.4, 0.9]
    straight = EntroPIC(target=0.5, kp=1.0, ki=0.1)
    full = _entropic_run(straight, entropies, range(6))
    first = EntroPIC(target=0.5, kp=1.0, ki=0.1)
    head = _entropic_run(first, entropies, range(3))
    state = first.state_dict()  # a checkpoint between steps 2 and 3: step 2's measurement pending
    resumed = EntroPIC(target=0.5, kp=1.0, ki=0.1)
    resumed.load_state_dict(state)
    tail = _entropic_run(resumed, entropies, range(3, 6))
    assert head + tail == full and len(set(full)) > 3
    assert resumed.integral == straight.integral
    fresh = EntroPIC(target=0.5, kp=1.0, ki=0.1)  # without the state the resumed run would differ
    assert _entropic_run(fresh, entropies, range(3, 6)) != tail


@pytest.mark.parametrize("kw,match", [
    (dict(target=-0.1), r"EntroPIC.target=-0.1: must be a finite number >= 0"),
    (dict(kp=float("nan")), r"EntroPIC.kp=nan"),
    (dict(ki=float("inf")), r"EntroPIC.ki=inf"),
    (dict(kp=0.0, ki=0.0), "both 0"),
    (dict(threshold=1.0), r"EntroPIC.threshold=1.0: must be a probability in \(0, 1\)"),
    (dict(threshold=0.0), r"EntroPIC.threshold=0.0"),
])
def test_entropic_settings_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        EntroPIC(**kw)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
@pytest.mark.parametrize("make, field", [
    (lambda v: EntropyAdvantage(alpha=v), "EntropyAdvantage.alpha"),
    (lambda v: AdaptiveEntropyBonus(target=v), "AdaptiveEntropyBonus.target"),
    (lambda v: AdaptiveEntropyBonus(delta=v), "AdaptiveEntropyBonus.delta"),
    (lambda v: AdaptiveEntropyBonus(min_coef=v, init_coef=0.0), "AdaptiveEntropyBonus.min_coef"),
    (lambda v: KLCov(beta=v), "KLCov.beta"),
    (lambda v: EntropyBonus(coef=v), "EntropyBonus.coef"),
    (lambda v: ReferenceKL(beta=v), "ReferenceKL.beta"),
])
def test_nonfinite_or_negative_coefficients_are_refused_naming_the_field(make, field, value):
    """A YAML `.nan` or `.inf` reached these settings (review science24b F3): EntropyAdvantage(alpha=nan)
    skipped every update as non-finite and the run exited 0; AdaptiveEntropyBonus(target=nan) never
    switched on."""
    with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid: must be a finite number >= 0"):
        make(value)


def test_entropy_advantage_refuses_an_infinite_kappa():
    with pytest.raises(ValueError, match="kappa must be finite and > 1"):
        EntropyAdvantage(kappa=math.inf)
