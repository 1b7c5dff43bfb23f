"""Attention probe, Pallas Mosaic TPU (``interpret=pltpu.InterpretParams()`` runs it on CPU).

Same two passes as the GPU kernel, arranged for the TPU: K is viewed as ``[B, T, Nkv * H]`` (a
free reshape), so one key tile of all kv heads is a single contiguous DMA; each program loops
over the kv heads of the tile (``R = G * Qp`` rows each, ``Qp`` a multiple of 8).

1. grid ``(B, T / block_k)``, the key axis sequential: running max / sum-exp per kv head and row
   in VMEM scratch, log-sum-exp written at the last tile.
2. grid ``(B, T / block_k)``, both parallel: ``exp(s - lse)``, per head or head-averaged in the
   kernel, and the column sums.

``lim[b]`` (max visible key + 1) is scalar-prefetched: tiles at or beyond it are not fetched
(the index map repeats the last live tile, so no new DMA is issued) and not computed (pass 2
writes zeros there). Per-row / per-key integers are stored as ``[.., R, 1]`` / ``[.., 1, T]`` so
every in-kernel feature is a leading-axis ref index.

Not verified on TPU hardware (none available): correctness is checked in TPU interpret mode and
the Mosaic lowering by ``jax.export(..., platforms=["tpu"])``. ``H`` not a multiple of 128
(with ``Nkv > 1``) slices K at unaligned lane offsets, which Mosaic may lower slowly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention_probe import _shared as sh
from pallas_kernels.common import cdiv

__all__ = ["attention_probe"]

_LANES = 128


def _tile_masks(lim_ref, rows_ref, cols_ref, lay, bk, mask_fn):
    del lim_ref
    cols = pl.program_id(1) * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    hi = rows_ref[0]  # [R, 1]
    feats = tuple(rows_ref[1 + i] for i in range(lay.fr))
    vals = () if cols_ref is None else tuple(cols_ref[c] for c in range(cols_ref.shape[0]))
    return sh.allowed(hi, feats, cols, vals, lay, mask_fn)


def _k_head(k_ref, lay, h):
    return k_ref[:, h * lay.h : (h + 1) * lay.h]


def _pass1_kernel(*refs, lay, bk, mask_fn):
    if lay.bc:
        lim_ref, q_ref, rows_ref, cols_ref, k_ref, lse_ref, m_sc, l_sc = refs
    else:
        (lim_ref, q_ref, rows_ref, k_ref, lse_ref, m_sc, l_sc), cols_ref = refs, None
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

    @pl.when(j * bk < lim_ref[pl.program_id(0)])
    def _tile():
        ok = _tile_masks(lim_ref, rows_ref, cols_ref, lay, bk, mask_fn)
        for h in range(lay.nkv):
            s = sh.logits(q_ref[h], _k_head(k_ref, lay, h), lay)
            s = jnp.where(ok, s, -jnp.inf)
            m_prev = m_sc[h]  # [R, 128], lanes replicated
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p_sum = jnp.sum(jnp.exp(s - safe[:, :1]), axis=1, keepdims=True)
            l_sc[h] = l_sc[h] * jnp.exp(m_prev - safe) + p_sum
            m_sc[h] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        m, l = m_sc[...], l_sc[...]
        lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _pass2_kernel(*refs, lay, bk, mask_fn, per_head):
    if lay.bc:
        lim_ref, q_ref, lse_ref, rows_ref, cols_ref, k_ref, o_ref, cs_ref = refs
    else:
        (lim_ref, q_ref, lse_ref, rows_ref, k_ref, o_ref, cs_ref), cols_ref = refs, None
    live = pl.program_id(1) * bk < lim_ref[pl.program_id(0)]

    @pl.when(jnp.logical_not(live))
    def _skip():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)
        cs_ref[...] = jnp.zeros(cs_ref.shape, jnp.float32)

    @pl.when(live)
    def _tile():
        ok = _tile_masks(lim_ref, rows_ref, cols_ref, lay, bk, mask_fn)
        g, qp = lay.g, lay.qp
        acc = jnp.zeros((qp, bk), jnp.float32)
        for h in range(lay.nkv):
            s = sh.logits(q_ref[h], _k_head(k_ref, lay, h), lay)
            p = jnp.where(ok, jnp.exp(s - lse_ref[h][:, :1]), 0.0).reshape(g, qp, bk)
            if per_head:
                o_ref[h * g : (h + 1) * g] = p
                cs_ref[h * g : (h + 1) * g] = jnp.sum(p, axis=1)
            else:
                acc = acc + jnp.sum(p, axis=0)
        if not per_head:
            w = acc * (1.0 / lay.nq)
            o_ref[...] = w
            cs_ref[...] = jnp.sum(w, axis=0, keepdims=True)


@functools.partial(
    jax.jit,
    static_argnames=(
        "mask_fn", "causal", "scale", "softcap", "per_head", "block_k", "interpret",
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
    block_k: int = 512,
    interpret=False,
) -> tuple[jax.Array, jax.Array]:
    """The TPU attention probe: arguments and results as
    :func:`pallas_kernels.attention_probe.gpu.attention_probe` (``block_k``: a multiple of 128;
    ``interpret``: False, True or a ``pltpu.InterpretParams``)."""
    sh.check_block("block_k", block_k, 128, pow2=False)
    lay, pk = sh.prepare(
        q, k, q_index=q_index, q_valid=q_valid, kv_valid=kv_valid, mask_fn=mask_fn,
        row_features=row_features, col_features=col_features, causal=causal, scale=scale,
        softcap=softcap, pow2=False, row_multiple=8, min_rows=8,
    )  # fmt: skip
    if interpret is True:
        interpret = pltpu.InterpretParams()
    b, nkv, r, h, t = lay.b, lay.nkv, lay.rows, lay.h, lay.t
    nt = cdiv(t, block_k)
    k2 = k.reshape(b, t, nkv * h)
    rows = pk.rows[..., None]  # [B, 1 + Fr, R, 1]
    has_cols = pk.cols is not None
    cols = pk.cols[:, :, None, :] if has_cols else None  # [Bc, C, 1, T]
    cb = (lambda i: i) if lay.bc == b else (lambda i: 0)

    def last_live(i, lim_ref):  # the last key tile with a visible key (0 if none)
        return jnp.maximum(jax.lax.div(lim_ref[i] + block_k - 1, block_k) - 1, 0)  # lim >= 0

    def k_map(i, c, lim_ref):
        return (i, jnp.minimum(c, last_live(i, lim_ref)), 0)

    def cols_map(i, c, lim_ref):
        return (cb(i), 0, 0, jnp.minimum(c, last_live(i, lim_ref)))

    row_specs = [pl.BlockSpec((None, 1 + lay.fr, r, 1), lambda i, c, lim: (i, 0, 0, 0))]
    if has_cols:
        row_specs.append(pl.BlockSpec((None, cols.shape[1], 1, block_k), cols_map))
    k_spec = pl.BlockSpec((None, block_k, nkv * h), k_map)
    q_spec = pl.BlockSpec((None, nkv, r, h), lambda i, c, lim: (i, 0, 0, 0))
    lse_spec = pl.BlockSpec((None, nkv, r, _LANES), lambda i, c, lim: (i, 0, 0, 0))
    extra = [rows] + ([cols] if has_cols else []) + [k2]

    lse = pl.pallas_call(
        functools.partial(_pass1_kernel, lay=lay, bk=block_k, mask_fn=mask_fn),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, nt),
            in_specs=[q_spec, *row_specs, k_spec],
            out_specs=lse_spec,
            scratch_shapes=[pltpu.VMEM((nkv, r, _LANES), jnp.float32)] * 2,
        ),
        out_shape=jax.ShapeDtypeStruct((b, nkv, r, _LANES), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY)),
        interpret=interpret,
        name="attention_probe_lse",
    )(pk.lim, pk.q, *extra)

    if per_head:
        out_specs = [
            pl.BlockSpec((None, lay.nq, lay.qp, block_k), lambda i, c, lim: (i, 0, 0, c)),
            pl.BlockSpec((None, lay.nq, block_k), lambda i, c, lim: (i, 0, c)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((b, lay.nq, lay.qp, t), jnp.float32),
            jax.ShapeDtypeStruct((b, lay.nq, t), jnp.float32),
        ]
    else:
        out_specs = [
            pl.BlockSpec((None, lay.qp, block_k), lambda i, c, lim: (i, 0, c)),
            pl.BlockSpec((None, 1, block_k), lambda i, c, lim: (i, 0, c)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((b, lay.qp, t), jnp.float32),
            jax.ShapeDtypeStruct((b, 1, t), jnp.float32),
        ]
    w, cs = pl.pallas_call(
        functools.partial(_pass2_kernel, lay=lay, bk=block_k, mask_fn=mask_fn, per_head=per_head),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, nt),
            in_specs=[q_spec, lse_spec, *row_specs, k_spec],
            out_specs=out_specs,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL)),
        interpret=interpret,
        name="attention_probe_probs",
    )(pk.lim, pk.q, lse, *extra)
    if not per_head:
        cs = cs[:, 0]
    return sh.finish(lay, w, cs, per_head)
