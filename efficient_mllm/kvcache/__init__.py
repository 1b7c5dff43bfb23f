"""efficient_mllm.kvcache: the KV cache pytree and cached generation."""

from efficient_mllm.kvcache.cache import KVCache, LayerCache
from efficient_mllm.kvcache.generate import GenerateOutput, generate, sample_logits

__all__ = ["GenerateOutput", "KVCache", "LayerCache", "generate", "sample_logits"]
