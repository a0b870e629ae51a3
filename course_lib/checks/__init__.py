"""Exercise checkers, one per exercise, grouped by notebook (nb01.py, nb02.py, ...).

    from course_lib import checks
    checks.check_softmax(my_softmax)      # prints [PASSED] softmax: ... or [NOT YET] softmax: ... with a hint

Every checker `check_<name>` of the notebook modules is listed here, in exercise order, so that
readers and tools can follow each name to its module. A new checker goes into its notebook
module's `__all__` and into the lists below; tests/checkers/test_checks_meta.py fails if one is missing
or if two notebook modules export the same name.
"""

from course_lib.checks._core import CheckResult
from course_lib.checks.nb00 import check_decoding_mask, check_mask_quiz, check_shape_predictions
from course_lib.checks.nb01 import (
    check_additive_scores,
    check_attention,
    check_hand_example,
    check_lookup_design,
    check_masked_attention,
    check_scaled_scores,
    check_score_variance,
    check_softmax,
)
from course_lib.checks.nb02 import (
    check_attention_backward,
    check_backward_quiz,
    check_bias_backward,
    check_softmax_backward,
    check_softmax_jacobian,
    check_softmax_temperature_backward,
)
from course_lib.checks.nb03 import (
    check_autograd_grads,
    check_bias_grad_autograd,
    check_padding_sdpa_call,
    check_torch_attention,
    check_torch_quiz,
)
from course_lib.checks.nb04 import (
    check_cross_mha_cost,
    check_cross_mha_forward,
    check_heads_quiz,
    check_merge_heads,
    check_mha_forward,
    check_mha_module,
    check_mha_param_count,
    check_split_heads,
)
from course_lib.checks.nb05 import (
    check_causal_padding_mask,
    check_future_leak_test,
    check_masked_softmax,
    check_to_key_padding_mask,
)
from course_lib.checks.nb06 import (
    check_block_predictions,
    check_cached_attention_step,
    check_decoder_layer,
    check_encoder_block,
    check_sinusoidal_encoding,
    check_train_step,
)
from course_lib.checks.nb07 import (
    check_circle_weights,
    check_gated_concat,
    check_heads_sweep_quiz,
    check_param_count_vs_heads,
    check_score_rank,
)
from course_lib.checks.nb08 import (
    check_head_entropy,
    check_michel_importance,
    check_previous_token_score,
    check_row_entropy_by_hand,
    check_spearman,
)
from course_lib.checks.nb09 import (
    check_attention_flops,
    check_autocast_quiz,
    check_format_facts,
    check_fp16_safe_scores,
    check_relative_error,
    check_scaler_step,
)
from course_lib.checks.nb10 import (
    check_causal_tiled_traffic,
    check_merge_partials,
    check_online_softmax_step,
    check_tile_visited,
)
from course_lib.checks.nb11 import (
    check_beam_search,
    check_edit_distance,
    check_greedy_decode,
    check_shift_targets,
)
from course_lib.checks.nb12 import (
    check_gqa_attention,
    check_interleaved_rope,
    check_kv_cache_bytes,
    check_window_receptive_field,
)
from course_lib.checks.nb13 import check_merge_many, check_tp_cross_bytes, check_zigzag_positions
from course_lib.checks.nb14 import (
    check_blocks_needed,
    check_gather_kv,
    check_shared_prefix_blocks,
    check_window_decode_step,
)
from course_lib.checks.nb99 import check_heads_cost, check_sdpa_mask, check_token_output

__all__ = [
    "CheckResult",
    # 00 setup and course map
    "check_shape_predictions",
    "check_decoding_mask",
    "check_mask_quiz",
    # 01 attention in numpy
    "check_scaled_scores",
    "check_softmax",
    "check_attention",
    "check_masked_attention",
    "check_hand_example",
    "check_lookup_design",
    "check_score_variance",
    "check_additive_scores",
    # 02 backprop through attention
    "check_softmax_jacobian",
    "check_softmax_backward",
    "check_attention_backward",
    "check_softmax_temperature_backward",
    "check_bias_backward",
    "check_backward_quiz",
    # 03 numpy meets torch
    "check_torch_attention",
    "check_autograd_grads",
    "check_padding_sdpa_call",
    "check_bias_grad_autograd",
    "check_torch_quiz",
    # 04 multi-head attention
    "check_split_heads",
    "check_merge_heads",
    "check_mha_forward",
    "check_mha_module",
    "check_mha_param_count",
    "check_cross_mha_forward",
    "check_cross_mha_cost",
    "check_heads_quiz",
    # 05 masking and cross-attention
    "check_causal_padding_mask",
    "check_to_key_padding_mask",
    "check_masked_softmax",
    "check_future_leak_test",
    # 06 transformer blocks
    "check_block_predictions",
    "check_encoder_block",
    "check_decoder_layer",
    "check_train_step",
    "check_cached_attention_step",
    "check_sinusoidal_encoding",
    # 07 why several heads
    "check_heads_sweep_quiz",
    "check_score_rank",
    "check_gated_concat",
    "check_circle_weights",
    "check_param_count_vs_heads",
    # 08 inside the heads
    "check_row_entropy_by_hand",
    "check_head_entropy",
    "check_michel_importance",
    "check_spearman",
    "check_previous_token_score",
    # 09 GPU, Tensor Cores, mixed precision
    "check_format_facts",
    "check_autocast_quiz",
    "check_fp16_safe_scores",
    "check_scaler_step",
    "check_relative_error",
    "check_attention_flops",
    # 10 flash attention
    "check_tile_visited",
    "check_merge_partials",
    "check_causal_tiled_traffic",
    "check_online_softmax_step",
    # 11 capstone
    "check_shift_targets",
    "check_edit_distance",
    "check_greedy_decode",
    "check_beam_search",
    # 12 today's attention
    "check_kv_cache_bytes",
    "check_gqa_attention",
    "check_interleaved_rope",
    "check_window_receptive_field",
    # 13 attention across devices
    "check_tp_cross_bytes",
    "check_merge_many",
    "check_zigzag_positions",
    # 14 decoding at scale
    "check_blocks_needed",
    "check_gather_kv",
    "check_shared_prefix_blocks",
    "check_window_decode_step",
    # 99 errata of the sources
    "check_sdpa_mask",
    "check_heads_cost",
    "check_token_output",
]
