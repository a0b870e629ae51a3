"""Matrix decomposition and attention: how low-rank are attention matrices, and what does a low-rank shortcut cost?

Three questions, kept apart:
- Spectrum: the scores Q K^T of one head have rank <= d_head (a product through d_head
  dimensions); the weights P = softmax(Q K^T / sqrt(d)) need not (exp is applied entry by
  entry). `singular_values` and `rank_for_energy` measure both.
- Fitting: `score_matrix_rank` of (x W_q)(x W_k)^T, and `fit_attention_weights`, which trains one
  head's W_q, W_k (d_head columns) to reproduce a target attention matrix (notebook 07);
  `pattern_agreement` scores a fit by KL, by the mass on the target's key and by argmax agreement, and
  `circle_construction` builds a d_head = 2 head that attends to any chosen key per query.
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
    "fit_attention_weights",
    "one_to_one_target",
    "pattern_agreement",
    "circle_construction",
    "head_attention",
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

    Exact attention, for comparison, is `course_lib.cost.flops.attention_flops(1, 1, T, S, d)`
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


def _check_target(target: torch.Tensor, x: torch.Tensor) -> None:
    T = x.shape[0]
    if not (x.dtype.is_floating_point and target.dtype.is_floating_point):
        raise TypeError(f"x and target must be floating-point tensors; got x {x.dtype}, target {target.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape (T, d_model); got {tuple(x.shape)}")
    if target.shape != (T, T):
        raise ValueError(f"target must have shape (T, T) = ({T}, {T}); got {tuple(target.shape)}")


def fit_attention_weights(target: torch.Tensor, x: torch.Tensor, d_head: int, steps: int = 300, lr: float = 0.05,
                          seed: int = 0) -> torch.Tensor:
    """Fit one head's W_q, W_k (d_model, d_head) by Adam on the mean KL(target || fitted) per row, and return
    the fitted attention matrix softmax(x W_q (x W_k)^T / sqrt(d_head)), (T, T).

    The logits are a rank <= d_head matrix, so targets that need a high-rank logit matrix cannot be fitted
    when d_head is small, however long we train.

    The weights start from the same float32 draw whatever x's dtype, then train in x's dtype, with the
    learning rate decaying from `lr` to 0 (cosine). Adam at a constant rate keeps moving, and where it is
    after `steps` steps then depends on the last bits of the arithmetic, which differ between CPUs; with
    the decay each fit comes to rest, and in float64 the result is the same on every CPU to far more
    digits than a table prints.
    """
    _check_target(target, x)
    check_positive_int("d_head", d_head)
    check_positive_int("steps", steps)
    d_model = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    w_q = (torch.randn(d_model, d_head, generator=g) / math.sqrt(d_model)).to(x.dtype).requires_grad_(True)
    w_k = (torch.randn(d_model, d_head, generator=g) / math.sqrt(d_model)).to(x.dtype).requires_grad_(True)
    opt = torch.optim.Adam([w_q, w_k], lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    log_target = torch.log(target.clamp_min(1e-12))
    for _ in range(steps):
        log_p = torch.log_softmax((x @ w_q) @ (x @ w_k).T / math.sqrt(d_head), dim=-1)  # (T, T)
        kl = (target * (log_target - log_p)).sum(-1).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
        decay.step()
    with torch.no_grad():
        return torch.softmax((x @ w_q) @ (x @ w_k).T / math.sqrt(d_head), dim=-1)


def fit_attention_pattern(target: torch.Tensor, x: torch.Tensor, d_head: int, steps: int = 300, lr: float = 0.05,
                          seed: int = 0) -> float:
    """`fit_attention_weights`, scored: the final mean KL(target || fitted) per row, in nats."""
    return pattern_agreement(target, fit_attention_weights(target, x, d_head, steps, lr, seed))["kl"]


def one_to_one_target(keys: torch.Tensor, floor: float = 0.03) -> torch.Tensor:
    """(T, T) attention target: row t puts 1 - floor on key keys[t] and spreads `floor` uniformly over all T keys.

    keys (T,) integer: torch.randperm(T) gives a random one-to-one matching, (arange(T) - o) % T the
    fixed offset o ("read the token o positions back", with wrap-around).
    """
    if keys.ndim != 1 or keys.dtype.is_floating_point:
        raise ValueError(f"keys must be a 1-D integer tensor (T,); got {keys.dtype} {tuple(keys.shape)}")
    T = keys.shape[0]
    if int(keys.min()) < 0 or int(keys.max()) >= T:
        raise ValueError(f"keys must lie in [0, {T}); got values in [{int(keys.min())}, {int(keys.max())}]")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must be in [0, 1); got {floor!r}")
    return torch.eye(T)[keys] * (1.0 - floor) + floor / T


def pattern_agreement(target: torch.Tensor, fitted: torch.Tensor) -> dict[str, float]:
    """How well a fitted attention matrix (T, S) reproduces a target (T, S), three ways, each a mean over rows:

        kl                KL(target || fitted) in nats (the whole distribution, floor included)
        target_mass       the weight `fitted` puts on the target's most-attended key
        argmax_agreement  the fraction of rows whose most-attended key is the target's
    """
    if target.shape != fitted.shape or target.ndim != 2:
        raise ValueError(f"target and fitted must be (T, S) matrices of one shape; got {tuple(target.shape)} "
                         f"and {tuple(fitted.shape)}")
    target, fitted = target.double(), fitted.double()
    kl = (target * (torch.log(target.clamp_min(1e-12)) - torch.log(fitted.clamp_min(1e-300)))).sum(-1).mean()
    best = target.argmax(-1)  # (T,)
    mass = fitted.gather(-1, best[:, None]).mean()
    agree = (fitted.argmax(-1) == best).double().mean()
    return {"kl": float(kl), "target_mass": float(mass), "argmax_agreement": float(agree)}


def circle_construction(x: torch.Tensor, keys: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A d_head = 2 head whose row t attends most to key keys[t], for ANY map t -> keys[t].

    Key s sits on the unit circle at angle 2 pi s / T; query t points at key keys[t] with length `scale`,
    so q_t . k_s = scale cos(angle(keys[t]) - angle(s)) peaks at s = keys[t]. W_q, W_k (d_model, 2) are
    solved from x (T, d_model) by least squares, exactly when x has rank T. Returns (w_q, w_k); the scores
    (x w_q)(x w_k)^T have rank 2. The gap to the next key is scale (1 - cos(2 pi / T)), so the mass on
    the right key grows with `scale`: rank 2 fixes which key wins, not how sharply.
    """
    _check_target(torch.zeros(x.shape[0], x.shape[0]), x)
    T = x.shape[0]
    if keys.shape != (T,) or keys.dtype.is_floating_point:
        raise ValueError(f"keys must be an integer tensor of shape ({T},); got {keys.dtype} {tuple(keys.shape)}")
    angle = 2 * math.pi * torch.arange(T, dtype=torch.float64) / T  # (T,)
    k = torch.stack([angle.cos(), angle.sin()], -1)  # (T, 2)
    q = scale * k[keys]  # (T, 2): query t points at its key
    xd = x.double()
    w_q = torch.linalg.lstsq(xd, q).solution  # (d_model, 2)
    w_k = torch.linalg.lstsq(xd, k * math.sqrt(2)).solution  # sqrt(2) undoes the 1/sqrt(d_head) of attention
    return w_q.to(x.dtype), w_k.to(x.dtype)


def head_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """One head's weights softmax((x W_q)(x W_k)^T / sqrt(d_head)), (T, T)."""
    return torch.softmax((x @ w_q) @ (x @ w_k).T / math.sqrt(w_q.shape[1]), dim=-1)
