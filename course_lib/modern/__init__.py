"""The attention of today's models, built on the spine's MultiHeadAttention (notebook 12).

mla: multi-head latent attention (DeepSeek-V2/V3), its cache of latents and the absorbed
decoding form.
"""
