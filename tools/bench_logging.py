"""Per-step cost of logging in a quickstart run: time spent in `GRPOModule.log_step` and in
Lightning's own per-step logger update, next to the whole `training_step` (medians after warm-up).

    python tools/bench_logging.py [--steps 40] [--warmup 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


@contextmanager
def _timed(cls, name: str, out: list[float]):
    """Time every call of `cls.name` into `out` inside the block; the method is restored after."""
    orig = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        result = orig(self, *args, **kwargs)
        out.append(time.perf_counter() - t0)
        return result

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, orig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--model", default=bench.QUICKSTART)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    bench._quiet()
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    from lit_covrl.module import GRPOModule

    times: dict[str, list[float]] = {"training_step": [], "log_step": [], "lightning_step_logging": []}
    with (_timed(GRPOModule, "training_step", times["training_step"]),
          _timed(GRPOModule, "log_step", times["log_step"]),
          _timed(_LoggerConnector, "update_train_step_metrics", times["lightning_step_logging"]),
          tempfile.TemporaryDirectory() as tmp):
        bench._fit(bench.make_module(args.model), bench.make_data(), args.steps, [], tmp)
    res = {f"{k}_ms": round(1000 * statistics.median(v[args.warmup:]), 2) for k, v in times.items()}
    print(res)
    return res


if __name__ == "__main__":
    main()
