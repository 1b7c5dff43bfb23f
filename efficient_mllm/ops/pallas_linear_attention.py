"""``linear_attention(impl="pallas" | "interpret")``: the chunked Pallas kernels behind the
reference API of :mod:`efficient_mllm.ops.linear_attention`.

The kernels (``pallas_kernels/linear_attention``) take feature-mapped inputs with equal heads and
no normaliser; this adapter maps features (in float32, then cast to the input dtype for the
kernel's matmuls), repeats k/v/decay over the query heads of a GQA group, turns the divisive
normaliser into an extra value column of ones (its state is the last state column) and maps the
state between the reference's ``LinearAttentionState`` and the kernel's ``[B, H, F, dv]``.
One-token calls (decoding) use the recurrent step kernel.

Precision: with bf16 inputs the features, the normaliser column and the output pass through bf16
(states and accumulation stay float32); the reference keeps everything in float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from efficient_mllm.ops import linear_attention as la

__all__ = ["kernel_module", "linear_attention"]


def kernel_module(impl: str):
    """``(module, interpret)`` of the kernel for ``impl`` on this backend."""
    backend = "interpret" if impl == "interpret" else jax.default_backend()
    if backend == "tpu":
        from pallas_kernels.linear_attention import tpu as mod

        return mod, False
    if backend in ("gpu", "interpret"):
        from pallas_kernels.linear_attention import gpu as mod

        return mod, backend == "interpret"
    raise ValueError(
        f"impl={impl!r}: the Pallas linear-attention kernels need a GPU or TPU backend, this is "
        f"{backend!r} (use impl='interpret' or impl='xla')"
    )


def _heads(x, axis: int, n: int, nq: int):
    """Repeats kv-head entries along ``axis`` to query heads when ``n != nq``."""
    return x if n == nq else jnp.repeat(x, nq // n, axis=axis)


@partial(
    jax.jit,
    static_argnames=("feature_map", "normalizer", "chunk_size", "return_state", "impl"),
)
def linear_attention(
    q, k, v, log_decay, feature_kwargs, state, eps, scale, *, feature_map, normalizer,
    chunk_size, return_state, impl,
):
    """Arguments as :func:`efficient_mllm.ops.linear_attention.linear_attention` (checked)."""
    mod, interpret = kernel_module(impl)
    b, t, nq, _ = q.shape
    nkv, dv = k.shape[2], v.shape[3]
    fq, fk = la.mapped_features(q, k, feature_map, feature_kwargs, scale)
    f = fq.shape[-1]
    g = None
    ns = nkv
    if log_decay is not None:
        g = jnp.asarray(log_decay, jnp.float32)
        n = g.shape[-1]
        if g.ndim == 3 and g.shape[:2] != (b, t) or g.ndim not in (1, 3) or n not in (nq, nkv):
            raise ValueError(
                f"log_decay shape {tuple(g.shape)}: expected [N] or [B, T, N], N in {{{nq}, {nkv}}}"
            )
        if n == nq:
            ns = nq
        g = _heads(g, g.ndim - 1, n, nq)
    vv = jnp.asarray(v, jnp.float32)
    if normalizer == "divisive":
        vv = jnp.concatenate([vv, jnp.ones_like(vv[..., :1])], -1)
    dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    fq, fk, vv = fq.astype(dtype), _heads(fk, 2, nkv, nq).astype(dtype), _heads(vv, 2, nkv, nq)
    vv = vv.astype(dtype)
    s0 = None
    if state is not None:
        s0 = jnp.asarray(state.kv, jnp.float32)
        if normalizer == "divisive":
            s0 = jnp.concatenate([s0, jnp.asarray(state.z, jnp.float32)[..., None]], -1)
        s0 = _heads(s0, 1, ns, nq)
        if s0.shape != (b, nq, f, vv.shape[-1]):
            raise ValueError(f"state shape {tuple(s0.shape)} does not match the inputs")
    if t == 1 and hasattr(mod, "linear_attention_step"):
        zeros = jnp.zeros((b, nq, f, vv.shape[-1]), jnp.float32)
        gt = None if g is None else (g if g.ndim == 1 else g[:, 0])
        out, s = mod.linear_attention_step(
            fq[:, 0], fk[:, 0], vv[:, 0], gt, zeros if s0 is None else s0, interpret=interpret
        )
        out = out[:, None]
    else:
        # Chunks are a tiling, not semantics: the GPU kernel needs a power of two >= 16 (the
        # TPU kernel rounds up to a multiple of 128 itself).
        chunk = max(16, 1 << (chunk_size - 1).bit_length())
        out, s = mod.chunked_linear_attention(
            fq, fk, vv, g, initial_state=s0, return_final_state=True, chunk_size=chunk,
            interpret=interpret,
        )
    out = out.astype(jnp.float32)
    if normalizer == "divisive":
        out = out[..., :dv] / (out[..., dv:] + eps)
    out = out.astype(q.dtype)
    if not return_state:
        return out
    if ns != nq:
        s = s[:, :: nq // ns]
    if normalizer == "divisive":
        return out, la.LinearAttentionState(s[..., :dv], s[..., dv])
    return out, la.LinearAttentionState(s)
