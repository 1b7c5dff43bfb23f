"""Text-guided pre-LLM selection: FlashVLM.

The MLLM passes the row's text as LLM input embeddings (``text_embeds [B, T, D]``, the token
embedding table applied to ``tokens``), ``text_lengths [B]`` and the placeholder index
``placeholder [B]`` (``T`` for a row without one) in the compressor call, so a selector can
compare image tokens with the instruction in the LLM embedding space before the LLM runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from efficient_mllm import registry
from efficient_mllm.compress import core
from efficient_mllm.compress.cls_attention import NOT_GIVEN, check_fallback, cls_scores

__all__ = ["FlashVLM", "diverse_residual", "flashvlm", "text_relevance"]

_EPS = 1e-6
_METRICS = ("features", "tokens")


def _minmax(x: jax.Array) -> jax.Array:
    lo = jnp.min(x, axis=1, keepdims=True)
    hi = jnp.max(x, axis=1, keepdims=True)
    return (x - lo) / (hi - lo + _EPS)


def _text_mask(b: int, t: int, text_lengths: Any, placeholder: Any) -> jax.Array:
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    mask = jnp.ones((b, t), bool)
    if text_lengths is not None:
        mask = mask & (pos < jnp.asarray(text_lengths, jnp.int32).reshape(b, 1))
    if placeholder is not None:
        mask = mask & (pos != jnp.asarray(placeholder, jnp.int32).reshape(b, 1))
    return mask


def text_relevance(
    tokens: jax.Array,
    text_embeds: jax.Array,
    text_mask: jax.Array,
    *,
    text_temperature: float = 0.05,
    temperature: float = 0.01,
    gamma: float = 2.5,
    top_p: float = 0.005,
    suppress: float = 0.1,
) -> jax.Array:
    """FlashVLM's sharpened text relevance of each image token, float32 ``[B, N]`` in [0, 1].

    ``S = cos(tokens, text)`` ``[B, N, T]`` over the valid text tokens; relevance = the softmax
    (temperature ``text_temperature``) weighted mean of ``S`` over the text, i.e. a soft max;
    then a softmax over the image tokens at ``temperature``, the power ``gamma``, min-max
    normalisation, tokens below the ``1 - top_p`` quantile scaled by ``suppress``, and min-max
    again. Rows without valid text give 0.
    """
    sim = core.cosine_similarity(tokens, text_embeds)  # [B, N, T]
    has_text = jnp.any(text_mask, axis=1)
    logits = jnp.where(text_mask[:, None, :], sim / text_temperature, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1)
    rel = jnp.sum(jnp.where(text_mask[:, None, :], w * sim, 0.0), axis=-1)
    p = jax.nn.softmax(rel / temperature, axis=1) ** gamma
    p = _minmax(p)
    thr = jnp.quantile(p, 1.0 - top_p, axis=1, keepdims=True)
    p = _minmax(jnp.where(p >= thr, p, suppress * p))
    return jnp.where(has_text[:, None], p, 0.0)


def diverse_residual(metric: jax.Array, residual: jax.Array, keep: int, step: int = 8) -> jax.Array:
    """VisPruner-style duplicate removal used by FlashVLM's diversity partition.

    ``residual int32 [B, R]`` (candidate indices, in priority order) shrinks to ``keep``: each
    iteration splits the current list into even / odd positions, scores every even entry by its
    best cosine similarity to an odd entry, and drops the ``r = min(step, R - keep, #even)``
    most redundant even entries; the list becomes ``[kept even (by decreasing score), odd]``.
    Static shapes: the iteration count and each ``r`` are fixed by ``R``, ``keep`` and ``step``.
    """
    if keep == 0:
        return residual[:, :0]
    mf = metric.astype(jnp.float32)
    mf = mf / jnp.maximum(jnp.linalg.norm(mf, axis=-1, keepdims=True), 1e-6)
    b = residual.shape[0]
    rows = jnp.arange(b)[:, None]
    while residual.shape[1] > keep:
        cur = residual.shape[1]
        r = min(step, cur - keep, (cur + 1) // 2)
        even, odd = residual[:, ::2], residual[:, 1::2]
        if odd.shape[1] == 0:
            break
        a = core.gather_tokens(mf, even)
        c = core.gather_tokens(mf, odd)
        score = jnp.max(jnp.einsum("bid,bjd->bij", a, c), axis=-1)
        order = jnp.argsort(-score, axis=1, stable=True)[:, r:]
        residual = jnp.concatenate([even[rows, order], odd], axis=1)
    return residual


@registry.COMPRESSORS.register(
    "flashvlm",
    paper="FlashVLM: Text-Guided Visual Token Selection for Large Multimodal Models "
    "(Cai et al., arXiv:2512.20561, 2025)",
)
def flashvlm(
    keep: int | float,
    eta: float = 0.5,
    important: float = 0.5,
    text_temperature: float = 0.05,
    temperature: float = 0.01,
    gamma: float = 2.5,
    top_p: float = 0.005,
    suppress: float = 0.1,
    diversity_step: int = 8,
    metric: str = "features",
    fallback: str | None = None,
):
    """FlashVLM: keep ``K`` image tokens scored by text relevance fused with visual saliency,
    plus a diverse set of background tokens.

    1. Extrinsic relevance (:func:`text_relevance`): cosine similarity between the projected
       image tokens and the L2-normalised text embeddings in the LLM input space (every valid
       text token of the row except the placeholder: at prefill the prompt; under teacher
       forcing the answer too, as in the reference code), soft-maxed over the text and sharpened
       by a low-temperature softmax over the image, ``** gamma`` and top-``p`` suppression.
    2. Intrinsic saliency: the ViT CLS attention, min-max normalised (an encoder without
       [CLS] needs ``fallback="mean_query"``: the ViT's mean-query attention row instead).
    3. Log-domain fusion: ``score = (1 - eta) log A + eta log T`` (``A``, ``T`` clamped at
       1e-6); the reference's ``exp`` and final min-max are monotone, so top-k is unchanged.
    4. Partition: ``int(important * K)`` top-scoring tokens; the other ``K - int(important*K)``
       come from the remaining tokens (in score order) by :func:`diverse_residual` on the metric
       (ViT features; ``metric="tokens"`` for the projected tokens), which keeps a diverse,
       non-duplicated background set.

    Spec: ``flashvlm(keep=64)`` (or a fraction); the other arguments default to the reference
    code's constants (``eta=0.5``, ``important=0.5``, temperatures 0.05 / 0.01, ``gamma=2.5``,
    ``top_p=0.005``, ``suppress=0.1``, ``diversity_step=8``). Kept tokens are dropped, never
    merged, and keep their original position ids. Without ``text_embeds`` (e.g.
    ``encode_images`` called with no text) the relevance is 0 and the saliency alone ranks.

    Notes: the reference's norm gating of the text embeddings is applied after L2
    normalisation, where it is the identity, so it is omitted. Video (per-frame budgets) is not
    covered; the selection runs per image.
    """
    core.check_budget(keep, "keep")
    for name, v, lo, hi in (
        ("eta", eta, 0.0, 1.0),
        ("important", important, 0.0, 1.0),
        ("top_p", top_p, 0.0, 1.0),
        ("suppress", suppress, 0.0, 1.0),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"{name}={v!r}: expected a number in [{lo}, {hi}]")
    for name, v in (
        ("text_temperature", text_temperature),
        ("temperature", temperature),
        ("gamma", gamma),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name}={v!r}: expected a positive number")
    if (
        isinstance(diversity_step, bool)
        or not isinstance(diversity_step, int)
        or diversity_step < 1
    ):
        raise ValueError(f"diversity_step={diversity_step!r}: expected an int >= 1")
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {_METRICS}")
    return FlashVLM(
        keep,
        float(eta),
        float(important),
        float(text_temperature),
        float(temperature),
        float(gamma),
        float(top_p),
        float(suppress),
        diversity_step,
        metric,
        check_fallback(fallback),
    )


@dataclasses.dataclass(frozen=True)
class FlashVLM:
    """Text relevance x saliency top-k plus a diverse background set (see :func:`flashvlm`)."""

    keep: int | float
    eta: float = 0.5
    important: float = 0.5
    text_temperature: float = 0.05
    temperature: float = 0.01
    gamma: float = 2.5
    top_p: float = 0.005
    suppress: float = 0.1
    diversity_step: int = 8
    metric: str = "features"
    fallback: str | None = None

    def __call__(
        self,
        tokens: jax.Array,
        *,
        cls_attention: jax.Array | None = None,
        features: jax.Array | None = None,
        cls: Any = NOT_GIVEN,
        text_embeds: jax.Array | None = None,
        text_lengths: jax.Array | None = None,
        placeholder: jax.Array | None = None,
    ) -> core.Compressed:
        b, n, d = core.check_tokens(tokens)
        k = core.resolve_budget(self.keep, n, name="keep")
        attn = cls_scores("flashvlm", cls_attention, cls, self.fallback)
        if attn.shape != (b, n):
            raise ValueError(f"cls_attention shape={tuple(attn.shape)}: expected [{b}, {n}]")
        if self.metric == "tokens":
            m = tokens
        else:
            m = core.require(
                features, "features", "flashvlm(metric='features')", "or use metric='tokens'"
            )
            if m.ndim != 3 or m.shape[:2] != (b, n):
                raise ValueError(f"features shape={tuple(m.shape)}: expected [{b}, {n}, Dv]")
        if text_embeds is None:
            rel = jnp.zeros((b, n), jnp.float32)
        else:
            if text_embeds.ndim != 3 or text_embeds.shape[0] != b or text_embeds.shape[2] != d:
                raise ValueError(
                    f"text_embeds shape={tuple(text_embeds.shape)}: expected [{b}, T, {d}]"
                )
            mask = _text_mask(b, text_embeds.shape[1], text_lengths, placeholder)
            rel = text_relevance(
                tokens,
                text_embeds,
                mask,
                text_temperature=self.text_temperature,
                temperature=self.temperature,
                gamma=self.gamma,
                top_p=self.top_p,
                suppress=self.suppress,
            )
        sal = _minmax(attn)
        eta = self.eta
        score = (1.0 - eta) * jnp.log(jnp.maximum(sal, _EPS)) + eta * jnp.log(
            jnp.maximum(rel, _EPS)
        )
        n_imp = int(k * self.important)
        order = jnp.argsort(-score, axis=1, stable=True).astype(jnp.int32)
        residual = diverse_residual(m, order[:, n_imp:], k - n_imp, self.diversity_step)
        idx = jnp.sort(jnp.concatenate([order[:, :n_imp], residual], axis=1), axis=1)
        return core.compressed(
            core.gather_tokens(tokens, idx),
            idx,
            num_important=jnp.full((b,), n_imp, jnp.int32),
        )
