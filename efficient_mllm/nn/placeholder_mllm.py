"""Base of the multimodal models whose prompts hold one placeholder token per image feature.

Hugging Face's Qwen2-VL, Qwen2.5-VL and InternVL processors expand each image into as many
``image_token_id`` tokens as the image yields LLM tokens; the model replaces those token
embeddings, in order (row 0's image tokens first, then row 1's, ...), by the image features and
runs the decoder on the unchanged sequence length. (``nn.mllm.MLLM`` instead splices ``K`` image
tokens in place of a single placeholder.) A subclass owns ``self.language`` (a
``LanguageModel``) and ``self.cfg`` (with ``.language`` and ``.image_token_id``) and implements
``image_features(images) -> [K, D]``, ``num_image_features(images) -> K`` (static) and
``positions(tokens, images, lengths, start) -> positions | None`` (None: the decoder's
default ``start + arange``).

Prompts are right-padded (``lengths`` valid tokens per row). ``prefill`` / ``decode`` follow
``MLLM``'s signatures, so ``kvcache.generate`` runs these models (``prompt_length`` is its
static check). ``__call__`` passes a ``layer_hook`` / ``block_fn`` through to the decoder.

Pre-LLM compressors (``cfg.compressor``, a ``registry.COMPRESSORS`` spec with ``stage =
"pre_llm"``) run on each image's projected tokens (``feature_groups``: images of one grid are
batched) and return ``K`` of its ``N`` tokens with ``keep_idx``. The prompt keeps its ``N``
slots: kept token ``k`` fills slot ``keep_idx[k]`` of its image (so it keeps that slot's
original position id, 3D for M-RoPE), unfilled slots are dropped. Dropping reuses the
right-padding machinery: each row's live tokens (valid text + filled slots) are moved to the
front in order (static shape ``T``), ``lengths`` shrinks accordingly, positions travel with their
tokens, and logits are read back at the original indices (a dropped slot reads the last live
token before it). Hence dropped slots are never attended to and write no KV. Slots are filled in
ascending ``keep_idx`` order (the compressor's output order when, as the contract says, valid
``keep_idx`` are ascending); a compressor's own ``position_ids`` are not used. Not supported
here (``ValueError``): ``in_llm`` compressors and compressors with their own parameters (their
factories need ``rngs`` / ``vision_dim``); the compressor receives ``positions`` and ``grid``
but no ``cls_attention``, ``features``, ``cls`` or text context, so methods that need those
raise their own "needs ..." error.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.language import LanguageConfig, LanguageOutput
from efficient_mllm.nn.mllm import _call_with_accepted

__all__ = [
    "PlaceholderMLLM",
    "build_pre_llm_compressor",
    "check_vl_config",
    "compact_rows",
    "scatter_features",
]

# Factory arguments that mean "this compressor owns parameters": not supported here yet.
_LEARNED_ARGS = ("rngs", "vision_dim", "param_dtype")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def scatter_features(embeds: jax.Array, is_feature: jax.Array, features: jax.Array) -> jax.Array:
    """Replaces ``embeds [B, T, D]`` at the True entries of ``is_feature [B, T]`` by the rows of
    ``features [K, D]`` in row-major order (as ``torch.masked_scatter``). Surplus True entries
    (beyond ``K``) read the last feature; fewer leave features unused (callers check eagerly)."""
    b, t, d = embeds.shape
    k = features.shape[0]
    if features.ndim != 2 or features.shape[1] != d:
        raise ValueError(f"features shape={tuple(features.shape)}: expected [K, {d}]")
    if k == 0:
        return embeds
    flat = is_feature.reshape(-1).astype(jnp.int32)
    index = jnp.clip(jnp.cumsum(flat) - flat, 0, k - 1)
    gathered = jnp.take(features.astype(embeds.dtype), index, axis=0).reshape(b, t, d)
    return jnp.where(is_feature[..., None], gathered, embeds)


def check_vl_config(cfg: Any, vision_cls: type, rope_type: str) -> tuple[Any, Any]:
    """The checks every placeholder-model config shares: ``language`` / ``vision`` (dicts are
    converted) of the right types, the rope type, a non-negative int ``image_token_id`` and a
    parsable ``compressor`` spec. Writes the converted fields back; returns ``(lang, vis)``."""
    name = type(cfg).__name__
    lang, vis = cfg.language, cfg.vision
    if isinstance(lang, Mapping):
        lang = LanguageConfig.from_dict(lang)
    if isinstance(vis, Mapping):
        vis = vision_cls.from_dict(vis)
    if not isinstance(lang, LanguageConfig) or lang.rope_type != rope_type:
        raise ValueError(
            f"{name}.language={cfg.language!r}: expected a LanguageConfig with "
            f"rope_type={rope_type!r}"
        )
    if not isinstance(vis, vision_cls):
        raise ValueError(f"{name}.vision={cfg.vision!r}: expected a {vision_cls.__name__}")
    tid = cfg.image_token_id
    if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)) or tid < 0:
        raise ValueError(f"{name}.image_token_id={tid!r}: expected an int >= 0")
    if cfg.compressor is not None:
        if not isinstance(cfg.compressor, str):
            raise ValueError(
                f"{name}.compressor={cfg.compressor!r}: expected a spec string or None"
            )
        registry.parse_spec(cfg.compressor)
    object.__setattr__(cfg, "language", lang)
    object.__setattr__(cfg, "vision", vis)
    object.__setattr__(cfg, "image_token_id", int(tid))
    return lang, vis


def build_pre_llm_compressor(spec: str | None, *, dim: int, num_layers: int, dtype: Any):
    """The ``pre_llm`` compressor built from registry ``spec`` (None -> None). Raises
    ``ValueError`` for in-LLM or learned (parameter-owning) compressors."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise ValueError(f"compressor={spec!r}: expected one registry spec string or None")
    name, kwargs = registry.parse_spec(spec)
    params = inspect.signature(registry.COMPRESSORS.get(name).factory).parameters
    learned = [a for a in _LEARNED_ARGS if a in params and a not in kwargs]
    if learned:
        raise ValueError(
            f"compressor={spec!r} owns learned parameters (its factory takes {learned}): not "
            "supported on this model yet (parameter-free pre_llm compressors only)"
        )
    context = {"dim": dim, "num_layers": num_layers, "dtype": dtype}
    extra = {k: v for k, v in context.items() if k in params and k not in kwargs}
    built = registry.COMPRESSORS.build(spec, **extra)
    stage = getattr(built, "stage", "pre_llm")
    if stage != "pre_llm" or isinstance(built, nnx.Module):
        raise ValueError(
            f"compressor={spec!r} has stage={stage!r}"
            f"{' and parameters' if isinstance(built, nnx.Module) else ''}: not supported on "
            "this model yet (parameter-free pre_llm compressors only)"
        )
    return built


def compact_rows(live: jax.Array, *arrays: jax.Array, axis: int = 1):
    """Moves each row's ``live [B, T]`` entries to the front, in order (stable).

    Returns ``(lengths [B], index [B, T], *arrays)``: ``lengths`` live entries per row, ``index``
    where original entry ``t`` now sits (a dead one: the last live entry before it, or 0), and
    each array (batch at ``axis - 1``, time at ``axis``) permuted alike."""
    order = jnp.argsort(~live, axis=1, stable=True).astype(jnp.int32)
    lengths = jnp.sum(live, axis=1).astype(jnp.int32)
    index = jnp.maximum(jnp.cumsum(live, axis=1) - 1, 0).astype(jnp.int32)
    out = []
    for a in arrays:
        idx = order
        if a.ndim > idx.ndim + (axis - 1):
            idx = idx[..., None]
        idx = jnp.broadcast_to(idx.reshape((1,) * (axis - 1) + idx.shape), a.shape)
        out.append(jnp.take_along_axis(a, idx, axis=axis))
    return (lengths, index, *out)


class PlaceholderMLLM(nnx.Module, abc.ABC):
    """Shared forward / prefill / decode of the placeholder-expanded models (module doc).
    Subclasses set ``self.compressor`` (``build_pre_llm_compressor``) in ``__init__``."""

    compressor = None

    # -- subclass hooks --------------------------------------------------------------------

    @abc.abstractmethod
    def image_features(self, images: Any) -> jax.Array:
        """Projected image features ``[total image tokens, D]`` in prompt order."""

    @abc.abstractmethod
    def num_image_features(self, images: Any) -> int:
        """Static number of rows ``image_features`` returns."""

    @abc.abstractmethod
    def positions(self, tokens, images, lengths, start):
        """Position ids of ``tokens`` (``[B, T]`` 1D or ``[3, B, T]`` M-RoPE), offset by ``start``."""

    @abc.abstractmethod
    def feature_groups(self, images: Any) -> list:
        """Static layout of ``image_features`` for the compressor: consecutive groups
        ``(count, n, grid, rel)`` of ``count`` images with ``n`` tokens each, the token ``grid``
        ``(rows, cols)`` and relative position ids ``rel`` (``[count, n]`` or ``[3, count, n]``)."""

    # -- shared ----------------------------------------------------------------------------

    def check_inputs(self, tokens, images=None, lengths=None):
        """Validated ``(tokens int32 [B, T], lengths int32 [B], image_mask bool [B, T])``;
        eagerly, the number of valid image tokens must equal the number of image features."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens dtype={tokens.dtype} shape={tuple(tokens.shape)}: expected int [B, T]"
            )
        b, t = tokens.shape
        if lengths is None:
            lengths = jnp.full((b,), t, jnp.int32)
        lengths = jnp.asarray(lengths)
        if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"lengths shape={tuple(lengths.shape)} dtype={lengths.dtype}: expected int [{b}]"
            )
        lengths = lengths.astype(jnp.int32)
        valid = jnp.arange(t)[None, :] < lengths[:, None]
        image_mask = (tokens == self.cfg.image_token_id) & valid
        if _is_concrete(image_mask):
            count = int(np.asarray(image_mask).sum())
            want = 0 if images is None else self.num_image_features(images)
            if count != want:
                raise ValueError(
                    f"tokens hold {count} image tokens (id {self.cfg.image_token_id}) among the "
                    f"valid ones: expected {want}, the number of image features of "
                    f"{'images=None' if images is None else 'the images'}"
                )
        return tokens.astype(jnp.int32), lengths, image_mask

    def compress_features(self, features: jax.Array, images: Any):
        """Runs ``self.compressor`` per feature group: ``(features [N, D] with each kept token
        in its slot, kept bool [N])``."""
        comp = self.compressor
        d = features.shape[-1]
        outs, kept, off = [], [], 0
        for count, n, grid, rel in self.feature_groups(images):
            x = features[off : off + count * n].reshape(count, n, d)
            off += count * n
            kw = dict(
                positions=jnp.asarray(rel, jnp.int32),
                grid=tuple(grid),
                cls_attention=None,
                layer_cls_attention=None,
                features=None,
                cls=None,
            )
            out = _call_with_accepted(comp, (x,), kw)
            if not (hasattr(out, "tokens") and hasattr(out, "keep_idx")):
                raise ValueError(
                    f"compressor {self.cfg.compressor!r} returned {type(out).__name__}: expected "
                    "an object with tokens, keep_idx (and valid)"
                )
            toks = jnp.asarray(out.tokens)
            k = toks.shape[1] if toks.ndim == 3 else -1
            if toks.shape != (count, k, d):
                raise ValueError(
                    f"compressor {self.cfg.compressor!r} returned tokens "
                    f"shape={tuple(toks.shape)}: expected [{count}, K, {d}]"
                )
            valid = getattr(out, "valid", None)
            valid = jnp.ones((count, k), bool) if valid is None else jnp.asarray(valid, bool)
            slot = jnp.where(valid, jnp.asarray(out.keep_idx, jnp.int32), n)  # n: dropped
            rows = jnp.arange(count)[:, None]
            outs.append(
                jnp.zeros((count, n, d), features.dtype)
                .at[rows, slot]
                .set(toks.astype(features.dtype), mode="drop")
                .reshape(-1, d)
            )
            kept.append(
                jnp.zeros((count, n), bool).at[rows, slot].set(True, mode="drop").reshape(-1)
            )
        if off != features.shape[0]:
            raise ValueError(f"feature_groups cover {off} of {features.shape[0]} image features")
        return jnp.concatenate(outs, 0), jnp.concatenate(kept, 0)

    def embed_inputs(self, tokens, images=None, lengths=None, *, start=None):
        """Decoder inputs: ``(embeds [B, T, D], positions | None, lengths [B], aux)``.

        Without a compressor ``aux = {}``. With one, rows are compacted (module doc) and ``aux``
        holds ``index [B, T]`` (where token ``t``'s logits are read), ``kept [B, T]`` (original
        tokens the decoder sees) and ``num_image_tokens [B]`` (kept image tokens per row)."""
        tokens, lengths, image_mask = self.check_inputs(tokens, images, lengths)
        embeds = self.language.embed_tokens(tokens)
        positions = self.positions(tokens, images, lengths, start)
        if images is None:
            return embeds, positions, lengths, {}
        feats = self.image_features(images)
        if getattr(self, "compressor", None) is None:
            return scatter_features(embeds, image_mask, feats), positions, lengths, {}
        feats, kept = self.compress_features(feats, images)
        embeds = scatter_features(embeds, image_mask, feats)
        slot_kept = (
            scatter_features(
                jnp.zeros(tokens.shape + (1,), jnp.float32),
                image_mask,
                kept.astype(jnp.float32)[:, None],
            )[..., 0]
            > 0.5
        )
        t = tokens.shape[1]
        live = (jnp.arange(t)[None, :] < lengths[:, None]) & (~image_mask | slot_kept)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], tokens.shape)
        axis = 2 if positions.ndim == 3 else 1
        new_lengths, index, embeds = compact_rows(live, embeds)
        _, _, positions = compact_rows(live, positions, axis=axis)
        aux = {
            "index": index,
            "kept": live,
            "num_image_tokens": jnp.sum(live & image_mask, axis=1).astype(jnp.int32),
        }
        return embeds, positions, new_lengths, aux

    def __call__(
        self, tokens, images=None, *, lengths=None, logits_at=None, layer_hook=None, block_fn=None
    ) -> LanguageOutput:
        """``tokens [B, T]`` (image tokens expanded), ``images`` (subclass format) or None ->
        the decoder's ``LanguageOutput`` (``logits [B, T, V]`` aligned with ``tokens``);
        ``logits_at`` / ``layer_hook`` / ``block_fn`` go to ``LanguageModel.__call__``."""
        embeds, positions, lengths, aux = self.embed_inputs(tokens, images, lengths)
        if "index" in aux:  # compressed: read logits back at the original token indices
            index = aux["index"]
            if logits_at is not None:
                logits_at = jnp.asarray(logits_at, jnp.int32)
                if logits_at.ndim != 2 or logits_at.shape[0] != index.shape[0]:
                    raise ValueError(
                        f"logits_at shape={tuple(logits_at.shape)}: expected int "
                        f"[{index.shape[0]}, Q]"
                    )
                index = jnp.take_along_axis(index, logits_at, axis=1)
            logits_at = index
        return self.language(
            embeds,
            positions=positions,
            lengths=lengths,
            logits_at=logits_at,
            layer_hook=layer_hook,
            block_fn=block_fn,
        )

    def prompt_length(self, tokens_shape: tuple[int, ...], images: Any = None) -> int:
        """KV slots a prompt takes: ``T`` (no splicing)."""
        del images
        return int(tokens_shape[1])

    def prefill(self, tokens, images, lengths, cache: KVCache):
        """Writes the prompt into ``cache``: ``(logits [B, V] at each row's last valid token,
        cache, aux={})``; positions continue at ``cache.positions``."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache={type(cache).__name__}: expected a KVCache")  # noqa: TRY004
        embeds, positions, lengths, _ = self.embed_inputs(
            tokens, images, lengths, start=cache.positions
        )
        last = jnp.maximum(lengths - 1, 0)[:, None]
        out = self.language(
            embeds, positions=positions, lengths=lengths, cache=cache, logits_at=last
        )
        return out.logits[:, 0], out.cache, {}

    def decode(self, tokens: jax.Array, cache: KVCache):
        """One decode step: ``tokens [B, 1]`` -> (float32 logits ``[B, V]``, cache)."""
        return self.language.decode(tokens, cache)
