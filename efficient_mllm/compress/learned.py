"""Learned pre-LLM compressors (trained with the model): FlashSloth spatial attention pooling and
the Matryoshka Query Transformer.

Both are ``nnx.Module`` s built by their registry factory, which names ``dim``, ``grid``,
``dtype``, ``param_dtype`` and ``rngs`` so that :class:`~efficient_mllm.nn.mllm.MLLM` passes them;
the module becomes the model's ``compressor`` submodule and its parameters train with the rest.

Train / inference switching follows the NNX convention: the MQT module (and the SAP scorer's
``nnx.Dropout``) has a ``deterministic`` attribute, False (training) at construction as for
``nnx.Dropout``; ``model.eval()`` sets it to True on every submodule that has it,
``model.train()`` back to False, and ``nnx.view(model, deterministic=True)`` gives an inference
view without touching ``model``. The attribute is static (part of the graph definition), so
switching it retraces jitted functions once. The stock trainer never switches it: training runs
in training mode, and an evaluation that wants a fixed MQT budget must use ``model.eval()`` or
``nnx.view``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import compat, registry
from efficient_mllm.compress import core
from efficient_mllm.nn.layers import GeluMLP, LayerNorm, Linear, normal_init
from efficient_mllm.ops import attention as attention_ops
from efficient_mllm.ops import masks as masks_lib

__all__ = ["Budget", "MatryoshkaQueryTransformer", "SpatialAttentionPool", "attn_pool", "mqt"]


def _need(value: Any, name: str, method: str) -> Any:
    return core.require(
        value,
        name,
        method,
        "the MLLM passes it when it builds the compressor; pass it yourself otherwise",
    )


def _pos_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return int(value)


def _pool_shape(pool: Any) -> tuple[int, int]:
    if isinstance(pool, (tuple, list)) and len(pool) == 2:
        ph, pw = pool
    else:
        ph = pw = pool
    for v in (ph, pw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"pool={pool!r}: expected an int >= 1 or a pair (rows, cols) of them")
    return int(ph), int(pw)


def _region_reps(size: int, p: int) -> np.ndarray:
    """Centre row (or column) of each band of ``p`` rows; the last band may be shorter."""
    starts = np.arange(0, size, p)
    return starts + (np.minimum(p, size - starts) // 2)


# -- FlashSloth SAP ----------------------------------------------------------------------------


class SpatialAttentionPool(nnx.Module):
    """FlashSloth spatial attention pooling: per ``ph x pw`` region of the token grid, a
    learned scorer ``MLP(D -> hidden -> 1)`` (ReLU, dropout) weighs the region's tokens, the
    weights are a softmax within the region and the output token is the weighted sum.

    Params: ``score_fc1 [embed, mlp]`` (+ bias), ``score_fc2 [mlp, 1]`` (+ bias). Grids not
    divisible by the pool get smaller edge regions. ``keep_idx`` of a region is its centre
    token, so kept positions are region centres (sorted in raster order of the regions).
    """

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        *,
        pool: Any = 2,
        hidden: int | None = None,
        dropout: float = 0.0,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim = _pos_int(dim, "dim")
        # grid None: dynamic-resolution models pass each image's grid at call time.
        self.grid = None if grid is None else tuple(int(g) for g in grid)
        self.pool = _pool_shape(pool)
        if self.grid is not None and (self.pool[0] > self.grid[0] or self.pool[1] > self.grid[1]):
            raise ValueError(f"pool={pool!r}: larger than the {self.grid} token grid")
        hidden = self.dim if hidden is None else _pos_int(hidden, "hidden")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout={dropout!r}: expected a rate in [0, 1)")
        kw = {"use_bias": True, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.score_fc1 = Linear(self.dim, hidden, axes=("embed", "mlp"), **kw)
        self.score_fc2 = Linear(hidden, 1, axes=("mlp", None), **kw)
        self.dropout = nnx.Dropout(float(dropout), rngs=rngs)
        self.dtype = dtype

    def num_outputs(self, grid: tuple[int, int] | None = None) -> int:
        if grid is None and self.grid is None:
            raise ValueError("grid=None: this pool was built without a grid; pass the token grid")
        gh, gw = grid or self.grid
        ph, pw = self.pool
        return math.ceil(gh / ph) * math.ceil(gw / pw)

    def __call__(
        self, tokens: jax.Array, *, grid: tuple[int, int] | None = None
    ) -> core.Compressed:
        b, n, d = core.check_tokens(tokens)
        if d != self.dim:
            raise ValueError(f"tokens shape={tuple(tokens.shape)}: expected width dim={self.dim}")
        gh, gw = core.grid_shape(grid if grid is not None else self.grid, n)
        ph, pw = self.pool
        if ph > gh or pw > gw:
            raise ValueError(f"pool={self.pool}: larger than the {(gh, gw)} token grid")
        nh, nw = math.ceil(gh / ph), math.ceil(gw / pw)
        pad = ((0, 0), (0, nh * ph - gh), (0, nw * pw - gw), (0, 0))
        x = jnp.pad(tokens.reshape(b, gh, gw, d), pad)
        real = np.pad(np.ones((gh, gw), bool), pad[1:3])
        x = (
            x.reshape(b, nh, ph, nw, pw, d)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(b, nh * nw, ph * pw, d)
        )
        real = real.reshape(nh, ph, nw, pw).transpose(0, 2, 1, 3).reshape(nh * nw, ph * pw)
        h = self.dropout(jax.nn.relu(self.score_fc1(x)))
        s = self.score_fc2(h)[..., 0].astype(jnp.float32)
        w = jax.nn.softmax(jnp.where(real[None], s, -jnp.inf), axis=-1)
        out = jnp.einsum("bkp,bkpd->bkd", w, x.astype(jnp.float32)).astype(tokens.dtype)
        rows, cols = _region_reps(gh, ph), _region_reps(gw, pw)
        keep = (rows[:, None] * gw + cols[None, :]).reshape(-1).astype(np.int32)
        keep_idx = jnp.broadcast_to(jnp.asarray(keep)[None], (b, nh * nw))
        return core.compressed(out, keep_idx, region_size=jnp.asarray(real.sum(-1), jnp.int32))


@registry.COMPRESSORS.register(
    "attn_pool",
    paper="FlashSloth: Lightning Multimodal Large Language Models via Embedded Visual "
    "Compression (Tong et al., CVPR 2025, arXiv:2412.04317), spatial attention pooling",
)
def attn_pool(
    pool: Any = 2,
    hidden: int | None = None,
    dropout: float = 0.0,
    *,
    dim: int | None = None,
    grid: tuple[int, int] | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> SpatialAttentionPool:
    """FlashSloth's Spatial Attention Pooling (SAP): ``N`` tokens -> ``ceil(gh/ph) *
    ceil(gw/pw)`` learned attention-pooled region tokens (``pool=2``: 4x fewer).
    ``grid`` may be None for dynamic-resolution models (each call then passes its grid).

    Spec: ``attn_pool(pool=2)`` (or ``pool=(2, 3)``), ``hidden`` (scorer MLP width, default
    ``dim``), ``dropout`` (scorer dropout; FlashSloth's code uses 0.1, default 0 here so
    training and inference match unless asked). Learned, trained with the model.

    Implemented: SAP on the projected tokens (scorer MLP, in-region softmax, weighted sum).
    Not implemented: FlashSloth's Embedded Query module (EmbQ, learnable query tokens placed in
    the LLM input after the instruction); SAP alone is the visual compressor.
    """
    return SpatialAttentionPool(
        _need(dim, "dim", "attn_pool"),
        grid,
        pool=pool,
        hidden=hidden,
        dropout=dropout,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=_need(rngs, "rngs", "attn_pool"),
    )


# -- Matryoshka Query Transformer ---------------------------------------------------------------


class _MultiHeadAttention(nnx.Module):
    """Attention of ``x [B, Tq, D]`` over ``kv [B, Tk, D]`` (self-attention when ``kv is x``)."""

    def __init__(self, dim: int, heads: int, *, impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        hd = dim // heads
        kw = {"use_bias": True, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.q = Linear(dim, (heads, hd), axes=("embed", "heads", "head_dim"), **kw)
        self.k = Linear(dim, (heads, hd), axes=("embed", "heads", "head_dim"), **kw)
        self.v = Linear(dim, (heads, hd), axes=("embed", "heads", "head_dim"), **kw)
        self.o = Linear((heads, hd), dim, axes=("heads", "head_dim", "embed"), **kw)
        self.impl = impl

    def __call__(self, x: jax.Array, kv: jax.Array, mask: Any = None) -> jax.Array:
        q = self.q(x)
        out = attention_ops.dot_product_attention(
            q, self.k(kv), self.v(kv), mask=mask, impl=self.impl
        )
        return self.o(out.astype(q.dtype))


class _QueryBlock(nnx.Module):
    """Pre-LN block: queries cross-attend to the image tokens, self-attend among the active
    queries, then an MLP; residual around each."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, impl: str, dtype, param_dtype, rngs):
        nkw = {"dtype": dtype, "param_dtype": param_dtype}
        akw = {"impl": impl, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.norm_q = LayerNorm(dim, **nkw)
        self.norm_kv = LayerNorm(dim, **nkw)
        self.cross = _MultiHeadAttention(dim, heads, **akw)
        self.norm_self = LayerNorm(dim, **nkw)
        self.self_attn = _MultiHeadAttention(dim, heads, **akw)
        self.norm_mlp = LayerNorm(dim, **nkw)
        self.mlp = GeluMLP(dim, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, q: jax.Array, image: jax.Array, active: jax.Array) -> jax.Array:
        q = q + self.cross(self.norm_q(q), self.norm_kv(image))
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, mask=masks_lib.padding(kv_lengths=active))
        return q + self.mlp(self.norm_mlp(q))


class Budget(nnx.Variable):
    """A compressor's inference token budget: an int32 scalar in the model state (not a
    parameter), so changing it does not retrace jitted functions."""


class MatryoshkaQueryTransformer(nnx.Module):
    """``max_queries`` latent queries and ``depth`` query blocks over the image tokens; only the
    first ``m`` queries are active (self-attention sees only them, later slots are invalid).

    Params: ``queries [max_queries, embed]`` (normal 0.02), ``blocks`` (cross-attention,
    self-attention, GELU MLP, pre-LN), ``norm`` and ``proj [embed, embed]``. ``deterministic``
    False (training, the default): ``m`` is drawn uniformly from ``[min_budget, max_queries]``
    once per call from the module's own RNG stream (``budget_rngs``; its counter lives in the
    model state, so a train step that returns the non-parameter state draws a new ``m`` each
    step). True (``model.eval()``): ``m = budget``, a :class:`Budget` variable set with
    ``model.compressor.set_budget(m)`` for any ``1 <= m <= max_queries`` (state, not a static
    attribute: a budget sweep compiles once).
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        *,
        max_queries: int,
        budget: int | None = None,
        min_budget: int = 1,
        depth: int = 1,
        heads: int | None = None,
        mlp_ratio: int = 4,
        impl: str = "auto",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim = _pos_int(dim, "dim")
        # num_tokens None: dynamic-resolution models (the call checks max_queries <= N).
        self.num_tokens = None if num_tokens is None else _pos_int(num_tokens, "num_tokens")
        self.max_queries = _pos_int(max_queries, "max_queries")
        if self.num_tokens is not None and self.max_queries > self.num_tokens:
            raise ValueError(
                f"max_queries={max_queries}: expected at most the {num_tokens} image tokens"
            )
        self.min_budget = _pos_int(min_budget, "min_budget")
        if self.min_budget > self.max_queries:
            raise ValueError(f"min_budget={min_budget}: expected <= max_queries={max_queries}")
        self.budget = Budget(jnp.asarray(self.max_queries, jnp.int32))
        if budget is not None:
            self.set_budget(budget)
        heads = max(1, self.dim // 64) if heads is None else _pos_int(heads, "heads")
        if self.dim % heads:
            raise ValueError(f"heads={heads}: must divide dim={self.dim}")
        depth = _pos_int(depth, "depth")
        mlp_dim = _pos_int(mlp_ratio, "mlp_ratio") * self.dim
        init = normal_init(
            rngs.params(),
            shape=(self.max_queries, self.dim),
            std=0.02,
            dtype=jnp.dtype(param_dtype),
        )
        self.queries = compat.logical_param(init, (None, "embed"))
        kw = {"impl": impl, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.blocks = nnx.List([_QueryBlock(self.dim, heads, mlp_dim, **kw) for _ in range(depth)])
        self.norm = LayerNorm(self.dim, dtype=dtype, param_dtype=param_dtype)
        self.proj = Linear(
            self.dim,
            self.dim,
            axes=("mlp", "embed"),
            use_bias=True,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.budget_rngs = rngs["budget"].fork()
        self.deterministic = False
        self.dtype = dtype

    def set_budget(self, budget: int) -> None:
        """Inference budget ``m`` (used when ``deterministic``)."""
        if (
            isinstance(budget, bool)
            or not isinstance(budget, (int, np.integer))
            or not (1 <= budget <= self.max_queries)
        ):
            raise ValueError(f"budget={budget!r}: expected an int in [1, {self.max_queries}]")
        self.budget.set_value(jnp.asarray(int(budget), jnp.int32))

    def set_view(self, deterministic: bool | None = None):
        """``nnx.view(model, deterministic=...)`` support."""
        if deterministic is not None:
            self.deterministic = bool(deterministic)

    def __call__(self, tokens: jax.Array) -> core.Compressed:
        b, n, d = core.check_tokens(tokens)
        if d != self.dim:
            raise ValueError(f"tokens shape={tuple(tokens.shape)}: expected width dim={self.dim}")
        mq = self.max_queries
        if mq > n:
            raise ValueError(f"max_queries={mq}: expected at most the {n} image tokens")
        if self.deterministic:
            budget = self.budget[...] if isinstance(self.budget, nnx.Variable) else self.budget
            m = jnp.clip(jnp.asarray(budget, jnp.int32), 1, mq)
        else:
            m = jax.random.randint(self.budget_rngs(), (), self.min_budget, mq + 1, jnp.int32)
        active = jnp.full((b,), m, jnp.int32)
        slots = jnp.arange(mq, dtype=jnp.int32)
        valid = jnp.broadcast_to(slots[None] < m, (b, mq))
        q = jnp.broadcast_to(self.queries[...].astype(self.dtype)[None], (b, mq, d))
        image = tokens.astype(self.dtype)
        for block in self.blocks:
            q = block(q, image, active)
        out = self.proj(self.norm(q))
        out = jnp.where(valid[..., None], out, 0).astype(tokens.dtype)
        # Positions: the m active queries are spread evenly over the N image positions.
        keep = jnp.minimum(slots * n // jnp.maximum(m, 1), n - 1)
        keep_idx = jnp.broadcast_to(keep[None], (b, mq))
        return core.compressed(out, keep_idx, valid, budget=active)


@registry.COMPRESSORS.register(
    "mqt",
    paper="Matryoshka Query Transformer for Large Vision-Language Models "
    "(Hu et al., NeurIPS 2024, arXiv:2405.19315)",
)
def mqt(
    max_queries: int,
    budget: int | None = None,
    min_budget: int = 1,
    depth: int = 1,
    heads: int | None = None,
    mlp_ratio: int = 4,
    impl: str = "auto",
    *,
    dim: int | None = None,
    num_tokens: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> MatryoshkaQueryTransformer:
    """MQT: ``max_queries`` (``M``) latent queries, a small query transformer (``depth``
    blocks of cross-attention to the image tokens, self-attention among the queries, MLP), and
    Matryoshka training: each training call keeps only the first ``m ~ U[min_budget, M]``
    queries; at inference any ``budget`` ``m <= M`` (default ``M``) gives ``m`` tokens.

    Spec: ``mqt(max_queries=64, budget=16)``. Static shapes: ``K = M`` slots, ``valid`` = the
    first ``m`` (the MLLM moves the rest to the padding tail); ``stats["budget"] [B]``. Train /
    inference: ``model.train()`` / ``model.eval()`` (or ``nnx.view(model,
    deterministic=True)``); ``model.compressor.set_budget(m)`` sets the inference budget.
    Query ``i`` of ``m`` takes the position id of image token ``floor(i N / m)``.
    ``num_tokens`` (``N``, for the build-time check ``max_queries <= N``) may be None for
    dynamic-resolution models; each call checks it.

    Deviation: the queries attend to the *projected* image tokens (after the MLLM's projector),
    whereas MQT-LLaVA's query transformer reads the ViT features and replaces the projector.
    """
    return MatryoshkaQueryTransformer(
        _need(dim, "dim", "mqt"),
        num_tokens,
        max_queries=max_queries,
        budget=budget,
        min_budget=min_budget,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        impl=impl,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=_need(rngs, "rngs", "mqt"),
    )
