"""Convert a lit_covrl checkpoint into a Hugging Face folder: a thin wrapper over
`lit-covrl export` (lit_covrl.export), kept for source checkouts.

    python tools/export_hf.py runs/x/version_0/checkpoints/last.ckpt out/hf-model
"""
from __future__ import annotations

from lit_covrl.export import export, main, read_checkpoint

__all__ = ["export", "main", "read_checkpoint"]

if __name__ == "__main__":
    main()
