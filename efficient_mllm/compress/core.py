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
* :func:`kcenter_select` -- greedy max-min (farthest-point / k-center) diversity selection in
  cosine distance (DivPrune, ToDRE), ``O(k N D)`` in a ``lax.fori_loop``;
* :func:`grid_budget` / :func:`band_centres` -- a ``rows x cols`` output grid for a budget and
  the representative input cell of each output cell (uniform sampling, pooling, DCT);
* :func:`sort_slots` -- reorders output slots by ``keep_idx`` (valid first);
* :func:`check_budget` / :func:`check_tokens` / :func:`require` -- argument checks with
  messages that name the argument and its value;
* :class:`Compressed` / :func:`compressed` -- what a compressor returns (the contract in
  ``docs/interfaces.md``).

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
    "grid_shape",
    "grid_budget",
    "band_centres",
    "sort_slots",
    "kcenter_select",
    "check_budget",
    "check_tokens",
    "require",
    "compressed",
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


def check_budget(budget: Any, name: str = "keep") -> int | float:
    """Factory-time check of a budget (before ``N`` is known): an int ``>= 1`` or a fraction in
    ``(0, 1]``. Returns it unchanged; :func:`resolve_budget` checks it against ``N`` later."""
    ok_int = isinstance(budget, (int, np.integer)) and not isinstance(budget, bool) and budget >= 1
    ok_frac = isinstance(budget, (float, np.floating)) and 0.0 < budget <= 1.0
    if not (ok_int or ok_frac):
        raise ValueError(
            f"{name}={budget!r}: expected an int token count >= 1 or a fraction in (0, 1]"
        )
    return budget


def check_tokens(tokens: Any, name: str = "tokens") -> tuple[int, int, int]:
    """``(B, N, D)`` of a float ``[B, N, D]`` array, else ``ValueError`` naming ``name``."""
    shape = tuple(getattr(tokens, "shape", ()))
    dtype = getattr(tokens, "dtype", None)
    if len(shape) != 3 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} shape={shape} dtype={dtype}: expected a float array [B, N, D]"
        )
    return shape  # type: ignore[return-value]


def require(value: Any, name: str, method: str, hint: str = "") -> Any:
    """Returns ``value``, or raises ``ValueError`` saying that ``method`` needs ``name``."""
    if value is None:
        raise ValueError(f"{method} needs {name} but got {name}=None" + (f"; {hint}" if hint else ""))
    return value


def compressed(
    tokens: jax.Array,
    keep_idx: jax.Array,
    valid: jax.Array | None = None,
    *,
    position_ids: Any = None,
    **stats: jax.Array,
) -> Compressed:
    """A :class:`Compressed` with ``valid`` defaulting to all True and ``stats["num_kept"]``
    (valid slots per row) added to ``stats``."""
    keep_idx = jnp.asarray(keep_idx, jnp.int32)
    if valid is None:
        valid = jnp.ones(keep_idx.shape, bool)
    stats = {"num_kept": jnp.sum(valid, axis=1).astype(jnp.int32), **stats}
    return Compressed(tokens, keep_idx, valid, position_ids, stats)


def sort_slots(
    keep_idx: jax.Array, valid: jax.Array | None, *arrays: jax.Array
) -> tuple[jax.Array, ...]:
    """Reorders output slots so valid slots come first, each group ascending in ``keep_idx``.

    Returns ``(keep_idx, valid, *arrays)`` with every ``[B, K, ...]`` array permuted alike
    (``valid`` stays None when None). Used where a method builds its slots out of order
    (VisionZip's dominant + contextual tokens)."""
    key = keep_idx.astype(jnp.int32)
    if valid is not None:
        key = jnp.where(valid, key, key + (1 << 30))
    order = jnp.argsort(key, axis=1, stable=True)
    out = [jnp.take_along_axis(keep_idx, order, axis=1)]
    out.append(None if valid is None else jnp.take_along_axis(valid, order, axis=1))
    out.extend(gather_tokens(a, order) for a in arrays)
    return tuple(out)


def grid_budget(budget: int | float, grid: tuple[int, int], *, name: str = "keep") -> tuple[int, int]:
    """An output grid ``(kh, kw)`` with ``kh <= gh``, ``kw <= gw`` for a budget over ``grid``.

    An int ``K`` must factor as ``kh * kw == K`` within the grid; the factorisation whose
    aspect ratio is closest to the grid's is chosen (``ValueError`` when none fits). A fraction
    ``f`` scales each side by ``sqrt(f)`` (rounded, at least 1), so ``kh * kw ~= f * N``.
    """
    gh, gw = (int(g) for g in grid)
    n = gh * gw
    check_budget(budget, name)
    if isinstance(budget, (float, np.floating)):
        r = math.sqrt(float(budget))
        return max(1, int(round(gh * r))), max(1, int(round(gw * r)))
    k = resolve_budget(budget, n, name=name)
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= gh and k // a <= gw]
    if not pairs:
        raise ValueError(
            f"{name}={k}: cannot be arranged as rows x cols within the {gh}x{gw} token grid"
        )
    target = math.log(gh / gw)
    return min(pairs, key=lambda p: (round(abs(math.log(p[0] / p[1]) - target), 9), p[0]))


def band_centres(grid: tuple[int, int], out_grid: tuple[int, int]) -> np.ndarray:
    """Static raster indices ``[kh * kw]`` of the representative input cell of each cell of a
    ``kh x kw`` output grid: the grid is cut into ``kh`` (``kw``) equal bands of rows (columns)
    and each band is represented by its centre row ``floor((i + 1/2) * gh / kh)`` (column
    likewise). With ``gh = s * kh`` this is the strided subsample ``s // 2 + s * i``."""
    gh, gw = (int(g) for g in grid)
    kh, kw = (int(g) for g in out_grid)
    if not (1 <= kh <= gh and 1 <= kw <= gw):
        raise ValueError(f"out_grid={tuple(out_grid)}: expected 1 <= (kh, kw) <= {(gh, gw)}")
    rows = ((2 * np.arange(kh) + 1) * gh) // (2 * kh)
    cols = ((2 * np.arange(kw) + 1) * gw) // (2 * kw)
    return (rows[:, None] * gw + cols[None, :]).reshape(-1).astype(np.int32)


def kcenter_select(
    x: jax.Array,
    k: int,
    *,
    first: jax.Array,
    bonus: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Greedy max-min diversity selection (Gonzalez's k-center / farthest-point sampling) in
    cosine distance ``d(i, j) = 1 - cos(x_i, x_j)``.

    ``x [B, N, D]``; ``first`` int32 ``[B]``: the first centre (the caller's rule). Then, ``k -
    1`` times, the unselected valid token maximising ``min_{s in S} d(j, s) + bonus_j`` joins
    ``S`` (``bonus [B, N]``, default 0; ties -> lower index). One distance row per step, so the
    cost is ``O(k N D)`` time and ``O(N)`` state (no ``N x N`` matrix). Returns
    ``(idx int32 [B, k] ascending, selected_valid [B, k])`` like :func:`topk_select`.
    """
    b, n, _ = x.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k={k!r}: expected a static int in [1, {n}]")
    k = int(k)
    xf = x.astype(jnp.float32)
    xn = xf / jnp.maximum(jnp.linalg.norm(xf, axis=-1, keepdims=True), 1e-6)
    bonus = jnp.zeros((b, n), jnp.float32) if bonus is None else bonus.astype(jnp.float32)
    ok_in = jnp.ones((b, n), bool) if valid is None else jnp.asarray(valid, bool)
    rows = jnp.arange(b)
    first = jnp.asarray(first, jnp.int32)

    def dist_to(j):
        return 1.0 - jnp.einsum("bnd,bd->bn", xn, xn[rows, j])

    taken = jnp.zeros((b, n), bool).at[rows, first].set(True)
    sel = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first)
    ok = jnp.zeros((b, k), bool).at[:, 0].set(ok_in[rows, first])

    def step(t, carry):
        sel, ok, taken, mind = carry
        score = jnp.where(taken | ~ok_in, -jnp.inf, mind + bonus)
        j = jnp.argmax(score, axis=1).astype(jnp.int32)
        found = score[rows, j] > -jnp.inf
        sel = sel.at[:, t].set(j)
        ok = ok.at[:, t].set(found)
        taken = taken.at[rows, j].set(True)
        return sel, ok, taken, jnp.minimum(mind, dist_to(j))

    sel, ok, _, _ = jax.lax.fori_loop(1, k, step, (sel, ok, taken, dist_to(first)))
    sel, ok = sort_slots(sel, ok)
    return sel, ok
