"""Data-parallel correctness and FSDP2 on CPU: 2 gloo processes (Lightning `ModelParallelStrategy`,
policy sharded with `fully_shard` in `configure_model`) against 1 process with the same global
batch (data.batch_size doubled) and seed.

What must match, and why only given identical rollouts: the real sampler seeds one generator per
rank (seed + 1_000_003 * rank) and draws over that rank's whole batch, so 1 x 2B prompts and
2 x B prompts sample different tokens by design (ranks must not sample identical tokens). The
tests therefore use `RankInvariantModule` (tests/_dist.py), whose samples depend only on
(prompt, step, weights). Given the same rollouts, everything after sampling must agree with one
process to float tolerance over several RL steps: advantages (whole groups), group filtering
(one rank's mini-batch is empty at step 1, ranks hold unequal numbers of micro-batches later),
the global Clip-Cov / KL-Cov selection, the loss with global denominators, the gradient (reduce-
scattered mean x world size), the weights, and every logged metric, which must be the global value
(a token mean over all ranks, not rank 0's or a mean of rank means) and the same on both ranks.

One spawn of 2 workers runs nine short fits (module fixture):
  A  4 steps, rollout_gather="once"           -> compared with 1 process, 4 steps
  B  2 steps, rollout_gather="per_forward", sharded checkpoint saved
  C  resume B to 4 steps                      -> compared with A on steps 3-4
  D  2 steps with bf16 mixed precision + activation checkpointing, one micro-batch per update,
     and a ReferenceKL penalty (sharded reference model) -> finite, moved, fp32 master weights
  E  4 steps under Lightning's DDPStrategy (no sharding) -> compared with 1 process, 4 steps
  F  3 steps under DDP with every entropy control of the literature stacked (80/20 tokens, entropy-
     ratio clip, STEER, adaptive bonus, entropy advantage, Clip-Cov) and the GSPO objective
     -> compared with 1 process, 3 steps
  G  3 steps under DDP with 2 updates per rollout (mini_batch_size 1 prompt per rank)
     -> compared with 1 process with mini_batch_size 2, 3 steps
  H  3 steps under DDP with Pass@k Training's advantage (pass_k 2) on a 0/1 reward, with Clip-Cov
     and KL-Cov -> compared with 1 process, 3 steps
  I  D with its models built before the fit (configure_model called early), rank 1's copies changed
     -> compared with D
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from lit_covrl.sharding import full_state_dict
from tests import _dist

STEPS = 4
F_STEPS = 3  # run F (entropy controls + GSPO) is shorter: it only adds coverage, not new strategy code
# metrics that are not functions of the math (timings, throughput)
NOT_COMPARED = ("time/", "rollout/tokens_per_s")
PASSK = dict(reward=_dist.MarkedHasOneReward(), loss=dict(advantage="passk", pass_k=2))
UNLIKELY = dict(reward=_dist.MarkedHasOneReward(), loss=dict(unlikeliness=0.5), update=dict(recompute_logprobs=True))


def _worker(rank: int, port: int, model_dir: str, prompts: str, out: str) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    out, res = Path(out), {}

    import lit_covrl.sharding

    full_loads, real_load = [], lit_covrl.sharding.load_policy  # who reads the full weights
    lit_covrl.sharding.load_policy = lambda *a, **k: full_loads.append(a[0]) or real_load(*a, **k)

    rec, loaded = _dist.Recorder(), _Loaded()  # A: the trajectory compared with one process
    module = _dist.make_module(model_dir, system=dict(rollout_gather="once"))
    _dist.trainer(STEPS, [rec, loaded, *_dist.regularizers()], 2, out / "a").fit(module, _dist.make_data(Path(prompts), _dist.B))
    res["loaded"] = loaded.state
    res["A"] = rec.steps
    weights = full_state_dict(module.policy)  # collective: every rank calls it
    res["sharded"] = type(module.policy.model.layers[0]).__name__
    if rank == 0:
        torch.save(weights, out / "weights_2proc.pt")

    rec = _dist.Recorder()  # B: 2 steps, then a sharded (distributed) checkpoint
    module = _dist.make_module(model_dir, system=dict(rollout_gather="per_forward"))
    tr = _dist.trainer(2, [rec, *_dist.regularizers()], 2, out / "b")
    tr.fit(module, _dist.make_data(Path(prompts), _dist.B))
    res["B"] = rec.steps
    tr.save_checkpoint(out / "sharded.ckpt")
    res["generator_at_save"] = module.rollout_generator.get_state()

    rec, gen = _dist.Recorder(), _dist.GeneratorAtFirstBatch()  # C: resume B
    module = _dist.make_module(model_dir, system=dict(rollout_gather="per_forward"))
    tr = _dist.trainer(STEPS, [rec, gen, *_dist.regularizers()], 2, out / "c")
    tr.fit(module, _dist.make_data(Path(prompts), _dist.B), ckpt_path=str(out / "sharded.ckpt"))
    res["C"] = rec.steps
    res["generator_restored"] = gen.state

    rec = _dist.Recorder()  # D: bf16 compute, fp32 sharded master weights, activation checkpointing
    # one micro-batch per mini-batch: the update's single training forward doubles as the current
    # log-probs of the selection; at step 1 rank 1 has no rows and runs a filler pass in its place
    module = _dist.make_module(
        model_dir, update=dict(micro_batch_size=64),
        system=dict(fsdp_mixed_precision="bf16", activation_checkpointing=True),
    )
    # a ReferenceKL penalty: the frozen reference model is loaded and sharded the same way
    from lit_covrl.regularizers import ReferenceKL

    callbacks = [rec, *_dist.regularizers(), ReferenceKL(beta=0.1)]
    _dist.trainer(2, callbacks, 2, out / "d").fit(module, _dist.make_data(Path(prompts), _dist.B))
    res["D"] = rec.steps
    res["D_reference_sharded"] = type(module._reference).__name__
    res["D_dtypes"] = sorted({str(p.dtype) for p in module.policy.parameters()})
    res["D_weights"] = full_state_dict(module.policy)
    res["full_loads"] = len(full_loads)
    rec = _dist.Recorder()  # I: D's run with its models built before the fit, and rank 1's changed
    module = _dist.make_module(
        model_dir, update=dict(micro_batch_size=64),
        system=dict(fsdp_mixed_precision="bf16", activation_checkpointing=True),
    )
    tr = _dist.trainer(2, [rec, *_dist.regularizers(), ReferenceKL(beta=0.1)], 2, out / "i")
    module.trainer = tr  # so that the early call loads the reference model too
    module.configure_model()  # no mesh yet: both models loaded whole on every rank
    if rank == 1:
        with torch.no_grad():
            for m in (module.policy, module._reference):
                m.model.embed_tokens.weight.add_(1.0)
                m.model.rotary_emb.inv_freq.mul_(2.0)
    tr.fit(module, _dist.make_data(Path(prompts), _dist.B))
    res["I"] = rec.steps
    res["I_sharded"] = [type(m).__name__ for m in (module.policy, module.policy.model.layers[0]._checkpoint_wrapped_module,
                                                   module._reference)]
    res["I_weights"] = full_state_dict(module.policy)
    rec = _dist.Recorder()  # E: plain DDP (replicated weights, all-reduced gradients), same as A
    from lightning.pytorch.strategies import DDPStrategy

    module = _dist.make_module(model_dir)
    ddp = DDPStrategy(process_group_backend="gloo")
    _dist.trainer(STEPS, [rec, *_dist.regularizers()], 2, out / "e", strategy=ddp).fit(module, _dist.make_data(Path(prompts), _dist.B))
    res["E"] = rec.steps
    rec = _dist.Recorder()  # F: DDP, every entropy control of the literature, GSPO objective
    module = _dist.make_module(model_dir, objective=_dist.gspo())
    ddp = DDPStrategy(process_group_backend="gloo")
    _dist.trainer(F_STEPS, [rec, *_dist.entropy_controls()], 2, out / "f", strategy=ddp).fit(
        module, _dist.make_data(Path(prompts), _dist.B))
    res["F"] = rec.steps
    rec = _dist.Recorder()  # G: DDP, several updates per rollout
    module = _dist.make_module(model_dir, update=dict(mini_batch_size=1))
    ddp = DDPStrategy(process_group_backend="gloo")
    _dist.trainer(F_STEPS, [rec, *_dist.regularizers()], 2, out / "g", strategy=ddp).fit(
        module, _dist.make_data(Path(prompts), _dist.B))
    res["G"] = rec.steps
    rec = _dist.Recorder()  # H: DDP, Pass@k Training's advantage
    module = _dist.make_module(model_dir, **PASSK)
    ddp = DDPStrategy(process_group_backend="gloo")
    _dist.trainer(F_STEPS, [rec, *_dist.regularizers()], 2, out / "h", strategy=ddp).fit(
        module, _dist.make_data(Path(prompts), _dist.B))
    res["H"] = rec.steps
    rec = _dist.Recorder()  # U: DDP, the unlikeliness reward ranking by recomputed old log-probs
    module = _dist.make_module(model_dir, **UNLIKELY)
    ddp = DDPStrategy(process_group_backend="gloo")
    _dist.trainer(F_STEPS, [rec, *_dist.regularizers()], 2, out / "u", strategy=ddp).fit(
        module, _dist.make_data(Path(prompts), _dist.B))
    res["U"] = rec.steps
    rec = _dist.Recorder()  # S: FSDP2, SimKO (the top-K log-probs of the sharded training forward)
    module = _dist.make_module(model_dir)
    _dist.trainer(F_STEPS, [rec, *_dist.simko()], 2, out / "s").fit(module, _dist.make_data(Path(prompts), _dist.B))
    res["S"] = rec.steps
    rec = _dist.Recorder()  # R: FSDP2, SIREN (the nucleus entropy of the sharded forwards: the rollout's, the
    module = _dist.make_module(model_dir)  # selection's no-grad one and the training one, filler passes included)
    _dist.trainer(F_STEPS, [rec, *_dist.siren()], 2, out / "r").fit(module, _dist.make_data(Path(prompts), _dist.B))
    res["R"] = rec.steps
    torch.save(res, out / f"rank{rank}.pt")
    dist.destroy_process_group()


class _Loaded(_dist.Callback):
    """The sharded policy as loaded (before any update): full weights and this rank's buffers."""

    def on_fit_start(self, trainer, module) -> None:
        buffers = {k: v.detach().cpu().clone() for k, v in module.policy.named_buffers()}
        self.state = {"weights": full_state_dict(module.policy), "buffers": buffers}


@pytest.fixture(scope="module")
def two_procs(tiny_model_dir, tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    out = tmp_path_factory.mktemp("fsdp")
    prompts = _dist.write_prompts(out / "prompts.jsonl", 2 * _dist.B * STEPS)
    _dist.spawn(_worker, (_dist.free_port(), tiny_model_dir, str(prompts), str(out)),
                timeout_s=300, what="the 2-process run (ranks out of lock-step?)")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, prompts, ranks


@pytest.fixture(scope="module")
def one_proc(tiny_model_dir, two_procs):
    out, prompts, _ = two_procs
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir, system=dict(rollout_gather="once"))
    tr = _dist.trainer(STEPS, [rec, *_dist.regularizers()], 1, out / "single")
    tr.fit(module, _dist.make_data(prompts, 2 * _dist.B))
    tr.save_checkpoint(out / "single.ckpt")
    return rec.steps, full_state_dict(module.policy)


@pytest.fixture(scope="module")
def one_proc_entropy_controls(tiny_model_dir, two_procs):
    out, prompts, _ = two_procs
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir, objective=_dist.gspo())
    _dist.trainer(F_STEPS, [rec, *_dist.entropy_controls()], 1, out / "single_f").fit(
        module, _dist.make_data(prompts, 2 * _dist.B))
    return rec.steps


@pytest.fixture(scope="module")
def one_proc_minibatches(tiny_model_dir, two_procs):
    out, prompts, _ = two_procs
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir, update=dict(mini_batch_size=2))
    _dist.trainer(F_STEPS, [rec, *_dist.regularizers()], 1, out / "single_g").fit(module, _dist.make_data(prompts, 2 * _dist.B))
    return rec.steps


@pytest.fixture(scope="module")
def one_proc_simko(tiny_model_dir, two_procs):
    out, prompts, _ = two_procs
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir)
    _dist.trainer(F_STEPS, [rec, *_dist.simko()], 1, out / "single_s").fit(module, _dist.make_data(prompts, 2 * _dist.B))
    return rec.steps


@pytest.fixture(scope="module")
def one_proc_siren(tiny_model_dir, two_procs):
    out, prompts, _ = two_procs
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir)
    _dist.trainer(F_STEPS, [rec, *_dist.siren()], 1, out / "single_r").fit(module, _dist.make_data(prompts, 2 * _dist.B))
    return rec.steps


@pytest.fixture(scope="module")
def one_proc_passk(tiny_model_dir, two_procs):
    out, prompts, _ = two_procs
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir, **PASSK)
    _dist.trainer(F_STEPS, [rec, *_dist.regularizers()], 1, out / "single_h").fit(module, _dist.make_data(prompts, 2 * _dist.B))
    return rec.steps


@pytest.fixture(scope="module")
def one_proc_unlikeliness(tiny_model_dir, two_procs):
    out, prompts, _ = two_procs
    rec = _dist.Recorder()
    module = _dist.make_module(tiny_model_dir, **UNLIKELY)
    _dist.trainer(F_STEPS, [rec, *_dist.regularizers()], 1, out / "single_u").fit(module, _dist.make_data(prompts, 2 * _dist.B))
    return rec.steps


def _compared(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith(NOT_COMPARED)}


def _assert_same(a: dict[int, dict], b: dict[int, dict], steps, rel=1e-4, abs_=1e-6) -> None:
    for s in steps:
        ma, mb = _compared(a[s]), _compared(b[s])
        assert set(ma) == set(mb), (s, set(ma) ^ set(mb))
        bad = [(k, ma[k], mb[k]) for k in sorted(ma) if ma[k] != pytest.approx(mb[k], rel=rel, abs=abs_)]
        assert not bad, (s, bad)


def test_policy_is_sharded_with_fsdp2(two_procs):
    _, _, ranks = two_procs
    assert all(r["sharded"].startswith("FSDP") for r in ranks), ranks[0]["sharded"]


def test_two_processes_match_one_process_trajectory(two_procs, one_proc, tiny_model_dir):
    _, _, ranks = two_procs
    single, single_w = one_proc
    steps = range(1, STEPS + 1)
    # the run exercised what makes data parallelism hard: filtering emptied one rank's
    # mini-batch at step 1, both regularizers selected tokens, the weights moved
    assert 0 < single[1]["policy/kept_frac"] <= 0.5  # rank 1's two groups (prompts 2, 3) are constant
    assert all(single[s]["reg/clip_cov/selected_frac"] > 0 and single[s]["reg/kl_cov/selected_frac"] > 0 for s in steps)
    assert len({round(single[s]["policy/loss"], 6) for s in steps}) == STEPS  # a trajectory, not a constant
    # tolerance: same math, different summation order (rank shares, micro-batches); 1e-7
    # differences grow to ~3e-4 by step 4 through PPO clipping. A rank-local metric, a missing
    # world-size scale or a per-rank selection is off by O(1).
    for r in ranks:  # every rank logs the global value; both equal one process
        _assert_same(r["A"], single, steps, rel=2e-3, abs_=1e-5)
    w2 = torch.load(two_procs[0] / "weights_2proc.pt")
    init = _initial(tiny_model_dir)
    moved = 0.0
    for k, v in single_w.items():
        torch.testing.assert_close(w2[k], v, rtol=1e-3, atol=2e-4)
        moved = max(moved, (v - init[k]).abs().max().item())
    assert moved > 2e-2  # far above the tolerance


def test_ddp_matches_one_process_trajectory(two_procs, one_proc):
    """Lightning's DDPStrategy (no sharding: for models that fit one device) runs the same math:
    gradients all-reduced across the many manual backward passes of one training_step."""
    _, _, ranks = two_procs
    single, _ = one_proc
    for r in ranks:
        _assert_same(r["E"], single, range(1, STEPS + 1), rel=2e-3, abs_=1e-5)


def test_entropy_controls_and_gspo_match_one_process_trajectory(two_procs, one_proc_entropy_controls):
    """The entropy controls' mini-batch-wide decisions (quantile, min/max, ratio, measured
    entropy) and GSPO's sequence ratios give the same trajectory on 2 processes as on 1, even
    with rank 1's mini-batch empty at step 1 (its selection and no-grad entropy passes are fillers)."""
    _, _, ranks = two_procs
    single = one_proc_entropy_controls
    steps = range(1, F_STEPS + 1)
    assert 0 < single[1]["policy/kept_frac"] <= 0.5
    assert all(0 < single[s]["reg/high_entropy_tokens/selected_frac"] < 1 for s in steps)
    assert any(single[s]["reg/entropy_ratio_clip/clipped_frac"] > 0 for s in steps)
    assert all(single[s]["reg/clip_cov/selected_frac"] > 0 for s in steps)
    assert any(0 < single[s]["reg/w_reinforce/positive_frac"] < 1 for s in steps)
    assert single[F_STEPS]["reg/adaptive_entropy/coef"] > single[1]["reg/adaptive_entropy/coef"]
    assert single[F_STEPS]["reg/entropic/alpha"] < 0 and single[F_STEPS]["reg/entropic/loss"] != 0
    assert any(0 < single[s]["reg/entropic/high_frac"] < 1 for s in steps)
    for r in ranks:
        _assert_same(r["F"], single, steps, rel=2e-3, abs_=1e-5)


def test_pass_k_advantage_matches_one_process_trajectory(two_procs, one_proc_passk):
    """model.loss.advantage: passk (each rank's groups are whole, and the 0/1 check of the rewards
    is one collective decision) gives the same trajectory on 2 processes as on 1."""
    _, _, ranks = two_procs
    single = one_proc_passk
    steps = range(1, F_STEPS + 1)
    assert any(0 < single[s]["rollout/accuracy"] < 1 and single[s]["rollout/zero_var_group_frac"] < 1 for s in steps)
    assert len({round(single[s]["policy/loss"], 6) for s in steps}) == F_STEPS  # it trained: a trajectory
    for r in ranks:
        _assert_same(r["H"], single, steps, rel=2e-3, abs_=1e-5)


def test_unlikeliness_reward_matches_one_process_trajectory(two_procs, one_proc_unlikeliness):
    """model.loss.unlikeliness (each rank's groups are whole and ranked on the rank that sampled
    them; its adv/ metrics are sums over ranks) gives the same trajectory on 2 processes as on 1."""
    _, _, ranks = two_procs
    single = one_proc_unlikeliness
    steps = range(1, F_STEPS + 1)
    assert any(single[s]["adv/unlikeliness_penalty"] > 0 for s in steps)  # it scaled correct responses
    assert len({round(single[s]["policy/loss"], 6) for s in steps}) == F_STEPS
    for r in ranks:
        _assert_same(r["U"], single, steps, rel=2e-3, abs_=1e-5)


def test_metrics_are_global_not_rank_means(two_procs, one_proc):
    """Rank-local metrics would fail the comparison above; this checks the reason directly on
    step 1, where rank 1's groups are all filtered (constant reward): a rank-0-only or mean-of-
    ranks reward mean would differ from the global one, and the loss is a sum of rank shares."""
    _, _, ranks = two_procs
    single, _ = one_proc
    assert ranks[0]["A"][1]["rollout/reward_mean"] == pytest.approx(single[1]["rollout/reward_mean"], rel=1e-6)
    assert single[1]["rollout/zero_var_group_frac"] >= 0.5  # at least rank 1's 2 of 4 groups


def test_rollout_gather_once_equals_per_forward(two_procs):
    """Gathering parameters once per rollout is exact: B (per_forward) repeats A (once) on steps 1-2."""
    _, _, ranks = two_procs
    for r in ranks:
        _assert_same(r["A"], r["B"], [1, 2], rel=1e-6, abs_=1e-7)


def test_sharded_checkpoint_resumes_the_same_run(two_procs):
    out, _, ranks = two_procs
    assert (out / "sharded.ckpt").is_dir() and (out / "sharded.ckpt" / "meta.pt").is_file()
    for r in ranks:
        assert sorted(r["C"]) == [3, 4]  # only the resumed steps ran
        _assert_same(r["A"], r["C"], [3, 4], rel=1e-5, abs_=1e-7)
    # each rank gets its own sampler state back (a sharded checkpoint's metadata comes from rank 0)
    for r in ranks:
        assert torch.equal(r["generator_restored"], r["generator_at_save"])
    assert not torch.equal(ranks[0]["generator_at_save"], ranks[1]["generator_at_save"])


def test_mixed_precision_and_activation_checkpointing_run(two_procs, tiny_model_dir):
    _, _, ranks = two_procs
    for r in ranks:
        assert r["D_dtypes"] == ["torch.float32"]  # sharded master weights stay fp32
        for s in (1, 2):
            assert math.isfinite(r["D"][s]["policy/loss"]) and r["D"][s]["policy/grad_norm"] > 0
        assert r["D_reference_sharded"].startswith("FSDP")
        kl = [r["D"][s]["reg/ref_kl/kl"] for s in (1, 2)]
        assert all(math.isfinite(k) for k in kl) and kl[1] > 1e-7, kl  # the policy moved away from it
    # a token mean over both ranks (rank 1 holds no rows at step 1 and still reports it)
    assert [r["D"][s]["reg/ref_kl/kl"] for s in (1, 2) for r in ranks[:1]] == \
        [r["D"][s]["reg/ref_kl/kl"] for s in (1, 2) for r in ranks[1:]]
    init = _initial(tiny_model_dir)
    moved = max((ranks[0]["D_weights"][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-3


def test_models_built_before_the_fit_are_sharded_as_inside_it(two_procs):
    """`module.configure_model()` called before `trainer.fit` (e.g. to read
    `module.recompute_logprobs_on`) loads the policy and the reference whole on every rank; the fit
    shards them in place from rank 0's weights and buffers (rank 1's were changed): the run is D's,
    whose models were loaded inside the fit. Left unsharded, each rank trained its own copy."""
    _, _, ranks = two_procs
    for r in ranks:
        assert r["I_sharded"] == ["FSDPQwen2ForCausalLM", "FSDPQwen2DecoderLayer", "FSDPQwen2ForCausalLM"]
        _assert_same(r["I"], r["D"], (1, 2), rel=1e-6, abs_=1e-7)
        for k, v in r["D_weights"].items():
            torch.testing.assert_close(r["I_weights"][k], v, rtol=0, atol=0)


def test_only_rank_zero_reads_the_full_weights(two_procs, tiny_model_dir):
    """Sharded loading: rank 0 alone materializes the full model (once per fit: A, B, C, D, plus
    D's reference model);
    rank 1 builds empty shards and receives weights and buffers (rotary inv_freq, which no state
    dict holds) by broadcast, exactly equal to the files'."""
    from lit_covrl.policy import load_policy

    _, _, ranks = two_procs
    assert [r["full_loads"] for r in ranks] == [5, 0]
    ref = load_policy(tiny_model_dir)
    buffers = dict(ref.named_buffers())
    assert any("inv_freq" in k for k in buffers)
    for r in ranks:
        got = r["loaded"]
        assert set(got["weights"]) == set(ref.state_dict())
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got["weights"][k], v, rtol=0, atol=0)
        assert set(got["buffers"]) == set(buffers)
        for k, v in buffers.items():
            torch.testing.assert_close(got["buffers"][k], v, rtol=0, atol=0)


def _initial(model_dir: str) -> dict:
    from lit_covrl.policy import load_policy

    return load_policy(model_dir).state_dict()


@pytest.mark.parametrize("kind", ["single.ckpt", "sharded.ckpt"])
def test_export_hf_folder_loads_the_trained_weights(two_procs, one_proc, tmp_path, tiny_model_dir, kind):
    """tools/export_hf.py turns both a single-file and a sharded (distributed) checkpoint into a
    folder that plain `from_pretrained` loads, with the trained (not the initial) weights."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("export_hf", Path(__file__).parents[1] / "tools" / "export_hf.py")
    export_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_hf)
    out = two_procs[0]
    expected, _ = export_hf.read_checkpoint(out / kind)
    folder = export_hf.export(out / kind, tmp_path / "hf")
    got = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert AutoTokenizer.from_pretrained(folder).eos_token_id is not None
    init = _initial(tiny_model_dir)
    assert set(got) == set(init)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert max((got[k] - init[k]).abs().max().item() for k in init) > 1e-3  # trained, not initial
    if kind == "single.ckpt":  # the exported folder is the 1-process run's final policy
        for k, v in one_proc[1].items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_export_reads_only_the_policy_of_a_sharded_checkpoint(two_procs, tmp_path):
    """`read_sharded_policy` loads the policy's tensors alone (a 7B AdamW checkpoint's optimizer
    state is ~2x its weights) and they equal the policy part of the whole folder merged by torch."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from lit_covrl.export import read_sharded_policy

    folder = two_procs[0] / "sharded.ckpt"
    dcp_to_torch_save(folder, tmp_path / "merged.pt")
    merged = torch.load(tmp_path / "merged.pt", weights_only=False)
    assert "optimizer_0" in merged  # there is optimizer state to leave out
    want = {k: v for k, v in merged["state_dict"].items() if k.startswith("policy.")}
    got = read_sharded_policy(folder)
    assert set(got) == set(want) and len(want) > 10
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_several_updates_per_rollout_match_one_process_with_the_same_global_mini_batches(two_procs, one_proc_minibatches):
    """2 ranks x 1 prompt per update equal 1 process x 2 prompts per update: each rank holds the
    r-th prompt of every update's pair (`PromptDataModule.rank_offsets`). With each rank's prompts
    a contiguous block, update 0 of the ranks was prompts 0 and 2 of the step, one process's 0 and 1."""
    _, _, ranks = two_procs
    single = one_proc_minibatches
    for r in ranks:
        _assert_same(r["G"], single, range(1, F_STEPS + 1), rel=2e-3, abs_=1e-5)


def test_simko_matches_one_process_trajectory(two_procs, one_proc_simko):
    """SimKO under FSDP2 (its top-K log-probs from the sharded training forward, rank 1's filler
    passes at step 1, per-response entropy quantiles, metrics summed over ranks) gives the same
    trajectory on 2 processes as on 1."""
    _, _, ranks = two_procs
    single = one_proc_simko
    steps = range(1, F_STEPS + 1)
    assert all(0 < single[s]["reg/simko/mixed_frac"] < 1 for s in steps)
    assert any(0 < single[s]["reg/simko/top1_penalized_frac"] < 1 for s in steps)
    assert any(single[s]["reg/simko/loss"] != 0 for s in steps)
    for r in ranks:
        _assert_same(r["S"], single, steps, rel=2e-3, abs_=1e-5)


def test_siren_matches_one_process_trajectory(two_procs, one_proc_siren):
    """SIREN under FSDP2 (the nucleus entropy from the sharded forwards: the first rollout's for
    the anchor, the selection's and the training one's, rank 1's filler passes, the deviation over
    both ranks) gives the same trajectory on 2 processes as on 1."""
    _, _, ranks = two_procs
    single = one_proc_siren
    steps = range(1, F_STEPS + 1)
    assert all(0 < single[s]["reg/siren/selected_frac"] < 1 for s in steps)
    assert len({single[s]["reg/siren/anchor"] for s in steps}) == 1
    assert any(single[s]["reg/siren/loss"] > 0 for s in steps)
    for r in ranks:
        _assert_same(r["R"], single, steps, rel=2e-3, abs_=1e-5)
