"""ERA (Kang et al. 2025, arXiv 2510.08549; nothingbutbut/era ERA-LLM): the response entropy, the
modes and the advantage scale by hand; the composed loss's value and gradient against a float64
loop of the paper's objective written as the reference code's `era` loss mode (dp_actor.py: the
top-20 % entropy mean per response, logits times k or over k on positive-advantage tokens, the
old log-probs recomputed under the activation, advantages scaled inversely, verl's dual-clip PPO
loss, token-mean) with the float advantage deciding, on policy, for micro-batches of 1, 4 and all
rows; the reference as written (its activation reads the advantage truncated to an integer)
differs on advantages in (0, 1), on purpose; off policy against the paper's objective with the
raw ratio (and unlike the reference's activated ratio); stacked with SimKO, the two gradient
redirections add (by hand); start-up validation; module fits (inert thresholds
are plain GRPO to the bit, active ones move the weights) and a fit through the CLI whose tags
move. The scaled log-probs themselves: tests/test_scaled_logprobs.py."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import (
    aggregate,
    era_advantage_weight,
    era_logp,
    era_modes,
    era_response_entropy,
    token_entropy,
    token_logprobs,
    token_scaled_logprobs,
)
from lit_covrl.objectives import GSPO, PPOClip
from lit_covrl.regularizers import ERA
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.types import PolicyBatch, TokenShaping

F64 = torch.float64


def test_response_entropy_by_hand():
    ent = torch.tensor([[3.0, 1.0, 2.0, 0.5, 4.0, 0.1, 0.2, 9.0, 9.0, 9.0],   # L = 7: k = 1 -> 4
                        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],  # L = 10: k = 2 -> (10 + 9) / 2
                        [0.7, 0.2, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0],   # L = 2: k = 1 -> 0.7
                        [5.0] * 10])                                           # L = 0 -> 0
    mask = (torch.arange(10)[None] < torch.tensor([7, 10, 2, 0])[:, None]).float()
    h = era_response_entropy(ent, mask)
    assert h.dtype == F64 and h.tolist() == pytest.approx([4.0, 9.5, 0.7, 0.0])
    assert era_response_entropy(ent, mask, top_frac=0.5).tolist() == pytest.approx([3.0, 8.0, 0.7, 0.0])  # k 3, 5, 1
    assert era_response_entropy(ent, mask, top_frac=1.0)[1].item() == pytest.approx(5.5)


def test_top_count_is_the_reference_truncation():
    """max(1, floor(0.2 L)) in float64 is the reference's (0.2 * length).long() (a float32 product)
    for every response length up to 40k tokens."""
    L = torch.arange(0, 40001)
    ours = torch.floor(0.2 * L.double()).long()
    assert torch.equal(ours, (0.2 * L).long()) and torch.equal(ours, L // 5)


def test_modes_and_advantage_weight_by_hand():
    h = torch.tensor([0.3, 1.0, 3.5, 0.2, 0.45, 3.0], dtype=F64)
    adv = torch.tensor([1.0, 1.0, 0.5, -1.0, 1.0, 1.0])[:, None].expand(6, 3).clone()
    adv[0, 2] = 0.0
    mask = torch.ones(6, 3)
    mask[2, 2] = 0
    sharp, flat = era_modes(h, adv, mask, low=0.45, high=3.0)
    assert sharp.tolist() == [[True, True, False]] + [[False] * 3] * 5  # A = 0 token left alone; 0.45 is not below
    assert flat.tolist() == [[False] * 3] * 2 + [[True, True, False]] + [[False] * 3] * 3  # 3.0 is not above
    w = era_advantage_weight(sharp, flat, k=2.0, dtype=torch.float32)
    assert w[0].tolist() == [0.5, 0.5, 1.0] and w[2].tolist() == [2.0, 2.0, 1.0] and (w[3:] == 1).all()
    scaled = torch.stack([torch.full((6, 3), -0.5), torch.full((6, 3), -3.0)], -1)
    lp = era_logp(torch.full((6, 3), -1.0), scaled, sharp, flat)
    assert lp[0].tolist() == [-0.5, -0.5, -1.0] and lp[2].tolist() == [-3.0, -3.0, -1.0] and (lp[3:] == -1).all()


def _problem(seed=0, n=6, T=10, V=9):
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, T, V, generator=g, dtype=F64)
    z[0] *= 4.0  # a confident response (low entropy) ...
    z[3] *= 0.1  # ... and a near-uniform one (high entropy)
    old = z + 0.3 * torch.randn(n, T, V, generator=g, dtype=F64)
    labels = torch.multinomial(torch.softmax(z.reshape(-1, V), -1), 1, generator=g).view(n, T)
    lengths = torch.tensor([10, 7, 10, 4, 9, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F64)
    seq_adv = torch.tensor([0.9, 0.7, -1.1, 0.6, 0.4, -1.3])
    return z, old, labels, mask, seq_adv[:, None].expand(n, T) * mask


LOW, HIGH = 1.2, 2.1  # on _problem: response 0 below LOW, response 3 above HIGH, the others between


def _ours(z, old_z, labels, mask, adv, objective, reg, rows_per_micro=None, on_policy=True):
    """ERA.prepare on the whole mini-batch (the current entropy), then shape + objective per
    micro-batch, token-mean; old log-probs of the raw old policy (the current one on policy)."""
    zz = z.clone().requires_grad_(True)
    lp = token_logprobs(zz, labels)
    scaled = token_scaled_logprobs(zz, labels, reg.needs_logit_scales)
    old_lp = lp.detach() if on_policy else token_logprobs(old_z, labels)
    ent = token_entropy(z) * mask
    reg.prepare(MiniBatchContext(0, 0, on_policy, lp.detach() * mask, old_lp * mask, adv, mask, None,
                                 old_entropy=ent, entropy=ent))
    n = len(z)
    step = rows_per_micro or n
    total = 0.0
    for s in range(0, n, step):
        r = torch.arange(s, min(n, s + step))
        b = PolicyBatch(r, lp[r], old_lp[r] * mask[r], adv[r], mask[r], scaled_logp=scaled[r])
        sh = TokenShaping.checked(reg.shape(b), b.logp.shape, reg)
        base = objective.token_loss(TokenShaping.redirected_logp([sh], b.logp), b.old_logp, b.advantages, b.mask)
        total = total + aggregate(TokenShaping.combine([sh], base), b.mask, "token-mean", num_tokens=mask.sum())
    (grad,) = torch.autograd.grad(total, zz)
    return total.detach(), grad


def _objective_loop(z, old_z, labels, mask, adv, *, low, high, k, adv_scale, clip_low, clip_high, clip_c,
                    int_gate=False):
    """The paper's objective written as the reference's `era` loss mode, in float64, one token at a
    time: H_resp the mean of the top int(0.2 L) (at least 1) entropies of softmax(z); on the tokens
    with A_t > 0 of a response with H_resp < low the logits times k, with H_resp > high over k, the
    log-prob of the activated softmax; the old log-prob likewise from the old logits and the old
    entropies' decision (compute_log_prob with apply_era); A / k, resp. k A with adv_scale on the
    responses whose first token's A > 0 (update_policy); verl's compute_policy_loss (dual-clip c
    on A < 0), token-mean. `int_gate`: the reference code as written, whose activation reads each
    token's advantage truncated toward 0 (its int64 `advantages_pad`), so only A_t >= 1 activates."""
    zz = z.clone().requires_grad_(True)
    n, T, _ = z.shape
    losses = []

    def factors(logits, row):
        p = torch.softmax(logits[row].detach(), -1)
        ent = [-(p[t] * p[t].log()).sum().item() for t in range(T) if mask[row, t] > 0]
        top = sorted(ent, reverse=True)[:max(1, int(0.2 * len(ent)))]
        h = sum(top) / len(top)
        mode = k if h < low else (1 / k if h > high else 1.0)
        gate = [int(a) if int_gate else a for a in adv[row].tolist()]
        return mode, [mode if g > 0 else 1.0 for g in gate]

    for i in range(n):
        mode, fac = factors(zz, i)
        _, old_fac = factors(old_z, i)
        a_scale = 1 / mode if (adv_scale and float(adv[i, 0]) > 0) else 1.0  # A / k where k z, k A where z / k
        for t in range(T):
            if mask[i, t] == 0:
                continue
            y = int(labels[i, t])
            a = float(adv[i, t]) * a_scale
            lp = torch.log_softmax(zz[i, t] * fac[t], -1)[y]
            old_lp = torch.log_softmax(old_z[i, t] * old_fac[t], -1)[y]
            ratio = torch.exp((lp - old_lp.detach()).clamp(-20, 20))
            l1 = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
            losses.append(torch.minimum(l1, torch.tensor(-a * clip_c, dtype=F64)) if a < 0 else l1)
    loss = sum(losses) / len(losses)
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad


@pytest.mark.parametrize("adv_scale", [True, False])
def test_loss_and_gradient_match_the_objective_loop_on_policy(adv_scale):
    """On policy (the recipes' single update per rollout) with the recipe's clip range (1.0 / 1.0,
    clip_ratio_c 10): PPOClip + ERA's aggregated loss and its gradient w.r.t. the logits equal the
    reference's for micro-batches of 1, 4 and all rows; the two modes act on one response each."""
    z, _, labels, mask, adv = _problem()
    kw = dict(low=LOW, high=HIGH, k=2.0, adv_scale=adv_scale, clip_low=1.0, clip_high=1.0, clip_c=10.0)
    ref_loss, ref_grad = _objective_loop(z, z, labels, mask, adv, **kw)
    obj = PPOClip(clip_low=1.0, clip_high=1.0, dual_clip=10.0)
    for micro in (1, 4, None):
        reg = ERA(low=LOW, high=HIGH, k=2.0, scale_advantages=adv_scale)
        loss, grad = _ours(z, z, labels, mask, adv, obj, reg, micro)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
        m = reg.pop_metrics()
        assert m["reg/era/sharpened_frac"] == pytest.approx(1 / 6) and m["reg/era/flattened_frac"] == pytest.approx(1 / 6)
        assert m["reg/era/low_frac"] == pytest.approx(1 / 6) and m["reg/era/high_frac"] == pytest.approx(1 / 6)
    plain_loss, plain_grad = _ours(z, z, labels, mask, adv, obj, ERA(low=0.0, high=1e9))
    assert (grad - plain_grad).abs().max() > 1e-3  # the activation moved the gradient


def test_positive_advantages_below_one_are_activated_unlike_the_reference_code():
    """A deliberate difference: ERA activates every A_t > 0 token (the paper's objective), where the
    reference code's activation reads the advantage truncated to an integer (an int64 buffer) and so
    only rescales a response with A in (0, 1). On _problem (positive A 0.9 sharpened, 0.6 flattened,
    0.7 and 0.4 between the thresholds) the reference as written is plain GRPO with the advantage
    scaled (A / 2 on response 0, 2 A on response 3); ours moves those two responses' gradient off
    that. With A 1.5 on response 0 the reference activates it too and agrees there."""
    z, _, labels, mask, adv = _problem()
    kw = dict(low=LOW, high=HIGH, k=2.0, adv_scale=True, clip_low=1.0, clip_high=1.0, clip_c=10.0)
    obj = PPOClip(clip_low=1.0, clip_high=1.0, dual_clip=10.0)
    _, grad = _ours(z, z, labels, mask, adv, obj, ERA(low=LOW, high=HIGH, k=2.0))
    _, plain = _ours(z, z, labels, mask, adv, obj, ERA(low=0.0, high=1e9))
    _, paper = _objective_loop(z, z, labels, mask, adv, **kw)
    _, as_written = _objective_loop(z, z, labels, mask, adv, int_gate=True, **kw)
    torch.testing.assert_close(grad, paper, rtol=1e-9, atol=1e-12)
    rescaled = plain.clone()
    rescaled[0] /= 2
    rescaled[3] *= 2
    torch.testing.assert_close(as_written, rescaled, rtol=1e-9, atol=1e-12)  # nothing activated there
    for i in (1, 2, 4, 5):
        torch.testing.assert_close(grad[i], rescaled[i], rtol=1e-9, atol=1e-12)
    for i in (0, 3):  # activated: A' (e_y - softmax(k z)) resp. A' (e_y - softmax(z / k)), not A' (e_y - softmax(z))
        assert (grad[i] - rescaled[i]).norm() > 0.1 * rescaled[i].norm()
    assert (grad - as_written).norm() > 0.1 * as_written.norm()

    adv[0] *= 1.5 / 0.9  # A = 1.5 truncates to 1: the reference activates response 0 as well
    _, grad = _ours(z, z, labels, mask, adv, obj, ERA(low=LOW, high=HIGH, k=2.0))
    _, as_written = _objective_loop(z, z, labels, mask, adv, int_gate=True, **kw)
    torch.testing.assert_close(as_written[0], grad[0], rtol=1e-9, atol=1e-12)
    assert (grad[3] - as_written[3]).norm() > 0.1 * as_written[3].norm()


def test_off_policy_ratio_is_the_raw_policys():
    """Off policy our gradient on a modified token is -A' r grad log pi'(y), r = pi / pi_old of the
    raw policies (the paper's E_{a ~ pi}[A' log pi'(a)] for samples of pi_old), the clip decided on
    r; the reference's ratio is pi' / pi'_old of the activated ones: the two differ here, and agree
    on policy (test above)."""
    z, old, labels, mask, adv = _problem(seed=1)
    obj = PPOClip(clip_low=0.2, clip_high=0.2, dual_clip=None, logratio_clamp=None)
    reg = ERA(low=LOW, high=HIGH, k=2.0)
    loss, grad = _ours(z, old, labels, mask, adv, obj, reg, 4, on_policy=False)
    m = reg.pop_metrics()
    assert m["reg/era/sharpened_frac"] > 0 and m["reg/era/flattened_frac"] > 0
    # oracle, one token at a time
    zz = z.clone().requires_grad_(True)
    ent = token_entropy(z) * mask
    h = era_response_entropy(ent, mask)
    terms = []
    for i in range(len(z)):
        factor = 2.0 if (h[i] < LOW and adv[i, 0] > 0) else (0.5 if (h[i] > HIGH and adv[i, 0] > 0) else 1.0)
        lp_act = torch.log_softmax(zz[i] * factor, -1)
        lp_raw = torch.log_softmax(zz[i], -1)
        old_raw = torch.log_softmax(old[i], -1)
        for t in range(z.shape[1]):
            if mask[i, t] == 0:
                continue
            y, a = int(labels[i, t]), float(adv[i, t]) / factor
            r = torch.exp(lp_raw[t, y] - old_raw[t, y]).detach()
            clipped = (a > 0 and r > 1.2) or (a < 0 and r < 0.8)
            value = max(-a * r.item(), -a * min(max(r.item(), 0.8), 1.2))
            surrogate = 0.0 if clipped else -a * r * lp_act[t, y]
            terms.append(value + surrogate - (surrogate.detach() if torch.is_tensor(surrogate) else 0.0))
    oracle = sum(terms) / len(terms)
    (oracle_grad,) = torch.autograd.grad(oracle, zz)
    assert loss.item() == pytest.approx(float(oracle.detach()), rel=1e-10)
    torch.testing.assert_close(grad, oracle_grad, rtol=1e-9, atol=1e-12)
    _, ref_grad = _objective_loop(z, old, labels, mask, adv, low=LOW, high=HIGH, k=2.0, adv_scale=True, clip_low=0.2,
                                  clip_high=0.2, clip_c=1e9)
    assert (grad - ref_grad).abs().max() > 1e-4


def test_composes_with_gspo():
    """GSPO reads the redirected log-probs like any objective: the activation moves its gradient."""
    z, old, labels, mask, adv = _problem(seed=2)
    _, grad = _ours(z, old, labels, mask, adv, GSPO(), ERA(low=LOW, high=HIGH))
    _, plain = _ours(z, old, labels, mask, adv, GSPO(), ERA(low=0.0, high=1e9))
    assert plain.abs().max() > 1e-3
    assert (grad - plain).abs().max() > 1e-4


def test_stacked_with_simko_the_two_redirections_add():
    """ERA and SimKO both redirect a token's gradient with a value-0 logp_grad term; on a token both
    act on (A > 0, a response ERA flattens, high entropy for SimKO) the terms add, each against the
    raw log-prob: with the objective's coefficient g = dL/dlogp, the logits' gradient is
    g ((e_y - p') / k - c (e_y - p) + c / K sum_k (e_topk - p)), softmax derivatives by hand with
    p = softmax(z), p' = softmax(z / k); SimKO's mix is not rebuilt on ERA's activated log-prob,
    g ((1 - c) (e_y - p') / k + c / K sum_k (e_topk - p') / k). PPOClip on policy, token-mean over
    2 tokens, A = 1, ERA's advantage scale k: g = -k / 2."""
    from lit_covrl.algorithms import token_topk_logprobs
    from lit_covrl.regularizers import SimKO

    z = torch.tensor([[[1.0, 0.5, 0.0, -0.5], [6.0, 0.0, 0.0, 0.0]]], dtype=F64)  # token 0: the higher entropy
    labels = torch.tensor([[1, 0]])
    k, c, K = 2.0, 0.5, 2
    mask, adv = torch.ones(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)
    era, simko = ERA(low=0.0, high=0.1, k=k), SimKO(top_k=K, mix_topk_coef=c, tau=0.5)
    zz = z.clone().requires_grad_(True)
    lp, top, top1 = token_topk_logprobs(zz, labels, K)
    scaled = token_scaled_logprobs(zz, labels, era.needs_logit_scales)
    ent = token_entropy(z)
    era.prepare(MiniBatchContext(0, 0, True, lp.detach(), lp.detach(), adv, mask, None, old_entropy=ent, entropy=ent))
    b = PolicyBatch(torch.arange(1), lp, lp.detach(), adv, mask, ent, topk_logp=top, top1=top1, scaled_logp=scaled)
    shapings = [era.shape(b), simko.shape(b)]
    base = PPOClip().token_loss(TokenShaping.redirected_logp(shapings, lp), b.old_logp, adv, mask)
    loss = aggregate(TokenShaping.combine(shapings, base), mask, "token-mean", num_tokens=mask.sum())
    (grad,) = torch.autograd.grad(loss, zz)

    e = torch.eye(4, dtype=F64)
    p, p_act = torch.softmax(z[0], -1), torch.softmax(z[0] / k, -1)
    g = -k / 2
    mix = (e[[0, 1]] - p[0]).mean(0)  # the top-2 of token 0 are tokens 0 and 1
    summed = g * ((e[1] - p_act[0]) / k - c * (e[1] - p[0]) + c * mix)
    torch.testing.assert_close(grad[0, 0], summed)
    torch.testing.assert_close(grad[0, 1], g * (e[0] - p_act[1]) / k)  # token 1: ERA's alone (low entropy)
    rebuilt = g * ((1 - c) * (e[1] - p_act[0]) / k + c * (e[[0, 1]] - p_act[0]).mean(0) / k)
    assert (grad[0, 0] - rebuilt).abs().max() > 0.05


def test_settings_checked_at_start_up():
    bad = [("low", -0.1), ("low", math.nan), ("low", True), ("high", math.inf), ("high", "3"), ("k", 0.5),
           ("k", 0.0), ("k", math.inf), ("top_frac", 0.0), ("top_frac", 1.5), ("scale_advantages", 1)]
    for field, value in bad:
        with pytest.raises(ValueError, match=rf"ERA\.{field}="):
            ERA(**{field: value})
    with pytest.raises(ValueError, match=r"ERA\.high=0.3 is invalid: must be >= ERA.low \(0.45\)"):
        ERA(high=0.3)
    reg = ERA()
    assert (reg.low, reg.high, reg.k, reg.top_frac, reg.scale_advantages, reg.name) == (0.45, 3.0, 2.0, 0.2, True, "era")
    assert reg.needs_logit_scales == (2.0, 0.5) and reg.needs_current_entropy


def test_module_fit_acts_and_is_plain_grpo_when_no_response_is_modified(tiny_model_dir):
    """Through GRPOModule (4 updates, the later ones off policy): thresholds that modify no
    response end on the plain run's weights to the bit (the scaled log-probs' pass changes
    nothing); thresholds inside the tiny model's response entropies (~2.78 nats) sharpen some
    positive responses and flatten others, and move the weights."""
    from tests.test_module import _one_rl_step_weights

    plain_w, plain_m = _one_rl_step_weights(tiny_model_dir, 3, list)
    off_w, off_m = _one_rl_step_weights(tiny_model_dir, 3, lambda: [ERA(low=0.0, high=1e9)])
    on_w, on_m = _one_rl_step_weights(tiny_model_dir, 3, lambda: [ERA(low=2.75, high=2.8)])
    assert all(torch.equal(off_w[k], plain_w[k]) for k in plain_w)
    assert off_m["policy/loss"] == plain_m["policy/loss"] and off_m["reg/era/sharpened_frac"] == 0
    assert on_m["reg/era/sharpened_frac"] > 0 and on_m["reg/era/flattened_frac"] > 0 and on_m["reg/era/loss"] != 0
    assert 2 < on_m["reg/era/response_entropy"] < 3.5
    assert max((on_w[k] - plain_w[k]).abs().max().item() for k in plain_w) > 1e-5


def test_era_config_runs_through_the_cli(tmp_path):
    """configs/cpu/era.yaml on the quickstart through `lit-covrl fit` (thresholds around the
    untrained model's response entropies on the command line, so that 4 prompts' responses are
    modified): ERA is built from the YAML and its tags are written every step."""
    from pathlib import Path

    from lit_covrl.cli import main
    from tests.helpers import scalar_tags

    root = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(root / "configs/quickstart.yaml"), "--config", str(root / "configs/cpu/era.yaml"),
          "--torch_threads", "1", "--data.batch_size", "4", "--model.update.mini_batch_size", "2",
          "--model.rollout.filter_groups", "false", "--trainer.callbacks.init_args.low", "5.0",
          "--trainer.callbacks.init_args.high", "5.0",
          "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--checkpoint.dirpath", str(tmp_path / "ck"), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    tags = {k: [v for _, v in series] for k, series in scalar_tags(tmp_path).items()}
    keys = ("reg/era/sharpened_frac", "reg/era/flattened_frac", "reg/era/response_entropy", "reg/era/loss")
    assert set(keys) <= set(tags) and all(len(tags[k]) == 3 for k in keys)
    assert any(v > 0 for v in tags["reg/era/sharpened_frac"]) and any(v != 0 for v in tags["reg/era/loss"])
