"""The learner's top-k log-probs (`Regularizer.needs_topk`): delivered in `PolicyBatch` with
gradient from the training forward's chunked pass, the same for any micro-batch size, and the
default path (no regularizer asks) unchanged to the bit."""
from __future__ import annotations

import pytest
import torch

from lit_covrl.regularizers import Regularizer
from lit_covrl.types import TokenShaping
from tests.test_module import _one_rl_step_weights


class _TopkProbe(Regularizer):
    """Asks for the top-k log-probs, shapes nothing, keeps what it was given."""

    default_name = "topk_probe"

    def __init__(self, k: int) -> None:
        super().__init__()
        self.needs_topk = k
        self.seen = []

    def shape(self, batch):
        assert batch.topk_logp.requires_grad and batch.topk_logp.shape == (*batch.logp.shape, self.needs_topk)
        self.seen.append((batch.rows.clone(), batch.logp.detach().clone(), batch.topk_logp.detach().clone(),
                          batch.top1.clone(), batch.mask.clone()))
        return TokenShaping()


def _by_update(probe, updates=4):
    """The probe's micro-batches grouped into the 4 updates (rows reassembled in mini-batch order)."""
    out, group, covered = [], [], 0
    for rows, logp, top, top1, mask in probe.seen:
        group.append((rows, logp, top, top1, mask))
        covered += len(rows)
        if covered == 8:  # 2 prompts x 4 samples per mini-batch
            order = torch.cat([g[0] for g in group]).argsort()
            out.append([torch.cat([g[i] for g in group])[order] for i in range(1, 5)])
            group, covered = [], 0
    assert len(out) == updates
    return out


@pytest.mark.parametrize("micro", [64, 3])
def test_default_path_is_unchanged_when_a_regularizer_asks_for_topk(tiny_model_dir, micro):
    """A fit whose regularizer asks for top-3 log-probs and shapes nothing logs the same metrics
    and ends on the same weights, to the bit, as the fit without it: the label's log-probs of the
    top-k pass are the plain pass's."""
    w0, m0 = _one_rl_step_weights(tiny_model_dir, micro, list)
    probe = _TopkProbe(3)
    w1, m1 = _one_rl_step_weights(tiny_model_dir, micro, lambda: [probe])
    assert probe.seen
    assert {k: v for k, v in m1.items() if not k.startswith("reg/")} == m0
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_topk_logprobs_are_consistent_and_invariant_to_micro_batch_size(tiny_model_dir):
    """The delivered top-k are sorted, bound the sampled token's log-prob from above (equal to it
    exactly where `top1`), and are the same for micro-batches of 1, 3 or all 8 rows."""
    runs = {}
    for micro in (64, 3, 1):
        probe = _TopkProbe(2)
        _one_rl_step_weights(tiny_model_dir, micro, lambda: [probe])
        runs[micro] = _by_update(probe)
    saw_top1 = saw_other = False
    for logp, top, top1, mask in runs[64]:
        valid = mask.bool()
        assert (top[..., 0] >= top[..., 1]).all()
        assert (top[..., 0][valid] >= logp[valid] - 1e-6).all()
        assert torch.equal(top1[valid], (top[..., 0] - logp).abs()[valid] < 1e-6)
        saw_top1 |= bool(top1[valid].any())
        saw_other |= bool((~top1[valid]).any())
    assert saw_top1 and saw_other
    for micro in (3, 1):
        for ref, got in zip(runs[64], runs[micro]):
            for a, b in zip(ref, got):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_shape_reading_topk_without_asking_names_the_flag(tiny_model_dir):
    class Unasked(Regularizer):
        def shape(self, batch):
            return TokenShaping(penalty=batch.topk_logp.sum(-1))

    with pytest.raises(AttributeError, match=r"batch.topk_logp is None unless the class sets needs_topk = k"):
        _one_rl_step_weights(tiny_model_dir, 64, lambda: [Unasked()])
