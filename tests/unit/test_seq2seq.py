"""The encoder-decoder model: shapes, checks, greedy decoding, and the trained capstone checkpoint."""

import json

import pytest
import torch

from course_lib.experiments.capstone import (
    CAPSTONE_BF16_PATH,
    CAPSTONE_PATH,
    attention_modules,
    exact_match,
    load_capstone,
)
from course_lib.experiments.toy_translation import load_split
from course_lib.seq2seq import Seq2SeqConfig, Seq2SeqTransformer


def _model(**kw):
    torch.manual_seed(0)
    return Seq2SeqTransformer(Seq2SeqConfig(12, 15, d_model=16, num_heads=2, d_ff=32, max_len=20, **kw)).eval()


def test_forward_shapes_and_attention_maps():
    model = _model(num_encoder_layers=3, num_decoder_layers=1)
    src = torch.tensor([[4, 5, 6, 0], [7, 8, 9, 10]])
    tgt_in = torch.tensor([[1, 4, 5], [1, 6, 0]])
    assert model(src, tgt_in).shape == (2, 3, 15)
    maps = model.attention_maps(src, tgt_in)
    assert [tuple(w.shape) for w in maps["encoder"]] == [(2, 2, 4, 4)] * 3
    assert [tuple(w.shape) for w in maps["decoder"]] == [(2, 2, 3, 3)]
    assert [tuple(w.shape) for w in maps["cross"]] == [(2, 2, 3, 4)]
    assert torch.all(maps["cross"][0][0, :, :, 3] == 0)  # the padded source position gets no attention


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="positional"):
        Seq2SeqConfig(10, 10, positional="alibi")
    with pytest.raises(ValueError, match="even d_head"):
        Seq2SeqConfig(10, 10, d_model=12, num_heads=4, positional="rotary")
    with pytest.raises(ValueError, match="d_model"):
        Seq2SeqConfig(10, 10, d_model=0)
    with pytest.raises(ValueError, match="unknown Seq2SeqConfig fields"):
        Seq2SeqConfig.from_dict({"src_vocab_size": 3, "tgt_vocab_size": 3, "heads": 2})
    with pytest.raises(TypeError, match="Seq2SeqConfig"):
        Seq2SeqTransformer({"d_model": 16})
    model = _model()
    with pytest.raises(ValueError, match=r"src ids must lie in \[0, 12\)"):
        model.encode(torch.tensor([[3, 12]]))
    with pytest.raises(ValueError, match=r"src must be \(B, L\) int64"):
        model.encode(torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="max_new_tokens=30 exceeds"):
        model.greedy_decode(torch.tensor([[4, 5]]), max_new_tokens=30)


def test_greedy_decode_pads_after_eos():
    model = _model()
    with torch.no_grad():  # make <eos> (id 2) the most likely token after two steps: bias the generator
        model.generator.bias.zero_()
    src = torch.tensor([[4, 5, 6], [7, 8, 0]])
    out, logits = model.greedy_decode(src, max_new_tokens=6, return_logits=True)
    assert out.shape[0] == 2 and out.shape[1] <= 6 and logits.shape[:2] == out.shape
    for row, row_logits in zip(out, logits, strict=True):
        ended = (row == 2).nonzero()
        if len(ended):
            assert torch.all(row[int(ended[0]) + 1:] == 0)  # <pad> after <eos>
        first = int(ended[0]) + 1 if len(ended) else len(row)
        assert torch.equal(row[:first], row_logits[:first].argmax(-1))


def test_rotary_positions_rotate_every_self_attention_and_no_cross_attention():
    sinusoidal, rotary = _model(), _model(positional="rotary")
    # the same seed gives the same weights: RoPE adds no parameters, the config changes only the positions
    assert sinusoidal.state_dict().keys() == rotary.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(sinusoidal.state_dict().values(), rotary.state_dict().values(),
                                                 strict=True))
    assert all(m.rotary is None for m in attention_modules(sinusoidal).values())  # the default: unchanged
    for name, module in attention_modules(rotary).items():
        assert (module.rotary is not None) == name.endswith("self"), name
        if module.rotary is not None:
            assert module.rotary.d_head == 8 and not module.rotary.interleaved
    x = torch.randn(2, 5, 16)
    assert torch.equal(rotary.src_pos(x), x) and torch.equal(rotary.tgt_pos(x), x)  # no added position vectors
    src, tgt_in = torch.tensor([[4, 5, 6, 7]]), torch.tensor([[1, 4, 5]])
    without = _model(positional="none")
    with torch.no_grad():  # the same weights without positions give other logits: the rotation is what differs
        assert not torch.allclose(rotary(src, tgt_in), without(src, tgt_in), atol=1e-4)
        # a rotary encoder's output does not depend on where the sentence starts: q_m . k_n sees only m - n,
        # so the encoding of a sentence equals that of its tokens with every rotation shifted by 3 positions
        memory, _ = rotary.encode(src)
        for layer in rotary.encoder_layers:
            layer.self_attn.rotary.forward = _shifted(layer.self_attn.rotary.forward, 3)
        shifted, _ = rotary.encode(src)
    torch.testing.assert_close(shifted, memory, atol=1e-5, rtol=0)


def _shifted(forward, by):
    return lambda x, offset=0: forward(x, offset=offset + by)


# ------------------------------------------------------------------ the capstone checkpoint
@pytest.mark.parametrize("path", [CAPSTONE_PATH, CAPSTONE_BF16_PATH], ids=["float32", "bfloat16_autocast"])
def test_capstone_checkpoint_is_small_and_documented(path):
    info = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size < 5 * 2**20
    for key in ("config", "seed", "steps", "test_exact_match", "validation_exact_match", "command",
                "train_seconds", "loss_every_10_steps"):
        assert key in info
    # the command as it was run (the module was course_lib.capstone then; now course_lib.experiments.capstone)
    assert info["command"].startswith(("python -m course_lib.capstone", "python -m course_lib.experiments.capstone"))


@pytest.mark.parametrize("path", [CAPSTONE_PATH, CAPSTONE_BF16_PATH], ids=["float32", "bfloat16_autocast"])
def test_capstone_checkpoint_reaches_95_percent_exact_match_on_the_test_split(path):
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and the test shares the machine
    model, src_vocab, tgt_vocab, info = load_capstone(path)
    accuracy, predictions = exact_match(model, load_split("test"), src_vocab, tgt_vocab, batch_size=500)
    assert len(predictions) == 1000
    assert accuracy >= 0.95
    recorded = json.loads(path.with_suffix(".json").read_text())["test_exact_match"]
    assert abs(accuracy - recorded) <= 0.002  # the number in the JSON is the one this checkpoint gives


def test_a_numpy_dropout_is_stored_as_a_float_that_json_can_save():
    import dataclasses

    import numpy as np

    config = Seq2SeqConfig(10, 10, dropout=np.float32(0.25))
    assert type(config.dropout) is float
    json.dumps(dataclasses.asdict(config))
