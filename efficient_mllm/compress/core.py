"""The shared mechanism of every visual-token compressor: score -> select -> aggregate.

Each method in ``efficient_mllm.compress`` is a scorer (what matters: [CLS] attention, text
relevance, diversity, ...) plus these shared pieces:

* :func:`resolve_budget` -- a static ``K`` from an int or a fraction of ``N``;
* :func:`topk_select` -- the one top-k selector (kept tokens in their original order);
* :func:`gather_tokens` / :func:`gather_positions` -- index the kept tokens and their ids;
* :func:`merge_tokens` -- the one merge routine (weighted average of the tokens assigned to
  each output slot), used by ToMe-style merging, VisionZip's contextual tokens, PruMerge+ and
  recycling;
* :func:`nearest_assign` -- assigns every token to its most similar kept token;
* :class:`Compressed` -- what a compressor returns (the contract in ``docs/interfaces.md``).

Budgets are static Python ints (no data-dependent shapes under ``jit``); adaptive methods keep a
static capacity ``K`` and mark unused slots with ``valid = False``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Compressed",
    "resolve_budget",
    "topk_select",
    "gather_tokens",
    "gather_positions",
    "merge_tokens",
    "nearest_assign",
    "cosine_similarity",
    "masked_scores",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Compressed:
    """A compressor's output.

    * ``tokens`` ``[B, K, D]``: the tokens handed to the LLM.
    * ``keep_idx`` int32 ``[B, K]``: for each output slot, the index (in the ``N`` input tokens)
      of the token it stands for (the kept token, or a merged group's representative). Sorted
      ascending among valid slots, so spatial order is preserved.
    * ``valid`` bool ``[B, K]``: slots that hold a token (adaptive methods fill fewer than ``K``).
    * ``position_ids``: relative position ids of the kept tokens, ``[B, K]`` (1D RoPE) or
      ``[3, B, K]`` (M-RoPE); None means "gather the input ids by ``keep_idx``".
    * ``stats``: dict of arrays for efficiency accounting (e.g. ``num_kept [B]``).
    """

    tokens: jax.Array
    keep_idx: jax.Array
    valid: jax.Array
    position_ids: Any = None
    stats: dict = dataclasses.field(default_factory=dict)


def resolve_budget(budget: int | float, n: int, *, name: str = "keep") -> int:
    """A static token count from ``budget``: an int ``1 <= K <= n``, or a fraction in ``(0, 1]``
    of ``n`` (rounded, at least 1). Raises ``ValueError`` for anything else."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={budget!r}: expected an int token count or a fraction in (0, 1]")
    if isinstance(budget, (float, np.floating)):
        if not 0.0 < budget <= 1.0:
            raise ValueError(
                f"{name}={budget!r}: a fractional budget must be in (0, 1] (of the {n} tokens)"
            )
        return max(1, int(round(float(budget) * n)))
    budget = int(budget)
    if not 1 <= budget <= n:
        raise ValueError(
            f"{name}={budget}: expected 1 <= {name} <= {n} (the number of input tokens)"
        )
    return budget


def masked_scores(scores: jax.Array, valid: jax.Array | None) -> jax.Array:
    """float32 scores with invalid entries set to -inf (never selected before a valid one)."""
    scores = scores.astype(jnp.float32)
    if valid is None:
        return scores
    return jnp.where(valid, scores, -jnp.inf)


def topk_select(
    scores: jax.Array, k: int, *, valid: jax.Array | None = None, keep_order: bool = True
) -> tuple[jax.Array, jax.Array]:
    """The top-``k`` entries of ``scores [B, N]`` -> ``(idx int32 [B, k], selected_valid [B, k])``.

    Ties break towards the lower index (stable). With ``keep_order`` the indices come back in
    ascending order (original spatial order). ``selected_valid`` is False where fewer than ``k``
    entries were valid (those slots hold arbitrary invalid indices, sorted last).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores shape={tuple(scores.shape)}: expected [B, N]")
    n = scores.shape[1]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k={k!r}: expected a static int in [1, {n}]")
    s = masked_scores(scores, valid)
    _, idx = jax.lax.top_k(s, int(k))  # stable: equal scores keep the lower index first
    ok = jnp.take_along_axis(s, idx, axis=1) > -jnp.inf
    if keep_order:
        key = jnp.where(ok, idx, n + idx)  # valid slots first, each group ascending
        order = jnp.argsort(key, axis=1)
        idx = jnp.take_along_axis(idx, order, axis=1)
        ok = jnp.take_along_axis(ok, order, axis=1)
    return idx.astype(jnp.int32), ok


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x [B, N, ...]`` gathered at ``idx [B, K]`` -> ``[B, K, ...]``."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def gather_positions(positions: jax.Array | None, idx: jax.Array) -> jax.Array | None:
    """Position ids ``[B, N]`` or ``[3, B, N]`` gathered at ``idx [B, K]``."""
    if positions is None:
        return None
    if positions.ndim == 2:
        return jnp.take_along_axis(positions, idx, axis=1)
    if positions.ndim == 3:
        return jnp.take_along_axis(
            positions, jnp.broadcast_to(idx[None], (positions.shape[0],) + idx.shape), axis=2
        )
    raise ValueError(f"positions shape={tuple(positions.shape)}: expected [B, N] or [3, B, N]")


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Pairwise cosine similarity ``[B, N, D] x [B, M, D] -> float32 [B, N, M]``."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return jnp.einsum("bnd,bmd->bnm", a, b)


def nearest_assign(
    keys: jax.Array, centers_idx: jax.Array, *, centers_valid: jax.Array | None = None
) -> jax.Array:
    """For each token of ``keys [B, N, D]``, the slot (0..K-1) of the most cosine-similar
    kept token ``centers_idx [B, K]``; kept tokens are assigned to their own slot."""
    b, n, _ = keys.shape
    k = centers_idx.shape[1]
    sim = cosine_similarity(keys, gather_tokens(keys, centers_idx))  # [B, N, K]
    if centers_valid is not None:
        sim = jnp.where(centers_valid[:, None, :], sim, -jnp.inf)
    assign = jnp.argmax(sim, axis=-1).astype(jnp.int32)
    # A kept token always belongs to its own slot (ties / duplicates cannot move it).
    rows = jnp.arange(b)[:, None]
    own = (
        jnp.full((b, n), -1, jnp.int32)
        .at[rows, centers_idx]
        .set(jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k)))
    )
    if centers_valid is not None:
        own = own.at[rows, centers_idx].set(jnp.where(centers_valid, own[rows, centers_idx], -1))
    return jnp.where(own >= 0, own, assign)


def merge_tokens(
    x: jax.Array,
    assign: jax.Array,
    num_slots: int,
    *,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The one merge routine: the weighted mean of the tokens assigned to each slot.

    ``x [B, N, D]``, ``assign int32 [B, N]`` (slot in ``0..num_slots-1``, or ``-1`` to discard),
    ``weights [B, N]`` (token sizes / importances; default 1). Returns ``(merged [B, S, D] in
    x.dtype, total_weight float32 [B, S])``; a slot nobody is assigned to is zero with weight 0.
    """
    if assign.shape != x.shape[:2]:
        raise ValueError(f"assign shape={tuple(assign.shape)}: expected {tuple(x.shape[:2])}")
    w = jnp.ones(assign.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    onehot = jax.nn.one_hot(assign, num_slots, dtype=jnp.float32) * w[..., None]  # [B, N, S]
    total = onehot.sum(axis=1)
    summed = jnp.einsum("bns,bnd->bsd", onehot, x.astype(jnp.float32))
    merged = summed / jnp.maximum(total, 1e-12)[..., None]
    return merged.astype(x.dtype), total


def grid_shape(grid: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """The (rows, cols) token grid, checked against ``n`` tokens; square if ``grid`` is None."""
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"grid=None with {n} tokens: cannot infer a square grid; pass grid")
        return side, side
    gh, gw = (int(g) for g in grid)
    if gh * gw != n:
        raise ValueError(f"grid={tuple(grid)} holds {gh * gw} tokens but {n} were given")
    return gh, gw
