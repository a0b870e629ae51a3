"""The Triton FlashAttention kernel: forward and gradients equal the numpy reference.

On a machine without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported, as course_lib.kernels also does). The interpreter is slow per
element, so the shapes are small; odd lengths exercise the masking of partial tiles.
Tolerances: `kernel_tolerance`, derived from the roundings the kernel makes, on the relative
error ||got - ref|| / ||ref||; the last test shows it is tight enough to catch planted bugs.
The compiled kernel on a GPU is tested in test_kernels_gpu.py, its Hopper build in test_kernels_hopper.py.
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton")

from course_lib import numpy_ref  # noqa: E402
from course_lib.attention import scaled_dot_product_attention  # noqa: E402
from course_lib.experiments.precision import relative_error  # noqa: E402
from course_lib.kernels import flash_attention, interpreter_active, kernel_tolerance, unit_roundoff  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(q, k, v, d_out, causal):
    q64, k64, v64, g64 = (t.detach().double().cpu().numpy() for t in (q, k, v, d_out))
    T, S = q.shape[-2], k.shape[-2]
    mask = np.tril(np.ones((T, S), dtype=bool)) if causal else None
    out = numpy_ref.scaled_dot_product_attention(q64, k64, v64, mask)[0]
    return (out, *numpy_ref.scaled_dot_product_attention_backward(q64, k64, v64, g64, mask))


@pytest.mark.parametrize(
    "dtype,causal,T,S,d_head",
    [
        (torch.float32, False, 37, 37, 32),  # odd length: the last tiles are partial
        (torch.float32, True, 33, 33, 64),
        (torch.float32, False, 20, 45, 128),  # T != S
        (torch.float16, False, 19, 19, 64),
        (torch.float16, True, 40, 40, 32),
        (torch.float32, False, 9, 9, 24),  # d_head not a power of 2: padded to 32 inside
    ],
)
def test_forward_and_gradients_match_the_numpy_reference(dtype, causal, T, S, d_head):
    gen = torch.Generator().manual_seed(T * 1000 + d_head)
    q, k, v = (torch.randn(2, 2, n, d_head, generator=gen).to(DEVICE, dtype).requires_grad_() for n in (T, S, S))
    out = flash_attention(q, k, v, is_causal=causal)
    d_out = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    out.backward(d_out)
    assert out.shape == q.shape and out.dtype == dtype
    expected = _reference(q, k, v, d_out, causal)
    tol = kernel_tolerance(dtype, length=max(T, S))
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), expected, strict=True):
        got = got.detach().double().cpu().numpy()
        assert np.isfinite(got).all(), name
        err = relative_error(got, exp)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.1e}"


def test_interpreter_is_on_without_a_gpu():
    assert interpreter_active() == (not torch.cuda.is_available())


def test_selectable_as_a_backend_of_course_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 21, 32, generator=gen).to(DEVICE) for _ in range(3))
    for causal in (False, True):
        ours = scaled_dot_product_attention(q, k, v, is_causal=causal, backend="triton")
        fused = scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert relative_error(ours.cpu(), fused.double().cpu().numpy()) < kernel_tolerance(torch.float32, length=21)


def test_bad_inputs_raise_with_the_argument_named():
    q = torch.randn(1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask"):
        scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool, device=DEVICE),
                                     backend="triton")
    with pytest.raises(ValueError, match="backend"):
        scaled_dot_product_attention(q, q, q, backend="cuda-magic")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="T == S"):
        flash_attention(q, torch.randn(1, 9, 16, device=DEVICE), torch.randn(1, 9, 16, device=DEVICE), is_causal=True)
    with pytest.raises(ValueError, match="d_head"):
        big = torch.randn(1, 2, 300, device=DEVICE)
        flash_attention(big, big, big)


def test_benchmark_suite_runs_on_tiny_shapes_and_records_the_device(tmp_path):
    from course_lib.bench import flash

    out = tmp_path / "flash.json"
    argv = ["--device", DEVICE, "--seq", "16", "--d-head", "32", "--batch", "1", "--heads", "1",
            "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--impls", "sdpa_math,triton",
            "--json", str(out)]
    assert flash.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["device_info"]["device_type"] == torch.device(DEVICE).type
    assert record["versions"]["triton"] and record["versions"]["torch"] == torch.__version__
    backends = {r["impl"]: r for r in record["rows"]}
    assert set(backends) == {"sdpa_math", "triton"}
    for row in backends.values():
        assert row["median_s"] > 0 and row["tflops"] > 0
        assert row["max_abs_err_vs_fp32_sdpa"] < 1e-5  # float32 products on every device (no silent TF32)
    assert len(record["summary"]) == 1 and record["summary"][0]["ratio"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only switched on without a GPU")
def test_interpreter_is_switched_on_automatically_and_late_imports_are_explained():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    first = ("import torch; from course_lib.kernels import flash_attention; q = torch.randn(1, 16, 16); "
             "import os; print(flash_attention(q, q, q).shape, os.environ['TRITON_INTERPRET'])")
    run = subprocess.run([sys.executable, "-c", first], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "1"
    late = ("import torch, triton, os; os.environ['TRITON_INTERPRET'] = '1'; "
            "from course_lib.kernels import flash_attention; q = torch.randn(1, 16, 16); flash_attention(q, q, q)")
    run = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "before TRITON_INTERPRET=1 was set" in run.stderr


def test_bfloat16_is_refused_where_the_interpreter_would_run_it():
    if DEVICE == "cuda":
        pytest.skip("compiled on a GPU, bfloat16 works (test_kernels_gpu.py)")
    q = torch.randn(1, 1, 4, 16).bfloat16()
    with pytest.raises(TypeError, match="bfloat16"):
        flash_attention(q, q, q)
    with pytest.raises(TypeError, match="bfloat16"):
        scaled_dot_product_attention(q, q, q, backend="triton")


def test_bad_precision_and_empty_inputs_are_refused():
    q = torch.randn(1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="input_precision"):
        flash_attention(q, q, q, input_precision="fp8")
    with pytest.raises(ValueError, match="empty"):
        empty = torch.randn(1, 0, 16, device=DEVICE)
        flash_attention(empty, empty, empty)
    with pytest.raises(ValueError, match="input_precision"):
        kernel_tolerance(torch.float32, "half")


def test_unit_roundoff_counts_significand_bits():
    assert unit_roundoff(torch.float32) == 2.0**-24 == torch.finfo(torch.float32).eps / 2
    assert unit_roundoff(torch.float16) == torch.finfo(torch.float16).eps / 2
    assert unit_roundoff(torch.bfloat16) == torch.finfo(torch.bfloat16).eps / 2
    assert unit_roundoff(torch.float32, "tf32") == unit_roundoff(torch.float16)
    assert kernel_tolerance(torch.bfloat16) > kernel_tolerance(torch.float16) > kernel_tolerance(torch.float32)


def test_the_tolerance_catches_planted_bugs():
    """Each bug a tiled kernel invites changes the output by more than even the bfloat16 tolerance."""
    T, d = 300, 64  # 300 = 4 * 64 + 44: a partial last tile
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, T, d, generator=gen, dtype=torch.float64) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    right = {False: sdpa(q, k, v), True: sdpa(q, k, v, is_causal=True)}
    planted = {
        ("scale 1/d instead of 1/sqrt(d)", False): sdpa(q, k, v, scale=1 / d),
        ("no 1/sqrt(d) at all", True): sdpa(q, k, v, is_causal=True, scale=1.0),
        ("each query misses its own key", True): sdpa(q, k, v, attn_mask=tril.tril(-1) | (tril & (
            torch.arange(T)[:, None] == 0))),
        ("each query sees one key ahead", True): sdpa(q, k, v, attn_mask=tril | tril.roll(1, dims=1).triu(1)),
        ("the partial last key tile dropped", False): sdpa(q, k[..., :256, :], v[..., :256, :]),
        ("softmax without its max subtracted, base e vs 2", False): sdpa(q, k, v, scale=d**-0.5 * math.log(2)),
    }
    tol = kernel_tolerance(torch.bfloat16, length=T)
    for (name, causal), out in planted.items():
        err = relative_error(out.numpy(), right[causal].numpy())
        assert err > tol, f"{name}: relative error {err:.2e} is within the bfloat16 tolerance {tol:.2e}"


def _pretend_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    """Make torch report a CUDA GPU of the given compute capability (no GPU is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pretends a GPU on a machine without one")
@pytest.mark.parametrize(("capability", "name"), [((7, 5), "Tesla T4"), ((7, 0), "Tesla V100-SXM2-16GB")])
def test_a_gpu_below_compute_capability_8_is_refused_by_name_before_any_work(monkeypatch, capability, name):
    from course_lib.kernels import kernel_unsupported_reason

    _pretend_gpu(monkeypatch, capability, name)
    reason = kernel_unsupported_reason("cuda")
    assert reason is not None and name in reason and f"{capability[0]}.{capability[1]}" in reason
    assert "8.0 or newer" in reason and "backend='auto'" in reason
    q = torch.randn(1, 1, 4, 16)
    q_before = q.clone()
    for call in (lambda: flash_attention(q, q, q), lambda: scaled_dot_product_attention(q, q, q, backend="triton")):
        with pytest.raises(RuntimeError, match=r"compute capability 8\.0 or newer"):
            call()
    assert torch.equal(q, q_before)
    # torch's fused attention is the way on such a GPU; here it runs on the CPU tensors as usual
    assert scaled_dot_product_attention(q, q, q).shape == q.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="pretends a GPU on a machine without one")
@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (10, 0)])
def test_ampere_and_newer_pass_the_capability_check(monkeypatch, capability):
    from course_lib.kernels import kernel_unsupported_reason

    _pretend_gpu(monkeypatch, capability, "a GPU")
    assert kernel_unsupported_reason("cuda") is None
    # past the capability check, CPU tensors on a machine with a GPU are the next thing refused
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="move q, k, v to 'cuda'"):
        flash_attention(q, q, q)


def test_kernel_unsupported_reason_checks_its_argument_and_the_device_kind():
    from course_lib.kernels import kernel_unsupported_reason

    assert kernel_unsupported_reason("cpu") is None
    assert "CUDA GPU" in kernel_unsupported_reason("meta")
    with pytest.raises(TypeError, match="device must be"):
        kernel_unsupported_reason(0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the Hopper forward kernel
# Compiled it runs only on a GPU of compute capability 9.x (test_kernels_hopper.py reads its compiled
# code: warp specialization, TMA); its arithmetic is the same program and runs here in the interpreter.
@pytest.mark.skipif(torch.cuda.is_available(), reason="forces the interpreter's run of the Hopper kernel")
@pytest.mark.parametrize(
    "dtype,causal,T,S,d_head",
    [
        (torch.float32, False, 37, 37, 32),  # S not a multiple of 128: the last key tile is masked
        (torch.float32, True, 33, 33, 64),
        (torch.float32, False, 20, 128, 16),  # S a multiple of 128: no mask at all; T != S
        (torch.float16, True, 40, 40, 32),  # T not a multiple of the tile: the descriptor clips the store
        (torch.float16, False, 50, 19, 64),
    ],
)
def test_hopper_forward_matches_the_numpy_reference(dtype, causal, T, S, d_head):
    from course_lib.kernels import _kernels

    fk = _kernels()
    gen = torch.Generator().manual_seed(T * 100 + S)
    q, k, v = (torch.randn(3, n, d_head, generator=gen).to(dtype) for n in (T, S, S))  # (N, T or S, d)
    out, lse = fk.forward(q, k, v, causal, "ieee", True, variant="hopper")
    expected = _reference(q, k, v, torch.zeros_like(q), causal)[0]
    assert out.shape == (3, T, d_head) and torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = relative_error(out.double().numpy(), expected)
    assert err < kernel_tolerance(dtype, length=S), f"relative error {err:.2e}"
    portable_out, portable_lse = fk.forward(q, k, v, causal, "ieee", True, variant="portable")
    assert torch.allclose(lse, portable_lse, atol=1e-5)  # the same log-sum-exp for the backward pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the interpreter")
def test_the_fused_delta_prepass_equals_torch_and_catches_a_wrong_operand():
    from course_lib.kernels import _kernels

    fk = _kernels()
    gen = torch.Generator().manual_seed(3)
    out, d_out = (torch.randn(2, 70, 24, generator=gen).to(torch.float16) for _ in range(2))  # ragged rows, d
    got = fk.delta(out, d_out)
    want = (d_out.float() * out.float()).sum(-1)
    assert got.dtype == torch.float32 and got.shape == (2, 70)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, (out.float() * out.float()).sum(-1), atol=1e-2)  # a wrong operand is caught


def test_length_buckets_and_hopper_tiles():
    from course_lib.kernels import _kernels

    fk = _kernels()
    assert [fk.length_bucket(T, S) for T, S in ((1, 1), (300, 40), (1024, 1024), (1025, 7), (4096, 8192))] == [
        256, 512, 1024, 2048, 8192]
    # the Hopper kernel masks keys only when S % 128 != 0: every BLOCK_N it may run with must divide 128
    assert all(128 % n == 0 for _, n, _, _ in (*fk.WS_FWD_CONFIGS, fk.INTERPRETER_CONFIG))
    assert all(warps == 4 for _, _, warps, _ in fk.WS_FWD_CONFIGS)  # the warp count Triton specializes


class _FakeCudaTensor:
    """Just what forward_variant reads: a CUDA device, a dtype, a shape and an address."""

    def __init__(self, dtype=torch.bfloat16, d_head=128, address=1 << 20):
        self.device, self.dtype, self.shape, self._address = torch.device("cuda"), dtype, (8, 64, d_head), address

    def data_ptr(self) -> int:
        return self._address


@pytest.mark.parametrize(("capability", "version", "dtype", "d_head", "address", "expected"), [
    ((9, 0), "3.6.0", torch.bfloat16, 128, 1 << 20, "hopper"),
    ((9, 0), "3.7.1", torch.float16, 64, 1 << 20, "hopper"),
    ((8, 0), "3.6.0", torch.bfloat16, 128, 1 << 20, "portable"),  # an A100: no TMA, no wgmma
    ((10, 0), "3.6.0", torch.bfloat16, 128, 1 << 20, "portable"),  # Blackwell: not checked, the portable kernel
    ((9, 0), "3.5.1", torch.bfloat16, 128, 1 << 20, "portable"),  # no warp_specialize in this Triton
    ((9, 0), "3.6.0", torch.float32, 128, 1 << 20, "portable"),
    ((9, 0), "3.6.0", torch.bfloat16, 96, 1 << 20, "portable"),
    ((9, 0), "3.6.0", torch.bfloat16, 128, (1 << 20) + 8, "portable"),  # not 16-byte aligned
])
def test_the_forward_kernel_is_chosen_by_capability_and_triton_version(monkeypatch, capability, version, dtype,
                                                                        d_head, address, expected):
    import triton

    import course_lib.kernels as kernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(kernels, "interpreter_active", lambda: False)
    t = _FakeCudaTensor(dtype, d_head, address)
    assert kernels.forward_variant(t, t, t) == expected  # type: ignore[arg-type]
    reason = kernels.hopper_kernel_reason(capability, version, dtype, d_head, address % 16 == 0)
    assert (reason is None) == (expected == "hopper")
    assert kernels.forward_variant(t, t, t, "portable") == "portable"  # type: ignore[arg-type]
    if expected == "hopper":
        assert kernels.forward_variant(t, t, t, "hopper") == "hopper"  # type: ignore[arg-type]
    else:  # insisting on the Hopper kernel where it cannot run names the reason
        with pytest.raises(ValueError, match=re.escape(reason)):
            kernels.forward_variant(t, t, t, "hopper")  # type: ignore[arg-type]


def test_flash_attention_refuses_an_unknown_kernel_before_any_work():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="kernel must be one of"):
        flash_attention(q, q, q, kernel="fast")
    with pytest.raises(ValueError, match="kernel='hopper' cannot run here"):
        flash_attention(q, q, q, kernel="hopper")  # the interpreter, or d_head 16 on a GPU: never the Hopper kernel
    assert torch.allclose(flash_attention(q, q, q, kernel="portable"), flash_attention(q, q, q), atol=0)


def test_the_hopper_kernel_reasons_name_what_is_missing():
    from course_lib.kernels import hopper_kernel_reason

    assert "8.0" in hopper_kernel_reason((8, 0), "3.6.0", torch.bfloat16, 128)
    assert "3.5.1" in hopper_kernel_reason((9, 0), "3.5.1", torch.bfloat16, 128)
    assert "float32" in hopper_kernel_reason((9, 0), "3.6.0", torch.float32, 128)
    assert "96" in hopper_kernel_reason((9, 0), "3.6.0", torch.bfloat16, 96)
    assert "aligned" in hopper_kernel_reason((9, 0), "3.6.0", torch.bfloat16, 128, aligned=False)


def test_cpu_tensors_take_the_portable_kernel():
    from course_lib.kernels import forward_variant

    q = torch.randn(2, 8, 64)
    assert forward_variant(q, q, q) == "portable"
