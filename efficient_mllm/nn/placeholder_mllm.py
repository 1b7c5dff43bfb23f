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
static check). ``MLLM``'s compressors are not wired here (``__call__`` passes a ``layer_hook`` /
``block_fn`` through to the decoder).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.language import LanguageOutput

__all__ = ["PlaceholderMLLM", "scatter_features"]


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


class PlaceholderMLLM(nnx.Module):
    """Shared forward / prefill / decode of the placeholder-expanded models (module doc)."""

    # -- subclass hooks --------------------------------------------------------------------

    def image_features(self, images: Any) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_image_features(self, images: Any) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def positions(self, tokens, images, lengths, start):  # pragma: no cover - abstract
        raise NotImplementedError

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

    def embed_inputs(self, tokens, images=None, lengths=None, *, start=None):
        """Decoder inputs: ``(embeds [B, T, D], positions | None, lengths [B])``."""
        tokens, lengths, image_mask = self.check_inputs(tokens, images, lengths)
        embeds = self.language.embed_tokens(tokens)
        if images is not None:
            embeds = scatter_features(embeds, image_mask, self.image_features(images))
        return embeds, self.positions(tokens, images, lengths, start), lengths

    def __call__(self, tokens, images=None, *, lengths=None, logits_at=None, layer_hook=None,
                 block_fn=None) -> LanguageOutput:
        """``tokens [B, T]`` (image tokens expanded), ``images`` (subclass format) or None ->
        the decoder's ``LanguageOutput`` (``logits [B, T, V]`` aligned with ``tokens``);
        ``logits_at`` / ``layer_hook`` / ``block_fn`` go to ``LanguageModel.__call__``."""
        embeds, positions, lengths = self.embed_inputs(tokens, images, lengths)
        return self.language(embeds, positions=positions, lengths=lengths, logits_at=logits_at,
                             layer_hook=layer_hook, block_fn=block_fn)

    def prompt_length(self, tokens_shape: tuple[int, ...], images: Any = None) -> int:
        """KV slots a prompt takes: ``T`` (no splicing)."""
        del images
        return int(tokens_shape[1])

    def prefill(self, tokens, images, lengths, cache: KVCache):
        """Writes the prompt into ``cache``: ``(logits [B, V] at each row's last valid token,
        cache, aux={})``; positions continue at ``cache.positions``."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache={type(cache).__name__}: expected a KVCache")  # noqa: TRY004
        embeds, positions, lengths = self.embed_inputs(
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
