"""FasterVLM and VTC-CLS: contract, numpy references, the ViT's multi-layer [CLS] probe, the
mean-query fallback, MLLM end to end, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm import registry

from .conftest import build_mllm, contract, make_inputs, mllm_batch, run_end_to_end


def build(spec):
    return registry.COMPRESSORS.build(spec)


def _topk_numpy(scores, k):
    """Indices of the k largest scores (earlier index first among equals), ascending."""
    return sorted(np.argsort(-scores, kind="stable")[:k].tolist())


@pytest.mark.parametrize("keep, k", [(5, 5), (0.25, 4), (16, 16)])
def test_fastervlm_matches_numpy(keep, k):
    inp = make_inputs(0)
    rows = (0, 1, 2, 3) if k == 5 else ()  # batch invariance checked once
    out = contract(build(f"fastervlm(keep={keep})"), inp, k, row_invariant=rows)
    for r in range(4):
        ref = _topk_numpy(inp["cls_attention"][r], k)
        np.testing.assert_array_equal(out["keep_idx"][r], ref)
        np.testing.assert_array_equal(out["tokens"][r], inp["tokens"][r, ref])


@pytest.mark.parametrize("agg", ["mean", "max"])
def test_vtc_cls_matches_numpy(agg):
    inp = make_inputs(1, layers=3)
    rows = (0, 1, 2, 3) if agg == "mean" else ()
    spec = f"vtc_cls(keep=6, layers=(-1, -2, 0), agg='{agg}')"
    out = contract(build(spec), inp, 6, row_invariant=rows)
    for r in range(4):
        rows = inp["layer_cls_attention"][r]  # [3, N]
        score = [
            (max if agg == "max" else lambda v: sum(v) / 3)(list(rows[:, j])) for j in range(16)
        ]
        ref = _topk_numpy(np.array(score, np.float32), 6)
        np.testing.assert_array_equal(out["keep_idx"][r], ref)
    assert build("vtc_cls(keep=2, layers=(-1, -3))").cls_attention_layers == (-1, -3)


def test_fallback_for_encoders_without_cls():
    inp = make_inputs(2)
    x, a = jnp.asarray(inp["tokens"]), jnp.asarray(inp["cls_attention"])
    with pytest.raises(ValueError, match=r"fastervlm needs the vision encoder's \[CLS\] token"):
        build("fastervlm(keep=4)")(x, cls_attention=a, cls=None)
    with pytest.raises(ValueError, match=r"vtc_cls needs the vision encoder's \[CLS\] token"):
        build("vtc_cls(keep=4, layers=(-1,))")(x, layer_cls_attention=a[:, None], cls=None)
    out = build("fastervlm(keep=4, fallback='mean_query')")(x, cls_attention=a, cls=None)
    ref = build("fastervlm(keep=4)")(x, cls_attention=a, cls=jnp.asarray(inp["cls"]))
    np.testing.assert_array_equal(np.asarray(out.keep_idx), np.asarray(ref.keep_idx))


VTC_SPEC = "vtc_cls(keep=0.5, layers=(0, -1))"  # shared with the end-to-end test (cached model)


@nnx.jit
def _vit_probes(vit, images):
    out = vit(images, return_cls_attention=True, cls_attention_layers=(-1, 0))
    x, pos, _ = vit.embed(images)
    row0 = vit.blocks[0].attention_row(x, positions=pos)[:, 1:]
    x1, _ = vit.blocks[0](x, positions=pos)
    row1 = vit.blocks[1].attention_row(x1, positions=pos)[:, 1:]
    return out, row0, row1, vit(images).layer_cls_attention


def test_vit_multi_layer_probe():
    vit = build_mllm(VTC_SPEC, vision_depth=2).vision  # depth 2, with [CLS]
    images = mllm_batch()[2]
    out, row0, row1, default = _vit_probes(vit, images)
    assert out.layer_cls_attention.shape == (3, 2, 16)
    np.testing.assert_allclose(out.layer_cls_attention[:, 0], out.cls_attention, rtol=1e-6)
    # Block l's row is its probe on its own input.
    np.testing.assert_allclose(out.layer_cls_attention[:, 1], row0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.layer_cls_attention[:, 0], row1, rtol=1e-5, atol=1e-7)
    # Rows are [CLS] softmax rows restricted to the patches: positive, summing to < 1.
    s = np.asarray(out.layer_cls_attention).sum(-1)
    assert (s > 0).all() and (s < 1).all()
    assert default is None  # default unchanged
    for bad in ((2,), (-3,), ()):
        with pytest.raises(ValueError, match=r"cls_attention_layers=.*depth 2"):
            jax.eval_shape(lambda im, bad=bad: vit(im, cls_attention_layers=bad), images)


@nnx.jit
def _encode(model, images):
    img = model.encode_images(images)
    vis = model.vision(images, return_cls_attention=True, cls_attention_layers=(0, -1))
    return img, vis


def test_mllm_feeds_the_vit_scores():
    images = mllm_batch()[2]
    # FasterVLM in the model keeps the top-k of the ViT's own [CLS] row.
    img, vis = _encode(build_mllm("fastervlm(keep=6)"), images)
    for r in range(3):
        np.testing.assert_array_equal(
            np.asarray(img.keep_idx)[r], _topk_numpy(np.asarray(vis.cls_attention)[r], 6)
        )
    # Without [CLS] it raises unless the mean-query fallback is asked for.
    with pytest.raises(ValueError, match=r"\[CLS\] token.*use_cls=False"):
        _encode(build_mllm("fastervlm(keep=6)", use_cls=False), images)
    img, vis = _encode(
        build_mllm("fastervlm(keep=6, fallback='mean_query')", use_cls=False), images
    )
    assert vis.cls is None
    np.testing.assert_array_equal(
        np.asarray(img.keep_idx)[1], _topk_numpy(np.asarray(vis.cls_attention)[1], 6)
    )
    # VTC-CLS with pixel shuffle 2: the layer rows are summed over each 2x2 cell.
    model = build_mllm(
        "vtc_cls(keep=2, layers=(0, -1), agg='max')", vision_depth=2, pixel_shuffle=2
    )
    img, vis = _encode(model, images)
    rows = np.asarray(vis.layer_cls_attention).reshape(3, 2, 2, 2, 2, 2).sum(axis=(3, 5))
    for r in range(3):
        score = rows[r].reshape(2, 4).max(axis=0)
        np.testing.assert_array_equal(np.asarray(img.keep_idx)[r], _topk_numpy(score, 2))


@pytest.mark.parametrize(
    "spec, k, depth",
    [("fastervlm(keep=6)", 6, 1), (VTC_SPEC, 8, 2)],
)
def test_end_to_end(spec, k, depth):
    run_end_to_end(spec, k, vision_depth=depth)


def test_errors_name_argument_and_value():
    x = jnp.zeros((2, 16, 4))
    a = jnp.ones((2, 16)) / 16
    with pytest.raises(ValueError, match=r"keep=17"):
        build("fastervlm(keep=17)")(x, cls_attention=a)
    with pytest.raises(ValueError, match=r"keep=-2"):
        build("fastervlm(keep=-2)")
    with pytest.raises(ValueError, match=r"fallback='cls'"):
        build("fastervlm(keep=2, fallback='cls')")
    with pytest.raises(ValueError, match=r"fastervlm needs cls_attention"):
        build("fastervlm(keep=2)")(x)
    with pytest.raises(ValueError, match=r"cls_attention shape=\(2, 15\)"):
        build("fastervlm(keep=2)")(x, cls_attention=a[:, :15])
    with pytest.raises(ValueError, match=r"layers=\(\)"):
        build("vtc_cls(keep=2, layers=())")
    with pytest.raises(ValueError, match=r"layers=\(-1, -1\)"):
        build("vtc_cls(keep=2, layers=(-1, -1))")
    with pytest.raises(ValueError, match=r"agg='sum'"):
        build("vtc_cls(keep=2, agg='sum')")
    with pytest.raises(ValueError, match=r"layer_cls_attention shape=\(2, 16\)"):
        build("vtc_cls(keep=2, layers=(-1, -2))")(x, layer_cls_attention=a)
    with pytest.raises(ValueError, match=r"cls_attention_layers=\(-1, -2, -3\).*depth 1"):
        build_mllm("vtc_cls(keep=2)")(jnp.array([[1, 3]]), jnp.zeros((1, 32, 32, 3)))
