"""Tensor-parallel multi-head attention: the heads split across ranks (Megatron-LM's layout).

Heads are independent until the output projection, so R ranks can each own H / R of them:

    x (B, T, d_model), the same on every rank
      --f: identity forward, all-reduce of the gradient backward-->
      --q/k/v projections, ROWS h0*d_head ... h1*d_head of W_q, W_k, W_v ("column-parallel")-->
        (B, T, d_model / R) each --split--> (B, H / R, T, d_head) --attention--> (B, H / R, T, d_head)
      --merge--> (B, T, d_model / R)
      --the matching COLUMNS of W_O ("row-parallel")--> a partial sum (B, T, d_model)
      --g: all-reduce forward, identity backward--> out (B, T, d_model) (+ the bias, once)

One all-reduce of B * T * d_model numbers forward (g), one backward (f, the gradient of x);
nothing else crosses between ranks, and each rank holds 1 / R of the attention weights and of
the per-head activations (q, k, v, the scores). The same code runs on gloo (CPU) or NCCL (GPU).

Every rank keeps the full out_proj bias and adds it after the sum, so its gradient needs no
communication. `TensorParallelAttention.from_module` cuts a `MultiHeadAttention` into this
rank's shard; `to_module` gathers the shards back into a full module on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from course_lib._validate import check_bool, shape_str
from course_lib.attention import attention_core, check_attn_mask, check_causal_lengths
from course_lib.masks import canonical_mask
from course_lib.mha import MultiHeadAttention, merge_heads, split_heads
from course_lib.parallel.check import check_plain_mha, example_case, grad_of, max_abs_error, report
from course_lib.parallel.distributed import Comm, ring_allreduce_bytes, saved_bytes, self_check_main, time_steps

__all__ = ["TensorParallelAttention", "gqa_refusal", "tp_bytes_per_step", "compare_case", "measure_step", "self_check"]


class _CopyToShards(torch.autograd.Function):
    """Megatron's f: the input goes to every shard unchanged; their gradients are summed (all-reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.all_reduce(grad, what="f backward: gradient of the input"), None


class _SumShards(torch.autograd.Function):
    """Megatron's g: the partial outputs are summed (all-reduce); the gradient goes to every shard as is."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, comm: Comm) -> torch.Tensor:
        return comm.all_reduce(partial, what="g forward: sum of the partial outputs")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def gqa_refusal(num_heads: int, num_kv_heads: int, world_size: int) -> str:
    """Why a grouped-query module (num_kv_heads < num_heads) is refused, and how it would be split.

    Query head h reads key/value head h // (num_heads / num_kv_heads), so a group (one key/value
    head and its query heads) must sit on one rank. With num_kv_heads >= R (and R dividing it)
    rank r would own num_kv_heads / R whole groups. With num_kv_heads < R there are fewer
    key/value heads than ranks: each must be replicated on R / num_kv_heads ranks (its rows of
    W_K, W_V copied there, their gradients summed over those ranks), and the bytes and memory
    per rank no longer fall as 1 / R for k and v.
    """
    R, H, H_kv = world_size, num_heads, num_kv_heads
    if H_kv < R:
        how = (f"num_kv_heads={H_kv} < R={R}: each key/value head would have to be replicated on R / num_kv_heads "
               f"ranks (W_K, W_V rows copied, their gradients summed over those ranks)")
    else:
        how = (f"num_kv_heads={H_kv} >= R={R}: rank r would own num_kv_heads / R key/value heads and the "
               f"num_heads / R = {H / R:g} query heads that read them")
    return (f"mha uses num_kv_heads={H_kv} (grouped-query attention, {H} query heads): {how}; this tensor "
            f"parallelism splits plain multi-head attention only (num_kv_heads = num_heads)")


class TensorParallelAttention(nn.Module):
    """This rank's shard of a MultiHeadAttention: heads h0 ... h1 - 1 of H, with H / R = h1 - h0.

    Call it on every rank with the same (replicated) inputs; every rank gets the full output.
    """

    def __init__(self, mha: MultiHeadAttention, comm: Comm | None = None) -> None:
        super().__init__()
        comm = Comm() if comm is None else comm
        if not isinstance(comm, Comm):
            raise TypeError(f"comm must be a course_lib.parallel.distributed.Comm; got {type(comm).__name__}")
        R, r = comm.world_size, comm.rank
        if isinstance(mha, MultiHeadAttention) and mha.num_kv_heads != mha.num_heads:
            raise ValueError(gqa_refusal(mha.num_heads, mha.num_kv_heads, R))
        check_plain_mha(mha, "tensor parallelism")
        if mha.num_heads % R:
            raise ValueError(f"num_heads={mha.num_heads} must be divisible by the number of ranks R={R}: each "
                             f"rank owns num_heads / R whole heads")
        self.comm = comm
        self.d_model, self.num_heads, self.d_head = mha.d_model, mha.num_heads, mha.d_head
        self.kdim, self.vdim, self.dropout = mha.kdim, mha.vdim, mha.dropout
        self.local_heads = mha.num_heads // R
        self.h0 = r * self.local_heads  # first head of this rank
        rows = slice(self.h0 * self.d_head, (self.h0 + self.local_heads) * self.d_head)
        w = mha.q_proj.weight
        bias = mha.q_proj.bias is not None
        width = self.local_heads * self.d_head  # d_model / R
        factory = {"device": w.device, "dtype": w.dtype}
        self.q_proj = nn.Linear(self.d_model, width, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, width, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, width, bias=bias, **factory)
        self.out_proj = nn.Linear(width, self.d_model, bias=False, **factory)  # columns of W_O
        self.out_bias = nn.Parameter(mha.out_proj.bias.detach().clone()) if bias else None  # replicated
        with torch.no_grad():
            for ours, full in ((self.q_proj, mha.q_proj), (self.k_proj, mha.k_proj), (self.v_proj, mha.v_proj)):
                ours.weight.copy_(full.weight[rows])  # (d_model / R, d_in): this rank's output features
                if bias:
                    ours.bias.copy_(full.bias[rows])
            self.out_proj.weight.copy_(mha.out_proj.weight[:, rows])  # (d_model, d_model / R)
        self.train(mha.training)

    @classmethod
    def from_module(cls, mha: MultiHeadAttention, comm: Comm | None = None) -> TensorParallelAttention:
        """This rank's shard of `mha` (every rank calls it with the same module)."""
        return cls(mha, comm)

    def extra_repr(self) -> str:
        return (f"heads {self.h0}..{self.h0 + self.local_heads - 1} of {self.num_heads}, d_head={self.d_head}, "
                f"rank {self.comm.rank} of {self.comm.world_size}")

    def to_module(self) -> MultiHeadAttention:
        """The full MultiHeadAttention, gathered from every rank's shard (call it on every rank)."""
        w = self.q_proj.weight
        full = MultiHeadAttention(self.d_model, self.num_heads, dropout=self.dropout, bias=self.out_bias is not None,
                                  kdim=self.kdim, vdim=self.vdim, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for ours, theirs in ((self.q_proj, full.q_proj), (self.k_proj, full.k_proj), (self.v_proj, full.v_proj)):
                theirs.weight.copy_(torch.cat(self.comm.all_gather(ours.weight, what="to_module")))
                if ours.bias is not None:
                    theirs.bias.copy_(torch.cat(self.comm.all_gather(ours.bias, what="to_module")))
            full.out_proj.weight.copy_(torch.cat(self.comm.all_gather(self.out_proj.weight, what="to_module"), dim=1))
            if self.out_bias is not None:
                full.out_proj.bias.copy_(self.out_bias)
        return full.train(self.training)

    def _check(self, query, key, value, attn_mask, is_causal) -> tuple[int, int, int]:
        check_bool("is_causal", is_causal)
        if self.training and self.dropout > 0:
            raise ValueError(f"dropout={self.dropout} in training mode is not supported by the tensor-parallel "
                             f"shard (each rank would draw its own mask); call .eval() or use dropout=0")
        w = self.q_proj.weight
        for name, t, feat in (("query", query, self.d_model), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
            if t.ndim != 3 or t.shape[-1] != feat:
                raise ValueError(f"{name} must have shape (B, L, {feat}); got {shape_str(t.shape)}")
            if t.dtype != w.dtype or t.device != w.device:
                raise TypeError(f"{name} must be {w.dtype} on {w.device} like the weights; got {t.dtype} on {t.device}")
        if not query.shape[0] == key.shape[0] == value.shape[0] or key.shape[1] != value.shape[1]:
            raise ValueError(f"query (B, T, .), key and value (B, S, .) must share B, and key and value S; got "
                             f"query {shape_str(query.shape)}, key {shape_str(key.shape)}, "
                             f"value {shape_str(value.shape)}")
        B, T, S = query.shape[0], query.shape[1], key.shape[1]
        check_causal_lengths(is_causal, T, S, query.shape, key.shape)
        if attn_mask is not None:
            check_attn_mask(attn_mask, (B, self.num_heads, T, S), query.device, module_ndim=True)
        return B, T, S

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None, *,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """MultiHeadAttention's forward (same arguments, same result), computed by all ranks together.

        attn_mask is the full mask, as for the single module: a (B|1, H, T|1, S) mask with one
        entry per head is cut to this rank's heads here.
        """
        self_attention = key is None and value is None
        key = query if key is None else key
        value = key if value is None else value
        B, T, S = self._check(query, key, value, attn_mask, is_causal)
        if attn_mask is not None and attn_mask.ndim == 4 and attn_mask.shape[1] == self.num_heads:
            attn_mask = attn_mask[:, self.h0 : self.h0 + self.local_heads]  # this rank's heads
        attn_mask, is_causal = canonical_mask(attn_mask, is_causal, T, S, device=query.device)  # made once
        x_q = _CopyToShards.apply(query, self.comm)  # (B, T, d_model): f
        if self_attention:
            x_k = x_v = x_q
        else:
            x_k = _CopyToShards.apply(key, self.comm)
            x_v = x_k if value is key else _CopyToShards.apply(value, self.comm)
        q = split_heads(self.q_proj(x_q), self.local_heads)  # (B, H/R, T, d_head)
        k = split_heads(self.k_proj(x_k), self.local_heads)  # (B, H/R, S, d_head)
        v = split_heads(self.v_proj(x_v), self.local_heads)  # (B, H/R, S, d_head)
        out, _ = attention_core(q, k, v, attn_mask, is_causal=is_causal)  # (B, H/R, T, d_head)
        partial = self.out_proj(merge_heads(out))  # (B, T, d_model): this rank's heads' share of W_O's sum
        out = _SumShards.apply(partial, self.comm)  # g: the sum over every rank's heads
        return out if self.out_bias is None else out + self.out_bias


def tp_bytes_per_step(B: int, T: int, S: int, d_model: int, world_size: int, element_size: int, *,
                      self_attention: bool = True, kdim: int | None = None, vdim: int | None = None,
                      value_is_key: bool = True, rank: int | None = None) -> dict[str, int]:
    """Bytes rank `rank` sends in one forward and one backward pass of TensorParallelAttention.

    Forward: one ring all-reduce of the (B, T, d_model) partial outputs. Backward: one of the
    gradient of the query input; with cross-attention also one of the key input's (B, S, kdim)
    and, when value is another tensor, of the value input's (B, S, vdim). rank: as for
    `ring_allreduce_bytes`, needed only when R does not divide a tensor's size (kdim, vdim).
    """
    kdim = d_model if kdim is None else kdim
    vdim = d_model if vdim is None else vdim
    forward = ring_allreduce_bytes(B * T * d_model, world_size, element_size, rank)
    backward = forward
    if not self_attention:
        backward += ring_allreduce_bytes(B * S * kdim, world_size, element_size, rank)
        if not value_is_key:
            backward += ring_allreduce_bytes(B * S * vdim, world_size, element_size, rank)
    return {"forward": forward, "backward": backward}


# ----------------------------------------------------------------------------- checks against one device
def compare_case(rank: int, world_size: int, case: dict, comm: Comm | None = None) -> dict:
    """One case: outputs, input and weight gradients of the shard vs the single module; bytes vs formula.

    comm: the messages' way (default: a Comm over the default process group)."""
    mha, query, memory, mask, grad_out = example_case(case)
    ref = mha(query, memory, attn_mask=mask)  # the single-device module, in this process
    ref.backward(grad_out)
    ref_grads = {"query": query.grad.clone(), "memory": None if memory is None else memory.grad.clone()}
    query.grad = None
    if memory is not None:
        memory.grad = None
    comm = Comm() if comm is None else comm
    tp = TensorParallelAttention.from_module(mha, comm)
    out = tp(query, memory, attn_mask=mask)
    sent_forward = comm.sent
    out.backward(grad_out)
    sent_backward = comm.sent - sent_forward
    rows = slice(tp.h0 * tp.d_head, (tp.h0 + tp.local_heads) * tp.d_head)
    errors = {"out": max_abs_error(out, ref), "grad query": max_abs_error(query.grad, ref_grads["query"])}
    if memory is not None:
        errors["grad memory"] = max_abs_error(memory.grad, ref_grads["memory"])
    for name in ("q_proj", "k_proj", "v_proj"):
        shard, full = getattr(tp, name), getattr(mha, name)
        errors[f"grad {name}.weight"] = max_abs_error(shard.weight.grad, full.weight.grad[rows])
        errors[f"grad {name}.bias"] = max_abs_error(shard.bias.grad, full.bias.grad[rows])
    errors["grad out_proj.weight"] = max_abs_error(grad_of(tp.out_proj.weight), mha.out_proj.weight.grad[:, rows])
    errors["grad out_proj.bias"] = max_abs_error(grad_of(tp.out_bias), mha.out_proj.bias.grad)
    back = tp.to_module()
    errors["to_module"] = max(max_abs_error(a, b) for a, b in zip(back.parameters(), mha.parameters(), strict=True))
    B, T, D = query.shape
    S = T if memory is None else memory.shape[1]
    expected = tp_bytes_per_step(B, T, S, D, world_size, 4, self_attention=memory is None, rank=rank)
    return {"case": case, "errors": errors, "sent forward": sent_forward, "sent backward": sent_backward,
            "expected forward": expected["forward"], "expected backward": expected["backward"],
            "received": comm.received}


def measure_step(rank: int, world_size: int, *, B: int, T: int, d_model: int, heads: int, repeats: int = 5) -> dict:
    """Causal self-attention, forward + backward: median seconds per step, bytes sent, memory per rank.

    "activation bytes": what autograd keeps for the backward pass (the input and the parameters
    not counted: they exist before the step); "weight bytes": this rank's shard of the weights.
    """
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model, heads)
    x = torch.randn(B, T, d_model, requires_grad=True)
    grad = torch.randn(B, T, d_model)
    comm = Comm()
    tp = TensorParallelAttention.from_module(mha, comm)

    def step() -> None:
        tp.zero_grad(set_to_none=True)
        x.grad = None
        tp(x, is_causal=True).backward(grad)

    seconds = time_steps(step, repeats)
    comm.reset()
    step()
    sent = comm.sent
    _, activations = saved_bytes(lambda: tp(x, is_causal=True), exclude=(x, *tp.parameters()))
    weights = sum(p.numel() * p.element_size() for p in tp.parameters())
    return {"seconds": seconds, "sent per step": sent, "activation bytes": activations, "weight bytes": weights}


DEFAULT_CASES = (
    {"B": 2, "T": 7, "d_model": 16, "heads": 4, "mask": ""},
    {"B": 2, "T": 7, "d_model": 16, "heads": 4, "mask": "padding causal"},
    {"B": 2, "T": 5, "S": 9, "d_model": 16, "heads": 4, "cross": True, "mask": "padding"},
)


def self_check(rank: int, world_size: int, cases: tuple[dict, ...] = DEFAULT_CASES) -> str:
    """Every case of `compare_case`; a one-line verdict per case (rank 0's is printed)."""
    return report([compare_case(rank, world_size, case) for case in cases], world_size, rank)


if __name__ == "__main__":
    from course_lib.parallel.tensor_parallel import (
        self_check as _importable_self_check,  # spawned ranks import it by name
    )

    raise SystemExit(self_check_main(_importable_self_check))
