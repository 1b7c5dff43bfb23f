"""Block-sparse flash attention forward for Hopper: Pallas with the Mosaic GPU lowering.

One CTA per (query tile of ``block_q`` rows, q head, batch row) runs three warpgroups:

* a **producer** warpgroup (few registers) that walks the query tile's
  :class:`~pallas_kernels.common.BlockPlan` list -- PARTIAL key tiles first, then FULL ones,
  EMPTY tiles never appear -- reading each listed key-block index from the plan (a scalar
  global load) and issuing TMA copies of that K / V tile (and, for PARTIAL tiles, its column
  features) into a ring of ``num_stages`` shared-memory slots;
* two **consumer** warpgroups, each owning ``block_q / 2`` query rows, that run
  QK^T and PV on the tensor cores with ``wgmma`` and an fp32 online softmax in base 2 between
  them (FlashAttention-3 style: a shared "schedule" barrier makes the two consumers alternate,
  so one's softmax overlaps the other's matmuls). Both consumers consume the same K/V slots,
  so the plan is kept at the CTA's query-tile granularity.

PARTIAL tiles evaluate ``mask_fn(rows, cols)`` (``pallas_kernels/common.py``) on row features
loaded once per consumer and column features copied with the tile; the predicate receives
``[bq, bk]`` int32 arrays (rows / columns broadcast), which any elementwise predicate accepts.
Keys ``>= Tk`` are masked in the (PARTIAL) ragged last key tile; fully masked rows give out 0
and lse -inf. Logits ``scale * q.k`` (optionally ``softcap * tanh(s / softcap)``), fp32
softmax and accumulation. GQA reads kv head ``h // group`` (K/V never repeated).

Supported (everything else raises ``ValueError``, so a caller can fall back to
``gpu.flash_attention``): bf16 / fp16 q, k, v of one dtype; head dim 64 or 128 with the V
head dim equal to it; ``block_q`` 128 or 256 (64 / 128 rows per consumer), ``block_k`` 64, 128
or 256; any block map / mask_fn / features the Triton kernel takes. The backward pass is the
Triton kernel's (``gpu._backward`` through ``gpu._flash_bwd``), fed this forward's out / lse.

Tile configurations whose shared memory exceeds the device (e.g. head dim 128 with
``block_k`` 256, or 3 stages of 128x128 tiles plus features) fail at lowering with Mosaic GPU's
own ValueError. Not here: persistent / dynamic tile scheduling (heavy causal query tiles are
launched first instead), intra-warpgroup pipelining of the two matmuls, a Mosaic GPU backward.
Hardware: sm_90a (wgmma + TMA). Measured on an H200 (``bash experiments/gpu_flash_mosaic.sh``,
benchmarks/BENCHMARKS.md): 11 correctness cases pass; dense causal forward 1.01-1.03x cuDNN at
T >= 8K (tiles 128 x 128, 2 stages), block-sparse 0.96-1.22x density x dense-cuDNN time at
T >= 16K except 1.49 at 10 % / 16K.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common
from pallas_kernels.flash_attention import gpu

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

__all__ = ["flash_attention", "flash_attention_forward"]

_CONSUMERS = 2  # compute warpgroups per CTA; the producer is warpgroup index 2


@dataclasses.dataclass(frozen=True)
class _MCfg:
    scale: float
    softcap: float | None
    block_q: int  # CTA query rows (split between the consumers)
    block_k: int
    num_stages: int
    tk: int  # true key length (keys >= tk are masked)
    mask_fn: Any
    interpret: Any

    @property
    def rows(self) -> int:
        return self.block_q // _CONSUMERS


def _row_layout():
    return plgpu.Layout.WGMMA.reduce(1)


def _col_layout():
    return plgpu.Layout.WGMMA.reduce(0)


def _dot(a, b):
    """fp32-accumulating matmul (the CPU interpreter's stand-in for wgmma)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _cast(cfg: _MCfg, x, layout):
    """``plgpu.layout_cast`` (a no-op in the CPU interpreter, which has no layouts)."""
    return plgpu.layout_cast(x, layout) if cfg.interpret is None else x


def _load(cfg: _MCfg, ref, layout):
    """A 1-D int32 SMEM vector in a register layout (plain read in the CPU interpreter)."""
    if cfg.interpret is None:
        return plgpu.load(ref, (), layout=layout)
    return ref[...]


def _kernel(*refs, cfg: _MCfg, pb_on: bool, ph_on: bool, group: int, nfr: int, nfc: int, nqt: int):
    idx_ref, cnt_ref, part_ref, q_ref, k_ref, v_ref = refs[:6]
    rest = refs[6:]
    rowf_ref = rest[0] if nfr else None
    colf_ref = rest[int(nfr > 0)] if nfc else None
    out_ref, lse_ref = rest[-2:]

    h = lax.axis_index("heads")
    b = lax.axis_index("batch")
    qt = nqt - 1 - lax.axis_index("q_seq")  # heavy (late) causal tiles first
    pb = b if pb_on else 0
    ph = h if ph_on else 0
    count = cnt_ref[pb, ph, qt]
    npart = part_ref[pb, ph, qt]
    dtype = q_ref.dtype
    d = q_ref.shape[-1]
    bqw, bk, nst = cfg.rows, cfg.block_k, cfg.num_stages
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)

    def body(q_smem, k_smem, v_smem, lse_smem, rowf_smem, colf_smem, bars, consumed, sched):
        k_bar, v_bar, q_bar, row_bar, col_bar = bars
        k_done, v_done = consumed
        wg = lax.axis_index("wg")

        def schedule():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_start = qt * cfg.block_q + wg * bqw
            qo = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, bqw), h], qo, q_bar.at[wg])
            if nfr:
                plgpu.copy_gmem_to_smem(
                    rowf_ref.at[pb, :, pl.ds(q_start, bqw)], rowf_smem.at[wg], row_bar.at[wg]
                )
            plgpu.barrier_wait(q_bar.at[wg])
            rows = ()
            if nfr:
                plgpu.barrier_wait(row_bar.at[wg])
                rows = tuple(_load(cfg, rowf_smem.at[wg, f], _row_layout()) for f in range(nfr))

            m = _cast(cfg, jnp.full((bqw,), -jnp.inf, jnp.float32), _row_layout())
            l = _cast(cfg, jnp.full((bqw,), 0.0, jnp.float32), _row_layout())
            acc = _cast(cfg, jnp.full((bqw, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(count > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            pl.when(wg == 1)(schedule)

            def step(t, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(t, nst)

                def qk_scope(acc_ref):
                    plgpu.wgmma(acc_ref, qo, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    schedule()
                    return acc_ref[...]

                if cfg.interpret is None:
                    s = pl.run_scoped(qk_scope, plgpu.ACC((bqw, bk), jnp.float32))
                else:  # the CPU interpreter's wgmma takes no transposed operand
                    s = _dot(qo[...], k_smem.at[slot][...].T)
                    schedule()
                plgpu.barrier_arrive(k_done.at[slot])
                if cfg.softcap is None:
                    s = s * (cfg.scale * LOG2E)
                else:
                    s = jnp.tanh(s * (cfg.scale / cfg.softcap)) * (cfg.softcap * LOG2E)
                if masked:
                    allow = _tile_mask(cfg, t, slot, rows, colf_smem, col_bar, nfc, idx_ref, pb, ph, qt)
                    if allow is not None:
                        s = jnp.where(allow, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + jnp.sum(p, axis=1)
                p16 = p.astype(dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)  # the other consumer has issued its matmul

                def pv_state(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = t + 1

                    @pl.when(nxt < count)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(nxt, nst)])

                if cfg.interpret is None:
                    acc = pl.run_state(pv_state)(plgpu.ACC.init(acc))
                else:  # the CPU interpreter has no run_state (nor register wgmma operands)
                    acc = acc + _dot(p16, v_smem.at[slot][...])

                    @pl.when(t + 1 < count)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(t + 1, nst)])
                plgpu.barrier_arrive(v_done.at[slot])
                return acc, m_new, l

            carry = lax.fori_loop(0, npart, functools.partial(step, masked=True), (acc, m, l))
            acc, m, l = lax.fori_loop(npart, count, functools.partial(step, masked=False), carry)
            pl.when(wg == 0)(schedule)

            empty = l == 0.0
            l_safe = jnp.where(empty, 1.0, l)
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            qo[...] = acc.astype(dtype)
            lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, m * LN2 + jnp.log(l_safe))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, out_ref.at[b, pl.ds(q_start, bqw), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q_start, bqw)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(h, jnp.asarray(group, h.dtype))

            def issue(t, slot, wait: bool):
                j = idx_ref[pb, ph, qt, t]
                src = (b, pl.ds(j * bk, bk), kvh)
                if wait:
                    plgpu.barrier_wait(k_done.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bar.at[slot])
                if wait:
                    plgpu.barrier_wait(v_done.at[slot])  # also frees the slot's column features
                plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bar.at[slot])
                if nfc:

                    @pl.when(t < npart)
                    def _():
                        plgpu.copy_gmem_to_smem(
                            colf_ref.at[pb, :, pl.ds(j * bk, bk)], colf_smem.at[slot], col_bar.at[slot]
                        )

            for t in range(nst):
                pl.when(t < count)(functools.partial(issue, t, t, False))

            @pl.loop(nst, jnp.maximum(count, nst))
            def _(t):
                issue(t, lax.rem(t, nst), True)

            # Observe the consumers' releases of the last slots too (every barrier phase is
            # waited for once; the CPU interpreter checks this).
            @pl.loop(jnp.maximum(count - nst, 0), count)
            def _(t):
                slot = lax.rem(t, nst)
                plgpu.barrier_wait(k_done.at[slot])
                plgpu.barrier_wait(v_done.at[slot])

    smem = [
        plgpu.SMEM((_CONSUMERS, bqw, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((nst, bk, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((nst, bk, d), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((_CONSUMERS, bqw), jnp.float32),
        plgpu.SMEM((_CONSUMERS, nfr, bqw), jnp.int32) if nfr else None,
        plgpu.SMEM((nst, nfc, bk), jnp.int32) if nfc else None,
    ]
    bars = (
        plgpu.Barrier(num_barriers=nst),
        plgpu.Barrier(num_barriers=nst),
        plgpu.Barrier(num_barriers=_CONSUMERS),
        plgpu.Barrier(num_barriers=_CONSUMERS) if nfr else None,
        plgpu.Barrier(num_barriers=nst) if nfc else None,
    )
    consumed = (plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=nst),) * 2
    pl.run_scoped(
        body, *smem, bars, consumed, plgpu.Barrier(num_arrivals=_CONSUMERS), collective_axes="wg"
    )


def _tile_mask(cfg: _MCfg, t, slot, rows, colf_smem, col_bar, nfc, idx_ref, pb, ph, qt):
    """bool [rows, bk] of a PARTIAL tile: the sequence-end bound and ``mask_fn``."""
    shape = (cfg.rows, cfg.block_k)
    allow = None
    if cfg.tk % cfg.block_k:
        ks = idx_ref[pb, ph, qt, t] * cfg.block_k
        kid = _cast(cfg, lax.broadcasted_iota(jnp.int32, shape, 1), plgpu.Layout.WGMMA) + ks
        allow = kid < cfg.tk
    if cfg.mask_fn is not None:
        cols = ()
        if nfc:
            plgpu.barrier_wait(col_bar.at[slot])
            cols = tuple(
                lax.broadcast_in_dim(_load(cfg, colf_smem.at[slot, f], _col_layout()), shape, [1])
                for f in range(nfc)
            )
        rows_b = tuple(lax.broadcast_in_dim(r, shape, [0]) for r in rows)
        mk = cfg.mask_fn(rows_b, cols)
        allow = mk if allow is None else allow & mk
    return allow


def _forward(q, k, v, plan: common.BlockPlan, rowf, colf, cfg: _MCfg):
    """The kernel on padded inputs: ``Tq % block_q == 0 == Tk % block_k``."""
    b, tq, nq, d = q.shape
    nkv = k.shape[2]
    pb_on, ph_on = plan.kv_index.shape[0] > 1, plan.kv_index.shape[1] > 1
    nfr, nfc = rowf.shape[1], colf.shape[1]
    nqt = tq // cfg.block_q
    kernel = functools.partial(
        _kernel, cfg=cfg, pb_on=pb_on, ph_on=ph_on, group=nq // nkv, nfr=nfr, nfc=nfc, nqt=nqt
    )
    feats = ([rowf] if nfr else []) + ([colf] if nfc else [])
    call = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, nq, tq), jnp.float32),
        ),
        grid=(nq, nqt, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if cfg.interpret is None else dict(interpret=cfg.interpret)),
    )
    out, lse = call(plan.kv_index, plan.kv_count, plan.kv_partial, q, k, v, *feats)
    return out, lse


# ------------------------------------------------------------------------------------------------
# custom_vjp: this forward, the Triton kernel's backward
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(mcfg, gcfg, q, k, v, plan, plan_bwd, rowf, colf):
    return _forward(q, k, v, plan, rowf, colf, mcfg)


def _flash_fwd(mcfg, gcfg, q, k, v, plan, plan_bwd, rowf, colf):
    out, lse = _forward(q, k, v, plan, rowf, colf, mcfg)
    return (out, lse), (q, k, v, out, lse, plan_bwd, rowf, colf)


def _flash_bwd(mcfg, gcfg, res, cts):
    return gpu._flash_bwd(gcfg, res, cts)  # same residuals and argument layout as gpu._flash


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check(name: str, value, allowed) -> Any:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported by the Mosaic GPU kernel: expected one of {allowed}")
    return value


def check_supported(q, k, v, block_q: int, block_k: int, num_stages: int) -> None:
    """Raises ValueError when this kernel cannot run the case (the caller falls back to Triton)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
        _check(f"{name}.dtype", jnp.dtype(x.dtype).name, ("bfloat16", "float16"))
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check("head_dim (q.shape[3])", q.shape[3], (64, 128))
    if v.shape[3] != q.shape[3]:
        raise ValueError(f"v head dim {v.shape[3]} must equal the q/k head dim {q.shape[3]}")
    _check("block_q", block_q, (128, 256))
    _check("block_k", block_k, (64, 128, 256))
    _check("num_stages", num_stages, (2, 3, 4))


def flash_attention_forward(
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
    num_stages: int = 2,
    block_q_bwd: int = 64,
    block_k_bwd: int = 64,
    num_warps_bwd: int = 4,
    num_stages_bwd: int = 2,
    interpret: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention over the tiles of ``block_map`` with a Mosaic GPU forward; ``(out, lse)``.

    Same contract as ``gpu.flash_attention`` (see there and ``pallas_kernels.common``): q
    ``[B, Tq, Nq, H]``, k ``[B, Tk, Nkv, H]``, v ``[B, Tk, Nkv, H]``; block_map int8
    ``[B|1, Nq|1, cdiv(Tq, block_q), cdiv(Tk, block_k)]`` (None: all FULL); ``mask_fn`` with
    int32 ``row_features [B|1, Fr, Tq]`` / ``col_features [B|1, Fc, Tk]`` on PARTIAL tiles.
    ``block_q`` is the CTA's query tile (two consumer warpgroups of ``block_q / 2`` rows),
    ``num_stages`` the K/V ring depth; ``*_bwd`` configure the Triton backward kernels.
    ``interpret``: True (or interpreter params) runs the Mosaic GPU CPU interpreter: same barriers,
    TMA ring, plan walk, masks and softmax, with the two matmuls as ``jnp.dot`` (the interpreter
    has no transposed / register wgmma operands); call it un-jitted (``jit(grad(...))`` of the
    interpreted kernel did not finish within 10 minutes on CPU, un-jitted it takes seconds).

    Returns ``out [B, Tq, Nq, H]`` in q.dtype and ``lse float32 [B, Nq, Tq]`` (natural log,
    -inf on rows that see no key, whose output is 0); differentiable in q, k, v (and lse)
    through the Triton backward. Unsupported dtypes / head dims / tiles raise ValueError.
    """
    check_supported(q, k, v, block_q, block_k, num_stages)
    for name, val in (("block_q_bwd", block_q_bwd), ("block_k_bwd", block_k_bwd)):
        gpu._check_block(name, val)
    block_map, rowf, colf = common.check_attention_args(
        q, k, v, block_map, mask_fn, row_features, col_features, block_q, block_k
    )
    b, tq, nq, d = q.shape
    tk = k.shape[1]
    rowf, colf, tqp, tkp, plan, plan_bwd = gpu.plans_and_features(
        block_map, rowf, colf, b, tq, tk, (block_q, block_k), (block_q_bwd, block_k_bwd)
    )
    qp, kp, vp = gpu._pad_axis(q, 1, tqp), gpu._pad_axis(k, 1, tkp), gpu._pad_axis(v, 1, tkp)
    scale = float(1.0 / math.sqrt(d) if scale is None else scale)
    softcap = None if softcap is None else float(softcap)
    if interpret is True:
        interpret = _compat_interpret_params()
    mcfg = _MCfg(scale, softcap, block_q, block_k, int(num_stages), tk, mask_fn, interpret or None)
    gcfg = gpu._Cfg(
        scale=scale, softcap=softcap, block_q=block_q, block_k=block_k, tq=tq, tk=tk,
        mask_fn=mask_fn, num_warps=4, num_stages=2, interpret=mcfg.interpret is not None,
        block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd,
        num_warps_bwd=int(num_warps_bwd), num_stages_bwd=int(num_stages_bwd),
    )
    out, lse = _flash(mcfg, gcfg, qp, kp, vp, plan, plan_bwd, rowf, colf)
    return out[:, :tq], lse[:, :, :tq]


def _compat_interpret_params():
    from pallas_kernels import _compat

    return _compat.mosaic_gpu_interpret_params()


flash_attention = flash_attention_forward
