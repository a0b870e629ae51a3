"""A plain (non-editable) install carries everything the library reads: the datasets, the checkpoints
and the recorded benchmarks are package data, not files that only exist in a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from course_lib.tools.paths import REPO_ROOT

PROBE = """
import pathlib, sys
import course_lib
from course_lib.bench.attention import recorded_runs
from course_lib.experiments.capstone import load_capstone
from course_lib.experiments.head_ablation import load_head_model
from course_lib.tools.paths import DATA_DIR
from course_lib.experiments.toy_translation import load_split

site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(course_lib.__file__).resolve().is_relative_to(site), course_lib.__file__
model, src_vocab, tgt_vocab, info = load_capstone()
assert info["metadata"]["test_exact_match"] == 1.0
assert len(load_split("test")) > 0 and recorded_runs()
load_head_model(DATA_DIR / "checkpoints" / "heads_two_lookups_attn_only_h8.safetensors")
print("loaded from", DATA_DIR)
"""


@pytest.mark.maintainer
def test_a_non_editable_install_loads_the_capstone_and_the_data(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "course_lib", source / "course_lib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("course_lib-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path)
    shutil.rmtree(source)  # nothing may be read from the copy it was built from
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", PROBE, str(site)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(site) in run.stdout
