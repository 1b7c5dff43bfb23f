"""[CLS]-attention pruning before the LLM: FasterVLM and VTC-CLS.

Both score each patch by the attention the vision encoder's [CLS] query pays to it (a ``1 x N``
probe row per head, head-averaged, from ``Attention.attention_row``: no ``N x N`` map is
materialised), keep the top ``K`` (``core.topk_select``) in their original order and drop the
rest, so pruned tokens never reach the LLM. Kept tokens keep their original position ids.

Encoders without a [CLS] token (``VisionConfig.use_cls=False``, SigLIP-like): the ViT then
returns the attention row of the *mean patch query* instead; a method only accepts it when
built with ``fallback="mean_query"``, otherwise it raises a ``ValueError`` naming the missing
[CLS] token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm import registry
from efficient_mllm.compress import core

__all__ = ["NOT_GIVEN", "CLSAttentionPrune", "LayerEnsemblePrune", "cls_scores"]


class _NotGiven:
    def __repr__(self) -> str:
        return "NOT_GIVEN"


# Default of the ``cls`` keyword: the caller (not MLLM, which always passes it) did not say
# whether the encoder has a [CLS] token, so ``cls_attention`` is trusted as given.
NOT_GIVEN: Any = _NotGiven()
FALLBACKS = (None, "mean_query")


def check_fallback(fallback: Any) -> Any:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r}: expected one of {FALLBACKS}")
    return fallback


def cls_scores(method: str, scores: Any, cls: Any, fallback: Any, name: str = "cls_attention"):
    """Checks the [CLS] signal: ``scores`` must be given, and ``cls=None`` (an encoder without
    [CLS], whose probe row is the mean-query row) needs ``fallback="mean_query"``."""
    core.require(
        scores, name, method, "build the MLLM with a vision encoder or pass the attention row"
    )
    if cls is None and fallback != "mean_query":
        raise ValueError(
            f"{method} needs the vision encoder's [CLS] token, but got cls=None (the ViT has "
            "use_cls=False); pass fallback='mean_query' to score patches by the mean-query "
            "attention row instead"
        )
    return jnp.asarray(scores, jnp.float32)


def _check_scores(scores: jax.Array, tokens_shape, name: str, extra: tuple = ()) -> None:
    b, n = tokens_shape[:2]
    want = (b, *extra, n)
    if tuple(scores.shape) != want:
        raise ValueError(f"{name} shape={tuple(scores.shape)}: expected {list(want)}")


@dataclasses.dataclass(frozen=True)
class CLSAttentionPrune:
    """Top-``keep`` tokens by ``cls_attention [B, N]`` (FasterVLM)."""

    keep: int | float
    fallback: str | None = None

    def __call__(
        self, tokens: jax.Array, *, cls_attention: jax.Array | None = None, cls: Any = NOT_GIVEN
    ) -> core.Compressed:
        core.check_tokens(tokens)
        scores = cls_scores("fastervlm", cls_attention, cls, self.fallback)
        _check_scores(scores, tokens.shape, "cls_attention")
        k = core.resolve_budget(self.keep, tokens.shape[1], name="keep")
        idx, _ = core.topk_select(scores, k)
        return core.compressed(core.gather_tokens(tokens, idx), idx)


@registry.COMPRESSORS.register(
    "fastervlm",
    paper="[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM "
    "Inference Faster (Zhang et al., arXiv 2024)",
)
def fastervlm(keep: int | float, fallback: str | None = None) -> CLSAttentionPrune:
    """FasterVLM: keep the ``keep`` patches (int, or fraction of N) with the largest [CLS]
    attention, before the LLM, in original order.

    Implemented: the head-averaged [CLS] -> patch softmax row of the ViT block whose output feeds
    the projector (our ViT feeds its last block, so the last block's probe; LLaVA's CLIP feeds
    the penultimate layer and FasterVLM reads that one), top-k, gather, original positions.
    With pixel shuffle the scores are summed over each shuffled cell. Not implemented: the
    paper's LLaVA-NeXT multi-crop budget split (one image per row here).
    ``fallback="mean_query"`` accepts encoders without [CLS] (mean-query attention row).
    """
    core.check_budget(keep, "keep")
    return CLSAttentionPrune(keep, check_fallback(fallback))


@dataclasses.dataclass(frozen=True)
class LayerEnsemblePrune:
    """Top-``keep`` tokens by [CLS] attention aggregated over several ViT layers (VTC-CLS).

    ``cls_attention_layers`` tells the MLLM which ViT blocks to probe; it then passes their
    rows as ``layer_cls_attention [B, L, N]`` in that order."""

    keep: int | float
    layers: tuple[int, ...]
    agg: str = "mean"
    fallback: str | None = None

    @property
    def cls_attention_layers(self) -> tuple[int, ...]:
        return self.layers

    def __call__(
        self,
        tokens: jax.Array,
        *,
        layer_cls_attention: jax.Array | None = None,
        cls: Any = NOT_GIVEN,
    ) -> core.Compressed:
        core.check_tokens(tokens)
        rows = cls_scores("vtc_cls", layer_cls_attention, cls, self.fallback, "layer_cls_attention")
        _check_scores(rows, tokens.shape, "layer_cls_attention", (len(self.layers),))
        scores = rows.mean(axis=1) if self.agg == "mean" else rows.max(axis=1)
        k = core.resolve_budget(self.keep, tokens.shape[1], name="keep")
        idx, _ = core.topk_select(scores, k)
        return core.compressed(core.gather_tokens(tokens, idx), idx)


AGGREGATIONS = ("mean", "max")


@registry.COMPRESSORS.register(
    "vtc_cls",
    paper="[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs "
    "(Wang et al., arXiv 2024)",
)
def vtc_cls(
    keep: int | float,
    layers: tuple[int, ...] | list[int] = (-1, -2, -3),
    agg: str = "mean",
    fallback: str | None = None,
) -> LayerEnsemblePrune:
    """VTC-CLS: the [CLS] -> patch attention of several ViT blocks (``layers``: block indices,
    negative from the end; each row is that block's head-averaged probe on its input),
    aggregated per patch by ``agg`` (``"mean"`` of the probabilities, or ``"max"``), then top-k
    before the LLM in original order.

    Implemented: the multi-layer [CLS]-score ensemble and pre-LLM pruning. Not implemented: any
    in-LLM stage or the paper's exact per-layer weighting (plain mean/max of the raw
    probabilities here). ``layers`` must exist in the ViT (the ViT raises otherwise).
    """
    core.check_budget(keep, "keep")
    if isinstance(layers, (int, np.integer)):
        layers = (layers,)
    if (
        not isinstance(layers, (tuple, list))
        or not layers
        or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in layers)
        or len(set(layers)) != len(layers)
    ):
        raise ValueError(f"layers={layers!r}: expected a non-empty tuple of distinct ints")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg={agg!r}: expected one of {AGGREGATIONS}")
    return LayerEnsemblePrune(keep, tuple(int(i) for i in layers), agg, check_fallback(fallback))
