"""Number formats, the error they cause in attention, and mixed-precision training.

- `number_formats()`: bits, range and epsilon of float64/32, TF32, bfloat16, float16 and fp8,
  read from `torch.finfo` (TF32 is not a storage dtype: it is float32 with a 10-bit mantissa
  inside the matmul units, so its row is derived from float32's exponent and 10 mantissa bits).
- `relative_error(out, ref)`: ||out - ref|| / ||ref||, computed in float64.
- `within(difference, bound)`: a rounding-level difference printed with its verdict, "4.8e-07 <= 1e-05".
- `attention_error_table(device, ...)`: that error, per precision setting and implementation,
  against a float64 reference.
- `autocast_dtype`, `amp_train_step`: one mixed-precision training step (autocast + GradScaler).

What the device itself supports (Tensor Cores, TF32 settings, SDPA backends) is in `course_lib.tools.device`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from course_lib import numpy_ref
from course_lib.attention import naive_attention, scaled_dot_product_attention
from course_lib.masks import causal_mask
from course_lib.tools.device import tensor_core_settings

__all__ = [
    "amp_backward_step",
    "NumberFormat",
    "number_formats",
    "relative_error",
    "within",
    "attention_error_table",
    "autocast_dtype",
    "amp_train_step",
]


# ----------------------------------------------------------------------------- number formats
@dataclass(frozen=True)
class NumberFormat:
    """A floating-point format's layout and the limits that follow from it (notebook 09's table)."""

    name: str
    bits: int  # storage bits (TF32: the 19 bits the matmul unit keeps; stored as 32)
    exponent_bits: int
    mantissa_bits: int  # explicit fraction bits (the leading 1 is implicit)
    max: float  # largest finite value
    smallest_normal: float
    eps: float  # gap between 1.0 and the next representable number = 2**-mantissa_bits
    torch_dtype: str | None  # None for TF32, which is a compute mode, not a dtype


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
def relative_error(out: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, *,
                   per_matrix: bool = False) -> float | np.floating | np.ndarray:
    """||out - ref||_F / ||ref||_F, computed in float64; torch tensors (any device) or numpy arrays.

    per_matrix=True gives one error per matrix (over the last two axes), shape out.shape[:-2].
    ref must not be all zeros (per matrix, with per_matrix): a relative error is undefined there.
    """
    out64, ref64 = (x.detach().to("cpu", torch.float64).numpy() if isinstance(x, torch.Tensor)
                    else np.asarray(x, dtype=np.float64) for x in (out, ref))
    if out64.shape != ref64.shape:
        raise ValueError(f"out and ref must have the same shape; got out {out64.shape}, ref {ref64.shape}")
    if per_matrix:
        if ref64.ndim < 2:
            raise ValueError(f"per_matrix=True needs matrices (..., T, S); got ref of shape {ref64.shape}")
        axes: tuple[int, ...] | None = (-2, -1)
    else:
        axes = None
    denom = np.linalg.norm(ref64.reshape(-1) if axes is None else ref64, axis=axes)
    if np.any(denom == 0):
        raise ValueError("ref is all zeros" + (" in some matrix" if per_matrix else "")
                         + ": a relative error is undefined (use fresh random inputs, not zeros)")
    err = np.linalg.norm((out64 - ref64).reshape(-1) if axes is None else out64 - ref64, axis=axes) / denom
    return err if per_matrix else float(err)


def within(difference: float | torch.Tensor | np.floating, bound: float) -> str:
    """A difference that should be rounding error, with its verdict: "4.8e-07 ≤ 1e-05", or "3.2e-02 > 1e-05".

    Two computations of the same thing in floating point agree only up to rounding, and the digits of that
    rounding depend on the CPU: torch and numpy pick their kernels by instruction set (AVX-512, AVX2, none,
    ARM's NEON), and the thread count changes the order of sums. Whether the difference is within a stated
    bound does not. The notebooks print this string, so a learner sees the number; nbval's sanitiser
    (tests/nbval_sanitize.cfg) compares only the verdict of a "≤" result, so every CPU gives the same
    compared output, and a difference above its bound fails the comparison with its digits shown.
    """
    if isinstance(bound, bool) or not isinstance(bound, int | float) or not 0 < bound < math.inf:
        raise ValueError(f"bound must be a positive finite number; got {bound!r}")
    if isinstance(difference, torch.Tensor):
        if difference.numel() != 1 or difference.is_complex():
            raise TypeError(f"difference must be one real number; got a tensor of shape "
                            f"{tuple(difference.shape)} ({difference.dtype})")
        difference = difference.item()
    if isinstance(difference, bool) or not isinstance(difference, int | float | np.integer | np.floating):
        raise TypeError(f"difference must be a real number; got {type(difference).__name__}")
    difference = float(difference)
    if difference < 0:
        raise ValueError(f"difference must be a size (>= 0, e.g. a max |a - b|); got {difference!r}")
    verdict = "≤" if difference <= bound else ">"  # NaN is not within any bound
    return f"{difference:.1e} {verdict} {bound:.0e}"


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
        ref_np, _ = numpy_ref.scaled_dot_product_attention(qr.numpy(), kr.numpy(), vr.numpy(), mask)
        ref = torch.from_numpy(ref_np)
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


def amp_backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, *,
                      scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None) -> tuple[float, bool]:
    """The update after a (mixed-precision) forward: backward, unscale, clip, step. Returns (grad norm, finite).

    With a GradScaler (float16) the loss is scaled before backward and the gradients unscaled before
    anything reads them, so the norm, the clipping and the finiteness check see the true gradients; the
    scaler skips the step (and lowers its factor) when a gradient is inf/NaN. Without one, a plain backward
    and step. `params` are the parameters to clip and check (a list: it is read twice).
    """
    params = [p for p in params if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the gradients are now the true ones: check them, clip them here
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf") if grad_clip is None else grad_clip)
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when a gradient was inf/NaN
        scaler.update()
    else:
        optimizer.step()
    return float(grad_norm), grads_finite


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
    _, grads_finite = amp_backward_step(loss, optimizer, model.parameters(), scaler=scaler)
    return {"loss": float(loss.detach()), "grads_finite": grads_finite,
            "scale": None if scaler is None else float(scaler.get_scale())}
