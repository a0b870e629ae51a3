"""Length generalisation of the capstone task: sinusoidal vs rotary positions (notebook 12).

    python scripts/run_length_generalisation.py --force             # the recorded runs (one CPU thread)
    python scripts/run_length_generalisation.py --tiny --out /tmp/x  # a seconds-long smoke run

A run whose <out>/length_generalisation.json exists (the recorded one by default) is refused before it trains,
unless --force.

Both models are notebook 11's float32 capstone recipe (`course_lib.experiments.capstone.CAPSTONE_RECIPE`,
AdamW, warm-up + cosine, batch 128, lr 2e-3, 200 warm-up steps), trained on the unchanged training split for
the same number of steps from the same seeds; they differ only in `positional`: "sinusoidal" (vectors added to
the embeddings) or "rotary" (queries and keys of every self-attention rotated; cross-attention unrotated).
Each is evaluated on the test split (the training lengths) and on sentences of the same grammar with 3 to 5
adjectives per noun phrase, kept only when source and target are longer than every training sentence. Per
target length: greedy-decoding exact match and teacher-forced token accuracy; on the longer sentences also
token accuracy by target position.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from course_lib.experiments.capstone import CAPSTONE_RECIPE, build_capstone_model, encode_pairs, exact_match
from course_lib.experiments.toy_translation import generate_longer_pairs, load_split, tokenise
from course_lib.experiments.training import batch_iterator, collate_pairs, seq2seq_loss, train
from course_lib.tools.paths import DATA_DIR, refuse_overwrite

OUT_DIR = DATA_DIR / "positional"


def _by_length(pairs: list[dict[str, str]]) -> dict[int, list[dict[str, str]]]:
    groups: dict[int, list[dict[str, str]]] = defaultdict(list)
    for p in pairs:
        groups[len(tokenise(p["tgt"]))].append(p)
    return dict(sorted(groups.items()))


@torch.no_grad()
def evaluate(model, pairs: list[dict[str, str]], src_vocab, tgt_vocab) -> dict:
    """Per target length: count, exact match (greedy, KV cache), token accuracy (teacher forced, <eos> included);
    and token accuracy by target position over all of `pairs`."""
    by_length = {}
    for length, group in _by_length(pairs).items():
        em, _ = exact_match(model, group, src_vocab, tgt_vocab)
        src, tgt_in, tgt_out = collate_pairs(encode_pairs(group, src_vocab, tgt_vocab))
        correct = model(src, tgt_in).argmax(-1) == tgt_out  # (B, T), every position real: one length
        by_length[str(length)] = {"count": len(group), "exact_match": round(em, 4),
                                  "token_accuracy": round(float(correct.float().mean()), 4)}
    src, tgt_in, tgt_out = collate_pairs(encode_pairs(pairs, src_vocab, tgt_vocab))
    real = tgt_out != model.config.pad_id  # (B, T)
    correct = (model(src, tgt_in).argmax(-1) == tgt_out) & real
    by_position = (correct.sum(0) / real.sum(0).clamp(min=1)).tolist()  # (T,)
    n_correct = sum(v["exact_match"] * v["count"] for v in by_length.values())
    return {"exact_match": round(n_correct / len(pairs), 4),
            "token_accuracy": round(float(correct.sum() / real.sum()), 4),
            "by_length": by_length, "token_accuracy_by_position": [round(x, 4) for x in by_position]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positionals", nargs="+", default=["sinusoidal", "rotary"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--longer", type=int, default=1000, help="how many longer sentences to test on")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--tiny", action="store_true", help="1 seed x 20 steps, 100 longer sentences")
    parser.add_argument("--force", action="store_true", help="write over <out>/length_generalisation.json if it exists")
    args = parser.parse_args(argv)
    try:
        refuse_overwrite([args.out / "length_generalisation.json"], force=args.force, argument="--out",
                         how="pass another --out, or --force to replace it")
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, before any training
    if args.tiny:
        args.seeds, args.steps, args.warmup_steps, args.longer = [0], 20, 5, 100
    torch.set_num_threads(1)
    train_pairs, test_pairs = load_split("train"), load_split("test")
    train_src = max(len(tokenise(p["src"])) for p in train_pairs)
    train_tgt = max(len(tokenise(p["tgt"])) for p in train_pairs)
    longer = generate_longer_pairs(args.longer, src_longer_than=train_src, tgt_longer_than=train_tgt)
    lengths = {name: {"src": [min(len(tokenise(p["src"])) for p in pairs), max(len(tokenise(p["src"])) for p in pairs)],
                      "tgt": [min(len(tokenise(p["tgt"])) for p in pairs), max(len(tokenise(p["tgt"])) for p in pairs)]}
               for name, pairs in (("train", train_pairs), ("test", test_pairs), ("longer", longer))}
    print("word counts [min, max]:", lengths, flush=True)
    runs, start = [], time.time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for positional in args.positionals:
        for seed in args.seeds:
            model, src_vocab, tgt_vocab = build_capstone_model(seed, positional=positional)
            batches = batch_iterator(encode_pairs(train_pairs, src_vocab, tgt_vocab), args.batch_size, seed=seed)
            result = train(model, batches, seq2seq_loss, steps=args.steps, lr=args.lr, seed=seed,
                           warmup_steps=args.warmup_steps, progress=False)
            run = {"positional": positional, "seed": seed, "train_seconds": round(result.seconds, 1),
                   "final_loss": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 5),
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "test": evaluate(model, test_pairs, src_vocab, tgt_vocab),
                   "longer": evaluate(model, longer, src_vocab, tgt_vocab)}
            runs.append(run)
            print(f"{positional} seed={seed}: {run['train_seconds']} s, exact match test {run['test']['exact_match']}"
                  f" longer {run['longer']['exact_match']}; token accuracy test {run['test']['token_accuracy']}"
                  f" longer {run['longer']['token_accuracy']}", flush=True)
    command = "python scripts/run_length_generalisation.py" + (" " + " ".join(argv) if argv else "")
    record = {"command": command, "recipe": {k: v for k, v in CAPSTONE_RECIPE.items() if k != "positional"},
              "positionals": args.positionals, "seeds": args.seeds, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
              "longer_sentences": {"count": len(longer), "adjectives_per_noun_phrase": [3, 4, 5],
                                   "kept_if_src_longer_than": train_src, "kept_if_tgt_longer_than": train_tgt},
              "word_counts": lengths,
              "versions": {"python": platform.python_version(), "torch": torch.__version__}, "threads": 1,
              "machine_load": f"{os.cpu_count()} CPU cores, 1-minute load average {load:.1f} at the start",
              "total_seconds": round(time.time() - start, 1), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "length_generalisation.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


if __name__ == "__main__":
    print(main(sys.argv[1:]))
