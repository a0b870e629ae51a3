"""online_softmax_attention: equal to naive attention, for any tiling and mask, in O(T) extra memory."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from course_lib.bench import tiled_memory
from course_lib.numpy_ref import online_softmax_attention, online_softmax_step, scaled_dot_product_attention
from course_lib.tools.paths import DATA_DIR

TOL = 1e-10


def _qkv(rng, batch, T, S, d, d_v):
    q = rng.standard_normal((*batch, T, d))
    return q, rng.standard_normal((*batch, S, d)), rng.standard_normal((*batch, S, d_v))


@given(T=st.integers(1, 40), S=st.integers(1, 40), block=st.integers(1, 48), seed=st.integers(0, 2**16))
def test_equals_naive_for_any_block_size(T, S, block, seed):
    q, k, v = _qkv(np.random.default_rng(seed), (2,), T, S, 5, 3)
    expected = scaled_dot_product_attention(q, k, v)[0]
    np.testing.assert_allclose(online_softmax_attention(q, k, v, block_size=block), expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("T,S,block", [(10, 10, 3), (5, 13, 4), (64, 64, 64), (65, 70, 16), (7, 7, 100)])
def test_causal_mask_bottom_right(T, S, block):
    q, k, v = _qkv(np.random.default_rng(0), (2, 3), T, S, 8, 8)
    mask = np.tril(np.ones((T, S), dtype=bool), k=S - T)  # query i sees keys j <= i + (S - T)
    expected = scaled_dot_product_attention(q, k, v, mask)[0]
    np.testing.assert_allclose(online_softmax_attention(q, k, v, mask, block_size=block), expected, rtol=0, atol=TOL)


def test_padding_mask_and_fully_masked_rows_give_zeros_not_nan():
    rng = np.random.default_rng(1)
    B, H, T, d = 3, 2, 11, 4
    q, k, v = _qkv(rng, (B, H), T, T, d, d)
    lengths = np.array([11, 6, 0])  # the last sequence is all padding: every row fully masked
    pad = (np.arange(T) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
    causal = np.tril(np.ones((T, T), dtype=bool))
    for mask in (pad, pad & causal):
        out = online_softmax_attention(q, k, v, mask, block_size=4)
        assert not np.isnan(out).any()
        np.testing.assert_allclose(out, scaled_dot_product_attention(q, k, v, mask)[0], rtol=0, atol=TOL)
        assert np.all(out[2] == 0.0)


def test_rows_masked_in_early_blocks_only_are_rescaled_correctly():
    # keys 0..7 masked for every query: the first two blocks of 4 contribute nothing, the rest must be exact
    q, k, v = _qkv(np.random.default_rng(2), (), 6, 15, 4, 2)
    mask = np.arange(15) >= 8
    expected = scaled_dot_product_attention(q, k, v, mask)[0]
    np.testing.assert_allclose(online_softmax_attention(q, k, v, mask, block_size=4), expected, rtol=0, atol=TOL)


def test_additive_float_mask_and_large_logits():
    q, k, v = _qkv(np.random.default_rng(3), (), 9, 12, 4, 4)
    q = q * 300.0  # scores in the hundreds: exp would overflow without the running max
    bias = np.where(np.random.default_rng(4).random((9, 12)) < 0.3, -np.inf, 0.5)
    bias[:, 0] = 0.0  # every row keeps at least one key
    expected = scaled_dot_product_attention(q, k, v, bias)[0]
    np.testing.assert_allclose(online_softmax_attention(q, k, v, bias, block_size=5), expected, rtol=0, atol=TOL)


def test_broadcast_batch_and_float32():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 1, 9, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 10, 4)).astype(np.float32)
    v = rng.standard_normal((1, 3, 10, 6)).astype(np.float32)
    out = online_softmax_attention(q, k, v, block_size=4)
    assert out.shape == (2, 3, 9, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out, scaled_dot_product_attention(q, k, v)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("block", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_block_size_raises(block, error):
    with pytest.raises(error, match="block_size"):
        online_softmax_attention(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)), block_size=block)


def test_bad_shapes_raise_before_arithmetic():
    with pytest.raises(ValueError, match="same feature size"):
        online_softmax_attention(np.ones((3, 4)), np.ones((3, 5)), np.ones((3, 5)))


def test_step_rescales_when_the_max_rises():
    # two blocks folded in one at a time equal one softmax over both
    rng = np.random.default_rng(6)
    s1, s2 = rng.standard_normal((3, 4)), rng.standard_normal((3, 5)) + 4.0
    v1, v2 = rng.standard_normal((4, 2)), rng.standard_normal((5, 2))
    state = (np.full((3, 1), -np.inf), np.zeros((3, 1)), np.zeros((3, 2)))
    m, l, acc = online_softmax_step(*online_softmax_step(*state, s1, v1), s2, v2)
    scores = np.concatenate([s1, s2], axis=1)
    w = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(acc / l, (w / w.sum(1, keepdims=True)) @ np.concatenate([v1, v2]), atol=TOL)
    np.testing.assert_allclose(m, scores.max(1, keepdims=True), atol=0)


def test_extra_memory_grows_linearly_not_quadratically():
    small = tiled_memory.measure(256, 32, 32)
    large = tiled_memory.measure(1024, 32, 32)
    # 4x the length: naive needs ~16x (the T x T matrices), tiled ~4x or less (the (T, d) output)
    assert large["naive_bytes"] > 12 * small["naive_bytes"]
    assert large["tiled_bytes"] < 6 * small["tiled_bytes"]
    assert large["tiled_bytes"] * 10 < large["naive_bytes"]


def test_memory_script_runs_on_a_tiny_configuration(tmp_path):
    out = tmp_path / "m.json"
    assert tiled_memory.main(["--seq", "64,128", "--d-head", "8", "--block-size", "16", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["T"] for r in record["rows"]] == [64, 128]
    assert record["device_info"]["device_type"] == "cpu"
    assert all(r["tiled_bytes"] > 0 and r["naive_bytes"] > r["tiled_bytes"] for r in record["rows"])


def test_recorded_sweep_shows_tiled_peak_at_most_a_twentieth_of_naive_at_8192():
    record = json.loads((DATA_DIR / "benchmarks" / "tiled_memory_numpy.json").read_text())
    rows = {r["T"]: r for r in record["rows"]}
    assert {1024, 2048, 4096, 8192, 16384} <= set(rows)
    assert all(r["d_head"] == 64 for r in rows.values())
    assert rows[8192]["tiled_bytes"] * 20 <= rows[8192]["naive_bytes"]
    # growth per doubling of T: naive ~4x, tiled ~2x at most
    for T in (2048, 4096, 8192, 16384):
        assert rows[T]["naive_bytes"] / rows[T // 2]["naive_bytes"] > 3.5
        assert rows[T]["tiled_bytes"] / rows[T // 2]["tiled_bytes"] < 2.2
