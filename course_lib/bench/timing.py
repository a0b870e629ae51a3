"""Timing that means something: warm-up, many rounds, medians and quartiles; CUDA events on a GPU.

perf_counter around a CUDA call measures only the launch, because kernels run asynchronously:
on a GPU the time is read from CUDA events recorded on the stream.

- `compare(fns, device=...)`: the way the benchmarks time things. Every function is timed in the
  same interleaved rounds (the order rotates each round, so drift of the machine, clocks and
  temperature falls on all of them alike), and each gets two figures per round:
  device time (one event pair around `calls` back-to-back calls, divided by `calls`) and wall time
  (one call followed by a synchronize, what a Python loop that waits for each result sees).
  It returns one `DeviceTiming` per function: medians and quartiles over the rounds.
- `ratio_with_spread(a, b)`: a ratio of two timings with a range that says how much noise it carries.
- `time_fn(fn)`: the older single-function timer (one call per repeat, dispatch included): the
  CPU notebooks use it, where there is no difference.
- `peak_memory(fn, device)`, `matmul_peak(device, dtype)`: peak allocated bytes; measured matmul TFLOP/s.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from course_lib._validate import check_bool, check_nonnegative_int, check_positive_int

__all__ = ["Timing", "DeviceTiming", "compare", "ratio_with_spread", "time_fn", "peak_memory", "matmul_peak"]

DEFAULT_L2_BYTES = 256 * 2**20  # flush size where the device does not report its L2 size
SPIN_MIN_S = 50e-6  # the shortest hold of the stream before a timed group (see _cuda_group)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds: median, fastest and slowest of `repeats`."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int


@dataclass(frozen=True)
class DeviceTiming:
    """One function's times from `compare`, per call, in seconds.

    device_s: median over rounds of (time of `calls` back-to-back calls between two CUDA events) / calls
              (on the CPU, perf_counter around the calls: the CPU computes synchronously);
    device_q1_s, device_q3_s: the first and third quartiles of that per-round figure;
    wall_s, wall_q1_s, wall_q3_s: the same for one call's wall time with a synchronize after it
              (includes the host's dispatch work: what a loop that waits for each result sees);
    rounds, calls: how many rounds, and calls per timed group; method: how it was timed, in words.
    """

    device_s: float
    device_q1_s: float
    device_q3_s: float
    wall_s: float
    wall_q1_s: float
    wall_q3_s: float
    rounds: int
    calls: int
    method: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of values; one value is its own quartiles. Quartiles by linear interpolation
    between order statistics (statistics.quantiles, method "inclusive": q1 of [1, 2, 3, 4, 5] is 2)."""
    if not values:
        raise ValueError("values must hold at least one number; got an empty list")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def ratio_with_spread(a: DeviceTiming | Mapping, b: DeviceTiming | Mapping, *, key: str = "device") -> dict:
    """a / b (e.g. time of ours / time of the baseline) with a conservative range from the quartiles.

    "ratio" is median(a) / median(b). The range, [a.q1 / b.q3, a.q3 / b.q1], pairs the fast end of one
    with the slow end of the other: if both medians could sit anywhere between their quartiles, the
    ratio lies in it. It is wider than a confidence interval for the ratio (the two spreads add): a
    bound outside the range is on one side of the ratio whatever the noise did; a range that straddles
    a bound says this run cannot tell on which side the ratio lies. key: "device" or "wall". a and b
    may be `DeviceTiming`s or their `to_dict()` (as stored in a record).
    """
    if key not in ("device", "wall"):
        raise ValueError(f"key must be 'device' or 'wall'; got {key!r}")
    da, db = (t.to_dict() if isinstance(t, DeviceTiming) else dict(t) for t in (a, b))
    for name, d in (("a", da), ("b", db)):
        missing = {f"{key}_s", f"{key}_q1_s", f"{key}_q3_s"} - set(d)
        if missing:
            raise ValueError(f"{name} must carry {key}_s and its quartiles; missing {sorted(missing)}")
        if not d[f"{key}_q1_s"] > 0:
            raise ValueError(f"{name} must have positive times; got {key}_q1_s={d[f'{key}_q1_s']!r}")
    return {"ratio": da[f"{key}_s"] / db[f"{key}_s"],
            "low": da[f"{key}_q1_s"] / db[f"{key}_q3_s"],
            "high": da[f"{key}_q3_s"] / db[f"{key}_q1_s"],
            "key": key,
            "method": "ratio of medians; range [a.q1 / b.q3, a.q3 / b.q1] over the rounds"}


# ----------------------------------------------------------------------------- CUDA helpers
def _l2_bytes(device: torch.device) -> int:
    """The device's L2 size in bytes (torch reports it as L2_cache_size where it can), else 256 MiB."""
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return int(size) if size > 0 else DEFAULT_L2_BYTES


def _make_l2_flusher(device: torch.device) -> Callable[[], None]:
    """A function that writes twice the L2 size in bytes on the device's current stream (asynchronously):
    whatever the previous work left in L2 is evicted."""
    buffer = torch.empty(2 * _l2_bytes(device), dtype=torch.uint8, device=device)

    def flush() -> None:
        buffer.fill_(1)  # a write of every byte: a read could be served without evicting

    return flush


def _make_spinner(device: torch.device) -> Callable[[float], None]:
    """A function that keeps the device's stream busy for about `seconds` (torch.cuda._sleep spins for a
    number of GPU cycles; the cycles per second are measured once here). Without torch.cuda._sleep it
    does nothing (the timing method then says so)."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return lambda seconds: None
    sleep(1000)  # the first launch loads the kernel's module: keep that out of the calibration
    torch.cuda.synchronize(device)
    cycles = 10_000_000  # a few milliseconds: long beside the events' own resolution
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sleep(cycles)
    end.record()
    end.synchronize()
    per_second = cycles / max(start.elapsed_time(end) / 1e3, 1e-9)

    def spin(seconds: float) -> None:
        sleep(max(1, int(seconds * per_second)))

    return spin


def _cuda_group(fn: Callable[[], object], calls: int, device: torch.device, flush: Callable[[], None] | None,
                spin: Callable[[float], None], hold_s: float) -> float:
    """Seconds per call of `calls` back-to-back calls of fn between one pair of CUDA events.

    Order on the stream: [L2 flush] -> spin -> start event -> calls x fn -> end event; then one synchronize.
    The flush lies before the start event, so its time is not measured. The spin keeps the stream busy
    for hold_s (about twice the host's dispatch time of one call) while the host enqueues the first
    call: the start event fires when the spin ends, with that call already queued, so the host's
    dispatch of the first call is not in the window (an event recorded on an idle stream fires at
    once and would time the dispatch). What remains in the window: the device's work for the calls,
    and any gap in which the device waited for the host to enqueue the next call. A call shorter
    than its dispatch leaves such gaps, and then device time is close to wall time: that is the
    finding (the call is bound by the host), not an error of the method.
    """
    torch.cuda.synchronize(device)
    if flush is not None:
        flush()
    spin(hold_s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _cuda_wall(fn: Callable[[], object], device: torch.device, flush: Callable[[], None] | None) -> float:
    """Seconds of one call with a synchronize after it, from an idle device (and a flushed L2)."""
    if flush is not None:
        flush()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _dispatch_s(fn: Callable[[], object], device: torch.device) -> float:
    """The host's time to enqueue one call (perf_counter around it, no synchronize), from an idle device."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    torch.cuda.synchronize(device)
    return seconds


# ----------------------------------------------------------------------------- CPU helpers
def _cpu_group(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of `calls` calls on the CPU (synchronous: one call's wall time is calls=1)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


# ----------------------------------------------------------------------------- compare
def _check_fns(fns: object) -> dict[str, Callable[[], object]]:
    if not isinstance(fns, Mapping):
        raise TypeError(f"fns must be a mapping of name -> function of no arguments; got {type(fns).__name__}")
    if not fns:
        raise ValueError("fns must hold at least one function; got an empty mapping")
    for name, fn in fns.items():
        if not isinstance(name, str):
            raise TypeError(f"fns must be keyed by names (str); got key {name!r} ({type(name).__name__})")
        if not callable(fn):
            raise TypeError(f"fns[{name!r}] must be callable with no arguments; got {type(fn).__name__}")
    return dict(fns)


def compare(fns: Mapping[str, Callable[[], object]], *, device: torch.device | str, warmup: int = 3,
            rounds: int = 10, calls: int = 10, flush_l2: bool = False) -> dict[str, DeviceTiming]:
    """Time every fn in interleaved rounds (rotating order each round), device time and wall time.

    After `warmup` calls of each fn, each of `rounds` rounds visits every fn once, in an order that
    rotates by one each round (round r starts with the r-th name), and takes for it:
    - device time: on CUDA, `calls` back-to-back calls between one pair of CUDA events, the stream
      held busy by a short spin while the host enqueues the first call (see `_cuda_group`: launch
      gaps between calls stay in the window; the host's dispatch of the first call does not);
      on the CPU, perf_counter around the `calls` calls (the CPU computes synchronously);
    - wall time: one call, from an idle device, followed by a synchronize (perf_counter).
    flush_l2=True (CUDA only) writes twice the L2 size before each timed group and before each wall
    call, outside the timed window, so no function finds what the previous one left in L2; within a
    group only the first call starts cold (the others may find their own inputs in L2, which
    matters only when the working set is smaller than L2).
    Returns {name: DeviceTiming}: medians and quartiles over the rounds, per call.
    """
    fns_ = _check_fns(fns)
    rounds = check_positive_int("rounds", rounds)
    calls = check_positive_int("calls", calls)
    warmup = check_nonnegative_int("warmup", warmup)
    check_bool("flush_l2", flush_l2)
    device = torch.device(device)
    names = list(fns_)
    cuda = device.type == "cuda"
    for name in names:
        for _ in range(warmup):
            fns_[name]()
    if cuda:
        flush = _make_l2_flusher(device) if flush_l2 else None
        spin = _make_spinner(device)
        # hold the stream for twice the host's dispatch of one call (measured now, warm), at least SPIN_MIN_S
        hold = {name: max(SPIN_MIN_S, 2 * _dispatch_s(fns_[name], device)) for name in names}
        spun = "torch.cuda._sleep" if getattr(torch.cuda, "_sleep", None) is not None else "nothing (no _sleep)"
        method = (f"cuda events around {calls} back-to-back calls, the stream held by {spun} while the first call "
                  f"is enqueued{', L2 flushed before each group' if flush_l2 else ''}; wall: one call + synchronize; "
                  f"{rounds} interleaved rounds, rotating order")
    else:
        flush, spin, hold = None, lambda seconds: None, {}
        method = (f"perf_counter around {calls} back-to-back calls ({device.type}: synchronous); wall: one call; "
                  f"{rounds} interleaved rounds, rotating order")
    device_times: dict[str, list[float]] = {name: [] for name in names}
    wall_times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns_[name]
            if cuda:
                device_times[name].append(_cuda_group(fn, calls, device, flush, spin, hold[name]))
                wall_times[name].append(_cuda_wall(fn, device, flush))
            else:
                device_times[name].append(_cpu_group(fn, calls))
                wall_times[name].append(_cpu_group(fn, 1))
    results = {}
    for name in names:
        d_q1, d_med, d_q3 = quartiles(device_times[name])
        w_q1, w_med, w_q3 = quartiles(wall_times[name])
        results[name] = DeviceTiming(device_s=d_med, device_q1_s=d_q1, device_q3_s=d_q3, wall_s=w_med,
                                     wall_q1_s=w_q1, wall_q3_s=w_q3, rounds=rounds, calls=calls, method=method)
    return results


# ----------------------------------------------------------------------------- the older timer
def time_fn(
    fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 3, repeats: int = 10
) -> Timing:
    """Median time of fn() over `repeats` runs (at least one) after `warmup` runs (possibly none).

    Each repeat is ONE call. On the CPU, perf_counter around it. On CUDA, a start event recorded on an
    idle stream, the call, an end event, a synchronize: the window includes the host's dispatch work
    for the call (for a kernel of tens of microseconds, a large share). The GPU benchmarks use
    `compare` (device time of back-to-back calls); this stays for CPU timings and for calls long
    enough that dispatch does not matter (a large matmul).
    """
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
    n defaults to 8192 on a GPU (large enough to saturate it, and long enough that the dispatch inside
    `time_fn`'s window is a small share of it) and 512 on a CPU.
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
