"""Memory traffic of attention: what a kernel reads from and writes to slow memory (HBM), and the roofline.

The model is the one of the FlashAttention paper (Dao et al., 2022, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", section 3.2 and Theorem 2): a fast on-chip memory
of M elements (SRAM, registers), a slow memory (HBM) that holds q, k, v and the output, and every
element moved between the two counted once per move. Counts are in elements; multiply by the
dtype's size for bytes.

- `IOCounter` is filled in by `numpy_ref.online_softmax_attention(..., io=counter)`: the tiled numpy
  implementation counts its own loads and stores as it runs.
- `standard_attention_io` and `tiled_attention_io` are the closed forms the counts are compared with;
  `theorem2_bound` is the paper's Theta(T^2 d^2 / M) with constant 1.
- `attainable_flops` is the roofline: min(peak, intensity x bandwidth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from course_lib._validate import check_nonnegative_int, check_positive_int, check_positive_number

__all__ = [
    "IOCounter",
    "standard_attention_io",
    "tiled_attention_io",
    "tiled_on_chip_elements",
    "block_q_for_memory",
    "theorem2_bound",
    "attainable_flops",
]


@dataclass
class IOCounter:
    """Elements read from and written to slow memory, and the largest on-chip working set of one head.

    `reads` and `writes` are summed over every (batch, head); `on_chip_peak` is per (batch, head), the
    memory one program (one streaming multiprocessor) would need.
    """

    reads: int = 0
    writes: int = 0
    on_chip_peak: int = 0

    def read(self, n: int) -> None:
        """n more elements read from slow memory (an int >= 0: a count, never rounded)."""
        self.reads += check_nonnegative_int("n", n, " (elements read)")

    def write(self, n: int) -> None:
        """n more elements written to slow memory."""
        self.writes += check_nonnegative_int("n", n, " (elements written)")

    def on_chip(self, n: int) -> None:
        """A working set of n elements held on chip at once."""
        self.on_chip_peak = max(self.on_chip_peak, check_nonnegative_int("n", n, " (elements on chip)"))

    @property
    def total(self) -> int:
        return self.reads + self.writes


def _check_dims(**dims: int) -> list[int]:
    """Every size a positive int (numpy ints too), returned as Python ints in the order given."""
    return [check_positive_int(name, value) for name, value in dims.items()]


def standard_attention_io(T: int, S: int, d: int, d_v: int | None = None) -> int:
    """Elements moved by standard attention (the paper's Algorithm 0), per head.

    Read q, k (T d + S d), write the scores (T S); read them, write P (2 T S); read P and v
    (T S + S d_v), write the output (T d_v): T d + S d + S d_v + T d_v + 4 T S = Theta(T d + T^2).
    """
    d_v = d if d_v is None else d_v
    T, S, d, d_v = _check_dims(T=T, S=S, d=d, d_v=d_v)
    return T * d + S * d + S * d_v + T * d_v + 4 * T * S


def tiled_attention_io(T: int, S: int, d: int, d_v: int | None = None, *, block_q: int) -> int:
    """Elements moved by the tiled loop of `numpy_ref.online_softmax_attention`, per head, no mask.

    Each block of block_q queries is read once and its output written once (T d + T d_v); for each of
    the ceil(T / block_q) query blocks, every key and value is read once: ceil(T / block_q) S (d + d_v).
    The key block size does not enter: it changes how the keys are cut, not how often they are read.
    """
    d_v = d if d_v is None else d_v
    T, S, d, d_v, block_q = _check_dims(T=T, S=S, d=d, d_v=d_v, block_q=block_q)
    return T * d + math.ceil(T / block_q) * S * (d + d_v) + T * d_v


def tiled_on_chip_elements(d: int, d_v: int | None = None, *, block_q: int, block_k: int) -> int:
    """On-chip working set of one tile step, per head: the q block, a k and a v tile, the scores tile,
    the accumulator and the running max and sum (block_q d + block_k (d + d_v) + block_q block_k
    + block_q d_v + 2 block_q)."""
    d_v = d if d_v is None else d_v
    d, d_v, block_q, block_k = _check_dims(d=d, d_v=d_v, block_q=block_q, block_k=block_k)
    return block_q * d + block_k * (d + d_v) + block_q * block_k + block_q * d_v + 2 * block_q


def block_q_for_memory(M: int, d: int, d_v: int | None = None, *, block_k: int) -> int:
    """The largest query block whose working set (`tiled_on_chip_elements`) fits in M elements."""
    d_v = d if d_v is None else d_v
    M, d, d_v, block_k = _check_dims(M=M, d=d, d_v=d_v, block_k=block_k)
    block_q = (M - block_k * (d + d_v)) // (d + block_k + d_v + 2)
    if block_q < 1:
        need = tiled_on_chip_elements(d, d_v, block_q=1, block_k=block_k)
        raise ValueError(f"M = {M} elements cannot hold one query row with key tiles of {block_k} "
                         f"(d = {d}, d_v = {d_v}); it needs at least {need}")
    return int(block_q)


def theorem2_bound(T: int, d: int, M: int) -> float:
    """T^2 d^2 / M: the order of FlashAttention's HBM accesses (Theorem 2, for d <= M <= T d), constant 1."""
    T, d, M = _check_dims(T=T, d=d, M=M)
    return T * T * d * d / M


def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline: a kernel doing `intensity` FLOPs per byte of slow-memory traffic can run at most at
    min(peak_flops, intensity x bandwidth) FLOP/s (bandwidth in bytes/s)."""
    intensity, peak_flops, bandwidth = (check_positive_number(name, value) for name, value in (
        ("intensity", intensity), ("peak_flops", peak_flops), ("bandwidth", bandwidth)))  # numpy numbers too
    return min(peak_flops, intensity * bandwidth)
