"""Fourier-VLM: low-pass compression of the visual-token grid with a 2D DCT.

Per channel, the ``gh x gw`` grid of visual tokens ``X`` is transformed with the orthonormal
DCT-II, ``C = D_gh X D_gw^T`` (``D_n[u, x] = a_u cos(pi (2x + 1) u / 2n)``, ``a_0 = sqrt(1/n)``,
``a_u = sqrt(2/n)``), and only the low-frequency ``kh x kw`` block ``C[:kh, :kw]`` is kept: two
small matmuls with static matrices, no parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm import registry
from efficient_mllm.compress import core

__all__ = ["FourierVLM", "dct_matrix", "lowpass_matrix"]


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``[n, n]`` (rows: frequencies), float64."""
    u = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * u / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def lowpass_matrix(n: int, k: int, inverse: bool) -> np.ndarray:
    """``[k, n]``: the first ``k`` DCT-II rows (coefficients), or with ``inverse`` those followed
    by the ``k``-point inverse DCT and scaled by ``sqrt(k / n)`` (a spectral resampling to ``k``
    cells that maps a constant signal to the same constant)."""
    low = dct_matrix(n)[:k]
    if not inverse:
        return low
    return np.sqrt(k / n) * dct_matrix(k).T @ low


@dataclasses.dataclass(frozen=True)
class FourierVLM:
    keep_side: int | tuple[int, int] | None = None
    keep: int | float | None = None
    inverse: bool = True

    def out_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        gh, gw = grid
        if self.keep_side is not None:
            kh, kw = self.keep_side if isinstance(self.keep_side, tuple) else (self.keep_side,) * 2
            if kh > gh or kw > gw:
                raise ValueError(
                    f"keep_side={self.keep_side!r}: larger than the {gh}x{gw} token grid"
                )
            return kh, kw
        return core.grid_budget(self.keep, grid, name="keep")

    def __call__(self, tokens: jax.Array, *, grid: tuple[int, int] | None = None):
        b, n, d = core.check_tokens(tokens)
        gh, gw = core.grid_shape(grid, n)
        kh, kw = self.out_grid((gh, gw))
        mh = jnp.asarray(lowpass_matrix(gh, kh, self.inverse), jnp.float32)
        mw = jnp.asarray(lowpass_matrix(gw, kw, self.inverse), jnp.float32)
        x = tokens.reshape(b, gh, gw, d).astype(jnp.float32)
        y = jnp.einsum("ih,bhwd->biwd", mh, x)
        y = jnp.einsum("jw,biwd->bijd", mw, y)
        rep = core.band_centres((gh, gw), (kh, kw))
        idx = jnp.broadcast_to(jnp.asarray(rep)[None], (b, rep.size))
        return core.compressed(y.reshape(b, kh * kw, d).astype(tokens.dtype), idx)


@registry.COMPRESSORS.register(
    "fourier_vlm",
    paper="Fourier-VLM: Compressing Vision Tokens in the Frequency Domain for Large "
    "Vision-Language Models (arXiv 2025)",
)
def fourier_vlm(
    keep_side: int | tuple[int, int] | list[int] | None = None,
    keep: int | float | None = None,
    inverse: bool = True,
) -> FourierVLM:
    """Fourier-VLM: 2D DCT-II over the patch grid, keep the low-frequency ``kh x kw`` block
    (``keep_side=k`` or ``(kh, kw)``; or ``keep`` tokens, factored as in ``core.grid_budget``),
    giving ``kh * kw`` tokens. Parameter-free; the paper fine-tunes the MLLM with it in place.

    ``inverse=True`` (default) maps the kept block back to a ``kh x kw`` *spatial* grid with
    the ``kh``/``kw``-point inverse DCT, scaled so a constant map stays constant (tokens stay on
    the scale of the input); ``inverse=False`` emits the raw DCT coefficients in raster order of
    ``(u, v)``. Position ids: output cell / coefficient ``(i, j)`` takes the ids of the centre
    cell of the ``i``-th row band and ``j``-th column band of the input grid
    (``core.band_centres``), which is also its ``keep_idx``.
    The paper computes the DCT through an FFT; the static matrices here are the same transform.
    """
    if (keep_side is None) == (keep is None):
        raise ValueError(
            f"keep_side={keep_side!r}, keep={keep!r}: give exactly one of keep_side (k or "
            "(kh, kw)) and keep (token count or fraction)"
        )
    if keep_side is not None:
        sides = tuple(keep_side) if isinstance(keep_side, (tuple, list)) else keep_side
        items = sides if isinstance(sides, tuple) else (sides,)
        if len(items) not in (1, 2) or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in items
        ):
            raise ValueError(f"keep_side={keep_side!r}: expected an int >= 1 or (kh, kw)")
        keep_side = (int(items[0]), int(items[-1])) if len(items) == 2 else int(items[0])
    else:
        core.check_budget(keep, "keep")
    if not isinstance(inverse, bool):
        raise ValueError(f"inverse={inverse!r}: expected True or False")
    return FourierVLM(keep_side, keep, inverse)
