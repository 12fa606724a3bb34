"""CUDA paths (marked `gpu`, skipped without a CUDA device; CI has none): a few RL steps of a tiny
policy under bf16 autocast on one GPU (with the default sampler there, StaticCacheSampler with a
compiled decoding step), FSDP2 (NCCL, one process) with parameters gathered per decoding forward vs once per
rollout, which must give the same run, and the static sampler's captured / compiled decoding
step against eager decoding, and the compiled update forward (`model.system.compile_update`) against
the eager one under bf16 autocast. tools/bench_gpu.py measures
throughput and MFU on the same paths."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback

from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule
from lit_covrl.regularizers import ClipCov
from tests.test_module import OnesReward  # varied rewards even for a random policy

pytestmark = pytest.mark.gpu


class _Steps(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.steps[-1]["on_cuda"] = float(next(module.policy.parameters()).is_cuda)  # Lightning moves it back at teardown


def _fit(model_dir: str, steps: int, strategy="auto", precision="bf16-mixed", **module_kw):
    rec = _Steps()
    module = GRPOModule(
        model=model_dir, seed=0, reward=OnesReward(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        rollout=dict(group_size=4, max_new_tokens=6), update=dict(micro_batch_size=8, mini_batch_size=2), **module_kw,
    )
    trainer = L.Trainer(
        accelerator="cuda", devices=1, strategy=strategy, precision=precision, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rec, ClipCov(ratio=0.2, lb=-1e9, ub=1e9)],
    )
    trainer.fit(module, PromptDataModule(task="arithmetic", batch_size=4, seed=0))
    return module, rec.steps


def test_rl_steps_on_one_gpu_with_bf16_autocast(tiny_model_dir):
    from lit_covrl.policy import load_policy

    from lit_covrl.sampling import StaticCacheSampler

    module, steps = _fit(tiny_model_dir, 3)
    assert len(steps) == 3
    assert isinstance(module.sampler, StaticCacheSampler) and module.sampler.captures == 1
    assert all(s["on_cuda"] == 1.0 for s in steps)
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}  # fp32 master weights
    assert module.learner.settings.skip_padding  # null resolves to on for CUDA
    for s in steps:
        assert math.isfinite(s["policy/loss"]) and s["policy/grad_norm"] > 0, s
        assert 0 < s["policy/entropy"] < math.log(module.policy.config.vocab_size)
    init = load_policy(tiny_model_dir).state_dict()
    moved = max((v.cpu() - init[k]).abs().max().item() for k, v in module.policy.state_dict().items())
    assert moved > 1e-4


def test_fsdp2_on_one_gpu_gather_once_equals_per_forward(tiny_model_dir):
    from lit_covrl.sharding import FSDP2Strategy, is_sharded

    runs = {}
    for gather in ("per_forward", "once"):
        module, steps = _fit(
            tiny_model_dir, 2, strategy=FSDP2Strategy(), precision="32-true",
            system=dict(fsdp_mixed_precision="bf16", rollout_gather=gather),
        )
        assert is_sharded(module.policy)
        runs[gather] = steps
    for a, b in zip(runs["per_forward"], runs["once"]):
        for k in ("rollout/reward_mean", "policy/entropy", "policy/loss", "policy/grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])


@pytest.mark.parametrize("graphs,autocast", [("cuda_graph", False), ("cuda_graph", True), ("compile", False),
                                             ("compile", True)])
def test_static_cache_graph_replays_give_the_eager_tokens_without_recapture(tiny_model_dir, graphs, autocast):
    """Three rollouts of different prompt widths (one bucket), the weights changed in place between
    them (as an optimizer step does): the captured / compiled step draws the tokens of eager static
    decoding from the same generator state, and nothing is captured or compiled after the first."""
    from lit_covrl.policy import load_policy, load_tokenizer
    from lit_covrl.prompts import encode_prompts
    from lit_covrl.sampling import StaticCacheSampler

    model, tok = load_policy(tiny_model_dir).cuda().eval(), load_tokenizer(tiny_model_dir)
    eager = StaticCacheSampler(graphs="none", check_every=1, length_bucket=32)
    graphed = StaticCacheSampler(graphs=graphs, check_every=4, length_bucket=32)
    kw = dict(max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=1.2)
    sets = [["1+2=", "33+44=", "5-3="], ["123+456=", "7+8=", "9="], ["1+1=", "2+2=", "10+20="]]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    for i, prompts in enumerate(sets):
        ids, mask = encode_prompts(tok, prompts, chat_template=False)
        ids, mask = ids.repeat_interleave(4, 0).cuda(), mask.repeat_interleave(4, 0).cuda()
        with amp, torch._dynamo.config.patch(error_on_recompile=i > 0):
            a = eager.sample(model, ids, mask, generator=torch.Generator("cuda").manual_seed(i), **kw)
            b = graphed.sample(model, ids, mask, generator=torch.Generator("cuda").manual_seed(i), **kw)
        T = a.response_mask.shape[1]
        same = (b.input_ids[:, : ids.shape[1] + T] == a.input_ids).all(1)
        if graphs == "cuda_graph":  # the very kernels of eager decoding: bitwise the same draws
            assert same.all(), (graphs, i)
        else:  # inductor fuses differently: rounding may flip a rare draw (and the rest of its row)
            assert same.float().mean() >= 0.75, (graphs, i, same)
        tol = 2e-2 if autocast else 1e-3
        torch.testing.assert_close(b.logp[same, :T], a.logp[same], atol=tol, rtol=tol)
        torch.testing.assert_close(b.entropy[same, :T], a.entropy[same], atol=tol, rtol=tol)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)  # in place, like AdamW: the graph must read the new weights
    assert graphed.captures == 1 and len(graphed._slots) == 1


# CUDA graphs only: four torch.compile runs would take much of gpu_check.sh's 200 s test stage; the
# compiled path went through this sequence on the CPU (aot_eager), and is replayed on the GPU above
@pytest.mark.parametrize("graphs,autocast", [("cuda_graph", False), ("cuda_graph", True)])
def test_static_cache_slots_share_one_cache_and_recapture_when_it_grows(tiny_model_dir, graphs, autocast):
    """tests/test_sampling.py's sequence of calls on the GPU: 12 rows, 4 rows at another
    temperature (a second slot on the cache), 24 rows and a wide prompt (the cache grows, every slot
    on it is captured again), 12 rows (reused): each call draws what eager decoding draws (bitwise
    for CUDA graphs), the captures follow SHARED_CACHE_CAPTURES and a replaced cache is freed."""
    from lit_covrl.policy import load_policy, load_tokenizer
    from lit_covrl.sampling import StaticCacheSampler
    from tests.test_sampling import SHARED_CACHE_CAPTURES, run_shared_cache_calls

    model, tok = load_policy(tiny_model_dir).cuda().eval(), load_tokenizer(tiny_model_dir)
    graphed = StaticCacheSampler(graphs=graphs, check_every=4, length_bucket=32)
    captures = []

    def same(a, b, i):
        T = a.response_mask.shape[1]
        rows = (b.input_ids[:, : a.input_ids.shape[1]] == a.input_ids).all(1)
        assert rows.all() if graphs == "cuda_graph" else rows.float().mean() >= 0.75, (i, rows)
        tol = 2e-2 if autocast else 1e-3
        torch.testing.assert_close(b.logp[rows, :T], a.logp[rows], atol=tol, rtol=tol)
        captures.append(graphed.captures)

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        run_shared_cache_calls(model, graphed, "cuda", same, pad=tok.pad_token_id, eos=tok.eos_token_id, vocab=len(tok))
    assert captures == SHARED_CACHE_CAPTURES


def test_skip_padding_on_cuda_gives_the_untrimmed_logprobs(tiny_model_dir):
    """The learner's sorted, trimmed micro-batches on the GPU give the log-probs of one forward
    over the rollout's layout (fp32, to kernel rounding)."""
    from lit_covrl.learner import Learner, LearnerSettings
    from lit_covrl.objectives import PPOClip
    from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings
    from lit_covrl.policy import load_policy, response_logprobs
    from tests.test_packing import _rollout_rows

    model = load_policy(tiny_model_dir).cuda()
    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(3, 15, (n,), generator=g).tolist()  # noqa: E731
    ids, att, T = _rollout_rows([rnd(n) for n in (2, 5, 3, 7, 4, 2)], [rnd(n) for n in (1, 9, 2, 14, 3, 6)])
    ids, att = ids.cuda(), att.cuda()
    mask = att[:, -T:].float()
    settings = LearnerSettings(RolloutSettings(group_size=1, max_new_tokens=T), LossSettings(),
                               UpdateSettings(micro_batch_size=2, grad_clip=None), skip_padding=True)
    lp = Learner(model, settings, PPOClip(), [], driver=None).logprobs(model, ids, att, mask)
    with torch.no_grad():
        ref = response_logprobs(model, ids, att, T).logp
    torch.testing.assert_close(lp, ref * mask, rtol=1e-4, atol=1e-5)


def test_compiled_update_forward_under_bf16_autocast_matches_eager(tiny_model_dir):
    """`model.system.compile_update` on CUDA (inductor), under bf16 autocast as `bf16-mixed` runs it:
    the training forward's log-probs and entropies and the gradient of their sum equal the eager
    learner's to bf16 tolerance (bf16 rounding of logits of order 1-10: 5e-2 absolute), on 4 micro-batch
    shapes (a one-row one included, skip_padding trimming) with recompilation an error after the first."""
    from torch._dynamo.utils import counters

    from lit_covrl.learner import Learner, LearnerSettings
    from lit_covrl.objectives import PPOClip
    from lit_covrl.policy import load_policy
    from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings
    from tests.test_compile_update import _batch

    torch._dynamo.reset()
    counters.clear()
    policy = load_policy(tiny_model_dir).cuda().eval()
    learners = {c: Learner(policy, LearnerSettings(RolloutSettings(group_size=2, max_new_tokens=12), LossSettings(),
                                                   UpdateSettings(micro_batch_size=5), skip_padding=True,
                                                   compile_update=c), PPOClip(), [], driver=None)
                for c in (False, True)}
    for i, (n, P, T) in enumerate([(8, 4, 6), (11, 5, 9), (1, 3, 4), (6, 6, 12)]):
        ids, att = (t.cuda() for t in _batch(n, P, T, seed=i, vocab=policy.config.vocab_size))
        mask = att[:, -T:].float()
        out = {}
        for compiled, learner in learners.items():
            policy.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16), torch._dynamo.config.patch(error_on_recompile=i > 0):
                logp, ent = learner._logprobs(ids, att, T, True)[:2]
                ((logp + ent) * mask).sum().backward()
            grad = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
            out[compiled] = (logp.float() * mask, ent.float() * mask, grad)
        (lp0, e0, g0), (lp1, e1, g1) = out[False], out[True]
        torch.testing.assert_close(lp1, lp0, rtol=0, atol=5e-2)
        torch.testing.assert_close(e1, e0, rtol=0, atol=5e-2)
        assert torch.nn.functional.cosine_similarity(g1, g0, dim=0) > 0.99, i
        assert (g1.norm() / g0.norm() - 1).abs() < 0.05, i
    assert counters["stats"]["unique_graphs"] == 1  # training forward only, compiled once
