"""Linear-attention variants of the Attention module, selectable by name per layer.

Each registry entry (``registry.ATTENTION``) builds a :class:`LinearAttention`: a feature map,
a decay, a normaliser and an output stage around the one mechanism in
:mod:`efficient_mllm.ops.linear_attention`. The Attention module still owns q/k/v/o and RoPE.

=============  =================================================================================
name           mechanism (paper)
=============  =================================================================================
linear         ``elu+1`` / ``relu`` / ``identity`` map, divisive normaliser (Katharopoulos et al.
               2020, "Transformers are RNNs")
lightning      ``silu`` q/k, identity map, constant per-head decay (ALiBi slopes), no normaliser,
               SimpleRMSNorm and output gate ``x W_u`` (TransNormerLLM / Lightning Attention-1/2)
retnet         identity map, decay ``gamma_h = 1 - 2^(-5-h)``, per-head GroupNorm, swish gate
               (Sun et al. 2023, "Retentive Network")
based          2nd-order Taylor map of a learned ``head_dim -> feature_dim`` projection,
               divisive (Arora et al. 2024, BASED)
hedgehog       learned ``[softmax(xW+b), softmax(-(xW+b))]`` map per kv head, divisive
               (Zhang et al. 2024, Hedgehog)
performer      FAVOR+ positive random features (fixed projection), divisive (Choromanski et al.
               2021)
ssd            Mamba-2 SSD as attention: data-dependent decay ``-exp(A_log) softplus(x W_dt + b)``
               per kv head, keys scaled by ``dt``, skip ``D v``, gated RMSNorm (Dao & Gu 2024;
               mmMamba's quadratic-to-linear seeding maps q->C, k->B, v->x)
linear_swa     LoLCATs hybrid: exact softmax over the last ``window`` keys (max-subtracted,
               weighted by a learned per-head ``sigmoid`` factor) and a Taylor or Hedgehog
               linear term over all older keys, one shared normaliser (Zhang et al. 2025,
               LoLCATs; BASED's window)
=============  =================================================================================

Not implemented (said per variant): TransNormerLLM's LRPE and per-layer slope scaling (pass
``layer_scale``), RetNet's xPos (RoPE from the module stands in), Mamba-2's causal conv1d and its
separate x/B/C projections (q/k/v stand in), Performer's redrawing/orthogonal features.

Masks: linear recurrences express ``causal()`` and ``padding(kv_lengths)`` only (anything else
raises); ``mask=None`` is the non-causal global form (vision encoders, LinFusion), for variants
without decay or window. Decoding keeps a :class:`~efficient_mllm.kvcache.RecurrentCache`: a
fixed-size state (plus, for ``linear_swa``, a key/value cache read through the window).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_mllm import compat, registry
from efficient_mllm.kvcache.cache import LayerCache, RecurrentCache
from efficient_mllm.nn.layers import Linear, _rng_key
from efficient_mllm.ops import linear_attention as la
from efficient_mllm.ops import masks as masks_lib

__all__ = ["LinearAttention", "FixedRandom"]

_MAPS = ("identity", "elu_plus_one", "relu", "silu", "taylor2", "hedgehog", "performer")
_DECAYS = ("none", "alibi", "retnet", "data")
_OUTPUTS = ("none", "srms_gate", "group_norm_gate", "gated_rms")


class FixedRandom(nnx.Variable):
    """A non-trainable random buffer (Performer's projection): not an ``nnx.Param``."""


def _mask_lengths(mask, name: str):
    """``(causal, kv_lengths | None)`` of a mask a linear recurrence can express."""
    spec = masks_lib.as_mask(mask)
    if spec is None:
        return False, None
    causal, lengths = False, None
    for leaf in spec.leaves():
        if isinstance(leaf, masks_lib.Causal):
            causal = True
        elif isinstance(leaf, masks_lib.Padding) and leaf.q_lengths is None and lengths is None:
            lengths = leaf.kv_lengths
        else:
            raise ValueError(
                f"mask {spec!r}: the {name!r} attention expresses causal() & padding(kv_lengths) "
                f"(or mask=None, non-causal) only, not {type(leaf).__name__}; use a softmax "
                "variant for this layer"
            )
    if not causal:
        raise ValueError(f"mask {spec!r}: the {name!r} attention needs causal() in the mask")
    return True, lengths


class LinearAttention(nnx.Module):
    """A linear-attention variant (see the module docstring for the registry names).

    ``forward(q, k, v, *, mask, q_offset, x, cache) -> (out [B, T, Nq, H], cache)`` is what
    :class:`~efficient_mllm.nn.attention.Attention` calls (``recurrent = True``); ``x`` is the
    layer input (gates and data-dependent decays read it).
    """

    recurrent = True

    def __init__(
        self,
        *,
        name: str,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
        feature_map: str = "elu_plus_one",
        feature_dim: int | None = None,
        normalizer: str = "divisive",
        decay: str = "none",
        layer_scale: float = 1.0,
        output: str = "none",
        window: int | None = None,
        chunk_size: int = 64,
        impl: str = "auto",
        eps: float = 1e-6,
    ):
        for arg, value, allowed in (
            ("feature_map", feature_map, _MAPS),
            ("decay", decay, _DECAYS),
            ("output", output, _OUTPUTS),
            ("normalizer", normalizer, la.NORMALIZERS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: {arg}={value!r}: expected one of {allowed}")
        if impl not in la.IMPLS:
            raise ValueError(f"{name}: impl={impl!r}: expected one of {la.IMPLS}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"{name}: window={window!r}: expected None or an int >= 1")
        if window is not None and (decay != "none" or normalizer != "divisive"):
            raise ValueError(
                f"{name}: window={window} needs decay='none' and normalizer='divisive' "
                "(the shared softmax/linear normaliser of LoLCATs)"
            )
        if feature_map in ("taylor2", "hedgehog", "performer"):
            if not isinstance(feature_dim, int) or feature_dim < 1:
                raise ValueError(
                    f"{name}: feature_dim={feature_dim!r}: feature_map={feature_map!r} needs "
                    "an int >= 1"
                )
        self.name, self.feature_map, self.normalizer = name, feature_map, normalizer
        self.decay, self.output, self.window = decay, output, window
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.chunk_size, self.impl, self.eps = int(chunk_size), impl, float(eps)
        self.dtype = dtype
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        heads_out = (num_heads, head_dim)
        self.layer_scale = float(layer_scale)
        # Feature-map parameters (each attribute assigned once: None when unused).
        self.proj = (
            Linear(head_dim, feature_dim, axes=("head_dim", None), **kw)
            if feature_map == "taylor2"
            else None
        )
        hedgehog = feature_map == "hedgehog"
        # LoLCATs initialises the map near the identity so attention transfer starts close.
        self.hh_weight = (
            compat.logical_param(
                jnp.broadcast_to(
                    jnp.eye(head_dim, feature_dim, dtype=param_dtype),
                    (num_kv_heads, head_dim, feature_dim),
                ),
                ("kv_heads", "head_dim", None),
            )
            if hedgehog
            else None
        )
        self.hh_bias = (
            compat.logical_param(
                jnp.zeros((num_kv_heads, feature_dim), param_dtype), ("kv_heads", None)
            )
            if hedgehog
            else None
        )
        self.random = (
            FixedRandom(jax.random.normal(_rng_key(rngs), (head_dim, feature_dim), jnp.float32))
            if feature_map == "performer"
            else None
        )
        # Data-dependent decay (Mamba-2): A in [1, 16], softplus(dt_bias) in [1e-3, 1e-1].
        data = decay == "data"
        dt0 = jnp.exp(jnp.linspace(math.log(1e-3), math.log(1e-1), num_kv_heads))
        dt_bias = dt0 + jnp.log(-jnp.expm1(-dt0))  # softplus^-1
        self.dt = (
            Linear(
                dim, num_kv_heads, axes=("embed", "kv_heads"), use_bias=True,
                bias_init=lambda key, shape, dt: dt_bias.astype(dt), **kw,
            )
            if data
            else None
        )
        self.a_log = (
            compat.logical_param(
                jnp.log(jnp.linspace(1.0, 16.0, num_kv_heads)).astype(param_dtype), ("kv_heads",)
            )
            if data
            else None
        )
        # Output stage.
        self.gate = (
            Linear(dim, heads_out, axes=("embed", "heads", "head_dim"), **kw)
            if output != "none"
            else None
        )
        self.norm_weight = (
            compat.logical_param(jnp.ones(heads_out, param_dtype), ("heads", "head_dim"))
            if output in ("group_norm_gate", "gated_rms")
            else None
        )
        self.norm_bias = (
            compat.logical_param(jnp.zeros(heads_out, param_dtype), ("heads", "head_dim"))
            if output == "group_norm_gate"
            else None
        )
        self.skip = (
            compat.logical_param(jnp.ones((num_heads,), param_dtype), ("heads",))
            if output == "gated_rms"
            else None
        )
        # LoLCATs' learned weight of the linear term against the window (sigmoid, starts at 1/2).
        self.window_factor = (
            compat.logical_param(jnp.zeros((num_heads,), param_dtype), ("heads",))
            if window is not None
            else None
        )

    # -- pieces ------------------------------------------------------------------------------

    @property
    def feature_size(self) -> int:
        """F, the width of phi(q) and phi(k)."""
        if self.feature_map == "taylor2":
            f = self.proj.out_features[0]
            return 1 + f + f * f
        if self.feature_map == "hedgehog":
            return 2 * self.hh_bias.shape[-1]
        if self.feature_map == "performer":
            return self.random.shape[-1]
        return self.head_dim

    @property
    def state_heads(self) -> int:
        """Heads of the recurrent state: query heads when the decay is per query head."""
        per_q = self.decay in ("alibi", "retnet") and self.num_heads != self.num_kv_heads
        return self.num_heads if per_q else self.num_kv_heads

    def _phi(self, x, *, query: bool):
        """float32 features of ``x [B, T, N, H]`` (N = Nq for queries, Nkv for keys)."""
        x = x.astype(jnp.float32)
        m = self.feature_map
        if m == "silu":
            return jax.nn.silu(x)
        if m in ("identity", "elu_plus_one", "relu"):
            return la.FEATURE_MAPS[m](x)
        if m == "taylor2":
            f = self.proj.out_features[0]
            return la.taylor2(self.proj(x).astype(jnp.float32), scale=f**-0.25)
        if m == "performer":
            return la.performer(x * self.head_dim**-0.25, projection=self.random[...])
        w = self.hh_weight[...].astype(jnp.float32)
        bias = self.hh_bias[...].astype(jnp.float32)
        if query:  # q head h uses the map of its kv head
            g = self.num_heads // self.num_kv_heads
            w, bias = jnp.repeat(w, g, axis=0), jnp.repeat(bias, g, axis=0)
        return la.hedgehog(x, weight=w, bias=bias)

    def _scale(self) -> float:
        if self.feature_map in ("identity", "silu") and self.normalizer == "none":
            return self.head_dim**-0.5
        return 1.0

    def _log_decay(self, x, b: int, t: int):
        """None, constant [Nq] or per token [B, T, Nkv] (with the matching key scale dt)."""
        h = jnp.arange(self.num_heads, dtype=jnp.float32)
        if self.decay == "alibi":  # TNL / Lightning: lambda_h = exp(-2^(-8 (h+1) / H))
            return -self.layer_scale * 2.0 ** (-8.0 * (h + 1) / self.num_heads), None
        if self.decay == "retnet":
            return jnp.log1p(-(2.0 ** (-5.0 - h))), None
        if self.decay == "data":
            if x is None:
                raise ValueError(f"{self.name}: the data-dependent decay needs the layer input x")
            dt = jax.nn.softplus(self.dt(x).astype(jnp.float32))  # [B, T, Nkv]
            return -jnp.exp(self.a_log[...].astype(jnp.float32)) * dt, dt
        return None, None

    def _finish(self, out, v, x):
        """Output stage on ``out`` float32 [B, T, Nq, H]."""
        if self.output == "none":
            return out
        gate = self.gate(x).astype(jnp.float32)
        if self.output == "srms_gate":  # SimpleRMSNorm over all heads, times U = x W_u
            flat = out.reshape(*out.shape[:2], -1)
            rms = jnp.sqrt(jnp.mean(flat * flat, -1, keepdims=True) + self.eps)
            return (flat / rms).reshape(out.shape) * gate
        w = self.norm_weight[...].astype(jnp.float32)
        if self.output == "group_norm_gate":  # RetNet: GroupNorm per head, swish gate
            mu = out.mean(-1, keepdims=True)
            var = jnp.mean((out - mu) ** 2, -1, keepdims=True)
            y = (out - mu) / jnp.sqrt(var + self.eps) * w + self.norm_bias[...]
            return y * jax.nn.silu(gate)
        # Mamba-2: y = out + D v, then RMSNorm(y * silu(z)) over the heads' width.
        g = self.num_heads // self.num_kv_heads
        vq = jnp.repeat(v.astype(jnp.float32), g, axis=2)
        y = (out + self.skip[...].astype(jnp.float32)[:, None] * vq) * jax.nn.silu(gate)
        flat = y.reshape(*y.shape[:2], -1)
        flat = flat / jnp.sqrt(jnp.mean(flat * flat, -1, keepdims=True) + self.eps)
        return flat.reshape(y.shape) * w

    # -- cache -------------------------------------------------------------------------------

    def init_cache(self, batch: int, capacity: int, dtype: Any) -> RecurrentCache:
        f, dv, ns = self.feature_size, self.head_dim, self.state_heads
        length = jnp.zeros((batch,), jnp.int32)
        if self.window is not None:
            state = la.LinearAttentionState(jnp.zeros((batch, ns, f, dv + 1), jnp.float32))
            kv = LayerCache.init(batch, capacity, self.num_kv_heads, self.head_dim, dtype)
            return RecurrentCache(state=state, length=length, kv=kv, capacity=capacity)
        z = jnp.zeros((batch, ns, f), jnp.float32) if self.normalizer == "divisive" else None
        state = la.LinearAttentionState(jnp.zeros((batch, ns, f, dv), jnp.float32), z)
        return RecurrentCache(state=state, length=length, capacity=capacity)

    def state_floats(self, seq_len: int) -> int:
        """Recurrent memory per layer and sequence, in floats (the MQAR study's x-axis)."""
        f, dv, ns = self.feature_size, self.head_dim, self.state_heads
        n = ns * f * dv + (ns * f if self.normalizer == "divisive" else 0)
        if self.window is not None:
            n += 2 * min(self.window, seq_len) * self.num_kv_heads * self.head_dim
        return n

    # -- attention ---------------------------------------------------------------------------

    def __call__(self, q, k, v, *, mask=None, q_offset=None, x=None):
        return self.forward(q, k, v, mask=mask, q_offset=q_offset, x=x)[0]

    def forward(self, q, k, v, *, mask=None, q_offset=None, x=None, cache=None):
        causal, kv_lengths = _mask_lengths(mask, self.name)
        b, t = q.shape[:2]
        if cache is not None and not isinstance(cache, RecurrentCache):
            raise ValueError(
                f"cache of type {type(cache).__name__}: the {self.name!r} layer keeps a "
                "RecurrentCache; build caches with model.init_cache(batch, capacity)"
            )
        if not causal:
            if cache is not None or self.decay != "none" or self.window is not None:
                raise ValueError(
                    f"mask=None (non-causal) with the {self.name!r} attention: the global form "
                    "has no decay, no window and no cache"
                )
            out = la.global_linear_attention(
                self._phi(q, query=True), self._phi(k, query=False), v,
                feature_map="identity", normalizer=self.normalizer, eps=self.eps,
                scale=self._scale(),
            )
            return self._finish(out.astype(jnp.float32), v, x).astype(q.dtype), None
        start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
        n_new = jnp.full((b,), t, jnp.int32) if kv_lengths is None else kv_lengths - start
        valid = jnp.arange(t)[None, :] < n_new[:, None]  # [B, T]; trailing padding is False
        g, dt = self._log_decay(x, b, t)
        if self.window is not None:
            out, new_cache = self._hybrid(q, k, v, cache, start, n_new)
        else:
            fq, fk = self._phi(q, query=True), self._phi(k, query=False)
            vv = v.astype(jnp.float32)
            if dt is not None:
                fk = fk * dt[..., None]
            if cache is not None:  # padded tokens must not enter the carried state
                fk = jnp.where(valid[..., None, None], fk, 0.0)
                vv = jnp.where(valid[..., None, None], vv, 0.0)
                if g is not None:
                    g = jnp.where(valid[..., None], jnp.broadcast_to(g, (b, t, g.shape[-1])), 0.0)
            res = la.linear_attention(
                fq, fk, vv, feature_map="identity", log_decay=g, normalizer=self.normalizer,
                eps=self.eps, scale=self._scale(), chunk_size=self.chunk_size, impl=self.impl,
                initial_state=None if cache is None else cache.state,
                return_state=cache is not None,
            )
            out, new_cache = (res, None) if cache is None else (res[0], cache.replace(state=res[1]))
        if new_cache is not None:
            new_cache = new_cache.replace(length=cache.length + t)
        return self._finish(out.astype(jnp.float32), v, x).astype(q.dtype), new_cache

    def _hybrid(self, q, k, v, cache, start, n_new):
        """LoLCATs: softmax over keys ``(p - window, p]``, linear over keys ``<= p - window``::

            o_p = (f sum_win exp(s_j - m_p) v_j + sum_old phi(q).phi(k_j) v_j) / (same, v = 1)

        with ``s_j = q.k_j / sqrt(H)``, ``m_p`` the largest window logit of the row and
        ``f = sigmoid(window_factor)`` per head (LoLCATs' quadratic hybrid). The window is a band
        gathered per query (memory ``O(T * window)``, no T x T map).
        """
        b, t, nq, h = q.shape
        nkv, w = k.shape[2], self.window
        if cache is None:
            keys, values, kv = k, v, None
        else:  # the window cache's slots follow the layer's length (padding slots are reused)
            kv = cache.kv.replace(length=cache.length).append(k, v)
            keys, values = kv.k.astype(q.dtype), kv.v.astype(q.dtype)
        rows = jnp.arange(t)[None, :]
        valid_q = rows < n_new[:, None]  # [B, T]
        # Window band: key slot p - j (j = 0 .. w-1) for the query at slot p = start + row.
        band = start[:, None, None] + rows[..., None] - jnp.arange(w)[None, None, :]  # [B, T, w]
        in_band = (band >= 0) & valid_q[..., None]
        idx = jnp.clip(band, 0, keys.shape[1] - 1).reshape(b, t * w)[..., None, None]
        kw = jnp.take_along_axis(keys, idx, axis=1).reshape(b, t, w, nkv, h)
        vw = jnp.take_along_axis(values, idx, axis=1).reshape(b, t, w, nkv, h)
        qg = q.astype(jnp.float32).reshape(b, t, nkv, nq // nkv, h)
        logits = jnp.einsum("btkgh,btwkh->btkgw", qg, kw.astype(jnp.float32)) * h**-0.5
        logits = jnp.where(in_band[:, :, None, None, :], logits, -jnp.inf)
        m = jnp.max(logits, -1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no key (padding queries)
        p = jnp.exp(logits - m)
        win_num = jnp.einsum("btkgw,btwkh->btkgh", p, vw.astype(jnp.float32)).reshape(b, t, nq, h)
        win_den = p.sum(-1).reshape(b, t, nq)
        # Keys leaving the window: slot p - w enters the linear state at the query of slot p.
        slot = start[:, None] + rows - w  # [B, T]
        ok = (slot >= 0) & valid_q
        idx = jnp.clip(slot, 0, keys.shape[1] - 1)[..., None, None]
        k_old = jnp.take_along_axis(keys, idx, axis=1)
        v_old = jnp.take_along_axis(values, idx, axis=1).astype(jnp.float32)
        fk = jnp.where(ok[..., None, None], self._phi(k_old, query=False), 0.0)
        v_ext = jnp.concatenate([v_old, jnp.ones_like(v_old[..., :1])], -1)
        v_ext = jnp.where(ok[..., None, None], v_ext, 0.0)
        res = la.linear_attention(
            self._phi(q, query=True), fk, v_ext, feature_map="identity", normalizer="none",
            chunk_size=self.chunk_size, impl=self.impl,
            initial_state=None if cache is None else cache.state,
            return_state=cache is not None,
        )
        lin, state = (res, None) if cache is None else res
        lin = lin.astype(jnp.float32)
        factor = jax.nn.sigmoid(self.window_factor[...].astype(jnp.float32))[:, None]  # [Nq, 1]
        num = factor * win_num + lin[..., :h]
        den = factor[:, 0] * win_den + lin[..., h]
        out = num / jnp.where(den > 0, den, 1.0)[..., None]
        new_cache = None if cache is None else cache.replace(state=state, kv=kv)
        return out, new_cache


_OPTIONS = frozenset(
    ("feature_map", "feature_dim", "normalizer", "decay", "layer_scale", "output", "window",
     "chunk_size", "impl", "eps")
)


def _variant(name: str, **defaults):
    """A registry factory building :class:`LinearAttention` with ``defaults``."""

    def factory(
        dim, num_heads, num_kv_heads, head_dim, dtype, param_dtype, rngs, **kwargs
    ) -> LinearAttention:
        unknown = sorted(set(kwargs) - _OPTIONS)
        if unknown:
            raise ValueError(f"attention {name!r}: unknown argument(s) {unknown}; accepts {sorted(_OPTIONS)}")
        return LinearAttention(
            name=name, dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            **{**defaults, **kwargs},
        )

    factory.__name__ = name
    factory.recurrent = True
    return factory


def _register(name: str, paper: str, doc: str, **defaults):
    factory = _variant(name, **defaults)
    factory.__doc__ = doc
    registry.ATTENTION.register(name, paper=paper)(factory)


_register(
    "linear", "Katharopoulos et al. 2020, Transformers are RNNs",
    "Causal linear attention with a fixed feature map (elu+1 default) and divisive normaliser.",
    feature_map="elu_plus_one",
)
_register(
    "lightning", "Qin et al. 2024, Lightning Attention-2 / TransNormerLLM",
    "silu q/k, constant ALiBi-slope decay, no normaliser, SimpleRMSNorm + output gate.",
    feature_map="silu", normalizer="none", decay="alibi", output="srms_gate",
)
_register(
    "retnet", "Sun et al. 2023, Retentive Network",
    "Retention: decay 1 - 2^(-5-h) per head, GroupNorm per head, swish gate.",
    feature_map="identity", normalizer="none", decay="retnet", output="group_norm_gate",
)
_register(
    "based", "Arora et al. 2024, Simple linear attention language models (BASED)",
    "Taylor-2 feature map on a learned feature_dim projection, divisive normaliser.",
    feature_map="taylor2", feature_dim=16,
)
_register(
    "hedgehog", "Zhang et al. 2024, The Hedgehog & the Porcupine",
    "Learned softmax-mimicking feature map per kv head, divisive normaliser.",
    feature_map="hedgehog", feature_dim=32,
)
_register(
    "performer", "Choromanski et al. 2021, Rethinking Attention with Performers",
    "FAVOR+ positive random features (fixed projection), divisive normaliser.",
    feature_map="performer", feature_dim=64,
)
_register(
    "ssd", "Dao & Gu 2024, Transformers are SSMs (Mamba-2); mmMamba 2025",
    "Mamba-2 SSD: data-dependent decay per kv head, dt-scaled keys, D skip, gated RMSNorm.",
    feature_map="identity", normalizer="none", decay="data", output="gated_rms",
)
_register(
    "linear_swa", "Zhang et al. 2025, LoLCATs; Arora et al. 2024, BASED",
    "Softmax over a sliding window plus linear attention beyond it, one shared normaliser.",
    feature_map="taylor2", feature_dim=16, window=64,
)
