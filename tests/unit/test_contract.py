"""Every input either works or fails cleanly: no silent wrong result, no half-updated state.

Each test below pins one way the public API used to go wrong (a silent wrong answer, a cache or a
module changed by a call that then failed, a raw error that named no argument).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from course_lib import KVCache, MultiHeadAttention, masks
from course_lib import numpy_ref as nr
from course_lib.attention import scaled_dot_product_attention as sdpa
from course_lib.blocks import DecoderLayer, EncoderLayer
from course_lib.experiments.training import (
    CHECKPOINT_FORMAT,
    DIGEST_FORMAT,
    CheckpointError,
    checkpoint_digest,
    load_checkpoint,
    save_checkpoint,
    train,
)
from course_lib.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, greedy_decode


# ----------------------------------------------------------------------------- silent wrong results
def test_numpy_reference_keeps_nan_visible():
    k = np.array([[np.nan, 0, 0, 0], [1, 1, 1, 1]])
    out, _ = nr.scaled_dot_product_attention(np.ones((2, 4)), k, np.ones((2, 3)))
    assert np.isnan(out).all()  # the NaN key reaches every query, as in torch
    assert np.isnan(nr.online_softmax_attention(np.ones((2, 4)), k, np.ones((2, 3)))).all()
    torch_out = sdpa(torch.ones(2, 4), torch.from_numpy(k).float(), torch.ones(2, 3))
    assert torch.isnan(torch_out).all()
    assert np.array_equal(nr.softmax(np.array([-np.inf, -np.inf])), [0.0, 0.0])  # nothing to attend to: 0


def test_numpy_reference_computes_float16_inputs_safely_in_float64():
    x = np.full((2, 64), 40, np.float16)  # q k^T = 102400 overflows float16; the scaled scores (12800) do not
    out, weights = nr.scaled_dot_product_attention(x, x, np.ones((2, 3), np.float16))
    assert out.dtype == np.float64 and np.allclose(out, 1.0) and np.allclose(weights, 0.5)


def test_fused_and_weights_paths_agree_on_a_minus_1e9_row_in_float16():
    torch.manual_seed(0)
    q = torch.randn(1, 1, 3, 8).half()
    mask = torch.zeros(3, 3)
    mask[1] = -1e9  # -inf once rounded to float16: the row has nothing to attend to
    fused = sdpa(q, q, q, attn_mask=mask)
    math_path, _ = sdpa(q, q, q, attn_mask=mask, need_weights=True)
    torch.testing.assert_close(fused, math_path, atol=2e-3, rtol=0)
    assert (fused[0, 0, 1] == 0).all()


# ----------------------------------------------------------------------------- state after a failed call
def test_decoder_layer_refuses_a_bad_memory_mask_before_touching_its_cache():
    layer = DecoderLayer(16, 4, 32).eval()
    memory, x = torch.randn(1, 5, 16), torch.randn(1, 1, 16)
    self_cache, cross_cache = KVCache(), KVCache(static=True)
    layer(x, memory, self_cache=self_cache, cross_cache=cross_cache)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, memory, memory_mask=torch.ones(1, 1, 1, 4, dtype=torch.bool), self_cache=self_cache,
              cross_cache=cross_cache)
    assert len(self_cache) == 1 and len(cross_cache) == 5


def _tiny_seq2seq():
    torch.manual_seed(0)
    return Seq2SeqTransformer(Seq2SeqConfig(10, 12, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                                            num_decoder_layers=1, max_len=8))


def test_greedy_decode_checks_src_before_switching_to_eval():
    model = _tiny_seq2seq().train()
    with pytest.raises(ValueError, match="src ids must lie in"):
        greedy_decode(model, torch.tensor([[3, 99]]))
    assert model.training
    with pytest.raises(TypeError, match="Seq2SeqTransformer"):
        greedy_decode(torch.nn.Linear(2, 2), torch.tensor([[3]]))


def test_decode_refuses_caches_that_are_not_cache_pairs():
    model = _tiny_seq2seq().eval()
    memory, mask = model.encode(torch.tensor([[3, 4]]))
    with pytest.raises(TypeError, match=r"caches\[0\] must be a pair"):
        model.decode(torch.tensor([[1]]), memory, mask, caches=[(None, None)])


def test_train_refuses_a_non_scalar_loss_and_leaves_the_mode_as_it_was():
    model = torch.nn.Linear(2, 2).eval()
    batches = iter([torch.ones(3, 2)] * 2)
    with pytest.raises(TypeError, match="scalar"):
        train(model, batches, lambda m, b: m(b), steps=2, progress=False)  # (3, 2) per-example losses
    assert not model.training


# ----------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("call, error, words", [
    (lambda: masks.padding_mask(None, 4), TypeError, "lengths"),
    (lambda: masks.to_additive_mask(masks.causal_mask(2), dtype="float32"), TypeError, "dtype"),
    (lambda: masks.with_causal(3, 2, 2), TypeError, "mask"),
    (lambda: masks.with_causal(torch.ones(3, 3, dtype=torch.bool), 2, 2), ValueError, "(T, S) = (2, 2)"),
    (lambda: MultiHeadAttention(8, 2, dtype=torch.int64), TypeError, "dtype"),
    (lambda: MultiHeadAttention(8, 2)(torch.randn(1, 3, 8), cache=KVCache(static=True)), ValueError, "static"),
    (lambda: nr.softmax(torch.ones(3, requires_grad=True)), TypeError, "requires grad"),
    (lambda: EncoderLayer(8, 2, 16)(torch.randn(1, 3, 8).double()), TypeError, "x has dtype torch.float64"),
    (lambda: sdpa(torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 4), is_causal="False"), TypeError, "is_causal"),
    (lambda: sdpa(torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 4), need_weights="no"), TypeError, "need_weights"),
    (lambda: sdpa(torch.ones(1, 0), torch.ones(1, 0), torch.ones(1, 4)), ValueError, "at least one feature"),
    (lambda: Seq2SeqConfig(10, 12, num_encoder_layers=-1), ValueError, "num_encoder_layers"),
    (lambda: Seq2SeqConfig(10, 12, bos_id=12), ValueError, "bos_id"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=None) as info:
        call()
    assert words in str(info.value)


def test_numpy_integers_are_ints():
    assert masks.causal_mask(np.int64(3)).shape == (3, 3)
    assert MultiHeadAttention(np.int64(8), np.int32(2)).num_heads == 2


def test_no_keys_gives_zeros_on_every_path():
    q, empty = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4)
    for out in (sdpa(q, empty, empty), sdpa(q, empty, empty, need_weights=True)[0]):
        assert out.shape == (1, 2, 3, 4) and (out == 0).all()
    out, weights = nr.scaled_dot_product_attention(np.ones((3, 4)), np.ones((0, 4)), np.ones((0, 2)))
    assert out.shape == (3, 2) and (out == 0).all() and weights.shape == (3, 0)
    mha = MultiHeadAttention(8, 2)
    out, weights = mha(torch.randn(2, 0, 8), need_weights=True, is_causal=True)
    assert out.shape == (2, 0, 8) and weights.shape == (2, 2, 0, 0)


def test_meta_tensors_go_through_the_weights_path():
    q = torch.randn(1, 1, 4, 16, device="meta")
    assert sdpa(q, q, q, need_weights=True)[1].shape == (1, 1, 4, 4)


# ----------------------------------------------------------------------------- checkpoints
def _saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    return model, save_checkpoint(tmp_path / "m.safetensors", model, config={"in": 3})


def test_corrupted_tensor_bytes_are_refused(tmp_path):
    model, path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-4:] = b"\xff\xff\xff\x7f"  # the last float becomes NaN
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, torch.nn.Linear(3, 2))


def test_integer_tensors_are_not_cast_into_a_float_model(tmp_path):
    ints = torch.nn.Module()  # a valid checkpoint (checksum and all) whose tensors have Linear(3, 2)'s names, as int32
    ints.register_buffer("weight", torch.zeros(2, 3, dtype=torch.int32))
    ints.register_buffer("bias", torch.zeros(2, dtype=torch.int32))
    path = save_checkpoint(tmp_path / "m.safetensors", ints, config={"in": 3})
    with pytest.raises(CheckpointError, match="cast silently"):
        load_checkpoint(path, torch.nn.Linear(3, 2))


def test_a_bad_json_config_is_a_checkpoint_error(tmp_path):
    model, path = _saved(tmp_path)
    tensors = load_file(str(path))
    header = {"format": CHECKPOINT_FORMAT, "digest": DIGEST_FORMAT, "config": "{not json", "metadata": "{}"}
    header["sha256"] = checkpoint_digest(tensors, header)  # checksummed as written: only the JSON is wrong
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path, torch.nn.Linear(3, 2))
    assert json.loads("{}") == {}


def test_a_failed_decode_leaves_every_layers_caches_as_they_were():
    model = Seq2SeqTransformer(Seq2SeqConfig(10, 12, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                                             num_decoder_layers=2, max_len=8)).eval()
    memory, mask = model.encode(torch.tensor([[3, 4, 5]]))
    caches = model.new_caches()
    model.decode(torch.tensor([[1]]), memory, mask, caches=caches)
    before = [(s.key, c.key) for s, c in caches]
    bad_mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)  # the memory has 3 positions
    with pytest.raises(ValueError, match="attn_mask"):
        model.decode(torch.tensor([[2]]), memory, bad_mask, caches=caches)
    assert all(s.key is k_self and c.key is k_cross for (s, c), (k_self, k_cross) in zip(caches, before, strict=True))
