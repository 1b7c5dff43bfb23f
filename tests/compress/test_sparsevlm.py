"""SparseVLM: raters, rater-scored selection, DPC-kNN recycling and the rank-adaptive count
against independent numpy implementations; progressive schedule; cached generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm import registry
from efficient_mllm.compress.sparsevlm import dpc_knn_merge, rater_mask, recycle_sizes
from efficient_mllm.kvcache.generate import generate

from ._in_llm_helpers import (
    N_IMG,
    forward_capture,
    greedy_reference,
    image_span,
    images,
    model_for,
    np_block_probs,
    np_topk_sorted,
    prompts,
)

LAYERS, KEEP = (1, 2), (8, 4)


@pytest.fixture(scope="module")
def model():
    return model_for(f"sparsevlm(layers={LAYERS}, keep={KEEP}, recycle=0.5)")


def _np_raters(x, p, spliced):
    """Raters of one row: text tokens after the image whose mean (over image tokens) softmax
    (over text tokens) relevance exceeds the mean; all of them when none does."""
    v = x[p : p + N_IMG]
    t = x[p + N_IMG : spliced]
    logits = v @ t.T
    e = np.exp(logits - logits.max(1, keepdims=True))
    r = (e / e.sum(1, keepdims=True)).mean(0)
    raters = r > r.mean()
    return np.arange(p + N_IMG, spliced)[raters if raters.any() else np.ones_like(raters)]


def _np_dpc(x, valid, c):
    """Density-peak clustering (kNN density) of the valid rows of x: centres (indices into x,
    ascending), each valid row's centre, and the merged (mean) token of each centre."""
    idx = np.nonzero(valid)[0]
    xv = x[idx].astype(np.float64)
    d = np.sqrt(((xv[:, None] - xv[None]) ** 2).sum(-1)) / np.sqrt(x.shape[1])
    k = min(c, len(idx))
    dens = np.exp(-(np.sort(d, axis=1)[:, :k] ** 2).mean(1))
    delta = np.array(
        [d[i][dens > dens[i]].min() if (dens > dens[i]).any() else d.max() for i in range(len(idx))]
    )
    centres = np.sort(np.argsort(-(delta * dens), kind="stable")[: min(c, len(idx))])
    owner = centres[np.argmin(d[:, centres], axis=1)]
    owner[centres] = centres
    merged = {int(idx[cen]): xv[owner == cen].mean(0) for cen in centres}
    return idx[centres], dict(zip(idx.tolist(), idx[owner].tolist(), strict=True)), merged


def test_dpc_knn_merge_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 6)).astype(np.float32)
    valid = np.ones((2, 9), bool)
    valid[1, [2, 7]] = False
    dpc = jax.jit(dpc_knn_merge, static_argnums=2)
    centres, ok, assign, merged = dpc(jnp.asarray(x), jnp.asarray(valid), 3)
    centres, ok, assign, merged = map(np.asarray, (centres, ok, assign, merged))
    for r in range(2):
        ref_c, ref_owner, ref_merged = _np_dpc(x[r], valid[r], 3)
        np.testing.assert_array_equal(centres[r][ok[r]], ref_c)
        for i, own in ref_owner.items():
            assert centres[r][assign[r, i]] == own
        assert (assign[r][~valid[r]] == -1).all()
        for slot, cen in enumerate(centres[r]):
            np.testing.assert_allclose(merged[r, slot], ref_merged[int(cen)], atol=1e-5)


def test_raters_selection_recycling_and_schedule_match_numpy(model):
    tok, lengths = prompts()
    l0 = LAYERS[0]
    out = forward_capture(model, tok, images(4), lengths)
    ex = out.aux["hook_extra"]
    p, spliced = image_span(tok, lengths)
    embeds = np.asarray(ex["h0"])
    raters = np.asarray(
        rater_mask(jnp.asarray(embeds), out.aux["token_types"], N_IMG, jnp.asarray(spliced))
    )
    probs = np_block_probs(model.language.blocks[l0 - 1], embeds, ex["pos0"], ex["len0"]).mean(1)
    post = np.asarray(ex[f"h{l0}"])  # block l0-1 output: what recycling clusters
    n_cand, n_clu = recycle_sizes(N_IMG - KEEP[0], 0.5, 0.1)
    got = np.asarray(ex["keep_idx/0"])
    assert got.shape == (4, KEEP[0] + n_clu) and np.asarray(ex["keep_valid/0"]).all()
    for r in range(4):
        ref_raters = _np_raters(embeds[r].astype(np.float64), p[r], spliced[r])
        np.testing.assert_array_equal(np.nonzero(raters[r])[0], ref_raters)
        scores = probs[r][ref_raters][:, p[r] : p[r] + N_IMG].mean(0)
        top = np_topk_sorted(scores, KEEP[0])
        pruned = np.setdiff1d(np.arange(N_IMG), top)
        cand = pruned[np_topk_sorted(scores[pruned], n_cand)]
        centres, _, _ = _np_dpc(post[r, p[r] + cand], np.ones(n_cand, bool), n_clu)
        np.testing.assert_array_equal(got[r], np.sort(np.concatenate([top, cand[centres]])))
    vt = np.asarray(out.aux["visual_tokens_per_layer"])
    n1 = KEEP[1] + recycle_sizes(KEEP[0] + n_clu - KEEP[1], 0.5, 0.1)[1]
    np.testing.assert_array_equal(vt, [[N_IMG, KEEP[0] + n_clu, n1]] * 4)


def test_rank_adaptive_count():
    model = model_for("sparsevlm(layers=(2,), keep=(10,), recycle=0.0, adaptive=0.5)")
    tok, lengths = prompts()
    out = forward_capture(model, tok, images(4), lengths)
    ex = out.aux["hook_extra"]
    p, spliced = image_span(tok, lengths)
    embeds = np.asarray(ex["h0"])
    probs = np_block_probs(model.language.blocks[1], ex["h1"], ex["pos1"], ex["len1"]).mean(1)
    valid = np.asarray(ex["keep_valid/0"])
    for r in range(4):
        rows = _np_raters(embeds[r].astype(np.float64), p[r], spliced[r])
        mat = probs[r][rows][:, p[r] : p[r] + N_IMG]
        rank = np.linalg.matrix_rank(mat)
        want = int(np.clip(N_IMG - np.floor(0.5 * (N_IMG - rank)), 1, 10))
        assert int(valid[r].sum()) == want
        top = np_topk_sorted(mat.mean(0), want)
        np.testing.assert_array_equal(np.asarray(ex["keep_idx/0"])[r, :want], top)


def test_generate_matches_repeated_forward(model):
    tok, lengths = prompts()
    imgs = images(4)
    gen = generate(model, tok, images=imgs, lengths=lengths, max_new_tokens=3)
    np.testing.assert_array_equal(
        np.asarray(gen.tokens), greedy_reference(model, tok, imgs, lengths, 3)
    )


def test_bad_arguments_raise():
    build = registry.COMPRESSORS.build
    with pytest.raises(ValueError, match="equal length"):
        build("sparsevlm(layers=(1, 2), keep=(8,))")
    with pytest.raises(ValueError, match="strictly increasing"):
        build("sparsevlm(layers=(2, 2), keep=(8, 4))")
    with pytest.raises(ValueError, match="keep\\[1\\]=12"):
        build("sparsevlm(layers=(1, 2), keep=(8, 12), recycle=0)", num_tokens=16, num_layers=3)
    with pytest.raises(ValueError, match="recycle=2"):
        build("sparsevlm(recycle=2)")
    with pytest.raises(ValueError, match="adaptive=-1"):
        build("sparsevlm(adaptive=-1)")
