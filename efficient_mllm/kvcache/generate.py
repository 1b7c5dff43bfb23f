"""Autoregressive generation with a KV cache: prefill, then a jitted decode loop.

``generate`` works with an ``MLLM`` (text + optional images) and with a bare ``LanguageModel``
(text only). The whole request (prefill and the ``lax.while_loop`` of decode steps) is one
``jax.jit``-compiled function, compiled once per input shape, ``max_new_tokens``, cache
capacity, stop tokens and sampling mode (greedy / sampling / nucleus; the values of
``temperature`` and ``top_p`` are traced) and reused across calls; the decode step is traced
once, not per step. The loop stops early once every row has emitted a stop token.

The cache capacity is checked statically before tracing: the (spliced) prompt length plus
``max_new_tokens`` must fit, since writes under ``jit`` cannot raise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


__all__ = ["GenerateOutput", "generate", "sample_logits"]


class GenerateOutput(NamedTuple):
    """``tokens`` int32 ``[B, max_new_tokens]`` (``pad_id`` after a row finished), ``lengths``
    int32 ``[B]`` (generated tokens up to and including the stop token), ``finished`` bool ``[B]``
    (the row emitted a stop token)."""

    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array


def sample_logits(
    logits: jax.Array,
    rng: jax.Array | None,
    *,
    temperature: float | jax.Array = 0.0,
    top_p: float | jax.Array = 1.0,
    greedy: bool | None = None,
    nucleus: bool | None = None,
) -> jax.Array:
    """Picks one token per row from ``logits [B, V]``.

    Greedy (argmax) when ``temperature == 0``. Otherwise the logits are divided by
    ``temperature``, restricted to the smallest set of most likely tokens whose probability
    reaches ``top_p`` (nucleus sampling; the most likely token is always kept, so ``top_p -> 0``
    is greedy), and sampled with ``rng``. ``temperature`` and ``top_p`` may be traced; then pass
    the static switches ``greedy`` (temperature is 0) and ``nucleus`` (top_p < 1).
    """
    if greedy is None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        greedy = temperature == 0
    if nucleus is None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        nucleus = top_p < 1.0
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("rng must be a PRNG key when temperature > 0 (sampling)")
    logits = logits / temperature
    if nucleus:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < top_p).at[:, 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _is_mllm(model: Any) -> bool:
    from efficient_mllm.nn.mllm import MLLM

    return isinstance(model, MLLM)


def _is_placeholder_mllm(model: Any) -> bool:
    """Models whose prompts hold one image token per image feature (Qwen2-VL, InternVL)."""
    from efficient_mllm.nn.placeholder_mllm import PlaceholderMLLM

    return isinstance(model, PlaceholderMLLM)


def _check_model(model: Any) -> None:
    from efficient_mllm.nn.language import LanguageModel
    from efficient_mllm.nn.mllm import MLLM

    if not isinstance(model, (MLLM, LanguageModel)) and not _is_placeholder_mllm(model):
        raise ValueError(  # noqa: TRY004  (bad input is a ValueError throughout the package)
            f"model must be an MLLM, a PlaceholderMLLM or a LanguageModel, got "
            f"{type(model).__name__}"
        )


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "greedy",
        "nucleus",
        "stop_tokens",
        "capacity",
        "pad_id",
    ),
)
def _generate_jit(
    graphdef,
    state,
    tokens,
    images,
    lengths,
    rng,
    temperature,
    top_p,
    *,
    max_new_tokens,
    greedy,
    nucleus,
    stop_tokens,
    capacity,
    pad_id,
):
    model = nnx.merge(graphdef, state)
    mllm = _is_mllm(model) or _is_placeholder_mllm(model)
    batch = tokens.shape[0]
    cache = getattr(model, "language", model).init_cache(batch, capacity)
    if mllm:
        logits, cache, _ = model.prefill(tokens, images, lengths, cache)
    else:
        logits, cache = model.prefill(tokens, lengths, cache)
    stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, _, finished = carry
        return (i < max_new_tokens) & ~jnp.all(finished)

    def body(carry):
        i, logits, cache, out, gen_len, finished = carry
        step_rng = None if rng is None else jax.random.fold_in(rng, i)
        tok = sample_logits(
            logits, step_rng, temperature=temperature, top_p=top_p, greedy=greedy, nucleus=nucleus
        )
        tok = jnp.where(finished, jnp.int32(pad_id), tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        gen_len = gen_len + (~finished).astype(jnp.int32)
        finished = finished | (jnp.isin(tok, stop) & bool(stop_tokens))

        def step(c):
            return model.decode(tok[:, None], c)

        more = (i + 1 < max_new_tokens) & ~jnp.all(finished)
        logits, cache = jax.lax.cond(more, step, lambda c: (logits, c), cache)
        return i + 1, logits, cache, out, gen_len, finished

    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    carry = (
        jnp.int32(0),
        logits.astype(jnp.float32),
        cache,
        out,
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    _, _, _, out, gen_len, finished = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens=out, lengths=gen_len, finished=finished)


def generate(
    model: Any,
    tokens: jax.Array,
    *,
    images: jax.Array | None = None,
    lengths: jax.Array | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    rng: jax.Array | None = None,
    cache_capacity: int | None = None,
    pad_id: int = 0,
) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` per row after the prompt ``tokens [B, T]``.

    Args:
      model: an ``MLLM`` (``images [B, H, W, C]`` optional), a ``PlaceholderMLLM`` (Qwen2-VL,
        InternVL: ``images`` in the model's format, prompts hold one image token per feature)
        or a ``LanguageModel`` (text only).
      tokens: int32 ``[B, T]`` prompts, right-padded; multimodal rows hold one image placeholder.
      lengths: int32 ``[B]`` valid prompt tokens per row (default: ``T`` for every row).
      max_new_tokens: static number of decode steps at most.
      temperature: 0 for greedy decoding, > 0 for sampling (needs ``rng``).
      top_p: nucleus sampling mass in (0, 1].
      stop_tokens: token ids that end a row (the stop token is included in the output).
      rng: PRNG key for sampling; the same key gives the same samples.
      cache_capacity: KV slots per row; default exactly the spliced prompt length plus
        ``max_new_tokens``. A smaller capacity raises ``ValueError``.
      pad_id: written after a row has finished.
    """
    _check_model(model)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype}{tokens.shape}")
    tokens = tokens.astype(jnp.int32)
    batch, t = tokens.shape
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature > 0 and rng is None:
        raise ValueError("rng must be a PRNG key when temperature > 0 (sampling)")
    if lengths is None:
        lengths = jnp.full((batch,), t, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}], got {lengths.shape}")
    if _is_mllm(model):
        model._check_tokens(tokens, images, lengths)  # placeholders / image shape, eagerly
        prompt_len = model.spliced_length(tokens.shape, None if images is None else images.shape)
    elif _is_placeholder_mllm(model):
        model.check_inputs(tokens, images, lengths)  # image-token count, eagerly
        prompt_len = model.prompt_length(tokens.shape, images)
    else:
        if images is not None:
            raise ValueError("images were given but model is a text-only LanguageModel")
        prompt_len = t
    needed = prompt_len + int(max_new_tokens)
    if cache_capacity is None:
        cache_capacity = needed
    elif cache_capacity < needed:
        raise ValueError(
            f"cache_capacity={cache_capacity} is too small: the prompt takes {prompt_len} slots "
            f"and max_new_tokens={max_new_tokens} more, so at least {needed} are needed"
        )
    stop_tokens = tuple(int(s) for s in stop_tokens)
    graphdef, state = nnx.split(model)
    greedy = temperature == 0
    return _generate_jit(
        graphdef,
        state,
        tokens,
        images,
        lengths,
        None if greedy else rng,
        jnp.float32(temperature),
        jnp.float32(top_p),
        max_new_tokens=int(max_new_tokens),
        greedy=bool(greedy),
        nucleus=bool(top_p < 1.0),
        stop_tokens=stop_tokens,
        capacity=int(cache_capacity),
        pad_id=int(pad_id),
    )
