"""Mini-batch-wide decisions are global: 2 gloo processes holding half the mini-batch each select
exactly the tokens that 1 process holding all of it selects (Clip-Cov, KL-Cov and the entropy
controls: 80/20 quantile, STEER weights, entropy-ratio clip, adaptive bonus, entropy advantage,
EntroPIC, Lp-Reg's lowest log-probs, SIREN's mini-batch deviation, BAPO's clip range, ERA's metrics,
AEnt's coefficient, AEPO's temperature and extra responses, GTPO's per-group conflict tokens and metrics,
AR's weights and Lopti's phases),
and each objective's loss, metrics and gradient add up across ranks to the single-process ones."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_covrl.algorithms import (aggregate, ppo_clipped_tokens, token_clamped_entropy, token_entropy, token_logprobs,
                                  token_proxy_logprobs, token_scaled_logprobs, token_topk_logprobs, token_topp_entropy)
from lit_covrl.objectives import ASPO, CEGPPO, CISPO, GSPO, PPOClip
from lit_covrl.regularizers import (
    AEPO,
    AEnt,
    AdaptiveEntropyBonus,
    AdvantageReweighting,
    Archer,
    BAPO,
    ClipCov,
    ERA,
    EntroPIC,
    EntropyAdvantage,
    EntropyRatioClip,
    HighEntropyTokens,
    KLCov,
    Lopti,
    LpReg,
    SimKO,
    SIREN,
    SteerWeights,
    TrajectoryGTPO,
    WeightedReinforce,
)
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.types import PolicyBatch

N, T = 12, 7


def _batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logp = -torch.rand(N, T, generator=g) * 4 * mask
    old = logp + 0.05 * torch.randn(N, T, generator=g) * mask
    adv = torch.randn(N, 1, generator=g).expand(N, T) * mask
    return logp, old, adv, mask


def _select(rows: slice) -> dict[str, torch.Tensor]:
    logp, old, adv, mask = (t[rows] for t in _batch())
    clipped = ppo_clipped_tokens(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    ctx = MiniBatchContext(0, 1, False, logp, old, adv, mask, clipped)
    clip, kl = ClipCov(ratio=0.15, lb=-1e9, ub=1e9, seed=7), KLCov(ratio=0.1)
    clip.prepare(ctx)
    kl.prepare(ctx)
    return {"clip": clip.selected, "kl": kl.selected, "cov": ctx.covariance(),
            "frac": torch.tensor(clip.pop_metrics()["reg/clip_cov/selected_frac"])}


def _entropy(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(current, rollout) entropy [N, T] of the same rows."""
    g = torch.Generator().manual_seed(1)
    ent = torch.rand(N, T, generator=g) * 2
    old = ent * (1 + 0.1 * torch.randn(N, T, generator=g))
    return ent[rows], old[rows]


def _entropy_controls(rows: slice) -> dict[str, torch.Tensor]:
    """Every mini-batch-wide entropy control on these rows: its per-token decision and its metrics."""
    logp, old, adv, mask = (t[rows] for t in _batch())
    ent, old_ent = _entropy(rows)
    clipped = ppo_clipped_tokens(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    out = {}
    adaptive = AdaptiveEntropyBonus(target=1.0, delta=0.01)
    for step in range(3):  # the coefficient follows the entropy of all ranks' tokens
        ctx = MiniBatchContext(step, 1, False, logp, old, adv, mask, clipped, old_ent * (0.5 + step * 0.4), ent)
        adaptive.prepare(ctx)
    out["adaptive_coef"] = torch.tensor([adaptive.coef, adaptive.coef_now])
    entropic = EntroPIC(target=1.0, kp=0.5, ki=0.1, threshold=0.5)
    for step in range(3):  # alpha follows the entropy of all ranks' tokens; the term divides by global counts
        ctx = MiniBatchContext(step, 1, False, logp, old, adv, mask, clipped, old_ent * (0.5 + step * 0.4), ent,
                               agg_mode="seq-mean-token-mean")
        entropic.prepare(ctx)
    out["entropic_penalty"] = entropic.shape(PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask)).penalty
    out["entropic_state"] = torch.tensor([entropic.alpha, entropic.integral])
    out.update({k: torch.tensor(v) for k, v in entropic.pop_metrics().items()})
    ctx = MiniBatchContext(0, 1, False, logp, old, adv, mask, clipped, old_ent, ent)
    for reg in (HighEntropyTokens(top_frac=0.3), SteerWeights(), EntropyRatioClip(), WeightedReinforce(),
                AdvantageReweighting(alpha=0.3)):
        reg.prepare(ctx)
        out[reg.name] = reg.weights
        out.update({k: torch.tensor(v) for k, v in reg.pop_metrics().items()})
    lopti = Lopti(eta=0.2)  # per token; its fraction over all ranks' tokens
    for phase in (0, 1):
        lopti.prepare(MiniBatchContext(0, phase, False, logp, old, adv, mask, clipped, old_ent, ent, phase=phase))
        out[f"lopti_{phase}"] = lopti.scope
    out.update({k: torch.tensor(v) for k, v in lopti.pop_metrics().items()})
    archer = Archer(high_entropy_kl_scale=0.25)  # per response: each rank's rows decide alone
    archer.prepare(ctx)
    out["archer_low"], out["archer_high"] = archer.clip_bounds()
    out["archer_kl_scale"] = archer.kl_scale()
    out.update({k: torch.tensor(v) for k, v in archer.pop_metrics().items()})
    shift = EntropyAdvantage()
    shift.prepare(ctx)
    shift.shape(PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask, ent))
    out.update({k: torch.tensor(v) for k, v in shift.pop_metrics().items()})
    return out


def _objectives(rows: slice) -> dict[str, torch.Tensor]:
    """Each objective's aggregated loss, its metrics (rank shares of global token means, summed
    over ranks as the learner does) and its gradient on these rows."""
    from lit_covrl import distributed

    logp, old, adv, mask = (t[rows] for t in _batch())
    n_tok = distributed.all_sum(mask.sum())
    out = {}
    for name, obj in (("ppo", PPOClip()), ("gspo", GSPO(clip_low=0.01, clip_high=0.01)), ("cispo", CISPO()),
                      ("ce_gppo", CEGPPO(clip_low=0.02, clip_high=0.02, beta1=0.5, beta2=1.5)),
                      ("aspo", ASPO(clip_low=0.02, clip_high=0.02, dual_clip=1.03))):
        z = logp.clone().requires_grad_(True)
        loss = aggregate(obj.token_loss(z, old, adv, mask), mask, "token-mean", num_tokens=n_tok)
        loss.backward()
        stats = obj.stats(logp, old, adv, mask, num_tokens=n_tok)
        out[f"{name}/metrics"] = distributed.all_sum(torch.stack([loss.detach(), *stats.values()]))
        out[f"{name}/grad"] = z.grad
    archer = Archer(low_entropy_clip_low=0.02, low_entropy_clip_high=0.02, high_entropy_clip_low=0.05,
                    high_entropy_clip_high=0.05)
    archer.prepare(MiniBatchContext(0, 1, False, logp, old, adv, mask, None, *_entropy(rows)[::-1]))
    clip = archer.clip_bounds()  # each token-level objective under Archer's per-token range
    for name, obj in (("ppo+archer", PPOClip(dual_clip=3.0)), ("cispo+archer", CISPO()),
                      ("ce_gppo+archer", CEGPPO(beta1=0.5, beta2=1.5)), ("aspo+archer", ASPO(dual_clip=1.03))):
        z = logp.clone().requires_grad_(True)
        loss = aggregate(obj.token_loss(z, old, adv, mask, clip=clip), mask, "token-mean", num_tokens=n_tok)
        loss.backward()
        stats = obj.stats(logp, old, adv, mask, num_tokens=n_tok, clip=clip)
        out[f"{name}/metrics"] = distributed.all_sum(torch.stack([loss.detach(), *stats.values()]))
        out[f"{name}/grad"] = z.grad
    out.update(_bapo(rows, n_tok))
    out.update(_simko(rows, n_tok))
    out.update(_lp_reg(rows, n_tok))
    out.update(_siren(rows, n_tok))
    out.update(_era(rows, n_tok))
    out.update(_aent(rows, n_tok))
    out.update(_aepo(rows))
    out.update(_gtpo(rows, n_tok))
    return out


def _bapo_reg() -> BAPO:
    # a target between the whole batch's P / N at the start range (0.5815) and at the widest (0.5868):
    # c_low goes to its max, c_high stops at 1.04; each half alone would decide otherwise
    return BAPO(target=0.582, low_start=0.9, low_max=0.99, low_step=0.03, high_start=1.0, high_max=1.1, high_step=0.01)


def _bapo(rows: slice, n_tok) -> dict[str, torch.Tensor]:
    """PPOClip (dual-clip) under BAPO's range, searched over all ranks' rows: the bounds, the loss,
    metrics and gradient."""
    from lit_covrl import distributed

    logp, old, adv, mask = (t[rows] for t in _batch())
    reg, obj = _bapo_reg(), PPOClip(dual_clip=3.0)
    reg.prepare(MiniBatchContext(0, 1, False, logp, old, adv, mask, None))
    clip = reg.clip_bounds()
    z = logp.clone().requires_grad_(True)
    loss = aggregate(obj.token_loss(z, old, adv, mask, clip=clip), mask, "token-mean", num_tokens=n_tok)
    loss.backward()
    stats = obj.stats(logp, old, adv, mask, num_tokens=n_tok, clip=clip)
    return {"ppo+bapo/metrics": distributed.all_sum(torch.stack([loss.detach(), *stats.values()])),
            "ppo+bapo/grad": z.grad, "bapo_bounds": torch.stack([clip[0][0, 0], clip[1][0, 0]]),
            **{k: torch.tensor(v) for k, v in reg.pop_metrics().items()}}


def _simko(rows: slice, n_tok) -> dict[str, torch.Tensor]:
    """PPOClip + SimKO from logits [N, T, V] (the top-K log-probs and entropy with grad): its
    loss, metrics (a collective) and the gradient w.r.t. the logits of these rows."""
    from lit_covrl.types import TokenShaping

    g = torch.Generator().manual_seed(2)
    logits = 2.0 * torch.randn(N, T, 9, generator=g)
    labels = torch.multinomial(torch.softmax(logits.view(-1, 9), -1), 1, generator=g).view(N, T)
    _, old, adv, mask = (t[rows] for t in _batch())
    z = logits[rows].clone().requires_grad_(True)
    logp, top, top1 = token_topk_logprobs(z, labels[rows], 3)
    old = logp.detach() + (old - _batch()[0][rows])  # the batch's log-ratios
    reg, obj = SimKO(mix_topk_coef=0.5, tau=0.5, incorrect_top1_scale=2.0), PPOClip()
    s = reg.shape(PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask, token_entropy(z), topk_logp=top, top1=top1))
    base = obj.token_loss(TokenShaping.redirected_logp([s], logp), old, adv, mask)
    loss = aggregate(TokenShaping.combine([s], base), mask, "token-mean", num_tokens=n_tok)
    loss.backward()
    from lit_covrl import distributed

    return {"ppo+simko/loss": distributed.all_sum(loss.detach()), "ppo+simko/grad": z.grad.flatten(1),
            **{k: torch.tensor(v) for k, v in reg.pop_metrics().items()}}


def _lp_reg(rows: slice, n_tok) -> dict[str, torch.Tensor]:
    """PPOClip + Lp-Reg from logits [N, T, V] (log-probs with grad, the min-p proxy): the selection
    (the lowest log-probs of the whole mini-batch), its loss, metrics (collectives) and the gradient
    w.r.t. the logits of these rows."""
    from lit_covrl import distributed
    from lit_covrl.types import TokenShaping

    g = torch.Generator().manual_seed(3)
    logits = 2.0 * torch.randn(N, T, 9, generator=g)
    labels = torch.multinomial(torch.softmax(logits.view(-1, 9), -1), 1, generator=g).view(N, T)
    _, old, adv, mask = (t[rows] for t in _batch())
    z = logits[rows].clone().requires_grad_(True)
    logp = token_logprobs(z, labels[rows])
    old = logp.detach() + (old - _batch()[0][rows])
    reg, obj = LpReg(min_p=0.3, neg_ratio=0.5, pos_ratio=0.3), PPOClip()
    reg.prepare(MiniBatchContext(0, 1, False, logp.detach() * mask, old * mask, adv, mask, None))
    s = reg.shape(PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask,
                              proxy_logp=token_proxy_logprobs(z, labels[rows], reg.min_p)))
    loss = aggregate(TokenShaping.combine([s], obj.token_loss(logp, old, adv, mask)), mask, "token-mean", num_tokens=n_tok)
    loss.backward()
    return {"ppo+lp_reg/loss": distributed.all_sum(loss.detach()), "ppo+lp_reg/grad": z.grad.flatten(1),
            "lp_reg/selected": reg.selected.float(), **{k: torch.tensor(v) for k, v in reg.pop_metrics().items()}}


def _siren(rows: slice, n_tok) -> dict[str, torch.Tensor]:
    """PPOClip + SIREN from logits [N, T, V] (the nucleus entropy with grad), under
    seq-mean-token-mean: the deviation of the whole mini-batch (a collective), the loss, the
    gradient w.r.t. the logits of these rows and the metrics."""
    from lit_covrl import distributed
    from lit_covrl.types import TokenShaping

    g = torch.Generator().manual_seed(3)
    logits = 2.0 * torch.randn(N, T, 9, generator=g)
    logp, old, adv, mask = (t[rows] for t in _batch())
    z = logits[rows].clone().requires_grad_(True)
    h = token_topp_entropy(z, top_p=0.9, top_k=6)
    measured = SIREN(top_p=0.9, top_k=6, quantile=0.5)  # the anchor of all ranks' rows
    measured.observe_rollout(1.3 * h.detach() * mask, mask)
    reg, obj = SIREN(coef=2.0, top_p=0.9, top_k=6, quantile=0.5, anchor=0.3), PPOClip()
    n_seq = distributed.all_sum(torch.tensor(float(len(mask))))
    reg.prepare(MiniBatchContext(0, 0, True, logp, old, adv, mask, None, agg_mode="seq-mean-token-mean",
                                 norm_length=T, topp_entropy=h.detach() * mask))
    s = reg.shape(PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask, topp_entropy=h))
    loss = aggregate(TokenShaping.combine([s], obj.token_loss(logp, old, adv, mask)), mask, "seq-mean-token-mean",
                     num_tokens=n_tok, num_seqs=n_seq)
    loss.backward()
    return {"ppo+siren/loss": distributed.all_sum(loss.detach()), "ppo+siren/grad": z.grad.flatten(1),
            "siren_anchor": torch.tensor(measured.anchor_value),
            **{k: torch.tensor(v) for k, v in reg.pop_metrics().items()}}


def _era(rows: slice, n_tok) -> dict[str, torch.Tensor]:
    """PPOClip + ERA from logits [N, T, V] (responses of spread entropies; the scaled log-probs with
    grad), off policy: each response's decision (its own tokens' current entropies), the loss, the
    gradient w.r.t. the logits of these rows and the metrics (collectives)."""
    from lit_covrl import distributed
    from lit_covrl.types import TokenShaping

    g = torch.Generator().manual_seed(5)
    logits = 2.0 * torch.randn(N, T, 9, generator=g) * torch.linspace(0.2, 2.0, N)[:, None, None]
    labels = torch.multinomial(torch.softmax(logits.view(-1, 9), -1), 1, generator=g).view(N, T)
    _, old, adv, mask = (t[rows] for t in _batch())
    z = logits[rows].clone().requires_grad_(True)
    logp = token_logprobs(z, labels[rows])
    old = logp.detach() + (old - _batch()[0][rows])
    ent = token_entropy(z.detach()) * mask
    reg, obj = ERA(low=1.4, high=2.0), PPOClip()  # one positive response sharpened (rank 1's), one flattened (rank 0's)
    reg.prepare(MiniBatchContext(0, 1, False, logp.detach() * mask, old * mask, adv, mask, None, ent, ent))
    b = PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask,
                    scaled_logp=token_scaled_logprobs(z, labels[rows], reg.needs_logit_scales))
    s = reg.shape(b)
    base = obj.token_loss(TokenShaping.redirected_logp([s], logp), old, adv, mask)
    loss = aggregate(TokenShaping.combine([s], base), mask, "token-mean", num_tokens=n_tok)
    loss.backward()
    return {"ppo+era/loss": distributed.all_sum(loss.detach()), "ppo+era/grad": z.grad.flatten(1),
            "era/sharpened": reg._modes[0].float(), "era/flattened": reg._modes[1].float(),
            **{k: torch.tensor(v) for k, v in reg.pop_metrics().items()}}


def _aent(rows: slice, n_tok) -> dict[str, torch.Tensor]:
    """PPOClip + AEnt from logits [N, T, V] (the clamped entropy with grad) over RL steps 1-3, the
    logits sharper each step: the coefficient after each step follows the clamped entropy of all
    ranks' tokens (each half alone: step 1's is above the band on one rank, inside it on the other),
    then the last step's loss, gradient w.r.t. the logits and metrics."""
    from lit_covrl import distributed
    from lit_covrl.types import TokenShaping

    g = torch.Generator().manual_seed(4)
    logits = 2.0 * torch.randn(N, T, 9, generator=g)
    logp, old, adv, mask = (t[rows] for t in _batch())
    reg, obj = AEnt(init_coef=0.1, entropy_low=1.0, entropy_high=1.22, coef_lr=0.5, max_coef=1.0, warmup_steps=0), PPOClip()
    coefs, metrics = [], {}
    for step in (1, 2, 3):
        z = (logits[rows] * (1 + 0.5 * (step - 1))).requires_grad_(True)
        reg.prepare(MiniBatchContext(step, 0, True, logp, old, adv, mask, None))
        s = reg.shape(PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask,
                                  clamped_entropy=token_clamped_entropy(z, clamp_p=reg.clamp_p)))
        loss = aggregate(TokenShaping.combine([s], obj.token_loss(logp, old, adv, mask)), mask, "token-mean",
                         num_tokens=n_tok)
        loss.backward()
        metrics = reg.pop_metrics()
        coefs.append(reg.coef)
    return {"ppo+aent/loss": distributed.all_sum(loss.detach()), "ppo+aent/grad": z.grad.flatten(1),
            "aent_coefs": torch.tensor(coefs, dtype=torch.float64), **{k: torch.tensor(v) for k, v in metrics.items()}}


def _aepo(rows: slice) -> dict[str, torch.Tensor]:
    """AEPO over RL steps 0-2: each step's temperature follows the previous step's rollout entropy
    over all ranks' tokens (step 0's, 0.513 on the whole, is above the 0.51 target: T_low at step 1,
    where the second half alone, 0.500, would draw at T_high), and the extra responses trained on
    are the first min(sample_num, P) // 2**halve of all ranks' candidates in rank order (rows 3, 5
    and 8 of the candidates 3, 5, 8, 11 with sample_num 3; each half alone would take its own)."""
    logp, old, adv, mask = (t[rows] for t in _batch())
    old_ent = _entropy(rows)[1]
    extra_adv = torch.randn(N, generator=torch.Generator().manual_seed(5))[rows]
    reg, temps, chosen, metrics = AEPO(target_entropy=0.51, sample_num=3), [], [], {}
    for step, scale in enumerate((0.5, 0.3, 0.9)):
        temps.append(reg.rollout_request(step, 8)[1])
        chosen.append(reg.choose_extra(extra_adv))
        reg.prepare(MiniBatchContext(step, 0, True, logp, old, adv, mask, None, old_ent * scale))
        metrics.update(reg.pop_metrics())
    return {"aepo_temperatures": torch.tensor(temps, dtype=torch.float64),
            "aepo_chosen": torch.stack(chosen, 1).float(), **{k: torch.tensor(v) for k, v in metrics.items()}}


def _gtpo(rows: slice, n_tok) -> dict[str, torch.Tensor]:
    """PPOClip + TrajectoryGTPO from logits [N, T, V]: groups of 3 responses (each rank holds two
    whole groups and numbers them from 0, as a rank numbers its own prompts), tokens drawn from 3
    ids so that groups share openings and endings, responses of spread entropies (some dropped):
    the weights, the advantage shift, the loss, the gradient w.r.t. the logits and the metrics."""
    from lit_covrl import distributed
    from lit_covrl.types import TokenShaping

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(N, T, 9, generator=g) * torch.linspace(0.5, 3.0, N)[:, None, None]
    labels = torch.randint(0, 3, (N, T), generator=g)
    _, old, adv, mask = (t[rows] for t in _batch())
    z = logits[rows].clone().requires_grad_(True)
    logp = token_logprobs(z, labels[rows])
    old = logp.detach() + (old - _batch()[0][rows])
    ent = token_entropy(z.detach()) * mask
    reg, obj = TrajectoryGTPO(entropy_threshold=1.5), PPOClip()
    groups = torch.arange(len(mask)) // 3
    reg.prepare(MiniBatchContext(0, 1, False, logp.detach() * mask, old * mask, adv, mask, None, ent, ent,
                                 token_ids=labels[rows], groups=groups))
    s = reg.shape(PolicyBatch(torch.arange(len(mask)), logp, old, adv, mask))
    base = obj.token_loss(logp, old, TokenShaping.shifted_advantages([s], adv), mask)
    loss = aggregate(TokenShaping.combine([s], base), mask, "token-mean", num_tokens=n_tok)
    loss.backward()
    return {"ppo+gtpo/loss": distributed.all_sum(loss.detach()), "ppo+gtpo/grad": z.grad.flatten(1),
            "gtpo/weights": reg.weights, "gtpo/shift": s.advantage_shift,
            **{k: torch.tensor(v) for k, v in reg.pop_metrics().items()}}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = N // 2
        rows = slice(rank * half, (rank + 1) * half)
        torch.save({**_select(rows), "entropy": {**_entropy_controls(rows), **_objectives(rows)}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_select_what_one_process_selects(tmp_path):
    single = _select(slice(0, N))
    assert single["clip"].sum() >= 2 and single["kl"].sum() >= 2
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("clip", "kl"):
        assert torch.equal(torch.cat([p[key] for p in parts]), single[key]), key
    torch.testing.assert_close(torch.cat([p["cov"] for p in parts]), single["cov"])  # global means
    for p in parts:  # every rank reports the global fraction
        assert float(p["frac"]) == pytest.approx(float(single["frac"]), abs=1e-7)
    # the entropy controls: the 80/20 quantile, STEER's min/max, the ERC ratio, the adaptive
    # coefficient's measured entropy and the advantage-shift metrics are global too
    whole = {**_entropy_controls(slice(0, N)), **_objectives(slice(0, N))}
    assert 0 < whole["gspo/metrics"][2] < 1  # GSPO clip_frac: some sequences clipped, some not
    assert 0 < whole["ce_gppo/metrics"][2] < 1  # CE-GPPO clip_frac: some tokens outside the range, their gradient kept
    assert 0 < whole["aspo/metrics"][-1] < 1 and 0 < whole["aspo+archer/metrics"][-1] < 1  # ASPO's soft_clip_frac
    assert 0 < whole["high_entropy_tokens"].sum() < whole["steer"].numel()
    assert 0 < whole["reg/lopti/low_frac"] < 1 and whole["lopti_0"].sum() > 0 and whole["lopti_1"].sum() > 0
    assert 0.7 < whole["reg/ar/weight_mean"] < 1
    assert whole["entropic_state"][0] != 0 and 0 < whole["reg/entropic/high_frac"] < 1
    assert (whole["entropic_penalty"] != 0).any()
    assert 0 < whole["reg/archer/high_entropy_frac"] < 1 and 0 < whole["ppo+archer/metrics"][2] < 1
    assert 0 < whole["reg/simko/mixed_frac"] < 1 and 0 < whole["reg/simko/top1_penalized_frac"] < 1
    assert 0 < whole["reg/lp_reg/selected_frac"] < 1 and 0 < whole["reg/lp_reg/regularized_frac"] < 1
    assert 0 < whole["reg/siren/selected_frac"] < 1 and abs(whole["reg/siren/deviation"]) > 0.05
    assert whole["ppo+siren/grad"].abs().sum() > 0
    assert whole["reg/era/sharpened_frac"] == pytest.approx(1 / N) and whole["reg/era/flattened_frac"] == pytest.approx(1 / N)
    assert whole["era/sharpened"][N // 2:].any() and whole["era/flattened"][:N // 2].any()
    assert whole["reg/bapo/clip_low"] == 0.99 and float(whole["reg/bapo/clip_high"]) == pytest.approx(1.04)
    assert 0 < whole["ppo+bapo/metrics"][2] < 1
    assert whole["aent_coefs"][0] < 0.1 < whole["aent_coefs"][1] < whole["aent_coefs"][2]  # down, then up twice
    assert whole["ppo+aent/grad"].abs().sum() > 0
    assert whole["aepo_temperatures"].tolist() == [1.2, 0.8, 1.2]
    assert [c.nonzero().flatten().tolist() for c in whole["aepo_chosen"].T] == [[3, 5, 8], [3], [3, 5, 8]]
    assert 0 < whole["reg/trajectory_gtpo/conflict_frac"] < 1 and 0 < whole["reg/trajectory_gtpo/filtered_frac"] < 1
    assert (whole["gtpo/weights"] == 2).any() and (whole["gtpo/weights"] == 0).any()
    for key, value in whole.items():
        if value.dim() == 2:  # per-token decisions: the halves concatenate to the whole
            torch.testing.assert_close(torch.cat([p["entropy"][key] for p in parts]), value, msg=key)
        else:  # scalars: every rank reports the global value
            for p in parts:
                torch.testing.assert_close(p["entropy"][key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_local_selection_would_differ():
    """The test above can fail: selecting per half (the reference code's per-GPU behaviour)
    gives a different set than selecting over the whole mini-batch."""
    single = _select(slice(0, N))
    local = torch.cat([_select(slice(0, N // 2))["kl"], _select(slice(N // 2, N))["kl"]])
    assert not torch.equal(local, single["kl"])
    bounds = []
    for rows in (slice(0, N), slice(0, N // 2), slice(N // 2, N)):  # BAPO's range: the whole batch's, each half's
        reg = _bapo_reg()
        reg.prepare(MiniBatchContext(0, 1, False, *(t[rows] for t in _batch()), None))
        m = reg.pop_metrics()
        bounds.append((m["reg/bapo/clip_low"], round(m["reg/bapo/clip_high"], 9)))
    assert bounds == [(0.99, 1.04), (0.9, 1.0), (0.99, 1.1)]
    coefs = [_aent(rows, torch.tensor(1.0))["aent_coefs"][0].item() for rows in (slice(0, N // 2), slice(N // 2, N))]
    assert coefs[0] < 0.1 == coefs[1]  # AEnt's first move: one half above the band, the other inside it
    halves = [_aepo(rows) for rows in (slice(0, N // 2), slice(N // 2, N))]
    assert [h["aepo_temperatures"][1].item() for h in halves] == [0.8, 1.2]  # AEPO: each half's own entropy
    assert halves[1]["aepo_chosen"][:, 0].nonzero().flatten().tolist() == [2, 5]  # rows 8 and 11: its own first 3
