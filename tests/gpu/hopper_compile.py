"""Compile course_lib's Triton kernels for Hopper (sm_90) without a GPU; used by test_kernels_hopper.py.

Reads a JSON list of cases on stdin ({kind, dtype, d_head, causal, precision, config}), writes a
JSON list of `course_lib.kernels.sm90.compile_case` results. Runs in its own process, with
TRITON_INTERPRET unset (the interpreter cannot compile).
"""

from __future__ import annotations

import json
import sys
import time

from course_lib.kernels.sm90 import compile_case

if __name__ == "__main__":
    results = []
    for case in json.load(sys.stdin):
        start = time.perf_counter()
        results.append(compile_case(**case) | {"compile_s": round(time.perf_counter() - start, 2)})
    json.dump(results, sys.stdout)
