"""Flash-decoding on GPU: Pallas with the Triton lowering (runs on CPU with ``interpret=True``).

Grid ``(B, Nkv, num_splits)``. Program ``(b, h, p)`` owns the ``p``-th of ``num_splits`` equal
chunks of sequence ``b``'s own block list (dense: blocks ``0 .. cdiv(lengths[b], block_k) - 1``;
sparse: the first ``kv_block_counts[b, h]`` entries of ``kv_block_indices[b, h]``), so short
sequences finish early and long ones use every split. Its q tile is the ``Tq * G`` rows of kv head
``h`` (zero-padded to a power of two >= 16), multiplied against each ``[block_k, H]`` K tile read
straight from the ``[B, S, Nkv, H]`` cache (no repeat, no transpose, no padding copy). A tile
starting past ``S - block_k`` is read from ``S - block_k`` instead and the overlap masked, so the
ragged last block never reads out of bounds. Partials ``(out / l, m + log l)`` are combined by
log-sum-exp in XLA (:func:`pallas_kernels.decode_attention.combine`).

Triton needs power-of-two tiles: ``H``, ``Hv`` and ``block_k`` must be powers of two >= 16. A
listed block larger than what ``num_stages`` pipelined K+V tiles allow in shared memory (160 KB)
is visited as several tiles. Rows are not tiled: ``Tq * G`` beyond ~128 rows spills registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_attention import (
    auto_num_splits,
    cdiv,
    check_args,
    combine,
    group_q,
    ungroup,
)

__all__ = ["decode_attention"]

DEFAULT_BLOCK_K = 64
SMEM_BUDGET = 160 * 1024


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _kernel(
    len_ref,
    idx_ref,
    cnt_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    block_k,
    tile,
    seq,
    tq,
    group,
    scale,
    softcap,
    num_splits,
    sparse,
    exact,
):
    rows = q_ref.shape[0]
    split = pl.program_id(2)
    length = len_ref[()]
    base = length - tq  # slot of query row 0 (token t of row r = t * G + g sits at base + t)
    if sparse:
        count = cnt_ref[()]
    else:
        count = lax.div(jnp.clip(length, 0, seq) + block_k - 1, block_k)
    sub = block_k // tile  # tiles per listed block (1 for dense: there block_k == tile)
    count = count * sub
    per = lax.div(count + num_splits - 1, num_splits)  # operands >= 0
    lo = split * per
    hi = jnp.minimum(lo + per, count)

    q = q_ref[...]
    prec = lax.Precision.HIGHEST if exact else None
    r = lax.broadcasted_iota(jnp.int32, (rows, tile), 0)
    c0 = lax.broadcasted_iota(jnp.int32, (rows, tile), 1)

    def body(i, carry):
        acc, m, l = carry
        if sub == 1:
            first = (idx_ref[i] if sparse else i) * block_k
        else:
            e = lax.div(i, sub)
            first = idx_ref[e] * block_k + (i - e * sub) * tile
        start = jnp.clip(first, 0, seq - tile)
        k = k_ref[pl.ds(start, tile), :]
        s = plgpu.dot(q, k, trans_b=True, precision=prec) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        col = start + c0
        # r >= (col - base) * G  <=>  token(r) >= col - base  <=>  col <= slot(r)
        ok = (col >= first) & (col < first + tile) & (r >= (col - base) * group)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        corr = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use[:, None])
        l = corr * l + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, tile), :]
        acc = corr[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=prec)
        return acc, m_new, l

    init = (
        jnp.zeros((rows, o_ref.shape[-1]), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    has = l > 0
    safe = jnp.where(has, l, 1.0)
    o_ref[...] = acc / safe[:, None]
    lse_ref[...] = jnp.where(has, m + jnp.log(safe), -jnp.inf)


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_k",
        "tile",
        "scale",
        "softcap",
        "num_splits",
        "interpret",
        "num_warps",
        "num_stages",
    ),
)
def _decode(
    q,
    k_cache,
    v_cache,
    lengths,
    indices,
    counts,
    *,
    block_k,
    tile,
    scale,
    softcap,
    num_splits,
    interpret,
    num_warps,
    num_stages,
):
    b, tq, nq, h = q.shape
    _, s, nkv, hv = v_cache.shape
    g = nq // nkv
    if s < tile:  # tiny cache: pad once so that every tile is in bounds
        pad = ((0, 0), (0, tile - s), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    seq = k_cache.shape[1]
    rows = max(16, pl.next_power_of_2(tq * g))
    qg = group_q(q, nkv, rows)
    sparse = indices is not None
    exact = jnp.dtype(q.dtype).itemsize >= 4 and jnp.dtype(k_cache.dtype).itemsize >= 4

    kernel = functools.partial(
        _kernel,
        block_k=block_k,
        tile=tile,
        seq=seq,
        tq=tq,
        group=g,
        scale=scale,
        softcap=softcap,
        num_splits=num_splits,
        sparse=sparse,
        exact=exact,
    )
    if sparse:
        m = indices.shape[-1]
        idx_specs = [
            pl.BlockSpec((None, None, m), lambda i, j, p: (i, j, 0)),
            pl.BlockSpec((None, None), lambda i, j, p: (i, j)),
        ]
        idx_args = [indices, counts]
    else:
        idx_specs, idx_args = [None, None], [None, None]
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        grid=(b, nkv, num_splits),
        in_specs=[pl.BlockSpec((None,), lambda i, j, p: (i,))]
        + idx_specs
        + [
            pl.BlockSpec((None, None, rows, h), lambda i, j, p: (i, j, 0, 0)),
            pl.BlockSpec((None, seq, None, h), lambda i, j, p: (i, 0, j, 0)),
            pl.BlockSpec((None, seq, None, hv), lambda i, j, p: (i, 0, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, hv), lambda i, j, p: (i, j, p, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, p: (i, j, p, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, nkv, num_splits, rows, hv), jnp.float32),
            jax.ShapeDtypeStruct((b, nkv, num_splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_decoding",
    )(lengths.astype(jnp.int32), *idx_args, qg, k_cache, v_cache)
    out, lse = combine(o_parts, lse_parts)
    return ungroup(out, lse, tq, g, hv, q.dtype)


def decode_attention(
    q,
    k_cache,
    v_cache,
    lengths,
    *,
    kv_block_indices=None,
    kv_block_counts=None,
    block_k=None,
    scale=None,
    softcap=None,
    num_splits=None,
    interpret=False,
    num_warps=4,
    num_stages=3,
):
    """Flash-decoding forward (semantics: :mod:`pallas_kernels.decode_attention`).

    ``block_k`` defaults to 64 without block lists (it must be given with them; without lists it
    is only the tile size);
    ``num_splits=None`` picks :func:`auto_num_splits` from ``B * Nkv`` and the number of blocks.
    ``num_warps`` / ``num_stages`` are Triton compiler parameters.
    Returns ``out [B, Tq, Nq, Hv]`` (q.dtype) and ``lse float32 [B, Nq, Tq]``.
    """
    a = check_args(
        q,
        k_cache,
        v_cache,
        lengths,
        kv_block_indices,
        kv_block_counts,
        block_k,
        scale,
        softcap,
        num_splits,
    )
    block_k = DEFAULT_BLOCK_K if block_k is None else block_k
    for name, n in (
        ("block_k", block_k),
        ("head dim of q/k_cache", a.head_dim),
        ("head dim of v_cache", a.head_dim_v),
    ):
        if not _pow2(n):
            raise ValueError(
                f"the GPU decode kernel needs {name} to be a power of two >= 16, got {n}"
            )
    # Tiles of K and V for all pipeline stages must fit in shared memory (~160 KB of 227).
    row_bytes = (a.head_dim + a.head_dim_v) * jnp.dtype(k_cache.dtype).itemsize
    tile = block_k
    while tile > 16 and tile * row_bytes * max(num_stages, 1) > SMEM_BUDGET:
        tile //= 2
    if a.indices is None:  # dense: block_k is only a tile size
        block_k = tile
        n_units = cdiv(a.seq, tile)
    else:
        n_units = a.indices.shape[-1] * (block_k // tile)
    if num_splits is None:
        num_splits = auto_num_splits(a.batch, a.nkv, n_units)
    return _decode(
        q,
        k_cache,
        v_cache,
        lengths,
        a.indices,
        a.counts,
        block_k=block_k,
        tile=tile,
        scale=a.scale,
        softcap=a.softcap,
        num_splits=num_splits,
        interpret=bool(interpret),
        num_warps=num_warps,
        num_stages=num_stages,
    )
