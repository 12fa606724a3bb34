"""`lit-covrl export`: convert a lit_covrl checkpoint into a plain Hugging Face folder (config,
weights, tokenizer), usable with `AutoModelForCausalLM.from_pretrained` / vLLM / anything else.

    lit-covrl export runs/x/version_0/checkpoints/last.ckpt out/hf-model
    lit-covrl export runs/x/.../last.ckpt out/hf-model --dtype bfloat16 --base Qwen/Qwen2.5-7B

(`python tools/export_hf.py ...` does the same from a source checkout.)

Accepts both kinds of checkpoint Lightning writes:
- a single `.ckpt` file (single device, DDP, or FSDP2 with save_distributed_checkpoint: false);
- a sharded folder (FSDP2 default: torch.distributed.checkpoint shards + `meta.pt`), merged
  here on one CPU process (needs host memory for the full model's weights, not its optimizer
  state; no GPU, no process group).

The architecture and tokenizer come from the checkpoint's hyperparameters (`model.model`,
`model.tokenizer`) unless `--base` names another hub name / folder. Only `policy.*` weights are
exported (the frozen reference model is never in the checkpoint; optimizer state is dropped).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

PREFIX = "policy."


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(policy state dict without the `policy.` prefix, hyperparameters) of a file or sharded folder."""
    path = Path(path)
    if path.is_dir():
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False) if (path / "meta.pt").exists() else {}
        state, hparams = read_sharded_policy(path), meta.get("hyper_parameters", {})
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state, hparams = ckpt["state_dict"], ckpt.get("hyper_parameters", {})
    weights = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not weights:
        raise ValueError(f"{path}: no `{PREFIX}*` weights found (keys: {sorted(state)[:5]}...)")
    return weights, dict(hparams)


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


def export(checkpoint: str | Path, out: str | Path, *, base: str | None = None, dtype: str | None = None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_covrl.policy import load_tokenizer, resolve_dtype, resolve_model_path

    weights, hp = read_checkpoint(checkpoint)
    base = base or hp.get("model")
    if base is None:
        raise ValueError("the checkpoint names no model: pass --base <hub name or folder>")
    config = AutoConfig.from_pretrained(resolve_model_path(base))
    torch_dtype = resolve_dtype(dtype or hp.get("dtype", "float32"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in weights.items()}, strict=False, assign=True)
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise ValueError(f"weights missing from the checkpoint: {sorted(set(missing) - tied)[:10]}")
    if tied:
        model.tie_weights()
    model.config.use_cache = True
    out = Path(out)
    model.save_pretrained(out)
    load_tokenizer(hp.get("tokenizer") or base).save_pretrained(out)
    return out


def main(args: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lit-covrl export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint folder")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--base", default=None, help="model the architecture/tokenizer come from (default: from the checkpoint)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the training dtype)")
    a = p.parse_args(args)
    print(export(a.checkpoint, a.out, base=a.base, dtype=a.dtype))


if __name__ == "__main__":
    main()
