"""SIREN (arXiv 2509.25133; Linn3a/siren): the nucleus entropy by hand and against a naive full
softmax (value and gradient, chunked, tempered), the squared anchored term against a float64 loop
of the reference's formula in every aggregation mode, the learner's nucleus-entropy forward,
micro-batch 1 / 3 / all, metrics over ranks, the anchor's resume, start-up refusals, a CLI fit."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import (
    AGG_MODES,
    aggregate,
    nucleus_mask,
    siren_agg_factor,
    siren_row_weights,
    siren_token_penalty,
    token_topp_entropy,
)
from lit_covrl.regularizers import SIREN, ClipCov, Regularizer
from lit_covrl.regularizers.base import MiniBatchContext, check_stack
from lit_covrl.types import PolicyBatch, TokenShaping

F64 = torch.float64


# --- the nucleus entropy -------------------------------------------------------------------------
def test_nucleus_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05 (logits their logs): cumulative 0.5, 0.8, 0.95, 1.0
    z = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=F64).log()
    assert nucleus_mask(z, top_p=0.75, top_k=10).tolist() == [[True, False, False, False]]
    assert nucleus_mask(z, top_p=0.81, top_k=10).tolist() == [[True, True, False, False]]
    reached = float(torch.softmax(z, -1)[0, :2].sum())  # the second token's cumulative probability, as computed
    assert nucleus_mask(z, top_p=reached, top_k=10).tolist() == [[True, False, False, False]]  # reaching it: left out
    assert nucleus_mask(z, top_p=0.99, top_k=2).tolist() == [[True, True, False, False]]  # at most top_k
    assert nucleus_mask(z, top_p=0.5, top_k=10).tolist() == [[False] * 4]  # top-1 reaches top_p: empty
    assert nucleus_mask(z[:, [2, 0, 3, 1]], top_p=0.81, top_k=10).tolist() == [[False, True, False, True]]
    # nucleus {0.5, 0.3}: q = (5/8, 3/8), H = -(5/8 log 5/8 + 3/8 log 3/8)
    h = token_topp_entropy(z, top_p=0.81, top_k=10)
    assert h.item() == pytest.approx(-(0.625 * math.log(0.625) + 0.375 * math.log(0.375)), rel=1e-12)
    assert token_topp_entropy(z, top_p=0.75, top_k=10).item() == 0.0  # one token: q = 1
    assert token_topp_entropy(z, top_p=0.5, top_k=10).item() == 0.0  # empty nucleus
    full = -(z.exp() * z).sum().item()
    assert token_topp_entropy(z, top_p=1.0, top_k=10).item() == pytest.approx(
        -(torch.tensor([0.5, 0.3, 0.15]) / 0.95 * (torch.tensor([0.5, 0.3, 0.15]) / 0.95).log()).sum().item(), rel=1e-6)
    assert full > token_topp_entropy(z, top_p=1.0, top_k=10).item()


def test_nucleus_probe_ranks_only_the_rows_that_need_it_and_keeps_the_full_ranking_nucleus():
    """nucleus_mask ranks `probe` tokens first and sorts further only rows whose nucleus holds all
    of them: on rows from peaked (nucleus of 0-3 tokens) to flat (hundreds), with top_k below,
    at and above the probe, the nucleus is the full ranking's (probe = top_k), row for row."""
    g = torch.Generator().manual_seed(0)
    v = 1000
    scale = torch.tensor([0.05, 0.3, 1.0, 3.0, 8.0, 20.0]).repeat_interleave(40)[:, None]
    z = torch.randn(len(scale), v, generator=g, dtype=F64) * scale
    for top_k in (5, 64, 300, 10_000):
        for top_p in (0.3, 0.8, 0.95):
            full = nucleus_mask(z, top_p=top_p, top_k=top_k, probe=top_k)
            for probe in (1, 8, 64):
                assert torch.equal(nucleus_mask(z, top_p=top_p, top_k=top_k, probe=probe), full), (top_k, top_p, probe)
    sizes = nucleus_mask(z, top_p=0.8, top_k=10_000).sum(-1)
    assert sizes.min() == 0 and (sizes > 64).any() and ((sizes > 0) & (sizes < 8)).any()  # both paths taken


def _naive_topp_entropy(z: torch.Tensor, top_p: float, top_k: int, temperature: float) -> torch.Tensor:
    """Per position, in float64, the reference's recipe step by step: full softmax, the top_k
    tokens by logit, cumulative probability, keep those strictly below top_p, renormalise."""
    out = []
    flat = z.reshape(-1, z.shape[-1])
    for row in flat:
        p = torch.softmax(row.double() / temperature, -1)
        order = torch.argsort(row.detach(), descending=True)[: min(top_k, row.shape[0])]
        kept, cum = [], 0.0
        for v in order.tolist():
            cum += float(p[v].detach())
            if cum < top_p:
                kept.append(v)
        if not kept:
            out.append(row.sum() * 0.0)
            continue
        q = p[kept] / p[kept].sum()
        out.append(-(q * q.log()).sum())
    return torch.stack(out).view(z.shape[:-1])


@pytest.mark.parametrize("top_p,top_k,temperature,chunk", [(0.8, 10000, 1.0, 1024), (0.9, 3, 0.7, 5),
                                                           (0.5, 5, 1.3, 1), (1.0, 4, 1.0, 7)])
def test_topp_entropy_value_and_gradient_match_a_naive_full_softmax(top_p, top_k, temperature, chunk):
    g = torch.Generator().manual_seed(1)
    z = (1.5 * torch.randn(3, 6, 9, generator=g, dtype=F64)).requires_grad_(True)
    w = torch.randn(3, 6, generator=g, dtype=F64)
    h = token_topp_entropy(z, top_p=top_p, top_k=top_k, temperature=temperature, chunk_size=chunk)
    (grad,) = torch.autograd.grad((h * w).sum(), z)
    zz = z.detach().clone().requires_grad_(True)
    ref = _naive_topp_entropy(zz, top_p, top_k, temperature)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), zz)
    torch.testing.assert_close(h.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert (ref.detach() > 0).any()


def test_topp_entropy_of_nuclei_past_the_probe_match_a_naive_full_softmax():
    """Rows whose nucleus holds more than the 64 tokens ranked first (flat rows of a 200-token
    vocabulary) take the second, top_k-wide ranking, mixed in chunks with peaked and empty ones:
    value and gradient still the naive full softmax's."""
    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([0.05, 0.2, 1.0, 4.0, 30.0]).repeat(4)[:, None]
    z = (torch.randn(20, 200, generator=g, dtype=F64) * scale).requires_grad_(True)
    assert (nucleus_mask(z, top_p=0.8, top_k=10000).sum(-1) > 64).sum() >= 4  # the wide path is taken
    for top_k, chunk in ((10000, 1024), (150, 3)):
        h = token_topp_entropy(z, top_p=0.8, top_k=top_k, chunk_size=chunk)
        (grad,) = torch.autograd.grad(h.sum(), z)
        zz = z.detach().clone().requires_grad_(True)
        ref = _naive_topp_entropy(zz, 0.8, top_k, 1.0)
        (ref_grad,) = torch.autograd.grad(ref.sum(), zz)
        torch.testing.assert_close(h.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_topp_entropy_bf16_logits_and_empty_rows():
    z = torch.randn(4, 5, 11, dtype=torch.bfloat16)
    h = token_topp_entropy(z, top_p=0.8, top_k=100)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), _naive_topp_entropy(z.double(), 0.8, 100, 1.0), rtol=1e-5, atol=1e-6)
    peaked = torch.zeros(2, 6, dtype=F64)
    peaked[:, 0] = 20.0  # top-1 probability ~1 > top_p
    zz = peaked.clone().requires_grad_(True)
    out = token_topp_entropy(zz, top_p=0.9, top_k=6)
    out.sum().backward()
    assert out.tolist() == [0.0, 0.0] and torch.equal(zz.grad, torch.zeros_like(zz))


# --- the anchored term ----------------------------------------------------------------------------
def test_row_weights_and_agg_factor_by_hand():
    sel = torch.tensor([[True, True, False, False], [False, False, False, False], [True, False, False, False]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    w = siren_row_weights(sel, mask)
    assert w.tolist() == [[0.5, 0.5, 0.0, 0.0], [0.0] * 4, [1.0, 0.0, 0.0, 0.0]]
    kw = dict(num_tokens=9, num_seqs=3, norm_length=8)
    assert siren_agg_factor(mask, "token-mean", **kw).flatten().tolist() == [3.0] * 3
    assert siren_agg_factor(mask, "seq-mean-token-sum", **kw).flatten().tolist() == [1.0] * 3
    assert siren_agg_factor(mask, "seq-mean-token-mean", **kw).flatten().tolist() == [3.0, 2.0, 4.0]
    assert siren_agg_factor(mask, "seq-mean-token-sum-norm", **kw).flatten().tolist() == [8.0] * 3
    x = torch.randn(3, 4, dtype=F64) * mask
    for mode in AGG_MODES:
        f = siren_agg_factor(mask, mode, **kw)
        agg = aggregate(f * x, mask, mode, num_tokens=9, num_seqs=3, norm_length=8)
        assert agg.item() == pytest.approx(x.sum().item() / 3, rel=1e-12), mode


def test_penalty_by_hand():
    # one response: H = 1, 2, 3, selected the last two; H_bar = 2.5, anchor 2: d = 0.5, coef 0.1,
    # token-mean over 3 tokens and 1 response: value 0.1 * 0.25, gradient on the selected tokens
    # 0.1 * 2 * 0.5 * (1 / 2) each
    h = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64, requires_grad=True)
    mask = torch.ones(1, 3, dtype=F64)
    w = siren_row_weights(torch.tensor([[False, True, True]]), mask)
    weights = 0.1 * siren_agg_factor(mask, "token-mean", num_tokens=3, num_seqs=1, norm_length=3) * w
    p = siren_token_penalty(h, weights, deviation=0.5, covered=1.0)
    loss = aggregate(p, mask, "token-mean", num_tokens=3)
    loss.backward()
    assert loss.item() == pytest.approx(0.025)
    assert h.grad.flatten().tolist() == pytest.approx([0.0, 0.05, 0.05])
    assert torch.equal(siren_token_penalty(h, weights, deviation=0.5, covered=0.0), torch.zeros(1, 3, dtype=F64))


def _problem(seed=0, n=6, T=10, V=9):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, T, V, generator=g, dtype=F64)
    lengths = torch.tensor([10, 7, 10, 4, 9, 1])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F64)
    return z, mask


def _reference_loop(z, mask, *, coef, top_p, top_k, quantile, anchor):
    """The reference's term in float64, one loop per response and token: nanquantile of the
    response's valid nucleus entropies, strictly above it selected, per-response means over the
    selected, their mean over responses (agg_loss seq-mean-token-mean, an empty response 0),
    coef * (that - anchor)^2 -- here over the whole batch (one micro-batch)."""
    zz = z.clone().requires_grad_(True)
    h = _naive_topp_entropy(zz, top_p, top_k, 1.0)
    per_row = []
    for i in range(z.shape[0]):
        valid = [t for t in range(z.shape[1]) if mask[i, t] > 0]
        vals = h[i, valid].detach()
        q = torch.nanquantile(vals, quantile)
        chosen = [t for t in valid if h[i, t].detach() > q]
        per_row.append(sum(h[i, t] for t in chosen) / len(chosen) if chosen else zz.sum() * 0.0)
    h_bar = torch.stack(per_row).mean()
    value = h_bar.detach() if anchor is None else anchor
    loss = coef * (h_bar - value) ** 2
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad, h_bar.detach()


def _ours(z, mask, reg, mode, norm_length=12):
    zz = z.clone().requires_grad_(True)
    h = token_topp_entropy(zz, top_p=reg.top_p, top_k=reg.top_k)
    rows = torch.arange(len(z))
    ctx = MiniBatchContext(step=0, update=0, on_policy=True, logp=mask * 0, old_logp=mask * 0, advantages=mask * 0,
                           mask=mask, clipped=None, agg_mode=mode, norm_length=norm_length, topp_entropy=h.detach() * mask)
    reg.prepare(ctx)
    b = PolicyBatch(rows, mask * 0, mask * 0, mask * 0, mask, topp_entropy=h)
    s = reg.shape(b)
    loss = aggregate(s.penalty, mask, mode, num_tokens=mask.sum(), num_seqs=len(z), norm_length=norm_length)
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("top_p,top_k,quantile,anchor", [(0.8, 10000, 0.8, 0.3), (0.95, 4, 0.5, 1.2), (1.0, 9, 0.0, 0.0)])
def test_loss_and_gradient_match_the_reference_formula(mode, top_p, top_k, quantile, anchor):
    z, mask = _problem()
    reg = SIREN(coef=0.7, top_p=top_p, top_k=top_k, quantile=quantile, anchor=anchor)
    loss, grad = _ours(z, mask, reg, mode)
    ref, ref_grad, h_bar = _reference_loop(z, mask, coef=0.7, top_p=top_p, top_k=top_k, quantile=quantile, anchor=anchor)
    assert abs(h_bar.item() - anchor) > 1e-3  # the term acts
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_measured_anchor_is_the_first_mini_batch_and_stays():
    z, mask = _problem()
    reg = SIREN(coef=1.0)
    loss, grad = _ours(z, mask, reg, "token-mean")
    _, _, h_bar = _reference_loop(z, mask, coef=1.0, top_p=0.8, top_k=10000, quantile=0.8, anchor=None)
    assert reg.anchor_value == pytest.approx(h_bar.item(), rel=1e-12)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    z2, _ = _problem(seed=5)
    loss2, _ = _ours(z2, mask, reg, "token-mean")
    _, _, h_bar2 = _reference_loop(z2, mask, coef=1.0, top_p=0.8, top_k=10000, quantile=0.8, anchor=None)
    assert reg.anchor_value == pytest.approx(h_bar.item(), rel=1e-12)  # not re-measured
    assert loss2.item() == pytest.approx((h_bar2 - h_bar).item() ** 2, rel=1e-10)


def test_micro_batches_of_the_prepared_mini_batch_add_up_to_the_whole():
    """shape on row subsets (micro-batches) with the mini-batch's denominators sums to the loss
    and gradient of shape on all rows."""
    z, mask = _problem(seed=3)
    for mode in AGG_MODES:
        whole_loss, whole_grad = _ours(z, mask, SIREN(coef=0.5, anchor=0.2), mode)
        reg = SIREN(coef=0.5, anchor=0.2)
        zz = z.clone().requires_grad_(True)
        h = token_topp_entropy(zz, top_p=0.8, top_k=10000)
        ctx = MiniBatchContext(step=0, update=0, on_policy=True, logp=mask * 0, old_logp=mask * 0, advantages=mask * 0,
                               mask=mask, clipped=None, agg_mode=mode, norm_length=12, topp_entropy=h.detach() * mask)
        reg.prepare(ctx)
        total = 0.0
        for rows in (torch.tensor([4, 1]), torch.tensor([0, 5, 2]), torch.tensor([3])):
            b = PolicyBatch(rows, mask[rows] * 0, mask[rows] * 0, mask[rows] * 0, mask[rows], topp_entropy=h[rows])
            total = total + aggregate(reg.shape(b).penalty, mask[rows], mode, num_tokens=mask.sum(), num_seqs=len(z),
                                      norm_length=12)
        (grad,) = torch.autograd.grad(total, zz)
        assert total.item() == pytest.approx(whole_loss.item(), rel=1e-12), mode
        torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_metrics_are_summed_over_ranks(monkeypatch):
    """H_bar, the selected share and the deviation are the whole mini-batch's under DDP: here one
    response (H = 1, 2, 3, 4; quantile 0.5: 3 and 4 selected, mean 3.5) and another rank adding
    [sum w H, covered rows, rows, tokens, selected, sum H] = [1.5, 1, 1, 4, 2, 6]."""
    from lit_covrl import distributed

    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=F64)
    other = torch.tensor([1.5, 1.0, 1.0, 4.0, 2.0, 6.0], dtype=F64)
    monkeypatch.setattr(distributed, "all_sum", lambda x: x + other.to(x.dtype))
    reg = SIREN(coef=1.0, quantile=0.5, anchor=1.0)
    reg.prepare(MiniBatchContext(step=0, update=0, on_policy=True, logp=mask, old_logp=mask, advantages=mask, mask=mask,
                                 clipped=None, topp_entropy=h))
    m = reg.pop_metrics()
    assert m["reg/siren/entropy"] == pytest.approx((3.5 + 1.5) / 2)
    assert m["reg/siren/deviation"] == pytest.approx(1.5)
    assert m["reg/siren/anchor"] == 1.0
    assert m["reg/siren/selected_frac"] == pytest.approx(4 / 8)
    assert m["reg/siren/nucleus_entropy"] == pytest.approx(16 / 8)


def test_settings_checked_at_start_up():
    bad = [("coef", -0.1), ("coef", math.inf), ("top_p", 0.0), ("top_p", 1.2), ("top_k", 0), ("top_k", 2.5),
           ("top_k", True), ("quantile", 1.0), ("quantile", -0.1), ("quantile", math.nan), ("anchor", -1.0),
           ("anchor", math.nan)]
    for field, value in bad:
        with pytest.raises(ValueError, match=rf"SIREN\.{field}="):
            SIREN(**{field: value})
    reg = SIREN()
    assert (reg.coef, reg.top_p, reg.top_k, reg.quantile, reg.anchor) == (0.005, 0.8, 10000, 0.8, None)
    assert reg.needs_topp_entropy == (0.8, 10000)
    with pytest.raises(ValueError, match=r"different nuclei.*'siren' \(0.8, 10000\), 'siren_2' \(0.9, 10000\)"):
        check_stack([SIREN(), SIREN(top_p=0.9, name="siren_2")])
    check_stack([SIREN(), SIREN(name="siren_2", coef=0.1)])  # the same nucleus: one forward serves both


def test_anchor_state_round_trip():
    reg = SIREN()
    assert reg.state_dict() == {"anchor": None}
    reg.load_state_dict({"anchor": 0.42})
    assert reg.anchor_value == 0.42 and reg.state_dict() == {"anchor": 0.42}
    given = SIREN(anchor=0.1)
    given.load_state_dict({"anchor": 0.42})  # the run's setting wins
    assert given.anchor_value == 0.1


# --- through the learner -------------------------------------------------------------------------
class _ToppProbe(Regularizer):
    """Asks for the nucleus entropy, shapes nothing, keeps what prepare and shape were given."""

    default_name = "topp_probe"
    needs_topp_entropy = (0.9, 5)

    def __init__(self) -> None:
        super().__init__()
        self.prepared, self.seen = [], []

    def prepare(self, ctx):
        self.prepared.append(ctx.topp_entropy.clone())

    def shape(self, batch):
        assert batch.topp_entropy.requires_grad
        self.seen.append((batch.rows.clone(), batch.topp_entropy.detach().clone()))
        return TokenShaping()


def test_learner_delivers_the_nucleus_entropy_the_same_for_any_micro_batch(tiny_model_dir):
    """The nucleus entropy reaches prepare (detached) and shape (with grad), equal to each other,
    the same for micro-batches of 1, 3 and all 8 rows; a fit that asks for it and shapes nothing
    ends on the same weights to the bit as one that does not."""
    from tests.test_module import _one_rl_step_weights

    runs = {}
    for micro in (64, 3, 1):
        probe = _ToppProbe()
        w, m = _one_rl_step_weights(tiny_model_dir, micro, lambda: [probe])
        runs[micro] = probe
        if micro == 64:
            w0, m0 = _one_rl_step_weights(tiny_model_dir, micro, list)
            assert all(torch.equal(w[k], w0[k]) for k in w0)
            assert {k: v for k, v in m.items() if not k.startswith("reg/")} == m0
    ref = runs[64]
    assert len(ref.prepared) == 4 and any((p > 0).any() for p in ref.prepared)
    for micro in (3, 1):
        got = runs[micro]
        for a, b in zip(ref.prepared, got.prepared):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        # shape's values, reassembled per update, are prepare's
        i = 0
        for prepared in got.prepared:
            covered = 0
            while covered < len(prepared):
                rows, h = got.seen[i]
                torch.testing.assert_close(h * (prepared[rows] != 0), prepared[rows], rtol=1e-5, atol=1e-6)
                covered += len(rows)
                i += 1


def test_observed_anchor_is_the_whole_rollouts_and_observed_once():
    z, mask = _problem()
    h = token_topp_entropy(z, top_p=0.8, top_k=10000)
    _, _, h_bar = _reference_loop(z, mask, coef=1.0, top_p=0.8, top_k=10000, quantile=0.8, anchor=None)
    reg = SIREN()
    assert reg.observes_rollout()
    reg.observe_rollout(h * mask, mask)
    assert reg.anchor_value == pytest.approx(h_bar.item(), rel=1e-12) and not reg.observes_rollout()
    assert not SIREN(anchor=0.5).observes_rollout()
    empty = SIREN()
    empty.observe_rollout(h[:0], mask[:0])  # every response filtered out: measured at the next rollout
    assert empty.anchor_value is None and empty.observes_rollout()


def test_a_one_response_rollout_measures_the_anchor():
    """A rollout that keeps a single response is measured too (else the first mini-batch under the
    current policy would set the anchor): nucleus entropies [0.1, 0.5, 0.9, 0.2, 0.7] have the
    median 0.5, above it 0.9 and 0.7, so H_bar = 0.8 over the one response."""
    reg = SIREN(quantile=0.5)
    reg.observe_rollout(torch.tensor([[0.1, 0.5, 0.9, 0.2, 0.7]], dtype=torch.float64), torch.ones(1, 5))
    assert reg.anchor_value == pytest.approx(0.8, rel=1e-12) and not reg.observes_rollout()


def test_learner_measures_the_anchor_on_the_first_rollout_before_updating(tiny_model_dir):
    """Through GRPOModule: with the whole rollout as one on-policy mini-batch, the first (only)
    update's H_bar is the anchor measured before it (deviation ~0, no term); with two mini-batches
    and two epochs the anchor is the same number (the whole rollout's) and every later update
    deviates from it."""
    from tests.test_module import make_data, make_module
    from tests.helpers import fit

    def run(**update):
        torch.manual_seed(0)
        reg = SIREN(coef=5.0, top_p=0.9, top_k=8, quantile=0.5)
        module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                             update=dict(grad_clip=None, **update))
        trainer = fit(module, make_data(), steps=1, callbacks=[reg], limit_val_batches=0)
        return reg, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("reg/siren/")}

    one, m1 = run(mini_batch_size=None, ppo_epochs=1)
    assert m1["reg/siren/deviation"] == pytest.approx(0.0, abs=1e-6) and m1["reg/siren/loss"] == pytest.approx(0.0, abs=1e-9)
    assert m1["reg/siren/entropy"] == pytest.approx(one.anchor_value, rel=1e-6) and one.anchor_value > 0
    four, m4 = run(mini_batch_size=2, ppo_epochs=2)
    assert four.anchor_value == pytest.approx(one.anchor_value, rel=1e-6)
    assert m4["reg/siren/loss"] > 0


@pytest.mark.parametrize("micro", [1, 3])
def test_update_with_siren_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """SIREN (a measured anchor, so the later updates act) stacked with an entropy bonus: the same
    weights and metrics after 4 updates with micro-batches of 1, 3 or all 8 rows."""
    from lit_covrl.regularizers import EntropyBonus
    from tests.test_module import _one_rl_step_weights

    def regs():
        return [SIREN(coef=5.0, top_p=0.9, top_k=8, quantile=0.5), EntropyBonus(coef=0.01)]

    ref_w, ref_m = _one_rl_step_weights(tiny_model_dir, 64, regs)
    w, m = _one_rl_step_weights(tiny_model_dir, micro, regs)
    assert ref_m["reg/siren/loss"] > 0 and ref_m["reg/siren/selected_frac"] > 0
    for key in ("reg/siren/loss", "reg/siren/entropy", "reg/siren/deviation", "reg/siren/anchor", "policy/loss"):
        assert m[key] == pytest.approx(ref_m[key], rel=1e-5, abs=1e-8), key
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6)


def test_siren_config_runs_through_the_cli(tmp_path):
    """configs/cpu/siren.yaml on the quickstart through `lit-covrl fit` (a larger coefficient on
    the command line, so that the tiny model's term is visible in 3 steps): SIREN is built from the
    YAML (top_k 10000 above the 16-token vocabulary: the nucleus holds at most the vocabulary), its
    tags are written every step, the anchor (the first rollout's H_bar) stays and the term acts."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/siren.yaml", "--data.batch_size", "4", "--model.update.mini_batch_size",
                        "2", "--model.rollout.filter_groups", "false", "--trainer.callbacks.init_args.coef", "5.0")
    keys = {"reg/siren/entropy", "reg/siren/anchor", "reg/siren/deviation", "reg/siren/selected_frac",
            "reg/siren/nucleus_entropy", "reg/siren/loss"}
    assert keys <= set(tags)
    assert all(len(tags[k]) == 3 for k in keys)
    assert len(set(tags["reg/siren/anchor"])) == 1 and tags["reg/siren/anchor"][0] > 0
    assert all(0 < f < 1 for f in tags["reg/siren/selected_frac"])
    assert len(set(tags["reg/siren/entropy"])) == 3  # the measured H_bar moves
    assert all(v > 0 for v in tags["reg/siren/loss"]) and all(d != 0 for d in tags["reg/siren/deviation"])


def test_reading_the_nucleus_entropy_without_asking_names_the_flag(tiny_model_dir):
    from tests.test_module import _one_rl_step_weights

    class Unasked(Regularizer):
        def shape(self, batch):
            return TokenShaping(penalty=batch.topp_entropy * 0.0)

    with pytest.raises(TypeError, match=r"batch.topp_entropy is None unless the class sets needs_topp_entropy = "
                                        r"\(top_p, top_k\)"):
        _one_rl_step_weights(tiny_model_dir, 64, lambda: [Unasked()])


@pytest.mark.parametrize("micro", [64, 3])
def test_siren_fit_is_the_same_with_shared_prompt_on_and_off(tiny_model_dir, micro):
    """The nucleus entropy through the shared-prompt forward (CPU default) and the plain one:
    the same anchor, metrics and weights after 4 updates."""
    from tests.test_module import _one_rl_step_weights

    def regs():
        return [SIREN(coef=5.0, top_p=0.9, top_k=8, quantile=0.5)]

    on_w, on_m = _one_rl_step_weights(tiny_model_dir, micro, regs, system=dict(shared_prompt=True))
    off_w, off_m = _one_rl_step_weights(tiny_model_dir, micro, regs, system=dict(shared_prompt=False))
    assert on_m["reg/siren/loss"] > 0
    for k in on_m:
        if k.startswith(("reg/", "policy/")) and k != "policy/lr":
            assert off_m[k] == pytest.approx(on_m[k], rel=1e-5, abs=1e-7), k
    for k in on_w:
        torch.testing.assert_close(off_w[k], on_w[k], rtol=1e-4, atol=1e-6)


def _policy_forwards(tiny_model_dir, monkeypatch, regs, **update):
    """The policy forwards (`Learner._logprobs` calls) of a 2-step fit, 16 rows a step in 2
    mini-batches of 8 (one epoch), by (grad, entropy, nucleus entropy)."""
    import collections

    from lit_covrl.learner import Learner
    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    calls, forward = collections.Counter(), Learner._logprobs

    def counting(self, ids, att, T, with_entropy, model=None, **kw):
        if model is None or model is self.policy:
            calls[(torch.is_grad_enabled(), with_entropy, getattr(kw.get("asks"), "topp", None) is not None)] += 1
        return forward(self, ids, att, T, with_entropy, model=model, **kw)

    monkeypatch.setattr(Learner, "_logprobs", counting)
    torch.manual_seed(0)
    module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                         update=dict(micro_batch_size=2, mini_batch_size=2, ppo_epochs=1, grad_clip=None, **update))
    fit(module, make_data(), steps=2, callbacks=regs, limit_val_batches=0)
    return dict(calls)


def test_an_off_policy_selection_forward_gives_the_nucleus_entropy_too(tiny_model_dir, monkeypatch):
    """Micro-batches of 2 (4 per mini-batch), SIREN + Clip-Cov (which needs the current log-probs):
    the off-policy mini-batch's one no-grad pass gives both the log-probs and the nucleus entropy
    (it ran two: one for each). No-grad passes, all with the nucleus: step 1 the anchor's (8), the
    first mini-batch's selection (4) and the second's (4); step 2 both mini-batches' (8)."""
    stacked = _policy_forwards(tiny_model_dir, monkeypatch, [SIREN(coef=1.0, top_p=0.9, top_k=8),
                                                             ClipCov(ratio=0.1, lb=-1e9, ub=1e9)])
    assert stacked == {(True, False, True): 16, (False, False, True): 24}


def test_a_bad_setting_is_refused_at_start_up_naming_the_field(tmp_path, capsys):
    """configs/cpu/siren.yaml with top_p 1.5 on the command line: exit 2, one line naming
    SIREN.top_p, before the first rollout."""
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/siren.yaml", "--trainer.callbacks.init_args.top_p", "1.5")
    assert "SIREN.top_p=1.5 is invalid: must be a probability in (0, 1]" in err


def test_a_one_token_nucleus_has_entropy_0_and_no_gradient():
    """[0.6, 0.3, 0.1] at top_p 0.8: the nucleus is the first token alone (0.6 < 0.8 <= 0.9),
    renormalised to probability 1: entropy 0 and no gradient, though the full entropy is 0.90
    nats (why SIREN cannot reach positions whose two most probable tokens hold >= top_p)."""
    for probs, want in (([0.6, 0.3, 0.1], 0.0), ([0.85, 0.1, 0.05], 0.0)):
        logits = torch.tensor(probs, dtype=torch.float64).log().reshape(1, 1, 3).requires_grad_(True)
        h = token_topp_entropy(logits, top_p=0.8, top_k=3, temperature=1.0, chunk_size=4)
        h.sum().backward()
        assert float(h) == want and torch.equal(logits.grad, torch.zeros_like(logits)), (probs, float(h), logits.grad)
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log().reshape(1, 1, 4)
    h = token_topp_entropy(logits, top_p=0.8, top_k=4, temperature=1.0, chunk_size=4)
    assert float(h) == pytest.approx(-(4 / 7) * math.log(4 / 7) - (3 / 7) * math.log(3 / 7))  # {0.4, 0.3}
