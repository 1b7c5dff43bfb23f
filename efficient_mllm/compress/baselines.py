"""Score-free baselines: random subset, uniform (strided) grid sampling, 2D average pooling, and
a learned pixel-shuffle connector.

Every scored pruner should beat these at equal token budgets (ADSC's point: uniform
downsampling is a strong control). All are pre-LLM compressors (``MLLMConfig.compressor``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.compress import core
from efficient_mllm.nn.layers import Linear, activation

__all__ = ["AvgPool", "PixelShuffleConnector", "RandomTokens", "UniformTokens", "space_to_depth"]


def _pos_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class RandomTokens:
    """Keeps a uniformly random subset of ``keep`` tokens per row, in original order."""

    keep: int | float
    seed: int = 0

    def __call__(self, tokens: jax.Array) -> core.Compressed:
        b, n, _ = core.check_tokens(tokens)
        k = core.resolve_budget(self.keep, n, name="keep")
        base = jax.random.key(self.seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(b, dtype=jnp.uint32))
        scores = jax.vmap(lambda key: jax.random.uniform(key, (n,)))(keys)
        idx, _ = core.topk_select(scores, k)
        return core.compressed(core.gather_tokens(tokens, idx), idx)


@registry.COMPRESSORS.register(
    "random", paper="baseline: uniformly random visual-token subset (no paper)"
)
def random_tokens(keep: int | float, seed: int = 0) -> RandomTokens:
    """Random subset of ``keep`` tokens (int, or fraction of N) per row, kept in original order.

    The subset of row ``b`` is drawn from ``fold_in(key(seed), b)``: deterministic given the
    seed and the row's index in the batch, independent of the image content (so the same row
    index always gets the same subset, and a row's subset depends on its batch position).
    """
    core.check_budget(keep, "keep")
    return RandomTokens(keep, _pos_int(seed, "seed", 0))


@dataclasses.dataclass(frozen=True)
class UniformTokens:
    """Evenly spaced rows x columns of the patch grid (strided downsampling)."""

    keep: int | float

    def __call__(self, tokens: jax.Array, *, grid: tuple[int, int] | None = None):
        b, n, _ = core.check_tokens(tokens)
        gh, gw = core.grid_shape(grid, n)
        if isinstance(self.keep, (float, np.floating)):
            sel = core.band_centres((gh, gw), core.grid_budget(self.keep, (gh, gw)))
        else:
            k = core.resolve_budget(self.keep, n, name="keep")
            try:
                sel = core.band_centres((gh, gw), core.grid_budget(k, (gh, gw)))
            except ValueError:  # no rows x cols factorisation fits: evenly spaced in raster order
                sel = (((2 * np.arange(k) + 1) * n) // (2 * k)).astype(np.int32)
        idx = jnp.broadcast_to(jnp.asarray(sel, jnp.int32)[None], (b, sel.size))
        return core.compressed(core.gather_tokens(tokens, idx), idx)


@registry.COMPRESSORS.register(
    "uniform",
    paper="ADSC-style uniform downsampling: Vision Token Reduction via Attention-Driven "
    "Self-Compression for Efficient Multimodal Large Language Models (arXiv 2025)",
)
def uniform(keep: int | float) -> UniformTokens:
    """Uniform spatial sampling of ``keep`` tokens: a ``kh x kw`` grid of evenly spaced rows and
    columns (``core.grid_budget``: the factorisation of ``keep`` closest to the grid's aspect;
    a fraction scales each side by its square root), each band represented by its centre cell
    (``core.band_centres``; stride ``s`` gives cells ``s//2 + s*i``). When ``keep`` has no
    factorisation that fits the grid, tokens ``floor((i + 1/2) N / keep)`` of the raster order.

    ADSC applies this downsampling *inside* the LLM at chosen layers and fine-tunes the model;
    here it is the pre-LLM entry (no scoring, no training needed).
    """
    core.check_budget(keep, "keep")
    return UniformTokens(keep)


def _windows(size: int, kernel: int, stride: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the pooling windows along one axis (ceil mode: a last partial
    window covers the remainder; windows starting past the end are dropped)."""
    count = math.ceil(max(size - kernel, 0) / stride) + 1
    starts = [i * stride for i in range(count) if i * stride < size]
    return [(s, min(kernel, size - s)) for s in starts]


@dataclasses.dataclass(frozen=True)
class AvgPool:
    """2D average pooling over the patch grid."""

    kernel: int = 2
    stride: int | None = None

    def __call__(self, tokens: jax.Array, *, grid: tuple[int, int] | None = None):
        b, n, d = core.check_tokens(tokens)
        gh, gw = core.grid_shape(grid, n)
        k = self.kernel
        s = self.stride or k
        if k > min(gh, gw):
            raise ValueError(f"kernel={k}: larger than the {gh}x{gw} token grid")
        wr, wc = _windows(gh, k, s), _windows(gw, k, s)
        pad_h = max(0, wr[-1][0] + k - gh)
        pad_w = max(0, wc[-1][0] + k - gw)
        x = tokens.reshape(b, gh, gw, d).astype(jnp.float32)
        summed = jax.lax.reduce_window(
            x,
            0.0,
            jax.lax.add,
            (1, k, k, 1),
            (1, s, s, 1),
            ((0, 0), (0, pad_h), (0, pad_w), (0, 0)),
        )[:, : len(wr), : len(wc)]
        counts = np.array([[h * w for _, w in wc] for _, h in wr], np.float32)
        pooled = (summed / counts[None, :, :, None]).reshape(b, -1, d).astype(tokens.dtype)
        rep = np.array(
            [(r + (h - 1) // 2) * gw + c + (w - 1) // 2 for r, h in wr for c, w in wc], np.int32
        )
        idx = jnp.broadcast_to(jnp.asarray(rep)[None], (b, rep.size))
        return core.compressed(pooled, idx)


@registry.COMPRESSORS.register(
    "avgpool", paper="baseline: 2D average pooling of the visual-token grid (no paper)"
)
def avgpool(kernel: int = 2, stride: int | None = None) -> AvgPool:
    """``kernel x kernel`` average pooling over the patch grid with ``stride`` (default
    ``kernel``), ceil mode: a partial window at the bottom/right edge averages the cells it
    covers (nothing is dropped). ``K = ceil((gh - kernel) / stride + 1) * (same for gw)``.

    ``keep_idx`` is each window's centre cell (the top-left of the central 2x2 for an even
    window: ``(r0 + (h-1)//2, c0 + (w-1)//2)``, so the top-left cell for 2x2); the pooled token
    takes that cell's position ids.
    """
    kernel = _pos_int(kernel, "kernel")
    if stride is not None:
        stride = _pos_int(stride, "stride")
    return AvgPool(kernel, stride)


def space_to_depth(x: jax.Array, grid: tuple[int, int], factor: int) -> jax.Array:
    """``[B, gh*gw, D] -> [B, (gh/f)*(gw/f), f*f*D]``: each ``f x f`` cell's tokens concatenated
    in ``(row-in-cell, col-in-cell, D)`` order, cells in raster order."""
    b, n, d = x.shape
    gh, gw = grid
    f = factor
    if gh % f or gw % f:
        raise ValueError(f"factor={f}: the {gh}x{gw} token grid must be divisible by it")
    x = x.reshape(b, gh // f, f, gw // f, f, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (gh // f) * (gw // f), f * f * d)


class PixelShuffleConnector(nnx.Module):
    """Pixel shuffle (space-to-depth) of the pre-projector ViT features + its own learned
    ``mlp2x_gelu`` connector to the LLM width (params ``fc1 [vision_embed, mlp]``,
    ``fc2 [mlp, embed]``, with bias)."""

    def __init__(self, factor: int, vision_dim: int, dim: int, *, dtype, param_dtype, rngs):
        self.factor = factor
        self.vision_dim = vision_dim
        kw = {"use_bias": True, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.fc1 = Linear(factor * factor * vision_dim, dim, axes=("vision_embed", "mlp"), **kw)
        self.fc2 = Linear(dim, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, tokens: jax.Array, *, features=None, grid=None) -> core.Compressed:
        b, n, _ = core.check_tokens(tokens)
        core.require(
            features, "features", "pixel_shuffle", "call it with the pre-projector ViT features"
        )
        if features.shape[:2] != (b, n) or features.shape[2] != self.vision_dim:
            raise ValueError(
                f"features shape={tuple(features.shape)}: expected [{b}, {n}, {self.vision_dim}] "
                "(vision_dim); the pixel_shuffle compressor cannot be combined with "
                "MLLMConfig.pixel_shuffle > 1"
            )
        gh, gw = core.grid_shape(grid, n)
        f = self.factor
        x = space_to_depth(features, (gh, gw), f)
        out = self.fc2(activation("gelu")(self.fc1(x))).astype(tokens.dtype)
        off = (f - 1) // 2
        rep = np.array(
            [(r * f + off) * gw + c * f + off for r in range(gh // f) for c in range(gw // f)],
            np.int32,
        )
        idx = jnp.broadcast_to(jnp.asarray(rep)[None], (b, rep.size))
        return core.compressed(out, idx)


@registry.COMPRESSORS.register(
    "pixel_shuffle",
    paper="InternVL 1.5 pixel shuffle: How Far Are We to GPT-4V? Closing the Gap to Commercial "
    "Multimodal Models with Open-Source Suites (Chen et al., arXiv:2404.16821)",
)
def pixel_shuffle(
    factor: int = 2,
    *,
    vision_dim: int,
    dim: int,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> PixelShuffleConnector:
    """Learned pixel-shuffle connector: ``factor x factor`` neighbouring ViT features
    (``features``, pre-projector) are concatenated into one token of width
    ``factor^2 * vision_dim`` and mapped to the LLM width by a new Linear-GELU-Linear (trained
    with the model; ``factor^2`` fewer tokens). The model's own projector output is not used.

    Pixel shuffle changes the channel width, so a parameter-free version cannot feed the LLM;
    this entry is the honest one (it has parameters and needs training). The cheaper standard
    placement is ``MLLMConfig(pixel_shuffle=factor)`` (shuffle inside the projector, no wasted
    projector pass); use this compressor to compare it under the compressor interface.
    ``keep_idx``: each cell's top-left-of-centre cell (top-left for ``factor=2``).
    """
    factor = _pos_int(factor, "factor")
    return PixelShuffleConnector(
        factor, int(vision_dim), int(dim), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
