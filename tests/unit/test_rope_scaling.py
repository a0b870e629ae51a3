"""RoPE scaling for long contexts (position interpolation, NTK-aware, dynamic NTK, Llama 3, YaRN) equals
Hugging Face's: the inverse frequencies and attention factor of its rotary embedding on tiny configs, and a
converted Llama (and gpt-oss, whose checkpoints use YaRN) attention in prefill and cached decoding past the
original length, in float32 to 1e-5. Plain RoPE against a scaled HF model misses by far more: the control."""

import math
import warnings

import pytest
import torch
from helpers import assert_clear_error
from test_hf_modern_attention import D, H, _bigger_weights, _check_layer, _run_hf, _tiny

from course_lib.modern import DecoderAttention
from course_lib.positional import RotaryEmbedding, rope_inv_freq

transformers = pytest.importorskip("transformers")
rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
warnings.filterwarnings("ignore")

D_HEAD, BASE, L0 = D // H, 10000.0, 16  # L0: the "original" (pre-training) length of the scaled configs
SCALINGS = {  # name -> Hugging Face rope_parameters (rope_theta apart)
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": L0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0},
    "yarn-gpt-oss": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": L0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                    "beta_fast": 16.0, "beta_slow": 2.0, "original_max_position_embeddings": L0},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.5,
                              "original_max_position_embeddings": L0},
}
CHUNKS = [10, 5, 1, 1, 2, 1, 3]  # a prefill, then single tokens and short chunks: 23 positions, past L0


def _config(name, max_len=64):
    return transformers.LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=2,
                                    max_position_embeddings=max_len,
                                    rope_parameters={**SCALINGS[name], "rope_theta": BASE})


def _ours(name, max_len=64):
    """Our scaling from the HF parameters (dynamic counts from max_position_embeddings, as HF's does)."""
    scaling = dict(SCALINGS[name])
    if name == "dynamic":
        scaling["original_max_position_embeddings"] = max_len
    return scaling


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inverse_frequencies_and_attention_factor_equal_hugging_face(name):
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(_config(name))
    inv_freq, factor = rope_inv_freq(D_HEAD, BASE, _ours(name), seq_len=1)
    torch.testing.assert_close(inv_freq, hf.inv_freq.double(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf.attention_scaling, rel=1e-12)
    plain, _ = rope_inv_freq(D_HEAD, BASE)
    if name != "dynamic":  # (dynamic is plain RoPE up to max_position_embeddings)
        assert (inv_freq - plain).abs().max() > 1e-3 * plain.max()  # the scaling does change them


@pytest.mark.parametrize("seq_len", [64, 65, 100, 1000])
def test_dynamic_equals_hugging_face_at_every_length(seq_len):
    hf, _ = rope_utils.ROPE_INIT_FUNCTIONS["dynamic"](_config("dynamic"), None, seq_len=seq_len)
    ours, _ = rope_inv_freq(D_HEAD, BASE, _ours("dynamic"), seq_len=seq_len)
    torch.testing.assert_close(ours, hf.double(), rtol=1e-6, atol=0)


def test_static_ntk_is_dynamic_at_the_length_where_their_factors_agree():
    """HF's dynamic at length s is the NTK-aware base change with factor f s / L - (f - 1): here 4 at s = 2.5 L."""
    hf, _ = rope_utils.ROPE_INIT_FUNCTIONS["dynamic"](_config("dynamic"), None, seq_len=160)
    ntk, _ = rope_inv_freq(D_HEAD, BASE, {"rope_type": "ntk", "factor": 4.0 * 160 / 64 - 3.0})
    torch.testing.assert_close(ntk, hf.double(), rtol=1e-6, atol=0)
    plain, _ = rope_inv_freq(D_HEAD, BASE)
    assert ntk[0] == plain[0] and ntk[-1] / plain[-1] == pytest.approx(1 / 7.0)  # fastest kept, slowest / factor


@pytest.mark.parametrize("name", ["linear", "dynamic", "llama3", "yarn", "yarn-mscale"])
def test_cos_sin_equal_hugging_face(name):
    max_len = 16 if name == "dynamic" else 64
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(_config(name, max_len))
    positions = torch.arange(40)
    cos_hf, sin_hf = hf(torch.zeros(1, dtype=torch.float32), positions[None])  # (1, 40, D_HEAD): halves repeated
    cos, sin = RotaryEmbedding(D_HEAD, scaling=_ours(name, max_len)).cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos, cos_hf[0, :, : D_HEAD // 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, sin_hf[0, :, : D_HEAD // 2], atol=1e-5, rtol=0)


def _scaled_model(kind, name, max_len=64):
    rope = {**SCALINGS[name], "rope_theta": BASE}
    model = _tiny(kind, rope_parameters=rope) if kind == "llama" else _tiny_gpt_oss(rope)
    if kind == "llama" and max_len != 64:
        model = transformers.LlamaModel(transformers.LlamaConfig(**{**model.config.to_dict(),
                                                                   "max_position_embeddings": max_len}))
    return _bigger_weights(model).eval()


def _tiny_gpt_oss(rope):
    cfg = transformers.GptOssConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=2, head_dim=D_HEAD,
                                    intermediate_size=48, vocab_size=50, max_position_embeddings=64,
                                    num_hidden_layers=2, sliding_window=4, num_local_experts=4,
                                    num_experts_per_tok=2, rope_parameters=rope, attn_implementation="eager")
    return transformers.GptOssModel(cfg)


@pytest.mark.parametrize(("kind", "name"), [("llama", "linear"), ("llama", "dynamic"), ("llama", "llama3"),
                                            ("llama", "yarn"), ("llama", "yarn-mscale"),
                                            ("gpt_oss", "yarn-gpt-oss")])
def test_scaled_attention_equals_hugging_face_in_prefill_and_cached_decoding(kind, name):
    torch.manual_seed(0)
    model = _scaled_model(kind, name, max_len=12 if name == "dynamic" else 64)  # dynamic acts past 12
    ids = torch.randint(0, 50, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(1))
    seen = _run_hf(model, ids, CHUNKS)
    for i, layer in enumerate(model.layers):
        ours = DecoderAttention.from_hf(layer.self_attn).eval()
        assert ours.rotary is not None and ours.rotary.scaling is not None
        assert ours.rotary.scaling["rope_type"] == SCALINGS[name]["rope_type"]
        _check_layer(ours, seen[i], chunks=CHUNKS)  # every chunk to 1e-5


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn"])
def test_negative_control_plain_rope_misses_scaled_hugging_face(name):
    torch.manual_seed(0)
    model = _scaled_model("llama", name)
    ids = torch.randint(0, 50, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(1))
    (x, ref), = _run_hf(model, ids, [sum(CHUNKS)])[0]
    ours = DecoderAttention.from_hf(model.layers[0].self_attn).eval()
    ours.rotary = RotaryEmbedding(D_HEAD)  # the same weights, unscaled positions
    with torch.no_grad():
        miss = (ours(x, is_causal=True) - ref).abs().max().item()
    assert miss > 1e-2  # a thousand times the bound the scaled copy meets


def test_bad_scalings_are_refused_by_name():
    assert_clear_error(lambda: RotaryEmbedding(8, scaling={"rope_type": "longrope", "factor": 2.0}), ValueError,
                       ["rope_type", "longrope", "yarn"])
    assert_clear_error(lambda: RotaryEmbedding(8, scaling=[("rope_type", "linear")]), TypeError, ["scaling"])
    assert_clear_error(lambda: RotaryEmbedding(8, scaling={"rope_type": "linear", "factor": 0.0}), ValueError,
                       ["factor"])
    assert_clear_error(lambda: RotaryEmbedding(8, scaling={"rope_type": "linear", "factor": -2}), ValueError,
                       ["factor"])
    assert_clear_error(lambda: RotaryEmbedding(8, scaling={"rope_type": "linear", "factor": "4"}), TypeError,
                       ["factor"])
    assert_clear_error(lambda: RotaryEmbedding(8, scaling={"rope_type": "yarn", "factor": 4.0}), ValueError,
                       ["original_max_position_embeddings", "missing"])
    assert_clear_error(lambda: RotaryEmbedding(8, scaling={"rope_type": "linear", "factr": 4.0}), ValueError,
                       ["factor", "factr"])
    llama3 = {**SCALINGS["llama3"], "high_freq_factor": 1.0}
    assert_clear_error(lambda: RotaryEmbedding(8, scaling=llama3), ValueError, ["high_freq_factor"])
    yarn = {**SCALINGS["yarn"], "beta_fast": 1.0, "beta_slow": 32.0}
    assert_clear_error(lambda: RotaryEmbedding(8, scaling=yarn), ValueError, ["beta_fast"])
    assert_clear_error(lambda: RotaryEmbedding(2, scaling={"rope_type": "ntk", "factor": 2.0}), ValueError,
                       ["d_head"])
    assert_clear_error(lambda: rope_inv_freq(8, scaling={"rope_type": "dynamic", "factor": 2.0,
                                                         "original_max_position_embeddings": 8}), ValueError,
                       ["seq_len"])
    assert RotaryEmbedding(8, scaling={"rope_type": "default"}).scaling is None


def test_yarn_attention_factor_is_the_papers_temperature():
    """YaRN: sqrt(1/t) = 0.1 ln(s) + 1, on both q and k, so the scores grow by its square."""
    _, factor = rope_inv_freq(D_HEAD, BASE, SCALINGS["yarn"])
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    rope = RotaryEmbedding(D_HEAD, scaling=SCALINGS["yarn"])
    x = torch.randn(3, D_HEAD, dtype=torch.float64)
    torch.testing.assert_close(rope(x).norm(dim=-1), factor * x.norm(dim=-1))
