"""The recorded sinusoidal-vs-rotary length runs of notebook 12 (data/positional/length_generalisation.json)
are complete, their test sentences longer than every training sentence, and the script that makes them runs."""

import importlib.util
import json

from course_lib.experiments.toy_translation import load_split, tokenise
from course_lib.tools.paths import DATA_DIR, REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("run_length_generalisation",
                                                  REPO_ROOT / "scripts" / "run_length_generalisation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(record):
    words = record["word_counts"]
    for side in ("src", "tgt"):
        assert words["longer"][side][0] > words["train"][side][1]  # no longer length occurs in training
        assert words["test"][side][1] <= words["train"][side][1]
    grid = {(p, s) for p in record["positionals"] for s in record["seeds"]}
    assert {(r["positional"], r["seed"]) for r in record["runs"]} == grid and len(record["runs"]) == len(grid)
    for run in record["runs"]:
        for split in ("test", "longer"):
            by_length = run[split]["by_length"]
            lengths = [int(k) for k in by_length]
            assert min(lengths) >= words[split]["tgt"][0] and max(lengths) <= words[split]["tgt"][1]
            assert all(0 <= v["exact_match"] <= 1 and 0 <= v["token_accuracy"] <= 1 for v in by_length.values())
            total = sum(v["count"] for v in by_length.values())
            pooled = sum(v["exact_match"] * v["count"] for v in by_length.values()) / total
            assert abs(pooled - run[split]["exact_match"]) < 1e-3
        assert sum(v["count"] for v in run["longer"]["by_length"].values()) == record["longer_sentences"]["count"]


def test_recorded_runs_are_complete_and_consistent():
    record = json.loads((DATA_DIR / "positional" / "length_generalisation.json").read_text())
    assert record["command"].startswith("python scripts/run_length_generalisation.py")
    train = load_split("train")
    assert record["word_counts"]["train"]["tgt"][1] == max(len(tokenise(p["tgt"])) for p in train)
    assert sum(v["count"] for v in record["runs"][0]["test"]["by_length"].values()) == len(load_split("test"))
    _check(record)


def test_tiny_run_writes_the_record(tmp_path):
    path = _script().main(["--tiny", "--out", str(tmp_path)])
    record = json.loads(path.read_text())
    assert [r["positional"] for r in record["runs"]] == ["sinusoidal", "rotary"]
    _check(record)
