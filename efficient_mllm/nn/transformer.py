"""Pre-norm transformer block (Xiong et al., 2020, "On Layer Normalization in the Transformer
Architecture", arXiv:2002.04745): ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from efficient_mllm.nn.attention import Attention
from efficient_mllm.nn.config import BlockConfig
from efficient_mllm.nn.layers import GeluMLP, SwiGLUMLP, make_norm

__all__ = ["TransformerBlock"]


class TransformerBlock(nnx.Module):
    """Submodules ``attn_norm``, ``attn`` (:class:`~efficient_mllm.nn.attention.Attention`),
    ``mlp_norm`` and ``mlp`` (SwiGLU or GELU), configured by a :class:`BlockConfig`."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, BlockConfig):
            raise ValueError(f"cfg={cfg!r}: expected a BlockConfig")
        self.cfg = cfg
        norm_kw = {
            "eps": cfg.norm_eps,
            "axis": cfg.embed_axis,
            "dtype": cfg.compute_dtype,
            "param_dtype": cfg.weight_dtype,
        }
        self.attn_norm = make_norm(cfg.norm, cfg.dim, **norm_kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg.norm, cfg.dim, **norm_kw)
        mlp_kw = {
            "use_bias": cfg.mlp_bias,
            "embed_axis": cfg.embed_axis,
            "dtype": cfg.compute_dtype,
            "param_dtype": cfg.weight_dtype,
            "rngs": rngs,
        }
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLUMLP(cfg.dim, cfg.mlp_dim, **mlp_kw)
        else:
            self.mlp = GeluMLP(cfg.dim, cfg.mlp_dim, activation_name=cfg.mlp_activation, **mlp_kw)

    def __call__(self, x: jax.Array, *, positions=None, mask=None, q_offset=None, cache=None):
        """``x [B, T, D]`` -> ``(x [B, T, D], cache)``; arguments as in ``Attention.__call__``."""
        h, cache = self.attn(
            self.attn_norm(x), positions=positions, mask=mask, q_offset=q_offset, cache=cache
        )
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache

    def attention_row(self, x: jax.Array, *, positions=None, query_index: Any = 0, key_mask=None):
        """This block's attention probe on its input ``x`` (see ``Attention.attention_row``)."""
        return self.attn.attention_row(
            self.attn_norm(x), positions=positions, query_index=query_index, key_mask=key_mask
        )
