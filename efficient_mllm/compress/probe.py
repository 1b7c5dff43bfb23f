"""Attention probe: the softmax rows of a few chosen queries, never the N x N map.

In-LLM compressors (FastV, SparseVLM, ZipVL, ...) rank image tokens by the attention they
receive from some query rows (the last prompt token, the text tokens after the image, "rater"
tokens) at a decoder layer. Fused attention kernels never materialise the attention map, so
the scores come from a probe: ``q`` is projected for the chosen rows only, ``k`` for all keys,
and the softmax over all keys of that layer (with the causal / padding / extra mask the layer
uses) is computed for those rows. Memory and compute are ``O(B * heads * Q * T)`` for ``Q``
query rows, against ``O(B * heads * T^2)`` for the full map.

* :func:`attention_probe` -- the probe on projected, rotated ``q`` rows and ``k``;
* :func:`block_probe` -- the same on a decoder block's input hidden states (applies the block's
  attention norm, q/k projections and RoPE, gathering the query rows first).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from efficient_mllm.nn.attention import apply_positions
from efficient_mllm.ops import masks as masks_lib

__all__ = ["ProbeResult", "attention_probe", "block_probe", "gather_rows"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What a probe returns (float32).

    * ``weights``: ``[B, Q, K]`` (head-averaged) or ``[B, N, Q, K]`` (per head): softmax
      probability of each query row over all keys, read at the ``K`` requested key columns
      (zero for invalid query rows).
    * ``colsum``: ``[B, K]`` / ``[B, N, K]``: ``weights`` summed over the valid query rows
      (the attention each requested key receives from the query subset).
    * ``num_queries``: int32 ``[B]``, valid query rows per batch row.
    """

    weights: jax.Array
    colsum: jax.Array
    num_queries: jax.Array

    @property
    def mean(self) -> jax.Array:
        """``colsum`` divided by the number of valid query rows (0 where there is none)."""
        n = jnp.maximum(self.num_queries, 1).astype(jnp.float32)
        return self.colsum / (n[:, None, None] if self.colsum.ndim == 3 else n[:, None])


def gather_rows(x: jax.Array, idx: jax.Array, axis: int = 1) -> jax.Array:
    """``x`` gathered at ``idx [B, Q]`` along ``axis`` (the sequence axis, after the batch axis
    at ``axis - 1``): works for ``[B, T, ...]`` (axis 1) and ``[3, B, T]`` (axis 2)."""
    shape = [1] * x.ndim
    shape[axis - 1], shape[axis] = idx.shape
    idx = idx.reshape(shape)
    idx = jnp.broadcast_to(idx, x.shape[:axis] + idx.shape[axis : axis + 1] + x.shape[axis + 1 :])
    return jnp.take_along_axis(x, idx, axis=axis)


def _check_int(name: str, x: Any, shape: tuple[int, ...]) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(
            f"{name} shape={tuple(x.shape)} dtype={x.dtype}: expected int {list(shape)}"
        )
    return x.astype(jnp.int32)


def _eval_spec_rows(spec: Any, q_index: jax.Array, t: int) -> jax.Array:
    """A mask spec at gathered query rows: bool ``[B, 1|N, Q, T]``.

    Rows are gathered per batch row, so the spec is evaluated one batch row at a time (its
    arrays must have a leading batch axis of size ``B`` or 1); local query rows equal absolute
    indices (a call without a cache)."""
    b = q_index.shape[0]
    leaves, treedef = jax.tree.flatten(spec)
    k_pos = jnp.arange(t, dtype=jnp.int32)

    def one(bi, qi):
        sliced = [
            jax.lax.dynamic_index_in_dim(leaf, bi if leaf.shape[0] == b else 0, 0)
            if getattr(leaf, "ndim", 0) >= 1
            else leaf
            for leaf in leaves
        ]
        row_spec = jax.tree.unflatten(treedef, sliced)
        return row_spec._eval(qi[None], qi, k_pos)[0]

    return jax.vmap(one)(jnp.arange(b), q_index)


def attention_probe(
    q: jax.Array,
    k: jax.Array,
    *,
    q_index: jax.Array,
    q_valid: jax.Array | None = None,
    kv_valid: jax.Array | None = None,
    key_index: jax.Array | None = None,
    mask: Any = None,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    per_head: bool = False,
    impl: str = "xla",
) -> ProbeResult:
    """Softmax attention of chosen query rows over all keys, restricted to chosen key columns.

    Args:
      q: ``[B, Q, Nq, H]`` projected (and rotated) query rows.
      k: ``[B, T, Nkv, H]`` all keys of the layer (``Nq % Nkv == 0``, GQA).
      q_index: int ``[B, Q]``: each query row's index among the ``T`` keys (its own slot), used
        by the causal mask (query ``i`` sees keys ``j <= q_index[i]``) and by ``mask``.
      q_valid: bool ``[B, Q]``: rows that take part (others get zero weights); default all.
      kv_valid: bool ``[B, T]``: keys that exist (padding False); default all.
      key_index: int ``[B, K]``: the key columns to return (e.g. the image tokens); default all
        ``T`` keys. The softmax is always over all keys.
      mask: an extra ``ops.masks`` spec (evaluated at the query rows' absolute indices
        ``q_index`` and key indices ``0..T-1``) or a bool array broadcastable to
        ``[B, 1|Nq, Q, T]``.
      causal: apply ``key <= query``; scale: logit scale (default ``1/sqrt(H)``); softcap:
        ``softcap * tanh(logits / softcap)``.
      per_head: return per-head weights ``[B, Nq, Q, K]`` instead of the head mean.
      impl: ``"xla"`` (this code), ``"pallas"`` (the two-pass kernel of
        ``pallas_kernels.attention_probe`` for the backend) or ``"interpret"`` (its GPU version
        in interpret mode, CPU). The kernels take no ``mask``; ``key_index`` is a gather after them.

    Returns a :class:`ProbeResult`. A query row with no visible key gets zero weights.
    """
    if impl != "xla":
        return _kernel_probe(
            q, k, q_index=q_index, q_valid=q_valid, kv_valid=kv_valid, key_index=key_index,
            mask=mask, causal=causal, scale=scale, softcap=softcap, per_head=per_head, impl=impl,
        )  # fmt: skip
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q shape={tuple(q.shape)}, k shape={tuple(k.shape)}: expected [B, Q, Nq, H] and "
            "[B, T, Nkv, H] with equal B and H"
        )
    b, nrows, nq, h = q.shape
    t, nkv = k.shape[1], k.shape[2]
    if nq % nkv:
        raise ValueError(f"q heads={nq} must be a multiple of k heads={nkv}")
    q_index = _check_int("q_index", q_index, (b, nrows))
    q_valid = jnp.ones((b, nrows), bool) if q_valid is None else jnp.asarray(q_valid, bool)
    if q_valid.shape != (b, nrows):
        raise ValueError(f"q_valid shape={tuple(q_valid.shape)}: expected [{b}, {nrows}]")
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    qg = q.astype(jnp.float32).reshape(b, nrows, nkv, nq // nkv, h)
    logits = jnp.einsum("bqkgh,btkh->bkgqt", qg, k.astype(jnp.float32)) * scale
    logits = logits.reshape(b, nq, nrows, t)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    k_pos = jnp.arange(t, dtype=jnp.int32)
    allow = jnp.broadcast_to(q_valid[:, None, :, None], (b, 1, nrows, t))
    if causal:
        allow = allow & (k_pos[None, None, None, :] <= q_index[:, None, :, None])
    if kv_valid is not None:
        kv_valid = jnp.asarray(kv_valid, bool)
        if kv_valid.shape != (b, t):
            raise ValueError(f"kv_valid shape={tuple(kv_valid.shape)}: expected [{b}, {t}]")
        allow = allow & kv_valid[:, None, None, :]
    if mask is not None:
        if isinstance(mask, masks_lib.MaskSpec):
            m = _eval_spec_rows(mask, q_index, t)
        else:
            m = jnp.asarray(mask, bool)
        allow = allow & m
    logits = jnp.where(allow, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(allow, probs, 0.0)  # rows without a visible key: 0, not NaN
    if key_index is not None:
        key_index = _check_int("key_index", key_index, (b, key_index.shape[-1]))
        nk = key_index.shape[1]
        probs = jnp.take_along_axis(
            probs, jnp.broadcast_to(key_index[:, None, None, :], (b, nq, nrows, nk)), axis=-1
        )
    num_queries = jnp.sum(q_valid, axis=1).astype(jnp.int32)
    if per_head:
        return ProbeResult(probs, probs.sum(axis=2), num_queries)
    weights = probs.mean(axis=1)
    return ProbeResult(weights, weights.sum(axis=1), num_queries)


def _kernel_probe(q, k, *, q_index, q_valid, kv_valid, key_index, mask, impl, **kw) -> ProbeResult:
    """``attention_probe`` through the Pallas kernels (``impl="pallas" | "interpret"``)."""
    if impl not in ("pallas", "interpret"):
        raise ValueError(f"impl={impl!r}: expected 'xla', 'pallas' or 'interpret'")
    if mask is not None:
        raise ValueError(
            f"impl={impl!r} takes no mask (got {type(mask).__name__}): use impl='xla', or the "
            "kernel's mask_fn/row_features/col_features directly"
        )
    from pallas_kernels.attention_probe import attention_probe as kernel

    dtype = jnp.promote_types(q.dtype, k.dtype)  # the kernels take one input dtype
    q, k = q.astype(dtype), k.astype(dtype)
    if impl == "interpret":
        kw.update(backend="gpu", interpret=True)
    weights, colsum = kernel(q, k, q_index=q_index, q_valid=q_valid, kv_valid=kv_valid, **kw)
    b, nrows = q.shape[0], q.shape[1]
    if key_index is not None:
        key_index = _check_int("key_index", key_index, (b, jnp.shape(key_index)[-1]))

        def cols(x):  # x [B, ..., T] at key_index [B, K] -> [B, ..., K]
            idx = key_index.reshape((b,) + (1,) * (x.ndim - 2) + key_index.shape[1:])
            return jnp.take_along_axis(x, jnp.broadcast_to(idx, x.shape[:-1] + idx.shape[-1:]), -1)

        weights, colsum = cols(weights), cols(colsum)
    if q_valid is None:
        num_queries = jnp.full((b,), nrows, jnp.int32)
    else:
        num_queries = jnp.sum(jnp.asarray(q_valid, bool), axis=1).astype(jnp.int32)
    return ProbeResult(weights, colsum, num_queries)


def block_probe(
    block: Any,
    hidden: jax.Array,
    *,
    positions: jax.Array | None,
    q_index: jax.Array,
    q_valid: jax.Array | None = None,
    kv_valid: jax.Array | None = None,
    key_index: jax.Array | None = None,
    mask: Any = None,
    per_head: bool = False,
) -> ProbeResult:
    """:func:`attention_probe` of a pre-norm decoder block (``TransformerBlock``: ``attn_norm``,
    ``attn`` with ``q``/``k`` projections and RoPE) on its input ``hidden [B, T, D]``.

    Only the ``Q`` query rows are projected to ``q``; ``k`` is projected for all ``T`` tokens.
    ``positions``: the block's position ids ``[B, T]`` (rope) / ``[3, B, T]`` (mrope).
    The logit scale / softcap of the block's attention variant spec are used when given.
    """
    attn = block.attn
    x = block.attn_norm(hidden)
    q_index = _check_int("q_index", q_index, (hidden.shape[0], jnp.shape(q_index)[-1]))
    xq = gather_rows(x, q_index, axis=1)
    q_pos = None
    if positions is not None:
        positions = jnp.asarray(positions)
        q_pos = gather_rows(positions, q_index, axis=positions.ndim - 1)
    q = apply_positions(attn.q(xq), q_pos, attn.cfg)
    k = apply_positions(attn.k(x), positions, attn.cfg)
    return attention_probe(
        q,
        k,
        q_index=q_index,
        q_valid=q_valid,
        kv_valid=kv_valid,
        key_index=key_index,
        mask=mask,
        scale=getattr(attn, "probe_scale", None),
        softcap=getattr(attn, "probe_softcap", None),
        per_head=per_head,
    )
