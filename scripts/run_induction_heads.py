"""Induction heads: 1-layer vs 2-layer attention-only transformers on repeated random tokens (notebook 08).

    python scripts/run_induction_heads.py --force             # the recorded run (about 6 minutes on one CPU thread)
    python scripts/run_induction_heads.py --tiny --out /tmp/x  # a seconds-long smoke run (used by the tests)

A run whose outputs exist (OUT/induction.json and OUT/induction_{1,2}layer_seed<first seed>.safetensors: the
recorded ones by default) is refused before it trains, unless --force.

Every run (`course_lib.experiments.induction.train_induction_model`): an attention-only model with 1 or 2 causal
layers of --heads heads, trained from a seed on fresh sequences (a random prefix of L tokens, L drawn per batch
from --min-prefix .. --max-prefix, then the prefix again). Recorded per step: the training loss on the first and on
the repeated half. Then, on a held-out batch with L = --eval-prefix: the two half losses, the probability given to
tokens already in the context (and what a uniform prediction gives), every head's previous-token and induction
scores, and the in-context drop (first minus repeated) with each head removed alone, with the circuit's heads
removed together, and with every other head removed together. The first seed's models are saved (safetensors) and
its attention patterns on one held-out sequence are stored for the heatmaps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from course_lib.experiments.induction import (
    DATA_SEED_OFFSET,
    AttentionOnlyTransformer,
    InductionConfig,
    ablation_table,
    context_mass,
    in_context_drop,
    induction_score,
    phase_change_step,
    previous_token_score,
    repeated_tokens,
    train_induction_model,
)
from course_lib.experiments.training import save_checkpoint
from course_lib.tools.cli import output_dir, positive_finite_float, positive_int, seed
from course_lib.tools.device import device_facts
from course_lib.tools.paths import DATA_DIR, refuse_overwrite

with warnings.catch_warnings():  # without ipywidgets tqdm.auto warns, then falls back to a text bar: fine
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

OUT_DIR = DATA_DIR / "induction"
EVAL_SEED = 12345  # the held-out batch's own generator: every model is scored on the same sequences
EVAL_SIZE = 512
CIRCUIT_THRESHOLD = 0.3  # a head whose score is >= this (or the layer's best) belongs to the circuit


def _r(values, digits: int = 4):
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def _circuit(prev: np.ndarray, ind: np.ndarray) -> dict:
    """The 2-layer model's circuit: layer 1's previous-token heads and layer 2's induction heads.

    prev, ind: (num_layers, num_heads) scores. A head belongs when its score is >= CIRCUIT_THRESHOLD;
    the layer's best head always does.
    """
    prev_heads = sorted({int(np.argmax(prev[0]))} | {int(h) for h in np.nonzero(prev[0] >= CIRCUIT_THRESHOLD)[0]})
    ind_heads = sorted({int(np.argmax(ind[1]))} | {int(h) for h in np.nonzero(ind[1] >= CIRCUIT_THRESHOLD)[0]})
    return {"previous_token_heads": [[0, h] for h in prev_heads], "induction_heads": [[1, h] for h in ind_heads]}


def _group_drop(model: AttentionOnlyTransformer, x: torch.Tensor, L: int, heads: list[list[int]]) -> dict:
    gate = torch.ones(model.num_layers, model.num_heads)
    for layer, head in heads:
        gate[layer, head] = 0.0
    return {k: round(v, 4) for k, v in in_context_drop(model, x, L, gate).items()}


def evaluate_run(model: AttentionOnlyTransformer, x: torch.Tensor, L: int) -> dict:
    """Held-out half losses, head scores, ablations (single heads; for 2 layers, the circuit and the rest)."""
    with torch.no_grad():
        logits, weights = model(x, need_weights=True)  # (B, 2L, V), [(B, H, 2L, 2L)] per layer
    prev = np.stack([previous_token_score(w) for w in weights])  # (layers, H)
    ind = np.stack([induction_score(w, L) for w in weights])  # (layers, H)
    table = ablation_table(model, x, L)
    out: dict = {"eval": {k: round(v, 4) for k, v in table["full"].items()},
                 "previous_token_score": _r(prev), "induction_score": _r(ind),
                 "context_mass": {"model": _r(context_mass(logits, x, L)),  # [first half, repeated half]
                                  "uniform": _r(context_mass(torch.zeros_like(logits), x, L))},
                 "ablate_one_head": [[{k: round(v, 4) for k, v in d.items()} for d in row] for row in table["heads"]]}
    if model.num_layers == 2:
        circuit = _circuit(prev, ind)
        members = circuit["previous_token_heads"] + circuit["induction_heads"]
        others = [[layer, h] for layer in range(2) for h in range(model.num_heads) if [layer, h] not in members]
        out["circuit"] = circuit
        out["ablate_groups"] = {
            "previous_token_heads": _group_drop(model, x, L, circuit["previous_token_heads"]),
            "induction_heads": _group_drop(model, x, L, circuit["induction_heads"]),
            "all_other_heads": _group_drop(model, x, L, others) if others else None,
            "other_heads": others}
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", type=positive_int, default=[1, 2])
    parser.add_argument("--seeds", nargs="+", type=seed, default=[0, 1, 2])
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--d-model", type=positive_int, default=64)
    parser.add_argument("--vocab", type=positive_int, default=64)
    parser.add_argument("--min-prefix", type=positive_int, default=8)
    parser.add_argument("--max-prefix", type=positive_int, default=20)
    parser.add_argument("--eval-prefix", type=positive_int, default=14, help="L of the held-out sequences")
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=positive_finite_float, default=1e-3)
    parser.add_argument("--out", type=output_dir, default=OUT_DIR)
    parser.add_argument("--tiny", action="store_true", help="1 seed x 30 steps x 16 held-out sequences, for tests")
    parser.add_argument("--force", action="store_true", help="write over the outputs in --out if they exist")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.steps = args.seeds[:1], 30
    if not 2 <= args.min_prefix <= args.eval_prefix <= args.max_prefix:
        parser.error(f"expected 2 <= --min-prefix <= --eval-prefix <= --max-prefix; got {args.min_prefix}, "
                     f"{args.eval_prefix}, {args.max_prefix}")
    if d_head_left := args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads}); remainder {d_head_left}")
    if any(n > 2 for n in args.layers):
        parser.error(f"--layers: 1 or 2 layers (the circuit's analysis reads layers 1 and 2); got {args.layers}")
    path = args.out / "induction.json"
    checkpoints = [args.out / f"induction_{n}layer_seed{args.seeds[0]}.safetensors" for n in args.layers]
    try:
        refuse_overwrite([path, *checkpoints], force=args.force, argument="--out",
                         how="pass another --out, or --force to replace them")
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, before any training
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    eval_size = 16 if args.tiny else EVAL_SIZE
    x_eval = repeated_tokens(eval_size, args.eval_prefix, args.vocab, torch.Generator().manual_seed(EVAL_SEED))

    base = InductionConfig(num_heads=args.heads, d_model=args.d_model, vocab=args.vocab, min_prefix=args.min_prefix,
                           max_prefix=args.max_prefix, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    runs: list[dict] = []
    example: dict = {}
    start = time.time()
    grid = [(n, s) for s in args.seeds for n in args.layers]  # seeds outermost: a stopped run has whole seeds
    for num_layers, run_seed in tqdm(grid, desc="runs"):
        cfg = replace(base, num_layers=num_layers, seed=run_seed)
        model, curves, seconds = train_induction_model(cfg, progress=not args.tiny)
        run = {"layers": num_layers, "seed": run_seed, "config": asdict(cfg), "train_seconds": round(seconds, 1),
               "phase_change_step": phase_change_step(curves["first"], curves["repeated"]),
               "curves": {k: _r(v, 3) for k, v in curves.items()}, **evaluate_run(model, x_eval, args.eval_prefix)}
        runs.append(run)
        print(f"{num_layers}-layer seed {run_seed}: first {run['eval']['first']:.3f} repeated "
              f"{run['eval']['repeated']:.3f} drop {run['eval']['drop']:.3f} phase step {run['phase_change_step']} "
              f"({seconds:.0f} s)", flush=True)
        if run_seed == args.seeds[0]:
            save_checkpoint(args.out / f"induction_{num_layers}layer_seed{run_seed}.safetensors", model,
                            config=model.config, metadata={"seed": run_seed, "steps": args.steps})
            with torch.no_grad():
                _, weights = model(x_eval[:1], need_weights=True)
            example[f"{num_layers}"] = [_r(w[0], 3) for w in weights]  # per layer (H, 2L, 2L)
    command = "python scripts/run_induction_heads.py" + (
        " " + " ".join(sys.argv[1:] if argv is None else argv) if (sys.argv[1:] if argv is None else argv) else "")
    record = {
        "command": command, "seeds": args.seeds, "layers": args.layers, "config": asdict(base),
        "data_seed_offset": DATA_SEED_OFFSET,
        "eval": {"prefix_len": args.eval_prefix, "size": eval_size, "seed": EVAL_SEED},
        "circuit_threshold": CIRCUIT_THRESHOLD,
        "example": {"tokens": x_eval[0].tolist(), "attention": example},
        "device": device_facts("cpu"), "threads": torch.get_num_threads(),
        "total_seconds": round(time.time() - start, 1), "runs": runs,
    }
    path.write_text(json.dumps(record) + "\n")
    print(f"wrote {path} ({record['total_seconds']} s)")
    return path


if __name__ == "__main__":
    main()
