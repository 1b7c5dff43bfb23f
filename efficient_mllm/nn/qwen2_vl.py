"""Qwen2-VL / Qwen2.5-VL: dynamic-resolution ViT + patch merger + Qwen2 decoder with M-RoPE.

Inputs follow the Hugging Face processor: ``tokens [B, T]`` in which every image already
occupies ``t * h * w / merge^2`` ``image_token_id`` tokens and every video as many
``video_token_id`` tokens, and :class:`QwenVLImages` holding the flattened patches of all
images and videos ``[N, C*T*P*P]`` with their static ``grid_thw``, *in prompt order* (row 0's
items first; :meth:`QwenVLModel.visual_inputs` builds it from the processor's separate image and
video outputs). A video is a stack of temporal patches (``t = frames / temporal_patch_size``)
that the same ViT encodes, each temporal patch attending within itself; its merged tokens fill
the video slots as image tokens fill image slots. Vision tokens get 3D M-RoPE ids
(``ops.rope.mrope_grid_positions``, Hugging Face's ``get_rope_index``): ``(s + temporal, s + row,
s + col)`` with the running position ``s`` at the item's first token, then ``s += max(h, w)``;
the temporal offset of patch ``f`` is ``f`` for images and Qwen2-VL videos, and
``trunc(f * tokens_per_second * second_per_grid)`` (float32, as HF) for Qwen2.5-VL videos. Text
tokens get the running 1D id on all three axes. Decoding continues at one past the largest id.
Compressors (any registry spec): ``nn.placeholder_mllm``; their ViT signals come from
:meth:`QwenVLModel.image_signals` (video slots count as image slots).
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
    ImageSignals,
    PlaceholderMLLM,
    check_vl_config,
    probe_layers,
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
    """All images and videos of a batch, in prompt order: ``pixel_values [N, C*T*P*P]`` float
    (packed patches, processor order), ``grid_thw`` (static ``(t, h, w)`` per item, in
    patches), ``is_video`` (static bool per item; ``()``: all images) and ``second_per_grid``
    (static seconds per temporal patch of each item, HF's ``second_per_grid_ts``; ``()``: 1.0,
    HF's default; used by Qwen2.5-VL videos only). A pytree whose layout is static metadata, so
    it passes through ``jax.jit``."""

    pixel_values: jax.Array
    grid_thw: tuple[tuple[int, int, int], ...]
    is_video: tuple[bool, ...] = ()
    second_per_grid: tuple[float, ...] = ()

    def __post_init__(self):
        grid = check_grid_thw(self.grid_thw, 1)
        object.__setattr__(self, "grid_thw", grid)
        n = len(grid)
        is_video = tuple(bool(v) for v in np.asarray(self.is_video).reshape(-1)) or (False,) * n
        if len(is_video) != n:
            raise ValueError(f"is_video={self.is_video!r}: expected one bool per grid ({n})")
        spg = tuple(float(s) for s in np.asarray(self.second_per_grid).reshape(-1)) or (1.0,) * n
        if len(spg) != n or not all(s >= 0 for s in spg):
            raise ValueError(
                f"second_per_grid={self.second_per_grid!r}: expected one number >= 0 per grid ({n})"
            )
        object.__setattr__(self, "is_video", is_video)
        object.__setattr__(self, "second_per_grid", spg)


jax.tree_util.register_dataclass(
    QwenVLImages,
    data_fields=["pixel_values"],
    meta_fields=["grid_thw", "is_video", "second_per_grid"],
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenVLConfig(DictMixin):
    """``language``: a ``LanguageConfig`` with ``rope_type="mrope"``; ``vision``: a
    ``QwenVisionConfig`` whose ``out_dim`` is the language width; ``image_token_id``;
    ``video_token_id`` (None: no videos); ``tokens_per_second`` (Qwen2.5-VL: temporal ids of a
    video advance ``tokens_per_second * second_per_grid`` per temporal patch; None: by 1, as
    Qwen2-VL); ``compressor``: optional registry spec (``nn.placeholder_mllm`` doc)."""

    language: Any
    vision: Any
    image_token_id: int
    video_token_id: int | None = None
    tokens_per_second: float | None = None
    compressor: str | None = None

    def __post_init__(self):
        lang, vis = check_vl_config(self, QwenVisionConfig, "mrope")
        if vis.out_dim != lang.width:
            raise ValueError(
                f"QwenVLConfig.vision={self.vision!r}: expected a QwenVisionConfig with out_dim "
                f"= language width {lang.width}"
            )
        vid = self.video_token_id
        if vid is not None:
            if isinstance(vid, bool) or not isinstance(vid, (int, np.integer)) or vid < 0 or (
                vid == self.image_token_id
            ):
                raise ValueError(
                    f"QwenVLConfig.video_token_id={vid!r}: expected None or an int >= 0 other "
                    f"than image_token_id={self.image_token_id}"
                )
            object.__setattr__(self, "video_token_id", int(vid))
        tps = self.tokens_per_second
        if tps is not None:
            if isinstance(tps, bool) or not isinstance(tps, (int, float, np.number)) or tps <= 0:
                raise ValueError(
                    f"QwenVLConfig.tokens_per_second={tps!r}: expected None or a number > 0"
                )
            object.__setattr__(self, "tokens_per_second", float(tps))


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
        # ``features`` (the merger input) are ``merge^2 * width`` wide; no static grid.
        self.set_compressor(rngs, vision_dim=cfg.vision.width * cfg.vision.spatial_merge_size**2)

    def _check_images(self, images) -> QwenVLImages:
        if not isinstance(images, QwenVLImages):
            raise ValueError(
                f"images={type(images).__name__}: expected QwenVLImages(pixel_values, grid_thw)"
            )
        if any(images.is_video) and self.cfg.video_token_id is None:
            raise ValueError(
                "images: holds videos but QwenVLConfig.video_token_id is None (no video slots)"
            )
        return images

    def visual_inputs(self, inputs: Mapping) -> QwenVLImages | None:
        """:class:`QwenVLImages` (prompt order) from processor outputs: ``input_ids`` (and
        ``attention_mask``), ``pixel_values`` + ``image_grid_thw``, ``pixel_values_videos`` +
        ``video_grid_thw`` (+ ``second_per_grid_ts``); None without images and videos. Eager:
        walks the valid tokens row by row; each run of an item's slots takes the next item of
        its kind."""
        m2 = self.cfg.vision.spatial_merge_size ** 2
        kinds = {}
        for kind, pix, grid in (("image", "pixel_values", "image_grid_thw"),
                                ("video", "pixel_values_videos", "video_grid_thw")):
            if inputs.get(grid) is None:
                continue
            grids = check_grid_thw(np.asarray(inputs[grid]), 1)
            pixels = np.asarray(inputs[pix])
            offs = np.cumsum([0] + [t * h * w for t, h, w in grids])
            if pixels.ndim != 2 or pixels.shape[0] != offs[-1]:
                raise ValueError(
                    f"{pix} shape={pixels.shape}: expected [{offs[-1]}, patch_dim] for {grid}"
                )
            spg = inputs.get("second_per_grid_ts") if kind == "video" else None
            spg = [1.0] * len(grids) if spg is None else [float(s) for s in np.asarray(spg)]
            if len(spg) != len(grids):
                raise ValueError(f"second_per_grid_ts: expected {len(grids)} values, got {spg}")
            kinds[kind] = [(pixels[offs[i]:offs[i + 1]], grids[i], spg[i])
                           for i in range(len(grids))]
        if not kinds:
            return None
        ids = {"image": self.cfg.image_token_id, "video": self.cfg.video_token_id}
        tokens = np.asarray(inputs["input_ids"])
        mask = inputs.get("attention_mask")
        mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask).astype(bool)
        stream = tokens[mask]  # valid tokens, row-major
        items, used, pos = [], {"image": 0, "video": 0}, 0
        while pos < len(stream):
            kind = next((k for k in kinds if ids[k] is not None and stream[pos] == ids[k]), None)
            if kind is None:
                pos += 1
                continue
            if used[kind] == len(kinds[kind]):
                raise ValueError(f"input_ids: more {kind} slots than {kind}s in the inputs")
            pixels, (t, h, w), spg = kinds[kind][used[kind]]
            n = t * h * w // m2
            if not np.all(stream[pos:pos + n] == ids[kind]):
                raise ValueError(f"input_ids: a {kind} of grid {(t, h, w)} needs {n} slots")
            items.append((pixels, (t, h, w), kind == "video", spg))
            used[kind] += 1
            pos += n
        for kind, lst in kinds.items():
            if used[kind] != len(lst):
                raise ValueError(f"input_ids: slots for {used[kind]} of {len(lst)} {kind}s")
        return QwenVLImages(
            jnp.asarray(np.concatenate([it[0] for it in items])),
            tuple(it[1] for it in items),
            tuple(it[2] for it in items),
            tuple(it[3] for it in items),
        )

    def image_features(self, images: QwenVLImages) -> jax.Array:
        """Merged vision tokens ``[K, D]`` of all images and videos, in prompt order."""
        images = self._check_images(images)
        return self.visual(images.pixel_values, images.grid_thw).merged

    def image_signals(
        self,
        images: QwenVLImages,
        *,
        cls_attention: bool = False,
        cls_attention_layers: tuple[int, ...] | None = None,
        features: bool = False,
    ) -> ImageSignals:
        """Merged tokens and compressor signals (``nn.placeholder_mllm``): the ViT has no [CLS]
        (``cls=None``), so ``cls_attention`` is the mean-query probe of the last block
        (``qwen2_vl_vision.mean_query_probe``: per frame for a full-attention block, per window
        for a Qwen2.5-VL window block), summed over each ``merge x merge`` cell; ``features``
        the merger input (the last block's output, each cell's patches concatenated)."""
        images = self._check_images(images)
        depth = self.cfg.vision.depth
        layers = probe_layers(cls_attention_layers, depth)
        blocks = tuple(dict.fromkeys(layers + ((depth - 1,) if cls_attention else ())))
        vis = self.visual(images.pixel_values, images.grid_thw, probe_blocks=blocks)
        m2 = self.cfg.vision.spatial_merge_size**2
        k = vis.merged.shape[0]

        def rows(block):  # [N patches] -> [K]: summed over each merge cell
            return vis.probes[blocks.index(block)].reshape(k, m2).sum(axis=-1)

        return ImageSignals(
            tokens=vis.merged,
            features=vis.hidden.reshape(k, -1) if features else None,
            cls_attention=rows(depth - 1) if cls_attention else None,
            layer_cls_attention=jnp.stack([rows(i) for i in layers]) if layers else None,
            cls=None,
        )

    def num_image_features(self, images: QwenVLImages) -> int:
        return self.visual.num_tokens(self._check_images(images).grid_thw)

    def llm_grids(self, images: QwenVLImages | None) -> tuple[tuple[int, int, int], ...]:
        """Per item ``(t, h / merge, w / merge)``: each image's / video's grid of LLM tokens."""
        if images is None:
            return ()
        m = self.cfg.vision.spatial_merge_size
        grid = check_grid_thw(self._check_images(images).grid_thw, m)
        return tuple((t, h // m, w // m) for t, h, w in grid)

    def time_intervals(self, images: QwenVLImages | None) -> tuple:
        """Per item, the temporal M-RoPE step per temporal patch: 1 for images (and Qwen2-VL
        videos), float32 ``tokens_per_second * second_per_grid`` for Qwen2.5-VL videos."""
        if images is None:
            return ()
        images = self._check_images(images)
        tps = self.cfg.tokens_per_second
        return tuple(
            np.float32(tps) * np.float32(s) if video and tps is not None else 1
            for video, s in zip(images.is_video, images.second_per_grid)
        )

    def feature_groups(self, images: QwenVLImages) -> list:
        """One group per image / video: grid ``(t * h, w)`` of LLM tokens and relative M-RoPE
        ids ``(temporal, row, col)`` (``[3, 1, n]``), as ``mrope_grid_positions`` gives an item
        at 0."""
        groups = []
        for (t, h, w), step in zip(self.llm_grids(images), self.time_intervals(images)):
            ti, hi, wi = np.meshgrid(
                rope_ops.temporal_offsets(t, step), np.arange(h), np.arange(w), indexing="ij"
            )
            rel = np.stack([ti.ravel(), hi.ravel(), wi.ravel()])[:, None, :].astype(np.int32)
            groups.append((1, t * h * w, (t * h, w), rel))
        return groups

    def check_inputs(self, tokens, images=None, lengths=None):
        """Validated ``(tokens int32 [B, T], lengths int32 [B], vision_mask bool [B, T])``, the
        mask covering image and video slots; eagerly, the valid image (video) slots must equal
        the merged tokens of the image (video) items."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens dtype={tokens.dtype} shape={tuple(tokens.shape)}: expected int [B, T]"
            )
        b, t = tokens.shape
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths)
        if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"lengths shape={tuple(lengths.shape)} dtype={lengths.dtype}: expected int [{b}]"
            )
        lengths = lengths.astype(jnp.int32)
        valid = jnp.arange(t)[None, :] < lengths[:, None]
        masks = {"image": (tokens == self.cfg.image_token_id) & valid}
        if self.cfg.video_token_id is not None:
            masks["video"] = (tokens == self.cfg.video_token_id) & valid
        if images is not None:
            self._check_images(images)
        if all(not isinstance(m, jax.core.Tracer) for m in masks.values()):
            m2 = self.cfg.vision.spatial_merge_size ** 2
            for kind, mask in masks.items():
                count = int(np.asarray(mask).sum())
                want = 0 if images is None else sum(
                    g[0] * g[1] * g[2] // m2
                    for g, v in zip(images.grid_thw, images.is_video)
                    if v == (kind == "video")
                )
                if count != want:
                    tid = getattr(self.cfg, f"{kind}_token_id")
                    raise ValueError(
                        f"tokens hold {count} {kind} tokens (id {tid}) among the valid ones: "
                        f"expected {want}, the merged tokens of the {kind}s in "
                        f"{'images=None' if images is None else 'images'}"
                    )
        mask = masks["image"] | masks["video"] if "video" in masks else masks["image"]
        return tokens.astype(jnp.int32), lengths, mask

    def positions(self, tokens, images, lengths, start):
        vision = (tokens == self.cfg.image_token_id)
        if self.cfg.video_token_id is not None:
            vision = vision | (tokens == self.cfg.video_token_id)
        vision = vision & (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None])
        pos, _ = rope_ops.mrope_grid_positions(
            vision, self.llm_grids(images), lengths=lengths,
            time_interval=self.time_intervals(images) or 1,
        )
        if start is not None:
            pos = pos + jnp.asarray(start, jnp.int32)[None, :, None]
        return pos
