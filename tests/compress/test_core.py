"""compress.core: budgets, the top-k selector, gathers, merge, nearest assignment, k-center,
grid helpers, slot sorting and argument checks, each against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm.compress import core


def test_resolve_and_check_budget():
    assert core.resolve_budget(5, 16) == 5
    assert core.resolve_budget(0.25, 16) == 4
    assert core.resolve_budget(0.01, 16) == 1  # at least one token
    assert core.resolve_budget(1.0, 16) == 16
    with pytest.raises(ValueError, match=r"keep=17: expected 1 <= keep <= 16"):
        core.resolve_budget(17, 16)
    with pytest.raises(ValueError, match=r"dominant=1.5"):
        core.resolve_budget(1.5, 16, name="dominant")
    for bad in (0, -1, True, "3", None, 0.0, 2.0):
        with pytest.raises(ValueError, match=r"keep="):
            core.check_budget(bad)
    assert core.check_budget(3) == 3 and core.check_budget(0.5) == 0.5


def test_topk_select_order_ties_and_valid():
    s = jnp.array([[0.1, 0.5, 0.5, 0.9, 0.0], [3.0, 2.0, 1.0, 0.0, -1.0]])
    idx, ok = core.topk_select(s, 3)
    np.testing.assert_array_equal(np.asarray(idx), [[1, 2, 3], [0, 1, 2]])
    assert np.asarray(ok).all()
    # Ties break towards the lower index.
    idx, _ = core.topk_select(jnp.zeros((1, 5)), 2)
    np.testing.assert_array_equal(np.asarray(idx), [[0, 1]])
    # Fewer valid entries than k: invalid slots last and flagged.
    valid = jnp.array([[True, False, False, True, False], [True] * 5])
    idx, ok = core.topk_select(s, 3, valid=valid)
    np.testing.assert_array_equal(np.asarray(idx)[0, :2], [0, 3])
    np.testing.assert_array_equal(np.asarray(ok), [[True, True, False], [True, True, True]])
    idx, _ = core.topk_select(s, 2, keep_order=False)
    np.testing.assert_array_equal(np.asarray(idx), [[3, 1], [0, 1]])
    with pytest.raises(ValueError, match=r"k=6"):
        core.topk_select(s, 6)
    with pytest.raises(ValueError, match=r"scores shape"):
        core.topk_select(s[0], 2)


def test_gathers_1d_and_3d_positions():
    x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    idx = jnp.array([[0, 4], [2, 3]])
    np.testing.assert_array_equal(
        np.asarray(core.gather_tokens(x, idx)), np.asarray(x)[[[0], [1]], idx]
    )
    pos = jnp.broadcast_to(jnp.arange(5)[None] + 10, (2, 5))
    np.testing.assert_array_equal(np.asarray(core.gather_positions(pos, idx)), [[10, 14], [12, 13]])
    pos3 = jnp.stack([pos, pos * 2, pos * 3])
    got = np.asarray(core.gather_positions(pos3, idx))
    assert got.shape == (3, 2, 2)
    np.testing.assert_array_equal(got[2], [[30, 42], [36, 39]])
    assert core.gather_positions(None, idx) is None
    with pytest.raises(ValueError, match="positions shape"):
        core.gather_positions(jnp.zeros((5,)), idx)


def test_cosine_similarity_zero_vectors_are_finite():
    a = jnp.zeros((1, 2, 4)).at[0, 1].set(1.0)
    sim = np.asarray(core.cosine_similarity(a, a))
    assert np.isfinite(sim).all()
    np.testing.assert_allclose(sim[0], [[0, 0], [0, 1]], atol=1e-6)


def test_merge_tokens_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 3)).astype(np.float32)
    assign = np.array([[0, 1, 1, -1, 2, 0, 0], [2, 2, 2, 2, 2, 2, 2]], np.int32)
    w = rng.uniform(0.5, 2.0, size=(2, 7)).astype(np.float32)
    merged, total = core.merge_tokens(
        jnp.asarray(x), jnp.asarray(assign), 3, weights=jnp.asarray(w)
    )
    for b in range(2):
        for s in range(3):
            members = [i for i in range(7) if assign[b, i] == s]
            ref_w = sum(w[b, i] for i in members)
            ref = sum(w[b, i] * x[b, i] for i in members) / ref_w if members else np.zeros(3)
            np.testing.assert_allclose(np.asarray(merged)[b, s], ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(total)[b, s], ref_w, rtol=1e-6)
    with pytest.raises(ValueError, match="assign shape"):
        core.merge_tokens(jnp.asarray(x), jnp.asarray(assign[:, :3]), 3)


def test_nearest_assign_matches_numpy_and_keeps_centres():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 4)).astype(np.float32)
    centres = np.array([[1, 4, 7], [0, 2, 8]], np.int32)
    assign = jax.jit(core.nearest_assign)
    got = np.asarray(assign(jnp.asarray(x), jnp.asarray(centres)))
    for b in range(2):
        xn = x[b] / np.linalg.norm(x[b], axis=1, keepdims=True)
        for i in range(9):
            if i in centres[b]:
                assert got[b, i] == list(centres[b]).index(i)
            else:
                assert got[b, i] == int(np.argmax(xn[centres[b]] @ xn[i]))
    valid = jnp.array([[True, True, False], [True, True, True]])
    got = np.asarray(assign(jnp.asarray(x), jnp.asarray(centres), centers_valid=valid))
    assert not (got[0] == 2).any()  # nobody goes to an invalid centre


def _kcenter_numpy(x, k, first, bonus):
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    dist = 1.0 - xn @ xn.T
    chosen = [first]
    while len(chosen) < k:
        best, best_score = None, -np.inf
        for j in range(len(x)):
            if j in chosen:
                continue
            score = min(dist[j, s] for s in chosen) + bonus[j]
            if score > best_score:
                best, best_score = j, score
        chosen.append(best)
    return sorted(chosen)


def test_kcenter_select_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 20, 5)).astype(np.float32)
    bonus = rng.uniform(0, 0.3, size=(3, 20)).astype(np.float32)
    first = np.array([0, 7, 19], np.int32)
    f = jax.jit(lambda x, first, bonus: core.kcenter_select(x, 6, first=first, bonus=bonus))
    idx, ok = f(jnp.asarray(x), jnp.asarray(first), jnp.asarray(bonus))
    assert np.asarray(ok).all()
    for b in range(3):
        assert list(np.asarray(idx)[b]) == _kcenter_numpy(x[b], 6, int(first[b]), bonus[b])
    # Invalid candidates are never chosen; too few valid ones leave flagged slots.
    valid = np.zeros((3, 20), bool)
    valid[:, :4] = True
    g = jax.jit(lambda x, v: core.kcenter_select(x, 6, first=jnp.zeros(3, jnp.int32), valid=v))
    idx, ok = g(jnp.asarray(x), valid)
    idx, ok = np.asarray(idx), np.asarray(ok)
    np.testing.assert_array_equal(ok.sum(1), [4, 4, 4])
    np.testing.assert_array_equal(idx[:, :4], [[0, 1, 2, 3]] * 3)
    with pytest.raises(ValueError, match=r"k=21"):
        core.kcenter_select(jnp.asarray(x), 21, first=jnp.zeros(3, jnp.int32))


def test_grid_budget_and_band_centres():
    assert core.grid_budget(4, (4, 4)) == (2, 2)
    assert core.grid_budget(8, (4, 4)) in ((2, 4), (4, 2))
    assert core.grid_budget(6, (2, 8)) == (1, 6)  # aspect closest to 2:8
    assert core.grid_budget(0.25, (8, 8)) == (4, 4)
    with pytest.raises(ValueError, match=r"keep=7: cannot be arranged"):
        core.grid_budget(7, (4, 4))
    with pytest.raises(ValueError, match=r"keep=17"):
        core.grid_budget(17, (4, 4))
    # Stride-2 centres of a 4x4 grid: rows/cols 1 and 3.
    np.testing.assert_array_equal(core.band_centres((4, 4), (2, 2)), [5, 7, 13, 15])
    np.testing.assert_array_equal(core.band_centres((6, 6), (2, 3)), [7, 9, 11, 25, 27, 29])
    np.testing.assert_array_equal(core.band_centres((3, 3), (3, 3)), np.arange(9))
    with pytest.raises(ValueError, match="out_grid"):
        core.band_centres((3, 3), (4, 1))
    assert core.grid_shape(None, 16) == (4, 4)
    with pytest.raises(ValueError, match="cannot infer a square grid"):
        core.grid_shape(None, 12)
    with pytest.raises(ValueError, match=r"grid=\(3, 3\) holds 9"):
        core.grid_shape((3, 3), 12)


def test_sort_slots_and_compressed():
    idx = jnp.array([[5, 1, 3], [2, 0, 9]])
    valid = jnp.array([[True, False, True], [True, True, True]])
    x = jnp.arange(6.0).reshape(2, 3, 1)
    i2, v2, x2 = core.sort_slots(idx, valid, x)
    np.testing.assert_array_equal(np.asarray(i2), [[3, 5, 1], [0, 2, 9]])
    np.testing.assert_array_equal(np.asarray(v2), [[True, True, False], [True] * 3])
    np.testing.assert_array_equal(np.asarray(x2)[..., 0], [[2, 0, 1], [4, 3, 5]])
    c = core.compressed(x, idx, valid, extra=jnp.ones(2))
    np.testing.assert_array_equal(np.asarray(c.stats["num_kept"]), [2, 3])
    assert c.position_ids is None and "extra" in c.stats
    # Compressed is a pytree (passes through jit).
    out = jax.jit(lambda c: c)(c)
    np.testing.assert_array_equal(np.asarray(out.keep_idx), np.asarray(idx))


def test_argument_checks_name_the_argument():
    with pytest.raises(ValueError, match=r"tokens shape=\(2, 3\)"):
        core.check_tokens(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"features shape=\(1, 2, 3\) dtype=int32"):
        core.check_tokens(jnp.zeros((1, 2, 3), jnp.int32), "features")
    with pytest.raises(ValueError, match="fastervlm needs cls_attention"):
        core.require(None, "cls_attention", "fastervlm")
    assert core.require(3, "x", "m") == 3
