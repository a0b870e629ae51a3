"""Ring attention: the sequence split across ranks, partial results merged with the online softmax.

Each of R ranks holds a shard of the queries and a shard of the keys and values (its positions,
see `SequenceLayout`). Attention of a query needs every key, so the key/value shards travel
round a ring: at step s, rank r holds the shard of rank r - s, computes its queries against it,
and passes it on to rank r + 1 while the next shard arrives from rank r - 1. After R steps every
query has met every key, and no rank ever held more than two shards.

Each step gives a *partial* result: the output over the keys of one shard, normalised over
those keys only, and its log-sum-exp lse = log sum_j exp(s_j). Two partials merge exactly
(`merge_partials`): lse = log(e^lse_a + e^lse_b), out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b.
That is notebook 10's online softmax (`numpy_ref.online_softmax_step`), with the running max
and sum folded into one number per row; both live in `course_lib.partial_attention`, shared
with split-KV decoding, and are re-exported here.

Backward, the same ring again: rank r keeps its queries, its output and the final lse; the
key/value shards travel round with their gradients dk, dv, which every rank adds to, so that
after the last step one more hop brings each shard's dk, dv home. With the saved lse the
probabilities are recomputed, never stored (FlashAttention's backward, notebook 10).

Causal masking makes the work uneven: with contiguous shards rank 0's queries see only their
own shard, rank R - 1's see all of them. `SequenceLayout(..., "zigzag")` gives rank r the
shards r and 2R - 1 - r of 2R (an early one and a late one), so every rank does the same work;
"striped" gives rank r the positions r, r + R, r + 2R, ...  Shards that a causal mask hides
entirely are skipped, so the work per rank is measured, not only counted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self

import torch
from torch import nn

from course_lib._validate import check_bool, check_positive_int, shape_str
from course_lib.attention import check_attn_mask, check_causal_lengths
from course_lib.masks import restrict_mask
from course_lib.mha import MultiHeadAttention, merge_heads, split_heads
from course_lib.parallel.check import check_plain_mha, example_case, grad_of, max_abs_error, report
from course_lib.parallel.distributed import Comm, saved_bytes, self_check_main, time_steps
from course_lib.partial_attention import block_attention, merge_partials
from course_lib.partial_attention import finite_or_zero as _finite
from course_lib.partial_attention import masked_scores as _scores

__all__ = ["SequenceLayout", "merge_partials", "block_attention", "ring_attention", "RingAttention",
           "SequenceParallelAttention", "compare_sequence_split",
           "causal_work", "ring_bytes_per_step", "compare_case", "measure_step", "self_check", "LAYOUTS"]

LAYOUTS = ("contiguous", "zigzag", "striped")


# ----------------------------------------------------------------------------- who holds which positions
@dataclass(frozen=True)
class SequenceLayout:
    """Which positions of a sequence of `length` each of the ranks holds (sorted, together all of them once)."""

    positions: tuple[torch.Tensor, ...]
    piece_starts: tuple[tuple[int, ...], ...] | None = None  # local indices where a new piece begins

    @classmethod
    def make(cls, length: int, world_size: int, kind: str = "contiguous") -> SequenceLayout:
        """contiguous: rank r gets the r-th of R consecutive pieces; zigzag: pieces r and 2R - 1 - r of 2R;
        striped: positions r, r + R, r + 2R, ... Lengths need not divide: pieces differ by at most one."""
        check_positive_int("length", length)
        R = check_positive_int("world_size", world_size)
        everything = torch.arange(length)
        if kind == "contiguous":
            positions = everything.tensor_split(R)
        elif kind == "zigzag":
            pieces = everything.tensor_split(2 * R)
            positions = tuple(torch.cat([pieces[r], pieces[2 * R - 1 - r]]) for r in range(R))
            # two pieces even where they touch (the middle ranks): a causal mask treats them apart
            return cls(positions, tuple((0, len(pieces[r])) for r in range(R)))
        elif kind == "striped":
            positions = tuple(everything[r::R] for r in range(R))
        else:
            raise ValueError(f"kind must be one of {LAYOUTS}; got {kind!r}")
        return cls(tuple(positions))

    def __post_init__(self) -> None:
        everything = torch.cat(self.positions) if self.positions else torch.zeros(0, dtype=torch.long)
        if everything.dtype != torch.long or not torch.equal(everything.sort().values, torch.arange(len(everything))):
            raise ValueError("a SequenceLayout's positions must cover 0 ... length - 1, each exactly once")
        if any(len(p) > 1 and bool((p[1:] <= p[:-1]).any()) for p in self.positions):
            raise ValueError("each rank's positions must be sorted in increasing order")

    @property
    def world_size(self) -> int:
        return len(self.positions)

    @property
    def length(self) -> int:
        return sum(len(p) for p in self.positions)

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.positions]

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank `rank`'s positions of x along `dim` (a copy)."""
        if x.shape[dim] != self.length:
            raise ValueError(f"x has length {x.shape[dim]} along dim {dim}; this layout is for length {self.length}")
        return x.index_select(dim, self.positions[rank])

    def unshard(self, shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The inverse of shard: every rank's shard put back in place."""
        order = torch.cat(self.positions).argsort()  # where each position sits in the concatenation
        return torch.cat(list(shards), dim=dim).index_select(dim, order)

    def runs(self, rank: int) -> list[tuple[int, int, int]]:
        """Runs of consecutive positions: (first local index, first position, run length).

        Maximal runs, except that a new piece (`piece_starts`) starts a new run.
        """
        p = self.positions[rank].tolist()
        starts = set(self.piece_starts[rank]) if self.piece_starts else set()
        runs: list[tuple[int, int, int]] = []
        for i, pos in enumerate(p):
            if runs and runs[-1][1] + runs[-1][2] == pos and i not in starts:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((i, pos, 1))
        return runs


def causal_work(layout: SequenceLayout) -> list[int]:
    """(query, key) pairs a causal mask allows, per rank, in self-attention: the least work a rank can do.

    Query at position p sees keys 0 ... p, p + 1 of them, wherever those keys are held.
    """
    return [int((p + 1).sum()) for p in layout.positions]


def ring_bytes_per_step(kv_layout: SequenceLayout, rank: int, batch: int, d_model: int,
                        element_size: int) -> dict[str, int]:
    """Bytes rank `rank` sends in one forward and one backward pass of ring attention.

    Forward: at steps 0 ... R - 2 it passes on the key and value shard it holds (the shard of rank
    rank - s), 2 B L d_model numbers for a shard of L positions: R - 1 shards in all. Backward: the
    same key/value shards plus their gradients dk, dv (4 B L d_model) at steps 0 ... R - 2, then
    dk, dv once more (the last hop home), R times 2 B L d_model in all for the gradients.
    """
    R = kv_layout.world_size
    per_position = batch * d_model * element_size
    held = [kv_layout.lengths[(rank - s) % R] for s in range(R)]  # shard held at step s
    forward = sum(2 * n * per_position for n in held[: R - 1])
    backward = sum(4 * n * per_position for n in held[: R - 1]) + (2 * held[R - 1] * per_position if R > 1 else 0)
    return {"forward": forward, "backward": backward}


# ----------------------------------------------------------------------------- the ring, forward and backward
@dataclass
class _Plan:
    """What every rank knows: the layouts, the global mask, causality; and the work it did."""

    q_layout: SequenceLayout
    kv_layout: SequenceLayout
    mask: torch.Tensor | None  # global, broadcastable to (B, H, T, S)
    is_causal: bool
    device: torch.device
    scores_computed: int = 0  # entries of (query, key) scores this rank computed, forward

    def tiles(self, rank: int, owner: int) -> Iterator[tuple[slice, slice, torch.Tensor | None]]:
        """(rows of this rank's queries, rows of owner's keys, mask tile) for each pair of runs to compute.

        A pair that the causal mask hides completely is skipped; one that it shows completely
        needs no causal tile.
        """
        for q_local, q_pos, q_len in self.q_layout.runs(rank):
            for k_local, k_pos, k_len in self.kv_layout.runs(owner):
                if self.is_causal and k_pos > q_pos + q_len - 1:
                    continue  # every key after every query: nothing to compute
                tile = None
                if self.mask is not None:
                    m = self.mask
                    rows = slice(None) if m.shape[-2] == 1 else slice(q_pos, q_pos + q_len)
                    cols = slice(None) if m.shape[-1] == 1 else slice(k_pos, k_pos + k_len)
                    tile = m[..., rows, cols]
                if self.is_causal and k_pos + k_len - 1 > q_pos:  # the diagonal crosses this tile
                    causal = (torch.arange(k_pos, k_pos + k_len, device=self.device)[None, :]
                              <= torch.arange(q_pos, q_pos + q_len, device=self.device)[:, None])  # (q_len, k_len)
                    tile = restrict_mask(tile, causal)
                yield slice(q_local, q_local + q_len), slice(k_local, k_local + k_len), tile


def _ring_forward(q, k, v, plan: _Plan, comm: Comm):
    R, r = comm.world_size, comm.rank
    B, H, _, d = k.shape
    compute = torch.promote_types(q.dtype, torch.float32)  # accumulate in float32 at least, as block_attention
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=compute, device=q.device)  # (B, H, T_r, d_v)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=compute, device=q.device)  # (B, H, T_r)
    kv = torch.stack([k, v])  # (2, B, H, S_r, d): what travels
    for step in range(R):
        owner = (r - step) % R  # whose keys this rank holds now
        wait = None
        if step < R - 1:  # pass them on while computing: the next shard arrives meanwhile
            incoming = (2, B, H, plan.kv_layout.lengths[(owner - 1) % R], d)
            wait = comm.start_ring_shift(kv, incoming, what="forward: key/value shard")
        for rows, cols, tile in plan.tiles(r, owner):
            if tile is not None and tile.dtype == torch.bool and tile.numel() and not tile.any():
                continue  # masked out entirely (padding, say): nothing to add
            o, l = block_attention(q[..., rows, :], kv[0][..., cols, :], kv[1][..., cols, :], tile,
                                   compute_dtype=compute)
            out[..., rows, :], lse[..., rows] = merge_partials(out[..., rows, :], lse[..., rows], o, l)
            plan.scores_computed += (rows.stop - rows.start) * (cols.stop - cols.start)
        if wait is not None:
            kv = wait()
    return out.to(q.dtype), lse  # out rounded once to the input dtype; lse kept in float32 at least


def _ring_backward(q, k, v, out, lse, d_out, plan: _Plan, comm: Comm):
    R, r = comm.world_size, comm.rank
    B, H, _, d = k.shape
    scale = d**-0.5
    compute = lse.dtype  # float32 at least (the forward's); q, k, v, d_out may be float16 or bfloat16
    qc, doc = q.to(compute), d_out.to(compute)
    delta = (doc * out.to(compute)).sum(dim=-1, keepdim=True)  # (B, H, T_r, 1): rowsum(dP * P), as in notebook 02
    shift = _finite(lse).unsqueeze(-1)  # (B, H, T_r, 1)
    dq = torch.zeros_like(qc)
    # k, v, dk, dv of one shard travel together in the input dtype (the bytes of ring_bytes_per_step);
    # each rank sums its share of dk, dv in float32 at least and rounds once when adding it
    travelling = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)])
    for step in range(R):
        owner = (r - step) % R
        k_blk, v_blk = travelling[0].to(compute), travelling[1].to(compute)
        grads = travelling[2:]  # a view: adding to it adds to what travels on
        share = grads if grads.dtype == compute else torch.zeros(grads.shape, dtype=compute, device=grads.device)
        dk_blk, dv_blk = share.unbind(0)
        for rows, cols, tile in plan.tiles(r, owner):
            if tile is not None and tile.dtype == torch.bool and tile.numel() and not tile.any():
                continue
            qb, kb, vb, dob = qc[..., rows, :], k_blk[..., cols, :], v_blk[..., cols, :], doc[..., rows, :]
            scores = _scores(qb, kb, tile, q.dtype)  # (B, H, t, s)
            p = torch.exp(scores - shift[..., rows, :])  # the final probabilities, recomputed
            dv_blk[..., cols, :] += p.transpose(-2, -1) @ dob
            ds = p * (dob @ vb.transpose(-2, -1) - delta[..., rows, :])  # (B, H, t, s)
            dq[..., rows, :] += (ds @ kb) * scale
            dk_blk[..., cols, :] += (ds.transpose(-2, -1) @ qb) * scale
        if share is not grads:
            grads += share
        if step < R - 1:
            incoming = (4, B, H, plan.kv_layout.lengths[(owner - 1) % R], d)
            travelling = comm.ring_shift(travelling, incoming, what="backward: key/value shard and its gradients")
        elif R > 1:  # the last hop: each shard's gradients go home
            home = comm.ring_shift(travelling[2:], (2, B, H, k.shape[2], d), what="backward: gradients home")
            return dq.to(q.dtype), home[0], home[1]
    return dq.to(q.dtype), travelling[2], travelling[3]


class _RingAttentionFunction(torch.autograd.Function):
    """autograd for ring attention: forward saves the log-sum-exp; backward passes the key/value blocks around again."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan, comm: Comm) -> torch.Tensor:
        with torch.no_grad():
            out, lse = _ring_forward(q, k, v, plan, comm)
        ctx.save_for_backward(q, k, v, out, lse)  # O(T_r) per rank: the lse, not the (T, S) weights
        ctx.plan, ctx.comm = plan, comm
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, out, lse = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = _ring_backward(q, k, v, out, lse, d_out.contiguous(), ctx.plan, ctx.comm)
        return dq, dk, dv, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, q_layout: SequenceLayout,
                   kv_layout: SequenceLayout | None = None, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> tuple[torch.Tensor, int]:
    """This rank's queries q (B, H, T_r, d) against every rank's keys and values; differentiable.

    k, v (B, H, S_r, d): this rank's key/value shard. q_layout / kv_layout: who holds which
    positions (kv_layout defaults to q_layout: self-attention). attn_mask: the global mask
    (bool, True = may attend, or additive float), broadcastable to (B, H, T, S), held by every rank.
    is_causal: query at position i sees keys 0 ... i (needs T == S). Returns (out (B, H, T_r, d),
    number of score entries this rank computed).
    """
    kv_layout = _check_layouts(comm, q_layout, kv_layout)
    check_bool("is_causal", is_causal)
    r = comm.rank
    for name, t, layout in (("q", q, q_layout), ("k", k, kv_layout), ("v", v, kv_layout)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim != 4 or t.shape[2] != layout.lengths[r]:
            raise ValueError(f"{name} must be this rank's shard (B, H, {layout.lengths[r]}, d) (rank {r}'s "
                             f"positions); got {shape_str(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (B, H, T_r, d), k and v (B, H, S_r, d) must share B, H and d; got q "
                         f"{shape_str(q.shape)}, k {shape_str(k.shape)}, v {shape_str(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        raise TypeError(f"q, k and v must share one dtype and device; got q {q.dtype} on {q.device}, k {k.dtype} on "
                        f"{k.device}, v {v.dtype} on {v.device}")
    T, S = q_layout.length, kv_layout.length
    check_causal_lengths(is_causal, T, S, (q.shape[0], T, q.shape[-1]), (k.shape[0], S, k.shape[-1]))
    if attn_mask is not None:
        check_attn_mask(attn_mask, (q.shape[0], q.shape[1], T, S), q.device)
    plan = _Plan(q_layout, kv_layout, attn_mask, is_causal, q.device)
    out = _RingAttentionFunction.apply(q, k, v, plan, comm)
    return out, plan.scores_computed


def _check_layouts(comm: object, q_layout: SequenceLayout, kv_layout: SequenceLayout | None) -> SequenceLayout:
    """Both layouts are SequenceLayouts for the group's ranks; -> kv_layout (q_layout when None: self-attention)."""
    if not isinstance(comm, Comm):
        raise TypeError(f"comm must be a course_lib.parallel.distributed.Comm; got {type(comm).__name__}")
    kv_layout = q_layout if kv_layout is None else kv_layout
    for name, layout in (("q_layout", q_layout), ("kv_layout", kv_layout)):
        if not isinstance(layout, SequenceLayout):
            raise TypeError(f"{name} must be a SequenceLayout; got {type(layout).__name__}")
        if layout.world_size != comm.world_size:
            raise ValueError(f"{name} is for {layout.world_size} ranks; the group has {comm.world_size}")
    return kv_layout


class SequenceParallelAttention(nn.Module):
    """A MultiHeadAttention whose sequence is split across ranks; its weights are replicated on every rank.

    What ring attention and Ulysses (`course_lib.parallel.ulysses`) share: each rank projects its
    own positions (the projections act position by position) and applies W_O to its own positions;
    a subclass's forward decides how the heads see every position. The weight gradients are
    partial (from this rank's positions): `all_reduce_grads` sums them, as data parallelism does.
    """

    method = "sequence parallelism"  # named in the messages of refused input

    def __init__(self, mha: MultiHeadAttention, comm: Comm | None = None) -> None:
        super().__init__()
        self.attn = check_plain_mha(mha, self.method)
        comm = Comm() if comm is None else comm
        if not isinstance(comm, Comm):
            raise TypeError(f"comm must be a course_lib.parallel.distributed.Comm; got {type(comm).__name__}")
        self.comm = comm
        self.scores_computed = 0  # (query, key) score entries of the last forward on this rank; ring attention counts

    @classmethod
    def from_module(cls, mha: MultiHeadAttention, comm: Comm | None = None) -> Self:
        """A copy of `mha` (every rank calls it with the same module)."""
        return cls(copy.deepcopy(mha), comm)

    def to_module(self) -> MultiHeadAttention:
        """The single-device module (a copy of the replicated weights)."""
        return copy.deepcopy(self.attn)

    def all_reduce_grads(self) -> None:
        """Sum every weight gradient over the ranks (each rank saw only its own positions)."""
        for p in self.attn.parameters():
            if p.grad is not None:
                p.grad.copy_(self.comm.all_reduce(p.grad, what="weight gradients"))

    def _check(self, query, key, value, q_layout, kv_layout, attn_mask, is_causal) -> SequenceLayout:
        """Every argument of forward, before any arithmetic (as MultiHeadAttention checks its own); -> kv_layout."""
        mha = self.attn
        check_bool("is_causal", is_causal)
        if mha.training and mha.dropout > 0:
            raise ValueError(f"dropout={mha.dropout} in training mode is not supported by {self.method}; "
                             f"call .eval() or use dropout=0")
        kv_layout = _check_layouts(self.comm, q_layout, kv_layout)
        r, w = self.comm.rank, mha.q_proj.weight
        inputs = (("query", query, mha.d_model, q_layout), ("key", key, mha.kdim, kv_layout),
                  ("value", value, mha.vdim, kv_layout))
        for name, t, feat, _ in inputs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
            if t.ndim != 3 or t.shape[-1] != feat:
                raise ValueError(f"{name} must have shape (B, L, {feat}) (this rank's positions); got "
                                 f"{shape_str(t.shape)}")
        if not query.shape[0] == key.shape[0] == value.shape[0]:
            raise ValueError(f"query, key and value must share the batch size B; got query "
                             f"{shape_str(query.shape)}, key {shape_str(key.shape)}, value {shape_str(value.shape)}")
        for name, t, feat, layout in inputs:
            if t.shape[1] != layout.lengths[r]:
                raise ValueError(f"{name} must be this rank's shard (B, {layout.lengths[r]}, {feat}) (rank {r}'s "
                                 f"positions in its layout); got {shape_str(t.shape)}")
            if t.device != w.device:
                raise ValueError(f"{name} is on {t.device} but the module's weights are on {w.device}; move one "
                                 f"of them")
            if t.dtype != w.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the module's weights are {w.dtype}; convert one")
        T, S = q_layout.length, kv_layout.length
        check_causal_lengths(is_causal, T, S, query.shape, key.shape)
        if attn_mask is not None:
            check_attn_mask(attn_mask, (query.shape[0], mha.num_heads, T, S), query.device, module_ndim=True)
        return kv_layout



class RingAttention(SequenceParallelAttention):
    """Ring attention: the key/value shards travel round the ring (`ring_attention`) to every rank's queries."""

    method = "ring attention"

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None, *,
                q_layout: SequenceLayout, kv_layout: SequenceLayout | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """query (B, T_r, d_model): this rank's positions (q_layout); key/value (B, S_r, .) likewise (kv_layout).

        attn_mask and is_causal as for MultiHeadAttention, over the whole sequence. Returns this
        rank's positions of the output, (B, T_r, d_model).
        """
        mha = self.attn
        key = query if key is None else key
        value = key if value is None else value
        kv_layout = self._check(query, key, value, q_layout, kv_layout, attn_mask, is_causal)
        q = split_heads(mha.q_proj(query), mha.num_heads)  # (B, H, T_r, d_head)
        k = split_heads(mha.k_proj(key), mha.num_heads)  # (B, H, S_r, d_head)
        v = split_heads(mha.v_proj(value), mha.num_heads)
        out, self.scores_computed = ring_attention(q, k, v, self.comm, q_layout, kv_layout, attn_mask, is_causal)
        return mha.out_proj(merge_heads(out))  # (B, T_r, d_model)


# ----------------------------------------------------------------------------- checks against one device
def compare_sequence_split(rank: int, world_size: int, case: dict, module: type[SequenceParallelAttention],
                           expected_bytes: Callable[..., dict[str, int]], comm: Comm | None = None) -> dict:
    """One case for a module that splits the sequence: this rank's outputs and gradients vs the single
    module's, the bytes it sent vs `expected_bytes(q_layout, kv_layout, rank, batch, d_model, element_size)`.

    module: RingAttention or `ulysses.UlyssesAttention`; comm: the messages' way (default: a Comm
    over the default process group)."""
    mha, query, memory, mask, grad_out = example_case(case)
    is_causal = "is_causal" in case.get("mask", "").split()
    ref = mha(query, memory, attn_mask=mask, is_causal=is_causal)
    ref.backward(grad_out)
    ref_q_grad = query.grad.clone()
    ref_m_grad = None if memory is None else memory.grad.clone()
    kind = case.get("layout", "contiguous")
    q_layout = SequenceLayout.make(query.shape[1], world_size, kind)
    kv_layout = q_layout if memory is None else SequenceLayout.make(memory.shape[1], world_size, kind)
    comm = Comm() if comm is None else comm
    split = module.from_module(mha, comm)
    split.attn.zero_grad()
    x = q_layout.shard(query.detach(), rank).requires_grad_()  # (B, T_r, D): only this rank's positions
    m = None if memory is None else kv_layout.shard(memory.detach(), rank).requires_grad_()
    out = split(x, m, q_layout=q_layout, kv_layout=kv_layout, attn_mask=mask, is_causal=is_causal)
    sent_forward = comm.sent
    out.backward(q_layout.shard(grad_out, rank))
    sent_backward = comm.sent - sent_forward
    split.all_reduce_grads()
    errors = {"out": max_abs_error(out, q_layout.shard(ref, rank)),
              "grad query": max_abs_error(grad_of(x), q_layout.shard(ref_q_grad, rank))}
    if ref_m_grad is not None:  # cross-attention: a memory
        errors["grad memory"] = max_abs_error(grad_of(m), kv_layout.shard(ref_m_grad, rank))
    for (name, p), p_ref in zip(split.attn.named_parameters(), mha.parameters(), strict=True):
        errors[f"grad {name}"] = max_abs_error(grad_of(p), grad_of(p_ref))
    expected = expected_bytes(q_layout, kv_layout, rank, query.shape[0], mha.d_model, 4)
    return {"case": case, "errors": errors, "sent forward": sent_forward, "sent backward": sent_backward,
            "expected forward": expected["forward"], "expected backward": expected["backward"],
            "scores computed": split.scores_computed}


def compare_case(rank: int, world_size: int, case: dict, comm: Comm | None = None) -> dict:
    """One case of ring attention against the single module (`compare_sequence_split`): errors, bytes, work."""

    def expected(q_layout: SequenceLayout, kv_layout: SequenceLayout, rank: int, batch: int, d_model: int,
                 element_size: int) -> dict[str, int]:
        return ring_bytes_per_step(kv_layout, rank, batch, d_model, element_size)

    return compare_sequence_split(rank, world_size, case, RingAttention, expected, comm)


def measure_step(rank: int, world_size: int, *, B: int, T: int, d_model: int, heads: int, layout: str = "contiguous",
                 is_causal: bool = True, repeats: int = 5) -> dict:
    """Self-attention over T positions split R ways, forward + backward (the weight gradients summed).

    Returns the median seconds per step, the bytes this rank sent, the score entries it computed
    (forward) and the activation bytes autograd keeps on it (inputs and parameters not counted).
    """
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model, heads)
    x = torch.randn(B, T, d_model)
    grad = torch.randn(B, T, d_model)
    lay = SequenceLayout.make(T, world_size, layout)
    x_local = lay.shard(x, rank).requires_grad_()
    grad_local = lay.shard(grad, rank)
    comm = Comm()
    ring = RingAttention(mha, comm)

    def step() -> None:
        ring.zero_grad(set_to_none=True)
        x_local.grad = None
        ring(x_local, q_layout=lay, is_causal=is_causal).backward(grad_local)
        ring.all_reduce_grads()

    seconds = time_steps(step, repeats)
    comm.reset()
    step()
    sent, weight_grads = comm.sent, sum(n for what, n, _ in comm.log if what.startswith("weight gradients"))
    _, activations = saved_bytes(lambda: ring(x_local, q_layout=lay, is_causal=is_causal),
                                 exclude=(x_local, *ring.parameters()))
    return {"seconds": seconds, "sent per step": sent, "sent for weight gradients": weight_grads,
            "scores computed": ring.scores_computed, "activation bytes": activations}


DEFAULT_CASES = (
    {"B": 2, "T": 9, "d_model": 16, "heads": 4, "mask": ""},
    {"B": 2, "T": 9, "d_model": 16, "heads": 4, "mask": "padding is_causal", "layout": "zigzag"},
    {"B": 2, "T": 6, "S": 11, "d_model": 16, "heads": 4, "cross": True, "mask": "padding"},
)


def self_check(rank: int, world_size: int, cases: tuple[dict, ...] = DEFAULT_CASES) -> str:
    """Every case of `compare_case`; a one-line verdict per case (rank 0's is printed)."""
    return report([compare_case(rank, world_size, case) for case in cases], world_size, rank)


if __name__ == "__main__":
    from course_lib.parallel.ring_attention import (
        self_check as _importable_self_check,  # spawned ranks import it by name
    )

    raise SystemExit(self_check_main(_importable_self_check))
