"""MLLM: image splicing, logit alignment, positions, projector, compressor hook-up, errors."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.mllm import MLLM, MLLMConfig, pixel_shuffle, splice_layout

VOCAB, IMG_ID = 31, 3
LANG = {"vocab_size": VOCAB, "width": 32, "depth": 2, "heads": 4, "kv_heads": 2, "mlp_dim": 48}
# 2x2 patch grid
VISION = {"image_size": 8, "patch_size": 4, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
K = 4


class _Kept(NamedTuple):
    tokens: jax.Array
    keep_idx: jax.Array
    valid: jax.Array


def _keep_norm(keep: int = 3):
    """Test compressor: keeps the ``keep`` largest-norm tokens (in original order); the last
    kept token is invalid in even rows."""

    def compress(tokens, *, positions, grid, cls_attention):
        assert cls_attention is not None and cls_attention.shape == tokens.shape[:2]
        assert grid == (2, 2)
        score = jnp.linalg.norm(tokens, axis=-1)
        idx = jnp.sort(jax.lax.top_k(score, keep)[1], axis=1)
        kept = jnp.take_along_axis(tokens, idx[:, :, None], axis=1)
        rows = jnp.arange(tokens.shape[0])[:, None]
        valid = jnp.ones(idx.shape, bool).at[:, -1].set(rows[:, 0] % 2 == 1)
        return _Kept(kept, idx, valid)

    return compress


def _model(seed=0, **kw):
    cfg = MLLMConfig(**{"language": LANG, "vision": VISION, "image_token_id": IMG_ID, **kw})
    return MLLM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
    return _model()


def _batch():
    # Different text lengths and placeholder positions per row (right padding with 0).
    tok = np.array(
        [[1, IMG_ID, 5, 6, 7, 8, 9], [1, 2, 4, IMG_ID, 9, 0, 0], [IMG_ID, 4, 0, 0, 0, 0, 0]],
        np.int32,
    )
    lengths = np.array([7, 5, 2], np.int32)
    images = jax.random.normal(jax.random.key(0), (3, 8, 8, 3), jnp.float32)
    return tok, lengths, images


@nnx.jit
def _embed_inputs(m, tok, images, lengths):
    embeds, positions, spliced, aux = m.embed_inputs(tok, images, lengths)
    return embeds, positions, spliced, aux, m.encode_images(images)


@nnx.jit
def _forward(m, tok, images, lengths):
    return m(tok, images, lengths=lengths)


def _reference_sequences(text_emb, image_tokens, tok, lengths, span):
    """Numpy splice: text before the placeholder, the image tokens, the rest of the text."""
    seqs, positions, maps = [], [], []
    for b in range(tok.shape[0]):
        p = int(np.nonzero(tok[b] == IMG_ID)[0][0])
        n, k = int(lengths[b]), image_tokens[b].shape[0]
        seqs.append(np.concatenate([text_emb[b, :p], image_tokens[b], text_emb[b, p + 1 : n]]))
        positions.append(
            np.concatenate([np.arange(p), p + np.arange(k), p + span + np.arange(n - p - 1)])
        )
        maps.append([t if t < p else (p + k - 1 if t == p else t - 1 + k) for t in range(n)])
    return seqs, positions, maps


def test_splice_matches_numpy_reference_and_logits_align(model):
    tok, lengths, images = _batch()
    embeds, positions, spliced, aux, img = _embed_inputs(model, tok, images, lengths)
    assert embeds.shape == (3, 7 - 1 + K, 32)
    text_emb = np.asarray(model.language.embed.embedding[...])[tok]
    seqs, ref_pos, maps = _reference_sequences(text_emb, np.asarray(img.tokens), tok, lengths, K)
    np.testing.assert_array_equal(np.asarray(spliced), lengths - 1 + K)
    np.testing.assert_array_equal(np.asarray(aux["num_image_tokens"]), [K, K, K])
    for b in range(3):
        n = len(seqs[b])
        np.testing.assert_allclose(np.asarray(embeds[b, :n]), seqs[b], atol=1e-6)
        np.testing.assert_array_equal(np.asarray(positions[b, :n]), ref_pos[b])
        types = np.asarray(aux["token_types"][b])
        assert (types[:n] == 1).sum() == K and (types[n:] == 3).all()

    # Logits of the MLLM == decoder logits on the reference sequences, read at the text map.
    out = _forward(model, tok, images, lengths)
    assert out.logits.shape == (3, 7, VOCAB)
    lm_fwd = nnx.jit(lambda m, e, p, n: m.language(e, positions=p, lengths=n).logits)
    for b in range(3):
        ref_logits = lm_fwd(
            model, jnp.asarray(seqs[b])[None], jnp.asarray(ref_pos[b], jnp.int32)[None], None
        )[0]
        n = int(lengths[b])
        np.testing.assert_allclose(
            np.asarray(out.logits[b, :n]), np.asarray(ref_logits)[maps[b]], atol=3e-5, rtol=3e-5
        )
        np.testing.assert_array_equal(np.asarray(out.aux["text_index"][b, :n]), maps[b])


def test_splice_layout_rows_without_placeholder():
    is_img, text_src, image_src, text_index = splice_layout(
        jnp.array([1, 4]), jnp.array([2, 0]), text_len=4, num_slots=2
    )
    np.testing.assert_array_equal(np.asarray(is_img[0]), [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(text_src[0])[[0, 3, 4]], [0, 2, 3])
    np.testing.assert_array_equal(np.asarray(image_src[0])[1:3], [0, 1])
    np.testing.assert_array_equal(np.asarray(text_index[0]), [0, 2, 3, 4])
    # A row without placeholder (index = text_len) is plain text followed by padding.
    assert not np.asarray(is_img[1]).any()
    np.testing.assert_array_equal(np.asarray(text_src[1])[:4], [0, 1, 2, 3])
    assert int(text_src[1, 4]) >= 4
    np.testing.assert_array_equal(np.asarray(text_index[1]), [0, 1, 2, 3])


def test_text_only_batch_matches_language_model(model):
    tok = jnp.array([[1, 5, 6, 7], [2, 8, 0, 0]], jnp.int32)
    lengths = jnp.array([4, 2], jnp.int32)
    out = nnx.jit(lambda m, x, n: m(x, None, lengths=n))(model, tok, lengths)
    ref = nnx.jit(lambda m, x, n: m.language(x, lengths=n).logits)(model, tok, lengths)
    np.testing.assert_allclose(out.logits, ref, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.aux["num_image_tokens"]), [0, 0])


def test_eager_matches_jit_and_prefill_matches_forward(model):
    tok, lengths, images = _batch()
    eager = model(tok, images, lengths=lengths)
    jitted = _forward(model, tok, images, lengths)
    np.testing.assert_allclose(eager.logits, jitted.logits, atol=1e-5, rtol=1e-5)
    cache = KVCache.init(model.cfg, batch=3, capacity=7 - 1 + K + 2)
    logits, cache, _ = nnx.jit(lambda m, t, i, n, c: m.prefill(t, i, n, c))(
        model, tok, images, lengths, cache
    )
    for b in range(3):
        np.testing.assert_allclose(
            logits[b], jitted.logits[b, lengths[b] - 1], atol=3e-5, rtol=3e-5
        )
    np.testing.assert_array_equal(np.asarray(cache.layers[0].length), lengths - 1 + K)
    # 1D positions: image of N = K tokens advances positions by K.
    np.testing.assert_array_equal(np.asarray(cache.positions), lengths - 1 + K)


def test_gradients_reach_vision_projector_and_language(model):
    tok, lengths, images = _batch()

    def loss(m):
        out = m(jnp.asarray(tok), images, lengths=jnp.asarray(lengths))
        return jnp.mean(out.logits**2)

    grads = nnx.jit(nnx.grad(loss))(model)
    for part in (grads["vision"], grads["projector"], grads["language"]):
        norms = [float(jnp.abs(x).sum()) for x in jax.tree.leaves(part)]
        assert norms and all(np.isfinite(norms)) and sum(norms) > 0
    assert float(jnp.abs(grads["vision"]["patch"]["kernel"][...]).sum()) > 0
    assert float(jnp.abs(grads["language"]["blocks"][0]["attn"]["q"]["kernel"][...]).sum()) > 0


def test_pixel_shuffle_function_and_projector_shapes():
    x = np.arange(2 * 16 * 3, dtype=np.float32).reshape(2, 16, 3)  # 4x4 grid
    y = np.asarray(pixel_shuffle(jnp.asarray(x), (4, 4), 2))
    assert y.shape == (2, 4, 12)
    g = x.reshape(2, 4, 4, 3)
    # Output token (i, j) holds patches (2i + r, 2j + c) for r, c in {0, 1}, channels last.
    for i in range(2):
        for j in range(2):
            ref = np.concatenate(
                [g[:, 2 * i + r, 2 * j + c] for r in range(2) for c in range(2)], -1
            )
            np.testing.assert_array_equal(y[:, 2 * i + j], ref)
    vis = {**VISION, "image_size": 16}  # 4x4 patch grid
    m = _model(vision=vis, pixel_shuffle=2)
    assert m.projector.fc1.kernel[...].shape == (4 * 16, 32)
    assert m.cfg.grid == (2, 2) and m.num_image_slots() == 4
    tok = jnp.array([[1, IMG_ID, 5]], jnp.int32)
    out = nnx.jit(lambda m, t, i: m(t, i))(m, tok, jnp.zeros((1, 16, 16, 3)))
    assert out.logits.shape == (1, 3, VOCAB) and int(out.aux["spliced_lengths"][0]) == 3 - 1 + 4
    with pytest.raises(ValueError, match="pixel_shuffle"):
        MLLMConfig(language=LANG, vision=VISION, image_token_id=IMG_ID, pixel_shuffle=3)


def test_mrope_positions_of_image_tokens():
    lang = {**LANG, "rope_type": "mrope", "mrope_sections": (2, 1, 1)}
    vis = {**VISION, "image_size": (8, 12)}  # 2 x 3 grid
    m = _model(language=lang, vision=vis)
    tok = jnp.array([[1, 2, IMG_ID, 5, 6]], jnp.int32)
    _, positions, spliced, _, _ = _embed_inputs(m, tok, jnp.zeros((1, 8, 12, 3)), jnp.array([5]))
    pos = np.asarray(positions[:, 0])  # [3, L]
    rows, cols = np.divmod(np.arange(6), 3)
    ref = np.stack(
        [
            np.r_[0, 1, np.full(6, 2), 5, 6],
            np.r_[0, 1, 2 + rows, 5, 6],
            np.r_[0, 1, 2 + cols, 5, 6],
        ]
    )  # text continues at 2 + max(2, 3) = 5
    np.testing.assert_array_equal(pos, ref)
    assert int(spliced[0]) == 10


def test_compressor_from_registry_with_invalid_tokens(monkeypatch):
    # Registered for this test only, so registry listings elsewhere do not see it.
    registry.COMPRESSORS.names()  # load the real providers first
    entry = registry.Entry("_test_keep_norm", _keep_norm, status="test")
    monkeypatch.setitem(registry.COMPRESSORS._entries, "_test_keep_norm", entry)
    m = _model(compressor="_test_keep_norm(keep=3)")
    assert m.num_image_slots() == 3
    tok, lengths, images = _batch()
    embeds, positions, spliced, aux, img = _embed_inputs(m, tok, images, lengths)
    n_valid = np.array([2, 3, 2])  # the last kept token is invalid in even rows
    np.testing.assert_array_equal(np.asarray(aux["num_image_tokens"]), n_valid)
    np.testing.assert_array_equal(np.asarray(spliced), lengths - 1 + n_valid)
    text_emb = np.asarray(m.language.embed.embedding[...])[tok]
    kept = [np.asarray(img.tokens[b])[: n_valid[b]] for b in range(3)]
    seqs, _, maps = _reference_sequences(text_emb, kept, tok, lengths, span=4)
    keep_idx = np.asarray(aux["keep_idx"])
    for b in range(3):
        n = len(seqs[b])
        np.testing.assert_allclose(np.asarray(embeds[b, :n]), seqs[b], atol=1e-6)
        p = int(np.nonzero(tok[b] == IMG_ID)[0][0])
        # Kept image tokens keep their original ids; text after the image continues at p + N.
        np.testing.assert_array_equal(
            np.asarray(positions[b, p : p + n_valid[b]]), p + keep_idx[b, : n_valid[b]]
        )
        if n > p + n_valid[b]:
            assert int(positions[b, p + n_valid[b]]) == p + 4
    out = _forward(m, tok, images, lengths)
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(out.aux["text_index"][b, : lengths[b]]), maps[b])


def test_bad_inputs_raise(model):
    images = _batch()[2]
    with pytest.raises(ValueError, match="image placeholders"):
        model(jnp.array([[1, 2, 5]]), images[:1])
    with pytest.raises(ValueError, match=r"rows \[0\] hold \[2\]"):
        model(jnp.array([[1, IMG_ID, IMG_ID]]), images[:1])
    with pytest.raises(ValueError, match="images shape"):
        model(jnp.array([[1, IMG_ID, 5]]), jnp.zeros((1, 12, 12, 3)))
    with pytest.raises(ValueError, match="images shape"):
        model(jnp.array([[1, IMG_ID, 5]]), images)  # batch 3 vs 1
    with pytest.raises(ValueError, match="images=None"):
        model(jnp.array([[1, IMG_ID, 5]]))
    text_only = MLLM(MLLMConfig(language=LANG), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no vision encoder"):
        text_only(jnp.array([[1, 2]]), images[:1])
    with pytest.raises(registry.RegistryError, match="unknown compressor"):
        _model(compressor="no_such_compressor(k=3)")
    with pytest.raises(ValueError, match="image_token_id"):
        MLLMConfig(language=LANG, vision=VISION, image_token_id=VOCAB)


def test_config_round_trip():
    cfg = MLLMConfig(
        language=LANG, vision=VISION, image_token_id=IMG_ID, pixel_shuffle=2, compressor="x(k=1)"
    )
    d = cfg.to_dict()
    assert d["language"]["vocab_size"] == VOCAB and d["vision"]["image_size"] == [8, 8]
    assert MLLMConfig.from_dict(d) == cfg and hash(MLLMConfig.from_dict(d)) == hash(cfg)
    with pytest.raises(ValueError, match="unknown key"):
        MLLMConfig.from_dict({**d, "projector_dim": 3})
    with pytest.raises(ValueError, match="projector"):
        MLLMConfig(language=LANG, projector="linear")
