"""Efficiency accounting: the analytic FLOPs formula against independent counts (a hand-computed
case, the jaxpr matrix-product count and XLA's cost analysis of a tiny dense model), KV bytes
against a real cache after prefill (uncompressed, pre-LLM and in-LLM compression), and
layer-averaged tokens for a fake per-layer schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm.evaluate import efficiency as eff
from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.language import LanguageConfig, LanguageModel
from efficient_mllm.nn.mllm import MLLM, MLLMConfig
from efficient_mllm.train.flops import function_flops

LANG = LanguageConfig(vocab_size=40, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48)
VISION = dict(image_size=8, patch_size=2, width=16, depth=1, heads=2, mlp_dim=32)
IMG_ID = 3


def test_hand_computed_layer():
    cfg = LanguageConfig(vocab_size=10, width=4, depth=1, heads=2, kv_heads=1, mlp_dim=8)
    # head_dim 2, T = 3 tokens, causal prefill:
    #   q: 2*3*4*(2*2)=96, k and v: 2 * (2*3*4*(1*2)) = 96, o: 2*3*(2*2)*4 = 96   -> 288
    #   SwiGLU gate/up/down: 3 * 2*3*4*8                                         -> 576
    #   attention pairs (causal) 1+2+3 = 6: QK^T and AV 2 * 2*2(hd)*2(heads)*6  ->  96
    assert eff.decoder_layer_flops(cfg, 3) == 288 + 576 + 96
    # without causal halving: 9 pairs
    assert eff.decoder_layer_flops(cfg, 3, causal=False) == 288 + 576 + 144
    # one decode step after 5 cached tokens: 6 pairs
    assert eff.decoder_layer_flops(cfg, 1, context=5) == 96 + 192 + 2 * 2 * 2 * 2 * 6
    total = eff.language_flops(cfg, [3], logits_tokens=1)
    assert total["lm_head"] == 2 * 4 * 10 and total["total"] == 960 + 80


def test_formula_matches_jaxpr_count_and_xla_cost_analysis():
    lm = LanguageModel(LANG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(lm)
    t = 12
    x = jnp.ones((1, t), jnp.int32)

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x, logits_at=jnp.zeros((1, 1), jnp.int32)).logits

    want = eff.language_flops(LANG, [t] * LANG.depth, causal=False, logits_tokens=1)["total"]
    # The XLA reference attention computes the full T x T products: exactly the dense count.
    assert function_flops(fwd, state, x) == want
    # XLA's own count adds element-wise work (norms, softmax, SiLU, RoPE): within 15 % here.
    ca = jax.jit(fwd).lower(state, x).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    if ca and ca.get("flops", 0) > 0:
        assert want <= ca["flops"] <= 1.15 * want
    # causal halving: attention pairs T (T + 1) / 2 instead of T^2
    dense = eff.decoder_layer_flops(LANG, t, causal=False)
    causal = eff.decoder_layer_flops(LANG, t)
    attn_dense = 4 * LANG.head_dim * LANG.heads * t * t
    assert dense - causal == pytest.approx(attn_dense * (1 - (t + 1) / (2 * t)))


@pytest.mark.parametrize("pixel_shuffle,use_cls", [(1, True), (2, False)])
def test_vision_flops_match_jaxpr_count(pixel_shuffle, use_cls):
    vis = dict(VISION, use_cls=use_cls)
    cfg = MLLMConfig(language=LANG, vision=vis, image_token_id=IMG_ID, pixel_shuffle=pixel_shuffle)
    model = MLLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def enc(state, images):
        return nnx.merge(graphdef, state).encode_images(images).tokens

    got = function_flops(enc, state, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    assert got == eff.vision_flops(cfg)["total"]


def _batch():
    rng = np.random.RandomState(0)
    tokens = np.array([[1, IMG_ID, 5, 6, 7, 0, 0], [1, IMG_ID, 5, 6, 7, 8, 9]], np.int32)
    lengths = np.array([5, 7], np.int32)
    return tokens, rng.randn(2, 8, 8, 3).astype(np.float32), lengths


@pytest.mark.parametrize("compressor", [None, "random(keep=5)", "fastv(layer=1, keep=4)"])
def test_kv_bytes_equal_real_cache(compressor):
    cfg = MLLMConfig(language=LANG, vision=VISION, image_token_id=IMG_ID, compressor=compressor)
    model = MLLM(cfg, rngs=nnx.Rngs(0))
    tokens, images, lengths = _batch()
    # one jitted prefill into a real KVCache (padded batch: row 0 has 2 padding tokens)
    rep = eff.account(model, tokens, images, lengths)
    rows = rep["rows"]
    visual, total, kv = rows["visual_per_layer"], rows["tokens_per_layer"], rows["kv_bytes"]
    assert int(kv.sum()) == rows["cache_used_nbytes"]
    np.testing.assert_array_equal(kv, rows["kv_bytes_cache"])
    assert rep["kv_match"]
    n = {None: 16, "random(keep=5)": 5, "fastv(layer=1, keep=4)": 16}[compressor]
    np.testing.assert_array_equal(visual[:, 0], [n, n])
    if compressor and compressor.startswith("fastv"):
        np.testing.assert_array_equal(visual, [[16, 4], [16, 4]])
        assert rep["layer_avg_visual_tokens"] == 10.0
    # text tokens: lengths - 1 (the placeholder), at every layer
    np.testing.assert_array_equal(total - visual, np.repeat((lengths - 1)[:, None], 2, axis=1))
    # by hand: tokens x 2 (k, v) x kv_heads x head_dim x 4 bytes, summed over layers
    np.testing.assert_array_equal(kv, total.sum(axis=1) * 2 * 2 * 8 * 4)
    assert rep["prefill_flops"]["total"] == pytest.approx(
        np.mean([eff.prefill_flops(cfg, total[i])["total"] for i in range(2)])
    )
    one = eff._summarize(model, visual, total, kv, rows["kv_bytes_cache"],
                         np.array([True, False]), 1.0)
    assert one["examples"] == 1 and one["kv_bytes"] == kv[0]


def test_fitted_capacity_keeps_decode_exact():
    # FastV drops to 4 of 16 image tokens after layer 0: layer 1's cache can be 4 + 4 + 1 slots.
    cfg = MLLMConfig(language=LANG, vision=VISION, image_token_id=IMG_ID,
                     compressor="fastv(layer=1, keep=4)")
    model = MLLM(cfg, rngs=nnx.Rngs(0))
    tokens, images, lengths = _batch()
    rep = eff.account(model, tokens, images, lengths)
    cap = eff.fitted_capacity(rep["rows"]["tokens_per_layer"], extra=1)
    assert cap == (16 + 6 + 1, 4 + 6 + 1)
    graphdef, state = nnx.split(model)
    args = (jnp.asarray(tokens), jnp.asarray(images), jnp.asarray(lengths))
    outs = []
    for c in (cap, model.spliced_length(tokens.shape, images.shape) + 1):
        logits, cache, _ = eff._prefill_jit(graphdef, state, *args, capacity=c)
        nxt = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)
        outs.append((logits, eff._decode_jit(graphdef, state, nxt, cache)[0]))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="extra=-1"):
        eff.fitted_capacity([[1, 2]], extra=-1)


def test_cache_row_bytes_sum_to_used_nbytes():
    cache = KVCache.init(batch=3, capacity=6, num_layers=2, kv_heads=2, head_dim=4)
    layers = tuple(
        layer.replace(length=jnp.asarray(n, jnp.int32))
        for layer, n in zip(cache.layers, ([1, 6, 3], [0, 2, 9]), strict=True)
    )
    cache = cache.replace(layers=layers)
    rows = eff.cache_row_bytes(cache)
    per_slot = 2 * 2 * 4 * 4
    np.testing.assert_array_equal(rows, [1 * per_slot, 8 * per_slot, 9 * per_slot])  # 9 -> 6
    assert int(rows.sum()) == int(cache.used_nbytes())


def test_layer_averaged_tokens_fake_schedule():
    # FastV-like schedule on a 4-layer decoder: 64 image tokens in layers 0-1, 16 after.
    aux = {
        "num_image_tokens": np.array([64, 64]),
        "spliced_lengths": np.array([74, 70]),
        "visual_tokens_per_layer": np.array([[64, 64, 16, 16], [64, 64, 16, 16]]),
    }
    visual, total = eff.tokens_per_layer(aux, 4)
    np.testing.assert_array_equal(eff.layer_averaged_tokens(visual), [40.0, 40.0])
    np.testing.assert_array_equal(total, [[74, 74, 26, 26], [70, 70, 22, 22]])
    assert eff.layer_averaged_tokens([576, 576, 288, 288]) == 432.0
    cfg = LanguageConfig(vocab_size=40, width=32, depth=4, heads=4, mlp_dim=48)
    f = eff.language_flops(cfg, total[0])
    assert f["blocks"] == pytest.approx(
        2 * eff.decoder_layer_flops(cfg, 74) + 2 * eff.decoder_layer_flops(cfg, 26)
    )
    # without per-layer counts (pre-LLM compression) every layer sees the input count
    visual, _ = eff.tokens_per_layer({"num_image_tokens": np.array([9]),
                                      "spliced_lengths": np.array([20])}, 3)
    np.testing.assert_array_equal(visual, [[9, 9, 9]])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="tokens_per_layer has 1 entries"):
        eff.language_flops(LANG, [3])
    with pytest.raises(ValueError, match="tokens=-1"):
        eff.decoder_layer_flops(LANG, -1)
    with pytest.raises(ValueError, match="missing 'spliced_lengths'"):
        eff.tokens_per_layer({"num_image_tokens": np.array([1])}, 2)
    with pytest.raises(ValueError, match="repeats=0"):
        eff.time_call(lambda: 1, repeats=0)
    with pytest.raises(ValueError, match=r"tokens_per_layer shape=\(3,\)"):
        eff.kv_cache_bytes(LANG, [1, 2, 3])


def test_time_call_and_relative_accuracy():
    calls = []

    def fn(x):
        calls.append(x)
        return jnp.asarray(x) + 1

    out = eff.time_call(fn, 2, warmup=2, repeats=3)
    assert len(calls) == 5 and len(out["times_s"]) == 3
    assert out["min_s"] <= out["median_s"] and int(out["output"]) == 3
    assert eff.relative_accuracy(0.45, 0.9) == pytest.approx(50.0)
    assert np.isnan(eff.relative_accuracy(0.3, 0.0))
