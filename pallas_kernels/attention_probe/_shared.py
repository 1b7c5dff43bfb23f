"""Validation and packing shared by the GPU and TPU attention-probe kernels.

Layout inside the kernels: the ``Gp`` query heads of one kv head and the ``Qp`` query rows are
flattened into ``R = Gp * Qp`` kernel rows (row ``g * Qp + i`` is head ``kv * G + g``, query
``i``), so K is read once per kv head per pass. Padded heads / rows get ``hi = -1`` (see below)
and therefore zero weights.

Per kernel row the mask needs one integer ``hi``: the last key index the row may see (``q_index``
when causal, else ``T - 1``; clipped to the last valid key; ``-1`` for an invalid or padded row).
Per key the optional ``kv_valid`` flag and the column features are packed into one int32 array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import cdiv, check_features

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Layout(NamedTuple):
    """Static shapes of one probe call."""

    b: int  # batch
    nrows: int  # query rows Q
    nq: int  # query heads
    nkv: int  # kv heads
    h: int  # head dim
    t: int  # keys
    g: int  # query heads per kv head
    gp: int  # g padded (power of two on GPU)
    qp: int  # query rows padded
    fr: int  # row features
    fc: int  # column features (mask_fn)
    kv_col: bool  # column 0 of the packed columns is kv_valid
    bc: int  # batch of the packed columns (1 or b), 0 when there are none
    scale: float
    softcap: float | None

    @property
    def rows(self) -> int:
        return self.gp * self.qp


class Packed(NamedTuple):
    q: jax.Array  # [B, Nkv, R, H] in the input dtype
    rows: jax.Array  # int32 [B, 1 + Fr, R]: hi, then the row features
    cols: jax.Array | None  # int32 [Bc, kv_col + Fc, T]
    lim: jax.Array  # int32 [B]: keys >= lim[b] are never visible (max hi + 1)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def check_block(name: str, value: Any, multiple: int, pow2: bool) -> int:
    ok = isinstance(value, int) and value >= multiple and value % multiple == 0
    if ok and pow2:
        ok = value & (value - 1) == 0
    if not ok:
        kind = "a power of two" if pow2 else "a positive multiple"
        raise ValueError(
            f"{name}={value!r}: expected {kind} >= {multiple} (multiple of {multiple})"
        )
    return value


def _bool(name: str, x: Any, shape: tuple[int, ...]) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} shape={tuple(x.shape)}: expected {list(shape)}")
    return x.astype(bool)


def prepare(
    q: jax.Array,
    k: jax.Array,
    *,
    q_index: Any,
    q_valid: Any,
    kv_valid: Any,
    mask_fn: Callable | None,
    row_features: Any,
    col_features: Any,
    causal: bool,
    scale: float | None,
    softcap: float | None,
    pow2: bool,
    row_multiple: int,
    min_rows: int,
) -> tuple[Layout, Packed]:
    """Validates the arguments of ``attention_probe`` and packs them for a kernel.

    ``pow2``: pad heads-per-group and query rows to powers of two (Triton); ``row_multiple``:
    ``Qp`` is a multiple of it; ``min_rows``: at least this many kernel rows ``R``."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q shape={tuple(q.shape)}, k shape={tuple(k.shape)}: expected [B, Q, Nq, H] and "
            "[B, T, Nkv, H] with equal B and H"
        )
    if q.dtype != k.dtype or q.dtype not in _DTYPES:
        raise ValueError(
            f"q dtype={q.dtype}, k dtype={k.dtype}: expected one dtype among float32, bfloat16, "
            "float16"
        )
    b, nrows, nq, h = q.shape
    t, nkv = k.shape[1], k.shape[2]
    if nrows < 1 or t < 1:
        raise ValueError(f"q rows={nrows}, keys={t}: expected at least one of each")
    if nq % nkv:
        raise ValueError(f"q heads={nq} must be a multiple of k heads={nkv}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r}: expected a positive float or None")
    if mask_fn is None and (row_features is not None or col_features is not None):
        raise ValueError("row_features / col_features given without mask_fn: expected a mask_fn")
    q_index = jnp.asarray(q_index)
    if q_index.shape != (b, nrows) or not jnp.issubdtype(q_index.dtype, jnp.integer):
        raise ValueError(
            f"q_index shape={tuple(q_index.shape)} dtype={q_index.dtype}: expected int "
            f"[{b}, {nrows}]"
        )
    q_index = q_index.astype(jnp.int32)
    q_valid = (
        jnp.ones((b, nrows), bool) if q_valid is None else _bool("q_valid", q_valid, (b, nrows))
    )
    rf = check_features("row_features", row_features, b, nrows)
    cf = check_features("col_features", col_features, b, t)

    g = nq // nkv
    gp = next_pow2(g) if pow2 else g
    qp = next_pow2(nrows) if pow2 else nrows
    qp = cdiv(qp, row_multiple) * row_multiple
    while gp * qp < min_rows:
        qp *= 2
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)

    # Per-row bound hi; clipped to the last valid key so that lim skips trailing padding.
    hi = q_index if causal else jnp.full((b, nrows), t - 1, jnp.int32)
    last = jnp.int32(t - 1)
    if kv_valid is not None:
        kv_valid = _bool("kv_valid", kv_valid, (b, t))
        pos = jnp.arange(t, dtype=jnp.int32)
        last = jnp.max(jnp.where(kv_valid, pos[None], -1), axis=1, keepdims=True)
    hi = jnp.where(q_valid, jnp.clip(hi, -1, last), -1)
    lim = (jnp.max(hi, axis=1) + 1).astype(jnp.int32)

    hi = jnp.pad(hi, ((0, 0), (0, qp - nrows)), constant_values=-1)  # [B, Qp]
    head_ok = (jnp.arange(gp) < g)[None, :, None]
    hi = jnp.where(head_ok, hi[:, None, :], -1).reshape(b, 1, gp * qp)
    rf = jnp.pad(rf, ((0, 0), (0, 0), (0, qp - nrows)))
    rf = jnp.broadcast_to(jnp.tile(rf, (1, 1, gp)), (b, rf.shape[1], gp * qp))
    rows = jnp.concatenate([hi, rf], axis=1)

    parts = [] if kv_valid is None else [kv_valid.astype(jnp.int32)[:, None, :]]
    if cf.shape[1]:
        parts.append(jnp.broadcast_to(cf, (b, *cf.shape[1:])) if parts else cf)
    cols = jnp.concatenate(parts, axis=1) if parts else None

    qr = jnp.pad(q, ((0, 0), (0, qp - nrows), (0, 0), (0, 0))).reshape(b, qp, nkv, g, h)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
    qr = qr.transpose(0, 2, 3, 1, 4).reshape(b, nkv, gp * qp, h)

    lay = Layout(
        b=b, nrows=nrows, nq=nq, nkv=nkv, h=h, t=t, g=g, gp=gp, qp=qp, fr=rf.shape[1],
        fc=cf.shape[1], kv_col=kv_valid is not None, bc=0 if cols is None else cols.shape[0],
        scale=scale, softcap=None if softcap is None else float(softcap),
    )  # fmt: skip
    return lay, Packed(qr, rows, cols, lim)


def logits(q: jax.Array, k: jax.Array, lay: Layout) -> jax.Array:
    """``scale * q k^T`` in float32 (then softcap): ``[R, H] x [bk, H] -> [R, bk]``."""
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
    )
    s = s * lay.scale
    if lay.softcap is not None:
        s = lay.softcap * jnp.tanh(s / lay.softcap)
    return s


def allowed(hi, row_feats, cols, col_vals, lay: Layout, mask_fn) -> jax.Array:
    """Visibility ``[R, bk]`` from ``hi [R, 1]``, key indices ``cols [1, bk]`` and the packed
    column values (a tuple of ``[1, bk]``: kv_valid first when present, then the features)."""
    ok = cols <= hi
    if lay.kv_col:
        ok = ok & (col_vals[0] != 0)
    if mask_fn is not None:
        ok = ok & mask_fn(tuple(row_feats), tuple(col_vals[int(lay.kv_col) :]))
    return ok


def combine_splits(m: jax.Array, l: jax.Array) -> jax.Array:
    """Per-split running max / sum-exp ``[..., S, R]`` -> log-sum-exp ``[..., R]`` (-inf where
    no key is visible)."""
    mx = jnp.max(m, axis=-2)
    safe = jnp.where(jnp.isneginf(mx), 0.0, mx)
    total = jnp.sum(l * jnp.exp(m - safe[..., None, :]), axis=-2)
    return jnp.where(total > 0, safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def finish(lay: Layout, w: jax.Array, cs: jax.Array, per_head: bool):
    """Kernel outputs -> ``(weights, colsum)`` in the reference shapes.

    per head: ``w [B, Nkv*Gp, Qp, T]``, ``cs [B, Nkv*Gp, T]``; mean: ``w [B, Qp, T]``,
    ``cs [B, T]``."""
    b, t = lay.b, lay.t
    if not per_head:
        return w[:, : lay.nrows], cs
    if lay.gp != lay.g:
        w = w.reshape(b, lay.nkv, lay.gp, lay.qp, t)[:, :, : lay.g]
        cs = cs.reshape(b, lay.nkv, lay.gp, t)[:, :, : lay.g]
    return w.reshape(b, lay.nq, lay.qp, t)[:, :, : lay.nrows], cs.reshape(b, lay.nq, t)
