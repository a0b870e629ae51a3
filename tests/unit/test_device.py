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
