"""Merging compressors: ToMe, DyMU (dynamic threshold merging) and LLaVA-PruMerge+.

All three run after the vision encoder and projector, on the ``N`` projected image tokens
``[B, N, D]``, and measure token similarity on a *metric*: by default the ViT output features
(``features``, the closest signal to the attention keys the papers use, which this ViT does not
expose), or the projected tokens themselves (``metric="tokens"``).

Bipartite soft matching (ToMe, DyMU) alternates the current tokens into sets A (even positions)
and B (odd positions), links each A token to its most cosine-similar B token, and merges chosen
A tokens into their B partner with a size-weighted average (:func:`core.merge_tokens`, weights =
token sizes, i.e. how many input tokens each one stands for). Between rounds the tokens are kept
in the spatial order of their representatives (the B token of each merged group), so the output
``keep_idx`` is sorted and the alternation stays spatially interleaved; ToMe itself concatenates
``[unmerged A, B]`` between layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm import registry
from efficient_mllm.compress import core
from efficient_mllm.compress.cls_attention import NOT_GIVEN, check_fallback, cls_scores

__all__ = [
    "DyMU",
    "PruMergePlus",
    "ToMe",
    "dymu",
    "dymu_calibrate",
    "iqr_outliers",
    "prumerge_plus",
    "tome",
    "tome_schedule",
]

_METRICS = ("features", "tokens")
_BIG = 1 << 30


def _check_metric(metric: Any) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {_METRICS}")
    return metric


def _pos_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return int(value)


def _similarity_metric(method: str, metric: str, tokens: jax.Array, features: Any) -> jax.Array:
    if metric == "tokens":
        return tokens
    core.require(
        features,
        "features",
        f"{method}(metric='features')",
        "pass the ViT features [B, N, Dv] (the MLLM does) or use metric='tokens'",
    )
    if features.ndim != 3 or features.shape[:2] != tokens.shape[:2]:
        raise ValueError(
            f"features shape={tuple(features.shape)}: expected [{tokens.shape[0]}, "
            f"{tokens.shape[1]}, Dv] like tokens"
        )
    return features


# -- bipartite rounds --------------------------------------------------------------------------


def _bipartite_edges(metric: jax.Array, alive_b: jax.Array | None = None):
    """Each A token's (even position) best B token (odd position): ``(score [B, na], dst
    position [B, na])``; B tokens with ``alive_b False`` are never chosen."""
    sim = core.cosine_similarity(metric[:, ::2], metric[:, 1::2])  # [B, na, nb]
    if alive_b is not None:
        sim = jnp.where(alive_b[:, None, :], sim, -jnp.inf)
    score = jnp.max(sim, axis=-1)
    dst = 2 * jnp.argmax(sim, axis=-1).astype(jnp.int32) + 1
    return score, dst


def _merge_round(
    state: dict, merge_a: jax.Array, dst: jax.Array, cap: int
) -> tuple[dict, jax.Array]:
    """Merges A token ``i`` into position ``dst[:, i]`` where ``merge_a`` and compacts the
    surviving tokens (sorted by representative, dead slots last) into ``cap`` slots.

    ``state``: ``x [B, n, C]`` float32 (tokens and metric concatenated), ``size [B, n]``
    (0 = dead slot), ``rep [B, n]`` (representative input index), ``alive [B, n]``. Returns the
    new state and ``assign [B, n]`` (slot of each old position, -1 for dead ones)."""
    x, size, rep, alive = state["x"], state["size"], state["rep"], state["alive"]
    b, n, _ = x.shape
    rows = jnp.arange(b)[:, None]
    survivor = alive.at[:, ::2].set(alive[:, ::2] & ~merge_a)
    key = jnp.where(survivor, rep, _BIG + jnp.arange(n, dtype=jnp.int32)[None])
    order = jnp.argsort(key, axis=1)[:, :cap].astype(jnp.int32)
    slot = (
        jnp.full((b, n), -1, jnp.int32)
        .at[rows, order]
        .set(jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), (b, cap)))
    )
    slot = jnp.where(survivor, slot, -1)
    slot_a = jnp.where(merge_a, jnp.take_along_axis(slot, dst, axis=1), slot[:, ::2])
    assign = slot.at[:, ::2].set(slot_a)
    merged, total = core.merge_tokens(x, assign, cap, weights=size)
    new = {
        "x": merged,
        "size": total,
        "rep": jnp.take_along_axis(rep, order, axis=1),
        "alive": jnp.take_along_axis(survivor, order, axis=1),
    }
    return new, assign


def _init_state(tokens: jax.Array, metric: jax.Array) -> dict:
    b, n, _ = tokens.shape
    return {
        "x": jnp.concatenate([tokens.astype(jnp.float32), metric.astype(jnp.float32)], axis=-1),
        "size": jnp.ones((b, n), jnp.float32),
        "rep": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n)),
        "alive": jnp.ones((b, n), bool),
    }


def _finish(state: dict, groups: jax.Array, d: int, dtype, **stats) -> core.Compressed:
    alive = state["alive"]
    tokens = jnp.where(alive[..., None], state["x"][..., :d], 0).astype(dtype)
    keep_idx = jnp.where(alive, state["rep"], 0)
    sizes = jnp.where(alive, state["size"], 0.0)
    return core.compressed(tokens, keep_idx, alive, sizes=sizes, groups=groups, **stats)


# -- ToMe --------------------------------------------------------------------------------------


def tome_schedule(
    n: int, keep: int | None = None, r_per_step: int | None = None, steps: int | None = None
) -> list[int]:
    """Static merges per round. With ``keep``: rounds of ``r = min(r_per_step, n // 2, n -
    keep)`` (``r_per_step`` default: as many as one round allows) until ``keep`` tokens remain.
    Without: ``steps`` rounds of ``min(r_per_step, n // 2)``."""
    rs: list[int] = []
    if keep is not None:
        while n > keep:
            r = min(n // 2, n - keep)
            if r_per_step is not None:
                r = min(r, r_per_step)
            rs.append(r)
            n -= r
        return rs
    for _ in range(steps or 1):
        r = min(r_per_step, n // 2)
        if r == 0:
            break
        rs.append(r)
        n -= r
    return rs


@registry.COMPRESSORS.register(
    "tome", paper="Token Merging: Your ViT But Faster (Bolya et al., ICLR 2023, arXiv:2210.09461)"
)
def tome(
    keep: int | float | None = None,
    r_per_step: int | None = None,
    steps: int | None = None,
    metric: str = "features",
):
    """ToMe bipartite soft matching, repeated until ``keep`` tokens remain.

    Spec: ``tome(keep=64)`` (as many merges per round as bipartite matching allows, i.e. at
    most half the tokens), ``tome(keep=64, r_per_step=32)`` (ToMe's constant ``r`` per round),
    or ``tome(r_per_step=16, steps=4)`` (``K = N - sum r``). The number of rounds and each
    round's ``r`` are static (computed at trace time from ``N``).

    Each round: A = even, B = odd positions; every A token's best B partner by cosine
    similarity of the metric (ViT features by default, ``metric="tokens"`` for the projected
    tokens); the ``r`` A tokens with the most similar partners are merged into them by a
    size-weighted average of both the tokens and the metric (ToMe recomputes keys in the next
    layer instead). ``keep_idx`` is each merged group's representative (the B token), sorted.

    Implemented: bipartite matching, size tracking, ``stats["sizes"] [B, K]`` (input tokens per
    output token) and ``stats["groups"] [B, N]`` (output slot of each input token). Not
    implemented: merging *inside* every ViT block (this runs once after the encoder, so the ViT
    itself is not accelerated) and proportional attention in the LLM. Proportional attention
    is ``softmax(q k^T / sqrt(d) + log s)`` with ``s`` the key's size: a caller would add
    ``log(stats["sizes"])`` as an additive bias on the image-key columns of every LLM attention
    call (``ops.attention.dot_product_attention(bias=...)``). The LLM's attention-variant contract
    (``attend(q, k, v, mask, q_offset)``) has no per-batch bias input, so it is not applied here;
    LLaVA-style MLLMs that use ToMe-merged tokens feed them as plain tokens as well.
    """
    if keep is None and r_per_step is None:
        raise ValueError("tome: pass keep=<int | fraction> or r_per_step=<int> (with steps=...)")
    if keep is not None:
        core.check_budget(keep, "keep")
        if steps is not None:
            raise ValueError(f"tome: steps={steps!r} cannot be combined with keep={keep!r}")
    if r_per_step is not None:
        r_per_step = _pos_int(r_per_step, "r_per_step")
    if steps is not None:
        steps = _pos_int(steps, "steps")
    return ToMe(keep, r_per_step, steps, _check_metric(metric))


@dataclasses.dataclass(frozen=True)
class ToMe:
    """Bipartite soft matching to a static token count (see :func:`tome`)."""

    keep: int | float | None = None
    r_per_step: int | None = None
    steps: int | None = None
    metric: str = "features"

    def __call__(self, tokens: jax.Array, *, features: jax.Array | None = None) -> core.Compressed:
        b, n, d = core.check_tokens(tokens)
        m = _similarity_metric("tome", self.metric, tokens, features)
        k = None if self.keep is None else core.resolve_budget(self.keep, n, name="keep")
        schedule = tome_schedule(n, k, self.r_per_step, self.steps)
        state = _init_state(tokens, m)
        groups = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n))
        cur = n
        for r in schedule:
            score, dst = _bipartite_edges(state["x"][..., d:])
            order = jnp.argsort(-score, axis=1, stable=True)[:, :r]
            merge_a = jnp.zeros(score.shape, bool).at[jnp.arange(b)[:, None], order].set(True)
            cur -= r
            state, assign = _merge_round(state, merge_a, dst, cur)
            groups = jnp.take_along_axis(assign, groups, axis=1)
        return _finish(state, groups, d, tokens.dtype)


# -- DyMU --------------------------------------------------------------------------------------


def _dymu_rounds(n: int, capacity: int, rounds: int | None) -> list[int]:
    """Per-round slot capacities: after round ``i`` of ``R`` at most ``capacity * 2**(R-1-i)``
    tokens may remain, which a round can always reach (it can merge every A token)."""
    need = max(1, math.ceil(math.log2(n / capacity))) if capacity < n else 1
    if rounds is None:
        rounds = need
    elif rounds < need:
        raise ValueError(
            f"rounds={rounds}: merging {n} tokens into capacity={capacity} needs at least "
            f"{need} bipartite rounds (each round at most halves the tokens)"
        )
    caps, cur = [], n
    for i in range(rounds):
        cur = min(cur, capacity * 2 ** (rounds - 1 - i))
        caps.append(cur)
    return caps


def _thresholds(threshold: Any, rounds: int | None) -> tuple[tuple[float, ...] | float, int | None]:
    if isinstance(threshold, (list, tuple)):
        if not threshold or not all(
            isinstance(t, (int, float, np.number)) and not isinstance(t, bool) for t in threshold
        ):
            raise ValueError(
                f"threshold={threshold!r}: expected a float or a non-empty list of floats"
            )
        if rounds is not None and rounds != len(threshold):
            raise ValueError(f"rounds={rounds} but threshold has {len(threshold)} per-round values")
        return tuple(float(t) for t in threshold), len(threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
        raise ValueError(f"threshold={threshold!r}: expected a cosine similarity in [-1, 1]")
    return float(threshold), rounds


@registry.COMPRESSORS.register(
    "dymu",
    paper="DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs "
    "(Wang et al., arXiv:2504.17040, 2025)",
)
def dymu(
    threshold: float | Sequence[float],
    capacity: int | float | None = None,
    rounds: int | None = None,
    metric: str = "features",
):
    """DyMU dynamic token merging (DToMe): ToMe bipartite matching whose merges are the edges
    with cosine similarity above ``threshold``, so the number of tokens left depends on the
    image (simple images keep fewer).

    Spec: ``dymu(threshold=0.9, capacity=144)``; ``threshold`` may be one float or one per
    round (the paper calibrates one per ViT layer: :func:`dymu_calibrate`), ``rounds`` defaults
    to the fewest bipartite rounds that can reach ``capacity`` (1 when ``capacity`` is None =
    ``N``). Output: ``capacity`` static slots, ``valid`` marks the tokens left (sorted by their
    representative), ``stats["sizes"]``, ``stats["groups"]``, ``stats["forced"]`` (merges below
    the threshold, see below).

    Static capacity: after round ``i`` of ``R`` at most ``capacity * 2**(R-1-i)`` tokens may
    remain; when the threshold leaves more, the most similar remaining edges are merged as well
    (``stats["forced"]`` counts them), so an image never exceeds ``capacity``.

    Not implemented: merging inside each ViT layer (this runs once after the encoder, with a
    per-round rather than per-layer threshold) and Virtual Token Unmerging (VTU), which rebuilds
    the full-sequence attention inside the LLM from the merged tokens and their multiplicities
    (needs RoPE-aware attention changes in every LLM layer); the merged tokens enter the LLM as
    plain tokens at their representatives' positions.
    """
    thr, rounds = _thresholds(threshold, rounds)
    if capacity is not None:
        core.check_budget(capacity, "capacity")
    if rounds is not None:
        rounds = _pos_int(rounds, "rounds")
    return DyMU(thr, capacity, rounds, _check_metric(metric))


@dataclasses.dataclass(frozen=True)
class DyMU:
    """Threshold bipartite merging into a static capacity (see :func:`dymu`)."""

    threshold: float | tuple[float, ...]
    capacity: int | float | None = None
    rounds: int | None = None
    metric: str = "features"

    def __call__(self, tokens: jax.Array, *, features: jax.Array | None = None) -> core.Compressed:
        b, n, d = core.check_tokens(tokens)
        m = _similarity_metric("dymu", self.metric, tokens, features)
        cap = n if self.capacity is None else core.resolve_budget(self.capacity, n, name="capacity")
        caps = _dymu_rounds(n, cap, self.rounds)
        thr = self.threshold
        thrs = thr if isinstance(thr, tuple) else (thr,) * len(caps)
        state = _init_state(tokens, m)
        groups = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n))
        forced = jnp.zeros((b,), jnp.int32)
        for c, t in zip(caps, thrs, strict=True):
            if state["x"].shape[1] < 2:
                break
            alive = state["alive"]
            score, dst = _bipartite_edges(state["x"][..., d:], alive[:, 1::2])
            cand = alive[:, ::2] & (score > -jnp.inf)
            need = jnp.maximum(jnp.sum(alive, axis=1) - c, 0)
            order = jnp.argsort(-jnp.where(cand, score, -jnp.inf), axis=1, stable=True)
            rank = jnp.argsort(order, axis=1)
            above = score > t
            merge_a = cand & (above | (rank < need[:, None]))
            forced = forced + jnp.sum(merge_a & ~above, axis=1).astype(jnp.int32)
            state, assign = _merge_round(state, merge_a, dst, c)
            groups = jnp.take_along_axis(assign, groups, axis=1)
        return _finish(state, groups, d, tokens.dtype, forced=forced)


def dymu_calibrate(
    metric: jax.Array, keep: int | float, r_per_step: int | None = None
) -> tuple[float, ...]:
    """DyMU threshold calibration: runs ToMe with a fixed schedule to ``keep`` tokens over a
    calibration batch ``metric [B, N, Dm]`` (ViT features) and returns, per round, the batch
    mean of the ``r``-th largest edge similarity -- the threshold that merges ``r`` tokens in
    that round on an average image. Pass the tuple as ``dymu(threshold=...)`` (a list in a spec
    string), with ``rounds`` equal to its length."""
    b, n, dm = core.check_tokens(metric, "metric")
    k = core.resolve_budget(keep, n, name="keep")
    schedule = tuple(tome_schedule(n, k, r_per_step))
    return tuple(float(t) for t in _calibrate(metric, schedule))


@functools.partial(jax.jit, static_argnums=1)
def _calibrate(metric: jax.Array, schedule: tuple[int, ...]) -> jax.Array:
    b, _, dm = metric.shape
    state = _init_state(metric, metric)
    out = []
    for r in schedule:
        score, dst = _bipartite_edges(state["x"][..., dm:])
        out.append(jnp.mean(-jnp.sort(-score, axis=1)[:, r - 1]))
        order = jnp.argsort(-score, axis=1, stable=True)[:, :r]
        merge_a = jnp.zeros(score.shape, bool).at[jnp.arange(b)[:, None], order].set(True)
        state, _ = _merge_round(state, merge_a, dst, state["x"].shape[1] - r)
    return jnp.stack(out)


# -- PruMerge+ ---------------------------------------------------------------------------------


def iqr_outliers(scores: jax.Array, whisker: float = 1.5) -> jax.Array:
    """Per row of ``scores [B, N]``: ``scores > Q3 + whisker * (Q3 - Q1)`` (quartiles by
    linear interpolation, as ``numpy.percentile``)."""
    s = scores.astype(jnp.float32)
    q1 = jnp.percentile(s, 25.0, axis=1)
    q3 = jnp.percentile(s, 75.0, axis=1)
    return s > (q3 + whisker * (q3 - q1))[:, None]


@registry.COMPRESSORS.register(
    "prumerge_plus",
    paper="LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models "
    "(Shang et al., arXiv:2403.15388, 2024), PruMerge+ variant",
)
def prumerge_plus(
    keep: int | float = 0.25,
    neighbors: int = 32,
    stride_divisor: int = 3,
    metric: str = "features",
    fallback: str | None = None,
):
    """PruMerge+: IQR outliers of the [CLS] attention plus spatially uniform samples, each kept
    token enriched with its nearest neighbours weighted by their [CLS] attention.

    1. Outliers: tokens whose CLS attention exceeds ``Q3 + 1.5 IQR`` (per image; their count
       ``n_o`` is adaptive).
    2. PruMerge+ spatial samples: every ``s``-th token (raster order, from 0) with
       ``s = max(1, (N // n_o) // stride_divisor)``, i.e. about ``stride_divisor`` samples per
       outlier (``n_o = 0`` counts as 1).
    3. Merge (the reference implementation's rule): for each kept token ``i``, the
       ``neighbors`` tokens ``j != i`` whose metric (ViT features; the paper uses the
       penultimate layer's keys) is most cosine-similar to it, and
       ``y_i <- y_i + sum_j a_j y_j`` with ``a_j`` their CLS attention. Neighbourhoods may overlap
       and include other kept tokens, so this is not :func:`core.merge_tokens`' partition.

    Static shapes: ``keep`` (an int or a fraction of ``N``; default 0.25, PruMerge+'s ~25 %) is
    the capacity; the selected set (outliers + samples) fills ``valid`` slots, sorted by index.
    When it exceeds the capacity, outliers are kept first, each group by CLS attention.
    ``stats["num_outliers"]``, ``stats["num_selected"]`` (before the capacity cut).

    Deviations: the selection is per image (the reference computes the quartiles over the
    flattened batch and runs at batch size 1); the samples run over all ``N`` tokens (the
    reference stops before 575); the reference's optional extra token (the attention-weighted
    sum of all pruned tokens) is not added. An encoder without [CLS] (``use_cls=False``)
    raises unless ``fallback="mean_query"`` (then the ViT's mean-query attention row stands in).
    """
    core.check_budget(keep, "keep")
    return PruMergePlus(
        keep,
        _pos_int(neighbors, "neighbors"),
        _pos_int(stride_divisor, "stride_divisor"),
        _check_metric(metric),
        check_fallback(fallback),
    )


@dataclasses.dataclass(frozen=True)
class PruMergePlus:
    """IQR outliers + spatial samples, enriched by their neighbours (see :func:`prumerge_plus`)."""

    keep: int | float = 0.25
    neighbors: int = 32
    stride_divisor: int = 3
    metric: str = "features"
    fallback: str | None = None

    def __call__(
        self,
        tokens: jax.Array,
        *,
        cls_attention: jax.Array | None = None,
        features: jax.Array | None = None,
        cls: Any = NOT_GIVEN,
    ) -> core.Compressed:
        b, n, d = core.check_tokens(tokens)
        a = cls_scores("prumerge_plus", cls_attention, cls, self.fallback)
        if a.shape != (b, n):
            raise ValueError(f"cls_attention shape={tuple(a.shape)}: expected [{b}, {n}]")
        if self.neighbors > n - 1:
            raise ValueError(f"neighbors={self.neighbors}: expected at most N - 1 = {n - 1}")
        k = core.resolve_budget(self.keep, n, name="keep")
        m = _similarity_metric("prumerge_plus", self.metric, tokens, features)
        outlier = iqr_outliers(a)
        n_out = jnp.sum(outlier, axis=1).astype(jnp.int32)
        stride = jnp.maximum((n // jnp.maximum(n_out, 1)) // self.stride_divisor, 1)
        uniform = (jnp.arange(n, dtype=jnp.int32)[None] % stride[:, None]) == 0
        selected = outlier | uniform
        priority = jnp.where(outlier, 2.0 + a, 1.0 + a)
        idx, ok = core.topk_select(priority, k, valid=selected)

        sim = core.cosine_similarity(core.gather_tokens(m, idx), m)  # [B, K, N]
        sim = jnp.where(jax.nn.one_hot(idx, n, dtype=bool), -jnp.inf, sim)  # not itself
        _, nb = jax.lax.top_k(sim, self.neighbors)  # [B, K, neighbors]
        # Neighbour weights as a [B, K, N] matrix (CLS attention at each neighbour, else 0),
        # so the sum is one matmul instead of a [B, K, neighbors, D] gather.
        w = jnp.take_along_axis(a[:, None, :], nb, axis=2)
        rows = jnp.arange(b)[:, None, None]
        slots = jnp.arange(k)[None, :, None]
        wmat = jnp.zeros((b, k, n), jnp.float32).at[rows, slots, nb].add(w)
        xf = tokens.astype(jnp.float32)
        out = core.gather_tokens(xf, idx) + jnp.einsum("bkn,bnd->bkd", wmat, xf)
        out = jnp.where(ok[..., None], out, 0).astype(tokens.dtype)
        return core.compressed(
            out,
            jnp.where(ok, idx, 0),
            ok,
            num_outliers=n_out,
            num_selected=jnp.sum(selected, axis=1).astype(jnp.int32),
        )
