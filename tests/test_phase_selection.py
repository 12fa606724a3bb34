"""Mini-batch-wide selections beside Lopti's update phases count only the tokens the phase trains
(`MiniBatchContext.in_phase`): KL-Cov's covariance means, candidates and N, and BAPO's sums P and N,
and Clip-Cov's covariance means, candidates, N and selected_frac, against naive float64 loops over the
phase's tokens; without phases all three are exactly what they were;
the learner hands every regularizer the phase's tokens before any `prepare`."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_covrl.algorithms import bapo_contribution_sums, bapo_search, clip_cov_select, kl_cov_select
from lit_covrl.regularizers import BAPO, ClipCov, KLCov, Lopti, Regularizer
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.types import TokenShaping
from tests._dist import free_port
from tests.test_bapo import _reference_search

torch.set_num_threads(1)


def _batch(seed: int = 0, n: int = 6, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).double()
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3 * mask
    logp = old + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64) * mask
    adv = torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t) * mask
    return logp, old, adv, mask


def _ctx(batch, phase: int | None, eta: float = 0.3) -> MiniBatchContext:
    """An off-policy mini-batch; with a phase, `in_phase` as the learner sets it from Lopti."""
    logp, old, adv, mask = batch
    ctx = MiniBatchContext(0, 1, False, logp, old, adv, mask, None, phase=phase or 0)
    if phase is not None:
        ctx.in_phase = Lopti(eta=eta).phase_tokens(ctx)
    return ctx


def _oracle_kl_cov(logp, adv, tokens, ratio: float) -> set[tuple[int, int]]:
    """KL-Cov over the given tokens only, one token at a time in float64: Cov_i = (logp_i - mean
    logp)(A_i - mean A) with the means over those tokens; the top max(floor(ratio N), 1) by Cov
    (ties: the earlier position), N their count."""
    cells = [(i, j) for i in range(logp.shape[0]) for j in range(logp.shape[1]) if tokens[i][j]]
    mean_lp = sum(float(logp[c]) for c in cells) / len(cells)
    mean_a = sum(float(adv[c]) for c in cells) / len(cells)
    cov = {c: (float(logp[c]) - mean_lp) * (float(adv[c]) - mean_a) for c in cells}
    k = max(math.floor(ratio * len(cells)), 1)
    return set(sorted(cells, key=lambda c: -cov[c])[:k])  # sorted() is stable: ties keep position order


def _selected(reg: KLCov) -> set[tuple[int, int]]:
    return {tuple(c) for c in reg.selected.nonzero().tolist()}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("phase", [0, 1])
def test_kl_cov_selects_among_the_phase_s_tokens_as_a_float64_loop_does(seed, phase):
    batch = _batch(seed)
    logp, _, adv, mask = batch
    ctx = _ctx(batch, phase)
    tokens = ctx.in_phase.tolist()
    assert 3 <= sum(map(sum, tokens)) < mask.sum() - 3  # the phase holds some of the tokens, not all
    reg = KLCov(ratio=0.2)
    reg.prepare(ctx)
    want = _oracle_kl_cov(logp, adv, tokens, 0.2)
    assert _selected(reg) == want
    assert all(tokens[i][j] for i, j in want)
    # the whole mini-batch's selection (the code before) is another set: the test can fail
    assert _oracle_kl_cov(logp, adv, mask.bool().tolist(), 0.2) != want
    m = reg.pop_metrics()  # of the phase's tokens
    assert m["reg/kl_cov/selected_frac"] == pytest.approx(len(want) / sum(map(sum, tokens)))


@pytest.mark.parametrize("seed", range(3))
def test_kl_cov_without_phases_is_unchanged(seed):
    """No phase (in_phase None, every run without Lopti): the selection over the whole mini-batch with
    its own covariance, as before; a phase holding every valid token selects the same."""
    batch = _batch(seed)
    ctx = _ctx(batch, None)
    reg = KLCov(ratio=0.2)
    reg.prepare(ctx)
    assert torch.equal(reg.selected, kl_cov_select(ctx.covariance(), ctx.mask, ratio=0.2))
    assert _selected(reg) == _oracle_kl_cov(batch[0], batch[2], batch[3].bool().tolist(), 0.2)
    every = _ctx(batch, None)
    every.in_phase = batch[3].bool()
    whole = KLCov(ratio=0.2)
    whole.prepare(every)
    assert torch.equal(whole.selected, reg.selected)
    assert whole.pop_metrics() == reg.pop_metrics()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("phase", [0, 1])
def test_bapo_balances_the_phase_s_tokens_as_a_float64_loop_does(seed, phase):
    """The target halfway between the phase's P / N at the start and at the widest range: the search
    stops inside the c_high grid, where the whole mini-batch's search (the code before) stops elsewhere."""
    batch = _batch(seed, n=12)
    logp, old, adv, mask = batch
    ctx = _ctx(batch, phase)
    low, high = (0.8, 0.95, 0.05), (1.0, 1.5, 0.02)
    ends = [_reference_search(logp, old, adv, ctx.in_phase, target=t, low=low, high=high)[2] for t in (0.0, 1e9)]
    target = sum(ends) / 2
    reg = BAPO(target=target, low_start=0.8, low_max=0.95, low_step=0.05, high_start=1.0, high_max=1.5, high_step=0.02)
    reg.prepare(ctx)
    lo, hi, _ = _reference_search(logp, old, adv, ctx.in_phase, target=target, low=low, high=high)
    assert 1.0 < hi < 1.5
    eps_low, eps_high = reg.clip_bounds()
    assert float(eps_low[0, 0]) == pytest.approx(1 - lo) and float(eps_high[0, 0]) == pytest.approx(hi - 1)
    assert (eps_low == eps_low[0, 0]).all() and (eps_high == eps_high[0, 0]).all()  # one range for every token
    whole = _reference_search(logp, old, adv, mask, target=target, low=low, high=high)[:2]
    assert whole != (lo, hi)  # the code before (the whole mini-batch's sums) sets another range


def test_bapo_without_phases_is_unchanged():
    batch = _batch(1)
    logp, old, adv, mask = batch
    reg = BAPO()
    reg.prepare(_ctx(batch, None))
    sums = bapo_contribution_sums(logp, old, adv, mask, lows=reg.lows, highs=reg.highs)
    i, j, _ = bapo_search(sums.tolist(), reg.lows, reg.highs, target=reg.target, eps=reg.eps)
    eps_low, eps_high = reg.clip_bounds()
    assert float(eps_low[0, 0]) == 1.0 - reg.lows[i] and float(eps_high[0, 0]) == reg.highs[j] - 1.0


_CLIP = dict(ratio=0.15, lb=0.05, ub=1.5, seed=3)


def _clip_ctx(batch, phase: int | None) -> MiniBatchContext:
    """`_ctx` with the objective's clipped tokens (|logp - old| > 0.45) and, with a phase, Lopti's
    zeroed tokens (the phase's others), as the learner hands them to Clip-Cov (`reads_zeroed`)."""
    ctx = _ctx(batch, phase)
    ctx.clipped = (batch[0] - batch[1]).abs() > 0.45
    if phase is not None:
        lopti = Lopti(eta=0.3)
        lopti.prepare(ctx)
        ctx.zeroed = lopti.zeroed_tokens()
    return ctx


def _oracle_clip_cov(logp, adv, tokens, clipped, ratio, lb, ub, seed) -> set[tuple[int, int]]:
    """Clip-Cov over the given tokens only, in float64 one token at a time: Cov_i with the means over
    those tokens; the candidates, in row-major order, are those not clipped with lb < Cov_i < ub; k =
    min(max(floor(ratio N), 1), candidates) of them drawn by torch.randperm of a generator seeded `seed`."""
    cells = [(i, j) for i in range(logp.shape[0]) for j in range(logp.shape[1]) if tokens[i][j]]
    mean_lp = sum(float(logp[c]) for c in cells) / len(cells)
    mean_a = sum(float(adv[c]) for c in cells) / len(cells)
    cand = [c for c in cells if not clipped[c] and lb < (float(logp[c]) - mean_lp) * (float(adv[c]) - mean_a) < ub]
    k = min(max(math.floor(ratio * len(cells)), 1), len(cand))
    return {cand[i] for i in torch.randperm(len(cand), generator=torch.Generator().manual_seed(seed))[:k].tolist()}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("phase", [0, 1])
def test_clip_cov_draws_among_the_phase_s_tokens_as_a_float64_loop_does(seed, phase):
    """Cov centred on the phase's tokens, N the phase's count: the code before centred on the whole
    mini-batch and took k from all its valid tokens, another set (the test can fail)."""
    batch = _batch(seed, n=12)
    logp, _, adv, mask = batch
    ctx = _clip_ctx(batch, phase)
    tokens, clipped = ctx.in_phase.tolist(), ctx.clipped
    reg = ClipCov(**_CLIP)
    reg.prepare(ctx)
    want = _oracle_clip_cov(logp, adv, tokens, clipped, **_CLIP)
    assert _selected(reg) == want and len(want) >= 2
    assert all(tokens[i][j] for i, j in want)
    before = torch.zeros_like(mask, dtype=torch.bool) if ctx.zeroed is None else ctx.zeroed
    old = clip_cov_select(ctx.covariance(), mask, mask.bool() & ~clipped & ~before, ratio=_CLIP["ratio"],
                          lb=_CLIP["lb"], ub=_CLIP["ub"], generator=torch.Generator().manual_seed(_CLIP["seed"]))
    assert {tuple(c) for c in old.nonzero().tolist()} != want
    m = reg.pop_metrics()
    assert m["reg/clip_cov/selected_frac"] == pytest.approx(len(want) / sum(map(sum, tokens)))


@pytest.mark.parametrize("seed", range(3))
def test_clip_cov_without_phases_is_unchanged(seed):
    """No phase: the draw over the whole mini-batch with its own covariance and N, as before; a phase
    holding every valid token draws the same."""
    batch = _batch(seed, n=12)
    ctx = _clip_ctx(batch, None)
    reg = ClipCov(**_CLIP)
    reg.prepare(ctx)
    old = clip_cov_select(ctx.covariance(), ctx.mask, ctx.mask.bool() & ~ctx.clipped, ratio=_CLIP["ratio"],
                          lb=_CLIP["lb"], ub=_CLIP["ub"], generator=torch.Generator().manual_seed(_CLIP["seed"]))
    assert torch.equal(reg.selected, old) and old.sum() >= 2
    assert _selected(reg) == _oracle_clip_cov(batch[0], batch[2], batch[3].bool().tolist(), ctx.clipped, **_CLIP)
    every = _clip_ctx(batch, None)
    every.in_phase = batch[3].bool()
    whole = ClipCov(**_CLIP)
    whole.prepare(every)
    assert torch.equal(whole.selected, reg.selected)
    assert whole.pop_metrics() == reg.pop_metrics()


class _Spy(Regularizer):
    """Records ctx.phase, ctx.in_phase and the scope of the phase-splitting regularizer it is given."""

    def __init__(self, lopti: Lopti | None) -> None:
        super().__init__(None, "spy")
        self.lopti, self.seen = lopti, []

    def prepare(self, ctx: MiniBatchContext) -> None:
        want = None if self.lopti is None else self.lopti.phase_tokens(ctx)
        self.seen.append((ctx.phase, None if ctx.in_phase is None else ctx.in_phase.clone(), want))

    def shape(self, batch) -> TokenShaping:
        return TokenShaping()


@pytest.mark.parametrize("with_lopti", [True, False])
def test_the_learner_sets_the_phase_s_tokens_before_any_prepare(tiny_model_dir, with_lopti):
    """The spy comes first in the callback list, so it is prepared before Lopti (and BAPO, a
    clip-range setter, before both): ctx.in_phase is already Lopti's phase; None without Lopti."""
    from tests.test_probability_controls import _learner_params

    lopti = Lopti(eta=0.1) if with_lopti else None
    spy = _Spy(lopti)
    kl, bapo = KLCov(ratio=0.3), BAPO()
    regs = [spy, kl, bapo] + ([lopti] if with_lopti else [])
    _learner_params(tiny_model_dir, regs, 64)
    assert [p for p, *_ in spy.seen] == ([0, 0, 1, 1] if with_lopti else [0, 0])
    for _, got, want in spy.seen:
        assert (got is None and want is None) or torch.equal(got, want)
    if with_lopti:
        assert any(0 < float(got.sum()) < float(got.numel()) for _, got, _ in spy.seen)


# --- across ranks ------------------------------------------------------------------------------------
_TARGET = 0.5463  # seed 0, n 12, phase 1: halfway along the phase's range of P / N (c_high stops at 1.18)


def _phase_decisions(rows: slice) -> dict[str, torch.Tensor]:
    """KL-Cov's and Clip-Cov's selections and BAPO's range in phase 1 of these rows of one mini-batch."""
    batch = tuple(t[rows] for t in _batch(0, n=12))
    kl, bapo = KLCov(ratio=0.2), BAPO(target=_TARGET, low_start=0.8, low_max=0.95, low_step=0.05, high_start=1.0,
                                      high_max=1.5, high_step=0.02)
    clip = ClipCov(**_CLIP)
    kl.prepare(_ctx(batch, 1))
    bapo.prepare(_ctx(batch, 1))
    clip.prepare(_clip_ctx(batch, 1))
    metrics = {**kl.pop_metrics(), **bapo.pop_metrics(), **clip.pop_metrics()}
    return {"kl": kl.selected, "clip": clip.selected, "bapo": torch.stack([b[0, 0] for b in bapo.clip_bounds()]),
            "metrics": torch.tensor([metrics[k] for k in sorted(metrics)], dtype=torch.float64)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(_phase_decisions(slice(rank * 6, rank * 6 + 6)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_decide_over_the_phase_s_tokens_of_both(tmp_path):
    """2 gloo processes holding 6 rows each: KL-Cov and Clip-Cov select, and BAPO sets, what 1 process
    holding all 12 does in the phase (the covariance's means, N and P / N are the phase's over both ranks)."""
    single = _phase_decisions(slice(0, 12))
    assert single["kl"].sum() >= 2 and single["clip"].sum() >= 2 and 0.0 < float(single["bapo"][1]) < 0.5
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(torch.cat([p["kl"] for p in parts]), single["kl"])
    assert torch.equal(torch.cat([p["clip"] for p in parts]), single["clip"])
    for p in parts:
        assert torch.equal(p["bapo"], single["bapo"])
        torch.testing.assert_close(p["metrics"], single["metrics"], rtol=1e-9, atol=1e-12)
    halves = [_phase_decisions(slice(0, 6)), _phase_decisions(slice(6, 12))]  # each half alone decides otherwise
    assert not torch.equal(torch.cat([h["kl"] for h in halves]), single["kl"])
    assert not torch.equal(torch.cat([h["clip"] for h in halves]), single["clip"])
    assert any(not torch.equal(h["bapo"], single["bapo"]) for h in halves)
