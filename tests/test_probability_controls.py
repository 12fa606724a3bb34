"""Advantage Reweighting and Lopti (Yang et al. 2025, arXiv 2505.12929): hand-worked weights and
phases, the scope's place in the loss, start-up refusals, and the two-phase update against a naive
float64 loop of manual optimizer steps."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lit_covrl.algorithms import aggregate, low_probability_tokens, probability_weights
from lit_covrl.loss import compose, contributions
from lit_covrl.objectives import GSPO, PPOClip
from lit_covrl.regularizers import AdvantageReweighting, EntropyBonus, Lopti
from lit_covrl.regularizers.base import MiniBatchContext, check_objective_stack, check_stack
from lit_covrl.types import PolicyBatch, TokenShaping

P = torch.tensor([[0.1, 0.45, 0.9], [0.3, 0.8, 0.2]], dtype=torch.float64)  # rollout probabilities
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)


def _ctx(phase: int = 0) -> MiniBatchContext:
    old = P.log() * MASK
    adv = torch.tensor([[1.0], [-2.0]], dtype=torch.float64).expand(2, 3) * MASK
    return MiniBatchContext(0, phase, phase == 0, old, old, adv, MASK, None, phase=phase)


def test_advantage_reweighting_weights_hand_worked():
    # alpha 0.3: w = 0.3 p + 0.7 -> 0.73, 0.835, 0.97 | 0.79, 0.94, (padding 0)
    ar = AdvantageReweighting(alpha=0.3)
    ar.prepare(_ctx())
    want = torch.tensor([[0.73, 0.835, 0.97], [0.79, 0.94, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ar.weights, want)
    assert ar.pop_metrics()["reg/ar/weight_mean"] == pytest.approx((0.73 + 0.835 + 0.97 + 0.79 + 0.94) / 5)
    # alpha 0: every valid token weighs 1 (no reweighting)
    torch.testing.assert_close(probability_weights(P.log(), MASK, alpha=0.0), MASK)


def test_lopti_phases_hand_worked():
    """eta 0.5: the low-probability tokens 0.1, 0.45, 0.3, 0.2 (the last is padding) train in phase 0,
    0.9 and 0.8 in phase 1; low_first False swaps the phases; every valid token trains in exactly one."""
    low = low_probability_tokens(P.log(), MASK, eta=0.5)
    assert low.tolist() == [[True, True, False], [True, False, False]]
    lopti = Lopti(eta=0.5)
    scopes = []
    for phase in (0, 1):
        lopti.prepare(_ctx(phase))
        scopes.append(lopti.scope.clone())
        assert lopti.zeroed_tokens().tolist() == (lopti.scope == 0).tolist()
    assert scopes[0].tolist() == [[1, 1, 0], [1, 0, 0]] and scopes[1].tolist() == [[0, 0, 1], [0, 1, 0]]
    assert lopti.pop_metrics() == {"reg/lopti/low_frac": pytest.approx(3 / 5)}
    high_first = Lopti(eta=0.5, low_first=False)
    high_first.prepare(_ctx(0))
    assert high_first.scope.tolist() == scopes[1].tolist()
    high_first.prepare(_ctx(1))
    assert high_first.scope.tolist() == scopes[0].tolist()


def test_scope_multiplies_the_whole_token_loss_and_its_contribution_adds_up():
    """PPO-clip at ratio 1 (token loss -A w), an entropy bonus 0.1 H, AR alpha 0.3 and Lopti eta 0.5 in
    phase 0: loss = sum over the phase's tokens of (-A w - 0.1 H) / 5 valid tokens; the
    contributions of AR, the bonus and Lopti add up to it minus the plain objective's loss."""
    ctx = _ctx(0)
    ar, bonus, lopti = AdvantageReweighting(alpha=0.3), EntropyBonus(coef=0.1), Lopti(eta=0.5)
    ar.prepare(ctx), bonus.prepare(ctx), lopti.prepare(ctx)
    H = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    b = PolicyBatch(torch.arange(2), ctx.old_logp.clone().requires_grad_(True), ctx.old_logp, ctx.advantages, MASK,
                    entropy=H)
    agg = dict(mode="token-mean", num_tokens=MASK.sum(), num_seqs=torch.tensor(2.0), norm_length=3)
    regs = [ar, bonus, lopti]
    loss, shapings, base = compose(PPOClip(), regs, b, agg)
    # phase-0 tokens: (0,0) p .1 A 1, (0,1) p .45 A 1, (1,0) p .3 A -2
    hand = (-(0.73) - 0.1 * 1 - 0.835 - 0.1 * 2 + 2 * 0.79 - 0.1 * 4) / 5
    assert float(loss.detach()) == pytest.approx(hand)
    parts = contributions(PPOClip(), regs, b, shapings, base, agg)
    plain = float(aggregate(base.detach(), MASK, **agg))
    assert plain + sum(float(v) for v in parts.values()) == pytest.approx(hand)
    assert float(parts["reg/lopti/loss"]) != 0
    # the gradient reaches the phase's tokens only
    loss.backward()
    assert (b.logp.grad[lopti.scope == 0] == 0).all() and (b.logp.grad[lopti.scope == 1] != 0).all()


def test_start_up_refusals_name_the_field():
    for kw, field in (({"alpha": 1.5}, "AdvantageReweighting.alpha"), ({"alpha": -0.1}, "AdvantageReweighting.alpha")):
        with pytest.raises(ValueError, match=field):
            AdvantageReweighting(**kw)
    for kw, field in (({"eta": 0.0}, "Lopti.eta"), ({"eta": 1.2}, "Lopti.eta"), ({"low_first": "yes"}, "Lopti.low_first")):
        with pytest.raises(ValueError, match=field):
            Lopti(**kw)
    with pytest.raises(ValueError, match="split the update into phases"):
        check_stack([Lopti(), Lopti(name="lopti_2")])
    check_stack([AdvantageReweighting(), Lopti()])  # the reference's combination stacks
    with pytest.raises(ValueError, match="Lopti .*GSPO"):
        check_objective_stack(GSPO(), [Lopti()])
    check_objective_stack(PPOClip(), [Lopti()])
    # a scope only from a regularizer that splits the update
    with pytest.raises(ValueError, match="scope without update_phases"):
        TokenShaping.checked(TokenShaping(scope=MASK), MASK.shape, EntropyBonus())


# --- the two-phase update against a naive float64 loop ------------------------------------------------
def _rollout(model):
    """Two prompts x G = 2 responses of the tiny model's vocabulary, lengths 3..5 of T = 5; old
    log-probs from the model itself (the rollout policy)."""
    from lit_covrl.policy import response_logprobs
    from lit_covrl.types import Rollout

    g = torch.Generator().manual_seed(3)
    P_len, T = 3, 5
    ids = torch.randint(3, 15, (4, P_len + T), generator=g)
    prompts = torch.randint(3, 15, (2, P_len), generator=g)
    ids[:, :P_len] = prompts.repeat_interleave(2, 0)
    lengths = torch.tensor([5, 3, 4, 5])
    resp = (torch.arange(T)[None] < lengths[:, None]).long()
    att = torch.cat([torch.ones(4, P_len, dtype=torch.long), resp], 1)
    ids = ids * att
    with torch.no_grad():
        old = response_logprobs(model, ids, att, T).logp * resp
    return Rollout(ids, att, resp.double(), old.double(), torch.zeros(4, T, dtype=torch.float64),
                   torch.zeros(4, dtype=torch.bool))


def _learner_params(model_dir, regs, micro: int, rollout_of=_rollout):
    from lit_covrl.drivers import PlainDriver
    from lit_covrl.learner import Learner, LearnerSettings
    from lit_covrl.policy import load_policy
    from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings

    model = load_policy(model_dir).double()
    rollout = rollout_of(model)
    settings = LearnerSettings(RolloutSettings(group_size=2, max_new_tokens=5), LossSettings(),
                               UpdateSettings(mini_batch_size=1, micro_batch_size=micro, grad_clip=None))
    driver = PlainDriver(torch.optim.SGD(model.parameters(), lr=2.0))
    learner = driver.learner = Learner(model, settings, PPOClip(), regs, driver)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    metrics = learner.update(rollout, adv, torch.ones(4, dtype=torch.bool), None, step=0)
    return model, rollout, adv, driver.steps, metrics


def _naive(model_dir, rollout, adv, eta: float, alpha: float):
    """Phase 0 (tokens with p_old < eta) over both mini-batches (one prompt each), then phase 1 (the
    others) over both; each update one SGD step on the token-mean PPO-clip loss over the mini-batch's
    valid tokens, the other phase's tokens contributing 0; ratios against the rollout's log-probs."""
    from lit_covrl.policy import load_policy, response_logprobs

    model = load_policy(model_dir).double()
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    old, mask = rollout.logp, rollout.response_mask
    low = (old.exp() < eta) & mask.bool()
    w = alpha * old.exp() + 1 - alpha
    for phase_tokens in (low, mask.bool() & ~low):
        for rows in (torch.tensor([0, 1]), torch.tensor([2, 3])):
            opt.zero_grad()
            logp = response_logprobs(model, rollout.input_ids[rows], rollout.attention_mask[rows], 5).logp
            total = 0.0
            for i, r in enumerate(rows.tolist()):
                for t in range(5):
                    if not phase_tokens[r, t]:
                        continue
                    ratio = torch.exp(logp[i, t] - old[r, t])
                    a = adv[r] * w[r, t]
                    total = total - torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
            (total / mask[rows].sum()).backward()
            opt.step()
    return model


@pytest.mark.parametrize("micro", [1, 3, 64])
def test_two_phase_update_equals_a_naive_float64_loop(tiny_model_dir, micro):
    """Lopti (+ AR alpha 0.3): 4 SGD steps (2 phases x 2 mini-batches) whose weights equal the naive
    loop's, for micro-batches of 1, 3 or all rows; eta splits the tiny model's tokens."""
    from lit_covrl.policy import load_policy

    probe = _rollout(load_policy(tiny_model_dir).double())
    p = probe.logp.exp()[probe.response_mask.bool()]
    eta = float(p.median())  # about half the tokens on each side
    assert 0 < float((p < eta).double().mean()) < 1
    regs = [AdvantageReweighting(alpha=0.3), Lopti(eta=eta)]
    model, rollout, adv, steps, metrics = _learner_params(tiny_model_dir, regs, micro)
    assert steps == 4
    naive = _naive(tiny_model_dir, rollout, adv, eta, alpha=0.3)
    start = load_policy(tiny_model_dir).double().state_dict()
    moved = max(float((v - start[k]).abs().max()) for k, v in model.state_dict().items())
    assert moved > 1e-4
    for k, v in naive.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-9, atol=1e-12)
    # one phase alone is not the same update (the oracle can tell the two schedules apart)
    plain, *_ = _learner_params(tiny_model_dir, [AdvantageReweighting(alpha=0.3)], micro)
    assert max(float((plain.state_dict()[k] - v).abs().max()) for k, v in naive.state_dict().items()) > 1e-6
    assert metrics["policy/loss"] != 0 and math.isfinite(metrics["policy/grad_norm"])
    # metrics: the mean over the 4 updates of each mini-batch's value (both phases see the same tokens)
    halves = [probe.logp[r].exp()[probe.response_mask[r].bool()] for r in (slice(0, 2), slice(2, 4))]
    low_frac = sum(float((h < eta).double().mean()) for h in halves) / 2
    assert regs[1].pop_metrics()["reg/lopti/low_frac"] == pytest.approx(low_frac)
    assert regs[0].pop_metrics()["reg/ar/weight_mean"] == pytest.approx(sum(float((0.3 * h + 0.7).mean()) for h in halves) / 2)


# --- through the CLI ----------------------------------------------------------------------------------
def test_cpu_configs_run_an_rl_step_through_the_cli(tmp_path):
    """configs/cpu/ar_lopti.yaml on the quickstart through `lit-covrl fit`: both controls are built
    from the YAML and log under reg/<name>/ every step; the update ran twice (2 phases)."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/ar_lopti.yaml", steps=2)
    assert len(tags["reg/lopti/low_frac"]) == 2 and all(0 < v < 1 for v in tags["reg/lopti/low_frac"])
    assert all(0.7 < v < 1 for v in tags["reg/ar/weight_mean"])
    assert any(v != 0 for v in tags["reg/lopti/loss"]) and any(v != 0 for v in tags["reg/ar/loss"])


def test_reasoning_config_runs_an_rl_step_through_the_cli(tmp_path):
    """configs/reasoning.yaml + configs/reasoning/ar_lopti.yaml: one RL step (a small batch) with the
    shipped tiny-reasoning policy."""
    from lit_covrl.cli import main
    from tests.helpers import scalar_tags

    root = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(root / "configs/reasoning.yaml"), "--config", str(root / "configs/reasoning/ar_lopti.yaml"),
          "--torch_threads", "1", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false", "--data.batch_size", "4", "--model.update.mini_batch_size", "2",
          "--checkpoint.dirpath", str(tmp_path / "ck"), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    tags = {k: [v for _, v in s] for k, s in scalar_tags(tmp_path).items()}
    assert len(tags["reg/lopti/low_frac"]) == 1 and 0 < tags["reg/lopti/low_frac"][0] < 1
    assert 0.7 < tags["reg/ar/weight_mean"][0] <= 1


def test_a_bad_eta_and_gspo_are_refused_at_start_up(tmp_path, capsys):
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/lopti.yaml", "--trainer.callbacks.init_args.eta", "2")
    assert "Lopti.eta=2.0 is invalid: must be a finite number in (0, 1]" in err
    err = cli_start_up_error(tmp_path / "g", capsys, "configs/cpu/lopti.yaml", "--model.objective",
                             "lit_covrl.objectives.GSPO")
    assert "Lopti (regularizer 'lopti')" in err and "GSPO" in err


def _phase_batch():
    """Two responses (5 valid tokens), pi_old 0.1 .. 0.9; A +1 and -2."""
    p = torch.tensor([[0.1, 0.45, 0.9], [0.3, 0.8, 0.2]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0], [-2.0]], dtype=torch.float64).expand(2, 3) * mask
    agg = dict(mode="token-mean", num_tokens=mask.sum(), num_seqs=torch.tensor(2.0), norm_length=3)
    return p.log() * mask, mask, adv, agg


def test_the_objective_stats_of_a_phase_count_its_own_tokens():
    """Phase 1 (pi_old >= 0.5 tokens, ratio 1) after phase 0 moved the low tokens to ratios 2 and
    0.5: those have no loss in this update, so they are not clipped by it (the reference zeroes
    their advantage, its clip fraction counts the phase's tokens). policy/clip_frac was 0.4."""
    from lit_covrl.loss import loss_parts

    old, mask, adv, agg = _phase_batch()
    lopti = Lopti(eta=0.5)
    lopti.prepare(MiniBatchContext(0, 1, False, old, old, adv, mask, None, phase=1))
    assert lopti.scope.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    logp = old.clone()
    logp[0, 0] += math.log(2.0)
    logp[1, 0] -= math.log(2.0)
    b = PolicyBatch(torch.arange(2), logp.requires_grad_(True), old, adv, mask)
    obj = PPOClip()
    loss, shapings, base = compose(obj, [lopti], b, agg)
    parts = loss_parts(obj, [lopti], b, loss, shapings, base, agg, mask.sum())
    assert float(parts["policy/clip_frac"]) == 0.0
    lopti.prepare(MiniBatchContext(0, 1, False, old, old, adv, mask, None, phase=0))  # the moved tokens' phase
    loss, shapings, base = compose(obj, [lopti], b, agg)
    parts = loss_parts(obj, [lopti], b, loss, shapings, base, agg, mask.sum())
    assert float(parts["policy/clip_frac"]) == pytest.approx(2 / 5)  # both clipped: r 2 with A > 0, r 0.5 with A < 0


def test_each_regularizer_s_loss_under_lopti_is_what_its_phase_applies():
    """Entropy bonus 0.1 beside Lopti's phase 0 (3 of 5 tokens): reg/entropy_bonus/loss is the bonus
    on those 3 tokens (it was on all 5, -0.300 for -0.140 applied, and reg/lopti/loss took the
    difference); reg/lopti/loss is what the scope takes off the unshaped objective; they add up."""
    old, mask, adv, agg = _phase_batch()
    logp = old + torch.tensor([[0.0, 0.0, 0.3], [0.0, -0.2, 0.0]], dtype=torch.float64)
    ctx = MiniBatchContext(0, 1, False, logp, old, adv, mask, torch.zeros_like(mask, dtype=torch.bool), phase=0)
    bonus, lopti = EntropyBonus(coef=0.1), Lopti(eta=0.5)
    for r in (bonus, lopti):
        r.prepare(ctx)
    assert lopti.scope.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    H = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    b = PolicyBatch(torch.arange(2), logp.clone().requires_grad_(True), old, adv, mask, entropy=H)
    obj = PPOClip()
    loss, shapings, base = compose(obj, [bonus, lopti], b, agg)
    parts = contributions(obj, [bonus, lopti], b, shapings, base, agg)
    assert float(parts["reg/entropy_bonus/loss"]) == pytest.approx(-0.1 * (1 + 2 + 4) / 5)
    unshaped = aggregate(base.detach(), mask, **agg)
    assert float(parts["reg/lopti/loss"]) == pytest.approx(float(aggregate(base.detach() * (lopti.scope - 1), mask, **agg)))
    assert float(unshaped + parts["reg/entropy_bonus/loss"] + parts["reg/lopti/loss"]) == pytest.approx(float(loss))
