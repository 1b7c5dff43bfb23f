"""Vision Transformer encoder (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words",
arXiv:2010.11929) with an attention probe for visual-token compressors.

Patch embedding is a reshape + linear map (equivalent to a stride-``p`` convolution): patches
are flattened in ``(row-in-patch, col-in-patch, channel)`` order, so a conv kernel
``[D, C, p, p]`` converts with ``kernel.transpose(2, 3, 1, 0).reshape(p * p * C, D)``.
Positions are learned absolute embeddings or 2D RoPE (Heo et al., 2024, arXiv:2403.13298) in
every block; with 2D RoPE the CLS token sits at ``(0, 0)`` and is therefore not rotated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_mllm import compat
from efficient_mllm.nn.config import VisionConfig
from efficient_mllm.nn.layers import LayerNorm, Linear, normal_init
from efficient_mllm.nn.transformer import TransformerBlock
from efficient_mllm.ops import rope as rope_ops

__all__ = ["VisionEncoder", "VisionOutput", "patchify"]


@dataclasses.dataclass(frozen=True)
class VisionOutput:
    """Encoder outputs (a pytree; ``grid`` is static).

    * ``patches [B, Np, D]``: final-LayerNorm'd patch tokens in raster order (no CLS).
    * ``cls [B, D] | None``: the final-LayerNorm'd CLS token (``use_cls``).
    * ``cls_attention [B, Np] | None`` (``return_cls_attention=True``), float32: the *last*
      block's attention probe, averaged over heads. With a CLS token: the CLS query's softmax
      row over all ``1 + Np`` keys (CLS included), restricted to the patch keys and not
      renormalised (so it sums to ``1 - p(CLS -> CLS)``), as VisionZip / FasterVLM read it.
      Without CLS: the softmax row over the ``Np`` patch keys of the mean patch query
      ``q_bar = mean_i q_i`` (post-RoPE), summing to 1.
    * ``grid = (gh, gw)``: patches per column and per row.
    * ``layer_cls_attention [B, L, Np] | None`` (``cls_attention_layers=(l_1, ..., l_L)``),
      float32: the same probe of each listed block (index into the blocks, negative from the
      end), computed on that block's input, in the listed order (VTC-CLS's layer ensemble).
    """

    patches: jax.Array
    cls: jax.Array | None
    cls_attention: jax.Array | None
    grid: tuple[int, int]
    layer_cls_attention: jax.Array | None = None


jax.tree_util.register_dataclass(
    VisionOutput,
    data_fields=["patches", "cls", "cls_attention", "layer_cls_attention"],
    meta_fields=["grid"],
)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, (H/p) (W/p), p p C]`` in raster order, each patch flattened
    as ``(row-in-patch, col-in-patch, channel)``."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(
            f"images shape={tuple(images.shape)}: height and width must be divisible by "
            f"patch_size={p}"
        )
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class VisionEncoder(nnx.Module):
    """ViT: params ``patch`` (Linear ``[patch, vision_embed]`` with bias), ``cls [D]``
    (``use_cls``), ``pos_embedding [num_tokens, D]`` (``pos_embedding="learned"``; both
    normal(0.02) at init), ``pre_norm`` (LayerNorm, when ``cfg.pre_norm``), ``blocks``
    (pre-LN, LayerNorm + GELU MLP, non-causal attention) and ``norm`` (final LayerNorm).
    The *last* block in ``cls_attention`` is the last one run (``cfg.feature_layer``)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, VisionConfig):
            raise ValueError(f"cfg={cfg!r}: expected a VisionConfig")
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        dtype, pdtype = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
        self.patch = Linear(
            p * p * cfg.channels,
            d,
            axes=("patch", "vision_embed"),
            use_bias=cfg.patch_bias,
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
        )

        def init(shape):
            return normal_init(rngs.params(), shape=shape, std=0.02, dtype=pdtype)

        self.cls = compat.logical_param(init((d,)), ("vision_embed",)) if cfg.use_cls else None
        self.pos_embedding = (
            compat.logical_param(init((cfg.num_tokens, d)), (None, "vision_embed"))
            if cfg.pos_embedding == "learned"
            else None
        )
        norm_kw = {
            "eps": cfg.norm_eps,
            "axis": "vision_embed",
            "dtype": dtype,
            "param_dtype": pdtype,
        }
        self.pre_norm = LayerNorm(d, **norm_kw) if cfg.pre_norm else None
        block_cfg = cfg.block_config()
        self.blocks = nnx.List([TransformerBlock(block_cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(d, **norm_kw)

    def embed(self, images: jax.Array):
        """Token embeddings before the blocks: ``(x [B, T, D], positions, grid)`` where
        ``T = int(use_cls) + gh * gw`` and ``positions`` are 2D RoPE ids ``[B, T, 2]`` (or None
        with learned positions, which are already added to ``x``)."""
        cfg = self.cfg
        if getattr(images, "ndim", None) != 4 or images.shape[-1] != cfg.channels:
            raise ValueError(
                f"images shape={tuple(getattr(images, 'shape', ()))}: expected [B, H, W, "
                f"{cfg.channels}]"
            )
        b, h, w, _ = images.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(
                f"images shape={tuple(images.shape)}: height {h} and width {w} must be divisible "
                f"by patch_size={p}"
            )
        grid = (h // p, w // p)
        if cfg.pos_embedding == "learned" and grid != cfg.grid:
            raise ValueError(
                f"images shape={tuple(images.shape)} gives a {grid} patch grid; learned position "
                f"embeddings need image_size={cfg.image_size} (grid {cfg.grid})"
            )
        x = self.patch(patchify(images.astype(cfg.compute_dtype), p))
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, cfg.width))
            x = jnp.concatenate([cls, x], axis=1)
        positions = None
        if self.pos_embedding is not None:
            x = x + self.pos_embedding[...].astype(x.dtype)
        else:
            positions = rope_ops.rope_2d_positions(grid, batch=b, prefix=int(cfg.use_cls))
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        return x, positions, grid

    def __call__(
        self,
        images: jax.Array,
        *,
        return_cls_attention: bool = False,
        cls_attention_layers: tuple[int, ...] | None = None,
        keep_cls: bool = False,
    ) -> VisionOutput:
        """``images [B, H, W, C]`` (normalised float) -> :class:`VisionOutput`.

        ``keep_cls``: ``patches`` holds the CLS token first (``[B, 1 + Np, D]``, normalised like
        the patches; LLaVA's ``vision_feature_select_strategy="full"``).

        ``cls_attention_layers``: block indices (negative from the end) whose probe rows fill
        ``layer_cls_attention``; None (default) computes none."""
        cfg = self.cfg
        depth = len(self.blocks)
        layers = ()
        if cls_attention_layers is not None:
            ok = isinstance(cls_attention_layers, (tuple, list)) and all(
                isinstance(i, int) and not isinstance(i, bool) and -depth <= i < depth
                for i in cls_attention_layers
            )
            if not ok or not cls_attention_layers:
                raise ValueError(
                    f"cls_attention_layers={cls_attention_layers!r}: expected a non-empty tuple "
                    f"of block indices in [-{depth}, {depth}) (the ViT has depth {depth})"
                )
            layers = tuple(i % depth for i in cls_attention_layers)
        x, positions, grid = self.embed(images)
        n_cls = int(cfg.use_cls)
        probe = None
        rows = {}
        run = cfg.num_layers_run  # blocks after ``feature_layer`` are not run
        last = run - 1
        if any(i >= run for i in layers) or (return_cls_attention and run == 0):
            raise ValueError(
                f"cls_attention_layers={cls_attention_layers!r} / return_cls_attention="
                f"{return_cls_attention}: probed blocks must come before feature_layer="
                f"{cfg.feature_layer} ({run} blocks run)"
            )
        for i in range(run):
            block = self.blocks[i]
            if (return_cls_attention and i == last) or i in layers:
                row = block.attention_row(
                    x, positions=positions, query_index=0 if n_cls else "mean"
                )[:, n_cls:]
                rows[i] = row
                if return_cls_attention and i == last:
                    probe = row
            x, _ = block(x, positions=positions)
        normed = x if cfg.final_norm == "none" else self.norm(x)
        patches = normed if cfg.final_norm == "all" else x
        return VisionOutput(
            patches=patches if keep_cls else patches[:, n_cls:],
            cls=normed[:, 0] if n_cls else None,
            cls_attention=probe,
            grid=grid,
            layer_cls_attention=jnp.stack([rows[i] for i in layers], axis=1) if layers else None,
        )
