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


def all_to_all_pieces(rank: int, world_size: int, width: int = 3) -> dict:
    """Rank i sends rank j a piece filled with 10 i + j, of i + 1 rows (pieces of different shapes);
    returns what arrived, in rank order, and the bytes sent."""
    comm = Comm()
    chunks = [torch.full((rank + 1, width), 10.0 * rank + j) for j in range(world_size)]
    shapes = [(i + 1, width) for i in range(world_size)]
    received = comm.all_to_all(chunks, shapes)
    return {"received": received, "sent": comm.sent}
