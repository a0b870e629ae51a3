"""FlashAttention-style kernels in Triton: a tiled forward pass and a tiled backward pass.

Imported only through `course_lib.kernels` (which decides whether Triton runs compiled on a GPU
or in its CPU interpreter before this module, and so triton, is imported).

Layout: q (N, T, D), k (N, S, D), v (N, S, D), contiguous, N = batch * heads; one program
handles one block of BLOCK_M queries of one (batch, head). D is padded to BLOCK_D, a power of 2.
Every tl.dot accumulates in float32, whatever the input dtype (float16, bfloat16 or float32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,  # pointers; LSE (N, T) float32 saves log-sum-exp of each score row for backward
    T, S, D,  # sizes (runtime ints)
    scale,  # 1 / sqrt(D)
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0)  # which block of queries
    bh = tl.program_id(1)  # which (batch, head)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows of this program
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key columns within a block
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) features (padded to a power of 2)
    row_ok = offs_m < T  # the last block may run past T
    d_ok = offs_d < D

    q_ptrs = Q + bh * T * D + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D), stays on chip
    qk_scale = scale * 1.4426950408889634  # fold 1/sqrt(D) and log2(e) into one multiply: use exp2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of exp2(s - m_i) * v

    # Causal: keys after the last query of this block are never needed; skip those blocks entirely.
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        col_ok = cols < S
        kv_off = bh * S * D + cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) float32 scores, base-2 units
        keep = col_ok[None, :]  # keys past S do not exist
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,) finite: every row sees key 0 in block 0
        alpha = tl.math.exp2(m_i - m_new)  # rescale what was accumulated under the old max
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # p in v's dtype feeds the tensor cores
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + bh * T * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # log-sum-exp in natural-log units: lse = (m + log2(l)) / log2(e)
    tl.store(LSE + bh * T + offs_m, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    T, S, D, scale,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per block of keys: dV = sum_i P_i^T dO_i, dK = scale * sum_i dS_i^T Q_i over query blocks."""
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < S
    d_ok = offs_d < D
    kv_off = bh * S * D + offs_n[:, None] * D + offs_d[None, :]
    k = tl.load(K + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:  # queries before this key block never see it: start at the query block holding row start_n * BLOCK_N
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, T, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        q_off = bh * T * D + rows[:, None] * D + offs_d[None, :]
        q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)  # rowsum(dO * O)
        s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_M, BLOCK_N)
        keep = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= rows[:, None])
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)  # recomputed probabilities, no T x S stored
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # softmax backward, row by row
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    T, S, D, scale,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per block of queries: dQ = scale * sum_j dS_j K_j over key blocks."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    q_off = bh * T * D + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        kv_off = bh * S * D + cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        keep = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _block_sizes(D: int, device: torch.device, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small tiles in the interpreter (it is slow per element)."""
    if interpret or device.type != "cuda":
        return 16, 16, 1, 1
    if D <= 64:
        return 128, 64, 4, 3
    return 128, 32, 8, 2


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, interpret: bool):
    """q (N, T, D), k (N, S, D), v (N, S, D) contiguous -> (out (N, T, D), lse (N, T) float32)."""
    N, T, D = q.shape
    S = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((N, T), device=q.device, dtype=torch.float32)
    block_m, block_n, warps, stages = _block_sizes(D, q.device, interpret)
    grid = (triton.cdiv(T, block_m), N)
    _attn_fwd[grid](
        q, k, v, out, lse, T, S, D, 1.0 / math.sqrt(D),
        IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def backward(q, k, v, out, lse, d_out, is_causal: bool, interpret: bool):
    """Gradients from the saved log-sum-exp: P is recomputed tile by tile, never stored."""
    N, T, D = q.shape
    S = k.shape[1]
    d_out = d_out.contiguous()
    delta = (d_out.float() * out.float()).sum(-1)  # (N, T): rowsum(dO * O) = rowsum(dP * P)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_m, block_n, warps, stages = _block_sizes(D, q.device, interpret)
    if not interpret and q.device.type == "cuda":
        block_m, block_n = 64, 64 if D <= 64 else 32
    block_d = max(16, triton.next_power_of_2(D))
    scale = 1.0 / math.sqrt(D)
    common = dict(IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  num_warps=warps, num_stages=stages)
    _attn_bwd_dkdv[(triton.cdiv(S, block_n), N)](q, k, v, d_out, lse, delta, dk, dv, T, S, D, scale, **common)
    _attn_bwd_dq[(triton.cdiv(T, block_m), N)](q, k, v, d_out, lse, delta, dq, T, S, D, scale, **common)
    return dq, dk, dv
