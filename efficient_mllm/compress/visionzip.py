"""VisionZip (Yang et al., CVPR 2025): dominant tokens by [CLS] attention + contextual tokens
merged from the rest.

1. **Dominant**: the ``dominant`` patches with the largest [CLS] attention
   (``core.topk_select``).
2. **Contextual**: the ``R = N - dominant`` remaining patches, in raster order, are split into
   ``contextual`` *targets* (every ``step = max(1, R // contextual)``-th remaining patch,
   starting with the first, the first ``contextual`` of those) and the rest, which are merged
   into their most cosine-similar target (``core.nearest_assign``); each contextual token is
   the mean of its target and the patches merged into it (``core.merge_tokens``).

Output ``K = dominant + contextual`` tokens sorted by ``keep_idx`` (a contextual token stands at
its target's index and takes its position ids).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm import registry
from efficient_mllm.compress import core
from efficient_mllm.compress.cls_attention import NOT_GIVEN, check_fallback, cls_scores

__all__ = ["VisionZip"]

METRICS = ("features", "tokens")


@dataclasses.dataclass(frozen=True)
class VisionZip:
    dominant: int | float
    contextual: int
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
        b, n, _ = core.check_tokens(tokens)
        scores = cls_scores("visionzip", cls_attention, cls, self.fallback)
        if tuple(scores.shape) != (b, n):
            raise ValueError(f"cls_attention shape={tuple(scores.shape)}: expected [{b}, {n}]")
        d = core.resolve_budget(self.dominant, n, name="dominant")
        c = self.contextual
        rest = n - d
        if c > rest:
            raise ValueError(
                f"contextual={c}: at most N - dominant = {n} - {d} = {rest} tokens remain"
            )
        dom_idx, _ = core.topk_select(scores, d)
        out_tokens = core.gather_tokens(tokens, dom_idx)
        keep_idx = dom_idx
        merged_count = jnp.zeros((b,), jnp.int32)
        if c > 0:
            if self.metric == "features":
                keys = core.require(
                    features,
                    "features",
                    "visionzip(metric='features')",
                    "pass the pre-projector features or use metric='tokens'",
                )
                if features.shape[:2] != (b, n):
                    raise ValueError(
                        f"features shape={tuple(features.shape)}: expected [{b}, {n}, Dv]"
                    )
            else:
                keys = tokens
            rows = jnp.arange(b)[:, None]
            is_dom = jnp.zeros((b, n), bool).at[rows, dom_idx].set(True)
            # The remaining patches in raster order: the top-R of -index among non-dominant.
            order = jnp.broadcast_to(-jnp.arange(n, dtype=jnp.float32)[None], (b, n))
            rem_idx, _ = core.topk_select(order, rest, valid=~is_dom)
            step = max(1, rest // c)
            tgt_idx = rem_idx[:, np.arange(0, rest, step)[:c]]
            assign = core.nearest_assign(keys, tgt_idx)
            assign = jnp.where(is_dom, -1, assign)  # dominant tokens are not merged
            ctx, weight = core.merge_tokens(tokens, assign, c)
            out_tokens = jnp.concatenate([out_tokens, ctx], axis=1)
            keep_idx = jnp.concatenate([dom_idx, tgt_idx], axis=1)
            merged_count = (jnp.sum(weight, axis=1) - c).astype(jnp.int32)
            keep_idx, _, out_tokens = core.sort_slots(keep_idx, None, out_tokens)
        return core.compressed(out_tokens, keep_idx, num_merged=merged_count)


@registry.COMPRESSORS.register(
    "visionzip",
    paper="VisionZip: Longer is Better but Not Necessary in Vision Language Models "
    "(Yang et al., CVPR 2025)",
)
def visionzip(
    dominant: int | float,
    contextual: int = 0,
    metric: str = "features",
    fallback: str | None = None,
) -> VisionZip:
    """VisionZip, training-free mode: ``dominant`` tokens (int, or fraction of N) by [CLS]
    attention plus ``contextual`` merged tokens (see the module docstring).

    Similarity for merging: the paper uses the ViT's attention *keys* of the scoring layer; our
    ViT does not expose keys, so ``metric="features"`` (default) uses the pre-projector ViT
    output features and ``metric="tokens"`` the projected tokens. Merged values are the
    projected tokens (the paper merges the hidden states that feed the projector; the
    projector's first layer is linear, but its GELU is not, so the two differ).

    Implemented: dominant selection, uniform target choice, nearest-target merging by mean.
    Not implemented: the fine-tuned-projector variant (VisionZip's "efficient tuning") and its
    multi-crop / video budget rules. ``fallback="mean_query"`` accepts encoders without [CLS]
    and scores by the ViT's mean-query attention row (for such encoders the paper averages the
    attention each patch receives over all queries instead).
    """
    core.check_budget(dominant, "dominant")
    if (
        isinstance(contextual, bool)
        or not isinstance(contextual, (int, np.integer))
        or contextual < 0
    ):
        raise ValueError(f"contextual={contextual!r}: expected an int >= 0")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
    return VisionZip(dominant, int(contextual), metric, check_fallback(fallback))
