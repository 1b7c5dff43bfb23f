"""SparseVLM: text-rater-guided progressive image-token sparsification with recycling.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025 (arXiv:2410.04417).

Implemented:

* **Text raters.** On the decoder's input embeddings, each text token after the image gets the
  relevance ``r_t = mean_v softmax_t(<x_v, x_t>)`` (softmax over the text tokens, mean over the
  image tokens); the raters are the text tokens with ``r_t > mean(r)`` (all text tokens after
  the image when none is above the mean).
* **Progressive schedule.** At each stage layer ``L_s`` (``layers``) the image tokens are scored
  by the head-averaged attention they receive in block ``L_s - 1`` from the raters (a probe: the
  rater rows against all keys) and the top ``keep[s]`` stay for blocks ``>= L_s`` and their KV
  cache (original order and position ids). The released code prunes *after* layers 2, 6, 15
  of LLaVA with budgets (300, 200, 110) for 192 average tokens: ``layers=(3, 7, 16)`` here.
* **Adaptive count** (``adaptive=lambda``, optional): the paper's rank-based level; of the
  ``n`` valid image tokens, ``floor(lambda * (n - rank(P)))`` are deleted, ``P`` the raters x
  image-tokens attention matrix, bounded by the static ``keep[s]`` capacity (validity mask).
* **Token recycling** (``recycle``): of the pruned tokens, the ``int(recycle * pruned) + 1``
  best-scored are clustered by density-peak clustering with ``k``-nearest-neighbour density
  (DPC-kNN, Euclidean, ``clusters = int(candidates * cluster_ratio) + 1`` centres, ``k`` =
  the number of centres) on the block output and averaged per cluster (``core.merge_tokens``);
  each recycled token takes the slot (and position id) of its cluster centre, so a stage keeps
  ``keep[s] + clusters`` image slots.

Not implemented: the random tie-breaking noise of the released clustering (ties break towards
the lower index), and SparseVLM's video / Qwen2-VL specific paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm import registry
from efficient_mllm.compress import core
from efficient_mllm.compress.in_llm import (
    DropCompressor,
    DropStage,
    check_layer,
    current_types,
    image_rows,
    probe_layer,
    query_rows,
    select_top,
)
from efficient_mllm.ops import masks as masks_lib

__all__ = ["SparseVLM", "dpc_knn_merge", "rater_mask", "recycle_sizes", "sparsevlm"]


def rater_mask(embeds, types, num_image_tokens: int, query_end=None) -> jax.Array:
    """SparseVLM's text raters on the input embeddings ``[B, L, D]``: bool ``[B, L]``.

    Candidates are the text tokens after the row's first image token (before ``query_end``).
    ``r_t = mean over image tokens v of softmax over candidates t of <x_v, x_t>``; raters are
    the candidates with ``r_t > mean(r)``, or all candidates when none is. Only the
    ``[N, L - N]`` image x candidate products are formed (``N = num_image_tokens``, static).
    """
    b, length = types.shape
    n = min(int(num_image_tokens), length)
    ar = jnp.arange(length)[None, :]
    is_img = types == masks_lib.IMAGE
    first = jnp.argmax(is_img, axis=1)[:, None]
    cand = (types == masks_lib.TEXT) & (ar > first) & jnp.any(is_img, axis=1, keepdims=True)
    if query_end is not None:
        cand = cand & (ar < query_end[:, None])
    img, img_ok = image_rows(types, n)
    order = jnp.broadcast_to(ar.astype(jnp.float32), (b, length))
    txt, txt_ok = core.topk_select(order, max(1, length - n), valid=cand)
    x = embeds.astype(jnp.float32)
    xv = core.gather_tokens(x, img)
    xt = core.gather_tokens(x, txt)
    logits = jnp.einsum("bvd,btd->bvt", xv, xt)
    logits = jnp.where(txt_ok[:, None, :], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.where(txt_ok[:, None, :] & img_ok[:, :, None], p, 0.0)
    r = p.sum(axis=1) / jnp.maximum(img_ok.sum(axis=1), 1)[:, None]  # [B, Q]
    mean = jnp.sum(jnp.where(txt_ok, r, 0.0), axis=1) / jnp.maximum(txt_ok.sum(axis=1), 1)
    above = txt_ok & (r > mean[:, None])
    above = jnp.where(jnp.any(above, axis=1, keepdims=True), above, txt_ok)
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, length), bool).at[rows, txt].max(above)


def recycle_sizes(pruned: int, recycle: float, cluster_ratio: float) -> tuple[int, int]:
    """Static ``(candidates, clusters)`` for ``pruned`` pruned tokens (``(0, 0)`` without
    recycling): ``int(recycle * pruned) + 1`` and ``int(candidates * cluster_ratio) + 1``."""
    if not recycle or pruned <= 0:
        return 0, 0
    r = min(int(pruned * recycle) + 1, pruned)
    return r, min(int(r * cluster_ratio) + 1, r)


def dpc_knn_merge(x: jax.Array, valid: jax.Array, clusters: int):
    """Density-peak clustering (kNN density) of ``x [B, R, D]`` into ``clusters`` groups.

    ``d_ij = ||x_i - x_j|| / sqrt(D)``; density ``rho_i = exp(-mean_{k nearest j} d_ij^2)``
    (``k = clusters``, self included); ``delta_i`` = distance to the nearest denser token (the
    row's largest distance for the densest); centres = top ``clusters`` of ``rho * delta``; every
    token joins its nearest centre; clusters are averaged (``core.merge_tokens``).

    Returns ``(centres int32 [B, C] (indices into R, ascending, valid first), centre_valid
    [B, C], assign int32 [B, R] (-1 for invalid tokens), merged [B, C, D])``.
    """
    b, r, d = x.shape
    c = int(clusters)
    xf = x.astype(jnp.float32)
    sq = jnp.sum(xf * xf, axis=-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * jnp.einsum("bid,bjd->bij", xf, xf)
    dist = jnp.sqrt(jnp.maximum(d2, 0.0)) / np.sqrt(d)
    dist = jnp.where(jnp.eye(r, dtype=bool)[None], 0.0, dist)
    pair = valid[:, :, None] & valid[:, None, :]
    k = min(c, r)
    knn = -jax.lax.top_k(-jnp.where(pair, dist, jnp.inf), k)[0]  # [B, R, k] smallest
    finite = jnp.isfinite(knn)
    mean_sq = jnp.sum(jnp.where(finite, knn**2, 0.0), -1) / jnp.maximum(finite.sum(-1), 1)
    density = jnp.where(valid, jnp.exp(-mean_sq), -1.0)
    dmax = jnp.max(jnp.where(pair, dist, 0.0), axis=(1, 2))
    denser = pair & (density[:, None, :] > density[:, :, None])
    delta = jnp.min(jnp.where(denser, dist, dmax[:, None, None]), axis=-1)
    score = delta * density
    centres, centre_ok = core.topk_select(score, c, valid=valid)
    cd = jnp.take_along_axis(dist, jnp.broadcast_to(centres[:, None, :], (b, r, c)), axis=2)
    cd = jnp.where(centre_ok[:, None, :], cd, jnp.inf)
    assign = jnp.argmin(cd, axis=-1).astype(jnp.int32)
    rows = jnp.arange(b)[:, None]
    own = (
        jnp.full((b, r), -1, jnp.int32)
        .at[rows, centres]
        .set(jnp.where(centre_ok, jnp.arange(c, dtype=jnp.int32)[None, :], -1))
    )
    assign = jnp.where(own >= 0, own, assign)
    assign = jnp.where(valid, assign, -1)
    merged, _ = core.merge_tokens(x, assign, c)
    return centres, centre_ok, assign, merged


@dataclasses.dataclass(frozen=True)
class SparseVLM(DropCompressor):
    """See the module docstring. Stats per stage ``s``: ``state.extra["keep_idx/<s>"]`` and
    ``["keep_valid/<s>"]`` (kept then recycled slots) and ``["visual_tokens"]``."""

    layers: tuple[int, ...] = (3, 7, 16)
    keep: tuple[Any, ...] = (300, 200, 110)
    recycle: float = 0.3
    cluster_ratio: float = 0.1
    adaptive: float | None = None

    def stages(self, num_image_tokens: int, depth: int) -> tuple[DropStage, ...]:
        out, n, prev = [], num_image_tokens, 0
        for s, (layer, keep) in enumerate(zip(self.layers, self.keep, strict=True)):
            layer = check_layer(layer, f"layers[{s}]", depth)
            if layer <= prev:
                raise ValueError(f"layers={self.layers}: expected strictly increasing layers")
            k = core.resolve_budget(keep, n, name=f"keep[{s}]")
            _, c = recycle_sizes(n - k, self.recycle, self.cluster_ratio)
            out.append(DropStage(layer, k, c))
            n, prev = k + c, layer
        return tuple(out)

    def prepare(self, ctx, hidden, state):
        raters = rater_mask(hidden, ctx.token_types, ctx.num_image_tokens, ctx.query_end)
        return {"raters": raters}

    def plan(self, ctx, s, stage, n_image, hidden, state) -> dict:
        types = current_types(ctx, state)
        img, img_ok = image_rows(types, n_image)
        raters = self.prep(state)["raters"]
        idx = jnp.clip(state.token_index, 0, raters.shape[1] - 1)
        cur_raters = jnp.take_along_axis(raters, idx, axis=1)
        q, q_ok = query_rows(ctx, state, types, "text", n_image, extra_valid=cur_raters)
        probe = probe_layer(ctx, stage.layer - 1, hidden, state, q, q_ok, img)
        scores = probe.mean
        count = None
        if self.adaptive is not None:
            p = jnp.where(q_ok[:, :, None] & img_ok[:, None, :], probe.weights, 0.0)
            rank = jnp.linalg.matrix_rank(p).astype(jnp.int32)
            n = jnp.sum(img_ok, axis=1).astype(jnp.int32)
            deleted = jnp.floor(self.adaptive * (n - rank).astype(jnp.float32)).astype(jnp.int32)
            count = jnp.clip(n - deleted, 1, stage.keep)
        rows, ok, _ = select_top(scores, stage.keep, img_ok, img, count=count)
        plan = {"keep_rows": rows, "keep_valid": ok}
        if stage.extra:
            r, _ = recycle_sizes(n_image - stage.keep, self.recycle, self.cluster_ratio)
            kept = (
                jnp.zeros(types.shape, bool).at[jnp.arange(types.shape[0])[:, None], rows].max(ok)
            )
            pruned = img_ok & ~jnp.take_along_axis(kept, img, axis=1)
            cand, cand_ok, _ = select_top(scores, r, pruned, img)
            plan.update(cand_rows=cand, cand_valid=cand_ok)
        return plan

    def finalize(self, ctx, s, stage, plan, hidden, state):
        rows, ok = plan["keep_rows"], plan["keep_valid"]
        if not stage.extra:
            return rows, ok, hidden
        cand, cand_ok = plan["cand_rows"], plan["cand_valid"]
        x = jnp.take_along_axis(hidden, cand[:, :, None], axis=1)
        centres, centre_ok, _, merged = dpc_knn_merge(x, cand_ok, stage.extra)
        centre_rows = jnp.take_along_axis(cand, centres, axis=1)
        b = hidden.shape[0]
        current = jnp.take_along_axis(hidden, centre_rows[:, :, None], axis=1)
        new = jnp.where(centre_ok[:, :, None], merged.astype(hidden.dtype), current)
        hidden = hidden.at[jnp.arange(b)[:, None], centre_rows].set(new)
        rows = jnp.concatenate([rows, centre_rows], axis=1)
        ok = jnp.concatenate([ok, centre_ok], axis=1)
        rows, ok = core.sort_slots(rows, ok)
        return rows, ok, hidden


@registry.COMPRESSORS.register(
    "sparsevlm",
    paper=(
        "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference "
        "(Zhang et al., ICML 2025, arXiv:2410.04417)"
    ),
)
def sparsevlm(
    layers: tuple[int, ...] = (3, 7, 16),
    keep: tuple[Any, ...] = (300, 200, 110),
    recycle: float = 0.3,
    cluster_ratio: float = 0.1,
    adaptive: float | None = None,
    num_tokens: int | None = None,
    num_layers: int | None = None,
) -> SparseVLM:
    """SparseVLM (in-LLM): rater-scored progressive pruning at ``layers`` keeping ``keep[s]``
    image tokens (int or fraction of the current count), plus recycled tokens."""
    if isinstance(layers, (int, np.integer)):
        layers = (layers,)
    if isinstance(keep, (int, float, np.integer, np.floating)):
        keep = (keep,)
    if not isinstance(layers, (list, tuple)) or not isinstance(keep, (list, tuple)):
        raise ValueError(f"layers={layers!r}, keep={keep!r}: expected tuples of equal length")
    layers, keep = tuple(layers), tuple(keep)
    if not layers or len(layers) != len(keep):
        raise ValueError(
            f"layers={layers!r} and keep={keep!r}: expected non-empty tuples of equal length"
        )
    prev = 0
    for s, (layer, k) in enumerate(zip(layers, keep, strict=True)):
        layer = check_layer(layer, f"layers[{s}]", num_layers)
        if layer <= prev:
            raise ValueError(f"layers={layers}: expected strictly increasing layers")
        prev = layer
        core.check_budget(k, f"keep[{s}]")
    for name, v in (("recycle", recycle), ("cluster_ratio", cluster_ratio)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v!r}: expected a float in [0, 1]")
    if adaptive is not None and (
        isinstance(adaptive, bool) or not isinstance(adaptive, (int, float)) or adaptive < 0
    ):
        raise ValueError(f"adaptive={adaptive!r}: expected None or a float >= 0 (lambda)")
    out = SparseVLM(
        layers=tuple(int(x) for x in layers),
        keep=keep,
        recycle=float(recycle),
        cluster_ratio=float(cluster_ratio),
        adaptive=None if adaptive is None else float(adaptive),
    )
    if num_tokens is not None and num_layers is not None:
        out.stages(num_tokens, num_layers)  # budgets against the image-token counts
    return out
