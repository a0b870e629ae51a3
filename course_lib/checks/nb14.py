"""Checkers for notebook 14 (decoding at scale).

- check_blocks_needed: the blocks and empty slots of a batch in a paged KV cache, each sequence with room
  for `lookahead` more tokens;
- check_gather_kv: a sequence's keys gathered from the block pool through its block table;
- check_shared_prefix_blocks: the blocks that go back to the pool when requests sharing a prompt finish;
- check_window_decode_step: a decoding step with a sliding window that a CUDA graph can capture, run eagerly and
  replayed from a make_fx trace (which, like a CUDA graph, bakes in every Python value it saw).
On a wrong answer each checker tries the usual mistakes to say which one was made.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib.checks._core import (
    CheckFailure,
    as_array,
    as_number,
    as_tensor,
    call_watching,
    checker,
    compare,
    diagnose,
    is_close,
    unpack,
)
from course_lib.cost.kv_memory import paged_kv_slots
from course_lib.modern.paged_cache import PagedKVCache

__all__ = ["check_blocks_needed", "check_gather_kv", "check_shared_prefix_blocks", "check_window_decode_step"]


# ----------------------------------------------------------------------------- blocks with room to grow
_LOOKAHEAD_CASES = (([17, 3, 64, 33], 16, 4), ([0, 0], 8, 0), ([0, 5], 8, 3), ([32, 48, 16], 16, 16),
                    ([100, 7, 250, 64, 12], 32, 1), ([5], 1, 2), ([48, 49, 47], 16, 0))


def _lookahead_cases(rng: np.random.Generator, n: int = 6) -> list[tuple[list[int], int, int]]:
    """Fresh random batches each call (so no table of answers passes), block sizes 1 to 64, exact multiples."""
    cases = []
    for _ in range(n):
        b = int(rng.choice([1, 4, 8, 16, 32, 64]))
        lengths = [int(x) * (b if rng.random() < 0.3 else 1) for x in rng.integers(0, 300, size=rng.integers(1, 9))]
        cases.append((lengths, b, int(rng.integers(0, 2 * b + 1))))
    return cases


@checker
def check_blocks_needed(fn):
    """Check the blocks a batch takes in a paged KV cache when each sequence keeps room for `lookahead` more tokens.

    Your function: `fn(lengths, block_size, lookahead) -> (blocks, empty)`: lengths a list of tokens per
    sequence, each sequence with its own blocks of block_size slots and enough of them to append `lookahead`
    more tokens without a new allocation; blocks the total number of blocks, empty the slots allocated that
    hold no token yet. Exact on seven fixed batches (empty sequences, lengths that are multiples of the block
    size, no lookahead) and six random ones; names a forgotten lookahead, a lookahead rounded up on its own,
    reserved slots left out of the empty ones, and rounding down.
    """
    cases = [*_LOOKAHEAD_CASES, *_lookahead_cases(np.random.default_rng())]
    for lengths, b, k in cases:
        what = f"lengths={lengths}, block_size={b}, lookahead={k}"
        got = unpack(call_watching(fn, list(lengths), b, k, names=("lengths", "block_size", "lookahead"),
                                   what=f"; {what}"), 2, "return a tuple (blocks, empty)", case=what)
        blocks, empty = (as_number(f"{name} ({what})", g) for g, name in zip(got, ("blocks", "empty"), strict=True))
        grown = paged_kv_slots([n + k for n in lengths], b)
        expected = (grown["blocks"], grown["slots"] - sum(lengths))
        if (blocks, empty) == expected:
            continue
        plain = paged_kv_slots(lengths, b)
        apart = sum(-(-n // b) + -(-k // b) for n in lengths)
        floor = sum((n + k) // b for n in lengths)
        mistakes = {
            "each sequence also needs room for `lookahead` more tokens: ceil((L + lookahead) / block_size) "
            "blocks, not ceil(L / block_size)": (plain["blocks"], plain["wasted"]),
            "the reserved tokens first fill the free slots of the sequence's last block; rounding L and "
            "lookahead up separately can take a block too many": (apart, apart * b - sum(lengths)),
            "the reserved slots hold no token yet: they count among the empty slots (blocks x block_size minus "
            "the tokens held)": (expected[0], expected[0] * b - sum(n + k for n in lengths)),
            "blocks rounded down: L + lookahead tokens need ceil((L + lookahead) / block_size) blocks":
                (floor, floor * b - sum(lengths)),
        }
        for message, wrong in mistakes.items():
            if (blocks, empty) == wrong:
                raise CheckFailure(f"{what}: got ({blocks:g}, {empty:g}). {message}")
        raise CheckFailure(f"{what}: got ({blocks:g}, {empty:g}), expected {expected}. Hint: which tokens must "
                           f"each sequence have room for, and which of its slots hold one now?")
    return f"{len(cases)} batches ({len(_LOOKAHEAD_CASES)} fixed, {len(cases) - len(_LOOKAHEAD_CASES)} random): " \
           f"blocks and empty slots match"


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
    of order, a partly filled last block, one head, and three random tables; names blocks read in pool
    order instead of the table's, a reshape that mixes heads, and rows past the sequence's length.
    """
    cases = [("blocks 3, 0, 5, length 10 (last block half full)", _pool_case(0, 6, 2, 4, 3, [3, 0, 5], 10)),
             ("one block, full", _pool_case(1, 4, 2, 4, 3, [2], 4)),
             ("blocks 7, 1, 4, 2 of 8, one head, length 13", _pool_case(2, 8, 1, 4, 5, [7, 1, 4, 2], 13)),
             ("blocks 4, 2, 3 of 5 blocks of 8, 3 heads, length 17", _pool_case(3, 5, 3, 8, 2, [4, 2, 3], 17))]
    rng = np.random.default_rng()
    for _ in range(3):  # fresh random tables each call
        n_pool, b = int(rng.integers(2, 12)), int(rng.choice([2, 4, 8]))
        n_table = int(rng.integers(1, n_pool + 1))
        table = [int(x) for x in rng.permutation(n_pool)[:n_table]]
        length = int(rng.integers((n_table - 1) * b + 1, n_table * b + 1))
        H_kv, d = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        cases.append((f"random table {table} of {n_pool} blocks of {b}, {H_kv} heads, length {length}",
                      _pool_case(int(rng.integers(2**31)), n_pool, H_kv, b, d, table, length)))
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
            "the reshape mixes heads: the gathered blocks are (n_blocks, H_kv, block_size, d); the head axis must "
            "come first before the block and slot axes are merged into one token axis":
                gathered.reshape(H_kv, -1, d)[:, :length] if (gathered.numel() // (H_kv * d)) >= length else None,
            "keep only the first `length` rows: the last block's empty slots are not tokens of the sequence":
                gathered.transpose(0, 1).reshape(H_kv, -1, d) if len(table) * pool.shape[2] != length else None,
        })
        if message:
            raise CheckFailure(f"{what}: {message}")
        compare(f"keys ({what})", got_arr, expected.numpy(),
                hint="token p of the sequence sits in block block_table[p // block_size], slot p % block_size; "
                     "which axes of the gathered blocks become the token axis, and in which order?")
    return f"{len(cases)} tables (4 fixed, {len(cases) - 4} random): the gathered keys match, in token order"


# ----------------------------------------------------------------------------- blocks freed by finished requests
_FREED_CASES: tuple[tuple[int, list[int], int, list[int]], ...] = (
    (10, [3, 0, 8], 4, [0]), (10, [3, 0, 8], 4, [1]), (32, [5, 5, 5, 5], 16, [0, 2]),
    (0, [7, 0, 16], 8, [0, 1, 2]), (40, [0, 0], 16, [0, 1]), (20, [30, 2], 8, [1, 0]), (7, [1], 8, []))


def _freed_cases(rng: np.random.Generator, n: int = 6) -> list[tuple[int, list[int], int, list[int]]]:
    """Fresh random cases each call: prompts of 0 tokens or exact multiples of the block size among them."""
    cases = []
    for _ in range(n):
        b = int(rng.choice([1, 2, 4, 8, 16]))
        P = int(rng.integers(0, 80)) * (b if rng.random() < 0.3 else 1)
        suffixes = [int(s) for s in rng.integers(0, 50, size=rng.integers(1, 6))]
        finished = sorted(int(i) for i in rng.permutation(len(suffixes))[: rng.integers(0, len(suffixes) + 1)])
        cases.append((P, suffixes, b, finished))
    return cases


def _blocks_freed(prompt_len: int, suffix_lengths: list[int], block_size: int, finished: list[int]) -> int:
    """The reference: a PagedKVCache filled as the exercise says, the finished requests freed, the blocks counted."""
    pool = PagedKVCache(num_blocks=-(-prompt_len // block_size) + sum(-(-(prompt_len + s) // block_size) + 1
                                                                        for s in suffix_lengths) + 1,
                        block_size=block_size, num_kv_heads=1, d_head=1)
    prompt = pool.new_sequence()
    pool.append(prompt, torch.zeros(1, prompt_len, 1), torch.zeros(1, prompt_len, 1))
    requests = [pool.fork(prompt) for _ in suffix_lengths]
    for seq, s in zip(requests, suffix_lengths, strict=True):
        pool.append(seq, torch.zeros(1, s, 1), torch.zeros(1, s, 1))
    before = pool.num_free_blocks
    for i in finished:
        pool.free(requests[i])
    return pool.num_free_blocks - before


def _freed_mistakes(P: int, suffixes: list[int], b: int, finished: list[int]) -> dict[str, int]:
    done = [suffixes[i] for i in finished]
    return {
        "the prompt's blocks stay: the prompt's own sequence (and the other requests) still hold them; only the "
        "blocks a request holds alone go back to the pool": sum(-(-(P + s) // b) for s in done),
        "a request that appended holds its own copy of the prompt's partly filled last block (copy-on-write), "
        "and that copy goes back to the pool with the request's other blocks":
            sum(-(-(P + s) // b) - -(-P // b) for s in done),
        "a request that generated nothing never copied the prompt's last block: it holds no block of its own, "
        "so finishing it frees nothing": sum(-(-(P + s) // b) - P // b for s in done),
    }


@checker
def check_shared_prefix_blocks(fn):
    """Check the blocks that go back to the pool when requests sharing one prompt finish.

    Your function: `fn(prompt_len, suffix_lengths, block_size, finished) -> blocks`: the prompt (prompt_len
    tokens) is cached as its own sequence and stays cached; request i forks it and appends suffix_lengths[i]
    tokens (copy-on-write); then the requests whose indices are in `finished` are freed; returns the number of
    blocks that go back to the free list. Exact on seven fixed cases (an empty prompt, a prompt of whole
    blocks, requests that generated nothing, nothing finished) and six random ones, against a PagedKVCache;
    names freeing the shared prompt blocks, forgetting the copied block, and freeing a block for a request
    that never copied one.
    """
    cases = [*_FREED_CASES, *_freed_cases(np.random.default_rng())]
    for P, suffixes, b, finished in cases:
        what = f"prompt_len={P}, suffix_lengths={suffixes}, block_size={b}, finished={finished}"
        got = as_number(f"blocks ({what})", call_watching(
            fn, P, list(suffixes), b, list(finished), what=f"; {what}",
            names=("prompt_len", "suffix_lengths", "block_size", "finished")))
        expected = _blocks_freed(P, list(suffixes), b, list(finished))
        if got == expected:
            continue
        for message, wrong in _freed_mistakes(P, suffixes, b, finished).items():
            if got == wrong:
                raise CheckFailure(f"{what}: got {got:g}. {message}")
        raise CheckFailure(f"{what}: got {got:g}, expected {expected}. Hint: a block goes back when no sequence "
                           f"holds it any more; which blocks did each finished request hold alone?")
    return f"{len(cases)} cases ({len(_FREED_CASES)} fixed, {len(cases) - len(_FREED_CASES)} random): " \
           f"the blocks freed match"


# ----------------------------------------------------------------------------- a graph-safe sliding-window step
_DECODE_STEPS = 8  # tokens decoded per case, eagerly and replayed
# (batch, heads, d_head, prompt, window, free rows after the last step): a window shorter than the sequence, an empty
# prompt with a window longer than the sequence, a window of one token
_WINDOW_CASES = ((1, 2, 4, 5, 4, 3), (2, 3, 8, 0, 20, 2), (1, 2, 4, 3, 1, 1))


class _Recorder(TorchDispatchMode):
    """The torch operations a call dispatches, each with its outputs' shapes, and the values read back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []
        self.host_reads = 0
        self.muted = 0  # inside a read _Position already counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default and not self.muted:  # .item(), int(t), `if t:`
            self.host_reads += 1
        outs = out if isinstance(out, tuple | list) else (out,)
        self.ops.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def _counted_read(name: str):
    def read(self, *args, **kwargs):
        record = _Position.record
        if record is None:  # the checker's own reads, between the steps
            return getattr(torch.Tensor, name)(self, *args, **kwargs)
        record.host_reads += 1
        record.muted += 1
        try:
            return getattr(torch.Tensor, name)(self, *args, **kwargs)
        finally:
            record.muted -= 1

    read.__name__ = name
    return read


class _Position(torch.Tensor):
    """The position handed to the step eagerly, and every tensor computed from it: a plain tensor whose reads back
    to the host are counted, those that never dispatch an operation on the CPU (.tolist(), .numpy()) included."""

    record: _Recorder | None = None  # the recorder of the step running now

    tolist = _counted_read("tolist")
    numpy = _counted_read("numpy")
    item = _counted_read("item")
    __int__ = _counted_read("__int__")
    __index__ = _counted_read("__index__")
    __bool__ = _counted_read("__bool__")
    __float__ = _counted_read("__float__")


_MASK_ADVICE = ("the mask must broadcast against the scores (B, H, 1, max_len), e.g. .view(1, 1, 1, -1): SDPA "
                "wants a mask of two or more dimensions")


class _MaskShape(Exception):
    """An attention mask SDPA refused for its shape."""


class _SdpaMaskWatch(torch.overrides.TorchFunctionMode):
    """Names a mask SDPA refuses for its shape (a 1-D mask raises a bare "Dimension out of range")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except (IndexError, RuntimeError) as e:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            q, keys = args[0] if args else kwargs.get("query"), args[1] if len(args) > 1 else kwargs.get("key")
            if isinstance(mask, torch.Tensor) and isinstance(q, torch.Tensor) and isinstance(keys, torch.Tensor):
                scores = (*q.shape[:-1], keys.shape[-2])
                try:
                    fits = mask.dim() >= 2 and torch.broadcast_shapes(mask.shape, scores) == scores
                except RuntimeError:
                    fits = False
                if not fits:
                    raise _MaskShape(f"your mask has shape {tuple(mask.shape)}, the scores {scores}: "
                                     f"{_MASK_ADVICE}") from e
            raise


def _window_case(seed: int, B: int, H: int, d: int, P: int, W: int, free: int) -> dict:
    """A cache of max_len rows: the prompt's P rows, then old rows of an earlier request (random, large); the tokens to
    decode; each step's expected output (SDPA over the last W rows of a growing cache) and the cache after it."""
    gen = torch.Generator().manual_seed(seed)
    max_len = P + _DECODE_STEPS + free
    keys, values = (torch.randn(B, H, max_len, d, generator=gen, dtype=torch.float64) for _ in range(2))
    keys[:, :, P:] *= 30  # rows not yet written hold an earlier request's keys: a step that sees them is wrong
    new = [tuple(torch.randn(B, H, 1, d, generator=gen, dtype=torch.float64) for _ in range(3))
           for _ in range(_DECODE_STEPS)]  # (q, k, v) per step, each (B, H, 1, d)
    states, expected = [], []
    state_k, state_v = keys.clone(), values.clone()
    for t, (q, k, v) in enumerate(new):
        n = P + t  # the row this step writes
        state_k[:, :, n:n + 1], state_v[:, :, n:n + 1] = k, v
        lo = max(0, n - W + 1)
        expected.append(F.scaled_dot_product_attention(q, state_k[:, :, lo:n + 1], state_v[:, :, lo:n + 1]))
        states.append((state_k.clone(), state_v.clone()))
    return {"keys": keys, "values": values, "new": new, "expected": expected, "states": states,
            "P": P, "W": W, "what": f"B={B}, H={H}, d_head={d}, prompt of {P} tokens, window={W}, max_len={max_len}"}


def _window_mistakes(case: dict, t: int) -> dict[str, torch.Tensor | None]:
    """What the usual mistakes return at step t (row n): attention over other rows of the cache after the write."""
    q = case["new"][t][0]
    keys, values = case["states"][t]
    n, W, max_len = case["P"] + t, case["W"], keys.shape[2]

    def over(lo: int, hi: int) -> torch.Tensor | None:  # attention over rows lo ... hi - 1
        lo, hi = max(0, lo), min(hi, max_len)
        return F.scaled_dot_product_attention(q, keys[:, :, lo:hi], values[:, :, lo:hi]) if hi > lo else None

    return {
        "row `position`, the token just written, is left out: a token attends to itself (its row passes "
        "the mask: <= position, not < position)": over(n - W + 1, n),
        "your mask also lets in row position + 1, which holds no token of this sequence yet: build the mask "
        "from the position of the row you wrote, before advancing it": over(n - W + 2, n + 2),
        f"your window holds {W + 1} tokens, not window = {W}: the last `window` tokens are the rows "
        "position - window + 1 ... position, the newest included": over(n - W, n + 1) if W + 1 <= n + 1 else None,
        f"your window holds {W - 1} tokens, not window = {W}: the last `window` tokens are the rows "
        "position - window + 1 ... position, the newest included": over(n - W + 2, n + 1) if W <= n + 1 else None,
        "the rows after `position` are not masked: a cache reused after a longer request holds its old keys and "
        "values there (here random numbers), which the new token must not see": over(n - W + 1, max_len),
        "every row of the cache is attended to: mask the rows after `position` (not written yet) and those "
        "before the window": over(0, max_len),
        "the window is missing: the step attends to every token so far, not the last `window`":
            over(0, n + 1) if n + 1 > W else None,
    }


def _step_result(name: str, got, shape: tuple) -> torch.Tensor:
    if isinstance(got, _Position):
        got = got.as_subclass(torch.Tensor)
    tensor = as_tensor(name, got)
    if tuple(tensor.shape) != shape:
        raise CheckFailure(f"{name} has shape {tuple(tensor.shape)}, expected {shape} (B, H, 1, d_head)")
    return tensor.detach().clone()


def _host_read_failure(times: int | None) -> CheckFailure:
    """times: the reads counted eagerly; None when make_fx could not trace the step for one."""
    how = ("a Python `if` or bool() on a tensor reads it back, as do .item(), .tolist(), .numpy(), int() and float()"
           if times is None else f"{times} time{'s' if times != 1 else ''}: .item(), .tolist(), .numpy(), int(), "
           f"float(), or a Python `if` or bool() on a tensor")
    traced = "make_fx could not trace it, and" if times is None else "the trace here replays right, but"
    return CheckFailure(f"your step reads a tensor back to the host ({how}): {traced} a CUDA graph capture refuses "
                        f"it, since copying to the host waits for the GPU, which a capture forbids. Keep the position "
                        f"a tensor and compare it on the device")


def _run_eagerly(fn, case: dict) -> list[_Recorder]:
    """The learner's step called token after token on the checker's cache; each output and the cache checked. The
    position is a _Position, so that every read of it back to the host is counted."""
    keys, values = case["keys"].clone(), case["values"].clone()
    P, W, what = case["P"], case["W"], case["what"]
    position = torch.tensor([P]).as_subclass(_Position)
    records = []
    for t, ((q, k, v), expected) in enumerate(zip(case["new"], case["expected"], strict=True)):
        record = _Recorder()
        mask_error: list[str] = []

        def recorded(q_, k_, v_, record=record, mask_error=mask_error):  # the cache and position are the step's
            _Position.record = record
            try:
                with record, _SdpaMaskWatch():
                    return fn(q_, k_, v_, keys, values, position, W)
            except _MaskShape as e:
                mask_error.append(str(e))
                raise
            finally:
                _Position.record = None

        at = f"{what}, step {t + 1} (row {P + t})"
        try:
            got = call_watching(recorded, q, k, v, names=("q", "k", "v"), what=f"; {at}",
                                advice="Write the new key and value into `keys` and `values`, and leave q, k and v "
                                       "as they are")
        except CheckFailure:
            if mask_error:
                raise CheckFailure(f"{at}: {mask_error[0]}") from None
            raise
        out = _step_result(f"the output ({at})", got, tuple(q.shape))
        records.append(record)
        state_k, state_v = case["states"][t]
        if not (torch.equal(keys, state_k) and torch.equal(values, state_v)):
            raise CheckFailure(f"{at}: after the step, `keys` and `values` should hold the new token's key and "
                               f"value in row {P + t} (= position) and be unchanged elsewhere. Write them in place, "
                               f"at the row `position` holds")
        if not is_close(out, expected):
            message = diagnose(out, _window_mistakes(case, t))
            if message:
                raise CheckFailure(f"{at}: {message}")
            compare(f"the output ({at})", out, expected.numpy(),
                    hint="attend to rows position - window + 1 ... position of the cache, after writing row "
                         "`position`")
        if int(position) != P + t + 1:
            raise CheckFailure(f"{at}: position holds {int(position)} after the step, expected {P + t + 1}: advance "
                               f"it by one in place (position += 1 or position.add_(1)); `position = position + 1` "
                               f"makes a new tensor, and the caller's, like a captured graph's, stays where it was")
    return records


def _replay(fn, case: dict, host_reads: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Trace the step once with make_fx (every Python value it sees baked in, as a CUDA graph bakes them), put the
    cache and position back, and replay the trace token after token."""
    keys, values = case["keys"].clone(), case["values"].clone()
    P, W = case["P"], case["W"]
    position = torch.tensor([P])
    q0, k0, v0 = (x.clone() for x in case["new"][0])
    try:
        traced = make_fx(lambda q_, k_, v_: fn(q_, k_, v_, keys, values, position, W), tracing_mode="real")(q0, k0, v0)
    except Exception as e:  # the learner's code, not the checker's
        if host_reads or "_local_scalar_dense" in str(e) or "data-dependent" in str(e).lower():
            raise _host_read_failure(None) from None
        raise CheckFailure(f"{case['what']}: tracing your step with make_fx failed ({type(e).__name__}: {e})") from None
    keys.copy_(case["keys"])  # in place: the trace holds these very tensors
    values.copy_(case["values"])
    position.fill_(P)
    outs = [traced(*(x.clone() for x in new)).detach().clone() for new in case["new"]]
    return outs, keys, values


@checker
def check_window_decode_step(fn):
    """Check a decoding step with a sliding window that a CUDA graph can capture, eagerly and replayed from a trace.

    Your function: `fn(q, k, v, keys, values, position, window) -> out`: q, k, v the new token's query, key and
    value (B, H, 1, d_head); keys and values the preallocated cache (B, H, max_len, d_head); position a (1,) int64
    tensor, the row to write; window a Python int. Writes k and v into row `position` in place, returns the
    attention of q over the last `window` tokens, rows position - window + 1 ... position, (B, H, 1, d_head),
    and advances position by one in place. Float64; the rows after `position` hold an earlier request's keys. Runs
    each step eagerly on 8 tokens of three fixed cases and a random one, checks the shapes stay the same from
    step to step, then traces the step once with make_fx (tracing_mode="real"), which bakes in every Python value
    as a CUDA graph does, and replays it for the 8 tokens. Names a mask that leaves out the newest token or lets
    in the next row, a window one token too wide or too narrow, unmasked rows, a missing window, a position not
    advanced in place, shapes that change per step, a write or a mask fixed at capture, a mask SDPA cannot
    broadcast, and any read back to the host: the position handed to the eager calls counts .item(), .tolist(),
    .numpy(), int(), float() and bool() on itself and on every tensor computed from it.
    """
    rng = np.random.default_rng()
    cases = [_window_case(i, *c) for i, c in enumerate(_WINDOW_CASES)]
    P = int(rng.integers(0, 12))
    cases.append(_window_case(int(rng.integers(2**31)), int(rng.integers(1, 4)), int(rng.integers(1, 5)),
                              int(rng.choice([2, 4, 8])), P, int(rng.integers(1, P + _DECODE_STEPS + 3)),
                              int(rng.integers(0, 5))))
    host_reads = 0
    for case in cases:  # eagerly first: a wrong answer is named before the question of graph safety
        records = _run_eagerly(fn, case)
        host_reads += sum(r.host_reads for r in records)
        if any(r.ops != records[0].ops for r in records[1:]):
            raise CheckFailure(f"{case['what']}: your step runs different operations or shapes from one token to the "
                               f"next (a slice such as keys[:, :, start:stop] with Python numbers, boolean indexing, "
                               f"an `if` on a tensor). A CUDA graph replays the shapes of its capture: attend over all "
                               f"max_len rows and let a mask computed on the device choose them")
    for case in cases:
        outs, keys, values = _replay(fn, case, host_reads)
        final_k, final_v = case["states"][-1]
        if not (torch.equal(keys, final_k) and torch.equal(values, final_v)):
            raise CheckFailure(f"{case['what']}: replayed, your step writes every token into the row it wrote at "
                               f"the trace ({case['P']}): that row was a Python number (int(position), "
                               f"position.item(), a counter) baked into the graph. Write at the tensor position "
                               f"(index_copy_), which the replay reads where it points then")
        for t, (out, expected) in enumerate(zip(outs, case["expected"], strict=True)):
            if not is_close(out, expected):
                raise CheckFailure(f"{case['what']}: right eagerly, but replayed, token {t + 1} attends to the rows "
                                   f"the traced token did: your mask (or slice) was made from a Python number "
                                   f"(int(position), position.item()), baked in at the trace. Compare "
                                   f"torch.arange(max_len) with the tensor position, on the device")
    if host_reads:
        raise _host_read_failure(host_reads)
    return f"{len(cases)} cases ({len(_WINDOW_CASES)} fixed, 1 random), {_DECODE_STEPS} tokens each, eagerly and " \
           f"replayed from one make_fx trace: every output and the cache match a growing cache's window"
