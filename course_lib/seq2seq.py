"""A small encoder-decoder transformer built from course_lib's layers, with KV-cached greedy decoding.

    src ids (B, S) --embed * sqrt(d_model) + positions--> EncoderLayer x N --> memory (B, S, d_model)
    tgt ids (B, T) --embed * sqrt(d_model) + positions--> DecoderLayer x N (causal self-attention,
        cross-attention to memory, FFN) --> Linear --> logits (B, T, tgt_vocab)

positional="sinusoidal" (the default), "learned" or "none" adds position vectors to the embeddings;
positional="rotary" adds none and rotates the queries and keys of every self-attention instead (RoPE,
positions counted from 0 in the source and in the target); the cross-attentions stay unrotated.

Padding: source and target id 0 is <pad>. The source padding mask (B, 1, 1, S) (True = real
token) is used in the encoder's self-attention and in every cross-attention. Target padding
needs no mask: padding sits after the real tokens, and the causal mask already stops a real
token from seeing anything to its right; the loss ignores padded positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import cast

import torch
from torch import nn

from course_lib._validate import check_bool, check_nonnegative_int, check_positive_int, check_probability, shape_str
from course_lib.blocks import DecoderLayer, EncoderLayer
from course_lib.kv_cache import KVCache, unchanged_on_error
from course_lib.positional import LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding

__all__ = ["Seq2SeqConfig", "Seq2SeqTransformer", "greedy_decode", "DecoderCaches", "POSITIONALS"]

POSITIONALS = ("sinusoidal", "learned", "rotary", "none")
DecoderCaches = list[tuple[KVCache, KVCache]]  # one (self-attention cache, cross-attention cache) per layer


@dataclass
class Seq2SeqConfig:
    """The sizes of a Seq2SeqTransformer, checked when made (a bad value is refused by name).

    Vocabularies of the source and target languages; d_model, num_heads, d_ff and the layer counts
    of the encoder and decoder; dropout everywhere; max_len, the longest sequence the positions
    cover; norm_first, pre-LN (True) or post-LN; positional, how positions enter ("sinusoidal",
    "learned", "rotary" or "none"); the ids of the padding, begin and end tokens.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 256
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dropout: float = 0.0
    max_len: int = 64
    norm_first: bool = True
    positional: str = "sinusoidal"  # "sinusoidal", "learned", "rotary" or "none"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "d_ff", "max_len",
                     "num_encoder_layers", "num_decoder_layers"):
            setattr(self, name, check_positive_int(name, getattr(self, name)))  # numpy ints become ints (JSON)
        self.dropout = check_probability("dropout", self.dropout)  # a numpy float becomes a float (JSON)
        check_bool("norm_first", self.norm_first)
        for name, vocab in (("pad_id", min(self.src_vocab_size, self.tgt_vocab_size)),
                            ("bos_id", self.tgt_vocab_size), ("eos_id", self.tgt_vocab_size)):
            value = check_nonnegative_int(name, getattr(self, name), " (a token id)")
            if value >= vocab:
                raise ValueError(f"{name} must be a token id in [0, {vocab}); got {value!r}")
            setattr(self, name, value)
        if len({self.pad_id, self.bos_id, self.eos_id}) < 3:
            raise ValueError(f"pad_id, bos_id and eos_id must differ; got {self.pad_id}, {self.bos_id}, {self.eos_id}")
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional must be one of {POSITIONALS}; got {self.positional!r}")
        if self.positional == "rotary" and self.d_model % self.num_heads == 0 and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"positional='rotary' needs an even d_head = d_model / num_heads (features rotate in "
                             f"pairs); got d_model={self.d_model}, num_heads={self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Seq2SeqConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Seq2SeqConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _positional(config: Seq2SeqConfig) -> nn.Module:
    if config.positional == "sinusoidal":
        return SinusoidalPositionalEncoding(config.d_model, config.max_len, dropout=config.dropout)
    if config.positional == "learned":
        return LearnedPositionalEmbedding(config.d_model, config.max_len, dropout=config.dropout)
    return _NoPosition()  # "none", and "rotary", whose positions enter in the self-attentions


def _rotary(config: Seq2SeqConfig) -> RotaryEmbedding | None:
    """A RotaryEmbedding(d_head) for one layer's self-attention when positional == "rotary", else None."""
    return RotaryEmbedding(config.d_model // config.num_heads) if config.positional == "rotary" else None


class _NoPosition(nn.Module):
    """positional="none": the embeddings as they are (attention then sees a set, not a sequence)."""

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x


class Seq2SeqTransformer(nn.Module):
    """An encoder-decoder transformer (Vaswani et al. 2017) built from course_lib's layers (notebooks 06, 11).

    encode(src (B, S)) -> memory (B, S, d_model) and its padding mask; decode(tgt (B, T), memory,
    memory_mask) -> logits (B, T, tgt_vocab_size), teacher-forced, or with caches (new_caches())
    one step at a time; forward(src, tgt) does both. greedy_decode(model, src) generates.
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config must be a Seq2SeqConfig; got {type(config).__name__}")
        self.config = c = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model)
        self.src_pos = _positional(c)
        self.tgt_pos = _positional(c)
        layer_args = (c.d_model, c.num_heads, c.d_ff)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(*layer_args, dropout=c.dropout, norm_first=c.norm_first, rotary=_rotary(c))
            for _ in range(c.num_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(*layer_args, dropout=c.dropout, norm_first=c.norm_first, rotary=_rotary(c))
            for _ in range(c.num_decoder_layers))
        # pre-LN stacks end in a LayerNorm (each layer's output is an un-normalised residual sum)
        self.encoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.generator = nn.Linear(c.d_model, c.tgt_vocab_size)
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.normal_(emb.weight, std=c.d_model ** -0.5)

    # ------------------------------------------------------------------ input checks
    def _check_ids(self, name: str, ids: torch.Tensor, vocab_size: int) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids; got {type(ids).__name__}")
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be (B, L) int64 token ids; got {shape_str(ids.shape)} {ids.dtype}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{name} ids must lie in [0, {vocab_size}); got min {int(ids.min())}, "
                             f"max {int(ids.max())}")

    def source_mask(self, src: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, S) bool, True = real source token (not <pad>)."""
        return (src != self.config.pad_id)[:, None, None, :]

    # ------------------------------------------------------------------ the two halves
    def encode(self, src: torch.Tensor, *, need_weights: bool = False):
        """src (B, S) ids -> memory (B, S, d_model), memory_mask (B, 1, 1, S)
        [, list of encoder self-attention weights (B, H, S, S) per layer]."""
        self._check_ids("src", src, self.config.src_vocab_size)
        memory_mask = self.source_mask(src)
        x = self.src_pos(self.src_embed(src) * math.sqrt(self.config.d_model))  # (B, S, d_model)
        weights = []
        for layer in cast("Iterable[EncoderLayer]", self.encoder_layers):  # nn.ModuleList yields nn.Module
            x, w = layer.run(x, memory_mask, need_weights=need_weights)
            weights.append(w)
        memory = self.encoder_norm(x)
        return (memory, memory_mask, weights) if need_weights else (memory, memory_mask)

    def _check_caches(self, caches: object) -> None:
        n = len(self.decoder_layers)
        if not isinstance(caches, (list, tuple)) or len(caches) != n:
            raise ValueError(f"caches must be a list of one (self, cross) pair per decoder layer ({n}), "
                             f"of KVCaches, as new_caches() makes; got {type(caches).__name__} of length "
                             f"{len(caches) if isinstance(caches, (list, tuple)) else '-'}")
        for i, pair in enumerate(caches):
            ok = (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(c, KVCache) for c in pair)
                  and not pair[0].static and pair[1].static)
            if not ok:
                raise TypeError(f"caches[{i}] must be a pair (KVCache(), KVCache(static=True)), as new_caches() "
                                f"makes; got {pair!r:.80}")
        if len({len(self_cache) for self_cache, _ in caches}) > 1:
            raise ValueError("the self-attention caches hold different lengths: they were not filled by one decode")

    def new_caches(self) -> DecoderCaches:
        """Empty caches for incremental decoding: (growing self-attention, static cross-attention) per layer."""
        return [(KVCache(), KVCache(static=True)) for _ in self.decoder_layers]

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, *,
               caches: DecoderCaches | None = None, need_weights: bool = False):
        """tgt (B, T) ids -> logits (B, T, tgt_vocab) [, self weights list, cross weights list].

        With caches (from new_caches()), tgt holds only the NEW tokens; their positions start at
        the number of tokens already cached, and the caches are extended in place.
        """
        self._check_ids("tgt", tgt, self.config.tgt_vocab_size)
        if caches is not None:
            self._check_caches(caches)
        # positions seen so far (more than the cache holds once a windowed cache evicts)
        offset = 0 if caches is None else caches[0][0].next_position
        x = self.tgt_pos(self.tgt_embed(tgt) * math.sqrt(self.config.d_model), offset)  # (B, T, d_model)
        self_weights, cross_weights = [], []
        with unchanged_on_error(*(c for pair in caches or () for c in pair)):  # every layer's caches, or none
            for i, layer in enumerate(cast("Iterable[DecoderLayer]", self.decoder_layers)):  # as in encode
                self_cache, cross_cache = (None, None) if caches is None else caches[i]
                x, sw, cw = layer.run(x, memory, memory_mask=memory_mask, self_cache=self_cache,
                                      cross_cache=cross_cache, need_weights=need_weights)
                self_weights.append(sw)
                cross_weights.append(cw)
        logits = self.generator(self.decoder_norm(x))  # (B, T, tgt_vocab)
        return (logits, self_weights, cross_weights) if need_weights else logits

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) = <bos> + target[:-1] -> logits (B, T, tgt_vocab)."""
        memory, memory_mask = self.encode(src)
        return self.decode(tgt_in, memory, memory_mask)

    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """All attention weights of one teacher-forced pass: {"encoder": [(B,H,S,S)], "decoder": [(B,H,T,T)],
        "cross": [(B,H,T,S)]}, one tensor per layer (the layout bertviz's head_view takes)."""
        with torch.no_grad():
            memory, memory_mask, enc = self.encode(src, need_weights=True)
            _, dec, cross = self.decode(tgt_in, memory, memory_mask, need_weights=True)
        return {"encoder": enc, "decoder": dec, "cross": cross}

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, *, max_new_tokens: int | None = None, use_cache: bool = True,
                      return_logits: bool = False):
        """Greedy decoding of a batch; see the module-level greedy_decode."""
        return greedy_decode(self, src, max_new_tokens=max_new_tokens, use_cache=use_cache,
                             return_logits=return_logits)


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, src: torch.Tensor, *, max_new_tokens: int | None = None,
                  use_cache: bool = True, return_logits: bool = False):
    """Pick the most likely next token until every sequence has produced <eos> (or max_new_tokens).

    use_cache=True: the encoder runs once, and each step feeds ONE token through the decoder with
    KV caches (O(T) work per step). use_cache=False recomputes the whole prefix every step
    (O(T^2) per step) - same tokens, slower; notebook 06 times both.
    Returns (B, L) ids (without <bos>; positions after a sequence's <eos> are <pad>), and with
    return_logits=True also the (B, L, tgt_vocab) logits of every step.
    """
    if not isinstance(model, Seq2SeqTransformer):
        raise TypeError(f"model must be a Seq2SeqTransformer; got {type(model).__name__}")
    model._check_ids("src", src, model.config.src_vocab_size)  # before the model is switched to eval mode
    check_bool("use_cache", use_cache)
    check_bool("return_logits", return_logits)
    c = model.config
    max_new_tokens = c.max_len - 1 if max_new_tokens is None else check_positive_int("max_new_tokens",
                                                                                        max_new_tokens)
    if max_new_tokens > c.max_len - 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the model's max_len - 1 = {c.max_len - 1}")
    was_training = model.training
    model.eval()
    memory, memory_mask = model.encode(src)
    B = src.shape[0]
    generated = torch.full((B, 1), c.bos_id, dtype=torch.long, device=src.device)  # (B, 1): <bos>
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)
    caches = model.new_caches() if use_cache else None
    step_logits = []
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model.decode(generated[:, -1:], memory, memory_mask, caches=caches)[:, -1]  # (B, V)
        else:
            logits = model.decode(generated, memory, memory_mask)[:, -1]  # (B, V)
        step_logits.append(logits)
        next_token = logits.argmax(dim=-1).masked_fill(finished, c.pad_id)  # (B,)
        generated = torch.cat([generated, next_token[:, None]], dim=1)
        finished |= next_token == c.eos_id
        if finished.all():
            break
    model.train(was_training)
    out = generated[:, 1:]
    return (out, torch.stack(step_logits, dim=1)) if return_logits else out
