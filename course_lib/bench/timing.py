"""Timing that means something: warm-up, many repeats, the median; CUDA events on a GPU.

perf_counter around a CUDA call measures only the launch, because kernels run asynchronously:
on a GPU we record CUDA events on the stream and synchronise before reading them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from course_lib._validate import check_nonnegative_int, check_positive_int

__all__ = ["Timing", "time_fn", "peak_memory", "matmul_peak"]


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds: median, fastest and slowest of `repeats`."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int


def time_fn(
    fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 3, repeats: int = 10
) -> Timing:
    """Median wall time of fn() over `repeats` runs (at least one) after `warmup` runs (possibly none)."""
    check_positive_int("repeats", repeats)
    check_nonnegative_int("warmup", warmup)
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak bytes allocated on a CUDA device while fn() runs (None on the CPU, where torch does not track it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def matmul_peak(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    n: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> dict:
    """Measured matmul throughput of an (n, n) @ (n, n) product (2 n^3 FLOPs), as TFLOP/s.

    This is the ceiling that attention kernels are compared with ("fraction of the measured peak"),
    measured on this device in this dtype with the current TF32 setting, not a datasheet number.
    "tflops" uses the fastest repeat (a peak is the best the device did; on a shared CPU the median
    includes time slices lost to other processes); "tflops_median" uses the median.
    n defaults to 8192 on a GPU (large enough to saturate it) and 512 on a CPU.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 512)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    with torch.no_grad():
        timing = time_fn(lambda: a @ b, device=device, warmup=warmup, repeats=repeats)
    flops = 2 * n**3
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "flops": flops,
        "median_s": timing.median_s,
        "min_s": timing.min_s,
        "tflops": flops / timing.min_s / 1e12,
        "tflops_median": flops / timing.median_s / 1e12,
    }
