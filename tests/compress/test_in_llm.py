"""The in-LLM mechanism: decoder block_fn, token drops (layout, positions, per-layer KV
lengths), logits after a drop, stage dispatch in MLLM, batch invariance, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.compress.in_llm import drop_rows
from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.language import LanguageConfig, LanguageModel, LayerState
from efficient_mllm.ops import masks

from ._in_llm_helpers import FORWARD, IMG_ID, N_IMG, VOCAB, images, make_model, model_for, prompts

KEEP, LAYER = 6, 2


@pytest.fixture(scope="module")
def fastv_model():
    return model_for(f"fastv(layer={LAYER}, keep={KEEP})")  # shared with test_fastv


def test_block_fn_parts_and_run_once():
    lm = LanguageModel(
        LanguageConfig(vocab_size=VOCAB, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=32),
        rngs=nnx.Rngs(0),
    )
    tok = jax.random.randint(jax.random.key(0), (2, 5), 0, VOCAB)

    def split(i, run, h, state):
        residual, mlp_out = run(h, state, parts=True)
        return residual + mlp_out, state

    ref, got = nnx.jit(lambda m, x: (m(x).logits, m(x, block_fn=split).logits))(lm, tok)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    with pytest.raises(ValueError, match="twice"):
        lm(tok, block_fn=lambda i, run, h, s: (run(run(h, s), s), s))
    with pytest.raises(ValueError, match="did not call run"):
        lm(tok, block_fn=lambda i, run, h, s: (h, s))


def test_drop_rows_keeps_order_positions_and_counts():
    b, t = 2, 6
    hidden = jnp.arange(b * t, dtype=jnp.float32).reshape(b, t, 1)
    pos = jnp.array([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]], jnp.int32)
    state = LayerState(
        pos, jnp.array([6, 4], jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t)), None, {}
    )
    keep = jnp.array([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]], bool)
    h, s = drop_rows(hidden, state, keep, 4)
    np.testing.assert_array_equal(s.token_index, [[0, 2, 3, 5], [1, 2, 0, 3]])
    np.testing.assert_array_equal(s.positions, [[0, 2, 3, 5], [11, 12, 10, 13]])
    np.testing.assert_array_equal(s.lengths, [4, 2])
    np.testing.assert_array_equal(h[..., 0], [[0, 2, 3, 5], [7, 8, 6, 9]])


def test_prefill_caches_fewer_entries_after_the_drop_layer(fastv_model):
    tok, lengths = prompts()
    b, t = tok.shape
    imgs = images(b)
    cache = KVCache.init(fastv_model.cfg, batch=b, capacity=t - 1 + N_IMG + 2)

    @nnx.jit
    def prefill_decode(m, tok, imgs, lengths, cache):
        logits, cache, aux = m.prefill(tok, imgs, lengths, cache)
        logits2, cache2 = m.decode(jnp.argmax(logits, -1)[:, None].astype(jnp.int32), cache)
        return logits, cache, aux, logits2, cache2

    logits, cache, aux, logits2, cache2 = prefill_decode(fastv_model, tok, imgs, lengths, cache)
    spliced = lengths - 1 + N_IMG
    for layer, lc in enumerate(cache.layers):
        want = spliced if layer < LAYER else spliced - (N_IMG - KEEP)
        np.testing.assert_array_equal(lc.length, want)
    for layer, lc in enumerate(cache2.layers):  # decode appends one entry per layer
        np.testing.assert_array_equal(lc.length, np.asarray(cache.layers[layer].length) + 1)
    np.testing.assert_array_equal(cache.positions, spliced)  # positions count the input ids
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(logits2)).all()
    vt = np.asarray(aux["visual_tokens_per_layer"])
    np.testing.assert_array_equal(vt, [[N_IMG] * LAYER + [KEEP] * (3 - LAYER)] * b)


def test_forward_positions_logits_and_batch_invariance(fastv_model):
    tok, lengths = prompts()
    b, t = tok.shape
    imgs = images(b)
    out = FORWARD(fastv_model, tok, imgs, lengths, lengths)
    logits = np.asarray(out.logits)
    valid = np.arange(t)[None] < lengths[:, None]
    assert np.isfinite(logits).all()
    # The placeholder's logits come from the last kept image token, never from a zeroed row.
    ph = np.argmax(tok == IMG_ID, axis=1)
    assert (np.abs(logits[np.arange(b), ph]).sum(-1) > 0).all()
    keep = np.asarray(out.aux["hook_extra"]["keep_idx/0"])
    assert keep.shape == (b, KEEP) and (np.diff(keep, axis=1) > 0).all()
    for r in range(b):  # a row alone equals the same row in the batch of 4
        one = FORWARD(
            fastv_model, tok[r : r + 1], imgs[r : r + 1], lengths[r : r + 1], lengths[r : r + 1]
        )
        np.testing.assert_array_equal(np.asarray(one.aux["hook_extra"]["keep_idx/0"])[0], keep[r])
        np.testing.assert_allclose(
            np.asarray(one.logits)[0][valid[r]], logits[r][valid[r]], atol=1e-5, rtol=1e-5
        )


class _BadStage:
    stage = "post_llm"


class _NoHooks:
    stage = "in_llm"


registry.COMPRESSORS.register("_test_bad_stage")(lambda: _BadStage())
registry.COMPRESSORS.register("_test_no_hooks")(lambda: _NoHooks())


def test_stage_dispatch_errors_and_pre_plus_in_llm():
    with pytest.raises(ValueError, match="stage='post_llm'"):
        make_model("_test_bad_stage")
    with pytest.raises(ValueError, match="make_hooks"):
        make_model("_test_no_hooks")
    with pytest.raises(ValueError, match="more than one 'in_llm'"):
        make_model(("fastv(layer=1, keep=4)", "zipvl(layer=1)"))
    with pytest.raises(ValueError, match="keep=17"):
        make_model("fastv(layer=1, keep=17)")
    both = make_model(("uniform(keep=8)", "fastv(layer=1, keep=3)"), depth=2)
    assert both.compressor is not None and both.in_llm_compressor is not None
    tok, lengths = prompts()
    out = FORWARD(both, tok, images(4), lengths, lengths)
    np.testing.assert_array_equal(np.asarray(out.aux["visual_tokens_per_layer"]), [[8, 3]] * 4)
    assert np.isfinite(np.asarray(out.logits)).all()
    assert int(np.asarray(out.aux["token_types"] == masks.IMAGE).sum()) == 4 * 8
