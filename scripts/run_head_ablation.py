"""Run the head-count ablation of notebook 07 and write data/head_ablation/sweep.json.

    python scripts/run_head_ablation.py --force          # the recorded sweep (about 15 min on one core)
    python scripts/run_head_ablation.py --tiny --out /tmp/x  # a seconds-long smoke run (used by the tests)

A run that would write over a file that exists (OUT/NAME.json, a checkpoint in --checkpoint-dir: the
recorded ones by default) is refused before it trains, unless --force.

Other arms write their own file (--name) and no checkpoints: --lrs sweeps the learning rate, and
--stop-at-acc stops each run at the first evaluation that reaches that held-out accuracy (its step is
recorded as steps_to_target), so that a long budget costs only what the slow runs need.

Every run: one of TASKS, a model with H heads at a fixed d_model (so the parameter count does not depend
on H), trained from a seed on fresh random batches; the accuracy and loss curves on the held-out (validation)
batch are recorded, and the final model is scored once on a separate test batch (its own generator:
`held_out_test_batch`), so that a choice made on the validation batch (--lrs) can be reported on data it did
not see: each run has val_acc/val_loss and test_acc/test_loss.
The H = 8 model of each (task, variant), seed 0, is also saved as a checkpoint for notebooks 07 and 08
(`course_lib.experiments.head_ablation.load_head_model` reads it back with its config).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from course_lib.experiments.head_ablation import (
    TASKS,
    TEST_SEED,
    VALIDATION_SEED,
    TrainConfig,
    count_parameters,
    evaluate,
    held_out_test_batch,
    save_head_model,
    train_model,
)
from course_lib.tools.paths import DATA_DIR, PACKAGE_DATA, refuse_overwrite

VARIANTS = {"attn_mlp": 128, "attn_only": 0}  # name -> d_ff (0 = no MLP after attention)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--heads", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DATA_DIR / "head_ablation")
    parser.add_argument("--checkpoint-dir", type=Path, default=PACKAGE_DATA / "checkpoints")
    parser.add_argument("--lrs", nargs="+", type=float, default=[TrainConfig.lr], help="peak learning rates")
    parser.add_argument("--stop-at-acc", type=float, default=None, help="stop a run once it reaches this accuracy")
    parser.add_argument("--eval-every", type=int, default=None, help="default: steps // 20")
    parser.add_argument("--test-size", type=int, default=2048, help="sequences in the test batch")
    parser.add_argument("--name", default="sweep", help="writes OUT/NAME.json")
    parser.add_argument("--no-checkpoints", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="2 heads counts x 1 seed x 20 steps, for tests")
    parser.add_argument("--force", action="store_true",
                        help="write over OUT/NAME.json and the checkpoints if they exist (otherwise refused)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.tasks, args.heads, args.seeds, args.variants, args.steps = ["two_lookups"], [1, 2], [0], ["attn_mlp"], 20
        args.checkpoint_dir = args.out

    if args.test_size < 1:
        parser.error(f"--test-size must be a positive integer; got {args.test_size}")
    path = args.out / f"{args.name}.json"
    # seeds outermost: a sweep stopped early has every configuration for its first seeds
    configs = [(seed, variant, task, heads, lr) for seed in args.seeds for variant in args.variants
               for task in args.tasks for heads in args.heads for lr in args.lrs
               if not (variant == "attn_only" and task == "one_lookup")]  # the control task: full model only
    checkpoints = [] if args.no_checkpoints else sorted({
        args.checkpoint_dir / f"heads_{task}_{variant}_h{max(args.heads)}.safetensors"
        for _, variant, task, _, _ in configs})
    try:
        refuse_overwrite([path, *checkpoints], force=args.force, argument="--out/--name/--checkpoint-dir",
                         how="pass another --out or --name (and --checkpoint-dir or --no-checkpoints), or --force "
                             "to replace them")
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, before any training
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    runs: list[dict] = []
    start = time.time()

    def write(complete: bool) -> None:  # after every run, so that an interrupted sweep keeps what it did
        record = {
            "command": " ".join(["python scripts/run_head_ablation.py", *(sys.argv[1:] if argv is None else argv)]),
            "tasks": {name: {"offsets": list(t.offsets), "vocab": t.vocab, "seq_len": t.seq_len,
                             "num_classes": t.num_classes} for name, t in TASKS.items() if name in args.tasks},
            "variants": {v: {"d_ff": VARIANTS[v]} for v in args.variants},
            "heads": args.heads, "seeds": args.seeds, "steps": args.steps, "d_model": args.d_model,
            "lrs": args.lrs, "stop_at_acc": args.stop_at_acc, "complete": complete,
            "validation": {"seed": VALIDATION_SEED, "size": TrainConfig.eval_size},
            "test": {"seed": TEST_SEED, "size": args.test_size},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "threads": 1, "total_seconds": round(time.time() - start, 1), "runs": runs,
        }
        path.write_text(json.dumps(record, indent=1))

    for seed, variant, task, heads, lr in configs:
        cfg = TrainConfig(task=task, num_heads=heads, d_model=args.d_model, d_ff=VARIANTS[variant],
                          steps=args.steps, seed=seed, lr=lr, stop_at_acc=args.stop_at_acc,
                          eval_every=args.eval_every or max(1, args.steps // 20))
        t0 = time.time()
        model, curve = train_model(cfg)
        test_loss, test_acc = evaluate(model, *held_out_test_batch(TASKS[task], args.test_size))
        runs.append({"variant": variant, "config": asdict(cfg), "params": count_parameters(model),
                     "curve": curve, "final_acc": curve["eval_acc"][-1],  # final_* = val_*, the older name
                     "final_loss": curve["eval_loss"][-1], "val_acc": curve["eval_acc"][-1],
                     "val_loss": curve["eval_loss"][-1], "test_acc": test_acc, "test_loss": test_loss,
                     "seconds": round(time.time() - t0, 2)})
        reached = f" steps_to_target={curve['steps_to_target']}" if args.stop_at_acc else ""
        print(f"{variant:9s} {task:13s} H={heads} lr={lr:g} seed={seed} val_acc={curve['eval_acc'][-1]:.3f} "
              f"val_loss={curve['eval_loss'][-1]:.3f} test_acc={test_acc:.3f}{reached} ({time.time() - t0:.1f} s)",
              flush=True)
        write(complete=False)
        if not args.no_checkpoints and seed == args.seeds[0] and heads == max(args.heads):
            name = f"heads_{task}_{variant}_h{heads}.safetensors"
            save_head_model(args.checkpoint_dir / name, model, metadata={
                "task": task, "variant": variant, "seed": seed, "steps": args.steps,
                "final_acc": curve["eval_acc"][-1]})
    write(complete=True)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
