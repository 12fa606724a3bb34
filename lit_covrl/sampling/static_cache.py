"""StaticCacheSampler: a KV cache preallocated for the whole rollout, fixed shapes, and on CUDA
the decoding step compiled (torch.compile reduce-overhead) or replayed as a CUDA graph.

What a decoding step costs on a GPU with the dynamic cache (`KVCacheSampler`) is mostly Python
and kernel launches: hundreds of small kernels per forward for a 0.5B model at batch 128, the
cache growing by `torch.cat`, a host sync per token. Here:

- the cache is transformers' `StaticCache` (one [N_b, kv_heads, L_b, head_dim] tensor per layer,
  written in place at the layer's `cumulative_length`), sized for the whole rollout with the
  batch rounded up to a bucket N_b (powers of two up to 64, then multiples of 64) and the length
  P + max_new_tokens rounded up to a multiple of `length_bucket`, so the same shapes (and the
  same captured graph) serve rollout after rollout; rows beyond N are dummies that attend to one
  key and are dropped;
- the sampler holds one such cache per model (and KV dtypes: rollouts with and without autocast
  keep one each; under autocast keys and values are stored in its dtype, as attention reads them): the largest batch bucket x the longest length seen.
  Each (batch bucket, temperature, top-p) -- the training rollout, a validation batch, its smaller
  last batch, a `sampling_batch_size` remainder -- gets a slot of its own (mask, positions, graph)
  whose cache is a view of the model cache's leading N_b rows; temperature and top-p act on the
  logits only. A rollout that needs more rows or a longer length replaces the cache by a bigger
  one (the old one freed first) and drops every slot built on the old one: a captured graph or
  compiled step reads the addresses it was made on, so those slots are rebuilt and captured again
  on the new cache. Shorter rollouts decode in the longer cache with the extra positions masked;
- the prompt is prefilled exactly as in `KVCacheSampler` (one forward per group of identical
  prompts, on a dynamic cache) and copied into the static cache;
- every decoding step feeds one token per row with a 4-D boolean attention mask [N_b, 1, 1, L_b]
  (prompt padding, dead rows' tokens and positions not yet written are masked), so the model's
  mask construction (with its data-dependent checks) is skipped;
- the step `forward -> token_distribution` (log-probs at the temperature, entropy, top-p
  probabilities, non-finite flags) is captured once per slot as a `torch.cuda.CUDAGraph`
  (`graphs="cuda_graph"`) or compiled with `torch.compile(mode="reduce-overhead")`
  (`graphs="compile"`); only the draw (`torch.multinomial` with the caller's generator) runs
  eagerly, so the tokens are those of eager decoding with the same generator state;
- the finished-check (a host sync) is read back every `check_every` steps only;
- under autocast (Lightning's `bf16-mixed`) with fp32 weights, every decoding forward would cast
  every Linear weight to bf16 again (for a 0.5B model 3 GB of memory traffic per token, inside the
  graph). With `cast_weights_once` the Linear weights and biases are cast once per rollout into
  persistent low-precision copies that the decoding forward uses (`torch.func.functional_call`);
  autocast would have produced exactly these values, so the logits are bitwise the same, at the
  cost of one low-precision copy of the Linear weights in memory.

Exactness: with `graphs="none"` and `check_every=1` the sampler draws exactly the tokens of
`KVCacheSampler` for the same generator (both call `base.token_distribution` / `draw_token` on
the same logits, up to the float rounding of attention over masked extra keys); log-probs and
entropies agree to float tolerance (tests/test_sampling.py). In bf16 the attention over the whole
cache sums in another order than over the keys so far, so its output can differ by a bf16 rounding
step now and then (as `KVCacheSampler`'s and the training forward's can: README, "old log-probs").
With `check_every = k > 1` decoding can run up to k - 1 steps past the last EOS: those steps only
emit pad tokens outside the mask, but they draw from the generator, so the *next* rollout's stream
differs from `KVCacheSampler`'s.

Not captured: sharded (FSDP2) models, whose gathered parameters need not keep their addresses
(graphs fall back to eager static decoding there). Models must use the `sdpa` or `eager`
attention implementation (4-D masks), and full attention in every layer: one key mask serves all
layers, so a sliding-window layer (Gemma 2/3, Mistral v0.1, Qwen2 with `use_sliding_window`) would
attend past its window. Such models are refused (`static_cache_unsupported`), and
`default_sampler` gives them `KVCacheSampler`.
"""
from __future__ import annotations

import gc
import logging
import time
import types
from typing import Callable

import torch
from torch import Tensor, nn

from lit_covrl.policy import _cache_kwarg, position_ids_from_mask
from lit_covrl.sampling.base import Sampler, draw_token, eos_ids, finish_rollout, token_distribution
from lit_covrl.sampling.kv_cache import prefill
from lit_covrl.sampling.static_store import _casting_update, _Slot, _Store, batch_bucket, kv_dtypes, static_cache_unsupported
from lit_covrl.types import Rollout

log = logging.getLogger("lit_covrl")
GRAPHS = ("auto", "cuda_graph", "compile", "none")


class StaticCacheSampler(Sampler):
    """Preallocated KV cache + captured decoding step. See the module docstring.

    Args:
        graphs: "auto" (on CUDA for unsharded models "compile", the variant measured fastest so far
            (docs/scaling.md); eager elsewhere), "cuda_graph" (torch.cuda.CUDAGraph), "compile"
            (torch.compile mode="reduce-overhead"), or "none" (eager static decoding).
        check_every: read the all-finished flag back every this many steps (null: 1 on CPU, 8 on CUDA).
        length_bucket: prompt + response length rounded up to a multiple of this.
        cast_weights_once: under autocast, cast the Linear weights to the autocast dtype once per
            rollout instead of at every decoding forward (same values; costs one copy in memory).
        timing: record per-rollout timings in `last_stats` (adds one device sync after the prefill).
    """

    def __init__(self, graphs: str = "auto", check_every: int | None = None, length_bucket: int = 128,
                 cast_weights_once: bool = True, timing: bool = False) -> None:
        if graphs not in GRAPHS:
            raise ValueError(f"StaticCacheSampler graphs={graphs!r}; valid: {list(GRAPHS)}")
        if check_every is not None and check_every < 1:
            raise ValueError(f"StaticCacheSampler check_every={check_every} must be >= 1")
        if length_bucket < 1:
            raise ValueError(f"StaticCacheSampler length_bucket={length_bucket} must be >= 1")
        self.graphs, self.check_every, self.length_bucket, self.timing = graphs, check_every, length_bucket, timing
        self.cast_weights_once = cast_weights_once
        self._slots: dict[tuple, _Slot] = {}
        self._stores: dict[tuple, _Store] = {}  # (id(model), device, KV dtypes) -> its KV cache, shared by its slots
        self._weights: dict[int, tuple] = {}  # id(model) -> (dtype, {name: low-precision copy}, {name: param})
        self.captures = 0  # graphs captured / functions compiled so far (a test checks it stops growing)
        self.last_stats: dict[str, float] = {}
        self.capture_error: str | None = None  # set when a capture failed and decoding fell back to eager

    def __repr__(self) -> str:
        return f"StaticCacheSampler(graphs={self.graphs!r}, check_every={self.check_every})"

    def _mode(self, model: nn.Module, device: torch.device) -> str:
        from lit_covrl.sharding import is_sharded

        if self.graphs == "auto":
            return "compile" if device.type == "cuda" and not is_sharded(model) else "none"
        if self.graphs != "none" and (device.type != "cuda" or is_sharded(model)):
            return "none"  # graphs need CUDA and fixed parameter addresses
        return self.graphs

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        all_done: Callable[[bool], bool] = lambda done: done,
    ) -> Rollout:
        n, P = prompt_ids.shape
        device = prompt_ids.device
        T = max_new_tokens
        eos = eos_ids(eos_token_id, device)
        mode = self._mode(model, device)
        check_every = self.check_every or (8 if device.type == "cuda" else 1)
        t0 = time.perf_counter()
        mask = prompt_mask.long()
        logits, dyn = prefill(model, prompt_ids, mask)
        slot = self._slot(model, n, P + T, temperature, top_p, device, mode, dyn)
        slot.weights = self._cast_weights(model, device) if self.cast_weights_once else None
        self._load_prompt(slot, dyn, prompt_mask, n, P, pad_token_id)
        del dyn
        dist = token_distribution(logits[:, -1], temperature, top_p)
        if self.timing:
            _sync(device)
        t1 = time.perf_counter()
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        nonfinite = torch.zeros(n, dtype=torch.bool, device=device)
        # per-step columns, written in place (a captured step's outputs are overwritten by the next replay)
        tokens = torch.full((n, T), pad_token_id, dtype=torch.long, device=device)
        alive = torch.zeros((n, T), dtype=torch.bool, device=device)
        logps = torch.zeros((n, T), dtype=torch.float32, device=device)
        ents = torch.zeros((n, T), dtype=torch.float32, device=device)
        steps = T
        events = [] if self.timing and device.type == "cuda" else None
        for step in range(T):
            logp_all, entropy, probs, bad = (x[:n] for x in dist)
            tok, logp = draw_token(logp_all, probs, bad, generator, eos[0])
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            nonfinite |= bad & ~finished
            alive[:, step] = ~finished
            tokens[:, step] = tok
            logps[:, step] = logp
            ents[:, step] = entropy
            finished = finished | torch.isin(tok, eos)
            if step == T - 1 or ((step + 1) % check_every == 0 and all_done(bool(finished.all()))):
                steps = step + 1
                break
            slot.tok[:n, 0].copy_(tok)
            slot.key_valid[:n, P + step].copy_(alive[:, step])
            if events is not None:
                events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                events[-1][0].record()
            dist = self._step(model, slot, mode, temperature, top_p)
            if events is not None:
                events[-1][1].record()
            slot.pos.add_(1)
        if self.timing:
            _sync(device)
            decode_s = time.perf_counter() - t1
            self.last_stats = {"prefill_s": t1 - t0, "decode_s": decode_s, "steps": steps,
                               "decode_ms_per_step": 1e3 * decode_s / steps}
            if events:  # GPU time of the decoding forward (+ token_distribution) alone, per step
                self.last_stats["forward_gpu_ms_per_step"] = sum(a.elapsed_time(b) for a, b in events) / len(events)
        return finish_rollout(prompt_ids, prompt_mask, tokens[:, :steps], alive[:, :steps], logps[:, :steps],
                              ents[:, :steps], finished, nonfinite)

    # ---------------------------------------------------------------------------------------
    def _slot(self, model, n, length, temperature, top_p, device, mode, dyn) -> _Slot:
        nb, lb = batch_bucket(n), -(-length // self.length_bucket) * self.length_bucket
        store = self._store(model, nb, lb, device, dyn)
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        key = (id(model), nb, float(temperature), float(top_p), device, mode, autocast)
        slot = self._slots.get(key)
        if slot is not None and slot.store is store:
            return slot  # its views, and the graph captured on them, are still the cache's
        # the slot's tensors are written in place by every later rollout: made outside inference mode
        # (a standalone validate / test runs in it) they are normal tensors, which inference mode may
        # update too, while inference tensors could not be updated by a training rollout (no_grad)
        with torch.inference_mode(False):
            slot = self._new_slot(model, store, nb, device)
        self._slots[key] = slot
        return slot

    def _store(self, model, nb: int, lb: int, device: torch.device, dyn) -> _Store:
        """The model's one KV cache (per KV dtypes), grown when this rollout needs more rows or a
        longer length than it has. A grown cache replaces the old one, and every slot built on the
        old one is dropped with it: their views, and the graphs captured / compiled on them, read
        the old addresses (a kept graph would decode in freed memory), so they are rebuilt, and
        captured again, on the new cache the next time they serve a rollout."""
        layers = getattr(dyn, "layers", None)
        if layers is None:
            raise ValueError("model.sampler StaticCacheSampler needs transformers >= 5 (cache layers); "
                             "use lit_covrl.sampling.KVCacheSampler")
        # one cache per model and KV dtypes: a rollout under bf16 autocast (bf16 keys and values) and
        # one without (fp32 both) keep a cache each, instead of replacing each other at every switch
        dtypes = kv_dtypes(layers, device)
        mkey = (id(model), device, dtypes)
        store = self._stores.get(mkey)
        if store is not None and store.fits(nb, lb, layers, dtypes):
            return store
        if store is not None:  # the old cache and its slots are freed before the new one is made
            nb, lb = max(nb, store.rows), max(lb, store.length)
            self._slots = {k: s for k, s in self._slots.items() if s.store is not store}
            del self._stores[mkey], store
            gc.collect()  # a slot is a reference cycle (its layers' update, its compiled step's closure)
        with torch.inference_mode(False):
            self._stores[mkey] = self._new_store(model, nb, lb, layers, dtypes)
        return self._stores[mkey]

    def _new_store(self, model, nb: int, lb: int, layers, dtypes: tuple) -> _Store:
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"model.sampler StaticCacheSampler needs attn_implementation sdpa or eager, got {impl!r}")
        reason = static_cache_unsupported(model.config)
        if reason is not None:
            raise ValueError(f"model.sampler StaticCacheSampler cannot decode this model: {reason}; "
                             "use lit_covrl.sampling.KVCacheSampler")
        # keys and values in `kv_dtypes`: the dynamic cache's, float32 ones in the autocast dtype
        # under autocast (attention reads them in it: the same attention, a third less memory than
        # fp32 keys beside bf16 values). New states are cast on the way in (`_casting_update`).
        return _Store(keys=[dl.keys.new_zeros((nb, dl.keys.shape[1], lb, dl.keys.shape[3]), dtype=kd)
                            for dl, (kd, _) in zip(layers, dtypes)],
                      values=[dl.values.new_zeros((nb, dl.values.shape[1], lb, dl.values.shape[3]), dtype=vd)
                              for dl, (_, vd) in zip(layers, dtypes)])

    def _new_slot(self, model, store: _Store, nb: int, device: torch.device) -> _Slot:
        from transformers import StaticCache

        lb = store.length
        cache = StaticCache(config=model.config, max_cache_len=lb)
        if len(cache.layers) != len(store.keys):
            raise ValueError("model.sampler StaticCacheSampler: the model's cache layers differ from a static cache's")
        for st, k, v in zip(cache.layers, store.keys, store.values):
            st.lazy_initialization(k[:1, :, :1], v[:1, :, :1])  # sets the layer up (allocates one row)
            # the slot's layer is the leading nb rows of the model's cache (a view: same addresses)
            st.batch_size, st.keys, st.values = nb, k[:nb], v[:nb]
            torch._dynamo.mark_static_address(st.keys)
            torch._dynamo.mark_static_address(st.values)
            st.update = _casting_update(st)
        key_valid = torch.zeros(nb, lb, dtype=torch.bool, device=device)
        if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
            mask = key_valid[:, None, None, :]
        else:  # eager attention adds the mask to the scores
            mask = torch.zeros(nb, 1, 1, lb, dtype=torch.float32, device=device)
        return _Slot(store=store, cache=cache, tok=torch.zeros(nb, 1, dtype=torch.long, device=device),
                     pos=torch.zeros(nb, 1, dtype=torch.long, device=device), key_valid=key_valid, mask=mask,
                     lengths=[st.cumulative_length for st in cache.layers], cache_kw=_cache_kwarg(type(model)))

    def _cast_weights(self, model: nn.Module, device: torch.device) -> dict | None:
        """Under autocast to a lower precision: the model's fp32 Linear weights and biases copied into
        persistent tensors of that dtype (refreshed in place every rollout, so a captured graph keeps
        reading the same addresses). None without autocast or for sharded models."""
        from lit_covrl.sharding import is_sharded

        if not torch.is_autocast_enabled(device.type) or is_sharded(model):
            return None
        dtype = torch.get_autocast_dtype(device.type)
        entry = self._weights.get(id(model))
        if entry is None or entry[0] != dtype:
            params = {f"{name}.{k}" if name else k: p for name, m in model.named_modules() if isinstance(m, nn.Linear)
                      for k, p in m.named_parameters(recurse=False) if p.dtype == torch.float32}
            with torch.inference_mode(False):  # refreshed in place by every rollout, as the slot's tensors
                entry = (dtype, {k: torch.empty_like(p, dtype=dtype) for k, p in params.items()}, params)
            for t in entry[1].values():
                # plain tensors, unlike parameters, are inputs that a reduce-overhead graph would copy
                # into its own buffers at every replay (the whole model's weights per token); they are
                # refreshed in place, so their addresses are fixed
                torch._dynamo.mark_static_address(t)
            self._weights[id(model)] = entry
        for k, t in entry[1].items():
            t.copy_(entry[2][k])
        return entry[1]

    def _load_prompt(self, slot: _Slot, dyn, prompt_mask: Tensor, n: int, P: int, pad_token_id: int) -> None:
        """Copy the prefilled cache rows in, reset the mask, positions and write position."""
        for st, dl in zip(slot.cache.layers, dyn.layers):
            st.keys[:n, :, :P].copy_(dl.keys)
            st.values[:n, :, :P].copy_(dl.values)
        for length in slot.lengths:
            length.fill_(P)
        slot.key_valid.zero_()
        slot.key_valid[:n, :P].copy_(prompt_mask.bool())
        slot.key_valid[n:, 0] = True  # dummy rows attend to one key: no empty softmax
        slot.pos.zero_()
        slot.pos[:n].copy_(position_ids_from_mask(prompt_mask)[:, -1:] + 1)
        slot.tok.fill_(pad_token_id)

    def _forward(self, model, slot: _Slot, temperature: float, top_p: float):
        if slot.mask.dtype != torch.bool:  # eager attention: additive mask, refreshed from key_valid
            slot.mask.copy_(torch.where(slot.key_valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :])
        kwargs = dict(input_ids=slot.tok, attention_mask=slot.mask, position_ids=slot.pos, use_cache=True,
                      **{slot.cache_kw: slot.cache})
        if slot.weights:
            out = torch.func.functional_call(model, slot.weights, (), kwargs, tie_weights=False, strict=False)
        else:
            out = model(**kwargs)
        return token_distribution(out.logits[:, -1], temperature, top_p)

    def _step(self, model, slot: _Slot, mode: str, temperature: float, top_p: float):
        if mode == "none":
            return self._forward(model, slot, temperature, top_p)
        if mode == "compile":
            if slot.compiled is None:
                step = _own_code(lambda: self._forward(model, slot, temperature, top_p), self.captures)
                slot.compiled = torch.compile(step, mode="reduce-overhead", dynamic=False)
                self.captures += 1
            torch.compiler.cudagraph_mark_step_begin()
            return slot.compiled()
        if slot.graph is None:
            try:
                self._capture(model, slot, temperature, top_p)
            except RuntimeError as err:  # e.g. a model whose forward syncs with the host
                log.warning("StaticCacheSampler: CUDA graph capture failed (%s); decoding eagerly", err)
                self.capture_error = str(err)
                slot.graph = False
        if slot.graph is False:
            return self._forward(model, slot, temperature, top_p)
        slot.graph.replay()
        return slot.outputs

    def _capture(self, model, slot: _Slot, temperature: float, top_p: float) -> None:
        """Warm up on a side stream, capture one step, and restore the write position (the warm-up
        wrote the cache at it; capture itself runs nothing)."""
        device = slot.tok.device
        written = [length.clone() for length in slot.lengths]
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        # autocast's weight-cast cache must be off: cached casts would be freed after capture
        amp = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), amp:
            for _ in range(2):
                self._forward(model, slot, temperature, top_p)
                for length, w in zip(slot.lengths, written):
                    length.copy_(w)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), amp:
            slot.outputs = self._forward(model, slot, temperature, top_p)
        for length, w in zip(slot.lengths, written):
            length.copy_(w)
        slot.graph = graph
        self.captures += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _own_code(fn, k: int):
    """`fn` with a code object of its own. Dynamo keeps compiled graphs per code object and allows
    8 of them (`recompile_limit`): every slot compiling the same lambda shared that limit, and from
    the 9th slot (another temperature, batch bucket or a grown cache) decoding ran eagerly, ~5x
    slower, with only a log line."""
    code = fn.__code__.replace(co_name=f"decode_step_{k}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
