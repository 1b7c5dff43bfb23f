"""efficient_mllm: efficient multimodal LLMs in JAX (attention variants, token and KV compressors,
Pallas kernels, sharded train/eval loops)."""

__version__ = "0.1.0"

from efficient_mllm import registry  # noqa: F401
