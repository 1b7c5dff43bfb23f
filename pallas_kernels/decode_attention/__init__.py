"""Flash-decoding: a few new query tokens against a long KV cache (forward only).

Semantics shared by the kernels (``gpu.py``, ``tpu.py``) and the XLA reference
(``efficient_mllm.ops.decode_attention``)::

    q [B, Tq, Nq, H], k_cache [B, S, Nkv, H], v_cache [B, S, Nkv, Hv], lengths int32 [B]
    -> out [B, Tq, Nq, Hv] (q.dtype), lse float32 [B, Nq, Tq]

* ``lengths[b]`` counts the valid cache slots *including* the Tq new tokens (already appended).
  Query row ``i`` sits at slot ``lengths[b] - Tq + i`` and sees the keys ``j <= slot`` (causal
  among the new tokens). A row whose slot is negative (``lengths[b] < Tq``; ``0`` included) sees
  no key: out 0, lse -inf. Under jit, ``lengths > S`` cannot be checked: keys past ``S`` simply
  do not exist (concrete lengths outside ``[0, S]`` raise).
* ``kv_block_indices int32 [B, Nkv|1, M]`` (with ``kv_block_counts int32 [B, Nkv|1]``, default
  ``M``): only the first ``count`` listed key blocks of size ``block_k`` are attended, still with
  the causal/length bound. Entries must be distinct (duplicates would count twice); entries outside
  ``[0, cdiv(S, block_k))`` select nothing. Concrete inputs are checked for both.
* Logits ``scale * q.k`` (default ``1/sqrt(H)``), then ``softcap * tanh(s / softcap)``; softmax
  and accumulation in float32.

The KV axis is split into ``num_splits`` chunks of each sequence's *own* block list (dense: its
``cdiv(length, block_k)`` blocks), processed in parallel; each chunk writes a partial
``(out, lse)`` and :func:`combine` reduces them by log-sum-exp. The q heads of one kv head and the
Tq rows form the rows of one matrix (row ``t * G + g``), so K/V are read once per kv head.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DecodeArgs", "auto_num_splits", "check_args", "combine", "decode_attention", "group_q"]


def cdiv(a, b):
    return -(-a // b)


class DecodeArgs(NamedTuple):
    """Validated static facts about a call (see :func:`check_args`)."""

    batch: int
    tq: int
    nq: int
    nkv: int
    group: int  # Nq // Nkv
    head_dim: int
    head_dim_v: int
    seq: int  # S, the cache capacity
    scale: float
    softcap: float | None
    indices: jax.Array | None  # int32 [B, Nkv, M] (broadcast over heads), or None (dense)
    counts: jax.Array | None  # int32 [B, Nkv], clipped to [0, M]


def _concrete(x) -> np.ndarray | None:
    """The value of ``x`` as numpy when it is known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _is_pos_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0


def check_args(
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
) -> DecodeArgs:
    """Validates a decode-attention call; raises ValueError naming the bad argument."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype") or x.ndim != 4:
            raise ValueError(
                f"{name} must be an array of rank 4 [batch, seq, heads, head_dim], got "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    b, tq, nq, h = q.shape
    _, s, nkv, hk = k_cache.shape
    if k_cache.shape[0] != b or v_cache.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}"
        )
    if v_cache.shape[1:3] != (s, nkv):
        raise ValueError(
            f"v_cache {v_cache.shape} must match k_cache {k_cache.shape} in seq and heads"
        )
    if hk != h:
        raise ValueError(f"k_cache head dim {hk} must equal q head dim {h}")
    if min(b, tq, nq, h, s, nkv, v_cache.shape[3]) == 0:
        raise ValueError(
            f"empty dimension in q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}"
        )
    if not 1 <= tq <= 16:
        raise ValueError(f"q must hold 1..16 new tokens (q.shape[1]), got Tq={tq}")
    if nq % nkv:
        raise ValueError(f"q heads ({nq}) must be a multiple of k_cache heads ({nkv})")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) dtypes differ")

    if not hasattr(lengths, "shape") or tuple(lengths.shape) != (b,):
        raise ValueError(
            f"lengths must be int32 [batch={b}], got {getattr(lengths, 'shape', lengths)}"
        )
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must have an integer dtype, got {lengths.dtype}")
    lv = _concrete(lengths)
    if lv is not None and (lv.min() < 0 or lv.max() > s):
        raise ValueError(f"lengths must lie in [0, S={s}] (cache capacity), got {lv.tolist()}")

    if block_k is not None and not _is_pos_int(block_k):
        raise ValueError(f"block_k must be a positive int or None, got {block_k!r}")
    if num_splits is not None and not _is_pos_int(num_splits):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be None or a Python float, got {scale!r}")
    if softcap is not None and (
        not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap > 0
    ):
        raise ValueError(f"softcap must be None or a positive Python float, got {softcap!r}")

    idx = cnt = None
    if kv_block_indices is None:
        if kv_block_counts is not None:
            raise ValueError("kv_block_counts was given without kv_block_indices")
    else:
        if block_k is None:
            raise ValueError("block_k must be given with kv_block_indices (it sizes the blocks)")
        x = kv_block_indices
        if (
            not hasattr(x, "shape")
            or x.ndim != 3
            or x.shape[0] != b
            or x.shape[1] not in (1, nkv)
            or x.shape[2] == 0
        ):
            raise ValueError(
                f"kv_block_indices must be int32 [batch={b}, 1 or kv_heads={nkv}, M>0], got "
                f"{getattr(x, 'shape', x)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"kv_block_indices must have an integer dtype, got {x.dtype}")
        m = x.shape[2]
        if kv_block_counts is None:
            c = jnp.full((b, x.shape[1]), m, jnp.int32)
        else:
            c = kv_block_counts
            if (
                not hasattr(c, "shape")
                or c.ndim != 2
                or c.shape[0] != b
                or c.shape[1] not in (1, nkv)
            ):
                raise ValueError(
                    f"kv_block_counts must be int32 [batch={b}, 1 or kv_heads={nkv}], got "
                    f"{getattr(c, 'shape', c)}"
                )
            if not jnp.issubdtype(c.dtype, jnp.integer):
                raise ValueError(f"kv_block_counts must have an integer dtype, got {c.dtype}")
        nblk = cdiv(s, block_k)
        xv, cv = _concrete(x), _concrete(c)
        if cv is not None and (cv.min() < 0 or cv.max() > m):
            raise ValueError(f"kv_block_counts must lie in [0, M={m}], got {cv.tolist()}")
        if xv is not None and cv is not None:
            xb, cb = np.broadcast_arrays(xv, cv[..., None])
            used = np.arange(m) < cb
            bad = used & ((xb < 0) | (xb >= nblk))
            if bad.any():
                raise ValueError(
                    f"kv_block_indices must lie in [0, cdiv(S={s}, block_k={block_k})={nblk}), "
                    f"got {xb[bad][:8].tolist()}"
                )
            srt = np.sort(np.where(used, xb, -1 - np.arange(m)), axis=-1)
            if (srt[..., 1:] == srt[..., :-1]).any():
                raise ValueError("kv_block_indices must not repeat a block within one list")
        idx = jnp.broadcast_to(x.astype(jnp.int32), (b, nkv, m))
        cnt = jnp.broadcast_to(jnp.clip(c.astype(jnp.int32), 0, m), (b, nkv))
    return DecodeArgs(
        b,
        tq,
        nq,
        nkv,
        nq // nkv,
        h,
        v_cache.shape[3],
        s,
        float(scale),
        None if softcap is None else float(softcap),
        idx,
        cnt,
    )


def auto_num_splits(
    batch: int, kv_heads: int, n_blocks: int, *, target: int = 512, min_blocks: int = 4
) -> int:
    """Splits so that ``batch * kv_heads * splits`` programs reach ``target`` (about 4 per SM of
    an H100), with at least ``min_blocks`` key blocks per split."""
    want = cdiv(target, batch * kv_heads)
    return int(max(1, min(want, n_blocks // min_blocks)))


def group_q(q: jax.Array, nkv: int, rows: int, width: int | None = None, head_offset=None):
    """``q [B, Tq, Nq, H] -> [B, Nkv, rows, W]``: row ``t * G + g`` is head ``kv * G + g`` at
    token ``t``; rows past ``Tq * G`` are zero. With ``width``, head ``kv`` is placed at column
    ``head_offset[kv]`` of a zero ``W``-wide row (the TPU kernel's lane-aligned K window)."""
    b, tq, nq, h = q.shape
    g = nq // nkv
    x = q.reshape(b, tq, nkv, g, h).transpose(0, 2, 1, 3, 4).reshape(b, nkv, tq * g, h)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, rows - tq * g), (0, 0)))
    if width is None or width == h:
        return x
    cols = jnp.arange(width)[None, :] - jnp.asarray(head_offset)[:, None]  # [Nkv, W]
    onehot = (cols[..., None] == jnp.arange(h)).astype(q.dtype)  # [Nkv, W, H]
    return jnp.einsum("bkrh,kwh->bkrw", x, onehot)


def combine(o_parts: jax.Array, lse_parts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-sum-exp reduction of split partials: ``o_parts f32 [B, Nkv, P, rows, Hv]`` (each
    normalised by its own sum) and ``lse_parts f32 [B, Nkv, P, rows]`` (-inf for an empty split)
    -> ``out f32 [B, Nkv, rows, Hv]`` and ``lse [B, Nkv, rows]`` (rows seeing nothing: 0, -inf)."""
    mx = jnp.max(lse_parts, axis=2, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w = jnp.exp(lse_parts - mx)  # 0 for empty splits
    tot = jnp.sum(w, axis=2)
    has = tot > 0
    safe = jnp.where(has, tot, 1.0)
    out = jnp.einsum("bkpr,bkprh->bkrh", w, o_parts, precision=jax.lax.Precision.HIGHEST)
    out = out / safe[..., None]
    lse = jnp.where(has, mx[:, :, 0] + jnp.log(safe), -jnp.inf)
    return out, lse


def ungroup(out: jax.Array, lse: jax.Array, tq: int, group: int, hv: int, dtype):
    """Inverse of :func:`group_q` for results: ``out [B, Nkv, rows, >=Hv]``, ``lse [B, Nkv,
    rows]`` -> ``[B, Tq, Nq, Hv]`` in ``dtype`` and ``[B, Nq, Tq]`` float32."""
    b, nkv = out.shape[:2]
    o = out[:, :, : tq * group, :hv].reshape(b, nkv, tq, group, hv)
    o = o.transpose(0, 2, 1, 3, 4).reshape(b, tq, nkv * group, hv).astype(dtype)
    l = lse[:, :, : tq * group].reshape(b, nkv, tq, group).transpose(0, 1, 3, 2)
    return o, l.reshape(b, nkv * group, tq).astype(jnp.float32)


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
    """The Pallas kernel for the current backend: TPU on ``jax.default_backend() == "tpu"``, else
    the GPU (Triton) kernel; ``interpret=True`` runs the GPU kernel in interpret mode."""
    kw = dict(
        kv_block_indices=kv_block_indices,
        kv_block_counts=kv_block_counts,
        block_k=block_k,
        scale=scale,
        softcap=softcap,
        num_splits=num_splits,
        interpret=interpret,
    )
    if jax.default_backend() == "tpu" and not interpret:
        from pallas_kernels.decode_attention import tpu

        return tpu.decode_attention(q, k_cache, v_cache, lengths, **kw)
    from pallas_kernels.decode_attention import gpu

    return gpu.decode_attention(q, k_cache, v_cache, lengths, **kw)
