"""Device-side measurements of tools/bench_gpu.py: torch.profiler over one RL step and where its
time went (`profile_summary`), and the achieved bf16 matmul TFLOP/s that MFU is compared to."""
from __future__ import annotations

import time

import torch


def step_profiler(device: str):
    """torch.profiler over one RL step: host operators, and the device's kernels on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    return profile(activities=acts)


def profile_summary(prof, wall_s: float, device: str, top: int = 25) -> dict:
    """Where one profiled step's time went: its wall ms and the entries (operators, and on CUDA
    the kernels themselves, `kind` telling which) with the most own time on the device (CUDA) or
    the host (CPU). On CUDA, `device_busy_ms` sums the kernels' own time only (an operator's own
    device time is its kernels' again; kernels replayed from a CUDA graph belong to no operator)."""
    from torch.autograd import DeviceType

    def own(evt, kind):
        if kind == "cpu":
            return evt.self_cpu_time_total / 1e3
        return getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)) / 1e3

    kind = "cuda" if device == "cuda" else "cpu"
    events = list(prof.key_averages())
    is_kernel = lambda e: getattr(e, "device_type", DeviceType.CPU) == DeviceType.CUDA  # noqa: E731
    ranked = sorted(events, key=lambda e: own(e, kind), reverse=True)[:top]
    out = {"step_wall_ms": round(wall_s * 1e3, 1), "ranked_by": f"self {kind} ms",
           "top": [{"op": e.key, "kind": "kernel" if is_kernel(e) else "op", "calls": e.count,
                    "self_cpu_ms": round(own(e, "cpu"), 2),
                    **({"self_cuda_ms": round(own(e, "cuda"), 2)} if kind == "cuda" else {})} for e in ranked]}
    if kind == "cuda":
        out["device_busy_ms"] = round(sum(own(e, "cuda") for e in events if is_kernel(e)), 1)
    return out


def matmul_tflops(device: str) -> float | None:
    """Achieved bf16 TFLOP/s of a large square matmul: what 100% MFU is realistically compared to."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return round(2 * 8192**3 * reps / (time.perf_counter() - t0) / 1e12, 1)
