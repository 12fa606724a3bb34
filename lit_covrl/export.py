"""`lit-covrl export`: convert a lit_covrl checkpoint into a plain Hugging Face folder (config,
weights, generation config, tokenizer), usable with `AutoModelForCausalLM.from_pretrained` / vLLM
/ anything else.

    lit-covrl export runs/x/version_0/checkpoints/last.ckpt out/hf-model
    lit-covrl export runs/x/.../last.ckpt out/hf-model --dtype bfloat16 --base Qwen/Qwen2.5-7B

(`python tools/export_hf.py ...` does the same from a source checkout.)

Accepts both kinds of checkpoint Lightning writes:
- a single `.ckpt` file (single device, DDP, or FSDP2 with save_distributed_checkpoint: false);
- a sharded folder (FSDP2 default: torch.distributed.checkpoint shards + `meta.pt`), merged
  here on one CPU process (needs host memory for the full model's weights, not its optimizer
  state; no GPU, no process group).

The architecture, generation config and tokenizer come from the checkpoint's hyperparameters
(`model.model`, `model.tokenizer`) unless `--base` names another hub name / folder / GGUF spec,
loaded as training loads them. The tokenizer is saved as the base has it (not with the left padding
and pad token training sets). Only `policy.*` weights are exported (the frozen reference model is
never in the checkpoint; optimizer state is dropped), and they must match the architecture exactly:
a weight missing from the checkpoint, or one the architecture lacks, is an error.

OUT must not exist, or be an empty folder; `--force` replaces whatever is there. The folder is
written under a temporary name next to OUT and moved into place when complete, so a failed export
leaves OUT as it was.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from lit_covrl.errors import debugging, exit_with

PREFIX = "policy."


# ----------------------------------------------------------------------------- reading checkpoints


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(policy state dict without the `policy.` prefix, hyperparameters) of a file or sharded folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise ValueError(f"{path} is a folder but not a sharded checkpoint (no .metadata file in it)")
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False) if (path / "meta.pt").exists() else {}
        state, hparams = read_sharded_policy(path), meta.get("hyper_parameters", {})
    elif path.is_file():
        ckpt = _load_checkpoint_file(path)
        state, hparams = ckpt["state_dict"], ckpt.get("hyper_parameters", {})
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint (expected a .ckpt file or a sharded checkpoint folder)")
    weights = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not weights:
        raise ValueError(f"{path}: no `{PREFIX}*` weights found (keys: {sorted(state)[:5]}...)")
    return weights, dict(hparams)


def _load_checkpoint_file(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a checkpoint file ({err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no `state_dict` in it)")
    return ckpt


def read_sharded_policy(path: Path) -> dict[str, torch.Tensor]:
    """The `policy.*` tensors of a sharded (torch.distributed.checkpoint) folder, merged in this
    process: only they are read (not the optimizer state, ~2x the weights with AdamW), straight
    into memory, with no merged copy on disk."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    entries = reader.read_metadata().state_dict_metadata
    prefix = "state_dict."  # Lightning saves {"state_dict": {...}, "optimizer_0": ...}, flattened
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
              if k.startswith(prefix + PREFIX) and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    return {k[len(prefix):]: v for k, v in wanted.items()}


# ----------------------------------------------------------------------------- the base model


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], dtype: torch.dtype, base: str) -> None:
    """Assign the checkpoint's weights to `model` (built on the meta device). ValueError when they
    do not match its architecture exactly: weights it lacks (a checkpoint of a bigger model than
    `base`), weights the checkpoint lacks, or other shapes."""
    try:
        _, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False, assign=True)
    except RuntimeError as err:  # size mismatches
        raise ValueError(f"the checkpoint's weights do not fit the architecture of {base!r}: {err}") from err
    if unexpected:
        raise ValueError(f"the checkpoint has {len(unexpected)} weight(s) that the architecture of {base!r} lacks, "
                         f"e.g. {sorted(unexpected)[:5]} (is --base the model that was trained?)")
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = {k for k, v in model.state_dict().items() if v.is_meta} - tied
    if missing:
        raise ValueError(f"weights missing from the checkpoint for the architecture of {base!r}: {sorted(missing)[:10]}")
    if tied:
        model.tie_weights()


def build_model(base: str, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """The architecture of `base` (loaded as training loads it) holding `weights`, with the base's
    own generation config (EOS ids, sampling defaults) when it has one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_covrl.policy import _pretrained_args, remote_code_kwargs

    path, kwargs = _pretrained_args(base)
    config = AutoConfig.from_pretrained(path, **kwargs, **remote_code_kwargs())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **remote_code_kwargs())
    load_weights(model, weights, dtype, base)
    model.config.use_cache = True
    generation = base_generation_config(path, kwargs)
    if generation is not None:
        model.generation_config = generation
    return model


def base_generation_config(path: str, kwargs: dict):
    """The base's `generation_config.json`, or None: it has none, or it is a GGUF file (whose
    generation config is the one `from_config` derives, as in the GGUF cache)."""
    from transformers import GenerationConfig

    if kwargs:
        return None
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def base_tokenizer(spec: str):
    """The tokenizer of `spec` as the base has it: training's `load_tokenizer` also forces left
    padding and a pad token, which are not the model's to keep."""
    from transformers import AutoTokenizer

    from lit_covrl.policy import _as_saved, _pretrained_args, remote_code_kwargs

    path, kwargs = _pretrained_args(spec)
    tok = AutoTokenizer.from_pretrained(path, **kwargs, **remote_code_kwargs())
    return tok if kwargs else _as_saved(tok, path)


# ----------------------------------------------------------------------------- the output folder


def check_out(out: str | Path, checkpoint: str | Path, force: bool) -> Path:
    """`out` as a Path; ValueError if something is there (a file, a non-empty folder) and not
    `force`, or if it holds the checkpoint itself."""
    out = Path(os.path.realpath(out)) if os.path.islink(out) else Path(out)  # written through a link, not over it
    if Path(checkpoint).resolve().is_relative_to(out.resolve()):
        raise ValueError(f"{out} is (or holds) the checkpoint being exported: choose another output path")
    if force or not os.path.lexists(out):
        return out
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder (--force replaces it)")
    if any(out.iterdir()):
        raise ValueError(f"{out} is not empty (--force replaces it)")
    return out


def write_folder(out: Path, save) -> Path:
    """`save(folder)` into a temporary sibling of `out`, then moved into place (replacing what is
    at `out`): a failure leaves `out` as it was and no partial folder behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save(tmp)
        _ordinary_modes(tmp)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _ordinary_modes(folder: Path) -> None:
    """The modes of a folder and files made by hand (umask applied): mkdtemp makes the folder
    private, and safetensors writes its weights file owner-only (0600), which another user of a
    shared cluster (a vLLM server, a teammate) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`; whatever was at `out` is moved aside first and deleted after."""
    if not os.path.lexists(out):
        os.replace(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, aside / "old")
        try:
            os.replace(new, out)
        except OSError:
            os.replace(aside / "old", out)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------- entry points


def export(checkpoint: str | Path, out: str | Path, *, base: str | None = None, dtype: str | None = None,
           force: bool = False) -> Path:
    from lit_covrl.model_specs import remote_code
    from lit_covrl.policy import resolve_dtype

    if dtype is not None:
        resolve_dtype(dtype, "--dtype")  # a bad name fails before the checkpoint is read
    out = check_out(out, checkpoint, force)
    weights, hp = read_checkpoint(checkpoint)
    base = base or hp.get("model")
    if base is None:
        raise ValueError("the checkpoint names no model: pass --base <hub name or folder>")
    try:
        with remote_code(bool(hp.get("trust_remote_code", False))):  # the fit's model.trust_remote_code
            model = build_model(base, weights, resolve_dtype(dtype or hp.get("dtype", "float32")))
            tokenizer = base_tokenizer(hp.get("tokenizer") or base)
    except OSError as err:  # e.g. a folder named relative to where the fit ran, or one since moved
        named = " (the checkpoint's model.model)" if base == hp.get("model") else ""
        raise OSError(f"the base model {base!r}{named} could not be loaded: {' '.join(str(err).split())}; "
                      "pass --base <hub name or folder>") from err
    except ValueError as err:  # custom modeling code, not trusted by the fit (model.trust_remote_code)
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"the base model {base!r} has its own modeling code, which the checkpoint's fit did not "
                         "trust (model.trust_remote_code: false)") from err
    # generate() on the export stops where training's rollouts stopped: at every end-of-sequence id
    # of the model's generation config and of the tokenizer (model.tokenizer may differ from the base's)
    from lit_covrl.stopping import eos_token_ids

    eos = eos_token_ids(model, tokenizer)
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(out, save)


def main(args: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lit-covrl export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint folder")
    p.add_argument("out", help="output folder (created; must not exist or be empty, unless --force)")
    p.add_argument("--base", default=None, help="model the architecture/tokenizer come from (default: from the checkpoint)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the training dtype)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (file or folder)")
    a = p.parse_args(args)
    try:
        out = export(a.checkpoint, a.out, base=a.base, dtype=a.dtype, force=a.force)
    except (ValueError, OSError, ImportError) as err:
        if debugging():
            raise
        exit_with(err)
    print(out)


if __name__ == "__main__":
    main()
