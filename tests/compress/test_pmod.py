"""p-MoD: routing equals a numpy top-k of the router logits, skipped vision tokens keep their
hidden state (times the STRing weight), layer KV holds text + routed vision tokens only,
gradients reach the routers, the progressive ratio schedule, cached generation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.compress.pmod import prd_schedule
from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.kvcache.generate import generate
from efficient_mllm.nn.language import LanguageConfig, LanguageModel
from efficient_mllm.ops import masks

from ._in_llm_helpers import greedy_reference, images, model_for, np_block_keys, prompts

T_, I_, P_ = masks.TEXT, masks.IMAGE, masks.PAD
# Row 0: 2 text, 6 image, 2 text. Row 1: 1 text, 6 image, 1 text, 2 padding.
TYPES = np.array([[T_, T_] + [I_] * 6 + [T_, T_], [T_] + [I_] * 6 + [T_, P_, P_]], np.int32)
LENGTHS = np.array([10, 8], np.int32)


def test_prd_schedule_formula():
    r = prd_schedule(32, ratio=0.5, max_ratio=0.85, min_ratio=0.15)
    for i, got in enumerate(r):
        rho = 0.5 + math.cos(math.pi * i / 31) / 2
        assert got == (None if rho > 0.85 else max(rho, 0.15))
    assert r[0] is None and r[-1] == 0.15
    lin = prd_schedule(5, ratio=0.5, schedule="shiftedlinear", max_ratio=1.0, min_ratio=0.0)
    assert lin == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert prd_schedule(3, ratio=0.4, schedule="constant", layers=(1,)) == (None, 0.4, None)


@pytest.fixture(scope="module")
def lm_and_router():
    cfg = LanguageConfig(vocab_size=17, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=32)
    lm = LanguageModel(cfg, rngs=nnx.Rngs(0))
    mod = registry.COMPRESSORS.build(
        "pmod(ratio=0.5, schedule='constant', layers=(0, 1), zero_init=False)",
        dim=32,
        num_layers=2,
        rngs=nnx.Rngs(1),
    )
    return lm, mod


def _capturing(block_fn):
    def wrapped(i, run, x, state):
        out, state = block_fn(i, run, x, state)
        return out, state.replace(extra={**state.extra, f"in{i}": x, f"out{i}": out})

    return wrapped


@nnx.jit
def _run(lm, mod, embeds, cache):
    _, block_fn = mod.make_hooks(lm, token_types=TYPES, query_end=LENGTHS, num_image_tokens=6)
    return lm(embeds, lengths=jnp.asarray(LENGTHS), cache=cache, block_fn=_capturing(block_fn))


def test_routing_skip_identity_and_layer_kv(lm_and_router):
    lm, mod = lm_and_router
    embeds = jax.random.normal(jax.random.key(2), (2, 10, 32))
    cache = KVCache.init(lm.cfg, batch=2, capacity=12)
    out = _run(lm, mod, embeds, cache)
    ex = out.state.extra
    pos = np.broadcast_to(np.arange(10), (2, 10))
    for layer in (0, 1):
        x, y = np.asarray(ex[f"in{layer}"]), np.asarray(ex[f"out{layer}"])
        router = mod.routers[layer]
        r = x @ np.asarray(router.kernel[...])[:, 0] + np.asarray(router.bias[...])[0]
        g = 0.2 * np.tanh(r) + 1.0
        kv = np.asarray(out.cache.layers[layer].k)
        want_keys = np_block_keys(lm.blocks[layer], x, pos)
        for b in range(2):
            vis = np.nonzero(TYPES[b] == I_)[0]
            text = np.nonzero((TYPES[b] == T_) & (np.arange(10) < LENGTHS[b]))[0]
            k = int(len(vis) * 0.5)
            routed = np.sort(vis[np.argsort(-r[b, vis], kind="stable")[:k]])
            skipped = np.setdiff1d(vis, routed)
            # skipped vision tokens: g * x (unchanged by the block but for the STRing weight)
            np.testing.assert_allclose(
                y[b, skipped], g[b, skipped, None] * x[b, skipped], rtol=1e-5, atol=1e-6
            )
            assert not np.allclose(y[b, routed], g[b, routed, None] * x[b, routed], atol=1e-3)
            np.testing.assert_array_equal(ex["visual_tokens"][b, layer], k)
            # the layer's KV: text + routed vision tokens, in order, with their original ids
            kept = np.sort(np.concatenate([text, routed]))
            assert int(out.cache.layers[layer].length[b]) == len(kept)
            np.testing.assert_allclose(kv[b, : len(kept)], want_keys[b, kept], rtol=1e-4, atol=1e-5)


def test_gradients_reach_routers(lm_and_router):
    lm, mod = lm_and_router  # zero-initialised routers get a gradient too (tanh'(0) = 1)
    mod = registry.COMPRESSORS.build(
        "pmod(ratio=0.5, schedule='constant', layers=(0, 1))",
        dim=32,
        num_layers=2,
        rngs=nnx.Rngs(1),
    )
    embeds = jax.random.normal(jax.random.key(3), (2, 10, 32))

    def loss(mod, lm):
        _, block_fn = mod.make_hooks(lm, token_types=TYPES, query_end=LENGTHS, num_image_tokens=6)
        out = lm(embeds, lengths=jnp.asarray(LENGTHS), block_fn=block_fn)
        return jnp.mean(out.logits**2)

    grads = nnx.jit(nnx.grad(loss))(mod, lm)
    leaves = jax.tree.leaves(grads["routers"])
    assert len(leaves) == 4  # kernel + bias of the two routers
    for g in leaves:
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).sum() > 0


def test_generate_matches_repeated_forward():
    model = model_for("pmod(ratio=0.5, zero_init=False)")
    assert isinstance(model.in_llm_compressor, nnx.Module)  # the routers are model parameters
    assert "in_llm_compressor" in nnx.state(model, nnx.Param)
    tok, lengths = prompts()
    imgs = images(4)
    gen = generate(model, tok, images=imgs, lengths=lengths, max_new_tokens=3)
    np.testing.assert_array_equal(
        np.asarray(gen.tokens), greedy_reference(model, tok, imgs, lengths, 3)
    )


def test_bad_arguments_raise():
    build = registry.COMPRESSORS.build
    with pytest.raises(ValueError, match="needs dim, num_layers and rngs"):
        build("pmod()")
    kw = {"dim": 8, "num_layers": 2, "rngs": nnx.Rngs(0)}
    with pytest.raises(ValueError, match="norm='relu'"):
        build("pmod(norm='relu')", **kw)
    with pytest.raises(ValueError, match="layers=\\(5,\\)"):
        build("pmod(layers=(5,))", **kw)
    with pytest.raises(ValueError, match="schedule='step'"):
        build("pmod(schedule='step')", **kw)
    with pytest.raises(ValueError, match="ratio=-1"):
        build("pmod(ratio=-1)", **kw)
