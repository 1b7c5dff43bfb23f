"""InternVL (Chen et al., 2024, "How Far Are We to GPT-4V?", arXiv:2404.16821; InternVL 2.5/3),
as in Hugging Face's ``InternVLForConditionalGeneration``: InternViT -> drop CLS -> pixel
shuffle (each ``r x r`` patch neighbourhood, ``r = 1 / downsample_ratio``, folded into the
channels) -> projector (LayerNorm eps 1e-5, Linear, GELU, Linear) -> Qwen2 / Llama decoder with
1D RoPE.

Inputs follow the Hugging Face processor: ``tokens [B, T]`` with ``(gh / r) * (gw / r)``
``image_token_id`` tokens per image (tile), and ``images [N, H, W, C]`` (all tiles of all rows,
normalised, NHWC) in the order their tokens appear. Dynamic tiling is the processor's job: the
model sees tiles as images. Only ``vision_feature_select_strategy="default"`` (drop CLS) with a
square patch grid is supported, as Hugging Face's reshape requires.

Compressors (``InternVLConfig.compressor``: any registry spec, pre-LLM ones applied per tile)
follow ``nn.placeholder_mllm``. Signals: ``cls_attention`` is InternViT's [CLS] attention row of
the last block run (``vision_feature_layer``), restricted to the patches and summed over each
pixel-shuffle cell (so it aligns with the LLM tokens); ``cls`` the [CLS] hidden state of that
layer; ``features`` the pixel-shuffled ViT features (the projector input, ``r^2 * width``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm.nn.config import DictMixin
from efficient_mllm.nn.internvit import InternViT, InternViTConfig
from efficient_mllm.nn.language import LanguageModel
from efficient_mllm.nn.layers import LayerNorm, Linear, activation
from efficient_mllm.nn.mllm import cell_sum
from efficient_mllm.nn.placeholder_mllm import (
    ImageSignals,
    PlaceholderMLLM,
    check_vl_config,
    probe_layers,
)

__all__ = ["InternVLConfig", "InternVLModel", "internvl_pixel_shuffle"]


def internvl_pixel_shuffle(x: jax.Array, ratio: int) -> jax.Array:
    """``[B, h, w, C] -> [B, h / r, w / r, r * r * C]``; output ``(i, j)`` holds the input
    ``(r i + a, r j + c)`` at channel block ``a * r + c`` (row offset major), as InternVL's
    ``pixel_shuffle(scale_factor=1 / r)``."""
    b, h, w, c = x.shape
    if h % ratio or w % ratio:
        raise ValueError(f"x shape={tuple(x.shape)}: h and w must be divisible by {ratio}")
    x = x.reshape(b, h // ratio, ratio, w // ratio, ratio, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // ratio, w // ratio, ratio * ratio * c)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InternVLConfig(DictMixin):
    """``language``: ``LanguageConfig`` (1D RoPE); ``vision``: ``InternViTConfig`` (square
    grid divisible by ``1 / downsample_ratio``); ``vision_feature_layer``: ViT layer read (see
    ``InternViT.__call__``); ``projector_activation``: ``nn.layers.activation`` name;
    ``compressor``: optional registry spec (``nn.placeholder_mllm`` module doc; a pre-LLM one
    is applied per tile)."""

    language: Any
    vision: Any
    image_token_id: int
    downsample_ratio: float = 0.5
    vision_feature_layer: int = -1
    projector_activation: str = "gelu"
    compressor: str | None = None

    def __post_init__(self):
        _, vis = check_vl_config(self, InternViTConfig, "rope")
        inv = 1.0 / float(self.downsample_ratio) if self.downsample_ratio else 0.0
        if not inv >= 1 or abs(inv - round(inv)) > 1e-9:
            raise ValueError(
                f"InternVLConfig.downsample_ratio={self.downsample_ratio!r}: expected 1 / r for "
                "an integer r >= 1"
            )
        gh, gw = vis.grid
        r = round(inv)
        if gh != gw or gh % r:
            raise ValueError(
                f"InternVLConfig: the vision patch grid {vis.grid} must be square and divisible "
                f"by 1 / downsample_ratio = {r}"
            )
        layer = self.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(
                f"InternVLConfig.vision_feature_layer={layer!r}: expected an int layer index"
            )
        if not -vis.depth - 1 <= layer <= vis.depth:
            raise ValueError(
                f"InternVLConfig.vision_feature_layer={layer}: expected an int in "
                f"[{-vis.depth - 1}, {vis.depth}]"
            )
        activation(self.projector_activation)

    @property
    def shuffle(self) -> int:
        """``r = 1 / downsample_ratio``."""
        return round(1.0 / self.downsample_ratio)

    @property
    def tokens_per_image(self) -> int:
        """LLM tokens per image (tile): ``Np / r^2``."""
        return self.vision.num_patches // self.shuffle**2


class InternVLProjector(nnx.Module):
    """``norm`` (LayerNorm, eps 1e-5) -> ``fc1`` -> activation -> ``fc2``."""

    def __init__(self, cfg: InternVLConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = cfg.language.compute_dtype, jnp.dtype(cfg.language.param_dtype)
        d_in = cfg.vision.width * cfg.shuffle**2
        d = cfg.language.width
        self.activation_name = cfg.projector_activation
        self.norm = LayerNorm(d_in, eps=1e-5, axis=None, dtype=dtype, param_dtype=pdtype)
        kw = {"use_bias": True, "dtype": dtype, "param_dtype": pdtype, "rngs": rngs}
        self.fc1 = Linear(d_in, d, axes=(None, "embed"), **kw)
        self.fc2 = Linear(d, d, axes=(None, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.activation_name)(self.fc1(self.norm(x))))


class InternVLModel(PlaceholderMLLM):
    """Params: ``vision`` (:class:`InternViT`), ``projector``, ``language``."""

    def __init__(self, cfg: InternVLConfig, *, rngs: nnx.Rngs):
        if isinstance(cfg, Mapping):
            cfg = InternVLConfig.from_dict(cfg)
        if not isinstance(cfg, InternVLConfig):
            raise ValueError(f"cfg={cfg!r}: expected an InternVLConfig")  # noqa: TRY004
        self.cfg = cfg
        self.vision = InternViT(cfg.vision, rngs=rngs)
        self.projector = InternVLProjector(cfg, rngs=rngs)
        self.language = LanguageModel(cfg.language, rngs=rngs)
        # ``grid``: each tile's token grid. No ``num_tokens``: in-LLM compressors count the
        # image tokens of a row (several tiles), unknown before the call.
        g = cfg.vision.grid[0] // cfg.shuffle
        self.set_compressor(rngs, vision_dim=cfg.vision.width * cfg.shuffle**2, grid=(g, g))

    def encode_images(self, images: jax.Array) -> jax.Array:
        """``images [N, H, W, C]`` -> LLM-ready image tokens ``[N, tokens_per_image, D]``."""
        tokens = self.image_signals(images).tokens
        return tokens.reshape(-1, self.cfg.tokens_per_image, tokens.shape[-1])

    def image_signals(
        self,
        images: jax.Array,
        *,
        cls_attention: bool = False,
        cls_attention_layers: tuple[int, ...] | None = None,
        features: bool = False,
    ) -> ImageSignals:
        """Tokens and compressor signals of all tiles (module doc). ``cls_attention_layers``:
        ViT block indices (negative from the end of the ViT) among those run."""
        cfg = self.cfg
        vit = self.vision
        run = vit.num_blocks_run(cfg.vision_feature_layer)
        depth = cfg.vision.depth
        layers = probe_layers(cls_attention_layers, depth)
        if (cls_attention and run == 0) or any(i >= run for i in layers):
            raise ValueError(
                f"the [CLS] attention probe of blocks {layers or 'last'} needs them to run: "
                f"vision_feature_layer={cfg.vision_feature_layer} runs {run} blocks"
            )
        probe_blocks = tuple(dict.fromkeys(layers + ((run - 1,) if cls_attention else ())))
        hidden, probes = vit.forward(
            images, layer=cfg.vision_feature_layer, probe_blocks=probe_blocks
        )
        x = hidden[:, 1:]  # drop CLS
        n, _, d = x.shape
        gh, gw = cfg.vision.grid
        x = internvl_pixel_shuffle(x.reshape(n, gh, gw, d), cfg.shuffle)
        x = x.reshape(n, -1, x.shape[-1])
        tokens = self.projector(x)
        r = cfg.shuffle

        def rows(block):  # [N, Np + 1] -> [N * tokens_per_image] (patches, cell sums)
            row = probes[:, probe_blocks.index(block), 1:]
            return cell_sum(row, cfg.vision.grid, r).reshape(-1)

        return ImageSignals(
            tokens=tokens.reshape(-1, tokens.shape[-1]),
            features=x.reshape(-1, x.shape[-1]) if features else None,
            cls_attention=rows(run - 1) if cls_attention else None,
            layer_cls_attention=jnp.stack([rows(i) for i in layers]) if layers else None,
            cls=hidden[:, 0],
        )

    def image_features(self, images: jax.Array) -> jax.Array:
        return self.image_signals(images).tokens

    def num_image_features(self, images: jax.Array) -> int:
        if getattr(images, "ndim", None) != 4:
            raise ValueError(
                f"images shape={tuple(getattr(images, 'shape', ()))}: expected [N, H, W, C]"
            )
        return int(images.shape[0]) * self.cfg.tokens_per_image

    def feature_groups(self, images: jax.Array) -> list:
        """All tiles in one group: ``(N, tokens_per_image, grid, arange ids [N, n])``."""
        n_img = self.num_image_features(images) // self.cfg.tokens_per_image
        g = self.cfg.vision.grid[0] // self.cfg.shuffle
        rel = np.broadcast_to(np.arange(g * g, dtype=np.int32)[None], (n_img, g * g))
        return [(n_img, g * g, (g, g), rel)]

    def positions(self, tokens, images, lengths, start):
        del images, lengths
        if start is None:
            return None
        b, t = tokens.shape
        return jnp.arange(t, dtype=jnp.int32)[None, :] + jnp.asarray(start, jnp.int32)[:, None]
