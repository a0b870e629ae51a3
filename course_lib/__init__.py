"""course_lib: the final, tested implementations of the multi-head attention course.

from course_lib import MultiHeadAttention, numpy_ref, masks
from course_lib.attention import scaled_dot_product_attention
"""

from course_lib import masks, numpy_ref
from course_lib.attention import scaled_dot_product_attention
from course_lib.kv_cache import KVCache
from course_lib.mha import MultiHeadAttention

__all__ = ["MultiHeadAttention", "KVCache", "masks", "numpy_ref", "scaled_dot_product_attention"]
__version__ = "0.1.0"
