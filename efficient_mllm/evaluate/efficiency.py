"""Efficiency accounting for visual-token compression: tokens, FLOPs, KV bytes, latency.

Every number reported next to an accuracy (ARCHITECTURE.md, convention 11):

* **Visual tokens at the LLM input** -- valid image tokens spliced into the decoder input
  (``aux["num_image_tokens"]``; a compressor with a ``valid`` mask counts its valid slots).
* **Layer-averaged visual tokens** -- ``mean_l v_l`` over the ``depth`` decoder blocks, ``v_l``
  the image tokens block ``l`` processed (the "average tokens" FastV / SparseVLM report). In-LLM
  compressors record ``v_l`` in ``aux["visual_tokens_per_layer"]`` (``compress.in_llm``);
  without one every block sees the input count.
* **Analytic prefill FLOPs** (multiply-add = 2 FLOPs, matrix products only) of one example,
  from the per-layer token counts ``T_l = text_l + v_l``:

  - decoder block with ``T`` tokens (model width ``D``, ``Hq`` query / ``Hkv`` key-value heads
    of size ``d``, SwiGLU width ``F``):
    ``2 T (D Hq d + 2 D Hkv d + Hq d D) + 2 T (3 D F)`` for the projections and the MLP, plus
    attention ``QK^T`` and ``AV``: ``2 * 2 d Hq * pairs`` with ``pairs = T (T + 1) / 2`` for a
    causal prefill (each query sees itself and the tokens before it: the causal halving of the
    ``4 T^2 d Hq`` dense term) or ``T^2`` without halving (what a dense XLA kernel computes);
  - LM head: ``2 D V`` per position whose logits are taken (1 at prefill: the last token);
  - ViT (``Nv = patches + CLS`` tokens, width ``Dv``, MLP ``Fv``): patch embedding
    ``2 Np (p^2 C) Dv`` plus per block ``2 Nv (4 Dv^2) + 2 Nv (2 Dv Fv) + 4 Nv^2 Dv``
    (bidirectional: no halving);
  - projector (``mlp2x_gelu`` after an ``s x s`` pixel shuffle, ``N = Np / s^2`` tokens):
    ``2 N (s^2 Dv) D + 2 N D^2``;
  - InternVL: the same per tile (``images`` = tiles per example); Qwen2-VL / Qwen2.5-VL: the
    ViT on the image's patch grid with its attention windows and the patch merger
    (:func:`vision_flops`).

  Placeholder models (Qwen2-VL / Qwen2.5-VL / InternVL, ``nn.placeholder_mllm``) report no
  ``num_image_tokens`` / ``spliced_lengths`` from ``prefill``: the prompt's image slots give
  them, or, with a pre-LLM compressor, the decoder input that block 0 cached.

  Not counted: element-wise work (norms, softmax, RoPE, activations), embedding lookups, and
  the small probes compressors run (a few query rows against the keys of one block, or the
  ViT's CLS row), which are ``O(T)`` per head rather than ``O(T^2)``.
* **KV-cache bytes** of the prompt: ``sum_l T_l * 2 * Hkv * d * itemsize``, cross-checked
  against a real cache's per-layer lengths after a prefill (:func:`cache_row_bytes`, which sums
  to ``KVCache.used_nbytes()``).
* **Latency**: median wall time of a jitted prefill and of one jitted decode step, after
  warm-up, with ``jax.block_until_ready`` (:func:`time_call`, :func:`measure_latency`), on a
  cache sized as ``generate`` sizes it or fitted per layer to the compressed prompt
  (:func:`fitted_capacity`).
* **Accuracy as % of the uncompressed model**: :func:`relative_accuracy`.

    >>> rep = account(model, prompt_tokens, images, prompt_lengths)   # one jitted prefill
    >>> rep["visual_tokens"], rep["layer_avg_visual_tokens"], rep["prefill_gflops"]
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm.kvcache.cache import KVCache

__all__ = [
    "decoder_layer_flops",
    "language_flops",
    "vision_flops",
    "prefill_flops",
    "tokens_per_layer",
    "layer_averaged_tokens",
    "kv_cache_bytes",
    "cache_row_bytes",
    "time_call",
    "fitted_capacity",
    "measure_latency",
    "relative_accuracy",
    "prompt_batch",
    "account",
    "account_batches",
]


def _cfgs(cfg: Any):
    """``(language_cfg, mllm_cfg | None)`` of an ``MLLMConfig`` / ``LanguageConfig`` / model."""
    cfg = getattr(cfg, "cfg", cfg)
    if hasattr(cfg, "language"):
        return cfg.language, cfg
    for attr in ("width", "depth", "heads", "kv_heads", "head_dim", "mlp_dim", "vocab_size"):
        if not hasattr(cfg, attr):
            raise ValueError(
                f"cfg={type(cfg).__name__}: expected an MLLMConfig, a LanguageConfig or a model "
                f"holding one (missing {attr!r})"
            )
    return cfg, None


def _check_count(name: str, value: Any) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
    return v


# -- FLOPs -----------------------------------------------------------------------------------


def decoder_layer_flops(
    cfg: Any, tokens: float, *, context: float = 0.0, causal: bool = True
) -> float:
    """Matrix-product FLOPs of one decoder block on ``tokens`` new tokens.

    ``context``: keys already in the cache before them (0 at prefill; the current length at a
    decode step). Causal: query ``i`` of the new tokens attends to ``context + i + 1`` keys;
    ``causal=False`` counts every query against all ``context + tokens`` keys (a dense kernel's
    work, what a jaxpr count of the XLA reference sees).
    """
    lang, _ = _cfgs(cfg)
    t = _check_count("tokens", tokens)
    c = _check_count("context", context)
    d, hq, hkv, hd, f = lang.width, lang.heads, lang.kv_heads, lang.head_dim, lang.mlp_dim
    proj = 2.0 * t * (d * hq * hd + 2 * d * hkv * hd + hq * hd * d)
    mlp = 2.0 * t * 3 * d * f
    pairs = t * c + t * (t + 1) / 2.0 if causal else t * (c + t)
    attn = 2.0 * 2.0 * hd * hq * pairs
    return proj + mlp + attn


def language_flops(
    cfg: Any,
    tokens_per_layer: Sequence[float],
    *,
    causal: bool = True,
    logits_tokens: float = 1.0,
) -> dict[str, float]:
    """Prefill FLOPs of the decoder: ``{"blocks", "lm_head", "total"}`` for one example whose
    block ``l`` sees ``tokens_per_layer[l]`` tokens; ``logits_tokens`` positions go through the
    LM head (1 at prefill, ``T`` for a full forward)."""
    lang, _ = _cfgs(cfg)
    tpl = [float(x) for x in tokens_per_layer]
    if len(tpl) != lang.depth:
        raise ValueError(
            f"tokens_per_layer has {len(tpl)} entries: expected one per decoder layer "
            f"({lang.depth})"
        )
    blocks = sum(decoder_layer_flops(lang, t, causal=causal) for t in tpl)
    head = 2.0 * _check_count("logits_tokens", logits_tokens) * lang.width * lang.vocab_size
    return {"blocks": blocks, "lm_head": head, "total": blocks + head}


def vision_flops(cfg: Any, *, grid: tuple[int, int] | None = None) -> dict[str, float]:
    """FLOPs of encoding one image: ``{"vit", "projector", "total"}`` (see the module
    docstring); zeros for a text-only model.

    InternVL (``InternVLConfig``): one tile (InternViT with [CLS], pixel shuffle by
    ``1 / downsample_ratio``, two-layer projector); ``images`` in :func:`prefill_flops` counts
    tiles. Qwen2-VL / Qwen2.5-VL (``QwenVLConfig``): one image of patch grid ``grid = (gh, gw)``
    (default ``cfg.grid`` when ``cfg`` is a model holding one, as ``BatchedQwenVL``): patch
    embedding ``2 N (C T P^2) Dv``, per block ``2 N (4 Dv^2) + MLP`` (``2 N 2 Dv F`` GELU,
    ``2 N 3 Dv F`` SwiGLU) plus attention ``4 Dv sum_w n_w^2`` over its attention windows
    (one window of ``N`` patches for full-attention blocks, Qwen2.5-VL's
    ``window_size`` windows otherwise), merger ``2 (N / m^2) ((m^2 Dv)^2 + m^2 Dv D)``."""
    lang, mcfg = _cfgs(cfg)
    if mcfg is None or getattr(mcfg, "vision", None) is None:
        return {"vit": 0.0, "projector": 0.0, "total": 0.0}
    v = mcfg.vision
    if hasattr(v, "spatial_merge_size"):  # Qwen2-VL / Qwen2.5-VL vision tower
        return _qwen_vision_flops(v, lang, grid if grid is not None else getattr(cfg, "grid", None))
    if hasattr(mcfg, "downsample_ratio"):  # InternVL: one tile, [CLS] + patches
        s = int(round(1.0 / mcfg.downsample_ratio))
        np_, nv = v.num_patches, v.num_patches + 1
    elif hasattr(v, "num_tokens") and hasattr(mcfg, "pixel_shuffle"):  # LLaVA layout
        s = mcfg.pixel_shuffle
        np_, nv = v.num_patches, v.num_tokens  # patches + CLS
    else:
        raise ValueError(
            f"vision_flops: no FLOP formula for {type(mcfg).__name__} with vision "
            f"{type(v).__name__}; expected an MLLMConfig (LLaVA layout), InternVLConfig or "
            "QwenVLConfig"
        )
    dv, fv = v.width, v.mlp_dim
    patch = 2.0 * np_ * (v.patch_size**2 * v.channels) * dv
    per_block = 2.0 * nv * 4 * dv * dv + 2.0 * nv * 2 * dv * fv + 4.0 * nv * nv * dv
    vit = patch + v.depth * per_block
    n = np_ // (s * s)
    proj = 2.0 * n * (s * s * dv) * lang.width + 2.0 * n * lang.width * lang.width
    return {"vit": vit, "projector": proj, "total": vit + proj}


def _window_sizes(grid: tuple[int, int], v: Any) -> list[int]:
    """Patches per attention window of a Qwen2.5-VL windowed block (edge windows partial)."""
    m = v.spatial_merge_size
    side = v.window_size // m // v.patch_size  # merged tokens per window side
    gh, gw = grid[0] // m, grid[1] // m

    def chunks(n):
        return [min(side, n - i) for i in range(0, n, side)]

    return [a * b * m * m for a in chunks(gh) for b in chunks(gw)]


def _qwen_vision_flops(v: Any, lang: Any, grid: Any) -> dict[str, float]:
    if grid is None:
        raise ValueError(
            "vision_flops: a Qwen2-VL / Qwen2.5-VL image's FLOPs depend on its patch grid; "
            "expected grid=(gh, gw) or a model holding one (BatchedQwenVL)"
        )
    gh, gw = (int(x) for x in grid)
    m = v.spatial_merge_size
    if gh < 1 or gw < 1 or gh % m or gw % m:
        raise ValueError(f"grid={grid!r}: expected positive sides divisible by merge size {m}")
    n = gh * gw
    dv, fv = v.width, v.mlp_dim
    patch = 2.0 * n * (v.in_channels * v.temporal_patch_size * v.patch_size**2) * dv
    mlp = 2.0 * n * (3 if v.mlp == "swiglu" else 2) * dv * fv
    full = 4.0 * dv * n * n
    windowed = full if not v.window_size else 4.0 * dv * sum(w * w for w in _window_sizes(
        (gh, gw), v))
    vit = patch
    for i in range(v.depth):
        att = full if (not v.window_size or i in tuple(v.fullatt_block_indexes)) else windowed
        vit += 2.0 * n * 4 * dv * dv + mlp + att
    hm = m * m * dv
    proj = 2.0 * (n // (m * m)) * (hm * hm + hm * lang.width)
    return {"vit": vit, "projector": proj, "total": vit + proj}


def prefill_flops(
    cfg: Any,
    tokens_per_layer: Sequence[float],
    *,
    images: float = 1.0,
    causal: bool = True,
    logits_tokens: float = 1.0,
) -> dict[str, float]:
    """Prefill FLOPs of one example: ``{"vit", "projector", "llm", "lm_head", "total"}``
    (``images`` encoded per example; ``llm`` = the decoder blocks)."""
    vis = vision_flops(cfg)
    llm = language_flops(cfg, tokens_per_layer, causal=causal, logits_tokens=logits_tokens)
    n = _check_count("images", images)
    out = {
        "vit": n * vis["vit"],
        "projector": n * vis["projector"],
        "llm": llm["blocks"],
        "lm_head": llm["lm_head"],
    }
    out["total"] = sum(out.values())
    return out


# -- tokens and KV bytes ---------------------------------------------------------------------


def tokens_per_layer(aux: Mapping[str, Any], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """``(visual [B, depth], total [B, depth])`` tokens each decoder block processed, from the
    ``aux`` of ``MLLM.__call__`` / ``MLLM.prefill``.

    ``total = spliced_lengths - num_image_tokens + visual``: in-LLM compressors drop or route
    image tokens only, so every block sees all valid text tokens.
    """
    for k in ("num_image_tokens", "spliced_lengths"):
        if k not in aux:
            raise ValueError(f"aux is missing {k!r}: expected the aux dict of an MLLM call")
    n_img = np.asarray(jax.device_get(aux["num_image_tokens"]), np.int64)
    spliced = np.asarray(jax.device_get(aux["spliced_lengths"]), np.int64)
    vt = aux.get("visual_tokens_per_layer")
    if vt is None:
        visual = np.repeat(n_img[:, None], depth, axis=1)
    else:
        visual = np.asarray(jax.device_get(vt), np.int64)
        if visual.shape != (n_img.shape[0], depth):
            raise ValueError(
                f"aux['visual_tokens_per_layer'] shape={visual.shape}: expected "
                f"[{n_img.shape[0]}, {depth}]"
            )
    total = spliced[:, None] - n_img[:, None] + visual
    return visual, total


def layer_averaged_tokens(visual_per_layer: Any) -> np.ndarray | float:
    """Mean over decoder layers of the visual tokens each layer processed: ``[..., depth]`` ->
    ``[...]`` (a float for one schedule)."""
    v = np.asarray(visual_per_layer, np.float64)
    if v.ndim == 0 or v.shape[-1] == 0:
        raise ValueError(f"visual_per_layer shape={v.shape}: expected [..., depth] with depth > 0")
    out = v.mean(axis=-1)
    return float(out) if out.ndim == 0 else out


def kv_cache_bytes(cfg: Any, tokens_per_layer: Any, dtype: Any = None) -> np.ndarray | int:
    """KV-cache bytes holding ``tokens_per_layer [..., depth]`` tokens:
    ``sum_l T_l * 2 * kv_heads * head_dim * itemsize`` (``dtype`` default the model's compute
    dtype, as ``KVCache.init(config)`` allocates)."""
    lang, _ = _cfgs(cfg)
    t = np.asarray(tokens_per_layer, np.int64)
    if t.ndim == 0 or t.shape[-1] != lang.depth:
        raise ValueError(
            f"tokens_per_layer shape={t.shape}: expected [..., {lang.depth}] (one per layer)"
        )
    item = jnp.dtype(lang.dtype if dtype is None else dtype).itemsize
    out = t.sum(axis=-1) * 2 * lang.kv_heads * lang.head_dim * item
    return int(out) if out.ndim == 0 else out


def cache_row_bytes(cache: KVCache) -> np.ndarray:
    """int64 ``[B]``: filled key/value bytes of each row of a real cache (per-layer lengths);
    its sum equals ``cache.used_nbytes()``."""
    out = 0
    for layer in cache.layers:
        per_slot = 2 * layer.k.shape[2] * layer.k.shape[3] * jnp.dtype(layer.k.dtype).itemsize
        n = np.minimum(np.asarray(jax.device_get(layer.length), np.int64), layer.capacity)
        out = out + n * per_slot
    return np.asarray(out, np.int64)


# -- latency ---------------------------------------------------------------------------------


def time_call(
    fn: Callable[..., Any], *args: Any, warmup: int = 1, repeats: int = 5
) -> dict[str, Any]:
    """Wall time of ``fn(*args)`` (blocked until ready): ``warmup`` untimed calls (the first
    compiles a jitted ``fn``), then ``repeats`` timed ones. Returns ``{"median_s", "min_s",
    "times_s", "output"}``."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: expected an int >= 0")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: expected an int >= 1")
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "output": out,
    }


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def _prefill_jit(graphdef, state, tokens, images, lengths, *, capacity):
    model = nnx.merge(graphdef, state)
    cache = model.language.init_cache(tokens.shape[0], capacity)
    logits, cache, aux = model.prefill(tokens, images, lengths, cache)
    keep = ("num_image_tokens", "spliced_lengths", "visual_tokens_per_layer")
    aux = {k: aux[k] for k in keep if k in aux}
    if images is not None and "spliced_lengths" not in aux:
        aux.update(_placeholder_counts(model, tokens, lengths, cache))
    return logits, cache, aux


def _placeholder_counts(model, tokens, lengths, cache) -> dict:
    """``num_image_tokens`` / ``spliced_lengths`` of a placeholder model's prefill (its aux has
    neither): text = valid non-image tokens; a pre-LLM compressor drops image slots before the
    decoder, so its decoder input is what block 0 cached (``cache.layers[0].length``), else the
    prompt is unchanged (in-LLM drops are in ``visual_tokens_per_layer``)."""
    valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    is_img = (tokens == model.cfg.image_token_id) & valid
    if getattr(model, "compressor", None) is not None:
        fed = cache.layers[0].length.astype(jnp.int32)
        text = jnp.sum(valid & ~is_img, axis=1).astype(jnp.int32)
        return {"num_image_tokens": fed - text, "spliced_lengths": fed}
    return {"num_image_tokens": jnp.sum(is_img, axis=1).astype(jnp.int32),
            "spliced_lengths": lengths.astype(jnp.int32)}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_jit(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).decode(tokens, cache)


def _capacity(model: Any, tokens: Any, images: Any) -> int:
    """Static spliced prompt length of a batch (the KV slots its prefill fills)."""
    if not hasattr(model, "spliced_length"):  # placeholder models: no splicing
        return int(model.prompt_length(np.shape(tokens), images))
    return int(model.spliced_length(np.shape(tokens), None if images is None else np.shape(images)))


def fitted_capacity(tokens_per_layer: Any, extra: int = 1) -> tuple[int, ...]:
    """Per-layer KV capacity that holds ``tokens_per_layer [B, depth]`` (the most over rows)
    plus ``extra`` decode slots: the cache a deployment of an in-LLM compressor allocates
    (layers after a drop hold fewer tokens; ``KVCache`` takes per-layer capacities)."""
    t = np.asarray(tokens_per_layer, np.int64)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"tokens_per_layer shape={t.shape}: expected [B, depth] with B > 0")
    if isinstance(extra, bool) or not isinstance(extra, (int, np.integer)) or extra < 0:
        raise ValueError(f"extra={extra!r}: expected an int >= 0")
    return tuple(int(c) + int(extra) for c in np.maximum(t.max(axis=0), 1))


def measure_latency(
    model: Any,
    tokens: Any,
    images: Any = None,
    lengths: Any = None,
    *,
    warmup: int = 1,
    repeats: int = 5,
    capacity: int | Sequence[int] | None = None,
) -> dict[str, float]:
    """Median prefill time of the prompt batch and of one decode step after it, in ms.

    Both are jitted (compiled in the warm-up calls), timed with ``block_until_ready``; the
    decode step runs on the prefilled cache with the greedy next token, so it measures one
    token at this context length. ``capacity``: KV slots per row, one int or one per layer
    (:func:`fitted_capacity`); default the spliced prompt + 1 in every layer, as ``generate``
    allocates. Every layer needs room for the tokens it caches plus the decoded one (writes past
    the capacity are dropped, not raised, under ``jit``).
    """
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    b = tokens.shape[0]
    lengths = jnp.full((b,), tokens.shape[1], jnp.int32) if lengths is None else jnp.asarray(
        lengths, jnp.int32
    )
    images = None if images is None else jnp.asarray(images)
    if capacity is None:
        cap = _capacity(model, tokens, images) + 1
    elif isinstance(capacity, (int, np.integer)) and not isinstance(capacity, bool):
        cap = int(capacity)
    else:
        cap = tuple(int(c) for c in capacity)
    pre = time_call(
        lambda s, t, i, ln: _prefill_jit(graphdef, s, t, i, ln, capacity=cap),
        state, tokens, images, lengths, warmup=max(warmup, 1), repeats=repeats,
    )
    logits, cache, _ = pre["output"]
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
    dec = time_call(
        lambda s, t, c: _decode_jit(graphdef, s, t, c),
        state, nxt, cache, warmup=max(warmup, 1), repeats=repeats,
    )
    return {
        "batch": int(b),
        "prefill_ms": 1e3 * pre["median_s"],
        "decode_ms_per_token": 1e3 * dec["median_s"],
        "prefill_ms_min": 1e3 * pre["min_s"],
        "decode_ms_min": 1e3 * dec["min_s"],
        "kv_capacity": list(cache.capacities),
    }


def relative_accuracy(accuracy: float, baseline: float) -> float:
    """Accuracy as a percentage of the uncompressed model's (``nan`` when the baseline is 0)."""
    a, b = float(accuracy), float(baseline)
    if not math.isfinite(b) or b <= 0:
        return float("nan")
    return 100.0 * a / b


# -- one batch -------------------------------------------------------------------------------


def prompt_batch(batch: Mapping[str, Any], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The prompts of a data batch, as ``ExactMatch`` generates from them: ``tokens[:, :P]``
    with positions past each row's ``prompt_lengths`` set to ``pad_id`` (``P`` the longest
    prompt), and ``prompt_lengths``."""
    for k in ("tokens", "prompt_lengths"):
        if k not in batch:
            raise ValueError(f"batch is missing {k!r}: expected a data batch with prompts")
    plen = np.asarray(batch["prompt_lengths"], np.int32)
    width = int(plen.max())
    toks = np.asarray(batch["tokens"])[:, :width]
    toks = np.where(np.arange(width)[None, :] < plen[:, None], toks, pad_id).astype(np.int32)
    return toks, plen


def _prefill_rows(model: Any, tokens: Any, images: Any, lengths: Any):
    """One jitted prefill: ``(visual [B, depth], total [B, depth], kv_bytes [B],
    kv_bytes_cache [B], cache)``."""
    lang, _ = _cfgs(model)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    b = tokens.shape[0]
    lengths = jnp.full((b,), tokens.shape[1], jnp.int32) if lengths is None else jnp.asarray(
        lengths, jnp.int32
    )
    images = None if images is None else jnp.asarray(images)
    cap = _capacity(model, tokens, images) + 1  # + 1: the same compile as measure_latency's
    _, cache, aux = _prefill_jit(graphdef, state, tokens, images, lengths, capacity=cap)
    visual, total = tokens_per_layer(aux, lang.depth)
    kv = np.asarray(kv_cache_bytes(model, total))
    return visual, total, kv, cache_row_bytes(cache), cache


def _images_per_example(images: Any) -> float:
    """Images (InternVL: tiles ``[B, tiles, S, S, C]``) each row encodes."""
    if images is None:
        return 0.0
    return float(np.shape(images)[1]) if np.ndim(images) == 5 else 1.0


def _summarize(model: Any, visual, total, kv, kv_real, ok, n_images: float) -> dict[str, Any]:
    if not ok.any():
        raise ValueError("valid: no row to count; expected at least one True")
    flops = [prefill_flops(model, total[i], images=n_images) for i in np.nonzero(ok)[0]]
    mean_flops = {k: float(np.mean([f[k] for f in flops])) for k in flops[0]}
    return {
        "examples": int(ok.sum()),
        "visual_tokens": float(visual[ok, 0].mean()),
        "layer_avg_visual_tokens": float(layer_averaged_tokens(visual[ok]).mean()),
        "prompt_tokens": float(total[ok, 0].mean()),
        "layer_avg_prompt_tokens": float(total[ok].mean()),
        "prefill_flops": mean_flops,
        "prefill_gflops": mean_flops["total"] / 1e9,
        "kv_bytes": float(kv[ok].mean()),
        "kv_bytes_cache": float(kv_real[ok].mean()),
        "kv_match": bool(np.array_equal(kv[ok], kv_real[ok])),
        "rows": {
            "visual_per_layer": visual,
            "tokens_per_layer": total,
            "kv_bytes": kv,
            "kv_bytes_cache": kv_real,
            "valid": ok,
        },
    }


def account(
    model: Any,
    tokens: Any,
    images: Any = None,
    lengths: Any = None,
    *,
    valid: Any = None,
) -> dict[str, Any]:
    """Token counts, analytic FLOPs and KV bytes of a prompt batch, from one jitted prefill.

    ``tokens [B, T]`` prompts (right-padded, ``lengths`` valid), ``images [B, H, W, C]``;
    ``valid [B]`` marks the rows to count (padding rows of a last batch are False). Returns
    per-example means over the valid rows: ``visual_tokens`` (at the LLM input; block 0 sees
    them all), ``layer_avg_visual_tokens``, ``prompt_tokens`` (decoder input),
    ``layer_avg_prompt_tokens``, ``prefill_flops`` (dict, see :func:`prefill_flops`),
    ``prefill_gflops``, ``kv_bytes`` (analytic) and ``kv_bytes_cache`` (the real cache's filled
    bytes; ``kv_match`` says whether every row agrees), plus the per-row arrays in ``rows``
    and ``rows["cache_used_nbytes"]`` (``KVCache.used_nbytes()`` of the whole batch).
    """
    visual, total, kv, kv_real, cache = _prefill_rows(model, tokens, images, lengths)
    b = visual.shape[0]
    ok = np.ones(b, bool) if valid is None else np.asarray(valid, bool).reshape(b)
    out = _summarize(model, visual, total, kv, kv_real, ok, _images_per_example(images))
    out["rows"]["cache_used_nbytes"] = int(cache.used_nbytes())  # all rows, padding included
    return out


def account_batches(
    model: Any, batches: Iterable[Mapping[str, Any]], *, pad_id: int = 0
) -> dict[str, Any]:
    """:func:`account` over data batches (``tokens``, ``prompt_lengths``, optional ``image``
    and ``valid``), on each batch's prompts (:func:`prompt_batch`); means over all valid rows."""
    parts = []
    n_images = 0.0
    for batch in batches:
        toks, plen = prompt_batch(batch, pad_id)
        images = batch.get("image")
        n_images = _images_per_example(images)
        rows = _prefill_rows(model, toks, images, plen)[:4]
        ok = (
            np.ones(len(toks), bool)
            if "valid" not in batch
            else np.asarray(batch["valid"], bool).reshape(len(toks))
        )
        parts.append((*rows, ok))
    if not parts:
        raise ValueError("batches: no batch to account; expected at least one")
    cat = [np.concatenate([p[i] for p in parts], axis=0) for i in range(5)]
    return _summarize(model, *cat, n_images)
