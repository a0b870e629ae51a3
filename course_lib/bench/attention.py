"""Attention benchmark suite: naive vs course_lib vs each SDPA backend vs whole MHA modules.

    python -m course_lib.bench attention                       # GPU: T = 512..16384, d_head 64,128, bf16
    python -m course_lib.bench attention --seq 256,512 --d-head 64 --dtype float32 --device cpu \\
        --json out.json --plot out.png

Attention core (q, k, v of shape (B, H, T, d_head) -> out), timed forward and forward+backward:
- naive        softmax(q k^T / sqrt(d)) v in the input dtype: builds the (T, T) score matrix
- course_lib   `course_lib.attention.scaled_dot_product_attention` (its fused fast path)
- sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math
               `F.scaled_dot_product_attention` restricted to one backend with
               `torch.nn.attention.sdpa_kernel`; a backend that refuses the inputs is recorded
               as "unsupported" with the reason, never dropped silently
- triton       the course's Triton kernel, `course_lib.kernels.flash_attention` (GPU only: on a
               CPU it runs in Triton's interpreter, whose times say nothing, so it is skipped); on
               compute capability 9.x its forward is the Hopper kernel where that applies
- triton_portable  the same with kernel="portable": the portable forward kernel on any GPU (not in
               CORE_IMPLS; asked for by name, to set the two forward kernels side by side)
Modules (x of shape (B, T, H * d_head) -> out, forward+backward): course_lib.MultiHeadAttention,
a plain SDPA module and nn.MultiheadAttention, timed by `course_lib.bench.mha.run` (interleaved).

Per shape the inputs are drawn once, on the device; the implementations of each (shape, causal,
pass) are timed together in interleaved rounds (`course_lib.bench.timing.compare`): a row's time
("median_s") is the median over the rounds of the device time of back-to-back calls, per call
(CUDA events on a GPU, perf_counter on the CPU), with its quartiles and the wall time of one call
beside it. FLOPs: 4 B H T S d_head forward (two matmuls), halved when causal;
backward = 2.5 x forward (the FlashAttention papers' convention, used for every implementation so
that TFLOP/s compare like with like). The course's Triton backward *executes* 3.5 x forward (it
recomputes the scores and dP in both of its kernels, seven matmuls to the forward's two): its
records also carry "executed_flops". TFLOP/s is divided by the matmul peak *measured* on the same device
in the same dtype. Peak memory is measured on CUDA (torch does not track CPU allocations: there
the JSON holds None, plus the analytic size of the T x S score matrix). On CUDA a run that
exhausts memory is recorded as "oom"; on the CPU cases whose score matrix would exceed
--cpu-max-gib are skipped rather than risking the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from course_lib._validate import check_nonnegative_int, check_positive_int
from course_lib.attention import naive_attention, scaled_dot_product_attention
from course_lib.bench import write_record
from course_lib.bench.timing import (
    DEFAULT_L2_BYTES,
    DeviceTiming,
    compare,
    matmul_peak,
    peak_memory,
    ratio_with_spread,
)
from course_lib.cost.flops import attention_flops, module_flops
from course_lib.experiments.precision import attention_error_table
from course_lib.tools.cli import (
    choice_list,
    int_list,
    nonnegative_int,
    output_file,
    positive_finite_float,
    positive_int,
    torch_device,
)
from course_lib.tools.device import device_facts, sdpa_with_backend, tensor_core_settings
from course_lib.tools.paths import RecordsNotFoundError, records_dir

__all__ = [
    "CORE_IMPLS",
    "MODULE_IMPLS",
    "run_suite",
    "plot_results",
    "recorded_runs",
    "versus_best_sdpa",
    "main",
]

CORE_IMPLS = ("naive", "course_lib", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "triton")
TRITON_IMPLS = ("triton", "triton_portable")  # flash_attention with kernel "auto" and "portable"
IMPLS = (*CORE_IMPLS, "triton_portable")  # every name the suite knows
MODULE_IMPLS = ("course_lib", "plain_sdpa", "torch_mha")  # the names course_lib.bench.mha uses
PASSES = ("fwd", "fwd+bwd")
# what a timed row carries from `compare` (per call, seconds; medians and quartiles over the rounds)
TIMING_KEYS = ("device_s", "device_q1_s", "device_q3_s", "wall_s", "wall_q1_s", "wall_q3_s", "rounds", "calls")
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- FLOPs
# ----------------------------------------------------------------------------- implementations
def _core_fn(impl: str, is_causal: bool) -> Callable:
    if impl == "naive":
        return lambda q, k, v: naive_attention(q, k, v, is_causal)
    if impl == "course_lib":
        return lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    if impl in TRITON_IMPLS:
        from course_lib.kernels import flash_attention  # lazy: triton is optional

        kernel = "auto" if impl == "triton" else "portable"
        return lambda q, k, v: flash_attention(q, k, v, is_causal=is_causal, kernel=kernel)
    backend = impl.removeprefix("sdpa_")
    return lambda q, k, v: sdpa_with_backend(backend, q, k, v, is_causal=is_causal)


def _step(fn: Callable, q, k, v, grad_out, pass_: str) -> Callable[[], None]:
    if pass_ == "fwd":
        def forward() -> None:
            with torch.no_grad():
                fn(q, k, v)
        return forward

    def forward_backward() -> None:
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad_out)  # no .grad accumulation between repeats

    return forward_backward


def _materialises_scores(impl: str) -> bool:
    return impl in ("naive", "sdpa_math")


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,)


def triton_executed_flops(B: int, H: int, T: int, S: int, d_head: int, *, causal: bool, pass_: str) -> float:
    """FLOPs the course's Triton kernel really executes: 2 matmuls forward, 7 backward (4 in the dK/dV
    kernel: S, P^T dO, dP, dS^T Q; 3 in the dQ kernel: S, dP, dS K), each 2 T S d per head."""
    forward = attention_flops(B, H, T, S, d_head, causal=causal)
    return {"fwd": 1.0, "bwd": 3.5, "fwd+bwd": 4.5}[pass_] * forward


def _record(impl: str, *, B: int, H: int, T: int, d_head: int, causal: bool, pass_: str, dtype: torch.dtype,
            repeats: int) -> dict:
    """A core row before any measurement: the case, its FLOPs and the size of one score matrix."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {"level": "core", "impl": impl, "B": B, "H": H, "T": T, "S": T, "d_head": d_head, "causal": causal,
            "pass": pass_, "status": "ok", "reason": "", "median_s": None, "min_s": None, "max_s": None,
            "repeats": repeats, "flops": attention_flops(B, H, T, T, d_head, causal=causal, pass_=pass_),
            "tflops": None, "frac_peak": None, "peak_memory_bytes": None, "scores_bytes": B * H * T * T * itemsize}


def _refusal(impl: str, record: dict, device: torch.device, cpu_max_bytes: float) -> dict | None:
    """Why impl will not be timed on this device (status and reason), or None when it may run."""
    if device.type == "cpu" and _materialises_scores(impl) and 3 * record["scores_bytes"] > cpu_max_bytes:
        return {"status": "skipped", "reason": f"would allocate ~{3 * record['scores_bytes'] / 2**30:.1f} GiB of "
                                               f"scores on the CPU (limit --cpu-max-gib)"}
    if device.type != "cuda" and impl in ("sdpa_efficient", "sdpa_cudnn"):
        return {"status": "unsupported", "reason": f"the {impl.removeprefix('sdpa_')} kernel needs a CUDA device"}
    if impl in TRITON_IMPLS:
        from course_lib.kernels import triton_available

        if device.type != "cuda":
            return {"status": "skipped", "reason": "without a GPU the Triton kernel runs in Triton's CPU "
                                                   "interpreter, whose times say nothing"}
        if not triton_available():
            return {"status": "unsupported", "reason": "the triton package is not installed"}
    return None


def draw_inputs(B: int, H: int, T: int, d_head: int, *, dtype: torch.dtype, device: torch.device | str,
                seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v and the output gradient, each (B, H, T, d_head), drawn at once on the device by a generator
    of that device (one kernel, no copy from the host): every implementation and pass of a shape shares them."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    drawn = torch.randn(4, B, H, T, d_head, generator=generator, device=device, dtype=dtype)  # (4, B, H, T, d)
    return tuple(drawn.unbind(0))  # four contiguous (B, H, T, d_head) views


def working_set_bytes(B: int, H: int, T: int, d_head: int, *, itemsize: int, pass_: str) -> int:
    """Bytes of the (B, H, T, d_head) tensors a pass reads and writes: q, k, v, out forward; also dout, dq, dk,
    dv for fwd+bwd. Below the L2 size, a timed call could find its inputs left in L2 by the previous one."""
    return (4 if pass_ == "fwd" else 8) * B * H * T * d_head * itemsize


def _error_status(e: BaseException) -> dict:
    if isinstance(e, _oom_errors()):
        return {"status": "oom", "reason": str(e).splitlines()[0][:300]}
    if isinstance(e, RuntimeError):
        return {"status": "unsupported", "reason": str(e)[:300]}
    return {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:300]}"}  # e.g. a kernel that fails to compile


def _core_group(impls: tuple[str, ...], *, B: int, H: int, T: int, d_head: int, causal: bool, pass_: str,
                dtype: torch.dtype, device: torch.device, inputs: tuple[torch.Tensor, ...], warmup: int,
                repeats: int, calls: int, flush_l2: bool, peak_tflops: float | None,
                cpu_max_bytes: float) -> list[dict]:
    """One row per impl for one (shape, causal, pass): each impl is run once (a refusal or an out-of-memory
    is recorded with its reason), its peak memory measured alone, then all that ran are timed together
    by `compare` (interleaved rounds; device time of `calls` back-to-back calls, wall time of one)."""
    records = {impl: _record(impl, B=B, H=H, T=T, d_head=d_head, causal=causal, pass_=pass_, dtype=dtype,
                             repeats=repeats) for impl in impls}
    q, k, v, grad_out = inputs
    if pass_ == "fwd+bwd":  # leaves that share the drawn storage: autograd.grad below fills no .grad
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    steps: dict[str, Callable[[], None]] = {}
    for impl in impls:
        record = records[impl]
        if impl in TRITON_IMPLS:
            record["executed_flops"] = triton_executed_flops(B, H, T, T, d_head, causal=causal, pass_=pass_)
        refusal = _refusal(impl, record, device, cpu_max_bytes)
        if refusal is not None:
            record |= refusal
            continue
        step = _step(_core_fn(impl, causal), q, k, v, grad_out, pass_)
        try:
            with warnings.catch_warnings(record=True) as caught:  # SDPA explains a refusal in warnings
                warnings.simplefilter("always")
                try:
                    step()  # refuses unsupported inputs (and compiles a kernel) before any timing
                except _oom_errors():
                    raise
                except RuntimeError as e:
                    reasons = [str(w.message).strip().splitlines()[0] for w in caught]
                    raise RuntimeError("; ".join(reasons) or str(e)) from e
            if device.type == "cuda":
                record["peak_memory_bytes"] = peak_memory(step, device)
        except Exception as e:
            record |= _error_status(e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        steps[impl] = step
    timings: dict[str, DeviceTiming] = {}
    if steps:
        try:
            timings = compare(steps, device=device, warmup=warmup, rounds=repeats, calls=calls, flush_l2=flush_l2)
        except Exception:  # one implementation failed inside the rounds: time each alone, the others still count
            for impl, step in steps.items():
                try:
                    timings |= compare({impl: step}, device=device, warmup=warmup, rounds=repeats, calls=calls,
                                       flush_l2=flush_l2)
                except Exception as e:
                    records[impl] |= _error_status(e)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    for impl, t in timings.items():
        tflops = records[impl]["flops"] / t.device_s / 1e12
        timing = t.to_dict()
        records[impl] |= {"median_s": t.device_s, "tflops": tflops,
                          "frac_peak": None if not peak_tflops else tflops / peak_tflops,
                          **{key: timing[key] for key in TIMING_KEYS}, "timing_method": t.method,
                          "interleaved_with": sorted(timings)}
    return [records[impl] for impl in impls]


def _core_case(impl: str, *, B: int, H: int, T: int, d_head: int, causal: bool, pass_: str, dtype: torch.dtype,
               device: torch.device, warmup: int, repeats: int, peak_tflops: float | None,
               cpu_max_bytes: float, calls: int = 1) -> dict:
    """One implementation alone at one shape (fresh inputs): e.g. probing the length at which it runs out of memory."""
    try:
        inputs = draw_inputs(B, H, T, d_head, dtype=dtype, device=device, seed=T * 1000 + d_head)
    except _oom_errors() as e:
        return _record(impl, B=B, H=H, T=T, d_head=d_head, causal=causal, pass_=pass_, dtype=dtype,
                       repeats=repeats) | _error_status(e)
    try:
        (record,) = _core_group((impl,), B=B, H=H, T=T, d_head=d_head, causal=causal, pass_=pass_, dtype=dtype,
                                device=device, inputs=inputs, warmup=warmup, repeats=repeats, calls=calls,
                                flush_l2=False, peak_tflops=peak_tflops, cpu_max_bytes=cpu_max_bytes)
    finally:
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def _module_cases(*, B: int, H: int, T: int, d_head: int, causal: bool, dtype: torch.dtype, device: torch.device,
                  warmup: int, repeats: int, peak_tflops: float | None) -> list[dict]:
    from course_lib.bench import mha  # the module comparison (interleaved timing) lives there

    d_model = H * d_head
    flops = module_flops(B, T, d_model, H, causal=causal, pass_="fwd+bwd")
    base = {"level": "module", "B": B, "H": H, "T": T, "S": T, "d_head": d_head, "d_model": d_model,
            "causal": causal, "pass": "fwd+bwd", "flops": flops, "peak_memory_bytes": None,
            "scores_bytes": B * H * T * T * torch.empty((), dtype=dtype).element_size()}
    try:
        result = mha.run(batch=B, seq=T, d_model=d_model, heads=H, repeats=repeats, warmup=warmup,
                         device=str(device), dtype=dtype, causal=causal)
    except RuntimeError as e:  # out of memory (recorded as such), or a module that refuses the inputs
        status = "oom" if isinstance(e, _oom_errors()) else "error"
        return [base | {"impl": name, "status": status, "reason": str(e).splitlines()[0][:300]}
                for name in MODULE_IMPLS]
    def time_of(t: dict) -> float:  # device time where the run measured it, else its median
        return t["device"]["device_s"] if isinstance(t.get("device"), dict) else t["median_s"]

    plain = time_of(result["timings"]["plain_sdpa"])
    records = []
    for name, t in result["timings"].items():
        seconds = time_of(t)
        tflops = flops / seconds / 1e12
        device_timed = isinstance(t.get("device"), dict)  # then min_s/max_s (one call per window) do not apply
        row = base | {"impl": name, "status": "ok", "reason": "", "median_s": seconds,
                      "min_s": None if device_timed else t.get("min_s"),
                      "max_s": None if device_timed else t.get("max_s"), "repeats": t.get("repeats"), "tflops": tflops,
                      "frac_peak": None if not peak_tflops else tflops / peak_tflops,
                      "ratio_to_plain_sdpa": seconds / plain,
                      "max_abs_output_difference": result["max_abs_output_difference"]}
        if device_timed:
            row |= {key: t["device"].get(key) for key in TIMING_KEYS} | {"timing_method": t["device"].get("method")}
        records.append(row)
    return records


# ----------------------------------------------------------------------------- the suite
@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_suite(*, seqs: list[int], d_heads: list[int], dtype: str = "float32", device: str = "cpu", batch: int = 4,
              heads: int = 8, causal: tuple[bool, ...] = (False, True), passes: tuple[str, ...] = PASSES,
              impls: tuple[str, ...] = CORE_IMPLS, modules: bool = True, warmup: int = 3, repeats: int = 10,
              measure_peak: bool = True, accuracy: bool = True, cpu_max_gib: float = 2.0, threads: int | None = None,
              progress: bool = True, deadline: float | None = None, calls: int | None = None) -> dict:
    """Run every case; return the record (course_lib.bench's vocabulary: device_info, config, rows; plus the
    measured matmul peak, the FLOP convention and the error table).

    Per shape (d_head, T) the inputs are drawn once on the device (`draw_inputs`) and shared by every
    causal setting, pass and implementation. Per (shape, causal, pass) the implementations are timed
    together by `course_lib.bench.timing.compare`: `repeats` interleaved rounds, each giving every
    implementation its device time (one pair of CUDA events around `calls` back-to-back calls, per call;
    default 10 on a GPU, 1 on the CPU) and its wall time (one call + synchronize); the L2 cache is
    flushed before each timed group where the working set is smaller than L2. A row's "median_s" is the
    median device time per call (the TFLOP/s use it), "device_q1_s"/"device_q3_s" its quartiles, "wall_s"
    etc. the wall time, "timing_method" says how; "min_s"/"max_s" are None (records made before this
    method have them, with "median_s" the median of single calls, each between its own pair of events).

    accuracy=True also records `course_lib.experiments.precision.attention_error_table` on this device (the
    error vs a float64 reference per precision setting) under the key "accuracy". threads sets
    torch's CPU thread count for the run (on a shared machine one thread gives steadier times).
    deadline: a time.monotonic() value; cases not started by then are recorded as "skipped".
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"impls must be among {IMPLS}; got unknown {sorted(unknown)}")
    if not passes or set(passes) - set(PASSES):
        raise ValueError(f"passes must be one or more of {PASSES}; got {passes!r}")
    for name, values in (("seqs", seqs), ("d_heads", d_heads)):
        if not values:
            raise ValueError(f"{name} must hold at least one positive int; got {values!r}")
        for value in values:
            check_positive_int(name, value)
    for name, value in (("batch", batch), ("heads", heads), ("repeats", repeats)):
        check_positive_int(name, value)
    check_nonnegative_int("warmup", warmup)
    if threads is not None:
        check_positive_int("threads", threads)
    if calls is not None:
        check_positive_int("calls", calls)
    if (isinstance(cpu_max_gib, bool) or not isinstance(cpu_max_gib, int | float)
            or not (math.isfinite(cpu_max_gib) and cpu_max_gib > 0)):  # NaN would switch the memory guard off
        raise ValueError(f"cpu_max_gib must be a positive finite number of GiB; got {cpu_max_gib!r}")
    device_ = torch.device(device)
    torch_dtype = DTYPES[dtype]
    calls_ = calls if calls is not None else (10 if device_.type == "cuda" else 1)
    cases = [(T, d, c) for d in d_heads for T in seqs for c in causal]  # a shape's causal cases share its inputs
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    records: list[dict] = []
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    with _cpu_threads(threads), tensor_core_settings(tf32=dtype == "tf32", cudnn_benchmark=False) as settings:
        info = device_facts(device_)
        l2_bytes = info.get("l2_cache_bytes") or DEFAULT_L2_BYTES
        peak = matmul_peak(device_, torch_dtype, warmup=2, repeats=5) if measure_peak else None
        peak_tflops = peak["tflops"] if peak else None
        iterator = tqdm(cases, desc="attention bench", disable=not progress) if tqdm else cases
        shape, inputs = None, None
        for T, d_head, is_causal in iterator:
            if deadline is not None and time.monotonic() > deadline:
                base = {"T": T, "S": T, "d_head": d_head, "causal": is_causal, "B": batch, "H": heads,
                        "status": "skipped", "reason": "time budget of the run spent", "median_s": None,
                        "tflops": None, "frac_peak": None, "peak_memory_bytes": None,
                        "scores_bytes": batch * heads * T * T * itemsize}
                records += [base | {"level": "core", "impl": i, "pass": p} for p in passes for i in impls]
                records += [base | {"level": "module", "impl": i, "pass": "fwd+bwd"} for i in MODULE_IMPLS
                            if modules]
                continue
            if shape != (T, d_head):
                shape, inputs = (T, d_head), None
                if device_.type == "cuda":
                    torch.cuda.empty_cache()
                inputs = draw_inputs(batch, heads, T, d_head, dtype=torch_dtype, device=device_,
                                     seed=T * 1000 + d_head)
            assert inputs is not None
            for pass_ in passes:
                working_bytes = working_set_bytes(batch, heads, T, d_head, itemsize=itemsize, pass_=pass_)
                records += _core_group(tuple(impls), B=batch, H=heads, T=T, d_head=d_head, causal=is_causal,
                                       pass_=pass_, dtype=torch_dtype, device=device_, inputs=inputs,
                                       warmup=warmup, repeats=repeats, calls=calls_,
                                       flush_l2=device_.type == "cuda" and working_bytes < l2_bytes,
                                       peak_tflops=peak_tflops, cpu_max_bytes=cpu_max_gib * 2**30)
            if modules:
                records.extend(_module_cases(B=batch, H=heads, T=T, d_head=d_head, causal=is_causal,
                                             dtype=torch_dtype, device=device_, warmup=warmup, repeats=repeats,
                                             peak_tflops=peak_tflops))
        del inputs
        errors = attention_error_table(device_) if accuracy else None
    return {
        "suite": "attention",
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_info": info,
        "config": {"dtype": dtype, "seqs": list(seqs), "d_heads": list(d_heads), "batch": batch, "heads": heads,
                   "causal": list(causal), "passes": list(passes), "impls": list(impls), "modules": modules,
                   "warmup": warmup, "repeats": repeats, "calls": calls_, "threads": info["cpu_threads"],
                   "tensor_core_settings": settings,
                   "timing": "course_lib.bench.timing.compare: per (shape, causal, pass) the implementations in "
                             f"{repeats} interleaved rounds (rotating order); median_s = median over the rounds of "
                             f"the device time of {calls_} back-to-back calls / {calls_} (CUDA events, the stream "
                             "held while the first call is enqueued; perf_counter on the CPU), quartiles in "
                             "device_q1_s/device_q3_s; wall_s = one call + synchronize; L2 flushed before each "
                             "timed group where the working set is smaller than L2"},
        "matmul_peak": peak,
        "flop_convention": "fwd = 4*B*H*T*S*d_head (halved when causal); bwd = 2.5*fwd; fwd+bwd = 3.5*fwd; "
                           "the Triton kernel executes bwd = 3.5*fwd (recorded as executed_flops)",
        "rows": records,
        "accuracy": errors,
    }


# ----------------------------------------------------------------------------- plots
def _series(records: list[dict], *, level: str, impl: str, d_head: int, causal: bool, pass_: str, key: str):
    rows = [r for r in records if r["level"] == level and r["impl"] == impl and r["d_head"] == d_head
            and r["causal"] == causal and r["pass"] == pass_ and r["status"] == "ok" and r.get(key) is not None]
    rows.sort(key=lambda r: r["T"])
    return [r["T"] for r in rows], [r[key] for r in rows]


def plot_results(data: dict, path: str | Path | None = None, *, d_head: int | None = None, causal: bool | None = None,
                 pass_: str | None = None):
    """Four panels: time vs T, TFLOP/s vs T (with the measured matmul peak), memory vs T, and all
    implementations side by side at the longest sequence. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    records = data["rows"]
    cfg = data["config"]
    d_head = d_head if d_head is not None else max(cfg["d_heads"])
    causal = causal if causal is not None else (False if False in cfg["causal"] else cfg["causal"][0])
    pass_ = pass_ or ("fwd+bwd" if "fwd+bwd" in cfg["passes"] else cfg["passes"][0])
    info = data["device_info"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_t, ax_f), (ax_m, ax_b) = axes
    impls = [i for i in CORE_IMPLS if i in cfg["impls"]]
    for impl in impls:
        T, y = _series(records, level="core", impl=impl, d_head=d_head, causal=causal, pass_=pass_, key="median_s")
        if T:
            ax_t.plot(T, [s * 1e3 for s in y], "o-", label=impl)
        T, y = _series(records, level="core", impl=impl, d_head=d_head, causal=causal, pass_=pass_, key="tflops")
        if T:
            ax_f.plot(T, y, "o-", label=impl)
    for impl in MODULE_IMPLS:
        T, y = _series(records, level="module", impl=impl, d_head=d_head, causal=causal, pass_="fwd+bwd",
                       key="median_s")
        if T and pass_ == "fwd+bwd":
            ax_t.plot(T, [s * 1e3 for s in y], "s--", alpha=0.7, label=f"module: {impl}")
    ax_t.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="median time (ms)",
             title=f"time, {pass_}")
    if data.get("matmul_peak"):
        peak = data["matmul_peak"]
        ax_f.axhline(peak["tflops"], color="k", ls=":", label=f"measured matmul peak ({peak['tflops']:.3g})")
    ax_f.set(xscale="log", xlabel="sequence length T", ylabel="TFLOP/s", title=f"attention-core throughput, {pass_}")
    measured = any(r["peak_memory_bytes"] is not None for r in records if r["level"] == "core")
    for impl in impls:
        if measured:
            T, y = _series(records, level="core", impl=impl, d_head=d_head, causal=causal, pass_=pass_,
                           key="peak_memory_bytes")
            if T:
                ax_m.plot(T, [b / 2**20 for b in y], "o-", label=impl)
            bad = [r for r in records if r["level"] == "core" and r["impl"] == impl and r["d_head"] == d_head
                   and r["causal"] == causal and r["pass"] == pass_ and r["status"] == "oom"]
            for r in bad:
                ax_m.axvline(r["T"], color="r", ls="--", alpha=0.4)
                ax_m.annotate(f"{impl}: OOM", (r["T"], 1), rotation=90, color="r", fontsize=8)
    if not measured:
        sizes = sorted({(r["T"], r["scores_bytes"]) for r in records if r["level"] == "core" and r["d_head"] == d_head})
        ax_m.plot([t for t, _ in sizes], [b / 2**20 for _, b in sizes], "o-", color="gray",
                  label="one (B, H, T, T) score matrix (analytic)")
        ax_m.text(0.03, 0.9, "CPU: torch does not track peak memory;\nshown: the size naive attention must hold",
                  transform=ax_m.transAxes, fontsize=8, va="top")
    ax_m.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="MiB",
             title="peak memory" if measured else "memory (analytic)")
    # side by side at the longest T where anything ran
    ok = [r for r in records if r["d_head"] == d_head and r["causal"] == causal and r["status"] == "ok"
          and (r["level"] == "core" or r["pass"] == "fwd+bwd")]
    if ok:
        T_max = max(r["T"] for r in ok)
        rows = [r for r in records if r["T"] == T_max and r["d_head"] == d_head and r["causal"] == causal
                and (r["level"] == "core" or r["pass"] == "fwd+bwd")]
        names = [f"{'module: ' if r['level'] == 'module' else ''}{r['impl']} ({r['pass']})" for r in rows]
        values = [r["median_s"] * 1e3 if r["status"] == "ok" else 0.0 for r in rows]
        ax_b.barh(range(len(rows)), values, color=["C1" if r["level"] == "module" else
                                                   "C0" if r["pass"] == "fwd" else "C2" for r in rows])
        for i, r in enumerate(rows):
            if r["status"] != "ok":
                ax_b.text(0, i, f" {r['status']}", va="center", fontsize=7, color="r")
        ax_b.set_yticks(range(len(names)), names, fontsize=7)
        ax_b.invert_yaxis()
        ax_b.set(xlabel="median time (ms)", title=f"side by side at T = {T_max}")
        ax_b.grid(True, axis="x", alpha=0.3)
    seqs = sorted({r["T"] for r in records})
    for ax in (ax_t, ax_f, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(t) for t in seqs])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    kind = "GPU" if info["device_type"] == "cuda" else "CPU"
    fig.suptitle(f"{kind}: {info['device_name']}, torch {info['torch']}, {cfg['dtype']}, "
                 f"B={cfg['batch']}, H={cfg['heads']}, d_head={d_head}{', causal' if causal else ''}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ----------------------------------------------------------------------------- recorded runs
def recorded_runs(device_type: str | None = None, directory: Path | str | None = None) -> list[dict]:
    """Every recorded attention-suite JSON in `directory` (default: the repository's data/benchmarks), optionally
    only 'cpu' or 'cuda', each with its file name under the key "file". A folder that does not exist raises
    RecordsNotFoundError naming it (an installed course_lib has no records)."""
    if directory is None:
        directory = records_dir("benchmarks")
    elif not Path(directory).is_dir():
        raise RecordsNotFoundError(f"{directory} does not exist: no recorded runs to read there")
    runs = []
    for file in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("suite") != "attention":
            continue
        if device_type is None or data["device_info"]["device_type"] == device_type:
            runs.append(data | {"file": file.name})
    return runs


OLD_TIMING = "median_s: median of single calls, each between its own pair of CUDA events (dispatch included)"


def versus_best_sdpa(data: dict, *, impl: str = "triton", d_head: int | None = None, min_T: int = 0) -> list[dict]:
    """Per (T, d_head, causal, pass) of a suite run: the fastest SDPA backend that ran, its TFLOP/s and
    fraction of the measured peak, and `impl`'s TFLOP/s and ratio to it (None where impl did not run).

    "ratio" is impl's speed over the fastest backend's (above 1: impl is faster). Where every row of the
    group carries device times (records made with `compare`), the fastest backend is the one with the
    least device time, the ratio is best_sdpa.device_s / impl.device_s, and "ratio_low"/"ratio_high" give
    its range from the quartiles (`course_lib.bench.timing.ratio_with_spread`); "timing" says
    "device_s ..." then. For older records (no device times) the ratio is of the TFLOP/s computed from
    median_s, the range is None, and "timing" says so (OLD_TIMING).
    """
    core = [r for r in data["rows"] if r["level"] == "core" and r["status"] == "ok"]
    keys = sorted({(r["T"], r["d_head"], r["causal"], r["pass"]) for r in core
                   if r["T"] >= min_T and (d_head is None or r["d_head"] == d_head)})
    rows = []
    for T, d, causal, pass_ in keys:
        group = [r for r in core if (r["T"], r["d_head"], r["causal"], r["pass"]) == (T, d, causal, pass_)]
        sdpa = [r for r in group if r["impl"].startswith("sdpa_")]
        ours = [r for r in group if r["impl"] == impl]
        if not sdpa:
            continue
        device_timed = all(r.get("device_s") is not None for r in sdpa + ours)
        row: dict = {"T": T, "d_head": d, "causal": causal, "pass": pass_}
        if device_timed:
            best = min(sdpa, key=lambda r: r["device_s"])
            spread = ratio_with_spread(best, ours[0]) if ours else None
            row |= {"best_sdpa": best["impl"], "best_sdpa_tflops": best["tflops"],
                    "best_sdpa_frac_peak": best["frac_peak"],
                    f"{impl}_tflops": ours[0]["tflops"] if ours else None,
                    "ratio": spread["ratio"] if spread else None,
                    "ratio_low": spread["low"] if spread else None, "ratio_high": spread["high"] if spread else None,
                    "timing": "device_s: device time per call of back-to-back calls (best_sdpa.device_s / "
                              f"{impl}.device_s; range from the quartiles)"}
        else:
            best = max(sdpa, key=lambda r: r["tflops"])
            row |= {"best_sdpa": best["impl"], "best_sdpa_tflops": best["tflops"],
                    "best_sdpa_frac_peak": best["frac_peak"],
                    f"{impl}_tflops": ours[0]["tflops"] if ours else None,
                    "ratio": ours[0]["tflops"] / best["tflops"] if ours else None,
                    "ratio_low": None, "ratio_high": None, "timing": OLD_TIMING}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- CLI
def _plot_file(text: str) -> Path:
    """argparse type of --plot: a file path whose suffix is a format matplotlib writes (.png, .pdf, .svg, ...)."""
    path = output_file(text)
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.removeprefix(".").lower() not in formats:
        raise argparse.ArgumentTypeError(f"expected an image file ending in one of .{', .'.join(sorted(formats))}; "
                                         f"got {text!r}")
    return path


def _parser() -> argparse.ArgumentParser:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m course_lib.bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int_list, default=[512, 1024, 2048, 4096, 8192, 16384] if on_gpu else [128, 256, 512],
                   help="comma-separated sequence lengths T")
    p.add_argument("--d-head", type=int_list, default=[64, 128] if on_gpu else [64], help="comma-separated head dims")
    p.add_argument("--batch", type=positive_int, default=4 if on_gpu else 2)
    p.add_argument("--heads", type=positive_int, default=16 if on_gpu else 4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16" if on_gpu else "float32",
                   help="tf32 = float32 tensors with TF32 matmuls allowed")
    p.add_argument("--device", type=torch_device, default="cuda" if on_gpu else "cpu")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--passes", type=choice_list(PASSES), default=",".join(PASSES), help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--impls", type=choice_list(IMPLS), default=",".join(CORE_IMPLS),
                   help="comma-separated core implementations: " + ", ".join(CORE_IMPLS))
    p.add_argument("--no-modules", action="store_true", help="skip the module comparison")
    p.add_argument("--warmup", type=nonnegative_int, default=3)
    p.add_argument("--repeats", type=positive_int, default=20 if on_gpu else 5,
                   help="interleaved rounds per case")
    p.add_argument("--calls", type=positive_int, default=None,
                   help="back-to-back calls per timed group (default: 10 on a GPU, 1 on the CPU)")
    p.add_argument("--no-peak", action="store_true", help="do not measure the matmul peak")
    p.add_argument("--no-accuracy", action="store_true", help="do not record the error table")
    p.add_argument("--cpu-max-gib", type=positive_finite_float, default=2.0,
                   help="on the CPU, skip the cases whose score matrices would take more GiB than this")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads for the run (default: unchanged)")
    p.add_argument("--json", type=output_file, default=None, help="write the record here")
    p.add_argument("--plot", type=_plot_file, default=None, help="draw the four panels here (PNG)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def format_table(data: dict) -> str:
    info = data["device_info"]
    lines = [f"{info['device_name']}  torch {info['torch']}  {data['config']['dtype']}"]
    if data.get("matmul_peak"):
        pk = data["matmul_peak"]
        lines.append(f"measured matmul peak: {pk['tflops']:.3f} TFLOP/s ({pk['n']}x{pk['n']} {pk['dtype']})")
    lines.append(f"{'level':<7}{'impl':<15}{'T':>7}{'d':>5}{'causal':>7}{'pass':>9}{'ms':>11}{'TFLOP/s':>10}"
                 f"{'%peak':>7}{'MiB':>9}  status")
    for r in data["rows"]:
        ms = f"{r['median_s'] * 1e3:.3f}" if r.get("median_s") is not None else "-"
        tf = f"{r['tflops']:.3f}" if r.get("tflops") is not None else "-"
        fp = f"{100 * r['frac_peak']:.0f}" if r.get("frac_peak") is not None else "-"
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r.get("peak_memory_bytes") is not None else "-"
        status = r["status"] + (f" ({r['reason'][:60]})" if r["status"] != "ok" else "")
        lines.append(f"{r['level']:<7}{r['impl']:<15}{r['T']:>7}{r['d_head']:>5}{str(r['causal']):>7}"
                     f"{r['pass']:>9}{ms:>11}{tf:>10}{fp:>7}{mem:>9}  {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # every flag is checked here (course_lib.tools.cli): a bad one exits with 2
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    data = run_suite(seqs=args.seq, d_heads=args.d_head, dtype=args.dtype, device=args.device, batch=args.batch,
                     heads=args.heads, causal=causal, passes=args.passes, impls=args.impls,
                     modules=not args.no_modules,
                     warmup=args.warmup, repeats=args.repeats, calls=args.calls, measure_peak=not args.no_peak,
                     accuracy=not args.no_accuracy, cpu_max_gib=args.cpu_max_gib, threads=args.threads,
                     progress=not args.quiet)
    print(format_table(data), flush=True)
    if args.json is not None:
        write_record(args.json, data)
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_results(data, args.plot)
        print(f"wrote {args.plot}")
    return 0
