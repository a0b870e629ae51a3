"""What this device is and what it can run: Tensor Core settings, SDPA backends, the device report.

- `device_facts(device)`: the machine and versions every recorded result carries (device name,
  compute capability, CUDA/cuDNN, memory, CPU threads, Python and torch versions, and under
  "versions" every package a run imports) and what the device supports (Tensor Cores, TF32,
  bfloat16, fp8); on a GPU also its SM count, L2 size, and the clocks, power and temperature that
  `nvidia-smi` reports (`nvidia_smi_facts`).
- `tensor_core_settings(...)`: a context manager that turns on TF32 matmuls/convolutions
  (`torch.backends.cuda.matmul.fp32_precision = "tf32"` and `torch.backends.cudnn.conv.fp32_precision`
  where torch has them, else the older `allow_tf32` flags) and restores the previous settings on exit;
  `enable_tensor_cores()` does the same without restoring; `tensor_core_friendly` checks sizes.
- SDPA backends, spelled one way everywhere: "flash", "efficient", "cudnn", "math"
  (`SDPA_BACKENDS`); `sdpa_with_backend` runs one, `sdpa_backend_report` says which accept a problem.
- `device_report(device, ...)`: `device_facts`, the current settings and the SDPA backend report.

    python -m course_lib.tools.device          # prints the device report of this machine (the GPU when there is one)
    python -m course_lib.tools.device cpu      # ... of its CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from course_lib._validate import check_bool, check_positive_int
from course_lib.tools.cli import torch_device

__all__ = [
    "device_facts",
    "package_versions",
    "nvidia_smi_facts",
    "enable_tensor_cores",
    "tensor_core_settings",
    "restore_settings",
    "tensor_core_friendly",
    "SDPA_BACKENDS",
    "sdpa_backend_enum",
    "sdpa_with_backend",
    "sdpa_backend_report",
    "device_report",
]


# ----------------------------------------------------------------------------- Tensor Core settings
# torch 2.9 and newer have one precision setting per backend and operation, `fp32_precision` ("ieee":
# full float32, "tf32": TF32 allowed, "none": inherit from the parent setting), and say that the
# older flags (`torch.backends.cuda.matmul.allow_tf32`, `torch.backends.cudnn.allow_tf32`,
# `torch.set_float32_matmul_precision`) will be deprecated. Once a TF32 setting has been made
# through the new API, torch refuses to *read* the old flags (it reports a mix of the two APIs),
# so where torch has the new API everything here reads and writes the new one only.
_FP32_PRECISION_KEYS = ("generic", "cuda_matmul", "cudnn_conv", "cudnn_rnn")


def _has_fp32_precision() -> bool:
    """Does this torch have the per-backend `fp32_precision` settings (torch 2.9 and newer)?"""
    return hasattr(torch.backends, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _fp32_precision_targets() -> dict[str, Any]:
    """The object whose `fp32_precision` each key names, the parent setting first."""
    cudnn: Any = torch.backends.cudnn  # .conv and .rnn exist only in torch 2.9 and newer
    return {"generic": torch.backends, "cuda_matmul": torch.backends.cuda.matmul,
            "cudnn_conv": cudnn.conv, "cudnn_rnn": cudnn.rnn}


def _current_settings() -> dict:
    """The Tensor Core settings now: the older flags' keys (which recorded results carry) and, where torch
    has them, the `fp32_precision` settings (None where it does not)."""
    if not _has_fp32_precision():
        return {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "fp32_precision": None,
        }
    precision = {key: target.fp32_precision for key, target in _fp32_precision_targets().items()}
    matmul_tf32 = precision["cuda_matmul"] == "tf32"
    return {  # the older keys, read off the new settings (reading the old flags may raise, see above)
        "float32_matmul_precision": "high" if matmul_tf32 else "highest",
        "cuda_matmul_allow_tf32": matmul_tf32,
        "cudnn_allow_tf32": precision["cudnn_conv"] == "tf32",
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "fp32_precision": precision,
    }


def restore_settings(settings: dict) -> None:
    """Apply settings as returned by `enable_tensor_cores` (undo it).

    With torch's `fp32_precision` settings, a dict without them (recorded by an older torch) is
    translated: TF32 allowed -> "tf32", not allowed -> "ieee".
    """
    if _has_fp32_precision():
        precision = settings.get("fp32_precision") or {
            "generic": _fp32_precision_targets()["generic"].fp32_precision,
            "cuda_matmul": "tf32" if settings["cuda_matmul_allow_tf32"] else "ieee",
            "cudnn_conv": "tf32" if settings["cudnn_allow_tf32"] else "ieee",
            "cudnn_rnn": "tf32" if settings["cudnn_allow_tf32"] else "ieee",
        }
        targets = _fp32_precision_targets()
        for key in _FP32_PRECISION_KEYS:  # the parent ("generic") first, then the settings that may override it
            targets[key].fp32_precision = precision[key]
    else:
        # set_float32_matmul_precision also sets cuda.matmul.allow_tf32 ("high"/"medium" -> True),
        # so it goes first and the explicit flags after it.
        torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
        torch.backends.cuda.matmul.allow_tf32 = settings["cuda_matmul_allow_tf32"]
        torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]


def enable_tensor_cores(tf32: bool = True, cudnn_benchmark: bool = True) -> dict:
    """Turn on Tensor Core friendly settings; return the previous ones (pass them to `restore_settings` to undo).

    tf32=True: float32 matmuls and convolutions may round their inputs to TF32 (10-bit mantissa,
    float32 range) and run on Tensor Cores (Ampere and newer); float16/bfloat16 use Tensor Cores
    regardless. On a CPU these flags change nothing. Where torch has them (2.9 and newer) this sets
    `torch.backends.cuda.matmul.fp32_precision` and `torch.backends.cudnn.conv.fp32_precision` (and
    `.rnn`) to "tf32" (or "ieee" for tf32=False), leaving `torch.backends.fp32_precision` as it is;
    on an older torch, the flags `torch.set_float32_matmul_precision("high")`,
    `torch.backends.cuda.matmul.allow_tf32` and `torch.backends.cudnn.allow_tf32`.
    """
    check_bool("tf32", tf32)
    check_bool("cudnn_benchmark", cudnn_benchmark)
    previous = _current_settings()
    mode = "tf32" if tf32 else "ieee"
    precision = None
    if _has_fp32_precision():
        precision = {"generic": _fp32_precision_targets()["generic"].fp32_precision,
                     "cuda_matmul": mode, "cudnn_conv": mode, "cudnn_rnn": mode}
    restore_settings({
        "float32_matmul_precision": "high" if tf32 else "highest",
        "cuda_matmul_allow_tf32": tf32,
        "cudnn_allow_tf32": tf32,
        "cudnn_benchmark": cudnn_benchmark,
        "fp32_precision": precision,
    })
    return previous


@contextlib.contextmanager
def tensor_core_settings(tf32: bool = True, cudnn_benchmark: bool = True) -> Iterator[dict]:
    """`with tensor_core_settings(): ...` runs with TF32 on and restores the previous settings."""
    previous = enable_tensor_cores(tf32=tf32, cudnn_benchmark=cudnn_benchmark)
    try:
        yield _current_settings()
    finally:
        restore_settings(previous)


def tensor_core_friendly(*sizes: int, dtype: torch.dtype = torch.float16) -> dict[int, bool]:
    """Is each matmul dimension a multiple of the Tensor Core tile granularity for dtype?

    16 bytes per row is what the kernels want: multiples of 8 for float16/bfloat16, of 4 for
    TF32/float32, of 16 for fp8. Other sizes still work, padded or on slower kernels.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, e.g. torch.float16; got {dtype!r}")
    sizes = tuple(check_positive_int("size", s) for s in sizes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    multiple = 16 // itemsize
    return {int(s): int(s) % multiple == 0 for s in sizes}


# ----------------------------------------------------------------------------- device + SDPA report
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa_backend_enum(name: str):
    """"flash" / "efficient" / "cudnn" / "math" -> the torch.nn.attention.SDPBackend member."""
    from torch.nn.attention import SDPBackend

    if name not in SDPA_BACKENDS:
        raise ValueError(f"name must be one of {', '.join(SDPA_BACKENDS)}; got {name!r}")
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def sdpa_with_backend(name: str, q, k, v, *, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False):
    """F.scaled_dot_product_attention restricted to one backend: "flash", "efficient", "cudnn" or "math".

    Raises RuntimeError when that backend cannot run these inputs on this device.
    """
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(sdpa_backend_enum(name)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def _try_backend(name: str, q, k, v, attn_mask, dropout_p, is_causal) -> tuple[bool, str]:
    """Run SDPA restricted to one backend on the given inputs: does it run?"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                sdpa_with_backend(name, q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        except RuntimeError as e:
            reasons = [str(w.message).strip() for w in caught] or [str(e).splitlines()[0]]
            return False, "; ".join(reasons)
    return True, ""


def _cuda_reasons(name: str, q, k, v, attn_mask, dropout_p, is_causal) -> tuple[bool, list[str]]:
    """torch.backends.cuda.can_use_*(SDPAParams, debug=True): the kernel's own checks and reasons."""
    from torch.backends import cuda as tcuda

    check = {"flash": tcuda.can_use_flash_attention, "efficient": tcuda.can_use_efficient_attention,
             "cudnn": getattr(tcuda, "can_use_cudnn_attention", None)}.get(name)
    if check is None:
        return True, []
    # SDPAParams(query, key, value, attn_mask, dropout, is_causal, enable_gqa)
    params = tcuda.SDPAParams(q, k, v, attn_mask, float(dropout_p), bool(is_causal), False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = bool(check(params, debug=True))
    return ok, [str(w.message).strip() for w in caught]


def sdpa_backend_report(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0, is_causal: bool = False) -> dict[str, dict]:
    """For each SDPA backend: {"eligible": bool, "reasons": [why not]} for these inputs.

    On CUDA the reasons come from torch.backends.cuda.can_use_* with debug=True; every verdict is
    also confirmed by running the backend on the inputs. On the CPU, FLASH_ATTENTION selects
    torch's CPU flash kernel and MATH the reference; the memory-efficient and cuDNN kernels
    exist only for CUDA.
    """
    report = {}
    for name in SDPA_BACKENDS:
        if q.device.type != "cuda" and name in ("efficient", "cudnn"):
            report[name] = {"eligible": False,
                            "reasons": [f"the {name} kernel needs a CUDA device; the inputs are on {q.device.type}"]}
            continue
        runs, run_error = _try_backend(name, q, k, v, attn_mask, dropout_p, is_causal)
        reasons: list[str] = []
        if q.device.type == "cuda":
            _, reasons = _cuda_reasons(name, q, k, v, attn_mask, dropout_p, is_causal)
        if not runs and not reasons:
            reasons = [run_error]
        report[name] = {"eligible": runs, "reasons": [] if runs else reasons}
    return report


def _device(device: torch.device | str | None) -> torch.device:
    """device, or the GPU when there is one, else the CPU; a clear error for a name torch does not know
    or a CUDA device this machine does not have."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda'; got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device} but torch sees no CUDA device here (torch {torch.__version__})")
    return device


# the packages a course run imports; their versions come from importlib.metadata (nothing is imported for them)
VERSIONED_PACKAGES = ("triton", "numpy", "matplotlib", "pytest", "pytest-xdist", "transformers", "safetensors")
# nvidia-smi --query-gpu field -> our key (units: MHz, W, degrees C; pstate is P0 (fastest) .. P12)
NVIDIA_SMI_FIELDS = {"clocks.sm": "sm_clock_mhz", "clocks.max.sm": "sm_clock_max_mhz", "clocks.mem": "mem_clock_mhz",
                     "power.limit": "power_limit_w", "power.draw": "power_draw_w", "temperature.gpu": "temperature_c",
                     "pstate": "pstate"}


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """python, torch, the CUDA and cuDNN torch was built with, and each of VERSIONED_PACKAGES (+ extra)
    as installed (None where it is not): read from the packages' metadata, so nothing is imported."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                       "cuda": torch.version.cuda, "cudnn": None if cudnn is None else str(cudnn)}
    for name in (*VERSIONED_PACKAGES, *extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _smi_value(text: str) -> float | str | None:
    text = text.strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "NOT SUPPORTED"):
        return None  # "[N/A]", "[Not Supported]": the driver does not report it
    try:
        return float(text)
    except ValueError:
        return text  # pstate: "P0"


def nvidia_smi_facts(uuid: str | None = None, index: int = 0, *, timeout_s: float = 5.0) -> dict:
    """The clocks, power limit and draw, temperature and performance state of one GPU, from
    `nvidia-smi --query-gpu=... --format=csv,noheader,nounits`, read at the moment of the call (a GPU
    that is idle shows idle clocks; the maximum SM clock and the power limit say what it can do).

    The GPU is picked by uuid (torch's `get_device_properties(...).uuid`) where given and found, else the
    index-th line. Never raises: without nvidia-smi, or if it fails, times out or prints something
    unexpected, every value is None and "error" says why (else "error" is None).
    """
    result: dict = {key: None for key in NVIDIA_SMI_FIELDS.values()} | {"error": None}
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return result | {"error": "nvidia-smi not found on PATH"}
    query = "uuid," + ",".join(NVIDIA_SMI_FIELDS)
    try:
        done = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return result | {"error": f"nvidia-smi failed: {type(e).__name__}: {str(e)[:200]}"}
    if done.returncode != 0:
        return result | {"error": f"nvidia-smi exited with {done.returncode}: {(done.stderr or done.stdout)[:200]}"}
    rows = [[part.strip() for part in line.split(",")] for line in done.stdout.splitlines() if line.strip()]
    rows = [row for row in rows if len(row) == 1 + len(NVIDIA_SMI_FIELDS)]
    if not rows:
        return result | {"error": f"nvidia-smi printed no line of {1 + len(NVIDIA_SMI_FIELDS)} fields: "
                                  f"{done.stdout[:200]!r}"}
    wanted = str(uuid).lower().removeprefix("gpu-") if uuid else None
    matches = [row for row in rows if wanted and row[0].lower().removeprefix("gpu-") == wanted]
    if matches:
        row = matches[0]
    elif index < len(rows):
        row = rows[index]
    else:
        return result | {"error": f"nvidia-smi lists {len(rows)} GPU(s), none with uuid {uuid} or index {index}"}
    for key, text in zip(NVIDIA_SMI_FIELDS.values(), row[1:], strict=True):
        result[key] = _smi_value(text)
    return result


def device_facts(device: torch.device | str | None = None) -> dict:
    """The machine, its versions and what it supports: what every recorded result carries.

    device defaults to the GPU when there is one, else the CPU. "versions" holds `package_versions()`.
    On a GPU: "sm_count" (streaming multiprocessors), "l2_cache_bytes" (None where torch does not
    report it) and "nvidia_smi" (`nvidia_smi_facts`: clocks, power limit and draw, temperature, pstate).
    """
    device = _device(device)
    cpu = platform.processor() or platform.machine()
    facts: dict = {
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        major, minor = props.major, props.minor
        l2 = getattr(props, "L2_cache_size", None)
        uuid = getattr(props, "uuid", None)
        facts |= {
            "device_name": props.name,
            "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "total_memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": getattr(props, "multi_processor_count", None),
            "l2_cache_bytes": int(l2) if l2 else None,
            "tensor_cores": major >= 7,  # Volta (7.0) and newer
            "tf32_supported": major >= 8,  # Ampere (8.0) and newer
            "bf16_supported": bool(torch.cuda.is_bf16_supported()),
            "fp8_supported": (major, minor) >= (8, 9),  # Ada (8.9), Hopper (9.0)
            "nvidia_smi": nvidia_smi_facts(None if uuid is None else str(uuid),
                                           torch.cuda.current_device() if device.index is None else device.index),
        }
    else:
        facts |= {
            "device_name": f"CPU ({cpu}, {facts['cpu_threads']} threads)",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA torch's kernels use
            "compute_capability": None,
            "cuda": None,
            "tensor_cores": False,
            "tf32_supported": False,
            "bf16_supported": True,  # bf16 autocast runs on any CPU (fast with AVX512-BF16/AMX)
            "fp8_supported": False,
        }
    facts["versions"] = package_versions()
    return facts


def device_report(device: torch.device | str | None = None, *, shape: tuple[int, int, int, int] = (2, 8, 256, 64),
                  dtype: torch.dtype | None = None, is_causal: bool = False, with_mask: bool = False) -> dict:
    """`device_facts`, the current Tensor Core settings, and which SDPA backends q, k, v of `shape` can use.

    shape is (B, H, T, d_head). dtype defaults to bfloat16 where supported (else float32). with_mask
    adds a boolean (T, T) mask (flash attention does not take an arbitrary mask).
    """
    device = _device(device)
    if (not isinstance(shape, tuple | list) or len(shape) != 4
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"shape must be four positive ints (B, H, T, d_head); got {shape!r}")
    report = device_facts(device)
    report["settings"] = _current_settings()
    if dtype is None:
        dtype = torch.bfloat16 if report["bf16_supported"] else torch.float32
    B, H, T, d_head = shape
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d_head, generator=generator).to(device, dtype) for _ in range(3))
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril() if with_mask else None
    report["sdpa_problem"] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                              "is_causal": is_causal, "with_mask": with_mask}
    report["sdpa_backends"] = sdpa_backend_report(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
    return report


def main(argv: list[str] | None = None) -> int:
    """Print this machine's device report as JSON (the GPU when there is one, or the device named)."""
    parser = argparse.ArgumentParser(prog="python -m course_lib.tools.device",
                                     description="Print this machine's device report as JSON: device_facts, the "
                                                 "Tensor Core settings and which SDPA backends run.")
    parser.add_argument("device", nargs="?", type=torch_device, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    args = parser.parse_args(argv)  # a bad device, or an unknown flag, exits with argparse's usage error (2)
    print(json.dumps(device_report(args.device), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
