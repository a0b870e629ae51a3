"""Ulysses sequence parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023): trade sequence shards for head shards.

Each of R ranks holds a shard of the positions (see `SequenceLayout`), as in ring attention.
The projections act position by position, so each rank computes q, k, v for its own positions,
all H heads. Then an all-to-all regroups them: rank j receives, from every rank, heads
j H / R ... (j + 1) H / R - 1 of that rank's positions, and so holds *all* T positions of H / R
heads. Heads are independent (notebook 04), so each rank runs ordinary attention on its heads,
with any mask, causal or not, and no merging of partial results. A second all-to-all sends each
head's output back to the rank that holds its positions, which applies W_O there:

    x (B, T_r, d_model) --q/k/v projections--> (3, B, H, T_r, d_head)
      --all-to-all--> (3, B, H / R, T, d_head) --attention--> (B, H / R, T, d_head)
      --all-to-all--> (B, H, T_r, d_head) --merge, W_O--> (B, T_r, d_model)

Backward, the same two all-to-alls in reverse order (each one's backward is the other). In an
all-to-all a rank keeps 1 / R of its tensor and sends the rest, in R - 1 pieces of 1 / R of a
tensor that is itself 1 / R of the sequence: per rank (R - 1) / R^2 of the whole. With T
divisible by R, one forward and one backward send 4 (R - 1) B T d_model / R^2 numbers each
(`ulysses_bytes_per_step`), falling as 1 / R, where ring attention's volume stays near
6 B T d_model. The price: R cannot exceed the number of heads (H must be divisible by R), and
the all-to-alls sit between computations that need their result, like tensor parallelism's
all-reduce, instead of hiding behind compute as the ring's transfers can.
"""

from __future__ import annotations

import torch

from course_lib._validate import shape_str
from course_lib.attention import attention_core
from course_lib.masks import canonical_mask
from course_lib.mha import MultiHeadAttention, merge_heads, split_heads
from course_lib.parallel.check import report
from course_lib.parallel.distributed import Comm, self_check_main
from course_lib.parallel.ring_attention import SequenceLayout, SequenceParallelAttention, compare_sequence_split

__all__ = ["UlyssesAttention", "sequence_to_heads", "heads_to_sequence", "ulysses_bytes_per_step", "compare_case",
           "self_check"]


def _check_shards(name: str, t: object, comm: object, layout: object, length_of: str) -> None:
    """t is a 5-D tensor whose dim 3 holds `length_of` positions ("mine": this rank's, "all": the sequence's)."""
    if not isinstance(comm, Comm):
        raise TypeError(f"comm must be a course_lib.parallel.distributed.Comm; got {type(comm).__name__}")
    if not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout must be a SequenceLayout; got {type(layout).__name__}")
    if layout.world_size != comm.world_size:
        raise ValueError(f"layout is for {layout.world_size} ranks; the group has {comm.world_size}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    length = layout.lengths[comm.rank] if length_of == "mine" else layout.length
    if t.ndim != 5 or t.shape[3] != length:
        raise ValueError(f"{name} must have shape (N, B, heads, {length}, d); got {shape_str(t.shape)}")


def sequence_to_heads(x: torch.Tensor, comm: Comm, layout: SequenceLayout, what: str = "to head shards"
                      ) -> torch.Tensor:
    """x (N, B, H, T_r, d): this rank's positions, every head -> (N, B, H / R, T, d): this rank's heads, every position.

    Rank j gets heads j H / R ... (j + 1) H / R - 1; the positions come back in sequence order.
    N: tensors sent together (q, k, v stacked: one message per pair of ranks instead of three).
    """
    _check_shards("x", x, comm, layout, "mine")
    R = comm.world_size
    if x.shape[2] % R:
        raise ValueError(f"x has {x.shape[2]} heads (dim 2), which R={R} ranks cannot share as whole heads")
    heads = x.shape[2] // R
    chunks = [x[:, :, j * heads:(j + 1) * heads] for j in range(R)]  # (N, B, H/R, T_r, d) for rank j
    shapes = [(*x.shape[:2], heads, n, x.shape[-1]) for n in layout.lengths]  # rank j's positions of my heads
    return layout.unshard(comm.all_to_all(chunks, shapes, what=what), dim=3)  # (N, B, H/R, T, d)


def heads_to_sequence(y: torch.Tensor, comm: Comm, layout: SequenceLayout, what: str = "to sequence shards"
                      ) -> torch.Tensor:
    """The inverse of `sequence_to_heads`: y (N, B, H / R, T, d) -> (N, B, H, T_r, d)."""
    _check_shards("y", y, comm, layout, "all")
    R, r = comm.world_size, comm.rank
    chunks = [layout.shard(y, j, dim=3) for j in range(R)]  # (N, B, H/R, T_j, d): rank j's positions
    shapes = [(*y.shape[:3], layout.lengths[r], y.shape[-1])] * R  # rank j's heads of my positions
    return torch.cat(comm.all_to_all(chunks, shapes, what=what), dim=2)  # heads in rank order


class _AllToAll(torch.autograd.Function):
    """`sequence_to_heads` (to_heads=True) or `heads_to_sequence`, differentiable: the backward is the other one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, layout: SequenceLayout, to_heads: bool, what: str
                ) -> torch.Tensor:
        ctx.comm, ctx.layout, ctx.to_heads, ctx.what = comm, layout, to_heads, what
        return (sequence_to_heads if to_heads else heads_to_sequence)(x, comm, layout, f"forward: {what}")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        inverse = heads_to_sequence if ctx.to_heads else sequence_to_heads
        grad_in = inverse(grad.contiguous(), ctx.comm, ctx.layout, f"backward: gradient of {ctx.what}")
        return grad_in, None, None, None, None


class UlyssesAttention(SequenceParallelAttention):
    """A MultiHeadAttention whose sequence is split across ranks; all-to-alls give each rank H / R whole heads.

    Same arguments and result as `RingAttention`: query (B, T_r, d_model) holds this rank's
    positions (q_layout), key/value theirs (kv_layout); the output holds this rank's positions.
    The weights are replicated; `all_reduce_grads` sums their gradients.
    """

    method = "Ulysses sequence parallelism"

    def __init__(self, mha: MultiHeadAttention, comm: Comm | None = None) -> None:
        super().__init__(mha, comm)
        R = self.comm.world_size
        if self.attn.num_heads % R:
            raise ValueError(f"num_heads={self.attn.num_heads} must be divisible by the number of ranks R={R}: "
                             f"after the all-to-all each rank runs num_heads / R whole heads (Ulysses needs "
                             f"R <= num_heads; ring attention has no such limit)")

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None, *,
                q_layout: SequenceLayout, kv_layout: SequenceLayout | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """query (B, T_r, d_model): this rank's positions (q_layout); key/value (B, S_r, .) likewise (kv_layout).

        attn_mask and is_causal as for MultiHeadAttention, over the whole sequence; a mask with one
        entry per head, (B|1, H, T|1, S), is cut to this rank's heads. Returns (B, T_r, d_model).
        """
        mha, comm = self.attn, self.comm
        self_attention = key is None and value is None
        key = query if key is None else key
        value = key if value is None else value
        kv_layout = self._check(query, key, value, q_layout, kv_layout, attn_mask, is_causal)
        H, heads = mha.num_heads, mha.num_heads // comm.world_size
        q = split_heads(mha.q_proj(query), H)  # (B, H, T_r, d_head)
        k = split_heads(mha.k_proj(key), H)  # (B, H, S_r, d_head)
        v = split_heads(mha.v_proj(value), H)
        if self_attention:  # one message per pair of ranks for q, k and v
            q, k, v = _AllToAll.apply(torch.stack([q, k, v]), comm, q_layout, True, "q, k, v")  # (B, H/R, T, d_head)
        else:
            q = _AllToAll.apply(q.unsqueeze(0), comm, q_layout, True, "q")[0]  # (B, H/R, T, d_head)
            k, v = _AllToAll.apply(torch.stack([k, v]), comm, kv_layout, True, "k, v")  # (B, H/R, S, d_head)
        h0 = comm.rank * heads
        if attn_mask is not None and attn_mask.ndim == 4 and attn_mask.shape[1] == H:
            attn_mask = attn_mask[:, h0:h0 + heads]  # this rank's heads
        mask, causal = canonical_mask(attn_mask, is_causal, q.shape[2], k.shape[2], device=query.device)
        out, _ = attention_core(q, k, v, mask, is_causal=causal)  # (B, H/R, T, d_head): ordinary attention
        out = _AllToAll.apply(out.unsqueeze(0), comm, q_layout, False, "the heads' output")[0]  # (B, H, T_r, d_head)
        return mha.out_proj(merge_heads(out))  # (B, T_r, d_model)


def ulysses_bytes_per_step(q_layout: SequenceLayout, kv_layout: SequenceLayout, rank: int, batch: int,
                           d_model: int, element_size: int) -> dict[str, int]:
    """Bytes rank `rank` sends in one forward and one backward pass of UlyssesAttention.

    A piece of an all-to-all is d_model / R features (H / R heads) of some positions. Forward:
    q of this rank's T_r positions and k, v of its S_r go to the R - 1 other ranks; then the
    output of its heads at every other rank's positions, T - T_r of them. Backward, mirrored:
    the output's gradient at its own positions to R - 1 ranks; the gradients of q (T - T_r
    positions) and k, v (S - S_r) of its heads back to their ranks. With T = S divisible by R,
    each is 4 (R - 1) B T d_model / R^2 numbers.
    """
    R = q_layout.world_size
    T, T_r, S, S_r = q_layout.length, q_layout.lengths[rank], kv_layout.length, kv_layout.lengths[rank]
    piece = batch * (d_model // R) * element_size  # bytes of one position of H / R heads
    forward = ((R - 1) * (T_r + 2 * S_r) + (T - T_r)) * piece
    backward = ((R - 1) * T_r + (T - T_r) + 2 * (S - S_r)) * piece
    return {"forward": forward, "backward": backward}


def compare_case(rank: int, world_size: int, case: dict, comm: Comm | None = None) -> dict:
    """One case of Ulysses against the single module (`compare_sequence_split`): errors and bytes."""
    return compare_sequence_split(rank, world_size, case, UlyssesAttention, ulysses_bytes_per_step, comm)


DEFAULT_CASES = (
    {"B": 2, "T": 9, "d_model": 16, "heads": 4, "mask": ""},
    {"B": 2, "T": 9, "d_model": 16, "heads": 4, "mask": "padding is_causal"},
    {"B": 2, "T": 6, "S": 11, "d_model": 16, "heads": 4, "cross": True, "mask": "padding"},
)


def self_check(rank: int, world_size: int, cases: tuple[dict, ...] = DEFAULT_CASES) -> str:
    """Every case of `compare_case`; a one-line verdict per case (rank 0's is printed)."""
    return report([compare_case(rank, world_size, case) for case in cases], world_size, rank)


if __name__ == "__main__":
    from course_lib.parallel.ulysses import self_check as _importable_self_check  # spawned ranks import it by name

    raise SystemExit(self_check_main(_importable_self_check))
