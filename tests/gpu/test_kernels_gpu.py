"""The compiled Triton kernel on a GPU: forward and gradients against a float64 reference.

Skipped without CUDA (the interpreter cases are in test_kernels.py). Run by `make gpu-check`.
Every comparison uses `kernel_tolerance`, derived from the roundings the kernel makes, on the
relative error ||got - ref|| / ||ref||; the reference is float64 attention on the GPU from the
same (already rounded) inputs. Each case draws fresh random inputs, and the outputs are
poisoned with NaN first (torch.empty may hand back memory that already holds a right answer).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

from course_lib.experiments.precision import relative_error  # noqa: E402
from course_lib.kernels import _flash_triton, flash_attention, kernel_tolerance  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def reference(q, k, v, d_out, causal):
    """float64 attention and its gradients, by autograd, on the GPU."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        T, S = q.shape[-2], k.shape[-2]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v64
    out.backward(d_out.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def poison_free_memory(n_bytes: int = 256 * 2**20) -> None:
    """Fill memory the caching allocator will hand out next with NaN: an output entry the kernel
    forgets to write then shows up as NaN instead of as whatever a previous test left there."""
    poison = torch.full((n_bytes // 4,), float("nan"), device="cuda")
    del poison


def check(dtype_name, causal, T, S, d_head, *, precision="ieee", batch=2, heads=3, config=None, kernel="auto"):
    dtype = DTYPES[dtype_name]
    poison_free_memory()
    gen = torch.Generator(device="cuda").manual_seed(T * 7919 + S * 31 + d_head)
    q = torch.randn(batch, heads, T, d_head, device="cuda", generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, heads, S, d_head, device="cuda", generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, heads, S, d_head, device="cuda", generator=gen).to(dtype).requires_grad_()
    d_out = torch.randn(batch, heads, T, d_head, device="cuda", generator=gen).to(dtype)
    if config is None:
        out = flash_attention(q, k, v, is_causal=causal, input_precision=precision, kernel=kernel)
        out.backward(d_out)
        got = (out, q.grad, k.grad, v.grad)
    else:  # one given block-size config for the forward and both backward kernels
        q3, k3, v3, do3 = (t.detach().reshape(-1, t.shape[-2], d_head).contiguous() for t in (q, k, v, d_out))
        out, lse = _flash_triton.forward(q3, k3, v3, causal, precision, False, config["fwd"],
                                         variant=config.get("variant", "portable"))
        got = (out, *_flash_triton.backward(q3, k3, v3, out, lse, do3, causal, precision, False,
                                            (config["dkdv"], config["dq"])))
        got = tuple(g.reshape(batch, heads, -1, d_head) for g in got)
    expected = reference(q, k, v, d_out, causal)
    tol = kernel_tolerance(dtype, precision, length=max(T, S))
    errors = {name: relative_error(g, e) for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True)}
    for name, g in zip(("out", "dq", "dk", "dv"), got, strict=True):
        assert torch.isfinite(g).all(), f"{name} has non-finite entries"
        assert g.dtype == dtype
    assert max(errors.values()) < tol, f"relative errors {errors} >= tolerance {tol:.2e}"
    return errors


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("d_head", [32, 64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_16_bit_against_float64(dtype_name, d_head, causal):
    check(dtype_name, causal, 300, 300, d_head)  # 300: not a multiple of any block size (ragged last tiles)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("d_head", [64, 128])
def test_queries_and_keys_of_different_lengths(dtype_name, d_head):
    check(dtype_name, False, 200, 517, d_head)


@pytest.mark.parametrize("d_head,causal", [(24, False), (80, True)])
def test_head_sizes_that_are_not_powers_of_two(d_head, causal):
    check("float16", causal, 129, 129, d_head)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_exact_products(causal):
    errors = check("float32", causal, 257, 257, 64)
    assert max(errors.values()) < 1e-5  # float32 products: far below TF32's ~1e-3


def test_float32_at_d_head_256():
    check("float32", False, 130, 130, 256)


def test_float32_with_tf32_products():
    errors = check("float32", False, 257, 257, 64, precision="tf32")
    assert max(errors.values()) > kernel_tolerance(torch.float32, "ieee", length=257)  # TF32 really was used


@pytest.mark.parametrize("d_head", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_every_candidate_config_of_the_fast_path(d_head, causal):
    """The autotuner may pick any candidate: each one must be right, not only the one picked today."""
    kinds = ("fwd", "dkdv", "dq")
    candidates = {kind: _flash_triton.candidate_configs(kind, d_head, 2, causal) for kind in kinds}
    for i in range(max(len(c) for c in candidates.values())):
        config = {kind: candidates[kind][min(i, len(candidates[kind]) - 1)] for kind in kinds}
        check("bfloat16", causal, 384 + 17, 384 + 17, d_head, config=config, batch=1, heads=2)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="the Hopper forward kernel runs on compute capability 9.x")
@pytest.mark.parametrize("d_head", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [401, 512])  # keys masked in the last tile, or whole tiles only
def test_every_candidate_config_of_the_hopper_forward(d_head, causal, length):
    first = {kind: _flash_triton.candidate_configs(kind, d_head, 2, causal)[0] for kind in ("dkdv", "dq")}
    for fwd in _flash_triton.candidate_configs("fwd_ws", d_head, 2, causal):
        config = {"fwd": fwd, "variant": "hopper", **first}
        check("bfloat16", causal, length, length, d_head, config=config, batch=1, heads=2)


def test_the_forward_kernel_chosen_on_this_gpu():
    """On an H100/H200, bfloat16 at d_head 128 takes the Hopper kernel unless kernel="portable" is asked for."""
    from course_lib.kernels import forward_variant

    q = torch.randn(2, 256, 128, device="cuda", dtype=torch.bfloat16)
    assert forward_variant(q, q, q) == ("hopper" if HOPPER else "portable")
    assert forward_variant(q.float(), q.float(), q.float()) == "portable"
    assert forward_variant(q, q, q, "portable") == "portable"
    check("bfloat16", True, 300, 300, 128, kernel="portable")  # flash_attention with the portable kernel forced


def test_more_heads_than_a_grid_axis_and_more_elements_than_int32():
    """B*H = 65544 > 65535 (the limit of CUDA's second grid axis); B*H*T*d = 2^31 + 262144 elements."""
    heads, T, d_head = 65544, 256, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, d_out = (torch.randn(1, heads, T, d_head, device="cuda", generator=gen, dtype=torch.bfloat16)
                      for _ in range(4))
    assert q.numel() > 2**31
    for t in (q, k, v):
        t.requires_grad_()
    out = flash_attention(q, k, v)
    out.backward(d_out)
    tol = kernel_tolerance(torch.bfloat16, length=T)
    for part in (slice(0, 4), slice(heads - 4, heads)):  # the first heads and the last ones, past 2^31
        sub = [t.detach()[:, part] for t in (q, k, v, d_out)]
        expected = reference(*sub, causal=False)
        for got, exp in zip((out, q.grad, k.grad, v.grad), expected, strict=True):
            assert relative_error(got[:, part], exp) < tol
