"""The recorded sinusoidal-vs-rotary length runs of notebook 12 (data/positional/length_generalisation.json)
are complete, their test sentences longer than every training sentence, and the script that makes them runs;
the RoPE-scaling runs (length_generalisation_scaled.json) swap in each scaling and put the model back, choose the
factor on validation sentences, and score without padding exactly as the first record scores."""

import importlib.util
import json

import pytest
import torch

from course_lib.experiments.capstone import build_capstone_model, encode_pairs
from course_lib.experiments.toy_translation import ADJECTIVES, generate_longer_pairs, load_split, tokenise, translate
from course_lib.experiments.training import collate_pairs
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


# ------------------------------------------------------------------ RoPE scaling at inference (--scaled)
def _tiny_rotary():
    model, src_vocab, tgt_vocab = build_capstone_model(0, positional="rotary", d_model=32, num_heads=2,
                                                       num_encoder_layers=1, num_decoder_layers=1)
    return model.eval(), src_vocab, tgt_vocab


def test_scaled_rotary_applies_the_scaling_and_puts_the_model_back():
    script = _script()
    model, src_vocab, tgt_vocab = _tiny_rotary()
    lengths = {"encoder": 11, "decoder": 13}
    short = load_split("test")[:40]
    longer = generate_longer_pairs(40, src_longer_than=11, tgt_longer_than=12)
    originals = [layer.self_attn.rotary for layer in (*model.encoder_layers, *model.decoder_layers)]

    def logits(pairs, method, factor):
        batch = collate_pairs(encode_pairs(pairs, src_vocab, tgt_vocab))
        with torch.no_grad(), script.scaled_rotary(model, method, factor, lengths):
            return model(batch[0], batch[1])

    plain = {name: logits(pairs, "none", 1.0) for name, pairs in (("short", short), ("longer", longer))}
    # dynamic NTK is plain RoPE up to the original length, and only there
    assert torch.equal(logits(short, "dynamic", 4.0), plain["short"])
    assert not torch.allclose(logits(longer, "dynamic", 4.0), plain["longer"], atol=1e-4)
    for method in script.METHODS:
        if method != "dynamic":
            assert not torch.allclose(logits(short, method, 4.0), plain["short"], atol=1e-4), method
    assert [layer.self_attn.rotary for layer in (*model.encoder_layers, *model.decoder_layers)] == originals
    seen = []
    try:
        with script.scaled_rotary(model, "yarn", 2.0, lengths):
            seen = [layer.self_attn.rotary.scaling for layer in (*model.encoder_layers, *model.decoder_layers)]
            raise RuntimeError("inside the block")
    except RuntimeError:
        pass
    assert [s["original_max_position_embeddings"] for s in seen] == [11, 13]  # each side its own length
    assert [layer.self_attn.rotary for layer in (*model.encoder_layers, *model.decoder_layers)] == originals


def test_three_adjective_control_sentences_are_at_training_lengths():
    pairs = _script().three_adjective_pairs(200, max_src=11, max_tgt=12)
    assert len({p["src"] for p in pairs}) == 200
    for p in pairs:
        src = tokenise(p["src"])
        assert len(src) <= 11 and len(tokenise(p["tgt"])) <= 12 and translate(p["src"]) == p["tgt"]
        runs, run = [], 0
        for word in src:
            run = run + 1 if word in ADJECTIVES else 0
            runs.append(run)
        assert max(runs) == 3  # one noun phrase with exactly 3 adjectives, none with more


def test_unpadded_scoring_equals_the_first_records_scoring_without_scaling():
    script = _script()
    model, src_vocab, tgt_vocab = _tiny_rotary()
    pairs = load_split("test")[:120]
    first = script.evaluate(model, pairs, src_vocab, tgt_vocab)
    assert script.token_accuracy(model, pairs, src_vocab, tgt_vocab) == first["token_accuracy"]
    assert script.exact_match_unpadded(model, pairs, src_vocab, tgt_vocab) == first["exact_match"]


def _check_scaled(record):
    sets = record["sets"]
    for name in ("longer_validation", "longer_test"):
        assert sets[name]["src_words"][0] > sets["test_split"]["src_words"][1]
        assert sets[name]["tgt_words"][0] > sets["test_split"]["tgt_words"][1]
    control = sets["three_adjectives_at_training_lengths"]
    assert control["src_words"][1] <= sets["test_split"]["src_words"][1]
    assert control["tgt_words"][1] <= sets["test_split"]["tgt_words"][1]
    n_seeds = len(record["seeds"])
    grid = {("none", 1.0)} | {(m, f) for m in record["methods"] for f in record["factors"]}
    assert {(r["method"], r["factor"]) for r in record["sweep"]} == grid and len(record["sweep"]) == len(grid)
    for row in record["sweep"]:
        assert all(len(v) == n_seeds and all(0 <= x <= 1 for x in v) for v in row["token_accuracy"].values())
    assert set(record["selected"]) == {"none", *record["methods"]}
    for method, chosen in record["selected"].items():
        rows = [r for r in record["sweep"] if r["method"] == method]
        best = max(sum(r["token_accuracy"]["longer_validation"]) for r in rows)
        row = next(r for r in rows if r["factor"] == chosen["factor"])
        assert sum(row["token_accuracy"]["longer_validation"]) == best  # chosen on validation, not on test
        assert all(sum(r["token_accuracy"]["longer_validation"]) < best
                   for r in rows if r["factor"] < chosen["factor"])  # ties keep the smaller factor
        assert chosen["token_accuracy"]["longer_test"] == row["token_accuracy"]["longer_test"]
        assert all(len(v) == n_seeds for v in chosen["exact_match"].values())
        assert len(chosen["longer_test_by_length"]) == n_seeds


def test_recorded_scaled_runs_are_complete_and_chosen_on_validation():
    record = json.loads((DATA_DIR / "positional" / "length_generalisation_scaled.json").read_text())
    assert record["command"].startswith("python scripts/run_length_generalisation.py --scaled")
    first = json.loads((DATA_DIR / "positional" / "length_generalisation.json").read_text())
    assert record["seeds"] == first["seeds"] and record["steps"] == first["steps"] and record["lr"] == first["lr"]
    assert record["sets"]["longer_test"]["count"] == first["longer_sentences"]["count"]
    assert record["sets"]["test_split"]["count"] == len(load_split("test"))
    _check_scaled(record)


def test_tiny_scaled_run_writes_its_own_record_and_refuses_to_overwrite(tmp_path):
    script = _script()
    path = script.main(["--scaled", "--tiny", "--out", str(tmp_path)])
    assert path.name == "length_generalisation_scaled.json"
    record = json.loads(path.read_text())
    _check_scaled(record)
    before = path.read_text()
    with pytest.raises(SystemExit):
        script.main(["--scaled", "--tiny", "--out", str(tmp_path)])
    assert path.read_text() == before
    tuned = json.loads(script.main(["--scaled", "--tiny", "--finetune-steps", "3", "--out", str(tmp_path)]).read_text())
    _check_finetuned(tuned, record)
    assert path.read_text() == before


def _check_finetuned(tuned, scaled):
    assert tuned["factors_from"] == "length_generalisation_scaled.json"
    assert "none" in tuned["methods"] and "dynamic" not in tuned["methods"]
    grid = {(m, s) for m in tuned["methods"] for s in tuned["seeds"]}
    assert {(r["method"], r["seed"]) for r in tuned["runs"]} == grid and len(tuned["runs"]) == len(grid)
    for run in tuned["runs"]:
        assert run["factor"] == scaled["selected"][run["method"]]["factor"]  # the factor chosen on validation
        for metric in ("token_accuracy", "exact_match"):
            assert set(run[metric]) == {"longer_test", "test_split", "three_adjectives_at_training_lengths"}
            assert all(0 <= v <= 1 for v in run[metric].values())


def test_recorded_finetuned_runs_use_the_chosen_factors():
    scaled = json.loads((DATA_DIR / "positional" / "length_generalisation_scaled.json").read_text())
    tuned = json.loads((DATA_DIR / "positional" / "length_generalisation_scaled_finetuned.json").read_text())
    assert tuned["command"].startswith("python scripts/run_length_generalisation.py --scaled --finetune-steps")
    assert tuned["seeds"] == scaled["seeds"] and tuned["steps_before"] == scaled["steps"]
    assert tuned["sets"]["longer_test"] == scaled["sets"]["longer_test"]["count"]
    _check_finetuned(tuned, scaled)
