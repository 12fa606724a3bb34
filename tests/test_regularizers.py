"""Regularizer callbacks: start-up validation, schedules, per-token shaping and its gradients,
composition, reproducible selection, and the KL-Cov single-update warning."""
from __future__ import annotations

import logging

import pytest
import torch

from lit_covrl.algorithms import aggregate, ppo_clipped_tokens, ppo_token_loss, token_entropy
from lit_covrl.regularizers import ClipCov, EntropyBonus, KLCov, ReferenceKL, Schedule
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer
from lit_covrl.types import PolicyBatch, TokenShaping


def _batch(n=6, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t)
    mask[0, 3:] = 0
    logits = torch.randn(n, t, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (n, t), generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1) * mask
    adv = torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t) * mask
    return logits, labels, old, adv, mask.double()


def _ctx(logp, old, adv, mask, step=0, update=1, on_policy=None):
    """A later update of a rollout by default (update 0 is the on-policy one, where KL-Cov is inert)."""
    clipped = ppo_clipped_tokens(logp.detach(), old, adv, mask, clip_low=0.2, clip_high=0.2)
    on_policy = update == 0 if on_policy is None else on_policy
    return MiniBatchContext(step, update, on_policy, logp.detach(), old, adv, mask, clipped)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: ClipCov(ratio=0.0), "ClipCov.ratio"),
        (lambda: ClipCov(ratio=1.5), "ClipCov.ratio"),
        (lambda: ClipCov(lb=5.0, ub=1.0), "lb < ub"),
        (lambda: KLCov(ratio=-0.1), "KLCov.ratio"),
        (lambda: KLCov(beta=-1.0), "KLCov.beta"),
        (lambda: KLCov(schedule_on="lr"), "schedule_on"),
        (lambda: EntropyBonus(coef=-1e-3), "EntropyBonus.coef"),
        (lambda: ReferenceKL(estimator="k4"), "estimator"),
        (lambda: ReferenceKL(beta=-1.0), "ReferenceKL.beta"),
        (lambda: EntropyBonus(schedule=Schedule(name="step")), "schedule.name"),
        (lambda: ClipCov(schedule={"name": "cosine", "final": -1.0, "steps": 10}), "final"),
    ],
)
def test_invalid_settings_are_rejected_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_coefficients_follow_their_schedule():
    reg = EntropyBonus(coef=0.01, schedule=Schedule(name="linear", final=0.0, steps=10))
    logits, labels, old, adv, mask = _batch()
    for step, expected in [(0, 0.01), (5, 0.005), (10, 0.0), (50, 0.0)]:
        reg.prepare(_ctx(old, old, adv, mask, step))
        assert reg.pop_metrics()["reg/entropy_bonus/coef"] == pytest.approx(expected)


def test_clip_cov_annealed_to_zero_selects_nothing():
    reg = ClipCov(ratio=0.5, lb=-1e9, ub=1e9, schedule=Schedule(name="cosine", final=0.0, steps=4))
    logits, labels, old, adv, mask = _batch()
    reg.prepare(_ctx(old, old, adv, mask, step=4))
    assert reg.selected.sum() == 0


def _grad_of(regs, logits, labels, old, adv, mask, needs_entropy=False, ref=None):
    """d(aggregated loss)/d(logits) for base PPO + the given regularizers."""
    z = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(-1, labels[..., None]).squeeze(-1)
    ent = token_entropy(z) if needs_entropy else None
    ctx = _ctx(logp, old, adv, mask)
    for r in regs:
        r.prepare(ctx)
    base = ppo_token_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    batch = PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask, ent, ref)
    loss = aggregate(TokenShaping.combine([r.shape(batch) for r in regs], base), mask, "token-mean")
    (g,) = torch.autograd.grad(loss, z)
    return g, regs


def test_clip_cov_zeroes_the_gradient_of_selected_tokens_only():
    logits, labels, old, adv, mask = _batch()
    old = old - 0.01 * mask  # current != old, ratio inside the clip range
    g_base, _ = _grad_of([], logits, labels, old, adv, mask)
    g, (reg,) = _grad_of([ClipCov(ratio=0.2, lb=-1e9, ub=1e9, seed=1)], logits, labels, old, adv, mask)
    sel = reg.selected
    assert sel.sum() == int(0.2 * mask.sum())  # floor(0.2 * 28) = 5 tokens
    assert torch.all(g[sel] == 0)
    torch.testing.assert_close(g[~sel], g_base[~sel])  # others untouched; denominators unchanged


def test_kl_cov_adds_beta_sign_gradient_on_selected_tokens():
    logits, labels, old, adv, mask = _batch()
    old = old + 0.1 * torch.randn_like(old) * mask
    g_base, _ = _grad_of([], logits, labels, old, adv, mask)
    beta = 0.7
    g, (reg,) = _grad_of([KLCov(ratio=0.1, beta=beta)], logits, labels, old, adv, mask)
    # penalty beta*|logp - old| on selected token i: d/dlogp = beta*sign(logp - old) / N_valid,
    # and dlogp/dz = onehot(label) - softmax(z)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    dlogp = beta * torch.sign(logp - old) * reg.selected / mask.sum()
    expected = g_base + dlogp[..., None] * (torch.nn.functional.one_hot(labels, 11) - logits.softmax(-1))
    torch.testing.assert_close(g, expected)
    assert reg.selected.sum() == int(0.1 * mask.sum())


def test_kl_cov_is_exactly_inert_on_the_first_update_of_a_rollout():
    """There old == current: a float-noise difference (sampler vs training forward) must not
    turn into a +-beta gradient through d|x|/dx = sign(noise)."""
    logits, labels, old, adv, mask = _batch()
    noisy_old = old + 1e-7 * torch.randn_like(old) * mask
    z = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(-1, labels[..., None]).squeeze(-1)
    reg = KLCov(ratio=0.2, beta=1.0)
    # "on policy" is a state, not an index: update 1 after a filtered or skipped update 0
    reg.prepare(_ctx(logp, noisy_old, adv, mask, update=1, on_policy=True))
    assert reg.selected.sum() == 0  # nothing applied, so nothing reported as selected
    assert reg.pop_metrics()["reg/kl_cov/selected_frac"] == 0.0
    shaping = reg.shape(PolicyBatch(torch.arange(len(mask)), logp, noisy_old, adv, mask))
    assert shaping.penalty is None and shaping.weight is None
    reg.prepare(_ctx(logp, noisy_old, adv, mask, update=1, on_policy=False))
    assert reg.selected.sum() > 0
    assert reg.shape(PolicyBatch(torch.arange(len(mask)), logp, noisy_old, adv, mask)).penalty is not None


def test_entropy_bonus_gradient_is_minus_coef_times_entropy_gradient():
    logits, labels, old, adv, mask = _batch()
    coef = 0.3
    g_base, _ = _grad_of([], logits, labels, old, adv, mask, needs_entropy=True)
    g, _ = _grad_of([EntropyBonus(coef=coef)], logits, labels, old, adv, mask, needs_entropy=True)
    z = logits.clone().requires_grad_(True)
    p = z.softmax(-1)
    naive_h = -(p * p.log()).sum(-1)
    (g_h,) = torch.autograd.grad((naive_h * mask).sum() / mask.sum(), z)
    torch.testing.assert_close(g - g_base, -coef * g_h)


def test_reference_kl_k2_gradient_is_beta_times_the_log_ratio_per_token():
    logits, labels, old, adv, mask = _batch()
    logp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    ref = logp.detach() - 0.3 * mask  # d = logp - ref = 0.3 on valid tokens
    g_base, _ = _grad_of([], logits, labels, old, adv, mask, ref=ref)
    g, _ = _grad_of([ReferenceKL(beta=0.5, estimator="k2")], logits, labels, old, adv, mask, ref=ref)
    dlogp = 0.5 * 0.3 * mask / mask.sum()  # d/dlogp 0.5 d^2 = d
    expected = g_base + dlogp[..., None] * (torch.nn.functional.one_hot(labels, 11) - logits.softmax(-1))
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_reference_kl_expected_gradient_pulls_toward_the_reference(estimator):
    """On-policy expectation of the penalty's gradient over a 6-action policy, exactly (sum over
    actions weighted by the detached pi): k2 gives the gradient of KL(pi || ref), k3 that of
    KL(ref || pi). k1 (zero expected gradient: no pull at all) is refused."""
    z = torch.tensor([0.9, -0.4, 0.2, 1.3, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.1, 0.3, -0.2, 0.0, 0.5, -0.7], dtype=torch.float64).log_softmax(-1)
    logp = z.log_softmax(-1)
    reg = ReferenceKL(beta=1.0, estimator=estimator)
    shaped = reg.shape(PolicyBatch(torch.tensor([0]), logp[None], logp[None].detach(), torch.zeros(1, 6),
                                   torch.ones(1, 6), None, ref[None]))  # "token" a = action a
    (got,) = torch.autograd.grad((logp.exp().detach() * shaped.penalty[0]).sum(), z, retain_graph=True)
    kl = (logp.exp() * (logp - ref)).sum() if estimator == "k2" else (ref.exp() * (ref - logp)).sum()
    (want,) = torch.autograd.grad(kl, z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="k1.*zero expected gradient.*'k2'.*'k3'"):
        ReferenceKL(estimator="k1")


def test_two_regularizers_act_as_the_sum_of_their_effects():
    logits, labels, old, adv, mask = _batch()
    old = old + 0.1 * torch.randn_like(old) * mask
    ref = old - 0.2 * mask
    g0, _ = _grad_of([], logits, labels, old, adv, mask, needs_entropy=True, ref=ref)
    g1, _ = _grad_of([EntropyBonus(coef=0.1)], logits, labels, old, adv, mask, needs_entropy=True, ref=ref)
    g2, _ = _grad_of([KLCov(ratio=0.2)], logits, labels, old, adv, mask, needs_entropy=True, ref=ref)
    g3, _ = _grad_of([ReferenceKL(beta=0.2, estimator="k3")], logits, labels, old, adv, mask, needs_entropy=True, ref=ref)
    g123, _ = _grad_of(
        [EntropyBonus(coef=0.1), KLCov(ratio=0.2), ReferenceKL(beta=0.2, estimator="k3")],
        logits, labels, old, adv, mask, needs_entropy=True, ref=ref,
    )
    torch.testing.assert_close(g123 - g0, (g1 - g0) + (g2 - g0) + (g3 - g0))


def test_clip_cov_selection_is_reproducible_and_checkpointed():
    logits, labels, old, adv, mask = _batch(n=20, t=10)
    ctx = _ctx(old, old, adv, mask)

    def draw(reg):
        reg.prepare(ctx)
        return reg.selected.clone()

    a, b = ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=4), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=4)
    assert torch.equal(draw(a), draw(b))
    state = a.state_dict()
    nxt = draw(a)
    assert not torch.equal(nxt, draw(ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=5)))
    c = ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=999)
    c.load_state_dict(state)
    assert torch.equal(draw(c), nxt)


@pytest.mark.parametrize("name", ["KLCov", "EntropyRatioClip"])
def test_on_policy_controls_warn_once_with_a_single_update(caplog, name):
    """KL-Cov (|logp - old_logp| = 0) and EntropyRatioClip (H / H_old = 1) do nothing when every
    update is on policy: each says so once at fit start, and not with several updates."""
    from lit_covrl import regularizers

    class FakeModule:
        updates_per_rollout = 1

    reg = getattr(regularizers, name)()
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        reg.on_fit_start(None, FakeModule())
        reg.on_fit_start(None, FakeModule())
    assert sum(f"{name} has no effect with a single on-policy update" in r.message for r in caplog.records) == 1
    FakeModule.updates_per_rollout = 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        getattr(regularizers, name)().on_fit_start(None, FakeModule())
    assert not caplog.records


def test_reference_kl_metric_is_a_token_mean_over_micro_batches():
    """reg/<name>/kl is the KL averaged over every valid token of the step, not a mean of
    micro-batch means (micro-batches with few valid tokens must not weigh as much)."""
    reg = ReferenceKL(beta=0.1, estimator="k2")
    logp = torch.zeros(3, 4)
    ref = -torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    for rows in (torch.tensor([0, 1]), torch.tensor([2])):  # two micro-batches: 8 tokens, 1 token
        z = torch.zeros(len(rows), 4)
        reg.shape(PolicyBatch(rows, logp[rows], z, z[:, 0], mask[rows], None, ref[rows]))
    kl = reg.pop_metrics()["reg/ref_kl/kl"]
    assert kl == pytest.approx((8 * 0.5 + 12.5) / 9)  # k2 = d^2 / 2, token mean; the mean of means would be 6.5
    assert "reg/ref_kl/kl" not in reg.pop_metrics()  # reset every step


def test_clip_cov_never_spends_its_ratio_on_tokens_another_control_zeroes(tiny_model_dir, tmp_path):
    """Stacked with HighEntropyTokens (80 % of the tokens get weight 0), Clip-Cov drew its ratio
    from every token, so most of its detached tokens had no gradient to detach (about 5x weaker than
    configured, and `selected_frac` overstated it). It is prepared after the weight controls whatever
    the callback order, and its candidates exclude their zeroed tokens."""
    from lit_covrl.regularizers import HighEntropyTokens
    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    class Spy(ClipCov):
        seen: list = []

        def prepare(self, ctx):
            super().prepare(ctx)
            Spy.seen.append((ctx.zeroed.clone(), het.zeroed_tokens().clone(), self.selected.clone(), ctx.mask.bool()))

    het = HighEntropyTokens(top_frac=0.2)
    cc = Spy(ratio=0.1, lb=-1e9, ub=1e9, seed=0)
    fit(make_module(tiny_model_dir, update=dict(mini_batch_size=2)), make_data(), steps=2, callbacks=[cc, het],
        log_dir=tmp_path)
    assert len(Spy.seen) == 4  # 2 steps x 2 mini-batches
    for zeroed, het_zeroed, selected, mask in Spy.seen:
        assert torch.equal(zeroed, het_zeroed)  # HighEntropyTokens ran first although listed second
        assert (het_zeroed & mask).sum() > 0.5 * mask.sum()  # it zeroes most tokens
        assert selected.any() and not (selected & zeroed).any()


def test_two_advantage_shifts_are_refused_at_start_up():
    """Each EntropyAdvantage keeps its shift below |A| / kappa, so alone it never flips A's sign;
    two add up (2 |A| / 1.5 > |A|) and turned negative advantages positive."""
    from lit_covrl.regularizers import EntropyAdvantage, HighEntropyTokens
    from lit_covrl.regularizers.base import check_stack

    check_stack([EntropyAdvantage(kappa=1.5), ClipCov(), HighEntropyTokens()])  # one is fine
    with pytest.raises(ValueError, match=r"2 regularizers shift the advantage .*'entropy_advantage' \(EntropyAdvantage\), 'ea2'"):
        check_stack([EntropyAdvantage(kappa=1.5), EntropyAdvantage(kappa=1.5, name="ea2")])
    with pytest.raises(ValueError, match="two regularizers are named"):
        check_stack([ClipCov(), ClipCov()])


def test_recorded_metrics_are_means_over_the_records_where_kept():
    """`record` keeps device tensors until the step's metrics are popped; `when` leaves a record
    out (a covariance selector's selected_adv_mean counts only mini-batches that selected tokens)."""
    from lit_covrl.regularizers import Regularizer

    reg = Regularizer(name="probe")
    reg.record("a", torch.tensor(1.0), when=torch.tensor(True))
    reg.record("a", torch.tensor(7.0), when=torch.tensor(False))
    reg.record("a", 3.0)
    reg.record("never", torch.tensor(5.0), when=torch.tensor(False))
    reg.record("x/y", torch.tensor(2.0))
    assert reg.pop_metrics() == {"reg/probe/a": 2.0, "x/y": 2.0}
    assert reg.pop_metrics() == {}  # popped: the next step starts empty


def test_step_sums_add_each_micro_batch_in_float64_and_start_again_after_pop():
    """StepSums (the step's metric numerators and denominators of LpReg, SimKO, EntropyAdvantage,
    ReferenceKL): two micro-batches' sums are added by name, in float64 (2^24 + 1 is lost in
    float32), without grad; pop gives them and starts the next step at zero."""
    from lit_covrl.regularizers.base import StepSums

    sums = StepSums("num", "tokens")
    x = torch.tensor(2.0, requires_grad=True)
    sums.add(num=torch.tensor(2.0**24), tokens=x * 3)  # micro-batch 1: 16777216 over 6 tokens
    sums.add(num=torch.tensor(1.0), tokens=torch.tensor(2.0))  # micro-batch 2: 1 over 2
    total = sums.pop()
    assert list(total) == ["num", "tokens"]
    assert all(v.dtype == torch.float64 and v.dim() == 0 and not v.requires_grad for v in total.values())
    assert (total["num"].item(), total["tokens"].item()) == (16777217.0, 8.0)
    assert {k: v.item() for k, v in sums.pop().items()} == {"num": 0.0, "tokens": 0.0}  # nothing added since
    sums.add(num=torch.tensor(5.0), tokens=torch.tensor(4.0))
    assert {k: v.item() for k, v in sums.pop().items()} == {"num": 5.0, "tokens": 4.0}  # not 16777222 / 12
    with pytest.raises(AssertionError, match="expected num, tokens"):
        sums.add(tokens=torch.tensor(1.0), num=torch.tensor(1.0))  # by name, in order


def test_selected_token_means_are_over_the_mini_batches_that_selected_some():
    """KL-Cov selects nothing on its on-policy first update and 4 tokens on the next: the step's
    selected_frac averages both, the selected tokens' advantage and log-prob means only the second."""
    g = torch.Generator().manual_seed(3)
    logp, adv = -torch.rand(4, 10, generator=g), torch.randn(4, 1, generator=g).expand(4, 10)
    old, mask = logp - 0.1 * torch.rand(4, 10, generator=g), torch.ones(4, 10)
    reg = KLCov(ratio=0.1)
    reg.prepare(_ctx(logp, old, adv, mask, update=0))  # on policy: inert
    reg.prepare(_ctx(logp, old, adv, mask, update=1))
    sel = reg.selected
    assert int(sel.sum()) == 4
    m = reg.pop_metrics()
    assert m["reg/kl_cov/selected_frac"] == pytest.approx(0.5 * 4 / 40)
    assert m["reg/kl_cov/selected_adv_mean"] == pytest.approx(float((sel * adv).sum() / 4))
    assert m["reg/kl_cov/selected_logp_mean"] == pytest.approx(float((sel * logp).sum() / 4))
    reg.prepare(_ctx(logp, old, adv, mask, update=0))
    popped = reg.pop_metrics()  # nothing selected this step: no means of the selected tokens
    assert "reg/kl_cov/selected_frac" in popped and not {k for k in popped if "selected_" in k and "frac" not in k}


def test_a_custom_regularizer_is_held_to_the_contract_at_once(tiny_model_dir):
    """What a user writing their own control gets wrong, said before or at its first use: a
    per-sequence [n] penalty (broadcast as token column j for sequence j when n == T: a wrong loss,
    rc 0), a look-alike callback that is no Regularizer (ignored: the run was plain GRPO), a
    subclass that skips super().__init__ (AttributeError: no attribute 'name')."""
    from lightning.pytorch import Callback

    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    class PerSequence(Regularizer):
        default_name = "per_sequence"

        def shape(self, batch):
            return TokenShaping(penalty=batch.logp.sum(-1) * 0.01)  # [n], not [n, T]

    module = make_module(tiny_model_dir, rollout=dict(group_size=4, max_new_tokens=4), update=dict(mini_batch_size=1))
    with pytest.raises(ValueError, match=r"'per_sequence' \(PerSequence.shape\) returned TokenShaping.penalty of shape \(4,\); every field is per token, \[n, T\] = \(4, 4\)"):
        fit(module, make_data(), steps=1, callbacks=[PerSequence()], limit_val_batches=0)

    class ForgetsToReturn(Regularizer):
        def shape(self, batch):
            TokenShaping(penalty=batch.logp * 0.0)

    with pytest.raises(ValueError, match=r"'regularizer' \(ForgetsToReturn.shape\) returned NoneType, not a TokenShaping"):
        fit(make_module(tiny_model_dir), make_data(), steps=1, callbacks=[ForgetsToReturn()], limit_val_batches=0)

    class LookAlike(Callback):
        def prepare(self, ctx):
            pass

        def shape(self, batch):
            return TokenShaping()

    with pytest.raises(ValueError, match="LookAlike has prepare\\(\\) and shape\\(\\) like a regularizer but does not subclass"):
        fit(make_module(tiny_model_dir), make_data(), steps=1, callbacks=[LookAlike()], limit_val_batches=0)

    class NoSuper(Regularizer):
        def __init__(self, coef: float = 0.1) -> None:
            self.coef = coef

    with pytest.raises(ValueError, match="NoSuper.__init__ does not call super\\(\\).__init__"):
        fit(make_module(tiny_model_dir), make_data(), steps=1, callbacks=[NoSuper()], limit_val_batches=0)

    class ForgetsTheFlag(Regularizer):  # reads batch.entropy without needs_entropy = True
        def shape(self, batch):
            return TokenShaping(penalty=-0.01 * batch.entropy)

    with pytest.raises(TypeError, match=r"'regularizer' \(ForgetsTheFlag.shape\): .*NoneType.*; batch.entropy is None "
                                        r"unless the class sets needs_entropy = True"):
        fit(make_module(tiny_model_dir), make_data(), steps=1, callbacks=[ForgetsTheFlag()], limit_val_batches=0)

    class CallsAMethod(Regularizer):  # the same read as a method call: an AttributeError
        def shape(self, batch):
            return TokenShaping(penalty=-0.01 * batch.entropy.clamp(min=0))

    with pytest.raises(AttributeError, match=r"\(CallsAMethod.shape\): .*; batch.entropy is None unless the class sets needs_entropy"):
        fit(make_module(tiny_model_dir), make_data(), steps=1, callbacks=[CallsAMethod()], limit_val_batches=0)

    class ReadsCurrentEntropy(Regularizer):  # ctx.entropy in prepare without needs_current_entropy
        def prepare(self, ctx):
            self.level = ctx.entropy.mean()

        def shape(self, batch):
            return TokenShaping()

    with pytest.raises(AttributeError, match=r"\(ReadsCurrentEntropy.prepare\): .*; ctx.entropy is None unless the class "
                                             r"sets needs_current_entropy = True"):
        fit(make_module(tiny_model_dir), make_data(), steps=1, callbacks=[ReadsCurrentEntropy()], limit_val_batches=0)


def test_weighted_reinforce_weighs_the_positive_responses_gradient_by_lambda():
    """W-REINFORCE: the gradient is lambda x (the objective's gradient from the A > 0 responses)
    + (that from the A < 0 ones); each part checked against the base objective with the other
    sign's advantages set to 0 (a token with A = 0 has no PPO gradient), denominators unchanged."""
    from lit_covrl.regularizers import WeightedReinforce

    logits, labels, old, adv, mask = _batch()
    old = old - 0.05 * mask
    assert (adv[:, 0] > 0).any() and (adv[:, 0] < 0).any()
    g_pos, _ = _grad_of([], logits, labels, old, adv.clamp(min=0), mask)
    g_neg, _ = _grad_of([], logits, labels, old, adv.clamp(max=0), mask)
    g, (reg,) = _grad_of([WeightedReinforce(positive_weight=0.1)], logits, labels, old, adv, mask)
    torch.testing.assert_close(g, 0.1 * g_pos + g_neg)
    g_nsr, _ = _grad_of([WeightedReinforce(positive_weight=0.0)], logits, labels, old, adv, mask)
    torch.testing.assert_close(g_nsr, g_neg)
    g_psr, _ = _grad_of([WeightedReinforce(positive_weight=1.0, negative_weight=0.0)], logits, labels, old, adv, mask)
    torch.testing.assert_close(g_psr, g_pos)
    positive_tokens = ((adv > 0) & (mask > 0)).sum() / mask.sum()
    assert reg.pop_metrics()["reg/w_reinforce/positive_frac"] == pytest.approx(float(positive_tokens))
    assert torch.equal(reg.zeroed_tokens(), mask == 0)  # nothing zeroed but padding at lambda 0.1


def test_weighted_reinforce_positive_frac_counts_only_positive_tokens():
    """reg/w_reinforce/positive_frac is the share of tokens with A > 0: the A = 0 rows of constant
    groups (common without filter_groups) are not positive. Rows +0.5 / 0 / -0.5 of 2 tokens: 2/6."""
    from lit_covrl.regularizers import WeightedReinforce

    adv = torch.tensor([[0.5, 0.5], [0.0, 0.0], [-0.5, -0.5]], dtype=torch.float64)
    mask, z = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    reg = WeightedReinforce()
    reg.prepare(MiniBatchContext(0, 0, True, z, z, adv, mask, torch.zeros(3, 2, dtype=torch.bool)))
    assert reg.pop_metrics()["reg/w_reinforce/positive_frac"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("kw,match", [
    (dict(positive_weight=-0.1), "positive_weight=-0.1: must be a finite number >= 0"),
    (dict(negative_weight=float("nan")), "negative_weight=nan"),
    (dict(positive_weight=0.0, negative_weight=0.0), "both 0"),
])
def test_weighted_reinforce_settings_are_checked(kw, match):
    from lit_covrl.regularizers import WeightedReinforce

    with pytest.raises(ValueError, match=match):
        WeightedReinforce(**kw)


def test_check_number_takes_finite_ints_and_floats_in_range_and_names_the_setting():
    """The regularizers' constructors check their numbers with one helper: bool, str, None, inf and
    nan are refused as well as out-of-range values, an open end excludes its bound, and the message
    states the range (or the caller's wording)."""
    import math

    from lit_covrl.regularizers.checks import check_number

    assert check_number("X.a", 0) == 0.0 and isinstance(check_number("X.a", 3), float)
    assert check_number("X.a", 1, high=1.0) == 1.0 and check_number("X.a", 0.5, high=1.0, low_open=True) == 0.5
    for bad in (True, "0.5", None, math.inf, math.nan, -1e-9):
        with pytest.raises(ValueError, match=r"^X\.a=.* is invalid: must be a finite number >= 0$"):
            check_number("X.a", bad)
    with pytest.raises(ValueError, match=r"^X\.a=0 is invalid: must be a finite number in \(0, 1\]$"):
        check_number("X.a", 0, high=1.0, low_open=True)
    with pytest.raises(ValueError, match=r"^X\.a=1 is invalid: must be a finite number in \[0, 1\)$"):
        check_number("X.a", 1, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"^X\.a=1 is invalid: must be a finite number > 1$"):
        check_number("X.a", 1, low=1.0, low_open=True)
    with pytest.raises(ValueError, match=r"^X\.a=0\.5 is invalid: must be a finite number in \[1, 2\]$"):
        check_number("X.a", 0.5, low=1.0, high=2.0)
    with pytest.raises(ValueError, match=r"^X\.a=2 is invalid: must be a probability$"):
        check_number("X.a", 2, high=1.0, must="a probability")


@pytest.mark.parametrize("cls, kw, message", [
    ("LpReg", {"beta": -1}, "LpReg.beta=-1 is invalid: must be a finite number >= 0"),
    ("LpReg", {"min_p": 0}, "LpReg.min_p=0 is invalid: must be a finite number in (0, 1]"),
    ("LpReg", {"neg_ratio": True}, "LpReg.neg_ratio=True is invalid: must be a finite number in [0, 1]"),
    ("SIREN", {"coef": float("inf")}, "SIREN.coef=inf is invalid: must be a finite number >= 0"),
    ("SIREN", {"top_p": 0.0}, "SIREN.top_p=0.0 is invalid: must be a probability in (0, 1]"),
    ("SIREN", {"quantile": 1}, "SIREN.quantile=1 is invalid: must be in [0, 1) (1 selects no token)"),
    ("SIREN", {"anchor": -0.5}, "SIREN.anchor=-0.5 is invalid: must be an entropy >= 0 (nats) or null (measured)"),
    ("BAPO", {"low_max": 1.5}, "BAPO.low_max=1.5 is invalid: must be a finite number in [0, 1]"),
    ("BAPO", {"high_start": 0.9}, "BAPO.high_start=0.9 is invalid: must be a finite number >= 1"),
    ("BAPO", {"eps": "1e-8"}, "BAPO.eps='1e-8' is invalid: must be a finite number >= 0"),
    ("Archer", {"quantile": float("nan")}, "Archer.quantile=nan is invalid: must be in [0, 1]"),
    ("Archer", {"high_entropy_clip_low": 1.5}, "Archer.high_entropy_clip_low=1.5 is invalid: must be a finite number "
                                               ">= 0 and <= 1 (the ratio is clipped at 1 - clip_low >= 0)"),
    ("Archer", {"low_entropy_clip_high": float("inf")},
     "Archer.low_entropy_clip_high=inf is invalid: must be a finite number >= 0"),
    ("Archer", {"high_entropy_kl_scale": -1}, "Archer.high_entropy_kl_scale=-1 is invalid: must be a finite number >= 0"),
    ("SimKO", {"tau": 1.5}, "SimKO.tau=1.5 is invalid: must be a finite number >= 0 and <= 1"),
    ("SimKO", {"incorrect_top1_scale": None}, "SimKO.incorrect_top1_scale=None is invalid: must be a finite number >= 0"),
    ("ERA", {"low": -0.1}, "ERA.low=-0.1 is invalid: must be an entropy >= 0 (nats)"),
    ("ERA", {"high": 0.2}, "ERA.high=0.2 is invalid: must be >= ERA.low (0.45)"),
    ("ERA", {"k": 0.5}, "ERA.k=0.5 is invalid: must be a finite number >= 1 (1: no activation)"),
    ("ERA", {"top_frac": 0}, "ERA.top_frac=0 is invalid: must be in (0, 1]"),
    ("ERA", {"scale_advantages": "yes"}, "ERA.scale_advantages='yes' is invalid: must be true or false"),
    ("DCPOClip", {"eps_low": -0.2}, "DCPOClip.eps_low=-0.2 is invalid: must be a finite number >= 0"),
    ("DCPOClip", {"max_ratio": 1}, "DCPOClip.max_ratio=1 is invalid: must be a finite number > 1"),
])
def test_regularizer_settings_are_refused_with_their_own_messages(cls, kw, message):
    import lit_covrl.regularizers as regs

    with pytest.raises(ValueError) as err:
        getattr(regs, cls)(**kw)
    assert str(err.value) == message


def test_a_clip_range_regularizer_gives_its_prepared_rows_as_the_tokens_clip_range():
    """Archer and BAPO share ClipRangeRegularizer: `prepare` fills `_bounds` [n, T]; `clip_bounds`
    returns them and `shape` the micro-batch's rows in the log-probs' dtype (refused before prepare)."""
    from lit_covrl.regularizers import BAPO, Archer, DCPOClip
    from lit_covrl.regularizers.base import ClipRangeRegularizer

    class Fixed(ClipRangeRegularizer):
        def prepare(self, ctx):
            self._bounds = (torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]),
                            torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))

    reg = Fixed()
    assert reg.sets_clip_range and reg.clip_bounds() is None and issubclass(Archer, ClipRangeRegularizer)
    assert issubclass(BAPO, ClipRangeRegularizer) and issubclass(DCPOClip, ClipRangeRegularizer)
    logp = torch.zeros(2, 2, dtype=torch.float64)
    batch = PolicyBatch(torch.tensor([2, 0]), logp, logp, logp, torch.ones(2, 2))
    with pytest.raises(AssertionError, match="prepare"):
        reg.shape(batch)
    reg.prepare(None)
    assert reg.clip_bounds()[1][2, 1] == 6.0
    s = reg.shape(batch)
    assert s.clip_low.dtype == torch.float64
    assert torch.allclose(s.clip_low, torch.tensor([[0.5, 0.6], [0.1, 0.2]], dtype=torch.float64))
    assert s.clip_high.tolist() == [[5.0, 6.0], [1.0, 2.0]]
