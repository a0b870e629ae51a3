"""Benchmarks: `python -m course_lib.bench <suite> [options]`, one suite per module, listed in SUITES."""

from __future__ import annotations

__all__ = ["SUITES"]

# Registered explicitly (name -> what it measures): `python -m course_lib.bench` runs only these.
SUITES = {
    "attention": "attention core and modules: naive, course_lib, each SDPA backend, the Triton kernel; "
                 "time, TFLOP/s, % of the measured peak, memory",
    "flash": "the course's Triton FlashAttention kernel vs each SDPA backend, forward",
    "mha": "three multi-head attention modules with the same weights: a training step or a decoding step",
    "tiled_memory": "extra memory of naive vs tiled (online-softmax) attention in numpy",
}

