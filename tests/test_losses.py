"""PPO token loss, clipped-token mask, stats and aggregation: hand values and loop oracles."""
import math

import pytest
import torch

from lit_covrl.algorithms import (
    AGG_MODES,
    aggregate,
    entropic_weights,
    ppo_clipped_tokens,
    ppo_stats,
    ppo_token_loss,
    row_denominators,
    siren_agg_factor,
)

F64 = torch.float64


def _four_tokens():
    # one sequence, 4 tokens: ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, -1, +1
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=F64)
    old = torch.full_like(ratio, -1.0)
    logp = old + ratio.log()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=F64)
    return logp, old, adv, torch.ones_like(ratio)


def test_ppo_hand_values():
    logp, old, adv, mask = _four_tokens()
    # eps 0.2 -> clamp to [0.8, 1.2]
    # r=1.5,A=+1: L1=-1.5, L2=-1.2 -> -1.2 (clipped) | r=1.5,A=-1: L1=1.5, L2=1.2 -> 1.5
    # r=0.5,A=-1: L1=0.5, L2=0.8 -> 0.8 (clipped)    | r=0.5,A=+1: L1=-0.5, L2=-0.8 -> -0.5
    loss = ppo_token_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, 0.8, -0.5]], dtype=F64))
    clipped = ppo_clipped_tokens(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert clipped.tolist() == [[True, False, True, False]]
    # no clipping at all: plain -A r
    plain = ppo_token_loss(logp, old, adv, mask, clip_low=None, clip_high=None)
    torch.testing.assert_close(plain, torch.tensor([[-1.5, 1.5, 0.5, -0.5]], dtype=F64))
    # only the high side: r=0.5 with A=-1 is no longer clipped -> 0.5
    hi = ppo_token_loss(logp, old, adv, mask, clip_low=None, clip_high=0.2)
    torch.testing.assert_close(hi, torch.tensor([[-1.2, 1.5, 0.5, -0.5]], dtype=F64))


def _oracle_loss(logp, old, adv, mask, clip_low, clip_high, dual_clip):
    out = torch.zeros_like(logp)
    for n in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[n, t]:
                continue
            a = float(adv[n])
            r = math.exp(max(min(float(logp[n, t] - old[n, t]), 20.0), -20.0))
            lo = -math.inf if clip_low is None else 1 - clip_low
            hi = math.inf if clip_high is None else 1 + clip_high
            loss = max(-a * r, -a * min(max(r, lo), hi))
            if dual_clip is not None and a < 0:
                loss = min(loss, -a * dual_clip)
            out[n, t] = loss
    return out


@pytest.mark.parametrize("clip_low,clip_high,dual_clip",
                         [(0.2, 0.2, None), (0.2, 0.28, None), (None, 0.28, 3.0), (0.1, None, 1.5), (None, None, None)])
def test_ppo_matches_loop_oracle(clip_low, clip_high, dual_clip):
    g = torch.Generator().manual_seed(0)
    N, T = 4, 7
    logp = -torch.rand(N, T, generator=g, dtype=F64) * 3
    old = logp + 0.6 * torch.randn(N, T, generator=g, dtype=F64)
    adv = torch.randn(N, generator=g, dtype=F64)
    mask = torch.rand(N, T, generator=g) > 0.3
    got = ppo_token_loss(logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    want = _oracle_loss(logp, old, adv, mask, clip_low, clip_high, dual_clip)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # [N, T] advantages and a float mask give the same result
    got2 = ppo_token_loss(logp, old, adv[:, None].expand(N, T), mask.double(),
                          clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    torch.testing.assert_close(got2, want, rtol=0, atol=1e-12)


def test_gradient_only_through_unclipped_logp():
    logp, old, adv, mask = _four_tokens()
    logp = logp.clone().requires_grad_(True)
    old = old.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    ppo_token_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2).sum().backward()
    assert old.grad is None and adv.grad is None
    # d(-A r)/dlogp = -A r on unclipped tokens; 0 on clipped ones (tokens 0 and 2)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5, 0.0, -0.5]], dtype=F64))


def test_dual_clip():
    # A = -1, r = 5: PPO loss max(5, 1.2) = 5; dual clip 3 caps it at -A*3 = 3 (and kills its grad)
    # A = +1, r = 5: loss -1.2, dual clip does not apply to positive advantages
    old = torch.zeros(1, 2, dtype=F64)
    logp = torch.full((1, 2), math.log(5.0), dtype=F64, requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 2)
    loss = ppo_token_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    torch.testing.assert_close(loss.detach(), torch.tensor([[3.0, -1.2]], dtype=F64))
    loss.sum().backward()
    assert logp.grad.abs().max() == 0
    no_dual = ppo_token_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert no_dual[0, 0].item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_token_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=0.9)


def test_logratio_clamp_prevents_inf_and_nan():
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1000.0, -1.0]])
    adv = torch.tensor([-1.0])
    mask = torch.ones(1, 2)
    loss = ppo_token_loss(logp, old, adv, mask, clip_low=None, clip_high=None)
    assert torch.isfinite(loss).all()
    assert loss[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-5)
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()
    unclamped = ppo_token_loss(logp, old, adv, mask, clip_low=None, clip_high=None, logratio_clamp=None)
    assert torch.isinf(unclamped[0, 0])  # the clamp is what saves us


def test_zero_outside_mask_even_with_garbage():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, float("nan")]])
    loss = ppo_token_loss(logp, old, torch.tensor([1.0]), torch.tensor([[1, 0]]), clip_low=0.2, clip_high=0.2)
    assert loss[0, 1].item() == 0.0 and loss[0, 0].item() == -1.0
    loss.sum().backward()
    assert logp.grad[0, 1].item() == 0.0


def test_clipped_tokens_oracle_and_stats():
    g = torch.Generator().manual_seed(3)
    N, T = 3, 9
    logp = -torch.rand(N, T, generator=g, dtype=F64)
    old = logp + 0.5 * torch.randn(N, T, generator=g, dtype=F64)
    adv = torch.randn(N, generator=g, dtype=F64)
    mask = torch.rand(N, T, generator=g) > 0.2
    clipped = ppo_clipped_tokens(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    stats = ppo_stats(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    n_valid, kl, n_clip, n_lo, n_hi = 0, 0.0, 0, 0, 0
    for n in range(N):
        for t in range(T):
            if not mask[n, t]:
                assert not clipped[n, t]
                continue
            a, lr = float(adv[n]), float(logp[n, t] - old[n, t])
            r = math.exp(lr)
            is_clipped = -a * min(max(r, 0.8), 1.28) > -a * r
            assert bool(clipped[n, t]) == is_clipped
            n_valid += 1
            kl += r - 1 - lr
            n_clip += is_clipped
            n_lo += r < 0.8 and a < 0
            n_hi += r > 1.28 and a > 0
    assert n_clip > 0
    assert stats["approx_kl"].item() == pytest.approx(kl / n_valid, abs=1e-12)
    assert stats["clip_frac"].item() == pytest.approx(n_clip / n_valid, abs=1e-12)
    assert stats["clip_frac_low"].item() == pytest.approx(n_lo / n_valid, abs=1e-12)
    assert stats["clip_frac_high"].item() == pytest.approx(n_hi / n_valid, abs=1e-12)
    assert stats["clip_frac"].item() == pytest.approx((n_lo + n_hi) / n_valid, abs=1e-12)
    # global denominator: stats over halves sum to the whole
    halves = [ppo_stats(logp[s], old[s], adv[s], mask[s], clip_low=0.2, clip_high=0.28, num_tokens=mask.sum())
              for s in (slice(0, 1), slice(1, 3))]
    for k in stats:
        assert (halves[0][k] + halves[1][k]).item() == pytest.approx(stats[k].item(), abs=1e-12)


def test_stats_hand_values():
    logp, old, adv, mask = _four_tokens()
    s = ppo_stats(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # clipped: token 0 (r=1.5, A>0: high) and token 2 (r=0.5, A<0: low) -> 2/4, 1/4, 1/4
    # k3: r - 1 - log r = 0.094535 (r=1.5), 0.193147 (r=0.5) -> mean = (2*0.094535 + 2*0.193147)/4
    assert s["clip_frac"].item() == 0.5
    assert s["clip_frac_low"].item() == 0.25 and s["clip_frac_high"].item() == 0.25
    assert s["approx_kl"].item() == pytest.approx(0.143841, abs=1e-6)
    assert not any(v.requires_grad for v in s.values())


def test_aggregate_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # valid: 1, 2 | 4. token-mean 7/3; seq sums 3, 4 -> 3.5; seq means 1.5, 4 -> 2.75; 7 / (2 * 3)
    want = {"token-mean": 7 / 3, "seq-mean-token-sum": 3.5, "seq-mean-token-mean": 2.75,
            "seq-mean-token-sum-norm": 7 / 6}
    for mode, w in want.items():
        assert aggregate(loss, mask, mode).item() == pytest.approx(w, abs=1e-12)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_length=7).item() == pytest.approx(0.5)


def _oracle_aggregate(loss, mask, mode):
    N, T = loss.shape
    seq_sums, seq_lens = [], []
    for n in range(N):
        s, c = 0.0, 0
        for t in range(T):
            if mask[n, t]:
                s += float(loss[n, t])
                c += 1
        seq_sums.append(s)
        seq_lens.append(c)
    if mode == "token-mean":
        return sum(seq_sums) / max(sum(seq_lens), 1)
    if mode == "seq-mean-token-sum":
        return sum(seq_sums) / N
    if mode == "seq-mean-token-mean":
        return sum(s / max(c, 1) for s, c in zip(seq_sums, seq_lens)) / N
    return sum(seq_sums) / (N * T)


def _random_batch(seed, N=8, T=10):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(N, T, generator=g, dtype=F64)
    lengths = torch.randint(0, T + 1, (N,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    loss = torch.where(mask.bool(), loss, torch.full_like(loss, float("nan")))  # padding garbage
    return loss, mask


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_loop_oracle(mode):
    loss, mask = _random_batch(0)
    assert aggregate(loss, mask, mode).item() == pytest.approx(_oracle_aggregate(loss, mask, mode), abs=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_sum_equals_full(mode):
    loss, mask = _random_batch(1)
    N, T = loss.shape
    full = aggregate(loss, mask, mode)
    totals = dict(num_tokens=mask.sum(), num_seqs=N, norm_length=T)
    for sizes in ([3, 3, 2], [1] * N, [5, 3]):
        parts, start = [], 0
        for s in sizes:
            lo, mk = loss[start:start + s], mask[start:start + s]
            t_max = max(int(mk.sum(-1).max()), 1)  # micro-batch trimmed to its own padding
            parts.append(aggregate(lo[:, :t_max], mk[:, :t_max], mode, **totals))
            start += s
        assert torch.stack(parts).sum().item() == pytest.approx(full.item(), abs=1e-12)
    # with each micro-batch's own denominators the sum is wrong: the totals are what matter
    local = sum(aggregate(loss[s:s + 4], mask[s:s + 4], mode) for s in (0, 4))
    assert local.item() != pytest.approx(full.item(), abs=1e-6)


def test_aggregate_gradient_and_empty_mask():
    loss = torch.ones(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    for mode in AGG_MODES:
        out = aggregate(loss, mask, mode)
        assert out.item() == 0.0
    mask[0, :2] = 1
    aggregate(loss, mask, "token-mean").backward()
    torch.testing.assert_close(loss.grad, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_unknown_mode_lists_valid():
    with pytest.raises(ValueError) as e:
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")
    assert all(m in str(e.value) for m in AGG_MODES)


def test_row_denominators_hand_values():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # lengths 3, 1, 0 (clamped to 1)
    given = dict(num_tokens=8, num_seqs=5, norm_length=6)
    want = {"token-mean": [8, 8, 8], "seq-mean-token-sum": [5, 5, 5], "seq-mean-token-mean": [15, 5, 5],
            "seq-mean-token-sum-norm": [30, 30, 30]}
    # defaults: num_tokens = mask.sum() = 4, num_seqs = N = 3, norm_length = T = 4
    default = {"token-mean": [4, 4, 4], "seq-mean-token-sum": [3, 3, 3], "seq-mean-token-mean": [9, 3, 3],
               "seq-mean-token-sum-norm": [12, 12, 12]}
    for mode in AGG_MODES:
        d = row_denominators(mask, mode, **given)
        assert d.dtype == F64 and d.shape == (3, 1)
        assert d.flatten().tolist() == want[mode], mode
        assert row_denominators(mask, mode).flatten().tolist() == default[mode], mode
    assert row_denominators(torch.zeros(2, 3), "token-mean", num_seqs=0).flatten().tolist() == [1, 1]  # clamped
    assert row_denominators(mask, "seq-mean-token-sum-norm", num_seqs=5, norm_length=0).flatten().tolist() == [5] * 3
    assert row_denominators(mask, "token-mean", num_tokens=8, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        row_denominators(mask, "mean")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("totals", [False, True])
def test_aggregate_siren_and_entropic_share_row_denominators(mode, totals):
    # aggregate(x) = sum_n sum_t x_nt / d_n; SIREN's factor f_n = d_n / num_seqs; EntroPIC's weight
    # c = d_n / d_high_n (the high tokens' own counts; the same d_n in seq-mean-token-sum-norm)
    loss, mask = _random_batch(2)
    mask[3] = 0  # an empty row
    g = torch.Generator().manual_seed(3)
    high = (torch.rand(mask.shape, generator=g) > 0.5) & mask.bool()
    kw = dict(num_tokens=3 * mask.sum(), num_seqs=20, norm_length=13) if totals else {}
    nt, ns, length = (3 * mask.sum(), 20, 13) if totals else (mask.sum(), mask.shape[0], mask.shape[1])
    d = row_denominators(mask, mode, **kw)
    x = torch.where(mask.bool(), loss, torch.zeros_like(loss))
    torch.testing.assert_close(aggregate(loss, mask, mode, **kw), (x / d).sum(), rtol=0, atol=1e-12)
    f = siren_agg_factor(mask, mode, num_tokens=nt, num_seqs=ns, norm_length=length)
    torch.testing.assert_close(f, d / ns, rtol=0, atol=0)
    num_high, num_high_seqs = high.sum(), (high.sum(-1) > 0).sum()
    c = entropic_weights(high, mask, mode, num_tokens=nt, num_seqs=ns, num_high=num_high, num_high_seqs=num_high_seqs)
    d_high = row_denominators(high, mode, num_tokens=num_high, num_seqs=num_high_seqs, norm_length=length)
    want = high.double() * (1.0 if mode == "seq-mean-token-sum-norm" else d / d_high)
    torch.testing.assert_close(c, want, rtol=1e-15, atol=0)
