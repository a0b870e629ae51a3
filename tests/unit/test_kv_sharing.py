"""The recorded MHA/GQA/MQA runs of notebook 12 (data/head_ablation/kv_sharing*.json) are complete and
consistent with the model they describe, and the script that makes them runs (a tiny run)."""

import importlib.util
import json

import pytest

from course_lib.experiments.head_ablation import TASKS, HeadGatedTransformer, count_parameters
from course_lib.tools.paths import DATA_DIR, REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("run_kv_sharing", REPO_ROOT / "scripts" / "run_kv_sharing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["kv_sharing", "kv_sharing_attn_only"])
def test_recorded_runs_are_complete_and_consistent(name):
    record = json.loads((DATA_DIR / "head_ablation" / f"{name}.json").read_text())
    assert record.get("d_ff", 128) == record["runs"][0]["config"]["d_ff"]
    assert record["command"].startswith("python scripts/run_kv_sharing.py")
    grid = {(t, kv, s) for t in record["tasks"] for kv in record["kv_heads"] for s in record["seeds"]}
    got = {(r["config"]["task"], r["config"]["num_kv_heads"], r["config"]["seed"]) for r in record["runs"]}
    assert got == grid and len(record["runs"]) == len(grid)
    for run in record["runs"]:
        cfg = run["config"]
        model = HeadGatedTransformer.for_task(TASKS[cfg["task"]], d_model=cfg["d_model"], num_heads=cfg["num_heads"],
                                              d_ff=cfg["d_ff"], num_kv_heads=cfg["num_kv_heads"])
        assert run["params"] == count_parameters(model)
        assert run["cache_numbers_per_token"] == 2 * cfg["num_kv_heads"] * cfg["d_model"] // cfg["num_heads"]
        assert run["final_acc"] == run["curve"]["eval_acc"][-1] and cfg["steps"] == run["curve"]["step"][-1]


def test_tiny_run_writes_the_record(tmp_path):
    path = _script().main(["--tiny", "--out", str(tmp_path)])
    record = json.loads(path.read_text())
    assert [r["config"]["num_kv_heads"] for r in record["runs"]] == [4, 1]
    assert all(0.0 <= r["final_acc"] <= 1.0 for r in record["runs"])
