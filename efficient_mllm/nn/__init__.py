"""efficient_mllm.nn: Flax NNX modules (layers, attention, blocks, ViT, decoder, MLLM)."""

from efficient_mllm.nn.attention import Attention
from efficient_mllm.nn.config import AttentionConfig, BlockConfig, VisionConfig
from efficient_mllm.nn.language import (
    LanguageConfig,
    LanguageModel,
    LanguageOutput,
    LayerState,
)
from efficient_mllm.nn.layers import Embed, GeluMLP, LayerNorm, Linear, RMSNorm, SwiGLUMLP
from efficient_mllm.nn.mllm import MLLM, ImageTokens, MLLMConfig, MLLMOutput, Projector
from efficient_mllm.nn.transformer import TransformerBlock
from efficient_mllm.nn.vision import VisionEncoder, VisionOutput

__all__ = [
    "MLLM",
    "Attention",
    "AttentionConfig",
    "BlockConfig",
    "Embed",
    "GeluMLP",
    "ImageTokens",
    "LanguageConfig",
    "LanguageModel",
    "LanguageOutput",
    "LayerNorm",
    "LayerState",
    "Linear",
    "MLLMConfig",
    "MLLMOutput",
    "Projector",
    "RMSNorm",
    "SwiGLUMLP",
    "TransformerBlock",
    "VisionConfig",
    "VisionEncoder",
    "VisionOutput",
]
