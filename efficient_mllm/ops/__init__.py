"""efficient_mllm.ops: pure reference functions for every mechanism."""

from efficient_mllm.ops import masks  # noqa: F401
from efficient_mllm.ops.attention import dot_product_attention  # noqa: F401  (registers "softmax")
