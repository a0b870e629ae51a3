"""Matrix decomposition and attention: how low-rank are attention matrices, and what does a low-rank shortcut cost?

Three questions, kept apart:
- Spectrum: the scores Q K^T of one head have rank <= d_head (a product through d_head
  dimensions); the weights P = softmax(Q K^T / sqrt(d)) need not (exp is applied entry by
  entry). `singular_values` and `rank_for_energy` measure both.
- Fitting: `score_matrix_rank` of (x W_q)(x W_k)^T, and `fit_attention_pattern`, which trains one
  head's W_q, W_k (d_head columns) to reproduce a target attention matrix (notebook 07).
- Shortcut: Linformer (Wang et al. 2020) projects the S keys and values down to k rows,
  K' = E K, V' = E V with E (k, S), and attends over those: cost O(T k d) instead of O(T S d).
  `linformer_attention` does it in numpy; `truncated_svd_attention` is the best any rank-k
  weight matrix can do (Eckart-Young), a bound, not a speed-up (it needs the full P first).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from course_lib._validate import check_positive_int, shape_str
from course_lib.numpy_ref import scaled_dot_product_attention, softmax

__all__ = [
    "singular_values",
    "rank_for_energy",
    "random_projection",
    "mean_pool_projection",
    "linformer_attention",
    "pooled_attention",
    "exact_attention",
    "truncated_svd_attention",
    "linformer_flops",
    "score_matrix_rank",
    "fit_attention_pattern",
]


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """Singular values of the last two axes, largest first: (..., min(T, S))."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim < 2:
        raise ValueError(f"matrix must have at least 2 dimensions (..., T, S); got shape {shape_str(matrix.shape)}")
    return np.linalg.svd(matrix, compute_uv=False)


def rank_for_energy(sv: np.ndarray, energy: float = 0.99) -> np.ndarray:
    """Smallest k whose top-k singular values hold `energy` of sum(sigma^2) (the squared Frobenius norm).

    A rank-k truncation then has relative Frobenius error sqrt(1 - energy) at most.
    sv (..., n) sorted descending, as from `singular_values`; returns ints of shape (...).
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy!r}")
    sq = np.asarray(sv, dtype=np.float64) ** 2
    cum = np.cumsum(sq, axis=-1) / np.maximum(sq.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
    return np.argmax(cum >= energy - 1e-12, axis=-1) + 1


def random_projection(rank: int, length: int, seed: int = 0) -> np.ndarray:
    """(rank, length) Gaussian matrix scaled by 1/sqrt(rank) (Johnson-Lindenstrauss; Linformer's initialisation)."""
    rank, length = check_positive_int("rank", rank), check_positive_int("length", length)
    return np.random.default_rng(seed).standard_normal((rank, length)) / np.sqrt(rank)


def mean_pool_projection(rank: int, length: int) -> np.ndarray:
    """(rank, length) matrix averaging `length` positions into `rank` contiguous segments (sequence pooling).

    Each row sums to 1, so the pooled keys and values are averages; softmax over a pooled key
    is then weighted by the segment size (log of the count added to its score) so that
    rank == length gives exact attention.
    """
    rank, length = check_positive_int("rank", rank), check_positive_int("length", length)
    if rank > length:
        raise ValueError(f"rank must be <= length to pool; got rank={rank}, length={length}")
    edges = np.linspace(0, length, rank + 1).round().astype(int)
    proj = np.zeros((rank, length))
    for r in range(rank):
        proj[r, edges[r] : edges[r + 1]] = 1.0 / (edges[r + 1] - edges[r])
    return proj


def linformer_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, projection: np.ndarray,
                        key_bias: np.ndarray | None = None) -> np.ndarray:
    """softmax(q (E k)^T / sqrt(d) + key_bias) (E v): attention over `rank` projected keys/values.

    q (..., T, d), k (..., S, d), v (..., S, d_v), projection E (rank, S) (shared by keys and
    values, as in Linformer's 'shared' variant); key_bias (rank,) is added to the projected
    scores (log segment sizes for mean pooling). Returns (..., T, d_v). Cost: 2*rank*S*(d + d_v)
    to project, 2*T*rank*(d + d_v) to attend.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    projection = np.asarray(projection, dtype=np.float64)
    if projection.ndim != 2 or projection.shape[1] != k.shape[-2]:
        raise ValueError(f"projection must have shape (rank, S) with S={k.shape[-2]} (keys); "
                         f"got {shape_str(projection.shape)}")
    k_small = projection @ k  # (..., rank, d)
    v_small = projection @ v  # (..., rank, d_v)
    scores = q @ np.swapaxes(k_small, -1, -2) / np.sqrt(q.shape[-1])  # (..., T, rank)
    if key_bias is not None:
        scores = scores + np.asarray(key_bias, dtype=np.float64)
    return softmax(scores, axis=-1) @ v_small  # (..., T, d_v)


def pooled_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, rank: int) -> np.ndarray:
    """Linformer with mean pooling of contiguous segments; exact when rank == S."""
    S = k.shape[-2]
    proj = mean_pool_projection(rank, S)
    counts = (proj > 0).sum(axis=1)
    return linformer_attention(q, k, v, proj, key_bias=np.log(counts))


def truncated_svd_attention(weights: np.ndarray, v: np.ndarray, rank: int | list[int]) -> np.ndarray | list[np.ndarray]:
    """P_k v with P_k the best rank-k approximation of the weights P (..., T, S): the floor for any rank-k P.

    rank may be a list of ranks: the SVD is then computed once and one output returned per rank.
    """
    ranks = [rank] if isinstance(rank, int) else list(rank)
    for r in ranks:
        check_positive_int("rank", r)
    u, s, vt = np.linalg.svd(np.asarray(weights, dtype=np.float64), full_matrices=False)
    v = np.asarray(v, dtype=np.float64)
    outs = [((u[..., :, :r] * s[..., None, :r]) @ vt[..., :r, :]) @ v for r in ranks]  # (..., T, d_v) each
    return outs[0] if isinstance(rank, int) else outs




def linformer_flops(T: int, S: int, d: int, rank: int, d_v: int | None = None) -> int:
    """Projecting k and v (2 rank S (d + d_v)) plus attending over rank keys (2 T rank (d + d_v)).

    Exact attention, for comparison, is `course_lib.bench.attention.attention_flops(1, 1, T, S, d)`
    per head (4 T S d when d_v = d).
    """
    d_v = d if d_v is None else d_v
    return 2 * rank * S * (d + d_v) + 2 * T * rank * (d + d_v)


def exact_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Convenience: the exact output (..., T, d_v), from the numpy reference."""
    return scaled_dot_product_attention(q, k, v)[0]


# ----------------------------------------------------------------------------- one head's rank, fitted (notebook 07)
def score_matrix_rank(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, tol: float = 1e-5) -> int:
    """Numerical rank of Q K^T = (x W_q)(x W_k)^T, x (T, d_model), W (d_model, d_head): at most d_head."""
    scores = (x @ w_q) @ (x @ w_k).T  # (T, T)
    s = torch.linalg.svdvals(scores.double())
    return int((s > tol * s[0]).sum())


def fit_attention_pattern(target: torch.Tensor, x: torch.Tensor, d_head: int, steps: int = 300, lr: float = 0.05,
                          seed: int = 0) -> float:
    """Fit one head's W_q, W_k (d_model, d_head) so that softmax(x W_q (x W_k)^T / sqrt(d_head)) matches a
    target attention matrix (T, T); return the final mean KL(target || fitted) per row, in nats.

    The logits are a rank <= d_head matrix, so targets that need a high-rank logit matrix cannot be fitted
    when d_head is small, however long we train.
    """
    T, d_model = x.shape
    if target.shape != (T, T):
        raise ValueError(f"target must have shape (T, T) = ({T}, {T}); got {tuple(target.shape)}")
    g = torch.Generator().manual_seed(seed)
    w_q = (torch.randn(d_model, d_head, generator=g) / math.sqrt(d_model)).requires_grad_(True)
    w_k = (torch.randn(d_model, d_head, generator=g) / math.sqrt(d_model)).requires_grad_(True)
    opt = torch.optim.Adam([w_q, w_k], lr=lr)
    log_target = torch.log(target.clamp_min(1e-12))
    for _ in range(steps):
        log_p = torch.log_softmax((x @ w_q) @ (x @ w_k).T / math.sqrt(d_head), dim=-1)
        kl = (target * (log_target - log_p)).sum(-1).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
    with torch.no_grad():
        log_p = torch.log_softmax((x @ w_q) @ (x @ w_k).T / math.sqrt(d_head), dim=-1)
        return float((target * (log_target - log_p)).sum(-1).mean())
