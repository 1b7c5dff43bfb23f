"""What every attention kernel in this package shares: the block plan and the in-kernel mask.

**Block plan.** A mask is described at tile granularity by a block map ``int8 [B|1, N|1, nq, nk]``
with ``EMPTY=0`` (skip the tile), ``PARTIAL=1`` (evaluate the mask inside the tile) and ``FULL=2``
(every in-range pair attends: no mask work). :func:`make_block_plan` turns it into per-query-block
lists of the key blocks to visit (ascending, non-empty first) and the transposed lists (per key
block, the query blocks that see it) used by the dK/dV backward pass. An arbitrary block-sparse
layout (MInference / SeerAttention style) is just a block map.

**In-kernel mask.** Inside PARTIAL tiles the kernel evaluates ``mask_fn(rows, cols) -> bool
[bq, bk]`` where ``rows`` is a tuple of int32 ``[bq, 1]`` per-query-row features and ``cols`` a
tuple of int32 ``[1, bk]`` per-key features, loaded from ``row_features int32 [B|1, Fr, Tq]`` and
``col_features int32 [B|1, Fc, Tk]``. Any mask that is a pointwise function of per-row and
per-column integers fits (causal, windows, segment ids, padding, prefix-LM, modality-mutual,
frame-block causal, ...); the caller gathers whatever the predicate needs (absolute positions,
segment ids, token types) into the feature arrays once, outside the kernel. ``mask_fn`` must be
hashable (it is a static argument) and use only elementwise jnp ops. The block map and the
predicate must agree: a FULL tile is one where ``mask_fn`` holds for every in-range pair (kernels
may still evaluate it there, e.g. on the ragged last key block), an EMPTY tile one where it holds
for none. ``mask_fn=None`` means the
block map alone is the mask (PARTIAL tiles are then treated as FULL except for the sequence-end
bound, which kernels always apply).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2

MaskFn = Callable[[tuple, tuple], jax.Array]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPlan(NamedTuple):
    """Visiting order for a block map ``[Bm, Nm, nq, nk]`` (``Bm``, ``Nm`` are 1 or full size).

    * ``kv_index int32 [Bm, Nm, nq, nk]``: per query block, its PARTIAL key blocks first, then
      its FULL ones, each group in ascending order; the tail repeats the last visited index (so
      prefetching it is harmless).
    * ``kv_count int32 [Bm, Nm, nq]``: how many leading entries are real.
    * ``kv_partial int32 [Bm, Nm, nq]``: how many leading entries are PARTIAL (so a kernel can
      run one masked loop and one unmasked loop without a per-tile branch).
    * ``kv_full int32 [Bm, Nm, nq, nk]``: 1 where the visited tile is FULL (no mask evaluation).
    * ``q_index``, ``q_count``, ``q_partial``, ``q_full``: the transpose (per key block, the
      query blocks that see it), used by the dK/dV pass.
    """

    kv_index: jax.Array
    kv_count: jax.Array
    kv_full: jax.Array
    q_index: jax.Array
    q_count: jax.Array
    q_full: jax.Array
    kv_partial: jax.Array
    q_partial: jax.Array

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.kv_index.shape)  # type: ignore[return-value]

    def density(self) -> jax.Array:
        """Fraction of tiles visited."""
        bm, nm, nq, nk = self.kv_index.shape
        return jnp.sum(self.kv_count) / (bm * nm * nq * nk)


def _lists(bm: jax.Array):
    """Compacts the last axis of a block map: (index, count, full, partial) as in BlockPlan.

    Written with cumulative sums and one scatter rather than a sort: inside ``jit`` a block map
    built from static shapes is a constant, and XLA's constant folding of a sort over it can take
    minutes at long sequence lengths.
    """
    n = bm.shape[-1]
    lead = bm.shape[:-1]
    flat = bm.reshape(-1, n)
    is_p, is_f = flat == PARTIAL, flat == FULL
    npart = jnp.sum(is_p, axis=-1, dtype=jnp.int32)
    count = npart + jnp.sum(is_f, axis=-1, dtype=jnp.int32)
    slot_p = jnp.cumsum(is_p, axis=-1, dtype=jnp.int32) - 1
    slot_f = npart[:, None] + jnp.cumsum(is_f, axis=-1, dtype=jnp.int32) - 1
    slot = jnp.where(is_p, slot_p, jnp.where(is_f, slot_f, n))  # EMPTY tiles go to a spare slot
    rows = jnp.arange(flat.shape[0], dtype=jnp.int32)[:, None]
    cols = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), flat.shape)
    index = jnp.zeros((flat.shape[0], n + 1), jnp.int32).at[rows, slot].set(cols)[:, :n]
    pos = jnp.arange(n, dtype=jnp.int32)
    last = jnp.take_along_axis(index, jnp.maximum(count - 1, 0)[:, None], axis=-1)
    index = jnp.where(pos < count[:, None], index, last)
    full = (jnp.take_along_axis(flat, index, axis=-1) == FULL).astype(jnp.int32)
    shape = lead + (n,)
    return index.reshape(shape), count.reshape(lead), full.reshape(shape), npart.reshape(lead)


def make_block_plan(block_map: jax.Array) -> BlockPlan:
    """The :class:`BlockPlan` of an int8 block map of rank 4 (``[Bm, Nm, nq, nk]``)."""
    if block_map.ndim != 4:
        raise ValueError(
            f"block_map must have rank 4 [B|1, N|1, nq, nk], got shape {tuple(block_map.shape)}"
        )
    block_map = block_map.astype(jnp.int32)
    kv_index, kv_count, kv_full, kv_partial = _lists(block_map)
    q_index, q_count, q_full, q_partial = _lists(jnp.swapaxes(block_map, -1, -2))
    return BlockPlan(kv_index, kv_count, kv_full, q_index, q_count, q_full, kv_partial, q_partial)


def resample_block_map(bm: jax.Array, src: tuple[int, int], dst: tuple[int, int]) -> jax.Array:
    """A block map of ``src`` tiles re-expressed for ``dst`` tiles (powers of two).

    Finer tiles inherit their parent's class (conservative: a PARTIAL parent's children are all
    PARTIAL); coarser tiles are FULL / EMPTY only when all their children are, else PARTIAL.
    The result has ``ceil`` rows / columns for the covered length (padding tiles are EMPTY).
    """
    out = bm.astype(jnp.int32)
    for axis, s, d in ((2, src[0], dst[0]), (3, src[1], dst[1])):
        if d < s:
            out = jnp.repeat(out, s // d, axis=axis)
        elif d > s:
            r = d // s
            n = out.shape[axis]
            pad = cdiv(n, r) * r - n
            if pad:
                widths = [(0, 0)] * 4
                widths[axis] = (0, pad)
                out = jnp.pad(out, widths, constant_values=-1)  # -1: outside, "don't care"
            shp = out.shape[:axis] + (cdiv(n, r), r) + out.shape[axis + 1 :]
            g = out.reshape(shp)
            real = g >= 0
            allf = jnp.all((g == FULL) | ~real, axis=axis + 1)
            alle = jnp.all((g == EMPTY) | ~real, axis=axis + 1)
            out = jnp.where(allf, FULL, jnp.where(alle, EMPTY, PARTIAL))
    return out.astype(jnp.int8)


def dense_block_map(q_len: int, kv_len: int, block_q: int, block_k: int) -> jax.Array:
    """All tiles FULL: ``int8 [1, 1, nq, nk]``."""
    return jnp.full((1, 1, cdiv(q_len, block_q), cdiv(kv_len, block_k)), FULL, jnp.int8)


def check_features(name: str, x: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Validates a feature array ``int32 [B|1, F, length]`` (None -> zero features)."""
    if x is None:
        return jnp.zeros((1, 0, length), jnp.int32)
    if x.ndim != 3 or x.shape[0] not in (1, batch) or x.shape[2] != length:
        raise ValueError(
            f"{name} must be int32 [1 or batch={batch}, features, {length}], got shape "
            f"{tuple(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")
    return x.astype(jnp.int32)


def check_plan(plan: BlockPlan, batch: int, heads: int, nq: int, nk: int) -> None:
    bm, nm, pq, pk = plan.kv_index.shape
    if bm not in (1, batch) or nm not in (1, heads) or (pq, pk) != (nq, nk):
        raise ValueError(
            f"block plan of shape {(bm, nm, pq, pk)} does not match [1 or batch={batch}, 1 or "
            f"heads={heads}, nq={nq}, nk={nk}] for these block sizes"
        )


def split_features(rows: jax.Array, cols: jax.Array) -> tuple[tuple, tuple]:
    """Tile-local feature arrays ``[Fr, bq]``, ``[Fc, bk]`` -> the tuples ``mask_fn`` takes."""
    r = tuple(rows[i][:, None] for i in range(rows.shape[0]))
    c = tuple(cols[i][None, :] for i in range(cols.shape[0]))
    return r, c


def check_attention_args(q, k, v, block_map, mask_fn, row_features, col_features, block_q, block_k):
    """Validates the arguments every flash-attention kernel takes.

    Returns ``(block_map, row_features, col_features)``: the map (all FULL when None) checked
    against ``[B|1, Nq|1, cdiv(Tq, block_q), cdiv(Tk, block_k)]`` and the feature arrays as
    int32 ``[B|1, F, T]`` (``F = 0`` when absent).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{name} must be a floating array [batch, seq, heads, head_dim], got "
                f"{x.dtype}{list(x.shape)}"
            )
    b, tq, nq, d = q.shape
    tk, nkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(
            f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: expected q [B,Tq,Nq,H], "
            "k [B,Tk,Nkv,H], v [B,Tk,Nkv,Hv]"
        )
    if nq % nkv:
        raise ValueError(f"q heads ({nq}) must be a multiple of kv heads ({nkv})")
    if mask_fn is not None:
        try:
            hash(mask_fn)
        except TypeError as e:
            raise ValueError(f"mask_fn must be hashable (a static argument), got {mask_fn!r}") from e
    nqb, nkb = cdiv(tq, block_q), cdiv(tk, block_k)
    if block_map is None:
        block_map = dense_block_map(tq, tk, block_q, block_k)
    if block_map.ndim != 4 or block_map.shape[2:] != (nqb, nkb):
        raise ValueError(
            f"block_map shape {tuple(block_map.shape)}: expected [B|1, Nq|1, {nqb}, {nkb}] for "
            f"Tq={tq}, Tk={tk}, block_q={block_q}, block_k={block_k}"
        )
    if block_map.shape[0] not in (1, b) or block_map.shape[1] not in (1, nq):
        raise ValueError(
            f"block_map shape {tuple(block_map.shape)}: leading dims must be [1 or {b}, 1 or {nq}]"
        )
    rowf = check_features("row_features", row_features, b, tq)
    colf = check_features("col_features", col_features, b, tk)
    if (rowf.shape[1] or colf.shape[1]) and mask_fn is None:
        raise ValueError("row_features / col_features were given without a mask_fn")
    return block_map, rowf, colf


def tpu_interpret_params(interpret):
    """``interpret`` of the Mosaic TPU kernels: True -> ``pltpu.InterpretParams()`` (TPU interpret
    mode on CPU), False/None -> False, or given ``InterpretParams``."""
    from jax.experimental.pallas import tpu as pltpu

    if interpret is True:
        return pltpu.InterpretParams()
    if interpret is False or interpret is None:
        return False
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    raise ValueError(f"interpret={interpret!r}: expected a bool or pltpu.InterpretParams")
