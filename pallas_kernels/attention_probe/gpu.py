"""Attention probe, Pallas GPU (Triton lowering; ``interpret=True`` runs it on CPU).

Two passes over K, nothing of size T x T:

1. grid ``(B, Nkv, S)``: each program takes the ``R = Gp * Qp`` rows of one kv head (its query
   heads x query rows, so K is read once per kv head) and one of ``S`` contiguous chunks of key
   tiles; an online max / sum-exp over the chunk. The ``S`` partials are merged into the
   log-sum-exp outside (``[B, Nkv, S, R]``, tiny). Splitting T gives enough programs to fill the
   GPU when ``B * Nkv`` is small.
2. grid ``(B, T / block_k)`` (head mean: all kv heads of a key tile in one program, the per-head
   map is never written) or ``(B, Nkv, T / block_k)`` (per head): recompute the logits of the
   tile, write ``exp(s - lse)`` and the column sums over the query rows.

Keys at or beyond ``lim[b] = max visible key + 1`` (causal bound, trailing padding) are never
loaded (masked loads); the ragged last tile is masked by the same bound and stores are masked
at ``T``. Triton needs power-of-two tensors, so heads-per-group and query rows are padded (the
padding rows see no key and are dropped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention_probe import _shared as sh
from pallas_kernels.common import cdiv

__all__ = ["attention_probe"]


def _col_vals(cols_ref, lay, idx, mask):
    """Packed column values of one key tile, a tuple of ``[1, bk]``."""
    if cols_ref is None:
        return ()
    n = int(lay.kv_col) + lay.fc
    return tuple(
        plgpu.load(cols_ref.at[jnp.int32(c), idx], mask=mask, other=0)[None, :] for c in range(n)
    )


def _row_vals(rows_ref, lay):
    hi = rows_ref[0, :]
    feats = tuple(rows_ref[1 + i, :][:, None] for i in range(lay.fr))
    return hi, feats


def _pass1_kernel(*refs, lay, bk, per_split, mask_fn):
    if lay.bc:
        q_ref, rows_ref, cols_ref, k_ref, m_ref, l_ref = refs
    else:
        (q_ref, rows_ref, k_ref, m_ref, l_ref), cols_ref = refs, None
    q = q_ref[...]
    hi, feats = _row_vals(rows_ref, lay)
    lim = jnp.max(hi) + 1
    first = pl.program_id(2) * per_split
    count = jnp.clip((lim - first * bk + bk - 1) // bk, 0, per_split)

    def body(i, carry):
        m, l = carry
        start = (first + i) * bk
        cols = start + jnp.arange(bk, dtype=jnp.int32)
        live = cols < lim
        k = plgpu.load(k_ref.at[pl.ds(start, bk), :], mask=live[:, None], other=0)
        s = sh.logits(q, k, lay)
        vals = _col_vals(cols_ref, lay, pl.ds(start, bk), live)
        ok = sh.allowed(hi[:, None], feats, cols[None, :], vals, lay, mask_fn)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        l = l * jnp.exp(m - safe) + jnp.sum(jnp.exp(s - safe[:, None]), axis=1)
        return m_new, l

    init = (jnp.full((lay.rows,), -jnp.inf, jnp.float32), jnp.zeros((lay.rows,), jnp.float32))
    m, l = jax.lax.fori_loop(0, count, body, init)
    m_ref[...] = m
    l_ref[...] = l


def _probs(q, k, lse, ok, lay):
    s = sh.logits(q, k, lay)
    return jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)


def _pass2_mean_kernel(*refs, lay, bk, mask_fn):
    if lay.bc:
        q_ref, lse_ref, rows_ref, cols_ref, k_ref, o_ref, cs_ref = refs
    else:
        (q_ref, lse_ref, rows_ref, k_ref, o_ref, cs_ref), cols_ref = refs, None
    cols = pl.program_id(1) * bk + jnp.arange(bk, dtype=jnp.int32)
    hi, feats = _row_vals(rows_ref, lay)
    live = cols < jnp.max(hi) + 1
    vals = _col_vals(cols_ref, lay, slice(None), live)
    ok = sh.allowed(hi[:, None], feats, cols[None, :], vals, lay, mask_fn)
    acc = jnp.zeros((lay.qp, bk), jnp.float32)
    for h in range(lay.nkv):
        k = plgpu.load(k_ref.at[:, jnp.int32(h), :], mask=live[:, None], other=0)
        p = _probs(q_ref[h], k, lse_ref[h], ok, lay)
        acc = acc + jnp.sum(p.reshape(lay.gp, lay.qp, bk), axis=0)
    w = acc * (1.0 / lay.nq)
    in_t = cols < lay.t
    plgpu.store(o_ref, w, mask=in_t[None, :])
    plgpu.store(cs_ref, jnp.sum(w, axis=0), mask=in_t)


def _pass2_head_kernel(*refs, lay, bk, mask_fn):
    if lay.bc:
        q_ref, lse_ref, rows_ref, cols_ref, k_ref, o_ref, cs_ref = refs
    else:
        (q_ref, lse_ref, rows_ref, k_ref, o_ref, cs_ref), cols_ref = refs, None
    cols = pl.program_id(2) * bk + jnp.arange(bk, dtype=jnp.int32)
    hi, feats = _row_vals(rows_ref, lay)
    live = cols < jnp.max(hi) + 1
    vals = _col_vals(cols_ref, lay, slice(None), live)
    ok = sh.allowed(hi[:, None], feats, cols[None, :], vals, lay, mask_fn)
    k = plgpu.load(k_ref, mask=live[:, None], other=0)
    p = _probs(q_ref[...], k, lse_ref[...], ok, lay).reshape(lay.gp, lay.qp, bk)
    in_t = cols < lay.t
    plgpu.store(o_ref, p, mask=in_t[None, None, :])
    plgpu.store(cs_ref, jnp.sum(p, axis=1), mask=in_t[None, :])


def _warps(rows: int, bk: int) -> int:
    return 4 if rows * bk <= 64 * 128 else 8


@functools.partial(
    jax.jit,
    static_argnames=(
        "mask_fn", "causal", "scale", "softcap", "per_head", "block_k", "num_splits", "interpret",
    ),
)  # fmt: skip
def attention_probe(
    q: jax.Array,
    k: jax.Array,
    *,
    q_index: jax.Array,
    q_valid: jax.Array | None = None,
    kv_valid: jax.Array | None = None,
    mask_fn=None,
    row_features: jax.Array | None = None,
    col_features: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    per_head: bool = False,
    block_k: int = 128,
    num_splits: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Softmax weights of ``Q`` query rows over all ``T`` keys, and their column sums.

    Args:
      q: ``[B, Q, Nq, H]`` query rows; k: ``[B, T, Nkv, H]`` (same dtype; ``Nq % Nkv == 0``).
      q_index: int ``[B, Q]``; causal: row ``i`` sees keys ``j <= q_index[b, i]``.
      q_valid: bool ``[B, Q]`` (invalid rows: zero weights); kv_valid: bool ``[B, T]``.
      mask_fn, row_features ``int32 [B|1, Fr, Q]``, col_features ``int32 [B|1, Fc, T]``: an
        extra mask, as in ``pallas_kernels.common`` (rows are query rows).
      scale: default ``1/sqrt(H)``; softcap: ``softcap * tanh(s / softcap)``.
      per_head: weights ``[B, Nq, Q, T]`` / colsum ``[B, Nq, T]``; else head means
        ``[B, Q, T]`` / ``[B, T]`` (averaged in the kernel).
      block_k: key tile (power of two >= 16); num_splits: key chunks of pass 1 per (batch, kv
        head) (default: enough for ~256 programs).

    Returns ``(weights, colsum)`` float32; rows without a visible key are 0. Column selection
    (``key_index`` of the reference) is a gather on the result.
    """
    sh.check_block("block_k", block_k, 16, pow2=True)
    lay, pk = sh.prepare(
        q, k, q_index=q_index, q_valid=q_valid, kv_valid=kv_valid, mask_fn=mask_fn,
        row_features=row_features, col_features=col_features, causal=causal, scale=scale,
        softcap=softcap, pow2=True, row_multiple=1, min_rows=16,
    )  # fmt: skip
    b, nkv, r, h, t = lay.b, lay.nkv, lay.rows, lay.h, lay.t
    nt = cdiv(t, block_k)
    if num_splits is None:
        num_splits = max(1, min(nt, cdiv(256, b * nkv)))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits={num_splits!r}: expected a positive int")
    per_split = cdiv(nt, min(num_splits, nt))
    splits = cdiv(nt, per_split)
    cb = (lambda i: i) if lay.bc == b else (lambda i: 0)
    has_cols = pk.cols is not None
    nc = 0 if not has_cols else pk.cols.shape[1]
    warps = _warps(r, block_k)

    # Pass 1: log-sum-exp per kernel row.
    specs = [
        pl.BlockSpec((None, None, r, h), lambda i, j, s: (i, j, 0, 0)),
        pl.BlockSpec((None, 1 + lay.fr, r), lambda i, j, s: (i, 0, 0)),
    ]
    args = [pk.q, pk.rows]
    if has_cols:
        specs.append(pl.BlockSpec((None, nc, t), lambda i, j, s: (cb(i), 0, 0)))
        args.append(pk.cols)
    specs.append(pl.BlockSpec((None, t, None, h), lambda i, j, s: (i, 0, j, 0)))
    args.append(k)
    part = jax.ShapeDtypeStruct((b, nkv, splits, r), jnp.float32)
    part_spec = pl.BlockSpec((None, None, None, r), lambda i, j, s: (i, j, s, 0))
    m, l = pl.pallas_call(
        functools.partial(_pass1_kernel, lay=lay, bk=block_k, per_split=per_split, mask_fn=mask_fn),
        grid=(b, nkv, splits),
        in_specs=specs,
        out_specs=[part_spec, part_spec],
        out_shape=[part, part],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=3),
        interpret=interpret,
        name="attention_probe_lse",
    )(*args)
    lse = sh.combine_splits(m, l)  # [B, Nkv, R]

    # Pass 2: probabilities (+ head mean) and column sums.
    if per_head:
        grid = (b, nkv, nt)
        specs = [
            pl.BlockSpec((None, None, r, h), lambda i, j, c: (i, j, 0, 0)),
            pl.BlockSpec((None, None, r), lambda i, j, c: (i, j, 0)),
            pl.BlockSpec((None, 1 + lay.fr, r), lambda i, j, c: (i, 0, 0)),
        ]
        if has_cols:
            specs.append(pl.BlockSpec((None, nc, block_k), lambda i, j, c: (cb(i), 0, c)))
        specs.append(pl.BlockSpec((None, block_k, None, h), lambda i, j, c: (i, c, j, 0)))
        out_specs = [
            pl.BlockSpec((None, lay.gp, lay.qp, block_k), lambda i, j, c: (i, j, 0, c)),
            pl.BlockSpec((None, lay.gp, block_k), lambda i, j, c: (i, j, c)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((b, nkv * lay.gp, lay.qp, t), jnp.float32),
            jax.ShapeDtypeStruct((b, nkv * lay.gp, t), jnp.float32),
        ]
        kernel = _pass2_head_kernel
    else:
        grid = (b, nt)
        specs = [
            pl.BlockSpec((None, nkv, r, h), lambda i, c: (i, 0, 0, 0)),
            pl.BlockSpec((None, nkv, r), lambda i, c: (i, 0, 0)),
            pl.BlockSpec((None, 1 + lay.fr, r), lambda i, c: (i, 0, 0)),
        ]
        if has_cols:
            specs.append(pl.BlockSpec((None, nc, block_k), lambda i, c: (cb(i), 0, c)))
        specs.append(pl.BlockSpec((None, block_k, nkv, h), lambda i, c: (i, c, 0, 0)))
        out_specs = [
            pl.BlockSpec((None, lay.qp, block_k), lambda i, c: (i, 0, c)),
            pl.BlockSpec((None, block_k), lambda i, c: (i, c)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((b, lay.qp, t), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.float32),
        ]
        kernel = _pass2_mean_kernel
    args = [pk.q, lse, pk.rows] + ([pk.cols] if has_cols else []) + [k]
    w, cs = pl.pallas_call(
        functools.partial(kernel, lay=lay, bk=block_k, mask_fn=mask_fn),
        grid=grid,
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        interpret=interpret,
        name="attention_probe_probs",
    )(*args)
    return sh.finish(lay, w, cs, per_head)
