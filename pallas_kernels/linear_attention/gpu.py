"""Chunked linear attention with per-token log-space decay on GPUs: Pallas, Triton lowering.

Semantics: :mod:`pallas_kernels.linear_attention`. The chunk algorithm of Lightning Attention-2 /
Mamba-2 SSD / GLA, re-derived here. Per (batch row, head), chunks of ``C`` tokens, ``b`` the
in-chunk cumulative log-decay (``b_last`` the chunk total), ``S_c`` the state before chunk ``c``::

    S_{c+1} = exp(b_last) S_c + (k * exp(b_last - b))^T v
    o       = scale * (exp(b) * (q S_c) + ((q k^T) * D) v),   D[i, j] = exp(b_i - b_j), j <= i

Every exponent is a difference that is ``<= 0`` where it is used (masked entries never enter an
``exp``), so long sequences with strong decay cannot overflow or give 0/0.

Kernels (grids are ``(tile, chunk | tile, B, H)``):

* ``_states_kernel``: sequential over chunks per (F tile, dv tile, b, h); writes every chunk's
  start state ``[B, H, NC, F, dv]`` (``state_dtype``) and the final state (float32).
* ``_out_kernel``: parallel over (dv tile, chunk, b, h), loops over F tiles.
* backward (``jax.custom_vjp``): the states are recomputed; ``_dstates_kernel`` walks the chunks
  in reverse carrying ``dS`` (the cotangent of the state at a chunk's end, seeded by the
  final-state cotangent; what is left at the front is ``d initial_state``); ``_dqk_kernel``
  (per F tile, loops over dv) gives ``dq``, ``dk`` and ``q.dq - k.dk`` per token;
  ``_dv_kernel`` (per dv tile, loops over F) gives ``dv``.
* decay gradient: with ``B_t`` the global cumulative log-decay, every term of the output and of
  the final state is ``exp(B_t - B_u)`` times something independent of the decay (``t`` a query
  or the end, ``u`` a key or the start), so ``dL/dB_t = q_t.dq_t - k_t.dk_t`` (full gradients,
  state terms included) ``+ [t = T-1] <S_T, dS_T>``, and ``dL/dg_r = sum_{t >= r} dL/dB_t``
  (a reverse cumulative sum in XLA). A constant ``[H]`` decay gets the sum over tokens (autodiff
  of the broadcast).
* :func:`linear_attention_step`: the one-token decode step, one program per (dv tile, b, h),
  updating the state in place (``input_output_aliases``) with masked loads (any F, dv).

Precision: states, score matrices and accumulators are float32. With bf16 / fp16 inputs the
matmul operands are in the input dtype: the states read by the output / gradient matmuls, the
decay-weighted keys / queries of the state updates and the masked score matrices are rounded to
it (as in fla-core); float32 inputs use full-precision (``HIGHEST``) dots. The per-chunk states
(and their cotangents) are therefore stored in the input dtype by default: rounding at the store
instead of at the load gives bit-identical results with half the traffic (``state_dtype=float32``
stores them in float32 anyway). The carried states and the final state are always float32.

Padding: T to a chunk multiple (zeros: no key, no decay), F and dv to multiples of their tiles
(powers of two >= 16, as Triton needs); outputs are sliced back. The chunk is shrunk to
``max(16, next_pow2(T))`` for short sequences.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.linear_attention import (
    check_args,
    check_float,
    check_scale,
    check_step_args,
    decay_per_token,
)

__all__ = ["chunked_linear_attention", "linear_attention_step"]

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Cfg:
    scale: float
    chunk: int
    nc: int  # chunks
    block_f: int  # F tile looped over in the output kernel
    block_v: int  # dv tile of an output-kernel program
    block_f_state: int  # tiles of the sequential (state) kernels
    block_v_state: int
    block_f_bwd: int  # tiles of the dq/dk and dv kernels
    block_v_bwd: int
    num_warps: int
    num_stages: int
    num_warps_state: int
    num_stages_state: int
    num_warps_bwd: int
    num_stages_bwd: int
    state_dtype: str
    want_final: bool
    interpret: bool


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _auto_tile(n: int, cap: int = 128) -> int:
    """A power-of-two tile in [16, cap] for a dimension of size n, with little padding."""
    if n <= cap:
        return max(16, _next_pow2(n))
    cands = [t for t in (cap, cap // 2, cap // 4) if t >= 32] or [cap]
    return min(cands, key=lambda t: (_round_up(n, t), -t))


# The state kernels walk the chunks sequentially: one program per (F tile, dv tile, b, h).
# With few sequences x heads (batch 1 at long T) 64x64 tiles leave most SMs idle, so the default
# tiles shrink (dv first, then F, down to 32) until there are about this many programs.
_MIN_STATE_PROGRAMS = 256


def _state_tiles(seq_heads: int, f: int, dv: int, bf: int, bv: int) -> tuple[int, int]:
    def programs(bf, bv):
        return seq_heads * (-(-f // bf)) * (-(-dv // bv))

    while programs(bf, bv) < _MIN_STATE_PROGRAMS and max(bf, bv) > 32:
        if bv >= bf:
            bv //= 2
        else:
            bf //= 2
    return bf, bv


def _dot(a, b, *, trans_a=False, trans_b=False):
    """float32-accumulating matmul; full precision for float32 operands."""
    prec = lax.Precision.HIGHEST if a.dtype == F32 else None
    return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=prec)


def _causal(c, transpose=False):
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return col >= row if transpose else row >= col


def _decay_matrix(b, mask, transpose=False):
    """``exp(b_i - b_j)`` where ``mask`` (i rows, j columns; swapped when transposed), else 0."""
    diff = b[None, :] - b[:, None] if transpose else b[:, None] - b[None, :]
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg, warps, stages, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=cfg.interpret,
        name=name,
    )


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _sequential_call(cfg: _Cfg, kernel, in_specs, shape, name):
    """The chunk-sequential state kernels (forward states, backward state cotangents): grid
    (dv tile, F tile, B, H); outputs every chunk's state [B, H, NC, F, dv] (``state_dtype``)
    and the last one float32 [B, H, F, dv]."""
    bsz, h, fp, dvp = shape
    nc, bf, bv = cfg.nc, cfg.block_f_state, cfg.block_v_state
    return _call(
        kernel,
        (dvp // bv, fp // bf, bsz, h),
        in_specs,
        [
            pl.BlockSpec((None, None, nc, bf, bv), lambda vi, fi, b, hh: (b, hh, 0, fi, vi)),
            pl.BlockSpec((None, None, bf, bv), lambda vi, fi, b, hh: (b, hh, fi, vi)),
        ],
        [
            jax.ShapeDtypeStruct((bsz, h, nc, fp, dvp), jnp.dtype(cfg.state_dtype)),
            jax.ShapeDtypeStruct((bsz, h, fp, dvp), F32),
        ],
        cfg,
        cfg.num_warps_state,
        cfg.num_stages_state,
        name,
    )


def _states_kernel(*refs, c, nc, decay, has_init):
    refs = list(refs)
    k_ref, v_ref = refs.pop(0), refs.pop(0)
    g_ref = refs.pop(0) if decay else None
    s0_ref = refs.pop(0) if has_init else None
    st_ref, fin_ref = refs
    s = s0_ref[...] if has_init else jnp.zeros(fin_ref.shape, F32)

    def body(i, s):
        st_ref[i, :, :] = s.astype(st_ref.dtype)
        t0 = pl.multiple_of(i * c, c)
        kk = k_ref[pl.ds(t0, c), :]
        vv = v_ref[pl.ds(t0, c), :]
        if decay:
            b = g_ref[pl.ds(t0, c)]
            last = g_ref[t0 + c - 1]
            kk = (kk.astype(F32) * jnp.exp(last - b)[:, None]).astype(kk.dtype)
            s = jnp.exp(last) * s
        return s + _dot(kk, vv, trans_a=True)

    fin_ref[...] = lax.fori_loop(0, nc, body, s)


def _states(cfg: _Cfg, k, v, g, s0):
    """Per-chunk start states [B, H, NC, F, dv] (state_dtype) and the final state (float32)."""
    bsz, tp, h, fp = k.shape
    dvp = v.shape[3]
    c, nc, bf, bv = cfg.chunk, cfg.nc, cfg.block_f_state, cfg.block_v_state
    decay, has_init = g is not None, s0 is not None
    in_specs = [
        pl.BlockSpec((None, tp, None, bf), lambda vi, fi, b, hh: (b, 0, hh, fi)),
        pl.BlockSpec((None, tp, None, bv), lambda vi, fi, b, hh: (b, 0, hh, vi)),
    ]
    args = [k, v]
    if decay:
        in_specs.append(pl.BlockSpec((None, None, tp), lambda vi, fi, b, hh: (b, hh, 0)))
        args.append(g)
    if has_init:
        in_specs.append(pl.BlockSpec((None, None, bf, bv), lambda vi, fi, b, hh: (b, hh, fi, vi)))
        args.append(s0)
    kernel = functools.partial(_states_kernel, c=c, nc=nc, decay=decay, has_init=has_init)
    return _sequential_call(cfg, kernel, in_specs, (bsz, h, fp, dvp), "linear_attn_states")(*args)


def _out_kernel(*refs, c, nf, bf, scale, decay):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    g_ref = refs.pop(0) if decay else None
    st_ref, o_ref = refs
    bv = o_ref.shape[-1]

    def body(fi, carry):
        qk, qs = carry
        f0 = pl.multiple_of(fi * bf, bf)
        qf = q_ref[:, pl.ds(f0, bf)]
        kf = k_ref[:, pl.ds(f0, bf)]
        sf = st_ref[pl.ds(f0, bf), :].astype(qf.dtype)
        return qk + _dot(qf, kf, trans_b=True), qs + _dot(qf, sf)

    qk, qs = lax.fori_loop(0, nf, body, (jnp.zeros((c, c), F32), jnp.zeros((c, bv), F32)))
    mask = _causal(c)
    if decay:
        b = g_ref[...]
        a = qk * _decay_matrix(b, mask)
        qs = qs * jnp.exp(b)[:, None]
    else:
        a = jnp.where(mask, qk, 0.0)
    v = v_ref[...]
    o = qs + _dot(a.astype(v.dtype), v)
    o_ref[...] = (o * scale).astype(o_ref.dtype)


def _outputs(cfg: _Cfg, q, k, v, g, states):
    bsz, tp, h, fp = q.shape
    dvp = v.shape[3]
    c, bv = cfg.chunk, cfg.block_v
    decay = g is not None
    chunk_f = pl.BlockSpec((None, c, None, fp), lambda vi, ci, b, hh: (b, ci, hh, 0))
    chunk_v = pl.BlockSpec((None, c, None, bv), lambda vi, ci, b, hh: (b, ci, hh, vi))
    in_specs, args = [chunk_f, chunk_f, chunk_v], [q, k, v]
    if decay:
        in_specs.append(pl.BlockSpec((None, None, c), lambda vi, ci, b, hh: (b, hh, ci)))
        args.append(g)
    in_specs.append(
        pl.BlockSpec((None, None, None, fp, bv), lambda vi, ci, b, hh: (b, hh, ci, 0, vi))
    )
    args.append(states)
    kernel = functools.partial(
        _out_kernel, c=c, nf=fp // cfg.block_f, bf=cfg.block_f, scale=cfg.scale, decay=decay
    )
    return _call(
        kernel,
        (dvp // bv, cfg.nc, bsz, h),
        in_specs,
        chunk_v,
        jax.ShapeDtypeStruct(v.shape, q.dtype),
        cfg,
        cfg.num_warps,
        cfg.num_stages,
        "linear_attn_out",
    )(*args)


def _in_chunk_cumsum(cfg: _Cfg, g):
    if g is None:
        return None
    bsz, h, tp = g.shape
    return jnp.cumsum(g.reshape(bsz, h, cfg.nc, cfg.chunk), axis=-1).reshape(bsz, h, tp)


def _forward(cfg: _Cfg, q, k, v, g, s0):
    gc = _in_chunk_cumsum(cfg, g)
    states, final = _states(cfg, k, v, gc, s0)
    return _outputs(cfg, q, k, v, gc, states), final


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _dstates_kernel(*refs, c, nc, scale, decay, has_final):
    refs = list(refs)
    q_ref, do_ref = refs.pop(0), refs.pop(0)
    g_ref = refs.pop(0) if decay else None
    dfin_ref = refs.pop(0) if has_final else None
    dst_ref, ds0_ref = refs
    d = dfin_ref[...] if has_final else jnp.zeros(ds0_ref.shape, F32)

    def body(j, d):
        i = nc - 1 - j
        dst_ref[i, :, :] = d.astype(dst_ref.dtype)
        t0 = pl.multiple_of(i * c, c)
        qq = q_ref[pl.ds(t0, c), :]
        dd = do_ref[pl.ds(t0, c), :]
        if decay:
            b = g_ref[pl.ds(t0, c)]
            last = g_ref[t0 + c - 1]
            qq = (qq.astype(F32) * jnp.exp(b)[:, None]).astype(qq.dtype)
            d = jnp.exp(last) * d
        return d + scale * _dot(qq, dd, trans_a=True)

    ds0_ref[...] = lax.fori_loop(0, nc, body, d)


def _dstates(cfg: _Cfg, q, do, g, dfinal):
    """Cotangents of every chunk's end state [B, H, NC, F, dv] and of the initial state."""
    bsz, tp, h, fp = q.shape
    dvp = do.shape[3]
    c, nc, bf, bv = cfg.chunk, cfg.nc, cfg.block_f_state, cfg.block_v_state
    decay, has_final = g is not None, dfinal is not None
    in_specs = [
        pl.BlockSpec((None, tp, None, bf), lambda vi, fi, b, hh: (b, 0, hh, fi)),
        pl.BlockSpec((None, tp, None, bv), lambda vi, fi, b, hh: (b, 0, hh, vi)),
    ]
    args = [q, do]
    if decay:
        in_specs.append(pl.BlockSpec((None, None, tp), lambda vi, fi, b, hh: (b, hh, 0)))
        args.append(g)
    if has_final:
        in_specs.append(pl.BlockSpec((None, None, bf, bv), lambda vi, fi, b, hh: (b, hh, fi, vi)))
        args.append(dfinal)
    kernel = functools.partial(
        _dstates_kernel, c=c, nc=nc, scale=cfg.scale, decay=decay, has_final=has_final
    )
    return _sequential_call(cfg, kernel, in_specs, (bsz, h, fp, dvp), "linear_attn_dstates")(*args)


def _dqk_kernel(*refs, c, nv, bv, scale, decay):
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref = refs.pop(0), refs.pop(0), refs.pop(0), refs.pop(0)
    g_ref = refs.pop(0) if decay else None
    st_ref, dst_ref, dq_ref, dk_ref = refs[:4]
    db_ref = refs[4] if decay else None
    bf = q_ref.shape[-1]

    def body(vi, carry):
        da, dqs, dks = carry
        v0 = pl.multiple_of(vi * bv, bv)
        vv = v_ref[:, pl.ds(v0, bv)]
        dd = do_ref[:, pl.ds(v0, bv)]
        s = st_ref[:, pl.ds(v0, bv)].astype(vv.dtype)
        dse = dst_ref[:, pl.ds(v0, bv)].astype(vv.dtype)
        da = da + _dot(dd, vv, trans_b=True)  # dO_i . v_j
        dqs = dqs + _dot(dd, s, trans_b=True)  # dO S^T
        dks = dks + _dot(vv, dse, trans_b=True)  # v dS^T
        return da, dqs, dks

    zeros = (jnp.zeros((c, c), F32), jnp.zeros((c, bf), F32), jnp.zeros((c, bf), F32))
    da, dqs, dks = lax.fori_loop(0, nv, body, zeros)
    mask = _causal(c)
    if decay:
        b = g_ref[...]
        last = g_ref[c - 1]
        da = da * _decay_matrix(b, mask) * scale
        dqs = dqs * (jnp.exp(b) * scale)[:, None]
        dks = dks * jnp.exp(last - b)[:, None]
    else:
        da = jnp.where(mask, da, 0.0) * scale
        dqs = dqs * scale
    qf = q_ref[...]
    kf = k_ref[...]
    dq = dqs + _dot(da.astype(kf.dtype), kf)
    dk = dks + _dot(da.astype(qf.dtype), qf, trans_a=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    if decay:
        db_ref[...] = jnp.sum(qf.astype(F32) * dq - kf.astype(F32) * dk, axis=1)


def _dv_kernel(*refs, c, nf, bf, scale, decay):
    refs = list(refs)
    q_ref, k_ref, do_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    g_ref = refs.pop(0) if decay else None
    dst_ref, dv_ref = refs
    bv = dv_ref.shape[-1]

    def body(fi, carry):
        kq, kds = carry
        f0 = pl.multiple_of(fi * bf, bf)
        qf = q_ref[:, pl.ds(f0, bf)]
        kf = k_ref[:, pl.ds(f0, bf)]
        dse = dst_ref[pl.ds(f0, bf), :].astype(kf.dtype)
        return kq + _dot(kf, qf, trans_b=True), kds + _dot(kf, dse)  # k_j . q_i ; k dS

    kq, kds = lax.fori_loop(0, nf, body, (jnp.zeros((c, c), F32), jnp.zeros((c, bv), F32)))
    mask = _causal(c, transpose=True)  # rows j (keys), columns i (queries), i >= j
    if decay:
        b = g_ref[...]
        last = g_ref[c - 1]
        a = kq * _decay_matrix(b, mask, transpose=True) * scale
        kds = kds * jnp.exp(last - b)[:, None]
    else:
        a = jnp.where(mask, kq, 0.0) * scale
    dd = do_ref[...]
    dv_ref[...] = (kds + _dot(a.astype(dd.dtype), dd)).astype(dv_ref.dtype)


def _grads(cfg: _Cfg, q, k, v, g, do, states, dstates):
    bsz, tp, h, fp = q.shape
    dvp = v.shape[3]
    c, nc, bf, bv = cfg.chunk, cfg.nc, cfg.block_f_bwd, cfg.block_v_bwd
    decay = g is not None
    gspec = pl.BlockSpec((None, None, c), lambda ti, ci, b, hh: (b, hh, ci))

    # dq, dk (and q.dq - k.dk per token): one program per (F tile, chunk, b, h).
    f_tile = pl.BlockSpec((None, c, None, bf), lambda fi, ci, b, hh: (b, ci, hh, fi))
    v_all = pl.BlockSpec((None, c, None, dvp), lambda fi, ci, b, hh: (b, ci, hh, 0))
    st_f = pl.BlockSpec((None, None, None, bf, dvp), lambda fi, ci, b, hh: (b, hh, ci, fi, 0))
    in_specs = [f_tile, f_tile, v_all, v_all] + ([gspec] if decay else []) + [st_f, st_f]
    args = [q, k, v, do] + ([g] if decay else []) + [states, dstates]
    out_specs = [f_tile, f_tile]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)]
    if decay:
        out_specs.append(pl.BlockSpec((None, None, None, c), lambda fi, ci, b, hh: (fi, b, hh, ci)))
        out_shape.append(jax.ShapeDtypeStruct((fp // bf, bsz, h, tp), F32))
    kernel = functools.partial(_dqk_kernel, c=c, nv=dvp // bv, bv=bv, scale=cfg.scale, decay=decay)
    res = _call(
        kernel,
        (fp // bf, nc, bsz, h),
        in_specs,
        out_specs,
        out_shape,
        cfg,
        cfg.num_warps_bwd,
        cfg.num_stages_bwd,
        "linear_attn_dqk",
    )(*args)
    dq, dk = res[0], res[1]
    db = res[2].sum(0) if decay else None

    # dv: one program per (dv tile, chunk, b, h).
    f_all = pl.BlockSpec((None, c, None, fp), lambda vi, ci, b, hh: (b, ci, hh, 0))
    v_tile = pl.BlockSpec((None, c, None, bv), lambda vi, ci, b, hh: (b, ci, hh, vi))
    st_v = pl.BlockSpec((None, None, None, fp, bv), lambda vi, ci, b, hh: (b, hh, ci, 0, vi))
    kernel = functools.partial(_dv_kernel, c=c, nf=fp // bf, bf=bf, scale=cfg.scale, decay=decay)
    dv = _call(
        kernel,
        (dvp // bv, nc, bsz, h),
        [f_all, f_all, v_tile] + ([gspec] if decay else []) + [st_v],
        v_tile,
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        cfg,
        cfg.num_warps_bwd,
        cfg.num_stages_bwd,
        "linear_attn_dv",
    )(q, k, do, *([g] if decay else []), dstates)
    return dq, dk, dv, db


# ------------------------------------------------------------------------------------------------
# custom_vjp
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Cfg, q, k, v, g, s0):
    o, final = _forward(cfg, q, k, v, g, s0)
    return (o, final) if cfg.want_final else o


def _core_fwd(cfg: _Cfg, q, k, v, g, s0):
    return _core(cfg, q, k, v, g, s0), (q, k, v, g, s0)


def _core_bwd(cfg: _Cfg, res, cts):
    q, k, v, g, s0 = res
    do, dfinal = cts if cfg.want_final else (cts, None)
    gc = _in_chunk_cumsum(cfg, g)
    states, final = _states(cfg, k, v, gc, s0)
    dstates, ds0 = _dstates(cfg, q, do, gc, dfinal)
    dq, dk, dv, db = _grads(cfg, q, k, v, gc, do, states, dstates)
    dg = None
    if g is not None:
        if dfinal is not None:  # d/dB_T of the final state: <S_T, dS_T>
            db = db.at[..., -1].add(jnp.sum(final * dfinal, axis=(-2, -1)))
        dg = lax.cumsum(db, axis=2, reverse=True)
    return dq, dk, dv, dg, (None if s0 is None else ds0)


_core.defvjp(_core_fwd, _core_bwd)


def _pad(x, widths):
    widths = [(0, w) for w in widths]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


@functools.partial(jax.jit, static_argnums=0)
def _run(cfg: _Cfg, q, k, v, g, s0):
    bsz, t, h, f = q.shape
    dv = v.shape[3]
    tp = cfg.nc * cfg.chunk
    fp = _round_up(f, max(cfg.block_f, cfg.block_f_state, cfg.block_f_bwd))
    dvp = _round_up(dv, max(cfg.block_v, cfg.block_v_state, cfg.block_v_bwd))
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    qp = _pad(q.astype(dtype), (0, tp - t, 0, fp - f))
    kp = _pad(k.astype(dtype), (0, tp - t, 0, fp - f))
    vp = _pad(v.astype(dtype), (0, tp - t, 0, dvp - dv))
    gp = None
    if g is not None:
        gp = _pad(jnp.transpose(decay_per_token(g, (bsz, t, h)), (0, 2, 1)), (0, 0, tp - t))
    sp = None if s0 is None else _pad(jnp.asarray(s0, F32), (0, 0, fp - f, dvp - dv))
    res = _core(cfg, qp, kp, vp, gp, sp)
    o, final = res if cfg.want_final else (res, None)
    o = o[:, :t, :, :dv].astype(q.dtype)
    return (o, final[:, :, :f, :dv]) if cfg.want_final else o


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def _check_tile(name, value, default):
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 16
        or (value & (value - 1))
    ):
        raise ValueError(f"{name}={value!r}: expected a power of two >= 16 (Triton tiles)")
    return int(value)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return int(value)


def chunked_linear_attention(
    q,
    k,
    v,
    g=None,
    *,
    scale=1.0,
    initial_state=None,
    return_final_state=False,
    chunk_size=64,
    block_f=None,
    block_v=None,
    block_f_state=None,
    block_v_state=None,
    block_f_bwd=None,
    block_v_bwd=None,
    num_warps=4,
    num_stages=2,
    num_warps_state=8,
    num_stages_state=3,
    num_warps_bwd=4,
    num_stages_bwd=2,
    state_dtype=None,
    interpret=False,
):
    """Causal linear attention, chunked (semantics: :mod:`pallas_kernels.linear_attention`).

    Args:
      q, k: [B, T, H, F]; v: [B, T, H, dv] (bf16 / fp16 / fp32; computed in their common dtype).
      g: None, [H] or float32 [B, T, H] log-decays (<= 0). initial_state: float32 [B, H, F, dv].
      scale: multiplies ``q``. chunk_size: power of two >= 16 (tokens per chunk).
      block_f, block_v: the output kernel's F tile (looped) and dv tile (per program); default:
        a power of two <= 128 covering F / dv with little padding.
      block_f_state, block_v_state: tiles of the sequential state kernels (default <= 64,
        smaller when batch x heads is small: ``_state_tiles``).
      block_f_bwd, block_v_bwd: tiles of the dq/dk (per F tile) and dv (per dv tile) kernels
        (default: block_f and <= 64). Defaults follow the H200 sweep (BENCHMARKS.md). All tiles are powers of two >= 16; F and dv are padded to the largest.
      num_warps*, num_stages*: Triton knobs of the output, state and gradient kernels.
      state_dtype: dtype of the stored per-chunk states and state cotangents; None: the
        inputs' dtype (lossless, see the module docstring), or float32 / bfloat16 / float16.
      interpret: run with the Pallas interpreter (CPU tests).

    Returns:
      o [B, T, H, dv] in q.dtype, and the final state float32 [B, H, F, dv] when
      ``return_final_state``. Differentiable in q, k, v, g and initial_state.
    """
    bsz, t, h, f, dv = check_args(q, k, v, g, initial_state, chunk_size)
    check_float(q=q, k=k, v=v, g=g, initial_state=initial_state)
    if t < 1:
        raise ValueError(f"q shape {tuple(q.shape)}: expected at least one token (T >= 1)")
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a power of two >= 16 (Triton tiles)")
    if state_dtype is None:
        state_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    allowed = (jnp.dtype(F32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    try:
        ok = jnp.dtype(state_dtype) in allowed
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            f"state_dtype={state_dtype!r}: expected None, float32, bfloat16 or float16"
        )
    chunk = min(int(chunk_size), max(16, _next_pow2(t)))
    block_f = _check_tile("block_f", block_f, _auto_tile(f))
    block_v = _check_tile("block_v", block_v, _auto_tile(dv))
    state_f, state_v = _state_tiles(bsz * h, f, dv, min(64, block_f), min(64, block_v))
    cfg = _Cfg(
        scale=check_scale(scale),
        chunk=chunk,
        nc=-(-t // chunk),
        block_f=block_f,
        block_v=block_v,
        block_f_state=_check_tile("block_f_state", block_f_state, state_f),
        block_v_state=_check_tile("block_v_state", block_v_state, state_v),
        block_f_bwd=_check_tile("block_f_bwd", block_f_bwd, block_f),
        block_v_bwd=_check_tile("block_v_bwd", block_v_bwd, min(64, block_v)),
        num_warps=_check_positive("num_warps", num_warps),
        num_stages=_check_positive("num_stages", num_stages),
        num_warps_state=_check_positive("num_warps_state", num_warps_state),
        num_stages_state=_check_positive("num_stages_state", num_stages_state),
        num_warps_bwd=_check_positive("num_warps_bwd", num_warps_bwd),
        num_stages_bwd=_check_positive("num_stages_bwd", num_stages_bwd),
        state_dtype=jnp.dtype(state_dtype).name,
        want_final=bool(return_final_state),
        interpret=bool(interpret),
    )
    return _run(cfg, q, k, v, g, initial_state)


# ------------------------------------------------------------------------------------------------
# Decode step
# ------------------------------------------------------------------------------------------------


def _step_body(q_ref, k_ref, v_ref, g_ref, s_ref, o_ref, snew_ref, *, f, dv, bf, bv, nf, scale):
    v0 = pl.multiple_of(pl.program_id(0) * bv, bv)
    cols = v0 + lax.broadcasted_iota(jnp.int32, (bv,), 0)
    cmask = cols < dv
    vv = pltriton.load(v_ref.at[pl.ds(v0, bv)], mask=cmask, other=0).astype(F32)
    a = None if g_ref is None else jnp.exp(g_ref[()])

    def body(fi, o):
        f0 = pl.multiple_of(fi * bf, bf)
        rmask = (f0 + lax.broadcasted_iota(jnp.int32, (bf,), 0)) < f
        qf = pltriton.load(q_ref.at[pl.ds(f0, bf)], mask=rmask, other=0).astype(F32)
        kf = pltriton.load(k_ref.at[pl.ds(f0, bf)], mask=rmask, other=0).astype(F32)
        m2 = rmask[:, None] & cmask[None, :]
        tile = (pl.ds(f0, bf), pl.ds(v0, bv))
        s = pltriton.load(s_ref.at[tile], mask=m2, other=0.0)
        if a is not None:
            s = a * s
        s = s + kf[:, None] * vv[None, :]
        pltriton.store(snew_ref.at[tile], s, mask=m2)
        return o + jnp.sum(qf[:, None] * s, axis=0)

    o = lax.fori_loop(0, nf, body, jnp.zeros((bv,), F32))
    pltriton.store(o_ref.at[pl.ds(v0, bv)], (o * scale).astype(o_ref.dtype), mask=cmask)


@functools.partial(jax.jit, static_argnames=("scale", "bf", "bv", "num_warps", "interpret"))
def _step(q, k, v, g, state, *, scale, bf, bv, num_warps, interpret):
    bsz, h, f = q.shape
    dv = v.shape[2]
    decay = g is not None
    vec = lambda n: pl.BlockSpec((None, None, n), lambda vi, b, hh: (b, hh, 0))
    mat = pl.BlockSpec((None, None, f, dv), lambda vi, b, hh: (b, hh, 0, 0))
    in_specs = [vec(f), vec(f), vec(dv)]
    args = [q, k, v]
    if decay:
        in_specs.append(pl.BlockSpec((None, None), lambda vi, b, hh: (b, hh)))
        args.append(decay_per_token(g, (bsz, h)))
    in_specs.append(mat)
    args.append(jnp.asarray(state, F32))

    def kernel(*refs):
        refs = list(refs)
        q_ref, k_ref, v_ref = refs[:3]
        g_ref = refs[3] if decay else None
        s_ref, o_ref, snew_ref = refs[-3:]
        _step_body(
            q_ref,
            k_ref,
            v_ref,
            g_ref,
            s_ref,
            o_ref,
            snew_ref,
            f=f,
            dv=dv,
            bf=bf,
            bv=bv,
            nf=-(-f // bf),
            scale=scale,
        )

    return pl.pallas_call(
        kernel,
        grid=(-(-dv // bv), bsz, h),
        in_specs=in_specs,
        out_specs=[vec(dv), mat],
        out_shape=[
            jax.ShapeDtypeStruct((bsz, h, dv), q.dtype),
            jax.ShapeDtypeStruct((bsz, h, f, dv), F32),
        ],
        input_output_aliases={len(args) - 1: 1},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="linear_attn_step",
    )(*args)


def linear_attention_step(
    q, k, v, g, state, *, scale=1.0, block_f=None, block_v=None, num_warps=4, interpret=False
):
    """One decode token: ``S' = exp(g) S + k^T v``, ``o = scale * q S'``.

    q, k [B, H, F]; v [B, H, dv]; g None, [H] or [B, H]; state float32 [B, H, F, dv] (updated in
    place when donated). block_f, block_v: powers of two >= 16 (default <= 64 / <= 32) tiling
    the state; a program owns one dv tile (more, smaller tiles: more programs for this
    memory-bound step) and loops over F. Returns ``(o [B, H, dv] in q.dtype, new_state float32)``; forward only.
    """
    _, _, f, dv = check_step_args(q, k, v, g, state)
    check_float(q=q, k=k, v=v, g=g, state=state)
    bf = _check_tile("block_f", block_f, min(64, max(16, _next_pow2(f))))
    bv = _check_tile("block_v", block_v, min(32, max(16, _next_pow2(dv))))
    return _step(
        q,
        k,
        v,
        g,
        state,
        scale=check_scale(scale),
        bf=bf,
        bv=bv,
        num_warps=_check_positive("num_warps", num_warps),
        interpret=bool(interpret),
    )
