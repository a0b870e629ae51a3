"""Run the seeds' own head-count ablation (parity of a 50-token sum, mean pooling) and record it.

    python scripts/run_parity_ablation.py --force            # writes data/head_ablation/parity.json
    python scripts/run_parity_ablation.py --tiny --out /tmp/x  # a seconds-long smoke run

A run whose <out>/parity.json exists (the recorded one by default) is refused before it trains, unless --force.

`course_lib.experiments.head_ablation.train_parity` runs the seeds' recipe (embedding, one multi-head self-attention,
mean over positions, linear; Adam at 1e-3 over the same 50 batches of 32 for 10 epochs) for every head
count and seed, and records training and test accuracy. The test set is larger than the seeds' (10
batches) so that its accuracy is known to about +-0.01.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from course_lib.experiments.head_ablation import train_parity
from course_lib.tools.paths import DATA_DIR, refuse_overwrite


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--test-batches", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DATA_DIR / "head_ablation")
    parser.add_argument("--tiny", action="store_true", help="2 head counts, 1 seed, 1 epoch, small model")
    parser.add_argument("--force", action="store_true", help="write over <out>/parity.json if it exists")
    args = parser.parse_args(argv)
    try:
        refuse_overwrite([args.out / "parity.json"], force=args.force, argument="--out",
                         how="pass another --out, or --force to replace it")
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, before any training
    if args.tiny:
        args.heads, args.seeds, args.d_model, args.vocab, args.epochs, args.test_batches = [1, 2], [0], 8, 50, 1, 2
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = dict(d_model=args.d_model, vocab=args.vocab, seq_len=args.seq_len, batch_size=32, train_batches=50,
                    test_batches=args.test_batches, epochs=args.epochs, lr=1e-3)
    runs, start = [], time.time()
    for heads in args.heads:
        for seed in args.seeds:
            t0 = time.time()
            result = train_parity(heads, seed=seed, **settings)
            runs.append({"num_heads": heads, "seed": seed, **result, "seconds": round(time.time() - t0, 2)})
            print(f"H={heads:2d} seed={seed} train_acc={result['train_acc']:.3f} test_acc={result['test_acc']:.3f} "
                  f"({time.time() - t0:.1f} s)", flush=True)
    record = {
        "command": " ".join(["python scripts/run_parity_ablation.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": settings, "heads": args.heads, "seeds": args.seeds,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "threads": 1, "total_seconds": round(time.time() - start, 1), "runs": runs,
    }
    path = args.out / "parity.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
