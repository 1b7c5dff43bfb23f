"""Chunked causal linear attention with per-token log-space decay, and its recurrent decode step.

Semantics shared by the kernels (``gpu.py``, ``tpu.py``) and the XLA reference
(``efficient_mllm.ops.linear_attention``, ``feature_map="identity"``, ``normalizer="none"``).
Inputs are already feature-mapped (``phi(q)``, ``phi(k)``); the divisive normaliser is a value
column of ones appended by the caller. Per batch row ``b`` and head ``h``::

    S_t = exp(g_t) S_{t-1} + k_t^T v_t          S float32 [F, dv], S_0 = initial_state (or 0)
    o_t = scale * q_t S_t

    q, k [B, T, H, F]; v [B, T, H, dv]; g float32 [B, T, H] (log-decay <= 0), [H] (constant per
    head) or None (no decay); initial_state float32 [B, H, F, dv] or None
    -> o [B, T, H, dv] in q.dtype, and the final state float32 [B, H, F, dv] when
       ``return_final_state``.

* Heads are equal for q, k, v and g (the caller expands GQA); any F and dv (kernels pad them to
  their tile multiples internally), any T (the last chunk is zero-padded: a padded key adds
  nothing, a padded step has no decay).
* States and accumulation are float32 whatever the input dtype. Decay enters only as ``exp`` of
  differences of in-chunk cumulative log-decays (each ``<= 0`` where it is used), so nothing
  underflows to 0/0 over long sequences.
* Differentiable (``jax.custom_vjp``) in q, k, v, g and initial_state.

Decode: :func:`check_step_args` covers ``q, k [B, H, F]``, ``v [B, H, dv]``, ``g [B, H] | [H] |
None``, ``state float32 [B, H, F, dv]`` -> ``(o [B, H, dv], new_state)``, the same recurrence
for one token (forward only).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["check_args", "check_float", "check_scale", "check_step_args", "decay_per_token"]


def _shape(x):
    return tuple(np.shape(x))


def check_args(q, k, v, g, initial_state, chunk_size):
    """Validates the chunked call; returns ``(B, T, H, F, dv)``."""
    if np.ndim(q) != 4 or _shape(k) != _shape(q):
        raise ValueError(
            f"q shape {_shape(q)}, k shape {_shape(k)}: expected equal [B, T, H, F] shapes"
        )
    b, t, h, f = q.shape
    if np.ndim(v) != 4 or _shape(v)[:3] != (b, t, h):
        raise ValueError(f"v shape {_shape(v)}: expected [B, T, H, dv] with [B, T, H] = {(b, t, h)}")
    dv = v.shape[3]
    if g is not None and _shape(g) not in ((b, t, h), (h,)):
        raise ValueError(f"g shape {_shape(g)}: expected None, [H]={(h,)} or [B, T, H]={(b, t, h)}")
    if initial_state is not None and _shape(initial_state) != (b, h, f, dv):
        raise ValueError(
            f"initial_state shape {_shape(initial_state)}: expected [B, H, F, dv] = {(b, h, f, dv)}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 16:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a static int >= 16")
    return b, t, h, f, dv


def check_step_args(q, k, v, g, state):
    """Validates one decode step; returns ``(B, H, F, dv)``."""
    if np.ndim(q) != 3 or _shape(k) != _shape(q):
        raise ValueError(f"q shape {_shape(q)}, k shape {_shape(k)}: expected equal [B, H, F]")
    b, h, f = q.shape
    if np.ndim(v) != 3 or _shape(v)[:2] != (b, h):
        raise ValueError(f"v shape {_shape(v)}: expected [B, H, dv] with [B, H] = {(b, h)}")
    dv = v.shape[2]
    if g is not None and _shape(g) not in ((b, h), (h,)):
        raise ValueError(f"g shape {_shape(g)}: expected None, [H]={(h,)} or [B, H]={(b, h)}")
    if _shape(state) != (b, h, f, dv):
        raise ValueError(f"state shape {_shape(state)}: expected [B, H, F, dv] = {(b, h, f, dv)}")
    return b, h, f, dv


def decay_per_token(g, shape):
    """``g`` (None, [H] or the full shape) -> float32 log-decay broadcast to ``shape``."""
    if g is None:
        return jnp.zeros(shape, jnp.float32)
    return jnp.broadcast_to(jnp.asarray(g, jnp.float32), shape)


def check_float(**arrays):
    """Every given (non-None) array has a floating dtype."""
    for name, x in arrays.items():
        if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{name} dtype {jnp.result_type(x)}: expected a floating dtype")


def check_scale(scale) -> float:
    """A static finite Python number."""
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float, np.integer, np.floating))
        or not np.isfinite(scale)
    ):
        raise ValueError(f"scale={scale!r}: expected a static finite number")
    return float(scale)
