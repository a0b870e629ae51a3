"""Exercise checkers, one per exercise, grouped by notebook (nb01.py, nb02.py, ...).

    from course_lib import checks
    checks.check_softmax(my_softmax)      # prints [PASSED] softmax: ... or [NOT YET] softmax: ... with a hint

Every checker `check_<name>` of the notebook modules is listed here, in exercise order, so that
readers and tools can follow each name to its module. A new checker goes into its notebook
module's `__all__` and into the lists below; tests/test_checks_meta.py fails if one is missing
or if two notebook modules export the same name.
"""

from course_lib.checks._core import CheckResult
from course_lib.checks.nb01 import check_attention, check_masked_attention, check_scaled_scores, check_softmax
from course_lib.checks.nb02 import check_attention_backward, check_softmax_backward, check_softmax_jacobian
from course_lib.checks.nb03 import check_autograd_grads, check_torch_attention
from course_lib.checks.nb04 import check_merge_heads, check_mha_forward, check_mha_param_count, check_split_heads
from course_lib.checks.nb05 import check_causal_padding_mask, check_masked_softmax, check_to_key_padding_mask
from course_lib.checks.nb06 import check_cached_attention_step, check_sinusoidal_encoding
from course_lib.checks.nb07 import check_gated_concat, check_param_count_vs_heads
from course_lib.checks.nb08 import check_head_entropy, check_previous_token_score
from course_lib.checks.nb09 import check_attention_flops, check_fp16_safe_scores, check_relative_error
from course_lib.checks.nb10 import check_online_softmax_step
from course_lib.checks.nb11 import check_greedy_decode, check_shift_targets
from course_lib.checks.nb12 import (
    check_gqa_attention,
    check_interleaved_rope,
    check_kv_cache_bytes,
    check_window_receptive_field,
)

__all__ = [
    "CheckResult",
    # 01 attention in numpy
    "check_scaled_scores",
    "check_softmax",
    "check_attention",
    "check_masked_attention",
    # 02 backprop through attention
    "check_softmax_jacobian",
    "check_softmax_backward",
    "check_attention_backward",
    # 03 numpy meets torch
    "check_torch_attention",
    "check_autograd_grads",
    # 04 multi-head attention
    "check_split_heads",
    "check_merge_heads",
    "check_mha_forward",
    "check_mha_param_count",
    # 05 masking and cross-attention
    "check_causal_padding_mask",
    "check_to_key_padding_mask",
    "check_masked_softmax",
    # 06 transformer blocks
    "check_sinusoidal_encoding",
    "check_cached_attention_step",
    # 07 why several heads
    "check_param_count_vs_heads",
    "check_gated_concat",
    # 08 inside the heads
    "check_head_entropy",
    "check_previous_token_score",
    # 09 GPU, Tensor Cores, mixed precision
    "check_relative_error",
    "check_attention_flops",
    "check_fp16_safe_scores",
    # 10 flash attention
    "check_online_softmax_step",
    # 11 capstone
    "check_shift_targets",
    "check_greedy_decode",
    # 12 today's attention
    "check_kv_cache_bytes",
    "check_gqa_attention",
    "check_interleaved_rope",
    "check_window_receptive_field",
]
