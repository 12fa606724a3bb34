"""Lp-Reg (Huang et al. 2025, arXiv 2510.03222): the selection and the KL term by hand, the
composed loss's value and gradient against a float64 loop of the reference code
(CarlanLark/Lp-Reg-dev, compute_policy_loss_lp_reg with the proxy of the current policy, its
minp_old_log_prob=False branch) for micro-batches of 1, 4 and all rows, metrics over ranks,
start-up validation, GSPO, a module fit (plain GRPO at beta 0) and a fit through the CLI whose
tags move. The proxy itself: tests/test_proxy_logprobs.py."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import aggregate, lp_reg_kl, lp_reg_lowest, token_logprobs, token_proxy_logprobs
from lit_covrl.objectives import GSPO, PPOClip
from lit_covrl.regularizers import LpReg
from lit_covrl.regularizers.base import MiniBatchContext, check_stack
from lit_covrl.types import PolicyBatch, TokenShaping

F64 = torch.float64


def test_selection_by_hand():
    logp = torch.tensor([[-1.0, -3.0, -2.0, -5.0], [-4.0, -0.5, -6.0, -7.0]])
    adv = torch.tensor([[-1.0] * 4, [-1.0, -1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    # 7 valid A < 0 tokens: ratio 0.5 -> k = 3, the lowest -6, -5, -4 (the padded -7 is not valid)
    sel = lp_reg_lowest(logp, adv, mask, ratio=0.5, sign=-1)
    assert sel.tolist() == [[False, False, False, True], [True, False, True, False]]
    assert not lp_reg_lowest(logp, adv, mask, ratio=0.2, sign=-1).any()  # k = max(1, 1) = 1: none, as the reference
    assert lp_reg_lowest(logp, adv, mask, ratio=0.3, sign=-1).sum() == 2  # int(2.1) = 2
    assert not lp_reg_lowest(logp, adv, mask, ratio=1.0, sign=1).any()  # one A > 0 token is padding
    mask[1, 3] = 1.0
    assert not lp_reg_lowest(logp, adv, mask, ratio=1.0, sign=1).any()  # k = 1: none
    # ties: position order (row-major), lowest first
    tie = lp_reg_lowest(torch.full((2, 3), -1.0), -torch.ones(2, 3), torch.ones(2, 3), ratio=0.5, sign=-1)
    assert tie.tolist() == [[True, True, True], [False, False, False]]


def test_kl_term_and_gradient_by_hand():
    # token 0: pi 0.1, proxy 0.2 -> k3 = 2 - ln 2 - 1, d/dlogp = 1 - 2 = -1 (raises the token)
    # token 1: not selected; token 2: filtered out (proxy -inf); token 3: proxy == pi (nothing
    # filtered); token 4: proxy e^20 times pi -> clamped at 10, no gradient
    logp = torch.tensor([[math.log(0.1), -1.0, -2.0, -0.5, -20.0]], dtype=F64, requires_grad=True)
    proxy = torch.tensor([[math.log(0.2), 0.0, -math.inf, -0.5, 0.0]], dtype=F64)
    selected = torch.tensor([[True, False, True, True, True]])
    k3, reg = lp_reg_kl(logp, proxy, selected)
    assert reg.tolist() == [[True, False, False, False, True]]
    assert k3[0].tolist() == pytest.approx([1 - math.log(2), 0.0, 0.0, 0.0, 10.0])
    (3.0 * k3).sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-3.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.isfinite(logp.grad).all()


def _problem(seed=0, n=6, T=10, V=9):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, T, V, generator=g, dtype=F64)
    old = z + 0.3 * torch.randn(n, T, V, generator=g, dtype=F64)  # off policy
    labels = torch.multinomial(torch.softmax(z.reshape(-1, V), -1), 1, generator=g).view(n, T)
    lengths = torch.tensor([10, 7, 10, 4, 9, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F64)
    seq_adv = torch.tensor([0.9, -0.7, -1.1, 0.6, -0.4, -1.3])
    return z, old, labels, mask, seq_adv[:, None].expand(n, T) * mask


def _ours(z, old, labels, mask, adv, objective, reg, rows_per_micro=None):
    """LpReg.prepare on the whole mini-batch, then shape + objective per micro-batch, token-mean."""
    zz = z.clone().requires_grad_(True)
    lp = token_logprobs(zz, labels)
    proxy = token_proxy_logprobs(zz, labels, reg.min_p)
    old_lp = torch.log_softmax(old, -1).gather(-1, labels[..., None]).squeeze(-1)
    reg.prepare(MiniBatchContext(0, 0, False, lp.detach() * mask, old_lp * mask, adv, mask, None))
    n = len(z)
    step = rows_per_micro or n
    total = 0.0
    for s in range(0, n, step):
        r = torch.arange(s, min(n, s + step))
        b = PolicyBatch(r, lp[r], old_lp[r], adv[r], mask[r], proxy_logp=proxy[r])
        sh = TokenShaping.checked(reg.shape(b), b.logp.shape, reg)
        base = objective.token_loss(b.logp, b.old_logp, b.advantages, b.mask)
        total = total + aggregate(TokenShaping.combine([sh], base), b.mask, "token-mean", num_tokens=mask.sum())
    (grad,) = torch.autograd.grad(total, zz)
    return total.detach(), grad


def _reference_loop(z, old, labels, mask, adv, *, min_p, neg_ratio, pos_ratio, beta, clip_low, clip_high):
    """compute_policy_loss_lp_reg (CarlanLark/Lp-Reg-dev, core_algos.py) in float64, the proxy
    (tgt_log_prob) from the current logits as its minp_old_log_prob=False branch: apply_min_p sets
    the logits of tokens with p < min_p max p to -1e4, log-softmax; per sign the k = max(1,
    int(n ratio)) lowest current log-probs of the valid tokens (selected only if k > 1), of which
    those with log_prob < tgt get -A r + beta * clamp(low_var_kl, -10, 10) in place of the clipped
    surrogate max(-A r, -A clip(r)); token-mean."""
    zz = z.clone().requires_grad_(True)
    n, T, V = z.shape
    ls = torch.log_softmax(zz, -1)
    lp = ls.gather(-1, labels[..., None]).squeeze(-1)
    old_lp = torch.log_softmax(old, -1).gather(-1, labels[..., None]).squeeze(-1)
    filtered = z.detach().clone()
    p = torch.softmax(filtered, -1)
    filtered[p < min_p * p.amax(-1, keepdim=True)] = -1e4
    tgt = torch.log_softmax(filtered, -1).gather(-1, labels[..., None]).squeeze(-1)
    ratio = torch.exp(lp - old_lp)
    losses = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    losses = [[losses[i, t] for t in range(T)] for i in range(n)]
    valid = [(i, t) for i in range(n) for t in range(T) if mask[i, t] > 0]
    for sign, frac in ((1, pos_ratio), (-1, neg_ratio)):
        idx = [(i, t) for i, t in valid if (adv[i, t] > 0 if sign > 0 else adv[i, t] < 0)]
        k = max(1, int(len(idx) * frac))
        if not idx or k <= 1:
            continue
        idx.sort(key=lambda it: float(lp[it].detach()))
        for i, t in idx[:k]:
            if float(lp[i, t].detach()) < float(tgt[i, t]):
                kl = tgt[i, t] - lp[i, t]
                kld = (torch.exp(kl) - kl - 1).clamp(-10, 10)
                losses[i][t] = -adv[i, t] * ratio[i, t] + beta * kld
    loss = sum(losses[i][t] for i, t in valid) / len(valid)
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad


@pytest.mark.parametrize("min_p,neg_ratio,pos_ratio,beta", [(0.02, 0.2, 0.0, 1.0), (0.1, 0.5, 0.3, 0.5),
                                                            (0.3, 1.0, 1.0, 2.0)])
def test_loss_and_gradient_match_the_reference_loop(min_p, neg_ratio, pos_ratio, beta):
    """PPOClip with the recipe's range (1.0 / 9.0, no dual-clip, no log-ratio clamp) + LpReg: the
    aggregated loss and its gradient w.r.t. the logits equal the reference's, whose unclipped
    -A r on the regularized tokens is the clipped one under that range on A < 0 tokens (and, at
    these ratios, on A > 0 ones); micro-batches of 1, 4 and all rows alike."""
    z, old, labels, mask, adv = _problem()
    obj = PPOClip(clip_low=1.0, clip_high=9.0, dual_clip=None, logratio_clamp=None)
    ref_loss, ref_grad = _reference_loop(z, old, labels, mask, adv, min_p=min_p, neg_ratio=neg_ratio,
                                         pos_ratio=pos_ratio, beta=beta, clip_low=1.0, clip_high=9.0)
    for micro in (1, 4, None):
        reg = LpReg(beta=beta, min_p=min_p, neg_ratio=neg_ratio, pos_ratio=pos_ratio)
        loss, grad = _ours(z, old, labels, mask, adv, obj, reg, micro)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
        m = reg.pop_metrics()
        assert m["reg/lp_reg/regularized_frac"] > 0 and m["reg/lp_reg/kl"] > 0
    plain, plain_grad = _ours(z, old, labels, mask, adv, obj, LpReg(beta=0.0, min_p=min_p, neg_ratio=neg_ratio))
    assert (grad - plain_grad).abs().max() > 1e-4  # the term moved the gradient


def test_metrics_are_summed_over_ranks(monkeypatch):
    """regularized_frac and kl are the whole batch's under DDP: one token of 4 here (k3 = 1 - ln 2),
    another rank with 4 tokens, one regularized with k3 0.5."""
    from lit_covrl import distributed

    reg = LpReg(min_p=0.02, neg_ratio=1.0)
    reg.selected = torch.tensor([[True, True, False, False]])
    logp = torch.tensor([[math.log(0.1), -1.0, -1.0, -1.0]])
    reg.shape(PolicyBatch(torch.arange(1), logp, logp, -torch.ones(1, 4), torch.ones(1, 4),
                          proxy_logp=torch.tensor([[math.log(0.2), -1.0, 0.0, 0.0]])))
    monkeypatch.setattr(distributed, "all_sum", lambda x: x + torch.tensor([1.0, 0.5, 4.0], dtype=x.dtype))
    m = reg.pop_metrics()
    assert m["reg/lp_reg/regularized_frac"] == pytest.approx(2 / 8)
    assert m["reg/lp_reg/kl"] == pytest.approx((1 - math.log(2) + 0.5) / 2, rel=1e-6)


def test_settings_checked_at_start_up():
    bad = [("beta", -0.1), ("beta", math.inf), ("beta", True), ("min_p", 0.0), ("min_p", 1.5), ("min_p", math.nan),
           ("neg_ratio", -0.01), ("neg_ratio", 1.1), ("pos_ratio", 2.0), ("pos_ratio", "0.1")]
    for field, value in bad:
        with pytest.raises(ValueError, match=rf"LpReg\.{field}="):
            LpReg(**{field: value})
    reg = LpReg()
    assert (reg.beta, reg.needs_min_p, reg.neg_ratio, reg.pos_ratio, reg.name) == (1.0, 0.02, 0.01, 0.0, "lp_reg")
    check_stack([LpReg(), LpReg(name="lp_reg_2", neg_ratio=0.5)])  # one threshold: fine
    with pytest.raises(ValueError, match=r"min-p proxies of different thresholds \('lp_reg' \(0.02\), 'b' \(0.1\)\)"):
        check_stack([LpReg(), LpReg(min_p=0.1, name="b")])


def test_composes_with_gspo():
    """An additive per-token penalty: GSPO's sequence-level loss takes it like any other."""
    z, old, labels, mask, adv = _problem(seed=2)
    loss, grad = _ours(z, old, labels, mask, adv, GSPO(), LpReg(neg_ratio=0.5))
    plain, plain_grad = _ours(z, old, labels, mask, adv, GSPO(), LpReg(beta=0.0, neg_ratio=0.5))
    assert loss > plain and (grad - plain_grad).abs().max() > 1e-4


def test_module_fit_acts_and_is_plain_grpo_at_beta_zero(tiny_model_dir):
    """Through GRPOModule (4 updates): LpReg with beta 0 ends on the plain run's weights to the bit
    (the proxy pass changes nothing); with beta > 0 its term is in the loss and moves them."""
    from tests.test_module import _one_rl_step_weights

    plain_w, plain_m = _one_rl_step_weights(tiny_model_dir, 3, list)
    off_w, off_m = _one_rl_step_weights(tiny_model_dir, 3, lambda: [LpReg(beta=0.0, min_p=0.5, neg_ratio=0.5)])
    on_w, on_m = _one_rl_step_weights(tiny_model_dir, 3, lambda: [LpReg(beta=1.0, min_p=0.5, neg_ratio=0.5)])
    assert all(torch.equal(off_w[k], plain_w[k]) for k in plain_w)
    assert off_m["policy/loss"] == plain_m["policy/loss"] and off_m["reg/lp_reg/loss"] == 0
    assert on_m["reg/lp_reg/loss"] > 0 and on_m["reg/lp_reg/regularized_frac"] > 0
    assert 0 < on_m["reg/lp_reg/selected_frac"] < 1
    assert max((on_w[k] - plain_w[k]).abs().max().item() for k in plain_w) > 1e-5


def test_lp_reg_config_runs_through_the_cli(tmp_path):
    """configs/cpu/lp_reg.yaml on the quickstart through `lit-covrl fit` (a larger neg_ratio and
    min_p on the command line, so that the few tokens of 4 prompts are regularized): LpReg is built
    from the YAML, its tags are written every step and its term enters the loss."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/lp_reg.yaml", "--data.batch_size", "4", "--model.update.mini_batch_size",
                        "2", "--model.rollout.filter_groups", "false", "--trainer.callbacks.init_args.neg_ratio", "0.5",
                        "--trainer.callbacks.init_args.min_p", "0.1")
    assert {"reg/lp_reg/selected_frac", "reg/lp_reg/regularized_frac", "reg/lp_reg/loss"} <= set(tags)
    assert all(len(tags[k]) == 3 for k in ("reg/lp_reg/selected_frac", "reg/lp_reg/regularized_frac", "reg/lp_reg/loss"))
    assert any(v > 0 for v in tags["reg/lp_reg/loss"]) and any(v > 0 for v in tags["reg/lp_reg/regularized_frac"])


def test_lp_reg_lowest_counts_only_valid_tokens_with_broadcast_advantages():
    """The learner broadcasts each sequence's advantage over all T columns, padding included
    (packing.py: advantages[idx, None].expand_as(mask)): padded columns must not count towards n
    (k = int(n ratio)) nor be picked. 3 valid A < 0 tokens at ratio 0.5 -> k = 1 -> none; counting
    the 3 padded columns too would give k = 3."""
    logp = torch.tensor([[-1.0, -2.0, -3.0, -9.0, -9.0, -9.0]])
    adv = torch.full((1, 6), -1.0)  # one sequence's advantage, broadcast
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    assert not lp_reg_lowest(logp, adv, mask, ratio=0.5, sign=-1).any()
    # 4 valid tokens at ratio 0.5: k = 2, the two lowest valid ones, never a padded column
    mask[0, 3] = 1.0
    logp[0, 3] = -0.5
    assert lp_reg_lowest(logp, adv, mask, ratio=0.5, sign=-1).tolist() == [[False, True, True, False, False, False]]


def test_lp_reg_lowest_breaks_ties_by_position_on_a_large_batch():
    """bf16 log-probs tie often; ties go by position (the docstring's promise, and what makes the
    selection the same on 1 and 2 processes). A CPU sort that is not stable reorders ties from ~100 items."""
    logp = torch.full((4, 100), -1.0)
    logp[:, ::3] = -2.0  # 136 tokens at -2, 264 at -1: k = 200 takes every -2 and the first 64 -1s
    sel = lp_reg_lowest(logp, -torch.ones(4, 100), torch.ones(4, 100), ratio=0.5, sign=-1)
    flat_sel, flat = sel.flatten(), logp.flatten()
    assert bool(flat_sel[flat == -2.0].all())
    ones = flat_sel[flat == -1.0]
    assert int(ones.sum()) == 64 and bool(ones[:64].all())  # the first 64 in row-major order


def test_lp_reg_lowest_leaves_zero_advantage_tokens_out():
    """A = 0 (a zero-variance group kept with filter_groups false) is neither sign: those tokens are
    not counted in n and never regularized, however low their log-prob."""
    logp = torch.tensor([[-9.0, -8.0, -7.0, -1.0, -2.0, -3.0, -4.0]])
    adv = torch.tensor([[0.0, 0.0, 0.0, -1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 7)
    # 2 A < 0 tokens at ratio 1.0: k = 2 -> both; counting the zeros would give k = 5 and pick them
    assert lp_reg_lowest(logp, adv, mask, ratio=1.0, sign=-1).tolist() == [[False] * 3 + [True, True, False, False]]
    assert lp_reg_lowest(logp, adv, mask, ratio=1.0, sign=1).tolist() == [[False] * 5 + [True, True]]
    # 2 A < 0 tokens at ratio 0.5: k = 1 -> none (with the zeros counted: k = 2, two of them picked)
    assert not lp_reg_lowest(logp, adv, mask, ratio=0.5, sign=-1).any()


def _lp_ctx(logp, adv, mask):
    from lit_covrl.regularizers.base import MiniBatchContext

    return MiniBatchContext(0, 0, True, logp * mask, logp, adv, mask, None)


def test_lp_reg_selected_frac_by_hand():
    """selected_frac is the selected share of the valid tokens: 4 A < 0 of 8 valid at neg_ratio
    0.5 -> k = 2 -> 2 / 8."""
    import pytest

    from lit_covrl.regularizers import LpReg

    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -0.5], [-5.0, -6.0, -7.0, -8.0, -9.0]])
    adv = torch.tensor([[-1.0] * 5, [1.0] * 5])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    reg = LpReg(neg_ratio=0.5)
    reg.prepare(_lp_ctx(logp, adv, mask))
    assert reg.selected.tolist() == [[False, False, True, True, False], [False] * 5]
    assert reg.pop_metrics()["reg/lp_reg/selected_frac"] == pytest.approx(2 / 8)


def test_lp_reg_step_metrics_restart_each_step():
    """regularized_frac and kl are one step's: pop_metrics starts the next step from zero."""
    import math

    import pytest

    from lit_covrl.regularizers import LpReg
    from lit_covrl.types import PolicyBatch

    reg = LpReg(min_p=0.02, neg_ratio=1.0)
    logp = torch.tensor([[math.log(0.1), -1.0, -1.0, -1.0]])
    batch = PolicyBatch(torch.arange(1), logp, logp, -torch.ones(1, 4), torch.ones(1, 4),
                        proxy_logp=torch.tensor([[math.log(0.2), -1.0, 0.0, 0.0]]))
    reg.selected = torch.tensor([[True, True, False, False]])  # step 1: one token regularized of 4
    reg.shape(batch)
    assert reg.pop_metrics()["reg/lp_reg/regularized_frac"] == pytest.approx(1 / 4)
    reg.selected = torch.zeros(1, 4, dtype=torch.bool)  # step 2: none
    reg.shape(batch)
    m = reg.pop_metrics()
    assert m.get("reg/lp_reg/regularized_frac", 0.0) == 0.0 and "reg/lp_reg/kl" not in m


def test_lp_reg_selects_on_the_current_log_probs_after_an_update(tiny_model_dir):
    """The selection ranks the current policy's log-probs (the reference's log_prob in
    compute_policy_loss_lp_reg), not the rollout's: after the first of 4 updates (2 mini-batches
    x 2 epochs, SGD lr 0.5) the log-probs prepare sees are the training forward's."""
    from lit_covrl.regularizers import LpReg
    from tests.test_module import _one_rl_step_weights

    gaps = []

    class Recording(LpReg):
        def prepare(self, ctx):
            self.ctx_logp = ctx.logp.clone()
            super().prepare(ctx)

        def shape(self, batch):
            gaps.append(float((self.ctx_logp[batch.rows] - batch.logp.detach() * batch.mask).abs().max()))
            return super().shape(batch)

    _one_rl_step_weights(tiny_model_dir, 64, lambda: [Recording(min_p=0.5, neg_ratio=0.5)])
    assert len(gaps) == 4 and max(gaps) < 1e-4, gaps


def test_lp_reg_says_once_when_its_ratio_selects_nothing(caplog):
    """The recipe's neg_ratio 0.01 needs >= 200 negative-advantage tokens per mini-batch to select
    any (k = int(n ratio) > 1); on the CPU quickstart it selected nothing in 150 steps and the run
    was plain GRPO's, with only a 0 in reg/lp_reg/selected_frac to tell. A warning names the
    count and the settings to raise, once; none when tokens are selected."""
    import logging

    from lit_covrl.regularizers import LpReg

    logp = -torch.arange(1.0, 11.0).reshape(2, 5)
    adv, mask = torch.tensor([[-1.0] * 5, [1.0] * 5]), torch.ones(2, 5)
    reg = LpReg(neg_ratio=0.01)
    with caplog.at_level(logging.WARNING, logger="lit_covrl.regularizers.lp_reg"):
        reg.prepare(_lp_ctx(logp, adv, mask))
        reg.prepare(_lp_ctx(logp, adv, mask))
    said = [r.getMessage() for r in caplog.records if "selected no token" in r.getMessage()]
    assert said == ["LpReg selected no token in a mini-batch of 5 negative-advantage tokens: k = int(5 x neg_ratio "
                    "0.01) = 0, and it selects only for k > 1 (as the reference); raise LpReg.neg_ratio or the "
                    "mini-batch size (model.update.mini_batch_size) for it to act"]
    caplog.clear()
    acting = LpReg(neg_ratio=0.5)
    with caplog.at_level(logging.WARNING, logger="lit_covrl.regularizers.lp_reg"):
        acting.prepare(_lp_ctx(logp, adv, mask))
    assert acting.selected.sum() == 2 and not caplog.records
