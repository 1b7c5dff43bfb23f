"""LanguageModel: cache consistency, padding, GQA, tied heads, bf16, hooks, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.language import LanguageConfig, LanguageModel, LayerState

BASE = {"vocab_size": 37, "width": 32, "depth": 2, "heads": 4, "kv_heads": 2, "mlp_dim": 48}


def _model(seed=0, **kw):
    return LanguageModel(LanguageConfig(**{**BASE, **kw}), rngs=nnx.Rngs(seed))


def _tokens(shape, seed=1, vocab=37):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


# Jitted entry points: compiling whole calls is much faster on CPU than op-by-op dispatch.
@nnx.jit
def fwd(model, tokens, lengths=None):
    out = model(tokens, lengths=lengths)
    return out.logits, out.hidden


@nnx.jit
def fwd_cache(model, tokens, cache):
    out = model(tokens, cache=cache)
    return out.logits, out.cache


prefill = nnx.jit(lambda model, tokens, lengths, cache: model.prefill(tokens, lengths, cache))
decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))


def test_chunked_prefill_with_cache_matches_full_forward():
    model = _model()
    tok = _tokens((2, 11))
    full, _ = fwd(model, tok)
    cache = KVCache.init(model.cfg, batch=2, capacity=16)
    a, cache = fwd_cache(model, tok[:, :4], cache)
    b, cache = fwd_cache(model, tok[:, 4:10], cache)
    c, cache = fwd_cache(model, tok[:, 10:], cache)  # one decode-sized step
    chunked = jnp.concatenate([a, b, c], axis=1)
    np.testing.assert_allclose(chunked, full, atol=2e-5, rtol=2e-5)
    assert [int(x) for x in cache.positions] == [11, 11]
    assert all([int(x) for x in layer.length] == [11, 11] for layer in cache.layers)


def test_cached_padded_prefill_then_decode_matches_unpadded_rows():
    model = _model()
    tok = _tokens((2, 7))
    lengths = jnp.array([7, 4], jnp.int32)
    cache = KVCache.init(model.cfg, batch=2, capacity=10)
    logits, cache = prefill(model, tok, lengths, cache)
    assert [int(x) for x in cache.layers[0].length] == [7, 4]
    assert [int(x) for x in cache.positions] == [7, 4]
    nxt = jnp.array([[5], [9]], jnp.int32)
    step_logits, cache = decode(model, nxt, cache)
    for r, n in enumerate((7, 4)):
        ref, _ = fwd(model, jnp.concatenate([tok[r : r + 1, :n], nxt[r : r + 1]], axis=1))
        np.testing.assert_allclose(logits[r], ref[0, n - 1], atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(step_logits[r], ref[0, n], atol=2e-5, rtol=2e-5)


def test_padding_rows_do_not_affect_valid_rows():
    model = _model()
    tok = _tokens((3, 9))
    lengths = jnp.array([9, 5, 2], jnp.int32)
    garbage = tok.at[1, 5:].set(3).at[2, 2:].set(11)
    out, _ = fwd(model, garbage, lengths)
    out2, _ = fwd(model, tok, lengths)
    for r, n in enumerate((9, 5, 2)):
        alone = fwd(model, tok[r : r + 1, :n])[0][0]
        np.testing.assert_allclose(out[r, :n], alone, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(out2[r, :n], alone, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_gqa_and_mha_param_shapes_and_causality(kv_heads):
    model = _model(kv_heads=kv_heads)
    attn = model.blocks[0].attn
    assert attn.k.kernel[...].shape == (32, kv_heads, 8)
    assert attn.q.kernel[...].shape == (32, 4, 8)
    tok = _tokens((1, 6))
    changed = tok.at[0, 4].set((tok[0, 4] + 1) % 37)
    a, b = fwd(model, tok)[0], fwd(model, changed)[0]
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)  # causal: the past is unchanged
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_tied_and_untied_heads():
    tied = _model(tie_embeddings=True)
    untied = _model(tie_embeddings=False)
    assert tied.lm_head is None and untied.lm_head is not None
    n_tied = sum(x.size for x in jax.tree.leaves(nnx.state(tied, nnx.Param)))
    n_untied = sum(x.size for x in jax.tree.leaves(nnx.state(untied, nnx.Param)))
    assert n_untied - n_tied == 32 * 37
    logits, hidden = fwd(tied, _tokens((1, 5)))
    np.testing.assert_allclose(logits, hidden @ tied.embed.embedding[...].T, atol=1e-5, rtol=1e-5)


def test_bf16_compute_has_no_nans():
    model = _model(dtype="bfloat16")
    logits, hidden = fwd(model, _tokens((2, 8)), jnp.array([8, 3]))
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    cache = KVCache.init(model.cfg, batch=2, capacity=9)
    assert cache.layers[0].k.dtype == jnp.bfloat16
    logits, cache = prefill(model, _tokens((2, 8)), jnp.array([8, 3]), cache)
    logits, cache = decode(model, jnp.ones((2, 1), jnp.int32), cache)
    assert np.isfinite(np.asarray(logits)).all()


def test_mrope_with_text_positions_equals_rope():
    rope = _model(seed=3)
    mrope = _model(seed=3, rope_type="mrope", mrope_sections=(2, 1, 1))
    tok = _tokens((2, 6))
    with jax.default_matmul_precision("float32"):  # no TF32 when run on a GPU
        a, b = fwd(rope, tok)[0], fwd(mrope, tok)[0]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positions shape"):
        mrope(tok, positions=jnp.zeros((2, 6), jnp.int32))


def test_layer_hook_sees_every_layer_and_can_drop_tokens():
    model = _model(depth=3)
    tok = _tokens((2, 6))
    seen = []

    def record(i, h, state):
        seen.append((i, h.shape))
        return h, state.replace(extra={**state.extra, f"norm{i}": jnp.mean(h)})

    out = nnx.jit(lambda m, x: m(x, layer_hook=record))(model, tok)
    assert [s[0] for s in seen] == [0, 1, 2] and set(out.state.extra) == {"norm0", "norm1", "norm2"}
    ref, _ = fwd(model, tok)
    np.testing.assert_allclose(out.logits, ref, atol=1e-6)

    def drop_first_after_layer0(i, h, state: LayerState):
        if i != 1:
            return h, state
        return h[:, 1:], state.replace(
            positions=state.positions[:, 1:], token_index=state.token_index[:, 1:]
        )

    out = nnx.jit(lambda m, x: m(x, layer_hook=drop_first_after_layer0))(model, tok)
    assert out.hidden.shape == (2, 6, 32) and out.logits.shape == (2, 6, 37)
    np.testing.assert_array_equal(np.asarray(out.hidden[:, 0]), 0.0)  # dropped -> zeros
    assert not np.allclose(out.logits[:, 1:], ref[:, 1:])


def test_logits_at_and_embedding_inputs():
    model = _model()
    tok = _tokens((2, 7))
    full, _ = fwd(model, tok)
    idx = jnp.array([[0, 6], [3, 3]], jnp.int32)
    part = nnx.jit(lambda m, x, i: m(m.embed_tokens(x), logits_at=i).logits)(model, tok, idx)
    np.testing.assert_allclose(part, jnp.take_along_axis(full, idx[:, :, None], 1), atol=1e-5)


def test_bad_inputs_raise():
    model = _model()
    with pytest.raises(ValueError, match="inputs"):
        model(jnp.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="lengths"):
        model(_tokens((2, 3)), lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="cache has"):
        model(_tokens((2, 3)), cache=KVCache.init(model.cfg, batch=3, capacity=4))


def test_config_validation_and_round_trip():
    cfg = LanguageConfig(
        **BASE, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_embeddings=True
    )
    d = cfg.to_dict()
    assert d["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and d["head_dim"] == 8
    assert LanguageConfig.from_dict(d) == cfg and hash(cfg) == hash(LanguageConfig.from_dict(d))
    with pytest.raises(ValueError, match="kv_heads"):
        LanguageConfig(**{**BASE, "kv_heads": 3})
    with pytest.raises(ValueError, match="rope_type"):
        LanguageConfig(**BASE, rope_type="alibi")
    with pytest.raises(ValueError, match="mrope_sections"):
        LanguageConfig(**BASE, rope_type="mrope", mrope_sections=(1, 1, 1))
    with pytest.raises(ValueError, match="unknown key"):
        LanguageConfig.from_dict({**BASE, "layers": 2})
    with pytest.raises(ValueError, match="dtype"):
        LanguageConfig(**BASE, dtype="int8")
