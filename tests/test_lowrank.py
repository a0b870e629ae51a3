"""Spectrum functions and the Linformer-style approximation: exact at full rank, honest FLOP counts."""

import numpy as np
import pytest

from course_lib import lowrank
from course_lib.bench.attention import attention_flops
from course_lib.numpy_ref import scaled_dot_product_attention
from course_lib.precision import relative_error


def _qkv(seed=0, T=12, S=16, d=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, T, d)), rng.standard_normal((2, S, d)), rng.standard_normal((2, S, 3))


def test_singular_values_and_rank_of_a_product_through_d_dimensions():
    q, k, _ = _qkv()
    sv = lowrank.singular_values(q @ np.swapaxes(k, -1, -2))  # (2, 12): rank <= d = 4
    assert sv.shape == (2, 12)
    assert np.all(np.diff(sv, axis=-1) <= 1e-12)
    assert np.all(sv[:, 4:] < 1e-10 * sv[:, :1])
    assert np.all(lowrank.rank_for_energy(sv, 1.0) <= 4)


def test_rank_for_energy_counts_the_leading_singular_values():
    sv = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert lowrank.rank_for_energy(sv, 0.5) == 1
    assert lowrank.rank_for_energy(sv, 13 / 14) == 2
    assert lowrank.rank_for_energy(sv, 0.99) == 3
    with pytest.raises(ValueError, match="energy"):
        lowrank.rank_for_energy(sv, 1.5)


def test_full_rank_approximations_are_exact():
    q, k, v = _qkv()
    exact, weights = scaled_dot_product_attention(q, k, v)
    S = k.shape[-2]
    np.testing.assert_allclose(lowrank.linformer_attention(q, k, v, np.eye(S)), exact, atol=1e-12)
    np.testing.assert_allclose(lowrank.pooled_attention(q, k, v, S), exact, atol=1e-12)
    np.testing.assert_allclose(lowrank.truncated_svd_attention(weights, v, 12), exact, atol=1e-12)


def test_truncated_svd_error_falls_with_rank_and_bounds_pooling():
    q, k, v = _qkv(1, T=20, S=20)
    exact, weights = scaled_dot_product_attention(q, k, v)
    svd_err = [relative_error(lowrank.truncated_svd_attention(weights, v, r), exact) for r in (2, 5, 10, 20)]
    assert all(a >= b - 1e-12 for a, b in zip(svd_err, svd_err[1:], strict=False)) and svd_err[-1] < 1e-10
    pooled = relative_error(lowrank.pooled_attention(q, k, v, 5), exact)
    assert pooled > 0.0


def test_projections_shapes_and_bad_input():
    assert lowrank.random_projection(3, 10).shape == (3, 10)
    pool = lowrank.mean_pool_projection(3, 10)
    np.testing.assert_allclose(pool.sum(axis=1), 1.0)
    assert ((pool > 0).sum(axis=0) == 1).all()  # every position in exactly one segment
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="projection"):
        lowrank.linformer_attention(q, k, v, np.ones((3, 7)))
    with pytest.raises(ValueError, match="rank"):
        lowrank.mean_pool_projection(11, 10)
    with pytest.raises(ValueError, match="at least 2"):
        lowrank.singular_values(np.ones(3))


def test_flop_counts():
    assert lowrank.linformer_flops(T=4, S=6, d=8, rank=2) == 2 * 2 * 6 * 16 + 2 * 4 * 2 * 16
    # the break-even rank for T = S: k (S + T) = T S  ->  k = T / 2
    T = 512
    assert lowrank.linformer_flops(T, T, 64, T // 2) == attention_flops(1, 1, T, T, 64)
