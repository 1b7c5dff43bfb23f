"""Flash-decoding on TPU: Pallas Mosaic with scalar-prefetched lengths and block lists.

Grid ``(B, Nkv, num_splits, steps)`` (last axis sequential). ``lengths``, the flattened block
lists and their counts are scalar-prefetched into SMEM; the K/V index maps read them to DMA
exactly the listed blocks (a step past the end of its split repeats the previous block index,
so Pallas issues no new DMA, and its compute is skipped). Split ``p`` of program ``(b, h)`` owns
the ``p``-th equal chunk of sequence ``b``'s own block list (dense: ``cdiv(lengths[b],
block_k)`` blocks), as in the GPU kernel. Online softmax in VMEM scratch, partials combined by
log-sum-exp in XLA.

Layout: the cache is viewed as ``[B, S, Nkv * H]`` (a free reshape), and kv head ``h`` is read
through a lane-aligned window of width ``W``: ``W = H`` when ``H % 128 == 0``; else the
128-lane window holding head ``h`` (``128 % H == 0``, reading ``128 / H`` heads' bytes); else all
heads (``W = Nkv * H``). The q rows are placed at the head's columns of a zero ``W``-wide row, so
``q . k_window`` is exactly ``q . k_h`` without lane slicing; the output window is cut in XLA.
The ragged last block is masked (keys) and zeroed (values) in-kernel. Lists are flattened into
1-D SMEM arrays: ``B * Nkv * M`` int32 entries must fit in SMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import (
    auto_num_splits,
    cdiv,
    check_args,
    combine,
    group_q,
    ungroup,
)

__all__ = ["decode_attention"]

DEFAULT_BLOCK_K = 512
LANES = 128


def _window(nkv: int, h: int) -> int:
    """Width of the lane-aligned window of the ``[.., Nkv * h]`` row that holds one head."""
    if h % LANES == 0:
        return h
    if LANES % h == 0 and (nkv * h) % LANES == 0:
        return LANES
    return nkv * h


def _entry(b, h, p, i, len_ref, idx_ref, cnt_ref, *, nkv, seq, block_k, num_splits, m, nblk):
    """(block index to read, unclamped listed block, whether step ``i`` is real)."""
    if idx_ref is not None:
        count = cnt_ref[b * nkv + h]
    else:
        count = lax.div(jnp.clip(len_ref[b], 0, seq) + block_k - 1, block_k)
    per = lax.div(count + num_splits - 1, num_splits)  # operands >= 0
    lo = p * per
    n = jnp.maximum(jnp.minimum(per, count - lo), 0)
    j = jnp.minimum(lo + jnp.minimum(i, jnp.maximum(n - 1, 0)), m - 1)
    blk = idx_ref[(b * nkv + h) * m + j] if idx_ref is not None else j
    return jnp.clip(blk, 0, nblk - 1), blk, i < n


def _kernel(
    *refs, sparse, nkv, seq, block_k, num_splits, m, nblk, tq, group, scale, softcap, exact
):
    if sparse:
        len_ref, idx_ref, cnt_ref = refs[:3]
        refs = refs[3:]
    else:
        len_ref, idx_ref, cnt_ref = refs[0], None, None
        refs = refs[1:]
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    b, h, p, i = (pl.program_id(d) for d in range(4))
    rows = q_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    read, blk, active = _entry(
        b,
        h,
        p,
        i,
        len_ref,
        idx_ref,
        cnt_ref,
        nkv=nkv,
        seq=seq,
        block_k=block_k,
        num_splits=num_splits,
        m=m,
        nblk=nblk,
    )

    @pl.when(active)
    def _step():
        prec = lax.Precision.HIGHEST if exact else None
        base = len_ref[b] - tq
        first = blk * block_k
        q = q_ref[...]
        k = k_ref[...]
        s = (
            lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
            )
            * scale
        )
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        r = lax.broadcasted_iota(jnp.int32, s.shape, 0)
        col = read * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        ok = (col >= first) & (col < first + block_k) & (col < seq) & (r >= (col - base) * group)
        s = jnp.where(ok, s, -jnp.inf)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        corr = jnp.exp(m_prev - m_use)
        pr = jnp.exp(s - m_use)
        l_scr[...] = corr * l_scr[...] + jnp.sum(pr, axis=1, keepdims=True)
        m_scr[...] = m_new
        v = v_ref[...]
        if seq % block_k:  # the ragged last tile holds unspecified values past S
            vrow = read * block_k + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where(vrow < seq, v, jnp.zeros_like(v))
        pv = lax.dot_general(
            pr.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=prec,
            preferred_element_type=jnp.float32,
        )
        acc_scr[...] = corr * acc_scr[...] + pv

    @pl.when(i == pl.num_programs(3) - 1)
    def _done():
        l = l_scr[...]
        has = l > 0
        safe = jnp.where(has, l, 1.0)
        o_ref[...] = acc_scr[...] / safe
        lse = jnp.where(has, m_scr[...] + jnp.log(safe), -jnp.inf)
        lse_ref[...] = jnp.broadcast_to(lse, (rows, LANES))


@functools.partial(
    jax.jit, static_argnames=("block_k", "scale", "softcap", "num_splits", "interpret")
)
def _decode(
    q, k_cache, v_cache, lengths, indices, counts, *, block_k, scale, softcap, num_splits, interpret
):
    b, tq, nq, h = q.shape
    _, s, nkv, hv = v_cache.shape
    g = nq // nkv
    if s < block_k:  # tiny cache: pad once so that a tile never exceeds the array
        pad = ((0, 0), (0, block_k - s), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    seq_arr = k_cache.shape[1]
    nblk = cdiv(s, block_k)
    wk, wv = _window(nkv, h), _window(nkv, hv)
    off_k = [(j * h) % wk for j in range(nkv)]
    off_v = [(j * hv) % wv for j in range(nkv)]
    k2 = k_cache.reshape(b, seq_arr, nkv * h)
    v2 = v_cache.reshape(b, seq_arr, nkv * hv)
    rows = max(16, cdiv(tq * g, 16) * 16)
    qg = group_q(q, nkv, rows, width=wk, head_offset=off_k)

    sparse = indices is not None
    m = indices.shape[-1] if sparse else nblk
    steps = cdiv(m, num_splits)
    entry = functools.partial(
        _entry, nkv=nkv, seq=s, block_k=block_k, num_splits=num_splits, m=m, nblk=nblk
    )

    def scalars(refs):
        return refs if sparse else (refs[0], None, None)

    def q_map(bi, hi, pi, ii, *refs):
        return bi, hi, 0, 0

    def k_map(bi, hi, pi, ii, *refs):
        return bi, entry(bi, hi, pi, ii, *scalars(refs))[0], lax.div(hi * h, wk)

    def v_map(bi, hi, pi, ii, *refs):
        return bi, entry(bi, hi, pi, ii, *scalars(refs))[0], lax.div(hi * hv, wv)

    def o_map(bi, hi, pi, ii, *refs):
        return bi, hi, pi, 0, 0

    kernel = functools.partial(
        _kernel,
        sparse=sparse,
        nkv=nkv,
        seq=s,
        block_k=block_k,
        num_splits=num_splits,
        m=m,
        nblk=nblk,
        tq=tq,
        group=g,
        scale=scale,
        softcap=softcap,
        exact=jnp.dtype(q.dtype).itemsize >= 4 and jnp.dtype(k_cache.dtype).itemsize >= 4,
    )
    prefetch = [lengths.astype(jnp.int32)]
    if sparse:
        prefetch += [indices.reshape(-1), counts.reshape(-1)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(b, nkv, num_splits, steps),
        in_specs=[
            pl.BlockSpec((None, None, rows, wk), q_map),
            pl.BlockSpec((None, block_k, wk), k_map),
            pl.BlockSpec((None, block_k, wv), v_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, wv), o_map),
            pl.BlockSpec((None, None, None, rows, LANES), o_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, wv), jnp.float32),
        ],
    )
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, nkv, num_splits, rows, wv), jnp.float32),
            jax.ShapeDtypeStruct((b, nkv, num_splits, rows, LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="flash_decoding_tpu",
    )(*prefetch, qg, k2, v2)
    out, lse = combine(o_parts, lse_parts[..., 0])
    if wv != hv:  # cut each kv head's columns out of its window
        cols = jnp.asarray(off_v)[:, None] + jnp.arange(hv)  # [Nkv, Hv]
        out = jnp.take_along_axis(out, cols[None, :, None, :], axis=-1)
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
):
    """Flash-decoding forward on TPU (semantics: :mod:`pallas_kernels.decode_attention`).

    ``block_k`` (a multiple of 8) defaults to 512 without block lists; ``interpret`` may be a
    ``pltpu.InterpretParams`` (``True`` means the default one) to run on CPU.
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
    if block_k % 8:
        raise ValueError(
            f"the TPU decode kernel needs block_k to be a multiple of 8, got {block_k}"
        )
    n_blocks = a.indices.shape[-1] if a.indices is not None else cdiv(a.seq, block_k)
    if num_splits is None:
        num_splits = auto_num_splits(a.batch, a.nkv, n_blocks, target=2)  # megacore only
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return _decode(
        q,
        k_cache,
        v_cache,
        lengths,
        a.indices,
        a.counts,
        block_k=block_k,
        scale=a.scale,
        softcap=a.softcap,
        num_splits=num_splits,
        interpret=interpret or False,
    )
