"""The multimodal LLM: ViT -> projector -> optional pre-LLM compressor -> splice -> decoder.

Each multimodal row of ``tokens [B, T]`` holds one ``image_token_id`` placeholder. The image
becomes ``K`` tokens (projector output, possibly reduced by a compressor) spliced in its place,
so the decoder sees ``L = T - 1 + K`` positions (static). Row ``b`` with placeholder at ``p_b``
and ``n_b <= K`` valid image tokens reads: text ``0..p_b-1``, its valid image tokens (in kept
order), text ``p_b+1..`` shifted by ``n_b - 1``, then right padding. Invalid image tokens (a
compressor's ``valid = False``) are thereby moved to the padding tail, so every row is a plain
right-padded sequence of ``lengths + n_b - 1`` tokens and the usual causal + padding mask and
KV cache apply unchanged. Logits are gathered back to the text positions: ``logits[:, t]``
predicts ``tokens[:, t + 1]``, the placeholder's logit being the last image token's.

Position ids follow "kept tokens keep their original ids": 1D RoPE gives image token ``i`` (of
the uncompressed ``N``) the id ``p_b + i`` and the following text continues at ``p_b + N``;
M-RoPE gives it ``(p_b, p_b + row, p_b + col)`` (``ops.rope.mrope_positions``) and text continues
at ``p_b + max(gh, gw)``.

Compressors come from ``registry.COMPRESSORS`` by name (``MLLMConfig.compressor``); nothing here
imports ``efficient_mllm.compress``. See :meth:`MLLM.encode_images` for the call contract of a
``pre_llm`` compressor. An ``in_llm`` one (``stage = "in_llm"``: FastV, SparseVLM, ZipVL, p-MoD)
leaves the image tokens alone before the LLM; ``__call__`` / ``prefill`` call its
``make_hooks(language, token_types=[B, L], query_end=[B], num_image_tokens=N)`` and run the
decoder with the returned ``(layer_hook, block_fn)``; logits at dropped positions are read from
the last kept position before them.

Under ``jit`` the placeholder count cannot be checked: a row without a placeholder is treated as
text-only (its image is ignored, ``num_image_tokens = 0``) and in a row with several only the
first is replaced. Eagerly (concrete ``tokens``) both raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.config import DictMixin, VisionConfig
from efficient_mllm.nn.language import LanguageConfig, LanguageModel
from efficient_mllm.nn.layers import Linear, activation
from efficient_mllm.nn.vision import VisionEncoder
from efficient_mllm.ops import masks as masks_lib
from efficient_mllm.ops import rope as rope_ops

__all__ = [
    "MLLM",
    "ImageTokens",
    "MLLMConfig",
    "MLLMOutput",
    "Projector",
    "build_compressor",
    "cell_sum",
    "in_llm_hooks",
    "logits_after_drop",
    "pixel_shuffle",
    "splice_layout",
]

PROJECTORS = ("mlp2x_gelu",)
# Context a compressor factory may ask for (by naming the argument) when it is built.
_COMPRESSOR_BUILD_ARGS = (
    "dim", "vision_dim", "grid", "num_tokens", "num_layers", "dtype", "param_dtype", "rngs"
)
COMPRESSOR_STAGES = ("pre_llm", "in_llm")


def _is_concrete(x: Any) -> bool:
    try:
        np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLLMConfig(DictMixin):
    """Hyper-parameters of :class:`MLLM` (frozen, hashable, dict round-trip).

    * ``language``: :class:`LanguageConfig` (or its dict); ``vision``: ``VisionConfig`` / dict /
      None (text-only model).
    * ``projector``: ``"mlp2x_gelu"`` (Linear -> GELU -> Linear, LLaVA-1.5); ``pixel_shuffle``
      ``s >= 1`` merges each ``s x s`` patch neighbourhood into the channels first (``s*s``
      fewer tokens; the patch grid must be divisible by ``s``).
    * ``image_token_id``: the placeholder id in ``tokens`` (required with ``vision``).
    * ``feature_select``: ``"default"`` (image tokens are the patches) or ``"full"`` (the ViT's
      CLS token first, then the patches: LLaVA's ``vision_feature_select_strategy``; needs a
      CLS token, 1D RoPE, ``pixel_shuffle=1`` and no compressor).
    * ``compressor``: ``registry.COMPRESSORS`` spec string (``"visionzip(dominant=54, ...)"``,
      ``"fastv(layer=2, keep=64)"``), or a tuple of specs with at most one per stage (a
      ``pre_llm`` one applied to the projected image tokens before the LLM and an ``in_llm`` one
      acting inside the decoder), or None. The built object's ``stage`` attribute says which
      (default ``"pre_llm"``).
    """

    language: Any
    vision: Any = None
    projector: str = "mlp2x_gelu"
    pixel_shuffle: int = 1
    image_token_id: int | None = None
    compressor: str | tuple[str, ...] | None = None
    feature_select: str = "default"

    def __post_init__(self):
        lang = self.language
        if isinstance(lang, Mapping):
            lang = LanguageConfig.from_dict(lang)
        if not isinstance(lang, LanguageConfig):
            raise ValueError(  # noqa: TRY004
                f"MLLMConfig.language={self.language!r}: expected a LanguageConfig or dict"
            )
        object.__setattr__(self, "language", lang)
        vis = self.vision
        if isinstance(vis, Mapping):
            vis = VisionConfig.from_dict(vis)
        if vis is not None and not isinstance(vis, VisionConfig):
            raise ValueError(
                f"MLLMConfig.vision={self.vision!r}: expected a VisionConfig, dict or None"
            )
        object.__setattr__(self, "vision", vis)
        if self.projector not in PROJECTORS:
            raise ValueError(
                f"MLLMConfig.projector={self.projector!r}: expected one of {PROJECTORS}"
            )
        s = self.pixel_shuffle
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"MLLMConfig.pixel_shuffle={s!r}: expected an int >= 1")
        object.__setattr__(self, "pixel_shuffle", int(s))
        if vis is not None:
            gh, gw = vis.grid
            if gh % s or gw % s:
                raise ValueError(
                    f"MLLMConfig.pixel_shuffle={s}: the vision patch grid {vis.grid} must be "
                    f"divisible by it"
                )
            tid = self.image_token_id
            if (
                isinstance(tid, bool)
                or not isinstance(tid, (int, np.integer))
                or not 0 <= tid < lang.vocab_size
            ):
                raise ValueError(
                    f"MLLMConfig.image_token_id={tid!r}: expected an int in [0, "
                    f"{lang.vocab_size}) when vision is set"
                )
        if self.image_token_id is not None:
            object.__setattr__(self, "image_token_id", int(self.image_token_id))
        if self.feature_select not in ("default", "full"):
            raise ValueError(
                f"MLLMConfig.feature_select={self.feature_select!r}: expected 'default' or 'full'"
            )
        if self.feature_select == "full" and (
            vis is None
            or not vis.use_cls
            or s != 1
            or self.compressor is not None
            or lang.rope_type != "rope"
        ):
            raise ValueError(
                "MLLMConfig.feature_select='full' needs a vision encoder with a CLS token, "
                f"pixel_shuffle=1, no compressor and rope_type='rope' (got vision="
                f"{None if vis is None else 'use_cls=' + str(vis.use_cls)}, pixel_shuffle={s}, "
                f"compressor={self.compressor!r}, rope_type={lang.rope_type!r})"
            )
        if self.compressor is not None:
            if vis is None:
                raise ValueError(
                    f"MLLMConfig.compressor={self.compressor!r} needs a vision config "
                    "(got vision=None)"
                )
            specs = self.compressor
            if isinstance(specs, (list, tuple)):
                specs = tuple(specs)
                if not specs:
                    raise ValueError("MLLMConfig.compressor=(): expected a spec string or None")
                object.__setattr__(self, "compressor", specs)
            for spec in specs if isinstance(specs, tuple) else (specs,):
                registry.parse_spec(spec)

    @property
    def grid(self) -> tuple[int, int] | None:
        """Image-token grid after pixel shuffle (None without vision)."""
        if self.vision is None:
            return None
        gh, gw = self.vision.grid
        return (gh // self.pixel_shuffle, gw // self.pixel_shuffle)


def pixel_shuffle(x: jax.Array, grid: tuple[int, int], factor: int) -> jax.Array:
    """Merges ``factor x factor`` neighbouring tokens of a raster grid into the channels.

    ``x [B, gh*gw, D]`` -> ``[B, (gh/s)*(gw/s), s*s*D]``, output tokens in raster order of the
    coarse grid, channels ordered ``(row-in-cell, col-in-cell, D)``.
    """
    b, n, d = x.shape
    gh, gw = grid
    s = factor
    if n != gh * gw or gh % s or gw % s:
        raise ValueError(
            f"x shape={tuple(x.shape)} with grid={grid}: expected gh*gw tokens and a grid "
            "divisible "
            f"by factor={s}"
        )
    if s == 1:
        return x
    x = x.reshape(b, gh // s, s, gw // s, s, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (gh // s) * (gw // s), s * s * d)


class Projector(nnx.Module):
    """``mlp2x_gelu``: ``fc2(gelu(fc1(pixel_shuffle(x))))``; params ``fc1 [vision_embed, mlp]``
    and ``fc2 [mlp, embed]``, both with bias."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        pixel_shuffle: int = 1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.factor = int(pixel_shuffle)
        kw = {"use_bias": True, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.fc1 = Linear(in_dim * self.factor**2, out_dim, axes=("vision_embed", "mlp"), **kw)
        self.fc2 = Linear(out_dim, out_dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        if self.factor > 1:
            x = pixel_shuffle(x, grid, self.factor)
        return self.fc2(activation("gelu")(self.fc1(x)))


class ImageTokens(NamedTuple):
    """Image tokens ready to splice (see :meth:`MLLM.encode_images`).

    ``tokens [B, K, D]``; ``valid`` bool ``[B, K]``; ``keep_idx`` int32 ``[B, K]`` (index among
    the ``N`` uncompressed tokens); ``positions`` int32 ``[B, K]`` (rope) or ``[3, B, K]``
    (mrope), relative to the placeholder; ``span``: static int, the position advance of the
    whole image (``N`` for rope, ``max(gh, gw)`` for mrope).
    """

    tokens: jax.Array
    valid: jax.Array
    keep_idx: jax.Array
    positions: jax.Array
    span: int


class MLLMOutput(NamedTuple):
    """``logits`` float32 ``[B, T, V]`` aligned with ``tokens``; ``aux`` dict (see
    :meth:`MLLM.__call__`)."""

    logits: jax.Array
    aux: dict


def splice_layout(placeholder: jax.Array, num_image: jax.Array, text_len: int, num_slots: int):
    """Static-shape splice plan for ``L = text_len - 1 + num_slots`` positions.

    Args:
      placeholder: int32 ``[B]`` placeholder index per row (``text_len`` for a row without one).
      num_image: int32 ``[B]`` valid image tokens per row (0 for a row without a placeholder).

    Returns ``(is_image [B, L] bool, text_src [B, L], image_src [B, L], text_index [B, T])``:
    spliced position ``j`` takes image token ``image_src`` when ``is_image``, else text token
    ``text_src`` (``>= text_len`` means padding); ``text_index[b, t]`` is where text token ``t``'s
    logits are read (the placeholder maps to the last image token).
    """
    seq = text_len - 1 + num_slots
    j = jnp.arange(seq, dtype=jnp.int32)[None, :]
    p = placeholder[:, None].astype(jnp.int32)
    n = num_image[:, None].astype(jnp.int32)
    is_image = (j >= p) & (j < p + n)
    text_src = jnp.where(j < p, j, j - n + 1)
    image_src = jnp.clip(j - p, 0, max(num_slots - 1, 0))
    t = jnp.arange(text_len, dtype=jnp.int32)[None, :]
    text_index = jnp.where(t < p, t, jnp.where(t == p, jnp.maximum(p + n - 1, 0), t - 1 + n))
    return is_image, text_src, image_src, text_index


def _identity_hook(i, hidden, state):
    return hidden, state


def _call_with_accepted(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """Calls ``fn(*args, **kw)`` with the subset of ``kwargs`` its signature accepts."""
    target = fn.__call__ if isinstance(fn, nnx.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _accepts(fn: Callable, name: str) -> bool:
    target = fn.__call__ if isinstance(fn, nnx.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_compressor(spec: str, context: Mapping[str, Any]) -> Any:
    """Builds registry ``spec``, passing the entries of ``context`` (``dim``, ``vision_dim``,
    ``grid``, ``num_tokens``, ``num_layers``, ``dtype``, ``param_dtype``, ``rngs``) that its
    factory names and the spec does not set (None values are not passed). Checks its
    ``stage`` (``COMPRESSOR_STAGES``; ``in_llm`` needs ``make_hooks``)."""
    name, spec_kwargs = registry.parse_spec(spec)
    entry = registry.COMPRESSORS.get(name)  # raises RegistryError if unknown
    params = inspect.signature(entry.factory).parameters
    extra = {
        k: context[k]
        for k in _COMPRESSOR_BUILD_ARGS
        if k in params and k not in spec_kwargs and context.get(k) is not None
    }
    built = registry.COMPRESSORS.build(spec, **extra)
    stage = getattr(built, "stage", "pre_llm")
    if stage not in COMPRESSOR_STAGES:
        raise ValueError(
            f"compressor {spec!r} has stage={stage!r}: expected one of {COMPRESSOR_STAGES}"
        )
    if stage == "in_llm" and not hasattr(built, "make_hooks"):
        raise ValueError(f"compressor {spec!r} has stage='in_llm' but no make_hooks(language, ...)")
    return built


def cell_sum(a: jax.Array | None, grid: tuple[int, int], s: int) -> jax.Array | None:
    """``a [..., gh * gw]`` (raster order) summed over each ``s x s`` cell: ``[..., (gh/s) *
    (gw/s)]`` in raster order of the cells (None passes through)."""
    if a is None or s == 1:
        return a
    g0, g1 = grid
    lead = a.shape[:-1]
    return a.reshape(*lead, g0 // s, s, g1 // s, s).sum(axis=(-3, -1)).reshape(
        *lead, (g0 // s) * (g1 // s)
    )


def in_llm_hooks(comp, language, token_types, query_end, num_image_tokens: int, layer_hook):
    """``(layer_hook, block_fn)`` for the decoder: the user's ``layer_hook`` composed with the
    ``in_llm`` compressor's hooks (``comp.make_hooks(language, token_types=[B, L],
    query_end=[B], num_image_tokens=N)``); the user's hook alone when ``comp`` is None."""
    if comp is None:
        return layer_hook, None
    comp_hook, block_fn = comp.make_hooks(
        language,
        token_types=token_types,
        query_end=query_end,
        num_image_tokens=int(num_image_tokens),
    )
    if comp_hook is None:
        comp_hook = _identity_hook
    if layer_hook is None:
        return comp_hook, block_fn

    def hook(i, h, state):
        h, state = layer_hook(i, h, state)
        return comp_hook(i, h, state)

    return hook, block_fn


def logits_after_drop(language, out, index: jax.Array) -> jax.Array:
    """Logits at input positions ``index [B, Q]`` when in-LLM compression dropped tokens: a
    dropped position reads the last kept position before it (the token that precedes the
    next one in the shortened sequence, e.g. the last kept image token for the image
    placeholder). ``out``: the decoder's ``LanguageOutput``."""
    state = out.state
    b, length = out.hidden.shape[:2]
    cur = state.token_index.shape[1]
    ok = (
        jnp.ones((b, cur), bool)
        if state.lengths is None
        else jnp.arange(cur)[None, :] < state.lengths[:, None]
    )
    rows = jnp.arange(b)[:, None]
    kept = jnp.zeros((b, length), bool).at[rows, state.token_index].max(ok, mode="drop")
    ar = jnp.arange(length, dtype=jnp.int32)[None, :]
    src = jax.lax.cummax(jnp.where(kept, ar, -1), axis=1)
    src = jnp.maximum(jnp.take_along_axis(src, index, axis=1), 0)
    return language.head(jnp.take_along_axis(out.hidden, src[:, :, None], axis=1))


class MLLM(nnx.Module):
    """Vision encoder + projector + optional compressor + :class:`LanguageModel`.

    Submodules: ``vision`` (``VisionEncoder`` or None), ``projector`` (:class:`Projector` or
    None), ``compressor`` (the ``pre_llm`` compressor the registry built, or None),
    ``in_llm_compressor`` (the ``in_llm`` one, e.g. p-MoD's routers, or None) and ``language``.
    """

    def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
        if isinstance(cfg, Mapping):
            cfg = MLLMConfig.from_dict(cfg)
        if not isinstance(cfg, MLLMConfig):
            raise ValueError(f"cfg={cfg!r}: expected an MLLMConfig")  # noqa: TRY004
        self.cfg = cfg
        lang = cfg.language
        self.language = LanguageModel(lang, rngs=rngs)
        self.vision = None if cfg.vision is None else VisionEncoder(cfg.vision, rngs=rngs)
        self.projector = (
            None
            if cfg.vision is None
            else Projector(
                cfg.vision.width,
                lang.width,
                pixel_shuffle=cfg.pixel_shuffle,
                dtype=lang.compute_dtype,
                param_dtype=jnp.dtype(lang.param_dtype),
                rngs=rngs,
            )
        )
        # ``compressor``: the pre-LLM one (called by ``encode_images``); ``in_llm_compressor``:
        # the one acting inside the decoder (``make_hooks``, see ``_in_llm_hooks``).
        self.compressor = None
        self.in_llm_compressor = None
        specs = cfg.compressor
        gh, gw = cfg.grid if cfg.vision is not None else (None, None)
        context = {
            "dim": lang.width,
            "vision_dim": None if cfg.vision is None else cfg.vision.width,
            "grid": None if gh is None else (gh, gw),
            "num_tokens": None if gh is None else gh * gw,
            "num_layers": lang.depth,
            "dtype": lang.compute_dtype,
            "param_dtype": jnp.dtype(lang.param_dtype),
            "rngs": rngs,
        }
        for spec in () if specs is None else specs if isinstance(specs, tuple) else (specs,):
            built = build_compressor(spec, context)
            stage = getattr(built, "stage", "pre_llm")
            attr = "compressor" if stage == "pre_llm" else "in_llm_compressor"
            if getattr(self, attr) is not None:
                raise ValueError(
                    f"MLLMConfig.compressor={specs!r}: more than one {stage!r} compressor"
                )
            # ``nnx.data``: the attribute was first set to None (static); a module is data.
            setattr(self, attr, nnx.data(built) if isinstance(built, nnx.Module) else built)

    # -- images ------------------------------------------------------------------------------

    def _check_images(self, images: jax.Array, batch: int | None = None) -> None:
        cfg = self.cfg
        if cfg.vision is None:
            raise ValueError("images were given but this MLLM has no vision encoder (vision=None)")
        want = (*cfg.vision.image_size, cfg.vision.channels)
        shape = tuple(getattr(images, "shape", ()))
        if len(shape) != 4 or shape[1:] != want or (batch is not None and shape[0] != batch):
            b = "B" if batch is None else batch
            raise ValueError(
                f"images shape={shape}: expected [{b}, {want[0]}, {want[1]}, {want[2]}] "
                f"(vision.image_size={cfg.vision.image_size})"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images dtype={images.dtype}: expected a float array")

    def encode_images(
        self, images: jax.Array, *, context: Mapping[str, Any] | None = None
    ) -> ImageTokens:
        """``images [B, H, W, C]`` -> :class:`ImageTokens` (vision, projector, compressor).

        The compressor is called as ``compressor(tokens [B, N, D], *, positions, grid,
        cls_attention, features, cls, **context)`` with only the keyword arguments its
        signature names (all of them if it takes ``**kwargs``): ``positions`` relative ids of
        the ``N`` tokens (``[B, N]`` rope / ``[3, B, N]`` mrope), ``grid`` the static token grid,
        ``cls_attention [B, N]`` the ViT's CLS attention (summed over pixel-shuffle cells;
        computed only when asked for), ``layer_cls_attention [B, L, N]`` the same probe of
        the ViT blocks listed in the compressor's ``cls_attention_layers`` attribute (None
        without it), ``features [B, N, s*s*Dv]`` the pre-projector features,
        ``cls`` the ViT CLS token ``[B, Dv]`` or None, and ``context`` (e.g. ``text_embeds``,
        ``text_lengths``, ``placeholder``). It returns an object with ``tokens [B, K, D]``,
        ``keep_idx [B, K]`` and optionally ``valid [B, K]`` and ``position_ids`` (relative, same
        layout as ``positions``; default: gathered by ``keep_idx``).
        """
        cfg = self.cfg
        self._check_images(images)
        want_cls_attn = self.compressor is not None and _accepts(self.compressor, "cls_attention")
        # A compressor that probes several ViT blocks (VTC-CLS) names them in its
        # ``cls_attention_layers`` attribute and receives ``layer_cls_attention [B, L, N]``.
        layers = None
        if self.compressor is not None and _accepts(self.compressor, "layer_cls_attention"):
            layers = getattr(self.compressor, "cls_attention_layers", None)
        vis = self.vision(
            images,
            return_cls_attention=want_cls_attn,
            cls_attention_layers=layers,
            keep_cls=cfg.feature_select == "full",
        )
        grid = cfg.grid
        s = cfg.pixel_shuffle
        tokens = self.projector(vis.patches, vis.grid)
        b, n = tokens.shape[:2]
        gh, gw = grid
        if cfg.language.rope_type == "mrope":
            # (0, row, col) for an image starting at 0; text resumes at max(gh, gw).
            rel, _ = rope_ops.mrope_positions(jnp.ones((1, n), jnp.int32), grid)
            rel = jnp.broadcast_to(rel, (3, b, n))
            span = max(gh, gw)
        else:
            rel = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n))
            span = n
        if self.compressor is None:
            keep_idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n))
            return ImageTokens(tokens, jnp.ones((b, n), bool), keep_idx, rel, span)

        kwargs = dict(
            positions=rel,
            grid=grid,
            cls_attention=cell_sum(vis.cls_attention, vis.grid, s),
            layer_cls_attention=cell_sum(vis.layer_cls_attention, vis.grid, s),
            features=pixel_shuffle(vis.patches, vis.grid, s),
            cls=vis.cls,
            **dict(context or {}),
        )
        out = _call_with_accepted(self.compressor, (tokens,), kwargs)
        for attr in ("tokens", "keep_idx"):
            if not hasattr(out, attr):
                raise ValueError(
                    f"compressor {cfg.compressor!r} returned {type(out).__name__} without "
                    f"{attr!r}; expected an object with tokens, keep_idx (and valid)"
                )
        ctoks = out.tokens
        k = ctoks.shape[1]
        if ctoks.ndim != 3 or ctoks.shape[0] != b or ctoks.shape[2] != tokens.shape[2]:
            raise ValueError(
                f"compressor {cfg.compressor!r} returned tokens shape={tuple(ctoks.shape)}: "
                f"expected [{b}, K, {tokens.shape[2]}]"
            )
        keep_idx = jnp.asarray(out.keep_idx, jnp.int32)
        valid = getattr(out, "valid", None)
        valid = jnp.ones((b, k), bool) if valid is None else jnp.asarray(valid, bool)
        pos = getattr(out, "position_ids", None)
        if pos is None:
            idx = jnp.clip(keep_idx, 0, n - 1)
            if rel.ndim == 3:
                pos = jnp.take_along_axis(rel, jnp.broadcast_to(idx[None], (3, b, k)), axis=2)
            else:
                pos = jnp.take_along_axis(rel, idx, axis=1)
        return ImageTokens(
            ctoks.astype(tokens.dtype), valid, keep_idx, jnp.asarray(pos, jnp.int32), span
        )

    def num_image_slots(self, image_shape: tuple[int, ...] | None = None) -> int:
        """Static ``K``: image tokens spliced per row (after pixel shuffle and compressor)."""
        if self.cfg.vision is None:
            return 0
        gh, gw = self.cfg.grid
        if self.compressor is None:
            return gh * gw + int(self.cfg.feature_select == "full")
        shape = (
            tuple(image_shape)
            if image_shape
            else (1, *self.cfg.vision.image_size, self.cfg.vision.channels)
        )
        graphdef, state = nnx.split(self)

        def f(state, images):
            # Shape-only: a one-token dummy prompt stands in for the text context.
            b = images.shape[0]
            ctx = {
                "text_embeds": jnp.zeros((b, 1, self.cfg.language.width), jnp.float32),
                "text_lengths": jnp.ones((b,), jnp.int32),
                "placeholder": jnp.zeros((b,), jnp.int32),
            }
            return nnx.merge(graphdef, state).encode_images(images, context=ctx).tokens

        return int(jax.eval_shape(f, state, jax.ShapeDtypeStruct(shape, jnp.float32)).shape[1])

    def spliced_length(
        self, tokens_shape: tuple[int, ...], images_shape: tuple[int, ...] | None
    ) -> int:
        """Static decoder length for a batch: ``T - 1 + K`` with images, ``T`` without."""
        t = int(tokens_shape[1])
        if images_shape is None:
            return t
        return t - 1 + self.num_image_slots(images_shape)

    # -- splice ------------------------------------------------------------------------------

    def _check_tokens(self, tokens, images, lengths):
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
        tid = self.cfg.image_token_id
        if images is not None:
            self._check_images(images, b)
        if tid is not None and _is_concrete(tokens) and _is_concrete(lengths):
            tk, ln = np.asarray(tokens), np.asarray(lengths)
            valid = np.arange(t)[None, :] < ln[:, None]
            counts = ((tk == tid) & valid).sum(axis=1)
            if images is None and counts.any():
                raise ValueError(
                    f"tokens hold the image placeholder (id {tid}) in rows "
                    f"{np.nonzero(counts)[0].tolist()} but images=None"
                )
            if images is not None and not (counts == 1).all():
                bad = np.nonzero(counts != 1)[0].tolist()
                raise ValueError(
                    f"tokens rows {bad} hold {counts[bad].tolist()} image placeholders (id {tid}) "
                    "among their valid tokens: expected exactly one per row when images are given"
                )
        return tokens.astype(jnp.int32), lengths

    def embed_inputs(self, tokens, images=None, lengths=None, *, start=None):
        """Builds the decoder input: ``(embeds [B, L, D], positions, spliced_lengths, aux)``.

        ``start`` int32 ``[B]``: position id of the first token (``cache.positions``); default 0.
        """
        cfg = self.cfg
        tokens, lengths = self._check_tokens(tokens, images, lengths)
        b, t = tokens.shape
        lm = self.language
        text = lm.embed_tokens(tokens)
        start = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        mrope = cfg.language.rope_type == "mrope"
        if images is None:
            pos = jnp.arange(t, dtype=jnp.int32)[None, :] + start[:, None]
            positions = jnp.broadcast_to(pos[None], (3, b, t)) if mrope else pos
            token_types = jnp.where(
                jnp.arange(t)[None, :] < lengths[:, None], masks_lib.TEXT, masks_lib.PAD
            )
            aux = {
                "num_image_tokens": jnp.zeros((b,), jnp.int32),
                "spliced_lengths": lengths,
                "text_index": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t)),
                "token_types": token_types.astype(jnp.int32),
            }
            return text, positions, lengths, aux

        is_ph = (tokens == cfg.image_token_id) & (jnp.arange(t)[None, :] < lengths[:, None])
        has = jnp.any(is_ph, axis=1)
        placeholder = jnp.where(has, jnp.argmax(is_ph, axis=1), t).astype(jnp.int32)
        ctx = {"text_embeds": text, "text_lengths": lengths, "placeholder": placeholder}
        img = self.encode_images(images, context=ctx)
        k = img.tokens.shape[1]
        # Valid image tokens first (stable), invalid ones go to the padding tail.
        order = jnp.argsort(~img.valid, axis=1, stable=True)
        img_tokens = jnp.take_along_axis(img.tokens, order[:, :, None], axis=1)
        if img.positions.ndim == 3:
            img_pos = jnp.take_along_axis(
                img.positions, jnp.broadcast_to(order[None], (3, b, k)), axis=2
            )
        else:
            img_pos = jnp.take_along_axis(img.positions, order, axis=1)
        n_img = jnp.where(has, jnp.sum(img.valid, axis=1), 0).astype(jnp.int32)
        is_image, text_src, image_src, text_index = splice_layout(placeholder, n_img, t, k)
        seq = t - 1 + k
        tsrc = jnp.clip(text_src, 0, t - 1)
        text_part = jnp.take_along_axis(text, tsrc[:, :, None], axis=1)
        image_part = jnp.take_along_axis(img_tokens, image_src[:, :, None], axis=1)
        in_text = text_src < t
        embeds = jnp.where(
            is_image[:, :, None], image_part, jnp.where(in_text[:, :, None], text_part, 0)
        ).astype(text.dtype)
        spliced_lengths = lengths + n_img - has.astype(jnp.int32)

        # Position ids (relative to ``start``): text keeps its index before the placeholder and
        # continues after the image's span; image tokens sit at placeholder + their ids.
        span = jnp.where(has, img.span, 0)[:, None]
        p = placeholder[:, None]
        text_pos = jnp.where(text_src < p, text_src, text_src - 1 + span)
        if mrope:
            img_p = jnp.take_along_axis(
                img_pos, jnp.broadcast_to(image_src[None], (3, b, seq)), axis=2
            )
            positions = jnp.where(is_image[None], p[None] + img_p, text_pos[None])
        else:
            img_p = jnp.take_along_axis(img_pos, image_src, axis=1)
            positions = jnp.where(is_image, p + img_p, text_pos)
        positions = (positions + (start[None, :, None] if mrope else start[:, None])).astype(
            jnp.int32
        )

        valid = jnp.arange(seq)[None, :] < spliced_lengths[:, None]
        token_types = jnp.where(is_image, masks_lib.IMAGE, masks_lib.TEXT)
        token_types = jnp.where(valid, token_types, masks_lib.PAD).astype(jnp.int32)
        aux = {
            "num_image_tokens": n_img,
            "spliced_lengths": spliced_lengths,
            "text_index": text_index,
            "token_types": token_types,
            "keep_idx": jnp.take_along_axis(img.keep_idx, order, axis=1),
            "image_valid": jnp.take_along_axis(img.valid, order, axis=1) & has[:, None],
        }
        return embeds, positions, spliced_lengths, aux

    # -- forward -----------------------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        images: jax.Array | None = None,
        *,
        lengths: jax.Array | None = None,
        layer_hook: Callable | None = None,
        prompt_lengths: jax.Array | None = None,
    ) -> MLLMOutput:
        """``tokens [B, T]`` (+ ``images [B, H, W, C]``) -> :class:`MLLMOutput`.

        ``logits [B, T, V]``: ``logits[:, t]`` predicts ``tokens[:, t + 1]``. ``aux``:
        ``num_image_tokens [B]`` (image tokens spliced per row), ``spliced_lengths [B]``
        (``lengths + num_image_tokens - 1`` for rows with an image), ``text_index [B, T]``
        (decoder position of each text token's logits), ``token_types [B, L]``
        (``ops.masks`` TEXT/IMAGE/PAD), ``positions`` (decoder position ids), ``hook_extra``
        (``state.extra`` of ``layer_hook``), and with images ``keep_idx`` / ``image_valid
        [B, K]``. With an ``in_llm`` compressor, ``visual_tokens_per_layer [B, depth]`` (image
        tokens each decoder block processed) when the compressor records it.

        ``prompt_lengths`` int32 ``[B]`` (in-LLM compressors only): the first
        ``prompt_lengths`` tokens are the prompt; only they serve as the probe's query rows
        (e.g. FastV's last token is the last prompt token), so a forward pass over prompt +
        answer drops the same image tokens as ``prefill`` of the prompt. Default: all tokens.
        """
        embeds, positions, spliced_lengths, aux = self.embed_inputs(tokens, images, lengths)
        query_end = spliced_lengths
        if prompt_lengths is not None:
            pl = jnp.asarray(prompt_lengths, jnp.int32)
            if pl.shape != spliced_lengths.shape:
                raise ValueError(
                    f"prompt_lengths shape={tuple(pl.shape)}: expected int "
                    f"[{spliced_lengths.shape[0]}]"
                )
            last = jnp.clip(pl - 1, 0, aux["text_index"].shape[1] - 1)
            end = jnp.take_along_axis(aux["text_index"], last[:, None], axis=1)[:, 0] + 1
            query_end = jnp.where(pl > 0, jnp.minimum(end, spliced_lengths), 0)
        hook, block_fn = self._in_llm_hooks(images, aux, query_end, layer_hook)
        out = self.language(
            embeds,
            positions=positions,
            lengths=spliced_lengths,
            layer_hook=hook,
            block_fn=block_fn,
            # After an in-LLM drop the logits are read below (dropped positions remapped).
            logits_at=aux["text_index"]
            if hook is layer_hook
            else jnp.zeros((embeds.shape[0], 1), jnp.int32),
        )
        logits = out.logits
        if hook is not layer_hook:
            logits = self._logits_after_drop(out, aux["text_index"])
        aux = {**aux, "positions": positions, "hook_extra": out.state.extra}
        if "visual_tokens" in out.state.extra:
            aux["visual_tokens_per_layer"] = out.state.extra["visual_tokens"]
        return MLLMOutput(logits=logits, aux=aux)

    def _in_llm_hooks(self, images, aux, query_end, layer_hook):
        """``(layer_hook, block_fn)`` (:func:`in_llm_hooks`); the user's hook alone without
        images or without an in-LLM compressor."""
        if self.in_llm_compressor is None or images is None:
            return layer_hook, None
        n = int(aux["keep_idx"].shape[1])
        return in_llm_hooks(
            self.in_llm_compressor, self.language, aux["token_types"], query_end, n, layer_hook
        )

    def _logits_after_drop(self, out, index: jax.Array) -> jax.Array:
        return logits_after_drop(self.language, out, index)

    def prefill(
        self,
        tokens: jax.Array,
        images: jax.Array | None,
        lengths: jax.Array | None,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache, dict]:
        """Writes the spliced prompt into ``cache`` (positions continue at ``cache.positions``).

        Returns float32 logits ``[B, V]`` at each row's last valid (spliced) position, the cache
        and ``aux`` (as in ``__call__``). The cache needs ``spliced_length(...)`` free slots.
        """
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache={type(cache).__name__}: expected a KVCache")  # noqa: TRY004
        embeds, positions, spliced_lengths, aux = self.embed_inputs(
            tokens, images, lengths, start=cache.positions
        )
        last = jnp.maximum(spliced_lengths - 1, 0)[:, None]
        hook, block_fn = self._in_llm_hooks(images, aux, spliced_lengths, None)
        out = self.language(
            embeds,
            positions=positions,
            lengths=spliced_lengths,
            cache=cache,
            layer_hook=hook,
            block_fn=block_fn,
            logits_at=last,
        )
        logits = out.logits if hook is None else self._logits_after_drop(out, last)
        aux = {**aux, "positions": positions, "hook_extra": out.state.extra}
        if "visual_tokens" in out.state.extra:
            aux["visual_tokens_per_layer"] = out.state.extra["visual_tokens"]
        return logits[:, 0], out.cache, aux

    def decode(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One decode step: ``tokens [B, 1]`` -> (float32 logits ``[B, V]``, cache)."""
        return self.language.decode(tokens, cache)
