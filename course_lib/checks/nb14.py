"""Checkers for notebook 14 (decoding at scale).

- check_blocks_needed: the blocks and wasted slots of a batch of sequences in a paged KV cache;
- check_gather_kv: a sequence's keys gathered from the block pool through its block table;
- check_shared_prefix_blocks: the blocks requests sharing one prompt hold, with copy-on-write.
On a wrong answer each checker tries the usual mistakes to say which one was made.
"""

from __future__ import annotations

import math

import torch

from course_lib.checks._core import (
    CheckFailure,
    as_array,
    as_number,
    call_watching,
    checker,
    compare,
    diagnose,
    is_close,
    unpack,
)
from course_lib.cost.kv_memory import padded_kv_slots, paged_kv_slots, prefix_shared_blocks

__all__ = ["check_blocks_needed", "check_gather_kv", "check_shared_prefix_blocks"]


# ----------------------------------------------------------------------------- blocks of a batch
_BLOCK_CASES = (([17, 3, 64, 33], 16), ([1, 1, 1], 8), ([100, 7, 250, 64, 12], 32), ([5], 1), ([48, 49, 47], 16))


@checker
def check_blocks_needed(fn):
    """Check the blocks a batch of sequences takes in a paged KV cache, and the slots it wastes.

    Your function: `fn(lengths, block_size) -> (blocks, wasted)`: lengths a list of tokens per sequence,
    each sequence with its own blocks of block_size slots; blocks the total number of blocks, wasted the
    slots allocated but not filled. Exact on five batches; names rounding down, blocks shared between
    sequences, a full last block counted as wasting a whole block, and the padded cache's waste.
    """
    for lengths, b in _BLOCK_CASES:
        what = f"lengths={lengths}, block_size={b}"
        got = unpack(call_watching(fn, list(lengths), b, names=("lengths", "block_size"), what=f"; {what}"), 2,
                     "return a tuple (blocks, wasted)", case=what)
        blocks, wasted = (as_number(f"{name} ({what})", g) for g, name in zip(got, ("blocks", "wasted"), strict=True))
        expected = paged_kv_slots(lengths, b)
        if (blocks, wasted) == (expected["blocks"], expected["wasted"]):
            continue
        floor = sum(n // b for n in lengths)
        pooled = math.ceil(sum(lengths) / b)
        mistakes = {
            "blocks rounded down: a sequence of L tokens needs ceil(L / block_size) blocks, its last one partly "
            "filled": (floor, floor * b - sum(lengths)),
            "the sequences do not share blocks: each sequence rounds up on its own, ceil(L / block_size) each":
                (pooled, pooled * b - sum(lengths)),
            "a sequence that fills its last block exactly wastes nothing: the waste is (-L) mod block_size, not "
            "block_size - L mod block_size": (expected["blocks"], sum(b - n % b for n in lengths)),
            "that waste is the padded contiguous cache's (B x the longest length, minus the tokens): in a paged "
            "cache only each sequence's last block is partly empty": (expected["blocks"],
                                                                     padded_kv_slots(lengths)["wasted"]),
        }
        for message, wrong in mistakes.items():
            if (blocks, wasted) == wrong:
                raise CheckFailure(f"{what}: got ({blocks:g}, {wasted:g}). {message}")
        raise CheckFailure(f"{what}: got ({blocks:g}, {wasted:g}), expected ({expected['blocks']}, "
                           f"{expected['wasted']}). Hint: per sequence, ceil(L / block_size) blocks")
    return f"{len(_BLOCK_CASES)} batches: blocks and wasted slots match"


# ----------------------------------------------------------------------------- the block-table gather
def _pool_case(seed: int, num_blocks: int, H_kv: int, b: int, d: int, table: list[int], length: int):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(num_blocks, H_kv, b, d, generator=gen, dtype=torch.float64)  # (N, H_kv, b, d)
    expected = pool[torch.tensor(table)].transpose(0, 1).reshape(H_kv, -1, d)[:, :length]  # (H_kv, L, d)
    return pool, table, length, expected


@checker
def check_gather_kv(fn):
    """Check gathering one sequence's keys from a paged cache.

    Your function: `fn(key_pool, block_table, length) -> keys`: key_pool (num_blocks, H_kv, block_size, d),
    block_table a list of block ids (the sequence's tokens 0 ... block_size - 1 are in block_table[0], and
    so on), length the tokens the sequence holds; keys (H_kv, length, d) in token order. Checks tables out
    of order, a partly filled last block and one head; names blocks read in pool order instead of the
    table's, a reshape that mixes heads, and rows past the sequence's length.
    """
    cases = [("blocks 3, 0, 5, length 10 (last block half full)", _pool_case(0, 6, 2, 4, 3, [3, 0, 5], 10)),
             ("one block, full", _pool_case(1, 4, 2, 4, 3, [2], 4)),
             ("blocks 7, 1, 4, 2 of 8, one head, length 13", _pool_case(2, 8, 1, 4, 5, [7, 1, 4, 2], 13)),
             ("blocks 4, 2, 3 of 5 blocks of 8, 3 heads, length 17", _pool_case(3, 5, 3, 8, 2, [4, 2, 3], 17))]
    for what, (pool, table, length, expected) in cases:
        got = call_watching(fn, pool, list(table), length, names=("key_pool", "block_table", "length"),
                            what=f"; {what}", advice="Index the pool (pool[table]) to get new tensors")
        got_arr = as_array(f"keys ({what})", got)
        if is_close(got_arr, expected):
            continue
        H_kv, d = pool.shape[1], pool.shape[3]
        gathered = pool[torch.tensor(table)]  # (n, H_kv, b, d)
        message = diagnose(got_arr, {
            "the blocks are read in the pool's order (0, 1, 2, ...); read the ones block_table names, in its order":
                pool[: len(table)].transpose(0, 1).reshape(H_kv, -1, d)[:, :length],
            "the reshape mixes heads: the gathered blocks are (n_blocks, H_kv, block_size, d); move H_kv first "
            "(transpose(0, 1)) before merging n_blocks and block_size": gathered.reshape(H_kv, -1, d)[:, :length]
            if (gathered.numel() // (H_kv * d)) >= length else None,
            "keep only the first `length` rows: the last block's empty slots are not tokens of the sequence":
                gathered.transpose(0, 1).reshape(H_kv, -1, d) if len(table) * pool.shape[2] != length else None,
        })
        if message:
            raise CheckFailure(f"{what}: {message}")
        compare(f"keys ({what})", got_arr, expected.numpy(),
                hint="pool[table] -> (n, H_kv, b, d); transpose(0, 1); reshape(H_kv, n b, d); [:, :length]")
    return f"{len(cases)} tables: the gathered keys match, in token order"


# ----------------------------------------------------------------------------- shared prompts
_PREFIX_CASES = ((10, [3, 0, 8], 4), (32, [5, 5, 5, 5], 16), (7, [1], 8), (40, [0, 0], 16), (20, [30, 2], 8))


def _prefix_mistakes(P: int, suffixes: list[int], b: int) -> dict[str, int | None]:
    """What the usual mistakes give on one case (None where a mistake gives the right answer anyway)."""
    counts = prefix_shared_blocks(P, suffixes, b)
    prompt_blocks = -(-P // b)
    wrong = {
        "a request that writes into the prompt's partly filled last block must copy it first (copy-on-write): "
        "the others still read that block": prompt_blocks + sum(-(-(P + s) // b) - prompt_blocks for s in suffixes),
        "that is without sharing: each request holding its own copy of the prompt, plus the prompt itself":
            counts["unshared"],
        "a suffix does not start a fresh block: its first tokens fill the free slots of a copy of the prompt's "
        "last block": prompt_blocks + sum(-(-s // b) for s in suffixes),
    }
    return {message: (None if n == counts["shared"] else n) for message, n in wrong.items()}


@checker
def check_shared_prefix_blocks(fn):
    """Check the blocks held by requests that share one prompt, with copy-on-write.

    Your function: `fn(prompt_len, suffix_lengths, block_size) -> blocks`: the prompt (prompt_len tokens) is
    cached once as its own sequence and stays cached; each request is a fork of it followed by its own
    suffix_lengths[i] tokens; returns the blocks in use in the pool. Exact on five cases; names forgetting
    the copy of a shared partial block, no sharing at all, and suffixes that start a fresh block (a mistake
    is named when it explains every case the answer got wrong).
    """
    answers, failed = [], None
    for P, suffixes, b in _PREFIX_CASES:
        what = f"prompt_len={P}, suffix_lengths={suffixes}, block_size={b}"
        got = as_number(f"blocks ({what})", call_watching(fn, P, list(suffixes), b,
                                                        names=("prompt_len", "suffix_lengths", "block_size"),
                                                        what=f"; {what}"))
        answers.append(got)
        if failed is None and got != prefix_shared_blocks(P, suffixes, b)["shared"]:
            failed = (what, got, prefix_shared_blocks(P, suffixes, b)["shared"], divmod(P, b)[0])
    if failed is None:
        return f"{len(_PREFIX_CASES)} cases: the blocks in use match"
    what, got, expected, full = failed
    per_case = [_prefix_mistakes(*case) for case in _PREFIX_CASES]
    for message in per_case[0]:
        explained = [m[message] is None and a == prefix_shared_blocks(*c)["shared"] or a == m[message]
                     for m, a, c in zip(per_case, answers, _PREFIX_CASES, strict=True)]
        if all(explained):
            raise CheckFailure(f"{what}: got {got:g}. {message}")
    raise CheckFailure(f"{what}: got {got:g}, expected {expected}. Hint: the prompt's {full} full blocks once, its "
                       f"partial block once plus one copy per request that appends, then each request's own blocks")
