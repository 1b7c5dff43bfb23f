"""efficient_mllm.ops: pure reference functions for every mechanism.

Importing this package registers the ``"softmax"`` attention variant in ``registry.ATTENTION``.
"""

from efficient_mllm.ops import masks
from efficient_mllm.ops.attention import IMPLS, dot_product_attention
from efficient_mllm.ops.masks import MaskSpec

__all__ = ["IMPLS", "MaskSpec", "dot_product_attention", "masks"]
