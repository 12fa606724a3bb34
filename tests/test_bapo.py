"""BAPO (adaptive clipping): the bound search by hand and against a float64 loop of the reference's
search (recipe/bapo/policy_loss.py: recompute the contributions after each step), the uniform range it
hands the objective, its metrics, the start-up refusals and warning, and that the decision is the
whole mini-batch's (not a micro-batch's)."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from lit_covrl.algorithms import bapo_contribution_sums, bapo_grid, bapo_search
from lit_covrl.objectives import CEGPPO, GSPO, PPOClip
from lit_covrl.regularizers import BAPO, Archer
from lit_covrl.regularizers.base import MiniBatchContext, check_objective_stack, check_stack
from lit_covrl.types import PolicyBatch

torch.set_num_threads(1)

LOWS = [0.8, 0.8 + 0.05, 0.8 + 0.05 + 0.05, 0.95]  # the recipe's grids, added as the reference adds them
HIGHS = [1.2]
for _ in range(8):
    HIGHS.append(min(HIGHS[-1] + 0.1, 2.0))


def _ctx(logp, old, adv, mask):
    return MiniBatchContext(0, 1, False, logp, old, adv, mask, None)


def _reference_search(logp, old, adv, mask, *, target, low, high, eps=1e-8, clamp=20.0):
    """The reference's search, one token at a time in float64: (c_low, c_high, P / (N + eps)),
    the log-ratio clamped to +-clamp (the reference's 20)."""
    def ratio(c_low, c_high):
        pos = neg = 0.0
        for i in range(logp.shape[0]):
            for j in range(logp.shape[1]):
                if not mask[i, j]:
                    continue
                r = math.exp(min(max(float(logp[i, j] - old[i, j]), -clamp), clamp))
                a = float(adv[i, j])
                eff = (min(r, c_high) if a >= 0 else max(r, c_low)) * a
                pos, neg = pos + max(eff, 0.0), neg + max(-eff, 0.0)
        return math.inf if neg <= 0 else pos / (neg + eps)

    (lo, lo_max, lo_step), (hi, hi_max, hi_step) = low, high
    rho = ratio(lo, hi)
    while rho < target and lo < lo_max and lo_step > 0:
        lo = min(lo + lo_step, lo_max)
        rho = ratio(lo, hi)
    while rho < target and hi < hi_max and hi_step > 0:
        hi = min(hi + hi_step, hi_max)
        rho = ratio(lo, hi)
    return lo, hi, rho


def test_grid_visits_the_reference_s_bounds():
    assert bapo_grid(0.8, 0.95, 0.05) == LOWS and bapo_grid(1.2, 2.0, 0.1) == HIGHS
    assert bapo_grid(0.6, 0.9, 0.2) == [0.6, 0.8, 0.9]  # the last step capped at the max
    assert bapo_grid(0.8, 0.8, 0.05) == [0.8] and bapo_grid(0.8, 0.95, 0.0) == [0.8]


def _hand_batch():
    """Token 0: A = +1, r = 3; token 1: A = -1, r = 0.5; token 2 padding (r = 10, A = -5)."""
    logp = torch.tensor([[math.log(3.0), math.log(0.5), math.log(10.0)]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -1.0, -5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    return logp, old, adv, mask


def test_hand_values_of_the_search():
    # N(c_low) = max(0.5, c_low) * 1, P(c_high) = min(3, c_high) * 1
    logp, old, adv, mask = _hand_batch()
    sums = bapo_contribution_sums(logp, old, adv, mask, lows=LOWS, highs=HIGHS)
    torch.testing.assert_close(sums, torch.tensor(LOWS + HIGHS, dtype=torch.float64))
    # target 0.5: 1.2 / 0.8 = 1.5 is met at the start
    assert bapo_search(sums, LOWS, HIGHS, target=0.5) == (0, 0, pytest.approx(1.5))
    # target 1.6: c_low rises to 0.95 (1.2 / 0.95 = 1.26), then c_high: 1.5 / 0.95 = 1.58 < 1.6 <= 1.6 / 0.95
    i, j, rho = bapo_search(sums, LOWS, HIGHS, target=1.6)
    assert (LOWS[i], HIGHS[j]) == (0.95, HIGHS[4]) and HIGHS[4] == pytest.approx(1.6)
    assert rho == pytest.approx(1.6 / 0.95)
    # target 10: both grids spent, P capped by r = 3
    assert bapo_search(sums, LOWS, HIGHS, target=10.0) == (3, 8, pytest.approx(2.0 / 0.95))
    # no negative token: the ratio is infinite, met at once
    assert bapo_search(torch.tensor([0.0] * 4 + HIGHS), LOWS, HIGHS, target=100.0)[:2] == (0, 0)


def test_a_ratio_exactly_at_the_target_stops_the_search():
    """The reference steps while P / (N + eps) < target, strictly: with N(0.8) = 2, N(0.85) = 1,
    P(1.2) = 1 and eps 0 the start's 1 / 2 = 0.5 meets target 0.5, so c_low stays at 0.8 (one more
    step would give 1 / 1 = 1)."""
    assert bapo_search([2.0, 1.0, 1.0], [0.8, 0.85], [1.2], target=0.5, eps=0.0) == (0, 0, 0.5)


def test_the_ratio_is_clamped_as_the_objective_clamps_it():
    """ctx.logratio_clamp (the objective's logratio_clamp) bounds r, so P and N are the objective's
    values: at 0.1 the hand batch's r = 3 and 0.5 become e^0.1 and e^-0.1, and the search at target
    1.6 spends both grids where the clamp of 20 stops at c_high 1.6 (BAPO used to clamp at 20 always)."""
    logp, old, adv, mask = _hand_batch()
    hi, lo = math.exp(0.1), math.exp(-0.1)
    sums = bapo_contribution_sums(logp, old, adv, mask, lows=LOWS, highs=HIGHS, logratio_clamp=0.1)
    torch.testing.assert_close(sums, torch.tensor([max(lo, c) for c in LOWS] + [hi] * len(HIGHS), dtype=torch.float64))
    unclamped = bapo_contribution_sums(logp, old, adv, mask, lows=LOWS, highs=HIGHS, logratio_clamp=None)
    torch.testing.assert_close(unclamped, bapo_contribution_sums(logp, old, adv, mask, lows=LOWS, highs=HIGHS))  # r <= 10
    for clamp, bounds, rho in ((20.0, (0.95, HIGHS[4]), 1.6 / 0.95), (0.1, (0.95, 2.0), hi / 0.95)):
        reg, ctx = BAPO(target=1.6), _ctx(logp, old, adv, mask)
        ctx.logratio_clamp = clamp
        reg.prepare(ctx)
        m = reg.pop_metrics()
        assert (m["reg/bapo/clip_low"], m["reg/bapo/clip_high"]) == bounds
        assert m["reg/bapo/pos_neg_ratio"] == pytest.approx(rho)


class _LengthParity:
    """Reward: the parity of the completion's length (groups with both values)."""

    def __call__(self, completion: str, answer: str) -> float:
        return float(len(completion) % 2)


class _BAPOProbe(BAPO):
    """BAPO that keeps each mini-batch's context and the bounds it found."""

    def __init__(self) -> None:
        super().__init__(target=1.1)
        self.seen = []

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        self.seen.append((ctx, float(1 - self.clip_bounds()[0][0, 0]), float(1 + self.clip_bounds()[1][0, 0])))


def test_the_learner_hands_bapo_the_objective_s_clamp(tiny_model_dir):
    """model.loss.logratio_clamp 0.1 reaches BAPO's prepare (ctx.logratio_clamp), and the bounds
    it finds are the reference loop's at that clamp, off policy (update 1 of 2)."""
    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    probe = _BAPOProbe()
    module = make_module(tiny_model_dir, reward=_LengthParity(), loss=dict(logratio_clamp=0.1),
                         update=dict(ppo_epochs=2), rollout=dict(filter_groups=False))
    fit(module, make_data(batch_size=2, val_size=0), steps=1, callbacks=[probe], limit_val_batches=0)
    assert len(probe.seen) == 2 and all(ctx.logratio_clamp == 0.1 for ctx, _, _ in probe.seen)
    ctx, lo, hi = probe.seen[1]
    assert not ctx.on_policy
    ref = _reference_search(ctx.logp.double(), ctx.old_logp.double(), ctx.advantages.double(), ctx.mask,
                            target=1.1, low=(0.8, 0.95, 0.05), high=(1.2, 2.0, 0.1), clamp=0.1)
    assert (lo, hi) == pytest.approx(ref[:2], abs=1e-6)
    unclamped = _reference_search(ctx.logp.double(), ctx.old_logp.double(), ctx.advantages.double(), ctx.mask,
                                  target=1.1, low=(0.8, 0.95, 0.05), high=(1.2, 2.0, 0.1))
    assert unclamped[:2] != pytest.approx(ref[:2], abs=1e-6)  # the clamp of 20 would find another range


def test_a_mini_batch_without_advantages_keeps_the_start_range_and_logs_no_share():
    logp, old, _, mask = _hand_batch()
    reg = BAPO()
    reg.prepare(_ctx(logp, old, torch.zeros_like(logp), mask))
    assert reg.pop_metrics() == {"reg/bapo/clip_low": 0.8, "reg/bapo/clip_high": 1.2}


def _random_batch(seed: int, n: int = 6, t: int = 7):
    """(logp, old_logp, advantages, mask) float64 [n, t]: ~15 % padding, ratios spread by e^(0.5 z)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, t, generator=g) < 0.85).double()
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    old = logp + 0.5 * torch.randn(n, t, generator=g, dtype=torch.float64)
    return logp, old, torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t).clone(), mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.3, 0.5, 0.9, 1.5])
def test_search_matches_a_float64_loop_of_the_reference(seed, target):
    logp, old, adv, mask = _random_batch(seed)
    reg = BAPO(target=target)
    reg.prepare(_ctx(logp, old, adv, mask))
    lo, hi, rho = _reference_search(logp, old, adv, mask, target=target, low=(0.8, 0.95, 0.05), high=(1.2, 2.0, 0.1))
    eps_low, eps_high = reg.clip_bounds()
    assert torch.equal(eps_low, torch.full_like(mask, 1.0 - lo)) and torch.equal(eps_high, torch.full_like(mask, hi - 1.0))
    m = reg.pop_metrics()
    assert (m["reg/bapo/clip_low"], m["reg/bapo/clip_high"]) == (lo, hi)
    if math.isfinite(rho):
        assert m["reg/bapo/pos_neg_ratio"] == pytest.approx(rho, rel=1e-12)


def test_searches_that_move_each_bound_are_covered():
    """The oracle comparison above must see both bounds move and stop in between."""
    seen = set()
    for seed in range(6):
        for target in (0.3, 0.5, 0.9, 1.5):
            logp, old, adv, mask = _random_batch(seed)
            lo, hi, _ = _reference_search(logp, old, adv, mask, target=target, low=(0.8, 0.95, 0.05),
                                          high=(1.2, 2.0, 0.1))
            seen.add(("low_start" if lo == 0.8 else "low_max" if lo == 0.95 else "low_mid",
                      "high_start" if hi == 1.2 else "high_max" if hi == 2.0 else "high_mid"))
    assert {("low_start", "high_start"), ("low_max", "high_mid"), ("low_max", "high_max")} <= seen, seen


def test_contribution_sums_add_over_row_splits():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(5, 4, generator=g, dtype=torch.float64)
    old = logp + 0.4 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(5, 1, generator=g, dtype=torch.float64).expand(5, 4), torch.ones(5, 4, dtype=torch.float64)
    whole = bapo_contribution_sums(logp, old, adv, mask, lows=LOWS, highs=HIGHS)
    parts = sum(bapo_contribution_sums(logp[s], old[s], adv[s], mask[s], lows=LOWS, highs=HIGHS)
                for s in (slice(0, 1), slice(1, 4), slice(4, 5)))
    torch.testing.assert_close(parts, whole)


def test_the_decision_is_the_mini_batch_s_not_a_micro_batch_s():
    """A micro-batch of negative tokens alone would widen to the max; the mini-batch's positive
    tokens meet the target at the start, so every micro-batch gets the start range."""
    logp = torch.log(torch.tensor([[2.0, 2.0], [0.5, 0.5]], dtype=torch.float64))
    old, mask = torch.zeros_like(logp), torch.ones_like(logp)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    whole, part = BAPO(), BAPO()
    whole.prepare(_ctx(logp, old, adv, mask))
    part.prepare(_ctx(logp[1:], old[1:], adv[1:], mask[1:]))
    assert float(whole.clip_bounds()[0][0, 0]) == pytest.approx(0.2) and float(part.clip_bounds()[0][0, 0]) == pytest.approx(0.05)
    s = whole.shape(PolicyBatch(torch.tensor([1]), logp[1:], old[1:], adv[1:], mask[1:]))
    torch.testing.assert_close(s.clip_low, torch.full((1, 2), 1 - 0.8, dtype=torch.float64))
    torch.testing.assert_close(s.clip_high, torch.full((1, 2), 1.2 - 1, dtype=torch.float64))
    m = whole.pop_metrics()  # P = 2 * 1.2, N = 2 * 0.8
    assert m["reg/bapo/pos_contribution"] == pytest.approx(2.4 / 4.0) and m["reg/bapo/pos_neg_ratio"] == pytest.approx(1.5)
    # the range reaches the objective: the A > 0 tokens at r = 2 clip at 1.2
    loss = PPOClip().token_loss(logp, old, adv, mask, clip=whole.clip_bounds())
    torch.testing.assert_close(loss[0], torch.full((2,), -1.2, dtype=torch.float64))


def test_startup_refusals_name_the_fields():
    with pytest.raises(ValueError, match="GSPO clips whole sequences"):
        check_objective_stack(GSPO(), [BAPO()])
    with pytest.raises(ValueError, match="set a per-token clip range.*'archer'.*'bapo'"):
        check_stack([Archer(), BAPO()])
    check_objective_stack(PPOClip(dual_clip=3.0), [BAPO()])
    with pytest.raises(ValueError, match="CEGPPO.beta1"):  # beta1 (1 - 0.2) = 1.6 >= 1.5
        check_objective_stack(CEGPPO(beta1=2.0, dual_clip=1.5), [BAPO()])
    for kw, field in ((dict(target=-1.0), "BAPO.target"), (dict(low_start=1.2, low_max=1.3), "BAPO.low_start"),
                      (dict(low_max=1.5), "BAPO.low_max"), (dict(low_step=-0.05), "BAPO.low_step"),
                      (dict(high_start=0.9), "BAPO.high_start"), (dict(high_max=math.inf), "BAPO.high_max"),
                      (dict(high_step=None), "BAPO.high_step"), (dict(eps=-1.0), "BAPO.eps"),
                      (dict(low_start=0.9, low_max=0.85), "BAPO.low_max"),
                      (dict(high_start=2.5, high_max=2.0), "BAPO.high_max"), (dict(target=True), "BAPO.target"),
                      # a grid of 1e10 bounds (high_max 1e9 by 0.1) froze the start-up building it
                      (dict(high_max=1e9), "BAPO.high_step"), (dict(low_step=1e-6), "BAPO.low_step")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            BAPO(**kw)


def test_fixed_bounds_are_a_valid_setting():
    """start == max (0 <= start <= max) fixes a bound: BAPO(0.9 / 0.9, 1.3 / 1.3) constructs, its
    grids are the one value each, and every mini-batch gets eps 1 - 0.9 = 0.1 below and 1.3 - 1 = 0.3
    above, whatever the target."""
    reg = BAPO(low_start=0.9, low_max=0.9, high_start=1.3, high_max=1.3, target=100.0)
    assert reg.lows == [0.9] and reg.highs == [1.3]
    reg.prepare(_ctx(*_hand_batch()))
    lo, hi = reg.clip_bounds()
    torch.testing.assert_close(lo, torch.full((1, 3), 0.1, dtype=torch.float64))
    torch.testing.assert_close(hi, torch.full((1, 3), 0.3, dtype=torch.float64))


def test_warns_when_every_update_is_on_policy(caplog):
    class M:
        updates_per_rollout = 1

    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        BAPO().on_fit_start(None, M())
    assert "BAPO has no effect with a single on-policy update" in caplog.text
    caplog.clear()
    M.updates_per_rollout = 4
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        BAPO().on_fit_start(None, M())
    assert caplog.text == ""


def test_clip_values_are_every_eps_the_search_may_set():
    lows, highs = BAPO().clip_values()
    assert lows == [1 - c for c in LOWS] and highs == [c - 1 for c in HIGHS]


def _cli_fit(tmp_path, *extra):
    from tests.helpers import cli_fit_tags

    return cli_fit_tags(tmp_path, "configs/cpu/bapo.yaml", "--model.rollout.group_size", "4",
                        "--model.rollout.max_new_tokens", "6", "--data.batch_size", "8", "--model.update.mini_batch_size",
                        "2", "--model.rollout.filter_groups", "false", *extra)


@pytest.mark.parametrize("target", [None, 1.0], ids=["recipe", "target1"])
def test_bapo_config_runs_through_the_cli(tmp_path, target):
    """configs/cpu/bapo.yaml on the quickstart through `lit-covrl fit` (4 updates per rollout, 3
    steps): BAPO is built from the YAML and its tags are written every step. At the recipe's target
    0.5 the quickstart's P / N (~1) is met at the start range every time; at 1.0 (set on the
    command line) the search moves the bounds on some updates and the range changes the loss."""
    # the quickstart's model: the tiny random one of the other fits gets no reward (A = 0)
    tags = _cli_fit(tmp_path, *([] if target is None else ["--trainer.callbacks.init_args.target", str(target)]))
    keys = {"reg/bapo/clip_low", "reg/bapo/clip_high", "reg/bapo/pos_contribution", "reg/bapo/pos_neg_ratio",
            "reg/bapo/loss"}
    assert keys <= set(tags) and all(len(tags[k]) == 3 for k in keys), sorted(tags)
    assert all(0 < p < 1 for p in tags["reg/bapo/pos_contribution"])
    assert len(set(tags["reg/bapo/pos_contribution"])) == 3  # each step's own mini-batches
    low, high = tags["reg/bapo/clip_low"], tags["reg/bapo/clip_high"]
    if target is None:
        assert low == pytest.approx([0.8] * 3) and high == pytest.approx([1.2] * 3)
        assert tags["reg/bapo/loss"] == [0.0] * 3  # the start range is PPO's 0.2 / 0.2
    else:
        assert all(0.8 <= c <= 0.95 for c in low) and any(c > 0.8 + 1e-6 for c in low)
        assert all(1.2 <= c <= 2.0 for c in high) and any(c > 1.2 + 1e-6 for c in high)
        assert any(v != 0 for v in tags["reg/bapo/loss"])


def test_a_bad_setting_is_refused_at_start_up_naming_the_field(tmp_path, capsys):
    """configs/cpu/bapo.yaml with low_max 1.5 on the command line: exit 2, one line naming
    BAPO.low_max, before the first rollout."""
    with pytest.raises(SystemExit) as exit_:
        _cli_fit(tmp_path, "--trainer.callbacks.init_args.low_max", "1.5")
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "BAPO.low_max=1.5 is invalid: must be a finite number in [0, 1]" in err and "Traceback" not in err
