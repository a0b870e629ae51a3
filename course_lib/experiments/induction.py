"""Induction heads in a small attention-only transformer (Elhage et al. 2021; Olsson et al. 2022).

The task: a random prefix of L tokens from a vocabulary of V, then the same prefix again (2L tokens),
next-token prediction. The first half cannot be predicted (its loss is ln V at best); in the repeated
half, token t+1 is the token after the previous occurrence of token t, at position t - L + 1. L is
drawn afresh for every batch, so no fixed positional offset finds it: the model must find the earlier
copy of the current token by its content.

An induction head does this in two steps (K-composition): a *previous-token head* in layer 1 writes
"my previous token was a" into position s; an *induction head* in layer 2 attends from a query whose
token is a to that key, and copies the token at s. A one-layer model has no earlier layer to write
"my previous token" with, so its heads can only see each key's own token and position.

    model = AttentionOnlyTransformer(vocab=64, max_len=48, d_model=64, num_heads=2, num_layers=2)
    x = repeated_tokens(batch=8, prefix_len=12, vocab=64, generator=torch.Generator().manual_seed(0))
    logits, weights = model(x, need_weights=True)    # (8, 24, 64), [(8, 2, 24, 24)] * num_layers
    half_losses(logits, x, 12)                       # (first-half loss, repeated-half loss)
    induction_score(weights[1], 12)                  # (H,): mean weight on position t - L + 1
    previous_token_score(weights[0])                 # (H,): mean weight on position t - 1

`head_gate` (num_layers, num_heads) scales each head's output before W_O (`head_gate.gated_heads`):
0 removes the head, as the ablation of the recorded run does. The run itself is
scripts/run_induction_heads.py; notebook 08 reads its record from data/induction/.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib._validate import check_positive_int
from course_lib.experiments.head_analysis import as_numpy_attention, previous_token
from course_lib.experiments.head_gate import gated_heads
from course_lib.experiments.training import train
from course_lib.mha import MultiHeadAttention

__all__ = ["InductionConfig", "train_induction_model", "repeated_tokens", "AttentionOnlyTransformer", "half_losses",
           "in_context_drop", "context_mass", "previous_token_score", "induction_score", "phase_change_step",
           "ablation_table", "DATA_SEED_OFFSET"]


# --------------------------------------------------------------------------------------------- data
def repeated_tokens(batch: int, prefix_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 2 * prefix_len) long tokens: a uniform random prefix (drawn with replacement), then it again."""
    check_positive_int("batch", batch)
    check_positive_int("prefix_len", prefix_len)
    check_positive_int("vocab", vocab)
    if prefix_len < 2:
        raise ValueError(f"prefix_len must be >= 2 (the repeated half needs a token to predict); got {prefix_len}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    prefix = torch.randint(0, vocab, (batch, prefix_len), generator=generator)  # (B, L)
    return torch.cat([prefix, prefix], dim=1)  # (B, 2L)


# --------------------------------------------------------------------------------------------- model
class AttentionOnlyTransformer(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab): embeddings + learned positions, attention-only layers, unembedding.

    Each layer is x = x + MHA(LN(x)), causal (a `course_lib.MultiHeadAttention`); no MLP. head_gate
    (num_layers, num_heads) multiplies each head's output before its W_O (1 keeps it, 0 removes it).
    """

    def __init__(self, vocab: int, max_len: int, d_model: int = 64, num_heads: int = 2, num_layers: int = 2) -> None:
        super().__init__()
        for name, value in (("vocab", vocab), ("max_len", max_len), ("d_model", d_model),
                            ("num_heads", num_heads), ("num_layers", num_layers)):
            check_positive_int(name, value)
        self.config = dict(vocab=vocab, max_len=max_len, d_model=d_model, num_heads=num_heads, num_layers=num_layers)
        self.num_layers, self.num_heads = num_layers, num_heads
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
        self.attns = nn.ModuleList(MultiHeadAttention(d_model, num_heads) for _ in range(num_layers))
        self.norm, self.unembed = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor, head_gate: torch.Tensor | None = None, need_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, T, vocab), and with need_weights every layer's attention weights [(B, H, T, T)]."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype != torch.long:
            raise TypeError(f"tokens must be a (B, T) torch.long tensor; got "
                            f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        T = tokens.shape[1]
        if T > self.config["max_len"]:
            raise ValueError(f"tokens has {T} positions but the model has max_len={self.config['max_len']}")
        if head_gate is not None and tuple(head_gate.shape) != (self.num_layers, self.num_heads):
            raise ValueError(f"head_gate must have shape (num_layers, num_heads) = ({self.num_layers}, "
                             f"{self.num_heads}); got {tuple(head_gate.shape)}")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device))  # (B, T, D)
        weights = []
        for i, (norm, attn) in enumerate(zip(self.norms, self.attns, strict=True)):
            with gated_heads({} if head_gate is None else {attn: head_gate[i]}):
                out, w = attn(norm(x), is_causal=True, need_weights=True)  # (B, T, D), (B, H, T, T)
            x = x + out
            weights.append(w)
        logits = self.unembed(self.norm(x))  # (B, T, V)
        return (logits, weights) if need_weights else logits


# --------------------------------------------------------------------------------------------- losses
def _check_halves(logits: torch.Tensor, tokens: torch.Tensor, prefix_len: int) -> None:
    """logits (B, T, V) for tokens (B, T) made of a prefix of prefix_len >= 2 tokens and its repeat."""
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and tokens (B, T); got {tuple(logits.shape)} and "
                         f"{tuple(tokens.shape)}")
    check_positive_int("prefix_len", prefix_len)
    if tokens.shape[1] != 2 * prefix_len or prefix_len < 2:
        raise ValueError(f"tokens must have 2 * prefix_len positions with prefix_len >= 2; got {tokens.shape[1]} "
                         f"positions and prefix_len={prefix_len}")


def half_losses(logits: torch.Tensor, tokens: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-half loss, repeated-half loss): mean cross-entropies, scalars with gradients.

    Position t predicts token t+1. The first half: the predictions of tokens 1 .. L-1 (positions
    0 .. L-2), random. The repeated half: tokens L+1 .. 2L-1 (positions L .. 2L-2), each the token after
    the previous occurrence of the current one. Token L (the first repeated token, predicted at
    position L-1) is in neither: nothing before it says that the repeat starts there.
    """
    _check_halves(logits, tokens, prefix_len)
    L = prefix_len
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, 2L-1)
    return per_token[:, : L - 1].mean(), per_token[:, L:].mean()


def in_context_drop(model: nn.Module, tokens: torch.Tensor, prefix_len: int,
                    head_gate: torch.Tensor | None = None) -> dict[str, float]:
    """{"first", "repeated", "drop"}: the two half losses and first - repeated, on a fixed batch, no grad."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(tokens, head_gate=head_gate)
    model.train(was_training)
    first, repeated = half_losses(logits, tokens, prefix_len)
    return {"first": float(first), "repeated": float(repeated), "drop": float(first - repeated)}


def context_mass(logits: torch.Tensor, tokens: torch.Tensor, prefix_len: int) -> tuple[float, float]:
    """(first half, repeated half): the mean probability the prediction at t gives to tokens among 0 .. t.

    The halves are the positions of `half_losses`. Predicting the context's own tokens (copying) raises this
    above what a uniform prediction gives (the share of distinct context tokens in the vocabulary); an exact
    induction gives 1 in the repeated half. Pass zero logits for the uniform baseline.
    """
    _check_halves(logits, tokens, prefix_len)
    V = logits.shape[-1]
    seen = F.one_hot(tokens, V).cumsum(1) > 0  # (B, T, V): token v occurs at or before t
    mass = (logits.detach().float().softmax(-1) * seen).sum(-1)  # (B, T)
    return float(mass[:, : prefix_len - 1].mean()), float(mass[:, prefix_len:-1].mean())


# --------------------------------------------------------------------------------------------- head scores
def previous_token_score(weights) -> np.ndarray:
    """Mean weight on position t-1 over query rows t >= 1, per head: (H,) (batch axes averaged).

    1 for a head that always looks one back; a uniform causal head gives row t weight 1/(t+1).
    """
    return previous_token(weights)


def induction_score(weights, prefix_len: int) -> np.ndarray:
    """Mean weight on position t - L + 1 over the repeated half's query rows t = L .. 2L-1, per head: (H,).

    weights (..., H, 2L, 2L) of a repeated sequence. Position t - L + 1 holds the token that followed the
    previous occurrence of token t: where an induction head looks. Batch axes are averaged.
    """
    check_positive_int("prefix_len", prefix_len)
    a = as_numpy_attention(weights)
    T, S = a.shape[-2:]
    if T != 2 * prefix_len or S != T:
        raise ValueError(f"weights must be (..., H, 2L, 2L) with L = prefix_len = {prefix_len}; got {a.shape}")
    rows = np.arange(prefix_len, T)  # (L,)
    per_row = a[..., rows, rows - prefix_len + 1]  # (..., H, L)
    out = per_row.mean(-1)
    return out.reshape(-1, out.shape[-1]).mean(0) if out.ndim > 1 else out


# --------------------------------------------------------------------------------------------- training curves
def phase_change_step(first: Sequence[float], repeated: Sequence[float], window: int = 25,
                      fraction: float = 0.5) -> int | None:
    """The first step at which the smoothed in-context drop (first - repeated) reaches `fraction` of its
    final value; None when the final drop is not positive (no in-context learning to locate).

    Both curves are per-step losses; smoothing is a trailing mean over `window` steps, and the final
    value is the mean of the last `window` steps.
    """
    check_positive_int("window", window)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1); got {fraction!r}")
    f, r = np.asarray(first, dtype=np.float64), np.asarray(repeated, dtype=np.float64)
    if f.ndim != 1 or f.shape != r.shape or f.size < window:
        raise ValueError(f"first and repeated must be equally long 1-D curves of at least window={window} steps; "
                         f"got shapes {f.shape} and {r.shape}")
    d = f - r  # (steps,)
    smooth = np.convolve(d, np.ones(window) / window, mode="valid")  # smooth[i]: mean of steps i .. i+window-1
    final = smooth[-1]
    if final <= 0:
        return None
    hit = np.nonzero(smooth >= fraction * final)[0]
    return int(hit[0] + window - 1)


def ablation_table(model: AttentionOnlyTransformer, tokens: torch.Tensor, prefix_len: int) -> dict:
    """The in-context drop of the full model and with each head removed alone (its gate 0).

    Returns {"full": in_context_drop(...), "heads": [[in_context_drop(...) per head] per layer]}.
    """
    gate = torch.ones(model.num_layers, model.num_heads)
    table: dict = {"full": in_context_drop(model, tokens, prefix_len, gate), "heads": []}
    for layer in range(model.num_layers):
        row = []
        for head in range(model.num_heads):
            g = gate.clone()
            g[layer, head] = 0.0
            row.append(in_context_drop(model, tokens, prefix_len, g))
        table["heads"].append(row)
    return table


# --------------------------------------------------------------------------------------------- training
DATA_SEED_OFFSET = 1000  # the batches' generator is seeded apart from the model's initialisation


@dataclass
class InductionConfig:
    """One training run: the task (vocab, prefix lengths), the model's sizes and the optimiser."""

    num_layers: int = 2
    num_heads: int = 2
    d_model: int = 64
    vocab: int = 64
    min_prefix: int = 8  # every batch draws its prefix length L uniformly from min_prefix .. max_prefix
    max_prefix: int = 20
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the field for a size that is not a positive int or prefix lengths out of order."""
        for name in ("num_layers", "num_heads", "d_model", "vocab", "min_prefix", "max_prefix", "steps",
                     "batch_size", "warmup_steps"):
            check_positive_int(name, getattr(self, name))
        if not 2 <= self.min_prefix <= self.max_prefix:
            raise ValueError(f"min_prefix and max_prefix must satisfy 2 <= min_prefix <= max_prefix; got "
                             f"{self.min_prefix} and {self.max_prefix}")
        if not (isinstance(self.lr, (int, float)) and np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number; got {self.lr!r}")


def _batches(cfg: InductionConfig, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, int]]:
    """Endless (tokens (B, 2L), L) batches, L drawn per batch."""
    while True:
        L = int(torch.randint(cfg.min_prefix, cfg.max_prefix + 1, (1,), generator=generator))
        yield repeated_tokens(cfg.batch_size, L, cfg.vocab, generator), L


def train_induction_model(cfg: InductionConfig, progress: bool = False
                          ) -> tuple[AttentionOnlyTransformer, dict[str, list[float]], float]:
    """Train on fresh repeated sequences (no batch is seen twice) with `training.train`.

    The loss is the next-token cross-entropy over every position. Returns the model (eval mode), the
    per-step training losses of the two halves ({"first": [...], "repeated": [...]}, as `half_losses`
    defines them, on each step's own batch, before its update) and the training seconds.
    The model is initialised from seed cfg.seed, the batches from seed cfg.seed + DATA_SEED_OFFSET.
    """
    cfg.check()
    torch.manual_seed(cfg.seed)
    model = AttentionOnlyTransformer(cfg.vocab, 2 * cfg.max_prefix, cfg.d_model, cfg.num_heads, cfg.num_layers)
    generator = torch.Generator().manual_seed(cfg.seed + DATA_SEED_OFFSET)
    curves: dict[str, list[float]] = {"first": [], "repeated": []}

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, int]) -> torch.Tensor:
        x, L = batch
        logits = m(x)  # (B, 2L, V)
        first, repeated = half_losses(logits.detach(), x, L)
        curves["first"].append(float(first))
        curves["repeated"].append(float(repeated))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    result = train(model, _batches(cfg, generator), loss_fn, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed,
                   warmup_steps=cfg.warmup_steps, progress=progress,
                   desc=f"{cfg.num_layers}-layer seed {cfg.seed}")
    return model, curves, result.seconds
