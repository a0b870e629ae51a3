"""Hand-written attention kernels: a FlashAttention-style forward and backward pass in Triton.

    from course_lib.kernels import flash_attention
    out = flash_attention(q, k, v, is_causal=True)      # q, k, v (..., T, d_head); differentiable

Triton is imported lazily, on the first call, so `import course_lib` works where Triton is not
installed (it ships wheels for Linux x86-64 only; elsewhere `triton_available()` is False and a
call raises ImportError saying so).

CPU-only machines: Triton compiles kernels for GPUs only, but it has an *interpreter* that runs
the same kernel source on the CPU with numpy, one program at a time (slow, fine for small tests
and for reading the kernel). It is switched on by the environment variable TRITON_INTERPRET=1,
which must be set before triton is imported. When no CUDA device is present and triton has not
been imported yet, this module sets TRITON_INTERPRET=1 itself before importing it. If you import
triton yourself first on such a machine, set the variable before doing so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import torch

from course_lib._validate import shape_str

__all__ = [
    "flash_attention",
    "FlashAttentionFunction",
    "triton_available",
    "interpreter_active",
    "kernel_tolerance",
    "unit_roundoff",
    "MIN_COMPUTE_CAPABILITY",
    "kernel_unsupported_reason",
    "HOPPER_MIN_TRITON",
    "hopper_kernel_reason",
    "forward_variant",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_D_HEAD = 256
_PRECISIONS = ("ieee", "tf32")
# Triton compiles for NVIDIA GPUs of compute capability 8.0 (Ampere) and newer; older cards (a T4 is 7.5,
# a V100 7.0) are outside what it supports, and the kernel's bfloat16 tiles need 8.0 anyway.
MIN_COMPUTE_CAPABILITY = (8, 0)


def _check_precision(input_precision: object) -> None:
    if input_precision not in _PRECISIONS:
        raise ValueError(
            f"input_precision must be 'ieee' (float32 products, exact) or 'tf32' (float32 inputs rounded to "
            f"10 mantissa bits on the Tensor Cores); got {input_precision!r}"
        )


def unit_roundoff(dtype: torch.dtype, input_precision: str = "ieee") -> float:
    """u = 2^-(significand bits): the largest relative error of one rounding to the nearest number.

    The significand bits count the implicit leading 1: float32 24, TF32 11 (what a Tensor Core keeps
    of a float32 input when input_precision="tf32"), float16 11, bfloat16 8.
    """
    bits = {torch.float32: 11 if input_precision == "tf32" else 24, torch.float16: 11, torch.bfloat16: 8}
    if dtype not in bits:
        raise TypeError(f"dtype must be float16, bfloat16 or float32; got {dtype}")
    return 2.0 ** -bits[dtype]


def kernel_tolerance(dtype: torch.dtype, input_precision: str = "ieee", *, length: int = 1) -> float:
    """Bound on ||kernel - float64 reference|| / ||reference|| for outputs and gradients of random inputs.

    Derived from the roundings the kernel makes, each at most u (`unit_roundoff`) relative, the
    reference being computed in float64 from the same (already rounded) q, k, v and dO:
    - forward: the probabilities P rounded to the input dtype before P V, the output rounded to it,
      and, for TF32, q, k and v rounded inside the dot products (the score error u * |q| |k| / sqrt(d)
      moves each weight by that much, relative): at most ~4 roundings of size u;
    - backward: dS = P (dP - delta) is rounded before dS K and dS^T Q, and dP - delta cancels
      leading digits (|dP - delta| is smaller than |dP|), which a factor 2 covers;
    - float32 accumulation over `length` terms adds ~sqrt(length) * 2^-24 (random rounding errors add
      like a random walk; Higham's probabilistic bound).
    Hence 8 u + 2 sqrt(length) 2^-24. It is a bound on typical random inputs, not on adversarial ones.
    """
    _check_precision(input_precision)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int; got {length!r}")
    return 8 * unit_roundoff(dtype, input_precision) + 2 * length**0.5 * 2.0**-24


def triton_available() -> bool:
    """True when the triton package is installed (it need not have been imported)."""
    return "triton" in sys.modules or importlib.util.find_spec("triton") is not None


def kernel_unsupported_reason(device: torch.device | str) -> str | None:
    """Why the Triton kernel cannot run on `device`, or None when it can.

    A CPU runs it in Triton's interpreter; a CUDA GPU needs compute capability 8.0 or newer
    (`MIN_COMPUTE_CAPABILITY`): on an older one (a T4, as free notebook services lend) use torch's
    fused attention, `course_lib.attention.scaled_dot_product_attention(..., backend="auto")`.
    """
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or a str; got {type(device).__name__}")
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the Triton kernel runs on a CUDA GPU or, interpreted, on the CPU; got device {str(device)!r}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        need = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        return (f"the Triton kernel needs a GPU of compute capability {need} or newer (Ampere, Ada, Hopper, "
                f"Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}: use backend='auto' "
                "(torch's fused attention) on this GPU")
    return None


# The forward kernel for Hopper (tensor descriptors + warp specialization, `_flash_triton._attn_fwd_ws`)
# was compiled for sm_90 with Triton 3.6.0 and 3.7.1, which both split it into a producer and two
# consumer warpgroups; older Triton lacks on-device tensor descriptors or the warp_specialize flag.
HOPPER_MIN_TRITON = (3, 6)
_HOPPER_D_HEADS = (64, 128)  # the head sizes its configs were tuned and checked for


def _version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0" or "3.7.1+git1234"; (0, 0) if it has none."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def hopper_kernel_reason(capability: tuple[int, int], triton_version: str, dtype: torch.dtype, d_head: int,
                         aligned: bool = True) -> str | None:
    """Why the forward pass takes the portable kernel instead of the Hopper one; None when it takes the Hopper one.

    The Hopper kernel needs compute capability 9.x (the Tensor Memory Accelerator and warpgroup
    matrix instructions; Blackwell's 10.x is not checked here, so it takes the portable kernel),
    Triton 3.6 or newer, float16 or bfloat16, d_head 64 or 128, and 16-byte aligned data.
    """
    if tuple(capability)[:1] != (9,):
        return f"compute capability {capability[0]}.{capability[1]} is not Hopper's 9.x"
    if _version_tuple(triton_version) < HOPPER_MIN_TRITON:
        need = ".".join(map(str, HOPPER_MIN_TRITON))
        return f"Triton {triton_version} is older than {need}, the oldest that warp-specializes this kernel"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype} is not float16 or bfloat16"
    if d_head not in _HOPPER_D_HEADS:
        return f"d_head {d_head} is not one of {_HOPPER_D_HEADS}"
    if not aligned:
        return "q, k or v does not start at a 16-byte aligned address (the copy engine needs one)"
    return None


KERNELS = ("auto", "hopper", "portable")  # flash_attention's `kernel` argument


def _hopper_reason_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if q.device.type != "cuda" or interpreter_active():
        return "the Hopper kernel runs compiled on a CUDA GPU"
    import triton

    aligned = all(t.data_ptr() % 16 == 0 for t in (q, k, v))
    return hopper_kernel_reason(torch.cuda.get_device_capability(q.device), triton.__version__, q.dtype,
                                q.shape[-1], aligned)


def forward_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "auto") -> str:
    """"hopper" or "portable": which forward kernel `flash_attention(..., kernel=kernel)` runs for these inputs.

    "auto" takes the Hopper kernel wherever `hopper_kernel_reason` has no objection; "portable" always
    the portable one (to compare the two on one GPU); "hopper" insists, and raises a ValueError with
    the reason where it cannot run.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    if kernel == "portable":
        return "portable"
    reason = _hopper_reason_for(q, k, v)
    if kernel == "hopper" and reason is not None:
        raise ValueError(f"kernel='hopper' cannot run here: {reason}; use kernel='auto' or 'portable'")
    return "portable" if reason else "hopper"


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1) rather than compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    """Import the Triton kernels, switching the interpreter on first when there is no GPU."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must happen before `import triton`
    if not triton_available():
        raise ImportError(
            "course_lib.kernels needs the `triton` package, which has wheels for Linux x86-64 only; "
            "on other platforms use backend='auto' (torch's fused attention) instead"
        )
    import triton.language as tl

    if not torch.cuda.is_available() and type(tl.zeros).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "no CUDA device, and triton was imported before TRITON_INTERPRET=1 was set, so its CPU interpreter "
            "is off; restart Python and set os.environ['TRITON_INTERPRET'] = '1' before anything imports triton "
            "(course_lib.kernels sets it itself when it is the first to import triton)"
        )
    from course_lib.kernels import _flash_triton

    return _flash_triton


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, input_precision: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32 for the Triton kernel; got {t.dtype}")
        if t.ndim < 2:
            raise ValueError(f"{name} must have shape (..., length, d_head); got {shape_str(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    # where a GPU is present, Triton compiles for it (its CPU interpreter is off): the GPU must be supported
    reason = kernel_unsupported_reason("cuda" if torch.cuda.is_available() else q.device)
    if reason is not None:
        raise RuntimeError(reason)
    if q.device.type == "cpu" and torch.cuda.is_available():
        raise ValueError("on a machine with a GPU the Triton kernel runs compiled: move q, k, v to 'cuda'")
    if k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"the Triton kernel needs q (..., T, d), k and v (..., S, d) with the same leading dimensions "
            f"and d (no broadcasting); got q {shape_str(q.shape)}, k {shape_str(k.shape)}, v {shape_str(v.shape)}"
        )
    _check_precision(input_precision)
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise TypeError(
            "bfloat16 needs a GPU for the Triton kernel: Triton's CPU interpreter cannot multiply bfloat16 tiles "
            "(tl.dot returns garbage there); use float16 or float32 on the CPU"
        )
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"q, k and v must not be empty; got q {shape_str(q.shape)}, k {shape_str(k.shape)}")
    if not 1 <= q.shape[-1] <= _MAX_D_HEAD:
        raise ValueError(f"d_head (last dimension of q) must be in [1, {_MAX_D_HEAD}]; got {q.shape[-1]}")
    if is_causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"is_causal=True needs T == S; got T={q.shape[-2]} (q {shape_str(q.shape)}) and "
            f"S={k.shape[-2]} (k {shape_str(k.shape)})"
        )


class FlashAttentionFunction(torch.autograd.Function):
    """autograd wrapper: forward saves (q, k, v, out, lse) — O(T) extra, not the (T, S) weights."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                input_precision: str, kernel: str = "auto") -> torch.Tensor:
        kernels = _kernels()
        batch, T, S, d = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1]
        q3 = q.reshape(-1, T, d).contiguous()  # (N, T, d), N = product of the leading dims
        k3 = k.reshape(-1, S, d).contiguous()  # (N, S, d)
        v3 = v.reshape(-1, S, d).contiguous()  # (N, S, d)
        out, lse = kernels.forward(q3, k3, v3, is_causal, input_precision, interpreter_active(),
                                   variant=forward_variant(q3, k3, v3, kernel))
        ctx.save_for_backward(q3, k3, v3, out, lse)
        ctx.is_causal, ctx.input_precision = is_causal, input_precision
        ctx.shapes = (q.shape, k.shape)
        return out.reshape(*batch, T, d)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        q3, k3, v3, out, lse = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        d_out3 = d_out.reshape(out.shape).to(out.dtype)
        dq, dk, dv = _kernels().backward(q3, k3, v3, out, lse, d_out3, ctx.is_causal, ctx.input_precision,
                                         interpreter_active())
        return dq.reshape(q_shape), dk.reshape(k_shape), dv.reshape(k_shape), None, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, *, input_precision: str = "ieee",
    kernel: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v by the tiled FlashAttention algorithm, in Triton; differentiable.

    q (..., T, d), k and v (..., S, d) with the same leading dims, float16/bfloat16/float32
    (accumulation in float32). is_causal: query i sees keys j <= i (needs T == S).
    input_precision (float32 inputs only): "ieee" multiplies in float32, like torch's default
    matmul; "tf32" lets the Tensor Cores round the inputs to TF32 first (faster, relative error
    ~1e-3, see `kernel_tolerance`). Triton's own default on a GPU is TF32; this kernel never
    picks it silently. The CPU interpreter always multiplies in float32.
    kernel: which forward kernel, "auto" (the Hopper kernel on compute capability 9.x where it applies,
    see `forward_variant`), "portable" or "hopper"; the backward kernels are the same for both.
    No other masks, no dropout: use `course_lib.attention.scaled_dot_product_attention` for those.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    _check(q, k, v, is_causal, input_precision)
    return FlashAttentionFunction.apply(q, k, v, bool(is_causal), input_precision, kernel)
