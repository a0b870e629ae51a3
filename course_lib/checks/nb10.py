"""Checkers for notebook 10 (flash attention): which causal tiles a kernel may skip, merging two partial
results of the online softmax, the HBM traffic of a causal tiled loop, and the online-softmax update step."""

from __future__ import annotations

import math

import numpy as np

from course_lib.checks._core import CheckFailure, as_array, call, checker, compare, diagnose, is_close, unpack
from course_lib.cost.io_complexity import tiled_attention_io
from course_lib.numpy_ref import online_softmax_step, scaled_dot_product_attention, softmax

__all__ = ["check_tile_visited", "check_merge_partials", "check_causal_tiled_traffic", "check_online_softmax_step"]

_HINTS = {
    "m_new": "the new running max is the larger of the old max m and the row max of the new block of scores",
    "l_new": "l was summed relative to the old max: rescale it by exp(m - m_new) before adding "
             "sum(exp(scores - m_new)) of the new block",
    "acc_new": "acc was accumulated relative to the old max: rescale it by exp(m - m_new) before adding "
               "exp(scores - m_new) @ v_block",
}


def _unpack(result, what: str):
    return unpack(result, 3, "return the new state as a tuple (m_new, l_new, acc_new)", case=what)


def _step_case(fn, m, l, acc, scores, v_block, what: str, extra_hint: str = "") -> None:
    expected = online_softmax_step(m, l, acc, scores, v_block)
    got = _unpack(call(fn, m.copy(), l.copy(), acc.copy(), scores.copy(), v_block.copy(), what=f"; {what}"), what)
    for name, g, e in zip(("m_new", "l_new", "acc_new"), got, expected, strict=True):
        compare(f"{name} ({what})", g, e, hint=_HINTS[name] + extra_hint)


def _tiled(fn, q, k, v, mask, block):
    T, S, d = q.shape[0], k.shape[0], q.shape[1]
    out = np.zeros((T, v.shape[1]))
    for t0 in range(0, T, block):
        rows = min(block, T - t0)
        m, l, acc = np.full((rows, 1), -np.inf), np.zeros((rows, 1)), np.zeros((rows, v.shape[1]))
        for s0 in range(0, S, block):
            scores = q[t0 : t0 + block] @ k[s0 : s0 + block].T / np.sqrt(d)
            scores = np.where(mask[t0 : t0 + block, s0 : s0 + block], scores, -np.inf)
            m, l, acc = _unpack(call(fn, m, l, acc, scores, v[s0 : s0 + block], what="; inside the tiled loop"),
                                "inside the tiled loop")
            m, l, acc = (as_array(f"{name} inside the tiled loop", x)
                         for name, x in zip(("m_new", "l_new", "acc_new"), (m, l, acc), strict=True))
        out[t0 : t0 + block] = np.divide(acc, l, out=np.zeros_like(acc), where=l > 0)
    return out


@checker
def check_online_softmax_step(fn):
    """Check one update step of the online softmax (flash attention).

    Your function: `fn(m, l, acc, scores, v_block) -> (m_new, l_new, acc_new)`: the running row max
    m (Bq, 1), the running sum l (Bq, 1) of exp(scores - m), and the running acc (Bq, d_v) of
    exp(scores - m) @ v, updated with one block of scores (Bq, Bk) and its values v_block (Bk, d_v).
    Checks four single steps (the max rising, falling, rows fully masked with -inf) and a whole tiled
    attention driven by your step against naive attention; says which part of the state is wrong.
    """
    rng = np.random.default_rng(10)
    bq, bk, d_v = 4, 5, 3
    empty = (np.full((bq, 1), -np.inf), np.zeros((bq, 1)), np.zeros((bq, d_v)))
    scores, v_block = rng.standard_normal((bq, bk)), rng.standard_normal((bk, d_v))
    _step_case(fn, *empty, scores, v_block, "first block, empty state")
    # a state built from earlier blocks, then a block whose scores are larger: the max rises
    m = rng.standard_normal((bq, 1))
    l = np.exp(rng.standard_normal((bq, 1)))
    acc = rng.standard_normal((bq, d_v))
    _step_case(fn, m, l, acc, scores + 3.0, v_block, "the new block raises the running max")
    _step_case(fn, m, l, acc, scores - 3.0, v_block, "the new block is below the running max")
    # rows that have seen only masked (-inf) scores so far must stay finite
    masked = scores.copy()
    masked[:2] = -np.inf
    _step_case(fn, *empty, masked, v_block, "first block with rows fully masked (-inf)",
               extra_hint="; a row whose scores are all -inf has m_new = -inf and exp(-inf - (-inf)) is NaN: "
                          "subtract 0 instead of m_new in such rows (np.where(np.isfinite(m_new), m_new, 0))")
    # the whole tiled attention, driven by the learner's step, equals naive attention
    T, S, d = 7, 11, 4
    q, k, v = rng.standard_normal((T, d)) * 2, rng.standard_normal((S, d)) * 2, rng.standard_normal((S, d_v))
    mask = np.tril(np.ones((T, S), dtype=bool), k=S - T)
    mask[0] = False  # one query with nothing to attend to: output 0
    expected = scaled_dot_product_attention(q, k, v, mask)[0]
    got = _tiled(fn, q, k, v, mask, block=3)
    compare("tiled attention built from your step (T=7, S=11, blocks of 3, causal, one fully masked row)",
            got, expected, hint="each block must rescale l and acc by exp(m - m_new)")
    return "4 single steps (rising max, falling max, masked rows) and a full tiled attention match"


# ----------------------------------------------------------------------------------------------
# Exercise 1: which tiles of a causal mask must be visited
# ----------------------------------------------------------------------------------------------
def _visited(i: int, j: int, block_q: int, block_k: int, T: int, S: int) -> bool:
    """Does tile (query block i, key block j) hold an allowed entry? Bottom-right causal: key s <= t + S - T."""
    last_query = min((i + 1) * block_q, T) - 1
    return j * block_k <= last_query + S - T


_TILE_CASES = [(256, 256, 64, 64), (256, 256, 64, 32), (200, 200, 48, 80), (96, 160, 32, 32), (130, 70, 40, 25),
               (100, 100, 10, 9)]


def _tile_grid(rule, T, S, block_q, block_k) -> np.ndarray:
    return np.array([[bool(rule(i, j, block_q, block_k, T, S)) for j in range(math.ceil(S / block_k))]
                     for i in range(math.ceil(T / block_q))])


@checker
def check_tile_visited(fn):
    """Check which tiles of a causal score matrix a tiled kernel must visit.

    Your function: `fn(i, j, block_q, block_k, T, S) -> bool`, True when the tile of query block i (queries
    i*block_q .. (i+1)*block_q - 1, cut at T) and key block j (keys j*block_k .., cut at S) holds at least one
    position the causal mask allows, bottom-right aligned as in `causal_mask(T, S)`: query t sees key s when
    s <= t + S - T. Checks every tile of five grids (square and rectangular tiles, S > T and S < T, lengths
    that are not multiples of the blocks); names a top-left aligned mask, skipping partly masked tiles, and
    an off-by-one on the diagonal.
    """
    mistakes = {
        "you aligned the causal mask top-left (query t sees keys s <= t); with S != T the mask is bottom-right "
        "aligned: query t sees keys s <= t + S - T, so the last query sees every key":
            lambda i, j, bq, bk, T, S: j * bk <= min((i + 1) * bq, T) - 1,
        "you skipped tiles that are only PARTLY masked (you kept a tile only if all its entries are allowed); "
        "a tile may be skipped only when every entry is masked: compare the first key of the tile with the LAST "
        "query of the tile": lambda i, j, bq, bk, T, S: min((j + 1) * bk, S) - 1 <= i * bq + S - T,
        "you compared the first key with the FIRST query of the tile; the tile holds an allowed entry as soon as "
        "its LAST query (min((i + 1) * block_q, T) - 1) may see its first key":
            lambda i, j, bq, bk, T, S: j * bk <= i * bq + S - T,
        "off by one on the diagonal: query t may see key t + S - T itself (<=, not <)":
            lambda i, j, bq, bk, T, S: j * bk < min((i + 1) * bq, T) - 1 + S - T,
    }
    for T, S, block_q, block_k in _TILE_CASES:
        expected = _tile_grid(_visited, T, S, block_q, block_k)
        got = np.array([[call(fn, i, j, block_q, block_k, T, S, what=f" (i={i}, j={j}, T={T}, S={S})")
                         for j in range(expected.shape[1])] for i in range(expected.shape[0])], dtype=object)
        if any(g is None for g in got.flat):
            raise CheckFailure("your function returned None for some tile: did you forget to `return` it?")
        try:
            got = got.astype(bool)
        except (TypeError, ValueError):
            raise CheckFailure("return True or False for each tile") from None
        if (got == expected).all():
            continue
        case = f"T={T}, S={S}, block_q={block_q}, block_k={block_k}"
        wrong = {m: _tile_grid(rule, T, S, block_q, block_k) for m, rule in mistakes.items()}
        message = next((m for m, grid in wrong.items() if (grid == got).all()), None)
        i, j = (int(x) for x in np.argwhere(got != expected)[0])
        raise CheckFailure(f"for {case}, tile (i={i}, j={j}) should be {'visited' if expected[i, j] else 'skipped'}"
                           + (f": {message}." if message else ".")
                           + f" ({int(expected.sum())} of {expected.size} tiles hold an allowed entry.)")
    return f"every tile of {len(_TILE_CASES)} grids (S = T, S > T, S < T, ragged edges) is visited or skipped rightly"


# ----------------------------------------------------------------------------------------------
# Exercise 2: merging two partial results (disjoint key sets)
# ----------------------------------------------------------------------------------------------
def _merge(m1, l1, a1, m2, l2, a2):
    m = np.maximum(m1, m2)
    shift = np.where(np.isfinite(m), m, 0.0)
    c1, c2 = np.exp(m1 - shift), np.exp(m2 - shift)
    return m, c1 * l1 + c2 * l2, c1 * a1 + c2 * a2


def _state_of(scores, v):
    m = scores.max(axis=-1, keepdims=True)
    shift = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(scores - shift)
    return m, p.sum(-1, keepdims=True), p @ v


@checker
def check_merge_partials(fn):
    """Check the merge of two partial online-softmax results over disjoint sets of keys.

    Your function: `fn(m1, l1, a1, m2, l2, a2) -> (m, l, acc)`: each (m_i (Bq, 1) row max, l_i (Bq, 1) sum of
    exp(score - m_i), a_i (Bq, d_v) sum of exp(score - m_i) v) describes the same queries over its own keys;
    return the state over the union. Checks rows where either side holds the larger max, a side that saw
    only masked keys (-inf, 0, 0), rows empty on both sides, and that splitting a row anywhere and merging
    gives softmax(scores) @ v; names the usual mistakes.
    """
    rng = np.random.default_rng(1010)
    bq, d_v = 5, 3
    s1, s2 = rng.standard_normal((bq, 4)) * 3, rng.standard_normal((bq, 6)) * 3
    s1[0] += 6.0  # row 0: the first side holds the max
    s2[1] += 6.0  # row 1: the second side
    s1[3] = -np.inf  # row 3: the first side saw only masked keys
    s1[4] = s2[4] = -np.inf  # row 4: nothing to attend to on either side
    v1, v2 = rng.standard_normal((4, d_v)), rng.standard_normal((6, d_v))
    left, right = _state_of(s1, v1), _state_of(s2, v2)
    expected = _merge(*left, *right)
    result = call(fn, *left, *right, what="; row 4 is -inf on both sides")
    got = unpack(result, 3, "return the merged state as a tuple (m, l, acc)")
    got_arrays = [as_array(name, g) for name, g in zip(("m", "l", "acc"), got, strict=True)]
    with np.errstate(invalid="ignore"):
        c1, c2 = np.exp(left[0] - expected[0]), np.exp(right[0] - expected[0])
        mistakes = {
            "you added the two sums without rescaling: l1 and l2 were summed relative to different maxima, "
            "so each must be multiplied by exp(m_i - m) first": (left[1] + right[1], left[2] + right[2]),
            "you rescaled only the first partial result, as in a single step; here BOTH were accumulated under "
            "their own max: multiply each by exp(m_i - m)": (left[1] * c1 + right[1], left[2] * c1 + right[2]),
            "you rescaled by exp(m - m_i); the factor is exp(m_i - m) <= 1 (each old max is at most the new one)":
                (left[1] / c1 + right[1] / c2, left[2] / c1 + right[2] / c2),
        }
    for name, g, e in zip(("m", "l", "acc"), got, expected, strict=True):
        rows, both = slice(0, 4), slice(0, 3)  # the rows with at least one key; with keys on both sides
        g_arr = as_array(name, g)
        if name != "m" and g_arr.shape == e.shape and not is_close(g_arr[rows], e[rows]):
            index = 0 if name == "l" else 1
            message = diagnose(g_arr[both], {m_: w[index][both] for m_, w in mistakes.items()})
            if message:
                raise CheckFailure(f"{name}: {message}.")
            if name == "acc" and is_close(g_arr[both], (expected[2][both] / expected[1][both])):
                raise CheckFailure("acc is the normalised output acc / l; return the unnormalised accumulator "
                                   "(the division by l happens once, after the last merge)")
        compare(f"{name} (rows 0-3, each with at least one key)", g_arr[rows], e[rows],
                hint="m = max(m1, m2); l = exp(m1 - m) l1 + exp(m2 - m) l2; acc likewise")
    for name, g, e in zip(("m", "l", "acc"), got_arrays, expected, strict=True):
        compare(f"{name} in row 4 (masked on both sides: m1 = m2 = -inf)", g[4:], e[4:],
                hint="exp(-inf - (-inf)) is NaN: where m = -inf subtract 0 instead (np.where(np.isfinite(m), m, 0))")
    # splitting a row at every position and merging gives the softmax-weighted sum
    scores, v = rng.standard_normal((3, 9)) * 2, rng.standard_normal((9, d_v))
    exact = softmax(scores) @ v
    for cut in range(1, 9):
        merged = unpack(call(fn, *_state_of(scores[:, :cut], v[:cut]), *_state_of(scores[:, cut:], v[cut:]),
                             what=f"; keys cut at {cut}"), 3, "return the merged state as a tuple (m, l, acc)")
        out = as_array("acc", merged[2]) / as_array("l", merged[1])
        compare(f"acc / l after merging keys 0..{cut - 1} with keys {cut}..8", out, exact,
                hint="the merged state must describe all the keys")
    return "rows led by either side, one-sided and empty rows, and 8 cuts of a row give softmax(scores) @ v"


# ----------------------------------------------------------------------------------------------
# Exercise 3: HBM traffic of a causal tiled loop that skips masked tiles
# ----------------------------------------------------------------------------------------------
def _causal_traffic(T: int, d: int, block_q: int, block_k: int) -> int:
    kv = sum(min(block_k, T - j * block_k) for i in range(math.ceil(T / block_q))
             for j in range(math.ceil(T / block_k)) if _visited(i, j, block_q, block_k, T, T))
    return 2 * T * d + 2 * d * kv


_TRAFFIC_CASES = [(1024, 64, 128, 64), (256, 64, 64, 64), (1000, 64, 64, 64), (300, 32, 128, 48), (4096, 128, 128, 128)]


@checker
def check_causal_tiled_traffic(fn):
    """Check the count of elements a causal tiled forward pass moves between HBM and the chip.

    Your function: `fn(T, d, block_q, block_k) -> int`, for one head, T = S, d_v = d: the loop reads each block
    of queries once and writes its output once, and reads a key tile and a value tile only for the tiles
    that hold an allowed entry (the mask is computed from positions, never read). Checks five cases,
    lengths that are not multiples of the blocks included; names counting the skipped tiles too, halving
    the non-causal count, forgetting the values or q and o, and full-size last tiles.
    """
    for T, d, block_q, block_k in _TRAFFIC_CASES:
        case = f"T={T}, d={d}, block_q={block_q}, block_k={block_k}"
        got = as_array("your count", call(fn, T, d, block_q, block_k, what=f" ({case})"))
        expected = _causal_traffic(T, d, block_q, block_k)
        if is_close(got, expected):
            continue
        non_causal = tiled_attention_io(T, T, d, block_q=block_q)
        visited_tiles = [(i, j) for i in range(math.ceil(T / block_q)) for j in range(math.ceil(T / block_k))
                         if _visited(i, j, block_q, block_k, T, T)]
        message = diagnose(got, {
            "that is the NON-causal count: the skipped tiles above the diagonal are never read": non_causal,
            "you halved the non-causal key/value traffic; the tiles on the diagonal are only partly masked and are "
            "read whole, so the causal loop reads more than half": 2 * T * d + (non_causal - 2 * T * d) / 2,
            "you counted the key tiles but not the value tiles (each visited tile reads both)":
                2 * T * d + (expected - 2 * T * d) / 2,
            "you left out reading the queries and writing the output (T d each)": expected - 2 * T * d,
            "the last key tile is shorter when T is not a multiple of block_k; you counted it whole":
                2 * T * d + 2 * d * block_k * len(visited_tiles),
        })
        raise CheckFailure(f"for {case} you counted {got}, expected {expected}" + (f": {message}." if message else
                           ". Hint: 2 T d for q and o, plus 2 d times the keys of every visited tile."))
    return f"{len(_TRAFFIC_CASES)} cases, ragged last tiles included, match the count of visited tiles"
