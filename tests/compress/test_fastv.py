"""FastV: selection equals an independent numpy implementation of the paper's rule; cached
generation equals repeated full forward passes; argument errors."""

import numpy as np
import pytest

from efficient_mllm import registry
from efficient_mllm.kvcache.generate import generate

from ._in_llm_helpers import (
    forward_capture,
    greedy_reference,
    image_span,
    images,
    model_for,
    np_block_probs,
    np_topk_sorted,
    prompts,
)

LAYER, KEEP = 2, 6
SPEC = f"fastv(layer={LAYER}, keep={KEEP})"  # shared with test_in_llm


@pytest.mark.parametrize("query", ["last", "text"])
def test_selection_matches_numpy_reference(query):
    model = model_for(
        SPEC if query == "last" else f"fastv(layer={LAYER}, keep={KEEP}, query='text')"
    )
    tok, lengths = prompts()
    out = forward_capture(model, tok, images(4), lengths)
    ex = out.aux["hook_extra"]
    h, pos, ln = (np.asarray(ex[f"{k}{LAYER - 1}"]) for k in ("h", "pos", "len"))
    probs = np_block_probs(model.language.blocks[LAYER - 1], h, pos, ln).mean(1)  # [B, T, T]
    p, spliced = image_span(tok, lengths)
    got = np.asarray(ex["keep_idx/0"])
    assert np.asarray(ex["keep_valid/0"]).all()
    for r in range(4):
        img = slice(p[r], p[r] + 16)
        if query == "last":
            scores = probs[r, spliced[r] - 1, img]
        else:  # mean over the prompt's text tokens after the image
            scores = probs[r, p[r] + 16 : spliced[r], img].mean(0)
        np.testing.assert_array_equal(got[r], np_topk_sorted(scores, KEEP))


def test_generate_matches_repeated_forward():
    model = model_for(SPEC)
    tok, lengths = prompts()  # batch of 4, different prompt lengths and image positions
    imgs = images(4)
    gen = generate(model, tok, images=imgs, lengths=lengths, max_new_tokens=3)
    ref = greedy_reference(model, tok, imgs, lengths, 3)
    np.testing.assert_array_equal(np.asarray(gen.tokens), ref)


def test_bad_arguments_raise():
    build = registry.COMPRESSORS.build
    with pytest.raises(ValueError, match="layer=0"):
        build("fastv(layer=0, keep=4)")
    with pytest.raises(ValueError, match="layer=3"):
        build("fastv(layer=3, keep=4)", num_layers=3)
    with pytest.raises(ValueError, match="keep=0"):
        build("fastv(keep=0)")
    with pytest.raises(ValueError, match="keep=20"):
        build("fastv(keep=20)", num_tokens=16)
    with pytest.raises(ValueError, match="query='first'"):
        build("fastv(query='first')")
