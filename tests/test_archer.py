"""Archer (dual-token constraints) and the per-token clip range it sets: hand values, float64 loop
oracles of each token-level objective under a per-token range, the per-response quantile against
torch.nanquantile (the reference's), the KL scale ReferenceKL applies, the start-up refusals and
the learner's wiring (Clip-Cov's candidates follow the per-token range)."""
from __future__ import annotations

import logging

import pytest
import torch

from lit_covrl.algorithms import aggregate, archer_high_entropy
from lit_covrl.objectives import CEGPPO, CISPO, GSPO, PPOClip
from lit_covrl.regularizers import Archer, ClipCov, ReferenceKL
from lit_covrl.regularizers.base import MiniBatchContext, check_objective_stack, check_stack
from lit_covrl.types import PolicyBatch, TokenShaping

torch.set_num_threads(1)


def _tokens(seed=0, n=4, t=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    old = logp + 0.6 * torch.randn(n, t, generator=g, dtype=torch.float64)  # ratios well outside 0.2 and 0.5
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)[:n, None].expand(n, t).clone()
    lo = torch.where(torch.rand(n, t, generator=g) < 0.4, 0.5, 0.2).double()
    hi = torch.where(torch.rand(n, t, generator=g) < 0.4, 0.5, 0.2).double()
    return logp, old, adv, mask, (lo, hi)


def _loop(logp, old, adv, mask, lo, hi, rule):
    """(loss, d loss / d logp, zero-gradient) per token, one token at a time in float64."""
    loss, grad, inert = (torch.zeros_like(logp) for _ in range(3))
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            if not mask[i, j]:
                continue
            r = float(torch.exp(logp[i, j] - old[i, j]))
            v, d, z = rule(r, float(adv[i, j]), float(lo[i, j]), float(hi[i, j]))
            loss[i, j], grad[i, j], inert[i, j] = v, d, z
    return loss, grad, inert.bool()


def _ppo_rule(c):
    def rule(r, a, lo, hi):
        l1, l2 = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
        v, d = (l1, -a * r) if l1 >= l2 else (l2, 0.0)
        if c is not None and a < 0 and -a * c < v:
            v, d = -a * c, 0.0
        return v, d, d == 0.0 and a != 0
    return rule


def _check(obj, rule, kind):
    logp, old, adv, mask, clip = _tokens()
    z = logp.clone().requires_grad_(True)
    loss = obj.token_loss(z, old, adv, mask, clip=clip)
    loss.sum().backward()
    want_loss, want_grad, want_inert = _loop(logp, old, adv, mask, *clip, rule)
    torch.testing.assert_close(loss.detach(), want_loss)
    torch.testing.assert_close(z.grad, want_grad)
    if kind != "cispo":
        assert torch.equal(obj.clipped_tokens(logp, old, adv, mask, clip=clip), want_inert & mask.bool())
    # the uniform range clips other tokens: the per-token one was used
    assert not torch.allclose(obj.token_loss(logp, old, adv, mask), want_loss)
    return logp, old, adv, mask, clip


def test_ppo_clip_takes_a_per_token_clip_range_against_a_float64_loop():
    logp, old, adv, mask, (lo, hi) = _check(PPOClip(dual_clip=3.0), _ppo_rule(3.0), "ppo")
    stats = PPOClip(dual_clip=3.0).stats(logp, old, adv, mask, clip=(lo, hi))
    r = torch.exp(logp - old)
    m = mask.bool()
    low = ((r < 1 - lo) & (adv < 0) & m).sum() / m.sum()
    high = ((r > 1 + hi) & (adv > 0) & m).sum() / m.sum()
    assert float(stats["clip_frac_low"]) == pytest.approx(float(low)) and float(stats["clip_frac_high"]) == pytest.approx(float(high))
    assert 0 < float(stats["clip_frac"]) < 1


def test_ce_gppo_kept_gradient_follows_the_per_token_range():
    b1, b2 = 0.5, 1.5

    def rule(r, a, lo, hi):
        v, d, _ = _ppo_rule(None)(r, a, lo, hi)
        if a < 0 and r < 1 - lo:
            d = -b1 * (1 - lo) * a
        elif a > 0 and r > 1 + hi:
            d = -b2 * (1 + hi) * a
        return v, d, d == 0.0 and a != 0
    _check(CEGPPO(beta1=b1, beta2=b2), rule, "ce_gppo")


def test_cispo_caps_the_is_weight_at_each_token_s_bounds():
    def rule(r, a, lo, hi):
        w = min(max(r, 1 - lo), 1 + hi)
        return -w * a, -w * a, False
    _check(CISPO(), rule, "cispo")


def test_hand_values_of_one_token_each_side():
    """r = 0.6 on an A = -1 token: clipped at 1 - 0.2 (value 0.8, no gradient), kept by 1 - 0.5
    (value 0.6, gradient 0.6); r = 1.4 on an A = 1 token: clipped at 1.2 (-1.2), kept by 1.5 (-1.4)."""
    logp = torch.log(torch.tensor([[0.6, 1.4]], dtype=torch.float64))
    old, adv, mask = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[-1.0, 1.0]], dtype=torch.float64), torch.ones(1, 2)
    for eps, want in ((0.2, [0.8, -1.2]), (0.5, [0.6, -1.4])):
        clip = (torch.full((1, 2), eps, dtype=torch.float64),) * 2
        z = logp.clone().requires_grad_(True)
        loss = PPOClip().token_loss(z, old, adv, mask, clip=clip)
        loss.sum().backward()
        torch.testing.assert_close(loss.detach(), torch.tensor([want], dtype=torch.float64))
        torch.testing.assert_close(z.grad, torch.tensor([[0.0, 0.0]] if eps == 0.2 else [[0.6, -1.4]], dtype=torch.float64))


def test_high_entropy_is_strictly_above_each_response_s_quantile_as_nanquantile():
    """Per response, over its valid tokens: H > torch.nanquantile(H, 0.8) (the reference's rule);
    hand values: [1, 2, 3, 4, 5, 6] has the 0.8 quantile 5 (5 itself low), [1, 2, 3] has 2.6."""
    h = torch.tensor([[1.0, 2, 3, 4, 5, 6], [3.0, 1, 2, 9, 9, 9]])
    mask = torch.tensor([[1.0] * 6, [1, 1, 1, 0, 0, 0]])
    got = archer_high_entropy(h, mask, quantile=0.8)
    assert got.tolist() == [[False] * 5 + [True], [True] + [False] * 5]
    g = torch.Generator().manual_seed(3)
    h, mask = torch.rand(16, 11, generator=g), (torch.rand(16, 11, generator=g) < 0.7).float()
    for q in (0.0, 0.5, 0.8, 1.0):
        tau = torch.nanquantile(torch.where(mask.bool(), h.double(), torch.nan), q, dim=-1, keepdim=True)
        assert torch.equal(archer_high_entropy(h, mask, quantile=q), (h.double() > tau) & mask.bool()), q
    assert not archer_high_entropy(h, torch.zeros_like(mask), quantile=0.8).any()


def test_a_response_whose_quantile_is_zero_selects_only_its_tokens_above_zero():
    """A saturated softmax gives entropy exactly 0: in [0, 0, 0, 0, 0, 1] the 0.8 quantile is 0
    (position 0.8 x 5 = 4 of the sorted row), where the tolerance band TIE_TOL x |tau| is empty, so
    only the strict rule keeps the five fully confident tokens low-entropy (SIREN, SimKO and Archer
    share this selection); H >= tau would call every token high-entropy."""
    got = archer_high_entropy(torch.tensor([[0.0, 0, 0, 0, 0, 1]]), torch.ones(1, 6), quantile=0.8)
    assert got.tolist() == [[False] * 5 + [True]]


def _ctx(mask, ent, logp=None, old=None, adv=None):
    z = torch.zeros_like(mask)
    return MiniBatchContext(0, 1, False, z if logp is None else logp, z if old is None else old,
                            z if adv is None else adv, mask, None, ent, ent)


def test_archer_sets_the_wide_range_and_the_kl_scale_on_high_entropy_tokens():
    h = torch.tensor([[1.0, 2, 3, 4, 5, 6], [3.0, 1, 2, 0, 0, 0]])
    mask = torch.tensor([[1.0] * 6, [1, 1, 1, 0, 0, 0]])
    reg = Archer(high_entropy_kl_scale=0.25)
    reg.prepare(_ctx(mask, h))
    lo, hi = reg.clip_bounds()
    high = torch.tensor([[False] * 5 + [True], [True] + [False] * 5])
    assert torch.equal(lo, torch.where(high, 0.5, 0.2)) and torch.equal(hi, lo)
    torch.testing.assert_close(reg.kl_scale(), torch.where(high, 0.25, 1.0))
    s = reg.shape(PolicyBatch(torch.tensor([1]), torch.zeros(1, 6), torch.zeros(1, 6), torch.zeros(1, 6), mask[1:]))
    torch.testing.assert_close(s.clip_low, torch.tensor([[0.5, 0.2, 0.2, 0.2, 0.2, 0.2]]))
    assert reg.pop_metrics()["reg/archer/high_entropy_frac"] == pytest.approx(2 / 9)
    assert Archer(high_entropy_kl_scale=1.0).kl_scale() is None


def test_archer_s_default_kl_scale_takes_the_kl_off_the_high_entropy_tokens():
    """The recipe's default high_entropy_kl_scale 0: no KL on the high-entropy tokens, the full KL
    on the others, as a scale ReferenceKL applies (None would put the full KL on every token). On
    [1, 2, 3, 4, 5, 6] (0.8 quantile 5) only the 6 is high-entropy."""
    reg = Archer()
    reg.prepare(_ctx(torch.ones(1, 6), torch.tensor([[1.0, 2, 3, 4, 5, 6]])))
    scale = reg.kl_scale()
    assert scale is not None and scale.tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]


def test_reference_kl_applies_the_per_token_scale():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(2, 3, generator=g), -torch.rand(2, 3, generator=g)
    mask, scale = torch.ones(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.25, 1.0, 1.0]])
    kl = ReferenceKL(beta=0.1)
    plain = kl.shape(PolicyBatch(torch.arange(2), logp, logp, mask, mask, ref_logp=ref)).penalty
    scaled = kl.shape(PolicyBatch(torch.arange(2), logp, logp, mask, mask, ref_logp=ref, kl_scale=scale)).penalty
    torch.testing.assert_close(scaled, plain * scale)
    assert plain[0, 1] != 0


def test_startup_refusals_name_the_fields():
    with pytest.raises(ValueError, match="GSPO clips whole sequences") as err:
        check_objective_stack(GSPO(), [Archer()])
    assert str(err.value).count("'archer'") == 1 and str(err.value).endswith(
        "use PPOClip, CEGPPO or CISPO with Archer, or leave Archer out"), err.value
    with pytest.raises(ValueError, match="set a per-token clip range.*'archer'.*'archer_2'"):
        check_stack([Archer(), Archer(name="archer_2")])
    with pytest.raises(ValueError, match="CEGPPO.beta1"):  # beta1 (1 - 0.2) = 1.6 >= 1.5
        check_objective_stack(CEGPPO(beta1=2.0, clip_low=0.5, dual_clip=1.5), [Archer()])
    check_objective_stack(CEGPPO(beta1=2.0, clip_low=0.5, dual_clip=1.5), [Archer(low_entropy_clip_low=0.5)])
    for kw, field in ((dict(quantile=1.5), "Archer.quantile"), (dict(high_entropy_clip_low=1.5), "Archer.high_entropy_clip_low"),
                      (dict(low_entropy_clip_high=-0.1), "Archer.low_entropy_clip_high"),
                      (dict(high_entropy_kl_scale=-1.0), "Archer.high_entropy_kl_scale"),
                      (dict(low_entropy_clip_low=None), "Archer.low_entropy_clip_low")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            Archer(**kw)
    with pytest.raises(ValueError, match="sets_clip_range"):
        TokenShaping.checked(TokenShaping(clip_low=torch.zeros(1, 2), clip_high=torch.zeros(1, 2)), torch.Size([1, 2]),
                             ReferenceKL())


def test_objective_clip_keys_replaced_by_archer_are_warned(tiny_model_dir, caplog):
    """clip-higher (or any clip_low / clip_high of the objective) under Archer does nothing: each
    token's range is Archer's. Said at start-up, naming the setting as the user gave it."""
    from tests.test_module import _one_rl_step_weights

    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        check_objective_stack(CISPO(), [Archer()])  # CISPO's own defaults (None / 0.28): nothing to say
        check_objective_stack(PPOClip(), [Archer()])
        assert "has no effect" not in caplog.text
        check_objective_stack(CEGPPO(clip_low=0.1), [Archer(name="a2")])
        assert "model.objective.init_args.clip_low=0.1 has no effect: Archer (regularizer 'a2')" in caplog.text
        caplog.clear()
        _one_rl_step_weights(tiny_model_dir, 64, lambda: [Archer()], loss=dict(clip_high=0.28))
    assert "model.loss.clip_high=0.28 has no effect: Archer (regularizer 'archer') sets every token's clip range" \
        in caplog.text and "clip_low" not in caplog.text


def test_warns_when_every_update_is_on_policy_or_no_reference_kl(caplog):
    class T:
        callbacks: list = []

    class M:
        updates_per_rollout = 1

    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        Archer().on_fit_start(T(), M())
    assert "single on-policy update" in caplog.text and "no ReferenceKL" in caplog.text


def test_learner_wiring_clip_cov_candidates_and_contribution():
    """Through the learner: ctx.clipped follows Archer's range (Clip-Cov, prepared after it, draws
    among the tokens the per-token range leaves unclipped), and reg/archer/loss is the change of
    the objective the per-token range makes."""
    from lit_covrl.learner import Learner
    from lit_covrl.loss import contributions

    logp, old, adv, mask, _ = _tokens()
    old = logp + 0.5 * (old - logp)  # log-ratios of std 0.3: some tokens between the two ranges
    ent = torch.rand(*mask.shape, generator=torch.Generator().manual_seed(5))
    archer, seen = Archer(quantile=0.4), {}

    class Spy(ClipCov):
        def prepare(self, ctx):
            seen["clipped"] = ctx.clipped
            super().prepare(ctx)

    learner = Learner.__new__(Learner)
    learner.objective, learner.regularizers = PPOClip(dual_clip=3.0), [Spy(ratio=0.2, lb=-1e9, ub=1e9), archer]
    learner.step, learner._on_policy = 0, False
    learner.settings = type("S", (), {"loss": type("L", (), {"loss_agg_mode": "token-mean"})(),
                                      "rollout": type("R", (), {"max_new_tokens": 8})()})()

    class MB:
        pass
    mb = MB()
    mb.old_logp, mb.advantages, mb.mask, mb.old_entropy = old, adv, mask, ent
    mb.input_ids, mb.groups = torch.zeros_like(mask, dtype=torch.long), torch.arange(len(mask)) // 4  # tokens, prompts
    learner._selection_logprobs = lambda mb, plan, need: (logp, ent, None, None)
    learner._select(mb, [None], 1)
    lo, hi = archer.clip_bounds()
    assert torch.equal(seen["clipped"], PPOClip(dual_clip=3.0).clipped_tokens(logp, old, adv, mask, clip=(lo, hi)))
    assert not torch.equal(seen["clipped"], PPOClip(dual_clip=3.0).clipped_tokens(logp, old, adv, mask))
    b = PolicyBatch(torch.arange(4), logp, old, adv, mask, ent)
    agg = dict(mode="token-mean")
    loss, shapings, base = learner.loss(b, agg)
    parts = contributions(learner.objective, learner.regularizers, b, shapings, base, agg)
    plain = aggregate(PPOClip(dual_clip=3.0).token_loss(logp, old, adv, mask), mask, "token-mean")
    cov = parts["reg/clip_cov/loss"]
    assert float(parts["reg/archer/loss"]) != 0
    assert float(loss) == pytest.approx(float(plain + parts["reg/archer/loss"] + cov))


def _selected(objective, regularizers, logp, old, adv, mask, ent):
    """A learner with `objective` and `regularizers` that has prepared them on one mini-batch."""
    from lit_covrl.learner import Learner

    learner = Learner.__new__(Learner)
    learner.objective, learner.regularizers = objective, regularizers
    learner.step, learner._on_policy = 0, False
    learner.settings = type("S", (), {"loss": type("L", (), {"loss_agg_mode": "token-mean"})(),
                                      "rollout": type("R", (), {"max_new_tokens": 8})()})()
    mb = type("MB", (), {})()
    mb.old_logp, mb.advantages, mb.mask, mb.old_entropy = old, adv, mask, ent
    mb.input_ids, mb.groups = torch.zeros_like(mask, dtype=torch.long), torch.arange(len(mask)) // 4  # tokens, prompts
    learner._selection_logprobs = lambda mb, plan, need: (logp, ent, None, None)
    learner._select(mb, [None], 1)
    return learner


def _between_ranges():
    """Tokens whose log-ratios (std 0.3) put some between the 0.2 and the 0.5 ranges."""
    logp, old, adv, mask, _ = _tokens()
    ent = torch.rand(*mask.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return logp, logp + 0.5 * (old - logp), adv, mask, ent


def test_clip_cov_follows_archer_s_range_when_a_regularizer_that_does_not_read_zeroed_is_listed_first():
    """Archer is prepared first whatever the list's order: with KL-Cov (which does not read
    zeroed tokens) listed before it, ctx.clipped would be the objective's own range and Clip-Cov
    would draw its candidates from the wrong tokens."""
    from lit_covrl.regularizers import KLCov

    logp, old, adv, mask, ent = _between_ranges()
    archer, seen = Archer(quantile=0.4), {}

    class Spy(ClipCov):
        def prepare(self, ctx):
            seen["clipped"] = ctx.clipped
            super().prepare(ctx)

    _selected(PPOClip(), [KLCov(ratio=0.1), Spy(ratio=0.2, lb=-1e9, ub=1e9), archer], logp, old, adv, mask, ent)
    want = PPOClip().clipped_tokens(logp, old, adv, mask, clip=archer.clip_bounds())
    assert not torch.equal(want, PPOClip().clipped_tokens(logp, old, adv, mask))  # the test can tell
    assert torch.equal(seen["clipped"], want)


@pytest.mark.parametrize("objective", [PPOClip(), CISPO(), CEGPPO()], ids=["ppo", "cispo", "ce_gppo"])
def test_an_asymmetric_archer_range_reaches_the_loss_and_the_stats_low_to_low(objective):
    """With eps_low != eps_high, the loss is the objective's under (eps_low, eps_high) per token
    (not the two swapped), and policy/clip_frac* report that range, not the objective's own."""
    from lit_covrl.algorithms import ppo_stats
    from lit_covrl.algorithms.objectives import cispo_stats
    from lit_covrl.loss import loss_parts

    logp, old, adv, mask, ent = _between_ranges()
    archer = Archer(quantile=0.5, low_entropy_clip_low=0.05, low_entropy_clip_high=0.4,
                    high_entropy_clip_low=0.1, high_entropy_clip_high=0.6)
    learner = _selected(objective, [archer], logp, old, adv, mask, ent)
    lo, hi = archer.clip_bounds()
    b, agg = PolicyBatch(torch.arange(4), logp, old, adv, mask, ent), dict(mode="token-mean")
    loss, shapings, base = learner.loss(b, agg)
    want = aggregate(objective.token_loss(logp, old, adv, mask, clip=(lo, hi)), mask, "token-mean")
    swapped = aggregate(objective.token_loss(logp, old, adv, mask, clip=(hi, lo)), mask, "token-mean")
    assert float(want) != pytest.approx(float(swapped))  # the test can tell
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    parts = loss_parts(objective, learner.regularizers, b, loss, shapings, base, agg, mask.sum())
    stats_fn = cispo_stats if isinstance(objective, CISPO) else ppo_stats
    kw = dict(logratio_clamp=objective.logratio_clamp, num_tokens=mask.sum())
    stats = stats_fn(logp, old, adv, mask, clip_low=lo, clip_high=hi, **kw)
    own = stats_fn(logp, old, adv, mask, clip_low=objective.clip_low, clip_high=objective.clip_high, **kw)
    assert float(stats["clip_frac"]) != pytest.approx(float(own["clip_frac"]))  # the test can tell
    for k, v in stats.items():
        assert float(parts[f"policy/{k}"]) == pytest.approx(float(v), rel=1e-6), k


def test_ce_gppo_refuses_archer_from_the_tie_on():
    """CE-GPPO's kept gradient beta1 (1 - eps_low) must stay below dual_clip for Archer's eps_low as
    for its own clip_low: the tie 4 x (1 - 0.5) = 2 is refused, 4 x 0.45 = 1.8 accepted."""
    obj = CEGPPO(beta1=4.0, clip_low=0.6, dual_clip=2.0)  # its own range: 4 x 0.4 = 1.6 < 2
    with pytest.raises(ValueError, match=r"per-token clip_low 0\.5"):
        check_objective_stack(obj, [Archer(low_entropy_clip_low=0.5, high_entropy_clip_low=0.6)])
    check_objective_stack(obj, [Archer(low_entropy_clip_low=0.55, high_entropy_clip_low=0.6)])


def test_ce_gppo_checks_archer_s_high_entropy_range_too():
    """The high-entropy tokens' eps_low meets CE-GPPO's rule as well: beta1 3.5 with dual_clip 3
    accepts the objective's own and Archer's low-entropy 0.2 (3.5 x 0.8 = 2.8 < 3), and refuses a
    high-entropy clip_low 0 (3.5 x 1 = 3.5 >= 3), naming it."""
    obj = CEGPPO(beta1=3.5, dual_clip=3.0)
    check_objective_stack(obj, [Archer()])  # high-entropy 0.5: 3.5 x 0.5 = 1.75
    with pytest.raises(ValueError, match=r"CEGPPO\.beta1=3\.5 .*per-token clip_low 0\.0 and dual_clip=3\.0"):
        check_objective_stack(obj, [Archer(high_entropy_clip_low=0.0)])


def test_row_quantile_is_nanquantile_per_row():
    """The per-response quantile itself (not only the strict selection it feeds, which a lower
    order statistic also gives except near ties) is torch.nanquantile's, interpolated: the 0.8
    quantile of [1, 2, 3] is 2.6; a row without valid tokens gives NaN."""
    from lit_covrl.algorithms.entropy_controls import row_quantile

    assert row_quantile(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), 0.8).item() == pytest.approx(2.6)
    g = torch.Generator().manual_seed(0)
    h, mask = torch.rand(12, 9, generator=g), (torch.rand(12, 9, generator=g) < 0.7).float()
    mask[0] = 0
    for q in (0.0, 0.3, 0.8, 1.0):
        want = torch.nanquantile(torch.where(mask.bool(), h.double(), torch.nan), q, dim=-1)
        torch.testing.assert_close(row_quantile(h, mask, q), want, rtol=0, atol=1e-12, equal_nan=True)
