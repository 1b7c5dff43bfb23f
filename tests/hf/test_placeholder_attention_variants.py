"""Attention variants and hybrid stacks on the placeholder models (Qwen2.5-VL, InternVL): greedy
generation through the cache (KV for softmax / window layers, a recurrent state for linear ones)
equals greedy decoding by full forwards without any cache, row by row of a ragged batch."""

from __future__ import annotations

import dataclasses
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hf import test_placeholder_compressors as T

generate = importlib.import_module("efficient_mllm.kvcache.generate").generate
STEPS = 3


def _model(kind, layer_attention):
    cfg = T._config(kind)
    cfg = dataclasses.replace(
        cfg, language=dataclasses.replace(cfg.language, layer_attention=layer_attention)
    )
    cls = T.InternVLModel if kind == "internvl" else T.QwenVLModel
    return cls(cfg, rngs=nnx.Rngs(3))


def _greedy_without_cache(model, tokens, lengths, images):
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    b, t = tokens.shape
    buf = np.zeros((b, t + STEPS), np.int32)
    buf[:, :t] = tokens
    cur = lengths.copy()
    out = []
    for _ in range(STEPS):
        logits = model(jnp.asarray(buf), images, lengths=jnp.asarray(cur)).logits
        nxt = np.asarray(jnp.argmax(logits[np.arange(b), cur - 1], axis=-1))
        buf[np.arange(b), cur] = nxt
        cur = cur + 1
        out.append(nxt)
    return np.stack(out, 1)


@pytest.mark.parametrize(
    "kind,layer_attention",
    [("qwen2_5_vl", ("softmax", "sliding_window(window=4)", "linear")),
     ("internvl", ("based", "softmax", "lightning"))],
)
def test_hybrid_generation_equals_full_forward(kind, layer_attention):
    model = _model(kind, layer_attention)
    tokens, lengths, images = T._inputs(kind)
    out = model(tokens, images, lengths=lengths)
    assert bool(jnp.isfinite(out.logits).all())
    got = np.asarray(generate(model, tokens, images=images, lengths=lengths,
                              max_new_tokens=STEPS).tokens)
    np.testing.assert_array_equal(got, _greedy_without_cache(model, tokens, lengths, images))
