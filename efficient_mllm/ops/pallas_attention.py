"""``impl="pallas"`` and ``impl="interpret"`` for :func:`efficient_mllm.ops.attention.dot_product_attention`.

``pallas`` runs the block-sparse flash-attention kernel of the current backend: on Hopper GPUs
(compute capability 9.x) the Mosaic GPU forward (``pallas_kernels/flash_attention/mosaic_gpu.py``:
wgmma + TMA, 1.01-1.03x cuDNN causal at T >= 8K on an H200) with the Triton backward, on other
NVIDIA GPUs and for cases the Mosaic kernel does not take (fp32, head dims other than 64 / 128,
block-sparse blocks that 128 x 64 tiles do not divide) the Triton kernel
(``pallas_kernels/flash_attention/gpu.py``), on TPUs ``tpu.py``; ``interpret`` runs the
Triton-style kernel in the Pallas interpreter (any backend, for tests).
``EFFICIENT_MLLM_GPU_FLASH=triton`` forces the Triton kernel on Hopper too. The mask spec becomes a block
map plus an in-tile predicate (:mod:`efficient_mllm.ops.kernel_masks`). ``impl="auto"`` tries
cuDNN first and takes this path for masks cuDNN cannot express (segment ids, prefix-LM,
modality-mutual, frame-block causal, block-sparse, q offsets, softcap, lse). A single decode
step (``Tq == 1``, ``causal() & padding(kv_lengths)``, a ``q_offset``) goes to the
flash-decoding kernel (:mod:`efficient_mllm.ops.decode_attention`).
"""

from __future__ import annotations

import logging
import math
import os

import jax
import jax.numpy as jnp

from efficient_mllm.ops import kernel_masks
from efficient_mllm.ops import masks as M
from efficient_mllm.ops.attention import _Request, register_impl

# Tile sizes per backend (GPU: Triton tiles; TPU: Mosaic needs multiples of 128 on the lanes).
GPU_BLOCKS = (128, 64)  # forward tiles measured best on H100/H200 (BENCHMARKS.md)
TPU_BLOCKS = (128, 128)
_MAX_HEAD_DIM = 256
# Mosaic GPU forward tiles (block_q, block_k, stages): best in the H200 sweep
# (benchmarks/bench_flash_mosaic_h200.json); block_k falls to 64 for 64-wide sparse blocks.
MOSAIC_BLOCKS = (128, 128, 2)
log = logging.getLogger(__name__)


def _backend_for(impl: str) -> str:
    return "interpret" if impl == "interpret" else jax.default_backend()


def _blocks(spec, backend: str) -> tuple[int, int]:
    bq, bk = TPU_BLOCKS if backend == "tpu" else GPU_BLOCKS
    if spec is not None:
        for leaf in spec.leaves():
            if isinstance(leaf, M.BlockSparse):  # kernel tiles must divide the sparse blocks
                bq = math.gcd(bq, leaf.block_q)
                bk = math.gcd(bk, leaf.block_k)
    return bq, bk


def _is_hopper() -> bool:
    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", "") or "")
    return dev.platform == "gpu" and cc.split(".")[0] == "9"


def mosaic_tiles(spec, dtype, head_dim: int, v_head_dim: int) -> tuple[tuple[int, int, int] | None, str]:
    """``((block_q, block_k, stages), "")`` when the Mosaic GPU forward takes the case, else
    ``(None, why)`` (the Triton kernel runs it). Device-independent (see :func:`_run`)."""
    if os.environ.get("EFFICIENT_MLLM_GPU_FLASH", "auto") == "triton":
        return None, "EFFICIENT_MLLM_GPU_FLASH=triton"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None, f"dtype {jnp.dtype(dtype).name} (the Mosaic forward takes bf16 / fp16)"
    if head_dim not in (64, 128) or v_head_dim != head_dim:
        return None, f"head dims ({head_dim}, {v_head_dim}) (the Mosaic forward takes 64 or 128)"
    bq, bk, stages = MOSAIC_BLOCKS
    if spec is not None:
        for leaf in spec.leaves():
            if isinstance(leaf, M.BlockSparse):
                bq, bk = math.gcd(bq, leaf.block_q), math.gcd(bk, leaf.block_k)
    if bq != 128 or bk not in (64, 128):
        return None, f"block-sparse blocks need ({bq}, {bk}) tiles (the Mosaic forward: 128 x 64|128)"
    return (bq, bk, stages), ""


def _structure_reason(spec) -> str | None:
    """Why a spec has no kernel form (None when it has one)."""
    if spec is None:
        return None
    if isinstance(spec, (M.And, M.Or)):
        for s in spec.specs:
            if isinstance(s, M.BlockSparse) and isinstance(spec, M.Or):
                return "a block-sparse mask under '|' has no kernel form"
            r = _structure_reason(s)
            if r:
                return r
        return None
    if isinstance(spec, M.Not):
        if isinstance(spec.spec, M.BlockSparse):
            return "a negated block-sparse mask has no kernel form"
        return _structure_reason(spec.spec)
    if isinstance(spec, M.ArrayMask):
        return "a dense boolean mask array has no kernel form (pass an ops.masks spec)"
    if isinstance(spec, M.BlockSparse) or type(spec) in kernel_masks._LEAVES:
        return None
    return f"mask leaf {type(spec).__name__} has no kernel form"


def _supports(r: _Request, impl: str) -> str | None:
    backend = _backend_for(impl)
    if backend not in ("gpu", "tpu", "interpret"):
        return f"impl='pallas' needs a GPU or TPU backend, this is {backend!r} (use impl='interpret')"
    if r.bias is not None:
        return "the Pallas attention kernels take no additive bias array"
    dts = {r.q.dtype, r.k.dtype, r.v.dtype}
    if not dts <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}:
        return f"the Pallas attention kernels take float32/bfloat16/float16 inputs, got {sorted(map(str, dts))}"
    if max(r.q.shape[3], r.v.shape[3]) > _MAX_HEAD_DIM:
        return f"head dim {max(r.q.shape[3], r.v.shape[3])} > {_MAX_HEAD_DIM}"
    if backend == "gpu" and "nvidia" not in str(jax.devices()[0].device_kind).lower():
        return "the GPU kernel uses the Triton lowering for NVIDIA GPUs"
    if r.softcap is not None and not isinstance(r.softcap, (int, float)):
        return "softcap must be a Python number for the kernels (it is a static parameter)"
    if r.scale is not None and not isinstance(r.scale, (int, float)):
        return "scale must be a Python number for the kernels (it is a static parameter)"
    reason = _structure_reason(r.mask)
    if reason:
        return reason
    if r.mask is not None:
        bq, bk = _blocks(r.mask, backend)
        for leaf in r.mask.leaves():
            if isinstance(leaf, M.BlockSparse):
                off = r.q_offset
                if not (off is None or (M._is_int(off) and off % leaf.block_q == 0)):
                    return "block-sparse masks need a static q_offset that is a multiple of block_q"
        if backend == "tpu" and (bq % 128 or bk % 128):
            return f"block-sparse blocks ({bq}, {bk}) are not multiples of 128 (TPU tiles)"
    return None


def _decode_lengths(r: _Request):
    """Per-row cache lengths when the call is one decode step (``Tq == 1`` under
    ``causal() & padding(kv_lengths)`` with a ``q_offset``): the flash-decoding kernel then
    computes exactly the same thing (keys ``j < min(kv_length, q_offset + 1)``). Else None."""
    if r.q.shape[1] != 1 or r.q_offset is None or r.mask is None:
        return None
    leaves = r.mask.leaves()
    if len(leaves) != 2 or not isinstance(r.mask, M.And):
        return None
    causal = [x for x in leaves if isinstance(x, M.Causal)]
    pad = [x for x in leaves if isinstance(x, M.Padding) and x.q_lengths is None]
    if len(causal) != 1 or len(pad) != 1:
        return None
    h, hv = r.q.shape[3], r.v.shape[3]
    if any(x < 16 or x & (x - 1) for x in (h, hv)):  # the GPU decode kernel's tiles
        return None
    b = r.q.shape[0]
    return jnp.broadcast_to(jnp.minimum(pad[0].kv_lengths, r.offsets + 1), (b,)).astype(jnp.int32)


def _run(r: _Request, impl: str):
    backend = _backend_for(impl)
    b, tq = r.q.shape[:2]
    tk = r.k.shape[1]
    lengths = _decode_lengths(r)
    if lengths is not None:
        from efficient_mllm.ops.decode_attention import decode_attention

        out, lse = decode_attention(
            r.q,
            r.k,
            r.v,
            lengths,
            scale=None if r.scale is None else float(r.scale),
            softcap=None if r.softcap is None else float(r.softcap),
            impl="interpret" if backend == "interpret" else "pallas",
        )
        return out, (lse if r.return_lse else None)
    bq, bk = _blocks(r.mask, backend)
    mosaic = None
    if backend == "gpu" and _is_hopper():
        mosaic, why = mosaic_tiles(r.mask, r.q.dtype, r.q.shape[3], r.v.shape[3])
        if mosaic is None:
            log.info("pallas attention: Triton kernel, not Mosaic GPU: %s", why)
        else:
            bq, bk = mosaic[:2]
    km = kernel_masks.kernel_mask(r.mask, b, tq, tk, bq, bk, r.q_offset)
    kw = dict(
        block_map=km.block_map,
        mask_fn=km.mask_fn,
        row_features=km.row_features,
        col_features=km.col_features,
        scale=None if r.scale is None else float(r.scale),
        softcap=None if r.softcap is None else float(r.softcap),
        block_q=bq,
        block_k=bk,
    )
    if backend == "tpu":
        from pallas_kernels.flash_attention import tpu

        out, lse = tpu.flash_attention(r.q, r.k, r.v, **kw)
    elif mosaic is not None:
        from pallas_kernels.flash_attention import mosaic_gpu

        out, lse = mosaic_gpu.flash_attention_forward(r.q, r.k, r.v, num_stages=mosaic[2], **kw)
    else:
        from pallas_kernels.flash_attention import gpu

        out, lse = gpu.flash_attention(r.q, r.k, r.v, interpret=backend == "interpret", **kw)
    return out, (lse if r.return_lse else None)


register_impl("pallas", lambda r: _run(r, "pallas"), lambda r: _supports(r, "pallas"))
register_impl(
    "interpret", lambda r: _run(r, "interpret"), lambda r: _supports(r, "interpret"), auto=False
)
