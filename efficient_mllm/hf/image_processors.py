"""The Hugging Face image processors of CLIP / LLaVA-1.5, SigLIP, Qwen2-VL / Qwen2.5-VL and
InternVL, built from :mod:`efficient_mllm.hf.image_ops` (see :mod:`efficient_mllm.hf.processors`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from efficient_mllm.hf.chat_template import _read_json
from efficient_mllm.hf.image_ops import (
    to_rgb,
    resize,
    shortest_edge_size,
    _shortest_longest_size,
    center_crop,
    pad_to_square,
    _rescale_normalize,
    smart_resize,
    patchify_qwen2vl,
    tile_grid,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    BICUBIC,
)

# --------------------------------------------------------------------------- image processors


def _size_dict(size, name: str, int_key: str) -> dict:
    if isinstance(size, int) and not isinstance(size, bool):
        return {int_key: size} if int_key != "square" else {"height": size, "width": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, Mapping) and size:
        return {k: int(v) for k, v in size.items() if v is not None}
    raise ValueError(f"{name}: expected an int, (height, width) or a dict, got {size!r}")


def _image_processor_config(path: str) -> dict:
    """The image processor's settings in a checkpoint folder (``preprocessor_config.json`` or
    the ``image_processor`` entry of ``processor_config.json``)."""
    path = os.fspath(path)
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre):
        return _read_json(pre)
    proc = os.path.join(path, "processor_config.json")
    if os.path.isfile(proc) and isinstance(_read_json(proc).get("image_processor"), Mapping):
        return dict(_read_json(proc)["image_processor"])
    raise ValueError(
        f"path: no preprocessor_config.json, nor processor_config.json with an image_processor, "
        f"in {path!r}"
    )


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """``image_mean`` / ``image_std``: 3 values each, no zero std (image and video processors)."""
    for name, v in (("image_mean", mean), ("image_std", std)):
        if len(tuple(v)) != 3:
            raise ValueError(f"{name}: expected 3 values (R, G, B), got {v!r}")
    if any(float(s) == 0 for s in std):
        raise ValueError(f"image_std: expected non-zero values, got {std!r}")


def set_qwen_geometry(obj: Any, min_pixels: int, max_pixels: int, **sizes: int) -> None:
    """Checks and sets ``min_pixels <= max_pixels`` and the positive patch sizes (``patch_size``,
    ``temporal_patch_size``, ``merge_size``, ...) on a Qwen2-VL image or video processor."""
    if not 0 < int(min_pixels) <= int(max_pixels):
        raise ValueError(
            "min_pixels, max_pixels: expected 0 < min_pixels <= max_pixels, got "
            f"({min_pixels}, {max_pixels})"
        )
    for name, v in sizes.items():
        if int(v) < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
        setattr(obj, name, int(v))
    obj.min_pixels, obj.max_pixels = int(min_pixels), int(max_pixels)


class _ImageProcessor:
    """Shared settings: constructor keywords are the HF config keys of the same name."""

    def _set_common(self, do_resize, resample, do_rescale, rescale_factor, do_normalize, mean, std):
        from PIL import Image

        try:
            Image.Resampling(int(resample))
        except (ValueError, TypeError):
            raise ValueError(
                f"resample: expected a PIL resampling filter (0..5), got {resample!r}"
            ) from None
        check_mean_std(mean, std)
        self.do_resize, self.resample = bool(do_resize), int(resample)
        self.do_rescale, self.rescale_factor = bool(do_rescale), float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean, self.image_std = tuple(map(float, mean)), tuple(map(float, std))

    def _finish(self, image: np.ndarray) -> np.ndarray:
        return _rescale_normalize(
            image,
            self.do_rescale,
            self.rescale_factor,
            self.do_normalize,
            self.image_mean,
            self.image_std,
        )

    @classmethod
    def from_config(cls, config: Mapping):
        """From a ``preprocessor_config.json`` dict (keys this class does not use are ignored;
        ``null`` values take the default)."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in config.items() if k in params and k != "self"}
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike):
        """From a checkpoint folder (``preprocessor_config.json`` or ``processor_config.json``)."""
        return cls.from_config(_image_processor_config(path))

    @staticmethod
    def _as_list(images) -> list:
        if images is None:
            raise ValueError("images: expected an image or a list of images, got None")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        if isinstance(images, (list, tuple)):
            flat = []
            for im in images:
                flat.extend(im if isinstance(im, (list, tuple)) else [im])
            if not flat:
                raise ValueError("images: got an empty list")
            return flat
        return [images]


class ClipImageProcessor(_ImageProcessor):
    """CLIP / LLaVA-1.5 preprocessing (HF ``CLIPImageProcessor``, ``LlavaImageProcessor``).

    Steps: [pad to a square filled with ``int(255 * image_mean)`` when ``do_pad``] -> resize
    (``size``: ``{"shortest_edge"}``, ``{"shortest_edge", "longest_edge"}`` or
    ``{"height", "width"}``) -> center crop to ``crop_size`` -> rescale -> normalise.
    Returns ``{"pixel_values": float32 [N, 3, crop_h, crop_w]}``.
    """

    def __init__(
        self,
        size=None,
        crop_size=None,
        *,
        do_resize: bool = True,
        do_center_crop: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        resample: int = BICUBIC,
        do_pad: bool = False,
        do_convert_rgb: bool = True,
    ):
        self._set_common(
            do_resize, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std
        )
        self.size = _size_dict(
            {"shortest_edge": 224} if size is None else size, "size", "shortest_edge"
        )
        if not ("shortest_edge" in self.size or {"height", "width"} <= set(self.size)):
            raise ValueError(
                f"size: expected keys 'shortest_edge' (optionally with 'longest_edge') or "
                f"'height' and 'width', got {self.size}"
            )
        self.do_center_crop = bool(do_center_crop)
        crop = {"height": 224, "width": 224} if crop_size is None else crop_size
        self.crop_size = _size_dict(crop, "crop_size", "square")
        if self.do_center_crop and not {"height", "width"} <= set(self.crop_size):
            raise ValueError(f"crop_size: expected keys 'height' and 'width', got {self.crop_size}")
        if any(v < 1 for v in (*self.size.values(), *self.crop_size.values())):
            raise ValueError(
                f"size, crop_size: expected positive sizes, got {self.size}, {self.crop_size}"
            )
        self.do_pad = bool(do_pad)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the resize step."""
        s = self.size
        if "shortest_edge" in s and "longest_edge" in s:
            return _shortest_longest_size(height, width, s["shortest_edge"], s["longest_edge"])
        if "shortest_edge" in s:
            return shortest_edge_size(height, width, s["shortest_edge"])
        return s["height"], s["width"]

    def preprocess_one(self, image) -> np.ndarray:
        """One image -> float32 ``[3, H, W]``."""
        x = to_rgb(image)
        if self.do_pad:
            x = pad_to_square(x, [int(m * 255) for m in self.image_mean])
        if self.do_resize:
            x = resize(x, *self.output_size(*x.shape[:2]), self.resample)
        if self.do_center_crop:
            x = center_crop(x, self.crop_size["height"], self.crop_size["width"])
        return self._finish(x).transpose(2, 0, 1)

    def __call__(self, images) -> dict:
        out = [self.preprocess_one(im) for im in self._as_list(images)]
        if len({o.shape for o in out}) > 1:
            raise ValueError(
                f"images: processed sizes differ ({sorted({o.shape for o in out})}); "
                "enable do_center_crop or use a fixed {'height', 'width'} size to batch them"
            )
        return {"pixel_values": np.stack(out)}


class SiglipImageProcessor(ClipImageProcessor):
    """SigLIP preprocessing (HF ``SiglipImageProcessor``): resize to a fixed ``size`` (bicubic),
    rescale, normalise with mean = std = 0.5; no crop."""

    def __init__(
        self,
        size=None,
        *,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_STANDARD_MEAN,
        image_std: Sequence[float] = IMAGENET_STANDARD_STD,
        resample: int = BICUBIC,
        do_convert_rgb: bool = True,
    ):
        size = {"height": 224, "width": 224} if size is None else size
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"height": size, "width": size}
        super().__init__(
            size,
            None,
            do_resize=do_resize,
            do_center_crop=False,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            resample=resample,
        )


class Qwen2VLImageProcessor(_ImageProcessor):
    """Qwen2-VL / Qwen2.5-VL preprocessing (HF ``Qwen2VLImageProcessor``).

    Each image is resized (bicubic) to :func:`smart_resize` with ``factor = patch_size *
    merge_size``, rescaled, normalised and cut by :func:`patchify_qwen2vl`. Returns
    ``pixel_values`` float32 ``[sum of t*h*w, 3*temporal_patch_size*patch_size**2]`` (all
    images concatenated) and ``image_grid_thw`` int64 ``[N, 3]`` (t = 1 for images).
    ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}`` as in HF configs;
    explicit ``min_pixels`` / ``max_pixels`` take precedence.
    """

    def __init__(
        self,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        *,
        size: Mapping | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        resample: int = BICUBIC,
        do_convert_rgb: bool = True,
    ):
        self._set_common(
            do_resize, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std
        )
        size = dict(size or {})
        lo = size.get("shortest_edge", size.get("min_pixels", 56 * 56))
        hi = size.get("longest_edge", size.get("max_pixels", 28 * 28 * 1280))
        set_qwen_geometry(self, lo if min_pixels is None else min_pixels,
                          hi if max_pixels is None else max_pixels,
                          patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                          merge_size=merge_size)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(grid_h, grid_w)`` of an image of this size."""
        h, w = (height, width)
        if self.do_resize:
            h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """LLM tokens of one image after the ``merge_size x merge_size`` merger."""
        gh, gw = self.grid_hw(height, width)
        return gh * gw // self.merge_size**2

    def preprocess_one(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        x = to_rgb(image)
        if self.do_resize:
            x = resize(
                x,
                *smart_resize(*x.shape[:2], self.factor, self.min_pixels, self.max_pixels),
                self.resample,
            )
        x = self._finish(x).transpose(2, 0, 1)
        rows, gh, gw = patchify_qwen2vl(
            x, self.patch_size, self.merge_size, self.temporal_patch_size
        )
        return rows, (1, gh, gw)

    def __call__(self, images) -> dict:
        done = [self.preprocess_one(im) for im in self._as_list(images)]
        return {
            "pixel_values": np.concatenate([d[0] for d in done]),
            "image_grid_thw": np.asarray([d[1] for d in done], np.int64),
        }


class InternVLImageProcessor(_ImageProcessor):
    """InternVL dynamic tiling (HF ``GotOcr2ImageProcessor`` with ``crop_to_patches``).

    With ``crop_to_patches`` and ``max_patches > 1``: the image is resized (bicubic) to the
    :func:`tile_grid` canvas of ``size`` tiles, cut into tiles row by row, and, when there is more
    than one tile, followed by a thumbnail (the whole image resized to one tile). Otherwise the
    image is resized to one tile. Returns ``pixel_values`` float32 ``[total tiles, 3, H, W]`` and
    ``num_patches`` (tiles per image, thumbnail included).
    """

    def __init__(
        self,
        size=None,
        *,
        crop_to_patches: bool = True,
        min_patches: int = 1,
        max_patches: int = 12,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        resample: int = BICUBIC,
        do_convert_rgb: bool = True,
    ):
        self._set_common(
            do_resize, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std
        )
        self.size = _size_dict(
            {"height": 448, "width": 448} if size is None else size, "size", "square"
        )
        if set(self.size) != {"height", "width"} or min(self.size.values()) < 1:
            raise ValueError(f"size: expected positive 'height' and 'width', got {self.size}")
        if not 1 <= int(min_patches) <= int(max_patches):
            raise ValueError(
                f"min_patches, max_patches: expected 1 <= min_patches <= max_patches, got "
                f"({min_patches}, {max_patches})"
            )
        self.crop_to_patches = bool(crop_to_patches)
        self.min_patches, self.max_patches = int(min_patches), int(max_patches)

    def num_patches(self, height: int, width: int) -> int:
        """Tiles of an image of this size (thumbnail included)."""
        if not (self.crop_to_patches and self.max_patches > 1):
            return 1
        th, tw = self.size["height"], self.size["width"]
        cols, rows = tile_grid(height, width, th, tw, self.min_patches, self.max_patches)
        return cols * rows + (cols * rows > 1)

    def preprocess_one(self, image) -> np.ndarray:
        """One image -> float32 ``[tiles, 3, H, W]``."""
        x = to_rgb(image)
        th, tw = self.size["height"], self.size["width"]
        if self.crop_to_patches and self.max_patches > 1:
            cols, rows = tile_grid(*x.shape[:2], th, tw, self.min_patches, self.max_patches)
            canvas = resize(x, th * rows, tw * cols, self.resample)
            tiles = [
                canvas[r * th : (r + 1) * th, c * tw : (c + 1) * tw]
                for r in range(rows)
                for c in range(cols)
            ]
            if len(tiles) > 1:
                tiles.append(resize(x, th, tw, self.resample))
        else:
            tiles = [resize(x, th, tw, self.resample) if self.do_resize else x]
        return np.stack([self._finish(t).transpose(2, 0, 1) for t in tiles])

    def __call__(self, images) -> dict:
        done = [self.preprocess_one(im) for im in self._as_list(images)]
        return {
            "pixel_values": np.concatenate(done),
            "num_patches": np.asarray([len(d) for d in done], np.int64),
        }
