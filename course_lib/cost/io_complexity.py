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
- Decoding (notebook 14): `decode_attention_io` (one step's attention over a cache) and
  `cache_append_io` (adding one token: written in place into a preallocated cache, or torch.cat's
  copy of the whole cache); `TensorTraffic` fills an IOCounter with the operand and result sizes
  of the torch operations a block of code dispatches, so those closed forms are checked against
  the operations the code runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib._validate import check_bool, check_nonnegative_int, check_positive_int, check_positive_number

__all__ = [
    "IOCounter",
    "standard_attention_io",
    "tiled_attention_io",
    "tiled_on_chip_elements",
    "block_q_for_memory",
    "theorem2_bound",
    "attainable_flops",
    "decode_attention_io",
    "cache_append_io",
    "TensorTraffic",
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


# ----------------------------------------------------------------------------- decoding (notebook 14)
def decode_attention_io(B: int, H: int, H_kv: int, S: int, d: int, d_v: int | None = None, *, T: int = 1,
                        with_lse: bool = False) -> int:
    """Elements one decoding step's attention moves, for a kernel that reads each cached key/value head once.

    Read the queries (B H T d) and every cached key and value of the H_kv key/value heads
    (B H_kv S (d + d_v)); write the output (B H T d_v), and with_lse the log-sum-exp per query row
    (B H T) that a FlashAttention-style kernel also returns. Query heads that share a key/value head
    (GQA, MQA) read it once: the cache term shrinks by H / H_kv, the query and output terms do not.
    """
    d_v = d if d_v is None else d_v
    B, H, H_kv, S, d, d_v, T = _check_dims(B=B, H=H, H_kv=H_kv, S=S, d=d, d_v=d_v, T=T)
    if H % H_kv:
        raise ValueError(f"H_kv must divide H (each key/value head serves H / H_kv query heads); got H={H}, "
                         f"H_kv={H_kv}")
    return B * H * T * d + B * H_kv * S * (d + d_v) + B * H * T * d_v + (B * H * T if check_bool("with_lse", with_lse)
                                                                          else 0)


def cache_append_io(B: int, H_kv: int, S: int, d: int, d_v: int | None = None, *, method: str,
                    new: int = 1) -> dict[str, int]:
    """Elements read and written to add `new` tokens to a cache that holds S, keys and values together.

    method "static": the cache was allocated once for its largest length, and the new keys and
    values are written into their rows: read B H_kv new (d + d_v), write as many.
    method "cat": torch.cat makes a new cache of S + new rows and copies the old one into it (what
    course_lib's KVCache does): read and write B H_kv (S + new)(d + d_v), so every step moves the
    whole cache, and a fresh tensor of that size is allocated.
    """
    d_v = d if d_v is None else d_v
    B, H_kv, d, d_v, new = _check_dims(B=B, H_kv=H_kv, d=d, d_v=d_v, new=new)
    S = check_nonnegative_int("S", S, " (cached tokens)")
    if method == "static":
        moved = B * H_kv * new * (d + d_v)
    elif method == "cat":
        moved = B * H_kv * (S + new) * (d + d_v)
    else:
        raise ValueError(f"method must be 'static' or 'cat'; got {method!r}")
    return {"reads": moved, "writes": moved}


# aten operations that read only the rows an index selects (their first argument is the whole table)
_GATHERS = {"index", "index_select", "gather", "embedding", "take"}
# allocations: nothing is read, and an uninitialised tensor is not written either
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh"}


@dataclass
class TensorTraffic(TorchDispatchMode):
    """Add up the sizes of the operands and results of the torch operations run inside `with TensorTraffic():`.

    For each operation torch dispatches: every tensor argument counts as read in full, except one the
    operation writes into (copy_, add_, an out= argument), which counts as written; its outputs count
    as written (unless it wrote into an argument). Views (slicing, transpose, view) and allocations
    (empty, zeros) are skipped. Gathers (indexing, index_select, gather) count the rows they select and
    the index, not the whole table. Nothing is measured: the counts are sizes, taken at dispatch.

    So it is the traffic of code in which each dispatched operation reads each operand once and writes
    each result once, as `standard_attention_io` counts it. It is neither bound on a real kernel:
    a tiled kernel (FlashAttention) re-reads K and V once per block of queries, so it moves more than
    its operands' sizes; caches, or operations fused together, can move less. Equal counts and closed
    forms say which operations ran on how much data (for instance, that no expand or repeat
    materialised a larger tensor), not what the hardware moved.

    Counts go into `io` (an IOCounter), in elements, or in bytes with in_bytes=True (indices and
    masks have other element sizes than the data). `log` keeps (operation, read, written) per call.
    """

    io: IOCounter = field(default_factory=IOCounter)
    in_bytes: bool = False
    log: list[tuple[str, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        if not isinstance(self.io, IOCounter):
            raise TypeError(f"io must be an IOCounter; got {type(self.io).__name__}")
        check_bool("in_bytes", self.in_bytes)

    def _size(self, t: torch.Tensor) -> int:
        return t.numel() * (t.element_size() if self.in_bytes else 1)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name, schema = func.overloadpacket.__name__, func._schema
        if name in _ALLOCATIONS or any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out  # a view or an allocation: no data moves
        outputs = [t for t in (out if isinstance(out, tuple | list) else (out,)) if isinstance(t, torch.Tensor)]
        read = written = 0
        given = dict(zip((a.name for a in schema.arguments), args, strict=False)) | kwargs
        for arg in schema.arguments:
            value = given.get(arg.name)
            items = value if isinstance(value, tuple | list) else (value,)
            tensors = [t for t in items if isinstance(t, torch.Tensor)]
            size = sum(self._size(t) for t in tensors)
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += size
            elif name in _GATHERS and arg.name in ("self", "input", "weight"):
                read += sum(self._size(t) for t in outputs)  # the selected rows only
            else:
                read += size
        if not written:
            written = sum(self._size(t) for t in outputs)
        self.io.read(read)
        self.io.write(written)
        self.log.append((name, read, written))
        return out
