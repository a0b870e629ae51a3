"""The whole GPU check in one command: the measurements that decide the targets first, then the rest.

    make gpu-check OUT=results/            # or: PYTHONPATH=. python3 scripts/gpu_check.py results/

Runs course_lib from the working tree (no install), so it works on a bare machine that has
python3 with torch, triton, numpy, pytest (+ pytest-xdist) and matplotlib. Without a GPU it is
a dry run: every stage runs its CPU-side plumbing at tiny sizes, says that it skipped the CUDA
parts, and the files are written all the same (marked device_type "cpu").

Stages, in order (each result is written as soon as it exists, so a run cut short keeps what it
measured; a stage that would start with less of --budget-s left than it needs is recorded as skipped):
 1. smoke      a handful of the GPU tests (the compiled Triton kernel against float64 in bfloat16 at
               d_head 128, causal or not): the kernel must work before its speed means anything.
 2. tune       the autotuner's own timings per block-size config at T = 4096 (kept for comparison).
 3. targets    the shapes the targets are about: bfloat16, d_head 128, T = 4096 and 8192 (16384 when
               the budget allows), causal and not, forward and forward+backward; the Triton kernel
               against every SDPA backend (course_lib.bench.attention, device time of back-to-back
               calls in interleaved rounds, course_lib.bench.timing.compare).
 4. modules    course_lib.MultiHeadAttention vs a plain SDPA module vs nn.MultiheadAttention, a
               training step at T = 1024 and 4096; one decoding step against a KV cache of each kind
               (dynamic, static, CUDA-graph-captured static) at B = 1 and 8, cache 1024 and 4096.
 5. profile    torch.profiler on the decoding steps (B = 1, cache 4096, each cache kind) and the causal
               training step at T = 1024, course_lib and the plain module: host time, kernel time and
               launches per call, the top operators, so that a missed target says why (~10 s).
 6. accuracy   relative error vs float64 of the Triton kernel and of SDPA, outputs and gradients,
               per dtype (and TF32), at T = 1024.
 7. attention  the rest of the attention grid (naive, course_lib, each SDPA backend, Triton; d_head 64
               at T = 1k..16k, d_head 128 at the lengths the targets stage did not run), the measured
               bf16 matmul peak, peak memory, the error table.
 8. tests      every test with a CUDA path (pytest, 8 workers).
 9. oom        the sequence length at which naive attention runs out of memory.
The targets (TARGETS) are evaluated from stages 3 and 4: each with its measured value, the range the
timing noise allows (course_lib.bench.timing.ratio_with_spread), a verdict (met / missed / not
measured) and the timing method.

Files (at most 8): gpu_check.json (summary: device_facts, stages, targets, tests, accuracy, kernel
configs), attention_targets_<device>_<dtype>.json, attention_<device>_<dtype>.json and .png,
mha_<device>_<dtype>.json.

Time (default --budget-s 420, the clock starting when the script starts), estimated from the two
recorded H200 runs (data/benchmarks/gpu_check_run{1,2}.json, "stages" seconds), the per-call times
they recorded and the kernels' compile times (about 0.5-1 s per config for sm_90 here): imports and
device facts ~10 s; smoke 40-60 s (every candidate config of the Hopper forward and of the fast
path at d_head 128 compiled and checked in a child process, COURSE_LIB_AUTOTUNE=0, so that a kernel that hangs or
corrupts memory is found there); tune 20-35 s (d_head 128 only, causal and not); targets 45-60 s at
T = 4096 and 8192 (8 cases of 5 implementations, each ~55 calls of 1-20 ms, SDPA's math backend
left out), T = 16384 only with the budget to spare; modules ~20 s (decoding at B = 1 with a 4096
cache first); profile ~10 s; accuracy 20-30 s; the rest of the grid what is left before the tests
(at least 60 s, at most 150; recorded 89-123 s) and the oom probe (32 s recorded). The targets and
modules stages hold back only the oom probe and a first 60 s of tests; the grid, then the tests,
then oom are what a slow run loses.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here: importing torch and triton is part of the run

import argparse  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from course_lib.bench import attention as attention_suite  # noqa: E402
from course_lib.bench import mha as mha_bench  # noqa: E402
from course_lib.bench.timing import ratio_with_spread  # noqa: E402
from course_lib.experiments.precision import relative_error  # noqa: E402
from course_lib.tools.device import device_facts, nvidia_smi_facts, package_versions  # noqa: E402

STAGES = ("smoke", "tune", "targets", "modules", "profile", "accuracy", "attention", "tests", "oom")
SMOKE_TESTS = ["tests/gpu/test_kernels_gpu.py"]
# every config the autotuner may pick at d_head 128 (the targets' head size) runs here first, in a child process: a
# kernel that hangs or corrupts memory there is left out of the benchmarks instead of poisoning this process
# (d_head 64 first runs in the grid, after the targets and modules are recorded)
SMOKE_SELECTION = ("(test_16_bit_against_float64 and bfloat16 and 128) or test_the_forward_kernel_chosen_on_this_gpu"
                   " or (test_every_candidate_config_of_the_hopper_forward and 128)"
                   " or (test_every_candidate_config_of_the_fast_path and 128)")
SMOKE_TIMEOUT_S = 150.0
GPU_TESTS = [
    "tests/gpu/test_kernels_gpu.py",
    "tests/unit/test_kernels.py",
    "tests/unit/test_precision.py",
    "tests/unit/test_device.py",
    "tests/unit/test_timing.py",
    "tests/unit/test_bench.py",
    "tests/unit/test_bench_attention.py",
    "tests/unit/test_attention.py",
    "tests/unit/test_mha.py",
    "tests/unit/test_kv_cache.py",
    "tests/unit/test_graphed_decode.py",
]
# "triton" is the Hopper forward kernel on an H100/H200; "triton_portable" the kernel of the recorded runs
# SDPA's math backend is left out: it materialises the scores (64 GB at T = 8192) and is never the fastest
TARGET_IMPLS = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "triton", "triton_portable")
CACHE_KINDS = ("dynamic", "static", "graph")
TARGETS = {
    # speed of the Triton kernel / speed of the fastest SDPA backend (device time), bf16, d_head 128, T >= 4096,
    # causal and not
    "triton_fwd_vs_best_sdpa_min": 0.8,
    "triton_fwd_bwd_vs_best_sdpa_min": 0.6,
    # time of course_lib.MultiHeadAttention's training step / the plain SDPA module's, T >= 1024
    "module_step_vs_plain_sdpa_max": 1.05,
    # time of course_lib's decoding step / the plain module's, with the same kind of cache
    "decode_step_vs_plain_max": 1.05,
    # time of course_lib's dynamic-cache step / its CUDA-graph static-cache step, B = 1, cache 4096
    "graph_static_speedup_min": 3.0,
}
DEFAULT_BUDGET_S = 420.0
TESTS_TIMEOUT_S = 150.0
TESTS_MIN_S = 60.0  # the tests stage starts only with this much left (then runs until the oom reserve)
OOM_RESERVE_S = 40.0


class Run:
    """Stage bookkeeping: a deadline, a log line per stage, the summary rewritten after each stage."""

    def __init__(self, out: Path, budget_s: float, start: float = START) -> None:
        self.out, self.start, self.budget_s = out, start, budget_s
        self.summary: dict = {"suite": "gpu_check", "device_info": device_facts("cuda" if ON_GPU else "cpu"),
                              "versions": versions(), "budget_s": budget_s, "targets": TARGETS,
                              "dry_run": not ON_GPU,  # no GPU: tiny CPU sizes, no verdict means anything
                              "stage_order": [], "stages": {}}
        self.save()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def deadline(self, reserve_s: float) -> float:
        """A time.monotonic() value `reserve_s` before the end of the budget."""
        return self.start + self.budget_s - reserve_s

    def skip(self, name: str, reason: str) -> None:
        self.summary["stage_order"].append(name)
        self.summary["stages"][name] = {"status": "skipped", "reason": reason}
        print(f"[{name}] skipped: {reason}", flush=True)
        self.save()

    def stage(self, name: str, fn, *, needs_s: float = 0.0) -> object:
        if self.left() < needs_s:
            self.skip(name, f"time budget: {self.left():.0f} s left, the stage needs {needs_s:.0f} s")
            return None
        self.summary["stage_order"].append(name)
        print(f"[{name}] start ({self.left():.0f} s of the budget left)", flush=True)
        t0 = time.monotonic()
        try:
            result = fn()
            status = {"status": "ok"}
        except Exception as e:  # a stage that breaks must not take the others with it
            result, status = None, {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:500]}"}
            print(f"[{name}] ERROR {status['reason']}", flush=True)
        status["seconds"] = round(time.monotonic() - t0, 1)
        self.summary["stages"][name] = status
        print(f"[{name}] {status['status']} in {status['seconds']} s", flush=True)
        self.save()
        return result

    def save(self) -> None:
        write_json(self.out / "gpu_check.json", self.summary)


def versions() -> dict:
    """Versions of what the run imports (course_lib.tools.device.package_versions) + pytest-xdist as "xdist"."""
    out = package_versions()
    out["xdist"] = out.get("pytest-xdist")
    return out


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- smoke and tests
def run_tests(run: Run, timeout_s: float, files: list[str], *, key: str = "tests", select: str | None = None,
              workers: int = 8) -> dict:
    """pytest on `files` (only those present), results from its junit XML into run.summary[key]."""
    files = [f for f in files if (ROOT / f.split("::")[0]).exists()]
    junit = Path("/tmp") / f"gpu_check_junit_{key}_{os.getpid()}.xml"
    use_workers = workers > 1 and run.summary["versions"]["xdist"] and ON_GPU  # CPU dry run: no worker start-up
    env = os.environ | {"PYTHONPATH": str(ROOT), "COURSE_LIB_AUTOTUNE": "0"}  # tests: one config per kernel
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *(["-n", str(workers), "--dist", "load"] if use_workers else []), f"--junitxml={junit}",
           "-o", "addopts=", *(["-k", select] if select else []), *files]
    print(" ".join(cmd), flush=True)
    if ON_GPU:
        torch.cuda.empty_cache()  # what this process's allocator keeps would be missing for the tests
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout stops the workers too
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        tail, returncode = stdout[-4000:] + stderr[-2000:], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # pytest writes its junit report on an interrupt
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        tail, returncode = f"timed out after {timeout_s:.0f} s\n{stdout[-3000:]}{stderr[-1000:]}", None
    print(tail, flush=True)
    result: dict = {"files": files, "select": select, "returncode": returncode, "output_tail": tail[-3000:]}
    if junit.exists():
        cases, failures = [], []
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = tag
                    if tag != "skipped":
                        failures.append({"test": name, "message": (node.get("message") or "")[:600]})
            cases.append({"test": name, "outcome": outcome, "seconds": float(case.get("time") or 0)})
        counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
        result |= {"counts": counts, "failures": failures, "cases": cases}
        junit.unlink()
    run.summary[key] = result
    return result


FATAL = ("illegal memory", "CUDA error", "misaligned address", "unspecified launch failure")


def kernel_is_sound(*results: dict | None) -> bool:
    """A kernel that corrupts memory would poison this process's CUDA context for every later stage, and one that
    hangs would stop the run: leave the Triton kernels out of the benchmarks if a test saw that or the tests timed
    out (returncode None; any other failure is only reported)."""
    if ON_GPU and any(result is not None and "returncode" in result and result["returncode"] is None
                      for result in results):
        return False
    return not any(word in f["message"] for result in results if result
                   for f in result.get("failures", []) for word in FATAL)


def hopper_kernel_passed(smoke: dict | None) -> bool:
    """False when a smoke test of the Hopper forward kernel failed: the benchmarks then time the portable kernel."""
    return not any("hopper" in f["test"] or "forward_kernel_chosen" in f["test"]
                   for f in (smoke or {}).get("failures", []))


# ----------------------------------------------------------------------------- accuracy
def kernel_accuracy(T: int = 1024, d_head: int = 64, kernel: str = "auto") -> list[dict]:
    """Relative error vs float64 of the Triton kernel and of torch SDPA, for the output and the gradients.

    One block-size config per kernel (COURSE_LIB_AUTOTUNE=0: the kernels the tests already compiled).
    """
    from course_lib.kernels import flash_attention, kernel_tolerance

    os.environ["COURSE_LIB_AUTOTUNE"] = "0"
    try:
        return _kernel_accuracy(T, d_head, functools.partial(flash_attention, kernel=kernel), kernel_tolerance)
    finally:
        os.environ.pop("COURSE_LIB_AUTOTUNE")


def _kernel_accuracy(T, d_head, flash_attention, kernel_tolerance) -> list[dict]:
    device = "cuda" if ON_GPU else "cpu"
    T = T if ON_GPU else 40
    settings = [("float32", "ieee"), ("float32", "tf32"), ("float16", "ieee"), ("bfloat16", "ieee")]
    if not ON_GPU:
        settings = [s for s in settings if s[0] != "bfloat16"]  # the interpreter cannot do bfloat16 dots
    rows = []
    for dtype_name, precision in settings:
        for causal in (False, True):
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator(device=device).manual_seed(T + causal)
            q, k, v, d_out = torch.randn(4, 2, 8, T, d_head, device=device, generator=gen).to(dtype).unbind(0)
            ref = _float64_attention(q, k, v, d_out, causal)
            row = {"dtype": dtype_name, "input_precision": precision, "causal": causal, "T": T, "d_head": d_head,
                   "tolerance": kernel_tolerance(dtype, precision, length=T)}
            triton_fn = lambda a, b, c, causal=causal, p=precision: flash_attention(  # noqa: E731
                a, b, c, is_causal=causal, input_precision=p)
            sdpa_fn = lambda a, b, c, causal=causal: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                a, b, c, is_causal=causal)
            for name, fn in (("triton", triton_fn), ("sdpa", sdpa_fn)):
                if name == "sdpa" and precision == "tf32":
                    continue
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                out = fn(*leaves)
                out.backward(d_out)
                for part, got, exp in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)), ref,
                                          strict=True):
                    row[f"{name}_{part}"] = relative_error(got, exp)
            row["triton_within_tolerance"] = all(row[f"triton_{p}"] < row["tolerance"] for p in ("out", "dq", "dk",
                                                                                                 "dv"))
            rows.append(row)
            print(f"  {dtype_name:9s} {precision:5s} causal={causal!s:5s} triton out/dq/dk/dv " +
                  " ".join(f"{row[f'triton_{p}']:.1e}" for p in ("out", "dq", "dk", "dv")) +
                  f" (tol {row['tolerance']:.1e})" +
                  ("" if "sdpa_out" not in row else "  sdpa " + " ".join(f"{row[f'sdpa_{p}']:.1e}"
                                                                        for p in ("out", "dq", "dk", "dv"))),
                  flush=True)
    return rows


def _float64_attention(q, k, v, d_out, causal):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
    out.backward(d_out.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def guarded(run: Run, key: str, fn: Callable[[], object]) -> None:
    """run.summary[key] = fn(), or the error it raised: bookkeeping after the stages must not stop the run."""
    try:
        run.summary[key] = fn()
    except Exception as e:
        run.summary[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(f"[{key}] ERROR {run.summary[key]['error']}", flush=True)


# ----------------------------------------------------------------------------- tune, targets, attention grid
def tune_at_target_shape(kernel: str = "auto") -> dict:
    """Let the autotuner choose at T = 4096 (its choice is kept per d_head, causal, dtype and length bucket) and
    keep its own timings per config (triton.testing.do_bench), to set beside the suite's."""
    from course_lib.kernels import _flash_triton, flash_attention

    def timings(tuned) -> dict:  # the autotuner's median ms per config for the key it just tuned
        return {f"{c.kwargs.get('BLOCK_M')}x{c.kwargs.get('BLOCK_N')} w{c.num_warps} s{c.num_stages}": t
                for c, t in getattr(tuned, "configs_timings", {}).items()}

    tuned_kernels = getattr(_flash_triton, "_TUNED", None) or {
        "fwd": _flash_triton._attn_fwd_tuned, "dkdv": _flash_triton._attn_bwd_dkdv_tuned,
        "dq": _flash_triton._attn_bwd_dq_tuned}
    measured = {}
    for d_head in (128,):  # the targets' head size; the grid's d_head 64 is tuned when it first runs
        for causal in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(d_head + causal)
            q, k, v, d_out = torch.randn(4, 4, 16, 4096, d_head, device="cuda", dtype=torch.bfloat16,
                                         generator=gen).unbind(0)
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            before = {kind: dict(timings(tuned)) for kind, tuned in tuned_kernels.items()}
            flash_attention(q, k, v, is_causal=causal, kernel=kernel).backward(d_out)
            torch.cuda.synchronize()
            key = f"d_head={d_head} causal={causal}"
            measured[key] = {kind: timings(tuned) for kind, tuned in tuned_kernels.items()
                             if timings(tuned) != before[kind]}  # the kernels tuned for this key
            print(f"  tuned {key}: {measured[key]}", flush=True)
    return {"config_timings_ms": measured, "method": "triton.testing.do_bench inside the autotuner",
            "chosen": {kind: {str(key): config for key, config in table.items()}
                       for kind, table in _flash_triton.chosen_configs().items()}}


def target_lengths(left_s: float, reserve_s: float) -> list[int]:
    """T = 4096 and 8192; also 16384 when the budget left covers it (~65 s), the other targets (~80 s), modules
    (~20 s), accuracy (~12 s), a little of the grid (40 s) and `reserve_s` (the tests' and oom's reserve)."""
    return [4096, 8192, 16384] if left_s >= 65 + 80 + 20 + 12 + 40 + reserve_s else [4096, 8192]


def triton_impls(impls: tuple[str, ...], with_triton: bool, with_hopper: bool) -> tuple[str, ...]:
    """impls without the Triton kernels when they are not sound, and with the portable kernel in place of the
    automatic choice when the Hopper kernel failed its tests."""
    if not with_triton:
        return tuple(i for i in impls if not i.startswith("triton"))
    if not with_hopper:
        return tuple(dict.fromkeys("triton_portable" if i == "triton" else i for i in impls))
    return impls


def target_benchmarks(run: Run, out: Path, reserve_s: float, with_triton: bool, with_hopper: bool = True) -> dict:
    """The shapes the targets are about, every fused SDPA backend against the Triton kernels; device times."""
    impls = triton_impls(TARGET_IMPLS, with_triton, with_hopper)
    if ON_GPU:
        cfg = {"seqs": target_lengths(run.left(), reserve_s), "d_heads": [128], "batch": 4, "heads": 16, "warmup": 2,
               "repeats": 8, "calls": 5, "dtype": "bfloat16", "device": "cuda"}
    else:
        cfg = {"seqs": [64, 128], "d_heads": [16], "batch": 1, "heads": 2, "warmup": 1, "repeats": 2, "calls": 1,
               "dtype": "float32", "device": "cpu"}
    data = attention_suite.run_suite(**cfg, impls=impls, modules=False, accuracy=False, progress=False,
                                     deadline=run.deadline(reserve_s + 40))  # 40 s: the modules stage
    data["command"] = "scripts/gpu_check.py (stage targets)"
    write_json(out / f"attention_targets_{data['device_info']['device_type']}_{data['config']['dtype']}.json", data)
    print(attention_suite.format_table(data), flush=True)
    return data


def attention_benchmarks(out: Path, deadline: float, with_triton: bool, targets: dict | None,
                         impls: tuple[str, ...] = attention_suite.CORE_IMPLS, with_hopper: bool = True) -> dict:
    """The rest of the grid: d_head 128 at the lengths the targets stage did not run, then d_head 64."""
    impls = triton_impls(impls, with_triton, with_hopper)
    done = set(targets["config"]["seqs"]) if targets else set()
    if ON_GPU:
        parts = [([T for T in (1024, 2048, 4096, 8192, 16384) if T not in done], [128]),
                 ([1024, 2048, 4096, 8192, 16384], [64])]
        cfg = {"batch": 4, "heads": 16, "warmup": 1, "repeats": 5, "calls": 3, "dtype": "bfloat16", "device": "cuda"}
    else:
        parts = [([32], [16]), ([64, 128], [8])]
        cfg = {"batch": 1, "heads": 2, "warmup": 1, "repeats": 2, "calls": 1, "dtype": "float32", "device": "cpu"}
    data: dict | None = None
    for seqs, d_heads in parts:
        if not seqs:
            continue
        part = attention_suite.run_suite(seqs=seqs, d_heads=d_heads, **cfg, impls=impls, modules=False,
                                         measure_peak=data is None, accuracy=data is None, progress=False,
                                         deadline=deadline)
        if data is None:
            data = part
        else:  # one record: the rows of both parts, the config listing every length and head size
            data["rows"] += part["rows"]
            data["config"]["seqs"] = sorted(set(data["config"]["seqs"]) | set(part["config"]["seqs"]))
            data["config"]["d_heads"] = sorted(set(data["config"]["d_heads"]) | set(part["config"]["d_heads"]))
    assert data is not None
    data["command"] = "scripts/gpu_check.py (stage attention)"
    name = f"attention_{data['device_info']['device_type']}_{data['config']['dtype']}"
    write_json(out / f"{name}.json", data)
    print(attention_suite.format_table(data), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    attention_suite.plot_results(data, out / f"{name}.png")
    return data


# ----------------------------------------------------------------------------- modules
def decode_kwargs(kind: str) -> dict:
    """cache_kind=kind where run_decode takes it; {} where it does not (then only "dynamic" runs)."""
    return {"cache_kind": kind} if "cache_kind" in inspect.signature(mha_bench.run_decode).parameters else {}


def module_benchmarks(out: Path, deadline: float) -> dict:
    """Training and decoding steps, the rows the targets need first: decoding at B = 1 with a 4096 cache (every
    cache kind: the graph-speedup target), a training step at T = 1024, then the other shapes. A row that fails
    is recorded with its error and the next one runs."""
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    train_shapes = [(4, 1024, 2048, 16), (4, 4096, 2048, 16)] if ON_GPU else [(2, 32, 64, 4)]
    decode_shapes = [(1, 4096), (1, 1024), (8, 4096), (8, 1024)] if ON_GPU else [(1, 32), (2, 64)]
    d_model, heads = (2048, 16) if ON_GPU else (64, 4)
    # the mha suite's record: training-step rows, then decoding-step rows (told apart by config["step"])
    dtype_name = str(dtype).removeprefix("torch.")
    record = {"suite": "mha", "device_info": device_facts(device), "config": {"dtype": dtype_name}, "rows": [],
              "skipped": [], "command": "scripts/gpu_check.py (stage modules)"}
    path = out / f"mha_{record['device_info']['device_type']}_{record['config']['dtype']}.json"
    kinds = CACHE_KINDS if decode_kwargs("dynamic") else ("dynamic",)
    if not decode_kwargs("dynamic"):
        record["skipped"] += [{"step": "decode", "cache_kind": k, "reason": "run_decode takes no cache_kind"}
                              for k in CACHE_KINDS[1:]]

    def decode(batch: int, cache_len: int, kind: str) -> tuple[dict, Callable[[], dict]]:
        what = {"step": "decode", "batch": batch, "cache_len": cache_len, "cache_kind": kind}
        return what, lambda: mha_bench.run_decode(
            batch=batch, cache_len=cache_len, d_model=d_model, heads=heads, device=device, dtype=dtype,
            repeats=20 if ON_GPU else 3, warmup=5 if ON_GPU else 1, **decode_kwargs(kind))

    def train(batch: int, seq: int, width: int, n_heads: int, causal: bool) -> tuple[dict, Callable[[], dict]]:
        what = {"step": "training", "batch": batch, "seq": seq, "causal": causal}
        return what, lambda: mha_bench.run(batch=batch, seq=seq, d_model=width, heads=n_heads,
                                           repeats=8 if ON_GPU else 2, warmup=2 if ON_GPU else 1, device=device,
                                           dtype=dtype, causal=causal)

    first, *other_decodes = decode_shapes
    jobs = [decode(*first, kind) for kind in kinds]
    jobs += [train(*train_shapes[0], causal) for causal in (False, True)]
    jobs += [train(*shape, causal) for shape in train_shapes[1:] for causal in (False, True)]
    jobs += [decode(*shape, kind) for shape in other_decodes for kind in kinds]
    for what, job in jobs:
        if time.monotonic() > deadline:
            record["skipped"].append(what | {"reason": "time budget"})
            continue
        try:
            r = job()
        except Exception as e:  # one broken row must not take the others with it
            record["skipped"].append(what | {"error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"  {what}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
            write_json(path, record)
            continue
        if what["step"] == "decode":
            r["config"].setdefault("cache_kind", what["cache_kind"])  # a run_decode without cache kinds: dynamic
            print(mha_bench.format_decode(r), flush=True)
        else:
            print(mha_bench.format_table(r), flush=True)
        record["rows"].append(r)
        write_json(path, record)
    return record


# ----------------------------------------------------------------------------- profile
def profile_steps_of_targets() -> dict:
    """Where the time of the steps the module and decoding targets compare goes (torch.profiler, not a timing):
    per step, wall, host-operator and kernel time per call, kernels launched, and the top operators, so that a
    missed target says whether the host or the GPU holds the step back."""
    from course_lib.bench.profile import profile_steps

    device, dtype = ("cuda", torch.bfloat16) if ON_GPU else ("cpu", torch.float32)
    d_model, heads, cache_len, seq = (2048, 16, 4096, 1024) if ON_GPU else (64, 4, 32, 32)
    out: dict = {"method": "course_lib.bench.profile.profile_steps: 5 profiled calls after 1 warm-up, per call; "
                           "the profiler's own overhead is in the host times, alike for the steps compared"}
    kinds = CACHE_KINDS if decode_kwargs("dynamic") else ("dynamic",)
    with torch.no_grad():
        for kind in kinds:
            steps = mha_bench.decode_steps(cache_kind=kind, batch=1, cache_len=cache_len, d_model=d_model,
                                           heads=heads, device=device, dtype=dtype)
            out[f"decode B=1 cache={cache_len} {kind}"] = profile_steps(steps, device=device, calls=5, top=8)
    steps = mha_bench.training_steps(batch=4, seq=seq, d_model=d_model, heads=heads, device=device, dtype=dtype,
                                     causal=True)
    out[f"training B=4 T={seq} causal"] = profile_steps({k: steps[k] for k in ("course_lib", "plain_sdpa")},
                                                        device=device, calls=5, top=8)
    for case, by_step in out.items():
        if case != "method":
            print(f"  {case}: " + ", ".join(f"{name} wall {p['wall_us_per_call']:.0f} us, kernels "
                                           f"{p['device_us_per_call']:.0f} us, {p['kernels_per_call']:.0f} launches"
                                           for name, p in by_step.items()), flush=True)
    return out


# ----------------------------------------------------------------------------- naive OOM
def naive_oom_probe(deadline: float, batch: int = 4, heads: int = 16, d_head: int = 128) -> dict:
    """Double T from 16k until naive attention (forward, bf16) runs out of memory; SDPA's flash at the same T."""
    if not ON_GPU:
        return {"status": "skipped", "reason": "needs a GPU (torch does not track CPU memory)"}
    torch.cuda.empty_cache()  # start from what the device has, not from what earlier stages left cached
    probe: dict = {"batch": batch, "heads": heads, "d_head": d_head, "dtype": "bfloat16", "pass": "fwd",
                   "lengths": []}
    T = 16384
    while T <= 131072 and time.monotonic() < deadline:
        row: dict = {"T": T}
        for impl in ("naive", "sdpa_flash"):
            rec = attention_suite._core_case(impl, B=batch, H=heads, T=T, d_head=d_head, causal=False, pass_="fwd",
                                             dtype=torch.bfloat16, device=torch.device("cuda"), warmup=0, repeats=1,
                                             peak_tflops=None, cpu_max_bytes=0)
            row[impl] = {"status": rec["status"], "peak_memory_bytes": rec["peak_memory_bytes"],
                         "scores_bytes": rec["scores_bytes"]}
        probe["lengths"].append(row)
        print(f"  T={T}: naive {row['naive']['status']}, flash {row['sdpa_flash']['status']}", flush=True)
        if row["naive"]["status"] == "oom":
            probe["naive_oom_T"] = T
            break
        T *= 2
    probe["total_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return probe


# ----------------------------------------------------------------------------- targets
def _timing_of(t: dict) -> dict:
    """A module timing as a DeviceTiming dict: its "device" entry where the run has one, else its median alone."""
    if isinstance(t.get("device"), dict):
        return t["device"]
    return {"device_s": t["median_s"], "device_q1_s": None, "device_q3_s": None,
            "method": "median of single calls, each between its own pair of CUDA events (dispatch included)"}


def _ratio(a: dict, b: dict) -> dict:
    """a / b with its range where both carry quartiles (ratio_with_spread), else the ratio of medians alone."""
    if all(t.get("device_q1_s") for t in (a, b)) and all(t.get("device_q3_s") for t in (a, b)):
        return ratio_with_spread(a, b)
    return {"ratio": a["device_s"] / b["device_s"], "low": None, "high": None,
            "method": "ratio of medians; no quartiles recorded, no range"}


def _range(ratio: dict) -> list[float] | None:
    return None if ratio["low"] is None else [ratio["low"], ratio["high"]]


def _verdict(name: str, bound: float, kind: str, cases: list[dict], method: str, where: str) -> dict:
    """One target: its cases (each with value, range, verdict); the worst case's value and range; met when
    every case meets the bound (by its median ratio), missed when one does not, not measured without cases.
    "noise_straddles_bound" says the range of the worst case lies on both sides of the bound: the run
    cannot tell the verdict apart from the timing noise."""
    meets = (lambda x: x >= bound) if kind == "min" else (lambda x: x <= bound)
    for case in cases:
        case["verdict"] = "met" if meets(case["value"]) else "missed"
    entry: dict = {"target": name, "bound": f"{'>=' if kind == 'min' else '<='} {bound}", "where": where,
                   "timing_method": method, "cases": cases}
    if not cases:
        return entry | {"value": None, "range": None, "verdict": "not measured", "noise_straddles_bound": None}
    worst = (min if kind == "min" else max)(cases, key=lambda c: c["value"])
    low, high = worst["range"] if worst["range"] else (None, None)
    straddles = None if low is None else bool(low < bound < high)
    verdict = "met" if all(c["verdict"] == "met" for c in cases) else "missed"
    return entry | {"value": worst["value"], "range": worst["range"], "verdict": verdict,
                    "noise_straddles_bound": straddles}


def _attention_target(records: list[dict], pass_: str, name: str) -> dict:
    """The automatic kernel's rows ("triton"); where the Hopper kernel failed its tests, the portable kernel's."""
    impl = "triton" if any(r["impl"] == "triton" for d in records for r in d["rows"]) else "triton_portable"
    cases, methods = [], set()
    for data in records:
        for r in attention_suite.versus_best_sdpa(data, impl=impl, d_head=128, min_T=4096):
            if r["pass"] != pass_ or r["ratio"] is None:
                continue
            methods.add(r["timing"])
            cases.append({"T": r["T"], "causal": r["causal"], "best_sdpa": r["best_sdpa"], "value": r["ratio"],
                          "range": _range({"low": r["ratio_low"], "high": r["ratio_high"]})})
    return _verdict(name, TARGETS[name], "min", cases, "; ".join(sorted(methods)) or "not measured",
                    f"speed of {impl} / fastest SDPA backend, {pass_}, d_head 128, T >= 4096, causal and not")


def forward_kernels_compared(targets: dict | None) -> list[dict]:
    """The two forward kernels side by side, from the targets stage (not a target): per (T, causal, pass),
    each one's speed over the fastest SDPA backend's, and the Hopper kernel's over the portable one's."""
    if not targets:
        return []
    by_case = {}
    for impl in ("triton", "triton_portable"):
        for r in attention_suite.versus_best_sdpa(targets, impl=impl):  # the targets stage runs d_head 128
            by_case.setdefault((r["T"], r["causal"], r["pass"]), {})[impl] = r
    rows = []
    for (T, causal, pass_), pair in sorted(by_case.items()):
        auto, portable = pair.get("triton"), pair.get("triton_portable")
        row = {"T": T, "causal": causal, "pass": pass_,
               "auto_vs_best_sdpa": auto and auto["ratio"], "portable_vs_best_sdpa": portable and portable["ratio"]}
        if auto and portable and auto["ratio"] and portable["ratio"]:
            row["auto_over_portable_speed"] = auto["ratio"] / portable["ratio"]
        rows.append(row)
    return rows


def evaluate_targets(targets: dict | None, attention: dict | None, modules: dict | None) -> dict:
    """Each target of the GPU chapter: measured value, noise range, verdict (met / missed / not measured), method."""
    attention_records = [d for d in (targets, attention) if d]
    verdicts = {
        "triton_fwd_vs_best_sdpa_min": _attention_target(attention_records, "fwd", "triton_fwd_vs_best_sdpa_min"),
        "triton_fwd_bwd_vs_best_sdpa_min": _attention_target(attention_records, "fwd+bwd",
                                                             "triton_fwd_bwd_vs_best_sdpa_min"),
    }
    rows = modules["rows"] if modules else []
    min_seq = 1024 if ON_GPU else 0  # the dry run's tiny shapes exercise the same code
    training = [r for r in rows if r["config"]["step"] == mha_bench.TRAINING_STEP and r["config"]["seq"] >= min_seq]
    decoding = [r for r in rows if r["config"]["step"] == mha_bench.DECODE_STEP]
    cases, methods = [], set()
    for r in training:
        ours, plain = (_timing_of(r["timings"][n]) for n in ("course_lib", "plain_sdpa"))
        ratio = _ratio(ours, plain)
        methods.add(ours.get("method", ""))
        cases.append({"batch": r["config"]["batch"], "seq": r["config"]["seq"], "causal": r["config"]["causal"],
                      "value": ratio["ratio"], "range": _range(ratio)})
    verdicts["module_step_vs_plain_sdpa_max"] = _verdict(
        "module_step_vs_plain_sdpa_max", TARGETS["module_step_vs_plain_sdpa_max"], "max", cases,
        "; ".join(sorted(methods)) or "not measured",
        "time of course_lib.MultiHeadAttention / plain SDPA module, forward+backward, T >= 1024")
    cases, methods = [], set()
    for r in decoding:
        ours, plain = (_timing_of(r["timings"][n]) for n in ("course_lib", "plain_sdpa"))
        ratio = _ratio(ours, plain)
        methods.add(ours.get("method", ""))
        cases.append({"batch": r["config"]["batch"], "cache_len": r["config"]["cache_len"],
                      "cache_kind": r["config"].get("cache_kind", "dynamic"), "value": ratio["ratio"],
                      "range": _range(ratio)})
    verdicts["decode_step_vs_plain_max"] = _verdict(
        "decode_step_vs_plain_max", TARGETS["decode_step_vs_plain_max"], "max", cases,
        "; ".join(sorted(methods)) or "not measured",
        "time of course_lib's decoding step / the plain module's, the same cache kind")
    by_kind = {r["config"].get("cache_kind", "dynamic"): r for r in decoding
               if (r["config"]["batch"], r["config"]["cache_len"]) == ((1, 4096) if ON_GPU else (1, 32))}
    cases, method = [], "not measured"
    if "dynamic" in by_kind and "graph" in by_kind and (by_kind["graph"]["config"].get("cuda_graph") or not ON_GPU):
        dynamic, graph = (_timing_of(by_kind[k]["timings"]["course_lib"]) for k in ("dynamic", "graph"))
        ratio = _ratio(dynamic, graph)
        method = (f"{dynamic.get('method', '')}; the two steps timed in separate comparisons (not interleaved)")
        cases.append({"batch": 1, "cache_len": by_kind["graph"]["config"]["cache_len"], "value": ratio["ratio"],
                      "range": _range(ratio)})
    verdicts["graph_static_speedup_min"] = _verdict(
        "graph_static_speedup_min", TARGETS["graph_static_speedup_min"], "min", cases, method,
        "time of course_lib's dynamic-cache decoding step / its CUDA-graph static-cache step, B = 1, cache 4096"
        + ("" if ON_GPU else " (dry run: cache 32, no CUDA graph)"))
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the result files (created)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="stop starting new work after this many seconds (counted from the script's start)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated subset of the stages, for a follow-up run")
    parser.add_argument("--tests", nargs="+", default=None, help="test files (default: every test with a CUDA path)")
    parser.add_argument("--tests-timeout-s", type=float, default=TESTS_TIMEOUT_S)
    parser.add_argument("--impls", default=",".join(attention_suite.CORE_IMPLS),
                        help="attention-core implementations for the attention stage")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    unknown = stages - set(STAGES)
    if unknown:
        parser.error(f"--stages must be among {','.join(STAGES)}; got {','.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.budget_s)
    info = run.summary["device_info"]
    print(f"gpu-check on {info['device_name']} | torch {torch.__version__} | triton {run.summary['versions']['triton']}"
          f"{'' if ON_GPU else ' | NO GPU: dry run, the CUDA parts are skipped'}", flush=True)
    # What the targets and modules stages leave for the rest: the oom probe and a first slice of the tests; the
    # tests then get whatever is left (their timeout shrinks to fit), the least important stages last.
    tests_reserve = TESTS_MIN_S * ("tests" in stages) + OOM_RESERVE_S * ("oom" in stages)
    smoke: dict = {}
    targets = attention = modules = None
    if "smoke" in stages:
        smoke = run.stage("smoke", lambda: run_tests(run, SMOKE_TIMEOUT_S, SMOKE_TESTS, key="smoke",
                                                     select=SMOKE_SELECTION, workers=1),
                          needs_s=SMOKE_TIMEOUT_S + 10) or {}
    kernel_ok = kernel_is_sound(smoke)
    hopper_ok = hopper_kernel_passed(smoke)
    kernel = "auto" if hopper_ok else "portable"
    run.summary["triton_benchmarked"] = kernel_ok
    run.summary["forward_kernel_benchmarked"] = kernel if kernel_ok else None
    if "tune" in stages:
        if kernel_ok and ON_GPU:
            run.summary["kernel_configs_tuned_at_T4096"] = run.stage("tune", lambda: tune_at_target_shape(kernel),
                                                                     needs_s=60)
        else:
            run.skip("tune", "needs a GPU" if not ON_GPU else "the smoke tests saw the kernel hang or corrupt memory")
    if "targets" in stages:
        targets = run.stage("targets", lambda: target_benchmarks(run, args.out, tests_reserve, kernel_ok, hopper_ok),
                            needs_s=90)
    if "modules" in stages:
        modules = run.stage("modules", lambda: module_benchmarks(args.out, run.deadline(tests_reserve + 20)),
                            needs_s=40)
    guarded(run, "targets_verdicts", lambda: evaluate_targets(targets, None, modules))
    if "profile" in stages:
        run.summary["profiles"] = run.stage("profile", profile_steps_of_targets, needs_s=tests_reserve + 20)
    if ON_GPU:
        run.summary["clocks_after_targets"] = nvidia_smi_facts(index=torch.cuda.current_device())
    run.save()
    if "accuracy" in stages:
        if kernel_ok:
            run.summary["kernel_accuracy"] = run.stage("accuracy", lambda: kernel_accuracy(kernel=kernel),
                                                       needs_s=tests_reserve + 30)
        else:
            run.skip("accuracy", "the smoke tests saw the kernel hang or corrupt memory")
    if "attention" in stages:
        impls = tuple(i for i in args.impls.split(",") if i)
        attention = run.stage("attention", lambda: attention_benchmarks(
            args.out, run.deadline(tests_reserve + 15), kernel_ok, targets, impls, hopper_ok),
                              needs_s=tests_reserve + 40)
    if "tests" in stages:
        files = args.tests or (GPU_TESTS if ON_GPU else ["tests/gpu/test_kernels_gpu.py"])  # dry run: plumbing only
        timeout = min(args.tests_timeout_s, run.left() - OOM_RESERVE_S * ("oom" in stages) - 5)
        tests = run.stage("tests", lambda: run_tests(run, timeout, files), needs_s=TESTS_MIN_S) or {}
    else:
        tests = {}
    if "oom" in stages:
        run.summary["naive_oom"] = run.stage("oom", lambda: naive_oom_probe(run.deadline(0)), needs_s=35)
    if ON_GPU and kernel_ok:
        from course_lib.kernels import _flash_triton

        guarded(run, "kernel_configs_chosen", lambda: {kind: {str(k): c for k, c in table.items()}
                                                       for kind, table in _flash_triton.chosen_configs().items()})
    guarded(run, "targets_verdicts", lambda: evaluate_targets(targets, attention, modules))
    guarded(run, "forward_kernels_compared", lambda: forward_kernels_compared(targets))
    run.summary["seconds"] = round(time.monotonic() - run.start, 1)
    run.save()
    verdicts = run.summary["targets_verdicts"]
    brief = {name: {k: v.get(k) for k in ("bound", "value", "range", "verdict")} if isinstance(v, dict) else v
             for name, v in verdicts.items()}
    print(json.dumps({"stages": run.summary["stages"], "targets": brief, "seconds": run.summary["seconds"]},
                     indent=1, default=str))
    passed = all(r.get("returncode", 0) in (0, 5) for r in (smoke, tests))  # 5: no test selected (e.g. renamed)
    return 0 if passed and all(s["status"] != "error" for s in run.summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
