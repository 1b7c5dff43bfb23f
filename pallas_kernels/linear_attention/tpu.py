"""Chunked causal linear attention with log-space decay on TPU: Pallas Mosaic, fwd + bwd + decode.

Semantics: the package docstring (``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``).
Lightning-Attention-2 / SSD chunk algorithm, one kernel per direction, re-derived from the math:

* Layout: q, k -> ``[B*H, Tp, Fp]``, v -> ``[B*H, Tp, dvp]`` (XLA transpose + zero pad; ``Fp``,
  ``dvp`` multiples of 128; ``Tp`` a multiple of the kernel chunk ``C``). ``C`` is
  ``chunk_size`` rounded up to a multiple of 128 (and at most ``T`` rounded up to 128), so every
  tile, transposed ``[C, Fp]`` tiles included, is (8, 128)-aligned; the chunk size only moves
  work between the intra- and inter-chunk terms, the result is the same. Padded keys / values
  are 0 and padded steps have ``g = 0``: they change nothing.
* ``b`` = in-chunk cumulative log-decay (XLA), passed as a column ``[Tp, 1]`` and a row
  ``[1, Tp]`` so no in-kernel transpose is needed; ``b_L`` is the chunk's last entry. Decay only
  enters as ``exp(b_i - b_j)`` (``j <= i``), ``exp(b_i)``, ``exp(b_L - b_j)`` and ``exp(b_L)``:
  every exponent is ``<= 0`` for ``g <= 0``, so long sequences never meet 0/0 or inf.
* Forward: grid ``(B*H, dv tiles, chunks)``, chunks ``"arbitrary"``, fp32 state ``[Fp, dv_tile]``
  in VMEM scratch::

      o_c = ((q k^T) * scale D) v + scale exp(b) * (q S)        D_ij = exp(b_i - b_j), j <= i
      S  <- exp(b_L) S + k^T (exp(b_L - b) * v)

  Under ``jax.grad`` it also writes every chunk-start state (``[B*H, nc, Fp, dvp]`` fp32,
  ``T / C`` states per head) as the backward's residual.
* Backward: the same grid with the chunk axis reversed, ``dS`` (the cotangent of the state after
  the current chunk, seeded with that of the final state) in VMEM scratch::

      dA = (dO v^T) * scale D,   A = (q k^T) * scale D
      dq = scale exp(b) * (dO S^T) + dA k
      dk = dA^T q + exp(b_L - b) * (v dS^T)
      dv = A^T dO + exp(b_L - b) * (k dS)
      dS <- exp(b_L) dS + q^T (scale exp(b) * dO)          (after the last step: d initial_state)
      dg_t = sum_{i >= t in chunk} (q_i . dq_i - k_i . dk_i) + <S_end, dS_end>

  (the ``dg`` identity: ``b_i`` scales ``q_i``'s reads and divides ``k_i``'s writes, and
  ``b_L`` scales the chunk's end state). ``<S_end, dS_end> = exp(b_L) <S, dS> + sum(k * dk_state)``
  needs no end state. dq, dk, dg are partial sums per dv tile (summed in XLA when dv > one
  tile). A constant ``g [H]`` is broadcast before the kernel, so autodiff sums its per-token
  gradient.
* Precision: fp32 inputs use HIGHEST-precision matmuls. bf16 inputs feed bf16 to the MXU; an
  fp32 operand (states, decayed tiles, ``A``, ``dA``) is split as ``hi + lo`` (two bf16 passes,
  ~16 mantissa bits), so states and accumulation are effectively fp32 and the error is that of
  rounding the inputs / output. The kernels are memory-bound at F = dv = 128, so the extra MXU
  pass is cheap. Transposes are done on fp32 tiles (then re-cast exactly).
* Decode (:func:`linear_attention_step`): grid ``(B*H / heads per block, dv tiles)``, VPU only
  (outer product ``k^T v`` and a sublane reduction for ``q S``), the fp32 state updated in place
  (``input_output_aliases``; donate it under jit to avoid a copy). No padding: blocks use the
  full F (and dv unless it is a large multiple of 128).

Not done: chunk-level parallelism over the sequence (one program per head and dv tile walks all
chunks, as Lightning-Attention-2's TPU-friendly form), recomputing states instead of saving them
(``T/C * F * dv * 4`` bytes per head), value checks of ``g <= 0`` (would need a host sync).
Checked in TPU interpret mode and by ``jax.export(..., platforms=["tpu"])`` (Pallas -> Mosaic
lowering; Mosaic's own layout passes run only in libtpu); no TPU was available to run or time it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import tpu_interpret_params
from pallas_kernels.linear_attention import (
    check_args,
    check_float,
    check_scale,
    check_step_args,
    decay_per_token,
)

__all__ = ["chunked_linear_attention", "linear_attention_step"]

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
_F32 = jnp.float32
_DEFAULT_VMEM = 16 * 2**20
_MAX_VMEM = 100 * 2**20


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class _Cfg:
    scale: float
    chunk: int  # C
    nc: int  # chunks
    fp: int  # padded F
    dvt: int  # dv tile
    ndv: int  # dv tiles
    exact: bool  # fp32 inputs: HIGHEST matmuls; else bf16 MXU with hi/lo split fp32 operands
    has_s0: bool
    interpret: Any


# ------------------------------------------------------------------------------------------------
# In-kernel helpers
# ------------------------------------------------------------------------------------------------


def _split(x):
    """bf16 operand -> [x]; fp32 operand -> [hi, lo] bf16 with ``hi + lo ~= x`` (16 bits)."""
    if x.dtype != _F32:
        return [x]
    hi = x.astype(jnp.bfloat16)
    return [hi, (x - hi.astype(_F32)).astype(jnp.bfloat16)]


def _mm(a, b, dims, exact: bool):
    """fp32-accurate matmul: HIGHEST in fp32 mode; bf16 passes over hi/lo parts otherwise."""
    if exact:
        return lax.dot_general(
            a.astype(_F32),
            b.astype(_F32),
            dims,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=_F32,
        )
    out = None
    for i, x in enumerate(_split(a)):
        for j, y in enumerate(_split(b)):
            if i + j > 1:  # lo * lo is below the kept precision
                continue
            r = lax.dot_general(x, y, dims, preferred_element_type=_F32)
            out = r if out is None else out + r
    return out


def _t(x, exact: bool):
    """Transpose of a 2-D tile, done in fp32; low-precision tiles are re-cast (exactly)."""
    xt = x.astype(_F32).T
    return xt if exact or x.dtype == _F32 else xt.astype(x.dtype)


def _sum_all(x):
    """Sum of a 2-D array as ``[1, 1]``."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _decays(bc_ref, br_ref, cfg: _Cfg):
    """(causal mask, scale * D, b column [C,1], b_L [1,1]) of the current chunk."""
    c = cfg.chunk
    bc, br = bc_ref[...], br_ref[...]  # [C, 1], [1, C]
    lane = lax.broadcasted_iota(jnp.int32, br.shape, 1)
    bl = jnp.sum(jnp.where(lane == c - 1, br, 0.0), axis=1, keepdims=True)  # [1, 1]
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    causal = row >= col
    sd = cfg.scale * jnp.exp(jnp.where(causal, bc - br, -jnp.inf))  # exponents <= 0 where kept
    return causal, sd, bc, bl


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Cfg, save: bool):
    q_ref, k_ref, v_ref, bc_ref, br_ref = refs[:5]
    refs = refs[5:]
    s0_ref = None
    if cfg.has_s0:
        s0_ref, refs = refs[0], refs[1:]
    o_ref, st_ref = refs[:2]
    states_ref = refs[2] if save else None
    s_sc = refs[-1]
    c = pl.program_id(2)
    ex = cfg.exact

    @pl.when(c == 0)
    def _init():
        s_sc[...] = s0_ref[...] if cfg.has_s0 else jnp.zeros(s_sc.shape, _F32)

    s_prev = s_sc[...]
    if save:
        states_ref[...] = s_prev
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    _, sd, bc, bl = _decays(bc_ref, br_ref, cfg)
    a = _mm(q, k, NT, ex) * sd  # [C, C]
    o = _mm(a, v, NN, ex) + (cfg.scale * jnp.exp(bc)) * _mm(q, s_prev, NN, ex)
    o_ref[...] = o.astype(o_ref.dtype)
    vd = jnp.exp(bl - bc) * v.astype(_F32)  # values decayed to the chunk end
    s_new = jnp.exp(bl) * s_prev + _mm(_t(k, ex), vd, NN, ex)
    s_sc[...] = s_new

    @pl.when(c == cfg.nc - 1)
    def _final():
        st_ref[...] = s_new


def _compiler_params(est_bytes: int, semantics):
    limit = None
    if est_bytes > _DEFAULT_VMEM * 3 // 4:
        limit = min(int(est_bytes * 1.5), _MAX_VMEM)
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _fwd_vmem(cfg: _Cfg, isz: int, save: bool) -> int:
    c, fp, dvt = cfg.chunk, cfg.fp, cfg.dvt
    blocks = 2 * (2 * c * fp * isz + 2 * c * dvt * isz + 2 * c * LANES * 4)
    states = (2 * (int(cfg.has_s0) + 1 + int(save)) + 1) * fp * dvt * 4
    temps = 5 * c * c * 4 + 3 * c * fp * 4 + 3 * fp * dvt * 4
    return blocks + states + temps


def _forward(cfg: _Cfg, q, k, v, bc, br, s0, *, save: bool):
    bh, tp, fp = q.shape
    dvp = v.shape[2]
    c, dvt = cfg.chunk, cfg.dvt
    in_specs = [
        pl.BlockSpec((None, c, fp), lambda i, j, t: (i, t, 0)),
        pl.BlockSpec((None, c, fp), lambda i, j, t: (i, t, 0)),
        pl.BlockSpec((None, c, dvt), lambda i, j, t: (i, t, j)),
        pl.BlockSpec((None, c, 1), lambda i, j, t: (i, t, 0)),
        pl.BlockSpec((None, 1, c), lambda i, j, t: (i, 0, t)),
    ]
    args = [q, k, v, bc, br]
    if cfg.has_s0:
        in_specs.append(pl.BlockSpec((None, fp, dvt), lambda i, j, t: (i, 0, j)))
        args.append(s0)
    out_specs = [
        pl.BlockSpec((None, c, dvt), lambda i, j, t: (i, t, j)),
        pl.BlockSpec((None, fp, dvt), lambda i, j, t: (i, 0, j)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((bh, tp, dvp), q.dtype),
        jax.ShapeDtypeStruct((bh, fp, dvp), _F32),
    ]
    if save:
        out_specs.append(pl.BlockSpec((None, None, fp, dvt), lambda i, j, t: (i, t, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((bh, cfg.nc, fp, dvp), _F32))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, save=save),
        grid=(bh, cfg.ndv, cfg.nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((fp, dvt), _F32)],
        compiler_params=_compiler_params(
            _fwd_vmem(cfg, q.dtype.itemsize, save), ("parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="linear_attention_fwd",
    )(*args)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _bwd_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    bc_ref,
    br_ref,
    sp_ref,
    dst_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    dg_ref,
    ds0_ref,
    ds_sc,
    *,
    cfg: _Cfg,
):
    c = pl.program_id(2)
    ex = cfg.exact

    @pl.when(c == 0)
    def _init():
        ds_sc[...] = dst_ref[...]

    ds = ds_sc[...]  # cotangent of the state after this chunk
    s_prev = sp_ref[...]  # state before this chunk
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    causal, sd, bc, bl = _decays(bc_ref, br_ref, cfg)
    eq = cfg.scale * jnp.exp(bc)  # [C, 1]
    ek = jnp.exp(bl - bc)  # [C, 1]
    el = jnp.exp(bl)  # [1, 1]

    a = _mm(q, k, NT, ex) * sd  # [C, C]
    da = _mm(do, v, NT, ex) * sd
    dq = eq * _mm(do, s_prev, NT, ex) + _mm(da, k, NN, ex)
    dk_state = ek * _mm(v, ds, NT, ex)
    dk = _mm(da.T, q, NN, ex) + dk_state
    dv = _mm(a.T, do, NN, ex) + ek * _mm(k, ds, NN, ex)

    q32, k32 = q.astype(_F32), k.astype(_F32)
    x = jnp.sum(q32 * dq - k32 * dk, axis=1, keepdims=True)  # [C, 1]
    end = el * _sum_all(s_prev * ds) + _sum_all(k32 * dk_state)  # <S_end, dS_end>, [1, 1]
    dg_ref[...] = jnp.sum(jnp.where(causal, x, 0.0), axis=0, keepdims=True) + end  # [1, C]
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

    ds_new = el * ds + _mm(_t(q, ex), eq * do.astype(_F32), NN, ex)
    ds_sc[...] = ds_new

    @pl.when(c == cfg.nc - 1)
    def _first_chunk():
        ds0_ref[...] = ds_new


def _bwd_vmem(cfg: _Cfg, isz: int, gsz: int) -> int:
    c, fp, dvt = cfg.chunk, cfg.fp, cfg.dvt
    blocks = 2 * (2 * c * fp * isz + 3 * c * dvt * isz + 2 * c * fp * gsz + 3 * c * LANES * 4)
    states = 7 * fp * dvt * 4
    temps = 8 * c * c * 4 + 6 * c * fp * 4 + 3 * fp * dvt * 4
    return blocks + states + temps


def _backward(cfg: _Cfg, q, k, v, do, bc, br, states, dst):
    bh, tp, fp = q.shape
    dvp = v.shape[2]
    c, dvt, nc, ndv = cfg.chunk, cfg.dvt, cfg.nc, cfg.ndv
    rev = lambda t: nc - 1 - t  # noqa: E731
    gdt = q.dtype if ndv == 1 else _F32  # partial sums over dv tiles stay fp32
    in_specs = [
        pl.BlockSpec((None, c, fp), lambda i, j, t: (i, rev(t), 0)),
        pl.BlockSpec((None, c, fp), lambda i, j, t: (i, rev(t), 0)),
        pl.BlockSpec((None, c, dvt), lambda i, j, t: (i, rev(t), j)),
        pl.BlockSpec((None, c, dvt), lambda i, j, t: (i, rev(t), j)),
        pl.BlockSpec((None, c, 1), lambda i, j, t: (i, rev(t), 0)),
        pl.BlockSpec((None, 1, c), lambda i, j, t: (i, 0, rev(t))),
        pl.BlockSpec((None, None, fp, dvt), lambda i, j, t: (i, rev(t), 0, j)),
        pl.BlockSpec((None, fp, dvt), lambda i, j, t: (i, 0, j)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, c, fp), lambda i, j, t: (i, j, rev(t), 0)),
        pl.BlockSpec((None, None, c, fp), lambda i, j, t: (i, j, rev(t), 0)),
        pl.BlockSpec((None, c, dvt), lambda i, j, t: (i, rev(t), j)),
        pl.BlockSpec((None, None, 1, c), lambda i, j, t: (i, j, 0, rev(t))),
        pl.BlockSpec((None, fp, dvt), lambda i, j, t: (i, 0, j)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((bh, ndv, tp, fp), gdt),
        jax.ShapeDtypeStruct((bh, ndv, tp, fp), gdt),
        jax.ShapeDtypeStruct((bh, tp, dvp), v.dtype),
        jax.ShapeDtypeStruct((bh, ndv, 1, tp), _F32),
        jax.ShapeDtypeStruct((bh, fp, dvp), _F32),
    ]
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg),
        grid=(bh, ndv, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((fp, dvt), _F32)],
        compiler_params=_compiler_params(
            _bwd_vmem(cfg, q.dtype.itemsize, jnp.dtype(gdt).itemsize),
            ("parallel", "parallel", "arbitrary"),
        ),
        interpret=cfg.interpret,
        name="linear_attention_bwd",
    )(q, k, v, do, bc, br, states, dst)


# ------------------------------------------------------------------------------------------------
# custom_vjp on the kernel layout
# ------------------------------------------------------------------------------------------------


def _cumulative(cfg: _Cfg, g):
    """g [BH, Tp] -> in-chunk cumulative log-decay as a column [BH, Tp, 1] and a row [BH, 1, Tp]."""
    bh, tp = g.shape
    b = jnp.cumsum(g.reshape(bh, cfg.nc, cfg.chunk), axis=-1).reshape(bh, tp)
    return b[:, :, None], b[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Cfg, q, k, v, g, s0):
    o, st = _forward(cfg, q, k, v, *_cumulative(cfg, g), s0, save=False)
    return o, st


def _core_fwd(cfg: _Cfg, q, k, v, g, s0):
    bc, br = _cumulative(cfg, g)
    o, st, states = _forward(cfg, q, k, v, bc, br, s0, save=True)
    return (o, st), (q, k, v, bc, br, states)


def _core_bwd(cfg: _Cfg, res, cts):
    q, k, v, bc, br, states = res
    do, dst = cts
    dq, dk, dv, dg, ds0 = _backward(
        cfg, q, k, v, do.astype(q.dtype), bc, br, states, dst.astype(_F32)
    )
    dq = jnp.sum(dq, axis=1).astype(q.dtype) if cfg.ndv > 1 else dq[:, 0]
    dk = jnp.sum(dk, axis=1).astype(k.dtype) if cfg.ndv > 1 else dk[:, 0]
    dg = jnp.sum(dg[:, :, 0, :], axis=1)
    return dq, dk, dv, dg, (ds0 if cfg.has_s0 else None)


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def _compute_dtype(*xs):
    """bf16 MXU path when every operand is bf16, else fp32 (fp16 included: no fp16 MXU path)."""
    return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in xs) else _F32


def _dv_tile(dvp: int, fp: int) -> int:
    return 256 if dvp % 256 == 0 and fp <= 512 else LANES


def chunked_linear_attention(
    q,
    k,
    v,
    g=None,
    *,
    scale=1.0,
    initial_state=None,
    return_final_state=False,
    chunk_size=128,
    interpret=False,
):
    """Causal linear attention with per-token log-decay, chunked, on TPU (module docstring).

    Args:
      q, k: ``[B, T, H, F]``; v: ``[B, T, H, dv]`` (fp32 or bf16; other float dtypes run in
        fp32). g: float log-decay ``[B, T, H]``, ``[H]`` or None; values must be ``<= 0``.
      scale: multiplies ``q``. initial_state: float32 ``[B, H, F, dv]`` or None (zeros).
      return_final_state: also return the final state. chunk_size: static int >= 16 (rounded
        up to a multiple of 128 here). interpret: False, True or ``pltpu.InterpretParams``
        (TPU interpret mode on CPU).

    Returns ``o [B, T, H, dv]`` in ``q.dtype`` (and the final state, float32 ``[B, H, F, dv]``).
    Differentiable in q, k, v, g and initial_state.
    """
    b, t, h, f, dv = check_args(q, k, v, g, initial_state, chunk_size)
    check_float(q=q, k=k, v=v, g=g, initial_state=initial_state)
    if t < 1:
        raise ValueError(f"q shape {tuple(q.shape)}: expected at least one token (T >= 1)")
    c = min(_round_up(int(chunk_size), LANES), _round_up(t, LANES))
    tp = _round_up(t, c)
    fp, dvp = _round_up(f, LANES), _round_up(dv, LANES)
    dvt = _dv_tile(dvp, fp)
    dtype = _compute_dtype(q, k, v)
    cfg = _Cfg(
        scale=check_scale(scale),
        chunk=c,
        nc=tp // c,
        fp=fp,
        dvt=dvt,
        ndv=dvp // dvt,
        exact=dtype == _F32,
        has_s0=initial_state is not None,
        interpret=tpu_interpret_params(interpret),
    )
    o, st = _apply(cfg, q, k, v, decay_per_token(g, (b, t, h)), initial_state)
    o = o.astype(q.dtype)
    return (o, st) if return_final_state else o


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(cfg: _Cfg, q, k, v, g, s0):
    b, t, h, f = q.shape
    dv = v.shape[3]
    bh, tp = b * h, cfg.nc * cfg.chunk
    dvp = cfg.ndv * cfg.dvt
    dtype = jnp.bfloat16 if not cfg.exact else _F32

    def layout(x, width):  # [B, T, H, X] -> [B*H, Tp, width]
        x = jnp.swapaxes(x.astype(dtype), 1, 2).reshape(bh, t, x.shape[3])
        return jnp.pad(x, ((0, 0), (0, tp - t), (0, width - x.shape[2])))

    gp = jnp.pad(jnp.swapaxes(g, 1, 2).reshape(bh, t), ((0, 0), (0, tp - t)))
    if s0 is not None:
        s0 = jnp.asarray(s0, _F32).reshape(bh, f, dv)
        s0 = jnp.pad(s0, ((0, 0), (0, cfg.fp - f), (0, dvp - dv)))
    o, st = _core(cfg, layout(q, cfg.fp), layout(k, cfg.fp), layout(v, dvp), gp, s0)
    o = jnp.swapaxes(o[:, :t, :dv].reshape(b, h, t, dv), 1, 2)
    return o, st[:, :f, :dv].reshape(b, h, f, dv)


# ------------------------------------------------------------------------------------------------
# Decode step
# ------------------------------------------------------------------------------------------------


def _step_kernel(q_ref, k_ref, v_ref, g_ref, s_ref, o_ref, so_ref, *, scale: float):
    # q, k [hb, F, 1]; v [hb, 1, dvt]; g [hb, 1, 1]; state [hb, F, dvt]: all fp32, VPU only.
    s = jnp.exp(g_ref[...]) * s_ref[...] + k_ref[...] * v_ref[...]
    so_ref[...] = s
    o_ref[...] = scale * jnp.sum(q_ref[...] * s, axis=1, keepdims=True)


def _step_tiles(bh: int, f: int, dv: int) -> tuple[int, int]:
    """(heads per block, dv tile): dv whole unless a large multiple of 128; ~512 KiB states."""
    dvt = dv
    if dv % LANES == 0 and dv > 512:
        dvt = next(w for w in (512, 256, 128) if dv % w == 0)
    per_head = _round_up(f, 8) * _round_up(dvt, LANES) * 4
    cap = max(1, (512 * 1024) // per_head)
    hb = max(d for d in range(1, min(bh, cap) + 1) if bh % d == 0)
    return hb, dvt


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def _step(q, k, v, g, state, *, scale, interpret):
    b, h, f = q.shape
    dv = v.shape[2]
    bh = b * h
    hb, dvt = _step_tiles(bh, f, dv)
    col = lambda x: jnp.asarray(x, _F32).reshape(bh, f, 1)  # noqa: E731
    vr = jnp.asarray(v, _F32).reshape(bh, 1, dv)
    gr = g.reshape(bh, 1, 1)
    st = jnp.asarray(state, _F32).reshape(bh, f, dv)
    fpad, dpad = _round_up(f, 8), _round_up(dvt, LANES)
    est = 2 * hb * (2 * fpad * dpad + 2 * fpad * LANES + 2 * 8 * dpad + 8 * LANES) * 4
    o, st = pl.pallas_call(
        functools.partial(_step_kernel, scale=scale),
        grid=(bh // hb, dv // dvt),
        in_specs=[
            pl.BlockSpec((hb, f, 1), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((hb, f, 1), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((hb, 1, dvt), lambda i, j: (i, 0, j)),
            pl.BlockSpec((hb, 1, 1), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((hb, f, dvt), lambda i, j: (i, 0, j)),
        ],
        out_specs=[
            pl.BlockSpec((hb, 1, dvt), lambda i, j: (i, 0, j)),
            pl.BlockSpec((hb, f, dvt), lambda i, j: (i, 0, j)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((bh, 1, dv), _F32),
            jax.ShapeDtypeStruct((bh, f, dv), _F32),
        ],
        input_output_aliases={4: 1},
        compiler_params=_compiler_params(est, ("parallel", "parallel")),
        interpret=interpret,
        name="linear_attention_step",
    )(col(q), col(k), vr, gr, st)
    return o.reshape(b, h, dv).astype(q.dtype), st.reshape(b, h, f, dv)


def linear_attention_step(q, k, v, g, state, *, scale=1.0, interpret=False):
    """One decode step on TPU: ``S = exp(g) S + k^T v``, ``o = scale q S``.

    q, k ``[B, H, F]``; v ``[B, H, dv]``; g ``[B, H]``, ``[H]`` or None; state float32
    ``[B, H, F, dv]`` (updated in place when donated under jit). Returns ``(o [B, H, dv] in
    q.dtype, new_state float32)``. Forward only.
    """
    b, h, _, _ = check_step_args(q, k, v, g, state)
    check_float(q=q, k=k, v=v, g=g, state=state)
    return _step(
        q,
        k,
        v,
        decay_per_token(g, (b, h)),
        state,
        scale=check_scale(scale),
        interpret=tpu_interpret_params(interpret),
    )
