"""Multi-head attention module: projections, RoPE, and an attention variant from the registry.

The module owns the q/k/v/o projections (grouped-query attention, Ainslie et al., 2023,
"GQA", arXiv:2305.13245) and the rotary embedding; the attention itself is a variant built by
name from ``registry.ATTENTION`` (``"softmax"`` by default), with the contract
``attend(q, k, v, *, mask=None, q_offset=None) -> [B, Tq, Nq, H]``, so linear / sparse / latent
variants plug in without touching this file. A variant whose factory accepts any of ``dim``,
``num_heads``, ``num_kv_heads``, ``head_dim``, ``dtype``, ``param_dtype``, ``rngs`` receives them
(a variant with parameters returns an ``nnx.Module``, which becomes a submodule).

``attention_row`` is the probe compressors use (FastV, VisionZip, SparseVLM, ...): the softmax
row of one query (or of the mean query) over all keys, head-averaged, in O(T) memory; it never
materialises the T x T map.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.kvcache.cache import LayerCache, RecurrentCache
from efficient_mllm.nn.config import AttentionConfig
from efficient_mllm.nn.layers import Linear
from efficient_mllm.ops import attention as _attention_ops  # noqa: F401  (registers "softmax")
from efficient_mllm.ops import rope as rope_ops

__all__ = ["Attention", "apply_positions", "query_attention_probs"]

_CONTEXT_ARGS = ("dim", "num_heads", "num_kv_heads", "head_dim", "dtype", "param_dtype", "rngs")
_MEAN_PROBS_CHUNK = 256


def query_attention_probs(q, k, *, key_mask=None, scale=None, softcap=None):
    """Softmax probabilities of a few query rows over all keys, averaged over heads.

    Args:
      q: ``[B, Q, Nq, H]`` (post-RoPE) query rows; k: ``[B, T, Nkv, H]`` with ``Nq % Nkv == 0``
        (q head ``i`` reads kv head ``i // (Nq // Nkv)``).
      key_mask: optional bool ``[B, T]``; False keys get probability 0 (rows renormalised over
        the valid keys).
      scale: logit scale, default ``1 / sqrt(H)``; softcap: ``softcap * tanh(logits / softcap)``.

    Returns:
      float32 ``[B, Q, T]``: ``mean_heads softmax_keys(scale * q . k)``; memory O(B Q N T).
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q shape={tuple(q.shape)}, k shape={tuple(k.shape)}: expected [B, Q, Nq, H] and "
            "[B, T, Nkv, H] with equal B and H"
        )
    b, nq_rows, nq, h = q.shape
    t, nkv = k.shape[1], k.shape[2]
    if nq % nkv:
        raise ValueError(f"q heads={nq} must be a multiple of k heads={nkv}")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, nq_rows, nkv, nq // nkv, h)
    logits = jnp.einsum("bqkgh,btkh->bkgqt", qg, k.astype(jnp.float32)) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask, bool)
        if key_mask.shape != (b, t):
            raise ValueError(
                f"key_mask shape={tuple(key_mask.shape)}: expected [B, T] = ({b}, {t})"
            )
        logits = jnp.where(key_mask[:, None, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(jnp.isnan(probs), 0.0, probs)  # rows with no valid key
    return probs.mean(axis=(1, 2))


def apply_positions(x, positions, cfg: AttentionConfig):
    """Applies ``cfg.rope`` to ``x [B, T, N, H]`` (identity for ``"none"``)."""
    if cfg.rope == "none":
        return x
    if positions is None:
        raise ValueError(f"positions=None: rope={cfg.rope!r} needs position ids")
    if cfg.rope == "rope":
        return rope_ops.apply_rope(x, positions, theta=cfg.rope_theta, scaling=cfg.scaling)
    if cfg.rope == "mrope":
        return rope_ops.apply_mrope(
            x, positions, sections=cfg.mrope_sections, theta=cfg.rope_theta, scaling=cfg.scaling
        )
    return rope_ops.apply_rope_2d(x, positions, theta=cfg.rope_theta)


def _slice_positions(positions, rope: str, index: int):
    if rope == "none" or positions is None:
        return positions
    positions = jnp.asarray(positions)
    if rope == "mrope":
        return positions[:, :, index : index + 1]
    return positions[:, index : index + 1]


def _build_variant(cfg: AttentionConfig, rngs: nnx.Rngs):
    name, kwargs = registry.parse_spec(cfg.attention)
    entry = registry.ATTENTION.get(name)
    params = inspect.signature(entry.factory).parameters
    context = {
        "dim": cfg.dim,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "dtype": cfg.compute_dtype,
        "param_dtype": cfg.weight_dtype,
        "rngs": rngs,
    }
    extra = {k: context[k] for k in _CONTEXT_ARGS if k in params and k not in kwargs}
    return registry.ATTENTION.build(cfg.attention, **extra), kwargs


class Attention(nnx.Module):
    """Multi-head attention with GQA, RoPE (1D / M-RoPE / 2D / none) and a registry variant.

    Params: ``q [embed, heads, head_dim]``, ``k``/``v [embed, kv_heads, head_dim]`` (biases when
    ``qkv_bias``), ``o [heads, head_dim, embed]`` (bias when ``out_bias``). Accepts an
    :class:`AttentionConfig` or a ``BlockConfig`` (its attention fields).
    """

    def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, AttentionConfig):
            raise ValueError(f"cfg={cfg!r}: expected an AttentionConfig (or BlockConfig)")
        cfg = cfg.attention_config
        self.cfg = cfg
        d, n, nkv, h, ax = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_axis
        kw = {"dtype": cfg.compute_dtype, "param_dtype": cfg.weight_dtype, "rngs": rngs}
        self.q = Linear(d, (n, h), axes=(ax, "heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.k = Linear(d, (nkv, h), axes=(ax, "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.v = Linear(d, (nkv, h), axes=(ax, "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.o = Linear((n, h), d, axes=("heads", "head_dim", ax), use_bias=cfg.out_bias, **kw)
        self.attend, spec_kwargs = _build_variant(cfg, rngs)
        self.probe_scale = spec_kwargs.get("scale")
        self.probe_softcap = spec_kwargs.get("softcap")
        self.recurrent = bool(getattr(self.attend, "recurrent", False))

    def init_cache(self, batch: int, capacity: int, dtype: Any = None):
        """An empty cache for this layer: a ``LayerCache`` of ``capacity`` key/value slots, or
        the variant's ``RecurrentCache`` (fixed-size state) for recurrent variants."""
        dtype = self.cfg.compute_dtype if dtype is None else dtype
        if self.recurrent:
            return self.attend.init_cache(batch, capacity, dtype)
        return LayerCache.init(batch, capacity, self.cfg.num_kv_heads, self.cfg.head_dim, dtype)

    def state_floats(self, seq_len: int) -> int:
        """Floats of decoding memory per sequence after ``seq_len`` tokens: the KV cache
        (``2 * seq_len * kv_heads * head_dim``; a sliding window caps ``seq_len``) or the
        recurrent state of a linear variant (the MQAR study's state size)."""
        if self.recurrent:
            return int(self.attend.state_floats(seq_len))
        window = getattr(self.attend, "window", None)
        kept = seq_len if window is None else min(window, seq_len)
        return 2 * kept * self.cfg.num_kv_heads * self.cfg.head_dim

    def _check_x(self, x) -> None:
        if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(
                f"x shape={tuple(getattr(x, 'shape', ()))}: expected [B, T, {self.cfg.dim}]"
            )

    def qkv(self, x: jax.Array, *, positions=None):
        """Projected, rotated ``q [B, T, N, H]`` and ``k``, ``v [B, T, Nkv, H]`` of
        ``x [B, T, D]``."""
        self._check_x(x)
        q = apply_positions(self.q(x), positions, self.cfg)
        k = apply_positions(self.k(x), positions, self.cfg)
        return q, k, self.v(x)

    def __call__(self, x: jax.Array, *, positions=None, mask=None, q_offset=None, cache=None):
        """``x [B, T, D]`` -> ``(y [B, T, D], cache)``.

        ``positions``: ``[B, T]`` (rope), ``[3, B, T]`` (mrope), ``[B, T, 2]`` (rope2d) or None
        (none). ``mask``/``q_offset`` go to the variant unchanged. With a ``cache`` (a
        ``LayerCache``), the new k/v are appended (``cache.append(k, v)``) and q attends over
        ``cache.k``/``cache.v``; the caller supplies the matching mask and ``q_offset``.
        """
        q, k, v = self.qkv(x, positions=positions)
        if cache is not None and not self.recurrent:
            if isinstance(cache, RecurrentCache):
                raise ValueError(
                    f"cache is a RecurrentCache but this layer's attention {self.cfg.attention!r}"
                    " keeps keys/values; build caches with model.init_cache(batch, capacity)"
                )
            cache = cache.append(k, v)
            k, v = cache.k, cache.v
            if k.dtype != q.dtype:
                k, v = k.astype(q.dtype), v.astype(q.dtype)
        if self.recurrent:
            out, cache = self.attend.forward(q, k, v, mask=mask, q_offset=q_offset, x=x, cache=cache)
            return self.o(out.astype(q.dtype)), cache
        out = self.attend(q, k, v, mask=mask, q_offset=q_offset)
        return self.o(out.astype(q.dtype)), cache

    def attention_row(self, x: jax.Array, *, positions=None, query_index: Any = 0, key_mask=None):
        """Head-averaged softmax probabilities of one query over all keys: float32 ``[B, T]``.

        ``query_index``:
          * an int ``i``: row ``i`` of the attention map (e.g. 0 for a CLS token); only that
            query is projected.
          * ``"mean"``: the row of the *mean query* ``q_bar = mean_t q_t`` (post-RoPE, over valid
            tokens when ``key_mask`` is given): ``softmax_j(scale * q_bar . k_j)``.
          * ``"mean_probs"``: the mean over (valid) query rows of their probability rows, i.e. the
            attention each key receives on average (VisionZip's score without CLS), computed in
            query chunks of 256 so memory stays O(256 T).
        Non-causal: every query sees every valid key (``key_mask [B, T]``, default all).
        Logits use the variant's ``scale``/``softcap`` spec arguments, else ``1 / sqrt(H)``.
        """
        self._check_x(x)
        if self.recurrent:
            raise ValueError(
                f"attention_row probes softmax attention; this layer uses {self.cfg.attention!r}"
            )
        b, t, _ = x.shape
        kw = {"key_mask": key_mask, "scale": self.probe_scale, "softcap": self.probe_softcap}
        k = apply_positions(self.k(x), positions, self.cfg)
        if isinstance(query_index, (int, np.integer)) and not isinstance(query_index, bool):
            if not -t <= query_index < t:
                raise ValueError(f"query_index={query_index}: expected an int in [-{t}, {t})")
            i = int(query_index) % t
            q = apply_positions(
                self.q(x[:, i : i + 1]), _slice_positions(positions, self.cfg.rope, i), self.cfg
            )
            return query_attention_probs(q, k, **kw)[:, 0]
        if query_index not in ("mean", "mean_probs"):
            raise ValueError(
                f"query_index={query_index!r}: expected an int, 'mean' or 'mean_probs'"
            )
        q = apply_positions(self.q(x), positions, self.cfg).astype(jnp.float32)
        weights = (
            jnp.ones((b, t), jnp.float32)
            if key_mask is None
            else jnp.asarray(key_mask, jnp.float32)
        )
        denom = jnp.maximum(weights.sum(axis=1), 1.0)
        if query_index == "mean":
            q_bar = jnp.einsum("btnh,bt->bnh", q, weights) / denom[:, None, None]
            return query_attention_probs(q_bar[:, None], k, **kw)[:, 0]
        chunk = min(_MEAN_PROBS_CHUNK, t)
        pad = (-t) % chunk
        qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        wp = jnp.pad(weights, ((0, 0), (0, pad)))
        nc = (t + pad) // chunk
        qc = jnp.moveaxis(qp.reshape(b, nc, chunk, *q.shape[2:]), 1, 0)
        wc = jnp.moveaxis(wp.reshape(b, nc, chunk), 1, 0)

        def chunk_sum(args):
            q_rows, w_rows = args
            return jnp.einsum("bqt,bq->bt", query_attention_probs(q_rows, k, **kw), w_rows)

        return jax.lax.map(chunk_sum, (qc, wc)).sum(axis=0) / denom[:, None]
