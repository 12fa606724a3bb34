"""Model specs: what `from_pretrained` loads for a setting's value (a hub name, a local folder, a
shipped alias, a `.gguf` file or a `package:` spec), and whether a model's own code may run
(`model.trust_remote_code`: `remote_code`, read by every model, config and tokenizer load)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from lit_covrl import gguf

# model.trust_remote_code of the loads in progress (set by `remote_code`); False: never ask
_TRUSTED: ContextVar[bool] = ContextVar("lit_covrl_trust_remote_code", default=False)


@contextlib.contextmanager
def remote_code(trusted: bool) -> Iterator[None]:
    """Loads inside run a model's own code (its `auto_map` modeling files) only if `trusted`."""
    token = _TRUSTED.set(bool(trusted))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def remote_code_kwargs() -> dict:
    """`trust_remote_code` for a `from_pretrained` / `from_config`: always given, so that transformers
    never asks on stdin (under DDP, every rank would) and refuses custom code unless trusted."""
    return {"trust_remote_code": _TRUSTED.get()}


BUILTIN_MODELS = {"lit_covrl:tiny-arith": Path(__file__).parent / "assets" / "tiny-arith",
                  "lit_covrl:tiny-reasoning": Path(__file__).parent / "assets" / "tiny-reasoning"}


def resolve_model_path(name_or_path: str) -> str:
    """Map a model spec to what `from_pretrained` loads.

    - `lit_covrl:<name>` -> the shipped folder;
    - a `.gguf` file or a `package:` spec of one -> its converted cache folder (converted on first
      use), or the `.gguf` path itself when the cache is off (`LIT_COVRL_GGUF_CACHE=0`) or unwritable;
    - `package:<package>/<folder>` -> that folder inside the installed package;
    - anything else (hub name, local folder) unchanged; a spec that can only be a path (it starts
      with /, ./, ../ or ~, or has more than one /: a hub id has one) and does not exist is an
      OSError saying so (the hub client's own words were "Repo id must be in the form ...").
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
    a_path = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if a_path and not Path(name_or_path).expanduser().exists():
        raise OSError(f"no such model folder: {name_or_path}")
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def absolute_local_path(spec: str | None) -> str | None:
    """A relative spec naming an existing local folder or file as its absolute path (a checkpoint's
    `model.model` read from another directory); other specs unchanged."""
    if spec is None or spec.startswith(("lit_covrl:", gguf.PACKAGE_PREFIX)) or os.path.isabs(spec):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _pretrained_args(name_or_path: str) -> tuple[str, dict]:
    """(first argument, extra kwargs) of `from_pretrained` for a spec: a resolved `.gguf` file is
    loaded directly as `from_pretrained(its folder, gguf_file=its name)`."""
    path = resolve_model_path(name_or_path)
    if gguf.is_gguf(path):
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}
