"""What sharing key/value heads costs on the lookup tasks of notebook 07: MHA vs GQA vs MQA (notebook 12).

    python scripts/run_kv_sharing.py --force             # the recorded runs (11 min on one thread of a busy machine)
    python scripts/run_kv_sharing.py --tiny --out /tmp/x  # a seconds-long smoke run
    python scripts/run_kv_sharing.py --tasks three_lookups --d-ff 0 --seeds 0 1 2 3 4 --name kv_sharing_attn_only \
        --force                                           # attention only: the setting that does not saturate

A run whose <out>/<name>.json exists (a recorded one by default) is refused before it trains, unless --force.

Every run: the head-ablation model (`course_lib.experiments.head_ablation`, one layer, attention + MLP, or
attention only with --d-ff 0) with 4 query heads at d_model = 32, and 4 (MHA), 2 (GQA) or 1 (MQA) key/value
heads, trained from a seed on fresh random batches exactly as notebook 07's sweep; the held-out accuracy and
loss are recorded. Equal d_model and query heads, so the variants with fewer kv heads also have fewer
parameters (recorded).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from course_lib.experiments.head_ablation import TrainConfig, count_parameters, train_model
from course_lib.tools.paths import DATA_DIR, refuse_overwrite


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["two_lookups", "three_lookups"])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", nargs="+", type=int, default=[4, 2, 1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--d-ff", type=int, default=128, help="width of the MLP after attention (0: attention only)")
    parser.add_argument("--name", default="kv_sharing", help="the record is written to <out>/<name>.json")
    parser.add_argument("--out", type=Path, default=DATA_DIR / "head_ablation")
    parser.add_argument("--tiny", action="store_true", help="1 task x 2 kv-head counts x 1 seed x 20 steps")
    parser.add_argument("--force", action="store_true", help="write over <out>/<name>.json if it exists")
    args = parser.parse_args(argv)
    try:
        refuse_overwrite([args.out / f"{args.name}.json"], force=args.force, argument="--out/--name",
                         how="pass another --out or --name, or --force to replace it")
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, before any training
    if args.tiny:
        args.tasks, args.kv_heads, args.seeds, args.steps = ["two_lookups"], [4, 1], [0], 20
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    runs, start = [], time.time()
    for task in args.tasks:
        for kv in args.kv_heads:
            for seed in args.seeds:
                cfg = TrainConfig(task=task, num_heads=args.heads, num_kv_heads=kv, d_model=args.d_model,
                                  d_ff=args.d_ff, steps=args.steps, seed=seed, eval_every=max(1, args.steps // 20))
                t0 = time.time()
                model, curve = train_model(cfg)
                runs.append({"config": asdict(cfg), "params": count_parameters(model),
                             "cache_numbers_per_token": 2 * kv * (args.d_model // args.heads),
                             "final_acc": curve["eval_acc"][-1], "final_loss": curve["eval_loss"][-1],
                             "curve": curve, "seconds": round(time.time() - t0, 2)})
                print(f"{task} H={args.heads} H_kv={kv} seed={seed}: acc {curve['eval_acc'][-1]:.4f} "
                      f"({runs[-1]['seconds']} s)", flush=True)
    command = "python scripts/run_kv_sharing.py" + (" " + " ".join(argv) if argv else "")
    record = {"command": command, "tasks": args.tasks, "heads": args.heads, "kv_heads": args.kv_heads,
              "seeds": args.seeds, "steps": args.steps, "d_model": args.d_model, "d_ff": args.d_ff,
              "versions": {"python": platform.python_version(), "torch": torch.__version__}, "threads": 1,
              "total_seconds": round(time.time() - start, 1), "runs": runs}
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


if __name__ == "__main__":
    print(main(sys.argv[1:]))
