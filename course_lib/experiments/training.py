"""A small, reusable training loop (seeded, tqdm, returns the loss curve) and safetensors checkpoints.

    result = train(model, batches, loss_fn, steps=500, lr=1e-3, seed=0)
    result.losses            # one float per step: the same seed gives the same curve on the CPU
    save_checkpoint("m.safetensors", model, config=cfg.to_dict())
    load_checkpoint("m.safetensors", model)   # clear errors on wrong shapes, a corrupted or a non-checkpoint file

The recipe that trains notebook 11's translator with this loop is `course_lib.experiments.capstone`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

with warnings.catch_warnings():  # without ipywidgets tqdm.auto warns, then falls back to a text bar: fine
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

from course_lib._validate import check_positive_int, shape_str
from course_lib.experiments.precision import amp_backward_step

__all__ = [
    "TrainResult", "set_seed", "train", "warmup_cosine", "collate_pairs", "batch_iterator", "seq2seq_loss",
    "save_checkpoint", "read_checkpoint", "load_checkpoint", "load_model", "CheckpointError", "tensors_digest",
    "checkpoint_digest",
]

CHECKPOINT_FORMAT = "course_lib.checkpoint/1"
DIGEST_FORMAT = "sha256:tensors+format+config+metadata"  # what the header's "sha256" covers (absent: tensors only)

Batch = TypeVar("Batch")  # whatever `batches` yields: loss_fn(model, batch) reads it
M = TypeVar("M", bound=nn.Module)  # the model class a checkpoint's config builds


# =========================================================================== the loop
@dataclass
class TrainResult:
    """What `train` recorded: the loss and the gradient norm of every step, and the wall time."""

    losses: list[float] = field(default_factory=list)  # one per step
    grad_norms: list[float] = field(default_factory=list)  # global grad norm before clipping, one per step
    seconds: float = 0.0


def set_seed(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (model init, dropout)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global generator is what notebooks' np.random uses
    torch.manual_seed(seed)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_ratio * lr."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable[[nn.Module, Batch], torch.Tensor], *,
          steps: int, lr: float = 1e-3, seed: int = 0, warmup_steps: int = 0, weight_decay: float = 0.0,
          betas: tuple[float, float] = (0.9, 0.98), grad_clip: float | None = 1.0,
          schedule: Callable[[int], float] | None = None, progress: bool = True, desc: str = "training",
          callback: Callable[[int, float], None] | None = None, amp_dtype: torch.dtype | None = None,
          scaler: torch.amp.GradScaler | None = None) -> TrainResult:
    """AdamW for `steps` steps over `batches` (an iterable yielding at least `steps` batches).

    Seeds torch before the first step (dropout), so the same model initialisation, batches and
    seed give the same loss curve. loss_fn(model, batch) returns a scalar tensor.
    schedule(step) multiplies lr; by default `warmup_cosine(warmup_steps, steps)`. grad_clip=None
    does not clip (the norm is still recorded). callback(step, loss) runs after each step.
    amp_dtype (torch.bfloat16 or torch.float16): run loss_fn under torch.autocast on the model's device
    (mixed precision, notebook 09); the parameters and the optimizer stay float32. scaler: a
    torch.amp.GradScaler, for float16 (`precision.amp_backward_step` does the update either way).
    Returns TrainResult(losses, grad_norms, seconds).

    A run that fails leaves the model as it was before the call (weights, buffers, grads, train/eval mode):
    * `batches` with a length (a list, a tuple, a DataLoader) shorter than `steps` is refused before
      the first step. An iterator has no length: if it runs out at step k, ValueError("batches ran out
      after k of steps steps"), and the k updates already made are undone.
    * a non-finite loss, or a finite loss whose gradients are NaN/inf (a NaN that backward makes, e.g.
      sqrt(0)'s gradient), raises FloatingPointError naming the step, and the updates are undone, so the
      weights stay finite. Raising rather than skipping the step: in float32 or bfloat16 a NaN gradient is
      a bug or a divergence that a skipped step would hide (the loss curve would look flat, not broken).
      With a `scaler` (float16) inf/NaN gradients are the expected overflow the scaler handles: it skips
      that step and lowers its scale, and training goes on.
    * an exception from loss_fn or from the batches' iterator also undoes the updates.
    An exception that `callback` raises is not a failure: it is how a caller stops early (head_ablation's
    target accuracy), so it propagates and the model keeps the steps it made; so does a KeyboardInterrupt.
    The undo is a copy of the state_dict taken before the first step (one more copy of the weights).
    """
    check_positive_int("steps", steps)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch); got {type(loss_fn).__name__}")
    if amp_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16; got {amp_dtype!r}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None; got {type(scaler).__name__}")
    if scaler is not None and amp_dtype is None:
        raise ValueError("scaler is for float16 autocast: pass amp_dtype=torch.float16 with it")
    available = _length(batches)
    if available is not None and available < steps:
        raise ValueError(f"batches has {available} batches but steps={steps}: train takes one batch per step; "
                         f"pass steps <= {available}, or more batches (e.g. an endless batch_iterator)")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or warmup_cosine(warmup_steps, steps))
    result = TrainResult()
    was_training = model.training
    before = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads_before = [(p, p.grad) for p in model.parameters()]

    def undo() -> None:  # the model as it was before the call
        with torch.no_grad():
            for name, value in model.state_dict(keep_vars=True).items():
                value.copy_(before[name])
        for p, grad in grads_before:
            p.grad = grad

    model.train()
    try:
        _run_steps(model, batches, loss_fn, steps, optimizer, scheduler, grad_clip, progress, desc, callback, result,
                   amp_dtype, scaler, undo)
    except BaseException:
        model.train(was_training)  # a failed call leaves the module's mode as it was
        raise
    model.eval()
    return result


def _length(batches: object) -> int | None:
    """len(batches) where it has one (a DataLoader over an IterableDataset may not), else None."""
    if not isinstance(batches, Sized):
        return None
    try:
        return len(batches)
    except TypeError:
        return None


def _run_steps(model, batches, loss_fn, steps, optimizer, scheduler, grad_clip, progress, desc, callback,
               result: TrainResult, amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None,
               undo: Callable[[], None]) -> None:
    start = time.perf_counter()
    params = list(model.parameters())
    device_type = params[0].device.type if params else "cpu"
    iterator = iter(batches)
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=0.5)
    for step in bar:
        try:
            batch = next(iterator)
            with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = loss_fn(model, batch)
        except StopIteration:
            undo()
            raise ValueError(f"batches ran out after {step} of {steps} steps (the model is as it was before "
                             f"train); pass as many batches as steps") from None
        except Exception:
            undo()
            raise
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.dtype.is_floating_point:
            undo()
            got = f"{shape_str(loss.shape)} {loss.dtype}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"loss_fn must return a scalar floating-point tensor (a mean over the batch); got {got}")
        if not torch.isfinite(loss):
            undo()
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate "
                                     f"(the model is as it was before train)")
        optimizer.zero_grad(set_to_none=True)
        grad_norm, grads_finite = amp_backward_step(loss, optimizer, params, scaler=scaler, grad_clip=grad_clip)
        if not grads_finite and scaler is None:  # with a scaler the step was skipped: float16's expected overflow
            undo()
            raise FloatingPointError(f"the gradients became NaN or inf at step {step} although the loss was finite "
                                     f"({loss.item():.4g}): a NaN made by backward (e.g. sqrt or log at 0, a "
                                     f"division by 0) or a divergence; the model is as it was before train")
        scheduler.step()
        result.losses.append(loss.item())
        result.grad_norms.append(grad_norm)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        if callback is not None:
            callback(step, result.losses[-1])
    result.seconds = time.perf_counter() - start


# =========================================================================== seq2seq batches
def collate_pairs(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0, bos_id: int = 1,
                  eos_id: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(src ids, tgt ids)] -> src (B, S), tgt_in (B, T) = <bos> + tgt, tgt_out (B, T) = tgt + <eos>, padded."""
    if not examples:
        raise ValueError("examples is empty")
    B = len(examples)
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples) + 1
    src = torch.full((B, S), pad_id, dtype=torch.long)
    tgt_in = torch.full((B, T), pad_id, dtype=torch.long)
    tgt_out = torch.full((B, T), pad_id, dtype=torch.long)
    for b, (s, t) in enumerate(examples):
        src[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        tgt_in[b, : len(t) + 1] = torch.as_tensor([bos_id, *t], dtype=torch.long)
        tgt_out[b, : len(t) + 1] = torch.as_tensor([*t, eos_id], dtype=torch.long)
    return src, tgt_in, tgt_out


def batch_iterator(examples: Sequence, batch_size: int, *, seed: int = 0, collate: Callable = collate_pairs,
                   epochs: int | None = None) -> Iterator:
    """Shuffled batches (a fresh permutation each epoch from numpy's Generator(seed)); endless by default."""
    check_positive_int("batch_size", batch_size)
    if len(examples) < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(examples)} examples")
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(len(examples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[i] for i in order[start: start + batch_size]])
        epoch += 1


def seq2seq_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 pad_id: int = 0) -> torch.Tensor:
    """Token-level cross-entropy of teacher-forced logits, ignoring <pad> targets."""
    src, tgt_in, tgt_out = batch
    logits = model(src, tgt_in)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=pad_id)


# =========================================================================== checkpoints
class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: not a checkpoint, or shapes that do not fit the model."""


def save_checkpoint(path: Path | str, model: nn.Module, *, config: dict | None = None,
                    metadata: dict | None = None) -> Path:
    """Write the model's state_dict as safetensors; config/metadata (JSON-able) go in the header.

    The header's "sha256" covers the tensors *and* the header's format, config and metadata (its
    "digest" field says so), so a changed byte anywhere in the file is refused by read_checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": CHECKPOINT_FORMAT, "digest": DIGEST_FORMAT, "config": json.dumps(config or {}, sort_keys=True),
              "metadata": json.dumps(metadata or {}, sort_keys=True)}
    header["sha256"] = checkpoint_digest(tensors, header)
    save_file(tensors, str(path), metadata=header)
    return path


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: safetensors itself has no checksum.

    This alone is the "sha256" of a checkpoint written before the digest covered the header too.
    """
    return _tensors_hash(tensors).hexdigest()


def checkpoint_digest(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> str:
    """SHA-256 over the tensors (as tensors_digest) and then the header's format, digest, config and metadata."""
    digest = _tensors_hash(tensors)
    _update_with_header(digest, header, ("format", "digest", "config", "metadata"))
    return digest.hexdigest()


def _tensors_hash(tensors: dict[str, torch.Tensor]):  # hashlib's object: its class is not public API
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def _update_with_header(digest, header: dict[str, str], keys: tuple[str, ...]) -> None:
    for key in keys:  # each value with its length in front: no two headers feed the same bytes
        value = header.get(key, "").encode()
        digest.update(f"{key}|{len(value)}|".encode())
        digest.update(value)


def _legacy_header_digest(header: dict[str, str]) -> str:
    digest = hashlib.sha256()
    _update_with_header(digest, header, ("format", "config", "metadata"))
    return digest.hexdigest()


# The checkpoints shipped in course_lib/data/checkpoints were written when "sha256" covered the tensors only
# (no "digest" field), and they are not rewritten (their bytes are the record). Their headers are pinned here:
# tensors' sha256 -> SHA-256 of (format, config, metadata), so that a changed config in one of them is refused.
_RECORDED_LEGACY_HEADERS = {
    "cec631c1c82b8f9117a2669f78310d1b53225d12c014440a212b24f1a5328dea":  # capstone.safetensors
        "f230e1d01755d701955f4ad5bf6e99f2e2d2f11fa3a1b5f0c6024b71b36f9d9a",
    "ae2ade50853a83dba52d731285e065a61b892f8c834ccab10f4928563e2a0343":  # capstone_bf16.safetensors
        "7ce093191255d33b93e5350bc46032b76484b8eddb5917130c1ade5aa2839c07",
    "015d949fa48def5b8b029f755461588a6c6ef0f8410838c6d6c36ae1fdf673a9":  # heads_one_lookup_attn_mlp_h8
        "b90a7aa22e46797b01175dbdbdb4bad8ede9f5afc378cc43db38375abec15660",
    "45c112099fd1d16090fb6c4c100edc50b68a66745837cc3e6d17b4090aa14268":  # heads_three_lookups_attn_mlp_h8
        "7839b03d9bcebf9cec57a9a47321c29aaa193bf53f900f820239bc5969118404",
    "ae3a813b1b9d1a6b8502a00a579e54c493d95c351baff8f99e6649a6a65bc1f5":  # heads_three_lookups_attn_only_h8
        "c310fc75f1d8b4475c5d7746dfb09ee8186e8391c18e6aad4cc0d840ff38a778",
    "99d25be6ad74816b0642d26e5544c9161651403e1ae52add677bd350ebd3b0a9":  # heads_two_lookups_attn_mlp_h8
        "e686eee355ffc9e01ebfa453d838497ee1bb26f9ef9fb03261e43bc9dab5080a",
    "e3161912ec28c8063b3109ca3803b3dcc559780a4ed4d7d21e6499870475bc2b":  # heads_two_lookups_attn_only_h8
        "094344a3ff09638921ccd5423d8d402b24cf66fe060c49975b838d0622f5e127",
}
_HEADER_KEYS = {"format", "digest", "config", "metadata", "sha256"}  # what save_checkpoint writes
_LEGACY_HEADER_KEYS = _HEADER_KEYS - {"digest"}


def read_checkpoint(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, {"config": dict, "metadata": dict}) of a checkpoint written by save_checkpoint.

    Refused with a CheckpointError: a file that is not safetensors or not a course_lib checkpoint, a
    header with keys save_checkpoint does not write or without its checksum, and any changed byte:

    * the current form (header "digest" = DIGEST_FORMAT): "sha256" covers the tensors and the format,
      config and metadata, so a flipped bit anywhere (a tensor, num_heads 4 -> 2) fails the checksum.
    * the older form (no "digest" field: every checkpoint written before, the shipped ones included):
      "sha256" covers the tensors only. It is still read, because the shipped checkpoints are records
      that are not rewritten: their tensors are checked as before, and their header against the copy
      pinned in _RECORDED_LEGACY_HEADERS, so a changed config in a shipped file is refused too. Any
      other file of the older form has no checksum over its config: it loads with a warning, and its
      config is checked only by what loading can see (every tensor's name and shape must fit the model
      the config builds; a num_heads that keeps the shapes cannot be seen). Saving it again with
      save_checkpoint writes the current form.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path.name!r} not found (looked for {path})")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a malformed header
        raise CheckpointError(f"{path.name} is not a safetensors checkpoint (could not read its header: "
                              f"{type(e).__name__}: {e}); was it saved with save_checkpoint?") from None
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path.name} is a safetensors file but not a course_lib checkpoint "
                              f"(header 'format' is {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    _verify(path, tensors, header)
    info = {}
    for key in ("config", "metadata"):
        try:
            info[key] = json.loads(header[key])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path.name}: the {key} in its header is not valid JSON ({e})") from None
        if not isinstance(info[key], dict):
            raise CheckpointError(f"{path.name}: the {key} in its header must be a JSON object; got {info[key]!r:.60}")
    return tensors, info


def _verify(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    """The checksum check of read_checkpoint (its docstring says what each form covers)."""
    legacy = "digest" not in header
    expected_keys = _LEGACY_HEADER_KEYS if legacy else _HEADER_KEYS
    if set(header) != expected_keys:
        odd, missing = sorted(set(header) - expected_keys), sorted(expected_keys - set(header))
        what = [f"keys save_checkpoint does not write {odd}"] * bool(odd) + [f"no {missing}"] * bool(missing)
        raise CheckpointError(f"{path.name} is corrupted or was edited: its header has {' and '.join(what)} "
                              f"(save_checkpoint writes {sorted(expected_keys)})")
    if not legacy:
        if header["digest"] != DIGEST_FORMAT:
            raise CheckpointError(f"{path.name}: unknown checksum kind {header['digest']!r} in its header (this "
                                  f"course_lib knows {DIGEST_FORMAT!r}); a corrupted file or a newer course_lib")
        if header["sha256"] != checkpoint_digest(tensors, header):
            raise CheckpointError(f"{path.name} is corrupted: its tensors or its header (format, config, metadata) "
                                  f"do not match the checksum saved with them")
        return
    if header["sha256"] != tensors_digest(tensors):
        raise CheckpointError(f"{path.name} is corrupted: its tensors do not match the checksum saved with them")
    pinned = _RECORDED_LEGACY_HEADERS.get(header["sha256"])
    if pinned is None:
        warnings.warn(f"{path.name} is a checkpoint of the older form, whose checksum covers its tensors only: "
                      f"its config is checked only against the tensors' shapes; load it and save it again with "
                      f"save_checkpoint to cover the config too", stacklevel=3)
    elif _legacy_header_digest(header) != pinned:
        raise CheckpointError(f"{path.name} is corrupted: its header (format, config, metadata) differs from the "
                              f"one recorded with these tensors")


def load_checkpoint(path: Path | str, model: nn.Module) -> dict:
    """Load weights into `model` after checking every name and shape; return {"config", "metadata"}."""
    tensors, info = read_checkpoint(path)
    _load_into(model, tensors, info, Path(path))
    return info


def load_model(path: Path | str, build: Callable[[dict], M], what: str = "model") -> tuple[M, dict]:
    """(model in eval mode, {"config", "metadata"}): build(config) from the checkpoint's header, then its weights.

    The file is read (and its checksum verified) once. A config that `build` rejects is a
    CheckpointError that says the file is not a `what` checkpoint.
    """
    tensors, info = read_checkpoint(path)
    try:
        model = build(info["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path).name} is not a {what} checkpoint: its config {info['config']} "
                              f"does not build one ({e})") from None
    _load_into(model, tensors, info, Path(path))
    return model.eval(), info


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], info: dict, path: Path) -> None:
    """Check every name, shape and dtype kind and that the weights are finite, then load them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    kinds = [(k, tensors[k].dtype, v.dtype) for k, v in expected.items()
             if k in tensors and tensors[k].dtype.is_floating_point != v.dtype.is_floating_point]
    if kinds:
        k, got, want = kinds[0]
        raise CheckpointError(f"{Path(path).name}: tensor {k} is {got} but the model's is {want} "
                              f"({len(kinds)} such tensors); it would be cast silently")
    bad = [k for k, t in tensors.items() if t.dtype.is_floating_point and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{Path(path).name}: tensors with NaN or inf values, e.g. {bad[:3]}: a corrupted "
                              f"file or a run that diverged")
    if missing or unexpected or wrong:
        problems = [f"{k}: checkpoint {shape_str(got)} vs model {shape_str(want)}" for k, got, want in wrong[:5]]
        if missing:
            problems.append(f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors the model does not have, e.g. {unexpected[:3]}")
        hint = f" The checkpoint was saved with config {info['config']}." if info["config"] else ""
        raise CheckpointError(f"{Path(path).name} does not fit this model ({len(wrong)} shape mismatches): "
                              + "; ".join(problems) + "." + hint)
    model.load_state_dict(tensors)
