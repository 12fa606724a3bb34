"""ProRL's reference policy reset (Liu et al. 2025, arXiv 2505.24864) in ReferenceKL(reset_every,
reset_optimizer): before RL steps reset_every, 2 reset_every, ... the reference takes the policy's
weights (its first, on-policy mini-batch then has KL 0 exactly) and the optimizer state starts
again; resets are counted in reg/<name>/resets, and the reset reference travels in checkpoints
(an exact resume across a reset)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from lit_covrl.algorithms import kl_penalty
from lit_covrl.regularizers import ReferenceKL


class _Probe(ReferenceKL):
    """ReferenceKL that records, per (step, update), the largest |KL| of its micro-batches, and
    right after each reset decision whether the reference equals the policy and how many
    optimizer states are held."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.kl: dict[tuple[int, int], float] = {}
        self.at_start: dict[int, tuple[bool, int]] = {}

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        self._at = (ctx.step, ctx.update)

    def shape(self, batch):
        kl = (kl_penalty(batch.logp.detach(), batch.ref_logp, self.estimator) * batch.mask).abs().max()
        self.kl[self._at] = max(self.kl.get(self._at, 0.0), float(kl))
        return super().shape(batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        ref = dict(pl_module._reference.named_parameters())
        same = all(torch.equal(p, ref[n]) for n, p in pl_module.policy.named_parameters())
        self.at_start[trainer.global_step] = (same, len(trainer.optimizers[0].state))


def _fit(tiny_model_dir, micro=64, steps=5, **reg_kw):
    """`steps` RL steps of 4 updates (2 mini-batches x 2 epochs), SGD with momentum (a state that
    a reset clears; linear in the gradient, so micro-batch rounding is not amplified), a large beta:
    (probe, weights, reference weights, every step's metrics)."""
    from tests.helpers import fit
    from tests.test_aent import _Steps as Rec
    from tests.test_module import make_data, make_module

    torch.manual_seed(0)
    rec, reg = Rec(), _Probe(beta=0.1, **reg_kw)
    module = make_module(tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                         update=dict(micro_batch_size=micro, mini_batch_size=2, ppo_epochs=2, grad_clip=None))
    fit(module, make_data(), steps=steps, callbacks=[reg, rec], limit_val_batches=0)
    weights = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    ref = {k: v.detach().clone() for k, v in module._reference.state_dict().items()}
    return reg, weights, ref, rec.steps


_RUNS: dict = {}


def _run(tiny_model_dir, key, **kw):
    if key not in _RUNS:
        _RUNS[key] = _fit(tiny_model_dir, **kw)
    return _RUNS[key]


def test_bad_settings_are_refused_naming_the_field():
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"ReferenceKL.reset_every=.*must be an integer >= 1"):
            ReferenceKL(reset_every=bad)
    with pytest.raises(ValueError, match=r"ReferenceKL.reset_optimizer='yes': must be true or false"):
        ReferenceKL(reset_every=2, reset_optimizer="yes")
    assert ReferenceKL().reset_every is None and ReferenceKL().reset_optimizer is True
    assert ReferenceKL().state_dict() == {}  # without resets: stateless, as before


def test_a_reference_of_another_architecture_is_refused_and_wrappers_are_looked_through():
    """A reset copies tensor by tensor: a reference whose parameters differ is refused naming the
    field; an activation-checkpointing wrapper (the policy's, under FSDP2) renames nothing that counts."""
    from lit_covrl.reference_reset import check_same_layout, copy_policy_into

    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"ReferenceKL.reset_every: a reset copies the policy's weights"):
        check_same_layout(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)), policy,
                          "ReferenceKL.reset_every")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrapped = torch.nn.Sequential(checkpoint_wrapper(torch.nn.Linear(3, 4)), torch.nn.Linear(4, 2))
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    reference = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    check_same_layout(reference, wrapped, "ReferenceKL.reset_every")
    copy_policy_into(reference, wrapped)
    for p, q in zip(reference.parameters(), wrapped.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.detach().to(torch.bfloat16))


def test_a_reference_of_fewer_layers_is_refused_when_training_starts(tiny_model_dir, tmp_path):
    """A model.reference_model with fewer layers than the policy (same vocabulary and widths): each
    of its parameters has a namesake of the same shape in the policy, so a reset would copy the
    policy's first layers into it without error, and the reference would not be the policy after
    a reset; ReferenceKL refuses it when training starts (review mutation20: the callback's call
    was not tested, only the check itself)."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    cfg = AutoConfig.from_pretrained(tiny_model_dir).to_dict()
    cfg.update(num_hidden_layers=1, layer_types=cfg["layer_types"][:1])
    ref_dir = tmp_path / "ref1"
    Qwen2ForCausalLM(type(AutoConfig.from_pretrained(tiny_model_dir))(**cfg)).save_pretrained(ref_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(ref_dir)
    module = make_module(tiny_model_dir, reference_model=str(ref_dir))
    with pytest.raises(ValueError, match="a reset copies the policy's weights"):
        fit(module, make_data(val_size=0), steps=2, callbacks=[ReferenceKL(beta=0.1, reset_every=1)],
            limit_val_batches=0)


def test_a_step_that_starts_again_after_its_reset_is_not_reset_twice():
    """Resumed from a state saved inside step 2, after its reset (nonfinite-stop.ckpt is saved
    mid-step), step 2's batch starts again: the reference and the optimizer state stay as they
    were (a second reset would take the mid-step policy and clear Adam's state again)."""
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(policy.parameters())
    policy(torch.ones(1, 3)).sum().backward()
    opt.step()
    reg = ReferenceKL(beta=0.1, reset_every=2)
    reg.load_state_dict({"resets": 1, "last_reset_step": 2})
    before = reference.weight.clone()
    module = types.SimpleNamespace(_reference=reference, policy=policy)
    reg.on_train_batch_start(types.SimpleNamespace(global_step=2, optimizers=[opt]), module, None, 0)
    assert reg._resets == 1 and torch.equal(before, reference.weight) and len(opt.state) > 0
    reg.on_train_batch_start(types.SimpleNamespace(global_step=4, optimizers=[opt]), module, None, 0)
    assert reg._resets == 2 and torch.equal(policy.weight, reference.weight) and len(opt.state) == 0


def test_a_reset_makes_the_reference_the_policy_and_the_next_kl_zero(tiny_model_dir):
    """reset_every 2 over 5 steps: resets before steps 2 and 4. At those steps the reference equals
    the policy and the optimizer holds no state; the first (on-policy) mini-batch's KL is exactly 0 there,
    while at steps 1 and 3 (a reference two updates old) and at later updates it is not."""
    reg, _, _, steps = _run(tiny_model_dir, "reset", reset_every=2)
    assert {s: v[0] for s, v in reg.at_start.items()} == {0: True, 1: False, 2: True, 3: False, 4: True}
    n_params = reg.at_start[1][1]
    assert n_params > 0 and reg.at_start[2][1] == reg.at_start[4][1] == 0 and reg.at_start[3][1] == n_params
    for s in (0, 2, 4):
        assert reg.kl[(s, 0)] == 0.0, s
        assert reg.kl[(s, 1)] > 1e-6, s  # after an optimizer step the policy has left it
    assert reg.kl[(1, 0)] > 1e-5 and reg.kl[(3, 0)] > 1e-5
    assert [steps[s]["reg/ref_kl/resets"] for s in range(1, 6)] == [0, 0, 1, 1, 2]
    fixed, _, _, fixed_steps = _run(tiny_model_dir, "fixed")
    assert "reg/ref_kl/resets" not in fixed_steps[1]  # no tag without reset_every
    assert fixed.kl[(2, 0)] > 1e-5 and fixed.kl[(4, 0)] > 1e-5  # a fixed reference: never 0


def test_reset_optimizer_false_keeps_the_optimizer_state(tiny_model_dir):
    reg, w, ref, _ = _run(tiny_model_dir, "keep_opt", reset_every=2, reset_optimizer=False)
    assert reg.at_start[2] == (True, reg.at_start[1][1]) and reg.kl[(2, 0)] == 0.0
    _, w_reset, _, _ = _run(tiny_model_dir, "reset", reset_every=2)
    assert any((w[k] - w_reset[k]).abs().max() > 1e-4 for k in w)  # the optimizer reset acts


@pytest.mark.parametrize("micro", [1, 3])
def test_reset_run_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """Weights, reference and every policy/ and reg/ metric of 5 steps with two resets for
    micro-batches of 1, 3 and all."""
    _, w_all, ref_all, m_all = _run(tiny_model_dir, "reset", reset_every=2)
    _, w, ref, m = _fit(tiny_model_dir, micro=micro, reset_every=2)
    for s in m_all:
        for k, v in m_all[s].items():
            if k.startswith(("policy/", "reg/")) and k != "policy/lr":
                assert m[s][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (s, k)
    for got, want in ((w, w_all), (ref, ref_all)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_resume_across_a_reset_is_exact(tiny_model_dir, tmp_path):
    """reset_every 2, 5 steps uninterrupted vs 3 steps (reset before step 2), a checkpoint, and a
    resume to 5 (reset before step 4): the checkpoint holds the reset reference (none before the
    first reset), and steps 3-4's metrics (step 3's KL is to the step-2 reference), the weights and
    the reference equal the uninterrupted run's."""
    from tests.test_module import make_data, make_module
    from tests.test_resume import _series, _trainer

    def module():
        return make_module(tiny_model_dir, update=dict(mini_batch_size=2))

    compared = ["reg/ref_kl/kl", "reg/ref_kl/resets", "reg/ref_kl/loss", "policy/loss", "policy/grad_norm"]
    full_m = module()
    _trainer(tmp_path / "full", 5, [ReferenceKL(beta=0.5, reset_every=2)]).fit(full_m, make_data())
    early = _trainer(tmp_path / "e", 1, [ReferenceKL(beta=0.5, reset_every=2)])
    early.fit(module(), make_data())
    early.save_checkpoint(tmp_path / "step1.ckpt")
    before = torch.load(tmp_path / "step1.ckpt", weights_only=False)["callbacks"]["ReferenceKL[ref_kl]"]
    assert before == {"resets": 0, "last_reset_step": None}
    first = _trainer(tmp_path / "a", 3, [ReferenceKL(beta=0.5, reset_every=2)])
    first.fit(module(), make_data())
    ckpt = tmp_path / "step3.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["ReferenceKL[ref_kl]"]
    assert saved["resets"] == 1 and saved["last_reset_step"] == 2 and "model.embed_tokens.weight" in saved["reference"]
    resumed = module()
    _trainer(tmp_path / "b", 5, [ReferenceKL(beta=0.5, reset_every=2)]).fit(resumed, make_data(), ckpt_path=str(ckpt))
    a, b = _series(tmp_path / "full", compared), _series(tmp_path / "b", compared)
    assert [a["reg/ref_kl/resets"][s] for s in range(5)] == [0, 0, 1, 1, 2]
    for tag in compared:
        assert sorted(b[tag]) == [3, 4], tag
        for s in (3, 4):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])
    for m_full, m_res in ((full_m.policy, resumed.policy), (full_m._reference, resumed._reference)):
        for (k, v), (_, u) in zip(m_full.state_dict().items(), m_res.state_dict().items()):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7, msg=k)


def test_resets_turned_off_on_resume_keep_the_reset_reference(tiny_model_dir, tmp_path):
    """ProRL resets by hand between runs: reset a few times, then go on without resets. Resumed with
    reset_every null, the reference went back to the loaded model (the KL pulled toward step 0) and
    later checkpoints dropped the reset reference (review resume25 F1). Now it is loaded, kept and
    saved again; the KL of the resumed step is to the reset reference."""
    from lit_covrl.policy import load_policy
    from tests.test_module import make_data, make_module
    from tests.test_resume import _trainer

    def module():
        return make_module(tiny_model_dir, update=dict(mini_batch_size=2))

    first = _trainer(tmp_path / "a", 3, [ReferenceKL(beta=0.5, reset_every=2)])
    first_m = module()
    first.fit(first_m, make_data())
    first.save_checkpoint(tmp_path / "step3.ckpt")
    reset_ref = {k: v.clone() for k, v in first_m._reference.state_dict().items()}
    loaded = load_policy(tiny_model_dir).state_dict()  # the reference a resume without the reset would hold
    assert any(not torch.equal(reset_ref[k], v) for k, v in loaded.items())  # the policy moved by step 2
    resumed = module()
    later = _trainer(tmp_path / "b", 4, [ReferenceKL(beta=0.5, reset_every=None)])
    later.fit(resumed, make_data(), ckpt_path=str(tmp_path / "step3.ckpt"))
    for k, v in resumed._reference.state_dict().items():
        assert torch.equal(v, reset_ref[k]), k
    later.save_checkpoint(tmp_path / "step4.ckpt")
    saved = torch.load(tmp_path / "step4.ckpt", weights_only=False)["callbacks"]["ReferenceKL[ref_kl]"]
    assert saved["resets"] == 1 and torch.equal(saved["reference"]["model.embed_tokens.weight"],
                                                reset_ref["model.embed_tokens.weight"])


def _ddp_worker(rank: int, port: int, model_dir: str, prompts: str, out: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from tests import _dist

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    rec = _dist.Recorder()
    module = _dist.make_module(model_dir)
    ddp = DDPStrategy(process_group_backend="gloo")
    _dist.trainer(_DDP_STEPS, [rec, ReferenceKL(beta=0.1, reset_every=2)], 2, Path(out) / "ddp", strategy=ddp).fit(
        module, _dist.make_data(Path(prompts), _dist.B))
    torch.save({"steps": rec.steps, "reference": module._reference.state_dict(), "policy": module.policy.state_dict()},
               Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


_DDP_STEPS = 4


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_ddp_processes_match_one_process_across_resets(tiny_model_dir, tmp_path):
    """2 gloo processes (DDP, each half of the prompts) vs 1 with the same global batch (the
    rank-invariant sampler of tests/_dist.py), reset_every 2 over 4 steps: every metric of every
    step (the KL, reg/ref_kl/resets), the policy and the reference agree, on both ranks."""
    from tests import _dist
    from tests.test_fsdp import _assert_same

    prompts = _dist.write_prompts(tmp_path / "prompts.jsonl", 2 * _dist.B * _DDP_STEPS)
    _dist.spawn(_ddp_worker, (_dist.free_port(), tiny_model_dir, str(prompts), str(tmp_path)), timeout_s=300)
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir)
    _dist.trainer(_DDP_STEPS, [rec, ReferenceKL(beta=0.1, reset_every=2)], 1, tmp_path / "one").fit(
        module, _dist.make_data(prompts, 2 * _dist.B))
    assert [rec.steps[s]["reg/ref_kl/resets"] for s in range(1, 5)] == [0, 0, 1, 1]
    assert rec.steps[3]["reg/ref_kl/kl"] > 0 and rec.steps[4]["reg/ref_kl/kl"] > 0
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        _assert_same(got["steps"], rec.steps, range(1, _DDP_STEPS + 1), rel=2e-3, abs_=1e-5)
        for name, model in (("policy", module.policy), ("reference", module._reference)):
            for k, v in model.state_dict().items():
                torch.testing.assert_close(got[name][k], v, rtol=1e-3, atol=2e-4, msg=f"{name} {k}")


def test_prorl_config_runs_through_the_cli(tmp_path):
    """configs/cpu/prorl.yaml on the quickstart through `lit-covrl fit`, reset_every 1 on the command
    line (3 steps: resets before steps 1 and 2): ReferenceKL is built from the YAML, reg/ref_kl/resets
    counts 0, 1, 2, and the KL acts (the first of each step's 4 updates is at KL 0 after a reset, the
    later ones are not)."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/prorl.yaml", "--trainer.callbacks.init_args.reset_every", "1")
    assert tags["reg/ref_kl/resets"] == [0.0, 1.0, 2.0]
    assert len(tags["reg/ref_kl/kl"]) == 3 and all(v > 0 for v in tags["reg/ref_kl/kl"])
    assert tags["reg/ref_kl/coef"] == [pytest.approx(1e-3)] * 3


def test_a_bad_reset_every_is_refused_at_start_up(tmp_path, capsys):
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/prorl.yaml", "--trainer.callbacks.init_args.reset_every", "0")
    assert "ReferenceKL.reset_every=0: must be an integer >= 1" in err


def _fsdp_worker(rank: int, port: int, model_dir: str, prompts: str, out: str) -> None:
    """FSDP2 (2 gloo processes): U, 4 steps uninterrupted; A, 3 steps and a sharded checkpoint;
    B, A resumed to 4 steps. Each with reset_every 2 (a reset before step 2)."""
    from lit_covrl.sharding import full_state_dict
    from tests import _dist

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    out, res = Path(out), {}

    def run(name, steps, ckpt=None):
        rec, reg = _dist.Recorder(), ReferenceKL(beta=0.1, reset_every=2)
        module = _dist.make_module(model_dir)
        tr = _dist.trainer(steps, [rec, reg], 2, out / name)
        tr.fit(module, _dist.make_data(Path(prompts), _dist.B), ckpt_path=ckpt)
        res[name] = rec.steps
        res[f"{name}_saved_tensors"] = len(reg.state_dict().get("reference", {}))
        res[f"{name}_sharded"] = type(module._reference).__name__
        res[f"{name}_policy"], res[f"{name}_reference"] = full_state_dict(module.policy), full_state_dict(module._reference)
        return tr

    run("U", 4)
    run("A", 3).save_checkpoint(out / "sharded.ckpt")
    run("B", 4, ckpt=str(out / "sharded.ckpt"))
    torch.save(res, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_reset_matches_one_process_and_resumes_exactly(tiny_model_dir, tmp_path):
    """Under FSDP2 (the reference sharded like the policy, copied shard by shard; its weights
    gathered into rank 0's CPU memory for the sharded checkpoint, the other ranks holding none): 2 gloo processes match 1 process over 4 steps with a reset
    (metrics, policy, reference), and a resume from step 3 equals the uninterrupted run."""
    from tests import _dist
    from tests.test_fsdp import _assert_same

    prompts = _dist.write_prompts(tmp_path / "prompts.jsonl", 2 * _dist.B * 4)
    _dist.spawn(_fsdp_worker, (_dist.free_port(), tiny_model_dir, str(prompts), str(tmp_path)), timeout_s=400)
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir)
    _dist.trainer(4, [rec, ReferenceKL(beta=0.1, reset_every=2)], 1, tmp_path / "one").fit(
        module, _dist.make_data(prompts, 2 * _dist.B))
    assert [rec.steps[s]["reg/ref_kl/resets"] for s in range(1, 5)] == [0, 0, 1, 1]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["U_sharded"].startswith("FSDP")
        # the reset reference is gathered into rank 0's CPU memory alone, not onto every device
        assert (got["A_saved_tensors"] > 0) == (r == 0), (r, got["A_saved_tensors"])
        _assert_same(got["U"], rec.steps, range(1, 5), rel=2e-3, abs_=1e-5)
        _assert_same(got["B"], got["U"], [4], rel=1e-5, abs_=1e-7)
        for name, model in (("policy", module.policy), ("reference", module._reference)):
            for k, v in model.state_dict().items():
                torch.testing.assert_close(got[f"U_{name}"][k], v, rtol=1e-3, atol=2e-4, msg=f"{name} {k}")
                torch.testing.assert_close(got[f"B_{name}"][k], got[f"U_{name}"][k], rtol=1e-5, atol=1e-7,
                                           msg=f"resumed {name} {k}")
