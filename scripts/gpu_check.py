"""The whole GPU check in one command: the GPU tests, then every GPU benchmark, into one folder.

    make gpu-check OUT=results/            # or: PYTHONPATH=. python3 scripts/gpu_check.py results/

Runs course_lib from the working tree (no install), so it works on a bare machine that has
python3 with torch, triton, numpy, pytest (+ pytest-xdist) and matplotlib. Without a GPU it is
a dry run: every stage runs its CPU-side plumbing, says that it skipped the CUDA parts, and the
files are written all the same (marked device_type "cpu").

Stages, in order (each result is written as soon as it exists, so a run cut short keeps what it
measured; stages that would start after --budget-s seconds are recorded as skipped):
 1. tests     every test with a CUDA path (pytest, 8 workers): the compiled Triton kernel forward
              and backward against float64 in float16, bfloat16 and float32, causal or not,
              T != S, ragged T, d_head 24..256, B*H > 65535 and > 2^31 elements; SDPA and the
              error table on CUDA.
 2. accuracy  relative error vs float64 of the Triton kernel and of SDPA, outputs and gradients,
              per dtype (and TF32), at T = 1024.
 3. attention the attention-core suite in bfloat16 (course_lib.bench.attention): naive, course_lib,
              each SDPA backend, the Triton kernel; forward and forward+backward; T = 1k..16k;
              d_head 64 and 128; causal and not; the measured bf16 matmul peak; peak memory.
 4. modules   course_lib.MultiHeadAttention vs a plain SDPA module vs nn.MultiheadAttention,
              forward+backward at training shapes, and one decoding step against a KV cache.
 5. oom       the sequence length at which naive attention runs out of memory.
Files (at most 8): gpu_check.json (summary, tests, accuracy, targets, chosen kernel configs),
attention_<device>_bfloat16.json and .png, mha_<device>_bfloat16.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from course_lib.bench import attention as attention_suite  # noqa: E402
from course_lib.bench import mha as mha_bench  # noqa: E402
from course_lib.experiments.precision import relative_error  # noqa: E402
from course_lib.tools.device import device_facts  # noqa: E402

GPU_TESTS = [
    "tests/gpu/test_kernels_gpu.py",
    "tests/unit/test_kernels.py",
    "tests/unit/test_precision.py",
    "tests/unit/test_device.py",
    "tests/unit/test_bench.py",
    "tests/unit/test_bench_attention.py",
    "tests/unit/test_attention.py",
    "tests/unit/test_mha.py",
    "tests/unit/test_kv_cache.py",
]
TARGETS = {
    "module_fwd_bwd_ratio_max": 1.10,  # course_lib.MultiHeadAttention / plain SDPA module, T >= 1024, bf16
    "decode_ratio_max": 1.10,
    "best_sdpa_frac_peak_min": 0.50,  # fastest SDPA backend, T >= 4096, d_head 128, bf16
    "triton_fwd_vs_best_sdpa_min": 0.70,
    "triton_fwd_bwd_vs_best_sdpa_min": 0.50,
}


class Run:
    """Stage bookkeeping: a deadline, a log line per stage, the summary rewritten after each stage."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.start, self.budget_s = out, time.monotonic(), budget_s
        self.summary: dict = {"suite": "gpu_check", "device_info": device_facts("cuda" if ON_GPU else "cpu"),
                              "versions": versions(), "budget_s": budget_s, "stages": {}}
        self.save()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def stage(self, name: str, fn, *, needs_s: float = 0.0) -> object:
        if self.left() < needs_s:
            self.summary["stages"][name] = {"status": "skipped", "reason": f"time budget: {self.left():.0f} s left"}
            print(f"[{name}] skipped: {self.left():.0f} s of the budget left", flush=True)
            self.save()
            return None
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
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "numpy", "pytest", "xdist", "matplotlib"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "present")
        except ImportError:
            out[name] = None
    return out


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- 1. tests
def run_tests(run: Run, timeout_s: float, files: list[str] | None = None) -> dict:
    files = files or (GPU_TESTS if ON_GPU else ["tests/gpu/test_kernels_gpu.py"])  # dry run: the plumbing only
    junit = Path("/tmp") / f"gpu_check_junit_{os.getpid()}.xml"
    workers = ["-n", "8", "--dist", "load"] if run.summary["versions"]["xdist"] else []
    env = os.environ | {"PYTHONPATH": str(ROOT), "COURSE_LIB_AUTOTUNE": "0"}  # tests: one config per kernel
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, f"--junitxml={junit}",
           "-o", "addopts=", *files]
    print(" ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        tail, returncode = proc.stdout[-4000:] + proc.stderr[-2000:], proc.returncode
    except subprocess.TimeoutExpired as e:
        tail, returncode = f"timed out after {timeout_s:.0f} s\n{(e.stdout or b'')[-3000:]!r}", None
    print(tail, flush=True)
    result = {"files": files, "returncode": returncode, "output_tail": tail[-3000:]}
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
    run.summary["tests"] = result
    return result


# ----------------------------------------------------------------------------- 2. accuracy
def kernel_accuracy(T: int = 1024, d_head: int = 64) -> list[dict]:
    """Relative error vs float64 of the Triton kernel and of torch SDPA, for the output and the gradients.

    One block-size config per kernel (COURSE_LIB_AUTOTUNE=0: the kernels the tests already compiled).
    """
    from course_lib.kernels import flash_attention, kernel_tolerance

    os.environ["COURSE_LIB_AUTOTUNE"] = "0"
    try:
        return _kernel_accuracy(T, d_head, flash_attention, kernel_tolerance)
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
            q, k, v, d_out = (torch.randn(2, 8, T, d_head, device=device, generator=gen).to(dtype) for _ in range(4))
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


# ----------------------------------------------------------------------------- 3. attention suite
def tune_at_target_shape() -> dict:
    """Let the autotuner choose at the shape the targets are about (its choice is kept per d_head, causal, dtype)."""
    from course_lib.kernels import _flash_triton, flash_attention

    def timings(tuned) -> dict:  # the autotuner's median ms per config for the key it just tuned
        return {f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}": t
                for c, t in getattr(tuned, "configs_timings", {}).items()}

    measured = {}
    for d_head in (64, 128):
        for causal in (False, True):
            q, k, v = (torch.randn(4, 16, 4096, d_head, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            out = flash_attention(q, k, v, is_causal=causal)
            fwd = timings(_flash_triton._attn_fwd_tuned)
            out.backward(torch.randn_like(q))
            measured[f"d_head={d_head} causal={causal}"] = {
                "fwd": fwd, "dkdv": timings(_flash_triton._attn_bwd_dkdv_tuned),
                "dq": timings(_flash_triton._attn_bwd_dq_tuned)}
            print(f"  tuned d_head={d_head} causal={causal}: {measured[f'd_head={d_head} causal={causal}']}",
                  flush=True)
    torch.cuda.synchronize()
    return {"config_timings_ms": measured,
            "chosen": {kind: {str(key): config for key, config in table.items()}
                       for kind, table in _flash_triton.chosen_configs().items()}}


def attention_benchmarks(run: Run, out: Path, deadline: float, with_triton: bool,
                         impls: tuple[str, ...] = attention_suite.CORE_IMPLS) -> dict:
    if ON_GPU:
        cfg = {"seqs": [1024, 2048, 4096, 8192, 16384], "d_heads": [64, 128], "batch": 4, "heads": 16,
               "warmup": 2, "repeats": 8}
    else:
        cfg = {"seqs": [64, 128], "d_heads": [16], "batch": 1, "heads": 2, "warmup": 1, "repeats": 2}
    impls = tuple(i for i in impls if with_triton or i != "triton")
    data = attention_suite.run_suite(**cfg, impls=impls, dtype="bfloat16" if ON_GPU else "float32",
                                     device="cuda" if ON_GPU else "cpu", modules=False, progress=False,
                                     deadline=deadline)
    data["command"] = "scripts/gpu_check.py (stage attention)"
    name = f"attention_{data['device_info']['device_type']}_{data['config']['dtype']}"
    write_json(out / f"{name}.json", data)
    print(attention_suite.format_table(data), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    attention_suite.plot_results(data, out / f"{name}.png")
    return data


# ----------------------------------------------------------------------------- 4. modules
def module_benchmarks(out: Path, deadline: float) -> dict:
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    train_shapes = [(4, 1024, 2048, 16), (4, 4096, 2048, 16), (8, 1024, 1024, 16)] if ON_GPU else [(2, 32, 64, 4)]
    decode_shapes = [(1, 1024), (8, 1024), (1, 4096), (8, 4096)] if ON_GPU else [(1, 32), (2, 64)]
    d_model, heads = (2048, 16) if ON_GPU else (64, 4)
    # the mha suite's record: training-step rows, then decoding-step rows (told apart by config["step"])
    dtype_name = str(dtype).removeprefix("torch.")
    record = {"suite": "mha", "device_info": device_facts(device), "config": {"dtype": dtype_name}, "rows": [],
              "command": "scripts/gpu_check.py (stage modules)"}
    path = out / f"mha_{record['device_info']['device_type']}_{record['config']['dtype']}.json"
    for batch, seq, width, n_heads in train_shapes:
        for causal in (False, True):
            if time.monotonic() > deadline:
                break
            r = mha_bench.run(batch=batch, seq=seq, d_model=width, heads=n_heads, repeats=10 if ON_GPU else 2,
                              warmup=3 if ON_GPU else 1, device=device, dtype=dtype, causal=causal)
            print(mha_bench.format_table(r), flush=True)
            record["rows"].append(r)
            write_json(path, record)
    for batch, cache_len in decode_shapes:
        if time.monotonic() > deadline:
            break
        r = mha_bench.run_decode(batch=batch, cache_len=cache_len, d_model=d_model, heads=heads,
                                 repeats=60 if ON_GPU else 5, warmup=10 if ON_GPU else 1, device=device, dtype=dtype)
        t = r["timings"]
        print(f"decode B={batch} cache={cache_len}: course_lib {t['course_lib']['median_s'] * 1e6:.1f} us, "
              f"plain {t['plain_sdpa']['median_s'] * 1e6:.1f} us, ratio {t['course_lib']['ratio_to_best_baseline']:.3f}"
              f" (max |diff| {r['max_abs_output_difference']:.1e})", flush=True)
        record["rows"].append(r)
        write_json(path, record)
    return record


# ----------------------------------------------------------------------------- 5. naive OOM
def naive_oom_probe(batch: int = 4, heads: int = 16, d_head: int = 128) -> dict:
    """Double T from 16k until naive attention (forward, bf16) runs out of memory; SDPA's flash at the same T."""
    if not ON_GPU:
        return {"status": "skipped", "reason": "needs a GPU (torch does not track CPU memory)"}
    probe = {"batch": batch, "heads": heads, "d_head": d_head, "dtype": "bfloat16", "pass": "fwd", "lengths": []}
    T = 16384
    while T <= 131072:
        row = {"T": T}
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
def evaluate_targets(attention: dict | None, modules: dict | None) -> dict:
    """Each target of the GPU chapter, measured value and verdict; None where it was not measured."""
    verdicts: dict = {"targets": TARGETS}
    if modules:
        training = [r for r in modules["rows"] if r["config"]["step"] == mha_bench.TRAINING_STEP]
        decoding = [r for r in modules["rows"] if r["config"]["step"] == mha_bench.DECODE_STEP]
        ratios = [r["timings"]["course_lib"]["ratio_to_best_baseline"] for r in training if r["config"]["seq"] >= 1024]
        plain = [r["timings"]["course_lib"]["median_s"] / r["timings"]["plain_sdpa"]["median_s"]
                 for r in training if r["config"]["seq"] >= 1024]
        decode = [r["timings"]["course_lib"]["ratio_to_best_baseline"] for r in decoding]
        verdicts["module_fwd_bwd_vs_plain_sdpa_worst"] = max(plain) if plain else None
        verdicts["module_fwd_bwd_vs_best_baseline_worst"] = max(ratios) if ratios else None
        verdicts["decode_vs_plain_sdpa_worst"] = max(decode) if decode else None
    if attention:
        verdicts["core_d128"] = attention_suite.versus_best_sdpa(attention, impl="triton", d_head=128, min_T=4096)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the result files (created)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new work after this many seconds")
    parser.add_argument("--stages", default="tests,accuracy,tune,attention,modules,oom",
                        help="comma-separated subset of the stages, for a follow-up run")
    parser.add_argument("--tests", nargs="+", default=None, help="test files (default: every test with a CUDA path)")
    parser.add_argument("--tests-timeout-s", type=float, default=170.0)
    parser.add_argument("--impls", default=",".join(attention_suite.CORE_IMPLS),
                        help="attention-core implementations for the attention stage")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.budget_s)
    info = run.summary["device_info"]
    print(f"gpu-check on {info['device_name']} | torch {torch.__version__} | triton {run.summary['versions']['triton']}"
          f"{'' if ON_GPU else ' | NO GPU: dry run, the CUDA parts are skipped'}", flush=True)
    end = lambda reserve: time.monotonic() + run.left() - reserve  # noqa: E731
    tests, accuracy, attention, modules = {}, None, None, None
    if "tests" in stages:
        tests = run.stage("tests", lambda: run_tests(run, args.tests_timeout_s, args.tests),
                          needs_s=args.tests_timeout_s + 60) or {}
    # A kernel that corrupts memory would poison this process's CUDA context for every later stage:
    # leave the Triton kernel out of the benchmarks if the tests saw that (any other failure is only reported).
    fatal = ("illegal memory", "CUDA error", "misaligned address", "unspecified launch failure")
    kernel_ok = not any(word in f["message"] for f in tests.get("failures", []) for word in fatal)
    run.summary["triton_benchmarked"] = kernel_ok
    if kernel_ok and "accuracy" in stages:
        accuracy = run.stage("accuracy", kernel_accuracy, needs_s=150)
        run.summary["kernel_accuracy"] = accuracy
    if kernel_ok and ON_GPU and "tune" in stages:
        run.summary["kernel_configs_tuned_at_T4096"] = run.stage("tune", tune_at_target_shape, needs_s=140)
    if "attention" in stages:
        impls = tuple(i for i in args.impls.split(",") if i)
        attention = run.stage("attention", lambda: attention_benchmarks(
            run, args.out, end(15 + 20 * ("modules" in stages) + 40 * ("oom" in stages)), kernel_ok, impls),
                              needs_s=100)
    if "modules" in stages:
        modules = run.stage("modules", lambda: module_benchmarks(args.out, end(15)), needs_s=30)
    if "oom" in stages:
        run.summary["naive_oom"] = run.stage("oom", naive_oom_probe, needs_s=10)
    if ON_GPU and kernel_ok:
        from course_lib.kernels import _flash_triton

        run.summary["kernel_configs_chosen"] = {kind: {str(k): c for k, c in table.items()}
                                                for kind, table in _flash_triton.chosen_configs().items()}
    run.summary["verdicts"] = evaluate_targets(attention, modules)
    run.summary["seconds"] = round(time.monotonic() - run.start, 1)
    run.save()
    print(json.dumps({k: run.summary[k] for k in ("stages", "verdicts", "seconds")}, indent=1, default=str))
    return 0 if tests.get("returncode", 0) == 0 and all(s["status"] == "ok" for s in run.summary["stages"].values()) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
