"""The head statistics on hand-built attention patterns whose answers are known."""

import math

import numpy as np
import pytest
import torch

from course_lib.experiments import head_analysis as ha

T = 6


def patterns() -> np.ndarray:
    """(1, 4, T, T): uniform, identity, previous-token (row 0 attends to itself), sink on position 0."""
    uniform = np.full((T, T), 1.0 / T)
    identity = np.eye(T)
    previous = np.eye(T, k=-1)
    previous[0, 0] = 1.0
    sink = np.zeros((T, T))
    sink[:, 0] = 1.0
    return np.stack([uniform, identity, previous, sink])[None]


def test_entropy_known_values():
    np.testing.assert_allclose(ha.entropy(patterns()), [math.log(T), 0.0, 0.0, 0.0], atol=1e-12)


def test_diagonality_previous_token_and_sink():
    a = patterns()
    np.testing.assert_allclose(ha.diagonality(a), [1 / T, 1.0, 1 / T, 1 / T], atol=1e-12)
    np.testing.assert_allclose(ha.previous_token(a), [1 / T, 0.0, 1.0, 1 / (T - 1)], atol=1e-12)
    np.testing.assert_allclose(ha.sink_score(a, positions=(0,)), [1 / T, 1 / T, 2 / T, 1.0], atol=1e-12)
    np.testing.assert_allclose(ha.sink_score(a), [2 / T, 2 / T, 2 / T, 1.0], atol=1e-12)  # first and last


def test_locality_and_distance():
    a = patterns()
    # uniform: a row t has min(t+1, T-1)-max(t-1, 0)+1 neighbours within 1: 2 at the ends, 3 inside
    expected_uniform = (2 * 2 + 3 * (T - 2)) / T / T
    np.testing.assert_allclose(ha.locality(a, window=1), [expected_uniform, 1.0, 1.0, 2 / T], atol=1e-12)
    np.testing.assert_allclose(ha.mean_distance(a)[1:], [0.0, (T - 1) / T, sum(range(T)) / T], atol=1e-12)


def test_similarity_and_summary():
    a = patterns()
    sim = ha.head_similarity(a)
    assert sim.shape == (4, 4)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-12)
    assert abs(sim[1, 2] - 1 / T) < 1e-12  # identity and previous-token share only entry (0, 0)
    np.testing.assert_allclose(sim, sim.T, atol=1e-12)
    summary = ha.summarize([torch.tensor(a), torch.tensor(a[:, ::-1].copy())])
    assert set(summary) == {"entropy", "diagonality", "previous_token", "locality", "mean_distance", "sink"}
    assert summary["entropy"].shape == (2, 4)
    np.testing.assert_allclose(summary["entropy"][1], summary["entropy"][0][::-1], atol=1e-12)


def test_batch_average_and_torch_input():
    a = torch.softmax(torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    per_example = ha.entropy(a, average_batch=False)
    assert per_example.shape == (3, 2)
    np.testing.assert_allclose(ha.entropy(a), per_example.mean(0), atol=1e-12)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="at least 3-D"):
        ha.entropy(np.ones((4, 4)) / 4)
    with pytest.raises(ValueError, match="sum to 1"):
        ha.entropy(np.ones((1, 4, 4)))


def test_spearman_ranks_ties_and_known_values():
    assert ha.rankdata([10, 30, 20, 20]).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert ha.spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)  # monotone, not linear
    assert ha.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # n = 4, ranks (1 2 3 4) vs (2 1 4 3): sum d^2 = 4, rho = 1 - 6*4 / (4*15) = 0.6
    assert ha.spearman(np.array([[1, 2], [3, 4]]), [2, 1, 4, 3]) == pytest.approx(0.6)
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 30), rng.standard_normal(30)
    assert ha.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
    with pytest.raises(ValueError, match="same number"):
        ha.spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="undefined"):
        ha.spearman([1, 1, 1], [1, 2, 3])
