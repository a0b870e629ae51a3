"""Per-head statistics of attention patterns: what does each head look at?

All functions take attention weights shaped (..., H, T, S) (rows sum to 1; e.g. one layer's
(B, H, T, T) from `output_attentions=True`) and return one number per head, shaped (..., H) with the
batch axis averaged away when `average_batch=True` (the default for 4-D input). `summarize` takes a
per-layer list (what Hugging Face models and bertviz use) and returns (L, H) arrays.

    entropy            mean over query rows of -sum_s a_ts log a_ts (nats); 0 = one-hot, log S = uniform
    diagonality        mean weight a_tt on the query's own position
    previous_token     mean weight a_{t,t-1} (rows t >= 1)
    locality           mean weight within |t - s| <= window
    mean_distance      mean over rows of sum_s a_ts |t - s|
    sink_score         mean weight on given key positions (e.g. [CLS] = 0 and [SEP] = T-1)
    head_similarity    (N, N) cosine similarity between heads' flattened patterns

`spearman` compares two per-head scores by rank (e.g. an importance estimate against the measured
loss increase when each head is removed).

Weights are converted to float64 numpy arrays, so the results do not depend on the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["entropy", "diagonality", "previous_token", "locality", "mean_distance", "sink_score",
           "head_similarity", "summarize", "as_numpy_attention", "rankdata", "spearman"]


def as_numpy_attention(weights, name: str = "weights") -> np.ndarray:
    """float64 array (..., H, T, S); rejects wrong rank and rows that do not sum to 1 (or 0 for masked rows)."""
    if hasattr(weights, "detach"):
        weights = weights.detach().cpu().double().numpy()
    a = np.asarray(weights, dtype=np.float64)
    if a.ndim < 3:
        raise ValueError(f"{name} must have shape (..., H, T, S) (at least 3-D); got shape {a.shape}")
    if (a < -1e-6).any():
        raise ValueError(f"{name} must be attention weights (non-negative); found {a.min():.3g}")
    sums = a.sum(-1)
    if not np.all(np.isclose(sums, 1.0, atol=1e-3) | np.isclose(sums, 0.0, atol=1e-6)):
        raise ValueError(f"{name} rows must sum to 1 (softmax output over the last axis); "
                         f"found row sums between {sums.min():.4g} and {sums.max():.4g}")
    return a


def _reduce(per_row: np.ndarray, average_batch: bool) -> np.ndarray:
    """per_row (..., H, T) -> mean over T, then over leading batch axes if asked: (H,) or (..., H)."""
    out = per_row.mean(-1)
    if average_batch and out.ndim > 1:
        out = out.reshape(-1, out.shape[-1]).mean(0)
    return out


def entropy(weights, average_batch: bool = True) -> np.ndarray:
    """Mean row entropy in nats, (H,): 0 for one-hot rows, log(S) for uniform rows."""
    a = as_numpy_attention(weights)
    terms = np.where(a > 0, -a * np.log(np.where(a > 0, a, 1.0)), 0.0)  # 0 log 0 = 0
    return _reduce(terms.sum(-1), average_batch)


def _offset_weight(a: np.ndarray, offset: int) -> np.ndarray:
    """a (..., H, T, S) -> weight on key s = t - offset, per row (..., H, T'); rows where s is out of range dropped."""
    T, S = a.shape[-2:]
    rows = np.arange(T)
    cols = rows - offset
    keep = (cols >= 0) & (cols < S)
    return a[..., rows[keep], cols[keep]]


def diagonality(weights, average_batch: bool = True) -> np.ndarray:
    """Mean weight on the query's own position a_tt, (H,)."""
    return _reduce(_offset_weight(as_numpy_attention(weights), 0), average_batch)


def previous_token(weights, average_batch: bool = True) -> np.ndarray:
    """Mean weight on the previous position a_{t,t-1} over rows t >= 1, (H,)."""
    return _reduce(_offset_weight(as_numpy_attention(weights), 1), average_batch)


def _distance(T: int, S: int) -> np.ndarray:
    return np.abs(np.arange(T)[:, None] - np.arange(S)[None, :]).astype(np.float64)  # (T, S)


def locality(weights, window: int = 1, average_batch: bool = True) -> np.ndarray:
    """Mean attention mass within |t - s| <= window, (H,)."""
    a = as_numpy_attention(weights)
    near = _distance(*a.shape[-2:]) <= window
    return _reduce((a * near).sum(-1), average_batch)


def mean_distance(weights, average_batch: bool = True) -> np.ndarray:
    """Mean over rows of the expected distance sum_s a_ts |t - s|, (H,)."""
    a = as_numpy_attention(weights)
    return _reduce((a * _distance(*a.shape[-2:])).sum(-1), average_batch)


def sink_score(weights, positions: Sequence[int] = (0, -1), average_batch: bool = True) -> np.ndarray:
    """Mean attention mass on the given key positions (default the first and last: [CLS] and [SEP]), (H,)."""
    a = as_numpy_attention(weights)
    S = a.shape[-1]
    cols = sorted({p % S for p in positions})
    return _reduce(a[..., cols].sum(-1), average_batch)


def head_similarity(weights) -> np.ndarray:
    """Cosine similarity between heads' patterns, (N, N) over the N heads on the axis before (T, S).

    weights (..., N, T, S): leading axes are treated as examples and flattened into the pattern, so
    two heads are similar when they attend alike on every example. For several layers, stack them
    as heads first: e.g. np.concatenate over layers along the head axis gives (L*H, L*H).
    """
    a = as_numpy_attention(weights)
    N = a.shape[-3]
    flat = np.moveaxis(a, -3, 0).reshape(N, -1)  # (N, examples * T * S)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def summarize(attentions: Sequence, window: int = 1, sink_positions: Sequence[int] = (0, -1)) -> dict[str, np.ndarray]:
    """attentions: per-layer list of (B, H, T, S) -> {statistic: (L, H) array}."""
    if len(attentions) == 0:
        raise ValueError("attentions must be a non-empty per-layer list of (B, H, T, S) weights")
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("entropy", "diagonality", "previous_token", "locality",
                                                          "mean_distance", "sink")}
    for layer in attentions:
        a = as_numpy_attention(layer, name="attentions[layer]")
        rows["entropy"].append(entropy(a))
        rows["diagonality"].append(diagonality(a))
        rows["previous_token"].append(previous_token(a))
        rows["locality"].append(locality(a, window))
        rows["mean_distance"].append(mean_distance(a))
        rows["sink"].append(sink_score(a, sink_positions))
    return {k: np.stack(v) for k, v in rows.items()}


def rankdata(values) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (as in scipy.stats.rankdata)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"values must be a non-empty 1-D array of finite numbers; got shape {v.shape}")
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(1, v.size + 1)
    for value in np.unique(v):  # average the ranks of ties
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equally long score vectors (flattened): Pearson's r of their ranks."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"a and b must hold the same number (>= 2) of scores; got {a.size} and {b.size}")
    ra, rb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (b.size + 1) / 2
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    if denom == 0:
        raise ValueError("spearman is undefined when every score of a (or of b) is the same")
    return float((ra * rb).sum() / denom)
