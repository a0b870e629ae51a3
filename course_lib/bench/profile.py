"""Where a step's time goes: torch.profiler around a few calls of each step, summarised per call.

    profile_steps({"course_lib": step_a, "plain_sdpa": step_b}, device="cuda")

A timing says *that* one step is slower than another; a profile says *where*: how much of a call is
the host's work (Python, torch's dispatcher, launching kernels: the operators' self CPU time), how much
is the GPU's (the kernels' self device time), how many kernels a call launches, and which operators
take the most. On a GPU a step whose host time per call exceeds its device time is bound by the host:
the GPU waits for launches, and fewer launches (a CUDA graph, fused operators) are what help, not
faster kernels. "wall_us_per_call" is the profiled loop's time per call; "host_ops_us_per_call" the
operators' own host time, so the Python between operators is roughly the difference when the host
is the bound; "device_us_per_call" the kernels' time. The profiler adds its own overhead to the
host's time, the same for every step profiled together: compare steps with each other, not with an
unprofiled timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch.profiler import ProfilerActivity, profile

from course_lib._validate import check_nonnegative_int, check_positive_int

__all__ = ["profile_steps"]


def _summary(events, calls: int, top: int, wall_s: float) -> dict:
    """Per call: wall, host-operator and kernel microseconds, kernels launched, and the top operators."""
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    rows = sorted(ops, key=lambda e: (e.self_device_time_total, e.self_cpu_time_total), reverse=True)[:top]
    device_us = (sum(e.device_time_total for e in kernels) if kernels
                 else sum(e.self_device_time_total for e in ops))
    return {
        "calls": calls,
        "wall_us_per_call": wall_s * 1e6 / calls,  # the profiled loop, synchronised at its end
        "host_ops_us_per_call": sum(e.self_cpu_time_total for e in ops) / calls,  # Python between ops: not in it
        "device_us_per_call": device_us / calls,  # the kernels' own time
        "kernels_per_call": sum(e.count for e in kernels) / calls,
        "top_ops": [{"op": e.key, "calls_per_step": e.count / calls,
                     "self_host_us_per_step": e.self_cpu_time_total / calls,
                     "self_device_us_per_step": e.self_device_time_total / calls} for e in rows],
    }


def profile_steps(fns: Mapping[str, Callable[[], object]], *, device: torch.device | str, calls: int = 5,
                  warmup: int = 1, top: int = 12) -> dict[str, dict]:
    """Profile `calls` calls of each fn (after `warmup` unprofiled ones); -> per name, the summary above.

    On a CUDA device the profiler records the kernels too (device time); on the CPU device time is 0
    and only the host's side is there.
    """
    if not isinstance(fns, Mapping) or not fns or not all(callable(f) for f in fns.values()):
        raise TypeError("fns must be a non-empty mapping of names to functions taking no arguments")
    check_positive_int("calls", calls)
    check_nonnegative_int("warmup", warmup)
    check_positive_int("top", top)
    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall_s = time.perf_counter() - start
        out[name] = _summary(prof.key_averages(), calls, top, wall_s)
    return out
