"""LoRA adapters for the repo's :class:`~efficient_mllm.nn.layers.Linear` (Hu et al. 2021, "LoRA:
Low-Rank Adaptation of Large Language Models", arXiv:2106.09685).

``y = x W + b + (alpha / r) (x A) B`` with the base kernel ``W [*in, *out]`` kept (and left out of
training by selecting :class:`LoRAParam` only), ``A [*in, r]`` random (LeCun normal, variance
``1 / fan_in``) and ``B [r, *out]`` zero, so an adapted model starts exactly at the base model.
Multi-dimensional ``in``/``out`` (``embed -> (heads, head_dim)`` for q/k/v, ``(heads, head_dim)
-> embed`` for o) contract the same axes as the base ``Linear``.

    >>> apply_lora(model, targets=("q", "k", "v", "o"), rank=8, alpha=16, rngs=nnx.Rngs(0))
    >>> graphdef, lora, rest = nnx.split(model, LoRAParam, ...)    # train only the adapters
    >>> merge_lora(model)                                            # W += (alpha/r) A B; plain Linear again

:class:`LoRALinear` subclasses ``Linear`` and keeps its ``kernel``/``bias`` variables (same paths),
adding ``lora_a``/``lora_b``; the adapters carry the base kernel's logical axis names (the rank
axis replicated). Not implemented: LoRA dropout and rsLoRA scaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_mllm.nn.layers import Linear, lecun_truncated_normal

__all__ = ["ATTENTION_TARGETS", "MLP_TARGETS", "LoRAParam", "LoRALinear", "apply_lora", "merge_lora"]

#: Linear submodules of a decoder block that ``apply_lora`` can adapt.
ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: an ``nnx.Param`` subclass, so ``nnx.split(model, LoRAParam, ...)``
    selects the adapters alone (``nnx.Param`` filters still include them)."""


def _axes(var: nnx.Variable, ndim: int) -> tuple:
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names is not None and len(names) == ndim else (None,) * ndim


class LoRALinear(Linear):
    """A ``Linear`` plus a low-rank update; built from an existing ``Linear`` (its variables are
    reused, not copied). Params: ``kernel``, ``bias`` (base), ``lora_a [*in, r]``,
    ``lora_b [r, *out]`` (:class:`LoRAParam`); ``scale = alpha / rank``."""

    def __init__(self, base: Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        # Linear.__init__ would draw a fresh kernel: the base's variables are adopted instead.
        if not isinstance(base, Linear) or isinstance(base, LoRALinear):
            raise ValueError(f"base={type(base).__name__}: expected a plain Linear")
        _check_rank_alpha(rank, alpha, base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        n_in = len(self.in_features)
        axes = _axes(base.kernel, n_in + len(self.out_features))
        pdt = base.kernel[...].dtype
        a = lecun_truncated_normal(
            rngs.params(), shape=self.in_features + (self.rank,), n_in=n_in, dtype=jnp.dtype(pdt)
        )
        self.lora_a = LoRAParam(a, out_sharding=axes[:n_in] + (None,), eager_sharding=False)
        self.lora_b = LoRAParam(
            jnp.zeros((self.rank,) + self.out_features, pdt),
            out_sharding=(None,) + axes[n_in:],
            eager_sharding=False,
        )

    def delta(self) -> jax.Array:
        """float32 ``scale * A B`` with the kernel's shape ``[*in, *out]``."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return self.scale * jnp.tensordot(a, b, axes=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        n_in = len(self.in_features)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        h = jax.lax.dot_general(x.astype(self.dtype), a, (contract, ((), ())))  # [..., r]
        u = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))  # [..., *out]
        return y + (self.scale * u).astype(y.dtype)

    def merged(self) -> Linear:
        """A plain ``Linear`` with kernel ``W + scale A B`` (computed in float32, stored in the
        kernel's dtype) and the same bias variable."""
        w = self.kernel[...]
        new = (w.astype(jnp.float32) + self.delta()).astype(w.dtype)
        axes = _axes(self.kernel, w.ndim)
        lin = nnx.eval_shape(
            lambda: Linear(
                self.in_features, self.out_features, axes=axes, use_bias=self.bias is not None,
                dtype=self.dtype, param_dtype=w.dtype, rngs=nnx.Rngs(0),
            )
        )
        kernel = self.kernel
        kernel[...] = new
        lin.kernel = kernel
        lin.bias = self.bias
        return lin


def _check_rank_alpha(rank: Any, alpha: Any, base: Linear | None = None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: expected an int >= 1")
    if base is not None:
        fan_in, fan_out = math.prod(base.in_features), math.prod(base.out_features)
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"rank={rank}: expected <= min(fan_in, fan_out) = {min(fan_in, fan_out)} for a "
                f"Linear {base.in_features} -> {base.out_features} (a larger rank adds nothing)"
            )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r}: expected a number > 0")


def _language(model: nnx.Module) -> nnx.Module:
    lm = getattr(model, "language", model)
    if not hasattr(lm, "blocks"):
        raise ValueError(
            f"model={type(model).__name__}: expected a LanguageModel or a model with a "
            "`language` LanguageModel (decoder blocks under `blocks`)"
        )
    return lm


def apply_lora(
    model: nnx.Module,
    targets: Sequence[str] = ATTENTION_TARGETS,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    layers: Sequence[int] | None = None,
    rngs: nnx.Rngs,
) -> list[str]:
    """Replaces, in place, the ``targets`` Linear layers of the decoder blocks of ``model`` (a
    ``LanguageModel`` or an ``MLLM``; ``layers`` = block indices, default all) by
    :class:`LoRALinear`. Targets: ``q k v o`` (attention), ``gate up down`` (SwiGLU MLP).
    Returns the adapted module paths (``"blocks.0.attn.q"``...)."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    targets = tuple(targets)
    allowed = ATTENTION_TARGETS + MLP_TARGETS
    bad = [t for t in targets if t not in allowed]
    if not targets or bad or len(set(targets)) != len(targets):
        raise ValueError(
            f"targets={targets!r}: expected distinct names among {allowed}"
            + (f"; unknown {bad}" if bad else "")
        )
    _check_rank_alpha(rank, alpha)
    lm = _language(model)
    depth = len(lm.blocks)
    idx = tuple(range(depth)) if layers is None else tuple(layers)
    bad_layers = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad_layers or not idx:
        raise ValueError(f"layers={layers!r}: expected block indices in [0, {depth})")
    done = []
    for i in idx:
        block = lm.blocks[i]
        for t in targets:
            parent_name = "attn" if t in ATTENTION_TARGETS else "mlp"
            parent = getattr(block, parent_name)
            lin = getattr(parent, t, None)
            if isinstance(lin, LoRALinear):
                raise ValueError(f"blocks.{i}.{parent_name}.{t} already has LoRA adapters")
            if not isinstance(lin, Linear):
                raise ValueError(
                    f"targets: blocks.{i}.{parent_name}.{t} is {type(lin).__name__}, not a Linear "
                    "(e.g. 'gate'/'up'/'down' need a SwiGLU MLP)"
                )
            setattr(parent, t, LoRALinear(lin, rank=rank, alpha=alpha, rngs=rngs))
            done.append(f"blocks.{i}.{parent_name}.{t}")
    return done


def merge_lora(model: nnx.Module) -> int:
    """Folds every :class:`LoRALinear` of ``model`` into a plain ``Linear`` (kernel
    ``W + (alpha/r) A B``), removing the adapters, in place; returns how many were merged."""
    found = [
        (path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)
    ]
    for path, m in found:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        key = path[-1]
        if isinstance(key, int):
            parent[key] = m.merged()
        else:
            setattr(parent, key, m.merged())
    return len(found)
