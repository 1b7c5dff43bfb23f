"""Decode attention: a few new query tokens against a KV cache, optionally on selected key blocks.

``decode_attention(q, k_cache, v_cache, lengths, ...)`` is the public op; ``impl="xla"`` is the
reference below, ``"pallas"`` the flash-decoding kernel of the backend
(:mod:`pallas_kernels.decode_attention`: Triton on GPU, Mosaic on TPU), ``"interpret"`` the GPU
kernel in interpret mode, ``"interpret_tpu"`` the TPU kernel in TPU interpret mode, ``"auto"``
the kernel on GPU/TPU and the reference elsewhere. Semantics (shared by all implementations):

* ``lengths[b]`` counts valid cache slots *including* the ``Tq`` new tokens; query row ``i`` sits
  at slot ``lengths[b] - Tq + i`` and attends keys ``j <= slot``. Rows with a negative slot
  (``lengths[b] < Tq``) attend nothing: out 0, lse -inf.
* ``kv_block_indices int32 [B, Nkv|1, M]`` + ``kv_block_counts int32 [B, Nkv|1]``: only the
  first ``count`` listed blocks of ``block_k`` keys are attended (distinct entries; the interface
  KV-selection methods such as Quest feed), still under the causal/length bound.
* Returns ``out [B, Tq, Nq, Hv]`` in q's dtype and ``lse float32 [B, Nq, Tq]``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels import decode_attention as _kern

__all__ = ["DECODE_IMPLS", "decode_attention", "decode_attention_xla"]

DECODE_IMPLS = ("auto", "xla", "pallas", "interpret", "interpret_tpu")


def decode_attention_xla(
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
):
    """The reference: dense logits over the whole cache, masked, softmax in float32."""
    a = _kern.check_args(
        q,
        k_cache,
        v_cache,
        lengths,
        kv_block_indices,
        kv_block_counts,
        block_k,
        scale,
        softcap,
        None,
    )
    return _xla(q, k_cache, v_cache, lengths, a.indices, a.counts, block_k, a.scale, a.softcap)


@partial(jax.jit, static_argnums=(6, 7, 8))
def _xla(q, k, v, lengths, indices, counts, block_k, scale, softcap):
    b, tq, nq, h = q.shape
    s, nkv = k.shape[1], k.shape[2]
    g = nq // nkv
    col = jnp.arange(s)
    slot = lengths.astype(jnp.int32)[:, None] - tq + jnp.arange(tq)  # [B, Tq]
    allow = (col <= slot[..., None])[:, None, None]  # [B, 1, 1, Tq, S]
    if indices is not None:
        nblk = -(-s // block_k)
        m = indices.shape[-1]
        ok = (jnp.arange(m) < counts[..., None]) & (indices >= 0) & (indices < nblk)
        tgt = jnp.where(ok, indices, nblk)  # unused / out-of-range entries land in a spare slot
        sel = jnp.zeros((b, nkv, nblk + 1), bool)
        sel = sel.at[jnp.arange(b)[:, None, None], jnp.arange(nkv)[None, :, None], tgt].set(True)
        allow = allow & sel[:, :, col // block_k][:, :, None, None, :]  # [B, Nkv, 1, Tq, S]

    exact = jnp.dtype(q.dtype).itemsize >= 4 and jnp.dtype(k.dtype).itemsize >= 4
    prec = jax.lax.Precision.HIGHEST if exact else None
    qg = q.reshape(b, tq, nkv, g, h)
    logits = (
        jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32, precision=prec)
        * scale
    )
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(allow, logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(logits - mx)
    l = jnp.sum(p, axis=-1, keepdims=True)
    has = l > 0
    safe = jnp.where(has, l, 1.0)
    out = jnp.einsum("bkgts,bskh->btkgh", p / safe, v.astype(jnp.float32), precision=prec)
    out = out.reshape(b, tq, nq, v.shape[3]).astype(q.dtype)
    lse = jnp.where(has, mx + jnp.log(safe), -jnp.inf)[..., 0].reshape(b, nq, tq)
    return out, lse


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
    impl="auto",
    interpret=False,
):
    """Attention of ``Tq`` (1..16) new tokens over a KV cache (see the module docstring).

    Args:
      q: ``[B, Tq, Nq, H]``; k_cache ``[B, S, Nkv, H]``; v_cache ``[B, S, Nkv, Hv]``.
      lengths: int32 ``[B]``, valid slots including the new tokens, in ``[0, S]``.
      kv_block_indices, kv_block_counts: optional key-block lists (need ``block_k``).
      block_k: key block size (defines the block lists; a tile size for the dense kernels).
      scale: logit scale (default ``1/sqrt(H)``); softcap: ``softcap * tanh(s / softcap)``.
      num_splits: KV splits of the kernels (None = from ``B * Nkv`` and ``S``).
      impl: ``"auto" | "xla" | "pallas" | "interpret" | "interpret_tpu"``.
      interpret: with ``impl="pallas"``, run the backend's kernel in interpret mode.
    """
    if not isinstance(impl, str) or impl not in DECODE_IMPLS:
        raise ValueError(f"impl must be one of {DECODE_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    if impl == "xla":
        return decode_attention_xla(
            q,
            k_cache,
            v_cache,
            lengths,
            kv_block_indices=kv_block_indices,
            kv_block_counts=kv_block_counts,
            block_k=block_k,
            scale=scale,
            softcap=softcap,
        )
    kw = dict(
        kv_block_indices=kv_block_indices,
        kv_block_counts=kv_block_counts,
        block_k=block_k,
        scale=scale,
        softcap=softcap,
        num_splits=num_splits,
    )
    if impl == "interpret_tpu":
        from jax.experimental.pallas import tpu as pltpu

        from pallas_kernels.decode_attention import tpu

        return tpu.decode_attention(
            q, k_cache, v_cache, lengths, interpret=pltpu.InterpretParams(), **kw
        )
    if impl == "pallas" and not interpret and jax.default_backend() not in ("gpu", "tpu"):
        raise ValueError(
            f"impl='pallas' needs a GPU or TPU backend, this is {jax.default_backend()!r}; use "
            "impl='interpret' (or 'xla')"
        )
    interp = True if impl == "interpret" else interpret
    return _kern.decode_attention(q, k_cache, v_cache, lengths, interpret=interp, **kw)
