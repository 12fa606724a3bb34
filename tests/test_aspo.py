"""ASPO (asymmetric importance sampling): hand-worked values, a float64 loop of the reference
code's per-token formulas (value and gradient, uniform and per-token clip ranges), the start-up
checks (its own fields, BAPO refused, Archer taken) and RL steps through the CLI. Micro-batch
invariance: tests/test_module.py (aspo cases); two processes: tests/test_distributed_selection.py."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import aggregate
from lit_covrl.objectives import ASPO, PPOClip
from lit_covrl.regularizers import BAPO, Archer
from lit_covrl.regularizers.base import check_objective_stack

torch.set_num_threads(1)
e = math.exp


def test_hand_worked():
    # eps 0.2 / 0.2, c = 3, old log-probs 0; value -A v, gradient d loss / d logp:
    # A = 1,  r = e^0.1:  inside, weight 1 / r = e^-0.1        value = gradient = -e^-0.1
    # A = 2,  r = e^0.5 > 1.2: clipped                          value -2 / 1.2, gradient 0
    # A = 2,  r = e^-0.5 in [1/3, 1.2]: weight e^0.5            value = gradient = -2 e^0.5
    # A = 1,  r = e^-1.5 < 1/3: weight capped at 3 (soft)       value = gradient = -3
    # A = -2, r = e^-0.5 < 0.8: clipped                         value 1.6, gradient 0
    # A = -1, r = e^0.5 in [0.8, 3]: weight r                   value = gradient = e^0.5
    # A = -1, r = e^1.5 > 3: weight capped at 3 (soft)          value = gradient = 3 (PPO's dual-clip: 0)
    # A = 0:                                                    0, 0
    old = torch.zeros(1, 8, dtype=torch.float64)
    logp = torch.tensor([[0.1, 0.5, -0.5, -1.5, -0.5, 0.5, 1.5, 0.3]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 2.0, 1.0, -2.0, -1.0, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 8, dtype=torch.float64)
    obj = ASPO()
    loss = obj.token_loss(logp, old, adv, mask)
    assert loss.detach().flatten().tolist() == pytest.approx(
        [-e(-0.1), -2 / 1.2, -2 * e(0.5), -3.0, 1.6, e(0.5), 3.0, 0.0])
    loss.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-e(-0.1), 0.0, -2 * e(0.5), -3.0, 0.0, e(0.5), 3.0, 0.0])
    assert obj.clipped_tokens(logp, old, adv, mask).tolist() == [[False, True, False, False, True, False, False, False]]
    st = obj.stats(logp, old, adv, mask)
    assert float(st["clip_frac_low"]) == pytest.approx(1 / 8) and float(st["clip_frac_high"]) == pytest.approx(1 / 8)
    assert float(st["clip_frac"]) == pytest.approx(2 / 8) and float(st["soft_clip_frac"]) == pytest.approx(2 / 8)
    # PPOClip with the same dual-clip: the A > 0 tokens weigh r, the capped A < 0 token gets nothing
    ppo = logp.detach().clone().requires_grad_(True)
    PPOClip(dual_clip=3.0).token_loss(ppo, old, adv, mask).sum().backward()
    assert ppo.grad.flatten().tolist() == pytest.approx([-e(0.1), 0.0, -2 * e(-0.5), -e(-1.5), 0.0, e(0.5), 0.0, 0.0])


def _reference_token(lp, old, a, eps_low, eps_high, c):
    """(value, term whose gradient is the reference's) of one token, by the reference code's
    formulas (wizard-III/Archer2.0 compute_policy_loss_archer, written out per token)."""
    r = torch.exp((lp - old).clamp(-20.0, 20.0))
    if a < 0:
        ratio = torch.clamp(r, min=1 - eps_low)
        if ratio > c:  # soft dual-clip: -A c log pi (value ours: -A c)
            return -a * c, -a * c * lp
        return -a * ratio, -a * ratio
    ratio = torch.clamp(r, max=1 + eps_high)
    if 1 / ratio > c:
        return -a * c, -a * c * lp
    term = -a * (ratio / ratio.detach()) / ratio.detach()
    return term, term


def _naive(logp, old, adv, mask, lo, hi, c):
    """Token-mean of the per-token values and of the reference's terms, one token at a time."""
    value, term, n = 0.0, 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                v, g = _reference_token(logp[i, t], old[i, t], float(adv[i, t]), float(lo[i, t]), float(hi[i, t]), c)
                value, term, n = value + float(v.detach() if torch.is_tensor(v) else v), term + g, n + 1
    return value / n, term / n


def _batch(seed, n=10, t=7):
    from tests.test_objectives import _rand

    logp, old, adv, mask = _rand(n, t, seed=seed, scale=0.8)
    return logp, old, adv[:, None].expand(n, t).clone(), mask, torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("per_token", [False, True], ids=["uniform", "per_token"])
def test_value_and_gradient_match_the_reference_formulas_in_a_float64_loop(per_token):
    logp, old, adv, mask, g = _batch(3)
    if per_token:  # Archer's kind of range: 0.2 or 0.4 per token (the reference's two)
        lo = torch.where(torch.rand(logp.shape, generator=g) < 0.4, 0.4, 0.2).double()
        hi = torch.where(torch.rand(logp.shape, generator=g) < 0.4, 0.4, 0.2).double()
        kw = dict(clip=(lo, hi))
    else:
        lo, hi, kw = torch.full_like(logp, 0.2), torch.full_like(logp, 0.28), {}
    obj = ASPO(clip_low=0.2, clip_high=0.28, dual_clip=2.5)
    z = logp.clone().requires_grad_(True)
    loss = aggregate(obj.token_loss(z, old, adv, mask, **kw), mask, "token-mean")
    loss.backward()
    ref = logp.clone().requires_grad_(True)
    value, term = _naive(ref, old, adv, mask, lo, hi, 2.5)
    term.backward()
    assert float(loss) == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(z.grad, ref.grad, rtol=1e-12, atol=1e-15)
    # every case of the rule occurs; the clipped tokens are those the loop gives no gradient
    r, m = torch.exp(logp - old), mask.bool()
    for region in ((adv < 0) & (r < 1 - lo), (adv < 0) & (r > 2.5), (adv > 0) & (r > 1 + hi), (adv > 0) & (r < 1 / 2.5),
                   (adv < 0) & (r > 1 - lo) & (r < 2.5), (adv > 0) & (r > 1 / 2.5) & (r < 1 + hi)):
        assert (region & m).any()
    assert torch.equal(obj.clipped_tokens(logp, old, adv, mask, **kw), (ref.grad == 0) & m)


def test_a_per_token_range_moves_only_the_clip_edges():
    """A token at r = 1.3, A > 0: clipped by eps_high 0.2, kept (weight 1 / 1.3) by 0.4; the cap c
    is the objective's whatever the range."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.3), -2.0]], dtype=torch.float64)
    adv, mask = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    obj = ASPO()
    for eps, grad in ((0.2, 0.0), (0.4, -1 / 1.3)):
        clip = (torch.full((1, 2), 0.2, dtype=torch.float64), torch.full((1, 2), eps, dtype=torch.float64))
        z = logp.clone().requires_grad_(True)
        obj.token_loss(z, old, adv, mask, clip=clip).sum().backward()
        assert z.grad.flatten().tolist() == pytest.approx([grad, -3.0])


@pytest.mark.parametrize("kwargs,field", [
    (dict(clip_low=-0.1), "ASPO.clip_low=-0.1"), (dict(clip_low=1.5), "ASPO.clip_low=1.5"),
    (dict(clip_high=-0.2), "ASPO.clip_high=-0.2"), (dict(dual_clip=1.0), "ASPO.dual_clip=1.0"),
    (dict(dual_clip=None), "ASPO.dual_clip=None"), (dict(dual_clip=float("inf")), "ASPO.dual_clip=inf"),
    (dict(dual_clip=float("nan")), "ASPO.dual_clip=nan"), (dict(dual_clip="3"), "ASPO.dual_clip='3'"),
    (dict(dual_clip=True), "ASPO.dual_clip=True"), (dict(logratio_clamp=0.0), "ASPO.logratio_clamp=0.0"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("'", ".")):
        ASPO(**kwargs)


def test_bapo_is_refused_and_archer_taken_at_start_up():
    with pytest.raises(ValueError, match=r"BAPO \(regularizer 'bapo'\) balances .* objective ASPO does not weigh"):
        check_objective_stack(ASPO(), [BAPO()])
    check_objective_stack(PPOClip(), [BAPO()])  # BAPO's own objectives still pass
    check_objective_stack(ASPO(), [Archer()])  # Archer2.0: ASPO under Archer's per-token range


def test_bapo_with_aspo_stops_the_cli_at_start_up(tmp_path, capsys):
    from pathlib import Path

    from tests.helpers import cli_start_up_error

    bapo = str(Path(__file__).resolve().parents[1] / "configs/cpu/bapo.yaml")
    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/aspo.yaml", "--config", bapo, "--model.loss.dual_clip", "null")
    assert "BAPO (regularizer 'bapo') balances" in err and "ASPO" in err


def test_cpu_config_runs_through_the_cli(tmp_path):
    """configs/cpu/aspo.yaml on the quickstart (4 updates per rollout, 3 RL steps): the objective
    is built from the YAML, its stats are written every step and off-policy updates clip."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/aspo.yaml", "--model.rollout.group_size", "4",
                        "--model.rollout.max_new_tokens", "6", "--data.batch_size", "8",
                        "--model.update.mini_batch_size", "2", "--model.rollout.filter_groups", "false")
    keys = {"policy/loss", "policy/clip_frac", "policy/soft_clip_frac", "policy/approx_kl"}
    assert keys <= set(tags) and all(len(tags[k]) == 3 for k in keys), sorted(tags)
    assert all(math.isfinite(v) for v in tags["policy/loss"]) and max(tags["policy/approx_kl"]) > 0


def test_reasoning_config_runs_an_rl_step_through_the_cli(tmp_path):
    """configs/reasoning/aspo.yaml on the reasoning testbed (its shipped policy), one RL step
    shrunk to 8 prompts x 4 responses and two updates."""
    from pathlib import Path

    from lit_covrl.cli import main
    from tests.helpers import scalar_tags

    root = Path(__file__).resolve().parents[1] / "configs"
    main(["fit", "--config", str(root / "reasoning.yaml"), "--config", str(root / "reasoning/aspo.yaml"),
          "--data.batch_size", "8", "--model.rollout.group_size", "4", "--model.update.mini_batch_size", "4",
          "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--checkpoint.dirpath", str(tmp_path / "ck"), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    tags = scalar_tags(tmp_path)
    assert "policy/soft_clip_frac" in tags and math.isfinite(tags["policy/loss"][-1][1]), sorted(tags)


def test_on_policy_it_is_ppo_clip():
    """At r = 1 (the first update of a rollout) the flipped weight 1 / r is r: ASPO's value and
    gradient are PPOClip's, so it acts only on off-policy updates."""
    logp, old, adv, mask, _ = _batch(4)
    aspo, ppo = ASPO(), PPOClip(dual_clip=3.0)
    assert torch.equal(aspo.token_loss(logp, logp, adv, mask), ppo.token_loss(logp, logp, adv, mask))
    grads = []
    for obj in (aspo, ppo):
        z = logp.clone().requires_grad_(True)
        aggregate(obj.token_loss(z, logp, adv, mask), mask, "token-mean").backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert not torch.equal(aspo.token_loss(logp, old, adv, mask), ppo.token_loss(logp, old, adv, mask))


@pytest.mark.parametrize("mini_batch_size, warned", [(None, True), (2, False)])
def test_a_single_update_per_rollout_is_warned_at_start_up(tiny_model_dir, mini_batch_size, warned):
    """One update per rollout is always on policy, where ASPO is PPOClip (the test above): the run
    is told at start-up (it trained as GRPO without a word)."""
    import warnings

    from lit_covrl.data import PromptDataModule
    from tests.helpers import fit
    from tests.test_module import make_module

    module = make_module(tiny_model_dir, objective=ASPO(), rollout=dict(max_new_tokens=2, group_size=2),
                         update=dict(mini_batch_size=mini_batch_size))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, PromptDataModule(task="arithmetic", batch_size=4, val_size=0, seed=0), steps=1)
    said = [str(w.message) for w in caught if "ASPO is PPOClip on policy" in str(w.message)]
    assert bool(said) == warned, said


def test_tokens_on_the_clip_edges_keep_their_gradient_and_padding_is_not_counted():
    """r exactly on an edge is inside, as the reference's torch.clamp passes the gradient there:
    A = -1 at r = 1 - eps_low = 0.5 keeps weight r (gradient 0.5), A = 1 at r = 1 + eps_high = 2
    keeps weight 1 / r (gradient -0.5); neither is clipped. A padding token (A < 0, r = e^2 > c = 3)
    is in no statistic: soft_clip_frac 0 of the 2 valid tokens. Kills mut25 O4 (r <= 1 - eps_low
    clipped) and O10 (soft_clip_frac counting padding)."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[math.log(0.5), math.log(2.0), 2.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    obj = ASPO(clip_low=0.5, clip_high=1.0, dual_clip=3.0)
    obj.token_loss(logp, old, adv, mask).sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.5, -0.5, 0.0], rel=1e-12)
    assert obj.clipped_tokens(logp, old, adv, mask).tolist() == [[False, False, False]]
    st = obj.stats(logp.detach(), old, adv, mask)
    assert float(st["clip_frac"]) == 0.0 and float(st["soft_clip_frac"]) == 0.0
