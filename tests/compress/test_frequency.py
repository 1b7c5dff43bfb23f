"""Fourier-VLM: contract, scipy DCT references (coefficients and inverse), invariants, MLLM end
to end, errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

from efficient_mllm import registry
from efficient_mllm.compress import frequency

from .conftest import contract, make_inputs, run_end_to_end


def build(spec):
    return registry.COMPRESSORS.build(spec)


def fourier_numpy(x, grid, kh, kw, inverse):
    """scipy's orthonormal 2D DCT-II over the grid, low kh x kw block, optional k-point IDCT
    rescaled by sqrt(kh kw / (gh gw))."""
    gh, gw = grid
    coef = scipy.fft.dctn(
        x.reshape(gh, gw, -1).astype(np.float64), type=2, norm="ortho", axes=(0, 1)
    )
    low = coef[:kh, :kw]
    if inverse:
        low = scipy.fft.idctn(low, type=2, norm="ortho", axes=(0, 1)) * np.sqrt(kh * kw / (gh * gw))
    return low.reshape(kh * kw, -1)


@pytest.mark.parametrize(
    "spec, grid, out_grid",
    [
        ("fourier_vlm(keep_side=2)", (4, 4), (2, 2)),
        ("fourier_vlm(keep_side=3, inverse=False)", (4, 4), (3, 3)),
        ("fourier_vlm(keep_side=(2, 3))", (4, 6), (2, 3)),
        ("fourier_vlm(keep=0.25, inverse=False)", (4, 4), (2, 2)),
        ("fourier_vlm(keep=6)", (6, 4), (3, 2)),
    ],
)
def test_fourier_matches_scipy(spec, grid, out_grid):
    inp = make_inputs(0, grid=grid)
    kh, kw = out_grid
    out = contract(build(spec), inp, kh * kw, grid=grid)
    inverse = "inverse=False" not in spec
    for r in range(4):
        ref = fourier_numpy(inp["tokens"][r], grid, kh, kw, inverse)
        np.testing.assert_allclose(out["tokens"][r], ref, rtol=1e-4, atol=1e-5)
        # keep_idx: the centre cell of each row band x column band.
        gh, gw = grid
        rows = [int(np.floor((i + 0.5) * gh / kh)) for i in range(kh)]
        cols = [int(np.floor((j + 0.5) * gw / kw)) for j in range(kw)]
        np.testing.assert_array_equal(out["keep_idx"][r], [a * gw + b for a in rows for b in cols])


def test_invariants():
    x = np.random.default_rng(1).normal(size=(2, 16, 5)).astype(np.float32)
    # Full block + inverse is the identity; a constant map stays constant.
    full = build("fourier_vlm(keep_side=4)")(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(full.tokens), x, rtol=1e-5, atol=1e-5)
    const = np.ones((1, 16, 3), np.float32) * 2.5
    out = build("fourier_vlm(keep_side=2)")(jnp.asarray(const))
    np.testing.assert_allclose(np.asarray(out.tokens), 2.5, rtol=1e-5)
    # Orthonormal DCT: the full coefficient block keeps the energy.
    coef = build("fourier_vlm(keep_side=4, inverse=False)")(jnp.asarray(x))
    np.testing.assert_allclose((np.asarray(coef.tokens) ** 2).sum(), (x**2).sum(), rtol=1e-5)
    m = frequency.dct_matrix(5)
    np.testing.assert_allclose(m @ m.T, np.eye(5), atol=1e-12)


def test_end_to_end():
    run_end_to_end("fourier_vlm(keep_side=2)", 4)


def test_errors_name_argument_and_value():
    x = jnp.zeros((1, 16, 4))
    with pytest.raises(ValueError, match=r"keep_side=None, keep=None: give exactly one"):
        build("fourier_vlm()")
    with pytest.raises(ValueError, match=r"keep_side=2, keep=4: give exactly one"):
        build("fourier_vlm(keep_side=2, keep=4)")
    with pytest.raises(ValueError, match=r"keep_side=0"):
        build("fourier_vlm(keep_side=0)")
    with pytest.raises(ValueError, match=r"keep_side=\(1, 2, 3\)"):
        build("fourier_vlm(keep_side=(1, 2, 3))")
    with pytest.raises(ValueError, match=r"keep_side=5: larger than the 4x4"):
        build("fourier_vlm(keep_side=5)")(x)
    with pytest.raises(ValueError, match=r"keep=7: cannot be arranged"):
        build("fourier_vlm(keep=7)")(x)
    with pytest.raises(ValueError, match=r"keep=1.5"):
        build("fourier_vlm(keep=1.5)")
    with pytest.raises(ValueError, match=r"inverse=1"):
        build("fourier_vlm(keep_side=2, inverse=1)")
    with pytest.raises(ValueError, match=r"grid=None with 12 tokens"):
        build("fourier_vlm(keep_side=2)")(jnp.zeros((1, 12, 4)))
