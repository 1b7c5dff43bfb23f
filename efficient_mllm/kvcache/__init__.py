"""efficient_mllm.kvcache: the KV cache pytree and cached generation."""

from efficient_mllm.kvcache.cache import KVCache, LayerCache, RecurrentCache
from efficient_mllm.kvcache.generate import GenerateOutput, generate, sample_logits

__all__ = ["GenerateOutput", "KVCache", "LayerCache", "RecurrentCache", "generate", "sample_logits"]
