"""Checkers for notebook 10 (flash attention): the online-softmax update step."""

from __future__ import annotations

import numpy as np

from course_lib.checks._core import as_array, call, checker, compare, unpack
from course_lib.numpy_ref import online_softmax_step, scaled_dot_product_attention

__all__ = ["check_online_softmax_step"]

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
