"""TrajectoryGTPO (GTPO, Simoni et al. 2025, arXiv 2508.03772; winstonsmith1897/GTPO): the conflict
tokens, their weights and the conflict counts by hand (groups kept apart, positions among the valid
tokens), the entropy filter and advantage shift by hand; the composed loss's value and gradient
against a float64 loop of the reference's rules (gtpo_training.py: build_conflict_mask's opening
and closing runs, W_RAW on positive and 0 on negative conflict tokens, each response's loss divided
by its conflict count, responses above ENT_THRESHOLD dropped, A - ENT_SCALE H on the kept ones) for
micro-batches of 1, 5 and all rows; start-up validation; the learner's token ids and groups; a fit
through the CLI whose tags move and a bad setting refused there. Micro-batch and device invariance:
tests/test_module.py and tests/test_distributed_selection.py."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import (
    aggregate,
    gtpo_conflict_counts,
    gtpo_conflict_weights,
    gtpo_conflicts,
    gtpo_filter,
    gtpo_response_entropy,
    token_entropy,
    token_logprobs,
)
from lit_covrl.objectives import PPOClip
from lit_covrl.regularizers import EntropyAdvantage, Regularizer, TrajectoryGTPO
from lit_covrl.regularizers.base import MiniBatchContext, check_stack
from lit_covrl.types import PolicyBatch, TokenShaping

F64 = torch.float64


def _hand_groups():
    """Group 0: + [5 6 7 9], - [5 6 8 9], - [5 1 7 9 2], 0 [4 6 7 9]; group 1: + [5 6 8 9] (row 1's
    tokens, another group), - [3 3 3 3]. Padding 0."""
    ids = torch.tensor([[5, 6, 7, 9, 0], [5, 6, 8, 9, 0], [5, 1, 7, 9, 2], [4, 6, 7, 9, 0], [5, 6, 8, 9, 0],
                        [3, 3, 3, 3, 0]])
    mask = (ids != 0).to(F64)
    adv = torch.tensor([1.0, -1.0, -1.0, 0.0, 0.5, -0.5], dtype=F64)
    return ids, mask, adv, torch.tensor([0, 0, 0, 0, 1, 1])


def test_conflicts_weights_and_counts_by_hand():
    """Opening runs: row 0 all four (5, 6, 7 and 9 each in a + and a - row at its position), row 1
    two (its 8 is in no + row), row 2 one (its 1 nowhere else); closing runs: rows 0 and 1 their
    last token (9, last in both), row 2 none (its last 2 is in no + row); row 3 (A = 0) and group 1
    (no shared token with the other sign in its group) none. Weights: 2 per run on the + row (4
    where both runs meet), 0 on the - rows' conflict tokens; counts max(opening, closing)."""
    ids, mask, adv, groups = _hand_groups()
    lead, trail = gtpo_conflicts(ids, mask, adv, groups)
    T, F = True, False
    assert lead.tolist() == [[T, T, T, T, F], [T, T, F, F, F], [T, F, F, F, F], [F] * 5, [F] * 5, [F] * 5]
    assert trail.tolist() == [[F, F, F, T, F], [F, F, F, T, F], [F] * 5, [F] * 5, [F] * 5, [F] * 5]
    w = gtpo_conflict_weights(lead, trail, adv, positive_weight=2.0) * mask
    assert w.tolist() == [[2, 2, 2, 4, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0],
                          [1, 1, 1, 1, 0]]
    assert gtpo_conflict_counts(lead, trail).tolist() == [4, 2, 1, 1, 1, 1]  # row 0: max(4, 1), not 5
    # the same tokens in one group: row 4 (+) now conflicts with row 1 (-) everywhere
    lead, trail = gtpo_conflicts(ids, mask, adv, torch.zeros(6, dtype=torch.long))
    assert lead[4, :4].all() and trail[4, :4].all() and lead[1, :4].all()


def test_positions_are_counted_among_the_valid_tokens():
    """A masked-out token does not shift the positions: [7 x 8] with x masked lines up with [7 8]."""
    ids = torch.tensor([[7, 1, 8], [7, 8, 0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    lead, trail = gtpo_conflicts(ids, mask, torch.tensor([1.0, -1.0]), torch.zeros(2, dtype=torch.long))
    assert lead.tolist() == [[True, False, True], [True, True, False]] and torch.equal(lead, trail)


def test_entropy_filter_and_shift_by_hand():
    ent = torch.tensor([[0.2, 0.4, 9.0], [0.5, 1.0, 9.0], [1.0, 0.8, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=F64)
    h = gtpo_response_entropy(ent, mask)
    torch.testing.assert_close(h, torch.tensor([0.3, 0.75, 0.9], dtype=F64))
    kept, shift = gtpo_filter(h, threshold=0.75, scale=0.1)
    assert kept.tolist() == [True, True, False]  # H == threshold is kept (the reference's <=)
    torch.testing.assert_close(shift, torch.tensor([-0.03, -0.075, 0.0], dtype=F64))
    assert gtpo_response_entropy(ent[:1], torch.zeros(1, 3, dtype=F64)).item() == 0.0  # no valid token


def _problem(seed: int = 0):
    """12 responses in 3 groups of 4, tokens from 3 of 7 ids (shared openings and endings), lengths
    2..6, advantages of both signs and 0, logits of spread sharpness (some responses above the
    threshold), old log-probs off by a little (some ratios outside PPO's 0.2 range)."""
    g = torch.Generator().manual_seed(seed)
    n, T, V = 12, 6, 7
    z = torch.randn(n, T, V, generator=g, dtype=F64) * torch.linspace(0.3, 2.5, n, dtype=F64)[:, None, None]
    labels = torch.randint(0, 3, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F64)
    adv = torch.tensor([1.0, -1.0, 0.5, 1.0, -0.5, 1.0, -1.0, 1.5, 1.0, 0.0, -2.0, -1.0], dtype=F64)
    old = token_logprobs(z, labels) + 0.3 * torch.randn(n, T, generator=g, dtype=F64)
    return z, labels, mask, adv, old, torch.arange(n) // 4


def _reference_loop(z, labels, mask, adv, old, groups, *, w, threshold, scale, count_norm, clip=0.2):
    """The reference's rules in float64, one response and one token at a time: the opening run
    (the k-th token of a response with A != 0 while a + and a - response of its group hold the
    same token k-th), the closing run (k-th from the end), weight w per run on + responses and 0
    on - ones, the loss of each A != 0 response divided by max(opening, closing) (at least 1) with
    count_norm, H the response's mean token entropy of softmax(z), dropped when H > threshold, else
    A - scale H; PPO-clip on each token, token-mean."""
    zz = z.clone().requires_grad_(True)
    n, T, _ = z.shape
    toks = [[int(labels[i, t]) for t in range(T) if mask[i, t] > 0] for i in range(n)]

    def has(i, k, from_end, sign):
        y = toks[i][-1 - k] if from_end else toks[i][k]
        return any(groups[j] == groups[i] and sign * float(adv[j]) > 0 and len(toks[j]) > k
                   and (toks[j][-1 - k] if from_end else toks[j][k]) == y for j in range(n))

    def run(i, from_end):
        k = 0
        while k < len(toks[i]) and float(adv[i]) != 0 and has(i, k, from_end, 1) and has(i, k, from_end, -1):
            k += 1
        return k

    total = zz.new_zeros(())
    for i in range(n):
        L, a = len(toks[i]), float(adv[i])
        p = torch.softmax(zz[i, :L].detach(), -1)
        h = float(-(p * p.log()).sum(-1).mean())
        if h > threshold:
            continue
        lead, trail = run(i, False), run(i, True)
        div = max(lead, trail, 1) if count_norm else 1
        for t in range(L):
            lam = 1.0
            for in_run in (t < lead, L - 1 - t < trail):
                if in_run:
                    lam *= w if a > 0 else 0.0
            a2 = a - scale * h
            r = torch.exp(torch.log_softmax(zz[i, t], -1)[toks[i][t]] - old[i, t])
            total = total + lam / div * torch.maximum(-a2 * r, -a2 * r.clamp(1 - clip, 1 + clip))
    loss = total / mask.sum()
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad


def _ours(z, labels, mask, adv, old, groups, reg, rows_per_micro):
    zz = z.clone().requires_grad_(True)
    lp = token_logprobs(zz, labels) * mask
    ent = token_entropy(zz.detach()) * mask
    advt = adv[:, None].expand_as(mask) * mask
    reg.prepare(MiniBatchContext(0, 1, False, lp.detach(), old * mask, advt, mask, None, old_entropy=ent, entropy=ent,
                                 token_ids=labels, groups=groups))
    obj, n, total = PPOClip(), len(z), 0.0
    for s in range(0, n, rows_per_micro or n):
        r = torch.arange(s, min(n, s + (rows_per_micro or n)))
        b = PolicyBatch(r, lp[r], old[r] * mask[r], advt[r], mask[r])
        sh = TokenShaping.checked(reg.shape(b), b.logp.shape, reg)
        base = obj.token_loss(b.logp, b.old_logp, TokenShaping.shifted_advantages([sh], b.advantages), b.mask)
        total = total + aggregate(TokenShaping.combine([sh], base), b.mask, "token-mean", num_tokens=mask.sum())
    (grad,) = torch.autograd.grad(total, zz)
    return total.detach(), grad


@pytest.mark.parametrize("count_norm,scale,w", [(True, 0.1, 2.0), (False, 0.0, 3.0), (True, 0.5, 1.0)])
def test_loss_and_gradient_match_the_reference_loop(count_norm, scale, w):
    """PPOClip + TrajectoryGTPO's aggregated loss and gradient w.r.t. the logits equal the float64
    loop for micro-batches of 1, 5 and all rows; some responses dropped, conflicts on both signs."""
    z, labels, mask, adv, old, groups = _problem()
    kw = dict(threshold=1.3, scale=scale, count_norm=count_norm)
    ref_loss, ref_grad = _reference_loop(z, labels, mask, adv, old, groups, w=w, **kw)
    for micro in (1, 5, None):
        reg = TrajectoryGTPO(positive_weight=w, entropy_threshold=1.3, entropy_scale=scale, count_norm=count_norm)
        loss, grad = _ours(z, labels, mask, adv, old, groups, reg, micro)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
        m = reg.pop_metrics()
        assert 0 < m["reg/trajectory_gtpo/filtered_frac"] < 1 and 0 < m["reg/trajectory_gtpo/conflict_frac"] < 1
        kept = mask.bool() & (reg.weights != 0).any(-1, keepdim=True)  # the valid tokens of kept responses
        assert (reg.weights[kept] == 0).any()  # a negative conflict token's update skipped
        spread = [max(r[k].tolist()) / min(r[k & (r != 0)].tolist()) for r, k in zip(reg.weights, kept) if k.any()]
        assert w in spread or w == 1.0  # a positive conflict token amplified w times its response's others
    plain = _reference_loop(z, labels, mask, adv, old, groups, w=1.0, threshold=1e9, scale=0.0, count_norm=False)[1]
    assert (ref_grad - plain).abs().max() > 1e-3  # the control moved the gradient


def test_settings_checked_at_start_up():
    bad = [("positive_weight", -1.0), ("positive_weight", math.inf), ("positive_weight", True),
           ("entropy_threshold", 0.0), ("entropy_threshold", math.nan), ("entropy_threshold", "0.7"),
           ("entropy_scale", -0.1), ("entropy_scale", math.inf), ("count_norm", 1)]
    for field, value in bad:
        with pytest.raises(ValueError, match=rf"TrajectoryGTPO\.{field}="):
            TrajectoryGTPO(**{field: value})
    reg = TrajectoryGTPO()
    assert (reg.positive_weight, reg.entropy_threshold, reg.entropy_scale, reg.count_norm, reg.name) == \
        (2.0, 0.7, 0.1, True, "trajectory_gtpo")
    assert reg.needs_current_entropy and reg.shifts_advantage and not TrajectoryGTPO(entropy_scale=0).shifts_advantage
    with pytest.raises(ValueError, match="2 regularizers shift the advantage"):
        check_stack([reg, EntropyAdvantage()])
    check_stack([TrajectoryGTPO(entropy_scale=0.0), EntropyAdvantage()])  # no shift of its own: they stack


class _Recorder(Regularizer):
    """Keeps each prepared mini-batch's token ids, groups and mask."""

    def __init__(self) -> None:
        super().__init__(None, "recorder")
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def prepare(self, ctx: MiniBatchContext) -> None:
        self.seen.append((ctx.token_ids.clone(), ctx.groups.clone(), ctx.mask.clone()))

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        return TokenShaping()


def test_learner_gives_the_response_tokens_and_groups(tiny_model_dir, monkeypatch):
    """Through GRPOModule (2 mini-batches of 2 prompts x 4 samples, 2 epochs): each mini-batch's
    groups are its prompts' indices, 4 rows each, and its token ids the rollout's response tokens
    (the last T columns of its input ids) of its rows."""
    from lit_covrl.learner import Learner
    from tests.test_module import _one_rl_step_weights

    rollouts, update = [], Learner.update
    monkeypatch.setattr(Learner, "update", lambda self, rollout, *a, **kw: (rollouts.append(rollout),
                                                                             update(self, rollout, *a, **kw))[1])
    rec = _Recorder()
    _one_rl_step_weights(tiny_model_dir, 3, lambda: [rec])
    assert [g.tolist() for _, g, _ in rec.seen] == [[0] * 4 + [1] * 4, [2] * 4 + [3] * 4] * 2
    (rollout,) = rollouts
    T = rollout.response_mask.shape[1]
    for i, (ids, _, mask) in enumerate(rec.seen):
        rows = slice(8 * (i % 2), 8 * (i % 2) + 8)
        assert torch.equal(ids, rollout.input_ids[rows, -T:]) and torch.equal(mask, rollout.response_mask[rows].to(mask))


def test_config_runs_through_the_cli_and_its_tags_move(tmp_path):
    """configs/cpu/trajectory_gtpo.yaml on the quickstart through `lit-covrl fit` (its 0.7-nat
    threshold sits inside the tiny model's response entropies, ~0.6): TrajectoryGTPO is built from the
    YAML, its tags are written every step and move, some responses are dropped and some kept,
    conflict tokens are found, and the control changes the loss."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/trajectory_gtpo.yaml")
    keys = {f"reg/trajectory_gtpo/{k}" for k in ("loss", "filtered_frac", "conflict_frac", "response_entropy")}
    assert keys <= set(tags) and all(len(tags[k]) == 3 for k in keys)
    assert all(len(set(tags[k])) > 1 for k in keys)  # they move
    assert all(0 < f < 1 for f in tags["reg/trajectory_gtpo/filtered_frac"])
    assert all(c > 0 for c in tags["reg/trajectory_gtpo/conflict_frac"])
    assert all(v != 0 for v in tags["reg/trajectory_gtpo/loss"])


def test_a_bad_setting_is_refused_at_start_up_naming_the_field(tmp_path, capsys):
    """configs/cpu/trajectory_gtpo.yaml with entropy_threshold 0 on the command line: exit 2, one
    line naming TrajectoryGTPO.entropy_threshold, before the first rollout."""
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/trajectory_gtpo.yaml",
                             "--trainer.callbacks.init_args.entropy_threshold", "0")
    assert "TrajectoryGTPO.entropy_threshold=0.0 is invalid: must be an entropy > 0 (nats)" in err


def test_a_zero_advantage_response_and_an_unreached_position_hold_no_conflict():
    """A response with A = 0 in a group with A > 0 and A < 0 responses sharing its opening token
    takes no part in the conflicts; and a position a shorter response never reaches does not count
    as holding token id 0 there (review mutation20)."""
    ids, mask = torch.tensor([[5, 6, 7], [5, 8, 9], [5, 3, 4]]), torch.ones(3, 3)
    lead, _ = gtpo_conflicts(ids, mask, torch.tensor([1.0, -1.0, 0.0]), torch.zeros(3, dtype=torch.long))
    assert lead[:, 0].tolist() == [True, True, False] and not lead[2].any()
    ids, mask = torch.tensor([[5, 0], [5, 0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    lead, _ = gtpo_conflicts(ids, mask, torch.tensor([1.0, -1.0]), torch.zeros(2, dtype=torch.long))
    assert lead[0].tolist() == [True, False]



def _naive_conflicts(ids, mask, adv, groups):
    """gtpo_conflicts one token at a time: the k-th valid token from a response's start (end)
    conflicts when a response of its group with A > 0 and one with A < 0 hold the same id k-th
    from theirs, and the run from the edge stops at the first position that does not."""
    n, T = ids.shape
    pos = [[t for t in range(T) if mask[i, t] > 0] for i in range(n)]
    out = []
    for from_end in (False, True):
        flags = torch.zeros(n, T, dtype=torch.bool)
        for i in range(n):
            seq = pos[i][::-1] if from_end else pos[i]
            for k, t in enumerate(seq):
                def held(sign):
                    return any(groups[j] == groups[i] and sign * float(adv[j]) > 0 and len(pos[j]) > k
                               and ids[j, (pos[j][::-1] if from_end else pos[j])[k]] == ids[i, t] for j in range(n))
                if float(adv[i]) == 0 or not (held(1) and held(-1)):
                    break
                flags[i, t] = True
        out.append(flags)
    return out


def test_conflicts_match_a_naive_loop_on_random_groups():
    """200 random problems: groups interleaved in the batch, masks with holes, a 3-token vocabulary
    (many shared tokens), advantages of both signs and 0: both alignments' runs equal the loop's."""
    g = torch.Generator().manual_seed(7)
    for _ in range(200):
        n, T = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        ids = torch.randint(0, 3, (n, T), generator=g)
        mask = (torch.rand(n, T, generator=g) < 0.8).float()
        adv = torch.randint(-1, 2, (n,), generator=g).double()
        groups = torch.randint(0, 3, (n,), generator=g)
        lead, trail = gtpo_conflicts(ids, mask, adv, groups)
        want_lead, want_trail = _naive_conflicts(ids, mask, adv, groups)
        assert torch.equal(lead, want_lead) and torch.equal(trail, want_trail), (ids, mask, adv, groups)
