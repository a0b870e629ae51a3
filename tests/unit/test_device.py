"""What the device is and can run (course_lib.tools.device): Tensor Core settings, SDPA backends, the report."""

from __future__ import annotations

import json

import pytest
import torch

from course_lib.tools import device
from course_lib.tools.device import (
    SDPA_BACKENDS,
    device_facts,
    device_report,
    enable_tensor_cores,
    restore_settings,
    sdpa_backend_report,
    tensor_core_friendly,
    tensor_core_settings,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------- settings
def _tf32_state():
    """What TF32 allows now, read through the API this torch has."""
    if device._has_fp32_precision():
        return (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision)
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


def test_tensor_core_settings_turn_on_and_restore():
    before = _tf32_state()
    with tensor_core_settings() as inside:
        assert inside["float32_matmul_precision"] == "high"
        assert inside["cuda_matmul_allow_tf32"] and inside["cudnn_allow_tf32"]
        if device._has_fp32_precision():
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
            assert torch.backends.cudnn.conv.fp32_precision == "tf32"
            assert inside["fp32_precision"]["cuda_matmul"] == "tf32"
        else:
            assert torch.get_float32_matmul_precision() == "high"
    assert _tf32_state() == before
    previous = enable_tensor_cores(tf32=False)
    try:
        now = device._current_settings()
        assert now["float32_matmul_precision"] == "highest" and not now["cuda_matmul_allow_tf32"]
    finally:
        restore_settings(previous)
    assert _tf32_state() == before


@pytest.mark.skipif(not device._has_fp32_precision(), reason="this torch has no fp32_precision settings")
def test_the_fp32_precision_api_is_used_where_torch_has_it():
    before = _tf32_state()
    with tensor_core_settings():
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision) == ("tf32", "tf32")
        assert torch.backends.fp32_precision == before[0]  # the parent setting is left alone
    with tensor_core_settings(tf32=False):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert _tf32_state() == before
    # the legacy flags agree again once restored (torch refuses to read them in a mixed state)
    assert torch.backends.cuda.matmul.allow_tf32 == (before[1] == "tf32")
    # settings recorded by an older torch (no "fp32_precision") are translated
    previous = device._current_settings()
    try:
        restore_settings({"float32_matmul_precision": "high", "cuda_matmul_allow_tf32": True,
                          "cudnn_allow_tf32": False, "cudnn_benchmark": False})
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        restore_settings(previous)
    assert _tf32_state() == before


def test_the_legacy_flags_are_used_where_torch_has_no_fp32_precision(monkeypatch):
    monkeypatch.setattr(device, "_has_fp32_precision", lambda: False)
    before = _tf32_state()
    assert device._current_settings()["fp32_precision"] is None
    with tensor_core_settings() as inside:
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert inside == {"float32_matmul_precision": "high", "cuda_matmul_allow_tf32": True,
                          "cudnn_allow_tf32": True, "cudnn_benchmark": True, "fp32_precision": None}
    assert _tf32_state() == before
    previous = enable_tensor_cores(tf32=False)
    try:
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    finally:
        restore_settings(previous)
    assert _tf32_state() == before


def test_the_settings_keep_the_keys_recorded_results_carry():
    settings = device_report("cpu", shape=(1, 1, 8, 8), dtype=torch.float32)["settings"]
    recorded = {"float32_matmul_precision", "cuda_matmul_allow_tf32", "cudnn_allow_tf32", "cudnn_benchmark"}
    assert recorded <= set(settings)


def test_tensor_core_friendly_sizes():
    assert tensor_core_friendly(64, 72, 100, dtype=torch.float16) == {64: True, 72: True, 100: False}
    assert tensor_core_friendly(100, dtype=torch.float32) == {100: True}  # 4-byte elements: multiples of 4
    assert tensor_core_friendly(24, dtype=torch.float8_e4m3fn) == {24: False}


# ----------------------------------------------------------------------------- device report
def test_device_report_on_cpu():
    report = device_report("cpu", shape=(1, 2, 32, 16), dtype=torch.float32)
    assert report["device_type"] == "cpu" and report["compute_capability"] is None
    assert report["tensor_cores"] is False and report["tf32_supported"] is False
    backends = report["sdpa_backends"]
    assert set(backends) == {"flash", "efficient", "cudnn", "math"}
    assert backends["math"] == {"eligible": True, "reasons": []}
    assert backends["flash"]["eligible"] is True  # torch's CPU flash kernel
    for name in ("efficient", "cudnn"):
        assert backends[name]["eligible"] is False
        assert "CUDA" in backends[name]["reasons"][0]


def test_sdpa_backend_report_cpu_with_mask():
    q = torch.randn(1, 2, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    report = sdpa_backend_report(q, q, q, attn_mask=mask)
    assert report["math"]["eligible"] and not report["efficient"]["eligible"]


@cuda
def test_device_report_on_cuda_gives_reasons():
    report = device_report("cuda", shape=(1, 2, 128, 64), dtype=torch.float32)
    assert report["compute_capability"] is not None
    flash = report["sdpa_backends"]["flash"]
    assert flash["eligible"] is False and flash["reasons"]  # flash takes float16/bfloat16 only
    assert report["sdpa_backends"]["math"]["eligible"] is True
    if report["bf16_supported"]:
        ok = device_report("cuda", shape=(1, 2, 128, 64), dtype=torch.bfloat16)["sdpa_backends"]
        assert ok["flash"]["eligible"] or ok["flash"]["reasons"]


def test_device_facts_carry_what_a_recorded_result_needs():
    facts = device_facts("cpu")
    for key in ("device_type", "device_name", "torch", "python", "cpu", "cpu_threads", "tensor_cores"):
        assert key in facts
    assert facts["device_name"] == f"CPU ({facts['cpu']}, {facts['cpu_threads']} threads)"


def test_one_spelling_for_sdpa_backends():
    assert SDPA_BACKENDS == ("flash", "efficient", "cudnn", "math")
    assert set(device_report("cpu", shape=(1, 1, 8, 8), dtype=torch.float32)["sdpa_backends"]) == set(SDPA_BACKENDS)


def test_python_m_course_lib_device_prints_the_report_as_json(capsys):
    assert device.main(["cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device_type"] == "cpu" and set(report["sdpa_backends"]) == set(SDPA_BACKENDS)


@pytest.mark.parametrize("call, error, words", [
    (lambda: enable_tensor_cores(tf32="no"), TypeError, "tf32"),
    (lambda: device.sdpa_backend_enum("fast"), ValueError, "name must be one of"),
    (lambda: device_report("cpu", shape=(2, 8, 256)), ValueError, "shape"),
    (lambda: tensor_core_friendly(64.5), TypeError, "size"),
    (lambda: tensor_core_friendly(64, dtype="float16"), TypeError, "dtype"),
    (lambda: device_facts("gpu"), ValueError, "device"),
])
def test_bad_input_is_refused_before_any_setting_changes(call, error, words):
    before = _tf32_state()
    with pytest.raises(error, match=words):
        call()
    assert _tf32_state() == before


# ----------------------------------------------------------------------------- versions, nvidia-smi, GPU facts
def test_device_facts_carry_the_versions_of_what_a_run_imports():
    versions = device_facts("cpu")["versions"]
    for name in ("python", "torch", "cuda", "cudnn", "triton", "numpy", "matplotlib", "pytest", "transformers",
                 "safetensors"):
        assert name in versions
    assert versions["torch"] == torch.__version__ and versions["numpy"] is not None
    assert device.package_versions(extra=("no-such-package-here",))["no-such-package-here"] is None


class _Done:
    def __init__(self, stdout: str = "", returncode: int = 0, stderr: str = "") -> None:
        self.stdout, self.returncode, self.stderr = stdout, returncode, stderr


def _fake_smi(monkeypatch, *, found=True, stdout="", returncode=0, raises=None):
    calls = []

    def run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        if raises is not None:
            raise raises
        return _Done(stdout, returncode, "driver not loaded" if returncode else "")

    monkeypatch.setattr(device.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if found else None)
    monkeypatch.setattr(device.subprocess, "run", run)
    return calls


SMI_TWO_GPUS = ("GPU-aaaa-1111, 1980, 1980, 3201, 700.00, 123.45, 41, P0\n"
                "GPU-bbbb-2222, 345, 1980, 3201, 700.00, 80.10, 33, P8\n")


def test_nvidia_smi_facts_reads_the_queried_fields(monkeypatch):
    calls = _fake_smi(monkeypatch, stdout=SMI_TWO_GPUS)
    facts = device.nvidia_smi_facts("bbbb-2222")  # torch's uuid has no "GPU-" prefix
    assert facts == {"sm_clock_mhz": 345.0, "sm_clock_max_mhz": 1980.0, "mem_clock_mhz": 3201.0,
                     "power_limit_w": 700.0, "power_draw_w": 80.1, "temperature_c": 33.0, "pstate": "P8",
                     "error": None}
    (cmd, kwargs), = calls
    assert "--format=csv,noheader,nounits" in cmd and kwargs["timeout"] <= 10
    assert "clocks.max.sm" in cmd[1] and "power.limit" in cmd[1]
    assert device.nvidia_smi_facts(None, 0)["sm_clock_mhz"] == 1980.0  # no uuid: by index
    assert device.nvidia_smi_facts("cccc", 1)["pstate"] == "P8"


def test_nvidia_smi_facts_reports_what_the_driver_does_not(monkeypatch):
    _fake_smi(monkeypatch, stdout="GPU-a, 1980, 1980, 3201, [N/A], [Not Supported], 41, P0\n")
    facts = device.nvidia_smi_facts()
    assert facts["power_limit_w"] is None and facts["power_draw_w"] is None and facts["error"] is None


@pytest.mark.parametrize("kwargs, words", [
    ({"found": False}, "not found"),
    ({"returncode": 9}, "exited with 9"),
    ({"raises": OSError("permission denied")}, "OSError"),
    ({"raises": device.subprocess.TimeoutExpired("nvidia-smi", 5)}, "TimeoutExpired"),
    ({"stdout": "garbage\n"}, "no line"),
    ({"stdout": SMI_TWO_GPUS, "index": 5}, "none with uuid"),
])
def test_a_failing_nvidia_smi_gives_none_and_a_reason(monkeypatch, kwargs, words):
    index = kwargs.pop("index", 0)
    _fake_smi(monkeypatch, **kwargs)
    facts = device.nvidia_smi_facts(None, index)
    assert words in facts["error"]
    assert all(value is None for key, value in facts.items() if key != "error")


def test_cuda_facts_carry_sm_count_l2_and_clocks(monkeypatch):
    class Props:
        name, major, minor, total_memory = "Fake GPU", 9, 0, 80 * 2**30
        multi_processor_count, L2_cache_size, uuid = 132, 50 * 2**20, "bbbb-2222"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    _fake_smi(monkeypatch, stdout=SMI_TWO_GPUS)
    facts = device_facts("cuda")
    assert facts["sm_count"] == 132 and facts["l2_cache_bytes"] == 50 * 2**20
    assert facts["nvidia_smi"]["sm_clock_mhz"] == 345.0 and facts["nvidia_smi"]["power_limit_w"] == 700.0
    for key in ("device_name", "compute_capability", "cuda", "cudnn", "total_memory_gib", "tensor_cores",
                "tf32_supported", "bf16_supported", "fp8_supported", "torch", "python", "versions"):
        assert key in facts  # the keys recorded runs already carry stay
    _fake_smi(monkeypatch, found=False)
    assert device_facts("cuda")["nvidia_smi"]["error"] == "nvidia-smi not found on PATH"
