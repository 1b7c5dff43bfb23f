"""The in-LLM stage: compressors that drop image tokens inside the decoder.

A compressor with ``stage = "in_llm"`` (FastV, SparseVLM, ZipVL, p-MoD) does not touch the image
tokens before the LLM. ``MLLM`` calls ``compressor.make_hooks(language, token_types=...,
query_end=..., num_image_tokens=N)`` and passes the returned ``(layer_hook, block_fn)`` to the
decoder (see ``nn.language``):

* **drop stages** (:class:`DropCompressor`): at stage layer ``L`` the blocks ``L, L+1, ...`` see
  fewer image tokens. The scores come from the attention of block ``L - 1`` (the last block that
  saw all of them, as FastV's code uses the attention map of layer ``K - 1`` to prune from layer
  ``K``): the layer hook at ``L - 1`` runs a :func:`~efficient_mllm.compress.probe.block_probe`
  on that block's input (the chosen query rows against all keys, no ``T x T`` map) and stores a
  plan in ``state.extra``; the hook at ``L`` applies it to the block's output: the kept tokens
  are gathered (valid ones first, original order, original position ids; ``state.lengths``
  counts them), the sequence shrinks to a static length, and with a KV cache the layers from
  ``L`` on write only the kept tokens' keys/values (their cache lengths advance by the kept
  count), which is where the KV saving comes from. Decoding after such a prefill needs nothing
  else: every layer reads its own cache length.
* **routing** (mixture-of-depths, ``compress.pmod``): a ``block_fn`` sends a subset of tokens
  through a block; the rest skip it.

Every hook records ``state.extra["visual_tokens"]`` int32 ``[B, depth]``: the image tokens each
block processed (its mean over layers is the "average visual tokens" FastV/SparseVLM report);
drop stages also record the kept image tokens ``extra["keep_idx/<s>"]`` (index among the ``N``
image tokens, the representative token for a merged slot) and ``extra["keep_valid/<s>"]``.

Layout invariant (the MLLM's splice guarantees it): each row holds at most ``n`` image tokens
(``n`` = the static image-token count of the current stage) and at most ``T - n`` valid other
tokens, so ``T - n + K`` rows hold every kept token after a stage that keeps ``K``.

Query rows: ``query_end [B]`` bounds the rows that may rate image tokens (the prompt; ``MLLM``
passes ``prompt_lengths``), so a forward pass over prompt + answer drops exactly what
``prefill`` of the prompt drops and cached generation matches repeated forward passes. The
probe sees the tokens of the current call (with an empty cache at prefill: the whole prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_mllm.compress import core
from efficient_mllm.compress.probe import ProbeResult, block_probe
from efficient_mllm.ops import masks as masks_lib

__all__ = [
    "image_attention_scores",
    "DropCompressor",
    "DropStage",
    "InLLMContext",
    "QUERY_MODES",
    "check_layer",
    "check_query",
    "current_types",
    "drop_rows",
    "image_rows",
    "probe_layer",
    "query_rows",
    "record_visual_tokens",
    "row_valid",
]

QUERY_MODES = ("last", "text")
_PLAN = "_in_llm_plan"
_PREP = "_in_llm_prep"


@dataclasses.dataclass(frozen=True)
class InLLMContext:
    """What the hooks know about the batch, in the decoder's input layout.

    ``language``: the ``LanguageModel`` (its ``blocks`` are probed); ``token_types`` int32
    ``[B, L]`` (``ops.masks`` TEXT / IMAGE / PAD); ``query_end`` int32 ``[B]``: rows at input
    index ``>= query_end`` never serve as queries; ``num_image_tokens``: static ``N`` per image.
    """

    language: Any
    token_types: jax.Array
    query_end: jax.Array
    num_image_tokens: int

    @property
    def depth(self) -> int:
        return len(self.language.blocks)

    @property
    def image_start(self) -> jax.Array:
        """int32 ``[B]``: input index of each row's first image token (0 without one)."""
        return jnp.argmax(self.token_types == masks_lib.IMAGE, axis=1).astype(jnp.int32)


# -- argument checks -------------------------------------------------------------------------


def check_layer(layer: Any, name: str, num_layers: int | None, *, first: int = 1) -> int:
    """A drop layer: an int in ``[first, num_layers - 1]`` (``num_layers`` may be unknown)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < first:
        raise ValueError(f"{name}={layer!r}: expected an int >= {first}")
    if num_layers is not None and layer >= num_layers:
        raise ValueError(
            f"{name}={layer}: expected < num_layers={num_layers} (a later layer must remain)"
        )
    return int(layer)


def check_query(query: Any) -> str | int:
    """``"last"``, ``"text"`` or a positive int (the most recent ``n`` prompt tokens)."""
    if isinstance(query, str):
        if query not in QUERY_MODES:
            raise ValueError(f"query={query!r}: expected one of {QUERY_MODES} or a positive int")
        return query
    if isinstance(query, bool) or not isinstance(query, (int, np.integer)) or query < 1:
        raise ValueError(f"query={query!r}: expected one of {QUERY_MODES} or a positive int")
    return int(query)


# -- layout helpers --------------------------------------------------------------------------


def row_valid(state: Any, t: int) -> jax.Array:
    """bool ``[B, T]``: current rows that hold a token (``row < state.lengths``)."""
    b = state.token_index.shape[0]
    if state.lengths is None:
        return jnp.ones((b, t), bool)
    return jnp.arange(t)[None, :] < state.lengths[:, None]


def current_types(ctx: InLLMContext, state: Any) -> jax.Array:
    """Token types of the current rows (PAD past ``state.lengths``): int32 ``[B, T]``."""
    t = state.token_index.shape[1]
    idx = jnp.clip(state.token_index, 0, ctx.token_types.shape[1] - 1)
    types = jnp.take_along_axis(ctx.token_types, idx, axis=1)
    return jnp.where(row_valid(state, t), types, masks_lib.PAD).astype(jnp.int32)


def image_rows(types: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The (up to ``n``, static) image rows of each batch row, ascending:
    ``(rows int32 [B, n], valid [B, n])``."""
    is_img = types == masks_lib.IMAGE
    n = min(int(n), types.shape[1])
    return core.topk_select(jnp.zeros(types.shape, jnp.float32), n, valid=is_img)


def query_rows(
    ctx: InLLMContext,
    state: Any,
    types: jax.Array,
    query: str | int,
    n_image: int,
    *,
    extra_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Query rows for the probe: ``(rows int32 [B, Q], valid [B, Q])``, ascending.

    Only rows with input index ``< ctx.query_end`` qualify. ``"last"``: the last one (``Q = 1``);
    ``"text"``: text rows after the row's first image token (``Q = T - n_image``, which holds
    them all by the layout invariant); an int ``n``: the ``n`` most recent ones. ``extra_valid
    [B, T]`` further restricts the candidates (e.g. SparseVLM's raters).
    """
    t = types.shape[1]
    ok = row_valid(state, t) & (state.token_index < ctx.query_end[:, None])
    if query == "text":
        first_img = jnp.argmax(types == masks_lib.IMAGE, axis=1)
        after = jnp.arange(t)[None, :] > first_img[:, None]
        ok = ok & (types == masks_lib.TEXT) & after
        q = max(1, t - int(n_image))
    else:
        q = 1 if query == "last" else int(query)
    if extra_valid is not None:
        ok = ok & extra_valid
    q = min(q, t)
    order = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32)[None, :], ok.shape)
    return core.topk_select(order, q, valid=ok)  # the q most recent qualifying rows


def probe_layer(
    ctx: InLLMContext,
    layer: int,
    hidden: jax.Array,
    state: Any,
    q_rows: jax.Array,
    q_valid: jax.Array,
    key_rows: jax.Array,
    *,
    per_head: bool = False,
) -> ProbeResult:
    """Attention of block ``layer`` from the query rows to the key rows (on its input
    ``hidden``), with the causal + padding (+ ``state.mask``) mask the block uses."""
    return block_probe(
        ctx.language.blocks[layer],
        hidden,
        positions=state.positions,
        q_index=q_rows,
        q_valid=q_valid,
        kv_valid=row_valid(state, hidden.shape[1]),
        key_index=key_rows,
        mask=state.mask,
        per_head=per_head,
    )


def drop_rows(
    hidden: jax.Array, state: Any, keep: jax.Array, new_len: int
) -> tuple[jax.Array, Any]:
    """Keeps the rows where ``keep [B, T]`` (valid tokens only) in their order, first, then
    fills up to the static ``new_len`` rows with the others (they count as padding).

    Gathers ``hidden``, ``state.positions`` and ``state.token_index``; ``state.lengths``
    becomes the number of kept rows. ``state.mask`` must be None or index absolute input
    positions only (it is kept unchanged).
    """
    b, t = keep.shape
    if not 1 <= new_len <= t:
        raise ValueError(f"new_len={new_len}: expected 1 <= new_len <= {t}")
    key = jnp.where(keep, 0, t) + jnp.arange(t, dtype=jnp.int32)[None, :]
    order = jnp.argsort(key, axis=1)[:, :new_len].astype(jnp.int32)
    hidden = jnp.take_along_axis(hidden, order[:, :, None], axis=1)
    pos = state.positions
    if pos.ndim == 3:
        pos = jnp.take_along_axis(pos, jnp.broadcast_to(order[None], (3, b, new_len)), axis=2)
    else:
        pos = jnp.take_along_axis(pos, order, axis=1)
    token_index = jnp.take_along_axis(state.token_index, order, axis=1)
    lengths = jnp.minimum(jnp.sum(keep, axis=1), new_len).astype(jnp.int32)
    return hidden, state.replace(positions=pos, token_index=token_index, lengths=lengths)


def record_visual_tokens(state: Any, layer: int, depth: int, count: jax.Array) -> Any:
    """``state.extra["visual_tokens"][:, layer] = count`` (int32 ``[B, depth]``)."""
    vt = state.extra.get("visual_tokens")
    if vt is None:
        vt = jnp.zeros((count.shape[0], depth), jnp.int32)
    vt = vt.at[:, layer].set(count.astype(jnp.int32))
    return state.replace(extra={**state.extra, "visual_tokens": vt})


# -- drop-stage compressors --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DropStage:
    """One drop: blocks ``>= layer`` see ``keep + extra`` image-token slots (``extra``: merged
    / recycled slots), scored by block ``layer - 1``."""

    layer: int
    keep: int
    extra: int = 0

    @property
    def size(self) -> int:
        return self.keep + self.extra


class DropCompressor:
    """Base of drop-stage in-LLM compressors (subclasses are frozen dataclasses).

    Subclasses implement :meth:`stages` (the static schedule for ``N`` image tokens) and
    :meth:`plan` (scores at block ``stage.layer - 1`` -> the image rows to keep); they may
    override :meth:`prepare` (layer 0, e.g. SparseVLM's raters) and :meth:`finalize` (at the
    drop, on the block output, e.g. merging pruned tokens into recycled slots).
    """

    stage = "in_llm"

    # -- to implement ----------------------------------------------------------------------

    def stages(self, num_image_tokens: int, depth: int) -> tuple[DropStage, ...]:
        raise TypeError(f"{type(self).__name__} must define stages()")

    def plan(
        self,
        ctx: InLLMContext,
        s: int,
        stage: DropStage,
        n_image: int,
        hidden: jax.Array,
        state: Any,
    ) -> dict:
        """Returns at least ``keep_rows`` int32 ``[B, stage.keep]`` (current rows of the kept
        image tokens, valid first and ascending) and ``keep_valid`` bool ``[B, stage.keep]``."""
        raise TypeError(f"{type(self).__name__} must define plan()")

    def prepare(self, ctx: InLLMContext, hidden: jax.Array, state: Any) -> dict | None:
        return None

    def finalize(
        self,
        ctx: InLLMContext,
        s: int,
        stage: DropStage,
        plan: dict,
        hidden: jax.Array,
        state: Any,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(rows [B, size], valid [B, size], hidden)`` of the image slots after the drop;
        default: the plan's kept rows, hidden unchanged."""
        return plan["keep_rows"], plan["keep_valid"], hidden

    # -- the hook --------------------------------------------------------------------------

    def make_hooks(self, language, *, token_types, query_end, num_image_tokens):
        """``(layer_hook, None)`` for ``LanguageModel`` (see the module docstring)."""
        ctx = InLLMContext(
            language=language,
            token_types=jnp.asarray(token_types, jnp.int32),
            query_end=jnp.asarray(query_end, jnp.int32),
            num_image_tokens=int(num_image_tokens),
        )
        depth = ctx.depth
        stages = self.stages(ctx.num_image_tokens, depth)
        sizes = [ctx.num_image_tokens] + [st.size for st in stages]
        by_layer = {st.layer: s for s, st in enumerate(stages)}

        def hook(i, hidden, state):
            extra = dict(state.extra)
            if i == 0:
                prep = self.prepare(ctx, hidden, state)
                if prep is not None:
                    extra[_PREP] = prep
            if i in by_layer:  # apply the plan made at layer i - 1
                s = by_layer[i]
                st = stages[s]
                plan = extra.pop(_PLAN)
                state = state.replace(extra=extra)
                types = current_types(ctx, state)
                rows, valid, hidden = self.finalize(ctx, s, st, plan, hidden, state)
                keep = (types != masks_lib.IMAGE) & (types != masks_lib.PAD)
                b = keep.shape[0]
                keep = keep.at[jnp.arange(b)[:, None], rows].max(valid)
                new_len = hidden.shape[1] - sizes[s] + st.size
                rel = (
                    jnp.take_along_axis(state.token_index, rows, axis=1) - ctx.image_start[:, None]
                )
                extra[f"keep_idx/{s}"] = jnp.where(valid, rel, 0).astype(jnp.int32)
                extra[f"keep_valid/{s}"] = valid
                if s == len(stages) - 1:
                    extra.pop(_PREP, None)
                hidden, state = drop_rows(hidden, state.replace(extra=extra), keep, new_len)
                extra = dict(state.extra)
            if i + 1 in by_layer:  # score with block i, drop before block i + 1
                s = by_layer[i + 1]
                state = state.replace(extra=extra)
                extra[_PLAN] = self.plan(ctx, s, stages[s], sizes[s], hidden, state)
            state = state.replace(extra=extra)
            types = current_types(ctx, state)
            count = jnp.sum(types == masks_lib.IMAGE, axis=1)
            return hidden, record_visual_tokens(state, i, depth, count)

        return hook, None

    def prep(self, state: Any) -> dict | None:
        """What :meth:`prepare` stored (for :meth:`plan`)."""
        return state.extra.get(_PREP)


def select_top(
    scores: jax.Array,
    k: int,
    valid: jax.Array,
    rows: jax.Array,
    count: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-``k`` of ``scores [B, n]`` (over the image slots ``rows [B, n]``), optionally only
    the best ``count [B]`` of them valid. Returns ``(rows [B, k], valid [B, k], idx [B, k])``
    sorted valid-first, ascending (``idx`` indexes the ``n`` slots)."""
    if count is None:
        idx, ok = core.topk_select(scores, k, valid=valid)
    else:
        idx, ok = core.topk_select(scores, k, valid=valid, keep_order=False)  # best first
        ok = ok & (jnp.arange(k)[None, :] < count[:, None])
        idx, ok = core.sort_slots(idx, ok)
    return jnp.take_along_axis(rows, idx, axis=1), ok, idx


def image_attention_scores(ctx: InLLMContext, stage, n_image: int, hidden, state, query):
    """Head-averaged attention of the ``query`` rows (as in :func:`query_rows`) of block
    ``stage.layer - 1`` to the current image tokens -> ``(scores [B, n], image_rows, valid)``:
    the scorer FastV and ZipVL share."""
    types = current_types(ctx, state)
    img, img_ok = image_rows(types, n_image)
    q, q_ok = query_rows(ctx, state, types, query, n_image)
    scores = probe_layer(ctx, stage.layer - 1, hidden, state, q, q_ok, img).mean
    return scores, img, img_ok
