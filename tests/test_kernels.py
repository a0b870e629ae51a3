"""The Triton FlashAttention kernel: forward and gradients equal the numpy reference.

On a machine without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported, as course_lib.kernels also does). The interpreter is slow per
element, so the shapes are small; odd lengths exercise the masking of partial tiles.
Tolerances: float32 inputs 1e-5 (float32 accumulation over tens of terms; tf32 on a GPU would
need ~1e-2), float16 inputs 5e-3 (the output and the probabilities fed to P @ V are rounded to
float16, relative precision ~5e-4, on values of order 1).
"""

import json
import os
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
from course_lib.kernels import flash_attention, interpreter_active  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5 if not torch.cuda.is_available() else 2e-2, torch.float16: 5e-3}


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
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), expected, strict=True):
        got = got.detach().double().cpu().numpy()
        assert np.isfinite(got).all(), name
        err = np.abs(got - exp).max()
        assert err < TOL[dtype], f"{name}: max abs error {err:.2e} >= {TOL[dtype]:.0e}"


def test_interpreter_is_on_without_a_gpu():
    assert interpreter_active() == (not torch.cuda.is_available())


def test_selectable_as_a_backend_of_course_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 21, 32, generator=gen).to(DEVICE) for _ in range(3))
    for causal in (False, True):
        ours = scaled_dot_product_attention(q, k, v, is_causal=causal, backend="triton")
        fused = scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert (ours - fused).abs().max().item() < TOL[torch.float32]


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
    argv = ["--device", DEVICE, "--lengths", "16", "--d-heads", "32", "--batch", "1", "--heads", "1",
            "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--backends", "MATH", "triton_course",
            "--out", str(out)]
    assert flash.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["device_info"]["device_type"] == torch.device(DEVICE).type
    assert record["versions"]["triton"] and record["versions"]["torch"] == torch.__version__
    backends = {r["backend"]: r for r in record["rows"]}
    assert set(backends) == {"MATH", "triton_course"}
    for row in backends.values():
        assert row["median_ms"] > 0 and row["tflops"] > 0
        assert row["max_abs_err_vs_fp32_sdpa"] < 1e-4
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
