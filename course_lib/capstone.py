"""Notebook 11's translator: the recipe that trains it, the checkpoint it produced, its accuracy.

    python -m course_lib.capstone [--steps N] [--seed S] [--threads T] [--out PATH]

trains the toy translation model with `course_lib.training.train` and writes
course_lib/data/checkpoints/capstone.safetensors plus capstone.json (config, seed, accuracy, loss curve,
the command and how long it took). `load_capstone()` loads the recorded checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from course_lib.paths import DATA_DIR
from course_lib.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from course_lib.toy_translation import load_split, source_vocab, target_vocab
from course_lib.training import (
    batch_iterator,
    collate_pairs,
    load_model,
    save_checkpoint,
    seq2seq_loss,
    set_seed,
    train,
)

__all__ = ["CAPSTONE_RECIPE", "CAPSTONE_PATH", "encode_pairs", "exact_match", "build_capstone_model",
           "load_capstone", "train_capstone"]

CAPSTONE_PATH = DATA_DIR / "checkpoints" / "capstone.safetensors"
CAPSTONE_RECIPE = {"d_model": 64, "num_heads": 4, "d_ff": 256, "num_encoder_layers": 2, "num_decoder_layers": 2,
                   "dropout": 0.0, "max_len": 32, "norm_first": True, "positional": "sinusoidal"}


def encode_pairs(pairs: Sequence[dict[str, str]], src_vocab, tgt_vocab) -> list[tuple[list[int], list[int]]]:
    return [(src_vocab.encode(p["src"]), tgt_vocab.encode(p["tgt"])) for p in pairs]


@torch.no_grad()
def exact_match(model, pairs: Sequence[dict[str, str]], src_vocab, tgt_vocab, *, batch_size: int = 250,
                use_cache: bool = True) -> tuple[float, list[str]]:
    """(fraction of sentences translated exactly, the predicted translations) with batched greedy decoding."""
    predictions = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        src, _, _ = collate_pairs(encode_pairs(chunk, src_vocab, tgt_vocab))
        out = model.greedy_decode(src, max_new_tokens=model.config.max_len - 1, use_cache=use_cache)
        predictions += [tgt_vocab.decode(row.tolist()) for row in out]
    correct = sum(p == q["tgt"] for p, q in zip(predictions, pairs, strict=True))
    return correct / max(1, len(pairs)), predictions


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
                   command: str = "") -> dict:
    model, src_vocab, tgt_vocab = build_capstone_model(seed)
    train_examples = encode_pairs(load_split("train"), src_vocab, tgt_vocab)
    batches = batch_iterator(train_examples, batch_size, seed=seed)
    result = train(model, batches, seq2seq_loss, steps=steps, lr=lr, seed=seed, warmup_steps=warmup_steps,
                   progress=progress, desc="capstone")
    val_acc, _ = exact_match(model, load_split("validation"), src_vocab, tgt_vocab)
    test_acc, _ = exact_match(model, load_split("test"), src_vocab, tgt_vocab)
    info = {
        "config": model.config.to_dict(), "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "warmup_steps": warmup_steps, "optimizer": "AdamW(betas=(0.9, 0.98)), linear warm-up + cosine to 0.1 lr",
        "train_seconds": round(result.seconds, 1), "torch_threads": torch.get_num_threads(),
        "device": f"cpu ({platform.machine()})", "torch": torch.__version__,
        "validation_exact_match": val_acc, "test_exact_match": test_acc,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_every_10_steps": [round(x, 5) for x in result.losses[::10]],
        "command": command,
    }
    out = Path(out)
    save_checkpoint(out, model, config=model.config.to_dict(),
                    metadata={k: info[k] for k in ("seed", "steps", "test_exact_match", "command")})
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m course_lib.capstone", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(CAPSTONE_PATH))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python -m course_lib.capstone", *argv])
    info = train_capstone(steps=args.steps, seed=args.seed, out=args.out, command=command)
    print(f"trained {info['steps']} steps in {info['train_seconds']} s on {info['torch_threads']} threads; "
          f"validation exact match {info['validation_exact_match']:.3f}, test {info['test_exact_match']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
