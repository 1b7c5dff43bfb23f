"""generate(): cached decoding against full forward passes, batching, stopping, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm.kvcache.generate import _generate_jit, generate, sample_logits
from efficient_mllm.nn.language import LanguageConfig, LanguageModel
from efficient_mllm.nn.mllm import MLLM, MLLMConfig

VOCAB, IMG_ID = 29, 3
LANG = {"vocab_size": VOCAB, "width": 32, "depth": 2, "heads": 4, "kv_heads": 2, "mlp_dim": 48}
VISION = {"image_size": 8, "patch_size": 4, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32}


@pytest.fixture(scope="module")
def lm():
    return LanguageModel(LanguageConfig(**LANG), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def mllm():
    cfg = MLLMConfig(language=LANG, vision=VISION, image_token_id=IMG_ID)
    return MLLM(cfg, rngs=nnx.Rngs(1))


def _greedy_reference(forward, tokens, lengths, steps, pad_id=0):
    """Greedy continuation by repeated full forward passes (no cache), fixed padded shape."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths).copy()
    b, t = tokens.shape
    seq = np.full((b, t + steps), pad_id, np.int32)
    seq[:, :t] = tokens
    out = np.zeros((b, steps), np.int32)
    for i in range(steps):
        logits = np.asarray(forward(jnp.asarray(seq), jnp.asarray(lengths)))
        nxt = logits[np.arange(b), lengths - 1].argmax(-1)
        out[:, i] = nxt
        seq[np.arange(b), lengths] = nxt
        lengths += 1
    return out


def _prompts():
    tok = np.array(
        [[1, IMG_ID, 5, 6, 7, 8], [1, 2, IMG_ID, 9, 0, 0], [IMG_ID, 4, 0, 0, 0, 0]], np.int32
    )
    return tok, np.array([6, 4, 2], np.int32)


def _images(b, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, 8, 8, 3), jnp.float32)


def test_text_greedy_matches_repeated_full_forward(lm):
    tok = jax.random.randint(jax.random.key(5), (2, 5), 0, VOCAB, dtype=jnp.int32)
    lengths = np.array([5, 3], np.int32)
    out = generate(lm, tok, lengths=lengths, max_new_tokens=6)
    fwd = nnx.jit(lambda m, x, n: m(x, lengths=n).logits)
    ref = _greedy_reference(lambda x, n: fwd(lm, x, n), tok, lengths, 6)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert [int(x) for x in out.lengths] == [6, 6] and not np.asarray(out.finished).any()


def test_mllm_greedy_matches_repeated_full_forward_and_batch_of_one(mllm):
    tok, lengths = _prompts()
    images = _images(3)
    out = generate(mllm, tok, images=images, lengths=lengths, max_new_tokens=5)
    fwd = nnx.jit(lambda m, x, im, n: m(x, im, lengths=n).logits)
    ref = _greedy_reference(lambda x, n: fwd(mllm, x, images, n), tok, lengths, 5)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    # Row 1 alone (unpadded) equals row 1 of the right-padded batch of 3.
    one = generate(mllm, tok[1:2, :4], images=images[1:2], lengths=lengths[1:2], max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(one.tokens[0]), np.asarray(out.tokens[1]))


def test_stop_tokens_end_rows(lm):
    tok = jax.random.randint(jax.random.key(7), (2, 4), 0, VOCAB, dtype=jnp.int32)
    free = np.asarray(generate(lm, tok, max_new_tokens=6).tokens)
    stop = int(free[0, 2])  # row 0 stops at its 3rd token (or earlier if it repeats)
    first = int(np.nonzero(free[0] == stop)[0][0])
    out = generate(lm, tok, max_new_tokens=6, stop_tokens=(stop,), pad_id=VOCAB - 1)
    toks = np.asarray(out.tokens)
    assert int(out.lengths[0]) == first + 1 and bool(out.finished[0])
    np.testing.assert_array_equal(toks[0, : first + 1], free[0, : first + 1])
    np.testing.assert_array_equal(toks[0, first + 1 :], VOCAB - 1)
    row1_stops = np.nonzero(free[1] == stop)[0]
    if row1_stops.size:
        assert int(out.lengths[1]) == row1_stops[0] + 1
    else:
        assert int(out.lengths[1]) == 6 and not bool(out.finished[1])
        np.testing.assert_array_equal(toks[1], free[1])


def test_stop_early_when_all_finished(lm):
    tok = jax.random.randint(jax.random.key(8), (1, 4), 0, VOCAB, dtype=jnp.int32)
    first = int(generate(lm, tok, max_new_tokens=1).tokens[0, 0])
    out = generate(lm, tok, max_new_tokens=6, stop_tokens=(first,), pad_id=0)
    assert int(out.lengths[0]) == 1 and bool(out.finished[0])
    np.testing.assert_array_equal(np.asarray(out.tokens[0, 1:]), 0)


def test_top_p_to_zero_is_greedy_and_sampling_is_deterministic(lm):
    tok = jax.random.randint(jax.random.key(9), (2, 4), 0, VOCAB, dtype=jnp.int32)
    greedy = np.asarray(generate(lm, tok, max_new_tokens=5).tokens)
    key = jax.random.key(42)
    nucleus = generate(lm, tok, max_new_tokens=5, temperature=1.0, top_p=1e-6, rng=key)
    np.testing.assert_array_equal(np.asarray(nucleus.tokens), greedy)
    a = generate(lm, tok, max_new_tokens=5, temperature=2.0, rng=key)
    b = generate(lm, tok, max_new_tokens=5, temperature=2.0, rng=key)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    others = [
        np.asarray(
            generate(lm, tok, max_new_tokens=5, temperature=2.0, rng=jax.random.key(s)).tokens
        )
        for s in range(3)
    ]
    assert any(not np.array_equal(o, np.asarray(a.tokens)) for o in others)


def test_sample_logits_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_p=0.7))(
        jax.random.split(jax.random.key(0), 400)
    )
    assert set(np.unique(np.asarray(draws))) == {0, 1}  # 0.5 + 0.3 reach 0.7; 2 and 3 never
    assert int(sample_logits(logits, None)[0]) == 0


def test_compiled_once_per_shape(lm):
    _generate_jit.clear_cache()
    tok = jax.random.randint(jax.random.key(3), (2, 4), 0, VOCAB, dtype=jnp.int32)
    generate(lm, tok, max_new_tokens=3)
    generate(lm, (tok + 1) % VOCAB, max_new_tokens=3, lengths=jnp.array([4, 2]))
    generate(lm, tok, max_new_tokens=3, temperature=0.5, rng=jax.random.key(0))
    generate(lm, tok, max_new_tokens=3, temperature=0.9, rng=jax.random.key(1))
    assert _generate_jit._cache_size() == 2  # greedy + sampling, values are traced


def test_capacity_and_argument_errors(lm, mllm):
    tok = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="cache_capacity=7 is too small"):
        generate(lm, tok, max_new_tokens=4, cache_capacity=7)
    mtok = jnp.array([[1, IMG_ID, 2]], jnp.int32)
    # Spliced prompt: 3 - 1 + 4 image tokens = 6 slots.
    with pytest.raises(ValueError, match="prompt takes 6 slots"):
        generate(mllm, mtok, images=_images(1), max_new_tokens=2, cache_capacity=7)
    with pytest.raises(ValueError, match="rng"):
        generate(lm, tok, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, tok, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="image placeholders"):
        generate(mllm, jnp.ones((1, 3), jnp.int32), images=_images(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="text-only"):
        generate(lm, tok, images=_images(1), max_new_tokens=2)
