"""Split-KV decoding (Flash-Decoding): one query's keys cut into chunks, the partial results merged.

A decoding step has one query per sequence and head, so a kernel that gives each (batch, head) one
program (one streaming multiprocessor, SM) runs B x H programs, whatever the cache length. When
B x H is smaller than the number of SMs (132 on an H100 SXM), most of the GPU waits while a few
programs stream a long cache. Flash-Decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for
long-context inference") cuts the keys into `num_splits` chunks, runs B x H x num_splits programs,
each returning its chunk's output and log-sum-exp, and merges them exactly by log-sum-exp
(`course_lib.partial_attention.merge_partials`, shared with ring attention).

- `split_kv_attention`: the chunks and the merge, equal to one pass;
- `split_kv_programs`, `waves`, `splits_to_fill`: the programs one pass and a split pass launch, the waves
  they take, and the most chunks that fit one wave (arithmetic, not a measurement);
- `flash_attn2_num_splits`: FlashAttention-2's heuristic for the number of chunks, transcribed;
- `float32_error_bound`: a first-order worst-case bound on float32's error, one pass or split. It adds
  worst cases, so on random data it is about 10^4 times the error that happens: a check against it
  catches gross mistakes only.
"""

from __future__ import annotations

import math

import torch

from course_lib._validate import check_positive_int, shape_str
from course_lib.partial_attention import block_attention, merge_partials

__all__ = ["split_kv_attention", "split_kv_programs", "waves", "splits_to_fill", "flash_attn2_num_splits",
           "float32_error_bound"]


def _check(q: object, k: object, v: object, num_splits: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise TypeError(f"{name} must be a 4-d torch.Tensor (B, heads, length, d); got "
                            f"{shape_str(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    B, H, _, d = q.shape
    if k.shape[0] != B or k.shape[3] != d or k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"k {shape_str(k.shape)} must be (B={B}, H_kv, S, d={d}) with H_kv dividing H={H} "
                         f"(q {shape_str(q.shape)})")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {shape_str(v.shape)} must share (B, H_kv, S) with k {shape_str(k.shape)}: one value "
                         f"per key")
    if k.shape[2] == 0:
        raise ValueError("k holds no key (S = 0): there is nothing to attend to")
    splits = check_positive_int("num_splits", num_splits)
    if splits > k.shape[2]:
        raise ValueError(f"num_splits={splits} is more than the S={k.shape[2]} keys: a chunk would be empty")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise TypeError(f"q, k, v must share dtype and device; got {q.dtype}/{k.dtype}/{v.dtype} on "
                        f"{q.device}/{k.device}/{v.device}")
    return q, k, v, splits


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_splits: int,
                       return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, T, d) over k (B, H_kv, S, d), v (B, H_kv, S, d_v), the keys cut into num_splits chunks.

    Chunk c (sizes as torch.tensor_split gives them) yields a partial output normalised over its keys and
    its log-sum-exp; the partials are merged by log-sum-exp, in float32 at least, rounded once at the end.
    The query heads of a group (GQA: H / H_kv of them) are stacked as rows of their key/value head, so
    each head's keys are read once. Returns out (B, H, T, d_v), and lse (B, H, T) with return_lse.
    """
    q, k, v, splits = _check(q, k, v, num_splits)
    B, H, T, d = q.shape
    H_kv, S, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = H // H_kv
    rows = q.reshape(B, H_kv, group * T, d)  # (B, H_kv, G T, d): a group's queries share their keys
    compute = torch.promote_types(q.dtype, torch.float32)
    partials = []
    for chunk in torch.arange(S, device=k.device).tensor_split(splits):
        keys = slice(int(chunk[0]), int(chunk[-1]) + 1)
        partials.append(block_attention(rows, k[:, :, keys], v[:, :, keys], compute_dtype=compute))  # one program
    out, lse = partials[0]  # (B, H_kv, G T, d_v), (B, H_kv, G T)
    for o, l in partials[1:]:
        out, lse = merge_partials(out, lse, o, l)
    out = out.reshape(B, H, T, d_v).to(q.dtype)
    return (out, lse.reshape(B, H, T)) if return_lse else out


def split_kv_programs(B: int, heads: int, num_splits: int = 1) -> int:
    """Programs (thread blocks) a decoding kernel launches: one per (sequence, head, chunk).

    heads: the query heads H, or the key/value heads H_kv for a kernel that stacks a group's query heads
    into one program (as split_kv_attention does).
    """
    B, heads = check_positive_int("B", B), check_positive_int("heads", heads)
    return B * heads * check_positive_int("num_splits", num_splits)


def waves(programs: int, num_sms: int) -> int:
    """Waves a launch of `programs` programs takes at one program per SM at a time: ceil(programs / num_sms).

    A launch that needs one program more than the SMs takes a second wave, in which most SMs idle.
    """
    programs, num_sms = check_positive_int("programs", programs), check_positive_int("num_sms", num_sms)
    return -(-programs // num_sms)


def splits_to_fill(B: int, heads: int, S: int, num_sms: int, *, min_chunk: int = 256) -> int:
    """The most chunks whose programs still fit in one wave (B heads splits <= num_sms), but chunks of at least
    min_chunk keys (a chunk too short costs more in its merge than it saves); 1 when B x heads already reaches
    the SMs. One program per SM at a time, as `waves` counts: one more chunk would start a second wave."""
    B, heads, S, num_sms, min_chunk = (check_positive_int(n, x) for n, x in (
        ("B", B), ("heads", heads), ("S", S), ("num_sms", num_sms), ("min_chunk", min_chunk)))
    return max(1, min(num_sms // (B * heads), S // min_chunk))


def flash_attn2_num_splits(batch_nheads_mblocks: int, num_sms: int, num_n_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention-2's choice of chunks, `num_splits_heuristic` in the flash-attention repository's
    csrc/flash_attn/flash_api.cpp (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and
    Work Partitioning"), transcribed.

    1 when batch_nheads_mblocks >= 0.8 num_sms; otherwise, over the split counts up to min(max_splits, num_sms,
    num_n_blocks) that change the key blocks per chunk, the wave efficiency n / ceil(n) with
    n = batch_nheads_mblocks x splits / num_sms, and the fewest splits reaching 85 % of the best efficiency.
    flash_api.cpp passes num_sms = 2 x the GPU's SMs (two 128-thread programs per SM) and keys in blocks of
    256, 128 or 64 (head size <= 64, <= 128, larger); the efficiencies are float32 there, float64 here.
    """
    bnm = check_positive_int("batch_nheads_mblocks", batch_nheads_mblocks)
    num_sms, n_blocks = check_positive_int("num_sms", num_sms), check_positive_int("num_n_blocks", num_n_blocks)
    max_splits = check_positive_int("max_splits", max_splits)
    if bnm >= 0.8 * num_sms:
        return 1
    top = min(max_splits, num_sms, n_blocks)

    def eligible(splits: int) -> bool:  # a split count that changes the blocks per chunk
        return splits == 1 or -(-n_blocks // splits) != -(-n_blocks // (splits - 1))

    efficiency = {}
    for splits in range(1, top + 1):
        if eligible(splits):
            n_waves = bnm * splits / num_sms
            efficiency[splits] = n_waves / math.ceil(n_waves)
    best = max(efficiency.values())
    return next(splits for splits, eff in efficiency.items() if eff >= 0.85 * best)


def float32_error_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_splits: int = 1) -> float:
    """A first-order bound on max |out_float32 - out_exact| for split_kv_attention on float32 inputs.

    With u = 2^-24 and gamma_n = n u: a score s_j = (q / sqrt(d)) . k_j is off by at most
    e_s = gamma_{d+1} max_j sum_i |q_i k_ji| / sqrt(d); the chunk's log-sum-exp by 2 e_s + gamma_{S+3};
    so p_j = exp(s_j - lse) has relative error at most r = 3 e_s + gamma_{S+3} + 2u, and the weighted sum of
    S values adds gamma_S: |error| <= (gamma_S + r) max|v| for one pass. Each of the num_splits - 1 merges
    adds, to every chunk's weight exp(lse_c - lse), a relative error of at most 4u (1 + max|lse|) (a
    logaddexp and an exp of numbers of size |lse|), and the weights sum to 1. Computed in float64 from the data.
    """
    q, k, v, splits = _check(q, k, v, num_splits)
    B, H, T, d = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    rows = q.double().reshape(B, H_kv, (H // H_kv) * T, d)
    u = 2.0**-24
    magnitude = (rows.abs() @ k.double().abs().transpose(-2, -1)) / math.sqrt(d)  # (B, H_kv, G T, S)
    e_s = (d + 1) * u * float(magnitude.max())
    lse = torch.logsumexp((rows @ k.double().transpose(-2, -1)) / math.sqrt(d), dim=-1)
    r = 3 * e_s + (S + 3) * u + 2 * u
    merges = (splits - 1) * 4 * u * (1 + float(lse.abs().max()))
    return (S * u + r + merges) * float(v.double().abs().max())
