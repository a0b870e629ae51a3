"""Spectrum functions and the Linformer-style approximation: exact at full rank, honest FLOP counts."""

import numpy as np
import pytest

from course_lib.cost.flops import attention_flops
from course_lib.experiments import lowrank
from course_lib.experiments.precision import relative_error
from course_lib.numpy_ref import scaled_dot_product_attention


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


# ----------------------------------------------------------------------------- one head fitting a pattern (notebook 07)
def test_one_to_one_targets_and_the_three_scores():
    import torch

    keys = torch.tensor([2, 0, 3, 1])
    target = lowrank.one_to_one_target(keys, floor=0.2)
    torch.testing.assert_close(target.sum(-1), torch.ones(4))
    assert target.argmax(-1).tolist() == keys.tolist() and abs(float(target[0, 2]) - 0.85) < 1e-6
    exact = lowrank.pattern_agreement(target, target)
    assert exact["kl"] < 1e-9 and exact["argmax_agreement"] == 1.0 and abs(exact["target_mass"] - 0.85) < 1e-6
    # a one-hot fit picks every right key but pays for the floor in KL: the confound the scores separate
    onehot = lowrank.pattern_agreement(target, torch.eye(4)[keys] * (1 - 1e-6) + 1e-6 / 4)
    assert onehot["argmax_agreement"] == 1.0 and onehot["target_mass"] > 0.99 and onehot["kl"] > 1.0
    wrong = lowrank.pattern_agreement(target, torch.eye(4)[keys.roll(1)])
    assert wrong["argmax_agreement"] == 0.0 and wrong["target_mass"] == 0.0
    with pytest.raises(ValueError, match="keys must lie"):
        lowrank.one_to_one_target(torch.tensor([0, 4, 1, 2]))
    with pytest.raises(ValueError, match="floor"):
        lowrank.one_to_one_target(keys, floor=1.0)
    with pytest.raises(ValueError, match="one shape"):
        lowrank.pattern_agreement(target, target[:3])


def test_a_rank_two_head_picks_any_key_and_sharpens_with_scale():
    import torch

    g = torch.Generator().manual_seed(0)
    T = 12
    x = torch.randn(T, 20, generator=g, dtype=torch.float64)
    keys = torch.randperm(T, generator=g)
    target = lowrank.one_to_one_target(keys)
    masses = []
    for scale in (5.0, 50.0, 500.0):
        w_q, w_k = lowrank.circle_construction(x, keys, scale)
        assert w_q.shape == (20, 2) and lowrank.score_matrix_rank(x, w_q, w_k) == 2
        scores = lowrank.pattern_agreement(target, lowrank.head_attention(x, w_q, w_k))
        assert scores["argmax_agreement"] == 1.0
        masses.append(scores["target_mass"])
    assert masses[0] < masses[1] < masses[2] and masses[2] > 0.99
    with pytest.raises(ValueError, match="keys must be"):
        lowrank.circle_construction(x, keys[:5], 1.0)


def test_fitted_weights_are_attention_and_the_kl_matches_the_score():
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=g)
    target = lowrank.one_to_one_target(torch.randperm(8, generator=g))
    fitted = lowrank.fit_attention_weights(target, x, d_head=4, steps=60)
    torch.testing.assert_close(fitted.sum(-1), torch.ones(8))
    kl = lowrank.fit_attention_pattern(target, x, d_head=4, steps=60)
    assert abs(kl - lowrank.pattern_agreement(target, fitted)["kl"]) < 1e-6
    with pytest.raises(ValueError, match="d_head"):
        lowrank.fit_attention_weights(target, x, d_head=0)


def test_a_float64_fit_comes_to_rest_so_the_last_bits_of_the_arithmetic_do_not_move_it():
    """Other CPUs round differently (kernels by instruction set, threads): model that as a relative change of
    1e-13 in the inputs of notebook 07's fits. With the learning rate decayed to zero the change stays at the
    rounding level; at a constant rate Adam amplifies it about 1e5-fold (to 1e-8 at d_head = 2), and the
    amplification of rounding at every step is what changed the third decimal between CPUs."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g).double()
    offset = lowrank.one_to_one_target((torch.arange(16) - 3) % 16).double()
    torch.randperm(16, generator=g)
    dense = torch.softmax(2 * torch.randn(16, 16, generator=g), -1).double()
    nudged = x * (1 + 1e-13 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for target, d_head in ((offset, 2), (dense, 4)):  # the two fits that a constant rate amplified most
        a = lowrank.fit_attention_weights(target, x, d_head, steps=250)
        b = lowrank.fit_attention_weights(target, nudged, d_head, steps=250)
        assert a.dtype == torch.float64
        assert (a - b).abs().max() < 1e-11, d_head


def test_fitting_refuses_integer_inputs():
    import torch

    with pytest.raises(TypeError, match="floating-point"):
        lowrank.fit_attention_weights(torch.eye(4), torch.ones(4, 3, dtype=torch.long), d_head=2)
