"""SimKO (Peng et al. 2025, arXiv 2510.14807): the token sets by hand, the composed loss's value
and gradient against a float64 loop of the reference code's formula (CLR-Lab/SimKO,
compute_policy_loss_simko), the mix under CISPO, the start-up refusals, a fit that acts."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import aggregate, simko_logp_grad, simko_tokens, token_entropy, token_topk_logprobs
from lit_covrl.objectives import CEGPPO, CISPO, GSPO, PPOClip
from lit_covrl.regularizers import SimKO
from lit_covrl.regularizers.base import check_objective_stack
from lit_covrl.types import PolicyBatch, TokenShaping

F64 = torch.float64


def test_token_sets_by_hand():
    # one response of 5 valid tokens (entropies 1..5, 0.6 quantile = 3 + 0.4 = 3.4: tokens 4 and 5
    # are high), a padded 6th; the same entropies with A < 0, where only a high token sampled as
    # top-1 counts (token 4 is not the top-1); A = 0: neither
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0, 9.0]])
    mask = torch.tensor([[1.0] * 5 + [0.0]] * 3)
    adv = torch.tensor([[0.5] * 6, [-0.5] * 6, [0.0] * 6])
    top1 = torch.tensor([[True, True, True, False, True, True]] * 3)
    mixed, penalized = simko_tokens(ent, mask, adv, top1, tau=0.6)
    assert mixed.tolist() == [[False, False, False, True, True, False], [False] * 6, [False] * 6]
    assert penalized.tolist() == [[False] * 6, [False, False, False, False, True, False], [False] * 6]
    assert simko_tokens(ent, mask, adv, top1, tau=0.8)[0][0].tolist() == [False] * 4 + [True, False]  # 4.2
    assert not simko_tokens(ent, mask, adv, top1, tau=1.0)[0].any()  # the maximum itself is not above it
    assert simko_tokens(ent, mask, adv, top1, tau=0.0)[0][0].tolist() == [False, True, True, True, True, False]


def test_logp_grad_is_zero_valued_and_moves_the_gradient_by_hand():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    top = torch.tensor([[[-0.5, -1.0, -1.5], [-0.1, -2.0, -3.0]]], requires_grad=True)
    g = simko_logp_grad(logp, top, torch.tensor([[True, False]]), coef=0.3)
    assert torch.equal(g, torch.zeros(1, 2))
    (g * torch.tensor([[2.0, 5.0]])).sum().backward()  # coefficient 2 on the mixed token, 5 on the other
    assert logp.grad.flatten().tolist() == pytest.approx([-0.6, 0.0])  # -coef * 2
    assert top.grad.flatten().tolist() == pytest.approx([0.2, 0.2, 0.2, 0.0, 0.0, 0.0])  # coef / K * 2


def _problem(seed=0, n=6, T=10, V=7):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, T, V, generator=g, dtype=F64)
    old = z + 0.4 * torch.randn(n, T, V, generator=g, dtype=F64)  # off policy: ratios leave [0.8, 1.2]
    labels = torch.multinomial(torch.softmax(z.reshape(-1, V), -1), 1, generator=g).view(n, T)
    lengths = torch.tensor([10, 7, 10, 4, 9, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F64)
    seq_adv = torch.tensor([0.9, -0.7, -1.1, 0.6, -0.4, 1.3])  # rewards 1, 0, 0, 1, 0, 1 in the reference's terms
    return z, old, labels, mask, seq_adv[:, None].expand(n, T) * mask


def _ours(z, old, labels, mask, adv, objective, reg, K):
    zz = z.clone().requires_grad_(True)
    lp, top, top1 = token_topk_logprobs(zz, labels, K)
    old_lp = torch.log_softmax(old, -1).gather(-1, labels[..., None]).squeeze(-1)
    ent = token_entropy(zz)
    b = PolicyBatch(torch.arange(len(z)), lp, old_lp, adv, mask, ent, topk_logp=top, top1=top1)
    s = reg.shape(b)
    base = objective.token_loss(TokenShaping.redirected_logp([s], lp), old_lp, adv, mask)
    loss = aggregate(TokenShaping.combine([s], base), mask, "token-mean", num_tokens=mask.sum())
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad, s


def _reference_loop(z, old, labels, mask, adv, K, coef, tau, scale, clip=0.2):
    """compute_policy_loss_simko of CLR-Lab/SimKO (verl/trainer/ppo/core_algos.py), one token at a
    time in float64: top-K of the current and of the old policy's logits, r_k = sg(r) /
    (sg(exp(topk - old_topk)) + 1e-8) * exp(topk - old_topk), the mixed ratio on reward-1 responses'
    tokens above the response's tau quantile of entropy, A x 1.1 on A < 0 responses' high tokens
    sampled as the argmax, PPO clip, masked mean."""
    zz = z.clone().requires_grad_(True)
    n, T, V = z.shape
    total, count = 0.0, 0.0
    for i in range(n):
        valid = [t for t in range(T) if mask[i, t] > 0]
        ents = []
        for t in valid:
            p = torch.softmax(z[i, t], -1)
            ents.append(float(-(p * torch.log(p)).sum()))
        threshold = torch.quantile(torch.tensor(ents, dtype=F64), tau).item()
        correct = float(adv[i, valid[0]]) > 0  # token_level_scores.sum() == 1
        for t, h in zip(valid, ents):
            ls = torch.log_softmax(zz[i, t], -1)
            old_ls = torch.log_softmax(old[i, t], -1)
            y = int(labels[i, t])
            r = torch.exp(ls[y] - old_ls[y])
            high = h > threshold
            ratio = r
            if correct and high:
                cur_idx = torch.topk(zz[i, t].detach(), K).indices
                old_idx = torch.topk(old[i, t], K).indices
                terms = 0.0
                for k in range(K):
                    d = ls[cur_idx[k]] - old_ls[old_idx[k]]
                    terms = terms + (r.detach() / (torch.exp(d.detach()) + 1e-8)) * torch.exp(d)
                ratio = (1 - coef) * r + coef / K * terms
            a = float(adv[i, t])
            if a < 0 and high and int(torch.argmax(z[i, t])) == y:
                a = a * scale
            total = total + torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip))
            count += 1
    loss = total / count
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad


@pytest.mark.parametrize("K,coef,tau,scale", [(3, 0.01, 0.8, 1.1), (2, 0.5, 0.5, 2.0), (1, 1.0, 0.0, 1.0)])
def test_ppo_loss_and_gradient_match_the_reference_formula(K, coef, tau, scale):
    """PPOClip (the reference's objective, no log-ratio clamp) + SimKO: the aggregated loss and its
    gradient w.r.t. the logits equal the reference's, to its 1e-8 in r_k's denominator (an
    error a wrong mix, set or aggregation makes is of order 1e-2 here: the last assertion)."""
    z, old, labels, mask, adv = _problem()
    reg = SimKO(top_k=K, mix_topk_coef=coef, tau=tau, incorrect_top1_scale=scale)
    loss, grad, s = _ours(z, old, labels, mask, adv, PPOClip(logratio_clamp=None), reg, K)
    ref_loss, ref_grad = _reference_loop(z, old, labels, mask, adv, K, coef, tau, scale)
    mixed, penalized = simko_tokens(token_entropy(z), mask, adv, token_topk_logprobs(z, labels, 1)[2], tau=tau)
    assert mixed.any() and (tau == 0.0 or not mixed[mask.bool() & (adv > 0)].all())
    if scale != 1.0:
        assert penalized.any()
    # the reference's r_k is r exp(d) / (exp(d) + 1e-8), d = log pi(top_k) - log pi_old(old top_k):
    # relative 1e-8 / exp(d), a few 1e-7 where the old policy's top candidate was far likelier
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    plain, plain_grad, _ = _ours(z, old, labels, mask, adv, PPOClip(logratio_clamp=None),
                                 SimKO(top_k=K, mix_topk_coef=0.0, tau=tau, incorrect_top1_scale=1.0), K)
    assert (grad - plain_grad).abs().max() > 1e-4  # SimKO moved the gradient


def test_cispo_mix_is_the_objective_coefficient_times_the_mixed_gradient():
    """Under CISPO (-sg(clip(r)) A log pi per token) the mixed tokens' gradient is
    -sg(clip(r)) A ((1 - c) grad log pi(y) + c / K sum_k grad log pi(top_k)); the penalized ones
    weigh 1.1; the loss's value is CISPO's with those weights."""
    z, old, labels, mask, adv = _problem(seed=1)
    K, coef = 3, 0.25
    reg = SimKO(top_k=K, mix_topk_coef=coef, tau=0.5)
    loss, grad, s = _ours(z, old, labels, mask, adv, CISPO(logratio_clamp=None), reg, K)
    mixed, penalized = simko_tokens(token_entropy(z), mask, adv, token_topk_logprobs(z, labels, 1)[2], tau=0.5)
    assert mixed.any() and penalized.any()
    zz = z.clone().requires_grad_(True)
    total = 0.0
    for i, t in mask.nonzero().tolist():
        ls = torch.log_softmax(zz[i, t], -1)
        y = int(labels[i, t])
        w = torch.exp(ls[y].detach() - torch.log_softmax(old[i, t], -1)[y]).clamp(max=1.28)
        a = float(adv[i, t]) * (1.1 if penalized[i, t] else 1.0)
        moved = ls[y]
        if mixed[i, t]:
            top = torch.topk(zz[i, t].detach(), K).indices
            moved = (1 - coef) * ls[y] + coef / K * ls[top].sum()
        total = total - w * a * torch.exp(moved - moved.detach())
    ref = total / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref, zz)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_metrics_are_summed_over_ranks_and_read_the_top1_probability(monkeypatch):
    """reg/simko/* are the whole batch's under DDP, and top1_prob is the largest candidate's
    (topk_logp[..., 0]). Here: per row the 2 tokens above the 0-quantile, row 0 correct (2 mixed),
    row 1 incorrect and top-1 (2 penalized), top-1 probability 0.5 on the 6 tokens; another rank
    adds 6 tokens, none mixed or penalized, of top-1 probability 0.2 each."""
    from lit_covrl import distributed

    n, t = 2, 3
    mask = torch.ones(n, t)
    ent = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.4, 0.8]])
    logp = torch.full((n, t), 0.5).log()
    topk = torch.tensor([0.5, 0.3]).log().expand(n, t, 2).clone()
    reg = SimKO(top_k=2, tau=0.0)
    reg.shape(PolicyBatch(torch.arange(n), logp, logp, torch.tensor([[1.0] * 3, [-1.0] * 3]), mask, ent,
                          topk_logp=topk, top1=torch.ones(n, t, dtype=torch.bool)))
    monkeypatch.setattr(distributed, "all_sum", lambda x: x + torch.tensor([0.0, 0.0, 6 * 0.2, 6.0], dtype=x.dtype))
    m = reg.pop_metrics()
    assert m["reg/simko/mixed_frac"] == pytest.approx(2 / 12)
    assert m["reg/simko/top1_penalized_frac"] == pytest.approx(2 / 12)
    assert m["reg/simko/top1_prob"] == pytest.approx((6 * 0.5 + 6 * 0.2) / 12)


def test_objectives_and_settings_checked_at_start_up():
    for objective in (PPOClip(), CISPO(), CEGPPO()):
        check_objective_stack(objective, [SimKO()])
    with pytest.raises(ValueError, match=r"SimKO \(regularizer 'simko'\).*objective GSPO"):
        check_objective_stack(GSPO(), [SimKO()])
    bad = [("top_k", 0), ("top_k", 2.5), ("top_k", True), ("mix_topk_coef", -0.1), ("mix_topk_coef", 1.5),
           ("tau", 1.2), ("tau", math.nan), ("incorrect_top1_scale", -1.0), ("incorrect_top1_scale", math.inf)]
    for field, value in bad:
        with pytest.raises(ValueError, match=rf"SimKO\.{field}="):
            SimKO(**{field: value})
    reg = SimKO()
    assert (reg.needs_topk, reg.mix_topk_coef, reg.tau, reg.incorrect_top1_scale) == (3, 0.01, 0.8, 1.1)


def test_module_fit_mix_moves_the_weights_and_switched_off_is_plain_grpo(tiny_model_dir):
    """Through GRPOModule (4 updates): SimKO with mix 0 and scale 1 ends on the plain run's weights
    to the bit; its top-K mix alone (scale 1: the loss's value is the objective's) moves them."""
    from tests.test_module import _one_rl_step_weights

    plain_w, plain_m = _one_rl_step_weights(tiny_model_dir, 3, list)
    off_w, off_m = _one_rl_step_weights(tiny_model_dir, 3, lambda: [SimKO(mix_topk_coef=0.0, incorrect_top1_scale=1.0)])
    mix_w, mix_m = _one_rl_step_weights(tiny_model_dir, 3, lambda: [SimKO(mix_topk_coef=0.5, tau=0.5,
                                                                          incorrect_top1_scale=1.0)])
    assert all(torch.equal(off_w[k], plain_w[k]) for k in plain_w)
    assert off_m["policy/loss"] == plain_m["policy/loss"] and off_m["reg/simko/loss"] == 0
    assert mix_m["reg/simko/loss"] == 0 and mix_m["reg/simko/mixed_frac"] > 0  # value-0 term: no loss change
    assert max((mix_w[k] - plain_w[k]).abs().max().item() for k in plain_w) > 1e-4


def test_module_refuses_simko_with_gspo_at_start_up(tiny_model_dir):
    from tests.test_module import _one_rl_step_weights

    with pytest.raises(ValueError, match=r"SimKO \(regularizer 'simko'\).*objective GSPO"):
        _one_rl_step_weights(tiny_model_dir, 64, lambda: [SimKO()], objective=GSPO())


def test_top_k_above_the_vocabulary_is_refused_at_start_up(tmp_path, capsys):
    """SimKO.top_k larger than the policy's vocabulary (the quickstart's tiny model has 16 tokens)
    exits 2 with one line naming the field, before the first rollout (it was a traceback at the
    first update)."""
    from pathlib import Path

    from lit_covrl.cli import main

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(root / "configs/quickstart.yaml"), "--torch_threads", "1",
              "--trainer.callbacks+=lit_covrl.regularizers.SimKO", "--trainer.callbacks.top_k=17",
              "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
              "--checkpoint.dirpath", str(tmp_path / "ck"), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "SimKO.top_k=17 is invalid: must be <= the vocabulary size of the policy model.model=" in err, err
    assert ", 16" in err and "Traceback" not in err


def test_simko_config_runs_through_the_cli(tmp_path):
    """configs/cpu/simko.yaml on the quickstart (its shipped tiny-arith model, which solves some
    prompts: A != 0) through `lit-covrl fit` (a lower tau and a larger top-1 weight on the command
    line, so that the few tokens of 4 prompts show them): SimKO is built from the
    YAML, its tags are written every step from that step's responses, and its top-1 weight
    changes the loss."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/simko.yaml", "--data.batch_size", "4", "--model.update.mini_batch_size",
                        "2", "--model.rollout.filter_groups", "false", "--trainer.callbacks.init_args.tau", "0.3",
                        "--trainer.callbacks.init_args.incorrect_top1_scale", "3.0", steps=2)
    assert {"reg/simko/mixed_frac", "reg/simko/top1_penalized_frac", "reg/simko/top1_prob", "reg/simko/loss"} <= set(tags)
    assert all(len(v) == 2 for k, v in tags.items() if k.startswith("reg/simko/"))
    assert all(0 < f < 1 for f in tags["reg/simko/mixed_frac"])
    assert tags["reg/simko/mixed_frac"][0] != tags["reg/simko/mixed_frac"][1]
    assert any(f > 0 for f in tags["reg/simko/top1_penalized_frac"]) and any(v != 0 for v in tags["reg/simko/loss"])
