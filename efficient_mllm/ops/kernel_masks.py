"""Mask specs in the form the Pallas attention kernels take: a block map plus an in-tile predicate.

The kernels (``pallas_kernels/common.py``) skip EMPTY tiles, do no mask work on FULL tiles and,
inside PARTIAL tiles, evaluate ``mask_fn(rows, cols)`` on per-query-row and per-key integer
features. :func:`kernel_mask` gathers those features from a :class:`~efficient_mllm.ops.masks.MaskSpec`
once, outside the kernel (absolute positions, segment ids, token types, ...), and builds a
hashable predicate that mirrors the spec's structure (``&``, ``|``, ``~``). Block-sparse leaves are
tile-level by construction: they must sit at the top level of an ``&`` and align with the kernel
tiles. Dense boolean arrays (``from_array``) have no such form and are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from efficient_mllm.ops import masks as M

__all__ = ["KernelMask", "kernel_mask"]


@dataclasses.dataclass(frozen=True)
class KernelMask:
    """Everything a kernel needs about a mask (see ``pallas_kernels.common``)."""

    block_map: jax.Array  # int8 [B|1, N|1, nq, nk]
    mask_fn: Any  # hashable predicate, or None
    row_features: jax.Array | None  # int32 [B|1, Fr, Tq]
    col_features: jax.Array | None  # int32 [B|1, Fc, Tk]


def _cols(x):
    return x


# Per leaf class: (features(spec, q_pos, q_row, k_pos) -> (rows, cols), predicate(meta, rows, cols)).
# rows are int32 [B|1, Tq], cols int32 [B|1, Tk]; predicates see rows as [bq, 1], cols as [1, bk].


def _feat_positions(spec, q_pos, q_row, k_pos):
    return [q_pos], [k_pos[None]]


def _pred_causal(meta, r, c):
    return c[0] <= r[0]


def _pred_window(meta, r, c):
    left, right = meta
    d = c[0] - r[0]
    return (d >= -left) & (d <= right)


def _feat_segments(spec, q_pos, q_row, k_pos):
    return [M._take(spec.q_segments, q_row[None])], [M._take(spec.kv_segments, k_pos[None])]


def _pred_equal(meta, r, c):
    return r[0] == c[0]


def _feat_padding(spec, q_pos, q_row, k_pos):
    cols = (k_pos[None, :] < spec.kv_lengths[:, None]).astype(jnp.int32)
    if spec.q_lengths is None:
        return [], [cols]
    rows = (q_row[None, :] < spec.q_lengths[:, None]).astype(jnp.int32)
    return [rows], [cols]


def _pred_padding(meta, r, c):
    out = c[0] != 0
    return out & (r[0] != 0) if r else out


def _feat_prefix(spec, q_pos, q_row, k_pos):
    pre = jnp.broadcast_to(spec.prefix_lengths[:, None], (spec.prefix_lengths.shape[0],) + q_pos.shape[1:])
    return [q_pos, pre], [k_pos[None]]


def _pred_prefix(meta, r, c):
    return (c[0] <= r[0]) | (c[0] < r[1])


def _feat_modality(spec, q_pos, q_row, k_pos):
    t = spec.token_types
    turn = jnp.cumsum(t == M.ANSWER, axis=1, dtype=jnp.int32)
    rows = [q_pos, M._take(t, q_pos), M._take(turn, q_pos)]
    cols = [k_pos[None], M._take(t, k_pos[None]), M._take(turn, k_pos[None])]
    return rows, cols


def _pred_modality(meta, r, c):
    later = (r[1] == M.IMAGE) & (c[1] == M.TEXT) & (r[2] == c[2])
    return (c[0] <= r[0]) | later


def _feat_frames(spec, q_pos, q_row, k_pos):
    return [q_pos, M._take(spec.frame_ids, q_pos)], [k_pos[None], M._take(spec.frame_ids, k_pos[None])]


def _pred_frames(meta, r, c):
    return (c[0] <= r[0]) | ((r[1] == c[1]) & (r[1] >= 0))


_LEAVES = {
    M.Causal: (_feat_positions, _pred_causal, lambda s: ()),
    M.SlidingWindow: (_feat_positions, _pred_window, lambda s: (s.left, s.right)),
    M.SegmentIds: (_feat_segments, _pred_equal, lambda s: ()),
    M.Padding: (_feat_padding, _pred_padding, lambda s: (s.q_lengths is not None,)),
    M.PrefixLM: (_feat_prefix, _pred_prefix, lambda s: ()),
    M.ModalityMutual: (_feat_modality, _pred_modality, lambda s: ()),
    M.FrameBlockCausal: (_feat_frames, _pred_frames, lambda s: ()),
}


@dataclasses.dataclass(frozen=True)
class _Predicate:
    """Hashable in-tile predicate: a tree of ("and"|"or"|"not", children) / ("leaf", cls, meta, nr, nc)."""

    tree: tuple

    def __call__(self, rows: tuple, cols: tuple) -> jax.Array:
        out, _, _ = _apply(self.tree, rows, cols, 0, 0)
        return out


def _apply(node, rows, cols, ri, ci):
    kind = node[0]
    if kind == "leaf":
        _, cls, meta, nr, nc = node
        pred = _LEAVES[cls][1]
        return pred(meta, rows[ri : ri + nr], cols[ci : ci + nc]), ri + nr, ci + nc
    if kind == "not":
        out, ri, ci = _apply(node[1], rows, cols, ri, ci)
        return ~out, ri, ci
    out = None
    for child in node[1]:
        v, ri, ci = _apply(child, rows, cols, ri, ci)
        out = v if out is None else (out & v if kind == "and" else out | v)
    return out, ri, ci


def _compile(spec, q_pos, q_row, k_pos, rows, cols):
    """The predicate tree of ``spec`` (None: always true); appends features to rows / cols."""
    if isinstance(spec, (M.And, M.Or)):
        kids = [_compile(s, q_pos, q_row, k_pos, rows, cols) for s in spec.specs]
        if isinstance(spec, M.And):
            kids = [k for k in kids if k is not None]
            if not kids:
                return None
        elif any(k is None for k in kids):
            raise ValueError(f"mask {spec!r}: a block-sparse term under '|' cannot run in the kernel")
        return kids[0] if len(kids) == 1 else ("and" if isinstance(spec, M.And) else "or", tuple(kids))
    if isinstance(spec, M.Not):
        kid = _compile(spec.spec, q_pos, q_row, k_pos, rows, cols)
        if kid is None:
            raise ValueError(f"mask {spec!r}: a negated block-sparse term cannot run in the kernel")
        return ("not", kid)
    if isinstance(spec, M.BlockSparse):
        return None  # tile-level; checked for alignment by the caller (top level only)
    if isinstance(spec, M.ArrayMask):
        raise ValueError(
            "a dense boolean mask array cannot be evaluated inside the Pallas attention kernel; "
            "pass an ops.masks spec or use impl='xla'"
        )
    if type(spec) not in _LEAVES:
        raise ValueError(f"mask leaf {type(spec).__name__} has no Pallas kernel form")
    feat, _, meta = _LEAVES[type(spec)]
    r, c = feat(spec, q_pos, q_row, k_pos)
    rows.extend(r)
    cols.extend(c)
    return ("leaf", type(spec), meta(spec), len(r), len(c))


def _stack(feats: list, length: int) -> jax.Array | None:
    if not feats:
        return None
    bx = max(f.shape[0] for f in feats)
    return jnp.stack([jnp.broadcast_to(f, (bx, length)).astype(jnp.int32) for f in feats], axis=1)


def kernel_mask(
    spec: M.MaskSpec | None,
    batch: int,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    q_offset: Any = None,
) -> KernelMask:
    """Block map ``[B|1, N|1, nq, nk]``, predicate and features of ``spec`` for a kernel."""
    if spec is None:
        nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
        return KernelMask(jnp.full((1, 1, nq, nk), M.FULL, jnp.int8), None, None, None)
    off, max_off = spec.validate(batch, q_len, kv_len, q_offset)
    for leaf in spec.leaves():
        if isinstance(leaf, M.BlockSparse):
            aligned = leaf.block_q % block_q == 0 and leaf.block_k % block_k == 0
            static_off = q_offset is None or (M._is_int(q_offset) and q_offset % leaf.block_q == 0)
            if not (aligned and static_off):
                raise ValueError(
                    f"block_sparse(block_q={leaf.block_q}, block_k={leaf.block_k}) does not align "
                    f"with kernel tiles ({block_q}, {block_k}) at q_offset={q_offset!r}: kernel "
                    "tiles must divide the sparse blocks and q_offset be a multiple of block_q"
                )
    q_row = jnp.arange(q_len, dtype=jnp.int32)
    q_pos = off[:, None] + q_row[None, :]
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)
    rows: list = []
    cols: list = []
    tree = _compile(spec, q_pos, q_row, k_pos, rows, cols)
    bm = spec.block_map(batch, q_len, kv_len, block_q, block_k, q_offset)
    if bm.ndim == 3:
        bm = bm[:, None]
    return KernelMask(
        block_map=bm,
        mask_fn=None if tree is None else _Predicate(tree),
        row_features=_stack(rows, q_len),
        col_features=_stack(cols, kv_len),
    )
