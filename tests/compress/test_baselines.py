"""Baselines: random, uniform, avgpool and the learned pixel-shuffle connector: contract, plain
numpy references, MLLM end to end, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.compress import baselines
from .conftest import build_mllm, contract, make_inputs, mllm_batch, run_end_to_end


def build(spec, **kw):
    return registry.COMPRESSORS.build(spec, **kw)


# -- random ---------------------------------------------------------------------------------


def test_random_contract_and_properties():
    inp = make_inputs(0)
    # The subset depends on the row's index in the batch, so only row 0 is batch-invariant.
    out = contract(build("random(keep=5, seed=3)"), inp, 5, row_invariant=(0,))
    np.testing.assert_array_equal(
        out["tokens"], np.take_along_axis(inp["tokens"], out["keep_idx"][:, :, None], axis=1)
    )
    # Deterministic, content-independent, different per row and per seed.
    other = contract(build("random(keep=5, seed=3)"), make_inputs(9), 5, row_invariant=())
    np.testing.assert_array_equal(other["keep_idx"], out["keep_idx"])
    assert len({tuple(r) for r in out["keep_idx"]}) > 1
    seed4 = contract(build("random(keep=5, seed=4)"), inp, 5, row_invariant=())
    assert (seed4["keep_idx"] != out["keep_idx"]).any()
    assert contract(build("random(keep=0.5)"), inp, 8, row_invariant=())["keep_idx"].shape == (4, 8)


def test_random_is_uniform_over_positions():
    # 512 rows x 4 of 16: each index is kept with probability 1/4 (expected 128 times).
    x = np.zeros((512, 16, 2), np.float32)
    idx = np.asarray(jax.jit(build("random(keep=4)"))(jnp.asarray(x)).keep_idx)
    counts = np.bincount(idx.reshape(-1), minlength=16)
    assert counts.sum() == 2048 and counts.min() > 80 and counts.max() < 176, counts
    assert all(len(set(r)) == 4 for r in idx.tolist())


# -- uniform ----------------------------------------------------------------------------------


def _uniform_numpy(gh, gw, kh, kw):
    """Centre of each of kh (kw) equal row (column) bands, raster order."""
    out = []
    for i in range(kh):
        lo, hi = i * gh / kh, (i + 1) * gh / kh
        r = int(np.floor((lo + hi) / 2))
        for j in range(kw):
            lo_c, hi_c = j * gw / kw, (j + 1) * gw / kw
            out.append(r * gw + int(np.floor((lo_c + hi_c) / 2)))
    return out


@pytest.mark.parametrize(
    "spec, grid, expect",
    [
        ("uniform(keep=4)", (4, 4), [5, 7, 13, 15]),  # stride 2: rows/cols 1, 3
        ("uniform(keep=16)", (4, 4), list(range(16))),
        ("uniform(keep=0.25)", (4, 4), [5, 7, 13, 15]),
        ("uniform(keep=6)", (6, 4), _uniform_numpy(6, 4, 3, 2)),
        ("uniform(keep=7)", (4, 4), [1, 3, 5, 8, 10, 12, 14]),  # prime: raster spacing
    ],
)
def test_uniform_matches_reference(spec, grid, expect):
    inp = make_inputs(1, grid=grid)
    out = contract(build(spec), inp, len(expect), grid=grid)
    for r in range(4):
        np.testing.assert_array_equal(out["keep_idx"][r], expect)
        np.testing.assert_array_equal(out["tokens"][r], inp["tokens"][r, expect])


# -- avgpool ------------------------------------------------------------------------------------


def _avgpool_numpy(x, gh, gw, k, s):
    """Ceil-mode average pooling with partial edge windows; centre representative."""

    def starts(size):
        st = [0]
        while st[-1] + k < size and st[-1] + s < size:
            st.append(st[-1] + s)
        return st

    grid = x.reshape(gh, gw, -1)
    toks, reps = [], []
    for r in starts(gh):
        for c in starts(gw):
            win = grid[r : min(r + k, gh), c : min(c + k, gw)]
            toks.append(win.reshape(-1, x.shape[-1]).mean(axis=0))
            reps.append((r + (win.shape[0] - 1) // 2) * gw + c + (win.shape[1] - 1) // 2)
    return np.stack(toks), reps


@pytest.mark.parametrize(
    "kernel, stride, grid",
    [(2, None, (4, 4)), (3, None, (4, 4)), (3, 1, (4, 4)), (2, 3, (5, 6)), (3, 2, (6, 4))],
)
def test_avgpool_matches_numpy(kernel, stride, grid):
    inp = make_inputs(2, grid=grid)
    spec = f"avgpool(kernel={kernel}, stride={stride})"
    ref0, reps = _avgpool_numpy(inp["tokens"][0], *grid, kernel, stride or kernel)
    out = contract(build(spec), inp, len(reps), grid=grid)
    for r in range(4):
        ref, reps = _avgpool_numpy(inp["tokens"][r], *grid, kernel, stride or kernel)
        np.testing.assert_allclose(out["tokens"][r], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["keep_idx"][r], reps)


# -- pixel shuffle (learned) --------------------------------------------------------------------


def test_pixel_shuffle_matches_numpy():
    comp = build("pixel_shuffle(factor=2)", vision_dim=8, dim=32, rngs=nnx.Rngs(0))
    inp = make_inputs(3)
    out = contract(comp, inp, 4)
    w1, b1 = np.asarray(comp.fc1.kernel[...]), np.asarray(comp.fc1.bias[...])
    w2, b2 = np.asarray(comp.fc2.kernel[...]), np.asarray(comp.fc2.bias[...])
    for r in range(4):
        f = inp["features"][r].reshape(4, 4, 8)
        for ci, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            cell = np.concatenate(
                [f[2 * i, 2 * j], f[2 * i, 2 * j + 1], f[2 * i + 1, 2 * j], f[2 * i + 1, 2 * j + 1]]
            )
            h = cell @ w1 + b1
            h = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))
            np.testing.assert_allclose(out["tokens"][r, ci], h @ w2 + b2, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out["keep_idx"][r], [0, 2, 8, 10])  # top-left cells


def test_pixel_shuffle_end_to_end_and_gradients():
    model, _, _ = run_end_to_end("pixel_shuffle(factor=2)", 4)
    assert isinstance(model.compressor, baselines.PixelShuffleConnector)
    images = mllm_batch()[2]

    @nnx.jit
    def grads(m):  # through the image path only (cheaper to compile than the whole LM)
        return nnx.grad(lambda m: jnp.mean(m.encode_images(images).tokens ** 2))(m)

    g = grads(model)
    for name in ("fc1", "fc2"):
        leaves = jax.tree.leaves(g["compressor"][name])
        assert leaves and all(np.abs(np.asarray(v)).sum() > 0 for v in leaves), name
    # The model's own projector is bypassed, so it gets no gradient.
    assert all(np.abs(np.asarray(v)).sum() == 0 for v in jax.tree.leaves(g["projector"]))


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, k", [("random(keep=5)", 5), ("uniform(keep=4)", 4), ("avgpool(kernel=3, stride=1)", 4)]
)
def test_end_to_end(spec, k):
    run_end_to_end(spec, k)


def test_mrope_positions_follow_representatives():
    model = build_mllm("avgpool(kernel=2)", rope_type="mrope")
    tok, lengths, images = mllm_batch()
    _, positions, _, aux = nnx.jit(lambda m, t, i, n: m.embed_inputs(t, i, n))(
        model, tok, images, lengths
    )
    pos = np.asarray(positions)  # [3, B, L]
    keep = np.asarray(aux["keep_idx"])
    np.testing.assert_array_equal(keep[0], [0, 2, 8, 10])
    p = 1  # row 0's placeholder
    np.testing.assert_array_equal(pos[1, 0, p : p + 4], p + keep[0] // 4)
    np.testing.assert_array_equal(pos[2, 0, p : p + 4], p + keep[0] % 4)


# -- errors ---------------------------------------------------------------------------------------


def test_errors_name_argument_and_value():
    x = jnp.zeros((1, 16, 4))
    with pytest.raises(ValueError, match=r"keep=17"):
        build("random(keep=17)")(x)
    with pytest.raises(ValueError, match=r"keep=0"):
        build("random(keep=0)")
    with pytest.raises(ValueError, match=r"seed=-1"):
        build("random(keep=2, seed=-1)")
    with pytest.raises(ValueError, match=r"keep=1.5"):
        build("uniform(keep=1.5)")
    with pytest.raises(ValueError, match=r"keep=20"):
        build("uniform(keep=20)")(x, grid=(4, 4))
    with pytest.raises(ValueError, match=r"grid=\(3, 3\)"):
        build("uniform(keep=4)")(x, grid=(3, 3))
    with pytest.raises(ValueError, match=r"kernel=0"):
        build("avgpool(kernel=0)")
    with pytest.raises(ValueError, match=r"stride=0"):
        build("avgpool(kernel=2, stride=0)")
    with pytest.raises(ValueError, match=r"kernel=5: larger than the 4x4"):
        build("avgpool(kernel=5)")(x, grid=(4, 4))
    with pytest.raises(ValueError, match=r"tokens shape=\(16, 4\)"):
        build("avgpool(kernel=2)")(x[0])
    with pytest.raises(registry.RegistryError, match="unknown argument"):
        build("avgpool(size=2)")
    comp = build("pixel_shuffle(factor=3)", vision_dim=4, dim=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"factor=3: the 4x4 token grid"):
        comp(x, features=x, grid=(4, 4))
    with pytest.raises(ValueError, match="pixel_shuffle needs features"):
        comp(x, grid=(4, 4))
    with pytest.raises(ValueError, match=r"features shape=\(1, 16, 8\)"):
        comp(x, features=jnp.zeros((1, 16, 8)), grid=(4, 4))
    with pytest.raises(ValueError, match=r"factor=0"):
        build("pixel_shuffle(factor=0)", vision_dim=4, dim=4, rngs=nnx.Rngs(0))
