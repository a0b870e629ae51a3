"""Benchmarks: `python -m course_lib.bench <suite> [options]`, one suite per module, listed in SUITES.

Every suite speaks the same vocabulary, so a command or a recorded file reads the same whichever
suite made it.

Flags (each suite takes those that apply to it; `<suite> --help` lists them):
    --seq T[,T...]         sequence lengths, comma-separated (--seq 1024,2048)
    --d-head D[,D...]      head dimensions, comma-separated (--d-head 64,128)
    --batch, --heads, --dtype, --device, --repeats, --warmup
                           one value each; --device defaults to cuda when there is a GPU, else cpu
    --json PATH            write the record (below) to PATH. Nothing is written unless this is
                           given: a suite never writes a file on its own, and never into course_lib/ (to
                           remake a recorded run, pass --json data/benchmarks/<name>.json from the repository
                           root; README.md gives each command)

A bad flag value (zero or negative where a count is meant, NaN, an unknown name, a device this machine
lacks, ...) gets argparse's usage error naming the flag, and exit status 2, before any work: the flags'
types are shared with course_lib's other command lines in course_lib.tools.cli.

Record (the JSON that --json writes; the repository's data/benchmarks/ holds recorded ones):
    {"suite": name,             the suite's name in SUITES
     "device_info": {...},      where it ran: device, versions (course_lib.tools.device.device_facts)
     "config": {...},           every setting of the run, dtype included; lists are plural
                                ("seqs", "d_heads")
     "rows": [{...}, ...],      one dict per measurement (mha: per comparison of its modules);
                                shapes as T, S, d_head, and B, H where a row has them
     ...}                       then what only that suite has (a measured peak, a summary, ...)
Times are in seconds. The suites time the implementations of a case together with
`timing.compare`: interleaved rounds, each giving every implementation its device time (one pair of
CUDA events around back-to-back calls, per call; perf_counter on the CPU) and the wall time of one
call with its dispatch. "median_s" is the median device time per call, with its quartiles ("q1_s"
and "q3_s", or "device_q1_s" and "device_q3_s") and the wall time ("wall_s" or "wall_median_s")
beside it, and "timing_method" or a "device" dict says how. Records made before this (data/benchmarks/
README.md says which) have "median_s", "min_s", "max_s" of single calls, each between its own pair
of events, dispatch included. A case that did not run carries None, or no time, and says why
("status" and "reason", or "error").
"""

from __future__ import annotations

import json
from pathlib import Path

from course_lib.tools.cli import int_list  # the argparse types every suite shares live in course_lib.tools.cli

__all__ = ["SUITES", "int_list", "write_record"]

# Registered explicitly (name -> what it measures): `python -m course_lib.bench` runs only these.
SUITES = {
    "attention": "attention core and modules: naive, course_lib, each SDPA backend, the Triton kernel; "
                 "time, TFLOP/s, % of the measured peak, memory",
    "flash": "the course's Triton FlashAttention kernel vs each SDPA backend, forward",
    "mha": "three multi-head attention modules with the same weights: a training step or a decoding step",
    "tiled_memory": "extra memory of naive vs tiled (online-softmax) attention in numpy",
}


def write_record(path: Path, record: dict) -> None:
    """Write a suite's record as JSON (creating the folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
