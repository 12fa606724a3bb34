"""DCPO's dynamic-adaptive clipping (`DCPOClip`): the bounds by hand and against a float64 loop of
the reference's formula (lime-RL/DCPO get_clip_low_high), the loss and its gradient under PPOClip
with dual-clip 10 against a float64 loop, the range handed per micro-batch row, the start-up
refusals naming the field, and configs/cpu/dcpo.yaml and configs/reasoning/dcpo.yaml through the CLI."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from lit_covrl.algorithms import dcpo_clip_bounds
from lit_covrl.objectives import GSPO, PPOClip
from lit_covrl.regularizers import Archer, DCPOClip
from lit_covrl.regularizers.base import MiniBatchContext, check_objective_stack, check_stack
from lit_covrl.types import PolicyBatch
from tests.test_archer import _loop, _ppo_rule

torch.set_num_threads(1)


def _reference_bounds(q: float, eps_low: float, eps_high: float, c: float = 10.0) -> tuple[float, float]:
    """The reference's ratio bounds at old probability q, in Python floats."""
    low_arg = 1 - 4 * eps_low / q if q != 0 else 1.0
    low = (1 + math.sqrt(max(low_arg, 0.0))) / 2
    high = (1 + math.sqrt(1 + 4 * eps_high / q)) / 2 if q != 0 else math.inf
    return low, min(high, max(c, 10.0))


def test_hand_values_of_the_bounds():
    """q = 1, eps_low 0.1875: sqrt(1 - 0.75) = 0.5, lower bound 0.75 (eps_low 0.25); q = 0.14,
    eps_high 0.28: sqrt(1 + 8) = 3, upper bound 2 (eps_high 1); q = 0.2, eps_low 0.2: 1 - 4 < 0,
    lower bound 0.5; q = 1e-4: the upper bound 0.5 + 0.5 sqrt(11201) = 53.4 is capped at 10."""
    old = torch.log(torch.tensor([[1.0, 0.14, 0.2, 1e-4]], dtype=torch.float64))
    lo, hi = dcpo_clip_bounds(old, eps_low=0.1875, eps_high=0.28, max_ratio=10.0, dtype=torch.float64)
    assert lo[0, 0] == pytest.approx(0.25) and hi[0, 1] == pytest.approx(1.0)
    assert lo[0, 2] == 0.5 and lo[0, 3] == 0.5 and hi[0, 3] == 9.0
    assert hi[0, 0] == pytest.approx(0.5 * math.sqrt(1 + 4 * 0.28) - 0.5)  # q = 1: 1.228, near DAPO's 1.28
    # the lower the probability, the wider both sides (until the lower bound reaches 0.5 and the upper the cap)
    lo, hi = dcpo_clip_bounds(torch.log(torch.tensor([1.0, 0.9, 0.5, 0.1, 1e-3, 1e-5])), eps_low=0.2, eps_high=0.28,
                              max_ratio=10.0, dtype=torch.float64)
    assert bool((lo.diff() >= 0).all()) and bool((hi.diff() >= 0).all()) and bool((hi[:5].diff() > 0).all())


def test_a_zero_probability_token_gets_the_reference_s_bounds():
    lo, hi = dcpo_clip_bounds(torch.tensor([-math.inf]), eps_low=0.2, eps_high=0.28, max_ratio=10.0,
                              dtype=torch.float32)
    assert (float(lo), float(hi)) == (0.0, 9.0)  # its 4 eps / q read as 0 below, inf above (capped)


@pytest.mark.parametrize("seed", range(4))
def test_bounds_match_a_float64_loop_of_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(5, 7, generator=g, dtype=torch.float64) ** 3)  # q spread over (0, 1)
    lo, hi = dcpo_clip_bounds(old, eps_low=0.2, eps_high=0.28, max_ratio=10.0, dtype=torch.float64)
    for i in range(5):
        for j in range(7):
            low, high = _reference_bounds(math.exp(float(old[i, j])), 0.2, 0.28)
            assert float(lo[i, j]) == pytest.approx(1 - low, rel=1e-12, abs=1e-15)
            assert float(hi[i, j]) == pytest.approx(high - 1, rel=1e-12)


def _tokens(seed: int, n: int = 6, t: int = 8):
    """(logp, old_logp, advantages, mask) float64: old probabilities from 1e-4 to 1, ratios e^(0.8 z)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(n, t, generator=g, dtype=torch.float64).clamp(min=1e-4) ** 2)
    logp = old + 0.8 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t).clone()
    mask = (torch.rand(n, t, generator=g) < 0.85).double()
    return logp, old, adv, mask


def _ctx(logp, old, adv, mask):
    return MiniBatchContext(0, 1, False, logp, old, adv, mask, None)


@pytest.mark.parametrize("seed", range(3))
def test_loss_and_gradient_match_a_float64_loop(seed):
    """PPOClip (dual-clip 10, the recipe's) under DCPOClip's range: each token's value and
    d loss / d logp against a loop that computes the reference's bounds per token; the dynamic
    range keeps the gradient of tokens a fixed 0.2 / 0.28 range clips."""
    logp, old, adv, mask = _tokens(seed)
    reg = DCPOClip()
    reg.prepare(_ctx(logp, old, adv, mask))
    clip = reg.shape(PolicyBatch(torch.arange(6), logp, old, adv, mask))
    z = logp.clone().requires_grad_(True)
    loss = PPOClip(dual_clip=10.0).token_loss(z, old, adv, mask, clip=(clip.clip_low, clip.clip_high))
    loss.sum().backward()
    bounds = [[_reference_bounds(math.exp(float(o)), 0.2, 0.28) for o in row] for row in old]
    lo = torch.tensor([[1 - b[0] for b in row] for row in bounds], dtype=torch.float64)
    hi = torch.tensor([[b[1] - 1 for b in row] for row in bounds], dtype=torch.float64)
    want_loss, want_grad, inert = _loop(logp, old, adv, mask, lo, hi, _ppo_rule(10.0))
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, want_grad, rtol=1e-12, atol=1e-12)
    fixed = (torch.full_like(mask, 0.2), torch.full_like(mask, 0.28))
    _, _, fixed_inert = _loop(logp, old, adv, mask, *fixed, _ppo_rule(10.0))
    assert int(inert.sum()) < int(fixed_inert.sum())  # fewer tokens lose their gradient


def test_hand_value_and_gradient_of_a_low_probability_token():
    """q = 0.14 (upper bound 2), A = +1, r = 1.5: a fixed 0.28 range clips it (value -1.28, no
    gradient); DCPO keeps it (value -1.5, gradient -1.5). q = 1 (upper bound 1.228), r = 1.5: clipped."""
    old = torch.log(torch.tensor([[0.14, 1.0]], dtype=torch.float64))
    logp = old + math.log(1.5)
    adv, mask = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    reg = DCPOClip()
    reg.prepare(_ctx(logp, old, adv, mask))
    z = logp.clone().requires_grad_(True)
    loss = PPOClip(dual_clip=10.0).token_loss(z, old, adv, mask, clip=reg.clip_bounds())
    loss.sum().backward()
    upper = 0.5 + 0.5 * math.sqrt(1 + 4 * 0.28)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.5, -upper]], dtype=torch.float64))
    torch.testing.assert_close(z.grad, torch.tensor([[-1.5, 0.0]], dtype=torch.float64))


def test_micro_batch_rows_get_the_mini_batch_s_bounds():
    """Rows 1 / 3 / all of a prepared mini-batch: each micro-batch's range is its rows' of the
    whole, and the same as a mini-batch of those rows alone (a per-token function of old_logp)."""
    logp, old, adv, mask = _tokens(0)
    whole = DCPOClip()
    whole.prepare(_ctx(logp, old, adv, mask))
    for rows in (torch.tensor([2]), torch.tensor([0, 3, 5]), torch.arange(6)):
        part = DCPOClip()
        part.prepare(_ctx(logp[rows], old[rows], adv[rows], mask[rows]))
        got = whole.shape(PolicyBatch(rows, logp[rows], old[rows], adv[rows], mask[rows]))
        assert torch.equal(got.clip_low, part.clip_bounds()[0]) and torch.equal(got.clip_high, part.clip_bounds()[1])


def test_metrics_are_the_valid_tokens_mean_bounds():
    old = torch.log(torch.tensor([[1.0, 0.14, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    reg = DCPOClip(eps_low=0.1875)
    reg.prepare(_ctx(old, old, torch.ones_like(old), mask))
    m = reg.pop_metrics()
    high_q1 = 0.5 + 0.5 * math.sqrt(1 + 4 * 0.28)
    assert m["reg/dcpo_clip/ratio_low_mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["reg/dcpo_clip/ratio_high_mean"] == pytest.approx((high_q1 + 2.0) / 2)


def test_clip_values_span_the_narrowest_and_widest_range():
    lows, highs = DCPOClip().clip_values()
    assert lows == [pytest.approx(0.5 - 0.5 * math.sqrt(0.2)), 0.5]
    assert highs == [pytest.approx(0.5 * math.sqrt(2.12) - 0.5), 9.0]


def test_startup_refusals_name_the_fields(caplog):
    with pytest.raises(ValueError, match="GSPO clips whole sequences"):
        check_objective_stack(GSPO(), [DCPOClip()])
    with pytest.raises(ValueError, match="set a per-token clip range.*'archer'.*'dcpo_clip'"):
        check_stack([Archer(), DCPOClip()])
    check_objective_stack(PPOClip(dual_clip=10.0), [DCPOClip()])
    for kw, field in ((dict(eps_low=-0.1), "DCPOClip.eps_low"), (dict(eps_high=math.inf), "DCPOClip.eps_high"),
                      (dict(max_ratio=1.0), "DCPOClip.max_ratio"), (dict(eps_low=True), "DCPOClip.eps_low"),
                      (dict(eps_high="0.28"), "DCPOClip.eps_high")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.") + ".* is invalid"):
            DCPOClip(**kw)

    class M:
        updates_per_rollout = 1

    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        DCPOClip().on_fit_start(None, M())
    assert "DCPOClip has no effect with a single on-policy update" in caplog.text


def test_cpu_config_runs_through_the_cli(tmp_path):
    """configs/cpu/dcpo.yaml on the quickstart (4 updates per rollout, 3 steps): both callbacks are
    built, their tags written every step; the mean bounds are wider than PPO's 0.8 / 1.2."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/dcpo.yaml")
    for key in ("reg/dcpo_clip/ratio_low_mean", "reg/dcpo_clip/ratio_high_mean", "reg/dcpo_adv/nonzero_adv_frac",
                "reg/dcpo_adv/tracked_prompts", "policy/clip_frac"):
        assert len(tags[key]) == 3, key
    assert all(v < 0.8 for v in tags["reg/dcpo_clip/ratio_low_mean"])
    assert all(v > 1.28 for v in tags["reg/dcpo_clip/ratio_high_mean"])
    assert tags["reg/dcpo_adv/tracked_prompts"][0] > 0


def test_reasoning_config_runs_one_step_through_the_cli(tmp_path):
    """configs/reasoning/dcpo.yaml on configs/reasoning.yaml (its shipped tiny-reasoning policy),
    shrunk to one RL step of 4 prompts x 4 responses, through `lit-covrl fit`."""
    from pathlib import Path

    from lit_covrl.cli import main
    from tests.helpers import scalar_tags

    root = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(root / "configs/reasoning.yaml"),
          "--config", str(root / "configs/reasoning/dcpo.yaml"),
          "--torch_threads", "1", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false", "--data.batch_size", "4", "--model.update.mini_batch_size", "2",
          "--model.rollout.max_new_tokens", "8", "--model.rollout.group_size", "4",
          "--checkpoint.dirpath", str(tmp_path / "ck"), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    tags = scalar_tags(tmp_path)
    assert len(tags["reg/dcpo_clip/ratio_high_mean"]) == 1 and len(tags["reg/dcpo_adv/nonzero_adv_frac"]) == 1
