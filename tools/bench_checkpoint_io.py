"""Time one checkpoint save with Lightning's `TorchCheckpointIO` and with lit_covrl's
`AtomicCheckpointIO` (temporary file in the folder + fsync + rename), into the same folder.

    python tools/bench_checkpoint_io.py --mib 100 --repeats 5 --dir /tmp/ckbench

Prints the median seconds of each. The atomic one pays for the fsync (the data really reaches the
disk before the rename); the default one leaves that to the operating system's page cache.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import lit_covrl  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402

from lit_covrl.checkpointing import AtomicCheckpointIO  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, default=100, help="checkpoint size in MiB (fp32 tensors)")
    p.add_argument("--repeats", type=int, default=5, help="saves per IO (median reported)")
    p.add_argument("--dir", type=Path, default=None, help="checkpoint folder (default: a new temporary one)")
    args = p.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    n = args.mib * 2**20 // 4
    checkpoint = {"state_dict": {f"w{i}": torch.randn(n // 8) for i in range(8)}, "global_step": 1}
    for io in (TorchCheckpointIO(), AtomicCheckpointIO()):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            io.save_checkpoint(checkpoint, folder / "last.ckpt")
            times.append(time.perf_counter() - t)
        print(f"{type(io).__name__:20s} {args.mib} MiB: median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}) into {folder}")


if __name__ == "__main__":
    main()
