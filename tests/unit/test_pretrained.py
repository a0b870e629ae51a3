"""The real pretrained MiniLM (BERT, 6 layers x 12 heads) loads offline, and course_lib.MultiHeadAttention
reproduces every one of its attention layers on a padded batch of real sentences."""

import pytest
import torch

from course_lib import MultiHeadAttention
from course_lib.masks import padding_mask
from course_lib.pretrained import load_minilm

SENTENCES = [
    "The animal didn't cross the street because it was too tired.",
    "The animal didn't cross the street because it was too wide.",
    "I am a teacher.",
    "Multi-head attention runs several attention functions in parallel and concatenates their outputs.",
]


@pytest.fixture(scope="module")
def minilm_run():
    tokenizer, model = load_minilm()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    dense_out = {}
    hooks = [layer.attention.output.dense.register_forward_hook(
        lambda module, args, out, i=i: dense_out.__setitem__(i, out))
        for i, layer in enumerate(model.encoder.layer)]
    try:
        with torch.no_grad():
            result = model(**batch, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return model, batch, result, dense_out


def test_load_minilm_offline_gives_the_pretrained_6_layer_12_head_bert(minilm_run):
    model, batch, result, _ = minilm_run
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (6, 12, 384)
    assert not model.training
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and min(lengths) < max(lengths)  # really padded: three different lengths
    assert len(result.attentions) == 6 and result.attentions[0].shape == (4, 12, max(lengths), max(lengths))
    # pretrained, not random: the two "animal ... it" sentences get close sentence embeddings, the teacher one not
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((result.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.8 and sim[0, 2] < sim[0, 1] - 0.3


@pytest.mark.parametrize("layer_index", range(6))
def test_from_hf_bert_reproduces_each_attention_layer_and_its_weights(minilm_run, layer_index):
    model, batch, result, dense_out = minilm_run
    layer = model.encoder.layer[layer_index]
    ours = MultiHeadAttention.from_hf_bert(layer.attention)
    assert not ours.training and (ours.d_model, ours.num_heads, ours.d_head) == (384, 12, 32)
    hidden = result.hidden_states[layer_index]  # the input of this layer: (B, T, 384)
    T = hidden.shape[1]
    mask = padding_mask(batch["attention_mask"].sum(1), T)  # (B, 1, 1, T), True = real token
    with torch.no_grad():
        out_fast = ours(hidden, attn_mask=mask)
        out, weights = ours(hidden, attn_mask=mask, need_weights=True)
    expected = dense_out[layer_index]  # after output.dense, before dropout + residual + LayerNorm
    torch.testing.assert_close(out_fast, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, result.attentions[layer_index], atol=1e-5, rtol=1e-5)
    # the mask mattered: without it the padded sentences come out different
    with torch.no_grad():
        unmasked = ours(hidden)
    assert not torch.allclose(unmasked[2], expected[2], atol=1e-3)


@pytest.mark.parametrize("bar_on", [False, True])
def test_loading_leaves_hugging_faces_logging_settings_as_they_were(bar_on):
    from transformers.utils import logging

    before = logging.get_verbosity(), logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if bar_on else logging.disable_progress_bar)()
    try:
        load_minilm()
        assert logging.is_progress_bar_enabled() is bar_on
        assert logging.get_verbosity() == before[0]
    finally:
        (logging.enable_progress_bar if before[1] else logging.disable_progress_bar)()
