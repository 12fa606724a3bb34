"""Policy objectives (PPOClip, GSPO, CISPO, CE-GPPO): hand-worked values, naive oracles,
the module's default and conflicting settings, and every objective with Clip-Cov and KL-Cov."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import aggregate, ppo_clipped_tokens, ppo_stats, ppo_token_loss
from lit_covrl.objectives import ASPO, CEGPPO, CISPO, GSPO, PPOClip, resolve_objective
from lit_covrl.settings import LossSettings
from lit_covrl.regularizers import ClipCov, KLCov
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.types import PolicyBatch, TokenShaping

OBJECTIVES = {"ppo": PPOClip(), "gspo": GSPO(), "cispo": CISPO(), "ce_gppo": CEGPPO(), "aspo": ASPO(dual_clip=1.2)}


def _rand(n=6, t=5, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    logp = old + scale * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


def _grad(objective, logp, old, adv, mask, mode="token-mean"):
    z = logp.clone().requires_grad_(True)
    aggregate(objective.token_loss(z, old, adv, mask), mask, mode).backward()
    return z.grad


# ---------------------------------------------------------------- GSPO
def test_gspo_hand_worked():
    # row 0: log-ratios 0.2, -0.1 -> s = exp(0.05) = 1.0513 > 1 + 4e-4 with A = 1: clipped, loss
    #        -1.0004 on both tokens, zero gradient.
    # row 1: log-ratios 1e-4, -1e-4 -> s = exp(0) = 1: unclipped, loss -A s = 2 (A = -2), and
    #        d loss_t / d logp_t = -A s = 2 on each token.
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.tensor([[0.2, -0.1], [1e-4, -1e-4]], dtype=torch.float64, requires_grad=True)
    adv, mask = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    obj = GSPO()
    loss = obj.token_loss(logp, old, adv, mask)
    assert loss.detach().tolist() == [[pytest.approx(-1.0004)] * 2, [pytest.approx(2.0)] * 2]
    loss.sum().backward()
    assert logp.grad.tolist() == [[0.0, 0.0], [pytest.approx(2.0)] * 2]
    assert obj.clipped_tokens(logp, old, adv, mask).tolist() == [[True, True], [False, False]]
    st = obj.stats(logp, old, adv, mask)
    assert st["clip_frac"] == pytest.approx(0.5) and st["clip_frac_high"] == pytest.approx(0.5)
    assert st["clip_frac_low"] == 0


def _naive_gspo(logp, old, adv, mask, eps_low, eps_high):
    """GSPO by the paper's formula, sequence by sequence: -(1/G) sum_i min(s_i A_i, clip(s_i) A_i)."""
    total = 0.0
    for i in range(logp.shape[0]):
        valid = [t for t in range(logp.shape[1]) if mask[i, t]]
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in valid) / len(valid))
        total = total - torch.minimum(s * adv[i], s.clamp(1 - eps_low, 1 + eps_high) * adv[i])
    return total / logp.shape[0]


def test_gspo_equals_the_sequence_level_objective():
    logp, old, adv, mask = _rand(8, 6, seed=1, scale=0.1)
    obj = GSPO(clip_low=0.02, clip_high=0.03)  # wide enough that some sequences clip, some do not
    z = logp.clone().requires_grad_(True)
    naive = _naive_gspo(z, old, adv, mask, 0.02, 0.03)
    naive.backward()
    ours = aggregate(obj.token_loss(logp, old, adv, mask), mask, "seq-mean-token-mean")
    assert float(ours) == pytest.approx(float(naive.detach()), rel=1e-12)
    torch.testing.assert_close(_grad(obj, logp, old, adv, mask, "seq-mean-token-mean"), z.grad)
    clipped = obj.clipped_tokens(logp, old, adv, mask)
    assert 0 < clipped.any(-1).sum() < 8  # both cases present
    assert torch.equal(clipped.any(-1), clipped.sum(-1) == mask.sum(-1))  # whole sequences clip


# ---------------------------------------------------------------- CISPO
def test_cispo_hand_worked():
    # r = e^0.5 = 1.6487 > 1.28 -> w = 1.28, A = 2: value -2.56, gradient -2.56
    # r = e^-0.5 = 0.6065 (no lower bound) -> w = 0.6065, A = -1: value 0.6065, gradient 0.6065
    old = torch.zeros(2, 1, dtype=torch.float64)
    logp = torch.tensor([[0.5], [-0.5]], dtype=torch.float64, requires_grad=True)
    adv, mask = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
    obj = CISPO()
    loss = obj.token_loss(logp, old, adv, mask)
    assert loss.detach().flatten().tolist() == pytest.approx([-2.56, math.exp(-0.5)])
    loss.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-2.56, math.exp(-0.5)])
    assert not obj.clipped_tokens(logp, old, adv, mask).any()  # CISPO zeroes no token
    st = obj.stats(logp, old, adv, mask)
    assert st["clip_frac"] == pytest.approx(0.5) and st["clip_frac_high"] == pytest.approx(0.5)


def test_cispo_gradient_is_the_papers():
    logp, old, adv, mask = _rand(seed=2, scale=0.5)
    obj = CISPO(clip_low=0.5, clip_high=0.2)
    z = logp.clone().requires_grad_(True)
    w = torch.exp(logp - old).clamp(0.5, 1.2)
    aggregate(-(w * adv[:, None] * z), mask, "token-mean").backward()  # -sg(w) A log pi, as written
    torch.testing.assert_close(_grad(obj, logp, old, adv, mask), z.grad)


# ---------------------------------------------------------------- CE-GPPO
def test_ce_gppo_hand_worked():
    # eps 0.2 / 0.2, beta1 0.5, beta2 0.75, dual-clip 3; value = PPO's, gradient d loss / d logp:
    # inside:             r = e^0.1 = 1.1052, A = 1:  value -1.1052, gradient -1.1052 (PPO's)
    # below, A < 0:       r = e^-0.5 = 0.6065 < 0.8, A = -2: value -0.8 A = 1.6,
    #                     gradient -beta1 0.8 A = 0.8 (PPO: 0)
    # above, A > 0:       r = e^0.5 = 1.6487 > 1.2, A = 2: value -1.2 A = -2.4,
    #                     gradient -beta2 1.2 A = -1.8 (PPO: 0)
    # below, A > 0:       r = 0.6065, A = 2: unclipped, value = gradient = -A r = -1.2131
    # above, A < 0:       r = 1.6487, A = -1: unclipped, value = gradient = -A r = 1.6487
    # dual-clip, A < 0:   r = e^1.5 = 4.48 > 3, A = -1: value -A c = 3, gradient 0
    old = torch.zeros(1, 6, dtype=torch.float64)
    logp = torch.tensor([[0.1, -0.5, 0.5, -0.5, 0.5, 1.5]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 2.0, 2.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 6, dtype=torch.float64)
    obj = CEGPPO(clip_low=0.2, clip_high=0.2, beta1=0.5, beta2=0.75, dual_clip=3.0)
    loss = obj.token_loss(logp, old, adv, mask)
    e = math.exp
    assert loss.detach().flatten().tolist() == pytest.approx([-e(0.1), 1.6, -2.4, -2 * e(-0.5), e(0.5), 3.0])
    loss.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-e(0.1), 0.8, -1.8, -2 * e(-0.5), e(0.5), 0.0])
    assert obj.clipped_tokens(logp, old, adv, mask).tolist() == [[False] * 5 + [True]]  # the dual-capped one only
    st = obj.stats(logp, old, adv, mask)
    assert float(st["clip_frac_low"]) == pytest.approx(1 / 6) and float(st["clip_frac_high"]) == pytest.approx(1 / 6)
    assert float(st["clip_frac"]) == pytest.approx(2 / 6)
    # a side whose beta is 0 gives its clipped tokens no gradient, as PPO, and Clip-Cov skips them
    assert CEGPPO(beta1=0.0, beta2=0.75, dual_clip=3.0).clipped_tokens(logp, old, adv, mask).tolist() == [
        [False, True, False, False, False, True]]


def test_ce_gppo_keeps_the_gradient_of_tokens_clipped_beyond_a_clamp_inside_the_clip_range():
    """logratio_clamp 0.1 < the clip range (0.2): the clamped ratio never leaves [0.905, 1.105], so
    the tokens were told clipped by it never were: their kept gradient was 0 and they sat in
    clipped_tokens. Told by the unclamped ratio they keep it; the value stays PPOClip's (clamped).
    log-ratios -0.5 / 0.5 (clipped, A = -1 / 1): gradient 0.75 x 0.8 = 0.6 and -1 x 1.2 = -1.2;
    -0.15 / 0.15 (inside the range, beyond the clamp): no gradient, in clipped_tokens, as PPOClip."""
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.tensor([[-0.5, 0.5, 0.15, -0.15]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    kw = dict(clip_low=0.2, clip_high=0.2, logratio_clamp=0.1)
    obj = CEGPPO(beta1=0.75, beta2=1.0, **kw)
    loss = obj.token_loss(logp, old, adv, mask)
    e = math.exp
    assert loss.detach().flatten().tolist() == pytest.approx([e(-0.1), -e(0.1), -e(0.1), e(-0.1)])
    loss.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.6, -1.2, 0.0, 0.0])
    assert obj.clipped_tokens(logp.detach(), old, adv, mask).tolist() == [[False, False, True, True]]
    # PPOClip with that clamp gives none of them a gradient, and beta 0 is PPOClip
    ppo, zero = PPOClip(**kw), CEGPPO(beta1=0.0, beta2=0.0, **kw)
    assert _grad(ppo, logp.detach(), old, adv, mask).abs().sum() == 0
    assert torch.equal(_grad(zero, logp.detach(), old, adv, mask), _grad(ppo, logp.detach(), old, adv, mask))
    assert torch.equal(zero.clipped_tokens(logp.detach(), old, adv, mask), ppo.clipped_tokens(logp.detach(), old, adv, mask))


def _naive_ce_gppo(logp, old, adv, mask, eps_low, eps_high, beta1, beta2, dual_clip):
    """The paper's per-token objective, token by token: -beta1 (1 - eps_low) r / sg(r) A below the
    range with A < 0, -beta2 (1 + eps_high) r / sg(r) A above it with A > 0, -A r elsewhere;
    dual-clip: max(., ...) capped at -A c for A < 0; token-mean."""
    total, n = 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            r, a = torch.exp(logp[i, t] - old[i, t]), adv[i]
            if a < 0 and r < 1 - eps_low:
                term = -beta1 * (1 - eps_low) * r / r.detach() * a
            elif a > 0 and r > 1 + eps_high:
                term = -beta2 * (1 + eps_high) * r / r.detach() * a
            else:
                term = -a * r
            if a < 0:
                term = torch.minimum(term, -a * dual_clip)
            total, n = total + term, n + 1
    return total / n


def test_ce_gppo_gradient_is_the_papers():
    logp, old, adv, mask = _rand(10, 6, seed=5, scale=0.6)
    logp[0, 0] = old[0, 0] + 1.8  # r = 6 > c: a dual-capped token (the row's advantage is negative)
    assert adv[0] < 0
    obj = CEGPPO(clip_low=0.2, clip_high=0.28, beta1=0.5, beta2=1.3, dual_clip=4.0)
    z = logp.clone().requires_grad_(True)
    _naive_ce_gppo(z, old, adv, mask, 0.2, 0.28, 0.5, 1.3, 4.0).backward()
    torch.testing.assert_close(_grad(obj, logp, old, adv, mask), z.grad)
    r, a = torch.exp(logp - old), adv[:, None].expand_as(logp)
    m = mask.bool()
    for region in ((a < 0) & (r < 0.8), (a > 0) & (r > 1.28), (a > 0) & (r < 0.8), (a < 0) & (r > 1.28),
                   (r > 0.8) & (r < 1.28), (a < 0) & (r > 4.0)):
        assert (region & m).any()  # every case of the formula occurs


def test_ce_gppo_with_zero_betas_is_ppo_clip():
    logp, old, adv, mask = _rand(10, 6, seed=6, scale=0.6)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, logratio_clamp=0.5)  # the clamp acts too
    ce, ppo = CEGPPO(beta1=0.0, beta2=0.0, **kw), PPOClip(**kw)
    assert torch.equal(ce.token_loss(logp, old, adv, mask), ppo.token_loss(logp, old, adv, mask))
    assert torch.equal(_grad(ce, logp, old, adv, mask), _grad(ppo, logp, old, adv, mask))
    assert torch.equal(ce.clipped_tokens(logp, old, adv, mask), ppo.clipped_tokens(logp, old, adv, mask))
    assert ce.stats(logp, old, adv, mask) == ppo.stats(logp, old, adv, mask)
    # with betas the value stays PPO's; the gradient differs exactly on the tokens PPO clips
    ce = CEGPPO(beta1=0.5, beta2=1.0, **kw)
    assert torch.equal(ce.token_loss(logp, old, adv, mask), ppo.token_loss(logp, old, adv, mask))
    differs = _grad(ce, logp, old, adv, mask) != _grad(ppo, logp, old, adv, mask)
    outside = ppo_clipped_tokens(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)  # clip only
    assert outside.any() and torch.equal(differs, outside)


@pytest.mark.parametrize("kwargs,field", [
    (dict(beta1=-0.1), "CEGPPO.beta1"), (dict(beta2=float("nan")), "CEGPPO.beta2"),
    (dict(beta2=float("inf")), "CEGPPO.beta2"), (dict(beta1="0.5"), "CEGPPO.beta1"),
    (dict(dual_clip=1.0), "CEGPPO.dual_clip"), (dict(clip_low=-0.1), "CEGPPO.clip_low"),
    (dict(logratio_clamp=0.0), "CEGPPO.logratio_clamp"),
    (dict(beta1=2.0, dual_clip=1.5), "CEGPPO.beta1=2.0 with clip_low=0.2 and dual_clip=1.5"),  # the reference zeroes it
])
def test_ce_gppo_refuses_bad_settings_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        CEGPPO(**kwargs)


def test_ce_gppo_refuses_dual_clip_from_the_tie_on():
    """The refusal's boundary: beta1 (1 - clip_low) = dual_clip (4 x 0.5 = 2) is refused, as at the
    tie the reference's min() keeps half the gradient beta1 asks for; 3.5 x 0.5 = 1.75 < 2 trains."""
    with pytest.raises(ValueError, match=r"beta1 \* \(1 - clip_low\) >= dual_clip"):
        CEGPPO(beta1=4.0, clip_low=0.5, dual_clip=2.0)
    assert CEGPPO(beta1=3.5, clip_low=0.5, dual_clip=2.0).beta1 == 3.5


def test_ce_gppo_zero_advantage_token_beyond_the_clamp_stays_in_clipped_tokens():
    """A token with A = 0 has no gradient under CE-GPPO (its kept gradient is k A = 0); one whose
    log-ratio (-25) lies beyond the clamp (20) must stay in `clipped_tokens`, or Clip-Cov spends a
    pick on a token it cannot change."""
    logp = torch.tensor([[-25.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    adv = torch.zeros(1, 2, dtype=torch.float64)
    obj = CEGPPO()
    obj.token_loss(logp, old, adv, mask).sum().backward()
    assert logp.grad.tolist() == [[0.0, 0.0]]
    assert obj.clipped_tokens(logp.detach(), old, adv, mask).tolist() == [[True, False]]


# ---------------------------------------------------------------- PPOClip and the module setting
def test_ppo_clip_is_todays_loss():
    logp, old, adv, mask = _rand(seed=3)
    obj = PPOClip(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    kw = dict(clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(obj.token_loss(logp, old, adv, mask), ppo_token_loss(logp, old, adv, mask, dual_clip=3.0, **kw))
    assert torch.equal(obj.clipped_tokens(logp, old, adv, mask), ppo_clipped_tokens(logp, old, adv, mask, dual_clip=3.0, **kw))
    assert obj.stats(logp, old, adv, mask) == ppo_stats(logp, old, adv, mask, **kw)


def test_module_objective_default_and_conflicts():
    loss = LossSettings(clip_low=0.1, clip_high=0.28, dual_clip=3.0, logratio_clamp=10.0)
    default = resolve_objective(None, loss)
    assert isinstance(default, PPOClip) and (default.clip_low, default.clip_high, default.dual_clip) == (0.1, 0.28, 3.0)
    gspo = GSPO()
    assert resolve_objective(gspo, LossSettings()) is gspo
    with pytest.raises(ValueError, match=r"model.loss.clip_high=0.28.*model.objective.init_args"):
        resolve_objective(gspo, LossSettings(clip_high=0.28))
    with pytest.raises(ValueError, match="GSPO.clip_low"):
        GSPO(clip_low=-1.0)


def test_clip_key_refusal_says_per_key_where_it_goes(tmp_path, capsys):
    """configs/cpu/bapo.yaml (dual_clip 3) on configs/cpu/cispo.yaml is refused; CISPO has no
    dual_clip, so the message says to reset the key, not to move it to the objective (which
    fails: CISPO has no argument 'dual_clip'); CE-GPPO has one: the message points there."""
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/bapo.yaml", "--config", "configs/cpu/cispo.yaml")
    assert "model.loss.dual_clip=3.0" in err and "CISPO has no dual_clip: reset it with --model.loss.dual_clip null" in err, err
    assert "init_args.dual_clip" not in err, err
    with pytest.raises(ValueError, match=r"set model.objective.init_args.dual_clip instead and reset it with "
                                         r"--model.loss.dual_clip null\.$"):
        resolve_objective(CEGPPO(), LossSettings(dual_clip=10.0))
    with pytest.raises(ValueError, match=r"GSPO has no dual_clip: reset it with --model.loss.dual_clip null; set "
                                         r"model.objective.init_args.logratio_clamp instead and reset it with "
                                         r"--model.loss.logratio_clamp 20.0\.$"):
        resolve_objective(GSPO(), LossSettings(dual_clip=3.0, logratio_clamp=5.0))


# ---------------------------------------------------------------- with Clip-Cov and KL-Cov
def _ctx(obj, logp, old, adv, mask):
    a = adv[:, None].expand_as(logp)
    return MiniBatchContext(step=0, update=1, on_policy=False, logp=logp, old_logp=old, advantages=a, mask=mask,
                            clipped=obj.clipped_tokens(logp, old, a, mask))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_composes_with_clip_cov_and_kl_cov(name):
    """Clip-Cov draws only among tokens the objective does not already zero and drops their
    gradient; KL-Cov adds beta sign(logp - old) on its tokens; the rest keep the objective's
    own gradient, whatever the objective."""
    obj = OBJECTIVES[name] if name != "gspo" else GSPO(clip_low=0.05, clip_high=0.05)
    logp, old, adv, mask = _rand(10, 6, seed=4, scale=0.3)
    ctx = _ctx(obj, logp, old, adv, mask)
    if name not in ("cispo", "ce_gppo"):
        assert ctx.clipped.any()  # the objective zeroes some tokens: they must not be drawn
    clip, kl = ClipCov(ratio=0.2, lb=-1e9, ub=1e9, seed=0), KLCov(ratio=0.2, beta=0.5)
    clip.prepare(ctx)
    kl.prepare(ctx)
    assert clip.selected.any() and kl.selected.any()
    assert not (clip.selected & ctx.clipped).any()
    if name == "ce_gppo":  # no token lacks a gradient: Clip-Cov also draws tokens outside PPO's clip range
        ppo_clipped = ppo_clipped_tokens(logp, old, ctx.advantages, mask, clip_low=0.2, clip_high=0.2)
        assert not ctx.clipped.any() and (clip.selected & ppo_clipped).any()
    z = logp.clone().requires_grad_(True)
    a = ctx.advantages
    batch = PolicyBatch(torch.arange(len(z)), z, old, a, mask)
    shapings = [clip.shape(batch), kl.shape(batch)]
    base = obj.token_loss(z, old, a, mask)
    TokenShaping.combine(shapings, base).sum().backward()
    ref = logp.clone().requires_grad_(True)
    obj.token_loss(ref, old, a, mask).sum().backward()
    plain = ref.grad
    kl_term = 0.5 * torch.sign(logp - old) * kl.selected
    expect = torch.where(clip.selected, torch.zeros_like(plain), plain) + kl_term
    torch.testing.assert_close(z.grad, expect * mask)


def test_module_refuses_an_objective_with_non_default_clip_keys():
    """Bad input fails when GRPOModule is built (what the CLI does first), naming both fields."""
    from lit_covrl.module import GRPOModule

    assert isinstance(GRPOModule(objective=CISPO()).objective, CISPO)
    assert GRPOModule(loss=dict(clip_high=0.28)).objective.clip_high == 0.28  # the default PPOClip takes the module keys
    with pytest.raises(ValueError, match=r"model.objective=GSPO.*model.loss.clip_low=None, model.loss.clip_high=None"):
        GRPOModule(objective=GSPO(), loss=dict(clip_low=None, clip_high=None))  # e.g. gspo.yaml stacked with kl_cov.yaml


def test_gspo_clip_fractions_by_hand():
    """clip_frac_low counts sequences with s < 1 - eps_low and A < 0 only, clip_frac_high s > 1 +
    eps_high and A > 0 only (a low ratio with A > 0 is not clipped at all)."""
    from lit_covrl.algorithms import gspo_stats

    mask = torch.ones(4, 2)
    seq = torch.tensor([-0.1, -0.1, 0.1, 0.1])  # log s per sequence: s ~ 0.905, 0.905, 1.105, 1.105
    logp = seq[:, None].expand(4, 2).clone()
    old = torch.zeros(4, 2)
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    st = gspo_stats(logp, old, adv, mask, clip_low=0.05, clip_high=0.05)
    assert float(st["clip_frac_low"]) == pytest.approx(0.25)  # row 0 only (row 1 has A > 0)
    assert float(st["clip_frac_high"]) == pytest.approx(0.25)  # row 2 only (row 3 has A < 0)
    assert float(st["clip_frac"]) == pytest.approx(0.5)


@pytest.mark.parametrize("field", ["clip_low", "clip_high", "dual_clip", "logratio_clamp"])
def test_a_nan_clip_setting_is_refused_naming_the_field(field):
    """NaN passed every check (NaN < 0 and NaN > 1 are both false): ASPO then skipped every update
    as non-finite and a run with model.loss.clip_high .nan trained unclipped with a NaN loss."""
    from lit_covrl.objectives import ASPO, CEGPPO, PPOClip
    from lit_covrl.settings import LossSettings

    nan = float("nan")
    with pytest.raises(ValueError, match=rf"model\.loss\.{field}"):
        LossSettings(**{field: nan})
    for cls in (PPOClip, CEGPPO, ASPO):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}=nan"):
            cls(**{field: nan})
