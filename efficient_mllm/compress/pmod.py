"""p-MoD: mixture-of-depths over vision tokens with progressive ratio decay.

Zhang et al., "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay",
arXiv:2412.04449, 2024 (ICCV 2025).

Implemented (a learned, trained-with-the-model in-LLM stage):

* **Routers.** Each MoD layer ``l`` has a linear router ``r = w_l . x + b_l`` over the tokens
  entering it (a submodule of the model; zero-initialised by default, as the released code's
  ``mod_special_init``). Only vision tokens compete; text tokens always go through the block.
* **TanhNorm.** Router weights ``g = scale * tanh(r) + bias`` (default ``tanh_0.2_1``: 0.2, 1).
* **Selection.** The top ``k = trunc(n_v * ratio_l)`` vision tokens of each row (``n_v`` its
  vision tokens) by ``r`` go through the block with the text tokens, as a shorter sequence with
  their original position ids; the rest skip it and **get no KV entry in that layer** (with a
  cache, layer ``l`` stores text + routed vision tokens only). Static capacity
  ``trunc(N * ratio_l)`` (``N`` image tokens per image) with a validity mask per row.
* **STRing** (symmetric token reweighting): a routed vision token outputs
  ``(x + attn) + g * mlp(norm(x + attn))``, a skipped one ``g * x``, so the router receives a
  gradient from both; text tokens are a standard block.
* **Progressive ratio decay.** ``schedule="shiftedcos"``: ``rho_l = ratio + cos(pi l /
  (depth - 1)) / 2``; ``"shiftedlinear"``: ``rho_l = ratio + 1/2 - l / (depth - 1)``;
  ``"constant"``: ``rho_l = ratio``. Layers with ``rho_l <= max_ratio`` are MoD layers (or
  exactly ``layers`` when given) with ``ratio_l = max(rho_l, min_ratio)``; the others stay
  dense. Defaults follow the released LLaVA-NeXT recipe (``shiftedcos_decay_0.85_0.15``,
  ``ratio = 0.5``).

Stats: ``state.extra["visual_tokens"] [B, depth]`` (vision tokens each block processed) and
``["mod_weights/<l>"]`` (router weights ``g`` of the vision tokens, 0 elsewhere).

Not implemented: p-MoD's training recipe (data, schedules); any auxiliary router loss (the
paper uses none); routing of text tokens (``mod_target_token_type`` other than vision).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.compress import core
from efficient_mllm.compress.in_llm import (
    InLLMContext,
    current_types,
    record_visual_tokens,
    row_valid,
)
from efficient_mllm.nn.layers import Linear
from efficient_mllm.ops import masks as masks_lib

__all__ = ["PMoD", "pmod", "prd_schedule"]

SCHEDULES = ("shiftedcos", "shiftedlinear", "constant")
NORMS = ("tanh", "sigmoid", "none")


def prd_schedule(
    depth: int,
    *,
    ratio: float = 0.5,
    max_ratio: float = 0.85,
    min_ratio: float = 0.15,
    schedule: str = "shiftedcos",
    layers: tuple[int, ...] | None = None,
) -> tuple[float | None, ...]:
    """Per-layer retention ratio (None for a dense layer) of progressive ratio decay."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
    denom = max(depth - 1, 1)
    out: list[float | None] = []
    for i in range(depth):
        if schedule == "shiftedcos":
            rho = ratio + math.cos(math.pi * i / denom) / 2
        elif schedule == "shiftedlinear":
            rho = ratio + 0.5 - i / denom
        else:
            rho = ratio
        mod = (rho <= max_ratio) if layers is None else (i in layers)
        out.append(min(max(rho, min_ratio), 1.0) if mod else None)
    return tuple(out)


def _zeros_init(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


class PMoD(nnx.Module):
    """p-MoD routers (one ``Linear(dim -> 1)`` per MoD layer in ``routers``) and the
    ``block_fn`` that routes vision tokens (see the module docstring)."""

    stage = "in_llm"

    def __init__(
        self,
        *,
        dim: int,
        num_layers: int,
        ratios: tuple[float | None, ...],
        norm: str = "tanh",
        norm_scale: float = 0.2,
        norm_bias: float = 1.0,
        use_bias: bool = True,
        zero_init: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(ratios) != num_layers:
            raise ValueError(f"ratios has {len(ratios)} entries: expected num_layers={num_layers}")
        self.ratios = tuple(ratios)
        self.mod_layers = tuple(i for i, r in enumerate(ratios) if r is not None)
        self.norm = norm
        self.norm_scale = float(norm_scale)
        self.norm_bias = float(norm_bias)
        init = {"kernel_init": _zeros_init} if zero_init else {}
        self.routers = nnx.List(
            [
                Linear(
                    dim,
                    1,
                    axes=("embed", None),
                    use_bias=use_bias,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                    **init,
                )
                for _ in self.mod_layers
            ]
        )

    def router_logits(self, layer: int, x: jax.Array) -> jax.Array:
        """float32 ``[B, T]`` router logits of MoD layer ``layer`` (a decoder layer index)."""
        j = self.mod_layers.index(layer)
        return self.routers[j](x)[..., 0].astype(jnp.float32)

    def weights(self, logits: jax.Array) -> jax.Array:
        """TanhNorm (or sigmoid / identity) of the router logits: ``scale * f(r) + bias``."""
        if self.norm == "tanh":
            f = jnp.tanh(logits)
        elif self.norm == "sigmoid":
            f = jax.nn.sigmoid(logits)
        else:
            f = logits
        return self.norm_scale * f + self.norm_bias

    def make_hooks(self, language, *, token_types, query_end, num_image_tokens):
        """``(None, block_fn)`` for ``LanguageModel``: vision tokens are routed at MoD layers."""
        ctx = InLLMContext(
            language=language,
            token_types=jnp.asarray(token_types, jnp.int32),
            query_end=jnp.asarray(query_end, jnp.int32),
            num_image_tokens=int(num_image_tokens),
        )
        depth = ctx.depth
        if depth != len(self.ratios):
            raise ValueError(
                f"p-MoD was built for num_layers={len(self.ratios)} but the decoder has {depth}"
            )
        n_static = ctx.num_image_tokens

        def block_fn(i, run, x, state):
            types = current_types(ctx, state)
            is_v = types == masks_lib.IMAGE
            n_v = jnp.sum(is_v, axis=1).astype(jnp.int32)
            ratio = self.ratios[i]
            if ratio is None:
                x = run(x, state)
                return x, record_visual_tokens(state, i, depth, n_v)
            b, t = is_v.shape
            k_max = min(int(n_static * ratio), n_static, t)
            logits = self.router_logits(i, x)
            g = self.weights(logits)
            k_row = jnp.floor(n_v.astype(jnp.float32) * ratio).astype(jnp.int32)
            rows = jnp.arange(b)[:, None]
            routed = jnp.zeros((b, t), bool)
            if k_max > 0:
                sel, ok = core.topk_select(logits, k_max, valid=is_v, keep_order=False)
                ok = ok & (jnp.arange(k_max)[None, :] < k_row[:, None])
                routed = routed.at[rows, sel].max(ok)
            keep = (row_valid(state, t) & ~is_v) | routed
            t_sub = max(1, min(t, t - n_static + k_max))
            key = jnp.where(keep, 0, t) + jnp.arange(t, dtype=jnp.int32)[None, :]
            order = jnp.argsort(key, axis=1)[:, :t_sub].astype(jnp.int32)
            pos = state.positions
            if pos.ndim == 3:
                sub_pos = jnp.take_along_axis(pos, jnp.broadcast_to(order[None], (3, b, t_sub)), 2)
            else:
                sub_pos = jnp.take_along_axis(pos, order, axis=1)
            n_keep = jnp.minimum(jnp.sum(keep, axis=1), t_sub).astype(jnp.int32)
            sub_state = state.replace(
                positions=sub_pos,
                token_index=jnp.take_along_axis(state.token_index, order, axis=1),
                lengths=n_keep,
            )
            sub_x = jnp.take_along_axis(x, order[:, :, None], axis=1)
            residual, mlp_out = run(sub_x, sub_state, parts=True)
            gv = jnp.where(is_v, g, 1.0)[..., None].astype(x.dtype)  # STRing weights
            sub_g = jnp.take_along_axis(gv, order[:, :, None], axis=1)
            sub_out = residual + sub_g * mlp_out
            out = x * gv  # skipped vision tokens: g * x; text rows are overwritten below
            written = jnp.arange(t_sub)[None, :] < n_keep[:, None]
            dest = jnp.where(written, order, t)  # out of range -> dropped
            out = out.at[rows, dest].set(sub_out.astype(x.dtype), mode="drop")
            extra = {**state.extra, f"mod_weights/{i}": jnp.where(is_v, g, 0.0)}
            state = record_visual_tokens(state.replace(extra=extra), i, depth, jnp.sum(routed, 1))
            return out, state

        return None, block_fn


@registry.COMPRESSORS.register(
    "pmod",
    paper=(
        "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay (Zhang et al., "
        "arXiv:2412.04449, 2024; ICCV 2025)"
    ),
)
def pmod(
    ratio: float = 0.5,
    max_ratio: float = 0.85,
    min_ratio: float = 0.15,
    schedule: str = "shiftedcos",
    layers: tuple[int, ...] | None = None,
    norm: str = "tanh",
    norm_scale: float = 0.2,
    norm_bias: float = 1.0,
    use_bias: bool = True,
    zero_init: bool = True,
    dim: int | None = None,
    num_layers: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> PMoD:
    """p-MoD (learned, in-LLM): per-layer vision-token routers with progressive ratio decay;
    ``ratio`` is the average retention ratio, ``layers`` an explicit tuple of MoD layers."""
    for name, v in (("ratio", ratio), ("max_ratio", max_ratio), ("min_ratio", min_ratio)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 2.0:
            raise ValueError(f"{name}={v!r}: expected a float retention ratio in [0, 2]")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
    if dim is None or num_layers is None or rngs is None:
        raise ValueError(
            f"pmod needs dim, num_layers and rngs (got dim={dim!r}, num_layers={num_layers!r}, "
            f"rngs={'set' if rngs is not None else None}); build it through MLLMConfig"
        )
    if layers is not None:
        if isinstance(layers, (int, np.integer)):
            layers = (layers,)
        layers = tuple(int(x) for x in layers)
        bad = [x for x in layers if not 0 <= x < num_layers]
        if bad:
            raise ValueError(f"layers={layers}: expected layer indices in [0, {num_layers})")
    ratios = prd_schedule(
        num_layers,
        ratio=float(ratio),
        max_ratio=float(max_ratio),
        min_ratio=float(min_ratio),
        schedule=schedule,
        layers=layers,
    )
    return PMoD(
        dim=int(dim),
        num_layers=int(num_layers),
        ratios=ratios,
        norm=norm,
        norm_scale=norm_scale,
        norm_bias=norm_bias,
        use_bias=bool(use_bias),
        zero_init=bool(zero_init),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
