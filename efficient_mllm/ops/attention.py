"""Softmax dot-product attention: the reference semantics and the implementation dispatch.

``dot_product_attention`` computes, per query head ``n`` (kv head ``n // (Nq // Nkv)``)::

    logits = scale * q . k                      # float32, whatever the input dtype
    logits = logits + bias                      # if bias
    logits = softcap * tanh(logits / softcap)   # if softcap
    logits = where(mask, logits, -inf)          # mask applied last
    out    = softmax(logits) @ v                # rows with no allowed key: out = 0, lse = -inf

Grouped-query attention never repeats K/V: q is viewed as ``[B, T, Nkv, G, H]``.

``impl`` selects an implementation: ``"xla"`` (this reference), ``"cudnn"`` (cuDNN flash
attention through :func:`jax.nn.dot_product_attention`), ``"pallas"`` / ``"interpret"`` (kernels
registered with :func:`register_impl`), or ``"auto"`` (the first supported candidate for the
backend, else ``"xla"``; the reason for a fallback is logged once on logger
``"efficient_mllm.attention"``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from efficient_mllm import registry
from efficient_mllm.ops import masks as masks_lib

__all__ = ["IMPLS", "cudnn_unsupported_reason", "dot_product_attention", "register_impl", "softmax"]

logger = logging.getLogger("efficient_mllm.attention")

IMPLS = ("auto", "xla", "cudnn", "pallas", "interpret")


@dataclasses.dataclass(frozen=True)
class _Request:
    """Validated arguments handed to an implementation."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    mask: masks_lib.MaskSpec | None
    bias: jax.Array | None  # rank 4
    scale: Any
    softcap: Any
    q_offset: Any  # as given by the caller (None, int or array)
    offsets: jax.Array  # int32 [1] or [B]
    return_lse: bool


@dataclasses.dataclass(frozen=True)
class _Impl:
    fn: Callable[[_Request], tuple[jax.Array, jax.Array | None]]
    supports: Callable[[_Request], str | None]  # None when supported, else the reason


_IMPL_TABLE: dict[str, _Impl] = {}
_AUTO_ORDER: list[str] = []  # candidates tried by impl="auto" before falling back to "xla"
_LOGGED: set[str] = set()


def register_impl(
    name: str,
    fn: Callable[[_Request], tuple[jax.Array, jax.Array | None]],
    supports: Callable[[_Request], str | None],
    *,
    auto: bool = True,
    first: bool = False,
) -> None:
    """Plugs an implementation into the dispatch table.

    ``fn(request) -> (out [B, Tq, Nq, Hv], lse [B, Nq, Tq] or None)``; ``supports(request)``
    returns None when ``fn`` handles the request, else a reason string. With ``auto`` the
    implementation becomes a candidate for ``impl="auto"`` (tried first with ``first=True``).
    """
    if name not in IMPLS or name in ("auto", "xla"):
        raise ValueError(f"impl name must be one of 'cudnn', 'pallas', 'interpret', got {name!r}")
    _IMPL_TABLE[name] = _Impl(fn, supports)
    if name in _AUTO_ORDER:
        _AUTO_ORDER.remove(name)
    if auto:
        _AUTO_ORDER.insert(0 if first else len(_AUTO_ORDER), name)


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logger.info(msg)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape)


def _is_scalar(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    return hasattr(x, "dtype") and jnp.ndim(x) == 0 and jnp.issubdtype(x.dtype, jnp.number)


def _validate(q, k, v, mask, bias, scale, softcap, q_offset, impl, return_lse) -> _Request:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(
                f"{name} must be an array [batch, seq, heads, head_dim], got {type(x).__name__}"
            )
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {_shape(x)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    b, tq, nq, h = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {_shape(k)} and v {_shape(v)} must agree in batch, seq and heads")
    if k.shape[3] != h:
        raise ValueError(
            f"head dim of q ({h}) and k ({k.shape[3]}) must be equal: q {_shape(q)}, k {_shape(k)}"
        )
    tk, nkv = k.shape[1], k.shape[2]
    if min(tq, tk, nq, nkv, h, v.shape[3]) == 0:
        raise ValueError(f"empty dimension in q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if nq % nkv:
        raise ValueError(
            f"q heads ({nq}) must be a multiple of kv heads ({nkv}) for grouped-query attention"
        )
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")  # noqa: TRY004
    if scale is not None and not _is_scalar(scale):
        raise ValueError(f"scale must be None or a real scalar, got {scale!r}")
    if softcap is not None:
        if not _is_scalar(softcap):
            raise ValueError(f"softcap must be None or a positive scalar, got {softcap!r}")
        if isinstance(softcap, (int, float)) and not softcap > 0:
            raise ValueError(f"softcap must be positive, got {softcap!r}")

    spec = masks_lib.as_mask(mask)
    offsets, _ = masks_lib.normalize_q_offset(q_offset, b)
    if spec is not None:
        spec.validate(b, tq, tk, q_offset)
        if spec.num_heads not in (None, nq):
            raise ValueError(f"mask has {spec.num_heads} heads, expected 1 or q heads={nq}")

    if bias is not None:
        if not hasattr(bias, "shape") or not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(
                f"bias must be a floating array broadcastable to [B, N, Tq, Tk], got {bias!r:.80}"
            )
        full = (b, nq, tq, tk)
        if not 2 <= bias.ndim <= 4 or any(
            d not in (1, f) for d, f in zip(bias.shape[::-1], full[::-1])
        ):
            raise ValueError(
                f"bias of shape {_shape(bias)} does not broadcast to [B, N, Tq, Tk] = {list(full)}"
            )
        bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + tuple(bias.shape))
    return _Request(q, k, v, spec, bias, scale, softcap, q_offset, offsets, return_lse)


# ------------------------------------------------------------------------------------------------
# Reference implementation
# ------------------------------------------------------------------------------------------------


def _group(x: jax.Array, nkv: int, g: int) -> jax.Array:
    """[B, N|1, Tq, Tk] -> [B, Nkv|1, G|1, Tq, Tk] matching the grouped query layout."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], nkv, g, x.shape[2], x.shape[3])


def _xla(r: _Request) -> tuple[jax.Array, jax.Array | None]:
    m = None
    if r.mask is not None:
        if isinstance(r.mask, masks_lib.ArrayMask):
            m = r.mask.mask
        else:
            b, tq = r.q.shape[:2]
            m = r.mask.dense(b, tq, r.k.shape[1], r.q_offset)
    return _xla_core(r.q, r.k, r.v, m, r.bias, r.scale, r.softcap, r.return_lse)


@partial(jax.jit, static_argnums=(7,))
def _xla_core(q, k, v, mask, bias, scale, softcap, return_lse):
    b, tq, nq, h = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    exact = any(x.dtype in (jnp.float32, jnp.float64) for x in (q, k, v))
    prec = jax.lax.Precision.HIGHEST if exact else None
    acc = jnp.promote_types(jnp.float32, jnp.result_type(q, k, v))  # float32, or float64 under x64
    scale = 1.0 / math.sqrt(h) if scale is None else scale

    qg = q.reshape(b, tq, nkv, g, h)
    s = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=acc, precision=prec)
    s = s * jnp.asarray(scale, acc)
    if bias is not None:
        s = s + _group(bias.astype(acc), nkv, g)
    if softcap is not None:
        cap = jnp.asarray(softcap, acc)
        s = cap * jnp.tanh(s / cap)
    if mask is not None:
        s = jnp.where(_group(mask, nkv, g), s, -jnp.inf)

    mx = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(s - mx)  # masked entries: exp(-inf) = 0, with zero gradient
    l = jnp.sum(p, axis=-1, keepdims=True)
    has = l > 0
    l_safe = jnp.where(has, l, 1.0)
    p = p / l_safe
    out = jnp.einsum("bkgqs,bskh->bqkgh", p, v, preferred_element_type=acc, precision=prec)
    out = out.reshape(b, tq, nq, v.shape[3]).astype(q.dtype)
    lse = None
    if return_lse:
        lse = jnp.where(has, mx + jnp.log(l_safe), -jnp.inf)[..., 0].reshape(b, nq, tq)
    return out, lse


# ------------------------------------------------------------------------------------------------
# cuDNN through jax.nn.dot_product_attention
# ------------------------------------------------------------------------------------------------


def _gpu_info() -> tuple[bool, float]:
    """(is an NVIDIA GPU backend, compute capability)."""
    if jax.default_backend() != "gpu":
        return False, 0.0
    dev = jax.devices()[0]
    if "nvidia" not in str(getattr(dev, "device_kind", "")).lower():
        return False, 0.0
    try:
        cc = float(getattr(dev, "compute_capability", "0") or 0)
    except (TypeError, ValueError):
        cc = 0.0
    return True, cc


def _cudnn_plan(r: _Request) -> tuple[dict | None, str | None]:
    """Keyword arguments for jax.nn.dot_product_attention, or (None, reason)."""
    is_gpu, cc = _gpu_info()
    if not is_gpu:
        return (
            None,
            f"cuDNN attention needs an NVIDIA GPU backend, this is {jax.default_backend()!r}",
        )
    q, k, v = r.q, r.k, r.v
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)):
        return (
            None,
            f"cuDNN attention needs q/k/v all float16 or bfloat16, got {q.dtype}/{k.dtype}/{v.dtype}",
        )
    h = q.shape[3]
    h_max = 256 if cc >= 9.0 else 128
    if h % 8 or h > h_max or v.shape[3] != h:
        return (
            None,
            f"cuDNN attention needs equal q/k/v head dims, a multiple of 8 and <= {h_max}, got {h}/{v.shape[3]}",
        )
    if r.softcap is not None:
        return None, "cuDNN attention does not support softcap"
    if r.return_lse:
        return None, "cuDNN attention does not return lse here (return_lse=True)"
    tq, tk = q.shape[1], k.shape[1]
    if r.bias is not None and (tq % 2 or tk % 2):
        return None, f"cuDNN attention with bias needs even sequence lengths, got Tq={tq}, Tk={tk}"
    kw: dict[str, Any] = {"bias": r.bias, "scale": r.scale}
    causal, left, q_len, kv_len = False, None, None, None
    if r.mask is not None:
        for leaf in r.mask.leaves():
            if isinstance(leaf, masks_lib.Causal):
                causal = True
            elif isinstance(leaf, masks_lib.SlidingWindow) and leaf.right == 0:
                causal, left = True, leaf.left if left is None else min(left, leaf.left)
            elif isinstance(leaf, masks_lib.Padding):
                kvl = leaf.kv_lengths
                kv_len = kvl if kv_len is None else jnp.minimum(kv_len, kvl)
                if leaf.q_lengths is not None:
                    q_len = leaf.q_lengths if q_len is None else jnp.minimum(q_len, leaf.q_lengths)
            elif isinstance(leaf, masks_lib.ArrayMask):
                return None, "cuDNN attention does not take an explicit boolean mask array"
            else:
                return None, f"cuDNN attention cannot express the mask {leaf!r}"
    if causal:
        if not (r.q_offset is None or (masks_lib._is_int(r.q_offset) and r.q_offset == 0)):
            return None, "cuDNN attention does not support q_offset with a causal/window mask"
        if tq != tk:
            return None, f"cuDNN causal attention here needs Tq == Tk, got Tq={tq}, Tk={tk}"
    b = q.shape[0]
    if kv_len is not None or q_len is not None:
        kw["key_value_seq_lengths"] = jnp.broadcast_to(
            jnp.full((1,), tk, jnp.int32) if kv_len is None else jnp.minimum(kv_len, tk), (b,)
        ).astype(jnp.int32)
        kw["query_seq_lengths"] = jnp.broadcast_to(
            jnp.full((1,), tq, jnp.int32) if q_len is None else jnp.minimum(q_len, tq), (b,)
        ).astype(jnp.int32)
    kw["is_causal"] = causal
    if left is not None:
        kw["local_window_size"] = (left, 0)
    return kw, None


def cudnn_unsupported_reason(
    q, k, v, *, mask=None, bias=None, scale=None, softcap=None, q_offset=None, return_lse=False
) -> str | None:
    """None if ``impl="cudnn"`` handles this call on the current backend, else the reason."""
    r = _validate(q, k, v, mask, bias, scale, softcap, q_offset, "cudnn", return_lse)
    return _cudnn_plan(r)[1]


def _cudnn(r: _Request) -> tuple[jax.Array, None]:
    kw, reason = _cudnn_plan(r)
    if reason is not None:
        raise ValueError(f"impl='cudnn' cannot run this call: {reason}")
    out = jax.nn.dot_product_attention(r.q, r.k, r.v, implementation="cudnn", **kw)
    return out, None


register_impl("cudnn", _cudnn, lambda r: _cudnn_plan(r)[1])


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: masks_lib.MaskSpec | jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    q_offset: int | jax.Array | None = None,
    impl: str = "auto",
    return_lse: bool = False,
):
    """Softmax attention on ``[B, T, N, H]`` inputs (GQA/MQA, cross-attention, decode offsets).

    Args:
      q: ``[B, Tq, Nq, H]``; k: ``[B, Tk, Nkv, H]``; v: ``[B, Tk, Nkv, Hv]`` with ``Nq % Nkv == 0``.
      mask: a :class:`~efficient_mllm.ops.masks.MaskSpec` (predicate on absolute indices) or a
        boolean array broadcastable to ``[B, Nq, Tq, Tk]`` (True = attend; local query rows).
      bias: additive float array broadcastable to ``[B, Nq, Tq, Tk]``.
      scale: logit scale, default ``1/sqrt(H)``.
      softcap: if set, ``logits = softcap * tanh(logits / softcap)`` after scale and bias.
      q_offset: absolute key index of query row 0 (int or int32 ``[B]``); mask specs see
        absolute query positions ``q_offset + row``.
      impl: ``"auto" | "xla" | "cudnn" | "pallas" | "interpret"``.
      return_lse: also return the log-sum-exp of the masked logits, ``[B, Nq, Tq]`` float32
        (float64 when the inputs are float64).

    Returns:
      ``out [B, Tq, Nq, Hv]`` in q's dtype (and ``lse`` when ``return_lse``). Rows with no
      allowed key give zeros and ``lse = -inf``; their gradients are zero, not NaN.
    """
    r = _validate(q, k, v, mask, bias, scale, softcap, q_offset, impl, return_lse)
    if impl == "auto":
        impl = "xla"
        for name in _AUTO_ORDER:
            reason = _IMPL_TABLE[name].supports(r)
            if reason is None:
                impl = name
                break
            _log_once(f"impl='auto' skips {name!r}: {reason}")
    if impl == "xla":
        out, lse = _xla(r)
    elif impl in _IMPL_TABLE:
        entry = _IMPL_TABLE[impl]
        reason = entry.supports(r)
        if reason is not None:
            raise ValueError(f"impl={impl!r} cannot run this call: {reason}")
        out, lse = entry.fn(r)
    else:  # pragma: no cover - every name in IMPLS is registered at import time
        raise ValueError(f"impl={impl!r} is not registered")
    return (out, lse) if return_lse else out


@registry.ATTENTION.register("softmax", paper="Vaswani et al. 2017, Attention Is All You Need")
def softmax(impl: str = "auto", softcap: float | None = None, scale: float | None = None):
    """Scaled dot-product softmax attention (GQA, masks, softcap)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def attend(q, k, v, *, mask=None, q_offset=None):
        return dot_product_attention(
            q, k, v, mask=mask, scale=scale, softcap=softcap, q_offset=q_offset, impl=impl
        )

    attend.__name__ = f"softmax_attention_{impl}"
    return attend


@registry.ATTENTION.register(
    "sliding_window", paper="Beltagy et al. 2020, Longformer; BASED / Mistral sliding windows"
)
def sliding_window_attention(
    window: int = 64, impl: str = "auto", softcap: float | None = None, scale: float | None = None
):
    """Softmax attention over the last ``window`` keys (the query's own included)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window: window={window!r}: expected an int >= 1")
    base = softmax(impl=impl, softcap=softcap, scale=scale)
    window_mask = masks_lib.sliding_window(window - 1, 0)

    def attend(q, k, v, *, mask=None, q_offset=None):
        return base(q, k, v, mask=window_mask & mask, q_offset=q_offset)

    attend.__name__ = f"sliding_window_{window}_{impl}"
    attend.window = window
    return attend


# The Pallas kernels register "pallas" and "interpret" (after cuDNN in the "auto" order).
from efficient_mllm.ops import pallas_attention as _pallas_attention  # noqa: E402,F401
