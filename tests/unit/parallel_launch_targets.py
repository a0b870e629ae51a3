"""What the ranks of the launcher tests run: importable by name, and light to import (each rank imports
this module, not the test module with its pytest and hypothesis)."""

from __future__ import annotations

import os
import threading

import torch

from course_lib.parallel.distributed import Comm


def behave(rank: int, world_size: int, failing_rank: int, mode: str, code: int = 3):
    """What the failing rank does: "exit" (os._exit(code)), "raise", or return something pickle refuses
    ("lambda", "generator", "lock"). The others wait for its message ("exit", "raise") or finish."""
    if rank == failing_rank:
        if mode == "exit":
            os._exit(code)
        if mode == "raise":
            raise ValueError(f"rank {rank} failed on purpose")
        return {"lambda": lambda: None, "generator": (i for i in range(2)), "lock": threading.Lock()}[mode]
    if mode in ("exit", "raise"):
        Comm().ring_shift(torch.zeros(1))
    return rank


def tensors(rank: int, world_size: int, scale: float = 1.0, shape: tuple = (3,)) -> dict:
    """A tensor and a number per rank: results that come back by value."""
    return {"x": torch.full(shape, float(rank) * scale), "n": rank}
