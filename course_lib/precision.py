"""Number formats, Tensor Core settings and what this device can run.

- `number_formats()`: bits, range and epsilon of float64/32, TF32, bfloat16, float16 and fp8,
  read from `torch.finfo` (TF32 is not a storage dtype: it is float32 with a 10-bit mantissa
  inside the matmul units, so its row is derived from float32's exponent and 10 mantissa bits).
- `relative_error(out, ref)`: ||out - ref|| / ||ref||, computed in float64.
- `tensor_core_settings(...)`: a context manager that turns on TF32 matmuls/convolutions
  (`torch.set_float32_matmul_precision("high")`) and restores the previous settings on exit;
  `enable_tensor_cores()` does the same without restoring.
- `device_report(device, ...)`: compute capability, bf16 / TF32 / fp8 support and, for a given
  attention problem, which SDPA backends are eligible and why not (`sdpa_backend_report`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "NumberFormat",
    "number_formats",
    "relative_error",
    "enable_tensor_cores",
    "tensor_core_settings",
    "restore_settings",
    "tensor_core_friendly",
    "device_report",
    "sdpa_backend_report",
    "SDPA_BACKENDS",
    "sdpa_backend_enum",
    "sdpa_with_backend",
]


# ----------------------------------------------------------------------------- number formats
@dataclass(frozen=True)
class NumberFormat:
    name: str
    bits: int  # storage bits (TF32: the 19 bits the matmul unit keeps; stored as 32)
    exponent_bits: int
    mantissa_bits: int  # explicit fraction bits (the leading 1 is implicit)
    max: float  # largest finite value
    smallest_normal: float
    eps: float  # gap between 1.0 and the next representable number = 2**-mantissa_bits
    torch_dtype: str | None  # None for TF32, which is a compute mode, not a dtype

    def as_dict(self) -> dict:
        return asdict(self)


_LAYOUT = {  # (exponent bits, mantissa bits); the sign bit makes up the rest
    torch.float64: (11, 52),
    torch.float32: (8, 23),
    torch.bfloat16: (8, 7),
    torch.float16: (5, 10),
    torch.float8_e4m3fn: (4, 3),
    torch.float8_e5m2: (5, 2),
}


def number_formats() -> list[NumberFormat]:
    """The floating-point formats of deep learning, widest first, from torch.finfo."""
    rows = []
    for dtype, (exp_bits, man_bits) in _LAYOUT.items():
        info = torch.finfo(dtype)
        name = str(dtype).removeprefix("torch.")
        rows.append(NumberFormat(name, info.bits, exp_bits, man_bits, float(info.max),
                                 float(info.smallest_normal), float(info.eps), name))
        if dtype == torch.float32:
            # TF32: float32's 8 exponent bits (same range) with float16's 10 mantissa bits.
            rows.append(NumberFormat("tf32", 19, 8, 10, 2.0**127 * (2 - 2.0**-10), float(info.smallest_normal),
                                     2.0**-10, None))
    return rows


# ----------------------------------------------------------------------------- error metric
def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius norms, in float64). ref must not be all zeros."""
    if out.shape != ref.shape:
        raise ValueError(f"out and ref must have the same shape; got out {tuple(out.shape)}, ref {tuple(ref.shape)}")
    ref64 = ref.detach().to("cpu", torch.float64)
    denom = torch.linalg.vector_norm(ref64)
    if denom == 0:
        raise ValueError("ref is all zeros: a relative error is undefined (use fresh random inputs, not zeros)")
    return float(torch.linalg.vector_norm(out.detach().to("cpu", torch.float64) - ref64) / denom)


# ----------------------------------------------------------------------------- Tensor Core settings
def _current_settings() -> dict:
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def restore_settings(settings: dict) -> None:
    """Apply settings as returned by `enable_tensor_cores` (undo it)."""
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
    regardless. On a CPU these flags change nothing.
    """
    previous = _current_settings()
    restore_settings({
        "float32_matmul_precision": "high" if tf32 else "highest",
        "cuda_matmul_allow_tf32": tf32,
        "cudnn_allow_tf32": tf32,
        "cudnn_benchmark": cudnn_benchmark,
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
    itemsize = torch.empty((), dtype=dtype).element_size()
    multiple = 16 // itemsize
    return {int(s): int(s) % multiple == 0 for s in sizes}


# ----------------------------------------------------------------------------- device + SDPA report
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa_backend_enum(name: str):
    """"flash" / "efficient" / "cudnn" / "math" -> the torch.nn.attention.SDPBackend member."""
    from torch.nn.attention import SDPBackend

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
        reasons = []
        if q.device.type == "cuda":
            _, reasons = _cuda_reasons(name, q, k, v, attn_mask, dropout_p, is_causal)
        if not runs and not reasons:
            reasons = [run_error]
        report[name] = {"eligible": runs, "reasons": [] if runs else reasons}
    return report


def device_report(device: torch.device | str | None = None, *, shape: tuple[int, int, int, int] = (2, 8, 256, 64),
                  dtype: torch.dtype | None = None, is_causal: bool = False, with_mask: bool = False) -> dict:
    """What this device supports, and which SDPA backends q, k, v of `shape` (B, H, T, d_head) can use.

    dtype defaults to bfloat16 where supported (else float32). with_mask adds a boolean (T, T) mask
    (flash attention does not take an arbitrary mask).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report: dict = {"device_type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        major, minor = props.major, props.minor
        report |= {
            "device_name": props.name,
            "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda,
            "tensor_cores": major >= 7,  # Volta (7.0) and newer
            "tf32_supported": major >= 8,  # Ampere (8.0) and newer
            "bf16_supported": bool(torch.cuda.is_bf16_supported()),
            "fp8_supported": (major, minor) >= (8, 9),  # Ada (8.9), Hopper (9.0)
        }
    else:
        report |= {
            "device_name": f"CPU ({torch.backends.cpu.get_cpu_capability()})",
            "compute_capability": None,
            "cuda": None,
            "tensor_cores": False,
            "tf32_supported": False,
            "bf16_supported": True,  # bf16 autocast runs on any CPU (fast with AVX512-BF16/AMX)
            "fp8_supported": False,
        }
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


# ----------------------------------------------------------------------------- accuracy per dtype
def _settings_for(device_type: str) -> list[str]:
    """The precision settings measured on a device: float16 and TF32 only where they use Tensor Cores."""
    if device_type == "cuda":
        return ["float64", "float32", "tf32", "bfloat16-autocast", "float16-autocast", "bfloat16", "float16"]
    return ["float64", "float32", "bfloat16-autocast"]


def _run_in_setting(fn, setting: str, q, k, v):
    """Call fn(q, k, v) with q, k, v given in float64, under one precision setting."""
    device_type = q.device.type
    if setting == "float64":
        return fn(q, k, v)
    if setting in ("bfloat16", "float16"):
        dtype = getattr(torch, setting)
        return fn(q.to(dtype), k.to(dtype), v.to(dtype))
    q32, k32, v32 = q.float(), k.float(), v.float()
    if setting == "float32":
        with tensor_core_settings(tf32=False, cudnn_benchmark=False):
            return fn(q32, k32, v32)
    if setting == "tf32":
        with tensor_core_settings(tf32=True, cudnn_benchmark=False):
            return fn(q32, k32, v32)
    dtype = {"bfloat16-autocast": torch.bfloat16, "float16-autocast": torch.float16}[setting]
    with torch.autocast(device_type, dtype=dtype):
        return fn(q32, k32, v32)


def attention_error_table(device: torch.device | str = "cpu", *, shape: tuple[int, int, int, int] = (2, 4, 128, 64),
                          settings: list[str] | None = None, seed: int = 0, is_causal: bool = False) -> list[dict]:
    """||out - ref|| / ||ref|| against a float64 numpy reference, per precision setting and implementation.

    Implementations: course_lib's fast path, course_lib's math path (need_weights=True), torch's
    SDPA (default backend) and the naive formula run in the setting's dtype. Fresh random inputs
    (standard normal, never zeros) are drawn once in float64 and rounded to the lowest-precision
    dtype of each setting *before* the reference is computed, so the error measures the arithmetic
    of each implementation, not the rounding of the inputs (which all of them share).
    `ratio` = course_lib fast-path error / SDPA error (flash-attn's rule: at most 2).
    """
    from course_lib import numpy_ref
    from course_lib.attention import scaled_dot_product_attention
    from course_lib.bench.attention import naive_attention  # lazy: the bench suite imports this module
    from course_lib.masks import causal_mask

    device = torch.device(device)
    settings = settings or _settings_for(device.type)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = causal_mask(shape[-2], shape[-2]).numpy() if is_causal else None

    impls = {
        "course_lib": lambda a, b, c: scaled_dot_product_attention(a, b, c, is_causal=is_causal),
        "course_lib_math": lambda a, b, c: scaled_dot_product_attention(a, b, c, is_causal=is_causal,
                                                                        need_weights=True)[0],
        "torch_sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=is_causal),
        "naive": lambda a, b, c: naive_attention(a, b, c, is_causal),
    }
    rows = []
    for setting in settings:
        low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(setting.removesuffix("-autocast"))
        if low is None and setting == "tf32":
            low = torch.float32  # TF32 rounds inside the matmul; the stored inputs are float32
        if low is None:
            low = torch.float64 if setting == "float64" else torch.float32
        qr, kr, vr = (t.to(low).to(torch.float64) for t in (q, k, v))  # the inputs every impl actually sees
        ref, _ = numpy_ref.scaled_dot_product_attention(qr.numpy(), kr.numpy(), vr.numpy(), mask)
        ref = torch.from_numpy(ref)
        row: dict = {"setting": setting, "device": device.type}
        with torch.no_grad():
            for name, fn in impls.items():
                out = _run_in_setting(fn, setting, qr.to(device), kr.to(device), vr.to(device))
                row[f"{name}_dtype"] = str(out.dtype).removeprefix("torch.")
                row[name] = relative_error(out, ref)
        row["ratio"] = row["course_lib"] / row["torch_sdpa"] if row["torch_sdpa"] > 0 else float("nan")
        row["ratio_math"] = row["course_lib_math"] / row["torch_sdpa"] if row["torch_sdpa"] > 0 else float("nan")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- mixed-precision training
def autocast_dtype(device_type: str) -> torch.dtype:
    """bfloat16 where it is supported (CPU, Ampere+ GPUs), float16 on older GPUs."""
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def amp_train_step(model: torch.nn.Module, loss_fn, inputs, targets, optimizer: torch.optim.Optimizer, *,
                   dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None) -> dict:
    """One mixed-precision step: forward under autocast, backward (through a GradScaler for float16).

    float16 gradients underflow (anything below 6e-8 becomes 0): the GradScaler multiplies the loss
    by a large factor before backward, divides the gradients by it before the update, and skips the
    step (and lowers the factor) when any gradient is inf/NaN. bfloat16 has float32's range: no scaler.
    Returns {"loss": float, "grads_finite": bool, "scale": float or None}.
    """
    device_type = next(model.parameters()).device.type
    dtype = dtype or autocast_dtype(device_type)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=dtype):
        loss = loss_fn(model(inputs), targets)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the gradients are now the true ones: check them, clip them here
    else:
        loss.backward()
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when a gradient was inf/NaN
        scaler.update()
    else:
        optimizer.step()
    return {"loss": float(loss.detach()), "grads_finite": grads_finite,
            "scale": None if scaler is None else float(scaler.get_scale())}
