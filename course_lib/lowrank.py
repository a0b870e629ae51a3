"""Matrix decomposition and attention: how low-rank are attention matrices, and what does a low-rank shortcut cost?

Two questions, kept apart:
- Spectrum: the scores Q K^T of one head have rank <= d_head (a product through d_head
  dimensions); the weights P = softmax(Q K^T / sqrt(d)) need not (exp is applied entry by
  entry). `singular_values` and `rank_for_energy` measure both.
- Shortcut: Linformer (Wang et al. 2020) projects the S keys and values down to k rows,
  K' = E K, V' = E V with E (k, S), and attends over those: cost O(T k d) instead of O(T S d).
  `linformer_attention` does it in numpy; `truncated_svd_attention` is the best any rank-k
  weight matrix can do (Eckart-Young), a bound, not a speed-up (it needs the full P first).
"""

from __future__ import annotations

import numpy as np

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
    "relative_error",
    "linformer_flops",
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


def relative_error(approx: np.ndarray, exact: np.ndarray, per_matrix: bool = False) -> float | np.ndarray:
    """||approx - exact||_F / ||exact||_F, over everything, or per matrix (last two axes) if per_matrix."""
    exact = np.asarray(exact, dtype=np.float64)
    diff = np.asarray(approx, dtype=np.float64) - exact
    if per_matrix:
        return np.linalg.norm(diff, axis=(-2, -1)) / np.linalg.norm(exact, axis=(-2, -1))
    return float(np.linalg.norm(diff) / np.linalg.norm(exact))


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
