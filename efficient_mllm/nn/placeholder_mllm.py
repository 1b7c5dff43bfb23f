"""Base of the multimodal models whose prompts hold one placeholder token per image feature.

Hugging Face's Qwen2-VL, Qwen2.5-VL and InternVL processors expand each image into as many
``image_token_id`` tokens as the image yields LLM tokens; the model replaces those token
embeddings, in order (row 0's image tokens first, then row 1's, ...), by the image features and
runs the decoder on the unchanged sequence length. (``nn.mllm.MLLM`` instead splices ``K`` image
tokens in place of a single placeholder.) A subclass owns ``self.language`` (a
``LanguageModel``) and ``self.cfg`` (with ``.language``, ``.image_token_id`` and
``.compressor``) and implements ``image_features(images) -> [K, D]``, ``num_image_features
(images) -> K`` (static), ``feature_groups(images)`` and ``positions(tokens, images, lengths,
start) -> positions | None`` (None: the decoder's default ``start + arange``); it may override
``image_signals`` (what compressors read, below) and calls :meth:`PlaceholderMLLM.set_compressor`
in ``__init__``.

Prompts are right-padded (``lengths`` valid tokens per row). ``prefill`` / ``decode`` follow
``MLLM``'s signatures, so ``kvcache.generate`` runs these models (``prompt_length`` is its
static check). ``__call__`` passes a ``layer_hook`` / ``block_fn`` through to the decoder.

Compressors (``cfg.compressor``, one ``registry.COMPRESSORS`` spec) are built as ``MLLM`` builds
them (``nn.mllm.build_compressor``: the factory gets the ``dim``, ``vision_dim`` (= the width of
the ``features`` signal), ``grid`` / ``num_tokens`` (fixed-size tiles only, None for Qwen's
dynamic resolution), ``num_layers``, ``dtype``, ``param_dtype`` and ``rngs`` it names); one that
owns parameters (``attn_pool``, ``mqt``, ``pixel_shuffle``, ``pmod``'s routers) is an NNX
submodule (``compressor`` / ``in_llm_compressor``), so fine-tuning trains it.

**Pre-LLM** (``stage = "pre_llm"``): run on each image's projected tokens (``feature_groups``:
images of one grid are batched) with the keyword arguments its signature names, as in
``MLLM.encode_images``: ``positions`` (relative ids), ``grid``, ``cls_attention``,
``layer_cls_attention``, ``features``, ``cls`` (:meth:`PlaceholderMLLM.image_signals`, computed
only when the compressor names them) and the text context ``text_embeds [n, T, D]`` (the token
embeddings of the image's row with its image tokens removed, text compacted to the front),
``text_lengths [n]`` (that row's text tokens) and ``placeholder [n] = T`` (no placeholder left in
the text). It returns ``K`` of its ``N`` tokens with ``keep_idx``. The prompt keeps its ``N``
slots: kept token ``k`` fills slot ``keep_idx[k]`` of its image (so it keeps that slot's
original position id, 3D for M-RoPE), invalid (``valid = False``) tokens and unfilled slots are
dropped. Learned compressors thereby fill: ``attn_pool`` the centre slot of each pooling window,
``pixel_shuffle`` the top-left-of-centre slot of each cell, ``mqt``'s ``m`` active queries the
evenly spread slots ``floor(i N / m)`` (each query keeps a real position of the image and the
queries stay in order). Dropping reuses the right-padding machinery: each row's live tokens
(valid text + filled slots) are moved to the front in order (static shape ``T``), ``lengths``
shrinks accordingly, positions travel with their tokens, and logits are read back at the
original indices (a dropped slot reads the last live token before it). Hence dropped slots are
never attended to and write no KV. Slots are filled in ascending ``keep_idx`` order; a
compressor's own ``position_ids`` are not used.

**In-LLM** (``stage = "in_llm"``: FastV, SparseVLM, ZipVL, p-MoD): the image tokens enter the
decoder unchanged and ``make_hooks(language, token_types [B, T], query_end [B],
num_image_tokens=N)`` drives the decoder exactly as in ``MLLM`` (``nn.mllm.in_llm_hooks``; the
image slots are IMAGE, other valid tokens TEXT, padding PAD; ``query_end`` is ``lengths`` or,
given ``prompt_lengths``, the prompt end; kept tokens carry their position ids, 3D on Qwen;
logits at dropped positions are read from the last kept position before them; with a KV cache
the later layers store only the kept tokens). The in-LLM code needs a static ``N`` and each
row's other tokens to fit in ``T - N``, which holds when **every row holds the same number of
image tokens**: ``N = num_image_features / B``, the image tokens of a row taken together (a
row may hold several images; they are ranked jointly, as FastV does for multi-image inputs).
Eagerly, other layouts (unequal counts, text-only rows) raise ``ValueError``; under ``jit``
they cannot be checked (as ``MLLM``'s placeholder count) and must not be passed. The recorded
``keep_idx/<s>`` statistics count from the row's first image token (input index offsets when a
row holds several images).

**Signals** (``image_signals``; per LLM token, in prompt order): ``cls_attention`` is the
vision encoder's attention probe of its last block run, summed over the LLM token's merge /
pixel-shuffle cell: InternViT's [CLS] query row (``cls`` is given), Qwen's ViT (no [CLS]) the
mean-query row as ``nn.vision`` defines it (``cls=None``; methods need ``fallback=
"mean_query"``). ``layer_cls_attention`` holds the same probe of the blocks a compressor lists
in ``cls_attention_layers``; ``features`` the projector / merger input of each LLM token. A
method whose signal this model cannot give raises ``ValueError`` naming the method, the model
and the missing signal.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.language import LanguageConfig, LanguageOutput
from efficient_mllm.nn.mllm import (
    _accepts,
    _call_with_accepted,
    build_compressor,
    in_llm_hooks,
    logits_after_drop,
)
from efficient_mllm.ops import masks as masks_lib

__all__ = [
    "ImageSignals",
    "PlaceholderMLLM",
    "check_vl_config",
    "compact_rows",
    "probe_layers",
    "scatter_features",
]


class ImageSignals(NamedTuple):
    """What a placeholder model's vision side gives its compressor, all images in prompt order.

    ``tokens [K, D]`` (the LLM-ready image tokens); ``features [K, Df] | None`` (the projector /
    merger input of each token); ``cls_attention [K] | None`` (the last ViT block's probe row,
    summed over each token's cell); ``layer_cls_attention [L, K] | None`` (the probe of each
    requested block); ``cls [num_images, Dv] | None`` (the ViT's [CLS] token per image)."""

    tokens: jax.Array
    features: jax.Array | None = None
    cls_attention: jax.Array | None = None
    layer_cls_attention: jax.Array | None = None
    cls: jax.Array | None = None


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


def probe_layers(cls_attention_layers: tuple[int, ...] | None, depth: int) -> tuple[int, ...]:
    """ViT block indices (negative from the end) of a compressor's ``cls_attention_layers`` as
    ``0..depth-1`` (``()`` for None); a bad or empty tuple raises."""
    if cls_attention_layers is None:
        return ()
    bad = [i for i in cls_attention_layers if not -depth <= i < depth]
    if bad or not cls_attention_layers:
        raise ValueError(
            f"cls_attention_layers={cls_attention_layers!r}: expected a non-empty tuple of ViT "
            f"block indices in [-{depth}, {depth})"
        )
    return tuple(i % depth for i in cls_attention_layers)


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
    Subclasses call :meth:`set_compressor` in ``__init__``; ``compressor`` is the pre-LLM
    compressor, ``in_llm_compressor`` the in-LLM one (at most one of them is set)."""

    compressor = None
    in_llm_compressor = None

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

    def image_signals(
        self,
        images: Any,
        *,
        cls_attention: bool = False,
        cls_attention_layers: tuple[int, ...] | None = None,
        features: bool = False,
    ) -> ImageSignals:
        """:class:`ImageSignals` of ``images``; the flags say which optional signals to compute.
        Default: the tokens only (a subclass that can give more overrides this)."""
        del cls_attention, cls_attention_layers, features
        return ImageSignals(self.image_features(images))

    # -- construction ----------------------------------------------------------------------

    def set_compressor(self, rngs: nnx.Rngs, **context: Any) -> None:
        """Builds ``cfg.compressor`` (``nn.mllm.build_compressor``) into ``compressor`` (pre-LLM)
        or ``in_llm_compressor``. ``context``: the model-specific build arguments
        (``vision_dim``, ``grid``, ``num_tokens``); ``dim``, ``num_layers``, ``dtype``,
        ``param_dtype`` and ``rngs`` come from the language config."""
        spec = self.cfg.compressor
        if spec is None:
            return
        lang = self.cfg.language
        ctx = {
            "dim": lang.width,
            "num_layers": lang.depth,
            "dtype": lang.compute_dtype,
            "param_dtype": jnp.dtype(lang.param_dtype),
            "rngs": rngs,
            **context,
        }
        built = build_compressor(spec, ctx)
        attr = (
            "in_llm_compressor" if getattr(built, "stage", "pre_llm") == "in_llm" else "compressor"
        )
        setattr(self, attr, nnx.data(built) if isinstance(built, nnx.Module) else built)

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

    def _compressor_error(self, err: Exception) -> ValueError:
        return ValueError(f"{type(self).__name__} with compressor {self.cfg.compressor!r}: {err}")

    def compress_features(self, sig: ImageSignals, images: Any, text: Mapping[str, Any]):
        """Runs ``self.compressor`` per feature group (module doc): ``(features [N, D] with each
        kept token in its slot, kept bool [N])``. ``text``: ``text_embeds [B, T, D]`` (compacted
        text), ``text_lengths [B]`` and ``feature_row [N]`` (batch row of each image token)."""
        comp = self.compressor
        feats = sig.tokens
        d = feats.shape[-1]
        outs, kept, off, img_off = [], [], 0, 0
        for count, n, grid, rel in self.feature_groups(images):
            x = feats[off : off + count * n].reshape(count, n, d)

            def per_token(a, off=off, count=count, n=n):
                return (
                    None if a is None else a[off : off + count * n].reshape(count, n, *a.shape[1:])
                )

            kw = dict(
                positions=jnp.asarray(rel, jnp.int32),
                grid=tuple(grid),
                cls_attention=per_token(sig.cls_attention),
                layer_cls_attention=None
                if sig.layer_cls_attention is None
                else jnp.moveaxis(
                    sig.layer_cls_attention[:, off : off + count * n].reshape(-1, count, n), 0, 1
                ),
                features=per_token(sig.features),
                cls=None if sig.cls is None else sig.cls[img_off : img_off + count],
            )
            if "text_embeds" in text:
                rows = text["feature_row"][off + n * jnp.arange(count)]
                t = text["text_embeds"].shape[1]
                kw.update(
                    text_embeds=text["text_embeds"][rows],
                    text_lengths=text["text_lengths"][rows],
                    placeholder=jnp.full((count,), t, jnp.int32),
                )
            off += count * n
            img_off += count
            try:
                out = _call_with_accepted(comp, (x,), kw)
            except ValueError as err:
                raise self._compressor_error(err) from err
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
                jnp.zeros((count, n, d), feats.dtype)
                .at[rows, slot]
                .set(toks.astype(feats.dtype), mode="drop")
                .reshape(-1, d)
            )
            kept.append(
                jnp.zeros((count, n), bool).at[rows, slot].set(True, mode="drop").reshape(-1)
            )
        if off != feats.shape[0]:
            raise ValueError(f"feature_groups cover {off} of {feats.shape[0]} image features")
        return jnp.concatenate(outs, 0), jnp.concatenate(kept, 0)

    def _signals(self, images: Any) -> ImageSignals:
        """The image signals ``self.compressor`` asks for (only those)."""
        comp = self.compressor
        if comp is None:
            return ImageSignals(self.image_features(images))
        layers = None
        if _accepts(comp, "layer_cls_attention"):
            layers = getattr(comp, "cls_attention_layers", None)
        try:
            return self.image_signals(
                images,
                cls_attention=_accepts(comp, "cls_attention"),
                cls_attention_layers=None if layers is None else tuple(layers),
                features=_accepts(comp, "features"),
            )
        except ValueError as err:
            raise self._compressor_error(err) from err

    def _in_llm_layout(self, images: Any, image_mask: jax.Array) -> int:
        """Static image tokens per row for the in-LLM compressor (module doc); checks eagerly
        that every row holds that many."""
        b = image_mask.shape[0]
        total = self.num_image_features(images)
        name = f"{type(self).__name__} with in-LLM compressor {self.cfg.compressor!r}"
        if total % b:
            raise ValueError(
                f"{name}: the {total} image tokens do not split evenly over the batch of {b}; "
                "in-LLM compression here needs every row to hold the same number of image tokens"
            )
        n = total // b
        if _is_concrete(image_mask):
            counts = np.asarray(image_mask).sum(axis=1)
            if (counts != n).any():
                raise ValueError(
                    f"{name}: rows hold {counts.tolist()} image tokens; in-LLM compression here "
                    f"needs every row to hold the same number ({n} = {total} / {b})"
                )
        return n

    def embed_inputs(self, tokens, images=None, lengths=None, *, start=None):
        """Decoder inputs: ``(embeds [B, T, D], positions | None, lengths [B], aux)``.

        With images, ``aux`` holds ``token_types [B, T]`` (``ops.masks`` TEXT / IMAGE / PAD, in
        the decoder's layout) and ``num_image_tokens [B]`` (image tokens per row the decoder
        sees); with a pre-LLM compressor rows are compacted (module doc) and ``aux`` also holds
        ``index [B, T]`` (where token ``t``'s logits are read) and ``kept [B, T]`` (original
        tokens the decoder sees); with an in-LLM one, ``in_llm_image_tokens`` (static ``N``)."""
        tokens, lengths, image_mask = self.check_inputs(tokens, images, lengths)
        embeds = self.language.embed_tokens(tokens)
        positions = self.positions(tokens, images, lengths, start)
        if images is None:
            return embeds, positions, lengths, {}
        b, t = tokens.shape
        valid = jnp.arange(t)[None, :] < lengths[:, None]

        def stats(mask, valid):
            types = jnp.where(
                valid, jnp.where(mask, masks_lib.IMAGE, masks_lib.TEXT), masks_lib.PAD
            )
            return {
                "token_types": types.astype(jnp.int32),
                "num_image_tokens": jnp.sum(mask & valid, axis=1).astype(jnp.int32),
            }

        if self.compressor is None:
            aux = stats(image_mask, valid)
            if self.in_llm_compressor is not None:
                aux["in_llm_image_tokens"] = self._in_llm_layout(images, image_mask)
            feats = self.image_features(images)
            return scatter_features(embeds, image_mask, feats), positions, lengths, aux
        sig = self._signals(images)
        text = {}
        if _accepts(self.compressor, "text_embeds"):
            k = sig.tokens.shape[0]
            text_lengths, _, text_embeds = compact_rows(valid & ~image_mask, embeds)
            flat = jnp.nonzero(image_mask.reshape(-1), size=max(k, 1), fill_value=0)[0]
            text = {
                "text_embeds": text_embeds,
                "text_lengths": text_lengths,
                "feature_row": (flat // t).astype(jnp.int32),
            }
        feats, kept = self.compress_features(sig, images, text)
        embeds = scatter_features(embeds, image_mask, feats)
        slot_kept = (
            scatter_features(
                jnp.zeros(tokens.shape + (1,), jnp.float32),
                image_mask,
                kept.astype(jnp.float32)[:, None],
            )[..., 0]
            > 0.5
        )
        live = valid & (~image_mask | slot_kept)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], tokens.shape)
        axis = 2 if positions.ndim == 3 else 1
        new_lengths, index, embeds, mask_c = compact_rows(live, embeds, image_mask)
        _, _, positions = compact_rows(live, positions, axis=axis)
        aux = stats(mask_c, jnp.arange(t)[None, :] < new_lengths[:, None])
        aux.update(index=index, kept=live)
        return embeds, positions, new_lengths, aux

    def _hooks(self, aux, query_end, layer_hook):
        if "in_llm_image_tokens" not in aux:
            return layer_hook, None
        return in_llm_hooks(
            self.in_llm_compressor,
            self.language,
            aux["token_types"],
            query_end,
            aux["in_llm_image_tokens"],
            layer_hook,
        )

    def __call__(
        self,
        tokens,
        images=None,
        *,
        lengths=None,
        logits_at=None,
        layer_hook=None,
        block_fn=None,
        prompt_lengths=None,
    ) -> LanguageOutput:
        """``tokens [B, T]`` (image tokens expanded), ``images`` (subclass format) or None ->
        the decoder's ``LanguageOutput`` (``logits [B, T, V]`` aligned with ``tokens``, or
        ``[B, Q, V]`` at ``logits_at [B, Q]``); ``layer_hook`` / ``block_fn`` go to
        ``LanguageModel.__call__`` (``block_fn`` cannot be combined with an in-LLM compressor
        that brings its own, p-MoD). ``prompt_lengths [B]`` (in-LLM compressors): only the
        first ``prompt_lengths`` tokens rate image tokens, so a forward pass over prompt +
        answer drops what ``prefill`` of the prompt drops. With an in-LLM compressor,
        ``state.extra["visual_tokens"] [B, depth]`` counts the image tokens each block saw."""
        embeds, positions, new_lengths, aux = self.embed_inputs(tokens, images, lengths)
        b, t = embeds.shape[:2]
        query_end = new_lengths
        if prompt_lengths is not None:
            pl = jnp.asarray(prompt_lengths, jnp.int32)
            if pl.shape != (b,):
                raise ValueError(f"prompt_lengths shape={tuple(pl.shape)}: expected int [{b}]")
            query_end = jnp.clip(pl, 0, new_lengths)
        hook, comp_block_fn = self._hooks(aux, query_end, layer_hook)
        if comp_block_fn is not None and block_fn is not None:
            raise ValueError(
                f"block_fn: compressor {self.cfg.compressor!r} brings its own block_fn; pass none"
            )
        block_fn = comp_block_fn or block_fn
        index = aux.get("index")
        if logits_at is not None:
            logits_at = jnp.asarray(logits_at, jnp.int32)
            if logits_at.ndim != 2 or logits_at.shape[0] != b:
                raise ValueError(f"logits_at shape={tuple(logits_at.shape)}: expected int [{b}, Q]")
            if index is not None:  # compressed: read logits back at the original indices
                logits_at = jnp.take_along_axis(index, logits_at, axis=1)
        elif index is not None:
            logits_at = index
        dropping = hook is not layer_hook or comp_block_fn is not None
        out = self.language(
            embeds,
            positions=positions,
            lengths=new_lengths,
            logits_at=jnp.zeros((b, 1), jnp.int32) if dropping else logits_at,
            layer_hook=hook,
            block_fn=block_fn,
        )
        if dropping:
            if logits_at is None:
                logits_at = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
            out = out._replace(logits=logits_after_drop(self.language, out, logits_at))
        return out

    def prompt_length(self, tokens_shape: tuple[int, ...], images: Any = None) -> int:
        """KV slots a prompt takes: ``T`` (no splicing)."""
        del images
        return int(tokens_shape[1])

    def prefill(self, tokens, images, lengths, cache: KVCache):
        """Writes the prompt into ``cache``: ``(logits [B, V] at each row's last valid token,
        cache, aux)``; positions continue at ``cache.positions``. ``aux``: with an in-LLM
        compressor, ``visual_tokens_per_layer [B, depth]``."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache={type(cache).__name__}: expected a KVCache")  # noqa: TRY004
        embeds, positions, lengths, aux = self.embed_inputs(
            tokens, images, lengths, start=cache.positions
        )
        last = jnp.maximum(lengths - 1, 0)[:, None]
        hook, block_fn = self._hooks(aux, lengths, None)
        out = self.language(
            embeds,
            positions=positions,
            lengths=lengths,
            cache=cache,
            logits_at=last,
            layer_hook=hook,
            block_fn=block_fn,
        )
        logits = out.logits
        info = {}
        if hook is not None or block_fn is not None:
            logits = logits_after_drop(self.language, out, last)
            if "visual_tokens" in out.state.extra:
                info["visual_tokens_per_layer"] = out.state.extra["visual_tokens"]
        return logits[:, 0], out.cache, info

    def decode(self, tokens: jax.Array, cache: KVCache):
        """One decode step: ``tokens [B, 1]`` -> (float32 logits ``[B, V]``, cache)."""
        return self.language.decode(tokens, cache)
