"""Linear attention forms against a numpy float64 recurrence (explicit loop over t with a state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm.ops import linear_attention as la

# ----------------------------------------------------------------------------- numpy reference


def np_features(x, name, kw):
    """Feature maps written independently in float64; x [..., N, d]."""
    x = np.asarray(x, np.float64)
    if name == "identity":
        return x
    if name == "elu_plus_one":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "taylor2":
        x = x * kw.get("scale", 1.0)
        d = x.shape[-1]
        quad = np.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], d * d)
        return np.concatenate([np.ones(x.shape[:-1] + (1,)), x, quad / np.sqrt(2.0)], -1)
    if name == "performer":
        w = np.asarray(kw["projection"], np.float64)
        xw = (
            np.einsum("...nd,dm->...nm", x, w)
            if w.ndim == 2
            else np.einsum("...nd,ndm->...nm", x, w)
        )
        return np.exp(xw - 0.5 * (x**2).sum(-1, keepdims=True)) / np.sqrt(w.shape[-1])
    if name == "hedgehog":
        w = np.asarray(kw["weight"], np.float64)
        h = (
            np.einsum("...nd,dm->...nm", x, w)
            if w.ndim == 2
            else np.einsum("...nd,ndm->...nm", x, w)
        )
        if kw.get("bias") is not None:
            h = h + np.asarray(kw["bias"], np.float64)

        def softmax(a):
            e = np.exp(a - a.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        return np.concatenate([softmax(h), softmax(-h)], -1)
    raise AssertionError(name)


def np_reference(
    q,
    k,
    v,
    *,
    name="identity",
    kw=None,
    g=None,
    normalizer="none",
    eps=1e-6,
    scale=1.0,
    s0=None,
    z0=None,
):
    """Loop over t with one state per *query* head. g: None, [N] or [B, T, N].

    Returns out [B, T, Nq, dv] and the final (S [B, Nq, F, dv], z [B, Nq, F]).
    """
    kw = kw or {}
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, nq, _ = q.shape
    rep = nq // k.shape[2]
    pq = np_features(q, name, kw) * scale
    pk = np.repeat(np_features(k, name, kw), rep, axis=2)
    vv = np.repeat(v, rep, axis=2)
    f, dv = pq.shape[-1], v.shape[-1]
    if g is None:
        gq = np.zeros((b, t, nq))
    else:
        g = np.asarray(g, np.float64)
        g = np.broadcast_to(g, (b, t, g.shape[-1]))
        gq = g if g.shape[-1] == nq else np.repeat(g, rep, axis=2)
    s = np.zeros((b, nq, f, dv)) if s0 is None else np.array(s0, np.float64)
    z = np.zeros((b, nq, f)) if z0 is None else np.array(z0, np.float64)
    out = np.zeros((b, t, nq, dv))
    for i in range(t):
        a = np.exp(gq[:, i])  # [B, Nq]
        s = a[..., None, None] * s + pk[:, i, :, :, None] * vv[:, i, :, None, :]
        z = a[..., None] * z + pk[:, i]
        num = np.einsum("bnf,bnfv->bnv", pq[:, i], s)
        if normalizer == "divisive":
            num = num / (np.einsum("bnf,bnf->bn", pq[:, i], z)[..., None] + eps)
        out[:, i] = num
    return out, (s, z)


def expand_state(state, nq):
    """Library state [B, Ns, ...] -> per-query-head state [B, Nq, ...] (repeat when Ns = Nkv)."""
    return np.repeat(np.asarray(state, np.float64), nq // state.shape[1], axis=1)


def assert_close(x, ref, rtol, what=""):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), what
    np.testing.assert_allclose(
        x, ref, rtol=rtol, atol=rtol * max(np.abs(ref).max(), 1e-30), err_msg=what
    )


# ----------------------------------------------------------------------------- inputs


def make_inputs(rng, b, t, nq, nkv, dk, dv, name, decay, decay_heads, dtype=np.float32):
    q = rng.standard_normal((b, t, nq, dk)).astype(dtype)
    k = rng.standard_normal((b, t, nkv, dk)).astype(dtype)
    v = rng.standard_normal((b, t, nkv, dv)).astype(dtype)
    kw = {}
    if name == "taylor2":
        kw = {"scale": dk**-0.25}
    elif name == "performer":
        q, k = q * dk**-0.25, k * dk**-0.25
        kw = {"projection": rng.standard_normal((dk, 16)).astype(np.float32)}
    elif name == "hedgehog":
        w = np.eye(dk, 6, dtype=np.float32) + 0.3 * rng.standard_normal((dk, 6))
        kw = {
            "weight": w.astype(np.float32),
            "bias": 0.1 * rng.standard_normal(6).astype(np.float32),
        }
        if nq == nkv:  # per-head weights [N, d, m]
            kw["weight"] = np.stack([kw["weight"]] * nq) + 0.1 * rng.standard_normal((nq, dk, 6))
            kw["weight"] = kw["weight"].astype(np.float32)
    n = nq if decay_heads == "q" else nkv
    g = None
    if decay == "constant":
        g = -rng.uniform(0.05, 1.0, n).astype(np.float32)
    elif decay == "data":
        g = -np.log1p(np.exp(rng.standard_normal((b, t, n)))).astype(np.float32)  # -softplus
    return q, k, v, kw, g


FEATURES = ["identity", "elu_plus_one", "relu", "taylor2", "performer", "hedgehog"]
DECAYS = ["none", "constant", "data"]
CASES = [(f, d) for f in FEATURES for d in DECAYS]


@pytest.mark.parametrize("name,decay", CASES)
def test_forms_match_numpy(name, decay):
    i = CASES.index((name, decay))
    rng = np.random.default_rng(i)
    b = 1 + i % 2
    nkv, rep = [(2, 1), (1, 4), (2, 4)][i % 3]
    t, chunk = [(13, 4), (19, 8), (24, 5)][(i // 3) % 3]
    dk, dv = (4, 3) if name == "taylor2" else (6, 5)
    normalizer = "none" if name == "identity" or i % 2 else "divisive"
    decay_heads = "q" if i % 4 < 2 else "kv"
    q, k, v, kw, g = make_inputs(rng, b, t, nkv * rep, nkv, dk, dv, name, decay, decay_heads)
    ref, (rs, rz) = np_reference(q, k, v, name=name, kw=kw, g=g, normalizer=normalizer)
    for form in la.FORMS:
        out, st = la.linear_attention(
            q,
            k,
            v,
            feature_map=name,
            feature_kwargs=kw,
            log_decay=g,
            normalizer=normalizer,
            form=form,
            chunk_size=chunk,
            return_state=True,
        )
        assert out.shape == (b, t, nkv * rep, dv) and out.dtype == jnp.float32
        assert_close(out, ref, 1e-5, f"{form} out")
        assert_close(expand_state(st.kv, nkv * rep), rs, 1e-5, f"{form} state")
        if normalizer == "divisive":
            assert_close(expand_state(st.z, nkv * rep), rz, 1e-5, f"{form} z")
        else:
            assert st.z is None


def test_feature_maps_equations():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 4)) * 0.5, rng.standard_normal((2, 3, 4)) * 0.5
    s = np.einsum("...d,...d->...", q, k)
    # Taylor: phi(q).phi(k) = 1 + s + s^2/2 ; 1 + d + d^2 features.
    fq, fk = (np.asarray(la.taylor2(jnp.asarray(x, jnp.float32))) for x in (q, k))
    assert fq.shape == (2, 3, 21)
    np.testing.assert_allclose((fq * fk).sum(-1), 1 + s + s**2 / 2, rtol=1e-5)
    # Performer: an unbiased estimate of exp(q.k).
    w = rng.standard_normal((4, 200_000)).astype(np.float32)
    est = np.asarray(la.performer(q, projection=w)) * np.asarray(la.performer(k, projection=w))
    np.testing.assert_allclose(est.sum(-1), np.exp(s), rtol=0.05)
    # Hedgehog: two softmaxes (each sums to 1), positive.
    h = np.asarray(la.hedgehog(q, weight=rng.standard_normal((4, 5))))
    assert h.shape == (2, 3, 10) and h.min() > 0
    np.testing.assert_allclose(h.sum(-1), 2.0, rtol=1e-5)
    for name in ("identity", "elu_plus_one", "relu"):
        np.testing.assert_allclose(
            la.FEATURE_MAPS[name](q), np_features(q, name, {}), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("decay", ["constant", "data"])
def test_bf16_long_strong_decay(decay):
    """T=2048, mean log-decay ~ -1: the running product of decays is exp(-2000) (0 in bf16/fp32)."""
    rng = np.random.default_rng(7)
    b, t, nq, nkv, dk, dv = 1, 2048, 2, 1, 8, 8
    q, k, v, _, g = make_inputs(rng, b, t, nq, nkv, dk, dv, "identity", decay, "q")
    g = g - 0.5 if decay == "data" else np.full_like(g, -1.5)
    g_head0 = np.broadcast_to(g, (b, t, nq))[0, :, 0]
    assert float(jnp.prod(jnp.exp(jnp.asarray(g_head0, jnp.bfloat16)))) == 0.0
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    # fp32 reference on the bf16-rounded inputs; the bf16 output's rounding (2^-8 relative) is
    # the only error left, so outputs match within 1e-2 of the largest entry.
    ref, (rs, _) = np_reference(*(np.asarray(x, np.float64) for x in (qb, kb, vb)), g=g)
    for form in ("chunked", "recurrent", "parallel"):
        out, st = la.linear_attention(
            qb, kb, vb, log_decay=g, form=form, chunk_size=64, return_state=True
        )
        assert out.dtype == jnp.bfloat16 and st.kv.dtype == jnp.float32
        assert_close(out, ref, 1e-2, form)
        assert_close(expand_state(st.kv, nq), rs, 1e-5, f"{form} fp32 state")
    # Normalised elu+1 in bf16, same bound.
    ref, _ = np_reference(
        *(np.asarray(x, np.float64) for x in (qb, kb, vb)),
        name="elu_plus_one",
        g=g,
        normalizer="divisive",
    )
    out = la.linear_attention(
        qb, kb, vb, feature_map="elu_plus_one", log_decay=g, normalizer="divisive", chunk_size=64
    )
    assert_close(out, ref, 1e-2, "divisive bf16")


GRAD_CASES = [
    ("elu_plus_one", "data", "divisive", 2, 2),
    ("hedgehog", "constant", "divisive", 1, 4),
    ("taylor2", "none", "none", 2, 1),
    ("identity", "data", "none", 1, 4),  # strong decay: masked exp(+large) must not NaN
]


@pytest.mark.parametrize("name,decay,normalizer,b,rep", GRAD_CASES)
def test_gradients_chunked_vs_parallel(name, decay, normalizer, b, rep):
    rng = np.random.default_rng(3)
    t, nkv = 21, 1
    q, k, v, kw, g = make_inputs(rng, b, t, nkv * rep, nkv, 4, 3, name, decay, "q")
    if name == "identity":
        g = g * 40.0  # exp(-40 * 8) of a chunk: naive in-chunk ratios would overflow
    ct = jnp.asarray(rng.standard_normal((b, t, nkv * rep, 3)), jnp.float32)
    diff = {"q": q, "k": k, "v": v, "kw": kw}
    if g is not None:
        diff["g"] = g

    def loss(p, form):
        out = la.linear_attention(
            p["q"],
            p["k"],
            p["v"],
            feature_map=name,
            feature_kwargs=p["kw"],
            log_decay=p.get("g"),
            normalizer=normalizer,
            form=form,
            chunk_size=8,
        )
        return jnp.sum(out * ct)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    grads = {f: grad(diff, f) for f in ("parallel", "chunked")}
    flat_p, _ = jax.tree_util.tree_flatten_with_path(grads["parallel"])
    flat_c = jax.tree_util.tree_leaves(grads["chunked"])
    assert len(flat_p) == len(flat_c) >= 3
    for (path, gp), gc in zip(flat_p, flat_c):
        assert_close(gc, gp, 1e-4, jax.tree_util.keystr(path))


@pytest.mark.parametrize("normalizer,decay_heads", [("divisive", "q"), ("none", "kv")])
def test_decode_continues_chunked_prefill(normalizer, decay_heads):
    rng = np.random.default_rng(5)
    b, t, t0, nq, nkv = 2, 17, 11, 4, 2
    q, k, v, kw, g = make_inputs(rng, b, t, nq, nkv, 4, 3, "elu_plus_one", "data", decay_heads)
    opts = dict(feature_map="elu_plus_one", normalizer=normalizer)
    full = la.linear_attention(q, k, v, log_decay=g, form="parallel", **opts)
    prefill = jax.jit(
        lambda q, k, v, g: la.linear_attention(
            q, k, v, log_decay=g, chunk_size=4, return_state=True, **opts
        )
    )
    out0, state = prefill(q[:, :t0], k[:, :t0], v[:, :t0], g[:, :t0])
    np.testing.assert_allclose(out0, full[:, :t0], rtol=1e-5, atol=1e-5)
    step = jax.jit(lambda q, k, v, s, g: la.linear_attention_step(q, k, v, s, log_decay=g, **opts))
    for i in range(t0, t):
        out, state = step(q[:, i], k[:, i], v[:, i], state, g[:, i])
        np.testing.assert_allclose(out, full[:, i], rtol=1e-5, atol=1e-5)
    # initial_state continues a prefix in the parallel and chunked forms as well.
    _, s1 = la.linear_attention(
        q[:, :t0],
        k[:, :t0],
        v[:, :t0],
        log_decay=g[:, :t0],
        form="parallel",
        return_state=True,
        **opts,
    )
    for form in ("parallel", "chunked"):
        rest = la.linear_attention(
            q[:, t0:],
            k[:, t0:],
            v[:, t0:],
            log_decay=g[:, t0:],
            form=form,
            chunk_size=4,
            initial_state=s1,
            **opts,
        )
        np.testing.assert_allclose(rest, full[:, t0:], rtol=1e-5, atol=1e-5)
    # A first step from no state equals the first token.
    out, _ = la.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], log_decay=g[:, 0], **opts)
    np.testing.assert_allclose(out, full[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "normalizer,b,rep,masked", [("divisive", 2, 4, True), ("none", 1, 1, False)]
)
def test_global_matches_numpy(normalizer, b, rep, masked):
    rng = np.random.default_rng(11)
    tq, tk, nkv, dk, dv = 7, 10, 2, 4, 3
    q = rng.standard_normal((b, tq, nkv * rep, dk)).astype(np.float32)
    k = rng.standard_normal((b, tk, nkv, dk)).astype(np.float32)
    v = rng.standard_normal((b, tk, nkv, dv)).astype(np.float32)
    mask = rng.random((b, tk)) > 0.3 if masked else np.ones((b, tk), bool)
    name = "elu_plus_one"
    pq = np_features(q, name, {})
    pk = np.repeat(np_features(k, name, {}) * mask[:, :, None, None], rep, axis=2)
    vv = np.repeat(v.astype(np.float64), rep, axis=2)
    ref = np.einsum("bqnf,bknf,bknv->bqnv", pq, pk, vv)
    if normalizer == "divisive":
        ref = ref / (np.einsum("bqnf,bknf->bqn", pq, pk)[..., None] + 1e-6)
    out = la.global_linear_attention(
        q,
        k,
        v,
        feature_map=la.elu_plus_one if masked else name,  # a callable or a name
        normalizer=normalizer,
        kv_mask=mask if masked else None,
    )
    assert out.shape == (b, tq, nkv * rep, dv)
    assert_close(out, ref, 1e-5)


def test_relu_zero_denominator_gives_zero():
    q = -np.ones((1, 3, 1, 2), np.float32)  # relu features all zero: den = num = 0
    k = np.ones((1, 3, 1, 2), np.float32)
    v = np.ones((1, 3, 1, 2), np.float32)
    for form in la.FORMS:
        out = la.linear_attention(q, k, v, feature_map="relu", normalizer="divisive", form=form)
        np.testing.assert_array_equal(out, 0.0)


def _bad(**over):
    args = dict(
        q=np.zeros((1, 5, 2, 4), np.float32),
        k=np.zeros((1, 5, 1, 4), np.float32),
        v=np.zeros((1, 5, 1, 3), np.float32),
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(q=np.zeros((5, 2, 4))), "q shape"),
        (
            dict(q=np.zeros((1, 5, 3, 4)), k=np.zeros((1, 5, 2, 4)), v=np.zeros((1, 5, 2, 3))),
            "q heads 3",
        ),
        (dict(k=np.zeros((1, 6, 1, 4))), "k shape"),
        (dict(k=np.zeros((1, 5, 1, 3))), "k shape"),
        (dict(v=np.zeros((1, 5, 2, 3))), "v shape"),
        (dict(feature_map="softmax"), "feature_map='softmax'"),
        (dict(feature_map="performer"), "needs \\['projection'\\]"),
        (dict(feature_map="hedgehog", feature_kwargs={"weight": np.zeros((3, 2))}), "weight shape"),
        (dict(form="scan"), "form='scan'"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(chunk_size=2.0), "chunk_size=2.0"),
        (dict(normalizer="l2"), "normalizer='l2'"),
        (dict(eps=-1.0), "eps=-1.0"),
        (dict(log_decay=np.array([0.1, -0.2], np.float32)), "expected finite log-decays <= 0"),
        (dict(log_decay=np.full((1, 5, 1), np.nan, np.float32)), "log-decays"),
        (dict(log_decay=np.zeros(3, np.float32)), "log_decay shape"),
        (dict(log_decay=np.zeros((1, 4, 2), np.float32)), "log_decay shape"),
        (dict(initial_state=la.LinearAttentionState(np.zeros((1, 2, 4, 3)))), "state.kv shape"),
        (
            dict(
                normalizer="divisive", initial_state=la.LinearAttentionState(np.zeros((1, 1, 4, 3)))
            ),
            "state.z",
        ),
    ],
)
def test_errors(over, match):
    args = _bad(**over)
    with pytest.raises(ValueError, match=match):
        la.linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_step_and_global_errors():
    q, k, v = np.zeros((1, 2, 4)), np.zeros((1, 1, 4)), np.zeros((1, 1, 3))
    with pytest.raises(ValueError, match="log_decay shape"):
        la.linear_attention_step(q, k, v, log_decay=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="q shape"):
        la.linear_attention_step(q[None], k, v)
    with pytest.raises(ValueError, match="kv_mask shape"):
        la.global_linear_attention(
            q[:, None], k[:, None], v[:, None], kv_mask=np.ones((1, 2), bool)
        )
