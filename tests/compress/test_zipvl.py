"""ZipVL: the adaptive count and selection equal an independent numpy implementation of the
attention-mass rule (capacity + valid mask); cached generation equals repeated forward passes."""

import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm import registry
from efficient_mllm.compress.zipvl import mass_count
from efficient_mllm.kvcache.generate import generate

from ._in_llm_helpers import (
    forward_capture,
    greedy_reference,
    image_span,
    images,
    model_for,
    np_block_probs,
    prompts,
)

LAYER, TAU, CAP = 2, 0.6, 10


@pytest.fixture(scope="module")
def model():
    return model_for(f"zipvl(layer={LAYER}, tau={TAU}, capacity={CAP})")


def _np_mass_keep(scores, tau, cap):
    """Plain loop: add tokens from the best down until their mass reaches tau of the total."""
    order = np.argsort(-scores, kind="stable")
    total, acc, kept = scores.sum(), 0.0, []
    for j in order:
        if acc >= tau * total and kept:
            break
        kept.append(j)
        acc += scores[j]
    return np.sort(np.array(kept[:cap]))


def test_mass_count_rule():
    s = jnp.array([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    ok = jnp.array([[True] * 4, [True, True, True, False]])
    assert mass_count(s, ok, 0.8, 4).tolist() == [2, 3]  # 0.5+0.3 ; 3 x 0.25 of 0.75
    assert mass_count(s, ok, 0.81, 4).tolist() == [3, 3]
    assert mass_count(s, ok, 1.0, 2).tolist() == [2, 2]  # capacity bound
    assert mass_count(jnp.zeros((1, 4)), jnp.ones((1, 4), bool), 0.9, 4).tolist() == [1]


def test_selection_matches_numpy_reference(model):
    tok, lengths = prompts()
    out = forward_capture(model, tok, images(4), lengths)
    ex = out.aux["hook_extra"]
    h, pos, ln = (np.asarray(ex[f"{k}{LAYER - 1}"]) for k in ("h", "pos", "len"))
    probs = np_block_probs(model.language.blocks[LAYER - 1], h, pos, ln).mean(1)
    p, spliced = image_span(tok, lengths)
    keep, valid = np.asarray(ex["keep_idx/0"]), np.asarray(ex["keep_valid/0"])
    assert keep.shape == (4, CAP)
    counts = []
    for r in range(4):
        scores = probs[r, p[r] + 16 : spliced[r], p[r] : p[r] + 16].mean(0)
        ref = _np_mass_keep(scores, TAU, CAP)
        n = int(valid[r].sum())
        assert valid[r, :n].all() and not valid[r, n:].any()  # valid slots first
        np.testing.assert_array_equal(keep[r, :n], ref)
        counts.append(n)
    vt = np.asarray(out.aux["visual_tokens_per_layer"])
    np.testing.assert_array_equal(vt[:, LAYER:], np.array(counts)[:, None])
    np.testing.assert_array_equal(vt[:, :LAYER], 16)


def test_generate_matches_repeated_forward(model):
    tok, lengths = prompts()
    imgs = images(4)
    gen = generate(model, tok, images=imgs, lengths=lengths, max_new_tokens=3)
    np.testing.assert_array_equal(
        np.asarray(gen.tokens), greedy_reference(model, tok, imgs, lengths, 3)
    )


def test_bad_arguments_raise():
    build = registry.COMPRESSORS.build
    with pytest.raises(ValueError, match="tau=1.5"):
        build("zipvl(tau=1.5)")
    with pytest.raises(ValueError, match="capacity=0"):
        build("zipvl(capacity=0)")
    with pytest.raises(ValueError, match="capacity=32"):
        build("zipvl(capacity=32)", num_tokens=16)
    with pytest.raises(ValueError, match="layer=4"):
        build("zipvl(layer=4)", num_layers=4)
