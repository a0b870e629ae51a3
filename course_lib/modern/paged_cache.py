"""A paged KV cache: fixed-size blocks from one pool, a block table per sequence, shared prefixes.

vLLM's PagedAttention (Kwon et al. 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention") stores keys and values the way an operating system stores pages: a
pool of blocks of `block_size` tokens each, and for every sequence a block table listing which
blocks hold its tokens 0 ... block_size - 1, block_size ... 2 block_size - 1, and so on. A sequence
takes a new block only when its last one is full, so it wastes at most block_size - 1 slots, where
a padded contiguous cache wastes the difference to the longest sequence (or to the context it
reserved). Attention gathers a sequence's blocks through its table (`gather`, `paged_attention`).

Prefix sharing: `fork` gives a new sequence the same block table, each block's reference count
goes up, and nothing is copied. A sequence that appends into a block that others also hold first
copies it (copy-on-write), so a shared prompt is stored once.

Every method checks its arguments, and that the pool has the blocks it needs, before it changes
anything: a refused call leaves the cache as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib._validate import check_positive_int, shape_str

__all__ = ["PagedKVCache", "paged_attention"]


class PagedKVCache:
    """A pool of (num_blocks, H_kv, block_size, d) key and value blocks, and one block table per sequence."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, d_head: int,
                 d_head_v: int | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        d_head_v = d_head if d_head_v is None else d_head_v
        N, self.block_size, H_kv, d, d_v = (check_positive_int(name, value) for name, value in (
            ("num_blocks", num_blocks), ("block_size", block_size), ("num_kv_heads", num_kv_heads),
            ("d_head", d_head), ("d_head_v", d_head_v)))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
        self.key_pool = torch.zeros(N, H_kv, self.block_size, d, dtype=dtype, device=device)  # (N, H_kv, b, d)
        self.value_pool = torch.zeros(N, H_kv, self.block_size, d_v, dtype=dtype, device=device)  # (N, H_kv, b, d_v)
        self.ref_counts = [0] * N  # how many block tables hold each block
        self._free = list(range(N - 1, -1, -1))  # pop() hands out block 0 first
        self.block_tables: dict[int, list[int]] = {}  # sequence id -> its blocks, in token order
        self.lengths: dict[int, int] = {}  # sequence id -> tokens held
        self._next_id = 0

    # ------------------------------------------------------------------------- bookkeeping
    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    def _seq(self, seq_id: object) -> int:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int):
            raise TypeError(f"seq_id must be an int (a sequence id from new_sequence or fork); got {seq_id!r}")
        if seq_id not in self.block_tables:
            raise ValueError(f"seq_id={seq_id} is not a sequence of this cache (known: {sorted(self.block_tables)})")
        return seq_id

    def _take(self) -> int:
        block = self._free.pop()
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)

    def new_sequence(self) -> int:
        """An empty sequence (no block yet); returns its id."""
        seq_id, self._next_id = self._next_id, self._next_id + 1
        self.block_tables[seq_id], self.lengths[seq_id] = [], 0
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence that shares every block of `seq_id` (reference counts up, nothing copied); its id."""
        parent = self._seq(seq_id)
        child = self.new_sequence()
        self.block_tables[child], self.lengths[child] = list(self.block_tables[parent]), self.lengths[parent]
        for block in self.block_tables[child]:
            self.ref_counts[block] += 1
        return child

    def free(self, seq_id: int) -> None:
        """Drop a sequence; blocks no other sequence holds go back to the pool."""
        for block in self.block_tables.pop(self._seq(seq_id)):
            self._release(block)
        del self.lengths[seq_id]

    def blocks_needed(self, seq_id: int, new_tokens: int) -> int:
        """Free blocks that appending new_tokens to seq_id takes: new blocks, plus one if its last block is
        partly filled and shared (copy-on-write)."""
        seq, n, b = self._seq(seq_id), new_tokens, self.block_size
        length = self.lengths[seq]
        grow = -(-(length + n) // b) - -(-length // b)
        shared_tail = n > 0 and length % b != 0 and self.ref_counts[self.block_tables[seq][-1]] > 1
        return grow + int(shared_tail)

    # ------------------------------------------------------------------------- writing and reading
    def append(self, seq_id: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append key (H_kv, n, d_head) and value (H_kv, n, d_head_v) to sequence seq_id.

        Takes a new block from the pool whenever the last one is full; if the last block is partly filled
        and shared with another sequence, copies it first (copy-on-write) so the others keep their tokens.
        """
        seq = self._seq(seq_id)
        for name, new, pool in (("key", key, self.key_pool), ("value", value, self.value_pool)):
            if not isinstance(new, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor (H_kv, n, d); got {type(new).__name__}")
            if new.ndim != 3 or new.shape[0] != pool.shape[1] or new.shape[2] != pool.shape[3]:
                raise ValueError(f"{name} must have shape ({pool.shape[1]}, n, {pool.shape[3]}) (H_kv, n, d) to "
                                 f"match the pool; got {shape_str(new.shape)}")
            if new.dtype != pool.dtype or new.device != pool.device:
                raise TypeError(f"{name} is {new.dtype} on {new.device}; the pool holds {pool.dtype} on {pool.device}")
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key {shape_str(key.shape)} and value {shape_str(value.shape)} must share n: one value "
                             f"per key")
        n, b = key.shape[1], self.block_size
        need = self.blocks_needed(seq, n)
        if need > len(self._free):
            raise RuntimeError(f"appending {n} tokens to sequence {seq} needs {need} free blocks; the pool has "
                               f"{len(self._free)} of {self.num_blocks} left (free a sequence, or make a larger pool)")
        if n == 0:
            return
        table, length = self.block_tables[seq], self.lengths[seq]
        if length % b and self.ref_counts[table[-1]] > 1:  # copy-on-write: the others keep the shared block
            old, new_block = table[-1], self._take()
            self.key_pool[new_block, :, : length % b] = self.key_pool[old, :, : length % b]
            self.value_pool[new_block, :, : length % b] = self.value_pool[old, :, : length % b]
            self._release(old)
            table[-1] = new_block
        while len(table) * b < length + n:
            table.append(self._take())
        positions = torch.arange(length, length + n, device=self.key_pool.device)  # (n,)
        blocks = torch.tensor(table, device=self.key_pool.device)[positions // b]  # (n,): block of each token
        self.key_pool[blocks, :, positions % b] = key.transpose(0, 1)  # (n, H_kv, d) into their slots
        self.value_pool[blocks, :, positions % b] = value.transpose(0, 1)
        self.lengths[seq] = length + n

    def gather(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's keys (H_kv, L, d_head) and values (H_kv, L, d_head_v), gathered through its block table.

        Reads its ceil(L / block_size) blocks whole (a copy), then keeps the first L rows (a view).
        """
        seq = self._seq(seq_id)
        length, table = self.lengths[seq], torch.tensor(self.block_tables[seq], dtype=torch.long,
                                                        device=self.key_pool.device)
        out = []
        for pool in (self.key_pool, self.value_pool):
            blocks = pool[table]  # (n_blocks, H_kv, b, d): the gather
            H_kv, d = pool.shape[1], pool.shape[3]
            out.append(blocks.transpose(0, 1).reshape(H_kv, -1, d)[:, :length])  # (H_kv, L, d)
        return out[0], out[1]

    def check(self) -> None:
        """Raise ValueError if the block tables and the pool's bookkeeping disagree: a block held by more or fewer
        tables than its reference count, a block both free and held, a table too short for its length."""
        held = [0] * self.num_blocks
        for seq, table in self.block_tables.items():
            if len(table) != -(-self.lengths[seq] // self.block_size):
                raise ValueError(f"sequence {seq} holds {self.lengths[seq]} tokens in {len(table)} blocks of "
                                 f"{self.block_size}")
            for block in table:
                if not 0 <= block < self.num_blocks:
                    raise ValueError(f"sequence {seq}'s block table names block {block}, outside the pool")
                held[block] += 1
        for block, (count, ref) in enumerate(zip(held, self.ref_counts, strict=True)):
            if count != ref:
                raise ValueError(f"block {block} is in {count} block tables but its reference count is {ref}: a "
                                 f"block table was changed behind the cache's back")
        if set(self._free) & {block for block, ref in enumerate(self.ref_counts) if ref}:
            raise ValueError("a block is both free and held by a sequence")


def paged_attention(q: torch.Tensor, cache: PagedKVCache, seq_ids: list[int]) -> torch.Tensor:
    """One decoding step for a batch of sequences of different lengths: q (B, H, 1, d_head) -> (B, H, 1, d_head_v).

    Query b attends to every token of sequence seq_ids[b], gathered through its block table; the H query
    heads share the cache's H_kv key/value heads in groups of H / H_kv (GQA). Equal to attention over each
    sequence's contiguous cache: no padding, so no mask.
    """
    if not isinstance(q, torch.Tensor) or q.ndim != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be a (B, H, 1, d_head) tensor, one new token per sequence; got "
                         f"{shape_str(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(seq_ids, list | tuple) or len(seq_ids) != q.shape[0]:
        raise ValueError(f"seq_ids must be a list of B={q.shape[0]} sequence ids, one per query; got {seq_ids!r}")
    H_kv, d = cache.key_pool.shape[1], cache.key_pool.shape[3]
    if q.shape[3] != d or q.shape[1] % H_kv:
        raise ValueError(f"q {shape_str(q.shape)} must have d_head={d} and a multiple of the cache's H_kv={H_kv} heads")
    if q.dtype != cache.key_pool.dtype or q.device != cache.key_pool.device:
        raise TypeError(f"q is {q.dtype} on {q.device}; the cache holds {cache.key_pool.dtype} on "
                        f"{cache.key_pool.device}")
    for seq in seq_ids:
        if cache.lengths.get(cache._seq(seq)) == 0:
            raise ValueError(f"sequence {seq} is empty: there is nothing to attend to")
    outs = []
    for b, seq in enumerate(seq_ids):
        key, value = cache.gather(seq)  # (H_kv, L, d), (H_kv, L, d_v)
        out = F.scaled_dot_product_attention(q[b : b + 1], key[None], value[None], enable_gqa=True)  # (1, H, 1, d_v)
        outs.append(out)
    return torch.cat(outs)
