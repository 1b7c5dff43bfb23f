"""Block-sparse flash attention for GPUs: Pallas with the Triton lowering, forward and backward.

FlashAttention-2 (Dao, 2023) tiling with an online softmax in base 2, driven by a
:class:`~pallas_kernels.common.BlockPlan`: each program (query block, batch row, q head) walks
only the key blocks its plan lists -- PARTIAL tiles first in a loop that evaluates the mask,
then FULL tiles in a loop with no mask work -- so EMPTY tiles cost nothing. Causal, sliding
window, segment ids, padding, prefix-LM, modality-mutual, frame-block causal and arbitrary
block-sparse layouts (MInference / SeerAttention style) are all a block map plus an in-tile
predicate on per-row / per-column integer features (see ``pallas_kernels/common.py``).

* GQA: q head ``h`` reads kv head ``h // group``; K/V are never repeated. The dK/dV program of a
  kv head loops over the q heads of its group, so dK/dV are accumulated once, in registers.
* Backward: a dQ kernel (same walk as the forward) and a dK/dV kernel walking the transposed
  plan (per key block, the query blocks that see it). P is recomputed from the saved lse.
* Numerics: fp32 logits, softmax and accumulators for any input dtype; ``softcap`` (Gemma 2)
  applied as ``c * tanh(s / c)`` with its derivative in the backward pass; fully masked rows
  give out 0, lse -inf and zero gradients.
* Sequence lengths that are not block multiples are padded here and the last key block is
  masked at ``Tk``; head dims are padded to a power of two (Triton needs it).

Not here: dropout, attention bias tensors (use the XLA path), a Hopper warp-specialised
pipeline (the Triton lowering stops near 0.65x cuDNN on H100, see benchmarks/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

__all__ = ["flash_attention"]

_WHOLE = pl.BlockSpec()  # the whole array, indexed inside the kernel


@dataclasses.dataclass(frozen=True)
class _Cfg:
    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    tq: int
    tk: int
    mask_fn: Any
    num_warps: int
    num_stages: int
    interpret: bool
    block_q_bwd: int
    block_k_bwd: int
    num_warps_bwd: int
    num_stages_bwd: int

    def backward(self) -> _Cfg:
        """The configuration the dQ and dK/dV kernels run with."""
        return dataclasses.replace(
            self,
            block_q=self.block_q_bwd,
            block_k=self.block_k_bwd,
            num_warps=self.num_warps_bwd,
            num_stages=self.num_stages_bwd,
        )


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _dot(a, b, trans_a=False, trans_b=False, interpret=False):
    """fp32-accumulating matmul inside a kernel (``pltriton.dot`` when lowered to Triton)."""
    if interpret:
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        return jnp.dot(a, b, preferred_element_type=jnp.float32)
    return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b).astype(jnp.float32)


def _logits(s, cfg: _Cfg):
    """Raw ``q.k`` -> logits in base-2 units (and tanh(s/c) for the softcap derivative)."""
    if cfg.softcap is None:
        return s * (cfg.scale * LOG2E), None
    t = jnp.tanh(s * (cfg.scale / cfg.softcap))
    return t * (cfg.softcap * LOG2E), t


def _tile_mask(cfg: _Cfg, rows, cols, k_start):
    """bool [bq, bk] or [1, bk] for a PARTIAL tile: the sequence-end bound and ``mask_fn``."""
    allow = None
    if cfg.tk % cfg.block_k:
        kidx = k_start + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
        allow = kidx < cfg.tk
    if cfg.mask_fn is not None:
        m = cfg.mask_fn(rows, cols)
        allow = m if allow is None else allow & m
    return allow


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Cfg, pb_on: bool, ph_on: bool, nfr: int, nfc: int):
    kv_index, kv_count, kv_partial, q_ref, k_ref, v_ref = refs[:6]
    rest = refs[6:]
    rowf_ref = rest[0] if nfr else None
    colf_ref = rest[int(nfr > 0)] if nfc else None
    o_ref, lse_ref = rest[-2:]
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pb = b if pb_on else 0
    ph = h if ph_on else 0
    bq, bk = cfg.block_q, cfg.block_k
    count = kv_count[pb, ph, i]
    npart = kv_partial[pb, ph, i]
    q = q_ref[...]
    rows = tuple(rowf_ref[f, :][:, None] for f in range(nfr))

    def body(t, carry, masked):
        acc, m, l = carry
        j = kv_index[pb, ph, i, t]
        ks = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(ks, bk), :]
        s, _ = _logits(_dot(q, k, trans_b=True, interpret=cfg.interpret), cfg)
        if masked:
            cols = tuple(colf_ref[f, pl.ds(ks, bk)][None, :] for f in range(nfc))
            allow = _tile_mask(cfg, rows, cols, ks)
            if allow is not None:
                s = jnp.where(allow, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(ks, bk), :]
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, interpret=cfg.interpret)
        return acc, m_new, l

    carry = (
        jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, npart, functools.partial(body, masked=True), carry)
    acc, m, l = jax.lax.fori_loop(npart, count, functools.partial(body, masked=False), carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


def _grid_call(kernel, grid, in_specs, out_specs, out_shape, cfg: _Cfg, name: str):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name=name,
    )


def _feature_specs(rowf, colf, pb_on, bq, which: str):
    """Specs for the row (blocked over queries) and column (whole) feature arrays."""
    ops, specs = [], []
    fr, fc = rowf.shape[1], colf.shape[1]
    if fr:
        ops.append(rowf)
        if which == "q":  # grid (i, b, h): a query block of rows
            specs.append(pl.BlockSpec((None, fr, bq), lambda i, b, h: (b if pb_on else 0, 0, i)))
        else:  # grid (kb, b, hk): all rows
            specs.append(
                pl.BlockSpec((None, fr, rowf.shape[2]), lambda j, b, h: (b if pb_on else 0, 0, 0))
            )
    if fc:
        ops.append(colf)
        if which == "q":
            specs.append(
                pl.BlockSpec((None, fc, colf.shape[2]), lambda i, b, h: (b if pb_on else 0, 0, 0))
            )
        else:
            specs.append(
                pl.BlockSpec((None, fc, colf.shape[2]), lambda j, b, h: (b if pb_on else 0, 0, 0))
            )
    return ops, specs


def _forward(q, k, v, plan, rowf, colf, cfg: _Cfg):
    b, tq, nq, d = q.shape
    tk, nkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = nq // nkv
    bq = cfg.block_q
    pb_on, ph_on = plan.kv_index.shape[0] > 1, plan.kv_index.shape[1] > 1
    fops, fspecs = _feature_specs(rowf, colf, pb_on, bq, "q")
    kernel = functools.partial(
        _fwd_kernel, cfg=cfg, pb_on=pb_on, ph_on=ph_on, nfr=rowf.shape[1], nfc=colf.shape[1]
    )
    in_specs = [  # the plan arrays are read whole (scalar loads)
        _WHOLE,
        _WHOLE,
        _WHOLE,
        pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, tk, None, d), lambda i, b, h: (b, 0, h // group, 0)),
        pl.BlockSpec((None, tk, None, dv), lambda i, b, h: (b, 0, h // group, 0)),
        *fspecs,
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, dv), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, tq, nq, dv), q.dtype),
        jax.ShapeDtypeStruct((b, nq, tq), jnp.float32),
    ]
    call = _grid_call(kernel, (tq // bq, b, nq), in_specs, out_specs, out_shape, cfg, "flash_fwd")
    return call(plan.kv_index, plan.kv_count, plan.kv_partial, q, k, v, *fops)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _dq_kernel(*refs, cfg: _Cfg, pb_on: bool, ph_on: bool, nfr: int, nfc: int):
    kv_index, kv_count, kv_partial, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:9]
    rest = refs[9:]
    rowf_ref = rest[0] if nfr else None
    colf_ref = rest[int(nfr > 0)] if nfc else None
    dq_ref = rest[-1]
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pb = b if pb_on else 0
    ph = h if ph_on else 0
    bk = cfg.block_k
    count = kv_count[pb, ph, i]
    npart = kv_partial[pb, ph, i]
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...]
    delta = delta_ref[...]
    rows = tuple(rowf_ref[f, :][:, None] for f in range(nfr))

    def body(t, dq, masked):
        j = kv_index[pb, ph, i, t]
        ks = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(ks, bk), :]
        v = v_ref[pl.ds(ks, bk), :]
        s, th = _logits(_dot(q, k, trans_b=True, interpret=cfg.interpret), cfg)
        if masked:
            cols = tuple(colf_ref[f, pl.ds(ks, bk)][None, :] for f in range(nfc))
            allow = _tile_mask(cfg, rows, cols, ks)
            if allow is not None:
                s = jnp.where(allow, s, -jnp.inf)
        p = jnp.exp2(s - lse2[:, None])
        dp = _dot(do, v, trans_b=True, interpret=cfg.interpret)
        ds = p * (dp - delta[:, None])
        if th is not None:
            ds = ds * (1.0 - th * th)
        return dq + _dot(ds.astype(k.dtype), k, interpret=cfg.interpret)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = jax.lax.fori_loop(0, npart, functools.partial(body, masked=True), dq)
    dq = jax.lax.fori_loop(npart, count, functools.partial(body, masked=False), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _Cfg, group: int, pb_on: bool, ph_on: bool, nfr: int, nfc: int):
    q_index, q_count, q_partial, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:9]
    rest = refs[9:]
    rowf_ref = rest[0] if nfr else None
    colf_ref = rest[int(nfr > 0)] if nfc else None
    dk_ref, dv_ref = rest[-2:]
    kb, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pb = b if pb_on else 0
    bq = cfg.block_q
    ks = kb * cfg.block_k
    k = k_ref[...]
    v = v_ref[...]
    cols = tuple(colf_ref[f, pl.ds(ks, cfg.block_k)][None, :] for f in range(nfc))

    def head(g, carry):
        h = hk * group + g
        ph = h if ph_on else 0
        count = q_count[pb, ph, kb]
        npart = q_partial[pb, ph, kb]

        def body(t, carry, masked):
            dk, dv = carry
            qi = q_index[pb, ph, kb, t]
            qs = pl.multiple_of(qi * bq, bq)
            q = q_ref[pl.ds(qs, bq), g, :]
            do = do_ref[pl.ds(qs, bq), g, :]
            lse2 = lse_ref[g, pl.ds(qs, bq)]
            delta = delta_ref[g, pl.ds(qs, bq)]
            s, th = _logits(_dot(q, k, trans_b=True, interpret=cfg.interpret), cfg)
            if masked:
                rows = tuple(rowf_ref[f, pl.ds(qs, bq)][:, None] for f in range(nfr))
                allow = _tile_mask(cfg, rows, cols, ks)
                if allow is not None:
                    s = jnp.where(allow, s, -jnp.inf)
            p = jnp.exp2(s - lse2[:, None])  # [bq, bk]
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, interpret=cfg.interpret)
            dp = _dot(do, v, trans_b=True, interpret=cfg.interpret)
            ds = p * (dp - delta[:, None])
            if th is not None:
                ds = ds * (1.0 - th * th)
            dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True, interpret=cfg.interpret)
            return dk, dv

        carry = jax.lax.fori_loop(0, npart, functools.partial(body, masked=True), carry)
        return jax.lax.fori_loop(npart, count, functools.partial(body, masked=False), carry)

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, group, head, zeros)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, out, lse, do, dlse, plan, rowf, colf, cfg: _Cfg):
    cfg = cfg.backward()
    b, tq, nq, d = q.shape
    tk, nkv, dv_ = k.shape[1], k.shape[2], v.shape[3]
    group = nq // nkv
    bq, bk = cfg.block_q, cfg.block_k
    pb_on, ph_on = plan.kv_index.shape[0] > 1, plan.kv_index.shape[1] > 1
    # delta_i = sum_d dO*O - dlse_i; lse in base-2 units, +inf on fully masked rows (P = 0 there).
    delta = jnp.einsum("btnd,btnd->bnt", do.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    nfr, nfc = rowf.shape[1], colf.shape[1]

    fops, fspecs = _feature_specs(rowf, colf, pb_on, bq, "q")
    dq_kernel = functools.partial(_dq_kernel, cfg=cfg, pb_on=pb_on, ph_on=ph_on, nfr=nfr, nfc=nfc)
    qblk = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
    rowblk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = _grid_call(
        dq_kernel,
        (tq // bq, b, nq),
        [
            _WHOLE,
            _WHOLE,
            _WHOLE,
            qblk,
            pl.BlockSpec((None, tk, None, d), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((None, tk, None, dv_), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((None, bq, None, dv_), lambda i, b, h: (b, i, h, 0)),
            rowblk,
            rowblk,
            *fspecs,
        ],
        qblk,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        cfg,
        "flash_bwd_dq",
    )(plan.kv_index, plan.kv_count, plan.kv_partial, q, k, v, do, lse2, delta, *fops)

    fops, fspecs = _feature_specs(rowf, colf, pb_on, bq, "kv")
    dkv_kernel = functools.partial(
        _dkv_kernel, cfg=cfg, group=group, pb_on=pb_on, ph_on=ph_on, nfr=nfr, nfc=nfc
    )
    grp = lambda dd: pl.BlockSpec((None, tq, group, dd), lambda j, b, h: (b, 0, h, 0))
    grp_rows = pl.BlockSpec((None, group, tq), lambda j, b, h: (b, h, 0))
    kblk = lambda dd: pl.BlockSpec((None, bk, None, dd), lambda j, b, h: (b, j, h, 0))
    dk, dv = _grid_call(
        dkv_kernel,
        (tk // bk, b, nkv),
        [_WHOLE, _WHOLE, _WHOLE, grp(d), kblk(d), kblk(dv_), grp(dv_), grp_rows, grp_rows, *fspecs],
        [kblk(d), kblk(dv_)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cfg,
        "flash_bwd_dkv",
    )(plan.q_index, plan.q_count, plan.q_partial, q, k, v, do, lse2, delta, *fops)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# custom_vjp and the public wrapper
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, plan, plan_bwd, rowf, colf):
    return _forward(q, k, v, plan, rowf, colf, cfg)


def _flash_fwd(cfg, q, k, v, plan, plan_bwd, rowf, colf):
    out, lse = _forward(q, k, v, plan, rowf, colf, cfg)
    return (out, lse), (q, k, v, out, lse, plan_bwd, rowf, colf)


def _flash_bwd(cfg, res, cts):
    q, k, v, out, lse, plan_bwd, rowf, colf = res
    do, dlse = cts
    dlse = None if isinstance(dlse, jax.custom_derivatives.SymbolicZero) else dlse
    dq, dk, dv = _backward(q, k, v, out, lse, do, dlse, plan_bwd, rowf, colf, cfg)
    none = jax.tree.map(lambda _: None, (plan_bwd, plan_bwd, rowf, colf))
    return (dq, dk, dv, *none)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_block(name: str, value: Any) -> int:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles), got {value!r}")
    return value


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _plan(block_map, tq, tk, tqp, tkp, bq, bk) -> common.BlockPlan:
    """Plan for one tile size: the ragged last key block gets the in-tile bound (PARTIAL), and
    the map is padded with EMPTY tiles to the padded grid."""
    nqb, nkb = common.cdiv(tq, bq), common.cdiv(tk, bk)
    bm = block_map[:, :, :nqb, :nkb].astype(jnp.int8)
    if tk % bk:
        last = bm[..., -1:]
        bm = jnp.concatenate(
            [bm[..., :-1], jnp.where(last == common.FULL, common.PARTIAL, last)], axis=-1
        )
    pad = ((0, 0), (0, 0), (0, tqp // bq - nqb), (0, tkp // bk - nkb))
    return common.make_block_plan(jnp.pad(bm, pad, constant_values=common.EMPTY))


def plans_and_features(block_map, rowf, colf, b, tq, tk, fwd_tiles, bwd_tiles):
    """Shared set-up of the GPU forward kernels (Triton and Mosaic): features and block map
    brought to one batch mapping, lengths padded to every tile (powers of two, so the max), the
    forward plan and the backward plan (``common.resample_block_map``: finer tiles inherit their
    parent's class). Returns ``(rowf, colf, tqp, tkp, plan, plan_bwd)`` with padded features."""
    (bq, bk), (bqb, bkb) = fwd_tiles, bwd_tiles
    if rowf.shape[0] != colf.shape[0] and rowf.shape[1] and colf.shape[1]:
        if rowf.shape[0] == 1:
            rowf = jnp.broadcast_to(rowf, (b,) + rowf.shape[1:])
        else:
            colf = jnp.broadcast_to(colf, (b,) + colf.shape[1:])
    fb = max(rowf.shape[0], colf.shape[0])
    if fb > block_map.shape[0]:
        block_map = jnp.broadcast_to(block_map, (fb,) + block_map.shape[1:])
    bm_b = block_map.shape[0]
    rowf = jnp.broadcast_to(rowf, (bm_b,) + rowf.shape[1:])
    colf = jnp.broadcast_to(colf, (bm_b,) + colf.shape[1:])
    tqp = common.cdiv(tq, max(bq, bqb)) * max(bq, bqb)
    tkp = common.cdiv(tk, max(bk, bkb)) * max(bk, bkb)
    plan = _plan(block_map, tq, tk, tqp, tkp, bq, bk)
    bm_bwd = common.resample_block_map(block_map, (bq, bk), (bqb, bkb))
    plan_bwd = _plan(bm_bwd, tq, tk, tqp, tkp, bqb, bkb)
    return _pad_axis(rowf, 2, tqp), _pad_axis(colf, 2, tkp), tqp, tkp, plan, plan_bwd


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
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int = 3,
    block_q_bwd: int = 64,
    block_k_bwd: int = 64,
    num_warps_bwd: int = 4,
    num_stages_bwd: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention over the tiles of ``block_map``; returns ``(out, lse)``.

    Args:
      q: ``[B, Tq, Nq, H]``; k: ``[B, Tk, Nkv, H]``; v: ``[B, Tk, Nkv, Hv]`` (``Nq % Nkv == 0``).
      block_map: int8 ``[B|1, Nq|1, cdiv(Tq, block_q), cdiv(Tk, block_k)]`` with EMPTY /
        PARTIAL / FULL tiles (``pallas_kernels.common``); None: every tile FULL.
      mask_fn, row_features, col_features: the in-tile predicate of PARTIAL tiles and its int32
        features ``[B|1, Fr, Tq]`` / ``[B|1, Fc, Tk]`` (see ``pallas_kernels.common``).
      scale: logit scale (default ``1/sqrt(H)``); softcap: ``c * tanh(s / c)`` on the logits.
      block_q, block_k: forward tile sizes (powers of two >= 16); num_warps, num_stages: Triton
        knobs (defaults measured best on an H100, see benchmarks/BENCHMARKS.md);
        ``*_bwd``: the same for the dQ and dK/dV kernels, which get their own block map
        (``common.resample_block_map``: finer tiles inherit their parent's class).
      interpret: run the kernels with the Pallas interpreter (CPU tests).

    Returns ``out [B, Tq, Nq, Hv]`` in ``q.dtype`` and ``lse float32 [B, Nq, Tq]`` (natural
    log; -inf on rows that see no key, whose output is 0). Differentiable in q, k, v (and lse).
    """
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    block_q_bwd = _check_block("block_q_bwd", block_q_bwd)
    block_k_bwd = _check_block("block_k_bwd", block_k_bwd)
    block_map, rowf, colf = common.check_attention_args(
        q, k, v, block_map, mask_fn, row_features, col_features, block_q, block_k
    )
    b, tq, nq, d = q.shape
    tk = k.shape[1]
    rowf, colf, tqp, tkp, plan, plan_bwd = plans_and_features(
        block_map, rowf, colf, b, tq, tk, (block_q, block_k), (block_q_bwd, block_k_bwd)
    )

    dp, dvp = _next_pow2(max(d, 16)), _next_pow2(max(v.shape[3], 16))
    qp = _pad_axis(_pad_axis(q, 3, dp), 1, tqp)
    kp = _pad_axis(_pad_axis(k, 3, dp), 1, tkp)
    vp = _pad_axis(_pad_axis(v, 3, dvp), 1, tkp)
    if num_warps is None:  # 128x64 tiles: 4 warps measured best at D=128, 4 or 8 at D=64
        num_warps = 4
    cfg = _Cfg(
        scale=float(1.0 / math.sqrt(d) if scale is None else scale),
        softcap=None if softcap is None else float(softcap),
        block_q=block_q,
        block_k=block_k,
        tq=tq,
        tk=tk,
        mask_fn=mask_fn,
        num_warps=int(num_warps),
        num_stages=int(num_stages),
        interpret=bool(interpret),
        block_q_bwd=block_q_bwd,
        block_k_bwd=block_k_bwd,
        num_warps_bwd=int(num_warps_bwd),
        num_stages_bwd=int(num_stages_bwd),
    )
    out, lse = _flash(cfg, qp, kp, vp, plan, plan_bwd, rowf, colf)
    return out[:, :tq, :, : v.shape[3]], lse[:, :, :tq]
