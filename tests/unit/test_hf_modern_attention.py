"""course_lib's attention equals Hugging Face's Llama (GQA + RoPE), Mistral (sliding window) and gpt-oss
(sliding window + learned sinks) attention, built offline from tiny random configs, weights copied, in float32
to 1e-5: on a prefill and then over several cached decoding steps (HF's own masks and caches)."""

import warnings

import pytest
import torch

from course_lib.modern import DecoderAttention

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")

D, H, H_KV = 32, 4, 2
CHUNKS = [5, 1, 1, 2, 1, 3]  # a prefill, then single tokens and short chunks


def _tiny(kind, **extra):
    common = dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=H_KV, intermediate_size=48,
                  vocab_size=50, max_position_embeddings=64, attn_implementation="eager")
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=1, **common, **extra)
        return transformers.LlamaModel(cfg)
    if kind == "mistral":
        cfg = transformers.MistralConfig(num_hidden_layers=1, sliding_window=4, **common, **extra)
        return transformers.MistralModel(cfg)
    cfg = transformers.GptOssConfig(num_hidden_layers=2, head_dim=D // H, sliding_window=4, num_local_experts=4,
                                    num_experts_per_tok=2, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 10000.0},
                                    **common, **extra)
    return transformers.GptOssModel(cfg)


def _bigger_weights(model):
    """HF's init (std 0.02) makes tiny scores; std 0.2 makes positions and windows change the outputs visibly."""
    with torch.no_grad():
        for layer in model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.normal_(0.0, 0.2)
    return model


def _run_hf(model, ids, chunks):
    """Run HF's model chunk by chunk with its cache; return, per layer, the (input, output) of its attention."""
    seen = {i: [] for i in range(len(model.layers))}
    hooks = [layer.self_attn.register_forward_hook(
        lambda mod, args, kwargs, out, i=i: seen[i].append((kwargs["hidden_states"], out[0])), with_kwargs=True)
        for i, layer in enumerate(model.layers)]
    cache = transformers.DynamicCache(config=model.config)
    start = 0
    with torch.no_grad():
        for n in chunks:
            model(input_ids=ids[:, start:start + n], past_key_values=cache, use_cache=True)
            start += n
    for h in hooks:
        h.remove()
    return seen


def _check_layer(ours, pairs, *, chunks):
    cache = ours.new_cache()
    with torch.no_grad():
        for (x, ref), n in zip(pairs, chunks, strict=True):
            assert x.shape[1] == n
            torch.testing.assert_close(ours(x, is_causal=True, cache=cache), ref, atol=1e-5, rtol=1e-5)
    return cache


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt_oss"])
def test_equals_hugging_face_over_cached_steps(kind):
    torch.manual_seed(0)
    model = _bigger_weights(_tiny(kind)).eval()
    if kind == "gpt_oss":
        with torch.no_grad():
            for layer in model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)  # the default init is tiny; make the sinks matter
    ids = torch.randint(0, 50, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(1))
    seen = _run_hf(model, ids, CHUNKS)
    for i, layer in enumerate(model.layers):
        ours = DecoderAttention.from_hf(layer.self_attn).eval()
        assert ours.num_kv_heads == H_KV
        cache = _check_layer(ours, seen[i], chunks=CHUNKS)
        window = ours.window
        assert cache.key.shape[1] == H_KV  # only the shared heads are cached
        expected_len = sum(CHUNKS) if window is None else min(sum(CHUNKS), window)
        assert len(cache) == expected_len, (kind, i, len(cache))
    if kind == "gpt_oss":
        windows = [DecoderAttention.from_hf(layer.self_attn).window for layer in model.layers]
        assert windows == [4, None]  # gpt-oss alternates sliding and full layers


def test_one_pass_equals_hf_with_weights_path():
    torch.manual_seed(0)
    model = _bigger_weights(_tiny("mistral")).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    (x, ref), = _run_hf(model, ids, [9])[0]
    ours = DecoderAttention.from_hf(model.layers[0].self_attn).eval()
    with torch.no_grad():
        out, weights = ours(x, is_causal=True, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not weights[0, 0, 8, :5].any()  # the window: position 8 sees positions 5..8 only


def test_refuses_unsupported_rope_and_non_attention():
    with pytest.raises(TypeError, match="LlamaAttention, MistralAttention, GptOssAttention"):
        DecoderAttention.from_hf(torch.nn.Linear(2, 2))
    model = _tiny("llama", rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                            "long_factor": [2.0] * 4, "original_max_position_embeddings": 16})
    with pytest.raises(ValueError, match="rope_type.*longrope") as info:  # scaled RoPE: tests/unit/test_rope_scaling.py
        DecoderAttention.from_hf(model.layers[0].self_attn)
    assert "llama3" in str(info.value) and "yarn" in str(info.value)  # the message lists what is copied


@pytest.mark.parametrize(("kind", "reason"), [("qwen2", "o_proj has none"), ("cohere", "interleaved")])
def test_close_relatives_that_differ_are_refused_by_name(kind, reason):
    common = dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=H_KV, intermediate_size=48,
                  vocab_size=50, max_position_embeddings=64, num_hidden_layers=1, attn_implementation="eager")
    model = (transformers.Qwen2Model(transformers.Qwen2Config(**common)) if kind == "qwen2"
             else transformers.CohereModel(transformers.CohereConfig(**common)))
    attention = model.layers[0].self_attn
    with pytest.raises(TypeError, match=reason) as info:
        DecoderAttention.from_hf(attention)
    assert type(attention).__name__ in str(info.value)
