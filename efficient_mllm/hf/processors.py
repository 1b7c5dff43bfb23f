"""Hugging Face processors re-implemented in numpy + PIL: images, tokenizer, chat template.

Each piece gives what the transformers 5.x processor (PIL backend) gives for the same inputs:

- :class:`ClipImageProcessor` (CLIP, LLaVA-1.5; ``do_pad`` is LLaVA's pad-to-square) and
  :class:`SiglipImageProcessor`: resize (bicubic, PIL), center crop, rescale, normalise.
- :class:`Qwen2VLImageProcessor` (Qwen2-VL and Qwen2.5-VL): :func:`smart_resize`, normalise and
  :func:`patchify_qwen2vl` into ``[grid_t*grid_h*grid_w, C*temporal*patch*patch]`` rows, in the
  order the 2x2 patch merger expects, plus ``image_grid_thw``.
- :class:`InternVLImageProcessor` (HF ``GotOcr2ImageProcessor`` as ``InternVLProcessor`` calls it):
  the tile grid (:func:`tile_grid`) whose aspect ratio is closest to the image, tiles read in
  row-major order, plus a thumbnail when there is more than one tile.
- :class:`PretrainedTokenizer`: ``tokenizer.json`` with the ``tokenizers`` library, special
  tokens and BOS/EOS rules from ``tokenizer_config.json``, the chat template of the folder.
- :class:`LlavaProcessor`, :class:`Qwen2VLProcessor`, :class:`InternVLProcessor`:
  ``processor(text or messages, images)`` -> ``input_ids``, ``attention_mask``, ``pixel_values``
  (channels first, float32, as HF) and the family's extras, with the image placeholder expanded
  to the number of vision tokens.

Pixels equal HF's exactly: the same PIL resize calls on uint8 images, then the same float64
rescale and float32 normalisation. Inputs are PIL images or uint8 ``[H, W, C]`` arrays
(C in 1, 3, 4; alpha is composited on white, as HF does); images are always converted to RGB.
Not implemented: videos, torch tensors as input, the torchvision ("fast") resize, which
differs slightly from PIL's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from efficient_mllm.data.tokenizer import HFTokenizer
from efficient_mllm.hf.chat_template import load_chat_template, render_chat_template
from efficient_mllm.hf.chat_template import special_tokens as _config_special_tokens

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipImageProcessor",
    "InternVLImageProcessor",
    "InternVLProcessor",
    "LlavaProcessor",
    "PretrainedTokenizer",
    "Qwen2VLImageProcessor",
    "Qwen2VLProcessor",
    "SiglipImageProcessor",
    "center_crop",
    "patchify_qwen2vl",
    "resize",
    "shortest_edge_size",
    "smart_resize",
    "tile_grid",
    "to_rgb",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value HF configs store as "resample"


# --------------------------------------------------------------------------- image operations


def to_rgb(image) -> np.ndarray:
    """A PIL image or uint8 ``[H, W]`` / ``[H, W, 1|3|4]`` array as uint8 RGB ``[H, W, 3]``.

    Transparency is composited on a white background (as HF's ``convert_to_rgb``)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"image: expected a PIL image or a uint8 numpy array, got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"image: expected dtype uint8 (values 0..255), got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(
            f"image: expected shape [H, W] or [H, W, C] with C in (1, 3, 4), got {image.shape}"
        )
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:4] / 255
        blended = alpha * image[..., :3] + (1 - alpha) * 255
        return np.round(blended).astype(np.uint8)
    return image


def resize(image: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """uint8 ``[H, W, 3]`` resized with PIL to ``[height, width, 3]``."""
    from PIL import Image

    if height < 1 or width < 1:
        raise ValueError(f"height, width: expected positive sizes, got ({height}, {width})")
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((int(width), int(height)), resample=Image.Resampling(resample)))


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output size when the shorter side becomes ``shortest_edge`` (the longer one is floored)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _shortest_longest_size(height, width, shortest, longest) -> tuple[int, int]:
    """Shorter side ``shortest`` unless the longer side would pass ``longest`` (HF, DETR-style)."""
    raw = None
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * shortest > longest:
        raw = longest * lo / hi
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    scale_from = raw if raw is not None else shortest
    if width < height:
        return int(scale_from * height / width), shortest
    return shortest, int(scale_from * width / height)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop of ``[H, W, C]``; an image smaller than the crop is zero-padded around it."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top : top + height, left : left + width]
    # Place the image on a zero canvas at least as large as the crop, then crop that canvas.
    canvas_h, canvas_w = max(h, height), max(w, width)
    pad_top, pad_left = -(-(canvas_h - h) // 2), -(-(canvas_w - w) // 2)
    canvas = np.zeros((canvas_h, canvas_w) + image.shape[2:], image.dtype)
    canvas[pad_top : pad_top + h, pad_left : pad_left + w] = image
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : top + height, max(0, left) : left + width]


def pad_to_square(image: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """``[H, W, C]`` centred on a square ``fill``-coloured canvas of side ``max(H, W)``."""
    h, w, c = image.shape
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, c), image.dtype)
    out[...] = np.asarray(fill, image.dtype)
    if w > h:
        top = (side - h) // 2
        out[top : top + h] = image
    else:
        left = (side - w) // 2
        out[:, left : left + w] = image
    return out


def _rescale_normalize(image, do_rescale, rescale_factor, do_normalize, mean, std):
    """uint8 -> float32: ``x * rescale_factor`` computed in float64, then ``(x - mean) / std``
    in float32 (the order and precision HF uses, so results are bit-identical)."""
    x = image
    if do_rescale:
        x = (x.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        x = (x - np.asarray(mean, x.dtype)) / np.asarray(std, x.dtype)
    return np.asarray(x, np.float32)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor``, area in
    ``[min_pixels, max_pixels]``, aspect ratio kept as well as possible."""
    if min(height, width) < 1:
        raise ValueError(f"image size must be positive, got ({height}, {width})")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image: aspect ratio must be at most 200, got {max(height, width) / min(height, width)}"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify_qwen2vl(
    image: np.ndarray, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> tuple[np.ndarray, int, int]:
    """``[C, H, W]`` float image -> (``[gh*gw, C*T*p*p]`` rows, gh, gw), ``gh = H / p``.

    Rows are ordered merge window by merge window (row-major over windows, then row-major inside
    each ``merge_size x merge_size`` window), so consecutive ``merge_size**2`` rows form one
    merged token. Each row is ``(C, T, p, p)`` flattened; a still image fills the T frames with
    copies of itself."""
    c, h, w = image.shape
    p, m = patch_size, merge_size
    if h % (p * m) or w % (p * m):
        raise ValueError(
            f"image: height and width must be multiples of patch_size*merge_size={p * m}, "
            f"got ({h}, {w})"
        )
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (window row, window col, in-row, in-col, C, py, px)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * temporal_patch_size * p * p), gh, gw


def tile_grid(
    height: int, width: int, tile_height: int, tile_width: int, min_tiles: int, max_tiles: int
) -> tuple[int, int]:
    """``(columns, rows)`` of the tile grid whose aspect ratio is closest to the image's.

    Candidates have ``min_tiles <= columns*rows <= max_tiles`` and are tried by increasing tile
    count (columns-major within a count). On an exact tie a larger grid wins while the image
    area exceeds half the grid's pixel area (InternVL's rule, as transformers orders it)."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(
            f"min_tiles, max_tiles: expected 1 <= min_tiles <= max_tiles, got ({min_tiles}, {max_tiles})"
        )
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    grids.sort(key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_height * tile_width * cols * rows:
            best = (cols, rows)
    return best


# --------------------------------------------------------------------------- image processors


def _size_dict(size, name: str, int_key: str) -> dict:
    if isinstance(size, int) and not isinstance(size, bool):
        return {int_key: size} if int_key != "square" else {"height": size, "width": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, Mapping) and size:
        return {k: int(v) for k, v in size.items() if v is not None}
    raise ValueError(f"{name}: expected an int, (height, width) or a dict, got {size!r}")


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
        for name, v in (("image_mean", mean), ("image_std", std)):
            if len(tuple(v)) != 3:
                raise ValueError(f"{name}: expected 3 values (R, G, B), got {v!r}")
        if any(float(s) == 0 for s in std):
            raise ValueError(f"image_std: expected non-zero values, got {std!r}")
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
        lo = lo if min_pixels is None else min_pixels
        hi = hi if max_pixels is None else max_pixels
        if not 0 < int(lo) <= int(hi):
            raise ValueError(
                f"min_pixels, max_pixels: expected 0 < min_pixels <= max_pixels, got ({lo}, {hi})"
            )
        for name, v in (
            ("patch_size", patch_size),
            ("temporal_patch_size", temporal_patch_size),
            ("merge_size", merge_size),
        ):
            if int(v) < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.min_pixels, self.max_pixels = int(lo), int(hi)
        self.patch_size, self.merge_size = int(patch_size), int(merge_size)
        self.temporal_patch_size = int(temporal_patch_size)

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


# --------------------------------------------------------------------------- tokenizer


class PretrainedTokenizer(HFTokenizer):
    """A checkpoint's tokenizer as transformers loads it (``TokenizersBackend``).

    From the folder: ``tokenizer.json`` (the ``tokenizers`` pipeline), ``tokenizer_config.json``
    (named special tokens, model-specific ones from an ``extra_special_tokens`` dict such as
    ``image_token``, ``added_tokens_decoder``, ``padding_side``; ``special_tokens_map.json`` fills
    in missing names) and the chat template. Special tokens missing from the vocabulary are
    added as special tokens. BOS/EOS come from ``tokenizer.json``'s post-processor: as in
    transformers 5, a folder's ``add_bos_token`` / ``add_eos_token`` are ignored when
    ``tokenizer.json`` exists. The constructor flags (for a tokenizer built in code) replace the
    post-processor by ``[bos] $A [eos]``. Truncation and padding stored in ``tokenizer.json`` are
    switched off: padding is done by :meth:`__call__`.

    It keeps :class:`~efficient_mllm.data.tokenizer.HFTokenizer`'s interface (``encode``,
    ``decode``, ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``,
    ``image_token_id``); ids of tokens the checkpoint does not define are ``None``.
    Left out: the per-class rebuilding of the pipeline that transformers does for
    ``LlamaTokenizer`` & co. (the checkpoint's ``tokenizer.json`` is used as saved).
    """

    def __init__(
        self,
        tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        extra_special_tokens: Sequence[str] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "right",
        chat_template: str | None = None,
    ):
        import tokenizers

        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise ValueError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        self._tok = tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        named = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        wanted = list(dict.fromkeys([*named.values(), *extra_special_tokens]))
        missing = [t for t in wanted if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(
                [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
            )
        self.named_special_tokens = named
        self.extra_special_tokens = tuple(extra_special_tokens)
        self.padding_side = padding_side
        self.chat_template = chat_template
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        # HFTokenizer's interface
        self.special_tokens = {
            "pad": named.get("pad_token"),
            "bos": named.get("bos_token"),
            "eos": named.get("eos_token"),
            "unk": named.get("unk_token"),
            "image": named.get("image_token"),
        }
        ids = {k: self.token_to_id(t) for k, t in self.special_tokens.items()}
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.unk_id, self.image_token_id = ids["unk"], ids["image"]
        self._special_ids = {
            self.token_to_id(t) for t in (*named.values(), *self.extra_special_tokens)
        } - {None}

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        from tokenizers import processors

        bos, eos = (
            self.named_special_tokens.get("bos_token"),
            self.named_special_tokens.get("eos_token"),
        )
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
        pair = (
            single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        )
        specials = [(t, self.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PretrainedTokenizer:
        """Loads ``tokenizer.json`` + ``tokenizer_config.json`` (+ chat template) of a folder."""
        import tokenizers

        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ValueError(f"path: no tokenizer.json in {path!r}")
        config = {}
        map_file = os.path.join(path, "special_tokens_map.json")
        if os.path.isfile(map_file):
            config.update(_read_json(map_file))
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            config.update({k: v for k, v in _read_json(cfg_file).items() if v is not None})
        tok = tokenizers.Tokenizer.from_file(tok_file)
        decoder = config.get("added_tokens_decoder") or {}
        to_add = []
        for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = entry["content"] if isinstance(entry, Mapping) else str(entry)
            if tok.token_to_id(content) is None:
                spec = dict(entry) if isinstance(entry, Mapping) else {"content": content}
                to_add.append(
                    tokenizers.AddedToken(
                        content,
                        single_word=spec.get("single_word", False),
                        lstrip=spec.get("lstrip", False),
                        rstrip=spec.get("rstrip", False),
                        normalized=spec.get("normalized", not spec.get("special", False)),
                        special=spec.get("special", False),
                    )
                )
        if to_add:
            tok.add_tokens(to_add)
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra = list(extra.values()) if isinstance(extra, Mapping) else list(extra)
        extra = [e["content"] if isinstance(e, Mapping) else e for e in extra]
        return cls(
            tok,
            special_tokens=_config_special_tokens(config),
            extra_special_tokens=extra,
            padding_side=config.get("padding_side", "right"),
            chat_template=load_chat_template(path),
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes ``tokenizer.json``, ``tokenizer_config.json`` (and ``chat_template.jinja``) in
        the layout transformers 5 saves and :meth:`from_pretrained` (or ``AutoTokenizer``) reads."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "TokenizersBackend", "padding_side": self.padding_side}
        config.update(self.named_special_tokens)
        config["extra_special_tokens"] = list(self.extra_special_tokens)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        if self.chat_template is not None:
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)

    def save(self, path) -> None:
        raise ValueError(
            f"path: a PretrainedTokenizer is saved as a folder; use save_pretrained({str(path)!r})"
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> PretrainedTokenizer:
        """Same as :meth:`from_pretrained` (a folder)."""
        return cls.from_pretrained(path)

    def __getattr__(self, name):
        # bos_token, image_token, ... and their *_id, like transformers' tokenizers.
        named = self.__dict__.get("named_special_tokens", {})
        if name in named:
            return named[name]
        if name.endswith("_id") and name[:-3] in named:
            return self.token_to_id(named[name[:-3]])
        raise AttributeError(name)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Text of ``ids``; ``skip_special`` drops every special token (HF's
        ``skip_special_tokens``). ``clean_up_tokenization_spaces`` is not applied."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        padding_side: str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "np",
    ) -> dict:
        """``{"input_ids", "attention_mask"}`` of a text or a batch (always batched output).

        ``padding``: ``False`` | ``True``/``"longest"`` | ``"max_length"`` (to ``max_length``);
        nothing is truncated. ``return_tensors="np"`` gives int64 arrays (equal lengths needed),
        ``None`` lists of lists."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text: expected a string or a non-empty list of strings")
        encs = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        ids = [list(e.ids) for e in encs]
        return self._pad(ids, padding, padding_side, max_length, return_tensors)

    def _pad(self, ids, padding, padding_side, max_length, return_tensors) -> dict:
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {side!r}")
        longest = max(len(i) for i in ids)
        if padding in (False, None, "do_not_pad"):
            target = None
        elif padding in (True, "longest"):
            target = longest
        elif padding == "max_length":
            if max_length is None or max_length < longest:
                raise ValueError(
                    f"max_length: padding='max_length' needs max_length >= the longest sequence "
                    f"({longest}), got {max_length}"
                )
            target = max_length
        else:
            raise ValueError(
                f"padding: expected False, True, 'longest' or 'max_length', got {padding!r}"
            )
        masks = [[1] * len(i) for i in ids]
        if target is not None and any(len(i) < target for i in ids):
            if self.pad_id is None:
                raise ValueError("padding: the tokenizer has no pad_token to pad with")
            for k, seq in enumerate(ids):
                n = target - len(seq)
                if side == "right":
                    ids[k], masks[k] = seq + [self.pad_id] * n, masks[k] + [0] * n
                else:
                    ids[k], masks[k] = [self.pad_id] * n + seq, [0] * n + masks[k]
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": masks}
        if return_tensors != "np":
            raise ValueError(f"return_tensors: expected 'np' or None, got {return_tensors!r}")
        if len({len(i) for i in ids}) > 1:
            raise ValueError(
                "text: sequences have different lengths; pass padding=True or return_tensors=None"
            )
        return {
            "input_ids": np.asarray(ids, np.int64),
            "attention_mask": np.asarray(masks, np.int64),
        }

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **kwargs,
    ):
        """``tokenizer.apply_chat_template``: the rendered string, or (``tokenize``) its ids,
        encoded without adding special tokens."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("chat_template: this tokenizer has no chat template; pass one")
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.named_special_tokens,
            **kwargs,
        )
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return f"PretrainedTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- processors


def _is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], Mapping) and "role" in x[0]


def _images_in_messages(conversation) -> list:
    """Image payloads of ``{"type": "image", "image" | "path": ...}`` blocks, in order."""
    from PIL import Image

    found = []
    for m in conversation:
        content = m.get("content")
        if not isinstance(content, (list, tuple)):
            continue
        for block in content:
            if not isinstance(block, Mapping) or block.get("type") != "image":
                continue
            if block.get("image") is not None:
                found.append(block["image"])
            elif block.get("path") is not None:
                found.append(Image.open(block["path"]))
            elif block.get("url") is not None:
                raise ValueError(
                    f"messages: image urls are not fetched ({block['url']!r}); pass the image"
                )
    return found


class _Processor:
    """Text + images -> model inputs; subclasses define the placeholder expansion."""

    image_token: str
    default_padding_side: str | None = None
    _extra_tokens: tuple[str, ...] = ()  # other placeholders this family refuses (videos)

    def __init__(self, image_processor, tokenizer: PretrainedTokenizer, chat_template=None):
        if not isinstance(tokenizer, PretrainedTokenizer):
            raise ValueError(
                f"tokenizer: expected a PretrainedTokenizer, got {type(tokenizer).__name__}"
            )
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        if tokenizer.token_to_id(self.image_token) is None:
            raise ValueError(
                f"tokenizer: the image token {self.image_token!r} is not in its vocabulary"
            )
        self.image_token_id = tokenizer.token_to_id(self.image_token)

    def _replacements(self, image_inputs: dict) -> list[str]:
        raise NotImplementedError

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, **kwargs):
        """The prompt string(s) of one conversation or a batch of them."""
        if self.chat_template is None:
            raise ValueError("chat_template: this processor has no chat template")
        batch = [messages] if _is_conversation(messages) else list(messages)
        if not batch or not all(_is_conversation(c) for c in batch):
            raise ValueError(
                "messages: expected a conversation [{'role', 'content'}, ...] or a list of them"
            )
        texts = [
            render_chat_template(
                self.chat_template,
                c,
                add_generation_prompt=add_generation_prompt,
                special_tokens=self.tokenizer.named_special_tokens,
                **kwargs,
            )
            for c in batch
        ]
        return texts if not _is_conversation(messages) else texts[0]

    def __call__(
        self,
        text=None,
        images=None,
        *,
        add_generation_prompt: bool = False,
        add_special_tokens: bool | None = None,
        padding: bool | str = False,
        padding_side: str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "np",
        **template_kwargs,
    ) -> dict:
        """Model inputs for ``text`` (a string, a list of strings, a conversation or a list of
        conversations, rendered with the chat template) and ``images`` (taken from the
        conversation's image blocks when not given). Each placeholder in the text takes the next
        image. Returns numpy arrays (``return_tensors="np"``) or lists (``None``)."""
        if text is None:
            if images is None:
                raise ValueError("text, images: at least one of them is needed")
            return dict(self.image_processor(images))
        add_special = True if add_special_tokens is None else add_special_tokens
        if _is_conversation(text) or (
            isinstance(text, (list, tuple)) and text and all(_is_conversation(c) for c in text)
        ):
            batch = [text] if _is_conversation(text) else list(text)
            texts = [
                self.apply_chat_template(
                    c, add_generation_prompt=add_generation_prompt, **template_kwargs
                )
                for c in batch
            ]
            if images is None:
                found = [im for c in batch for im in _images_in_messages(c)]
                images = found or None
            bos = self.tokenizer.named_special_tokens.get("bos_token")
            if add_special_tokens is None and bos is not None and texts[0].startswith(bos):
                add_special = False  # the template wrote the BOS already
        elif template_kwargs:
            raise ValueError(
                f"{sorted(template_kwargs)}: unknown arguments (chat-template variables are only "
                "used when text is a conversation)"
            )
        elif isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise ValueError(
                "text: expected a string, a list of strings, a conversation or a list of "
                f"conversations, got {type(text).__name__}"
            )
        for tok in self._extra_tokens:
            if any(tok in t for t in texts):
                raise ValueError(f"text: {tok!r} placeholders (videos) are not supported")
        n_slots = sum(t.count(self.image_token) for t in texts)
        image_list = [] if images is None else self.image_processor._as_list(images)
        if n_slots != len(image_list):
            raise ValueError(
                f"images: the text has {n_slots} {self.image_token!r} placeholders but "
                f"{len(image_list)} images were given"
            )
        image_inputs = self.image_processor(image_list) if image_list else {}
        if image_list:
            reps = iter(self._replacements(image_inputs))
            texts = [
                "".join(
                    piece if i == 0 else next(reps) + piece
                    for i, piece in enumerate(t.split(self.image_token))
                )
                for t in texts
            ]
        out = self.tokenizer(
            texts,
            add_special_tokens=add_special,
            padding=padding,
            padding_side=padding_side or self.default_padding_side,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        out.update(self._text_extras(out["input_ids"]))
        out.update(self._image_outputs(image_inputs))
        return out

    def _text_extras(self, input_ids) -> dict:
        return {}

    def _image_outputs(self, image_inputs: dict) -> dict:
        return dict(image_inputs)

    @staticmethod
    def _processor_config(path) -> dict:
        f = os.path.join(os.fspath(path), "processor_config.json")
        if not os.path.isfile(f):
            return {}
        cfg = _read_json(f)
        return {k: v for k, v in cfg.items() if not isinstance(v, Mapping)}


class LlavaProcessor(_Processor):
    """LLaVA-1.5 (HF ``LlavaProcessor``): each ``<image>`` becomes
    ``(crop_h // patch_size) * (crop_w // patch_size) + num_additional_image_tokens`` image
    tokens, minus one when ``vision_feature_select_strategy == "default"`` (CLS dropped).
    Returns ``input_ids``, ``attention_mask``, ``pixel_values [N, 3, H, W]``."""

    def __init__(
        self,
        image_processor: ClipImageProcessor,
        tokenizer: PretrainedTokenizer,
        *,
        patch_size: int,
        vision_feature_select_strategy: str | None = None,
        num_additional_image_tokens: int = 0,
        image_token: str = "<image>",
        chat_template: str | None = None,
    ):
        if int(patch_size) < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
        if vision_feature_select_strategy not in (None, "default", "full"):
            raise ValueError(
                "vision_feature_select_strategy: expected 'default', 'full' or None, got "
                f"{vision_feature_select_strategy!r}"
            )
        self.image_token = getattr(tokenizer, "named_special_tokens", {}).get(
            "image_token", image_token
        )
        self.patch_size = int(patch_size)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens)
        super().__init__(image_processor, tokenizer, chat_template)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens for processed pixels of this size."""
        n = (height // self.patch_size) * (
            width // self.patch_size
        ) + self.num_additional_image_tokens
        return n - (self.vision_feature_select_strategy == "default")

    def _replacements(self, image_inputs):
        pv = image_inputs["pixel_values"]
        return [self.image_token * self.num_image_tokens(*p.shape[-2:]) for p in pv]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LlavaProcessor:
        cfg = cls._processor_config(path)
        kwargs = {
            k: cfg[k]
            for k in (
                "vision_feature_select_strategy",
                "num_additional_image_tokens",
                "image_token",
            )
            if k in cfg
        }
        if "patch_size" not in cfg:
            raise ValueError(
                f"path: processor_config.json in {os.fspath(path)!r} has no patch_size"
            )
        image_cfg = _image_processor_config(path)
        if image_cfg.get("image_processor_type", "").startswith("Siglip"):
            image_processor = SiglipImageProcessor.from_config(image_cfg)
        else:
            image_processor = ClipImageProcessor.from_config(image_cfg)
        tok = PretrainedTokenizer.from_pretrained(path)
        return cls(
            image_processor,
            tok,
            patch_size=cfg["patch_size"],
            chat_template=tok.chat_template,
            **kwargs,
        )


class Qwen2VLProcessor(_Processor):
    """Qwen2-VL / Qwen2.5-VL (HF ``Qwen2VLProcessor``): each ``<|image_pad|>`` becomes
    ``t*h*w / merge_size**2`` copies. Returns ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` (1 on image tokens), ``pixel_values`` (patch rows) and
    ``image_grid_thw``."""

    _extra_tokens = ("<|video_pad|>",)

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessor,
        tokenizer: PretrainedTokenizer,
        *,
        image_token: str = "<|image_pad|>",
        chat_template: str | None = None,
    ):
        self.image_token = getattr(tokenizer, "named_special_tokens", {}).get(
            "image_token", image_token
        )
        super().__init__(image_processor, tokenizer, chat_template)

    def _replacements(self, image_inputs):
        m2 = self.image_processor.merge_size**2
        return [
            self.image_token * (int(np.prod(thw)) // m2) for thw in image_inputs["image_grid_thw"]
        ]

    def _text_extras(self, input_ids) -> dict:
        if isinstance(input_ids, np.ndarray):
            return {"mm_token_type_ids": (input_ids == self.image_token_id).astype(np.int64)}
        return {
            "mm_token_type_ids": [[int(i == self.image_token_id) for i in row] for row in input_ids]
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Qwen2VLProcessor:
        image_processor = Qwen2VLImageProcessor.from_config(_image_processor_config(path))
        tok = PretrainedTokenizer.from_pretrained(path)
        return cls(image_processor, tok, chat_template=tok.chat_template)


class InternVLProcessor(_Processor):
    """InternVL (HF ``InternVLProcessor``): each ``<IMG_CONTEXT>`` in the text becomes
    ``<img>`` + ``<IMG_CONTEXT>`` x ``image_seq_length * tiles`` + ``</img>``. Pads on the left
    by default. Returns ``input_ids``, ``attention_mask``, ``pixel_values [tiles, 3, H, W]``
    (images concatenated in text order)."""

    default_padding_side = "left"
    _extra_tokens = ("<video>",)

    def __init__(
        self,
        image_processor: InternVLImageProcessor,
        tokenizer: PretrainedTokenizer,
        *,
        image_seq_length: int = 256,
        start_image_token: str = "<img>",
        end_image_token: str = "</img>",
        context_image_token: str = "<IMG_CONTEXT>",
        chat_template: str | None = None,
    ):
        if int(image_seq_length) < 1:
            raise ValueError(f"image_seq_length: expected a positive int, got {image_seq_length!r}")
        named = getattr(tokenizer, "named_special_tokens", {})
        self.start_image_token = named.get("start_image_token", start_image_token)
        self.end_image_token = named.get("end_image_token", end_image_token)
        self.image_token = named.get("context_image_token", context_image_token)
        self.image_seq_length = int(image_seq_length)
        super().__init__(image_processor, tokenizer, chat_template)
        for t in (self.start_image_token, self.end_image_token):
            if tokenizer.token_to_id(t) is None:
                raise ValueError(f"tokenizer: {t!r} is not in its vocabulary")

    def _replacements(self, image_inputs):
        return [
            self.start_image_token
            + self.image_token * (self.image_seq_length * int(n))
            + self.end_image_token
            for n in image_inputs["num_patches"]
        ]

    def _image_outputs(self, image_inputs: dict) -> dict:
        return {k: v for k, v in image_inputs.items() if k != "num_patches"}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> InternVLProcessor:
        cfg = cls._processor_config(path)
        image_cfg = dict(_image_processor_config(path))
        image_cfg["crop_to_patches"] = True  # InternVLProcessor's default for its image processor
        tok = PretrainedTokenizer.from_pretrained(path)
        return cls(
            InternVLImageProcessor.from_config(image_cfg),
            tok,
            image_seq_length=cfg.get("image_seq_length", 256),
            chat_template=tok.chat_template,
        )
