"""ZipVL: adaptive-ratio image-token sparsification by attention mass.

He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and
KV Cache Compression", arXiv:2410.08584, 2024.

Implemented (as an in-LLM drop stage): at ``layer`` the image tokens are scored by the
head-averaged attention they receive in block ``layer - 1`` from the probe queries (``query``:
the text tokens after the image by default, or ``"last"``, or the ``n`` most recent prompt
tokens; ZipVL probes with recent queries), normalised over the valid probe queries. The number
kept is adaptive: the smallest ``p`` such that the ``p`` highest-scoring image tokens hold at
least ``tau`` of the image tokens' total attention mass, bounded by the static ``capacity`` (an
int, or a fraction of the ``N`` image tokens) and at least 1. The output has ``capacity``
static slots with a validity mask; later blocks (and their KV cache, whose lengths advance by
``p`` image tokens) see only the kept ones. This is the token-eviction form of ZipVL's
important-token selection (its v2 evicts the unimportant KV).

Not implemented here: ZipVL's per-layer sparse prefill attention over the important tokens (an
attention-variant concern) and its mixed-precision KV quantisation (high bits for important
tokens, low bits for the rest), which belongs to the KV-cache issue (``kvcache`` presses);
the mass is computed over the image tokens only, not over all keys.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from efficient_mllm import registry
from efficient_mllm.compress import core
from efficient_mllm.compress.in_llm import (
    image_attention_scores,
    DropCompressor,
    DropStage,
    check_layer,
    check_query,
    select_top,
)

__all__ = ["ZipVL", "mass_count", "zipvl"]


def mass_count(scores, valid, tau: float, capacity: int):
    """Smallest ``p`` with ``sum(top-p scores) >= tau * sum(scores)`` over the valid entries of
    ``scores [B, N]``, clipped to ``[1, capacity]``: int32 ``[B]``."""
    s = jnp.where(valid, scores.astype(jnp.float32), 0.0)
    desc = -jnp.sort(-s, axis=1)
    before = jnp.cumsum(desc, axis=1) - desc  # mass of the better-ranked entries
    total = jnp.sum(s, axis=1, keepdims=True)
    p = jnp.sum(before < tau * total, axis=1)  # entries needed to reach the mass
    return jnp.clip(p, 1, capacity).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ZipVL(DropCompressor):
    """See the module docstring. Stats: ``state.extra["keep_idx/0"]``, ``["keep_valid/0"]``
    (``p`` valid slots per row) and ``["visual_tokens"]``."""

    layer: int = 2
    tau: float = 0.975
    capacity: int | float = 1.0
    query: str | int = "text"

    def stages(self, num_image_tokens: int, depth: int) -> tuple[DropStage, ...]:
        check_layer(self.layer, "layer", depth)
        k = core.resolve_budget(self.capacity, num_image_tokens, name="capacity")
        return (DropStage(self.layer, k),)

    def plan(self, ctx, s, stage, n_image, hidden, state) -> dict:
        scores, img, img_ok = image_attention_scores(ctx, stage, n_image, hidden, state, self.query)
        count = mass_count(scores, img_ok, self.tau, stage.keep)
        rows, ok, _ = select_top(scores, stage.keep, img_ok, img, count=count)
        return {"keep_rows": rows, "keep_valid": ok}


@registry.COMPRESSORS.register(
    "zipvl",
    paper=(
        "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and KV "
        "Cache Compression (He et al., arXiv:2410.08584, 2024)"
    ),
)
def zipvl(
    layer: int = 2,
    tau: float = 0.975,
    capacity: int | float = 1.0,
    query: str | int = "text",
    num_tokens: int | None = None,
    num_layers: int | None = None,
) -> ZipVL:
    """ZipVL (in-LLM): keep the fewest image tokens holding ``tau`` of the attention mass
    (at most ``capacity``), scored in block ``layer - 1``."""
    check_layer(layer, "layer", num_layers)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau <= 1.0:
        raise ValueError(f"tau={tau!r}: expected a float in (0, 1]")
    core.check_budget(capacity, "capacity")
    if num_tokens is not None:
        core.resolve_budget(capacity, num_tokens, name="capacity")
    return ZipVL(layer=int(layer), tau=float(tau), capacity=capacity, query=check_query(query))
