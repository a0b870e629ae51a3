"""The course's experiments: the models trained and measured in notebooks 07-11 and 99.

toy_translation and training: the toy dataset and a small training loop; head_ablation: why
several heads (notebook 07); head_gate: the per-head gate that scales or removes a head, for the
head-ablation model (07, 08) and the capstone (11); head_analysis: what heads do (notebook 08);
induction: induction heads in 1- and 2-layer attention-only models (08); lowrank: the low-rank
bottleneck and low-rank approximations (07, 10); precision: number formats and mixed precision
(09); capstone: the trained encoder-decoder (11).
"""
