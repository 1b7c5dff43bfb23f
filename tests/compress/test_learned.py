"""FlashSloth attention pooling and the Matryoshka Query Transformer: contract, reference,
gradients, train / eval switching, MLLM end to end, errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_mllm.compress  # noqa: F401  (registers the compressors)
from efficient_mllm import registry
from efficient_mllm.compress.learned import MatryoshkaQueryTransformer, SpatialAttentionPool

B, N, D, M = 4, 16, 32, 4


def _tokens(seed=0, b=B):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, N, D)), jnp.float32)


@nnx.jit
def _apply(module, x):
    return module(x)


def _check_rows(out, k):
    assert (
        out.tokens.shape == (B, k, D) and out.keep_idx.shape == (B, k) and out.valid.shape == (B, k)
    )
    assert np.isfinite(np.asarray(out.tokens)).all()
    idx, ok = np.asarray(out.keep_idx), np.asarray(out.valid)
    assert ((idx >= 0) & (idx < N)).all()
    for r in range(B):
        assert (np.diff(idx[r][ok[r]]) > 0).all()


# -- attn_pool -----------------------------------------------------------------------------------


def _pool(pool=2, seed=0):
    return registry.COMPRESSORS.build(
        f"attn_pool(pool={pool!r})", dim=D, grid=(4, 4), rngs=nnx.Rngs(seed)
    )


def _np_sap(module, x, grid, pool):
    """Region by region: MLP scores, softmax inside the region, weighted sum of its tokens."""
    w1, b1 = np.asarray(module.score_fc1.kernel[...]), np.asarray(module.score_fc1.bias[...])
    w2, b2 = np.asarray(module.score_fc2.kernel[...]), np.asarray(module.score_fc2.bias[...])
    gh, gw = grid
    x = np.asarray(x, np.float64).reshape(gh, gw, -1)
    outs = []
    for r0 in range(0, gh, pool):
        for c0 in range(0, gw, pool):
            cell = x[r0 : r0 + pool, c0 : c0 + pool].reshape(-1, x.shape[-1])
            s = (np.maximum(cell @ w1 + b1, 0) @ w2 + b2)[:, 0]
            p = np.exp(s - s.max())
            outs.append((p / p.sum()) @ cell)
    return np.stack(outs)


def test_attn_pool_contract_and_reference():
    mod = _pool(2)
    assert isinstance(mod, SpatialAttentionPool)
    x = _tokens(1)
    out = _apply(mod, x)
    _check_rows(out, 4)
    assert np.asarray(out.valid).all()
    np.testing.assert_array_equal(np.asarray(out.keep_idx[0]), [5, 7, 13, 15])  # region centres
    for r in range(B):
        np.testing.assert_allclose(
            np.asarray(out.tokens[r]), _np_sap(mod, x[r], (4, 4), 2), atol=1e-5
        )
    # batch invariance
    one = _apply(mod, x[2:3])
    np.testing.assert_allclose(np.asarray(one.tokens[0]), np.asarray(out.tokens[2]), atol=1e-5)
    # ragged grid: 3x3 regions over 4x4 -> regions of 9, 3, 3, 1 tokens
    mod3 = _pool(3)
    out3 = mod3(x)
    np.testing.assert_array_equal(np.asarray(out3.stats["region_size"]), [9, 3, 3, 1])
    np.testing.assert_array_equal(np.asarray(out3.keep_idx[0]), [5, 7, 13, 15])
    np.testing.assert_allclose(
        np.asarray(out3.tokens[1]), _np_sap(mod3, x[1], (4, 4), 3), atol=1e-5
    )


def test_attn_pool_gradients():
    mod = _pool(2)
    x = _tokens(2)

    def loss(m):
        return jnp.sum(m(x).tokens ** 2)

    grads = nnx.jit(nnx.grad(loss))(mod)
    for leaf in (grads.score_fc1.kernel, grads.score_fc2.kernel, grads.score_fc1.bias):
        assert np.abs(np.asarray(leaf[...])).max() > 0


# -- mqt -----------------------------------------------------------------------------------------


def _mqt(seed=0, **kw):
    spec = "mqt(" + ", ".join(f"{k}={v!r}" for k, v in {"max_queries": M, **kw}.items()) + ")"
    return registry.COMPRESSORS.build(spec, dim=D, num_tokens=N, rngs=nnx.Rngs(seed))


def test_mqt_every_budget_and_nesting():
    mod = _mqt()
    assert isinstance(mod, MatryoshkaQueryTransformer)
    mod.eval()
    assert mod.deterministic and int(mod.budget[...]) == M
    x = _tokens(3)
    for m in range(1, M + 1):
        mod.set_budget(m)
        out = _apply(mod, x)
        _check_rows(out, M)
        ok = np.asarray(out.valid)
        assert (ok[:, :m]).all() and not ok[:, m:].any()
        np.testing.assert_array_equal(np.asarray(out.keep_idx[0, :m]), np.arange(m) * N // m)
        assert not np.asarray(out.tokens[:, m:]).any()
        # only the first m queries matter: changing the others leaves the tokens unchanged
        saved = mod.queries[...]
        mod.queries[...] = saved.at[m:].add(1.0)
        moved = _apply(mod, x)
        mod.queries[...] = saved
        np.testing.assert_allclose(np.asarray(moved.tokens), np.asarray(out.tokens), atol=1e-5)
    # batch invariance
    mod.set_budget(3)
    full, one = _apply(mod, x), _apply(mod, x[1:2])
    np.testing.assert_allclose(np.asarray(one.tokens[0]), np.asarray(full.tokens[1]), atol=1e-5)


def test_mqt_training_budgets_and_gradients():
    mod = _mqt(min_budget=2)
    assert not mod.deterministic  # NNX convention: modules start in training mode
    x = _tokens(4)
    budgets = {int(_apply(mod, x).stats["budget"][0]) for _ in range(12)}
    assert budgets <= set(range(2, M + 1)) and len(budgets) > 1  # one random m per call

    mod.eval()
    mod.set_budget(2)

    def loss(m):
        return jnp.sum(m(x).tokens ** 2)

    g = np.asarray(nnx.jit(nnx.grad(loss))(mod).queries[...])
    assert np.abs(g[:2]).max() > 0 and not g[2:].any()  # only the active queries learn
    mod.train()
    assert not mod.deterministic
    view = nnx.view(mod, deterministic=True)
    assert view.deterministic and not mod.deterministic


# -- MLLM end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["attn_pool(pool=2)", "mqt(max_queries=4, min_budget=2)"])
def test_mllm_end_to_end(run_mllm, spec):
    model, out, _ = run_mllm(spec, 4)  # training mode: MQT draws its budget per call
    assert isinstance(model.compressor, nnx.Module)
    assert "compressor" in nnx.state(model, nnx.Param)  # a submodule: trains with the model
    n_img = np.asarray(out.aux["num_image_tokens"])
    if spec.startswith("attn_pool"):
        assert (n_img == 4).all()
    else:
        assert len(set(n_img.tolist())) == 1 and 2 <= n_img[0] <= 4  # one m per batch
        model.eval()  # NNX mode switch reaches the compressor submodule
        assert model.compressor.deterministic
        model.train()
        assert not model.compressor.deterministic


def test_errors():
    with pytest.raises(ValueError, match="dim"):
        registry.COMPRESSORS.build("attn_pool(pool=2)", grid=(4, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pool=0"):
        registry.COMPRESSORS.build("attn_pool(pool=0)", dim=D, grid=(4, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pool=5"):
        registry.COMPRESSORS.build("attn_pool(pool=5)", dim=D, grid=(4, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_queries=17"):
        _mqt(max_queries=17)
    with pytest.raises(ValueError, match="budget=5"):
        _mqt(budget=5)
    with pytest.raises(ValueError, match="min_budget=5"):
        _mqt(min_budget=5)
    with pytest.raises(ValueError, match="heads=3"):
        _mqt(heads=3)
    mod = _pool(2)
    with pytest.raises(ValueError, match="tokens shape"):
        mod(jnp.zeros((1, N, D + 1)))
