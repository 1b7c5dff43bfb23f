"""Block-sparse flash attention for TPUs: Pallas Mosaic TPU, forward and backward (splash design).

The :class:`~pallas_kernels.common.BlockPlan` of the block map drives every kernel. Its
per-query-block key-block lists (``kv_index``, with the FULL flag packed in as ``2 * index +
full``) and counts are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``); the K/V
``BlockSpec`` index maps read them, so only listed tiles are DMA'd. The innermost grid axis runs
over ``max(count)`` (a dynamic grid bound); steps past a row's count are skipped with ``pl.when``
and their index map repeats the last listed tile (the plan's tail), so they issue no DMA.
FULL tiles do no mask work; PARTIAL tiles evaluate ``mask_fn`` on the row / column features,
which arrive through their own ``BlockSpec`` s as ``int32 [B|1, F, 1, T]`` (lane-major).

* Layout: q/k/v are transposed to head-major ``[B, N, T, H]`` and padded to block multiples
  here (an XLA transpose each; TPU tiles need the sequence and head dims minor). Keys >= ``Tk``
  are masked in the last key block (an iota bound; its FULL tiles still skip ``mask_fn``);
  padded query rows are computed and dropped.
* Forward: grid ``(B, Nq, nq, max kv count)``, online softmax with fp32 ``m``, ``l`` (lane
  replicated ``[bq, 128]``) and ``acc`` in VMEM scratch. lse is written lane-major
  ``[B, Nq, 1, Tq]`` (one transpose per query block).
* GQA: q head ``h`` reads kv head ``h // group`` in the index maps; K/V are never repeated in
  memory (the forward / dQ grids run per q head, so a K/V tile is DMA'd once per q head of its
  group). The dK/dV kernel has grid ``(B, Nkv, nk, group, max q count)`` and accumulates the q
  heads of a group into one fp32 scratch: no per-q-head dK/dV is materialised.
* Backward: the dQ kernel walks the kv lists like the forward; the dK/dV kernel walks the
  transposed lists (``plan.q_index``) and works on transposed tiles ``[bk, bq]`` (``K Q^T``), so
  every matmul is NN or NT and lse / delta broadcast without relayout. P is recomputed from lse;
  ``dS = P * (dP - delta + dlse)`` with ``delta = rowsum(dO * O)``; softcap (``c tanh(s/c)``)
  contributes its ``1 - tanh^2`` factor. Rows that see no key: out 0, lse -inf, zero grads.
* ``mask_fn`` gets rows ``[bq, 1]`` / cols ``[1, bk]`` in the forward and dQ kernels and the
  transposed ``[1, bq]`` / ``[bk, 1]`` in the dK/dV kernel: it must be elementwise (as the
  contract says) and may return any shape broadcastable to the tile.
* fp32 inputs use ``Precision.HIGHEST`` matmuls; bf16 inputs feed bf16 to the MXU (P cast to
  the V dtype) with fp32 accumulation.

Supported: any ``Tq``/``Tk`` (padded), any head dims (``Hv`` may differ from ``H``; multiples
of 128 fill the lanes), ``block_q``/``block_k`` positive multiples of 128, fp32 and bf16.
Not supported: dropout, bias arrays, attention sinks. The plan lives in SMEM, so per-head plans
at long sequence lengths (``B * N * nq * nk`` words) can exceed it: use larger blocks or a
head-shared map. Checked in TPU interpret mode and by ``jax.export(..., platforms=["tpu"])``
(Pallas -> Mosaic lowering; Mosaic's own layout passes run only in libtpu); no TPU was
available to run or time it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common

__all__ = ["flash_attention"]

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Cfg:
    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    tq: int
    tk: int
    nq: int  # query blocks
    nk: int  # key blocks
    group: int  # q heads per kv head
    plan_b: bool  # plan has a batch axis (else shared)
    plan_n: int  # heads of the plan (1 or Nq)
    feat_b: bool  # feature arrays have a batch axis
    nfr: int
    nfc: int
    mask_fn: Any
    exact: bool  # fp32 inputs: HIGHEST-precision matmuls
    interpret: Any

    @property
    def ragged(self) -> bool:
        return self.tk % self.block_k != 0


def _dot(a, b, dims, cfg: _Cfg):
    prec = jax.lax.Precision.HIGHEST if cfg.exact else None
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _lanes(x, n: int):
    """A lane-replicated ``[r, 128]`` array as ``[r, n]``."""
    if n == LANES:
        return x
    reps = common.cdiv(n, LANES)
    if reps > 1:
        x = jnp.tile(x, (1, reps))
    return x[:, :n]


def _logits(s, cfg: _Cfg):
    """Raw ``q.k`` (fp32) -> logits, and tanh(s/c) for the softcap derivative (or None)."""
    s = s * cfg.scale
    if cfg.softcap is None:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return t * cfg.softcap, t


def _mask(cfg: _Cfg, rows, cols, shape, k_axis: int, k_start, use_fn: bool, use_bound: bool):
    """Boolean mask of a tile of ``shape`` (keys along ``k_axis``): mask_fn and/or key < Tk."""
    m = None
    if use_fn:
        m = jnp.asarray(cfg.mask_fn(rows, cols))
        if m.shape != tuple(shape):  # a predicate of rows or cols only: broadcast as int32
            m = jnp.broadcast_to(m.astype(jnp.int32), shape)
        if m.dtype != jnp.bool_:
            m = m != 0
    if use_bound:
        kpos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, k_axis)
        bound = kpos < cfg.tk
        m = bound if m is None else jnp.logical_and(m, bound)
    return m


def _row_major_features(rowf_ref, colf_ref, cfg: _Cfg):
    """Feature tuples of a ``[bq, bk]`` tile: rows ``[bq, 1]``, cols ``[1, bk]``."""
    rows = tuple(rowf_ref[f, 0][:, None] for f in range(cfg.nfr))
    cols = tuple(colf_ref[f] for f in range(cfg.nfc))
    return rows, cols


def _dispatch(cfg: _Cfg, step, live, full, kb):
    """Runs ``step(use_fn, use_bound)`` on a live tile: PARTIAL tiles evaluate mask_fn, the last
    key block of a ragged ``Tk`` masks keys >= Tk, FULL tiles elsewhere do no mask work."""
    rest = live
    if cfg.mask_fn is not None:
        pl.when(jnp.logical_and(live, full == 0))(lambda: step(True, cfg.ragged))
        rest = jnp.logical_and(live, full == 1)
    if cfg.ragged:
        last = kb == cfg.nk - 1
        pl.when(jnp.logical_and(rest, last))(lambda: step(False, True))
        rest = jnp.logical_and(rest, jnp.logical_not(last))
    pl.when(rest)(lambda: step(False, False))


def _plan_list(cfg: _Cfg, b, h, blk, transposed: bool = False):
    """Index of the list of (batch b, q head h, block blk) in the flattened counts; times the
    list length it is the offset of that list in the flattened codes.

    ``transposed``: the per-key-block q lists ``[Bm, Nm, nk, nq]`` instead of the kv lists.
    """
    pb = b if cfg.plan_b else 0
    ph = h if cfg.plan_n > 1 else 0
    return (pb * cfg.plan_n + ph) * (cfg.nk if transposed else cfg.nq) + blk


def _decode(code):
    """A packed plan entry ``2 * block + full`` -> (block, full). Shifts: no sign ops on TPU."""
    return jax.lax.shift_right_logical(code, 1), jnp.bitwise_and(code, 1)


def _kv_head(h, group: int):
    return h if group == 1 else jax.lax.div(h, jnp.int32(group))


def _fb(cfg: _Cfg, b):
    return b if cfg.feat_b else 0


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _fwd_kernel(code_ref, count_ref, *refs, cfg: _Cfg):
    q_ref, k_ref, v_ref = refs[:3]
    refs = refs[3:]
    rowf_ref = colf_ref = None
    if cfg.nfr:
        rowf_ref, refs = refs[0], refs[1:]
    if cfg.nfc:
        colf_ref, refs = refs[0], refs[1:]
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bk = cfg.block_k

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    lst = _plan_list(cfg, b, h, i)
    count = count_ref[lst]
    kb, full = _decode(code_ref[lst * cfg.nk + j])

    def step(use_fn: bool, use_bound: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s, _ = _logits(_dot(q, k, NT, cfg), cfg)  # [bq, bk]
        if use_fn or use_bound:
            feats = _row_major_features(rowf_ref, colf_ref, cfg) if use_fn else ((), ())
            keep = _mask(cfg, *feats, s.shape, 1, kb * bk, use_fn, use_bound)
            s = jnp.where(keep, s, -jnp.inf)
        m_prev, l_prev = m_sc[...], l_sc[...]  # [bq, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        if use_fn or use_bound:  # a row may have seen no key yet: keep exp() away from inf - inf
            m_next_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        else:
            m_next_safe = m_next
        p = jnp.exp(s - _lanes(m_next_safe, bk))
        alpha = jnp.exp(m_prev - m_next_safe)
        m_sc[...] = m_next
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        pv = _dot(p.astype(v.dtype), v, NN, cfg)
        acc_sc[...] = acc_sc[...] * _lanes(alpha, acc_sc.shape[1]) + pv

    _dispatch(cfg, step, j < count, full, kb)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]
        has = l > 0.0
        inv = jnp.where(has, 1.0 / jnp.where(has, l, 1.0), 0.0)
        o_ref[...] = (acc_sc[...] * _lanes(inv, acc_sc.shape[1])).astype(o_ref.dtype)
        lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)  # [bq, 128]
        lse_ref[...] = lse.T[0:1, :]  # lane-major [1, bq]


def _feature_specs(cfg: _Cfg, rowf, colf, row_block, col_block):
    """BlockSpecs (and operands) of the feature arrays [Bf, F, 1, T]; index fns give the block."""
    specs, ops = [], []
    if cfg.nfr:
        specs.append(
            pl.BlockSpec(
                (None, cfg.nfr, 1, cfg.block_q),
                lambda *a: (_fb(cfg, a[0]), 0, 0, row_block(*a)),
            )
        )
        ops.append(rowf)
    if cfg.nfc:
        specs.append(
            pl.BlockSpec(
                (None, cfg.nfc, 1, cfg.block_k),
                lambda *a: (_fb(cfg, a[0]), 0, 0, col_block(*a)),
            )
        )
        ops.append(colf)
    return specs, ops


def _kv_block(cfg: _Cfg):
    """Index-map helper for grids (b, h, i, j) + (kv_code, kv_count): the j-th listed key block."""

    def f(b, h, i, j, code_ref, count_ref):
        return _decode(code_ref[_plan_list(cfg, b, h, i) * cfg.nk + j])[0]

    return f


def _forward(cfg: _Cfg, q, k, v, kv_code, kv_count, rowf, colf):
    bsz, nqh, tqp, d = q.shape
    dv = v.shape[3]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
    kvb = _kv_block(cfg)
    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0)),
        pl.BlockSpec(
            (None, None, bk, d), lambda b, h, i, j, *s: (b, _kv_head(h, g), kvb(b, h, i, j, *s), 0)
        ),
        pl.BlockSpec(
            (None, None, bk, dv), lambda b, h, i, j, *s: (b, _kv_head(h, g), kvb(b, h, i, j, *s), 0)
        ),
    ]
    fspecs, fops = _feature_specs(cfg, rowf, colf, lambda b, h, i, j, *s: i, kvb)
    steps = jnp.maximum(jnp.max(kv_count), 1)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(bsz, nqh, cfg.nq, steps),
        in_specs=in_specs + fspecs,
        out_specs=[
            pl.BlockSpec((None, None, bq, dv), lambda b, h, i, j, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i)),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, dv), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((bsz, nqh, tqp, dv), q.dtype),
            jax.ShapeDtypeStruct((bsz, nqh, 1, tqp), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(kv_code, kv_count, q, k, v, *fops)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _dq_kernel(code_ref, count_ref, *refs, cfg: _Cfg):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    refs = refs[6:]
    rowf_ref = colf_ref = None
    if cfg.nfr:
        rowf_ref, refs = refs[0], refs[1:]
    if cfg.nfc:
        colf_ref, refs = refs[0], refs[1:]
    dq_ref, acc_sc = refs
    b, h, i, j = (pl.program_id(a) for a in range(4))

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    lst = _plan_list(cfg, b, h, i)
    count = count_ref[lst]
    kb, full = _decode(code_ref[lst * cfg.nk + j])

    def step(use_fn: bool, use_bound: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s, t = _logits(_dot(q, k, NT, cfg), cfg)  # [bq, bk]
        if use_fn or use_bound:
            feats = _row_major_features(rowf_ref, colf_ref, cfg) if use_fn else ((), ())
            keep = _mask(cfg, *feats, s.shape, 1, cfg.block_k * kb, use_fn, use_bound)
            s = jnp.where(keep, s, -jnp.inf)
        lse = lse_ref[0][:, None]  # [bq, 1]
        lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows with no key: P = 0
        p = jnp.exp(s - lse)
        dp = _dot(do, v, NT, cfg)
        ds = p * (dp - delta_ref[0][:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        acc_sc[...] += _dot(ds.astype(k.dtype), k, NN, cfg)

    _dispatch(cfg, step, j < count, full, kb)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(code_ref, count_ref, *refs, cfg: _Cfg):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    refs = refs[6:]
    rowf_ref = colf_ref = None
    if cfg.nfr:
        rowf_ref, refs = refs[0], refs[1:]
    if cfg.nfc:
        colf_ref, refs = refs[0], refs[1:]
    dk_ref, dv_ref, dk_sc, dv_sc = refs
    b, kh, kb, g, t_ = (pl.program_id(a) for a in range(5))
    h = kh * cfg.group + g

    @pl.when(jnp.logical_and(g == 0, t_ == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    lst = _plan_list(cfg, b, h, kb, True)
    count = count_ref[lst]
    full = _decode(code_ref[lst * cfg.nq + t_])[1]

    def step(use_fn: bool, use_bound: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s, tc = _logits(_dot(k, q, NT, cfg), cfg)  # transposed tile [bk, bq]
        if use_fn or use_bound:
            feats = ((), ())
            if use_fn:  # transposed tile: rows [1, bq], cols [bk, 1]
                feats = (
                    tuple(rowf_ref[f] for f in range(cfg.nfr)),
                    tuple(colf_ref[f, 0][:, None] for f in range(cfg.nfc)),
                )
            keep = _mask(cfg, *feats, s.shape, 0, cfg.block_k * kb, use_fn, use_bound)
            s = jnp.where(keep, s, -jnp.inf)
        lse = lse_ref[...]  # [1, bq]
        lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
        p = jnp.exp(s - lse)
        dv_sc[...] += _dot(p.astype(do.dtype), do, NN, cfg)
        dp = _dot(v, do, NT, cfg)  # [bk, bq]
        ds = p * (dp - delta_ref[...])
        if tc is not None:
            ds = ds * (1.0 - tc * tc)
        dk_sc[...] += _dot(ds.astype(q.dtype), q, NN, cfg)

    _dispatch(cfg, step, t_ < count, full, kb)

    last = jnp.logical_and(g == cfg.group - 1, t_ == pl.num_programs(4) - 1)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(cfg: _Cfg, q, k, v, do, lse, delta, plan, rowf, colf):
    kv_code, kv_count, q_code, q_count = plan
    bsz, nqh, tqp, d = q.shape
    nkvh, tkp, dv = k.shape[1], k.shape[2], v.shape[3]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
    sem4 = ("parallel", "parallel", "parallel", "arbitrary")

    # dQ: same walk as the forward.
    kvb = _kv_block(cfg)
    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0)),
        pl.BlockSpec(
            (None, None, bk, d), lambda b, h, i, j, *s: (b, _kv_head(h, g), kvb(b, h, i, j, *s), 0)
        ),
        pl.BlockSpec(
            (None, None, bk, dv), lambda b, h, i, j, *s: (b, _kv_head(h, g), kvb(b, h, i, j, *s), 0)
        ),
        pl.BlockSpec((None, None, bq, dv), lambda b, h, i, j, *_: (b, h, i, 0)),
        pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i)),
        pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i)),
    ]
    fspecs, fops = _feature_specs(cfg, rowf, colf, lambda b, h, i, j, *s: i, kvb)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, nqh, cfg.nq, jnp.maximum(jnp.max(kv_count), 1)),
            in_specs=in_specs + fspecs,
            out_specs=pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0)),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=sem4),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(kv_code, kv_count, q, k, v, do, lse, delta, *fops)

    # dK/dV: per key block, the q heads of its group and the query blocks listed for them.
    def qb(b, kh, kb, gi, t, code_ref, count_ref):
        return _decode(code_ref[_plan_list(cfg, b, kh * g + gi, kb, True) * cfg.nq + t])[0]

    def q_map(b, kh, kb, gi, t, *s):
        return (b, kh * g + gi, qb(b, kh, kb, gi, t, *s), 0)

    def row_map(b, kh, kb, gi, t, *s):
        return (b, kh * g + gi, 0, qb(b, kh, kb, gi, t, *s))

    in_specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), lambda b, kh, kb, gi, t, *_: (b, kh, kb, 0)),
        pl.BlockSpec((None, None, bk, dv), lambda b, kh, kb, gi, t, *_: (b, kh, kb, 0)),
        pl.BlockSpec((None, None, bq, dv), q_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
    ]
    fspecs, fops = _feature_specs(cfg, rowf, colf, qb, lambda b, kh, kb, gi, t, *s: kb)
    kv_out = lambda b, kh, kb, gi, t, *_: (b, kh, kb, 0)  # noqa: E731
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, nkvh, cfg.nk, g, jnp.maximum(jnp.max(q_count), 1)),
            in_specs=in_specs + fspecs,
            out_specs=[
                pl.BlockSpec((None, None, bk, d), kv_out),
                pl.BlockSpec((None, None, bk, dv), kv_out),
            ],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((bsz, nkvh, tkp, d), k.dtype),
            jax.ShapeDtypeStruct((bsz, nkvh, tkp, dv), v.dtype),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(q_code, q_count, q, k, v, do, lse, delta, *fops)
    return dq, dk, dv_


# ------------------------------------------------------------------------------------------------
# custom_vjp on the kernel layout ([B, N, T, H], padded)
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, plan, rowf, colf):
    return _forward(cfg, q, k, v, plan[0], plan[1], rowf, colf)


def _flash_fwd(cfg, q, k, v, plan, rowf, colf):
    out, lse = _forward(cfg, q, k, v, plan[0], plan[1], rowf, colf)
    return (out, lse), (q, k, v, out, lse, plan, rowf, colf)


def _flash_bwd(cfg, res, cts):
    q, k, v, out, lse, plan, rowf, colf = res
    do, dlse = cts
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
    delta = delta - dlse  # dS = P * (dP - delta + dlse)
    dq, dk, dv = _backward(cfg, q, k, v, do.astype(out.dtype), lse, delta, plan, rowf, colf)
    none = jax.tree.map(lambda _: None, (plan, rowf, colf))
    return (dq, dk, dv, *none)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------
# Public wrapper
# ------------------------------------------------------------------------------------------------


def _check_block(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % LANES:
        raise ValueError(
            f"{name} must be a positive multiple of {LANES} (TPU tiles are (8, 128)), got {value!r}"
        )
    return value


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_map: jax.Array | None = None,
    mask_fn: common.MaskFn | None = None,
    row_features: jax.Array | None = None,
    col_features: jax.Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention over the tiles of ``block_map`` on TPU; returns ``(out, lse)``.

    Args:
      q: ``[B, Tq, Nq, H]``; k: ``[B, Tk, Nkv, H]``; v: ``[B, Tk, Nkv, Hv]`` (``Nq % Nkv == 0``).
      block_map: int8 ``[B|1, Nq|1, cdiv(Tq, block_q), cdiv(Tk, block_k)]`` with EMPTY /
        PARTIAL / FULL tiles (``pallas_kernels.common``); None: every tile FULL.
      mask_fn, row_features, col_features: the in-tile predicate of PARTIAL tiles and its int32
        features ``[B|1, Fr, Tq]`` / ``[B|1, Fc, Tk]`` (see ``pallas_kernels.common``).
      scale: logit scale (default ``1/sqrt(H)``); softcap: ``c * tanh(s / c)`` on the logits.
      block_q, block_k: tile sizes, positive multiples of 128.
      interpret: False (compile for TPU), True or a ``pltpu.InterpretParams`` (TPU interpret
        mode on CPU).

    Returns ``out [B, Tq, Nq, Hv]`` in ``q.dtype`` and ``lse float32 [B, Nq, Tq]`` (natural
    log; -inf on rows that see no key, whose output is 0). Differentiable in q, k, v (and lse).
    """
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be None or positive, got {softcap!r}")
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    block_map, rowf, colf = common.check_attention_args(
        q, k, v, block_map, mask_fn, row_features, col_features, block_q, block_k
    )
    b, tq, nq, d = q.shape
    tk, nkv = k.shape[1], k.shape[2]
    nqb, nkb = common.cdiv(tq, block_q), common.cdiv(tk, block_k)
    if rowf.shape[0] != colf.shape[0] and (rowf.shape[1] and colf.shape[1]):
        rowf = jnp.broadcast_to(rowf, (b,) + rowf.shape[1:])
        colf = jnp.broadcast_to(colf, (b,) + colf.shape[1:])
    feat_b = max(rowf.shape[0] if rowf.shape[1] else 1, colf.shape[0] if colf.shape[1] else 1) > 1

    plan = common.make_block_plan(block_map)
    kv_code = (plan.kv_index * 2 + plan.kv_full).reshape(-1).astype(jnp.int32)
    q_code = (plan.q_index * 2 + plan.q_full).reshape(-1).astype(jnp.int32)
    packed = (kv_code, plan.kv_count.reshape(-1), q_code, plan.q_count.reshape(-1))

    tqp, tkp = nqb * block_q, nkb * block_k
    # Kernel layout: [B, N, T, H], padded to block multiples.
    qp = _pad_axis(jnp.swapaxes(q, 1, 2), 2, tqp)
    kp = _pad_axis(jnp.swapaxes(k, 1, 2), 2, tkp)
    vp = _pad_axis(jnp.swapaxes(v, 1, 2), 2, tkp)
    rowf = _pad_axis(rowf, 2, tqp)[:, :, None, :]  # lane-major [Bf, Fr, 1, Tq]
    colf = _pad_axis(colf, 2, tkp)[:, :, None, :]
    cfg = _Cfg(
        scale=float(1.0 / math.sqrt(d) if scale is None else scale),
        softcap=None if softcap is None else float(softcap),
        block_q=block_q,
        block_k=block_k,
        tq=tq,
        tk=tk,
        nq=nqb,
        nk=nkb,
        group=nq // nkv,
        plan_b=block_map.shape[0] > 1,
        plan_n=block_map.shape[1],
        feat_b=feat_b,
        nfr=rowf.shape[1],
        nfc=colf.shape[1],
        mask_fn=mask_fn,
        exact=any(x.dtype == jnp.float32 for x in (q, k, v)),
        interpret=common.tpu_interpret_params(interpret),
    )
    out, lse = _flash(cfg, qp, kp, vp, packed, rowf, colf)
    return jnp.swapaxes(out[:, :, :tq], 1, 2), lse[:, :, 0, :tq]
