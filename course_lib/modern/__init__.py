"""The attention of today's models, built on the spine's MultiHeadAttention (notebook 12).

decoder_attention: DecoderAttention, MultiHeadAttention with sliding windows, sink tokens and
learned sinks (Mistral, StreamingLLM, gpt-oss); convert: copies of Hugging Face decoder attention;
mla: multi-head latent attention (DeepSeek-V2/V3), its cache of latents and the absorbed
decoding form; feed_forward: SwiGLUFeedForward, Llama's gated feed-forward network (notebook 06).
"""

from course_lib.modern.decoder_attention import DecoderAttention
from course_lib.modern.feed_forward import SwiGLUFeedForward
from course_lib.modern.mla import LatentCache, MultiHeadLatentAttention

__all__ = ["DecoderAttention", "LatentCache", "MultiHeadLatentAttention", "SwiGLUFeedForward"]
