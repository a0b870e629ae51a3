"""Attention across devices on torch.distributed (notebook 13).

distributed: a launcher for several processes and a counted communication layer;
tensor_parallel: heads split over ranks (Megatron-LM); ring_attention: the sequence split over
ranks, key/value shards passed round a ring (ring attention, striped and zigzag layouts);
ulysses: the sequence split over ranks, all-to-alls trading sequence shards for head shards
(DeepSpeed-Ulysses); check: the self-check harness every parallel module runs against the
single-device MultiHeadAttention.
"""
