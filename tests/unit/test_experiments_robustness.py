"""What the experiments' loop, checkpoints and commands promise when something is wrong.

* a checkpoint with any changed byte (header or tensors) is refused, never loaded; the shipped checkpoints,
  written when the checksum covered the tensors only, still load, and their headers are checked too;
* a command (or function) that would write over a file that exists refuses, before any work, unless forced;
* train() never leaves NaN weights, and a run that fails leaves the model as it was;
* exact_match refuses what it cannot score.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from course_lib.experiments import capstone, toy_translation
from course_lib.experiments.capstone import exact_match, load_capstone, train_capstone
from course_lib.experiments.head_ablation import load_head_model
from course_lib.experiments.toy_translation import load_split, source_vocab, target_vocab
from course_lib.experiments.training import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    tensors_digest,
    train,
)
from course_lib.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from course_lib.tools.paths import PACKAGE_DATA, REPO_ROOT

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CHECKPOINTS = PACKAGE_DATA / "checkpoints"
SHIPPED = sorted(CHECKPOINTS.glob("*.safetensors"))


def _fingerprint(paths) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _flip(raw: bytes, index: int, mask: int) -> bytes:
    changed = bytearray(raw)
    changed[index] ^= mask
    return bytes(changed)


def _header_end(raw: bytes) -> int:
    """Where the tensors begin: 8 bytes of header length, then the JSON header."""
    return 8 + struct.unpack("<Q", raw[:8])[0]


REGIONS = ("header", "config or metadata", "tensors")


def _region(raw: bytes, region: str) -> tuple[int, int]:
    """[start, end) of a part of a checkpoint file; "config or metadata": the two JSON strings in the header,
    where most flips keep the JSON valid (a digit, a letter): the flips a checksum over the tensors alone misses."""
    end = _header_end(raw)
    if region == "tensors" and end < len(raw):
        return end, len(raw)
    if region == "config or metadata":
        spans = [m.span(1) for m in re.finditer(rb'"(?:config|metadata)":"((?:[^"\\]|\\.)+)"', raw[:end])]
        if spans:
            return min(spans, key=lambda span: span[0] - span[1])  # the longer one
    return 0, end


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _seq2seq(d_model=16, num_heads=2, max_len=24):
    torch.manual_seed(0)
    return Seq2SeqTransformer(Seq2SeqConfig(len(source_vocab()), len(target_vocab()), d_model=d_model,
                                            num_heads=num_heads, d_ff=32, num_encoder_layers=1,
                                            num_decoder_layers=1, max_len=max_len)).eval()


def _legacy_save(path: Path, model: torch.nn.Module, config: dict) -> Path:
    """A checkpoint of the older form: "sha256" over the tensors only, no "digest" field."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": CHECKPOINT_FORMAT, "config": json.dumps(config, sort_keys=True),
                                            "metadata": "{}", "sha256": tensors_digest(tensors)})
    return path


def _with_config_changed(raw: bytes, old: bytes, new: bytes) -> bytes:
    """One config value changed in the header (same length, so the file stays valid safetensors)."""
    assert len(old) == len(new) and raw[:_header_end(raw)].count(old) == 1
    return raw.replace(old, new, 1)


# ------------------------------------------------------------------ 1. the checksum covers the header
def test_a_changed_config_in_a_new_checkpoint_is_refused(tmp_path):
    model = _seq2seq(num_heads=4, max_len=32)
    path = save_checkpoint(tmp_path / "m.safetensors", model, config=model.config.to_dict())
    raw = path.read_bytes()
    for old, new in ((b'max_len\\": 32', b'max_len\\": 22'), (b'num_heads\\": 4', b'num_heads\\": 2')):
        path.write_bytes(_with_config_changed(raw, old, new))  # one flipped bit: 3 -> 2, 4 -> 2 ... the shapes fit
        with pytest.raises(CheckpointError, match="corrupted: its tensors or its header"):
            load_capstone(path)
    path.write_bytes(raw)
    assert load_capstone(path)[0].config == model.config  # the file as written loads


def test_the_shipped_checkpoints_load_in_their_older_form_without_a_warning():
    assert len(SHIPPED) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in SHIPPED:
            tensors, info = read_checkpoint(path)
            assert info["config"] and tensors
    assert load_capstone()[0].config.num_heads == 4
    assert load_head_model(CHECKPOINTS / "heads_two_lookups_attn_only_h8.safetensors")[0].num_heads == 8


@pytest.mark.parametrize(("name", "old", "new"), [
    ("capstone.safetensors", b'max_len\\": 32', b'max_len\\": 22'),
    ("capstone.safetensors", b'num_heads\\": 4', b'num_heads\\": 2'),
    ("capstone_bf16.safetensors", b'num_heads\\": 4', b'num_heads\\": 2'),
    ("heads_two_lookups_attn_only_h8.safetensors", b'num_heads\\": 8', b'num_heads\\": 2'),
])
def test_a_changed_config_in_a_shipped_older_checkpoint_is_refused(tmp_path, name, old, new):
    path = tmp_path / name
    path.write_bytes(_with_config_changed((CHECKPOINTS / name).read_bytes(), old, new))
    with pytest.raises(CheckpointError, match="its header .* differs from the one recorded with these tensors"):
        read_checkpoint(path)


def test_another_older_checkpoint_loads_with_a_warning_and_its_shapes_checked(tmp_path):
    model = _seq2seq()
    path = _legacy_save(tmp_path / "old.safetensors", model, model.config.to_dict())
    with pytest.warns(UserWarning, match="older form, whose checksum covers its tensors only"):
        loaded, _, _, info = load_capstone(path)
    assert info["config"] == model.config.to_dict() and _same(loaded, _state(model))
    wider = _legacy_save(tmp_path / "wide.safetensors", model, {**model.config.to_dict(), "d_model": 32})
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="does not fit this model"):
        load_capstone(wider)  # a config the tensors' shapes contradict is still refused
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # its tensors are still covered
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted: its tensors do not match"):
        read_checkpoint(path)


def test_a_header_without_a_checksum_or_with_unknown_keys_is_refused(tmp_path):
    tensors = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    header = {"format": CHECKPOINT_FORMAT, "config": "{}", "metadata": "{}"}
    for extra in ({}, {"sha256": tensors_digest(tensors), "note": "x"}):
        save_file(tensors, str(tmp_path / "m.safetensors"), metadata={**header, **extra})
        with pytest.raises(CheckpointError, match="corrupted or was edited: its header has"):
            load_checkpoint(tmp_path / "m.safetensors", torch.nn.Linear(3, 2))
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "n.safetensors", model)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"digest":"sha256:', b'"digest":"sha257:', 1))
    with pytest.raises(CheckpointError, match="unknown checksum kind"):
        read_checkpoint(path)


def test_every_single_bit_flip_of_a_small_checkpoint_is_refused(tmp_path):
    """Exhaustive over one small file: each of its bits, flipped alone (length prefix, header, padding, tensors)."""
    torch.manual_seed(0)
    source = save_checkpoint(tmp_path / "m.safetensors", torch.nn.Linear(3, 2), config={"in": 3, "heads": 4},
                             metadata={"seed": 0})
    raw, path = source.read_bytes(), tmp_path / "flipped.safetensors"
    loaded = []
    for bit in range(len(raw) * 8):
        path.write_bytes(_flip(raw, bit // 8, 1 << (bit % 8)))
        try:
            read_checkpoint(path)
        except CheckpointError:
            continue
        loaded.append(bit)
    assert not loaded, f"bits whose flip loaded: {loaded[:10]}"


@st.composite
def small_checkpoints(draw):
    """A module of 1-3 tensors (float32, float16, bfloat16 or int64), a config and metadata of JSON values."""
    module = torch.nn.Module()
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]))
        value = torch.randint(-5, 5, shape, generator=g) if dtype == torch.int64 else torch.randn(shape, generator=g)
        module.register_buffer(f"t{i}", value.to(dtype))
    json_values = st.one_of(st.integers(-100, 100), st.booleans(), st.text(max_size=6), st.none())
    config = draw(st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=4))
    metadata = draw(st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=3))
    return module, config, metadata


@FUZZ
@given(checkpoint=small_checkpoints(), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255),
       region=st.sampled_from(REGIONS))
def test_any_changed_byte_of_a_checkpoint_is_refused(tmp_path, checkpoint, where, mask, region):
    """Any byte XOR any nonzero mask (one bit or several), in the header or in the tensors: a CheckpointError."""
    module, config, metadata = checkpoint
    path = save_checkpoint(tmp_path / "m.safetensors", module, config=config, metadata=metadata)
    raw = path.read_bytes()
    tensors, info = read_checkpoint(path)
    assert info == {"config": config, "metadata": metadata} and set(tensors) == set(module.state_dict())
    start, end = _region(raw, region)
    path.write_bytes(_flip(raw, start + int(where * (end - start)), mask))
    with pytest.raises(CheckpointError, match="m.safetensors"):
        read_checkpoint(path)


@FUZZ
@given(name=st.sampled_from([p.name for p in SHIPPED]), where=st.floats(0, 1, exclude_max=True),
       mask=st.integers(1, 255), region=st.sampled_from(REGIONS))
def test_any_changed_byte_of_a_shipped_older_checkpoint_is_refused(tmp_path, name, where, mask, region):
    """The shipped files' checksum covers their tensors, their pinned copy their header: both are guarded."""
    raw = (CHECKPOINTS / name).read_bytes()
    start, end = _region(raw, region)
    path = tmp_path / name
    path.write_bytes(_flip(raw, start + int(where * (end - start)), mask))
    with pytest.raises(CheckpointError, match=name):
        read_checkpoint(path)


# ------------------------------------------------------------------ 2. commands do not write over records
def test_capstone_command_refuses_to_write_over_the_recorded_checkpoint(monkeypatch, capsys, tmp_path):
    recorded = _fingerprint(CHECKPOINTS.glob("capstone*"))
    monkeypatch.setattr(capstone, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    for argv in (["--steps", "1"], ["--steps", "1", "--out", str(capstone.CAPSTONE_BF16_PATH)]):
        with pytest.raises(SystemExit) as exit_info:
            capstone.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "refusing to write over" in err and "capstone" in err and "--force" in err and "--out PATH" in err
    assert _fingerprint(CHECKPOINTS.glob("capstone*")) == recorded
    existing = tmp_path / "mine.safetensors"
    existing.with_suffix(".json").write_text("{}")  # its record alone exists: also refused
    with pytest.raises(SystemExit):
        capstone.main(["--steps", "1", "--out", str(existing)])
    calls = []
    monkeypatch.setattr(capstone, "train_capstone", lambda **kw: calls.append(kw) or {
        "steps": 1, "train_seconds": 0.0, "torch_threads": 1, "validation_exact_match": 0.0, "test_exact_match": 0.0})
    assert capstone.main(["--steps", "1", "--out", str(existing), "--force"]) == 0
    assert calls[0]["out"] == existing and calls[0]["force"] is True
    assert capstone.main(["--steps", "1", "--out", str(tmp_path / "new.safetensors")]) == 0
    assert calls[1]["force"] is False


def test_train_capstone_refuses_an_existing_out_before_training(monkeypatch, tmp_path):
    monkeypatch.setattr(capstone, "build_capstone_model", lambda *a, **k: pytest.fail("built before refusing"))
    recorded = _fingerprint(CHECKPOINTS.glob("capstone*"))
    with pytest.raises(ValueError, match="out: refusing to write over .*capstone.safetensors.*force=True"):
        train_capstone(steps=1)
    (tmp_path / "m.safetensors").write_bytes(b"mine")
    with pytest.raises(ValueError, match="out: refusing to write over .*m.safetensors"):
        train_capstone(steps=1, out=tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="force"):
        train_capstone(steps=1, out=tmp_path / "new.safetensors", force="yes")
    assert _fingerprint(CHECKPOINTS.glob("capstone*")) == recorded
    assert (tmp_path / "m.safetensors").read_bytes() == b"mine"


def test_toy_translation_command_refuses_to_regenerate_the_shipped_splits(monkeypatch, capsys, tmp_path):
    shipped = _fingerprint(toy_translation.DATA_SUBDIR.glob("*.jsonl"))
    monkeypatch.setattr(toy_translation, "generate_splits", lambda *a: pytest.fail("generated before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        toy_translation.main([])
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out_dir: refusing to write over .*force=True"):
        toy_translation.write_splits()
    assert _fingerprint(toy_translation.DATA_SUBDIR.glob("*.jsonl")) == shipped
    monkeypatch.undo()
    out = tmp_path / "splits"
    assert toy_translation.main([str(out)]) == 0
    (out / "test.jsonl").write_text("mine\n")
    with pytest.raises(SystemExit):
        toy_translation.main([str(out)])
    assert (out / "test.jsonl").read_text() == "mine\n"
    assert toy_translation.main([str(out), "--force"]) == 0
    assert (out / "test.jsonl").read_bytes() == (toy_translation.DATA_SUBDIR / "test.jsonl").read_bytes()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_robustness", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_head_ablation_script_refuses_to_write_over_the_recorded_checkpoints(monkeypatch, capsys, tmp_path):
    module = _script("run_head_ablation")
    monkeypatch.setattr(module, "train_model", lambda cfg: pytest.fail("trained before refusing"))
    recorded = _fingerprint(CHECKPOINTS.glob("heads_*"))
    argv = ["--tasks", "two_lookups", "--variants", "attn_only", "--heads", "8", "--seeds", "0", "--steps", "1",
            "--out", str(tmp_path)]  # a new sweep file, but the default --checkpoint-dir holds the recorded model
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "heads_two_lookups_attn_only_h8.safetensors" in err and "--force" in err
    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(SystemExit):
        module.main([*argv, "--no-checkpoints"])  # the sweep file exists now
    assert (tmp_path / "sweep.json").read_text() == "{}"
    assert _fingerprint(CHECKPOINTS.glob("heads_*")) == recorded


@pytest.mark.parametrize(("script", "record", "argv"), [
    ("run_kv_sharing", "kv_sharing.json", ["--tiny"]),
    ("run_parity_ablation", "parity.json", ["--tiny"]),
    ("run_length_generalisation", "length_generalisation.json", ["--tiny"]),
])
def test_record_scripts_refuse_to_write_over_a_record(monkeypatch, capsys, tmp_path, script, record, argv):
    module = _script(script)
    for name in ("train_model", "train_parity", "train"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("trained before refusing"))
    (tmp_path / record).write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / record).read_text() == "{}"


# ------------------------------------------------------------------ 3, 4. train never leaves NaN weights
def _nan_gradient_loss(model, batch):
    """A finite loss whose gradient is NaN: d sqrt(0 * s) / ds = 0 * inf."""
    return model(batch).pow(2).mean() + torch.sqrt(0 * model.weight.sum())


def test_nan_gradients_with_a_finite_loss_raise_and_leave_the_weights_as_they_were():
    model = torch.nn.Linear(3, 2)
    before = _state(model)
    batches = [torch.randn(4, 3) for _ in range(3)]
    with pytest.raises(FloatingPointError, match="gradients became NaN or inf at step 0 although the loss was finite"):
        train(model, batches, _nan_gradient_loss, steps=1, progress=False)
    assert _same(model, before) and all(torch.isfinite(p).all() for p in model.parameters())
    calls = []

    def late_nan(m, batch):  # finite gradients for two steps, then NaN ones: the two updates are undone as well
        calls.append(1)
        return _nan_gradient_loss(m, batch) if len(calls) == 3 else m(batch).pow(2).mean()

    with pytest.raises(FloatingPointError, match="at step 2"):
        train(model, batches, late_nan, steps=3, progress=False)
    assert _same(model, before) and model.training


def test_with_a_grad_scaler_nan_gradients_skip_the_step_as_float16_expects():
    model = torch.nn.Linear(3, 2)
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "lr_scheduler.step() before optimizer.step()"
        result = train(model, [torch.randn(4, 3)] * 2, _nan_gradient_loss, steps=2, progress=False,
                       amp_dtype=torch.float16, scaler=torch.amp.GradScaler("cpu"))
    assert len(result.losses) == 2 and _same(model, before)  # both steps skipped by the scaler


def test_too_few_batches_are_refused_before_the_first_update():
    model = torch.nn.Linear(3, 2)
    before = _state(model)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(batch).pow(2).mean()

    sized = ([torch.randn(4, 3)] * 3, (torch.randn(4, 3),) * 3, torch.utils.data.TensorDataset(torch.randn(3, 3)))
    for batches in sized:
        with pytest.raises(ValueError, match="batches has 3 batches but steps=5"):
            train(model, batches, loss_fn, steps=5, progress=False)
    assert not calls and _same(model, before)


def test_an_iterator_that_runs_out_leaves_the_model_as_it_was():
    model = torch.nn.Linear(3, 2)
    model.eval()
    before = _state(model)
    with pytest.raises(ValueError, match="batches ran out after 3 of 5 steps .*as it was before train"):
        train(model, (torch.randn(4, 3) for _ in range(3)), lambda m, b: m(b).pow(2).mean(), steps=5, progress=False)
    assert _same(model, before) and not model.training and all(p.grad is None for p in model.parameters())


def test_a_failing_loss_fn_undoes_the_updates_but_a_stopping_callback_keeps_them():
    model = torch.nn.Linear(3, 2)
    before = _state(model)

    def broken(m, batch):
        if batch is None:
            raise RuntimeError("bad batch")
        return m(batch).pow(2).mean()

    with pytest.raises(RuntimeError, match="bad batch"):
        train(model, [torch.randn(4, 3), torch.randn(4, 3), None], broken, steps=3, progress=False)
    assert _same(model, before)

    class Stop(Exception):
        """A callback's early stop (head_ablation's target accuracy)."""

    def stop(step, loss):
        if step == 1:
            raise Stop

    with pytest.raises(Stop):
        train(model, [torch.randn(4, 3)] * 3, broken, steps=3, progress=False, callback=stop)
    assert not _same(model, before)  # the two steps made are kept


# ------------------------------------------------------------------ 5. exact_match
def test_exact_match_refuses_no_pairs_and_a_bad_batch_size():
    model, pairs = _seq2seq(), load_split("test")[:3]
    with pytest.raises(ValueError, match="pairs is empty"):
        exact_match(model, [], source_vocab(), target_vocab())
    with pytest.raises(ValueError, match="batch_size must be a positive int; got 0"):
        exact_match(model, pairs, source_vocab(), target_vocab(), batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        exact_match(model, pairs, source_vocab(), target_vocab(), batch_size=True)
    accuracy, predictions = exact_match(model, pairs, source_vocab(), target_vocab(), batch_size=2)
    assert 0.0 <= accuracy <= 1.0 and len(predictions) == 3
