"""The attention benchmark suite: a tiny CPU run writes complete JSON and a plot; FLOPs are counted right."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import course_lib
from course_lib.attention import naive_attention
from course_lib.bench import attention as suite
from course_lib.bench.__main__ import main as bench_main
from course_lib.bench.attention import recorded_runs
from course_lib.bench.timing import matmul_peak
from course_lib.cost.flops import attention_flops, module_flops

matplotlib.use("Agg")


# ----------------------------------------------------------------------------- FLOPs
def test_attention_flops_hand_count():
    # B=H=1, T=2, S=3, d=4. q k^T: 2*3 scores, each 4 multiplies + 4 adds = 48 FLOPs.
    # weights @ v: (2, 3) @ (3, 4): 2*4 outputs, each 3 multiplies + 3 adds = 48 FLOPs.
    assert attention_flops(1, 1, 2, 3, 4) == 96
    assert attention_flops(1, 1, 2, 3, 4, causal=True) == 48
    assert attention_flops(2, 8, 128, 256, 64) == 4 * 2 * 8 * 128 * 256 * 64
    assert attention_flops(1, 1, 2, 3, 4, pass_="bwd") == 2.5 * 96
    assert attention_flops(1, 1, 2, 3, 4, pass_="fwd+bwd") == 3.5 * 96
    with pytest.raises(ValueError, match="pass_"):
        attention_flops(1, 1, 2, 3, 4, pass_="backward")


def test_attention_flops_is_defined_once_in_course_lib():
    root = Path(course_lib.__file__).parent
    homes = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if "def attention_flops(" in p.read_text())
    assert homes == ["cost/flops.py"]


def test_attention_flops_equals_torch_flop_counter_on_naive_attention():
    q = torch.randn(2, 3, 16, 8)
    k = torch.randn(2, 3, 24, 8)
    v = torch.randn(2, 3, 24, 8)
    with FlopCounterMode(display=False) as counter:
        naive_attention(q, k, v)
    assert counter.get_total_flops() == attention_flops(2, 3, 16, 24, 8)


def test_module_flops_adds_four_projections():
    B, T, D, H = 2, 16, 32, 4
    assert module_flops(B, T, D, H, pass_="fwd") == 8 * B * T * D * D + attention_flops(B, H, T, T, D // H)
    layer = torch.nn.Linear(D, D, bias=False)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(B, T, D))
    assert 4 * counter.get_total_flops() == 8 * B * T * D * D


# ----------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["attention", "--seq", "16,32", "--d-head", "8", "--batch", "1", "--heads", "2", "--dtype", "float32",
            "--device", "cpu", "--repeats", "2", "--warmup", "1", "--quiet",
            "--json", str(out / "run.json"), "--plot", str(out / "run.png")]
    assert bench_main(argv) == 0
    return out


def test_json_has_device_versions_config_and_records(tiny_run):
    data = json.loads((tiny_run / "run.json").read_text())
    assert data["suite"] == "attention" and data["config"]["dtype"] == "float32"
    info = data["device_info"]
    assert info["device_type"] == "cpu" and info["torch"] == torch.__version__ and "device_name" in info
    assert data["config"]["seqs"] == [16, 32] and data["config"]["d_heads"] == [8]
    assert data["matmul_peak"]["tflops"] > 0 and data["matmul_peak"]["dtype"] == "float32"
    records = data["rows"]
    core = [r for r in records if r["level"] == "core"]
    assert {r["impl"] for r in core} == set(suite.CORE_IMPLS)
    assert {(r["T"], r["causal"], r["pass"]) for r in core} == {
        (T, c, p) for T in (16, 32) for c in (False, True) for p in ("fwd", "fwd+bwd")}
    for r in core:
        for key in ("median_s", "min_s", "max_s", "repeats", "flops", "tflops", "frac_peak", "peak_memory_bytes",
                    "scores_bytes", "status", "reason", "B", "H", "S", "d_head"):
            assert key in r
        assert r["flops"] == attention_flops(1, 2, r["T"], r["T"], 8, causal=r["causal"], pass_=r["pass"])
        assert r["scores_bytes"] == 1 * 2 * r["T"] * r["T"] * 4
        if r["impl"] in ("sdpa_efficient", "sdpa_cudnn"):
            assert r["status"] == "unsupported" and "CUDA" in r["reason"] and r["median_s"] is None
        elif r["impl"] == "triton":  # the interpreter's times would say nothing about a GPU
            assert r["status"] == "skipped" and "interpreter" in r["reason"] and r["median_s"] is None
            assert r["executed_flops"] == {"fwd": 1.0, "fwd+bwd": 4.5}[r["pass"]] * r["flops"] / (
                1.0 if r["pass"] == "fwd" else 3.5)
        else:
            assert r["status"] == "ok", r
            assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
            assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
            assert r["frac_peak"] == pytest.approx(r["tflops"] / data["matmul_peak"]["tflops"])
            assert r["peak_memory_bytes"] is None  # not tracked on the CPU: no made-up number
    modules = [r for r in records if r["level"] == "module"]
    assert {r["impl"] for r in modules} == {"course_lib", "plain_sdpa", "torch_mha"}
    assert all(r["status"] == "ok" and r["ratio_to_plain_sdpa"] > 0 for r in modules)


def test_plot_is_written(tiny_run):
    png = tiny_run / "run.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_recorded_runs_reads_suite_files(tiny_run, tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"suite": "mha"}))
    (tmp_path / "run.json").write_text((tiny_run / "run.json").read_text())
    runs = recorded_runs(directory=tmp_path)
    assert [r["file"] for r in runs] == ["run.json"]
    assert recorded_runs("cuda", directory=tmp_path) == []


def test_recorded_benchmarks_in_data_are_labelled():
    for run in recorded_runs():
        info = run["device_info"]
        assert info["device_type"] in ("cpu", "cuda") and info["device_name"]
        if info["device_type"] == "cuda":
            assert info.get("compute_capability") and info.get("cuda")


def test_cpu_guard_skips_huge_score_matrices():
    data = suite.run_suite(seqs=[64], d_heads=[8], batch=1, heads=1, causal=(False,), passes=("fwd",),
                           impls=("naive", "course_lib"), modules=False, warmup=0, repeats=1, measure_peak=False,
                           cpu_max_gib=1e-6, progress=False)
    by = {r["impl"]: r for r in data["rows"]}
    assert by["naive"]["status"] == "skipped" and "GiB" in by["naive"]["reason"]
    assert by["course_lib"]["status"] == "ok" and by["course_lib"]["frac_peak"] is None


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench_main(["attention", "--seq", "0,16"])
    with pytest.raises(SystemExit):
        bench_main(["attention", "--impls", "naive,fastest"])
    with pytest.raises(ValueError, match="dtype"):
        suite.run_suite(seqs=[16], d_heads=[8], dtype="float8")


def test_matmul_peak_counts_two_n_cubed():
    peak = matmul_peak("cpu", torch.float32, n=64, warmup=1, repeats=2)
    assert peak["flops"] == 2 * 64**3 and peak["tflops"] == pytest.approx(peak["flops"] / peak["min_s"] / 1e12)
    assert peak["tflops_median"] == pytest.approx(peak["flops"] / peak["median_s"] / 1e12)
    assert peak["tflops"] >= peak["tflops_median"]


def test_plot_handles_measured_memory_and_oom(tiny_run):
    """The GPU branch of the plot (measured peak memory, out-of-memory markers), fed synthetic values:
    this exercises the drawing code on the CPU; no number here is, or is stored as, a measurement."""
    import matplotlib.pyplot as plt

    data = json.loads((tiny_run / "run.json").read_text())
    for i, r in enumerate(data["rows"]):
        if r["level"] == "core" and r["status"] == "ok":
            r["peak_memory_bytes"] = 2**20 * (i + 1)
        if r["impl"] == "naive" and r["T"] == 32:
            r.update(status="oom", reason="CUDA out of memory (synthetic)", median_s=None, tflops=None)
    fig = suite.plot_results(data, pass_="fwd+bwd")
    titles = [ax.get_title() for ax in fig.axes]
    assert "peak memory" in titles and any("side by side" in t for t in titles)
    plt.close(fig)
