"""Extra memory of naive vs tiled (online-softmax) attention in numpy, measured with tracemalloc.

    python -m course_lib.bench tiled_memory                       # T = 1k..16k, d = 64 (needs ~12 GiB RAM)
    python -m course_lib.bench tiled_memory --lengths 256 512 --out /tmp/m.json

numpy reports its array allocations to tracemalloc, so the traced peak during one call, minus
what was allocated before it, is the call's extra memory (temporaries and the result). Naive
attention builds the (T, T) scores and weights: it grows as T^2. The tiled version keeps one
(block, block) tile and the (T, d) output: it grows as T.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from course_lib.bench.timing import device_info
from course_lib.numpy_ref import online_softmax_attention, scaled_dot_product_attention
from course_lib.paths import DATA_DIR

DEFAULT_OUT = DATA_DIR / "benchmarks" / "tiled_memory_numpy.json"


def extra_peak_bytes(fn) -> int:
    """Peak bytes allocated (and traced) while fn() runs, above what was allocated when it started."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def measure(T: int, d: int, block_size: int, seed: int = 0, naive: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((T, d)) for _ in range(3))  # (T, d) float64
    row = {"T": T, "d": d, "block_size": block_size,
           "tiled_bytes": extra_peak_bytes(lambda: online_softmax_attention(q, k, v, block_size=block_size))}
    row["naive_bytes"] = extra_peak_bytes(lambda: scaled_dot_product_attention(q, k, v)) if naive else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.bench tiled_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows = []
    for T in args.lengths:
        t0 = time.perf_counter()
        row = measure(T, args.d, args.block_size)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(f"T={T:6d}  naive {row['naive_bytes'] / 2**20:10.1f} MiB   tiled {row['tiled_bytes'] / 2**20:8.2f} MiB")
    record = {"suite": "tiled_memory", "dtype": "float64", "tool": "tracemalloc", "device_info": device_info("cpu"),
              "numpy": np.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0
