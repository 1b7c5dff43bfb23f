"""Qwen2-VL / Qwen2.5-VL: dynamic-resolution ViT + patch merger + Qwen2 decoder with M-RoPE.

Inputs follow the Hugging Face processor: ``tokens [B, T]`` in which every image already
occupies ``t * h * w / merge^2`` ``image_token_id`` tokens, and :class:`QwenVLImages` holding the
flattened patches of all images ``[N, C*T*P*P]`` with their static ``grid_thw``. Image tokens get
3D M-RoPE ids (``ops.rope.mrope_grid_positions``, Hugging Face's ``get_rope_index`` for images),
text tokens the running 1D id on all three axes. Images only: video inputs (``video_token_id``,
``tokens_per_second`` temporal ids) are not implemented.
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
from efficient_mllm.nn.language import LanguageModel
from efficient_mllm.nn.placeholder_mllm import (
    PlaceholderMLLM,
    build_pre_llm_compressor,
    check_vl_config,
)
from efficient_mllm.nn.qwen2_vl_vision import (
    QwenVisionConfig,
    QwenVisionTransformer,
    check_grid_thw,
)
from efficient_mllm.ops import rope as rope_ops

__all__ = ["QwenVLConfig", "QwenVLImages", "QwenVLModel"]


@dataclasses.dataclass(frozen=True)
class QwenVLImages:
    """All images of a batch: ``pixel_values [N, C*T*P*P]`` float (packed patches, processor
    order) and ``grid_thw`` (static tuple of ``(t, h, w)`` per image, in patches). A pytree whose
    grid is static metadata, so it passes through ``jax.jit``."""

    pixel_values: jax.Array
    grid_thw: tuple[tuple[int, int, int], ...]

    def __post_init__(self):
        grid = check_grid_thw(self.grid_thw, 1)
        object.__setattr__(self, "grid_thw", grid)


jax.tree_util.register_dataclass(
    QwenVLImages, data_fields=["pixel_values"], meta_fields=["grid_thw"]
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenVLConfig(DictMixin):
    """``language``: a ``LanguageConfig`` with ``rope_type="mrope"``; ``vision``: a
    ``QwenVisionConfig`` whose ``out_dim`` is the language width; ``image_token_id``;
    ``compressor``: optional ``pre_llm`` registry spec (``nn.placeholder_mllm`` module doc)."""

    language: Any
    vision: Any
    image_token_id: int
    compressor: str | None = None

    def __post_init__(self):
        lang, vis = check_vl_config(self, QwenVisionConfig, "mrope")
        if vis.out_dim != lang.width:
            raise ValueError(
                f"QwenVLConfig.vision={self.vision!r}: expected a QwenVisionConfig with out_dim "
                f"= language width {lang.width}"
            )


class QwenVLModel(PlaceholderMLLM):
    """Params: ``visual`` (:class:`QwenVisionTransformer`), ``language`` (``LanguageModel``)."""

    def __init__(self, cfg: QwenVLConfig, *, rngs: nnx.Rngs):
        if isinstance(cfg, Mapping):
            cfg = QwenVLConfig.from_dict(cfg)
        if not isinstance(cfg, QwenVLConfig):
            raise ValueError(f"cfg={cfg!r}: expected a QwenVLConfig")  # noqa: TRY004
        self.cfg = cfg
        self.visual = QwenVisionTransformer(cfg.vision, rngs=rngs)
        self.language = LanguageModel(cfg.language, rngs=rngs)
        self.compressor = build_pre_llm_compressor(
            cfg.compressor,
            dim=cfg.language.width,
            num_layers=cfg.language.depth,
            dtype=cfg.language.compute_dtype,
        )

    def _check_images(self, images) -> QwenVLImages:
        if not isinstance(images, QwenVLImages):
            raise ValueError(
                f"images={type(images).__name__}: expected QwenVLImages(pixel_values, grid_thw)"
            )
        return images

    def image_features(self, images: QwenVLImages) -> jax.Array:
        """Merged image tokens ``[K, D]`` of all images, in order."""
        images = self._check_images(images)
        return self.visual(images.pixel_values, images.grid_thw).merged

    def num_image_features(self, images: QwenVLImages) -> int:
        return self.visual.num_tokens(self._check_images(images).grid_thw)

    def llm_grids(self, images: QwenVLImages | None) -> tuple[tuple[int, int, int], ...]:
        """Per-image ``(t, h / merge, w / merge)``: each image's grid of LLM tokens."""
        if images is None:
            return ()
        m = self.cfg.vision.spatial_merge_size
        grid = check_grid_thw(self._check_images(images).grid_thw, m)
        return tuple((t, h // m, w // m) for t, h, w in grid)

    def feature_groups(self, images: QwenVLImages) -> list:
        """One group per image: grid ``(t * h, w)`` of LLM tokens and relative M-RoPE ids
        ``(t, row, col)`` (``[3, 1, n]``), as ``mrope_grid_positions`` gives an image at 0."""
        groups = []
        for t, h, w in self.llm_grids(images):
            ti, hi, wi = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            rel = np.stack([ti.ravel(), hi.ravel(), wi.ravel()])[:, None, :].astype(np.int32)
            groups.append((1, t * h * w, (t * h, w), rel))
        return groups

    def positions(self, tokens, images, lengths, start):
        image_mask = (tokens == self.cfg.image_token_id) & (
            jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        )
        pos, _ = rope_ops.mrope_grid_positions(image_mask, self.llm_grids(images), lengths=lengths)
        if start is not None:
            pos = pos + jnp.asarray(start, jnp.int32)[None, :, None]
        return pos
