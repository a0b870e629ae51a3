"""The generated toy translation data: reproducible to the byte, disjoint splits, the grammar's rules."""

import json

import pytest

from course_lib.experiments import toy_translation as tt


def test_regenerating_the_splits_gives_the_same_bytes(tmp_path):
    paths = tt.write_splits(tmp_path)
    for name, path in paths.items():
        committed = tt.DATA_SUBDIR / f"{name}.jsonl"
        assert committed.read_bytes() == path.read_bytes(), f"{name}.jsonl differs from a fresh generation"


def test_split_sizes_are_disjoint_and_small():
    splits = {name: tt.load_split(name) for name in tt.SPLITS}
    assert {k: len(v) for k, v in splits.items()} == tt.SPLITS
    sources = [{p["src"] for p in pairs} for pairs in splits.values()]
    assert sum(len(s) for s in sources) == len(set().union(*sources))  # no sentence in two splits
    assert all((tt.DATA_SUBDIR / f"{n}.jsonl").stat().st_size < 2 * 2**20 for n in tt.SPLITS)


def test_every_target_is_the_reference_translation_and_in_the_vocabulary():
    src_vocab, tgt_vocab = tt.source_vocab(), tt.target_vocab()
    for pair in tt.load_split("test") + tt.load_split("validation"):
        assert tt.translate(pair["src"]) == pair["tgt"]
        assert tt.Vocab.unk_id not in src_vocab.encode(pair["src"])
        assert tt.Vocab.unk_id not in tgt_vocab.encode(pair["tgt"])
        assert tgt_vocab.decode(tgt_vocab.encode(pair["tgt"], bos=True, eos=True)) == pair["tgt"]


@pytest.mark.parametrize("src,tgt", [
    ("the big red dog sees a small cat", "lo kano roso grando ga una mika pikola o mira"),
    ("some foxes do not know the old king", "unas vulpas ga la rega veka o ne konan"),
    ("a child helps the wolves", "un nino ga los lupos o helpa"),
])
def test_grammar_examples(src, tgt):
    assert tt.translate(src) == tgt


def test_grammar_rules_hold_on_the_training_data():
    for pair in tt.load_split("train")[:2000]:
        src, tgt = pair["src"].split(), pair["tgt"].split()
        assert tgt[-1].endswith(("a", "an"))  # the verb is last
        assert tgt.count("ga") == 1 and tgt.count("o") == 1 and tgt.index("ga") < tgt.index("o")
        assert ("ne" in tgt) == ("not" in src)
        plural_subject = tgt[0] in ("los", "las", "unos", "unas")
        assert tgt[-1].endswith("an") == plural_subject  # verb agrees with the subject's number


def test_vocab_and_errors():
    vocab = tt.target_vocab()
    assert vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert vocab.decode([1, vocab.stoi["lo"], 2, vocab.stoi["la"]]) == "lo"  # stops at <eos>
    assert vocab.encode("lo zzz") == [vocab.stoi["lo"], 3]
    with pytest.raises(ValueError, match="expected a verb"):
        tt.translate("the dog the cat")
    with pytest.raises(ValueError, match="split must be one of"):
        tt.load_split("dev")
    with pytest.raises(TypeError, match="must be a str"):
        tt.tokenise(3)


def test_jsonl_lines_are_objects_with_src_and_tgt():
    line = (tt.DATA_SUBDIR / "test.jsonl").read_text().splitlines()[0]
    assert set(json.loads(line)) == {"src", "tgt"}


def test_cli_writes_the_same_bytes_and_help_writes_nothing(tmp_path, monkeypatch, capsys):
    from course_lib.experiments import toy_translation
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        toy_translation.main(["--help"])
    assert exit_info.value.code == 0 and list(tmp_path.iterdir()) == []
    assert toy_translation.main([str(tmp_path / "out")]) == 0
    for name in ("train", "validation", "test"):
        written = (tmp_path / "out" / f"{name}.jsonl").read_bytes()
        assert written == (toy_translation.DATA_SUBDIR / f"{name}.jsonl").read_bytes()


def test_longer_pairs_are_longer_than_every_training_sentence_and_correct():
    train = tt.load_split("train")
    src_max = max(len(tt.tokenise(p["src"])) for p in train)
    tgt_max = max(len(tt.tokenise(p["tgt"])) for p in train)
    pairs = tt.generate_longer_pairs(300, src_longer_than=src_max, tgt_longer_than=tgt_max)
    assert pairs == tt.generate_longer_pairs(300, src_longer_than=src_max, tgt_longer_than=tgt_max)  # seeded
    assert len({p["src"] for p in pairs}) == 300
    src_vocab, tgt_vocab = tt.source_vocab(), tt.target_vocab()
    for pair in pairs:
        assert len(tt.tokenise(pair["src"])) > src_max and len(tt.tokenise(pair["tgt"])) > tgt_max
        assert tt.translate(pair["src"]) == pair["tgt"]
        assert tt.Vocab.unk_id not in src_vocab.encode(pair["src"]) + tgt_vocab.encode(pair["tgt"])
    with pytest.raises(ValueError, match="no sentence"):
        tt.generate_longer_pairs(5, src_longer_than=30, tgt_longer_than=0, adjective_counts=(3,))
    with pytest.raises(ValueError, match="adjective_counts"):
        tt.generate_longer_pairs(5, src_longer_than=1, tgt_longer_than=1, adjective_counts=(9,))
    with pytest.raises(ValueError, match="tgt_longer_than"):
        tt.generate_longer_pairs(5, src_longer_than=1, tgt_longer_than=-1)
