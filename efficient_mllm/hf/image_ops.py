"""Image operations of the Hugging Face image processors, in numpy + PIL (bit-exact with HF's PIL
backend): RGB conversion, bicubic resize, shortest-edge sizing, center crop, pad to square,
rescale + normalise, Qwen2-VL ``smart_resize`` and patchification, InternVL's tile grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

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
