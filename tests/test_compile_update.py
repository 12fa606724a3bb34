"""`model.system.compile_update`: the update's policy forward through torch.compile
(`lit_covrl.compiled`).

Inductor compiles for minutes on this CPU, so only the numerical comparison uses it (no-grad, the
2-layer test model); the runs and the recompilation count use dynamo's `aot_eager` / `eager`
backends: the same graph capture, dynamic shapes and guards (what decides recompilation) and, for
`aot_eager`, the same AOT-autograd forward/backward split, with the captured ops run by eager
kernels. Compiled graphs are counted with dynamo's own counter (`unique_graphs`), which stays at 0
when the compiled path is not taken.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import lit_covrl.compiled
from lit_covrl.compiled import CompiledForwards
from lit_covrl.learner import Learner, LearnerSettings
from lit_covrl.objectives import PPOClip
from lit_covrl.policy import load_policy, response_logprobs
from lit_covrl.settings import LossSettings, RolloutSettings, SystemSettings, UpdateSettings
from lit_covrl.sharding import FSDP2Strategy, check_strategy
from tests.helpers import fit
from tests.test_module import make_data, make_module


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _batch(n: int, P: int, T: int, seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of P prompt + T response columns: prompts left-padded by 0-2, responses right-padded
    by 0-(T-1) (row 0 keeps its full length), ids avoiding the special tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, P + T), generator=g)
    att = torch.ones(n, P + T, dtype=torch.long)
    for i in range(1, n):
        att[i, : int(torch.randint(0, 3, (), generator=g))] = 0
        cut = int(torch.randint(0, T, (), generator=g))
        if cut:
            att[i, P + T - cut:] = 0
    return ids * att, att


@pytest.mark.slow  # inductor's first compilation: ~60 s on this CPU, ~20 s with its cache warm
def test_compiled_forward_gives_the_eager_logprobs_and_entropies(tiny_model_dir):
    """Inductor (the default backend) against the eager forward on the same batch, at temperature
    0.7. Tolerance 2e-5 absolute on log-probs and entropies of a 14-token vocabulary (values of
    order 1): float32 rounding of fused, reordered kernels, far below any real difference (one
    wrong token's log-prob differs by ~0.1 or more)."""
    model = load_policy(tiny_model_dir).eval()
    ids, att = _batch(6, 5, 7, seed=0, vocab=model.config.vocab_size)
    kw = dict(temperature=0.7, with_entropy=True, chunk_size=4)
    compiled = CompiledForwards()(model)
    with torch.no_grad():
        eager = response_logprobs(model, ids, att, 7, **kw)
        got = response_logprobs(compiled, ids, att, 7, **kw)
    assert _graphs() == 1  # the compiled path was taken
    torch.testing.assert_close(got.logp, eager.logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.entropy, eager.entropy, rtol=0, atol=2e-5)
    assert eager.logp.std() > 0.1  # not a degenerate batch


def _learner(policy, *, skip_padding: bool, micro: int) -> Learner:
    settings = LearnerSettings(RolloutSettings(group_size=2, max_new_tokens=12), LossSettings(),
                               UpdateSettings(micro_batch_size=micro), skip_padding=skip_padding, compile_update=True)
    return Learner(policy, settings, PPOClip(), [], driver=None)


def test_response_lengths_and_row_counts_of_later_steps_do_not_recompile(tiny_model_dir):
    """One graph per grad mode serves every shape: after the first no-grad and the first training
    forward, 5 more 'steps' with other response lengths (3-12), prompt widths and row counts
    (micro-batches of 5 -> a one-row last micro-batch; skip_padding trims each micro-batch to its
    own extent) run with recompilation made an error."""
    policy = load_policy(tiny_model_dir).eval()
    learner = _learner(policy, skip_padding=True, micro=5)
    learner.compiled.backend = "eager"
    V = policy.config.vocab_size
    ids, att = _batch(8, 4, 6, seed=1, vocab=V)
    learner.logprobs(policy, ids, att, att[:, -6:].float())  # warm-up: no-grad
    learner._logprobs(ids, att, 6, False).logp.sum().backward()  # warm-up: training forward
    assert _graphs() == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, (n, P, T) in enumerate([(11, 4, 3), (6, 6, 12), (9, 3, 9), (1, 5, 4), (16, 4, 10)]):
            ids, att = _batch(n, P, T, seed=seed + 2, vocab=V)
            with torch.no_grad():
                eager = response_logprobs(policy, ids, att, T).logp * att[:, -T:]
            got = learner.logprobs(policy, ids, att, att[:, -T:].float())
            torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)  # eager backend: same kernels
            learner._logprobs(ids, att, T, False).logp.sum().backward()
    assert _graphs() == 2


def _two_steps(tiny_model_dir, **system):
    torch.manual_seed(0)
    module = make_module(
        tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        update=dict(grad_clip=None, micro_batch_size=5, recompute_logprobs=True), system=system,
    )
    trainer = fit(module, make_data(), steps=2, limit_val_batches=0)
    return float(trainer.callback_metrics["policy/loss"]), module


def test_two_rl_steps_compiled_equal_eager(tiny_model_dir, monkeypatch):
    """Two RL steps (16 sequences, micro-batches of 5 rows: 5, 5, 5, 1) with the old log-probs
    recomputed, so both the training and the no-grad forward are compiled (aot_eager): the same
    loss (rel 1e-5) and weights (abs 1e-6) as the eager run, which has the shared-prompt forward off
    too (it resolves off with compile_update); two graphs in all, and the weights moved."""
    monkeypatch.setattr(lit_covrl.compiled, "BACKEND", "aot_eager")
    eager_loss, eager = _two_steps(tiny_model_dir, shared_prompt=False)
    assert _graphs() == 0
    loss, compiled = _two_steps(tiny_model_dir, compile_update=True)
    assert not compiled.learner.settings.shared_prompt and compiled.learner.settings.compile_update
    assert _graphs() == 2
    assert loss == pytest.approx(eager_loss, rel=1e-5, abs=1e-7)
    init = load_policy(tiny_model_dir).state_dict()
    after = compiled.policy.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in init.items()) > 1e-3  # it trained
    for k, v in eager.policy.state_dict().items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6)
    assert not any("_orig_mod" in k for k in after)  # the policy itself is not wrapped


@pytest.mark.parametrize("other", [dict(activation_checkpointing=True), dict(shared_prompt=True)])
def test_untested_combinations_fail_at_start_up(other):
    name = next(iter(other))
    with pytest.raises(ValueError, match=rf"model.system.compile_update=True .*model.system.{name}=true"):
        SystemSettings(compile_update=True, **other)
    SystemSettings(compile_update=True, shared_prompt=False)  # explicitly off is fine
    with pytest.raises(ValueError, match="model.system.compile_update='yes' is invalid"):
        SystemSettings(compile_update="yes")


def test_fsdp2_and_several_processes_are_refused_with_compile_update():
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    on = SystemSettings(compile_update=True)
    with pytest.raises(ValueError, match=r"compile_update=True is not supported with trainer.strategy=FSDP2Strategy"):
        check_strategy(FSDP2Strategy(), on)
    env = LightningEnvironment()
    env.set_world_size(2)  # as a launched 2-process run has it by setup(), where the check runs
    ddp = DDPStrategy(parallel_devices=[torch.device("cpu")] * 2, cluster_environment=env)
    with pytest.raises(ValueError, match=r"trainer.strategy=DDPStrategy \(2 process"):
        check_strategy(ddp, on)
    check_strategy(SingleDeviceStrategy("cpu"), on)
    check_strategy(FSDP2Strategy(), SystemSettings())  # off: no objection


def test_bench_gpu_takes_the_compile_update_suffix_on_sampler_configs_only():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_gpu

    runs = ["0.5B:static_compile", "0.5B:static_compile+compile_update", "tiny:kv_cache+compile_update"]
    assert bench_gpu.parse_args(["--runs", *runs]).runs == runs
    for bad in ("0.5B:hf_generate+compile_update", "0.5B:fsdp_once+compile_update", "0.5B:static_compile+x"):
        with pytest.raises(SystemExit):
            bench_gpu.parse_args(["--runs", bad])


def test_siren_lp_reg_simko_compiled_equal_eager(tiny_model_dir, monkeypatch):
    """SIREN, Lp-Reg and SimKO stacked: the nucleus entropy, the min-p proxy and the top-k come from
    the compiled forward's logits (aot_eager; micro-batches of 3, so SIREN's prepare and anchor take
    no-grad forwards too) as from the eager one: the same weights and reg/ metrics."""
    from tests.test_module import _one_rl_step_weights, _siren_lp_reg_simko

    monkeypatch.setattr(lit_covrl.compiled, "BACKEND", "aot_eager")
    eager_w, eager_m = _one_rl_step_weights(tiny_model_dir, 3, _siren_lp_reg_simko, objective=PPOClip(dual_clip=3.0),
                                            system=dict(shared_prompt=False))
    assert _graphs() == 0
    w, m = _one_rl_step_weights(tiny_model_dir, 3, _siren_lp_reg_simko, objective=PPOClip(dual_clip=3.0),
                                system=dict(compile_update=True))
    assert _graphs() == 2
    assert eager_m["reg/siren/loss"] > 0 and eager_m["reg/lp_reg/loss"] > 0 and eager_m["reg/simko/mixed_frac"] > 0
    for k in [k for k in eager_m if k.startswith(("policy/", "reg/")) and k != "policy/lr"]:
        assert m[k] == pytest.approx(eager_m[k], rel=1e-5, abs=1e-6), k
    for k, v in eager_w.items():
        torch.testing.assert_close(w[k], v, rtol=0, atol=1e-6)


def test_era_compiled_equal_eager(tiny_model_dir, monkeypatch):
    """ERA stacked with SimKO and Clip-Cov: the log-probs under k z and z / k come from the compiled
    forward's logits (aot_eager; micro-batches of 3, so the current entropy of the later updates
    takes a no-grad forward too) as from the eager one: the same weights and reg/ metrics, both of
    ERA's modes acting."""
    from tests.test_module import _era, _one_rl_step_weights

    monkeypatch.setattr(lit_covrl.compiled, "BACKEND", "aot_eager")
    eager_w, eager_m = _one_rl_step_weights(tiny_model_dir, 3, _era, objective=PPOClip(dual_clip=3.0),
                                            system=dict(shared_prompt=False))
    assert _graphs() == 0
    w, m = _one_rl_step_weights(tiny_model_dir, 3, _era, objective=PPOClip(dual_clip=3.0),
                                system=dict(compile_update=True))
    assert _graphs() == 2
    assert eager_m["reg/era/sharpened_frac"] > 0 and eager_m["reg/era/flattened_frac"] > 0
    for k in [k for k in eager_m if k.startswith(("policy/", "reg/")) and k != "policy/lr"]:
        assert m[k] == pytest.approx(eager_m[k], rel=1e-5, abs=1e-6), k
    for k, v in eager_w.items():
        torch.testing.assert_close(w[k], v, rtol=0, atol=1e-6)
