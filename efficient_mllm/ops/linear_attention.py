"""Linear attention: feature maps, log-space decay, parallel / chunked / recurrent / global forms.

One mechanism covers Lightning Attention-1/2 and TransNormerLLM (identity map, constant decay),
RetNet (constant decay), BASED (Taylor map), Hedgehog / LoLCATs (learned softmax map), Performer
(positive random features), Mamba-2 SSD / mmMamba (data-dependent decay) and LinFusion (global,
normalised). Per head, with ``phi`` the feature map and ``g_t <= 0`` the log-decay::

    S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t        state [F, dv], float32
    z_t = exp(g_t) z_{t-1} + phi(k_t)              normaliser state [F] (divisive only)
    o_t = scale phi(q_t) S_t                       ("none")
    o_t = scale phi(q_t) S_t / (scale phi(q_t) . z_t + eps)    ("divisive")

i.e. ``O = ((phi(Q) phi(K)^T) * D) V`` with ``D[t, s] = exp(sum_{s < r <= t} g_r)`` for ``s <= t``.

Forms (``form=``), equal up to float rounding: ``"parallel"`` (quadratic masked, the reference),
``"chunked"`` (Lightning-Attention-2 / SSD: parallel inside chunks of ``chunk_size`` tokens, a
float32 state carried across chunks by ``lax.scan``; T is zero-padded to a chunk multiple, padded
keys contribute nothing) and ``"recurrent"`` (a scan of :func:`linear_attention_step`, the O(1)
decode step). :func:`global_linear_attention` is the non-causal ``phi(Q) (phi(K)^T V)``.

Decay is ``None``, constant per head (``log_decay [N]``) or per token and head (``[B, T, N]``),
``N`` either the query or the kv heads. Decays enter only as ``exp`` of sums of log-decays that
are ``<= 0`` (segment sums in ``parallel``, in-chunk cumulative sums in ``chunked``): no product
of many decays is ever formed, so nothing underflows into 0/0 and nothing overflows.

GQA: ``q [B, T, Nq, dk]``, ``k [B, T, Nkv, dk]``, ``v [B, T, Nkv, dv]``, query head ``h`` reads kv
head ``h // (Nq // Nkv)`` by broadcasting (k/v are never repeated). The state has one head per kv
head, or one per query head when the decay has ``Nq != Nkv`` heads (head ``h`` then).

Divisive normaliser: ``num / (den + eps)``. With non-negative features (every map here but
``identity``) ``den >= 0``, and ``den ~ 0`` only when ``phi(q_t)`` misses every (decayed) key seen,
e.g. all-zero relu features; ``num`` is then ~0 as well and the output is ~0 (exactly 0 when
``den == 0``), never NaN. With sign-indefinite features (``identity``) ``den`` can vanish or turn
negative while ``num`` does not, and the output is unbounded: use ``normalizer="none"`` (the model
then applies its output norm, e.g. TransNormerLLM's SimpleRMSNorm).

All arithmetic is float32 (features, scores, states; HIGHEST matmul precision) whatever the input
dtype; outputs are in ``q.dtype``. Left to models: projections (BASED's small q/k dim), LRPE,
gates, output norms and the sliding-window softmax of hybrids. Performer's projection is an input
(no redrawing, no orthogonalisation here); Hedgehog uses LoLCATs' per-token softmax form of the map
(the paper's un-normalised ``exp`` is the same up to a per-token factor, which cancels only with
the divisive normaliser).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FEATURE_MAPS",
    "FORMS",
    "IMPLS",
    "NORMALIZERS",
    "LinearAttentionState",
    "elu_plus_one",
    "global_linear_attention",
    "hedgehog",
    "identity",
    "linear_attention",
    "linear_attention_step",
    "performer",
    "relu",
    "taylor2",
]

FORMS = ("parallel", "chunked", "recurrent")
IMPLS = ("xla", "pallas", "interpret", "auto")
NORMALIZERS = ("none", "divisive")
_HI = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


# ----------------------------------------------------------------------------- feature maps
# Each maps x [..., N, d] to float32 features [..., N, F].


def identity(x):
    """``phi(x) = x`` (F = d)."""
    return jnp.asarray(x, jnp.float32)


def elu_plus_one(x):
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al., 2020; F = d)."""
    return jax.nn.elu(jnp.asarray(x, jnp.float32)) + 1.0


def relu(x):
    """``phi(x) = max(x, 0)`` (F = d)."""
    return jax.nn.relu(jnp.asarray(x, jnp.float32))


def taylor2(x, *, scale=1.0):
    """BASED's 2nd-order Taylor map ``[1, x, vec(x x^T) / sqrt(2)]`` of ``scale * x`` (F = 1+d+d²).

    ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = scale^2 q . k`` (BASED: ``scale = d^-1/4``).
    """
    x = jnp.asarray(x, jnp.float32) * scale
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1) / math.sqrt(2.0)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer], axis=-1)


def _project(x, w, name):
    w = jnp.asarray(w, jnp.float32)
    if w.ndim == 2 and w.shape[0] == x.shape[-1]:
        return _mm(x, w)
    if w.ndim == 3 and w.shape[:2] == x.shape[-2:]:
        return jnp.einsum("...nd,ndm->...nm", x, w, precision=_HI)
    raise ValueError(
        f"{name} shape {tuple(w.shape)}: expected [d={x.shape[-1]}, m] or "
        f"[N={x.shape[-2]}, d={x.shape[-1]}, m] for inputs of shape {tuple(x.shape)}"
    )


def performer(x, *, projection):
    """FAVOR+ positive random features ``exp(x W - |x|^2 / 2) / sqrt(m)`` (F = m).

    ``projection`` [d, m] or per head [N, d, m]; with columns ~ N(0, I),
    ``E[phi(q) . phi(k)] = exp(q . k)`` (scale q, k by ``d^-1/4`` first for softmax's ``1/sqrt(d)``).
    """
    x = jnp.asarray(x, jnp.float32)
    xw = _project(x, projection, "projection")
    return jnp.exp(xw - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / math.sqrt(xw.shape[-1])


def hedgehog(x, *, weight, bias=None):
    """Hedgehog / LoLCATs map ``[softmax(x W + b), softmax(-(x W + b))]`` (F = 2m), trainable.

    ``weight`` [d, m] or per head [N, d, m]; ``bias`` broadcastable to [..., N, m].
    """
    h = _project(jnp.asarray(x, jnp.float32), weight, "weight")
    if bias is not None:
        h = h + jnp.asarray(bias, jnp.float32)
    return jnp.concatenate([jax.nn.softmax(h, -1), jax.nn.softmax(-h, -1)], axis=-1)


FEATURE_MAPS: dict[str, Callable[..., jax.Array]] = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "taylor2": taylor2,
    "performer": performer,
    "hedgehog": hedgehog,
}
_REQUIRED_KWARGS = {"performer": ("projection",), "hedgehog": ("weight",)}


class LinearAttentionState(NamedTuple):
    """Recurrent state: ``kv`` float32 [B, Ns, F, dv]; ``z`` float32 [B, Ns, F] or None.

    ``Ns = Nq`` when the decay has query heads (and ``Nq != Nkv``), else ``Nkv``. ``z`` (the
    normaliser state) is present exactly when ``normalizer="divisive"``.
    """

    kv: jax.Array
    z: jax.Array | None = None


# ----------------------------------------------------------------------------- checks / layout


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_options(normalizer, eps):
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer={normalizer!r}: expected one of {NORMALIZERS}")
    if not isinstance(eps, (int, float, np.integer, np.floating)) or not eps >= 0:
        raise ValueError(f"eps={eps!r}: expected a number >= 0")


def _check_qkv(q, k, v, *, causal):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} shape {tuple(jnp.shape(x))}: expected [B, T, N, H]")
    b, t, nq, dk = q.shape
    if t < 1:
        raise ValueError(f"q shape {tuple(q.shape)}: expected at least one token (T >= 1)")
    if k.shape[0] != b or k.shape[3] != dk:
        raise ValueError(f"k shape {tuple(k.shape)}: expected [B={b}, T, Nkv, dk={dk}]")
    if causal and k.shape[1] != t:
        raise ValueError(f"k shape {tuple(k.shape)}: causal forms expect T={t} keys (q's length)")
    if k.shape[1] < 1:
        raise ValueError(f"k shape {tuple(k.shape)}: expected at least one key")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)}: expected [B, T, Nkv, dv] = {k.shape[:3]} + dv")
    if nq % k.shape[2]:
        raise ValueError(f"q heads {nq}: expected a multiple of the kv heads {k.shape[2]} (GQA)")


def mapped_features(q, k, feature_map, feature_kwargs, scale):
    """``(phi(q) * scale, phi(k))`` float32 in the input layout ``[B, T, N, F]``, checked."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map={feature_map!r}: expected one of {sorted(FEATURE_MAPS)} or a callable"
            )
        kwargs = dict(feature_kwargs or {})
        missing = [n for n in _REQUIRED_KWARGS.get(feature_map, ()) if n not in kwargs]
        if missing:
            raise ValueError(
                f"feature_kwargs={sorted(kwargs)}: feature_map={feature_map!r} needs {missing}"
            )
        phi = FEATURE_MAPS[feature_map]
    elif callable(feature_map):
        phi, kwargs = feature_map, dict(feature_kwargs or {})
    else:
        raise ValueError(
            f"feature_map={feature_map!r}: expected one of {sorted(FEATURE_MAPS)} or a callable"
        )
    fq = jnp.asarray(phi(q, **kwargs), jnp.float32) * scale
    fk = jnp.asarray(phi(k, **kwargs), jnp.float32)
    if (
        fq.shape[:-1] != q.shape[:-1]
        or fk.shape[:-1] != k.shape[:-1]
        or fq.shape[-1] != fk.shape[-1]
    ):
        raise ValueError(
            f"feature_map={feature_map!r} gave {tuple(fq.shape)} for q {tuple(q.shape)} and "
            f"{tuple(fk.shape)} for k {tuple(k.shape)}: expected [B, T, N, F] with one F"
        )
    return fq, fk


def _features(q, k, feature_map, feature_kwargs, scale):
    """phi(q) * scale as [B, Nkv, G, T, F] and phi(k) as [B, Nkv, 1, T, F], float32."""
    fq, fk = mapped_features(q, k, feature_map, feature_kwargs, scale)
    b, t, nq, f = fq.shape
    nkv = k.shape[2]
    fq = fq.reshape(b, t, nkv, nq // nkv, f).transpose(0, 2, 3, 1, 4)
    fk = fk.transpose(0, 2, 1, 3)[:, :, None]
    return fq, fk


def _values(v):
    return jnp.asarray(v, jnp.float32).transpose(0, 2, 1, 3)[:, :, None]  # [B, Nkv, 1, T, dv]


def _log_decay(log_decay, b, t, nq, nkv, *, per_token_shape):
    """log_decay -> float32 [B, Nkv, Gd, T] (Gd = 1 or Nq // Nkv)."""
    if log_decay is None:
        return jnp.zeros((b, nkv, 1, t), jnp.float32)
    g = jnp.asarray(log_decay, jnp.float32)
    expected = (
        f"[N] (constant per head) or {per_token_shape} (per token and head), N in {{{nq}, {nkv}}}"
    )
    if g.ndim == 1:
        g = jnp.broadcast_to(g, (b, t, g.shape[0]))
    elif g.ndim == 3 and g.shape[:2] == (b, t):
        pass
    elif g.ndim == 2 and per_token_shape == "[B, N]" and g.shape[0] == b:
        g = g[:, None]
    else:
        raise ValueError(f"log_decay shape {tuple(g.shape)}: expected {expected}")
    n = g.shape[-1]
    if n not in (nq, nkv):
        raise ValueError(f"log_decay shape {tuple(jnp.shape(log_decay))}: expected {expected}")
    gd = 1 if n == nkv else nq // nkv
    return g.reshape(b, t, nkv, gd).transpose(0, 2, 3, 1)


def _check_decay_values(log_decay):
    """Finite and <= 0; checked only when concrete (under jit the values are not known)."""
    if log_decay is None or not _is_concrete(log_decay):
        return
    arr = np.asarray(log_decay, np.float64)
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr > 0)):
        raise ValueError(
            f"log_decay: values in [{arr.min()}, {arr.max()}]: expected finite log-decays <= 0"
        )


def _state_in(state, shape, normalizer):
    """Public state -> internal ([B, Nkv, Gd, F, dv], [B, Nkv, Gd, F] | None); zeros if None."""
    b, nkv, gd, f, dv = shape
    if state is None:
        z = jnp.zeros((b, nkv, gd, f), jnp.float32) if normalizer == "divisive" else None
        return jnp.zeros(shape, jnp.float32), z
    if not isinstance(state, LinearAttentionState):
        raise ValueError(f"state of type {type(state).__name__}: expected LinearAttentionState")
    if tuple(jnp.shape(state.kv)) != (b, nkv * gd, f, dv):
        raise ValueError(
            f"state.kv shape {tuple(jnp.shape(state.kv))}: expected [B, Ns, F, dv] = "
            f"{(b, nkv * gd, f, dv)}"
        )
    kv = jnp.asarray(state.kv, jnp.float32).reshape(shape)
    if normalizer == "none":
        if state.z is not None:
            raise ValueError("state.z: expected None with normalizer='none'")
        return kv, None
    if state.z is None or tuple(jnp.shape(state.z)) != (b, nkv * gd, f):
        got = None if state.z is None else tuple(jnp.shape(state.z))
        raise ValueError(
            f"state.z shape {got}: expected {(b, nkv * gd, f)} with normalizer='divisive'"
        )
    return kv, jnp.asarray(state.z, jnp.float32).reshape(shape[:-1])


def _state_out(kv, z):
    b, nkv, gd, f, dv = kv.shape
    return LinearAttentionState(
        kv.reshape(b, nkv * gd, f, dv), None if z is None else z.reshape(b, nkv * gd, f)
    )


def _finish(num, den, normalizer, eps, dtype):
    """[B, Nkv, G, T, dv] -> [B, T, Nq, dv] in dtype."""
    if normalizer == "divisive":
        num = num / (den[..., None] + eps)
    b, nkv, g, t, dv = num.shape
    return num.transpose(0, 3, 1, 2, 4).reshape(b, t, nkv * g, dv).astype(dtype)


# ----------------------------------------------------------------------------- forms
# Internal layout: fq [B, K, G, T, F], fk [B, K, 1, T, F], v [B, K, 1, T, dv], g [B, K, Gd, T],
# state s [B, K, Gd, F, dv], z [B, K, Gd, F] | None; G and Gd broadcast in products and matmuls.


def _segsum(g):
    """seg[..., t, s] = sum_{s < r <= t} g_r for s <= t, -inf above the diagonal."""
    t = g.shape[-1]
    lower = jnp.tril(jnp.ones((t, t), bool), -1)
    seg = jnp.cumsum(jnp.where(lower, g[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), seg, -jnp.inf)


def _parallel(fq, fk, v, g, s0, z0):
    seg = _segsum(g)  # [B, K, Gd, T, T]
    a = _mm(fq, _t(fk)) * jnp.exp(seg)
    num, den = _mm(a, v), a.sum(-1)
    w_end = jnp.exp(seg[..., -1, :])[..., None]  # decay of each key up to the last token
    s = _mm(_t(fk * w_end), v)
    z = None if z0 is None else jnp.sum(fk * w_end, -2)
    cum = jnp.cumsum(g, -1)  # decay since the initial state
    w0 = jnp.exp(cum)[..., None]
    num = num + w0 * _mm(fq, s0)
    s = s + jnp.exp(cum[..., -1])[..., None, None] * s0
    if z0 is not None:
        den = den + w0[..., 0] * jnp.sum(fq * z0[..., None, :], -1)
        z = z + jnp.exp(cum[..., -1])[..., None] * z0
    return num, den, s, z


def _chunked(fq, fk, v, g, s0, z0, chunk):
    t = fq.shape[-2]
    c = min(chunk, t)
    nc = -(-t // c)
    pad = nc * c - t

    def split(x, axis):  # pad T (zeros: no key, no decay) and split it into [nc, c]
        if pad:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, pad)
            x = jnp.pad(x, widths)
        return x.reshape(*x.shape[:axis], nc, c, *x.shape[axis + 1 :])

    fq, fk, v, g = split(fq, 3), split(fk, 3), split(v, 3), split(g, 3)
    b = jnp.cumsum(g, -1)  # [B, K, Gd, nc, c]: in-chunk log decay, >= c * min(g)
    tril = jnp.tril(jnp.ones((c, c), bool))
    dmat = jnp.exp(jnp.where(tril, b[..., :, None] - b[..., None, :], -jnp.inf))
    a = _mm(fq, _t(fk)) * dmat  # intra-chunk, [B, K, G, nc, c, c]
    num, den = _mm(a, v), a.sum(-1)
    total = b[..., -1]  # [B, K, Gd, nc]
    wk = jnp.exp(total[..., None] - b)[..., None]  # key -> chunk end
    kv_c = _mm(_t(fk * wk), v)  # [B, K, Gd, nc, F, dv]
    z_c = None if z0 is None else jnp.sum(fk * wk, -2)

    def body(carry, xs):
        s, z = carry
        tot, kv_i, z_i = xs
        new_s = jnp.exp(tot)[..., None, None] * s + kv_i
        new_z = None if z is None else jnp.exp(tot)[..., None] * z + z_i
        return (new_s, new_z), (s, z)

    xs = (jnp.moveaxis(total, 3, 0), jnp.moveaxis(kv_c, 3, 0))
    xs += (None if z_c is None else jnp.moveaxis(z_c, 3, 0),)
    (s, z), (s_prev, z_prev) = jax.lax.scan(body, (s0, z0), xs)
    wq = jnp.exp(b)[..., None]  # chunk start -> query
    num = num + _mm(fq * wq, jnp.moveaxis(s_prev, 0, 3))
    if z0 is not None:
        den = den + jnp.sum(fq * wq * jnp.moveaxis(z_prev, 0, 3)[..., None, :], -1)
    merge = lambda x: x.reshape(*x.shape[:3], nc * c, *x.shape[5:])[:, :, :, :t]
    return merge(num), merge(den), s, z


def _step(fq, fk, v, g, s, z):
    """One token: fq [B, K, G, F], fk [B, K, 1, F], v [B, K, 1, dv], g [B, K, Gd]."""
    a = jnp.exp(g)
    s = a[..., None, None] * s + fk[..., :, None] * v[..., None, :]
    num = _mm(fq[..., None, :], s)[..., 0, :]
    den = None
    if z is not None:
        z = a[..., None] * z + fk
        den = jnp.sum(fq * z, -1)
    return num, den, s, z


def _recurrent(fq, fk, v, g, s0, z0):
    def body(carry, xs):
        num, den, s, z = _step(*xs, *carry)
        return (s, z), (num, den)

    xs = tuple(jnp.moveaxis(x, 3, 0) for x in (fq, fk, v)) + (jnp.moveaxis(g, 3, 0),)
    (s, z), (num, den) = jax.lax.scan(body, (s0, z0), xs)
    den = None if den is None else jnp.moveaxis(den, 0, 3)
    return jnp.moveaxis(num, 0, 3), den, s, z


# ----------------------------------------------------------------------------- public API
# Public functions check shapes/options (and concrete log-decay values) eagerly, then run one
# jitted body: feature_map / normalizer / form / chunk_size are static, feature_kwargs traced.

_STATIC = ("feature_map", "normalizer", "form", "chunk_size", "return_state")


def linear_attention(
    q,
    k,
    v,
    *,
    feature_map: str | Callable[..., Any] = "identity",
    feature_kwargs: Mapping[str, Any] | None = None,
    log_decay=None,
    normalizer: str = "none",
    eps: float = 1e-6,
    scale: float = 1.0,
    form: str = "chunked",
    chunk_size: int = 64,
    initial_state: LinearAttentionState | None = None,
    return_state: bool = False,
    impl: str = "xla",
):
    """Causal linear attention.

    Args:
      q: [B, T, Nq, dk]; k: [B, T, Nkv, dk]; v: [B, T, Nkv, dv]; ``Nq % Nkv == 0``.
      feature_map: a name in :data:`FEATURE_MAPS` or a (hashable) callable
        ``phi(x [B,T,N,d], **feature_kwargs) -> [B,T,N,F]``, applied to q and k (for separate
        q/k maps pass mapped features and ``"identity"``). feature_kwargs: its keyword arrays
        (``projection``, ``weight``, ``bias``, ``scale``; traced under jit).
      log_decay: None; [N] (constant per head); or [B, T, N] (per token); N in {Nq, Nkv};
        finite and ``<= 0`` (checked when concrete).
      normalizer: ``"none"`` or ``"divisive"`` (module docstring: behaviour when ``den ~ 0``).
      scale: multiplies ``phi(q)``. form: one of :data:`FORMS`. chunk_size: static int >= 1.
      initial_state / return_state: continue from / also return a :class:`LinearAttentionState`.
      impl: ``"xla"`` (the ``form`` above), ``"pallas"`` (the chunked Pallas kernel of the
        backend, ``chunk_size`` its chunk), ``"interpret"`` (the GPU kernel in the Pallas
        interpreter) or ``"auto"`` (``"pallas"`` on GPU/TPU for T > 1, else ``"xla"``: the XLA
        one-token update beat the step kernel on the H200, 8 vs 21 us at batch 1); see
        :mod:`efficient_mllm.ops.pallas_linear_attention`.

    Returns:
      out [B, T, Nq, dv] in q.dtype, and the final state when ``return_state``.
    """
    _check_qkv(q, k, v, causal=True)
    _check_options(normalizer, eps)
    if form not in FORMS:
        raise ValueError(f"form={form!r}: expected one of {FORMS}")
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a static int >= 1")
    _check_decay_values(log_decay)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":  # one-token steps: XLA's fused update measured faster (BENCHMARKS.md)
        on_device = jax.default_backend() in ("gpu", "tpu")
        impl = "pallas" if on_device and q.shape[1] > 1 else "xla"
    if impl != "xla":
        from efficient_mllm.ops import pallas_linear_attention as _kernels

        return _kernels.linear_attention(
            q, k, v, log_decay, feature_kwargs, initial_state, eps, scale,
            feature_map=feature_map, normalizer=normalizer, chunk_size=int(chunk_size),
            return_state=bool(return_state), impl=impl,
        )
    return _linear_attention(
        q,
        k,
        v,
        log_decay,
        feature_kwargs,
        initial_state,
        eps,
        scale,
        feature_map=feature_map,
        normalizer=normalizer,
        form=form,
        chunk_size=int(chunk_size),
        return_state=bool(return_state),
    )


@partial(jax.jit, static_argnames=_STATIC)
def _linear_attention(
    q,
    k,
    v,
    log_decay,
    feature_kwargs,
    state,
    eps,
    scale,
    *,
    feature_map,
    normalizer,
    form,
    chunk_size,
    return_state,
):
    b, t, nq, _ = q.shape
    nkv = k.shape[2]
    g = _log_decay(log_decay, b, t, nq, nkv, per_token_shape="[B, T, N]")
    fq, fk = _features(q, k, feature_map, feature_kwargs, scale)
    vv = _values(v)
    s0, z0 = _state_in(state, (b, nkv, g.shape[2], fq.shape[-1], v.shape[-1]), normalizer)
    if form == "parallel":
        num, den, s, z = _parallel(fq, fk, vv, g, s0, z0)
    elif form == "chunked":
        num, den, s, z = _chunked(fq, fk, vv, g, s0, z0, chunk_size)
    else:
        num, den, s, z = _recurrent(fq, fk, vv, g, s0, z0)
    out = _finish(num, den, normalizer, eps, q.dtype)
    return (out, _state_out(s, z)) if return_state else out


def linear_attention_step(
    q,
    k,
    v,
    state: LinearAttentionState | None = None,
    *,
    feature_map: str | Callable[..., Any] = "identity",
    feature_kwargs: Mapping[str, Any] | None = None,
    log_decay=None,
    normalizer: str = "none",
    eps: float = 1e-6,
    scale: float = 1.0,
):
    """One decode step: q [B, Nq, dk], k [B, Nkv, dk], v [B, Nkv, dv], state (None = zeros).

    ``log_decay``: None, [N] or [B, N]. Returns ``(out [B, Nq, dv] in q.dtype, new state)``;
    other arguments as in :func:`linear_attention`.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 3:
            raise ValueError(f"{name} shape {tuple(jnp.shape(x))}: expected [B, N, H] (one token)")
    q, k, v = q[:, None], k[:, None], v[:, None]
    _check_qkv(q, k, v, causal=True)
    _check_options(normalizer, eps)
    _check_decay_values(log_decay)
    return _linear_attention_step(
        q,
        k,
        v,
        log_decay,
        feature_kwargs,
        state,
        eps,
        scale,
        feature_map=feature_map,
        normalizer=normalizer,
    )


@partial(jax.jit, static_argnames=("feature_map", "normalizer"))
def _linear_attention_step(
    q, k, v, log_decay, feature_kwargs, state, eps, scale, *, feature_map, normalizer
):
    b, _, nq, _ = q.shape
    nkv = k.shape[2]
    g = _log_decay(log_decay, b, 1, nq, nkv, per_token_shape="[B, N]")
    fq, fk = _features(q, k, feature_map, feature_kwargs, scale)
    s, z = _state_in(state, (b, nkv, g.shape[2], fq.shape[-1], v.shape[-1]), normalizer)
    num, den, s, z = _step(fq[..., 0, :], fk[..., 0, :], _values(v)[..., 0, :], g[..., 0], s, z)
    den = None if den is None else den[..., None]
    out = _finish(num[..., None, :], den, normalizer, eps, q.dtype)
    return out[:, 0], _state_out(s, z)


def global_linear_attention(
    q,
    k,
    v,
    *,
    feature_map: str | Callable[..., Any] = "identity",
    feature_kwargs: Mapping[str, Any] | None = None,
    normalizer: str = "none",
    eps: float = 1e-6,
    scale: float = 1.0,
    kv_mask=None,
):
    """Non-causal ``phi(Q) (phi(K)^T V)`` (vision encoders, LinFusion); no decay.

    q [B, Tq, Nq, dk], k [B, Tk, Nkv, dk], v [B, Tk, Nkv, dv]; ``kv_mask`` bool [B, Tk]
    (False = padding key, excluded). Returns out [B, Tq, Nq, dv] in q.dtype.
    """
    _check_qkv(q, k, v, causal=False)
    _check_options(normalizer, eps)
    if kv_mask is not None and tuple(jnp.shape(kv_mask)) != k.shape[:2]:
        raise ValueError(
            f"kv_mask shape {tuple(jnp.shape(kv_mask))}: expected [B, Tk] = {k.shape[:2]}"
        )
    return _global_linear_attention(
        q,
        k,
        v,
        kv_mask,
        feature_kwargs,
        eps,
        scale,
        feature_map=feature_map,
        normalizer=normalizer,
    )


@partial(jax.jit, static_argnames=("feature_map", "normalizer"))
def _global_linear_attention(
    q, k, v, kv_mask, feature_kwargs, eps, scale, *, feature_map, normalizer
):
    fq, fk = _features(q, k, feature_map, feature_kwargs, scale)
    if kv_mask is not None:
        fk = fk * jnp.asarray(kv_mask, jnp.float32)[:, None, None, :, None]
    s = _mm(_t(fk), _values(v))  # [B, K, 1, F, dv]
    num = _mm(fq, s)
    den = jnp.sum(fq * jnp.sum(fk, -2)[..., None, :], -1)
    return _finish(num, den, normalizer, eps, q.dtype)
