"""FastV: prune image tokens inside the LLM by the attention they receive.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models", ECCV 2024 (arXiv:2403.06764).

Implemented: after layer ``K`` (``layer=K``: blocks ``0 .. K-1`` see every token), image tokens
are ranked by the head-averaged attention they receive in block ``K - 1`` from the last prompt
token (``query="last"``, the paper's rule) or on average from the text tokens after the image
(``query="text"``) or from the ``n`` most recent prompt tokens (``query=n``); the top ``keep``
(an int, or a fraction of the ``N`` image tokens; the paper's ``R`` is ``1 - keep / N``) stay,
in their original order and with their original position ids, and every later block (and its
KV cache) sees only them. Scores come from a probe (the query rows against all keys of that
block), never from an attention map, so the decoder keeps its fused attention.

Not implemented: FastV's "inplace" variant that re-selects at every decoding step (here the
selection is made once, at prefill, and the cache keeps it; a forward pass given
``prompt_lengths`` reproduces exactly that), and its attention-mask (non-dropping) variant.
"""

from __future__ import annotations

import dataclasses

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

__all__ = ["FastV", "fastv"]


@dataclasses.dataclass(frozen=True)
class FastV(DropCompressor):
    """See the module docstring. ``stats``: ``state.extra["keep_idx/0"]`` / ``["keep_valid/0"]``
    and ``["visual_tokens"]``."""

    layer: int = 2
    keep: int | float = 0.5
    query: str | int = "last"

    def stages(self, num_image_tokens: int, depth: int) -> tuple[DropStage, ...]:
        check_layer(self.layer, "layer", depth)
        k = core.resolve_budget(self.keep, num_image_tokens, name="keep")
        return (DropStage(self.layer, k),)

    def plan(self, ctx, s, stage, n_image, hidden, state) -> dict:
        scores, img, img_ok = image_attention_scores(ctx, stage, n_image, hidden, state, self.query)
        rows, ok, _ = select_top(scores, stage.keep, img_ok, img)
        return {"keep_rows": rows, "keep_valid": ok}


@registry.COMPRESSORS.register(
    "fastv",
    paper=(
        "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for "
        "Large Vision-Language Models (Chen et al., ECCV 2024, arXiv:2403.06764)"
    ),
)
def fastv(
    layer: int = 2,
    keep: int | float = 0.5,
    query: str | int = "last",
    num_tokens: int | None = None,
    num_layers: int | None = None,
) -> FastV:
    """FastV (in-LLM): keep the ``keep`` image tokens most attended in block ``layer - 1``.

    ``layer``: first block that sees the kept tokens only (``1 <= layer < num_layers``);
    ``keep``: int or fraction of the image tokens; ``query``: ``"last"`` | ``"text"`` | int.
    """
    check_layer(layer, "layer", num_layers)
    core.check_budget(keep, "keep")
    if num_tokens is not None:
        core.resolve_budget(keep, num_tokens, name="keep")
    return FastV(layer=int(layer), keep=keep, query=check_query(query))
