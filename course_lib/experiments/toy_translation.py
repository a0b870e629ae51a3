"""A generated toy translation task: English-like sentences -> "Zibic", a made-up SOV language.

Nothing is downloaded: the grammar below generates every sentence from a fixed seed, and
`python -m course_lib.experiments.toy_translation --force` writes the splits to course_lib/data/toy_translation/*.jsonl
(without --force it refuses to write over the shipped files; `... OUT_DIR` writes them to a new folder).
The target language differs from the source in ways that make cross-attention learn a
non-trivial alignment rather than a copy:

* word order: subject-verb-object becomes subject-object-VERB (the verb moves to the end);
* noun phrases: "det adj1 adj2 noun" becomes "det noun adj2 adj1" (adjectives follow the noun,
  in reverse order);
* agreement: every noun has a grammatical gender (masculine/feminine) that the source never
  shows; the target determiner and adjectives agree with the noun's gender and number, so to
  write the determiner the model must look *ahead* in the source, to the noun;
* case particles: the subject phrase ends in "ga", the object phrase in "o";
* the verb agrees with the subject's number ("mira" / "miran"), and negation "does not" /
  "do not" becomes the particle "ne" before the verb.

    the big red dog sees a small cat  ->  lo kano roso grando ga una mika pikola o mira
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from course_lib._validate import check_bool, check_nonnegative_int, check_positive_int
from course_lib.tools.cli import output_dir
from course_lib.tools.paths import PACKAGE_DATA, refuse_overwrite

__all__ = [
    "NOUNS", "ADJECTIVES", "VERBS", "SPLITS", "SEED", "DATA_SUBDIR",
    "Vocab", "translate", "generate_pairs", "generate_longer_pairs", "generate_splits", "write_splits", "load_split",
    "source_vocab", "target_vocab", "tokenise", "detokenise",
]

SEED = 20240611
DATA_SUBDIR = PACKAGE_DATA / "toy_translation"
SPLITS = {"train": 12000, "validation": 500, "test": 1000}

# source noun (singular, plural) -> (target stem, gender). Target: stem+"o"/"a", plural +"s".
NOUNS: dict[tuple[str, str], tuple[str, str]] = {
    ("dog", "dogs"): ("kan", "m"),
    ("cat", "cats"): ("mik", "f"),
    ("bird", "birds"): ("pul", "m"),
    ("horse", "horses"): ("ekv", "f"),
    ("child", "children"): ("nin", "m"),
    ("teacher", "teachers"): ("dosent", "f"),
    ("farmer", "farmers"): ("agrik", "m"),
    ("king", "kings"): ("reg", "f"),
    ("fox", "foxes"): ("vulp", "f"),
    ("wolf", "wolves"): ("lup", "m"),
    ("friend", "friends"): ("amik", "m"),
    ("baker", "bakers"): ("panet", "f"),
}
# source adjective -> target stem; target adjective = stem + "o"/"a" (+ "s" in the plural)
ADJECTIVES: dict[str, str] = {
    "big": "grand", "small": "pikol", "red": "ros", "old": "vek",
    "young": "jun", "happy": "felik", "quiet": "silent", "clever": "sagac",
}
# source verb (3rd person singular, plural/base) -> target stem; target = stem+"a" / stem+"an"
VERBS: dict[tuple[str, str], str] = {
    ("sees", "see"): "mir", ("helps", "help"): "help", ("follows", "follow"): "sekv",
    ("likes", "like"): "am", ("calls", "call"): "vok", ("watches", "watch"): "observ",
    ("finds", "find"): "trov", ("knows", "know"): "kon",
}
# target determiners: (definite, gender, plural) -> word
_DETERMINERS = {
    (True, "m", False): "lo", (True, "f", False): "la", (True, "m", True): "los", (True, "f", True): "las",
    (False, "m", False): "un", (False, "f", False): "una", (False, "m", True): "unos", (False, "f", True): "unas",
}
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def tokenise(text: str) -> list[str]:
    """Whitespace tokenisation: every word of both languages is one token."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    return text.split()


def detokenise(tokens: Iterable[str]) -> str:
    return " ".join(tokens)


# --------------------------------------------------------------------------- the grammar
@dataclass(frozen=True)
class NounPhrase:
    """A determiner, adjectives and a noun, written in the source language or the target language."""

    noun: tuple[str, str]  # a key of NOUNS
    plural: bool
    definite: bool
    adjectives: tuple[str, ...]  # source order

    def source(self) -> list[str]:
        det = "the" if self.definite else ("some" if self.plural else "a")
        return [det, *self.adjectives, self.noun[int(self.plural)]]

    def target(self) -> list[str]:
        stem, gender = NOUNS[self.noun]
        ending = ("o" if gender == "m" else "a") + ("s" if self.plural else "")
        det = _DETERMINERS[(self.definite, gender, self.plural)]
        adjectives = [ADJECTIVES[a] + ending for a in reversed(self.adjectives)]
        return [det, stem + ending, *adjectives]


@dataclass(frozen=True)
class Sentence:
    """Subject, verb (maybe negated) and object: one sentence pair of the toy translation task."""

    subject: NounPhrase
    verb: tuple[str, str]  # a key of VERBS
    negated: bool
    obj: NounPhrase

    def source(self) -> list[str]:
        plural = self.subject.plural
        if self.negated:
            verb = ["do" if plural else "does", "not", self.verb[1]]
        else:
            verb = [self.verb[1] if plural else self.verb[0]]
        return [*self.subject.source(), *verb, *self.obj.source()]

    def target(self) -> list[str]:
        verb = VERBS[self.verb] + ("an" if self.subject.plural else "a")
        return [*self.subject.target(), "ga", *self.obj.target(), "o", *(["ne"] if self.negated else []), verb]


def _random_noun_phrase(rng: random.Random, adjective_counts: Sequence[int] | None = None) -> NounPhrase:
    """0, 1 or 2 adjectives (weights 3:4:3), the splits' grammar; or a count drawn uniformly from adjective_counts."""
    if adjective_counts is None:
        n_adj = rng.choices([0, 1, 2], weights=[3, 4, 3])[0]
    else:
        n_adj = rng.choice(list(adjective_counts))
    return NounPhrase(noun=rng.choice(list(NOUNS)), plural=rng.random() < 0.4, definite=rng.random() < 0.5,
                      adjectives=tuple(rng.sample(list(ADJECTIVES), n_adj)))


def _random_sentence(rng: random.Random, adjective_counts: Sequence[int] | None = None) -> Sentence:
    return Sentence(subject=_random_noun_phrase(rng, adjective_counts), verb=rng.choice(list(VERBS)),
                    negated=rng.random() < 0.25, obj=_random_noun_phrase(rng, adjective_counts))


def _parse_noun_phrase(words: list[str], i: int) -> tuple[NounPhrase, int]:
    det = words[i]
    if det not in ("the", "a", "some"):
        raise ValueError(f"expected a determiner (the/a/some) at word {i}; got {det!r}")
    i += 1
    adjectives = []
    while i < len(words) and words[i] in ADJECTIVES:
        adjectives.append(words[i])
        i += 1
    for key in NOUNS:
        if i < len(words) and words[i] in key:
            plural = words[i] == key[1]
            return NounPhrase(key, plural, det == "the", tuple(adjectives)), i + 1
    raise ValueError(f"expected a noun at word {i}; got {words[i] if i < len(words) else 'the end'!r}")


def translate(source: str | Sequence[str]) -> str:
    """The reference translation of a source sentence of this grammar (raises ValueError otherwise)."""
    words = tokenise(source) if isinstance(source, str) else list(source)
    subject, i = _parse_noun_phrase(words, 0)
    negated = i < len(words) and words[i] in ("does", "do")
    i += 2 if negated else 0
    verb = next((key for key in VERBS if i < len(words) and words[i] in key), None)
    if verb is None:
        raise ValueError(f"expected a verb at word {i} of {detokenise(words)!r}")
    obj, i = _parse_noun_phrase(words, i + 1)
    if i != len(words):
        raise ValueError(f"unexpected words after the object: {words[i:]}")
    return detokenise(Sentence(subject, verb, negated, obj).target())


def generate_pairs(n: int, seed: int = SEED, *, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """n distinct {"src", "tgt"} pairs from random.Random(seed), skipping sources in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    pairs: list[dict[str, str]] = []
    while len(pairs) < n:
        sentence = _random_sentence(rng)
        src = detokenise(sentence.source())
        if src in seen:
            continue
        seen.add(src)
        pairs.append({"src": src, "tgt": detokenise(sentence.target())})
    return pairs


def generate_longer_pairs(n: int, *, src_longer_than: int, tgt_longer_than: int, seed: int = SEED + 1,
                          adjective_counts: Sequence[int] = (3, 4, 5)) -> list[dict[str, str]]:
    """n distinct pairs longer than given lengths, for testing length generalisation (notebook 12).

    The same grammar, with adjective_counts adjectives in each noun phrase (the splits have 0 to 2);
    a sentence is kept only if its source has more than src_longer_than words and its target more than
    tgt_longer_than (pass the longest training lengths, so that no kept length occurs in training).
    """
    n = check_positive_int("n", n)
    for name, value in (("src_longer_than", src_longer_than), ("tgt_longer_than", tgt_longer_than)):
        check_nonnegative_int(name, value)
    counts = list(adjective_counts)
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= len(ADJECTIVES)
                         for c in counts):
        raise ValueError(f"adjective_counts must be ints in [0, {len(ADJECTIVES)}]; got {adjective_counts!r}")
    # longest possible: two "det adj... noun" phrases and "does not verb" / det noun adj... twice, ga, o, ne, verb
    if 4 + 2 * max(counts) + 3 <= src_longer_than or 8 + 2 * max(counts) <= tgt_longer_than:
        raise ValueError(f"no sentence with at most {max(counts)} adjectives per noun phrase is longer than "
                         f"{src_longer_than} source / {tgt_longer_than} target words")
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs: list[dict[str, str]] = []
    while len(pairs) < n:
        sentence = _random_sentence(rng, counts)
        src, tgt = sentence.source(), sentence.target()
        if len(src) <= src_longer_than or len(tgt) <= tgt_longer_than or detokenise(src) in seen:
            continue
        seen.add(detokenise(src))
        pairs.append({"src": detokenise(src), "tgt": detokenise(tgt)})
    return pairs


def generate_splits(seed: int = SEED, sizes: dict[str, int] | None = None) -> dict[str, list[dict[str, str]]]:
    """Disjoint train/validation/test splits (no source sentence appears in two splits)."""
    sizes = dict(SPLITS if sizes is None else sizes)
    total = sum(sizes.values())
    pairs = generate_pairs(total, seed)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = pairs[start:start + size]
        start += size
    return out


def _jsonl_bytes(pairs: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(p, ensure_ascii=True, sort_keys=True) + "\n" for p in pairs).encode("utf-8")


def write_splits(out_dir: Path | str = DATA_SUBDIR, seed: int = SEED, *, force: bool = False) -> dict[str, Path]:
    """Write <split>.jsonl (one {"src", "tgt"} object per line) for every split; return the paths.

    The default out_dir holds the shipped splits: a split file that exists is not written over
    (ValueError, before anything is written) unless force=True.
    """
    out_dir = Path(out_dir)
    check_bool("force", force)
    refuse_overwrite([out_dir / f"{name}.jsonl" for name in SPLITS], force=force, argument="out_dir",
                     how="pass another out_dir, or force=True to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in generate_splits(seed).items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_bytes(_jsonl_bytes(pairs))
    return paths


def load_split(name: str, data_dir: Path | str = DATA_SUBDIR) -> list[dict[str, str]]:
    """The pairs of split `name` ("train", "validation" or "test") from course_lib/data/toy_translation/."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {name!r}")
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path.name} not found in {Path(data_dir).name}/: run "
                                f"`python -m course_lib.experiments.toy_translation` to generate it")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# --------------------------------------------------------------------------- vocabularies
class Vocab:
    """Token <-> id. Ids 0..3 are <pad>, <bos>, <eos>, <unk>; then the words in a fixed order."""

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, words: Iterable[str]) -> None:
        self.itos = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {', '.join(self.itos[4:10])}, ...)"

    def encode(self, text: str | Sequence[str], *, bos: bool = False, eos: bool = False) -> list[int]:
        tokens = tokenise(text) if isinstance(text, str) else list(text)
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, dropping <bos>/<pad> and stopping at the first <eos>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self) else "<unk>")
        return detokenise(words)


def source_vocab() -> Vocab:
    words = {"the", "a", "some", "does", "do", "not", *ADJECTIVES}
    words |= {w for key in NOUNS for w in key} | {w for key in VERBS for w in key}
    return Vocab(words)


def target_vocab() -> Vocab:
    words = {"ga", "o", "ne", *_DETERMINERS.values()}
    for stem, _ in NOUNS.values():
        words |= {stem + e for e in ("o", "a", "os", "as")}
    for stem in ADJECTIVES.values():
        words |= {stem + e for e in ("o", "a", "os", "as")}
    for stem in VERBS.values():
        words |= {stem + "a", stem + "an"}
    return Vocab(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.experiments.toy_translation",
        description="Regenerate the toy translation splits (fixed seed: the same bytes every time).",
    )
    parser.add_argument("out_dir", nargs="?", type=output_dir, default=DATA_SUBDIR, help=f"default: {DATA_SUBDIR}")
    parser.add_argument("--force", action="store_true",
                        help="write over split files that exist (the shipped ones by default); otherwise refused")
    args = parser.parse_args(argv)
    out_dir = args.out_dir
    try:
        refuse_overwrite([Path(out_dir) / f"{name}.jsonl" for name in SPLITS], force=args.force, argument="out_dir",
                         how="name a new OUT_DIR, or pass --force to replace them")
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, before anything is written
    for name, path in write_splits(out_dir, force=args.force).items():
        print(f"wrote {name}: {len(load_split(name, out_dir))} pairs -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
