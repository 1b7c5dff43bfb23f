"""InternViT (Chen et al., 2024, "InternVL", arXiv:2312.14238), as in Hugging Face's
``InternVLVisionModel``.

Patch embedding (stride-``P`` conv with bias, as a linear map over flattened patches, see
``nn.vision.patchify``) -> a learned CLS token prepended -> learned absolute position
embeddings ``[1 + Np, D]`` -> ``depth`` pre-norm blocks with layer scale
(``x + lambda_1 * attn(norm1(x))``, ``x + lambda_2 * mlp(norm2(x))``; Touvron et al., 2021,
"CaiT", arXiv:2103.17239) -> final LayerNorm unless ``use_mean_pooling``. Attention has
optional q/k/v biases and an optional RMSNorm of q and k over the full width (``use_qk_norm``,
InternViT-6B) before the head split; no rotary embedding. Norms: LayerNorm or RMSNorm
(``norm_type``). Images must have the configured ``image_size`` (InternVL feeds fixed 448 px
tiles; the position-embedding interpolation Hugging Face applies to other sizes is not
implemented).

Attention probe (for visual-token compressors): :meth:`InternViT.forward` can also return the
[CLS] query's head-averaged softmax row over all ``1 + Np`` keys of chosen blocks (on each
block's input, as ``nn.vision`` reads it), computed for that one query (no ``N x N`` map).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import compat
from efficient_mllm.nn.config import DictMixin, as_dtype
from efficient_mllm.nn.layers import GeluMLP, Linear, RMSNorm, activation, make_norm, normal_init
from efficient_mllm.nn.vision import patchify
from efficient_mllm.nn.attention import query_attention_probs
from efficient_mllm.ops.attention import dot_product_attention

__all__ = ["InternViT", "InternViTConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class InternViTConfig(DictMixin):
    """Hyper-parameters of :class:`InternViT`. ``image_size`` is ``(height, width)`` (or an int),
    multiples of ``patch_size``; ``norm`` is ``"layernorm"`` or ``"rmsnorm"``."""

    image_size: Any
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    channels: int = 3
    qkv_bias: bool = False
    qk_norm: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    mlp_activation: str = "gelu"
    use_mean_pooling: bool = True
    impl: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            size = (int(size), int(size))
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise ValueError(
                f"InternViTConfig.image_size={self.image_size!r}: expected an int or (h, w)"
            )
        size = (int(size[0]), int(size[1]))
        object.__setattr__(self, "image_size", size)
        for name in ("patch_size", "width", "depth", "heads", "mlp_dim", "channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"InternViTConfig.{name}={v!r}: expected a positive int")
        if min(size) <= 0 or size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(
                f"InternViTConfig.image_size={size}: expected positive multiples of "
                f"patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(
                f"InternViTConfig.width={self.width} is not divisible by heads={self.heads}"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(
                f"InternViTConfig.norm={self.norm!r}: expected 'layernorm' or 'rmsnorm'"
            )
        activation(self.mlp_activation)
        if not self.norm_eps > 0:
            raise ValueError(f"InternViTConfig.norm_eps={self.norm_eps!r}: expected > 0")
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        object.__setattr__(self, "dtype", as_dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype).name)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


class InternAttention(nnx.Module):
    """q/k/v ``[D, heads, head_dim]`` (biases when ``qkv_bias``), optional ``q_norm``/``k_norm``
    (RMSNorm over ``D``, eps 1e-6), output ``proj`` with bias; non-causal softmax attention."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n = cfg.width, cfg.heads
        h = d // n
        kw = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype),
              "rngs": rngs}
        axes = ("vision_embed", "heads", "head_dim")
        self.q = Linear(d, (n, h), axes=axes, use_bias=cfg.qkv_bias, **kw)
        self.k = Linear(d, (n, h), axes=axes, use_bias=cfg.qkv_bias, **kw)
        self.v = Linear(d, (n, h), axes=axes, use_bias=cfg.qkv_bias, **kw)
        self.proj = Linear((n, h), d, axes=("heads", "head_dim", "vision_embed"), use_bias=True,
                           **kw)
        norm_kw = {"eps": 1e-6, "axis": "vision_embed", "dtype": jnp.dtype(cfg.dtype),
                   "param_dtype": jnp.dtype(cfg.param_dtype)}
        self.q_norm = RMSNorm(d, **norm_kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, **norm_kw) if cfg.qk_norm else None

    def _qk(self, xq: jax.Array, xk: jax.Array) -> tuple[jax.Array, jax.Array]:
        q, k = self.q(xq), self.k(xk)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        return q, k

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k = self._qk(x, x)
        out = dot_product_attention(q, k, self.v(x), impl=self.cfg.impl)
        return self.proj(out.astype(x.dtype))

    def attention_row(self, x: jax.Array, query_index: int = 0) -> jax.Array:
        """Head-averaged softmax row of query ``query_index`` over all keys of ``x [B, T, D]``
        (the attention input): float32 ``[B, T]``."""
        q, k = self._qk(x[:, query_index : query_index + 1], x)
        return query_attention_probs(q, k)[:, 0]


class InternBlock(nnx.Module):
    """Pre-norm block with layer scale ``lambda_1``, ``lambda_2`` (``[D]``)."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm_kw = {"eps": cfg.norm_eps, "axis": "vision_embed", "dtype": dtype,
                   "param_dtype": pdtype}
        self.norm1 = make_norm(cfg.norm, cfg.width, **norm_kw)
        self.attn = InternAttention(cfg, rngs=rngs)
        self.norm2 = make_norm(cfg.norm, cfg.width, **norm_kw)
        self.mlp = GeluMLP(
            cfg.width, cfg.mlp_dim, activation_name=cfg.mlp_activation, use_bias=True,
            embed_axis="vision_embed", dtype=dtype, param_dtype=pdtype, rngs=rngs,
        )
        init = jnp.full((cfg.width,), 0.1, pdtype)
        self.lambda_1 = compat.logical_param(init, ("vision_embed",))
        self.lambda_2 = compat.logical_param(init, ("vision_embed",))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.lambda_1[...].astype(self.dtype) * self.attn(self.norm1(x))
        return x + self.lambda_2[...].astype(self.dtype) * self.mlp(self.norm2(x))


class InternViT(nnx.Module):
    """Params: ``patch`` (Linear ``[P*P*C, D]`` with bias), ``cls [D]``, ``pos_embedding
    [1 + Np, D]``, ``blocks``, ``norm`` (LayerNorm, only without ``use_mean_pooling``)."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        if isinstance(cfg, dict):
            cfg = InternViTConfig.from_dict(cfg)
        if not isinstance(cfg, InternViTConfig):
            raise ValueError(f"cfg={cfg!r}: expected an InternViTConfig")  # noqa: TRY004
        self.cfg = cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        p, d = cfg.patch_size, cfg.width
        self.patch = Linear(
            p * p * cfg.channels, d, axes=("patch", "vision_embed"), use_bias=True,
            dtype=dtype, param_dtype=pdtype, rngs=rngs,
        )
        self.cls = compat.logical_param(
            normal_init(rngs.params(), shape=(d,), std=0.02, dtype=pdtype), ("vision_embed",)
        )
        self.pos_embedding = compat.logical_param(
            normal_init(rngs.params(), shape=(cfg.num_patches + 1, d), std=0.02, dtype=pdtype),
            (None, "vision_embed"),
        )
        self.blocks = nnx.List([InternBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = (
            None
            if cfg.use_mean_pooling
            else make_norm("layernorm", d, eps=cfg.norm_eps, axis="vision_embed", dtype=dtype,
                           param_dtype=pdtype)
        )

    def num_blocks_run(self, layer: int = -1) -> int:
        """Blocks run to produce hidden states ``layer`` (see :meth:`__call__`)."""
        depth = self.cfg.depth
        bad = isinstance(layer, bool) or not isinstance(layer, int)
        if bad or not -depth - 1 <= layer <= depth:
            raise ValueError(f"layer={layer!r}: expected an int in [{-depth - 1}, {depth}]")
        return depth if layer == -1 else layer % (depth + 1)

    def __call__(self, images: jax.Array, *, layer: int = -1) -> jax.Array:
        """``images [B, H, W, C]`` -> hidden states ``[B, 1 + Np, D]`` (CLS first).

        ``layer = -1``: the last block's output (through ``norm`` when present); ``layer = k >=
        0``: the output after ``k`` blocks (0 = embeddings), ``layer = -j``: after
        ``depth + 1 - j`` blocks (Hugging Face's ``hidden_states[layer]``, no final norm)."""
        return self.forward(images, layer=layer)[0]

    def forward(
        self, images: jax.Array, *, layer: int = -1, probe_blocks: tuple[int, ...] = ()
    ) -> tuple[jax.Array, jax.Array | None]:
        """``(hidden [B, 1 + Np, D]`` as :meth:`__call__`, ``probes [B, L, 1 + Np] | None)``:
        the [CLS] attention row of each block in ``probe_blocks`` (indices in ``[0, blocks
        run)``), computed on the block's input (float32, head-averaged, sums to 1 over all keys
        including [CLS])."""
        cfg = self.cfg
        stop = self.num_blocks_run(layer)
        probe_blocks = tuple(probe_blocks)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < stop
               for i in probe_blocks):
            raise ValueError(
                f"probe_blocks={probe_blocks!r}: expected block indices in [0, {stop}) (the "
                f"blocks run for layer={layer})"
            )
        want = (*cfg.image_size, cfg.channels)
        if getattr(images, "ndim", None) != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images shape={tuple(getattr(images, 'shape', ()))}: expected [B, {want[0]}, "
                f"{want[1]}, {want[2]}] (image_size, channels)"
            )
        dtype = jnp.dtype(cfg.dtype)
        x = self.patch(patchify(images.astype(dtype), cfg.patch_size))
        cls = jnp.broadcast_to(self.cls[...].astype(dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(dtype)
        rows = {}
        for i in range(stop):
            if i in probe_blocks:
                rows[i] = self.blocks[i].attn.attention_row(self.blocks[i].norm1(x))
            x = self.blocks[i](x)
        if layer == -1 and self.norm is not None:
            x = self.norm(x)
        probes = jnp.stack([rows[i] for i in probe_blocks], axis=1) if probe_blocks else None
        return x, probes
