"""Basic Flax NNX layers whose parameters carry logical axis names.

Every parameter is an ``nnx.Param`` annotated with logical axis names (``"embed"``, ``"mlp"``,
``"heads"``, ``"kv_heads"``, ``"head_dim"``, ``"vocab"``, ``"patch"``, ``"vision_embed"`` or
``None``) that ``train/sharding.py`` maps to mesh axes; ``nnx.get_partition_spec`` reads them.
Parameters are stored in ``param_dtype`` (float32 by default) and cast to the compute ``dtype``
(e.g. bfloat16) at use; norms compute their statistics in float32 whatever the dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_mllm import compat

__all__ = [
    "AXIS_NAMES",
    "Embed",
    "GeluMLP",
    "LayerNorm",
    "Linear",
    "RMSNorm",
    "SwiGLUMLP",
    "activation",
    "lecun_truncated_normal",
    "make_norm",
    "normal_init",
]

AXIS_NAMES = (
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "vocab",
    "patch",
    "vision_embed",
    None,
)


def _dims(name: str, value: Any) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, (int,)) and not isinstance(value, bool) else tuple(value)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"{name}={value!r}: expected a positive int or a tuple of positive ints")
    return dims


def _check_axes(axes: Sequence[Any], ndim: int, what: str) -> tuple:
    axes = tuple(axes)
    if len(axes) != ndim:
        raise ValueError(f"axes={axes!r}: expected {ndim} logical names for {what}")
    bad = [a for a in axes if a not in AXIS_NAMES]
    if bad:
        raise ValueError(
            f"axes={axes!r}: unknown logical name(s) {bad}; expected names in {AXIS_NAMES}"
        )
    return axes


def _rng_key(rngs: nnx.Rngs):
    return rngs.params()


@functools.partial(jax.jit, static_argnames=("shape", "n_in", "dtype"))
def lecun_truncated_normal(key, *, shape: tuple[int, ...], n_in: int, dtype: Any):
    """Truncated normal (at 2 sigma) with variance ``1 / fan_in``, ``fan_in`` = product of the
    first ``n_in`` dims (LeCun et al., 1998). Jitted as one program per shape, so eager model
    construction compiles one kernel per parameter shape instead of one per primitive."""
    fan_in = math.prod(shape[:n_in])
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at +-2
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)


@functools.partial(jax.jit, static_argnames=("shape", "std", "dtype"))
def normal_init(key, *, shape: tuple[int, ...], std: float, dtype: Any):
    """``normal(0, std)`` of a static shape, jitted as one program per shape."""
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    """``y = x . kernel + bias`` contracting the last ``len(in_features)`` axes of ``x``.

    ``in_features`` / ``out_features`` are ints or tuples (e.g. ``out_features=(heads, head_dim)``
    for a q projection, so heads can be sharded); ``axes`` names every kernel dimension, inputs
    first. Kernel ``[*in, *out]`` (param ``kernel``), bias ``[*out]`` (param ``bias``). Default
    init: truncated normal with variance ``1 / fan_in`` (LeCun).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axes: Sequence[Any],
        use_bias: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        kernel_init: Callable | None = None,
        bias_init: Callable | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = _dims("in_features", in_features)
        self.out_features = _dims("out_features", out_features)
        n_in, n_out = len(self.in_features), len(self.out_features)
        axes = _check_axes(
            axes, n_in + n_out, f"a kernel of shape {self.in_features + self.out_features}"
        )
        shape = self.in_features + self.out_features
        if kernel_init is None:
            kernel = lecun_truncated_normal(
                _rng_key(rngs), shape=shape, n_in=n_in, dtype=jnp.dtype(param_dtype)
            )
        else:
            kernel = kernel_init(_rng_key(rngs), shape, param_dtype)
        self.kernel = compat.logical_param(kernel, axes)
        self.bias = (
            compat.logical_param(
                jnp.zeros(self.out_features, param_dtype)
                if bias_init is None
                else bias_init(_rng_key(rngs), self.out_features, param_dtype),
                axes[n_in:],
            )
            if use_bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_features)
        if tuple(x.shape[x.ndim - n_in :]) != self.in_features:
            raise ValueError(
                f"x shape={tuple(x.shape)}: expected trailing dims {self.in_features} for this "
                "Linear"
            )
        kernel = self.kernel[...].astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich, 2019, arXiv:1910.07467): ``x / rms(x) * scale``, statistics in
    float32; param ``scale [dim]`` initialised to ones."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        axis: Any = "embed",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        (self.dim,) = _dims("dim", dim)
        if not eps > 0:
            raise ValueError(f"eps={eps!r}: expected a positive number")
        self.eps = float(eps)
        self.scale = compat.logical_param(
            jnp.ones((self.dim,), param_dtype), _check_axes((axis,), 1, "scale")
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x shape={tuple(x.shape)}: expected last dim {self.dim}")
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm (Ba et al., 2016, arXiv:1607.06450), statistics in float32; params ``scale``
    (ones) and ``bias`` (zeros, when ``use_bias``)."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        use_bias: bool = True,
        axis: Any = "embed",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        (self.dim,) = _dims("dim", dim)
        if not eps > 0:
            raise ValueError(f"eps={eps!r}: expected a positive number")
        self.eps = float(eps)
        axes = _check_axes((axis,), 1, "scale")
        self.scale = compat.logical_param(jnp.ones((self.dim,), param_dtype), axes)
        self.bias = (
            compat.logical_param(jnp.zeros((self.dim,), param_dtype), axes) if use_bias else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x shape={tuple(x.shape)}: expected last dim {self.dim}")
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(kind: str, dim: int, *, eps: float, axis: Any, dtype: Any, param_dtype: Any):
    """``"rmsnorm"`` -> :class:`RMSNorm`, ``"layernorm"`` -> :class:`LayerNorm`."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, axis=axis, dtype=dtype, param_dtype=param_dtype)
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, axis=axis, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"norm={kind!r}: expected 'rmsnorm' or 'layernorm'")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """``"gelu"`` (exact erf), ``"gelu_tanh"``, ``"quick_gelu"`` (``x * sigmoid(1.702 x)``,
    CLIP), ``"silu"`` or ``"relu"``."""
    table = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }
    if name not in table:
        raise ValueError(f"activation={name!r}: expected one of {sorted(table)}")
    return table[name]


class SwiGLUMLP(nnx.Module):
    """SwiGLU MLP (Shazeer, 2020, "GLU Variants Improve Transformer", arXiv:2002.05202):
    ``down(silu(gate(x)) * up(x))``; params ``gate``/``up`` ``[embed, mlp]``,
    ``down [mlp, embed]``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        use_bias: bool = False,
        embed_axis: Any = "embed",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"use_bias": use_bias, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.gate = Linear(dim, hidden, axes=(embed_axis, "mlp"), **kw)
        self.up = Linear(dim, hidden, axes=(embed_axis, "mlp"), **kw)
        self.down = Linear(hidden, dim, axes=("mlp", embed_axis), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class GeluMLP(nnx.Module):
    """Two-layer MLP of the ViT / BERT family: ``fc2(act(fc1(x)))`` (Hendrycks & Gimpel, 2016,
    "GELUs", arXiv:1606.08415); params ``fc1 [embed, mlp]``, ``fc2 [mlp, embed]``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        activation_name: str = "gelu",
        use_bias: bool = True,
        embed_axis: Any = "embed",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        activation(activation_name)  # validates
        self.activation_name = activation_name
        kw = {"use_bias": use_bias, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.fc1 = Linear(dim, hidden, axes=(embed_axis, "mlp"), **kw)
        self.fc2 = Linear(hidden, dim, axes=("mlp", embed_axis), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.activation_name)(self.fc1(x)))


class Embed(nnx.Module):
    """Token embedding ``[vocab, embed]`` (param ``embedding``, normal(0.02) init); ``attend``
    gives tied output logits ``x . embedding^T``."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        *,
        embed_axis: Any = "embed",
        init_std: float = 0.02,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        (self.vocab,) = _dims("vocab", vocab)
        (self.dim,) = _dims("dim", dim)
        value = normal_init(
            _rng_key(rngs),
            shape=(self.vocab, self.dim),
            std=float(init_std),
            dtype=jnp.dtype(param_dtype),
        )
        self.embedding = compat.logical_param(
            value, _check_axes(("vocab", embed_axis), 2, "embedding")
        )
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
            raise ValueError(f"tokens dtype={jnp.asarray(tokens).dtype}: expected an integer array")
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits ``[..., vocab]`` of ``x [..., embed]`` against the embedding table."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x shape={tuple(x.shape)}: expected last dim {self.dim}")
        return jnp.einsum(
            "...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype)
        )
