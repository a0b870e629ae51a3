"""The training loop is reproducible; checkpoints round-trip and fail clearly."""

import pytest
import torch

from course_lib.experiments.capstone import encode_pairs
from course_lib.experiments.toy_translation import load_split, source_vocab, target_vocab
from course_lib.experiments.training import (
    CheckpointError,
    batch_iterator,
    collate_pairs,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    seq2seq_loss,
    set_seed,
    train,
)
from course_lib.seq2seq import Seq2SeqConfig, Seq2SeqTransformer


def _tiny(seed=0, d_model=16):
    set_seed(seed)
    config = Seq2SeqConfig(len(source_vocab()), len(target_vocab()), d_model=d_model, num_heads=2, d_ff=32,
                           num_encoder_layers=1, num_decoder_layers=1, dropout=0.1, max_len=24)
    return Seq2SeqTransformer(config)


def _run(seed, steps=12):
    model = _tiny(seed)
    examples = encode_pairs(load_split("validation"), source_vocab(), target_vocab())
    batches = batch_iterator(examples, 16, seed=seed)
    return train(model, batches, seq2seq_loss, steps=steps, lr=3e-3, seed=seed, progress=False).losses


def test_same_seed_same_loss_curve_different_seed_different_curve():
    torch.set_num_threads(1)
    a, b, c = _run(0), _run(0), _run(1)
    assert len(a) == 12
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6  # dropout is on: the seed covers it
    assert max(abs(x - y) for x, y in zip(a, c, strict=True)) > 1e-3
    assert a[-1] < a[0]  # it learns


def test_batch_iterator_is_seeded_and_collate_shifts_the_target():
    examples = [([5, 6, 7], [8, 9]), ([5], [8, 9, 10]), ([6, 6], [9])]
    first = [b[0].tolist() for b, _ in zip(batch_iterator(examples, 2, seed=3), range(4), strict=False)]
    again = [b[0].tolist() for b, _ in zip(batch_iterator(examples, 2, seed=3), range(4), strict=False)]
    assert first == again
    src, tgt_in, tgt_out = collate_pairs(examples)
    assert src.tolist() == [[5, 6, 7], [5, 0, 0], [6, 6, 0]]
    assert tgt_in.tolist() == [[1, 8, 9, 0], [1, 8, 9, 10], [1, 9, 0, 0]]
    assert tgt_out.tolist() == [[8, 9, 2, 0], [8, 9, 10, 2], [9, 2, 0, 0]]
    with pytest.raises(ValueError, match="larger than the 3 examples"):
        next(batch_iterator(examples, 4))


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        train(_tiny(), iter([]), seq2seq_loss, steps=0)
    with pytest.raises(ValueError, match="ran out after 0 of 3 steps"):
        train(_tiny(), iter([]), seq2seq_loss, steps=3, progress=False)


def test_checkpoint_round_trip(tmp_path):
    model = _tiny().eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, config=model.config.to_dict(), metadata={"seed": 0})
    other = _tiny(seed=7).eval()
    info = load_checkpoint(path, other)
    assert info["config"] == model.config.to_dict() and info["metadata"] == {"seed": 0}
    src, tgt_in, _ = collate_pairs([([5, 6, 7], [8, 9])])
    with torch.no_grad():
        torch.testing.assert_close(other(src, tgt_in), model(src, tgt_in), atol=0, rtol=0)


def test_mismatched_shapes_give_a_clear_error(tmp_path):
    model = _tiny()
    path = save_checkpoint(tmp_path / "m.safetensors", model, config=model.config.to_dict())
    bigger = _tiny(d_model=32)
    with pytest.raises(CheckpointError, match=r"does not fit this model .*src_embed.weight: checkpoint "
                                              r"\(58, 16\) vs model \(58, 32\).*saved with config"):
        load_checkpoint(path, bigger)
    other = Seq2SeqTransformer(Seq2SeqConfig(len(source_vocab()), len(target_vocab()), d_model=16, num_heads=2,
                                             d_ff=32, num_encoder_layers=2, num_decoder_layers=1, max_len=24))
    with pytest.raises(CheckpointError, match="tensors missing from the checkpoint"):
        load_checkpoint(path, other)


def test_a_file_that_is_not_a_checkpoint_gives_a_clear_error(tmp_path):
    junk = tmp_path / "notes.safetensors"
    junk.write_text('{"this is": "json, not safetensors"}')
    with pytest.raises(CheckpointError, match="notes.safetensors is not a safetensors checkpoint"):
        load_checkpoint(junk, _tiny())
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a course_lib checkpoint"):
        read_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_train_under_bfloat16_autocast_keeps_float32_weights_and_learns():
    torch.set_num_threads(1)
    model = _tiny(0)
    seen = []
    model.generator.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    examples = encode_pairs(load_split("validation"), source_vocab(), target_vocab())
    losses = train(model, batch_iterator(examples, 16, seed=0), seq2seq_loss, steps=8, lr=3e-3, progress=False,
                   amp_dtype=torch.bfloat16).losses
    assert set(seen) == {torch.bfloat16}  # the forward ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_train_rejects_bad_mixed_precision_arguments():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="amp_dtype"):
        train(model, iter([]), seq2seq_loss, steps=1, amp_dtype=torch.float64)
    with pytest.raises(TypeError, match="scaler"):
        train(model, iter([]), seq2seq_loss, steps=1, amp_dtype=torch.float16, scaler=object())
    with pytest.raises(ValueError, match="scaler is for float16"):
        train(model, iter([]), seq2seq_loss, steps=1, scaler=torch.amp.GradScaler("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
