"""Rotary position embeddings: 1D RoPE, Qwen2-VL M-RoPE (3D) and 2D RoPE for ViTs.

RoPE (Su et al., 2021, "RoFormer", arXiv:2104.09864) rotates each pair of channels of q and k by
an angle ``position * inv_freq[j]``, so ``q_m . k_n`` depends on ``m - n`` only. Channels are
paired in the *rotate-half* layout of Llama / Qwen2 (channel ``j`` with ``j + H/2``).

Frequency scalings follow the Hugging Face ``rope_scaling`` dicts:

* ``{"rope_type": "linear", "factor": f}``: position interpolation (Chen et al., 2023,
  arXiv:2306.15595), every frequency divided by ``f``.
* ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}``: Llama 3.1's wavelength-banded interpolation
  (Grattafiori et al., 2024, arXiv:2407.21783).
* ``{"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast"=32,
  "beta_slow"=1, "attention_factor"?, "mscale"?, "mscale_all_dim"?, "truncate"=True}``:
  YaRN (Peng et al., 2023, arXiv:2309.00071); cos and sin are multiplied by the attention
  factor (``0.1 ln(factor) + 1`` unless given), as Hugging Face does.

M-RoPE (Wang et al., 2024, "Qwen2-VL", arXiv:2409.12191) splits the frequency pairs into
``sections = (t, h, w)`` groups rotated by the temporal, row and column position ids.
2D RoPE for ViTs (Heo et al., 2024, "Rotary Position Embedding for Vision Transformer",
arXiv:2403.13298; axial form as in Qwen2-VL's vision tower) rotates half of the pairs by the
patch row and half by the patch column.

Everything is computed in float32 and returned in ``x.dtype``. Position ids are explicit inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "apply_mrope",
    "apply_rope",
    "apply_rope_2d",
    "apply_rotary",
    "mrope_grid_positions",
    "mrope_positions",
    "rope_2d_positions",
    "rope_attention_factor",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotate_half",
    "temporal_offsets",
]

_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_OPTIONAL = {
    "default": (),
    "linear": (),
    "llama3": (),
    "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"),
}
# Keys Hugging Face keeps in the same dict that do not change the 1D frequencies.
_PASSTHROUGH = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section")


def _check_head_dim(head_dim: Any, *, multiple: int = 2, name: str = "head_dim") -> int:
    if not isinstance(head_dim, (int, np.integer)) or head_dim <= 0 or head_dim % multiple:
        raise ValueError(f"{name}={head_dim!r}: expected a positive int divisible by {multiple}")
    return int(head_dim)


def _check_theta(theta: Any) -> float:
    if not isinstance(theta, (int, float, np.floating, np.integer)) or not theta > 1:
        raise ValueError(f"theta={theta!r}: expected a number > 1")
    return float(theta)


def _scaling_type(scaling: Mapping[str, Any] | None, theta: float) -> str:
    if scaling is None:
        return "default"
    if not isinstance(scaling, Mapping):
        raise ValueError(f"scaling={scaling!r}: expected None or a Hugging Face rope_scaling dict")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _REQUIRED:
        raise ValueError(
            f"scaling rope_type={kind!r}: expected one of {sorted(_REQUIRED)} "
            f"(scaling={dict(scaling)})"
        )
    missing = [k for k in _REQUIRED[kind] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"scaling={dict(scaling)}: rope_type {kind!r} needs key(s) {missing}")
    allowed = set(_REQUIRED[kind]) | set(_OPTIONAL[kind]) | set(_PASSTHROUGH)
    unknown = sorted(set(scaling) - allowed)
    if unknown:
        raise ValueError(
            f"scaling={dict(scaling)}: unknown key(s) {unknown} for rope_type {kind!r}; "
            f"expected keys among {sorted(allowed)}"
        )
    if "rope_theta" in scaling and float(scaling["rope_theta"]) != theta:
        raise ValueError(
            f"scaling['rope_theta']={scaling['rope_theta']!r} disagrees with theta={theta!r}"
        )
    prf = scaling.get("partial_rotary_factor", 1.0)
    if prf not in (None, 1, 1.0):
        raise ValueError(f"scaling['partial_rotary_factor']={prf!r}: only 1.0 is supported")
    if "factor" in _REQUIRED[kind] and not float(scaling["factor"]) > 0:
        raise ValueError(f"scaling['factor']={scaling['factor']!r}: expected a positive number")
    return kind


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None):
    """Inverse frequencies ``float32 [head_dim // 2]`` (a static numpy array).

    ``inv_freq[j] = theta ** (-2j / head_dim)``, then rescaled by ``scaling`` (see module doc).
    """
    head_dim = _check_head_dim(head_dim)
    theta = _check_theta(theta)
    kind = _scaling_type(scaling, theta)
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / theta**exponents
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        if not high > low:
            raise ValueError(
                f"scaling high_freq_factor={high} must be > low_freq_factor={low} for llama3"
            )
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        factor = float(scaling["factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)
        truncate = scaling.get("truncate", True)

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        extrapolation = 1.0 - ramp  # 1 on high-frequency pairs: keep them unscaled
        inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32)


def rope_attention_factor(
    scaling: Mapping[str, Any] | None = None, theta: float = 10000.0
) -> float:
    """The factor multiplying cos and sin: 1 except for YaRN (``0.1 ln(factor) + 1``, or
    ``attention_factor``, or the DeepSeek ``mscale / mscale_all_dim`` ratio)."""
    kind = _scaling_type(scaling, _check_theta(theta))
    if kind != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(factor, float(m)) / mscale(factor, float(m_all)))
    return float(mscale(factor))


def rope_cos_sin(angles, attention_factor: float = 1.0):
    """``cos``/``sin`` of float32 ``angles [..., H/2]`` times ``attention_factor``."""
    angles = jnp.asarray(angles, jnp.float32)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def rotate_half(x):
    """``[x1, x2] -> [-x2, x1]`` on the last axis (the Llama / Qwen2 pairing)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotates ``x [B, T, N, H]`` by per-pair ``cos, sin [B, T, H/2]`` (float32), rotate-half
    layout; returns ``x.dtype``."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


def _check_x(x, name: str = "x") -> None:
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} shape={getattr(x, 'shape', None)}: expected [B, T, N, H]")
    if x.shape[-1] % 2:
        raise ValueError(f"{name} head_dim={x.shape[-1]}: expected an even head dimension")


def _check_positions_1d(positions, x_shape: tuple):
    positions = jnp.asarray(positions)
    b, t = x_shape[:2]
    if positions.ndim != 2 or positions.shape[1] != t or positions.shape[0] not in (1, b):
        raise ValueError(
            f"positions shape={tuple(positions.shape)}: expected [B, T] = ({b}, {t}) for x of "
            f"shape {tuple(x_shape)}"
        )
    return positions


def apply_rope(x, positions, *, theta: float = 10000.0, scaling: Mapping[str, Any] | None = None):
    """1D RoPE on ``x [B, T, N, H]`` at ``positions [B, T]`` (rotate-half, as Llama / Qwen2)."""
    _check_x(x)
    positions = _check_positions_1d(positions, x.shape)
    inv_freq = rope_inv_freq(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = rope_cos_sin(angles, rope_attention_factor(scaling, theta))
    return apply_rotary(x, cos, sin)


def _check_sections(sections: Any, head_dim: int, n: int = 3) -> tuple[int, ...]:
    if (
        not isinstance(sections, Sequence)
        or len(sections) != n
        or not all(isinstance(s, (int, np.integer)) and s >= 0 for s in sections)
    ):
        raise ValueError(f"sections={sections!r}: expected {n} non-negative ints (t, h, w)")
    if sum(sections) != head_dim // 2:
        raise ValueError(
            f"sections={tuple(sections)} sum to {sum(sections)}: expected head_dim // 2 = "
            f"{head_dim // 2} (sections count frequency pairs)"
        )
    return tuple(int(s) for s in sections)


def apply_mrope(
    x,
    positions,
    *,
    sections: Sequence[int] = (16, 24, 24),
    theta: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
):
    """Qwen2-VL M-RoPE on ``x [B, T, N, H]`` with ``positions [3, B, T]`` (t, row, col).

    Frequency pair ``j`` is rotated by axis ``a(j)``'s position, where the first ``sections[0]``
    pairs use t, the next ``sections[1]`` use the row and the last ``sections[2]`` the column
    (Hugging Face's ``mrope_section``). With ``t == h == w`` this is exactly 1D RoPE.
    """
    _check_x(x)
    b, t = x.shape[:2]
    positions = jnp.asarray(positions)
    if (
        positions.ndim != 3
        or positions.shape[0] != 3
        or positions.shape[2] != t
        or positions.shape[1] not in (1, b)
    ):
        raise ValueError(
            f"positions shape={tuple(positions.shape)}: expected [3, B, T] = (3, {b}, {t})"
        )
    sections = _check_sections(sections, x.shape[-1])
    inv_freq = rope_inv_freq(x.shape[-1], theta, scaling)
    axis_of_pair = np.repeat(np.arange(3), sections)  # [H/2] static
    pos = jnp.moveaxis(positions[axis_of_pair], 0, -1).astype(jnp.float32)  # [B, T, H/2]
    cos, sin = rope_cos_sin(pos * inv_freq, rope_attention_factor(scaling, theta))
    return apply_rotary(x, cos, sin)


def mrope_positions(token_types, grid: tuple[int, int], *, lengths=None):
    """3D M-RoPE position ids for sequences holding images of one ``grid = (gh, gw)``.

    ``token_types [B, T]``: 0 for text, 1 for image tokens; each image is a contiguous run of
    ``gh * gw`` tokens in raster order. As Qwen2-VL's ``get_rope_index`` (t = 1, no spatial merge):
    a text token gets ``t = h = w = p`` with ``p`` its running position; an image starting at
    running position ``s`` gives its token ``(row, col)`` the ids ``(s, s + row, s + col)``; the
    next text token continues at ``s + max(gh, gw)`` (= max id of the image + 1).

    Returns ``(positions int32 [3, B, T], next_position int32 [B])`` where ``next_position`` is
    one past the largest id among the first ``lengths`` tokens (all tokens when ``None``): the
    position of the first decoded token. Traceable under jit; a run of image tokens whose length
    is not a multiple of ``gh * gw`` is not detected under jit (checked eagerly otherwise).
    """
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid={grid!r}: expected (gh, gw), two positive ints")
    gh, gw = int(grid[0]), int(grid[1])
    token_types = jnp.asarray(token_types)
    if token_types.ndim != 2:
        raise ValueError(f"token_types shape={tuple(token_types.shape)}: expected [B, T]")
    is_img = token_types.astype(jnp.int32) == 1
    k = gh * gw
    img_before = jnp.cumsum(is_img, axis=1, dtype=jnp.int32) - is_img  # exclusive counts
    text_before = jnp.cumsum(~is_img, axis=1, dtype=jnp.int32) - (~is_img)
    images_done = img_before // k
    span = max(gh, gw)
    start = text_before + images_done * span  # running position of this token / its image
    within = img_before % k
    row = jnp.where(is_img, within // gw, 0)
    col = jnp.where(is_img, within % gw, 0)
    positions = jnp.stack([start, start + row, start + col]).astype(jnp.int32)
    if _is_concrete(is_img):
        counts = np.asarray(is_img).sum(axis=1)
        if np.any(counts % k):
            raise ValueError(
                f"token_types has {counts.tolist()} image tokens per row: expected a multiple of "
                f"gh * gw = {k} for grid={grid}"
            )
    t = token_types.shape[1]
    if lengths is None:
        valid = jnp.ones(token_types.shape, bool)
    else:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (token_types.shape[0],):
            raise ValueError(
                f"lengths shape={tuple(lengths.shape)}: expected [B] = ({token_types.shape[0]},)"
            )
        valid = jnp.arange(t)[None, :] < lengths[:, None]
    next_position = jnp.max(jnp.where(valid[None], positions, -1), axis=(0, 2)) + 1
    return positions, next_position.astype(jnp.int32)


def mrope_grid_positions(image_mask, grids, *, lengths=None, time_interval=1):
    """3D M-RoPE position ids for sequences holding images of different grids (Qwen2-VL's
    ``get_rope_index`` for images).

    ``image_mask`` bool ``[B, T]``: the image tokens; ``grids``: static ``((t, h, w), ...)`` of
    each image *in LLM tokens* (after the spatial merge), one per image, consumed in order over
    the image tokens of row 0, then row 1, ... (tokens past ``lengths`` are not image tokens).
    Image ``i`` is ``t * h * w`` consecutive tokens in raster order over (frame, row, col). A text
    token gets ``t = h = w = p`` (``p`` its running position); an image starting at running
    position ``s`` gives its token ``(f, r, c)`` the ids ``(s + f * time_interval, s + r, s + c)``
    and the next token continues at ``s + max(h, w)``. ``time_interval``: one int for every
    grid, or one number per grid (videos: Qwen2.5-VL's ``tokens_per_second *
    second_per_grid``); a non-integer interval gives frame ``f`` the temporal offset
    ``trunc(float32(f) * float32(interval))``, as Hugging Face computes it in float32 (the
    largest offset may then exceed ``max(h, w)``). Differences from ``get_rope_index``: two
    images with no text token between them are still two images here (Hugging Face's grouping of
    ``mm_token_type_ids`` would merge them; its processors always separate images by
    vision start/end tokens).

    Returns ``(positions int32 [3, B, T], next_position int32 [B])`` (one past the largest id
    among the first ``lengths`` tokens). Traceable under jit (``grids`` is static); eagerly, a
    number of image tokens different from ``sum(t * h * w)`` raises ``ValueError``.
    """
    image_mask = jnp.asarray(image_mask)
    if image_mask.ndim != 2:
        raise ValueError(f"image_mask shape={tuple(image_mask.shape)}: expected [B, T]")
    grids = tuple(tuple(int(g) for g in grid) for grid in grids)
    if any(len(g) != 3 or min(g) <= 0 for g in grids):
        raise ValueError(f"grids={grids!r}: expected a sequence of (t, h, w) positive ints")
    intervals = _time_intervals(time_interval, len(grids))
    b, t = image_mask.shape
    valid = jnp.ones((b, t), bool)
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (b,):
            raise ValueError(f"lengths shape={tuple(lengths.shape)}: expected [B] = ({b},)")
        valid = jnp.arange(t)[None, :] < lengths[:, None]
    is_img = image_mask.astype(bool) & valid
    total = sum(gt * gh * gw for gt, gh, gw in grids)
    if _is_concrete(is_img):
        count = int(np.asarray(is_img).sum())
        if count != total:
            raise ValueError(
                f"image_mask has {count} image tokens among the valid ones: expected "
                f"sum(t * h * w) = {total} for grids={grids}"
            )
    if total == 0:
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        nxt = jnp.max(jnp.where(valid, pos, -1), axis=1) + 1
        return jnp.broadcast_to(pos[None], (3, b, t)), nxt.astype(jnp.int32)
    # Static tables over the global image-token index: frame, row, col, and the running-position
    # increment the token contributes (max(h, w) on an image's last token, else 0).
    tabs = []
    for (gt, gh, gw), interval in zip(grids, intervals):
        f, r, c = np.meshgrid(temporal_offsets(gt, interval), np.arange(gh), np.arange(gw),
                              indexing="ij")
        step = np.zeros(gt * gh * gw, np.int64)
        step[-1] = max(gh, gw)
        tabs.append(np.stack([f.reshape(-1), r.reshape(-1), c.reshape(-1), step]))
    table = jnp.asarray(np.concatenate(tabs, axis=1).astype(np.int32))  # [4, total]
    flat = is_img.reshape(-1).astype(jnp.int32)
    index = (jnp.cumsum(flat) - flat).reshape(b, t)  # global image-token index (exclusive)
    fr, row, col, step = table[:, jnp.clip(index, 0, total - 1)]
    contrib = jnp.where(is_img, step, 1)
    start = jnp.cumsum(contrib, axis=1, dtype=jnp.int32) - contrib
    zero = jnp.zeros_like(start)
    positions = jnp.stack(
        [
            start + jnp.where(is_img, fr, zero),
            start + jnp.where(is_img, row, zero),
            start + jnp.where(is_img, col, zero),
        ]
    ).astype(jnp.int32)
    nxt = jnp.max(jnp.where(valid[None], positions, -1), axis=(0, 2)) + 1
    return positions, nxt.astype(jnp.int32)


def _time_intervals(time_interval, n: int) -> tuple:
    """``time_interval`` (one int, or one int / float per grid) as ``n`` per-grid values."""
    def bad(v):
        return isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))

    if isinstance(time_interval, (Sequence, np.ndarray)):
        values = tuple(time_interval)
        if len(values) != n or any(bad(v) or not v >= 0 for v in values):
            raise ValueError(
                f"time_interval={time_interval!r}: expected one number >= 0 per grid ({n})"
            )
        return values
    if bad(time_interval) or isinstance(time_interval, (float, np.floating)):
        raise ValueError(
            f"time_interval={time_interval!r}: expected an int or one number per grid"
        )
    return (int(time_interval),) * n


def temporal_offsets(frames: int, interval=1) -> np.ndarray:
    """Temporal M-RoPE offsets of ``frames`` frames: ``f * interval`` for an int interval,
    else ``trunc(float32(f) * float32(interval))`` (Hugging Face's float32 ``.long()``)."""
    if isinstance(interval, (int, np.integer)) and not isinstance(interval, bool):
        return np.arange(frames, dtype=np.int64) * int(interval)
    prod = np.arange(frames).astype(np.float32) * np.float32(interval)
    return np.trunc(prod).astype(np.int64)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def rope_2d_positions(grid: tuple[int, int], *, batch: int = 1, prefix: int = 0):
    """``int32 [batch, prefix + gh * gw, 2]`` (row, col) ids of a raster-order patch grid,
    preceded by ``prefix`` tokens (e.g. CLS) at ``(0, 0)``, i.e. left unrotated."""
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid={grid!r}: expected (gh, gw), two positive ints")
    if not isinstance(prefix, (int, np.integer)) or prefix < 0:
        raise ValueError(f"prefix={prefix!r}: expected a non-negative int")
    gh, gw = int(grid[0]), int(grid[1])
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    rc = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)
    rc = np.concatenate([np.zeros((prefix, 2), rc.dtype), rc], axis=0)
    return jnp.broadcast_to(jnp.asarray(rc, jnp.int32), (batch, *rc.shape))


def apply_rope_2d(x, positions, *, theta: float = 10000.0):
    """Axial 2D RoPE on ``x [B, T, N, H]`` with ``positions [B, T, 2]`` (row, col).

    With ``inv_freq = theta ** (-4j / H)`` for ``j < H/4``, pair ``j < H/4`` is rotated by
    ``row * inv_freq[j]`` and pair ``H/4 + j`` by ``col * inv_freq[j]`` (rotate-half pairing),
    as in Qwen2-VL's vision tower. ``H`` must be a multiple of 4.
    """
    _check_x(x)
    _check_head_dim(x.shape[-1], multiple=4, name="x head_dim")
    b, t = x.shape[:2]
    positions = jnp.asarray(positions)
    if positions.ndim != 3 or positions.shape[1:] != (t, 2) or positions.shape[0] not in (1, b):
        raise ValueError(
            f"positions shape={tuple(positions.shape)}: expected [B, T, 2] = ({b}, {t}, 2)"
        )
    inv_freq = rope_inv_freq(x.shape[-1] // 2, theta)  # [H/4]
    pos = positions.astype(jnp.float32)
    angles = jnp.concatenate([pos[..., :1] * inv_freq, pos[..., 1:] * inv_freq], axis=-1)
    cos, sin = rope_cos_sin(angles)
    return apply_rotary(x, cos, sin)
