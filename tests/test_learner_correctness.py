"""Regression tests for the learner's correctness fixes (each failed before its fix):
every update through the precision plugin, "on policy" as a state, Clip-Cov candidates that
follow the objective's real clipping, and per-regularizer metric namespaces."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_covrl.algorithms import ppo_clipped_tokens, ppo_token_loss
from lit_covrl.regularizers import ClipCov, KLCov
from tests.test_module import make_data, make_module
from tests.helpers import fit


class HookCounter(L.Callback):
    """Counts on_before_optimizer_step calls and records the (unscaled) gradient norm there."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0)


def _one_step(model_dir, plugins, grad_clip):
    torch.manual_seed(0)
    module = make_module(
        model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=1e-2),
        update=dict(mini_batch_size=1, grad_clip=grad_clip),
    )
    counter = HookCounter()
    trainer = fit(module, make_data(val_size=0), steps=1, callbacks=[counter], plugins=plugins,
                  limit_val_batches=0)
    return module, trainer, counter


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_every_update_goes_through_the_precision_plugin(tiny_model_dir, grad_clip):
    """Under 16-mixed (CPU stand-in: Lightning's MixedPrecision with a CPU GradScaler) only the
    last of a rollout's 4 updates used to pass through the plugin: the others were clipped and
    stepped on gradients still scaled by 65536 (grad norms [692257.9, 0.0, 167672.2, 530722.9]
    instead of [10.6, 0.0, 2.6, 8.1]). Now each update is unscaled, then clipped, then stepped;
    hooks fire once per update and global_step still counts RL steps."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    ref, ref_trainer, ref_counter = _one_step(tiny_model_dir, [], grad_clip)
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    mod, trainer, counter = _one_step(tiny_model_dir, [amp], grad_clip)
    assert ref.updates_per_rollout == 4
    assert len(counter.norms) == len(ref_counter.norms) == 4  # one hook call per update
    assert trainer.global_step == ref_trainer.global_step == 1  # RL steps, not updates
    assert max(ref_counter.norms) > 1.0  # the clip (1.0) is active in the clipped case
    # fp16 autocast rounds the forward: per-update norms agree to ~1 %, not to 65536x
    for a, b in zip(counter.norms, ref_counter.norms):
        assert a == pytest.approx(b, rel=3e-2, abs=1e-6)
    logged = float(trainer.callback_metrics["policy/grad_norm"])
    assert logged == pytest.approx(float(ref_trainer.callback_metrics["policy/grad_norm"]), rel=3e-2)
    # the weights moved by the same (clipped) amount
    for (k, a), b in zip(mod.policy.state_dict().items(), ref.policy.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-4, msg=k)


G, B = 4, 2


class FirstGroupConstant:
    """0 for every answer of the first group (zero variance: filtered), 0,1,0,1 for the second."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, completion: str, answer: str) -> float:
        i = self.calls % (G * B)
        self.calls += 1
        return 0.0 if i < G else float(i % 2)


class KLCovProbe(KLCov):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen: list[tuple[int, bool, bool, bool]] = []  # (update, on_policy, logp is rollout's, penalty)

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        self._ctx = ctx

    def shape(self, batch):
        out = super().shape(batch)
        ctx = self._ctx
        self.seen.append((ctx.update, ctx.on_policy, bool(torch.equal(ctx.logp, ctx.old_logp)), out.penalty is not None))
        return out


def test_kl_cov_stays_inert_after_a_filtered_first_mini_batch(tiny_model_dir):
    """Mini-batch 0 (the zero-variance group) is filtered, so update 1 still trains the rollout
    policy: KL-Cov must apply nothing there (it used to apply beta * sign(float noise) because it
    keyed on the update index), and the covariance uses the rollout log-probs (no extra forward)."""
    probe = KLCovProbe(ratio=0.2, beta=1.0)
    module = make_module(
        tiny_model_dir, reward=FirstGroupConstant(), reward_timeout_s=None,
        rollout=dict(group_size=G, filter_groups=True), update=dict(mini_batch_size=1, ppo_epochs=2),
    )
    trainer = fit(module, make_data(batch_size=B, val_size=0), steps=1, callbacks=[probe], limit_val_batches=0)
    # schedule: [mb0 (filtered), mb1, mb0 (filtered), mb1]: the shape() calls come from mb1 only
    assert [s[0] for s in probe.seen] == [1, 3]
    update1, update3 = probe.seen
    assert update1 == (1, True, True, False)  # on policy: no penalty, rollout log-probs
    assert update3[1] is False and update3[3] is True  # after update 1's step: active
    # the reported selection is what was applied: nothing on update 1, ratio*N on update 3
    assert 0 < float(trainer.callback_metrics["reg/kl_cov/selected_frac"]) < 0.2


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_kl_cov_stays_inert_after_a_first_update_that_moves_no_weight(tiny_model_dir, weight_decay):
    """Mini-batch 0 (the zero-variance group, not filtered) has a zero gradient: on a fresh AdamW
    without weight decay (every shipped config's) its step leaves every weight bitwise equal, so
    update 1 still trains the rollout policy and KL-Cov must apply nothing there (it applied beta x
    sign(float noise): a review saw two micro-batch layouts part by 25 % of the weight change). With
    weight decay the zero-gradient step does move the weights: KL-Cov acts on update 1."""
    probe = KLCovProbe(ratio=0.2, beta=1.0)
    module = make_module(
        tiny_model_dir, reward=FirstGroupConstant(), reward_timeout_s=None,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=weight_decay),
        rollout=dict(group_size=G, filter_groups=False), update=dict(mini_batch_size=1, ppo_epochs=1),
    )
    weights = []  # before the first update, and when update 1 runs its backward

    class Weights(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            weights.append({k: v.clone() for k, v in pl_module.policy.state_dict().items()})

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            if len(probe.seen) == 2 and len(weights) == 1:
                weights.append({k: v.clone() for k, v in pl_module.policy.state_dict().items()})

    fit(module, make_data(batch_size=B, val_size=0), steps=1, callbacks=[probe, Weights()], limit_val_batches=0)
    assert [s[0] for s in probe.seen] == [0, 1] and len(weights) == 2
    assert probe.seen[0] == (0, True, True, False)  # the rollout's own policy: inert
    moved = any(not torch.equal(weights[0][k], v) for k, v in weights[1].items())
    assert moved is (weight_decay > 0)
    if moved:
        assert probe.seen[1][1] is False and probe.seen[1][3] is True  # off policy: the penalty applies
    else:
        assert probe.seen[1] == (1, True, True, False)


def test_only_a_fresh_adam_adamw_or_sgd_zero_step_counts_as_moving_nothing():
    """The rule is exact for the optimizers it names; any other counts as moving (ASGD shrinks weights
    on a zero gradient; a wrapper may keep state out of `optimizer.state`): the safe side."""
    from lit_covrl.drivers import zero_step_moves_nothing

    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    for opt_cls, kw, expected in [(torch.optim.AdamW, dict(weight_decay=0.0), True), (torch.optim.Adam, {}, True),
                                  (torch.optim.SGD, dict(lr=0.1, momentum=0.9), True),
                                  (torch.optim.AdamW, {}, False),  # weight decay 0.01 by default: decays
                                  (torch.optim.ASGD, {}, False), (torch.optim.Adagrad, {}, False)]:
        w = torch.nn.Parameter(torch.ones(3))
        opt = opt_cls([w], **kw)
        assert zero_step_moves_nothing(opt, zero) is expected, opt_cls
        assert zero_step_moves_nothing(opt, one) is False
        if expected:  # exact: a zero-gradient step leaves the weight bitwise equal; then state exists
            w.grad = torch.zeros(3)
            before = w.detach().clone()
            opt.step()
            assert torch.equal(w.detach(), before)
            w.grad = torch.ones(3)
            opt.step()
            assert zero_step_moves_nothing(opt, zero) is False  # it has state now: momentum moves the weights
    w = torch.nn.Parameter(torch.ones(3))
    asgd = torch.optim.ASGD([w], lr=0.1)
    w.grad = torch.zeros(3)
    asgd.step()
    assert not torch.equal(w.detach(), torch.ones(3))  # why ASGD is not on the list


class LastGroupConstant(FirstGroupConstant):
    """0,1,0,1 for the first group, 0 for every answer of the second (filtered)."""

    def __call__(self, completion: str, answer: str) -> float:
        i = self.calls % (G * B)
        self.calls += 1
        return float(i % 2) if i < G else 0.0


class GradNorms(L.Callback):
    def __init__(self) -> None:
        self.norms: list[float | None] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else None)


def _fp16_stand_in():
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_a_filtered_last_mini_batch_is_counted_but_not_stepped(tiny_model_dir, precision):
    """Mini-batch 1 (the zero-variance group) is filtered. The RL step used to close with an
    optimizer step that had no gradient: its norm (0) was averaged into policy/grad_norm, halving
    it, and under 16-mixed the gradient scaler refused the step (AssertionError: No inf checks
    were recorded). Now only mini-batch 0 steps, and global_step still counts the RL step."""
    norms = GradNorms()
    module = make_module(
        tiny_model_dir, reward=LastGroupConstant(), reward_timeout_s=None,
        rollout=dict(group_size=G, filter_groups=True), update=dict(mini_batch_size=1, grad_clip=None),
    )
    plugins = [_fp16_stand_in()] if precision == "16-mixed" else []
    trainer = fit(module, make_data(batch_size=B, val_size=0), steps=2, callbacks=[norms], limit_val_batches=0,
                  plugins=plugins)
    assert trainer.global_step == 2
    assert len(norms.norms) == 2 and all(n > 0 for n in norms.norms)  # mb0 of each RL step only
    assert float(trainer.callback_metrics["policy/grad_norm"]) == pytest.approx(norms.norms[-1], rel=1e-5)
    assert float(trainer.callback_metrics["policy/lr"]) > 0


class Constant:
    def __call__(self, completion: str, answer: str) -> float:
        return 1.0


def test_a_step_with_every_group_filtered_changes_nothing_but_counts(tiny_model_dir):
    """Every group has one reward: nothing to train on. Under 16-mixed the closing step had no
    gradient and the scaler refused it; now no optimizer step runs, the weights stay, and the RL
    steps are counted (and the lr schedule stepped)."""
    module = make_module(tiny_model_dir, reward=Constant(), reward_timeout_s=None,
                         rollout=dict(group_size=G, filter_groups=True), update=dict(mini_batch_size=1))
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    norms = GradNorms()
    trainer = fit(module, make_data(batch_size=B, val_size=0), steps=2, callbacks=[norms], limit_val_batches=0,
                  plugins=[_fp16_stand_in()])
    assert trainer.global_step == 2 and norms.norms == []
    assert all(torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    assert float(trainer.callback_metrics["policy/grad_norm"]) == 0.0
    assert float(trainer.callback_metrics["policy/kept_frac"]) == 0.0


def test_clip_cov_candidates_exclude_exactly_the_tokens_the_objective_gives_no_gradient():
    """ctx.clipped = tokens with zero PPO gradient under the run's settings, dual-clip and the
    log-ratio clamp included (Clip-Cov used to ignore both). Oracle: per-token autograd."""
    g = torch.Generator().manual_seed(0)
    n, t = 64, 6
    old = -torch.rand(n, t, generator=g) * 3
    logp = (old + torch.randn(n, t, generator=g) * 1.5).requires_grad_(True)
    logp.data[0, 0] = old[0, 0] + 30.0  # beyond the clamp
    adv = torch.randn(n, generator=g)
    mask = (torch.rand(n, t, generator=g) > 0.1).float()
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, logratio_clamp=20.0)
    (grad,) = torch.autograd.grad(ppo_token_loss(logp, old, adv, mask, **kw).sum(), logp)
    zero_grad = (grad == 0) & mask.bool()
    clipped = ppo_clipped_tokens(logp, old, adv, mask, **kw)
    assert torch.equal(clipped, zero_grad)
    dual_only = clipped & ~ppo_clipped_tokens(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, logratio_clamp=None)
    assert dual_only.sum() > 0  # dual-clip and clamp tokens exist here and are now excluded
    # hand case: r = 5, A = -1, c = 3: L1 = 5, L2 = 1.2, max = 5, dual-capped to 3 (constant)
    one = torch.tensor([[0.0]])
    five = torch.tensor([[5.0]]).log()
    assert ppo_clipped_tokens(five, one, torch.tensor([-1.0]), one + 1, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    assert not ppo_clipped_tokens(five, one, torch.tensor([-1.0]), one + 1, clip_low=0.2, clip_high=0.2)


def test_stacked_covariance_regularizers_keep_their_own_metrics(tiny_model_dir, tmp_path):
    """Clip-Cov and KL-Cov both wrote cov/selected_* and the last one won."""
    from tests.helpers import scalar_tags

    module = make_module(tiny_model_dir, update=dict(mini_batch_size=2))
    regs = [ClipCov(ratio=0.3, lb=-1e9, ub=1e9), KLCov(ratio=0.1)]
    fit(module, make_data(val_size=0), steps=2, callbacks=regs, log_dir=tmp_path, limit_val_batches=0)
    tags = scalar_tags(tmp_path)
    assert not [t for t in tags if t.startswith("cov/selected")]
    for name in ("clip_cov", "kl_cov"):
        for key in ("selected_frac", "selected_adv_mean", "selected_logp_mean"):
            assert len(tags.get(f"reg/{name}/{key}", [])) == 2, (name, key)
    clip = [v for _, v in tags["reg/clip_cov/selected_frac"]]
    kl = [v for _, v in tags["reg/kl_cov/selected_frac"]]
    assert clip != kl


class FirstUpdateGap(KLCov):
    """Records max |logp - old_logp| seen by the training forward while on policy."""

    needs_current_logp = False

    def __init__(self) -> None:
        super().__init__(ratio=0.1)
        self.gaps: list[float] = []

    def prepare(self, ctx) -> None:
        self._on = ctx.on_policy

    def shape(self, batch):
        if self._on:
            m = batch.mask.bool()
            self.gaps.append(float((batch.logp.detach() - batch.old_logp)[m].abs().max()))
        from lit_covrl.types import TokenShaping

        return TokenShaping()


class LengthParity:
    """Reward: the parity of the completion's length, and 0 for the prompts whose answer ends in 9
    (139 in the first RL step's second mini-batch, 69 in the second's first): their groups are
    constant, so filtered out."""

    def __call__(self, completion: str, answer: str) -> float:
        return 0.0 if answer.endswith("9") else float(len(completion) % 2)


# the update's layout: one mini-batch of 16 rows in 2 micro-batches of 8 (the CPU default), or
# the GPU default skip_padding (rows sorted by length, micro-batches trimmed) with 2 mini-batches
# of 2 prompts, micro-batches of 3 and constant groups filtered out: the update then cuts its
# micro-batches from each mini-batch's kept rows, unlike a forward over the whole rollout
LAYOUTS = {
    "one mini-batch": dict(update=dict(micro_batch_size=8), rollout=dict(max_new_tokens=6)),
    "skip_padding, 2 mini-batches, filtered groups": dict(
        update=dict(micro_batch_size=3, mini_batch_size=2), system=dict(skip_padding=True),
        rollout=dict(filter_groups=True, max_new_tokens=8), reward=LengthParity()),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("recompute", [False, True])
def test_recomputed_old_logprobs_make_the_first_ratio_exactly_one(tiny_model_dir, recompute, layout):
    """The sampler's recorded log-probs differ from the training forward's by float rounding;
    `recompute_logprobs` replaces them with a no-grad training forward (verl's way), run with the
    micro-batch plan of the first update (same rows, order, cuts and trims), so that its ratio is
    exactly 1 under every layout."""
    torch.manual_seed(0)
    probe, kept = FirstUpdateGap(), KeptFrac()
    kw = LAYOUTS[layout]
    module = make_module(
        tiny_model_dir, rollout=kw["rollout"],
        update=dict(recompute_logprobs=recompute, **kw["update"]), system=kw.get("system", {}),
        **({"reward": kw["reward"]} if "reward" in kw else {}),
    )
    fit(module, make_data(val_size=0), steps=2, callbacks=[probe, kept], limit_val_batches=0)
    if layout == "one mini-batch":
        assert len(probe.gaps) == 2 * 2  # 2 steps x 2 micro-batches of 8 rows, all on the first update
    else:  # one group of 4 filtered in each step: the first update has 8 rows (3 micro-batches), then 4 (2)
        assert kept.values == [0.75, 0.75]
        assert len(probe.gaps) == 3 + 2
    if recompute:
        assert max(probe.gaps) == 0.0
    else:
        assert 0.0 < max(probe.gaps) < 1e-4  # rounding only


@pytest.mark.parametrize("precision,setting,on", [
    ("32-true", None, False), ("bf16-mixed", None, True), ("bf16-mixed", False, False), ("32-true", True, True),
])
def test_recompute_is_on_by_default_where_the_policy_computes_in_bfloat16(tiny_model_dir, precision, setting, on):
    """recompute_logprobs null (the default) recomputes under bf16 (where the sampler's log-probs
    are off by whole bf16 steps now and then: the first ratio was up to 5 % from 1) and not in
    float32; an explicit setting wins."""
    probe = FirstUpdateGap()
    module = make_module(tiny_model_dir, update=dict(recompute_logprobs=setting, micro_batch_size=8),
                         rollout=dict(max_new_tokens=6))
    seen = []
    module.configure_model()
    real = module.learner.recompute_old_logprobs
    module.learner.recompute_old_logprobs = lambda *a: seen.append(1) or real(*a)
    fit(module, make_data(val_size=0), steps=2, callbacks=[probe], limit_val_batches=0, precision=precision)
    assert module.recompute_logprobs_on is on and len(seen) == (2 if on else 0)
    if on:
        assert max(probe.gaps) == 0.0


class EntropyProbe(KLCov):
    """Records, per update, whether the current entropy the regularizers see equals H_old."""

    needs_current_entropy = True

    def __init__(self) -> None:
        super().__init__(ratio=0.1)
        self.seen: list[tuple[bool, bool]] = []  # (on_policy, ctx.entropy == ctx.old_entropy on valid tokens)

    def prepare(self, ctx) -> None:
        m = ctx.mask.bool()
        self.seen.append((ctx.on_policy, torch.equal(ctx.entropy[m], ctx.old_entropy[m])))

    def shape(self, batch):
        from lit_covrl.types import TokenShaping

        return TokenShaping()


@pytest.mark.parametrize("sampler", ["KVCacheSampler", "StaticCacheSampler"])
def test_recompute_under_bf16_recomputes_the_old_entropies_too(sampler):
    """bf16-mixed, recompute_logprobs null (on), lr 0 (the policy never moves), two epochs: the
    old log-probs were recomputed but H_old stayed the sampler's, whole bf16 steps off the training
    forward's H, so on the second update EntropyRatioClip at the paper's bounds clipped 3.3 % (KV
    sampler) / 1.6 % (static cache) of the tokens of a policy that had not changed."""
    from lit_covrl import sampling
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule
    from lit_covrl.regularizers import EntropyRatioClip
    from lit_covrl.tasks.reasoning import ReasoningReward

    torch.manual_seed(0)
    probe = EntropyProbe()
    module = GRPOModule(model="lit_covrl:tiny-reasoning", reward=ReasoningReward(check_steps=True),
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.0), sampler=getattr(sampling, sampler)(),
                        rollout=dict(group_size=8, max_new_tokens=44), update=dict(ppo_epochs=2, micro_batch_size=64))
    data = PromptDataModule(task="reasoning", batch_size=8, val_size=0, seed=0)
    trainer = fit(module, data, steps=1, callbacks=[probe, EntropyRatioClip(low=0.05, high=0.05)],
                  limit_val_batches=0, precision="bf16-mixed")
    assert module.recompute_logprobs_on
    assert probe.seen == [(True, True), (False, True)]
    assert float(trainer.callback_metrics["reg/entropy_ratio_clip/clipped_frac"]) == 0.0


def test_recompute_is_on_by_default_for_bfloat16_weights_and_fsdp_bf16(tiny_model_dir):
    """The other two ways a policy computes in bf16 under trainer.precision 32: its weights are
    bf16 (a bf16 checkpoint loaded as is), or FSDP's mixed precision casts them
    (`model.system.fsdp_mixed_precision: bf16`); either turns the null default on."""
    module = make_module(tiny_model_dir)
    module.configure_model()
    assert module.recompute_logprobs_on is False  # float32, no trainer
    module.policy.to(torch.bfloat16)
    assert module.recompute_logprobs_on is True
    fsdp = make_module(tiny_model_dir, system=dict(fsdp_mixed_precision="bf16"))
    fsdp.configure_model()
    assert fsdp.recompute_logprobs_on is True


def _filtered_layout_module(tiny_model_dir, **rollout):
    kw = LAYOUTS["skip_padding, 2 mini-batches, filtered groups"]
    module = make_module(tiny_model_dir, rollout=dict(kw["rollout"], **rollout),
                         update=dict(recompute_logprobs=True, **kw["update"]), system=kw["system"], reward=kw["reward"])
    module.configure_model()
    return module


def test_recompute_also_fills_the_filtered_rows(tiny_model_dir):
    """Rows of filtered (constant) groups are not trained, but their log-probs feed the rollout's
    covariance metrics (cov/mean, cov/topX): recomputing only the kept rows left them at 0."""
    module = _filtered_layout_module(tiny_model_dir)
    seen, real = [], module.learner.recompute_old_logprobs

    def spy(rollout, keep):
        real(rollout, keep)
        ref = module.learner.logprobs(module.policy, rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        seen.append((~keep, rollout.logp.clone(), ref, rollout.response_mask.bool()))

    module.learner.recompute_old_logprobs = spy
    torch.manual_seed(0)
    fit(module, make_data(val_size=0), steps=1, limit_val_batches=0)
    dropped, got, ref, m = seen[0]
    assert dropped.any()
    m = m & dropped[:, None]
    torch.testing.assert_close(got[m], ref[m], atol=1e-5, rtol=1e-5)
    assert (got[m] != 0).all()


def test_recompute_with_overlong_mask_makes_the_first_ratio_exactly_one(tiny_model_dir):
    """`overlong: mask` drops the truncated rows from the update: the recompute must plan its
    micro-batches without them too, or the first ratio is off by rounding (2.4e-7 seen)."""
    torch.manual_seed(0)
    probe = FirstUpdateGap()
    module = _filtered_layout_module(tiny_model_dir, overlong="mask", max_new_tokens=4)
    truncated, real = [], module.learner.recompute_old_logprobs
    module.learner.recompute_old_logprobs = lambda rollout, keep: truncated.append(rollout.truncated.clone()) or real(rollout, keep)
    fit(module, make_data(val_size=0), steps=2, callbacks=[probe], limit_val_batches=0)
    assert any(t.any() and not t.all() for t in truncated)  # some rows masked as overlong, some trained
    assert probe.gaps and max(probe.gaps) == 0.0


class KeptFrac(L.Callback):
    """policy/kept_frac of every RL step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["policy/kept_frac"]))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_regularizer_losses_add_up_to_the_shaping_of_the_loss(mode):
    """reg/<name>/loss, in the order listed, is what each adds on top of the ones before it: two
    weights dropping the same token count it once (each used to be credited with it), two shifts and
    a penalty telescope too. Their sum is policy/loss minus the unshaped objective's loss."""
    from types import SimpleNamespace

    from lit_covrl.algorithms import aggregate
    from lit_covrl.loss import contributions
    from lit_covrl.objectives import PPOClip
    from lit_covrl.types import PolicyBatch, TokenShaping

    g = torch.Generator().manual_seed(0)
    n, t = 3, 5
    old = -torch.rand(n, t, generator=g) * 2
    logp = old + torch.randn(n, t, generator=g) * 0.3
    adv = torch.randn(n, 1, generator=g).expand(n, t)
    mask = torch.ones(n, t)
    mask[2, 3:] = 0
    b = PolicyBatch(torch.arange(n), logp, old, adv, mask, None, None, None)
    drop_first = torch.ones(n, t)
    drop_first[:, 0] = 0
    drop_two = torch.ones(n, t)
    drop_two[:, :2] = 0
    drop_second = torch.ones(n, t)
    drop_second[:, 1] = 0
    drop_three = torch.ones(n, t)
    drop_three[:, :3] = 0
    # r2 drops column 1 alone, r3 columns 0-2: r3 must see the product of all the weights before it
    shapings = [TokenShaping(weight=drop_first), TokenShaping(weight=drop_two), TokenShaping(weight=drop_second),
                TokenShaping(weight=drop_three),
                TokenShaping(advantage_shift=torch.full((n, t), 0.3)), TokenShaping(advantage_shift=torch.full((n, t), -0.1)),
                TokenShaping(penalty=torch.rand(n, t, generator=g))]
    objective = PPOClip(clip_low=0.2, clip_high=0.2)
    regularizers = [SimpleNamespace(name=f"r{i}") for i in range(len(shapings))]
    agg = dict(mode=mode, num_tokens=mask.sum(), num_seqs=float(n), norm_length=None)
    base = objective.token_loss(logp, old, TokenShaping.shifted_advantages(shapings, adv), mask)
    loss = aggregate(TokenShaping.combine(shapings, base), mask, **agg)
    parts = contributions(objective, regularizers, b, shapings, base, agg)
    unshaped = aggregate(objective.token_loss(logp, old, adv, mask), mask, **agg)
    assert float(sum(parts.values())) == pytest.approx(float(loss - unshaped), abs=1e-6)
    # hand-worked for the weights: r0 drops column 0, r1 then only column 1 (column 0 is gone already)
    col = lambda j: aggregate(base * (torch.arange(t) == j).float(), mask, **agg)  # noqa: E731
    assert float(parts["reg/r0/loss"]) == pytest.approx(float(-col(0)), abs=1e-6)
    assert float(parts["reg/r1/loss"]) == pytest.approx(float(-col(1)), abs=1e-6)
    assert float(parts["reg/r2/loss"]) == pytest.approx(0.0, abs=1e-6)  # column 1 is gone already
    assert float(parts["reg/r3/loss"]) == pytest.approx(float(-col(2)), abs=1e-6)


def _char_model(path) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lit_covrl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+-=")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_four_stacked_selections_train_the_same_whatever_the_micro_batches(tmp_path):
    """Clip-Cov, KL-Cov, 80/20 and STEER stacked, 2 mini-batches x 2 epochs: micro-batches of 3
    rows with padding trimmed give the weights of one micro-batch of all rows. Here tokens with one
    context sit at the 80/20 threshold, their entropies apart by float rounding that depends on the
    micro-batch shapes; the threshold used to keep some of them and drop the others (the loss 3 %
    apart with one torch thread, the weights 0.03 apart after one RL step with two)."""
    from lit_covrl.regularizers import HighEntropyTokens, SteerWeights

    path = _char_model(tmp_path / "m")

    def run(micro: int, skip: bool) -> dict:
        torch.manual_seed(0)
        module = make_module(path, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), rollout=dict(max_new_tokens=8),
                             update=dict(micro_batch_size=micro, mini_batch_size=2, ppo_epochs=2, grad_clip=None),
                             system=dict(skip_padding=skip))
        regs = [ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3), KLCov(ratio=0.1, beta=1.0), HighEntropyTokens(top_frac=0.5),
                SteerWeights()]
        trainer = fit(module, make_data(), steps=1, callbacks=regs, limit_val_batches=0)
        weights = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
        return weights, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("policy/", "reg/"))}

    (one, m_one), (trimmed, m_trimmed) = run(64, False), run(3, True)
    assert max((one[k] - trimmed[k]).abs().max().item() for k in one) < 1e-6
    for k in ("policy/loss", "reg/high_entropy_tokens/selected_frac", "reg/kl_cov/selected_frac", "reg/clip_cov/selected_frac"):
        assert m_one[k] == pytest.approx(m_trimmed[k], rel=1e-5), k


@pytest.mark.parametrize("precision,fsdp,weights,on", [
    ("16-mixed", None, None, True), ("16-true", None, None, True), ("bf16-true", None, None, True),
    ("32-true", "fp16", None, True), ("32-true", None, torch.float16, True), ("32-true", None, None, False),
    ("64-true", None, None, False),
])
def test_recompute_defaults_on_for_float16_as_for_bfloat16(tiny_model_dir, precision, fsdp, weights, on):
    """float16 rounds the sampler's log-probs as bfloat16 does (review gpu24: under fp16 autocast
    the static sampler's first GSPO update clipped ~20 % of sequences of an unmoved policy), so the
    null default recomputes there too; it resolved off for 16-mixed, 16-true, fp16 FSDP and
    float16 weights."""
    from types import SimpleNamespace

    module = make_module(tiny_model_dir, **(dict(system=dict(fsdp_mixed_precision=fsdp)) if fsdp else {}))
    module.configure_model()
    if weights is not None:
        module.policy.to(weights)
    module._trainer = SimpleNamespace(precision=precision)
    assert module.recompute_logprobs_on is on
