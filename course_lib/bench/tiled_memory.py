"""Extra memory of naive vs tiled (online-softmax) attention in numpy, measured with tracemalloc.

    python -m course_lib.bench tiled_memory --json m.json          # T = 1k..16k, d_head 64 (needs ~12 GiB RAM)
    python -m course_lib.bench tiled_memory --seq 256,512 --d-head 32,64 --json /tmp/m.json

numpy reports its array allocations to tracemalloc, so the traced peak during one call, minus
what was allocated before it, is the call's extra memory (temporaries and the result). Naive
attention builds the (T, T) scores and weights: it grows as T^2. The tiled version keeps one
(block, block) tile and the (T, d) output: it grows as T.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from course_lib.bench import write_record
from course_lib.numpy_ref import online_softmax_attention, scaled_dot_product_attention
from course_lib.tools.cli import int_list, output_file, positive_int
from course_lib.tools.device import device_facts


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


def measure(T: int, d_head: int, block_size: int, seed: int = 0, naive: bool = True) -> dict:
    """Extra bytes of tiled (and naive) attention on one head: q, k, v of shape (T, d_head), float64."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((T, d_head)) for _ in range(3))  # (T, d_head) float64
    row: dict[str, int | None] = {
        "T": T, "d_head": d_head, "block_size": block_size,
        "tiled_bytes": extra_peak_bytes(lambda: online_softmax_attention(q, k, v, block_size=block_size))}
    row["naive_bytes"] = extra_peak_bytes(lambda: scaled_dot_product_attention(q, k, v)) if naive else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.bench tiled_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int_list, default=[1024, 2048, 4096, 8192, 16384],
                        help="comma-separated sequence lengths T (= S)")
    parser.add_argument("--d-head", type=int_list, default=[64], help="comma-separated head dims")
    parser.add_argument("--block-size", type=positive_int, default=64)
    parser.add_argument("--json", type=output_file, default=None, help="write the record here")
    args = parser.parse_args(argv)  # every flag is checked here (course_lib.tools.cli): a bad one exits with 2
    rows = []
    for d in args.d_head:
        for T in args.seq:
            t0 = time.perf_counter()
            row = measure(T, d, args.block_size)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            print(f"d={d:4d} T={T:6d}  naive {row['naive_bytes'] / 2**20:10.1f} MiB   "
                  f"tiled {row['tiled_bytes'] / 2**20:8.2f} MiB")
    record = {"suite": "tiled_memory", "device_info": device_facts("cpu"),
              "config": {"dtype": "float64", "tool": "tracemalloc", "seqs": args.seq, "d_heads": args.d_head,
                         "block_size": args.block_size},
              "numpy": np.__version__, "rows": rows}
    if args.json is not None:
        write_record(args.json, record)
    return 0
