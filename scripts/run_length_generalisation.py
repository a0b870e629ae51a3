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

    python scripts/run_length_generalisation.py --scaled --force    # RoPE scaling at inference (second record)

--scaled trains the rotary models again (same recipe, same seeds; the script above kept no weights; --models DIR
keeps them and reuses them) and evaluates each with its RotaryEmbedding swapped for a scaled one, without any
further training: position interpolation ("linear"), NTK-aware ("ntk"), dynamic NTK ("dynamic"), Llama 3's
("llama3"), YaRN ("yarn", its attention temperature included) and YaRN without the temperature, each over a sweep
of the factor s. original_max_position_embeddings is the longest sequence each side met in training (the encoder
its longest source, the decoder <bos> + its longest target). The factor of each method is chosen on a validation
set of longer sentences (same grammar, disjoint from the test ones) by teacher-forced token accuracy, mean over
seeds, and reported on the longer test sentences of the first record, with the unscaled model beside it. Also
measured, for every setting: the test split (do the scalings cost accuracy at the training lengths?) and a control
set at the training lengths with one noun phrase of 3 adjectives (a structure training never showed, at lengths it
did). Sentences are scored in groups of one source length (and one target length when teacher forced), so no
padding changes the length "dynamic" sees. The record is <out>/length_generalisation_scaled.json.

    python scripts/run_length_generalisation.py --scaled --finetune-steps 100 --force   # + a short fine-tuning

reads that record's chosen factors and fine-tunes each rotary model with the scaling in place for
--finetune-steps more steps (AdamW, lr --finetune-lr, 10 warm-up steps, cosine) on the unchanged training split,
the only lengths it has without the new structure, then scores it as above; "none" (plain RoPE, fine-tuned
alike) separates the effect of the extra steps from that of the scaling. "dynamic" is left out: at the training
lengths it is plain RoPE. The record is <out>/length_generalisation_scaled_finetuned.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from course_lib.experiments.capstone import CAPSTONE_RECIPE, build_capstone_model, encode_pairs, exact_match
from course_lib.experiments.toy_translation import (
    ADJECTIVES,
    NOUNS,
    SEED,
    VERBS,
    NounPhrase,
    Sentence,
    detokenise,
    generate_longer_pairs,
    load_split,
    tokenise,
)
from course_lib.experiments.training import (
    batch_iterator,
    collate_pairs,
    load_model,
    save_checkpoint,
    seq2seq_loss,
    train,
)
from course_lib.positional import RotaryEmbedding
from course_lib.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
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


# ----------------------------------------------------------------------------------- RoPE scaling (--scaled)
METHODS = ("linear", "ntk", "dynamic", "llama3", "yarn", "yarn_no_temperature")
FACTORS = (1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def scaling_for(method: str, factor: float, original_length: int) -> dict | None:
    """The `RotaryEmbedding(scaling=...)` of `method` at `factor` for a side trained on `original_length` positions."""
    if method == "none":
        return None
    if method in ("linear", "ntk"):
        return {"rope_type": method, "factor": factor}
    base = {"factor": factor, "original_max_position_embeddings": original_length}
    if method == "dynamic":
        return {"rope_type": "dynamic", **base}
    if method == "llama3":  # Llama 3.1's released settings
        return {"rope_type": "llama3", **base, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    if method == "yarn":  # beta_fast 32, beta_slow 1, temperature 0.1 ln s + 1: the defaults
        return {"rope_type": "yarn", **base}
    if method == "yarn_no_temperature":
        return {"rope_type": "yarn", **base, "attention_factor": 1.0}
    raise ValueError(f"method must be 'none' or one of {METHODS}; got {method!r}")


@contextmanager
def scaled_rotary(model: Seq2SeqTransformer, method: str, factor: float, lengths: dict[str, int]) -> Iterator[None]:
    """Inside the block every self-attention rotates with `method` at `factor` (encoder: original length
    lengths["encoder"], decoder: lengths["decoder"]); the model's own RotaryEmbeddings are put back afterwards."""
    d_head = model.config.d_model // model.config.num_heads
    saved = []
    try:
        for side, layers in (("encoder", model.encoder_layers), ("decoder", model.decoder_layers)):
            for layer in layers:
                saved.append((layer.self_attn, layer.self_attn.rotary))
                layer.self_attn.rotary = RotaryEmbedding(d_head, scaling=scaling_for(method, factor, lengths[side]))
        yield
    finally:
        for attn, rotary in saved:
            attn.rotary = rotary


def _groups(pairs: list[dict[str, str]], *, by_target: bool) -> list[list[dict[str, str]]]:
    """pairs split by source length (and target length): a group needs no padding."""
    groups: dict[tuple[int, int], list[dict[str, str]]] = defaultdict(list)
    for p in pairs:
        groups[(len(tokenise(p["src"])), len(tokenise(p["tgt"])) if by_target else 0)].append(p)
    return [groups[k] for k in sorted(groups)]


@torch.no_grad()
def token_accuracy(model, pairs: list[dict[str, str]], src_vocab, tgt_vocab) -> float:
    """Teacher-forced token accuracy (<eos> included) over `pairs`, scored in unpadded groups."""
    correct = total = 0
    for group in _groups(pairs, by_target=True):
        src, tgt_in, tgt_out = collate_pairs(encode_pairs(group, src_vocab, tgt_vocab))
        correct += int((model(src, tgt_in).argmax(-1) == tgt_out).sum())
        total += tgt_out.numel()
    return round(correct / total, 4)


@torch.no_grad()
def exact_match_unpadded(model, pairs: list[dict[str, str]], src_vocab, tgt_vocab) -> float:
    """Greedy-decoding exact match (KV cache) over `pairs`, decoded in groups of one source length."""
    correct = 0.0
    for group in _groups(pairs, by_target=False):
        em, _ = exact_match(model, group, src_vocab, tgt_vocab)
        correct += em * len(group)
    return round(correct / len(pairs), 4)


def three_adjective_pairs(n: int, *, max_src: int, max_tgt: int, seed: int = SEED + 3) -> list[dict[str, str]]:
    """n distinct pairs at the training lengths (source <= max_src, target <= max_tgt words) with one noun phrase
    of exactly 3 adjectives (the other has 0 to 2, as in training): a structure training never showed, at lengths
    it did."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs: list[dict[str, str]] = []

    def phrase(n_adj: int) -> NounPhrase:
        return NounPhrase(noun=rng.choice(list(NOUNS)), plural=rng.random() < 0.4, definite=rng.random() < 0.5,
                          adjectives=tuple(rng.sample(list(ADJECTIVES), n_adj)))
    while len(pairs) < n:
        three, other = phrase(3), phrase(rng.choices([0, 1, 2], weights=[3, 4, 3])[0])
        subject, obj = (three, other) if rng.random() < 0.5 else (other, three)
        sentence = Sentence(subject=subject, verb=rng.choice(list(VERBS)), negated=rng.random() < 0.25, obj=obj)
        src, tgt = sentence.source(), sentence.target()
        if len(src) > max_src or len(tgt) > max_tgt or detokenise(src) in seen:
            continue
        seen.add(detokenise(src))
        pairs.append({"src": detokenise(src), "tgt": detokenise(tgt)})
    return pairs


def _rotary_model(seed: int, args, train_pairs, models_dir: Path | None):
    """(model, src_vocab, tgt_vocab, train_seconds or None when loaded): the first record's rotary recipe."""
    path = None if models_dir is None else models_dir / f"rotary_seed{seed}_steps{args.steps}.safetensors"
    recipe = {"seed": seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "warmup_steps": args.warmup_steps}
    model, src_vocab, tgt_vocab = build_capstone_model(seed, positional="rotary")
    if path is not None and path.exists():
        loaded, info = load_model(path, lambda c: Seq2SeqTransformer(Seq2SeqConfig.from_dict(c)), "Seq2SeqTransformer")
        if info["metadata"] != recipe or info["config"] != model.config.to_dict():
            raise ValueError(f"--models: {path} was trained with {info['metadata']}, not {recipe}; remove it")
        return loaded, src_vocab, tgt_vocab, None
    batches = batch_iterator(encode_pairs(train_pairs, src_vocab, tgt_vocab), args.batch_size, seed=seed)
    result = train(model, batches, seq2seq_loss, steps=args.steps, lr=args.lr, seed=seed,
                   warmup_steps=args.warmup_steps, progress=False)
    if path is not None:
        save_checkpoint(path, model, config=model.config.to_dict(), metadata=recipe)
    return model.eval(), src_vocab, tgt_vocab, round(result.seconds, 1)


def run_scaled(args, argv: list[str] | None) -> Path:
    """The --scaled study (see the module docstring); returns the record's path."""
    path = args.out / "length_generalisation_scaled.json"
    methods, factors = METHODS, FACTORS
    n_valid, n_control = 500, 500
    if args.tiny:
        args.seeds, args.steps, args.warmup_steps, args.longer = [0], 20, 5, 100
        methods, factors, n_valid, n_control = ("linear", "dynamic", "yarn"), (1.5, 2.0), 50, 50
    torch.set_num_threads(1)
    train_pairs, test_pairs = load_split("train"), load_split("test")
    train_src = max(len(tokenise(p["src"])) for p in train_pairs)
    train_tgt = max(len(tokenise(p["tgt"])) for p in train_pairs)
    longer = generate_longer_pairs(args.longer, src_longer_than=train_src, tgt_longer_than=train_tgt)
    test_sources = {p["src"] for p in longer}
    valid = [p for p in generate_longer_pairs(n_valid + args.longer, src_longer_than=train_src,
                                              tgt_longer_than=train_tgt, seed=SEED + 2)
             if p["src"] not in test_sources][:n_valid]
    control = three_adjective_pairs(n_control, max_src=train_src, max_tgt=train_tgt)
    sets = {"longer_validation": valid, "longer_test": longer, "test_split": test_pairs,
            "three_adjectives_at_training_lengths": control}
    lengths = {"encoder": train_src, "decoder": train_tgt + 1}  # positions each side's self-attention met
    print("original lengths:", lengths, {k: len(v) for k, v in sets.items()}, flush=True)
    settings = [("none", 1.0)] + [(m, f) for m in methods for f in factors]
    models, start = {}, time.time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    seeds_info = []
    for seed in args.seeds:
        model, src_vocab, tgt_vocab, seconds = _rotary_model(seed, args, train_pairs, args.models)
        models[seed] = model
        plain = {"test": evaluate(model, test_pairs, src_vocab, tgt_vocab),
                 "longer": evaluate(model, longer, src_vocab, tgt_vocab)}
        seeds_info.append({"seed": seed, "train_seconds": seconds,
                           "unscaled_as_in_the_first_record": {
                               split: {k: plain[split][k] for k in ("exact_match", "token_accuracy")}
                               for split in plain}})
        how = "loaded" if seconds is None else f"trained in {seconds} s"
        print(f"seed {seed}: {how}; unscaled, scored as the first record: "
              f"token accuracy {plain['longer']['token_accuracy']} on the longer sentences", flush=True)
    sweep = []
    for method, factor in settings:
        row: dict = {"method": method, "factor": factor,
                     "scaling": {side: scaling_for(method, factor, n) for side, n in lengths.items()},
                     "token_accuracy": {name: [] for name in sets}}
        for seed in args.seeds:
            with scaled_rotary(models[seed], method, factor, lengths):
                for name, pairs in sets.items():
                    row["token_accuracy"][name].append(token_accuracy(models[seed], pairs, src_vocab, tgt_vocab))
        sweep.append(row)
        print(method, factor, {k: v for k, v in row["token_accuracy"].items()}, flush=True)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)
    selected = {}
    for method in ("none", *methods):
        rows = [r for r in sweep if r["method"] == method]  # factors ascending: a tie keeps the smaller factor
        best = max(rows, key=lambda r: mean(r["token_accuracy"]["longer_validation"]))
        result: dict = {"factor": best["factor"],
                        "validation_token_accuracy": best["token_accuracy"]["longer_validation"],
                        "token_accuracy": {k: best["token_accuracy"][k] for k in sets if k != "longer_validation"},
                        "exact_match": {}}
        for seed in args.seeds:
            with scaled_rotary(models[seed], method, best["factor"], lengths):
                for name in ("longer_test", "test_split", "three_adjectives_at_training_lengths"):
                    result["exact_match"].setdefault(name, []).append(
                        exact_match_unpadded(models[seed], sets[name], src_vocab, tgt_vocab))
                result.setdefault("longer_test_by_length", []).append(
                    evaluate_grouped(models[seed], longer, src_vocab, tgt_vocab))
        selected[method] = result
        print("selected", method, best["factor"], result["token_accuracy"], result["exact_match"], flush=True)
    command = "python scripts/run_length_generalisation.py" + (" " + " ".join(argv) if argv else "")
    record = {"command": command, "trained_as": "the rotary runs of length_generalisation.json (same recipe, "
              "steps, seeds, batches), trained again: that script kept no weights; scaling applied at inference, "
              "no fine-tuning", "recipe": {k: v for k, v in CAPSTONE_RECIPE.items() if k != "positional"},
              "positional": "rotary", "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "warmup_steps": args.warmup_steps,
              "original_max_position_embeddings": lengths, "methods": list(methods), "factors": list(factors),
              "selection": "per method, the factor with the highest teacher-forced token accuracy on "
                           "longer_validation, mean over seeds (ties: the smaller factor)",
              "sets": {name: {"count": len(pairs),
                              "src_words": [min(len(tokenise(p["src"])) for p in pairs),
                                            max(len(tokenise(p["src"])) for p in pairs)],
                              "tgt_words": [min(len(tokenise(p["tgt"])) for p in pairs),
                                            max(len(tokenise(p["tgt"])) for p in pairs)]}
                       for name, pairs in sets.items()},
              "set_sources": {"longer_validation": f"generate_longer_pairs(seed={SEED + 2}), test sources removed",
                              "longer_test": "generate_longer_pairs (the first record's longer sentences)",
                              "test_split": "load_split('test')",
                              "three_adjectives_at_training_lengths": f"one noun phrase of 3 adjectives, source <= "
                                                                      f"{train_src} and target <= {train_tgt} words, "
                                                                      f"random.Random({SEED + 3})"},
              "versions": {"python": platform.python_version(), "torch": torch.__version__}, "threads": 1,
              "machine_load": f"{os.cpu_count()} CPU cores, 1-minute load average {load:.1f} at the start",
              "total_seconds": round(time.time() - start, 1), "models": seeds_info, "sweep": sweep,
              "selected": selected}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


FINETUNED = ("none", "linear", "ntk", "llama3", "yarn")


def run_finetuned(args, argv: list[str] | None) -> Path:
    """The --scaled --finetune-steps study (see the module docstring); returns the record's path."""
    source = args.out / "length_generalisation_scaled.json"
    if not source.exists():
        raise SystemExit(f"--finetune-steps reads the factors chosen in {source}: run --scaled first")
    chosen = json.loads(source.read_text())
    if args.tiny:
        args.seeds, args.steps, args.warmup_steps, args.longer = [0], 20, 5, 100
    if chosen["seeds"] != args.seeds or chosen["steps"] != args.steps:
        raise SystemExit(f"{source} holds seeds {chosen['seeds']} and {chosen['steps']} steps; this run "
                         f"{args.seeds} and {args.steps}")
    methods = [m for m in FINETUNED if m in chosen["selected"]]
    torch.set_num_threads(1)
    train_pairs, test_pairs = load_split("train"), load_split("test")
    train_src = max(len(tokenise(p["src"])) for p in train_pairs)
    train_tgt = max(len(tokenise(p["tgt"])) for p in train_pairs)
    sets = {"longer_test": generate_longer_pairs(args.longer, src_longer_than=train_src, tgt_longer_than=train_tgt),
            "test_split": test_pairs,
            "three_adjectives_at_training_lengths": three_adjective_pairs(
                chosen["sets"]["three_adjectives_at_training_lengths"]["count"], max_src=train_src,
                max_tgt=train_tgt)}
    lengths = chosen["original_max_position_embeddings"]
    runs, start = [], time.time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for seed in args.seeds:
        for method in methods:
            factor = chosen["selected"][method]["factor"]
            model, src_vocab, tgt_vocab, _ = _rotary_model(seed, args, train_pairs, args.models)
            batches = batch_iterator(encode_pairs(train_pairs, src_vocab, tgt_vocab), args.batch_size,
                                     seed=seed + 1000)  # batches the first training did not start with
            with scaled_rotary(model, method, factor, lengths):
                result = train(model, batches, seq2seq_loss, steps=args.finetune_steps, lr=args.finetune_lr,
                               seed=seed, warmup_steps=min(10, args.finetune_steps), progress=False)
                model.eval()
                run = {"method": method, "factor": factor, "seed": seed, "finetune_seconds": round(result.seconds, 1),
                       "final_loss": round(sum(result.losses[-10:]) / len(result.losses[-10:]), 5),
                       "token_accuracy": {name: token_accuracy(model, pairs, src_vocab, tgt_vocab)
                                          for name, pairs in sets.items()},
                       "exact_match": {name: exact_match_unpadded(model, pairs, src_vocab, tgt_vocab)
                                       for name, pairs in sets.items()}}
            runs.append(run)
            print(method, factor, seed, run["token_accuracy"], run["exact_match"], flush=True)
    command = "python scripts/run_length_generalisation.py" + (" " + " ".join(argv) if argv else "")
    record = {"command": command, "factors_from": source.name, "finetune_steps": args.finetune_steps,
              "finetune_lr": args.finetune_lr, "finetune_warmup_steps": min(10, args.finetune_steps),
              "finetune_data": "the training split (lengths of training), batches from numpy seed + 1000",
              "seeds": args.seeds, "steps_before": args.steps, "methods": methods,
              "original_max_position_embeddings": lengths,
              "sets": {name: len(pairs) for name, pairs in sets.items()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__}, "threads": 1,
              "machine_load": f"{os.cpu_count()} CPU cores, 1-minute load average {load:.1f} at the start",
              "total_seconds": round(time.time() - start, 1), "runs": runs}
    path = args.out / "length_generalisation_scaled_finetuned.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


@torch.no_grad()
def evaluate_grouped(model, pairs: list[dict[str, str]], src_vocab, tgt_vocab) -> dict[str, float]:
    """Teacher-forced token accuracy per target length, scored in unpadded groups."""
    by_length: dict[int, list[dict[str, str]]] = defaultdict(list)
    for p in pairs:
        by_length[len(tokenise(p["tgt"]))].append(p)
    return {str(n): token_accuracy(model, group, src_vocab, tgt_vocab) for n, group in sorted(by_length.items())}


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
    parser.add_argument("--force", action="store_true", help="write over the record in <out> if it exists")
    parser.add_argument("--scaled", action="store_true",
                        help="RoPE scaling at inference on the rotary models: <out>/length_generalisation_scaled.json")
    parser.add_argument("--models", type=Path, default=None,
                        help="with --scaled: keep the trained rotary models in this folder, and reuse them")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="with --scaled: fine-tune with each chosen scaling for this many steps "
                             "(<out>/length_generalisation_scaled_finetuned.json)")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    args = parser.parse_args(argv)
    if args.finetune_steps < 0 or (args.finetune_steps and not args.scaled):
        parser.error("--finetune-steps must be >= 0, and goes with --scaled")
    name = ("length_generalisation_scaled_finetuned.json" if args.finetune_steps else
            "length_generalisation_scaled.json" if args.scaled else "length_generalisation.json")
    try:
        refuse_overwrite([args.out / name], force=args.force, argument="--out",
                         how="pass another --out, or --force to replace it")
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, before any training
    if args.finetune_steps:
        return run_finetuned(args, argv)
    if args.scaled:
        return run_scaled(args, argv)
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
