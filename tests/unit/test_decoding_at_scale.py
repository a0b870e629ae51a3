"""Decoding at scale (notebook 14): the static cache, the paged cache with shared prefixes, split-KV decoding,
and the closed forms of their memory and traffic, each against plain attention over a contiguous cache
(course_lib's KVCache, torch's SDPA) and against planted wrong versions."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib import KVCache
from course_lib.cost.io_complexity import IOCounter, TensorTraffic, cache_append_io, decode_attention_io
from course_lib.cost.kv_memory import padded_kv_slots, paged_kv_slots, prefix_shared_blocks
from course_lib.modern.paged_cache import PagedKVCache, paged_attention
from course_lib.modern.split_kv import (
    flash_attn2_num_splits,
    float32_error_bound,
    split_kv_attention,
    split_kv_programs,
    splits_to_fill,
    waves,
)
from course_lib.modern.static_cache import StaticKVCache
from course_lib.partial_attention import block_attention, merge_partials

H_KV, D = 2, 8


def _fill(cache, lengths, seed=0):
    """Sequences of the given lengths appended in uneven pieces; each one's contiguous KVCache alongside."""
    gen = torch.Generator().manual_seed(seed)
    ids, contiguous = [], []
    for length in lengths:
        seq, ref = cache.new_sequence(), KVCache()
        done = 0
        while done < length:
            n = min(length - done, 1 + int(torch.randint(0, 7, (1,), generator=gen)))
            k, v = torch.randn(H_KV, n, D, generator=gen), torch.randn(H_KV, n, D, generator=gen)
            cache.append(seq, k, v)
            ref.update(k[None], v[None])
            done += n
        ids.append(seq)
        contiguous.append(ref)
    return ids, contiguous


def _reference(q, contiguous):
    return torch.cat([F.scaled_dot_product_attention(q[b:b + 1], c.key, c.value, enable_gqa=True)
                      for b, c in enumerate(contiguous)])


def _snapshot(cache):
    return (cache.key_pool.clone(), cache.value_pool.clone(), list(cache.ref_counts), list(cache._free),
            copy.deepcopy(cache.block_tables), dict(cache.lengths))


def _same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


# ----------------------------------------------------------------------------- the paged cache
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=5), st.sampled_from([1, 3, 4, 16]), st.sampled_from([1, 2]))
def test_paged_attention_equals_each_contiguous_cache(lengths, block_size, group):
    cache = PagedKVCache(256, block_size, H_KV, D)
    ids, contiguous = _fill(cache, lengths)
    cache.check()
    q = torch.randn(len(lengths), H_KV * group, 1, D, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(paged_attention(q, cache, ids), _reference(q, contiguous), rtol=0, atol=1e-6)
    for seq, ref in zip(ids, contiguous, strict=True):
        assert torch.equal(cache.gather(seq)[0], ref.key[0]) and torch.equal(cache.gather(seq)[1], ref.value[0])
    assert cache.blocks_in_use == paged_kv_slots(lengths, block_size)["blocks"]


def test_a_wrong_block_table_is_caught():
    cache = PagedKVCache(32, 4, H_KV, D)
    ids, contiguous = _fill(cache, [9, 13])
    q = torch.randn(2, H_KV, 1, D)
    table = cache.block_tables[ids[1]]
    table[0], table[1] = table[1], table[0]  # two blocks swapped: every key is still there, in the wrong place
    assert not torch.allclose(cache.gather(ids[1])[0], contiguous[1].key[0])
    cache.block_tables[ids[0]][0] = table[2]  # sequence 0 reads a block of sequence 1
    assert not torch.allclose(paged_attention(q, cache, ids), _reference(q, contiguous), atol=1e-3)
    with pytest.raises(ValueError, match="block table was changed"):
        cache.check()


def test_blocks_are_taken_only_when_the_last_one_is_full_and_return_when_freed():
    cache = PagedKVCache(8, 4, H_KV, D)
    seq = cache.new_sequence()
    for length in range(1, 10):
        cache.append(seq, torch.randn(H_KV, 1, D), torch.randn(H_KV, 1, D))
        assert len(cache.block_tables[seq]) == math.ceil(length / 4)
    cache.free(seq)
    assert cache.num_free_blocks == 8 and cache.blocks_in_use == 0


# ----------------------------------------------------------------------------- prefix sharing
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 20), st.lists(st.integers(0, 12), min_size=1, max_size=4), st.sampled_from([1, 4, 5]),
       st.booleans())
def test_forks_share_the_prompt_and_copy_on_write(prompt_len, suffixes, block_size, keep_prompt):
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(256, block_size, H_KV, D)
    prompt = cache.new_sequence()
    pk, pv = torch.randn(H_KV, prompt_len, D, generator=gen), torch.randn(H_KV, prompt_len, D, generator=gen)
    cache.append(prompt, pk, pv)
    forks = [cache.fork(prompt) for _ in suffixes]
    if not keep_prompt:
        cache.free(prompt)
    expected = []
    for seq, s in zip(forks, suffixes, strict=True):
        sk, sv = torch.randn(H_KV, s, D, generator=gen), torch.randn(H_KV, s, D, generator=gen)
        cache.append(seq, sk, sv)
        expected.append((torch.cat([pk, sk], 1), torch.cat([pv, sv], 1)))
    cache.check()
    for seq, (k, v) in zip(forks, expected, strict=True):
        assert torch.equal(cache.gather(seq)[0], k) and torch.equal(cache.gather(seq)[1], v)
    if keep_prompt:
        assert torch.equal(cache.gather(prompt)[0], pk)  # the prompt's blocks were not written over
    counts = prefix_shared_blocks(prompt_len, suffixes, block_size, keep_prompt=keep_prompt)
    assert cache.blocks_in_use == counts["shared"]
    unshared = sum(math.ceil((prompt_len + s) / block_size) for s in suffixes)
    assert counts["unshared"] == unshared + (math.ceil(prompt_len / block_size) if keep_prompt else 0)


def test_without_copy_on_write_one_fork_overwrites_another():
    """The negative control: with copy-on-write defeated, two forks write into one shared block."""
    for planted in (False, True):
        cache = PagedKVCache(16, 4, H_KV, D)
        prompt = cache.new_sequence()
        cache.append(prompt, torch.randn(H_KV, 6, D), torch.randn(H_KV, 6, D))
        a, b = cache.fork(prompt), cache.fork(prompt)
        x, y = torch.randn(H_KV, 1, D), torch.randn(H_KV, 1, D)
        for seq, new in ((a, x), (b, y)):
            if planted:
                cache.ref_counts[cache.block_tables[seq][-1]] = 1  # the shared block looks private
            cache.append(seq, new, new)
        assert torch.equal(cache.gather(a)[0][:, 6], (y if planted else x)[:, 0])


# ----------------------------------------------------------------------------- bad input leaves the cache as it was
@pytest.mark.parametrize(("call", "error", "words"), [
    (lambda c, s: c.append(s, torch.randn(3, 1, D), torch.randn(3, 1, D)), ValueError, "key must have shape"),
    (lambda c, s: c.append(s, torch.randn(H_KV, 2, D), torch.randn(H_KV, 1, D)), ValueError, "share n"),
    (lambda c, s: c.append(s, torch.randn(H_KV, 1, D).double(), torch.randn(H_KV, 1, D)), TypeError, "float64"),
    (lambda c, s: c.append(s, "keys", torch.randn(H_KV, 1, D)), TypeError, "key must be a torch.Tensor"),
    (lambda c, s: c.append(99, torch.randn(H_KV, 1, D), torch.randn(H_KV, 1, D)), ValueError, "seq_id=99"),
    (lambda c, s: c.append(True, torch.randn(H_KV, 1, D), torch.randn(H_KV, 1, D)), TypeError, "seq_id"),
    (lambda c, s: c.append(s, torch.randn(H_KV, 40, D), torch.randn(H_KV, 40, D)), RuntimeError, "free blocks"),
    (lambda c, s: c.fork(7), ValueError, "seq_id=7"),
    (lambda c, s: paged_attention(torch.randn(1, H_KV, 2, D), c, [s]), ValueError, "one new token"),
    (lambda c, s: paged_attention(torch.randn(1, 3, 1, D), c, [s]), ValueError, "multiple of the cache's H_kv"),
    (lambda c, s: paged_attention(torch.randn(2, H_KV, 1, D), c, [s]), ValueError, "seq_ids"),
])
def test_bad_input_is_refused_by_name_and_leaves_the_cache_unchanged(call, error, words):
    cache = PagedKVCache(6, 4, H_KV, D)
    seq = cache.new_sequence()
    cache.append(seq, torch.randn(H_KV, 6, D), cache_v := torch.randn(H_KV, 6, D))
    cache.fork(seq)  # a shared, partly filled last block: the append below would need a copy
    before = _snapshot(cache)
    with pytest.raises(error, match=words):
        call(cache, seq)
    assert _same(before, _snapshot(cache)) and torch.equal(cache.gather(seq)[1], cache_v)


def test_the_snapshot_comparison_sees_a_change():
    cache = PagedKVCache(6, 4, H_KV, D)
    seq = cache.new_sequence()
    before = _snapshot(cache)
    cache.append(seq, torch.randn(H_KV, 1, D), torch.randn(H_KV, 1, D))
    assert not _same(before, _snapshot(cache))


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    (dict(num_blocks=0), ValueError, "num_blocks"), (dict(block_size=2.0), TypeError, "block_size"),
    (dict(dtype=torch.int64), TypeError, "dtype"),
])
def test_the_pool_refuses_bad_sizes(kwargs, error, words):
    with pytest.raises(error, match=words):
        PagedKVCache(**({"num_blocks": 4, "block_size": 4, "num_kv_heads": 1, "d_head": 2} | kwargs))


# ----------------------------------------------------------------------------- the static cache
def test_the_static_cache_writes_in_place_and_equals_kvcache():
    static, growing = StaticKVCache(2, H_KV, 10, D), KVCache()
    address = static.key.data_ptr()
    for n in (3, 1, 1, 4):
        k, v = torch.randn(2, H_KV, n, D), torch.randn(2, H_KV, n, D)
        sk, sv = static.update(k, v)
        gk, gv = growing.update(k, v)
        assert torch.equal(sk, gk) and torch.equal(sv, gv)
    assert static.key.data_ptr() == address and len(static) == 9


@pytest.mark.parametrize(("new", "error", "words"), [
    (torch.randn(2, H_KV, 5, D), ValueError, "max_len=8"), (torch.randn(2, 3, 1, D), ValueError, "key must have"),
    (torch.randn(2, H_KV, 1, D).double(), TypeError, "float64"),
])
def test_the_static_cache_refuses_bad_input_unchanged(new, error, words):
    cache = StaticKVCache(2, H_KV, 8, D)
    cache.update(torch.randn(2, H_KV, 4, D), torch.randn(2, H_KV, 4, D))
    before = (cache.key.clone(), cache.value.clone(), cache.length)
    with pytest.raises(error, match=words):
        cache.update(new, new.float() if new.dtype == torch.float64 else new)
    assert torch.equal(before[0], cache.key) and torch.equal(before[1], cache.value) and before[2] == cache.length


# ----------------------------------------------------------------------------- split-KV decoding
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.integers(1, 70), st.integers(1, 9),
       st.integers(1, 2))
def test_split_kv_equals_one_pass(B, heads, S, splits, T):
    H, H_kv = heads
    splits = min(splits, S)
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, H_kv, S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out, lse = split_kv_attention(q, k, v, num_splits=splits, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    scores = (q.reshape(B, H_kv, -1, D) @ k.transpose(-2, -1)) / math.sqrt(D)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).reshape(B, H, T), rtol=0, atol=1e-12)
    q32, k32, v32 = q.float(), k.float(), v.float()
    exact = F.scaled_dot_product_attention(q32.double(), k32.double(), v32.double(), enable_gqa=True)
    err = (split_kv_attention(q32, k32, v32, num_splits=splits).double() - exact).abs().max()
    assert err <= float32_error_bound(q32, k32, v32, num_splits=splits)


def test_a_merge_that_does_not_reweight_breaks_the_bound():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, D, generator=gen), torch.randn(1, 2, 64, D, generator=gen), torch.randn(
        1, 2, 64, D, generator=gen)
    (o1, l1), (o2, l2) = block_attention(q, k[:, :, :32], v[:, :, :32]), block_attention(q, k[:, :, 32:], v[:, :, 32:])
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    bound = float32_error_bound(q, k, v, num_splits=2)
    assert (merge_partials(o1, l1, o2, l2)[0].double() - exact).abs().max() <= bound
    assert ((o1 + o2).double() / 2 - exact).abs().max() > bound  # the plain average: a wrong merge


@pytest.mark.parametrize(("args", "error", "words"), [
    ((torch.randn(1, 2, 1, D), torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D), 6), ValueError, "num_splits=6"),
    ((torch.randn(1, 3, 1, D), torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D), 1), ValueError, "H_kv dividing"),
    ((torch.randn(1, 2, 1, D), torch.randn(1, 2, 5, D), torch.randn(1, 2, 4, D), 1), ValueError, "v "),
    ((torch.randn(1, 2, D), torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D), 1), TypeError, "q must be"),
    ((torch.randn(1, 2, 1, D), torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D), 0), ValueError, "num_splits"),
])
def test_split_kv_refuses_bad_input_by_name(args, error, words):
    with pytest.raises(error, match=words):
        split_kv_attention(*args[:3], num_splits=args[3])


def test_realistic_wrong_merges_miss_by_orders_of_magnitude():
    """The float32 merge's error against float64 is ~1e-7; each usual mistake is >= 1000x that, where the worst-case
    bound would let the smallest of them (an lse off by 0.01) pass."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1, 64, generator=gen)
    k, v = (torch.randn(1, 1, 3000, 64, generator=gen) for _ in range(2))
    rows = q.reshape(1, 1, 4, 64)
    (o1, l1), (o2, l2) = block_attention(rows, k[:, :, :1000], v[:, :, :1000]), block_attention(
        rows, k[:, :, 1000:], v[:, :, 1000:])
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True).reshape(1, 1, 4, 64)
    lse, top = torch.logaddexp(l1, l2), torch.maximum(l1, l2)

    def err(o):
        return float((o.double() - exact).abs().max())

    right = err(merge_partials(o1, l1, o2, l2)[0])
    assert right <= 1e-6
    wrong = {"average": (o1 + o2) / 2, "by length": (1000 * o1 + 2000 * o2) / 3000,
             "lse off by 0.01": torch.exp(l1 - lse - 0.01)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2,
             "max for lse": torch.exp(l1 - top)[..., None] * o1 + torch.exp(l2 - top)[..., None] * o2}
    for name, o in wrong.items():
        assert err(o) >= 1000 * max(right, 1e-7), name
    assert err(wrong["lse off by 0.01"]) <= float32_error_bound(q, k, v, num_splits=2)  # why the bound is no check


def test_programs_waves_and_splits():
    assert split_kv_programs(1, 32) == 32 and split_kv_programs(1, 32, 5) == 160
    assert waves(132, 132) == 1 and waves(133, 132) == 2 and waves(136, 132) == 2 and waves(1, 132) == 1
    assert splits_to_fill(1, 8, 131072, 132) == 16  # 8 x 16 = 128 <= 132 < 8 x 17 = 136 (a second wave)
    assert splits_to_fill(1, 32, 8192, 132) == 4  # 32 x 4 = 128 <= 132 < 160
    assert splits_to_fill(16, 32, 8192, 132) == 1 and splits_to_fill(1, 8, 512, 132) == 2  # chunks of 256 keys
    for B in range(1, 40):
        for heads in (1, 8, 32):
            n = splits_to_fill(B, heads, 1 << 20, 132)
            assert waves(split_kv_programs(B, heads, n), 132) == 1 or n == 1
            assert n == 1 or waves(split_kv_programs(B, heads, n + 1), 132) == 2  # the most that fit one wave


def _no_eligibility(bnm, num_sms, n_blocks, max_splits=128):
    """A planted variant: every split count eligible (flash_api.cpp skips those that leave the blocks per chunk)."""
    if bnm >= 0.8 * num_sms:
        return 1
    top = min(max_splits, num_sms, n_blocks)
    eff = {s: bnm * s / num_sms / math.ceil(bnm * s / num_sms) for s in range(1, top + 1)}
    return next(s for s, e in eff.items() if e >= 0.85 * max(eff.values()))


def test_flash_attn2_num_splits_follows_flash_api():
    assert flash_attn2_num_splits(48, 108, 64) == 2  # flash_api.cpp's own comment: 2 splits (0.89) beat 3 (0.67)
    assert flash_attn2_num_splits(110, 132, 64) == 1  # already >= 80 % of the SMs
    # Llama-3-8B, B = 1: 8 key/value heads x 1 block of 64 query rows, 2 x 132 SMs, S = 131072 in blocks of 128
    assert flash_attn2_num_splits(8, 264, 1024) == 28
    assert _no_eligibility(8, 264, 1024) == 29  # the planted variant differs, so the test can fail
    assert flash_attn2_num_splits(1, 264, 3) == 3  # capped by the key blocks
    with pytest.raises(ValueError, match="num_sms"):
        flash_attn2_num_splits(8, 0, 10)


# ----------------------------------------------------------------------------- closed forms and counted traffic
def test_counted_traffic_equals_the_closed_forms():
    B, H, H_kv, S, d = 2, 8, 2, 40, 16
    q, new = torch.randn(B, H, 1, d), torch.randn(B, H_kv, 1, d)
    keys, values = torch.randn(B, H_kv, S, d), torch.randn(B, H_kv, S, d)
    static = StaticKVCache(B, H_kv, S + 1, d)
    static.update(keys, values)
    with TensorTraffic() as t:
        static.update(new, new)
    assert (t.io.reads, t.io.writes) == tuple(cache_append_io(B, H_kv, S, d, method="static").values())
    with TensorTraffic() as t:
        torch.cat([keys, new], 2), torch.cat([values, new], 2)
    assert (t.io.reads, t.io.writes) == tuple(cache_append_io(B, H_kv, S, d, method="cat").values())
    with TensorTraffic() as t:
        F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    assert t.io.total in (decode_attention_io(B, H, H_kv, S, d), decode_attention_io(B, H, H_kv, S, d, with_lse=True))
    with TensorTraffic(IOCounter(), in_bytes=True) as t:
        keys[torch.tensor([1])]
    assert t.io.reads == H_kv * S * d * 4 + 8 and t.io.writes == H_kv * S * d * 4  # the row selected, and the index


def test_closed_forms_of_memory():
    assert padded_kv_slots([3, 10, 7]) == {"slots": 30, "used": 20, "wasted": 10}
    assert padded_kv_slots([3, 10, 7], capacity=16)["wasted"] == 28
    assert paged_kv_slots([3, 10, 7], 4) == {"blocks": 6, "slots": 24, "used": 20, "wasted": 4}
    assert prefix_shared_blocks(10, [3, 0, 8], 4) == {"unshared": 3 + 4 + 3 + 5, "shared": 2 + 1 + 2 + 3,
                                                       "saved": 15 - 8}
    with pytest.raises(ValueError, match="capacity"):
        padded_kv_slots([3, 10], capacity=5)
    with pytest.raises(TypeError, match="lengths"):
        paged_kv_slots(5, 4)
    with pytest.raises(ValueError, match="method"):
        cache_append_io(1, 1, 1, 1, method="copy")


def test_the_traffic_counter_tells_the_appends_apart_and_refuses_a_bad_counter():
    """The comparison above can fail: each append's count differs from the other's closed form."""
    keys, new = torch.randn(1, 2, 30, 4), torch.randn(1, 2, 1, 4)
    static = StaticKVCache(1, 2, 31, 4)
    static.update(keys, keys)
    with TensorTraffic() as t:
        static.update(new, new)
    assert t.io.total != sum(cache_append_io(1, 2, 30, 4, method="cat").values())
    with TensorTraffic() as t:
        torch.cat([keys, new], 2), torch.cat([keys, new], 2)
    assert t.io.total != sum(cache_append_io(1, 2, 30, 4, method="static").values())
    with TensorTraffic() as t:
        keys.transpose(-2, -1)[..., :3]  # views move nothing
    assert t.io.total == 0 and t.log == []
    with pytest.raises(TypeError, match="io must be an IOCounter"):
        TensorTraffic(io=3)
