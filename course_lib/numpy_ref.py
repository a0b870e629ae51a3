"""Attention in pure numpy: the reference every other implementation is checked against.

Conventions (see notebooks/00): q (..., T, d), k (..., S, d), v (..., S, d_v); leading
batch dimensions broadcast. A boolean mask is True where a query *may attend* to a key
(torch SDPA's polarity); a float mask is added to the scores. A query row with nothing to
attend to (every key masked, or no keys at all) gets weights 0 and output 0; a NaN in the
inputs gives NaN where it reaches, as in torch: it is never hidden.

Precision: softmax, scaled_dot_product_attention and its backward are the reference, so they
compute in float64 whatever the input dtype and return float64 (float16 inputs are converted
first: q k^T cannot overflow where the scores fit). online_softmax_attention models a kernel: it
computes and returns in the inputs' dtype, at least float32.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from course_lib._validate import check_mask_shape, check_positive_int, check_qkv_shapes, shape_str

__all__ = [
    "softmax",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "online_softmax_attention",
    "online_softmax_step",
    "IOCounterLike",
]


class IOCounterLike(Protocol):
    """What `online_softmax_attention(..., io=...)` calls: course_lib.cost.io_complexity.IOCounter has it.

    Any object with these three methods will do, so this reference imports nothing but numpy.
    """

    def read(self, n: int) -> None:
        """n more elements read from slow memory."""

    def write(self, n: int) -> None:
        """n more elements written to slow memory."""

    def on_chip(self, n: int) -> None:
        """A working set of n elements held on chip at once."""


_IO_METHODS = ("read", "write", "on_chip")


def _as_float_array(name: str, x: object, dtype: type | None = np.float64) -> np.ndarray:
    """x as a float array in `dtype` (None: its own float dtype, at least float32)."""
    if getattr(x, "requires_grad", False):
        raise TypeError(f"{name} is a torch.Tensor that requires grad; numpy_ref takes numpy arrays: "
                        f"pass {name}.detach().cpu().numpy()")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, GPU tensors, ...
        raise TypeError(f"{name} must be a numpy array (or convertible to one); got {type(x).__name__}: {e}") from None
    if arr.dtype.kind not in "iubf":  # ints and bools are promoted, so [[1, 0], [0, 1]] just works
        raise TypeError(f"{name} must be a real floating-point array; got dtype {arr.dtype} (kind '{arr.dtype.kind}')")
    return arr.astype(dtype or np.promote_types(arr.dtype, np.float32), copy=False)


def _as_mask(mask: object, scores_shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_ and m.dtype.kind != "f":
        raise TypeError(
            f"mask must be boolean (True = may attend) or floating-point (added to the scores); got dtype {m.dtype}"
        )
    check_mask_shape(m.shape, scores_shape)
    if m.dtype.kind == "f" and np.isnan(m).any():
        raise ValueError("mask (floating-point, additive) contains NaN; use -inf for 'may not attend'")
    return m.reshape((1,) * (2 - m.ndim) + m.shape) if m.ndim < 2 else m  # at least (T|1, S|1)


def softmax(x: ArrayLike, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along `axis` (the log-sum-exp trick).

    Subtracting the row maximum leaves the result unchanged (softmax is shift-invariant) and
    makes every exponent <= 0, so exp never overflows, even for logits of 1e4. A row that is
    all -inf (nothing to attend to) gives zeros instead of 0/0 = NaN; a row with a NaN gives NaN.
    """
    x = _as_float_array("x", x)
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for x of shape {shape_str(x.shape)}")
    if x.shape[axis] == 0:
        return x.copy()  # an empty row: nothing to normalise
    row_max = np.max(x, axis=axis, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # all -inf rows: shift by 0
    e = np.exp(x - row_max)
    total = np.sum(e, axis=axis, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=(total > 0) | np.isnan(total))  # NaN stays NaN


def _masked_scores(q: np.ndarray, k: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    scores = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])  # (..., T, S)
    if mask is None:
        return scores
    if mask.dtype == np.bool_:
        return np.where(mask, scores, -np.inf)
    return scores + mask


def _check_inputs(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, mask: ArrayLike | None, dtype: type | None = np.float64
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, tuple[int, ...]]:
    q, k, v = (_as_float_array(n, a, dtype) for n, a in (("q", q), ("k", k), ("v", v)))
    scores_shape = check_qkv_shapes(q.shape, k.shape, v.shape)
    return q, k, v, _as_mask(mask, scores_shape), scores_shape


def scaled_dot_product_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, mask: ArrayLike | None = None
                                 ) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q k^T / sqrt(d) [masked]) v.

    Returns (out (..., T, d_v), weights (..., T, S)).
    """
    q, k, v, mask, _ = _check_inputs(q, k, v, mask)
    weights = softmax(_masked_scores(q, k, mask), axis=-1)  # (..., T, S)
    return weights @ v, weights


def _sum_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Undo broadcasting: sum `grad` over the axes along which an input of `shape` was broadcast."""
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra else grad
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def scaled_dot_product_attention_backward(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, d_out: ArrayLike, mask: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of sum(out * d_out) with respect to q, k and v, derived by hand (notebook 02).

    With P = softmax(S), S = q k^T / sqrt(d), out = P v:
        dv = P^T d_out
        dP = d_out v^T
        dS = P * (dP - rowsum(dP * P))         (the softmax Jacobian, applied row by row)
        dq = dS k / sqrt(d),   dk = dS^T q / sqrt(d)
    Masked entries have P = 0, so their dS is 0 and no gradient flows through them.
    """
    q, k, v, mask, scores_shape = _check_inputs(q, k, v, mask)
    d_out = _as_float_array("d_out", d_out)
    out_shape = (*scores_shape[:-1], v.shape[-1])
    if d_out.shape != out_shape:
        raise ValueError(
            f"d_out must have the shape of the output {shape_str(out_shape)}; got {shape_str(d_out.shape)}"
        )
    p = softmax(_masked_scores(q, k, mask), axis=-1)  # (..., T, S)
    dv = np.swapaxes(p, -1, -2) @ d_out  # (..., S, d_v)
    dp = d_out @ np.swapaxes(v, -1, -2)  # (..., T, S)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))  # (..., T, S)
    scale = 1.0 / np.sqrt(q.shape[-1])
    dq = (ds @ k) * scale  # (..., T, d)
    dk = (np.swapaxes(ds, -1, -2) @ q) * scale  # (..., S, d)
    return _sum_to_shape(dq, q.shape), _sum_to_shape(dk, k.shape), _sum_to_shape(dv, v.shape)


def online_softmax_step(
    m: np.ndarray, l: np.ndarray, acc: np.ndarray, scores: np.ndarray, v_block: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of the online softmax: fold a block of scores (and their values) into the running state.

    m (..., Bq, 1): running row max of the scores seen so far (-inf before any finite score);
    l (..., Bq, 1): running sum of exp(score - m); acc (..., Bq, d_v): running sum of exp(score - m) * v;
    scores (..., Bq, Bk): the new block (masked entries are -inf); v_block (..., Bk, d_v).
    When the new block raises the max from m to m_new, everything accumulated so far was
    computed relative to the old max, so l and acc are both rescaled by exp(m - m_new).
    Returns (m_new, l_new, acc_new). At the end, out = acc / l (0 where l == 0).
    """
    m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))  # (..., Bq, 1)
    m_safe = np.where(np.isfinite(m_new), m_new, 0.0)  # rows with only -inf so far: shift by 0
    p = np.exp(scores - m_safe)  # (..., Bq, Bk), 0 where masked
    correction = np.exp(m - m_safe)  # (..., Bq, 1), exp(-inf) = 0 on the first finite block
    l_new = l * correction + p.sum(axis=-1, keepdims=True)
    acc_new = acc * correction + p @ v_block  # (..., Bq, d_v)
    return m_new, l_new, acc_new


def online_softmax_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    mask: ArrayLike | None = None,
    block_size: int = 64,
    *,
    key_block_size: int | None = None,
    io: IOCounterLike | None = None,
) -> np.ndarray:
    """Attention computed tile by tile with the online softmax (FlashAttention's recurrence).

    Never materialises the (T, S) score matrix: for each block of queries it streams over
    blocks of keys, keeping a running row max m, a running denominator l and an un-normalised
    accumulator acc (see `online_softmax_step`). Extra memory: one (block, block) tile of
    scores plus the (T, d_v) output, i.e. O(block_size^2 + T * d_v) instead of O(T * S).
    T and S need not be multiples of block_size (the last tiles are smaller). A query row
    whose keys are all masked gets output 0. Equals `scaled_dot_product_attention(q, k, v, mask)[0]`.

    key_block_size: the size of the key tiles (default: block_size, which then sizes the query blocks).
    io: a counter with methods read(n), write(n) and on_chip(n) (`IOCounterLike`, e.g.
    `course_lib.cost.io_complexity.IOCounter`) that counts, in elements, what a kernel with this loop would
    read from slow memory (each query block once, every key and value tile once per query block, mask
    tiles) and write (each output block once), and the largest per-head working set of one tile step.
    """
    check_positive_int("block_size", block_size)
    key_block_size = block_size if key_block_size is None else key_block_size
    check_positive_int("key_block_size", key_block_size)
    missing = [] if io is None else [name for name in _IO_METHODS if not callable(getattr(io, name, None))]
    if missing:
        raise TypeError(f"io must be None or an IO counter with methods read(n), write(n) and on_chip(n), such as "
                        f"course_lib.cost.io_complexity.IOCounter(); got {type(io).__name__}, which has no "
                        f"{', '.join(missing)}")
    q, k, v, mask, scores_shape = _check_inputs(q, k, v, mask, dtype=None)
    batch, T, S = scores_shape[:-2], scores_shape[-2], scores_shape[-1]
    q = np.broadcast_to(q, (*batch, T, q.shape[-1]))  # views: no copy
    k = np.broadcast_to(k, (*batch, S, k.shape[-1]))
    v = np.broadcast_to(v, (*batch, S, v.shape[-1]))
    dtype = np.result_type(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])  # a Python float: it does not promote float32 scores
    d_v = v.shape[-1]
    heads = max(1, math.prod(batch))  # one program per (batch, head) on a GPU
    out = np.zeros((*batch, T, d_v), dtype=dtype)  # (..., T, d_v)
    for t0 in range(0, T, block_size):
        t1 = min(t0 + block_size, T)
        q_blk = q[..., t0:t1, :]  # (..., Bq, d)
        if io is not None:
            io.read(q_blk.size)  # loaded once, kept on chip for the whole loop over keys
        m = np.full((*batch, t1 - t0, 1), -np.inf, dtype=dtype)  # running max
        l = np.zeros((*batch, t1 - t0, 1), dtype=dtype)  # running sum of exp
        acc = np.zeros((*batch, t1 - t0, d_v), dtype=dtype)  # running sum of exp * v
        for s0 in range(0, S, key_block_size):
            s1 = min(s0 + key_block_size, S)
            k_tile, v_tile = k[..., s0:s1, :], v[..., s0:s1, :]  # (..., Bk, d), (..., Bk, d_v)
            scores = (q_blk @ np.swapaxes(k_tile, -1, -2)) * scale  # (..., Bq, Bk)
            if mask is not None:
                rows = slice(None) if mask.shape[-2] == 1 else slice(t0, t1)
                cols = slice(None) if mask.shape[-1] == 1 else slice(s0, s1)
                tile = mask[..., rows, cols]
                scores = np.where(tile, scores, -np.inf) if mask.dtype == np.bool_ else scores + tile
                if io is not None:
                    io.read(tile.size)
            if io is not None:
                io.read(k_tile.size + v_tile.size)
                io.on_chip((q_blk.size + k_tile.size + v_tile.size + scores.size + acc.size + m.size + l.size)
                           // heads)
            m, l, acc = online_softmax_step(m, l, acc, scores, v_tile)
        out[..., t0:t1, :] = np.divide(acc, l, out=np.zeros_like(acc), where=(l > 0) | np.isnan(l))
        if io is not None:
            io.write(acc.size)
    return out
