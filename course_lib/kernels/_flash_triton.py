"""FlashAttention-style kernels in Triton: a tiled forward pass and a tiled backward pass.

Imported only through `course_lib.kernels` (which decides whether Triton runs compiled on a GPU
or in its CPU interpreter before this module, and so triton, is imported).

Layout: q (N, T, D), k (N, S, D), v (N, S, D), contiguous, N = batch * heads. The grid is
one-dimensional: program `pid` handles query block `pid % num_blocks` of head `pid // num_blocks`,
so N may be as large as 2^31 / num_blocks (the second and third grid axes of CUDA stop at 65535),
and the programs of one head run side by side (its keys and values stay in L2). Offsets to the
start of a head are computed in int64: N * T * D may pass 2^31 elements.
D is padded to BLOCK_D, a power of 2. Every tl.dot accumulates in float32; DOT_PRECISION says
what the Tensor Cores may do to float32 inputs ("ieee": nothing, exact float32 products;
"tf32": round them to 10 mantissa bits first). float16/bfloat16 inputs are not rounded further.

Causal attention splits each loop into the tiles that are fully visible (no mask arithmetic at
all) and the tiles on the diagonal (masked); the unmasked non-causal loop also stops before a
last, partial key tile, which is the only one that needs a bounds mask.
"""

from __future__ import annotations

import functools
import inspect
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E); exp2 is the GPU's native instruction


# ----------------------------------------------------------------------------- forward
@triton.jit
def _load_rows(ptrs, rows_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking only what can be out of bounds."""
    if CHECK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, K, V, offs_m, offs_n, offs_d, d_ok, S, D, qk_scale, lo, hi,
    MASK_CAUSAL: tl.constexpr, MASK_COLS: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fold key tiles lo, lo + BLOCK_N, ... < hi into the running (acc, l_i, m_i) of one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        col_ok = cols < S
        kv_off = cols[:, None] * D + offs_d[None, :]
        k = _load_rows(K + kv_off, col_ok, d_ok, MASK_COLS, EVEN_D)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(V + kv_off, col_ok, d_ok, MASK_COLS, EVEN_D)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), not yet scaled
        if MASK_CAUSAL:
            s = tl.where((cols[None, :] <= offs_m[:, None]) & col_ok[None, :], s, float("-inf"))
        elif MASK_COLS:
            s = tl.where(col_ok[None, :], s, float("-inf"))  # keys past S do not exist
        # qk_scale > 0, so the row max of the scaled scores is the scaled row max: the scale is applied
        # inside exp2's argument, one fused multiply-add per score instead of a multiply and a subtract
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # (BLOCK_M,) base 2; finite: every row sees a key
        alpha = tl.math.exp2(m_i - m_new)  # rescale what was accumulated under the old max
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # p in v's dtype
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T", "S", "LEN_BUCKET"])
def _attn_fwd(
    Q, K, V, O, LSE,  # pointers; LSE (N, T) float32: log2-sum-exp2 of each scaled score row, for the backward
    T, S, D,  # sizes (runtime ints)
    qk_scale,  # log2(e) / sqrt(D)
    LEN_BUCKET,  # max(T, S) rounded up to a power of 2: part of the autotuner's key (`length_bucket`), unused here
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    num_blocks = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_blocks).to(tl.int64)  # which (batch, head); int64 so bh * T * D cannot overflow
    start_m = pid % num_blocks
    if IS_CAUSAL:
        start_m = num_blocks - 1 - start_m  # longest rows first: the short ones fill the tail of the launch
    Q += bh * T * D
    K += bh * S * D
    V += bh * S * D
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows of this program
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key columns within a tile
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) features (padded to a power of 2)
    row_ok = offs_m < T  # the last block may run past T
    d_ok = offs_d < D
    q_off = offs_m[:, None] * D + offs_d[None, :]
    q = _load_rows(Q + q_off, row_ok, d_ok, True, EVEN_D)  # (BLOCK_M, BLOCK_D), stays on chip

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of exp2(s - m_i) * v

    if IS_CAUSAL:  # T == S; BLOCK_M is a multiple of BLOCK_N
        diag = start_m * BLOCK_M  # keys before the diagonal block: every row of this block sees them all
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, offs_m, offs_n, offs_d, d_ok, S, D, qk_scale,
                                   0, diag, False, False, EVEN_D, DOT_PRECISION, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, offs_m, offs_n, offs_d, d_ok, S, D, qk_scale,
                                   diag, tl.minimum(diag + BLOCK_M, S), True, True, EVEN_D, DOT_PRECISION, BLOCK_N)
    else:
        full = (S // BLOCK_N) * BLOCK_N  # whole key tiles: no bounds mask
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, offs_m, offs_n, offs_d, d_ok, S, D, qk_scale,
                                   0, full, False, False, EVEN_D, DOT_PRECISION, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, offs_m, offs_n, offs_d, d_ok, S, D, qk_scale,
                                   full, S, False, True, EVEN_D, DOT_PRECISION, BLOCK_N)

    acc = acc / l_i[:, None]
    O += bh * T * D
    if EVEN_D:
        tl.store(O + q_off, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(O + q_off, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)  # base 2: lse * ln 2 is the natural one


# ----------------------------------------------------------------------------- forward for Hopper
# The same algorithm for compute capability 9.0 and newer, written so that Triton can overlap the
# softmax with the matrix products (FlashAttention-3's idea, Shah et al. 2024, "FlashAttention-3:
# Fast and Accurate Attention with Asynchrony and Low-precision"):
# - tiles are loaded through tensor descriptors, which Triton lowers to the Tensor Memory Accelerator
#   (TMA, `cp.async.bulk.tensor`): one thread asks for a whole (BLOCK_N, D) tile and the copy engine
#   moves it into shared memory, zero-filling rows past the end of the head;
# - `tl.range(..., warp_specialize=True)` splits the program into a producer warpgroup that only
#   issues those copies and consumer warpgroups that do the tl.dots and the softmax: while one
#   consumer computes exp2, the Tensor Cores work on the other's tile.
# Triton 3.6 and 3.7 do this only for a kernel with ONE such loop and num_warps=4 (then 12 warps
# run: one producer and two consumer warpgroups); with a second loop, or a run-time branch inside
# the loop, the flag is silently dropped (tests/gpu/test_kernels_hopper.py checks the compiled warp
# count). So every tile goes through the one loop, and MASK says which mask every tile applies.
@triton.jit
def _fwd_tiles_ws(
    acc, l_i, m_i, q, desc_k, desc_v, offs_m, S, qk_scale, hi,
    MASK: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """Fold key tiles 0, BLOCK_N, ... < hi into (acc, l_i, m_i); MASK 0: none, 1: keys past S, 2: causal."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = desc_k.load([start_n, 0])  # (BLOCK_N, D) by TMA; rows past S arrive as zeros
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N), not yet scaled
        cols = start_n + offs_n
        if MASK == 2:  # causal (T == S): a key past S is also past every stored row
            s = tl.where(cols[None, :] <= offs_m[:, None], s, float("-inf"))
        elif MASK == 1:  # S is not a multiple of the tile: the zero-filled rows must get no weight
            s = tl.where(cols[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # the scale in the exponent's fused multiply-add
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([start_n, 0])  # (BLOCK_N, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T", "S", "LEN_BUCKET"])
def _attn_fwd_ws(
    Q, K, V, O, LSE,  # as _attn_fwd; every head's rows are D elements apart (D == BLOCK_D)
    T, S, qk_scale,
    LEN_BUCKET,  # max(T, S) rounded up to a power of 2: part of the autotuner's key, unused here
    IS_CAUSAL: tl.constexpr, MASK_KEYS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    num_blocks = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_blocks).to(tl.int64)
    start_m = pid % num_blocks
    if IS_CAUSAL:
        start_m = num_blocks - 1 - start_m  # longest rows first
    # one descriptor per head: the copy engine clips at T (or S) rows, so no tile reads the next head
    desc_q = tl.make_tensor_descriptor(Q + bh * T * BLOCK_D, shape=[T, BLOCK_D], strides=[BLOCK_D, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    desc_o = tl.make_tensor_descriptor(O + bh * T * BLOCK_D, shape=[T, BLOCK_D], strides=[BLOCK_D, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    desc_k = tl.make_tensor_descriptor(K + bh * S * BLOCK_D, shape=[S, BLOCK_D], strides=[BLOCK_D, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    desc_v = tl.make_tensor_descriptor(V + bh * S * BLOCK_D, shape=[S, BLOCK_D], strides=[BLOCK_D, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    q = desc_q.load([start_m * BLOCK_M, 0])  # (BLOCK_M, BLOCK_D), rows past T are zeros
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:  # stop after the diagonal tile; the mask is applied to every tile (see above)
        acc, l_i, m_i = _fwd_tiles_ws(acc, l_i, m_i, q, desc_k, desc_v, offs_m, S, qk_scale,
                                      tl.minimum((start_m + 1) * BLOCK_M, S), 2, BLOCK_N, WARP_SPECIALIZE)
    elif MASK_KEYS:
        acc, l_i, m_i = _fwd_tiles_ws(acc, l_i, m_i, q, desc_k, desc_v, offs_m, S, qk_scale, S, 1, BLOCK_N,
                                      WARP_SPECIALIZE)
    else:
        acc, l_i, m_i = _fwd_tiles_ws(acc, l_i, m_i, q, desc_k, desc_v, offs_m, S, qk_scale, S, 0, BLOCK_N,
                                      WARP_SPECIALIZE)
    acc = acc / l_i[:, None]
    desc_o.store([start_m * BLOCK_M, 0], acc.to(O.dtype.element_ty))  # rows past T are not written
    tl.store(LSE + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_delta(O, DO, DELTA, rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) in float32, (N * T,) rows: one read of O and dO, one write of delta."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_r < rows)[:, None] & (offs_d < D)[None, :]
    off = offs_r[:, None] * D + offs_d[None, :]
    o = tl.load(O + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + offs_r, tl.sum(o * do, 1), mask=offs_r < rows)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, offs_m, offs_d, d_ok, T, D, qk_scale, lo, hi,
    MASK_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Add the query tiles lo, lo + BLOCK_M, ... < hi to dK, dV of one key block.

    Works on transposed tiles (keys along the rows, as dK and dV are): S^T = K Q^T, so that every
    tl.dot takes tiles as they were loaded, never the transpose of a tile computed in registers.
    Rows past T load as zeros (q, dO, lse and delta all 0): their dO = 0 makes every contribution 0.
    """
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        if EVEN_D:
            qT = tl.load(Q + rows[None, :] * D + offs_d[:, None], mask=row_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        else:
            qT = tl.load(Q + rows[None, :] * D + offs_d[:, None], mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        do = _load_rows(DO + rows[:, None] * D + offs_d[None, :], row_ok, d_ok, True, EVEN_D)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)  # (BLOCK_M,) base 2
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)  # rowsum(dO * O)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        pT = tl.math.exp2(sT - lse[None, :])  # recomputed probabilities, no T x S stored
        if MASK_CAUSAL:
            pT = tl.where(offs_n[:, None] <= rows[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_D)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])  # softmax backward, column by column of S^T
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.jit(do_not_specialize=["T", "S", "LEN_BUCKET"])
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    T, S, D, qk_scale, sm_scale, LEN_BUCKET,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per block of keys: dV = sum_i P_i^T dO_i, dK = scale * sum_i dS_i^T Q_i over query blocks.

    Keys past S load as zeros; their dK, dV are computed and never stored.
    """
    num_blocks = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    bh = (pid // num_blocks).to(tl.int64)
    start_n = pid % num_blocks
    Q += bh * T * D
    DO += bh * T * D
    K += bh * S * D
    V += bh * S * D
    LSE += bh * T
    DELTA += bh * T
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < S
    d_ok = offs_d < D
    kv_off = offs_n[:, None] * D + offs_d[None, :]
    k = _load_rows(K + kv_off, col_ok, d_ok, True, EVEN_D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V + kv_off, col_ok, d_ok, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:  # T == S; BLOCK_N is a multiple of BLOCK_M. Queries before this key block never see it.
        diag = start_n * BLOCK_N
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, offs_m, offs_d, d_ok, T, D, qk_scale,
                             diag, tl.minimum(diag + BLOCK_N, T), True, EVEN_D, DOT_PRECISION, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, offs_m, offs_d, d_ok, T, D, qk_scale,
                             diag + BLOCK_N, T, False, EVEN_D, DOT_PRECISION, BLOCK_M)
    else:
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, offs_m, offs_d, d_ok, T, D, qk_scale,
                             0, T, False, EVEN_D, DOT_PRECISION, BLOCK_M)
    DK += bh * S * D
    DV += bh * S * D
    if EVEN_D:
        store_mask = col_ok[:, None]
    else:
        store_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, K, V, offs_m, offs_n, offs_d, d_ok, D, qk_scale, lo, hi,
    MASK_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Add the key tiles lo, lo + BLOCK_N, ... < hi to dQ of one query block.

    Keys past S need no mask here: they load as zeros, so dS @ K adds nothing for them.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_off = cols[:, None] * D + offs_d[None, :]
        col_ok = cols < hi
        k = _load_rows(K + kv_off, col_ok, d_ok, True, EVEN_D)
        v = _load_rows(V + kv_off, col_ok, d_ok, True, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK_CAUSAL:
            p = tl.where(cols[None, :] <= offs_m[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["T", "S", "LEN_BUCKET"])
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    T, S, D, qk_scale, sm_scale, LEN_BUCKET,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per block of queries: dQ = scale * sum_j dS_j K_j over key blocks."""
    num_blocks = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_blocks).to(tl.int64)
    start_m = pid % num_blocks
    if IS_CAUSAL:
        start_m = num_blocks - 1 - start_m  # longest rows first
    Q += bh * T * D
    DO += bh * T * D
    DQ += bh * T * D
    K += bh * S * D
    V += bh * S * D
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    q_off = offs_m[:, None] * D + offs_d[None, :]
    q = _load_rows(Q + q_off, row_ok, d_ok, True, EVEN_D)
    do = _load_rows(DO + q_off, row_ok, d_ok, True, EVEN_D)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:  # BLOCK_M is a multiple of BLOCK_N
        diag = start_m * BLOCK_M
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, offs_m, offs_n, offs_d, d_ok, D, qk_scale,
                       0, diag, False, EVEN_D, DOT_PRECISION, BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, offs_m, offs_n, offs_d, d_ok, D, qk_scale,
                       diag, tl.minimum(diag + BLOCK_M, S), True, EVEN_D, DOT_PRECISION, BLOCK_N)
    else:
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, offs_m, offs_n, offs_d, d_ok, D, qk_scale,
                       0, S, False, EVEN_D, DOT_PRECISION, BLOCK_N)
    if EVEN_D:
        tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- block sizes
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Hopper's wgmma wants 4 or 8 warps and an M tile of
# 64 or more; the causal split needs BLOCK_M % BLOCK_N == 0 (forward, dQ) and BLOCK_N % BLOCK_M
# == 0 (dK/dV). A small set per kernel, timed once per key (BLOCK_D, causal, precision, length
# bucket, dtypes) by the autotuner; the first is the default when autotuning is off. The backward
# configs are those that compile for sm_90 without spilling registers at d_head 64 and 128 (the
# compiled stack frame is 0 bytes; tests/gpu/test_kernels_hopper.py checks it): at d_head 128 the
# earlier (32, 128, 4, 3) dK/dV config kept 680-856 bytes of registers in local memory.
FWD_CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2))
# The Hopper kernel: num_warps=4 is what Triton warp-specializes (12 warps then run, see above).
WS_FWD_CONFIGS = ((128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 2))
DKDV_CONFIGS = ((64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2), (32, 64, 4, 3))
DQ_CONFIGS = ((128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2))
INTERPRETER_CONFIG = (16, 16, 1, 1)  # the interpreter is slow per element: small tiles
TUNED_D = (64, 128)  # the fast path: several configs are timed; other head sizes take the first that fits
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on compute capability 9.0 (227 KiB)
DELTA_ROWS = 64  # rows of O and dO per program of the delta pre-pass


def smem_estimate(kind: str, block_m: int, block_n: int, block_d: int, itemsize: int, stages: int) -> int:
    """Bytes of shared memory a config needs: the streamed tiles times the pipeline depth, plus the resident ones.

    Checked against what Triton 3.6 allocates for sm_90, for every candidate config of every kernel,
    dtype and head size (tests/gpu/test_kernels_hopper.py, COURSE_LIB_HOPPER_SWEEP=1): exact for the
    forward kernel, within 4 KiB for the backward ones. The warp-specialized forward ("fwd_ws") also
    keeps a second buffer for the query tile and the output: 32 KiB more at d_head 128 in bfloat16.
    """
    if kind == "fwd":  # streams K, V tiles; q resident
        return stages * 2 * block_n * block_d * itemsize + block_m * block_d * itemsize
    if kind == "fwd_ws":
        return stages * 2 * block_n * block_d * itemsize + 2 * block_m * block_d * itemsize + 2048
    if kind == "dkdv":  # streams q, dO tiles (and lse, delta rows); k, v resident
        return stages * (2 * block_m * block_d * itemsize + 2 * 4 * block_m) + 2 * block_n * block_d * itemsize
    if kind == "dq":  # streams k, v tiles; q, dO resident
        return stages * 2 * block_n * block_d * itemsize + 2 * block_m * block_d * itemsize + 2 * 4 * block_m
    raise ValueError(f"kind must be 'fwd', 'fwd_ws', 'dkdv' or 'dq'; got {kind!r}")


_TABLES = {"fwd": FWD_CONFIGS, "fwd_ws": WS_FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}


@functools.cache  # every launch asks: a call should not pay for walking the tables again
def candidate_configs(kind: str, block_d: int, itemsize: int, is_causal: bool) -> tuple[tuple[int, int, int, int], ...]:
    """The configs worth timing for one kernel specialisation, best guess first; never empty."""
    table = _TABLES[kind]
    fits = []
    for m, n, warps, stages in table:
        if is_causal and ((kind in ("fwd", "dq") and m % n) or (kind == "dkdv" and n % m)):
            continue
        if smem_estimate(kind, m, n, block_d, itemsize, stages) <= SMEM_LIMIT:
            fits.append((m, n, warps, stages))
    if not fits:  # large float32 heads: the smallest tiles, one stage
        fits = [(32, 32, 4, 1)]
    if itemsize == 4:  # float32 multiplies on the ordinary units (or TF32): small tiles, quick to compile
        return tuple(fits[-1:])
    return tuple(fits if block_d in TUNED_D else fits[:1])


def _prune(kind: str):
    def prune(configs, named_args, **kwargs):
        itemsize = named_args["Q"].element_size()
        wanted = candidate_configs(kind, kwargs["BLOCK_D"], itemsize, kwargs["IS_CAUSAL"])
        chosen = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                  in wanted]
        return chosen

    return prune


def _configs(table) -> list[triton.Config]:
    every = {*table, (32, 32, 4, 1)}
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in sorted(every)]


def length_bucket(T: int, S: int) -> int:
    """The autotuner's length key: max(T, S) rounded up to a power of 2, at least 256.

    The best tiles change with the length (a short sequence has too few programs to fill the
    GPU), so each bucket is tuned once; a length between two already-tuned ones pays nothing.
    """
    return max(256, triton.next_power_of_2(max(T, S)))


_TUNE_KEY = ["BLOCK_D", "IS_CAUSAL", "DOT_PRECISION", "LEN_BUCKET"]  # the autotuner adds the tensors' dtypes


def _autotune(table, kind: str, kernel, key: list[str] = _TUNE_KEY):
    """triton.autotune with the course's key; where Triton can, the choice is also kept on disk across runs."""
    on_disk = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(_configs(table), key=key, prune_configs_by={"early_config_prune": _prune(kind)},
                           **on_disk)(kernel)


_attn_fwd_tuned = _autotune(FWD_CONFIGS, "fwd", _attn_fwd)
_attn_fwd_ws_tuned = _autotune(WS_FWD_CONFIGS, "fwd_ws", _attn_fwd_ws, ["BLOCK_D", "IS_CAUSAL", "LEN_BUCKET"])
_attn_bwd_dkdv_tuned = _autotune(DKDV_CONFIGS, "dkdv", _attn_bwd_dkdv)
_attn_bwd_dq_tuned = _autotune(DQ_CONFIGS, "dq", _attn_bwd_dq)
_TUNED = {"fwd": _attn_fwd_tuned, "fwd_ws": _attn_fwd_ws_tuned, "dkdv": _attn_bwd_dkdv_tuned,
          "dq": _attn_bwd_dq_tuned}


def grid_size(num_heads: int, length: int, block: int) -> tuple[int]:
    """The one-dimensional launch grid: one program per (head, block of `length`)."""
    return (num_heads * triton.cdiv(length, block),)


def autotune_enabled() -> bool:
    """COURSE_LIB_AUTOTUNE=0 takes the first candidate config instead of timing them (tests: fewer compiles)."""
    return os.environ.get("COURSE_LIB_AUTOTUNE", "1") != "0"


def _launch(tuned, plain, kind: str, grid_len: int, N: int, args: tuple, meta: dict, interpret: bool,
            config: tuple[int, int, int, int] | None = None) -> None:
    """Run one kernel: with `config` when given, the interpreter's small tiles, the only candidate (or
    the first, when autotuning is off) directly; otherwise through the autotuner, which times the candidates
    once per key and remembers the fastest."""
    candidates = candidate_configs(kind, meta["BLOCK_D"], args[0].element_size(), meta["IS_CAUSAL"])
    if config is None and interpret:
        config = INTERPRETER_CONFIG
    if config is None and (len(candidates) == 1 or not autotune_enabled()):
        config = candidates[0]
    block = 1 if kind == "dkdv" else 0  # dK/dV programs walk the keys, the others the queries
    if config is not None:
        m, n, warps, stages = config
        plain[grid_size(N, grid_len, (m, n)[block])](*args, **meta, BLOCK_M=m, BLOCK_N=n, num_warps=warps,
                                                     num_stages=stages)
    else:
        tuned[lambda cfg: grid_size(N, grid_len, cfg[("BLOCK_M", "BLOCK_N")[block]])](*args, **meta)


def chosen_configs() -> dict[str, dict[tuple, tuple[int, int, int, int]]]:
    """What the autotuner picked so far, per kernel and key (BLOCK_D, causal, precision, length bucket, dtypes)."""
    return {kind: {key: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   for key, c in tuned.cache.items()} for kind, tuned in _TUNED.items()}


def block_d_for(d_head: int) -> int:
    """The feature tile: d_head padded to a power of 2, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(d_head))


def _meta(q: torch.Tensor, is_causal: bool, precision: str) -> dict:
    D = q.shape[-1]
    block_d = block_d_for(D)
    return {"IS_CAUSAL": is_causal, "DOT_PRECISION": precision, "EVEN_D": D == block_d, "BLOCK_D": block_d}


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the tensor descriptors a program builds on the device (Triton asks per launch)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Kernels that make tensor descriptors on the device need a scratch allocator: torch's, unless one is set."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, precision: str, interpret: bool,
            config: tuple[int, int, int, int] | None = None, variant: str = "portable",
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, T, D), k (N, S, D), v (N, S, D) contiguous -> (out (N, T, D), lse (N, T) float32, base 2).

    variant "portable": `_attn_fwd`, any supported GPU; "hopper": `_attn_fwd_ws` (tensor descriptors,
    warp specialization), for D == BLOCK_D; `course_lib.kernels` chooses (`forward_variant`).
    """
    N, T, D = q.shape
    S = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((N, T), device=q.device, dtype=torch.float32)
    qk_scale = LOG2E / math.sqrt(D)
    if variant == "hopper":
        if not interpret:
            _ensure_allocator()
        # every candidate BLOCK_N divides 128: S % 128 == 0 means whole tiles only (causal masks every tile anyway,
        # and a constant it does not read would only compile it twice)
        meta = {"IS_CAUSAL": is_causal, "MASK_KEYS": not is_causal and S % 128 != 0, "WARP_SPECIALIZE": True,
                "BLOCK_D": D}
        _launch(_attn_fwd_ws_tuned, _attn_fwd_ws, "fwd_ws", T, N, (q, k, v, out, lse, T, S, qk_scale,
                                                                   length_bucket(T, S)), meta, interpret, config)
    else:
        _launch(_attn_fwd_tuned, _attn_fwd, "fwd", T, N, (q, k, v, out, lse, T, S, D, qk_scale, length_bucket(T, S)),
                _meta(q, is_causal, precision), interpret, config)
    return out, lse


def delta(out: torch.Tensor, d_out: torch.Tensor) -> torch.Tensor:
    """(N, T) float32 rowsum(dO * O), in one pass over both (torch would take three: two casts and a product)."""
    N, T, D = out.shape
    result = torch.empty((N, T), device=out.device, dtype=torch.float32)
    _attn_bwd_delta[(triton.cdiv(N * T, DELTA_ROWS),)](out, d_out, result, N * T, D, BLOCK_R=DELTA_ROWS,
                                                       BLOCK_D=block_d_for(D))
    return result


def backward(q, k, v, out, lse, d_out, is_causal: bool, precision: str, interpret: bool,
             configs: tuple[tuple[int, int, int, int] | None, tuple[int, int, int, int] | None] = (None, None),
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients from the saved log-sum-exp: P is recomputed tile by tile, never stored."""
    N, T, D = q.shape
    S = k.shape[1]
    d_out = d_out.contiguous()
    row_dot = delta(out, d_out)  # (N, T): rowsum(dO * O) = rowsum(dP * P)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    sm_scale = 1.0 / math.sqrt(D)
    meta = _meta(q, is_causal, precision)
    bucket = length_bucket(T, S)
    _launch(_attn_bwd_dkdv_tuned, _attn_bwd_dkdv, "dkdv", S, N,
            (q, k, v, d_out, lse, row_dot, dk, dv, T, S, D, sm_scale * LOG2E, sm_scale, bucket), meta, interpret,
            configs[0])
    _launch(_attn_bwd_dq_tuned, _attn_bwd_dq, "dq", T, N,
            (q, k, v, d_out, lse, row_dot, dq, T, S, D, sm_scale * LOG2E, sm_scale, bucket), meta, interpret,
            configs[1])
    return dq, dk, dv
