"""Pre-LLM compressors on the placeholder models (Qwen2.5-VL with M-RoPE, InternVL with 1D RoPE).

The tiny random checkpoints of ``test_qwen2_vl`` / ``test_internvl`` are converted once; the
compressed model shares their weights. References: the uncompressed model (keep = all tokens),
and the decoder run on an explicitly shortened sequence (dropped image slots physically removed,
the kept tokens with their original position ids).
"""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp
from flax import nnx

from efficient_mllm.hf import load_pretrained
from efficient_mllm.kvcache.generate import generate
from efficient_mllm.nn.placeholder_mllm import scatter_features
from efficient_mllm.nn.qwen2_vl import QwenVLImages

from . import test_internvl as ivl
from . import test_qwen2_vl as qvl
from ._parity import right_pad, save_hf

QWEN_GRIDS = ((1, 6, 10), (1, 4, 4), (2, 10, 6))  # 15, 4 and 30 LLM tokens


@pytest.fixture(scope="module", params=["qwen", "internvl"])
def setup(request, tmp_path_factory):
    """(kind, pretrained, tokens, lengths, images, image_mask)."""
    path = tmp_path_factory.mktemp(request.param) / "hf"
    if request.param == "qwen":
        hf, _ = qvl._hf_model("qwen2_5_vl_window_gqa3_tied")
        pre = load_pretrained(save_hf(hf, path))
        rows = qvl._rows(pre.config.language.vocab_size, QWEN_GRIDS)
        images = QwenVLImages(jnp.asarray(qvl._pixels(hf, QWEN_GRIDS).numpy()), QWEN_GRIDS)
        img_id = qvl.IMG
    else:
        hf, _ = ivl._hf_model("qwen2_gqa2_tied_ln")
        pre = load_pretrained(save_hf(hf, path))
        rows = ivl._rows(pre.config.language.vocab_size)
        images = jnp.asarray(ivl._images(4))
        img_id = ivl.IMG
    tokens, lengths = right_pad(rows)
    valid = np.arange(tokens.shape[1])[None] < lengths[:, None]
    return request.param, pre, jnp.asarray(tokens), jnp.asarray(lengths), images, \
        (tokens == img_id) & valid


def _logits(model, tokens, lengths, images, logits_at=None):
    return model(tokens, images, lengths=lengths, logits_at=logits_at).logits


def _with(pre, spec):
    """A model with compressor ``spec`` sharing ``pre.model``'s weights."""
    cfg = dataclasses.replace(pre.config, compressor=spec)
    model = type(pre.model)(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(pre.model))
    return model


def _groups_n(model, images):
    return [(c, n) for c, n, _, _ in model.feature_groups(images)]


def test_keep_all_equals_uncompressed(setup):
    kind, pre, tokens, lengths, images, _ = setup
    ref = np.asarray(_logits(pre.model, tokens, lengths, images))
    n_max = max(n for _, n in _groups_n(pre.model, images))
    # uniform(keep=N) on every image keeps all tokens (a smaller image would reject keep > N:
    # use a fraction of 1.0 instead).
    spec = "uniform(keep=1.0)" if kind == "qwen" else f"uniform(keep={n_max})"
    model = _with(pre, spec)
    out = np.asarray(_logits(model, tokens, lengths, images))
    valid = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    # logits_at composes with the read-back index
    at = jnp.asarray([[0, 3], [2, 1]], jnp.int32)
    sub = np.asarray(_logits(model, tokens, lengths, images, at))
    np.testing.assert_allclose(sub, np.take_along_axis(ref, np.asarray(at)[..., None], 1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["random(keep=0.5, seed=3)", "divprune(keep=3)"])
def test_pruned_tokens_positions_and_logits(setup, spec):
    kind, pre, tokens, lengths, images, image_mask = setup
    model = _with(pre, spec)
    embeds, positions, new_lengths, aux = model.embed_inputs(tokens, images, lengths)
    live = np.asarray(aux["kept"])
    # Expected kept slots: the compressor's keep_idx on each image's features.
    feats = pre.model.image_features(images)
    kept_slots, off = [], 0
    for count, n, _, _ in model.feature_groups(images):
        x = feats[off:off + count * n].reshape(count, n, -1)
        off += count * n
        c = model.compressor(x)  # random / divprune take the tokens only
        mask = np.zeros((count, n), bool)
        np.put_along_axis(mask, np.asarray(c.keep_idx), True, axis=1)
        assert mask.sum(1).tolist() == [c.tokens.shape[1]] * count and c.tokens.shape[1] < n
        kept_slots.append(mask.ravel())
    kept_slots = np.concatenate(kept_slots)
    np.testing.assert_array_equal(live[image_mask], kept_slots)
    # The LLM sees K image tokens: lengths shrink by the dropped ones, all text stays.
    dropped = (image_mask & ~live).sum(1)
    np.testing.assert_array_equal(np.asarray(new_lengths), np.asarray(lengths) - dropped)
    np.testing.assert_array_equal(np.asarray(aux["num_image_tokens"]),
                                  (image_mask & live).sum(1))
    # Kept tokens keep their original (Qwen: 3D M-RoPE) positions and embeddings.
    full_embeds = scatter_features(pre.model.language.embed_tokens(tokens),
                                   jnp.asarray(image_mask), feats)
    full_pos = pre.model.positions(tokens, images, lengths, None)
    t = tokens.shape[1]
    if full_pos is None:
        full_pos = jnp.broadcast_to(jnp.arange(t)[None], tokens.shape)
    full_pos, positions = np.asarray(full_pos), np.asarray(positions)
    ref_embeds = np.zeros_like(np.asarray(embeds))
    ref_pos = np.zeros_like(positions)
    for b in range(tokens.shape[0]):
        idx = np.flatnonzero(live[b])
        assert idx.size == int(new_lengths[b])
        np.testing.assert_array_equal(positions[..., b, :idx.size], full_pos[..., b, idx])
        np.testing.assert_allclose(np.asarray(embeds)[b, :idx.size],
                                   np.asarray(full_embeds)[b, idx], atol=1e-6)
        ref_embeds[b, :idx.size] = np.asarray(full_embeds)[b, idx]
        ref_pos[..., b, :idx.size] = full_pos[..., b, idx]
    # Logits: finite, and equal to the decoder on the physically shortened sequence.
    out = np.asarray(_logits(model, tokens, lengths, images))
    assert np.isfinite(out).all()
    short = np.asarray(pre.model.language(jnp.asarray(ref_embeds), positions=jnp.asarray(ref_pos),
                                          lengths=new_lengths).logits)
    for b in range(tokens.shape[0]):
        idx = np.flatnonzero(live[b])
        np.testing.assert_allclose(out[b, idx], short[b, :idx.size], atol=1e-5, rtol=1e-5)


def test_generation_with_compressor(setup):
    _, pre, tokens, lengths, images, _ = setup
    model = _with(pre, "divprune(keep=0.5)")
    out = generate(model, tokens, lengths=lengths, images=images, max_new_tokens=4)
    gen = np.asarray(out.tokens)
    assert gen.shape == (tokens.shape[0], 4)
    # The first generated token is the compressed forward's argmax at the last prompt token.
    logits = np.asarray(_logits(model, tokens, lengths, images))
    first = logits[np.arange(tokens.shape[0]), np.asarray(lengths) - 1].argmax(-1)
    np.testing.assert_array_equal(gen[:, 0], first)


def test_cls_methods_without_cls_raise(setup):
    # In-LLM, learned and signal-driven compressors: tests/hf/test_placeholder_compressors.py.
    kind, pre, tokens, lengths, images, _ = setup
    model = _with(pre, "visionzip(dominant=2, contextual=1)")
    if kind == "qwen":  # Qwen's ViT has no [CLS]: the method must opt into the mean-query row
        with pytest.raises(ValueError, match=r"QwenVLModel.*visionzip.*\[CLS\]"):
            model(tokens, images, lengths=lengths)
    else:  # InternViT's [CLS] attention
        assert np.isfinite(np.asarray(_logits(model, tokens, lengths, images))).all()
