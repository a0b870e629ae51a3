"""Notebook 11's translator: the recipe that trains it, the checkpoint it produced, its accuracy.

    python -m course_lib.experiments.capstone [--steps N] [--seed S] [--threads T] [--out PATH] [--force]

trains the toy translation model with `course_lib.experiments.training.train` and writes
course_lib/data/checkpoints/capstone.safetensors plus capstone.json (config, seed, accuracy, loss curve,
the command and how long it took). Those are the recorded checkpoint: a run that would write over an
existing file is refused before it trains, unless --force (or --out names a new file).
`load_capstone()` loads the recorded checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Hashable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch

from course_lib._validate import check_bool, check_positive_int
from course_lib.experiments.head_gate import gated_heads
from course_lib.experiments.toy_translation import load_split, source_vocab, target_vocab
from course_lib.experiments.training import (
    batch_iterator,
    collate_pairs,
    load_model,
    save_checkpoint,
    seq2seq_loss,
    set_seed,
    train,
)
from course_lib.mha import MultiHeadAttention
from course_lib.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from course_lib.tools.cli import output_file, positive_int, seed
from course_lib.tools.paths import PACKAGE_DATA, refuse_overwrite

__all__ = ["CAPSTONE_RECIPE", "CAPSTONE_PATH", "CAPSTONE_BF16_PATH", "encode_pairs", "exact_match",
           "teacher_forced_metrics", "attention_modules", "removed_heads", "HeadCost", "head_cost", "rank_heads",
           "build_capstone_model", "load_capstone",
           "train_capstone"]

CAPSTONE_PATH = PACKAGE_DATA / "checkpoints" / "capstone.safetensors"
CAPSTONE_BF16_PATH = PACKAGE_DATA / "checkpoints" / "capstone_bf16.safetensors"  # trained under bfloat16 autocast
CAPSTONE_RECIPE = {"d_model": 64, "num_heads": 4, "d_ff": 256, "num_encoder_layers": 2, "num_decoder_layers": 2,
                   "dropout": 0.0, "max_len": 32, "norm_first": True, "positional": "sinusoidal"}


def encode_pairs(pairs: Sequence[dict[str, str]], src_vocab, tgt_vocab) -> list[tuple[list[int], list[int]]]:
    return [(src_vocab.encode(p["src"]), tgt_vocab.encode(p["tgt"])) for p in pairs]


@torch.no_grad()
def exact_match(model, pairs: Sequence[dict[str, str]], src_vocab, tgt_vocab, *, batch_size: int = 250,
                use_cache: bool = True) -> tuple[float, list[str]]:
    """(fraction of sentences translated exactly, the predicted translations) with batched greedy decoding.

    `pairs` must hold at least one pair (an accuracy over no sentences is undefined, not 0); batch_size >= 1.
    """
    check_positive_int("batch_size", batch_size)
    if len(pairs) == 0:
        raise ValueError("pairs is empty: exact_match needs at least one {'src', 'tgt'} pair to score")
    predictions = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        src, _, _ = collate_pairs(encode_pairs(chunk, src_vocab, tgt_vocab))
        out = model.greedy_decode(src, max_new_tokens=model.config.max_len - 1, use_cache=use_cache)
        predictions += [tgt_vocab.decode(row.tolist()) for row in out]
    correct = sum(p == q["tgt"] for p, q in zip(predictions, pairs, strict=True))
    return correct / len(pairs), predictions


@torch.no_grad()
def teacher_forced_metrics(model, pairs: Sequence[dict[str, str]], src_vocab, tgt_vocab) -> tuple[float, float]:
    """(mean token cross-entropy, token accuracy) of one teacher-forced pass over `pairs` (padding ignored)."""
    src, tgt_in, tgt_out = collate_pairs(encode_pairs(pairs, src_vocab, tgt_vocab))
    logits = model(src, tgt_in)  # (B, T, V)
    real = tgt_out != model.config.pad_id  # (B, T)
    loss = seq2seq_loss(model, (src, tgt_in, tgt_out))
    accuracy = (logits.argmax(-1) == tgt_out)[real].float().mean()
    return float(loss), float(accuracy)


def attention_modules(model) -> dict[str, MultiHeadAttention]:
    """Every attention of a Seq2SeqTransformer by name: "encoder 1 self", "decoder 1 self", "decoder 1 cross", ..."""
    found = {f"encoder {i + 1} self": layer.self_attn for i, layer in enumerate(model.encoder_layers)}
    for i, layer in enumerate(model.decoder_layers):
        found[f"decoder {i + 1} self"] = layer.self_attn
        found[f"decoder {i + 1} cross"] = layer.cross_attn
    return found


@contextmanager
def removed_heads(model, heads: Iterable[tuple[str, int]]):
    """Inside the block, the listed heads ((attention name, head index) pairs, names as in `attention_modules`)
    contribute nothing: their output is multiplied by a gate of 0 before W_O (Michel et al. 2019's xi_h = 0),
    with `course_lib.experiments.head_gate.gated_heads` (a forward pre-hook on each attention's out_proj, so the
    fused and the math path are both gated). The model is unchanged afterwards, also when the block raises."""
    modules = attention_modules(model)
    gates: dict[str, torch.Tensor] = {}
    for name, head in heads:
        if name not in modules:
            raise ValueError(f"heads: no attention named {name!r}; the model has {sorted(modules)}")
        H = modules[name].num_heads
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < H:
            raise ValueError(f"heads: head index must be an int in [0, {H}) for {name!r}; got {head!r}")
        gates.setdefault(name, torch.ones(H))[head] = 0.0
    with gated_heads({modules[name]: gate for name, gate in gates.items()}):
        yield


class HeadCost(NamedTuple):
    """What removing one head costs: teacher-forced tokens it gets wrong that the full model got right (an int),
    and the rise of the validation loss rounded to a stated resolution."""

    tokens_lost: int
    loss_rise: float


def head_cost(base: tuple[float, float], removed: tuple[float, float], n_tokens: int, *,
              resolution: float = 1e-3) -> HeadCost:
    """Compare `teacher_forced_metrics` with all heads (`base`) and with a head removed (`removed`), both
    (loss, token accuracy) over the same `n_tokens` target tokens. The token count is exact; the loss rise is
    rounded to a multiple of `resolution`, so that differences at float rounding level (another CPU kernel,
    another thread count) cannot change a ranking built from it."""
    check_positive_int("n_tokens", n_tokens)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)) or not 0 < resolution < 1:
        raise ValueError(f"resolution must be a number in (0, 1); got {resolution!r}")
    for name, pair in (("base", base), ("removed", removed)):
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
            raise TypeError(f"{name} must be a (loss, token accuracy) tuple of numbers; got {pair!r}")
        if not 0.0 <= pair[1] <= 1.0:
            raise ValueError(f"{name}: token accuracy must lie in [0, 1]; got {pair[1]!r}")
    tokens_lost = round((base[1] - removed[1]) * n_tokens)
    steps = round((removed[0] - base[0]) / resolution)
    return HeadCost(tokens_lost, steps * resolution)


Head = TypeVar("Head", bound=Hashable)


def rank_heads(costs: Mapping[Head, HeadCost], *, least_important_first: bool = False) -> list[Head]:
    """Heads most important first (more tokens lost, then the larger rounded loss rise), or least important first
    for a pruning order. Heads that tie on both keep the mapping's order in either direction (for
    `attention_modules`' order: layer by layer, head by head), so rounding noise cannot reorder them."""
    check_bool("least_important_first", least_important_first)
    for head, cost in costs.items():
        if not isinstance(cost, HeadCost):
            raise TypeError(f"costs[{head!r}] must be a HeadCost (from head_cost); got {type(cost).__name__}")
    return sorted(costs, key=lambda head: (costs[head].tokens_lost, costs[head].loss_rise),
                  reverse=not least_important_first)


def load_capstone(path: Path | str = CAPSTONE_PATH):
    """(model in eval mode, source vocab, target vocab, info) from the capstone checkpoint."""
    model, info = load_model(path, lambda config: Seq2SeqTransformer(Seq2SeqConfig.from_dict(config)),
                             "Seq2SeqTransformer")
    return model, source_vocab(), target_vocab(), info


def build_capstone_model(seed: int, **overrides):
    src_vocab, tgt_vocab = source_vocab(), target_vocab()
    config = Seq2SeqConfig(len(src_vocab), len(tgt_vocab), **{**CAPSTONE_RECIPE, **overrides})
    set_seed(seed)
    return Seq2SeqTransformer(config), src_vocab, tgt_vocab


def train_capstone(*, steps: int = 2000, seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
                   warmup_steps: int = 200, out: Path | str = CAPSTONE_PATH, progress: bool = True,
                   command: str = "", amp_dtype: torch.dtype | None = None, force: bool = False) -> dict:
    """Train the capstone on the CPU and write the checkpoint `out` and its record (`out` with .json).
    amp_dtype=torch.bfloat16 trains under CPU autocast (mixed precision; the weights stay float32).

    The default `out` is the recorded checkpoint: if `out` or its .json exists, the call is refused
    (ValueError) before it trains, unless force=True.
    """
    out = Path(out)
    check_bool("force", force)
    refuse_overwrite([out, out.with_suffix(".json")], force=force, argument="out",
                     how="pass another out, or force=True to replace them")
    model, src_vocab, tgt_vocab = build_capstone_model(seed)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    train_examples = encode_pairs(load_split("train"), src_vocab, tgt_vocab)
    batches = batch_iterator(train_examples, batch_size, seed=seed)
    result = train(model, batches, seq2seq_loss, steps=steps, lr=lr, seed=seed, warmup_steps=warmup_steps,
                   progress=progress, desc="capstone", amp_dtype=amp_dtype)
    val_acc, _ = exact_match(model, load_split("validation"), src_vocab, tgt_vocab)
    test_acc, _ = exact_match(model, load_split("test"), src_vocab, tgt_vocab)
    info = {
        "config": model.config.to_dict(), "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "warmup_steps": warmup_steps, "optimizer": "AdamW(betas=(0.9, 0.98)), linear warm-up + cosine to 0.1 lr",
        "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else "none (float32)",
        "train_seconds": round(result.seconds, 1),
        "machine_load": f"{os.cpu_count()} CPU cores, 1-minute load average {load_before:.1f} at the start",
        "torch_threads": torch.get_num_threads(),
        "device": f"cpu ({platform.machine()})", "torch": torch.__version__,
        "validation_exact_match": val_acc, "test_exact_match": test_acc,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_every_10_steps": [round(x, 5) for x in result.losses[::10]],
        "command": command,
    }
    save_checkpoint(out, model, config=model.config.to_dict(),
                    metadata={k: info[k] for k in ("seed", "steps", "test_exact_match", "command")})
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m course_lib.experiments.capstone",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", type=output_file, default=CAPSTONE_PATH,
                        help="the checkpoint to write (its record goes next to it, .json); default: the recorded one")
    parser.add_argument("--force", action="store_true",
                        help="write over --out and its .json if they exist (by default such a run is refused)")
    parser.add_argument("--autocast", choices=("none", "bfloat16"), default="none",
                        help="train under CPU autocast in bfloat16 (mixed precision); default float32")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    try:
        refuse_overwrite([out, out.with_suffix(".json")], force=args.force, argument="--out",
                         how="pass --out PATH to write elsewhere, or --force to replace them")
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, before any training
    command = " ".join(["python -m course_lib.experiments.capstone", *argv])
    info = train_capstone(steps=args.steps, seed=args.seed, out=out, command=command,
                          amp_dtype=torch.bfloat16 if args.autocast == "bfloat16" else None, force=args.force)
    print(f"trained {info['steps']} steps in {info['train_seconds']} s on {info['torch_threads']} threads; "
          f"validation exact match {info['validation_exact_match']:.3f}, test {info['test_exact_match']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
