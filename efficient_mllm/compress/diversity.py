"""Diversity-based pruning before the LLM: DivPrune and ToDRE's diversity stage.

Both keep a subset of tokens that covers the image's feature space rather than the most
"important" ones, by greedy max-min selection in cosine distance ``d = 1 - cos``
(``core.kcenter_select``: one distance row per step in a ``lax.fori_loop``, ``O(k N D)``).
Kept tokens stay in their original order with their original position ids.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm import registry
from efficient_mllm.compress import core

__all__ = ["DivPrune", "ToDRE", "text_relevance"]

METRICS = ("tokens", "features")


def _metric(method: str, metric: str, tokens: jax.Array, features: jax.Array | None):
    if metric == "tokens":
        return tokens
    core.require(features, "features", f"{method}(metric='features')", "or use metric='tokens'")
    if features.shape[:2] != tokens.shape[:2]:
        raise ValueError(
            f"features shape={tuple(features.shape)}: expected [{tokens.shape[0]}, "
            f"{tokens.shape[1]}, Dv]"
        )
    return features


@dataclasses.dataclass(frozen=True)
class DivPrune:
    keep: int | float
    metric: str = "tokens"

    def __call__(self, tokens: jax.Array, *, features: jax.Array | None = None):
        b, n, _ = core.check_tokens(tokens)
        k = core.resolve_budget(self.keep, n, name="keep")
        x = _metric("divprune", self.metric, tokens, features)
        # First token: the one whose nearest neighbour is farthest (max over j of
        # min_{i != j} d(i, j)). This one step needs the N x N similarity (one matmul).
        sim = core.cosine_similarity(x, x)
        sim = jnp.where(jnp.eye(n, dtype=bool)[None], -jnp.inf, sim)
        first = jnp.argmax(1.0 - jnp.max(sim, axis=2), axis=1).astype(jnp.int32)
        idx, _ = core.kcenter_select(x, k, first=first)
        return core.compressed(core.gather_tokens(tokens, idx), idx)


@registry.COMPRESSORS.register(
    "divprune",
    paper="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models "
    "(Alvar et al., CVPR 2025)",
)
def divprune(keep: int | float, metric: str = "tokens") -> DivPrune:
    """DivPrune: keep ``keep`` tokens (int, or fraction of N) solving the max-min diversity
    problem greedily in cosine distance: start from the token whose nearest neighbour is
    farthest, then repeatedly add the token farthest from the kept set (max of the min
    distance). Training-free, before the LLM, kept in original order.

    ``metric="tokens"`` (default) measures distances between the projected visual tokens (the
    LLM-input embeddings the paper prunes); ``"features"`` uses the pre-projector ViT features.
    Implemented: the paper's greedy MMDP solver. Not implemented: its video variant.
    """
    core.check_budget(keep, "keep")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
    return DivPrune(keep, metric)


def text_relevance(
    tokens: jax.Array,
    text_embeds: jax.Array,
    text_lengths: jax.Array | None = None,
    placeholder: jax.Array | None = None,
) -> jax.Array:
    """float32 ``[B, N]``: cosine similarity of each visual token to the mean embedding of its
    row's valid text tokens (``t < text_lengths``, the image placeholder excluded). A row
    without text gets 0."""
    b, t, _ = text_embeds.shape
    pos = jnp.arange(t)[None, :]
    mask = jnp.ones((b, t), bool)
    if text_lengths is not None:
        mask &= pos < jnp.asarray(text_lengths)[:, None]
    if placeholder is not None:
        mask &= pos != jnp.asarray(placeholder)[:, None]
    w = mask.astype(jnp.float32)
    mean = jnp.einsum("bt,btd->bd", w, text_embeds.astype(jnp.float32))
    mean = mean / jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)
    return core.cosine_similarity(tokens, mean[:, None])[:, :, 0]


@dataclasses.dataclass(frozen=True)
class ToDRE:
    keep: int | float
    relevance_weight: float = 0.5
    metric: str = "tokens"

    def __call__(
        self,
        tokens: jax.Array,
        *,
        features: jax.Array | None = None,
        text_embeds: jax.Array | None = None,
        text_lengths: jax.Array | None = None,
        placeholder: jax.Array | None = None,
    ) -> core.Compressed:
        b, n, d = core.check_tokens(tokens)
        k = core.resolve_budget(self.keep, n, name="keep")
        x = _metric("todre", self.metric, tokens, features)
        w = float(self.relevance_weight)
        bonus = jnp.zeros((b, n), jnp.float32)
        if w > 0:
            core.require(
                text_embeds,
                "text_embeds",
                "todre(relevance_weight > 0)",
                "pass the prompt's text embeddings or set relevance_weight=0",
            )
            if text_embeds.ndim != 3 or text_embeds.shape[0] != b or text_embeds.shape[2] != d:
                raise ValueError(
                    f"text_embeds shape={tuple(text_embeds.shape)}: expected [{b}, T, {d}]"
                )
            bonus = w * text_relevance(tokens, text_embeds, text_lengths, placeholder)
        # First centre: the token farthest from the centroid, plus its relevance bonus.
        centroid = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True)
        far = 1.0 - core.cosine_similarity(x, centroid)[:, :, 0]
        first = jnp.argmax(far + bonus, axis=1).astype(jnp.int32)
        idx, _ = core.kcenter_select(x, k, first=first, bonus=bonus)
        return core.compressed(core.gather_tokens(tokens, idx), idx)


@registry.COMPRESSORS.register(
    "todre",
    paper="ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
    "Vision-Language Models (arXiv 2025)",
)
def todre(keep: int | float, relevance_weight: float = 0.5, metric: str = "tokens") -> ToDRE:
    """ToDRE's pre-LLM stage: greedy k-center selection of ``keep`` diverse tokens with a
    task-relevance bonus. Step rule: add the unselected token maximising
    ``min_{s in S} (1 - cos(x_j, x_s)) + relevance_weight * cos(v_j, t_bar)``, where ``t_bar`` is
    the mean embedding of the row's prompt text (``text_embeds``, ``text_lengths``, image
    placeholder excluded) and ``v_j`` the projected visual token; the first centre maximises
    the distance to the token centroid plus the same bonus. ``relevance_weight=0`` is plain
    greedy k-center (Gonzalez) diversity.

    Implemented: greedy k-center diversity after the encoder, and (our pre-LLM stand-in for
    task awareness) the text-relevance bonus. Not implemented: ToDRE's in-LLM stage, which
    drops task-irrelevant visual tokens inside the decoder and all visual tokens after a
    chosen layer ("information migration"); that belongs to an in-LLM layer hook.
    """
    core.check_budget(keep, "keep")
    if (
        isinstance(relevance_weight, bool)
        or not isinstance(relevance_weight, (int, float, np.integer, np.floating))
        or not relevance_weight >= 0
    ):
        raise ValueError(f"relevance_weight={relevance_weight!r}: expected a number >= 0")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
    return ToDRE(keep, float(relevance_weight), metric)
