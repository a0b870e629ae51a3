"""Why several heads? Synthetic lookup tasks, a small head-gated transformer, training, and pruning.

The tasks (every position is classified; positions wrap around, so t - o means (t - o) mod T):
    one_lookup     y_t = x_{t-2}                               (one head can do it: the control)
    two_lookups    y_t = (x_{t-1}, x_{t-3})   as one of V^2 classes
    three_lookups  y_t = (x_{t-1}, x_{t-2}, x_{t-4}) as one of V^3 classes
Each output needs the tokens at several positions at once. A head returns one weighted average of
value vectors, so one head must blend the tokens it needs into one vector; H heads can each fetch one.

The model (`HeadGatedTransformer`) is the classic small study model: token + learned position
embeddings, pre-norm layers of [multi-head self-attention, MLP], a linear read-out. Each attention
layer is a `course_lib.MultiHeadAttention`, and every head's output can be multiplied by a gate xi_h
before W_O (Michel et al. 2019; `course_lib.experiments.head_gate`, the gate the capstone uses too):

    out = concat_h(xi_h * head_h) W_O,   head_h = softmax(q_h k_h^T / sqrt(d_head)) v_h

xi = 1 is the ordinary model; xi_h = 0 removes head h; the mean over examples of |dL(x)/dxi_h| is Michel et al.'s
head importance (`head_importance`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib._validate import check_positive_int
from course_lib.experiments.head_gate import gated_heads
from course_lib.experiments.training import load_model, save_checkpoint, train
from course_lib.mha import MultiHeadAttention

__all__ = [
    "TASKS", "LookupTask", "make_batch", "HeadGatedTransformer", "TrainConfig", "train_model", "evaluate",
    "head_importance", "pruning_curve", "importance_order", "iterative_pruning_curve", "count_parameters",
    "lr_factor", "DATA_SEED_OFFSET", "save_head_model", "load_head_model",
    "MeanPoolClassifier", "parity_batches", "train_parity", "gate_gradients", "batch_gradient_importance",
    "parameter_gradient_importance", "single_removal", "VALIDATION_SEED", "TEST_SEED", "eval_batch",
    "held_out_test_batch",
]


# --------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class LookupTask:
    """y_t = the tuple (x_{t-o} for o in offsets), encoded as one class in [0, vocab**len(offsets))."""

    name: str
    offsets: tuple[int, ...]
    vocab: int
    seq_len: int = 16

    @property
    def num_classes(self) -> int:
        return self.vocab ** len(self.offsets)


TASKS: dict[str, LookupTask] = {
    "one_lookup": LookupTask("one_lookup", (2,), vocab=16),
    "two_lookups": LookupTask("two_lookups", (1, 3), vocab=8),
    "three_lookups": LookupTask("three_lookups", (1, 2, 4), vocab=4),
}


def _labels(x: torch.Tensor, task: LookupTask) -> torch.Tensor:
    y = torch.zeros_like(x)
    for o in task.offsets:  # most significant digit first
        y = y * task.vocab + torch.roll(x, shifts=o, dims=1)  # roll by o: position t holds x_{t-o}
    return y


def make_batch(task: LookupTask, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random tokens (B, T) and their labels (B, T)."""
    x = torch.randint(0, task.vocab, (batch_size, task.seq_len), generator=generator)
    return x, _labels(x, task)


# --------------------------------------------------------------------------------------------- model
class GatedSelfAttention(nn.Module):
    """Self-attention with a per-head gate: a course_lib.MultiHeadAttention (`.mha`) and `gated_heads`.

    The module computes its heads as always (grouped-query attention included, with num_kv_heads);
    the gate scales them on their way into W_O.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.mha = MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor, head_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_model), head_gate (H,) for every example or (B, H), one gate per example, or None.

        Returns (out (B, T, d_model), weights (B, H, T, T)). The weights are always computed, so the
        attention takes the same (math) path whether or not the caller keeps them.
        """
        with gated_heads({} if head_gate is None else {self.mha: head_gate}):
            return self.mha(x, need_weights=True)


class _Layer(nn.Module):
    """Pre-LN: x + attention(LN(x)), then x + MLP(LN(x)) unless d_ff = 0 (attention only)."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d_model), GatedSelfAttention(d_model, num_heads, num_kv_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model)) if d_ff else None

    def forward(self, x: torch.Tensor,
                head_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, weights = self.attn(self.norm1(x), head_gate)
        x = x + a
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, weights


class HeadGatedTransformer(nn.Module):
    """tokens (B, T) -> logits (B, T, num_classes); `head_gate` (num_layers, num_heads) scales each head
    (or (B, num_layers, num_heads): one gate per example, for per-example gate gradients).

    The gate is a float multiplier, not a boolean mask: 1 keeps a head, 0 removes it, and gradients with
    respect to it are Michel et al.'s head importances.
    """

    def __init__(self, vocab: int, num_classes: int, seq_len: int, d_model: int = 32, num_heads: int = 4,
                 num_layers: int = 1, d_ff: int = 128, num_kv_heads: int | None = None) -> None:
        super().__init__()
        for name, value in (("vocab", vocab), ("num_classes", num_classes), ("seq_len", seq_len),
                            ("num_layers", num_layers)):
            check_positive_int(name, value)
        self.config = dict(vocab=vocab, num_classes=num_classes, seq_len=seq_len, d_model=d_model,
                           num_heads=num_heads, num_layers=num_layers, d_ff=d_ff)
        if num_kv_heads is not None:  # grouped-/multi-query attention (notebook 12)
            self.config["num_kv_heads"] = num_kv_heads
        self.num_layers, self.num_heads = num_layers, num_heads
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d_model), nn.Embedding(seq_len, d_model)
        self.layers = nn.ModuleList(_Layer(d_model, num_heads, d_ff, num_kv_heads) for _ in range(num_layers))
        self.norm, self.readout = nn.LayerNorm(d_model), nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor, head_gate: torch.Tensor | None = None,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if tokens.ndim != 2 or tokens.shape[1] > self.config["seq_len"]:
            raise ValueError(f"tokens must have shape (B, T) with T <= {self.config['seq_len']}; "
                             f"got {tuple(tokens.shape)}")
        if head_gate is not None and tuple(head_gate.shape) not in (
                (self.num_layers, self.num_heads), (tokens.shape[0], self.num_layers, self.num_heads)):
            raise ValueError(f"head_gate must have shape (num_layers, num_heads) = ({self.num_layers}, "
                             f"{self.num_heads}), or (B, num_layers, num_heads) for one gate per example; "
                             f"got {tuple(head_gate.shape)}")
        T = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device))  # (B, T, D)
        all_weights = []
        for i, layer in enumerate(self.layers):
            x, weights = layer(x, None if head_gate is None else head_gate[..., i, :])  # (H,) or (B, H)
            all_weights.append(weights)  # (B, H, T, T)
        logits = self.readout(self.norm(x))  # (B, T, C)
        return (logits, all_weights) if need_weights else logits

    @classmethod
    def for_task(cls, task: LookupTask, **kwargs) -> HeadGatedTransformer:
        return cls(task.vocab, task.num_classes, task.seq_len, **kwargs)


# --------------------------------------------------------------------------------------------- training
DATA_SEED_OFFSET = 1000  # the batches' generator is seeded apart from the model's initialisation


@dataclass
class TrainConfig:
    """One training run of the head-ablation model: the task, the model's sizes, the optimiser and the schedule."""

    task: str = "two_lookups"
    num_heads: int = 4
    d_model: int = 32
    num_layers: int = 1
    d_ff: int = 128
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    warmup_steps: int = 50
    eval_every: int = 50
    eval_size: int = 512
    stop_at_acc: float | None = None  # stop at the first evaluation with held-out accuracy >= this
    extra: dict = field(default_factory=dict)
    num_kv_heads: int | None = None  # None: one key/value head per query head (MHA)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, head_gate: torch.Tensor | None = None
             ) -> tuple[float, float]:
    """(mean cross-entropy, per-position accuracy) on a fixed batch."""
    was_training = model.training
    model.eval()
    logits = model(x, head_gate=head_gate)
    model.train(was_training)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return float(loss), float((logits.argmax(-1) == y).float().mean())


VALIDATION_SEED = 12345  # the held-out batch every run is scored on while it trains (its curve)
TEST_SEED = 67890  # the test batch: scored once, after training, and never used to choose anything


def eval_batch(task: LookupTask, size: int = 512, seed: int = VALIDATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed held-out (validation) batch (its own generator, so every run is scored on the same data)."""
    return make_batch(task, size, torch.Generator().manual_seed(seed))


def held_out_test_batch(task: LookupTask, size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The test batch: drawn from its own generator (TEST_SEED), apart from the validation batch and from the
    training batches, so that a choice made on the validation batch (a learning rate) can be reported on data
    that played no part in it."""
    check_positive_int("size", size)
    return make_batch(task, size, torch.Generator().manual_seed(TEST_SEED))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The sweep's schedule: a linear warm-up multiplied onto a cosine decay to 0 over the whole run."""
    warmup = min(1.0, (step + 1) / warmup_steps)
    return warmup * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def train_model(cfg: TrainConfig, progress: bool = False) -> tuple[HeadGatedTransformer, dict]:
    """Train with `course_lib.experiments.training.train` on fresh random batches (no data is seen twice).

    The model is initialised from seed cfg.seed, the batches come from their own generator
    (seed cfg.seed + DATA_SEED_OFFSET), and the fixed evaluation batch from `eval_batch`.
    Returns the model (eval mode) and its curves: every cfg.eval_every steps, the mean training
    loss since the last point and the loss and accuracy on the evaluation batch.

    With cfg.stop_at_acc set, training stops at the first evaluation whose accuracy reaches it, and
    curve["steps_to_target"] is that step (None if the budget ran out first). The schedule is still the
    one of a cfg.steps run, so every point up to the stop is what the full run would have recorded.
    """
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}; got {cfg.task!r}")
    for name in ("steps", "warmup_steps", "eval_every", "batch_size", "eval_size"):
        check_positive_int(name, getattr(cfg, name))
    if cfg.stop_at_acc is not None and not 0.0 < cfg.stop_at_acc <= 1.0:
        raise ValueError(f"stop_at_acc must be None or in (0, 1]; got {cfg.stop_at_acc!r}")
    task = TASKS[cfg.task]
    torch.manual_seed(cfg.seed)
    model = HeadGatedTransformer.for_task(task, d_model=cfg.d_model, num_heads=cfg.num_heads,
                                          num_layers=cfg.num_layers, d_ff=cfg.d_ff, num_kv_heads=cfg.num_kv_heads)
    generator = torch.Generator().manual_seed(cfg.seed + DATA_SEED_OFFSET)
    batches = (make_batch(task, cfg.batch_size, generator) for _ in range(cfg.steps))
    x_eval, y_eval = eval_batch(task, cfg.eval_size)
    curve: dict = {"step": [], "train_loss": [], "eval_loss": [], "eval_acc": []}
    if cfg.stop_at_acc is not None:
        curve["steps_to_target"] = None
    running: list[float] = []

    def record(step: int, loss: float) -> None:
        running.append(loss)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            eval_loss, eval_acc = evaluate(model, x_eval, y_eval)
            curve["step"].append(step + 1)
            curve["train_loss"].append(float(np.mean(running)))
            curve["eval_loss"].append(eval_loss)
            curve["eval_acc"].append(eval_acc)
            running.clear()
            if cfg.stop_at_acc is not None and eval_acc >= cfg.stop_at_acc:
                curve["steps_to_target"] = step + 1
                raise _TargetReached

    try:
        train(model, batches, lambda m, batch: F.cross_entropy(m(batch[0]).flatten(0, 1), batch[1].flatten()),
              steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
              grad_clip=None, schedule=lambda step: lr_factor(step, cfg.warmup_steps, cfg.steps),
              progress=progress, desc=f"{cfg.task} H={cfg.num_heads} seed={cfg.seed}", callback=record)
    except _TargetReached:
        model.eval()
    return model, curve


class _TargetReached(Exception):
    """Raised by train_model's callback to end training once the target accuracy is reached."""


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- importance
def _full_gate(model: HeadGatedTransformer, head_gate: torch.Tensor | None) -> torch.Tensor:
    dtype = model.readout.weight.dtype
    gate = torch.ones(model.num_layers, model.num_heads) if head_gate is None else head_gate.detach().clone()
    return gate.to(dtype)


def gate_gradients(model: HeadGatedTransformer, x: torch.Tensor, y: torch.Tensor,
                   head_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example gradients dL(x_b)/dxi at xi = head_gate (all ones by default): (B, num_layers, num_heads).

    L(x_b) is the mean cross-entropy over the T positions of sequence b. One backward pass: the gate is
    given one copy per example, (B, L, H), and the summed loss is differentiated; example b's loss depends
    on copy b only, so its gradient is exactly dL(x_b)/dxi. The mean over b is the gradient of the
    batch-mean loss.
    """
    gate = _full_gate(model, head_gate)
    if tuple(gate.shape) != (model.num_layers, model.num_heads):
        raise ValueError(f"head_gate must have shape (num_layers, num_heads) = ({model.num_layers}, "
                         f"{model.num_heads}); got {tuple(gate.shape)}")
    if x.ndim != 2 or y.shape != x.shape:
        raise ValueError(f"x and y must both have shape (B, T); got {tuple(x.shape)} and {tuple(y.shape)}")
    per_example = gate.expand(x.shape[0], *gate.shape).clone().requires_grad_(True)  # (B, L, H)
    was_training = model.training
    model.eval()
    try:
        logits = model(x, head_gate=per_example)  # (B, T, C)
    finally:
        model.train(was_training)
    loss_per_example = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)  # (B,)
    (grad,) = torch.autograd.grad(loss_per_example.sum(), per_example)
    return grad.detach()  # (B, L, H)


def head_importance(model: HeadGatedTransformer, x: torch.Tensor, y: torch.Tensor,
                    head_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Michel et al. 2019: I_h = E_x | dL(x)/dxi_h |, the mean over examples of the absolute gate gradient.

    An example is one sequence (its loss the mean over its positions); returns (num_layers, num_heads).
    (Michel et al. also normalise each layer's scores by their l2 norm; that does not change the order
    within a layer.)
    """
    return gate_gradients(model, x, y, head_gate).abs().mean(0)


def batch_gradient_importance(model: HeadGatedTransformer, x: torch.Tensor, y: torch.Tensor,
                              head_gate: torch.Tensor | None = None) -> torch.Tensor:
    """| dL/dxi_h | of the batch-mean loss, (num_layers, num_heads): NOT Michel et al.'s estimator.

    It is | E_x dL(x)/dxi_h |: examples whose gradients have opposite signs cancel, so a head that
    every example needs, in different directions, can score near 0. <= head_importance (triangle inequality).
    """
    return gate_gradients(model, x, y, head_gate).mean(0).abs()


def parameter_gradient_importance(model: HeadGatedTransformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The seeds' score: the l2 norm of dL/dtheta over head h's own parameters, (num_layers, num_heads).

    Head h owns rows h*d_head:(h+1)*d_head of W_Q, W_K, W_V (and of their biases) and the same columns
    of W_O; L is the batch-mean cross-entropy. A large parameter gradient says the loss would change if
    those weights moved, not what removing the head would do.
    """
    if x.ndim != 2 or y.shape != x.shape:
        raise ValueError(f"x and y must both have shape (B, T); got {tuple(x.shape)} and {tuple(y.shape)}")
    was_training = model.training
    model.eval()
    try:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    finally:
        model.train(was_training)
    out = torch.zeros(model.num_layers, model.num_heads, dtype=model.readout.weight.dtype)
    for i, layer in enumerate(cast("Iterable[_Layer]", model.layers)):  # nn.ModuleList yields nn.Module
        m = layer.attn.mha
        params = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.out_proj.weight]
        params += [p for p in (m.q_proj.bias, m.k_proj.bias, m.v_proj.bias) if p is not None]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        gq, gk, gv, go, *gb = grads
        d_head = gq.shape[0] // model.num_heads
        for h in range(model.num_heads):
            rows = slice(h * d_head, (h + 1) * d_head)
            sq = sum(float((g[rows] ** 2).sum()) for g in (gq, gk, gv, *gb)) + float((go[:, rows] ** 2).sum())
            out[i, h] = math.sqrt(sq)
    return out


def single_removal(model: HeadGatedTransformer, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(loss, accuracy) of the full model, then (num_layers, num_heads) losses and accuracies with each
    head removed alone (its gate set to 0, all others 1): the quantity importance scores try to predict."""
    gate = torch.ones(model.num_layers, model.num_heads, dtype=model.readout.weight.dtype)
    full_loss, full_acc = evaluate(model, x, y, gate)
    losses, accs = torch.zeros_like(gate), torch.zeros_like(gate)
    for layer in range(model.num_layers):
        for head in range(model.num_heads):
            g = gate.clone()
            g[layer, head] = 0.0
            losses[layer, head], accs[layer, head] = evaluate(model, x, y, g)
    return full_loss, full_acc, losses, accs


def pruning_curve(model: HeadGatedTransformer, x: torch.Tensor, y: torch.Tensor, order: list[tuple[int, int]]
                  ) -> list[float]:
    """Accuracy after removing 0, 1, ..., all heads, in the given order of (layer, head)."""
    gate = torch.ones(model.num_layers, model.num_heads, dtype=model.readout.weight.dtype)
    accs = [evaluate(model, x, y, gate)[1]]
    for layer, head in order:
        gate[layer, head] = 0.0
        accs.append(evaluate(model, x, y, gate)[1])
    return accs


def importance_order(importance: torch.Tensor) -> list[tuple[int, int]]:
    """(layer, head) pairs from least to most important (the order in which to prune)."""
    flat = importance.flatten().argsort(stable=True).tolist()
    H = importance.shape[1]
    return [(i // H, i % H) for i in flat]


def iterative_pruning_curve(model: HeadGatedTransformer, x: torch.Tensor, y: torch.Tensor
                            ) -> tuple[list[float], list[tuple[int, int]]]:
    """Michel et al.'s procedure: remove the least important head, recompute importances, repeat."""
    gate = torch.ones(model.num_layers, model.num_heads, dtype=model.readout.weight.dtype)
    accs, order = [evaluate(model, x, y, gate)[1]], []
    for _ in range(gate.numel()):
        imp = head_importance(model, x, y, gate)
        imp[gate == 0] = float("inf")
        layer, head = importance_order(imp)[0]
        gate[layer, head] = 0.0
        order.append((layer, head))
        accs.append(evaluate(model, x, y, gate)[1])
    return accs, order


def save_head_model(path: Path | str, model: HeadGatedTransformer, *, metadata: dict | None = None) -> Path:
    """A course_lib checkpoint of the model, with the config that rebuilds it (see `load_head_model`)."""
    return save_checkpoint(path, model, config=model.config, metadata=metadata)


def load_head_model(path: Path | str) -> tuple[HeadGatedTransformer, dict]:
    """(model in eval mode, {"config", "metadata"}) from a checkpoint written by `save_head_model`."""
    return load_model(path, lambda config: HeadGatedTransformer(**config), "HeadGatedTransformer")


# --------------------------------------------------------------------------------------------- the seed's ablation
class MeanPoolClassifier(nn.Module):
    """The ablation model of the seeds: embedding -> multi-head self-attention -> mean over positions -> linear.

    tokens (B, T) -> logits (B, num_classes). No residual, no position embedding, no MLP, as printed there.
    """

    def __init__(self, vocab: int, d_model: int, num_heads: int, num_classes: int = 2) -> None:
        super().__init__()
        check_positive_int("vocab", vocab)
        check_positive_int("num_classes", num_classes)
        self.embedding = nn.Embedding(vocab, d_model)
        self.attn = MultiHeadAttention(d_model, num_heads)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.embedding(tokens))  # (B, T, d_model)
        return self.classifier(x.mean(dim=1))  # (B, num_classes)


def parity_batches(num_batches: int, batch_size: int, seq_len: int, vocab: int, generator: torch.Generator
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The seeds' data: uniform random tokens (B, T), label = (sum of the tokens) mod 2, (B,)."""
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("vocab", vocab)):
        check_positive_int(name, value)
    out = []
    for _ in range(num_batches):
        x = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        out.append((x, x.sum(dim=1) % 2))
    return out


def train_parity(num_heads: int, *, d_model: int = 512, vocab: int = 10000, seq_len: int = 50, batch_size: int = 32,
                 train_batches: int = 50, test_batches: int = 10, epochs: int = 10, lr: float = 1e-3,
                 seed: int = 0) -> dict:
    """The seeds' head-count ablation, run as printed (Adam, lr 1e-3, the same 50 batches for 10 epochs).

    Returns {"train_acc", "test_acc", "epoch_loss"}: accuracy on the training batches and on fresh
    test batches after training, and the mean training loss of every epoch. Chance is 0.5.
    """
    for name, value in (("epochs", epochs), ("test_batches", test_batches)):
        check_positive_int(name, value)
    torch.manual_seed(seed)
    model = MeanPoolClassifier(vocab, d_model, num_heads)
    generator = torch.Generator().manual_seed(seed + DATA_SEED_OFFSET)
    train_data = parity_batches(train_batches, batch_size, seq_len, vocab, generator)
    test_data = parity_batches(test_batches, batch_size, seq_len, vocab, generator)
    result = train(model, (b for _ in range(epochs) for b in train_data),
                   lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]), steps=epochs * train_batches, lr=lr,
                   seed=seed, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=None, schedule=lambda step: 1.0,
                   progress=False)

    @torch.no_grad()
    def accuracy(data: list) -> float:
        return float(np.mean([(model(x).argmax(-1) == y).float().mean().item() for x, y in data]))

    losses = np.array(result.losses).reshape(epochs, train_batches).mean(1)
    return {"train_acc": accuracy(train_data), "test_acc": accuracy(test_data),
            "epoch_loss": [float(v) for v in losses]}
