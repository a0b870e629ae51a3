"""FeedForward, EncoderLayer, DecoderLayer: equal to torch's own layers with copied weights (pre- and
post-LN), padding-independent, causal, and with clear errors."""

import pytest
import torch
from torch import nn

from course_lib.blocks import DecoderLayer, EncoderLayer, FeedForward
from course_lib.kv_cache import KVCache
from course_lib.masks import padding_mask

D, H, FF = 16, 4, 32


def _copy_attention(ours, theirs: nn.MultiheadAttention):
    wq, wk, wv = theirs.in_proj_weight.chunk(3)
    bq, bk, bv = theirs.in_proj_bias.chunk(3)
    with torch.no_grad():
        for lin, w, b in ((ours.q_proj, wq, bq), (ours.k_proj, wk, bk), (ours.v_proj, wv, bv),
                          (ours.out_proj, theirs.out_proj.weight, theirs.out_proj.bias)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)


def _copy_common(ours, theirs, norms):
    with torch.no_grad():
        ours.ff.linear1.load_state_dict(theirs.linear1.state_dict())
        ours.ff.linear2.load_state_dict(theirs.linear2.state_dict())
        for block, norm in norms:
            block.norm.load_state_dict(norm.state_dict())
            torch.nn.init.normal_(block.norm.weight, 1.0, 0.2)  # non-trivial LayerNorm parameters
            norm.load_state_dict(block.norm.state_dict())


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_equals_torch_transformer_encoder_layer(norm_first):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    ours = EncoderLayer(D, H, FF, norm_first=norm_first).eval()
    _copy_attention(ours.self_attn, theirs.self_attn)
    _copy_common(ours, theirs, [(ours.attn_block, theirs.norm1), (ours.ff_block, theirs.norm2)])
    x = torch.randn(3, 7, D)
    lengths = [7, 5, 2]
    mask = padding_mask(lengths, 7)  # (B, 1, 1, S), True = real
    with torch.no_grad():
        expected = theirs(x, src_key_padding_mask=~mask[:, 0, 0])  # torch: True = ignore
        got = ours(x, mask)
    for b, n in enumerate(lengths):  # torch's fast path may zero padded rows: compare real ones
        torch.testing.assert_close(got[b, :n], expected[b, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_layer_equals_torch_transformer_decoder_layer(norm_first):
    torch.manual_seed(1)
    theirs = nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    ours = DecoderLayer(D, H, FF, norm_first=norm_first).eval()
    _copy_attention(ours.self_attn, theirs.self_attn)
    _copy_attention(ours.cross_attn, theirs.multihead_attn)
    _copy_common(ours, theirs, [(ours.self_block, theirs.norm1), (ours.cross_block, theirs.norm2),
                                (ours.ff_block, theirs.norm3)])
    x, memory = torch.randn(2, 6, D), torch.randn(2, 5, D)
    mask = padding_mask([5, 3], 5)
    causal_ignore = nn.Transformer.generate_square_subsequent_mask(6).isinf()  # True = ignore
    with torch.no_grad():
        expected = theirs(x, memory, tgt_mask=causal_ignore, memory_key_padding_mask=~mask[:, 0, 0])
        got = ours(x, memory, memory_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_feed_forward_is_position_wise():
    torch.manual_seed(0)
    ff = FeedForward(D, FF)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        each = torch.stack([ff(x[:, t]) for t in range(5)], dim=1)
        torch.testing.assert_close(ff(x), each)


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_padding_does_not_change_real_positions(norm_first):
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, FF, norm_first=norm_first).eval()
    x = torch.randn(1, 4, D)
    padded = torch.cat([x, 100 * torch.randn(1, 3, D)], dim=1)  # garbage in the padded slots
    with torch.no_grad():
        torch.testing.assert_close(layer(padded, padding_mask([4], 7))[:, :4], layer(x), atol=1e-5, rtol=1e-5)


def test_post_ln_output_is_normalised_pre_ln_is_not():
    torch.manual_seed(0)
    x = 5 * torch.randn(2, 6, D) + 3
    with torch.no_grad():
        post = EncoderLayer(D, H, FF, norm_first=False)(x)
        pre = EncoderLayer(D, H, FF, norm_first=True)(x)
    torch.testing.assert_close(post.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    assert pre.mean(-1).abs().max() > 0.5  # the residual stream keeps the input's offset


def test_decoder_is_causal_perturbing_the_future_leaves_the_past_unchanged():
    torch.manual_seed(0)
    layer = DecoderLayer(D, H, FF).eval()
    x, memory = torch.randn(2, 8, D), torch.randn(2, 5, D)
    x2 = x.clone()
    x2[:, 5:] += torch.randn(2, 3, D)
    with torch.no_grad():
        a, b = layer(x, memory), layer(x2, memory)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


def test_need_weights_returns_the_attention_weights():
    torch.manual_seed(0)
    enc, dec = EncoderLayer(D, H, FF).eval(), DecoderLayer(D, H, FF).eval()
    x, memory = torch.randn(2, 6, D), torch.randn(2, 5, D)
    mask = padding_mask([5, 2], 5)
    out, w = enc(memory, mask, need_weights=True)
    assert out.shape == (2, 5, D) and w.shape == (2, H, 5, 5)
    assert torch.all(w[1, :, :, 2:] == 0)  # padded keys get no weight
    out, sw, cw = dec(x, memory, memory_mask=mask, need_weights=True)
    assert sw.shape == (2, H, 6, 6) and cw.shape == (2, H, 6, 5)
    assert torch.all(torch.triu(sw, diagonal=1) == 0)  # causal
    torch.testing.assert_close(cw.sum(-1), torch.ones(2, H, 6))


def test_constructor_and_cache_errors_are_clear():
    with pytest.raises(TypeError, match="norm_first must be a bool"):
        EncoderLayer(D, H, FF, norm_first="pre")
    with pytest.raises(ValueError, match="divisible"):
        DecoderLayer(D, 3, FF)
    with pytest.raises(ValueError, match="d_ff"):
        FeedForward(D, 0)
    layer = DecoderLayer(D, H, FF)
    x, memory = torch.randn(1, 1, D), torch.randn(1, 3, D)
    with pytest.raises(ValueError, match="static=True"):
        layer(x, memory, cross_cache=KVCache())
    with pytest.raises(ValueError, match="static=False"):
        layer(x, memory, self_cache=KVCache(static=True))
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, d_model=16\); got \(2, 3, 17\)"):
        EncoderLayer(D, H, FF)(torch.randn(2, 3, D + 1))
