"""AEnt (Shen 2025, arXiv 2509.03493; antgroup/AEnt, the author's AReaL recipe/AEnt): the clamped
entropy by hand, its ties, value and gradient against a naive float64 per-row loop, the
coefficient's projected step by hand and against a loop of the reference's update, the controller's
sequence through the regularizer, the learner's clamped-entropy forward (micro-batch 1 / 3 / all,
shared prompt on / off), an exact resume, start-up refusals, a CLI fit whose reg/aent/ tags move."""
from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback

from lit_covrl.algorithms import AGG_MODES, aent_coef, aggregate, clamp_keep_mask, token_clamped_entropy, token_entropy
from lit_covrl.regularizers import AEnt, Regularizer
from lit_covrl.regularizers.base import MiniBatchContext, check_stack
from lit_covrl.types import PolicyBatch, TokenShaping

F64 = torch.float64


# --- the clamped entropy -------------------------------------------------------------------------
def test_kept_tokens_by_hand_and_ties_by_token_id():
    z = torch.tensor([[0.1, 0.4, 0.3, 0.2]], dtype=F64).log()
    # V = 4: clamp_p 0.5 leaves out int(2.0) = 2 tokens, 0.3 int(1.2) = 1, 0.2 int(0.8) = 0 (k rounded down)
    assert clamp_keep_mask(z, 0.5).tolist() == [[False, True, True, False]]
    assert clamp_keep_mask(z, 0.3).tolist() == [[False, True, True, True]]
    assert clamp_keep_mask(z, 0.2).tolist() == [[True] * 4]
    assert clamp_keep_mask(z, 0.0).tolist() == [[True] * 4]
    # ties straddling the cut: of the equal logits the lower token ids are kept
    tied = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    assert clamp_keep_mask(tied, 0.3).nonzero()[:, 1].tolist() == [0, 1, 2, 3, 5, 6, 7]
    flat = torch.zeros(2, 6)  # all tied: the first V - k ids
    assert clamp_keep_mask(flat, 0.5).tolist() == [[True] * 3 + [False] * 3] * 2
    # q over {0.4, 0.3}: (4/7, 3/7)
    h = token_clamped_entropy(z, clamp_p=0.5)
    assert h.item() == pytest.approx(-(4 / 7 * math.log(4 / 7) + 3 / 7 * math.log(3 / 7)), rel=1e-12)
    assert token_clamped_entropy(z, clamp_p=0.2).item() == pytest.approx(token_entropy(z).item(), rel=1e-12)


def _naive_clamped_entropy(z: torch.Tensor, clamp_p: float, temperature: float) -> torch.Tensor:
    """Row by row in float64: the tokens ordered by logit (descending, then token id), the first
    V - int(V clamp_p) kept, their softmax(z / temperature) renormalised, -sum q log q."""
    rows = z.reshape(-1, z.shape[-1]).double()
    V = rows.shape[-1]
    keep_n = V - int(V * clamp_p)
    out = []
    for row in rows:
        order = sorted(range(V), key=lambda v: (-float(row[v].detach()), v))[:keep_n]
        kept = row[order] / temperature
        q = torch.exp(kept - torch.logsumexp(kept, 0))
        out.append(-(q * torch.log(q)).sum())
    return torch.stack(out).view(z.shape[:-1])


@pytest.mark.parametrize("clamp_p,temperature,chunk", [(0.3, 1.0, 1024), (0.5, 0.7, 5), (0.9, 1.3, 1), (0.0, 1.0, 3)])
def test_value_and_gradient_match_a_naive_float64_loop(clamp_p, temperature, chunk):
    g = torch.Generator().manual_seed(0)
    z = (2.0 * torch.randn(3, 4, 11, generator=g, dtype=F64)).round(decimals=1)  # rounded: ties occur
    z[0, 0, :5] = z[0, 0, 5]  # a run of ties across the cut
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    ours = token_clamped_entropy(a, clamp_p=clamp_p, temperature=temperature, chunk_size=chunk)
    naive = _naive_clamped_entropy(b, clamp_p, temperature)
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)
    w = torch.rand(3, 4, generator=g, dtype=F64)
    (ours * w).sum().backward()
    (naive * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert (a.grad[..., :].abs().sum(-1) > 0).all()


def test_bf16_logits_and_chunking_give_the_float32_value():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, 33, generator=g).to(torch.bfloat16)
    whole = token_clamped_entropy(z, clamp_p=0.3)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(token_clamped_entropy(z, clamp_p=0.3, chunk_size=4), whole, rtol=0, atol=0)
    torch.testing.assert_close(whole.double(), _naive_clamped_entropy(z.float(), 0.3, 1.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clamp_p must be in"):
        token_clamped_entropy(z, clamp_p=1.0)


# --- the coefficient -----------------------------------------------------------------------------
def test_the_cut_is_searched_once_per_chunk_with_gradient(monkeypatch):
    """The k-th value that sets each row's cut (most of the clamped entropy's cost on a real
    vocabulary) is found once per chunk, not again when the checkpointed chunk is recomputed in the
    backward: 3 chunks, forward + backward, 3 searches; the value and gradient are the naive loop's."""
    calls = []
    real = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda *a, **k: calls.append(1) or real(*a, **k))
    z = torch.randn(7, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_(True)
    h = token_clamped_entropy(z, clamp_p=0.3, chunk_size=3)
    (grad,) = torch.autograd.grad(h.sum(), z)
    assert len(calls) == 3
    zz = z.detach().clone().requires_grad_(True)
    ref = _naive_clamped_entropy(zz, 0.3, 1.0)
    (ref_grad,) = torch.autograd.grad(ref.sum(), zz)
    torch.testing.assert_close(h.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_coefficient_step_by_hand():
    kw = dict(low=0.05, high=0.23, lr=1e-3, min_coef=1e-5, max_coef=3e-3)
    assert aent_coef(2e-4, 0.01, **kw) == pytest.approx(2e-4 + 1e-3 * 0.04)  # below the band: up by lr (low - H)
    assert aent_coef(2e-4, 0.1, **kw) == 2e-4  # inside: unchanged
    assert aent_coef(2e-4, 0.33, **kw) == pytest.approx(1e-4)  # above: down by lr (H - high)
    assert aent_coef(2e-4, 2.0, **kw) == 1e-5  # clamped to the box
    assert aent_coef(2.99e-3, 0.0, **kw) == 3e-3
    assert aent_coef(0.5, 0.1, **kw) == 3e-3  # a start outside the box is clamped at the first step


def _reference_coefs(coef, entropies, *, low, high, lr, box, warmup):
    """antgroup/AEnt's update at the end of each step (recipe/aent/ray_aent_trainer.py `fit`, verl's
    global_steps from 1, entropy_coeff_reg 0), in plain floats."""
    out = []
    for global_steps, h in enumerate(entropies, start=1):
        out.append(coef)  # applied in this step
        if warmup <= global_steps:
            coef -= lr * (min(0, h - low) + max(0, h - high))
            coef = min(max(coef, box[0]), box[1])
    return out


def _step(reg: AEnt, step: int, h: torch.Tensor, mask: torch.Tensor) -> tuple[dict, TokenShaping]:
    n, T = mask.shape
    zeros = torch.zeros(n, T)
    reg.prepare(MiniBatchContext(step, 0, True, zeros, zeros, zeros, mask, None))
    shaping = reg.shape(PolicyBatch(torch.arange(n), zeros, zeros, zeros, mask, clamped_entropy=h))
    return reg.pop_metrics(), shaping


def test_controller_follows_the_reference_update_after_warmup():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    levels = [0.01, 0.5, 0.02, 0.1, 0.9, 0.0, 0.3]
    band = dict(entropy_low=0.05, entropy_high=0.23, min_coef=1e-5, max_coef=3e-3)
    reg = AEnt(init_coef=2e-4, warmup_steps=2, coef_lr=0.01, **band)
    seen, measured = [], []
    for step, level in enumerate(levels):
        h = torch.full((2, 3), level)
        h[0, 2] = 100.0  # outside the mask: not measured
        metrics, shaping = _step(reg, step, h, mask)
        assert metrics["reg/aent/clamped_entropy"] == pytest.approx(level)
        seen.append(metrics["reg/aent/coef"])
        measured.append(metrics["reg/aent/clamped_entropy"])  # the float32 level
        torch.testing.assert_close(shaping.penalty, -seen[-1] * h)  # the coefficient applied this step
    expected = _reference_coefs(2e-4, measured, low=0.05, high=0.23, lr=0.01, box=(1e-5, 3e-3), warmup=2)
    assert seen == pytest.approx(expected, rel=1e-12)
    # warmup_steps 2: step 0 (global step 1) warms up, its low entropy moves nothing; step 1's pushes
    # the coefficient to the box's floor, step 2's lifts it by 0.01 x 0.03, step 3's is inside the
    # band, step 4's pushes it to the floor again and step 5's lifts it by 0.01 x 0.05
    assert seen == pytest.approx([2e-4, 2e-4, 1e-5, 3.1e-4, 3.1e-4, 1e-5, 5.1e-4], rel=1e-6)
    # the first step that applies a moved coefficient: max(warmup_steps, 1) (0-based), the entropy 0 below the band
    for warmup, first in ((0, 1), (1, 1), (2, 2), (30, 30)):
        reg = AEnt(init_coef=2e-4, warmup_steps=warmup, **band)
        coefs = [_step(reg, step, torch.zeros(2, 3), mask)[0]["reg/aent/coef"] for step in range(first + 1)]
        assert coefs[:first] == [2e-4] * first and coefs[first] > 2e-4, warmup
    fixed = AEnt(adaptive=False, warmup_steps=0)
    for step, level in enumerate(levels):
        metrics, _ = _step(fixed, step, torch.full((2, 3), level), mask)
        assert metrics["reg/aent/coef"] == 2e-3


def test_a_step_that_trained_on_nothing_moves_nothing():
    reg = AEnt(warmup_steps=0)
    reg.prepare(MiniBatchContext(5, 0, True, *[torch.zeros(0, 3)] * 4, None))
    assert "reg/aent/clamped_entropy" not in reg.pop_metrics() and reg.coef == 2e-3
    # and an unshaped step with an init_coef of 0 adds no term
    zero = AEnt(init_coef=0.0, adaptive=False)
    _, shaping = _step(zero, 0, torch.ones(1, 2), torch.ones(1, 2))
    assert shaping.penalty is None


def test_micro_batches_add_up_to_the_whole():
    """The step's measurement is a sum over micro-batches: three of them give the whole batch's
    mean; the penalty aggregates like the loss in every mode."""
    g = torch.Generator().manual_seed(2)
    h, mask = torch.rand(6, 5, generator=g) * 2, (torch.rand(6, 5, generator=g) > 0.3).float()
    whole, parts = AEnt(warmup_steps=0, coef_lr=1e-3), AEnt(warmup_steps=0, coef_lr=1e-3)
    zeros = torch.zeros(6, 5)
    for reg, splits in ((whole, [torch.arange(6)]), (parts, [torch.arange(0, 1), torch.arange(1, 4), torch.arange(4, 6)])):
        reg.prepare(MiniBatchContext(1, 0, True, zeros, zeros, zeros, mask, None))  # warmup_steps 0: moves every step
        for r in splits:
            reg.shape(PolicyBatch(r, zeros[r], zeros[r], zeros[r], mask[r], clamped_entropy=h[r]))
    a, b = whole.pop_metrics(), parts.pop_metrics()
    assert a == pytest.approx(b, rel=1e-12) and a["reg/aent/clamped_entropy"] == pytest.approx(float((h * mask).sum() / mask.sum()))
    assert whole.coef == parts.coef != 2e-3
    for mode in AGG_MODES:
        s = AEnt(init_coef=0.3).shape(PolicyBatch(torch.arange(6), zeros, zeros, zeros, mask, clamped_entropy=h))
        ref = -0.3 * aggregate(h, mask, mode, norm_length=5)
        torch.testing.assert_close(aggregate(s.penalty, mask, mode, norm_length=5), ref)


def test_state_round_trip_and_settings_refused():
    reg = AEnt()
    assert reg.state_dict() == {"coef": 2e-3}
    reg.load_state_dict({"coef": 0.0025})
    assert reg.coef == 0.0025 and reg.init_coef == 2e-3
    bad = {
        "init_coef": (-1e-4, "AEnt.init_coef=-0.0001 is invalid: must be a finite number >= 0"),
        "clamp_p": (1.0, "AEnt.clamp_p=1.0 is invalid: must be a finite number in [0, 1)"),
        "adaptive": ("yes", "AEnt.adaptive='yes' is invalid: must be true or false"),
        "entropy_low": (math.nan, "AEnt.entropy_low=nan is invalid: must be a finite number >= 0"),
        "entropy_high": (0.01, "AEnt.entropy_high=0.01 is invalid: must be a finite number >= entropy_low (0.15)"),
        "coef_lr": (math.inf, "AEnt.coef_lr=inf is invalid: must be a finite number >= 0"),
        "min_coef": (True, "AEnt.min_coef=True is invalid: must be a finite number >= 0"),
        "max_coef": (1e-6, "AEnt.max_coef=1e-06 is invalid: must be a finite number >= min_coef (0.0006)"),
        "warmup_steps": (2.5, "AEnt.warmup_steps=2.5 is invalid: must be an integer >= 0"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ValueError) as err:
            AEnt(**{field: value})
        assert str(err.value) == message
    assert AEnt().needs_clamped_entropy == 0.33 and not AEnt().needs_entropy
    plain = AEnt(clamp_p=0.0)  # clamp_p 0: the plain entropy, from the forward's entropy
    assert plain.needs_clamped_entropy == 0.0 and plain.needs_entropy
    with pytest.raises(ValueError, match=r"different clamp_p \('aent' \(0.33\), 'aent_2' \(0.4\)\)"):
        check_stack([AEnt(), AEnt(clamp_p=0.4, name="aent_2")])
    check_stack([AEnt(), AEnt(name="aent_2", init_coef=0.1)])  # the same clamp_p: one forward serves both


# --- through the learner -------------------------------------------------------------------------
class _ClampProbe(Regularizer):
    """Asks for the clamped entropy, shapes nothing, keeps what shape was given."""

    default_name = "clamp_probe"
    needs_clamped_entropy = 0.3

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def shape(self, batch):
        assert batch.clamped_entropy.requires_grad and batch.clamped_entropy.shape == batch.logp.shape
        self.seen.append((batch.rows.clone(), batch.clamped_entropy.detach().clone(), batch.mask.clone()))
        return TokenShaping()


def _per_update(probe: _ClampProbe, updates: int = 4) -> list[torch.Tensor]:
    """The probe's micro-batches reassembled into each update's [n, T] (masked)."""
    out, i = [], 0
    per = len(probe.seen) // updates
    for _ in range(updates):
        parts = probe.seen[i:i + per]
        n = sum(len(r) for r, _, _ in parts)
        full = torch.zeros(n, parts[0][1].shape[1])
        for r, h, m in parts:
            full[r] = h * m
        out.append(full)
        i += per
    return out


def test_learner_delivers_the_clamped_entropy_the_same_for_any_micro_batch(tiny_model_dir):
    """The training forward's clamped entropy (with grad) is the same for micro-batches of 1, 3
    and all 8 rows, equals the naive loop on the policy's logits at the first update, and a fit
    that asks for it and shapes nothing ends on the same weights to the bit as one that does not."""
    from tests.test_module import _one_rl_step_weights

    runs = {}
    for micro in (64, 3, 1):
        probe = _ClampProbe()
        w, m = _one_rl_step_weights(tiny_model_dir, micro, lambda: [probe])
        runs[micro] = _per_update(probe)
        if micro == 64:
            w0, m0 = _one_rl_step_weights(tiny_model_dir, micro, list)
            assert all(torch.equal(w[k], w0[k]) for k in w0)
            assert {k: v for k, v in m.items() if not k.startswith("reg/")} == m0
    assert (runs[64][0] > 0).any()
    for micro in (3, 1):
        for a, b in zip(runs[64], runs[micro]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class _Steps(Callback):
    """Every logged metric of every RL step: {step: {name: value}}."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _aent_fit(tiny_model_dir, micro, steps=3, **overrides):
    """`steps` RL steps of 4 updates each (2 mini-batches x 2 epochs) with AEnt acting (a large
    coefficient) and its controller moving after every step from step 1 on (warmup_steps 2: the
    reference moves it from its global step 2 on, step 1 counted from 0; a band far above the tiny
    model's clamped entropy):
    (weights, every step's metrics by trainer.global_step, 1 for step 0)."""
    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    torch.manual_seed(0)
    rec = _Steps()
    module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                         update=dict(micro_batch_size=micro, mini_batch_size=2, ppo_epochs=2, grad_clip=None),
                         **overrides)
    reg = AEnt(init_coef=0.2, clamp_p=0.3, entropy_low=5.0, entropy_high=6.0, coef_lr=0.1, max_coef=1.0,
               warmup_steps=2)
    fit(module, make_data(), steps=steps, callbacks=[reg, rec], limit_val_batches=0)
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}, rec.steps


def _assert_same_fit(ref, got):
    ref_w, ref_m = ref
    w, m = got
    for s in ref_m:
        for k, v in ref_m[s].items():
            if k.startswith(("policy/", "reg/")) and k != "policy/lr":
                assert m[s][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (s, k)
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6)


_REF: dict = {}


@pytest.mark.parametrize("micro", [1, 3])
def test_aent_fit_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """Three RL steps (the coefficient moved by step 1's measurement acts in step 2): the weights
    and every policy/ and reg/ metric of each step are the same for micro-batches of 1, 3 or all."""
    if "ref" not in _REF:
        _REF["ref"] = _aent_fit(tiny_model_dir, 64)
    ref = _REF["ref"][1]
    assert ref[1]["reg/aent/coef"] == ref[2]["reg/aent/coef"] == pytest.approx(0.2)  # step 0 moves nothing
    h = ref[2]["reg/aent/clamped_entropy"]
    assert ref[3]["reg/aent/coef"] == pytest.approx(0.2 + 0.1 * (5.0 - h), rel=1e-6)  # step 1's moved it up
    assert ref[1]["reg/aent/loss"] < 0 and 0 < h < 5.0
    _assert_same_fit(_REF["ref"], _aent_fit(tiny_model_dir, micro))


def test_aent_fit_is_the_same_with_shared_prompt_on_and_off(tiny_model_dir):
    """The clamped entropy through the shared-prompt forward and the plain one."""
    _assert_same_fit(_aent_fit(tiny_model_dir, 3, system=dict(shared_prompt=True)),
                     _aent_fit(tiny_model_dir, 3, system=dict(shared_prompt=False)))


def test_aent_coefficient_resumes_exactly(tiny_model_dir, tmp_path):
    """AEnt's coefficient travels in the checkpoint: a band far above the clamped entropy makes it
    grow after every step from step 1 on (warmup_steps 2: the reference's global step 2), so a
    resume that restarted it from init_coef would apply 0.001 at step 2."""
    from tests.helpers import resumed_series

    def regs():
        return [AEnt(init_coef=1e-3, entropy_low=50.0, entropy_high=60.0, coef_lr=1e-3, max_coef=1.0, warmup_steps=2)]

    compared = ["reg/aent/coef", "reg/aent/clamped_entropy", "reg/aent/loss", "policy/loss", "policy/grad_norm"]
    a, b, saved = resumed_series(tmp_path, tiny_model_dir, regs, compared, "AEnt")
    coefs = [a["reg/aent/coef"][s] for s in range(4)]
    assert coefs[0] == coefs[1] == pytest.approx(1e-3) and coefs[3] > coefs[2] > coefs[1] + 0.04
    assert saved == [{"coef": pytest.approx(coefs[2], rel=1e-6)}]
    for tag in compared:
        assert sorted(b[tag]) == [2, 3], tag
        for s in (2, 3):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def test_reading_the_clamped_entropy_without_asking_names_the_flag(tiny_model_dir):
    from tests.test_module import _one_rl_step_weights

    class Unasked(Regularizer):
        def shape(self, batch):
            return TokenShaping(penalty=batch.clamped_entropy * 0.0)

    with pytest.raises(TypeError, match=r"batch.clamped_entropy is None unless the class sets needs_clamped_entropy"):
        _one_rl_step_weights(tiny_model_dir, 64, lambda: [Unasked()])


def test_aent_config_runs_through_the_cli(tmp_path):
    """configs/cpu/aent.yaml on the quickstart through `lit-covrl fit` (warmup_steps 1 on the command
    line: the coefficient moves after every step from the first, so the controller acts in 3 steps):
    AEnt is built from the YAML, its tags are written every step, the term acts and the
    coefficient moves down (the tiny model's clamped entropy is far above the 0.24 band)."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/aent.yaml", "--trainer.callbacks.init_args.warmup_steps", "1")
    keys = {"reg/aent/coef", "reg/aent/clamped_entropy", "reg/aent/loss"}
    assert keys <= set(tags)
    assert all(len(tags[k]) == 3 for k in keys)
    assert tags["reg/aent/coef"][0] == pytest.approx(0.002)  # the YAML's init_coef, moved after step 0 on
    assert 6e-4 <= tags["reg/aent/coef"][2] <= tags["reg/aent/coef"][1] < 0.002
    assert all(h > 0.24 for h in tags["reg/aent/clamped_entropy"]) and all(v < 0 for v in tags["reg/aent/loss"])


def test_a_bad_setting_is_refused_at_start_up_naming_the_field(tmp_path, capsys):
    """configs/cpu/aent.yaml with clamp_p 1 on the command line: exit 2, one line naming
    AEnt.clamp_p, before the first rollout."""
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/aent.yaml", "--trainer.callbacks.init_args.clamp_p", "1.0")
    assert "AEnt.clamp_p=1.0 is invalid: must be a finite number in [0, 1)" in err


def test_aent_fit_compiled_equals_eager(tiny_model_dir, monkeypatch):
    """The clamped entropy from the compiled update forward's logits (aot_eager) is the eager one's:
    the same weights and metrics over three steps."""
    import lit_covrl.compiled

    monkeypatch.setattr(lit_covrl.compiled, "BACKEND", "aot_eager")
    _assert_same_fit(_aent_fit(tiny_model_dir, 3, system=dict(shared_prompt=False)),
                     _aent_fit(tiny_model_dir, 3, system=dict(compile_update=True)))
