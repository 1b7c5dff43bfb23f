"""The Hugging Face Qwen2-VL / Qwen2.5-VL video processor (``Qwen2VLVideoProcessor``) in numpy.

transformers' video processors run on torchvision tensors, so their pixels differ from the PIL
image path: frames are resized by torch's antialiased bicubic kernel for uint8 images
(:func:`resize_uint8_antialias`, re-implemented here: separable, width first, fixed-point
weights of an int16 precision chosen per pass), rescale and normalisation are fused into
``(x - 255 * mean) / (255 * std)`` in float32, and the temporal patching pads the frame count
to a multiple of ``temporal_patch_size`` by repeating the last frame. Per video the result is
``[grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2]`` rows (merge window
order, as for images) and its ``(grid_t, grid_h, grid_w)``.

Inputs: a video is a uint8 array ``[T, H, W, C]`` (C = 1 or 3, channels last) or a list of
frames (RGB PIL images or uint8 ``[H, W, C]`` arrays). Not implemented: frame sampling
(``do_sample_frames``, HF's default False for Qwen2-VL: frames are used as given), video
decoding from files or URLs, RGBA frames.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from efficient_mllm.hf.chat_template import _read_json
from efficient_mllm.hf.image_ops import BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, smart_resize
from efficient_mllm.hf.image_processors import check_mean_std, set_qwen_geometry

__all__ = ["Qwen2VLVideoProcessor", "as_video", "resize_uint8_antialias"]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel with a = -0.5 (torch's antialias bicubic filter), float64."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices ``[out, K]``, int16-range integer weights ``[out, K]`` and their precision
    (bits) of one antialiased bicubic pass, as torch computes them for uint8 images."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    max_k = int(math.ceil(np.float32(support))) * 2 + 1
    idx = np.zeros((out_size, max_k), np.int64)
    wts = np.zeros((out_size, max_k), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), max_k)
        j = np.arange(xsize)
        w = _cubic((j + xmin - center + 0.5) * invscale)
        total = float(sum(w.tolist()))  # sequential, in torch's order
        if total != 0.0:
            w = w / total
        idx[i, :xsize] = xmin + j
        wts[i, :xsize] = w
    wt_max = float(wts.max(initial=0.0))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = wts * (1 << precision)
    ints = np.where(v < 0, np.trunc(-0.5 + v), np.trunc(0.5 + v)).astype(np.int64)
    return idx, ints, precision


def _resample_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    idx, w, precision = _aa_weights(x.shape[axis], out_size)
    moved = np.moveaxis(x, axis, -1).astype(np.int64)
    acc = (moved[..., idx] * w).sum(-1) + (1 << (precision - 1) if precision else 0)
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_uint8_antialias(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[..., H, W, C]`` -> ``[..., height, width, C]``: bit-exact with
    ``torch.nn.functional.interpolate(x, mode="bicubic", antialias=True)`` on uint8 CPU tensors
    (what torchvision's ``resize`` runs for uint8 bicubic). Width pass first, then height; a
    dimension whose size does not change is not resampled."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 3:
        raise ValueError(
            f"frames dtype={frames.dtype} shape={frames.shape}: expected uint8 [..., H, W, C]"
        )
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height, width: expected positive sizes, got ({height}, {width})")
    h, w = frames.shape[-3:-1]
    if (h, w) == (height, width):
        return frames
    x = frames
    if w != width:
        x = _resample_axis(x, x.ndim - 2, int(width))
    if h != height:
        x = _resample_axis(x, x.ndim - 3, int(height))
    return x


def as_video(video) -> np.ndarray:
    """One video as uint8 RGB ``[T, H, W, 3]`` (see the module doc for accepted inputs)."""
    from PIL import Image

    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("video: got an empty list of frames")
        frames = []
        for f in video:
            if isinstance(f, Image.Image):
                if f.mode != "RGB":
                    raise ValueError(f"video: PIL frames must be RGB, got mode {f.mode!r}")
                f = np.asarray(f)
            frames.append(np.asarray(f))
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"video: frames differ in shape {sorted({f.shape for f in frames})}")
        video = np.stack(frames)
    if not isinstance(video, np.ndarray):
        raise ValueError(
            f"video: expected a uint8 [T, H, W, C] array or a list of frames, got "
            f"{type(video).__name__}"
        )
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (1, 3):
        raise ValueError(
            f"video dtype={video.dtype} shape={video.shape}: expected uint8 [T, H, W, C] with "
            "C in (1, 3), channels last"
        )
    if min(video.shape[:3]) < 1:
        raise ValueError(f"video shape={video.shape}: expected at least one frame of 1x1 pixels")
    return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video


def _video_processor_config(path) -> dict:
    """``video_preprocessor_config.json`` of a checkpoint folder, or the ``video_processor``
    entry of ``processor_config.json``; ``{}`` when neither exists (class defaults)."""
    path = os.fspath(path)
    f = os.path.join(path, "video_preprocessor_config.json")
    if os.path.isfile(f):
        return _read_json(f)
    proc = os.path.join(path, "processor_config.json")
    if os.path.isfile(proc) and isinstance(_read_json(proc).get("video_processor"), Mapping):
        return dict(_read_json(proc)["video_processor"])
    return {}


class Qwen2VLVideoProcessor:
    """Qwen2-VL / Qwen2.5-VL video preprocessing (HF ``Qwen2VLVideoProcessor``, torchvision).

    Each video: resize every frame (:func:`resize_uint8_antialias`) to :func:`smart_resize` of
    its size with ``factor = patch_size * merge_size`` (``cap_pixels_per_frame``: the per-frame
    budget is also capped at an even share of ``0.9 * max_video_tokens`` tokens' pixels, floored
    at ``1.05 * min_pixels``, as qwen-vl-utils), fused rescale + normalise, then temporal
    patching. Returns ``pixel_values_videos`` float32 ``[sum t*h*w, C*T*P*P]`` and
    ``video_grid_thw`` int64 ``[V, 3]``. Defaults are HF's (``size = {"shortest_edge": 128*28*28,
    "longest_edge": 768*28*28}``); explicit ``min_pixels`` / ``max_pixels`` take precedence.
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
        cap_pixels_per_frame: bool | None = None,
        max_video_tokens: int = 128000,
        do_convert_rgb: bool = True,
        do_sample_frames: bool = False,
    ):
        size = dict(size or {})
        lo = size.get("shortest_edge", 128 * 28 * 28) if min_pixels is None else min_pixels
        hi = size.get("longest_edge", 28 * 28 * 768) if max_pixels is None else max_pixels
        if int(resample) != BICUBIC:
            raise ValueError(f"resample={resample!r}: only bicubic ({BICUBIC}) is implemented")
        if do_sample_frames:
            raise ValueError("do_sample_frames=True: frame sampling is not implemented")
        check_mean_std(image_mean, image_std)
        set_qwen_geometry(self, lo, hi, patch_size=patch_size,
                          temporal_patch_size=temporal_patch_size, merge_size=merge_size,
                          max_video_tokens=max_video_tokens)
        self.do_resize, self.do_rescale, self.do_normalize = (
            bool(do_resize), bool(do_rescale), bool(do_normalize))
        self.rescale_factor = float(rescale_factor)
        self.image_mean = tuple(map(float, image_mean))
        self.image_std = tuple(map(float, image_std))
        self.cap_pixels_per_frame = bool(cap_pixels_per_frame)

    @classmethod
    def from_config(cls, config: Mapping) -> Qwen2VLVideoProcessor:
        """From a ``video_preprocessor_config.json`` dict (other keys are ignored)."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in config.items()
                      if k in params and k != "self" and v is not None})

    @classmethod
    def from_pretrained(cls, path) -> Qwen2VLVideoProcessor:
        return cls.from_config(_video_processor_config(path))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def output_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """Frame size after the resize step."""
        if not self.do_resize:
            return height, width
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            total = int(self.max_video_tokens * self.factor * self.factor * 0.9)
            max_pixels = max(min(max_pixels, total * self.temporal_patch_size // num_frames),
                             int(self.min_pixels * 1.05))
        return smart_resize(height, width, self.factor, self.min_pixels, max_pixels)

    def grid_thw(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """``(grid_t, grid_h, grid_w)`` of a video of this shape."""
        h, w = self.output_size(num_frames, height, width)
        return -(-num_frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """LLM tokens of one video after the ``merge_size x merge_size`` merger."""
        return math.prod(self.grid_thw(num_frames, height, width)) // self.merge_size**2

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        if self.do_rescale and self.do_normalize:  # HF fuses both into one normalisation
            inv = np.float32(1.0 / self.rescale_factor)
            mean = np.asarray(self.image_mean, np.float32) * inv
            std = np.asarray(self.image_std, np.float32) * inv
            return (x.astype(np.float32) - mean) / std
        if self.do_normalize:
            mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
            return (x.astype(np.float32) - mean) / std
        if self.do_rescale:
            return x.astype(np.float32) * np.float32(self.rescale_factor)
        return x.astype(np.float32)

    def preprocess_one(self, video) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One video -> (rows ``[t*h*w, C*T*P*P]`` float32, ``(t, h, w)``)."""
        x = as_video(video)
        t, h, w, c = x.shape
        oh, ow = self.output_size(t, h, w)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if oh % (p * m) or ow % (p * m):
            raise ValueError(
                f"video: frames of {(oh, ow)} pixels after resizing: expected multiples of "
                f"patch_size*merge_size={p * m} (enable do_resize)"
            )
        x = self._normalize(resize_uint8_antialias(x, oh, ow))  # [T, H, W, C]
        if pad := -t % tp:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        gt, gh, gw = x.shape[0] // tp, oh // p, ow // p
        x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
        # (t, window row, window col, in-row, in-col, C, frame, py, px)
        x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)

    @staticmethod
    def _as_list(videos) -> list:
        if videos is None:
            raise ValueError("videos: expected a video or a list of videos, got None")
        if isinstance(videos, np.ndarray):
            return list(videos) if videos.ndim == 5 else [videos]
        if isinstance(videos, (list, tuple)) and videos:
            first = videos[0]
            if isinstance(first, np.ndarray) and first.ndim == 4 or isinstance(first, (list, tuple)):
                return list(videos)
            return [videos]  # one video given as a list of frames
        raise ValueError(f"videos: expected a video or a list of videos, got {type(videos).__name__}")

    def __call__(self, videos) -> dict:
        done = [self.preprocess_one(v) for v in self._as_list(videos)]
        return {
            "pixel_values_videos": np.concatenate([d[0] for d in done]),
            "video_grid_thw": np.asarray([d[1] for d in done], np.int64),
        }
