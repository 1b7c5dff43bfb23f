"""ToMe, DyMU and PruMerge+: contract, independent numpy references, MLLM end to end, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_mllm.compress  # noqa: F401  (registers the compressors)
from efficient_mllm import registry
from efficient_mllm.compress import merging

B, N, D, DV = 4, 16, 32, 8


def _inputs(seed=0, b=B, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, n, D)).astype(np.float32)
    f = rng.normal(size=(b, n, DV)).astype(np.float32)
    a = rng.gamma(0.5, size=(b, n)).astype(np.float32)
    a = a / a.sum(axis=1, keepdims=True) * 0.9
    return x, f, a


@functools.cache
def _jitted(spec):
    fn = registry.COMPRESSORS.build(spec)
    return jax.jit(lambda x, kw: fn(x, **kw))


def _run(spec, x, f, a=None):
    kw = {"features": jnp.asarray(f)}
    if a is not None:
        kw["cls_attention"] = jnp.asarray(a)
    return _jitted(spec)(jnp.asarray(x), kw)


# -- numpy references (written from the papers' rules, group by group) ---------------------------


def _cos(u, v):
    u = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-6)
    v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
    return u @ v.T


def _np_bipartite(x, f, rounds):
    """Generic bipartite soft matching on one image. ``rounds``: list of callables
    ``choose(best_scores, n_alive) -> list of A positions to merge``. Groups are lists of
    original indices; a group's token / metric is the mean of its members (= the size-weighted
    average of merged tokens); its representative is the B token it was merged into."""
    groups = [[i] for i in range(len(x))]
    reps = list(range(len(x)))
    for choose in rounds:
        order = np.argsort(reps, kind="stable")
        groups = [groups[i] for i in order]
        reps = [reps[i] for i in order]
        metric = np.stack([f[g].mean(axis=0) for g in groups])
        a_pos, b_pos = list(range(0, len(groups), 2)), list(range(1, len(groups), 2))
        if not b_pos:
            continue
        sim = _cos(metric[a_pos], metric[b_pos])
        best, partner = sim.max(axis=1), sim.argmax(axis=1)
        merged_a = set(choose(best, len(groups)))
        for i in sorted(merged_a):
            groups[b_pos[partner[i]]] = groups[b_pos[partner[i]]] + groups[a_pos[i]]
        keep = [p for p in range(len(groups)) if not (p % 2 == 0 and p // 2 in merged_a)]
        groups = [groups[p] for p in keep]
        reps = [reps[p] for p in keep]
    order = np.argsort(reps, kind="stable")
    groups = [groups[i] for i in order]
    reps = np.array([reps[i] for i in order])
    tokens = np.stack([x[g].mean(axis=0) for g in groups])
    sizes = np.array([len(g) for g in groups], np.float32)
    return reps, tokens, sizes


def _np_tome(x, f, schedule):
    def top_r(r):
        return lambda best, n: list(np.argsort(-best, kind="stable")[:r])

    return _np_bipartite(x, f, [top_r(r) for r in schedule])


def _np_dymu(x, f, threshold, caps):
    def rule(cap):
        def choose(best, n):
            chosen = [i for i in range(len(best)) if best[i] > threshold]
            need = n - cap  # merges needed so that at most `cap` groups remain
            if len(chosen) < need:
                extra = [i for i in np.argsort(-best, kind="stable") if i not in chosen]
                chosen += extra[: need - len(chosen)]
            return chosen

        return choose

    return _np_bipartite(x, f, [rule(c) for c in caps])


def test_tome_contract_and_reference(check_contract, compress_inputs):
    check_contract(registry.COMPRESSORS.build("tome(keep=5)"), compress_inputs(1), 5)
    x, f, _ = _inputs(2)
    for spec, args, schedule in [
        ("tome(keep=5)", (5, None, None), [8, 3]),
        ("tome(keep=0.5, r_per_step=3)", (8, 3, None), [3, 3, 2]),
    ]:
        assert merging.tome_schedule(N, *args) == schedule
        out = _run(spec, x, f)
        for r in range(B):
            reps, tokens, sizes = _np_tome(x[r], f[r], schedule)
            np.testing.assert_array_equal(np.asarray(out.keep_idx[r]), reps, err_msg=spec)
            np.testing.assert_allclose(np.asarray(out.tokens[r]), tokens, atol=1e-5)
            np.testing.assert_allclose(np.asarray(out.stats["sizes"][r]), sizes)
        # groups: every input token's slot; slot sizes are the group sizes
        g = np.asarray(out.stats["groups"])
        assert (
            np.bincount(g[0], minlength=out.tokens.shape[1]) == np.asarray(out.stats["sizes"][0])
        ).all()


def test_tome_steps_mode():
    assert merging.tome_schedule(N, None, 4, 2) == [4, 4]
    assert merging.tome_schedule(4, None, 4, 3) == [2, 1]  # at most half per round
    out = jax.eval_shape(
        registry.COMPRESSORS.build("tome(r_per_step=4, steps=2)"),
        _inputs()[0],
        features=_inputs()[1],
    )
    assert out.tokens.shape == (B, 8, D)


def test_tome_on_tokens_metric_merges_duplicates():
    """Exact duplicates (cosine 1) are merged first, and their average is the token."""
    x, _, _ = _inputs(3, b=1, n=8)
    x[0, 1] = x[0, 0]  # A0 and B0 identical
    x[0, 5] = 2 * x[0, 4]  # A2 and B2 parallel
    out = jax.jit(registry.COMPRESSORS.build("tome(keep=6, metric='tokens')"))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out.keep_idx[0]), [1, 2, 3, 5, 6, 7])
    np.testing.assert_allclose(np.asarray(out.tokens[0, 3]), 1.5 * x[0, 4], atol=1e-5)


def test_dymu_contract_and_reference(check_contract, compress_inputs):
    out = check_contract(
        registry.COMPRESSORS.build("dymu(threshold=0.3, capacity=5)"), compress_inputs(1), 5
    )
    assert (out["stats"]["sizes"].sum(axis=1) == N).all()  # every input token is in a group
    x, f, _ = _inputs(4)
    for spec, thr, caps in [
        ("dymu(threshold=0.3, capacity=5)", 0.3, [10, 5]),  # some forced merges
        ("dymu(threshold=0.5, capacity=12, rounds=2)", 0.5, [12, 12]),
        ("dymu(threshold=0.99)", 0.99, [16]),  # nothing above the threshold: no merge
    ]:
        out = _run(spec, x, f)
        n_kept = np.asarray(out.valid).sum(axis=1)
        for r in range(B):
            reps, tokens, sizes = _np_dymu(x[r], f[r], thr, caps)
            k = len(reps)
            assert n_kept[r] == k, spec
            np.testing.assert_array_equal(np.asarray(out.keep_idx[r, :k]), reps, err_msg=spec)
            np.testing.assert_allclose(np.asarray(out.tokens[r, :k]), tokens, atol=1e-5)
            np.testing.assert_allclose(np.asarray(out.stats["sizes"][r, :k]), sizes)
            assert not np.asarray(out.tokens[r, k:]).any()
    # adaptive: a row of identical tokens collapses further than a random one
    x2, f2 = x.copy(), f.copy()
    f2[0] = f2[0, :1]
    out = _run("dymu(threshold=0.5, capacity=12, rounds=2)", x2, f2)
    assert np.asarray(out.valid)[0].sum() == 4 and np.asarray(out.valid)[1].sum() > 4


def test_dymu_calibrate():
    _, f, _ = _inputs(5)
    thr = merging.dymu_calibrate(jnp.asarray(f), keep=4)
    assert len(thr) == len(merging.tome_schedule(N, 4)) == 2
    assert all(-1.0 <= t <= 1.0 for t in thr)
    out = _run(f"dymu(threshold={list(thr)}, capacity=8)", _inputs(5)[0], f)
    assert out.tokens.shape == (B, 8, D)


def _np_prumerge_plus(x, f, a, k, neighbors, divisor=3):
    n = len(a)
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    outliers = np.nonzero(a > q3 + 1.5 * (q3 - q1))[0]
    step = n // max(len(outliers), 1)
    stride = max(step // divisor, 1)
    samples = [i for i in range(0, n, stride) if i not in set(outliers)]
    # capacity cut: outliers first (by attention), then samples (by attention)
    chosen = sorted(outliers, key=lambda i: -a[i]) + sorted(samples, key=lambda i: -a[i])
    chosen = sorted(chosen[:k])
    out = []
    for i in chosen:
        sim = _cos(f[i : i + 1], f)[0]
        sim[i] = -np.inf
        nb = np.argsort(-sim, kind="stable")[:neighbors]
        out.append(x[i] + (a[nb, None] * x[nb]).sum(axis=0))
    return np.array(chosen), np.array(out)


def test_prumerge_plus_contract_and_reference(check_contract, compress_inputs):
    check_contract(
        registry.COMPRESSORS.build("prumerge_plus(keep=8, neighbors=4)"), compress_inputs(1), 8
    )
    x, f, a = _inputs(6)
    a[1, 3] = 0.5  # one strong outlier -> stride (16 // 1) // 3 = 5
    for spec, k in [
        ("prumerge_plus(keep=8, neighbors=4)", 8),
        ("prumerge_plus(keep=3, neighbors=15)", 3),
    ]:
        out = _run(spec, x, f, a)
        nbrs = 4 if k == 8 else 15
        for r in range(B):
            idx, tokens = _np_prumerge_plus(x[r], f[r], a[r], k, nbrs)
            m = len(idx)
            assert np.asarray(out.valid[r]).sum() == m
            np.testing.assert_array_equal(np.asarray(out.keep_idx[r, :m]), idx, err_msg=spec)
            np.testing.assert_allclose(np.asarray(out.tokens[r, :m]), tokens, atol=1e-5)


# -- MLLM end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,k",
    [
        ("tome(keep=6)", 6),
        ("dymu(threshold=0.9, capacity=6)", 6),
        ("prumerge_plus(keep=6, neighbors=4)", 6),
    ],
)
def test_mllm_end_to_end(run_mllm, spec, k):
    model, out, _ = run_mllm(spec, k)
    assert model.num_image_slots() == k
    assert np.asarray(out.aux["image_valid"]).sum(axis=1).min() >= 1


def test_errors():
    x, f, a = _inputs(0)
    with pytest.raises(ValueError, match="keep=20"):
        _run("tome(keep=20)", x, f)
    with pytest.raises(ValueError, match="r_per_step"):
        registry.COMPRESSORS.build("tome()")
    with pytest.raises(ValueError, match="steps=2"):
        registry.COMPRESSORS.build("tome(keep=4, steps=2)")
    with pytest.raises(ValueError, match="metric='nope'"):
        registry.COMPRESSORS.build("tome(keep=4, metric='nope')")
    with pytest.raises(ValueError, match="features"):
        jax.eval_shape(registry.COMPRESSORS.build("tome(keep=4)"), x)
    with pytest.raises(ValueError, match="rounds=1"):
        _run("dymu(threshold=0.5, capacity=4, rounds=1)", x, f)
    with pytest.raises(ValueError, match="threshold"):
        registry.COMPRESSORS.build("dymu(threshold='high')")
    with pytest.raises(ValueError, match="capacity=0"):
        registry.COMPRESSORS.build("dymu(threshold=0.5, capacity=0)")
    with pytest.raises(ValueError, match="cls_attention"):
        _run("prumerge_plus(keep=4, neighbors=4)", x, f)
    with pytest.raises(ValueError, match="neighbors=16"):
        _run("prumerge_plus(keep=4, neighbors=16)", x, f, a)
    with pytest.raises(ValueError, match="keep=1.5"):
        registry.COMPRESSORS.build("prumerge_plus(keep=1.5)")
    # an encoder without [CLS] (cls=None) needs the explicit mean-query fallback
    kw = {"features": jnp.asarray(f), "cls_attention": jnp.asarray(a), "cls": None}
    with pytest.raises(ValueError, match="use_cls=False"):
        jax.eval_shape(registry.COMPRESSORS.build("prumerge_plus(keep=4, neighbors=4)"), x, **kw)
    fb = registry.COMPRESSORS.build("prumerge_plus(keep=4, neighbors=4, fallback='mean_query')")
    assert jax.eval_shape(fb, x, **kw).tokens.shape == (B, 4, D)
