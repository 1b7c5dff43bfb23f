"""Composable attention-mask specifications.

A mask spec is a predicate ``allow(batch, q, k)`` over *absolute* indices: ``q`` is the absolute
position of a query (``q_offset + row``), ``k`` the key index. Specs are jax pytrees (array fields
are children, integers are static), so they can be passed straight into jitted functions, and
they combine with ``&`` (both allow), ``|`` (either allows) and ``~`` (negation). A plain boolean
array combined with a spec is wrapped by :func:`from_array`.

Every spec provides

* ``spec.dense(batch, q_len, kv_len, q_offset=None) -> bool [B|1, 1|N, Tq, Tk]`` (True = attend);
  the head axis is ``N`` only for per-head specs (:func:`block_sparse` with a head axis, or a
  per-head :func:`from_array`), see ``spec.num_heads``;
* ``spec.block_map(batch, q_len, kv_len, block_q, block_k, q_offset=None) -> int8 [B|1, nq, nk]``
  (``[B|1, N, nq, nk]`` for per-head specs) with values ``EMPTY=0, PARTIAL=1, FULL=2``. The last
  tile in each direction may be ragged; positions outside ``[0, q_len) x [0, kv_len)`` count as
  neither allowed nor disallowed, so a tile is FULL when every in-range pair is allowed.

Indexing conventions. Arrays that describe the whole sequence (``token_types``, ``frame_ids``,
``prefix_lengths``, ``kv_lengths``, block-sparse query blocks) are read at absolute positions, so
in decode they must cover ``q_offset + q_len`` positions. Arrays that describe *this call's* query
rows (``q_segments``, ``q_lengths``, :func:`from_array`) are read at the local row ``0..q_len-1``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ANSWER",
    "EMPTY",
    "FULL",
    "IMAGE",
    "PAD",
    "PARTIAL",
    "TEXT",
    "MaskSpec",
    "as_mask",
    "block_sparse",
    "causal",
    "frame_block_causal",
    "from_array",
    "modality_mutual",
    "normalize_q_offset",
    "padding",
    "prefix_lm",
    "segment_ids",
    "sliding_window",
]

EMPTY, PARTIAL, FULL = 0, 1, 2
TEXT, IMAGE, ANSWER, PAD = 0, 1, 2, 3  # token types for :func:`modality_mutual`

# Above this many predicate evaluations at once, the generic block map walks query-block rows.
_BLOCK_MAP_CHUNK_ELEMS = 1 << 24
_BIG = 1 << 29


def _pytree(data: tuple[str, ...], meta: tuple[str, ...] = ()):
    def deco(cls):
        cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return deco


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_pos_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive Python int, got {value!r}")
    return int(value)


def normalize_q_offset(q_offset: Any, batch: int) -> tuple[jax.Array, int | None]:
    """Returns ``(offsets int32 [1] or [batch], static_max_offset_or_None)``.

    ``q_offset`` is ``None`` (0), a Python int, or an int array of shape ``[]``, ``[1]`` or ``[batch]``.
    """
    if q_offset is None:
        return jnp.zeros((1,), jnp.int32), 0
    if _is_int(q_offset):
        if q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {q_offset}")
        return jnp.full((1,), int(q_offset), jnp.int32), int(q_offset)
    if isinstance(q_offset, (float, bool)) or not hasattr(q_offset, "shape"):
        raise ValueError(
            f"q_offset must be None, an int or an int32 array of shape [] or [batch={batch}], "
            f"got {q_offset!r}"
        )
    arr = jnp.asarray(q_offset)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"q_offset must have an integer dtype, got {arr.dtype}")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.shape[0] not in (1, batch):
        raise ValueError(
            f"q_offset must have shape [] or [batch={batch}], got shape {tuple(jnp.shape(q_offset))}"
        )
    static = None
    if isinstance(q_offset, np.ndarray):
        if (q_offset < 0).any():
            raise ValueError(f"q_offset must be >= 0, got {q_offset}")
        static = int(q_offset.max())
    return arr.astype(jnp.int32), static


def _as_int_array(name: str, x: Any, ndim: tuple[int, ...]) -> jax.Array:
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if _is_int(x):
        x = np.asarray(x, np.int32)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an integer array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")
    if x.ndim not in ndim:
        raise ValueError(
            f"{name} must have rank {' or '.join(map(str, ndim))}, got shape {tuple(x.shape)}"
        )
    return jnp.asarray(x).astype(jnp.int32)


def _check_batch(name: str, arr: jax.Array, batch: int) -> None:
    if arr.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch size {arr.shape[0]}, expected 1 or batch={batch}")


def _take(arr: jax.Array, idx: jax.Array) -> jax.Array:
    """``arr[b, idx[b, t]]`` with batch broadcasting and clamped indices: [B, T] x [B|1, Tq]."""
    bx = max(arr.shape[0], idx.shape[0])
    arr = jnp.broadcast_to(arr, (bx, arr.shape[1]))
    idx = jnp.broadcast_to(jnp.clip(idx, 0, arr.shape[1] - 1), (bx, idx.shape[1]))
    return jnp.take_along_axis(arr, idx, axis=1)


class MaskSpec:
    """Base class: a predicate on ``(batch, absolute query index, key index)``."""

    # -- implemented by subclasses -----------------------------------------------------------
    def _eval(self, q_pos: jax.Array, q_row: jax.Array, k_pos: jax.Array) -> jax.Array:
        """bool, rank 4, broadcastable to ``[B, N, Tq, Tk]``.

        ``q_pos`` int32 ``[B|1, Tq]`` absolute query positions, ``q_row`` int32 ``[Tq]`` local rows,
        ``k_pos`` int32 ``[Tk]`` key indices. Indices may exceed the valid range (ragged tiles):
        implementations clamp gathers; the caller discards those positions.
        """
        raise TypeError(f"{type(self).__name__} does not define a predicate")

    def _interval(self, q_pos: jax.Array, q_row: jax.Array):
        """Inclusive per-row allowed key interval ``(lo, hi)`` int32 [B|1, Tq], or None."""
        return

    def _validate(self, batch: int, q_len: int, kv_len: int, max_offset: int | None) -> None:
        del batch, q_len, kv_len, max_offset

    def _arrays(self) -> list[tuple[str, jax.Array]]:
        return []

    @property
    def num_heads(self) -> int | None:
        """Head count of a per-head spec, None when the mask is shared by all heads."""
        return None

    def leaves(self) -> tuple[MaskSpec, ...]:
        """The specs combined by ``&`` at the top level (``(self,)`` for anything else)."""
        return (self,)

    # -- algebra -------------------------------------------------------------------------------
    def __and__(self, other: Any) -> MaskSpec:
        other = as_mask(other)
        if other is None:
            return self
        return And(self.leaves() + other.leaves())

    def __rand__(self, other: Any) -> MaskSpec:
        other = as_mask(other)
        if other is None:
            return self
        return And(other.leaves() + self.leaves())

    def __or__(self, other: Any) -> MaskSpec:
        other = as_mask(other)
        if other is None:
            return self
        a = self.specs if isinstance(self, Or) else (self,)
        b = other.specs if isinstance(other, Or) else (other,)
        return Or(a + b)

    def __ror__(self, other: Any) -> MaskSpec:
        other = as_mask(other)
        return self if other is None else other | self

    def __invert__(self) -> MaskSpec:
        return self.spec if isinstance(self, Not) else Not(self)

    # -- evaluation ----------------------------------------------------------------------------
    def validate(
        self, batch: int, q_len: int, kv_len: int, q_offset: Any = None
    ) -> tuple[jax.Array, int | None]:
        """Checks the spec against the shapes; returns the normalised ``q_offset``."""
        batch = _check_pos_int("batch", batch)
        q_len = _check_pos_int("q_len", q_len)
        kv_len = _check_pos_int("kv_len", kv_len)
        off, max_off = normalize_q_offset(q_offset, batch)
        self._validate(batch, q_len, kv_len, max_off)
        return off, max_off

    def dense(self, batch: int, q_len: int, kv_len: int, q_offset: Any = None) -> jax.Array:
        """bool ``[B|1, 1|N, q_len, kv_len]``; True where query row attends key."""
        off, _ = self.validate(batch, q_len, kv_len, q_offset)
        return _dense(self, off, q_len, kv_len)

    def block_map(
        self, batch: int, q_len: int, kv_len: int, block_q: int, block_k: int, q_offset: Any = None
    ) -> jax.Array:
        """int8 ``[B|1, nq, nk]`` (``[B|1, N, nq, nk]`` per-head): EMPTY / PARTIAL / FULL tiles."""
        block_q = _check_pos_int("block_q", block_q)
        block_k = _check_pos_int("block_k", block_k)
        off, _ = self.validate(batch, q_len, kv_len, q_offset)
        out = _block_map(self, off, q_len, kv_len, block_q, block_k, _BLOCK_MAP_CHUNK_ELEMS)
        return out if self.num_heads is not None else out[:, 0]

    def __repr__(self) -> str:
        fields = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            fields.append(
                f"{f.name}={'array' + str(tuple(v.shape)) if hasattr(v, 'shape') else repr(v)}"
            )
        return f"{type(self).__name__}({', '.join(fields)})"


@partial(jax.jit, static_argnums=(2, 3))
def _dense(spec: MaskSpec, off: jax.Array, q_len: int, kv_len: int) -> jax.Array:
    q_row = jnp.arange(q_len, dtype=jnp.int32)
    m = spec._eval(off[:, None] + q_row[None, :], q_row, jnp.arange(kv_len, dtype=jnp.int32))
    return jnp.broadcast_to(m, (m.shape[0], m.shape[1], q_len, kv_len))


@partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _block_map(spec, off, q_len, kv_len, block_q, block_k, chunk_elems) -> jax.Array:
    """int8 [B|1, N|1, nq, nk]."""
    q_row = jnp.arange(_cdiv(q_len, block_q) * block_q, dtype=jnp.int32)
    iv = spec._interval(off[:, None] + q_row[None, :], q_row)
    if iv is not None:
        return _block_map_intervals(iv, q_len, kv_len, block_q, block_k)[:, None]
    return _block_map_generic(spec, off, q_len, kv_len, block_q, block_k, chunk_elems)


def _block_map_intervals(iv, q_len, kv_len, block_q, block_k) -> jax.Array:
    """Exact tile classes from per-row allowed intervals: counts allowed pairs per tile."""
    lo, hi = iv
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    lo, hi = jnp.broadcast_arrays(lo, hi)  # [Bx, nq*bq]
    ka = jnp.arange(nk, dtype=jnp.int32) * block_k
    kb = jnp.minimum(ka + block_k, kv_len) - 1
    cnt = jnp.minimum(hi[..., None], kb) - jnp.maximum(lo[..., None], ka) + 1
    row_ok = (jnp.arange(nq * block_q) < q_len)[None, :, None]
    cnt = jnp.where(row_ok, jnp.maximum(cnt, 0), 0)
    cnt = cnt.reshape(cnt.shape[0], nq, block_q, nk).sum(axis=2)
    rows = jnp.minimum(jnp.arange(1, nq + 1) * block_q, q_len) - jnp.arange(nq) * block_q
    total = rows[:, None] * (kb - ka + 1)[None, :]
    cls = jnp.where(cnt == total, FULL, jnp.where(cnt > 0, PARTIAL, EMPTY))
    return cls.astype(jnp.int8)


def _block_map_generic(
    spec: MaskSpec, off, q_len, kv_len, block_q, block_k, chunk_elems
) -> jax.Array:
    """Exact tile classes by reducing the predicate over each tile, one query-block row at a time."""
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    k_pos = jnp.arange(nk * block_k, dtype=jnp.int32)
    k_ok = (k_pos < kv_len).reshape(nk, block_k)

    def one_row(rows):  # rows int32 [R, block_q] -> int8 [R, B, N, nk]
        r = rows.reshape(-1)
        m = spec._eval(off[:, None] + r[None, :], r, k_pos)
        m = jnp.broadcast_to(m, m.shape[:2] + (r.shape[0], k_pos.shape[0]))
        m = m.reshape(m.shape[0], m.shape[1], rows.shape[0], block_q, nk, block_k)
        ok = (r < q_len).reshape(rows.shape[0], block_q)[:, :, None, None] & k_ok[None, None]
        anyv = jnp.any(m & ok, axis=(3, 5))
        allv = jnp.all(m | ~ok, axis=(3, 5))
        cls = jnp.where(allv, FULL, jnp.where(anyv, PARTIAL, EMPTY)).astype(jnp.int8)
        return jnp.moveaxis(cls, 2, 0)  # [R, B, N, nk]

    rows = jnp.arange(nq * block_q, dtype=jnp.int32).reshape(nq, block_q)
    probe = jax.eval_shape(lambda r: spec._eval(off[:, None] + r[None, :], r, k_pos), rows[0])
    per_row = probe.shape[0] * probe.shape[1] * block_q * nk * block_k
    chunk = max(1, min(nq, chunk_elems // max(per_row, 1)))
    if chunk >= nq:
        out = one_row(rows)
    else:
        pad = _cdiv(nq, chunk) * chunk - nq
        rows_p = (
            jnp.concatenate([rows, jnp.full((pad, block_q), q_len, jnp.int32)]) if pad else rows
        )
        out = jax.lax.map(one_row, rows_p.reshape(-1, chunk, block_q))
        out = out.reshape((-1,) + out.shape[2:])[:nq]
    return jnp.moveaxis(out, 0, 2)  # [B, N, nq, nk]


# ------------------------------------------------------------------------------------------------
# Leaves
# ------------------------------------------------------------------------------------------------


@_pytree(data=())
class Causal(MaskSpec):
    """``k <= q``."""

    def _eval(self, q_pos, q_row, k_pos):
        return k_pos[None, None, None, :] <= q_pos[:, None, :, None]

    def _interval(self, q_pos, q_row):
        return jnp.full_like(q_pos, -_BIG), q_pos


@_pytree(data=(), meta=("left", "right"))
class SlidingWindow(MaskSpec):
    """``q - left <= k <= q + right``."""

    left: int
    right: int

    def _eval(self, q_pos, q_row, k_pos):
        d = k_pos[None, None, None, :] - q_pos[:, None, :, None]
        return (d >= -self.left) & (d <= self.right)

    def _interval(self, q_pos, q_row):
        return q_pos - self.left, q_pos + self.right


@_pytree(data=("q_segments", "kv_segments"))
class SegmentIds(MaskSpec):
    """``q_segments[b, row] == kv_segments[b, k]`` (sequence packing)."""

    q_segments: jax.Array
    kv_segments: jax.Array

    def _arrays(self):
        return [("q_segments", self.q_segments), ("kv_segments", self.kv_segments)]

    def _validate(self, batch, q_len, kv_len, max_offset):
        for name, arr in self._arrays():
            _check_batch(name, arr, batch)
        if self.q_segments.shape[1] != q_len:
            raise ValueError(
                f"q_segments has length {self.q_segments.shape[1]}, expected q_len={q_len}"
            )
        if self.kv_segments.shape[1] != kv_len:
            raise ValueError(
                f"kv_segments has length {self.kv_segments.shape[1]}, expected kv_len={kv_len}"
            )

    def _eval(self, q_pos, q_row, k_pos):
        qs = _take(self.q_segments, q_row[None])
        ks = _take(self.kv_segments, k_pos[None])
        return qs[:, None, :, None] == ks[:, None, None, :]


@_pytree(data=("kv_lengths", "q_lengths"))
class Padding(MaskSpec):
    """``k < kv_lengths[b]`` and (if given) ``row < q_lengths[b]`` (local query rows)."""

    kv_lengths: jax.Array
    q_lengths: jax.Array | None

    def _arrays(self):
        out = [("kv_lengths", self.kv_lengths)]
        return out + ([("q_lengths", self.q_lengths)] if self.q_lengths is not None else [])

    def _validate(self, batch, q_len, kv_len, max_offset):
        for name, arr in self._arrays():
            _check_batch(name, arr, batch)

    def _eval(self, q_pos, q_row, k_pos):
        m = (k_pos[None, :] < self.kv_lengths[:, None])[:, None, None, :]
        if self.q_lengths is not None:
            m = m & (q_row[None, :] < self.q_lengths[:, None])[:, None, :, None]
        return m

    def _interval(self, q_pos, q_row):
        hi = jnp.broadcast_to(
            self.kv_lengths[:, None] - 1, (self.kv_lengths.shape[0], q_row.shape[0])
        )
        lo = jnp.full_like(hi, -_BIG)
        if self.q_lengths is not None:
            bad = q_row[None, :] >= self.q_lengths[:, None]
            lo, hi = jnp.broadcast_arrays(lo, hi)
            lo, hi = jnp.where(bad, _BIG, lo), jnp.where(bad, -_BIG, hi)
        return lo, hi


@_pytree(data=("prefix_lengths",))
class PrefixLM(MaskSpec):
    """``k <= q or k < prefix_lengths[b]``: bidirectional inside the prefix, causal after it."""

    prefix_lengths: jax.Array

    def _arrays(self):
        return [("prefix_lengths", self.prefix_lengths)]

    def _validate(self, batch, q_len, kv_len, max_offset):
        _check_batch("prefix_lengths", self.prefix_lengths, batch)

    def _eval(self, q_pos, q_row, k_pos):
        k = k_pos[None, None, None, :]
        return (k <= q_pos[:, None, :, None]) | (k < self.prefix_lengths[:, None, None, None])

    def _interval(self, q_pos, q_row):
        hi = jnp.maximum(q_pos, self.prefix_lengths[:, None] - 1)
        return jnp.full_like(hi, -_BIG), hi


def _check_seq_array(name, arr, batch, q_len, kv_len, max_offset):
    _check_batch(name, arr, batch)
    need = max(kv_len, q_len + (max_offset or 0))
    if arr.shape[1] < need:
        raise ValueError(
            f"{name} has length {arr.shape[1]}, expected at least {need} "
            f"(kv_len={kv_len}, q_offset + q_len={q_len + (max_offset or 0)})"
        )


@_pytree(data=("token_types",))
class ModalityMutual(MaskSpec):
    """Causal, plus IMAGE queries attending to later TEXT keys with no ANSWER token between them."""

    token_types: jax.Array

    def _arrays(self):
        return [("token_types", self.token_types)]

    def _validate(self, batch, q_len, kv_len, max_offset):
        _check_seq_array("token_types", self.token_types, batch, q_len, kv_len, max_offset)

    def _eval(self, q_pos, q_row, k_pos):
        t = self.token_types
        turn = jnp.cumsum(t == ANSWER, axis=1, dtype=jnp.int32)  # answers seen so far
        tq, cq = _take(t, q_pos), _take(turn, q_pos)
        tk, ck = _take(t, k_pos[None]), _take(turn, k_pos[None])
        later = (
            (tq == IMAGE)[:, :, None]
            & (tk == TEXT)[:, None, :]
            & (cq[:, :, None] == ck[:, None, :])
        )
        causal_ = k_pos[None, None, :] <= q_pos[:, :, None]
        return (causal_ | later)[:, None]


@_pytree(data=("frame_ids",))
class FrameBlockCausal(MaskSpec):
    """``k <= q``, or q and k in the same frame (``frame_ids >= 0``); negative ids: causal only."""

    frame_ids: jax.Array

    def _arrays(self):
        return [("frame_ids", self.frame_ids)]

    def _validate(self, batch, q_len, kv_len, max_offset):
        _check_seq_array("frame_ids", self.frame_ids, batch, q_len, kv_len, max_offset)

    def _eval(self, q_pos, q_row, k_pos):
        fq = _take(self.frame_ids, q_pos)
        fk = _take(self.frame_ids, k_pos[None])
        same = (fq[:, :, None] == fk[:, None, :]) & (fq >= 0)[:, :, None]
        return ((k_pos[None, None, :] <= q_pos[:, :, None]) | same)[:, None]


@_pytree(data=("block_indices", "num_blocks"), meta=("block_q", "block_k"))
class BlockSparse(MaskSpec):
    """Key block ``k // block_k`` listed in ``block_indices[b, h, q // block_q, :num_blocks]``."""

    block_indices: jax.Array  # int32 [B|1, H, nqb, max_k] (H == 1: shared by all heads)
    num_blocks: jax.Array  # int32 [B|1, H, nqb]
    block_q: int
    block_k: int

    def _arrays(self):
        return [("block_indices", self.block_indices), ("num_blocks", self.num_blocks)]

    @property
    def num_heads(self):
        h = max(self.block_indices.shape[1], self.num_blocks.shape[1])
        return h if h > 1 else None

    def _validate(self, batch, q_len, kv_len, max_offset):
        _check_batch("block_indices", self.block_indices, batch)
        _check_batch("num_blocks", self.num_blocks, batch)
        nqb = self.block_indices.shape[2]
        need = _cdiv(q_len + (max_offset or 0), self.block_q)
        if nqb < need:
            raise ValueError(
                f"block_indices covers {nqb} query blocks of {self.block_q}, expected at least "
                f"{need} for q_offset + q_len = {q_len + (max_offset or 0)}"
            )

    def _eval(self, q_pos, q_row, k_pos):
        idx, num = self.block_indices, self.num_blocks
        nqb, mk = idx.shape[2], idx.shape[3]
        nkb = _cdiv(k_pos.shape[0], self.block_k)
        valid = jnp.arange(mk)[None, None, None, :] < num[..., None]  # [B,H,nqb,mk]
        hit = (idx[..., None] == jnp.arange(nkb)) & valid[..., None]  # [B,H,nqb,mk,nkb]
        table = jnp.any(hit, axis=3)  # [B,H,nqb,nkb]
        qb = q_pos // self.block_q
        bx = max(table.shape[0], qb.shape[0])
        table = jnp.broadcast_to(table, (bx,) + table.shape[1:])
        qb = jnp.broadcast_to(qb, (bx, qb.shape[1]))
        rows = jnp.take_along_axis(table, jnp.clip(qb, 0, nqb - 1)[:, None, :, None], axis=2)
        m = rows[..., k_pos // self.block_k]  # [B,H,Tq,Tk]
        return m & (qb < nqb)[:, None, :, None]


@_pytree(data=("mask",))
class ArrayMask(MaskSpec):
    """An explicit boolean mask ``[B|1, N|1, Tq|1, Tk|1]`` over local query rows and key indices."""

    mask: jax.Array

    def _arrays(self):
        return [("mask", self.mask)]

    @property
    def num_heads(self):
        h = self.mask.shape[1]
        return h if h > 1 else None

    def _validate(self, batch, q_len, kv_len, max_offset):
        b, _, tq, tk = self.mask.shape
        if b not in (1, batch) or tq not in (1, q_len) or tk not in (1, kv_len):
            raise ValueError(
                f"mask of shape {tuple(self.mask.shape)} does not broadcast to "
                f"[batch={batch}, heads, q_len={q_len}, kv_len={kv_len}]"
            )

    def _eval(self, q_pos, q_row, k_pos):
        m = self.mask
        if m.shape[2] > 1:
            m = m[:, :, jnp.clip(q_row, 0, m.shape[2] - 1), :]
        if m.shape[3] > 1:
            m = m[:, :, :, jnp.clip(k_pos, 0, m.shape[3] - 1)]
        return m


# ------------------------------------------------------------------------------------------------
# Combinators
# ------------------------------------------------------------------------------------------------


def _combined_heads(specs) -> int | None:
    heads = {s.num_heads for s in specs} - {None}
    if len(heads) > 1:
        raise ValueError(f"combined mask specs have different head counts {sorted(heads)}")
    return heads.pop() if heads else None


@_pytree(data=("specs",))
class And(MaskSpec):
    """All of ``specs`` allow."""

    specs: tuple[MaskSpec, ...]

    def leaves(self):
        return self.specs

    @property
    def num_heads(self):
        return _combined_heads(self.specs)

    def _validate(self, batch, q_len, kv_len, max_offset):
        _combined_heads(self.specs)  # raises on inconsistent head counts
        for s in self.specs:
            s._validate(batch, q_len, kv_len, max_offset)

    def _eval(self, q_pos, q_row, k_pos):
        out = self.specs[0]._eval(q_pos, q_row, k_pos)
        for s in self.specs[1:]:
            out = out & s._eval(q_pos, q_row, k_pos)
        return out

    def _interval(self, q_pos, q_row):
        ivs = [s._interval(q_pos, q_row) for s in self.specs]
        if any(iv is None for iv in ivs):
            return None
        lo = ivs[0][0]
        hi = ivs[0][1]
        for a, b in ivs[1:]:
            lo, hi = jnp.maximum(lo, a), jnp.minimum(hi, b)
        return lo, hi

    def __repr__(self):
        return "(" + " & ".join(map(repr, self.specs)) + ")"


@_pytree(data=("specs",))
class Or(MaskSpec):
    """Any of ``specs`` allows."""

    specs: tuple[MaskSpec, ...]

    @property
    def num_heads(self):
        return _combined_heads(self.specs)

    def _validate(self, batch, q_len, kv_len, max_offset):
        _combined_heads(self.specs)  # raises on inconsistent head counts
        for s in self.specs:
            s._validate(batch, q_len, kv_len, max_offset)

    def _eval(self, q_pos, q_row, k_pos):
        out = self.specs[0]._eval(q_pos, q_row, k_pos)
        for s in self.specs[1:]:
            out = out | s._eval(q_pos, q_row, k_pos)
        return out

    def __repr__(self):
        return "(" + " | ".join(map(repr, self.specs)) + ")"


@_pytree(data=("spec",))
class Not(MaskSpec):
    """``spec`` disallows."""

    spec: MaskSpec

    @property
    def num_heads(self):
        return self.spec.num_heads

    def _validate(self, batch, q_len, kv_len, max_offset):
        self.spec._validate(batch, q_len, kv_len, max_offset)

    def _eval(self, q_pos, q_row, k_pos):
        return ~self.spec._eval(q_pos, q_row, k_pos)

    def __repr__(self):
        return f"~{self.spec!r}"


# ------------------------------------------------------------------------------------------------
# Public constructors
# ------------------------------------------------------------------------------------------------


def causal() -> MaskSpec:
    """Each query attends to keys at absolute index ``<=`` its own."""
    return Causal()


def sliding_window(left: int, right: int = 0) -> MaskSpec:
    """Keys in ``[q - left, q + right]`` (``right=0``: causal local attention of width left+1)."""
    if not _is_int(left) or left < 0:
        raise ValueError(f"sliding_window left must be an int >= 0, got {left!r}")
    if not _is_int(right) or right < 0:
        raise ValueError(f"sliding_window right must be an int >= 0, got {right!r}")
    return SlidingWindow(int(left), int(right))


def segment_ids(q_segments: Any, kv_segments: Any = None) -> MaskSpec:
    """Packed sequences: query row attends key when their segment ids are equal.

    ``q_segments`` int ``[B, Tq]`` (this call's query rows), ``kv_segments`` int ``[B, Tk]``
    (defaults to ``q_segments``). Combine with :func:`causal` for packed causal LM.
    """
    q = _as_int_array("q_segments", q_segments, (2,))
    kv = q if kv_segments is None else _as_int_array("kv_segments", kv_segments, (2,))
    if kv.shape[0] != q.shape[0] and 1 not in (kv.shape[0], q.shape[0]):
        raise ValueError(
            f"q_segments batch {q.shape[0]} and kv_segments batch {kv.shape[0]} differ"
        )
    return SegmentIds(q, kv)


def padding(kv_lengths: Any, q_lengths: Any = None) -> MaskSpec:
    """Right padding: keys ``k < kv_lengths[b]``; with ``q_lengths``, only rows ``< q_lengths[b]``.

    ``kv_lengths`` int ``[B]`` (or scalar) counts absolute key positions; ``q_lengths`` counts this
    call's query rows. Padded query rows are fully masked (zero output).
    """
    kv = _as_int_array("kv_lengths", kv_lengths, (0, 1)).reshape(-1)
    q = None if q_lengths is None else _as_int_array("q_lengths", q_lengths, (0, 1)).reshape(-1)
    return Padding(kv, q)


def prefix_lm(prefix_lengths: Any) -> MaskSpec:
    """Bidirectional attention among the first ``prefix_lengths[b]`` positions, causal after."""
    return PrefixLM(_as_int_array("prefix_lengths", prefix_lengths, (0, 1)).reshape(-1))


def modality_mutual(token_types: Any) -> MaskSpec:
    """Modality-mutual attention (AKI, "Seeing is Understanding", Sony).

    ``allow(i, j) = j <= i  or  (type[i] == IMAGE and type[j] == TEXT and no ANSWER in (i, j])``.
    Image tokens also see the prompt text that follows them; nothing attends to a later ANSWER
    token. The "no ANSWER in between" clause equals the paper's rule for one prompt/answer turn
    and, in multi-turn data, stops an image from reading a later turn's prompt, whose tokens have
    already seen an earlier answer that lies after the image -- so no position depends on any
    later answer even through several layers. ``token_types`` int ``[B, T]`` with values TEXT=0,
    IMAGE=1, ANSWER=2, PAD=3, read at absolute positions.
    """
    return ModalityMutual(_as_int_array("token_types", token_types, (2,)))


def frame_block_causal(frame_ids: Any) -> MaskSpec:
    """Video frames (TC-LLaVA): bidirectional within a frame, causal across frames.

    ``frame_ids`` int ``[B, T]`` at absolute positions; tokens sharing an id ``>= 0`` see each
    other, negative ids (text) are plain causal. Give each frame one contiguous run of an id.
    """
    return FrameBlockCausal(_as_int_array("frame_ids", frame_ids, (2,)))


def block_sparse(
    block_q: int, block_k: int, block_indices: Any, num_blocks: Any = None
) -> MaskSpec:
    """Explicit block sparsity: per query block, the list of key blocks it attends.

    ``block_indices`` int32 ``[B|1, nq, max_k]`` (all heads) or ``[B|1, N, nq, max_k]`` (per head:
    then ``dense`` is ``[B|1, N, Tq, Tk]`` and ``block_map`` ``[B|1, N, nq, nk]``); query block
    ``i`` covers absolute positions ``[i*block_q, (i+1)*block_q)``. ``num_blocks`` ``[..., nq]``
    counts the valid leading entries (default: all); entries past it and indices outside
    ``[0, cdiv(kv_len, block_k))`` select nothing. Combine with :func:`causal` for causal models.
    """
    block_q = _check_pos_int("block_q", block_q)
    block_k = _check_pos_int("block_k", block_k)
    idx = _as_int_array("block_indices", block_indices, (3, 4))
    if idx.ndim == 3:
        idx = idx[:, None]
    if num_blocks is None:
        num = jnp.full(idx.shape[:3], idx.shape[3], jnp.int32)
    else:
        num = _as_int_array("num_blocks", num_blocks, (2, 3))
        if num.ndim == 2:
            num = num[:, None]
        ok_b = num.shape[0] == idx.shape[0] or 1 in (num.shape[0], idx.shape[0])
        ok_h = num.shape[1] in (1, idx.shape[1]) and num.shape[2] == idx.shape[2]
        if not (ok_b and ok_h):
            raise ValueError(
                f"num_blocks shape {tuple(jnp.shape(num_blocks))} does not match block_indices "
                f"shape {tuple(jnp.shape(block_indices))} (expected block_indices.shape[:-1])"
            )
    return BlockSparse(idx, num, block_q, block_k)


def from_array(mask: Any) -> MaskSpec:
    """Wraps a boolean array broadcastable to ``[B, N, Tq, Tk]`` (local rows) as a spec."""
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise ValueError(f"mask must be a MaskSpec or a boolean array, got {type(mask).__name__}")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask array must have dtype bool, got {mask.dtype}")
    if not 2 <= mask.ndim <= 4:
        raise ValueError(
            f"mask array must have rank 2..4 (broadcastable to [B, N, Tq, Tk]), got shape {tuple(mask.shape)}"
        )
    m = jnp.asarray(mask)
    return ArrayMask(m.reshape((1,) * (4 - m.ndim) + m.shape))


def as_mask(mask: Any) -> MaskSpec | None:
    """None, a MaskSpec, or a boolean array -> MaskSpec or None."""
    if mask is None or isinstance(mask, MaskSpec):
        return mask
    return from_array(mask)
