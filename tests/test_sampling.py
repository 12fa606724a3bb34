"""Samplers (lit_covrl.sampling): the per-token math (entropy at the sampling temperature, -inf
and NaN logits), StaticCacheSampler without graphs against KVCacheSampler token for token, a
full RL step with each, the non-finite stop, and the YAML choice. CPU; the CUDA-graph path is in
tests/test_gpu.py."""
from __future__ import annotations

import copy
import math
import weakref
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from lit_covrl.sampling import (
    KVCacheSampler, StaticCacheSampler, default_sampler, sample_token, static_cache_unsupported,
)
from lit_covrl.sampling.static_store import _Store, batch_bucket, kv_dtypes

EOS = [1, 2]  # two stop ids: every one ends a sequence
PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def _prompts(lengths: list[int], group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths, each repeated `group` times (GRPO rows)."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD)
    mask = torch.zeros((len(lengths), P), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(3, 24, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)


def test_entropy_is_that_of_the_sampled_distribution_and_ignores_minus_inf():
    # z = [ln 1, ln 3]: at T = 1, p = [1/4, 3/4], H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335;
    # at T = 0.5, z / T = [0, 2 ln 3], p = [1/10, 9/10], H = -(0.1 ln 0.1 + 0.9 ln 0.9) = 0.325083.
    # With a -inf logit: [0, 0, -inf] at T = 2 gives p = [1/2, 1/2, 0], H = ln 2 (0 * -inf counts 0).
    z = torch.tensor([[0.0, math.log(3.0), -math.inf]])
    stop = torch.tensor(EOS[0])
    _, logp, h1, bad = sample_token(z, 1.0, 1.0, torch.Generator().manual_seed(0), stop)
    assert h1.item() == pytest.approx(0.562335, abs=1e-6) and not bad.item()
    tok, logp, h05, _ = sample_token(z, 0.5, 1.0, torch.Generator().manual_seed(0), stop)
    assert h05.item() == pytest.approx(0.325083, abs=1e-6)
    assert logp.item() == pytest.approx(math.log([0.1, 0.9][tok.item()]), abs=1e-6)
    _, _, h2, _ = sample_token(torch.tensor([[0.0, 0.0, -math.inf]]), 2.0, 1.0, None, stop)
    assert h2.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_nonfinite_rows_are_flagged_and_stopped_without_crashing_multinomial():
    z = torch.tensor([[0.0, float("nan"), 1.0], [0.0, math.inf, 1.0], [-math.inf] * 3, [0.0, -math.inf, 1.0]])
    tok, logp, h, bad = sample_token(z, 0.7, 0.9, torch.Generator().manual_seed(0), torch.tensor(2))
    assert bad.tolist() == [True, True, True, False]  # a single -inf logit is a masked token, not an error
    assert tok[:3].tolist() == [2, 2, 2] and tok[3].item() in (0, 2)
    assert torch.isfinite(logp).all() and torch.isfinite(h).all()


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 3, 8, 12, 64, 65, 128, 130)] == [1, 4, 8, 16, 64, 128, 128, 192]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.3, 1.0), (1.0, 0.5)])
def test_static_cache_sampler_draws_the_kv_cache_samplers_tokens(model, temperature, top_p):
    """Same generator, same prompts (left padding, 3 groups of 4, 2 EOS ids) -> the same tokens,
    log-probs and entropies; twice, with a second prompt width reusing the first rollout's
    (bucketed: 12 rows -> 16, P + T -> a multiple of 16) static cache."""
    static = StaticCacheSampler(graphs="none", length_bucket=16)
    kw = dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, temperature=temperature, top_p=top_p)
    lengths_seen = set()
    for lengths, seed in (([6, 4, 5], 0), ([5, 2, 1], 1)):
        ids, mask = _prompts(lengths, 4, seed)
        a = KVCacheSampler().sample(model, ids, mask, generator=torch.Generator().manual_seed(seed), **kw)
        b = static.sample(model, ids, mask, generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.truncated, b.truncated)
        torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=1e-5)
        assert not a.nonfinite.any() and not b.nonfinite.any()
        lengths_seen |= set(a.response_mask.sum(1).long().tolist())
        ends = a.input_ids[:, ids.shape[1]:].gather(1, a.response_mask.sum(1).long()[:, None] - 1).squeeze(1)
        assert all(e in EOS for e in ends[~a.truncated].tolist())
    assert len(static._slots) == 1 and len(lengths_seen) >= 3  # one slot reused; EOS at different steps


def test_static_cache_grows_to_the_longest_rollout_and_keeps_one_cache(model):
    """Prompt widths 4, 14, 4 with length buckets of 8: the second rollout needs a longer cache,
    which replaces the first (not one cache per length bucket, held for the whole run); the third,
    shorter rollout decodes in the longer cache and still draws the dynamic cache's tokens."""
    static = StaticCacheSampler(graphs="none", length_bucket=8)
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, temperature=1.2)
    for i, lengths in enumerate(([4, 3], [14, 9], [4, 2])):
        ids, mask = _prompts(lengths, 4, seed=i)
        a = KVCacheSampler().sample(model, ids, mask, generator=torch.Generator().manual_seed(i), **kw)
        b = static.sample(model, ids, mask, generator=torch.Generator().manual_seed(i), **kw)
        assert torch.equal(a.input_ids, b.input_ids), i
        torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=1e-5)
        (slot,) = static._slots.values()
        assert slot.key_valid.shape[1] == (16 if i == 0 else 24), i  # 4 + 6 -> 16; 14 + 6 -> 24, kept


def _kv_storages(sampler: StaticCacheSampler) -> dict[int, int]:
    """The KV cache memory the sampler holds: {storage address: bytes} over every slot's layers."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for slot in sampler._slots.values()
            for layer in slot.cache.layers for t in (layer.keys, layer.values)}


# (prompt lengths, group size, temperature): 12 rows; 4 rows at another temperature (a second slot
# on the same cache); 24 rows (the cache grows: more rows); a wide prompt (it grows: longer); 12 rows
SHARED_CACHE_CALLS = [([4, 3, 5], 4, 1.2), ([4], 4, 0.7), ([3, 4, 5, 4, 3, 2], 4, 1.2), ([26, 4, 3], 4, 1.2),
                      ([4, 3, 5], 4, 1.2)]
SHARED_CACHE_CAPTURES = [1, 2, 3, 4, 4]  # a new slot or a replaced cache captures; the last call reuses


def run_shared_cache_calls(model, sampler, device, same_draws, *, pad: int, eos, vocab: int) -> None:
    """SHARED_CACHE_CALLS through `sampler` and a fresh eager StaticCacheSampler from the same
    generator state: `same_draws(a, b, i)` compares them; the sampler ends with one cache (the
    replaced ones freed at once) and every slot on it. Shared by the CPU test below and the CUDA
    one in tests/test_gpu.py (graphs cuda_graph / compile, where captures follow SHARED_CACHE_CAPTURES)."""
    kw = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    old = None
    for i, (lengths, group, temperature) in enumerate(SHARED_CACHE_CALLS):
        g = torch.Generator().manual_seed(100 + i)
        P = max(lengths)
        ids, mask = torch.full((len(lengths), P), pad), torch.zeros((len(lengths), P), dtype=torch.long)
        for r, n in enumerate(lengths):
            ids[r, P - n:], mask[r, P - n:] = torch.randint(3, vocab, (n,), generator=g), 1
        ids, mask = ids.repeat_interleave(group, 0).to(device), mask.repeat_interleave(group, 0).to(device)
        gen = lambda: torch.Generator(device).manual_seed(i)  # noqa: E731
        a = StaticCacheSampler(graphs="none", length_bucket=32).sample(model, ids, mask, generator=gen(),
                                                                        temperature=temperature, **kw)
        b = sampler.sample(model, ids, mask, generator=gen(), temperature=temperature, **kw)
        same_draws(a, b, i)
        (store,) = sampler._stores.values()
        assert all(slot.store is store for slot in sampler._slots.values()), i
        if old is not None and i in (2, 3):
            assert old() is None, i  # the replaced cache is freed at once
        old = weakref.ref(store.keys[0])


def test_calls_of_every_size_share_one_cache_and_draw_what_a_fresh_sampler_draws(model):
    def same(a, b, i):
        assert torch.equal(a.input_ids, b.input_ids), i
        torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=1e-5)

    sampler = StaticCacheSampler(graphs="none", length_bucket=32)
    run_shared_cache_calls(model, sampler, "cpu", same, pad=PAD, eos=EOS, vocab=24)
    (store,) = sampler._stores.values()
    assert (store.rows, store.length) == (32, 64) and len(sampler._slots) == 1


def test_static_cache_is_one_cache_per_model_shared_by_batch_sizes_and_temperatures(model):
    """A training rollout of 64 rows, then validation batches of 32 rows at another temperature and
    top-p and a last one of 8: one cache of the 64-row size serves all three (each held its own
    full-length cache for the whole run: 1.62x the training rollout's cache on a tiny model), and
    each draws what a fresh sampler draws."""
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    sampler = StaticCacheSampler(graphs="none", length_bucket=16)
    sizes = []
    for i, (rows, temperature, top_p) in enumerate([(64, 1.0, 1.0), (32, 0.6, 0.9), (8, 1.0, 1.0)]):
        ids, mask = _prompts([5, 3, 4, 2], rows // 4, seed=i)
        a = sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(i), temperature=temperature,
                           top_p=top_p, **kw)
        fresh = StaticCacheSampler(graphs="none", length_bucket=16)
        b = fresh.sample(model, ids, mask, generator=torch.Generator().manual_seed(i), temperature=temperature,
                         top_p=top_p, **kw)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logp, b.logp), i
        sizes.append(sum(_kv_storages(fresh).values()))
        assert sum(_kv_storages(sampler).values()) == sizes[0], i
    # 2 layers x (keys + values) x 64 rows x 2 KV heads x 16 positions x 8 dims x 4 bytes
    assert sizes == [2 * 2 * 64 * 2 * 16 * 8 * 4, 2 * 2 * 32 * 2 * 16 * 8 * 4, 2 * 2 * 8 * 2 * 16 * 8 * 4]
    assert len(sampler._slots) == 3 and len(_kv_storages(sampler)) == 4  # 3 slots on 2 layers' keys and values


def test_a_grown_cache_drops_and_recaptures_the_slots_built_on_the_old_one(model, monkeypatch):
    """8 rows, 64 rows (the cache grows: more rows), 8 rows again, 8 rows with a wider prompt (the
    cache grows: longer), 64 rows. A captured graph reads the addresses it was captured on, so a
    slot built on a replaced cache must be captured again on the new one: stood in for on the CPU by
    a fake capture that records the cache's addresses and, at every replay, checks that the
    sampler's cache is still at them (the eager step does the decoding). Every rollout draws what a
    fresh sampler draws, and the sampler holds one cache of the largest rows x longest length."""
    import lit_covrl.sampling.static_cache as sc

    class FakeGraph:
        def __init__(self, sampler, model, slot, temperature, top_p):
            self.sampler = sampler
            layers = slot.cache.layers  # what a real capture would read: the slot's views of the cache
            self.addresses = [st.keys.data_ptr() for st in layers] + [st.values.data_ptr() for st in layers]
            self.step = lambda: sampler._forward(model, slot, temperature, top_p)
            self.slot = slot

        def replay(self):
            store = self.slot.store
            assert any(s is store for s in self.sampler._stores.values()), "graph reads a freed cache"
            assert [t.data_ptr() for t in (*store.keys, *store.values)] == self.addresses, "graph reads a freed cache"
            self.slot.outputs = self.step()

    def fake_capture(self, model, slot, temperature, top_p):
        slot.graph = FakeGraph(self, model, slot, temperature, top_p)
        self.captures += 1

    monkeypatch.setattr(sc.StaticCacheSampler, "_mode", lambda self, model, device: "cuda_graph")
    monkeypatch.setattr(sc.StaticCacheSampler, "_capture", fake_capture)
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, temperature=1.1)
    sampler = StaticCacheSampler(graphs="cuda_graph", length_bucket=8)
    expected_captures, shapes = [1, 2, 3, 4, 5], []
    for i, (lengths, group) in enumerate([([4, 3], 4), ([4, 2], 32), ([3, 4], 4), ([14, 9], 4), ([4, 3], 32)]):
        ids, mask = _prompts(lengths, group, seed=i)
        a = sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(i), **kw)
        b = StaticCacheSampler(graphs="none", length_bucket=8).sample(
            model, ids, mask, generator=torch.Generator().manual_seed(i), **kw)
        assert torch.equal(a.input_ids, b.input_ids), i
        torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=1e-5)
        assert sampler.captures == expected_captures[i], i
        (store,) = sampler._stores.values()
        assert all(slot.store is store for slot in sampler._slots.values())
        assert sum(_kv_storages(sampler).values()) == 2 * 2 * store.rows * 2 * store.length * 8 * 4
        shapes.append((store.rows, store.length, len(sampler._slots)))
        if i == 0:
            first = weakref.ref(store.keys[0])
        freed = first() is None
        assert freed == (i > 0), i  # a replaced cache is freed at once, not left to the garbage collector
    # 4 + 6 -> 16 positions; 14 + 6 -> 24; 8 and 64 rows share the 64-row cache (one slot each)
    assert shapes == [(8, 16, 1), (64, 16, 1), (64, 16, 2), (64, 24, 1), (64, 24, 2)]


def test_alternating_autocast_keeps_a_cache_per_kv_dtype_instead_of_replacing_it(model):
    """Rollouts alternating bf16 autocast on and off (fp32 keys with bf16 values, or fp32 both)
    replaced the model's one cache at every switch, dropping its slots (to be captured again, after
    a garbage collection) each time; each KV dtype keeps its cache and its slot."""
    sampler = StaticCacheSampler(graphs="none", length_bucket=8)
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, temperature=1.0)
    ids, mask = _prompts([4, 3], 4, seed=0)
    for i in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i % 2 == 1):
            sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(i), **kw)
        if i == 0:
            first = weakref.ref(next(iter(sampler._stores.values())).keys[0])
        assert len(sampler._stores) == len(sampler._slots) == min(i + 1, 2), i
        assert first() is not None, i  # never replaced


def test_a_slot_follows_its_model_to_a_new_kv_dtype(model):
    """The same model object cast to bf16 between rollouts keeps its slot key but needs another
    cache: the slot must be rebuilt on the bf16 cache, not go on decoding into the fp32 one."""
    model = copy.deepcopy(model)
    sampler = StaticCacheSampler(graphs="none", length_bucket=8)
    kw = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD, temperature=1.0)
    ids, mask = _prompts([3, 3], 2, seed=0)
    sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    model.to(torch.bfloat16)
    got = sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    fresh = StaticCacheSampler(graphs="none", length_bucket=8).sample(
        model, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    (slot,) = sampler._slots.values()
    assert slot.store.keys[0].dtype == torch.bfloat16
    assert torch.equal(got.input_ids, fresh.input_ids)


def test_a_models_cache_fits_only_its_own_layer_shapes_and_dtypes():
    """A cache is reused only by layers of its heads, head_dim and dtypes (a new model that got a
    freed model's id must not decode into its cache), and only for rows and lengths it holds."""
    def layers(n=1, heads=2, dim=8, values=torch.float32):
        return [SimpleNamespace(keys=torch.zeros(1, heads, 3, dim), values=torch.zeros(1, heads, 3, dim, dtype=values))] * n

    def fits(store, nb, lb, lay):
        return store.fits(nb, lb, lay, kv_dtypes(lay, torch.device("cpu")))

    store = _Store(keys=[torch.zeros(8, 2, 16, 8)], values=[torch.zeros(8, 2, 16, 8)])
    assert fits(store, 8, 16, layers()) and not fits(store, 9, 16, layers()) and not fits(store, 8, 17, layers())
    for other in (layers(dim=4), layers(heads=1), layers(values=torch.bfloat16), layers(n=2)):
        assert not fits(store, 8, 16, other)


def test_static_cache_sampler_checks_the_finish_flag_every_k_steps(model):
    """check_every=4: decoding may run past the last EOS, but the rollout is the same: extra steps
    are cut off and the tokens before them are those of check_every=1."""
    ids, mask = _prompts([5, 3], 4, 2)
    kw = dict(max_new_tokens=40, eos_token_id=EOS, pad_token_id=PAD, temperature=1.5)
    calls = []
    one = StaticCacheSampler(graphs="none", check_every=1).sample(
        model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    four = StaticCacheSampler(graphs="none", check_every=4).sample(
        model, ids, mask, generator=torch.Generator().manual_seed(5), all_done=lambda d: calls.append(d) or d, **kw)
    assert not one.truncated.any()  # every row stopped: the early exit was exercised
    T = one.response_mask.shape[1]
    assert torch.equal(four.input_ids[:, : ids.shape[1] + T], one.input_ids)
    assert not four.response_mask[:, T:].any() and len(calls) == math.ceil(T / 4)


def test_model_emitting_nan_logits_is_flagged_not_crashed(model):
    ids, mask = _prompts([4, 4], 2, 3)
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    calls = {"n": 0}
    forward = model.forward

    def nan_from_third_forward(*a, **k):
        out = forward(*a, **k)
        calls["n"] += 1
        if calls["n"] >= 3:
            out.logits = torch.full_like(out.logits, float("nan"))
        return out

    model.forward = nan_from_third_forward
    try:
        for sampler in (KVCacheSampler(), StaticCacheSampler(graphs="none")):
            calls["n"] = 0
            r = sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
            alive_at_2 = r.response_mask.shape[1] > 2 and r.response_mask[:, 2].bool()
            assert torch.equal(r.nonfinite, alive_at_2), type(sampler).__name__  # rows still running at step 2
            assert torch.isfinite(r.logp).all() and torch.isfinite(r.entropy).all()
    finally:
        del model.forward


def _sliding_window_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      use_sliding_window=True, sliding_window=8, max_window_layers=1, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).eval()


def test_default_sampler_per_device(model):
    assert isinstance(default_sampler("cpu"), KVCacheSampler)
    s = default_sampler("cuda")
    assert isinstance(s, StaticCacheSampler) and s.graphs == "compile"
    assert isinstance(default_sampler("cuda", model), StaticCacheSampler)
    # one key mask serves every layer of the static cache: a sliding-window model gets the dynamic cache
    assert isinstance(default_sampler("cuda", _sliding_window_model()), KVCacheSampler)
    with pytest.raises(ValueError, match="graphs="):
        StaticCacheSampler(graphs="cudagraph")


def test_static_cache_refuses_sliding_window_layers_instead_of_attending_past_the_window(model):
    assert static_cache_unsupported(model.config) is None
    sliding = _sliding_window_model()
    assert "layer 1: StaticSlidingWindowLayer" in static_cache_unsupported(sliding.config)
    ids, mask = _prompts([6, 4], 2, seed=0)
    kw = dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="cannot decode this model.*not full attention.*KVCacheSampler"):
        StaticCacheSampler(graphs="none").sample(sliding, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    KVCacheSampler().sample(sliding, ids, mask, generator=torch.Generator().manual_seed(0), **kw)  # decodes it


# ------------------------------------------------------------------------------ in GRPOModule


class _Record:
    """A callback recording every step's metrics (trainer.callback_metrics)."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class Rec(Callback):
            def __init__(self) -> None:
                self.steps: list[dict[str, float]] = []

            def on_train_batch_end(self, trainer, module, *args) -> None:
                self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

        return Rec()


def test_a_full_rl_step_gives_the_same_metrics_with_either_sampler(tiny_model_dir):
    from lit_covrl.data import PromptDataModule
    from tests.helpers import fit
    from tests.test_module import make_module

    runs = {}
    for name, sampler in (("kv", KVCacheSampler()), ("static", StaticCacheSampler(graphs="none", length_bucket=8))):
        rec = _Record()
        module = make_module(
            tiny_model_dir, sampler=sampler, rollout=dict(temperature=0.8, top_p=0.95, max_new_tokens=6),
        )
        fit(module, PromptDataModule(task="arithmetic", batch_size=4, seed=0), steps=2, callbacks=[rec])
        assert module.sampler is sampler
        runs[name] = rec.steps
    assert len(runs["kv"]) == len(runs["static"]) == 2
    for a, b in zip(runs["kv"], runs["static"]):
        keys = [k for k in a if not k.startswith("time/") and "per_s" not in k]
        assert "policy/entropy" in keys and "rollout/reward_mean" in keys
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("save", [False, True])
def test_nan_logits_stop_the_run_naming_the_step_and_the_last_checkpoint(tiny_model_dir, tmp_path, save):
    """From RL step 2 on the policy emits NaN logits: the sampler flags the rows (no crash in
    torch.multinomial) and training_step raises, naming the step and the last good checkpoint."""
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_covrl.data import PromptDataModule
    from tests.helpers import fit
    from tests.test_module import make_module

    class BreakAtStep2(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                forward = module.policy.forward

                def nan_forward(*a, **k):
                    out = forward(*a, **k)
                    out.logits = out.logits * float("nan")
                    return out

                module.policy.forward = nan_forward

    callbacks = [BreakAtStep2()]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True))
    module = make_module(tiny_model_dir, rollout=dict(max_new_tokens=4))
    with pytest.raises(RuntimeError, match="RL step 2") as err:
        fit(module, PromptDataModule(task="arithmetic", batch_size=4, seed=0), steps=5, callbacks=callbacks,
            enable_checkpointing=save, default_root_dir=str(tmp_path))
    if save:
        assert str(tmp_path / "ckpt" / "last.ckpt") in str(err.value)
    else:
        assert "none saved yet" in str(err.value)


def test_sampler_is_chosen_in_yaml(tmp_path):
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule
    from tests.test_configs import CONFIGS, QUICK

    args = ["--config", str(QUICK), "--config", str(CONFIGS / "samplers" / "static_cache.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, args=args, run=False)
    s = cli.model.sampler
    assert isinstance(s, StaticCacheSampler) and s.graphs == "auto" and s.check_every is None and s.length_bucket == 128


def test_weights_cast_once_per_rollout_give_autocasts_logits_exactly(model):
    """Under bf16 autocast, decoding with Linear weights cast once per rollout draws the tokens and
    log-probs of decoding where autocast casts them at every forward (the same rounding)."""
    ids, mask = _prompts([6, 3], 4, 4)
    kw = dict(max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, temperature=0.9)
    outs = []
    for once in (False, True):
        sampler = StaticCacheSampler(graphs="none", cast_weights_once=once)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw))
        assert bool(sampler._weights) == once
    assert torch.equal(outs[0].input_ids, outs[1].input_ids)
    assert torch.equal(outs[0].logp, outs[1].logp) and torch.equal(outs[0].entropy, outs[1].entropy)


def test_static_cache_holds_autocast_keys_in_the_autocast_dtype_and_samples_the_same(model, monkeypatch):
    """Under autocast the rotary embedding makes keys fp32 while values come out bf16; attention reads
    both in bf16 (autocast casts SDPA's inputs), so the cache stores the keys in bf16 (a third less
    memory than fp32 keys beside bf16 values: review gpu24 measured 52.5 GiB instead of 35 GiB for the
    one-GPU 1.5B recipe) and samples bit for bit what fp32 keys sampled."""
    import lit_covrl.sampling.static_cache as SC

    ids, mask = _prompts([4, 7, 2], 4, 5)
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, temperature=1.2, top_p=0.9)
    sampler = StaticCacheSampler(graphs="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    (slot,) = sampler._slots.values()
    assert {(layer.keys.dtype, layer.values.dtype) for layer in slot.cache.layers} == {(torch.bfloat16, torch.bfloat16)}
    # the earlier storage: each state in the prefill cache's dtype (fp32 keys)
    monkeypatch.setattr(SC, "kv_dtypes", lambda layers, device: tuple((dl.keys.dtype, dl.values.dtype) for dl in layers))
    wide = StaticCacheSampler(graphs="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = wide.sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    (wide_slot,) = wide._slots.values()
    assert {layer.keys.dtype for layer in wide_slot.cache.layers} == {torch.float32}
    assert torch.equal(half.input_ids, full.input_ids)
    assert torch.equal(half.logp, full.logp) and torch.equal(half.entropy, full.entropy)
    plain = StaticCacheSampler(graphs="none")
    plain.sample(model, ids, mask, **kw)  # without autocast the cache stays float32
    assert {layer.keys.dtype for layer in next(iter(plain._slots.values())).cache.layers} == {torch.float32}


def test_static_cache_takes_decoding_states_of_another_dtype_than_the_prefill_cache(model, monkeypatch):
    """transformers 5.17 keeps a dynamic cache's values in the keys' dtype (fp32 under autocast:
    torch.cat promotes) while a decoding step's values come out bf16 (the first GPU run failed on
    this). Simulated here: the prefill cache's values are made fp32 before they are copied in; the
    static cache casts the new states on the way in and samples what it samples without the upcast."""
    import lit_covrl.sampling.static_cache as SC

    ids, mask = _prompts([5, 3], 2, 6)
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, temperature=1.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = StaticCacheSampler(graphs="none").sample(model, ids, mask, generator=torch.Generator().manual_seed(2), **kw)
    prefill = SC.prefill

    def fp32_values_prefill(*a):
        logits, dyn = prefill(*a)
        for layer in dyn.layers:
            layer.values = layer.values.float()
        return logits, dyn

    monkeypatch.setattr(SC, "prefill", fp32_values_prefill)
    sampler = StaticCacheSampler(graphs="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upcast = sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(2), **kw)
    (slot,) = sampler._slots.values()
    assert {layer.values.dtype for layer in slot.cache.layers} == {torch.bfloat16}  # stored as attention reads it
    assert torch.equal(plain.input_ids, upcast.input_ids)
    torch.testing.assert_close(plain.logp, upcast.logp, atol=1e-2, rtol=0)


def test_static_cache_made_under_inference_mode_serves_a_later_no_grad_rollout(model):
    """A standalone validate / test samples under torch.inference_mode: the slot (cache, mask,
    positions) and the weight copies it creates must still be written in place by a training
    rollout under no_grad (inference tensors cannot be), which then samples what a fresh sampler
    samples."""
    ids, mask = _prompts([5, 3], 4, 8)
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, temperature=0.9)
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    sampler = StaticCacheSampler(graphs="none")
    with torch.inference_mode(), amp:
        sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    assert sampler._slots and sampler._weights
    with torch.no_grad(), amp:
        again = sampler.sample(model, ids, mask, generator=torch.Generator().manual_seed(2), **kw)
        fresh = StaticCacheSampler(graphs="none").sample(model, ids, mask, generator=torch.Generator().manual_seed(2),
                                                         **kw)
    assert len(sampler._slots) == 1  # the same cache served both
    assert torch.equal(again.input_ids, fresh.input_ids) and torch.equal(again.logp, fresh.logp)


def test_validate_then_fit_in_one_process_with_the_static_cache_sampler(tiny_model_dir):
    """trainer.validate (a baseline pass@k, under inference mode) and then trainer.fit of the same
    module: the fit's rollouts reuse the sampler's cache and train."""
    import lightning as L

    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    sampler = StaticCacheSampler(graphs="none")
    module = make_module(tiny_model_dir, sampler=sampler)
    data = make_data()
    L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
              enable_model_summary=False).validate(module, data)
    (slot,) = sampler._slots.values()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    fit(module, data, steps=1, precision="bf16-mixed")
    assert list(sampler._slots.values()) == [slot]  # 16 rows at temperature 1 both times: the same cache
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())


def test_validation_samples_with_the_configured_sampler(tiny_model_dir):
    """model.sampler serves training rollouts and validation alike (at their own temperatures)."""
    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    class Counting(StaticCacheSampler):
        def __init__(self) -> None:
            super().__init__(graphs="none")
            self.temperatures: list[float] = []

        def sample(self, *args, temperature: float = 1.0, **kwargs):
            self.temperatures.append(temperature)
            return super().sample(*args, temperature=temperature, **kwargs)

    sampler = Counting()
    module = make_module(tiny_model_dir, sampler=sampler, rollout=dict(temperature=0.8), eval=dict(temperature=1.0))
    fit(module, make_data(), steps=2, val_check_interval=1)
    assert sampler.temperatures.count(0.8) == 2 and sampler.temperatures.count(1.0) >= 1
    assert len(sampler._slots) == 2 and len(sampler._stores) == 1  # a slot per temperature, one cache


def test_each_compiled_slot_gets_its_own_graph_past_dynamos_recompile_limit(monkeypatch):
    """graphs="compile" (the CUDA default): every slot compiled the same lambda, so all shared
    dynamo's 8 graphs per code object; from the 9th slot (here: the 9th temperature) decoding ran
    eagerly with only a log line, while `captures` still counted. Run on the CPU with dynamo's eager
    backend (the slot logic is the same; what inductor and CUDA graphs add is not under test)."""
    from torch._dynamo.utils import counters

    import lit_covrl.sampling.static_cache as sc

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, dynamic=None: compile_(fn, backend="eager", dynamic=dynamic))
    monkeypatch.setattr(sc.StaticCacheSampler, "_mode", lambda self, model, device: "compile")
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(3, 30, (2, 4))
    sampler, new_graphs = StaticCacheSampler(graphs="compile"), []
    torch._dynamo.reset()
    for i in range(10):
        before = counters["stats"]["unique_graphs"]
        sampler.sample(model, ids, torch.ones_like(ids), max_new_tokens=2, eos_token_id=1, pad_token_id=0,
                       temperature=1.0 + 0.1 * i, generator=torch.Generator().manual_seed(0))
        new_graphs.append(counters["stats"]["unique_graphs"] - before)
    assert new_graphs == [1] * 10 and sampler.captures == 10
