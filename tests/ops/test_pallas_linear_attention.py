"""``linear_attention(impl="interpret")`` (the GPU kernel through the adapter) against the XLA
reference: GQA, the divisive normaliser, decays, states, one-token steps, gradients, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm.ops import linear_attention as la


def _inputs(b, t, nq, nkv, d, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, nq, d)).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, nkv, d)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, nkv, d + 3)).astype(dtype)
    return q, k, v, ks[3]


CASES = [
    # (b, t, nq, nkv, feature_map, normalizer, decay kind, chunk)
    (1, 21, 2, 2, "elu_plus_one", "divisive", None, 16),
    (2, 37, 4, 2, "identity", "none", "const_q", 48),  # chunk 48 is rounded to 64
    (3, 5, 4, 1, "relu", "divisive", "token_kv", 64),
    (2, 19, 2, 2, "taylor2", "divisive", "token_q", 16),
]


def _decay(kind, key, b, t, nq, nkv):
    if kind is None:
        return None
    if kind == "const_q":
        return -jnp.linspace(0.05, 0.5, nq)
    n = nq if kind == "token_q" else nkv
    return -jax.nn.softplus(jax.random.normal(key, (b, t, n)))


@pytest.mark.parametrize("case", CASES)
def test_interpret_matches_xla_with_state(case):
    b, t, nq, nkv, fmap, norm, decay, chunk = case
    q, k, v, key = _inputs(b, t, nq, nkv, 4)
    g = _decay(decay, key, b, t, nq, nkv)
    kw = dict(feature_map=fmap, normalizer=norm, log_decay=g, chunk_size=chunk, return_state=True,
              scale=0.7)
    want, s_want = la.linear_attention(q, k, v, form="parallel", **kw)
    got, s_got = la.linear_attention(q, k, v, impl="interpret", **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s_got.kv, s_want.kv, rtol=1e-4, atol=1e-5)
    if norm == "divisive":
        np.testing.assert_allclose(s_got.z, s_want.z, rtol=1e-4, atol=1e-5)
    # continue from the state, then a one-token step (the decode kernel)
    kw1 = dict(kw, log_decay=None if g is None or g.ndim == 1 else g[:, :3])
    if g is not None and g.ndim == 1:
        kw1["log_decay"] = g
    want2, s2 = la.linear_attention(q[:, :3], k[:, :3], v[:, :3], form="parallel",
                                    initial_state=s_want, **kw1)
    got2, _ = la.linear_attention(q[:, :3], k[:, :3], v[:, :3], impl="interpret",
                                  initial_state=s_got, **kw1)
    np.testing.assert_allclose(got2, want2, rtol=1e-4, atol=1e-5)
    kw1["log_decay"] = None if g is None else (g if g.ndim == 1 else g[:, :1])
    want3, s3 = la.linear_attention(q[:, :1], k[:, :1], v[:, :1], form="parallel",
                                    initial_state=s2, **kw1)
    got3, s3g = la.linear_attention(q[:, :1], k[:, :1], v[:, :1], impl="interpret",
                                    initial_state=s2, **kw1)
    np.testing.assert_allclose(got3, want3, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s3g.kv, s3.kv, rtol=1e-4, atol=1e-5)


def test_interpret_gradients_match_xla():
    q, k, v, key = _inputs(2, 23, 4, 2, 4, seed=3)
    g = -jax.nn.softplus(jax.random.normal(key, (2, 23, 2)))

    def loss(impl, q, k, v, g):
        out = la.linear_attention(q, k, v, feature_map="elu_plus_one", normalizer="divisive",
                                  log_decay=g, chunk_size=16, impl=impl,
                                  **({} if impl != "xla" else {"form": "parallel"}))
        return jnp.sum(jnp.sin(out))

    want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3))(q, k, v, g)
    got = jax.grad(lambda *a: loss("interpret", *a), argnums=(0, 1, 2, 3))(q, k, v, g)
    for name, a, b in zip("qkvg", got, want):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=name)


def test_interpret_bf16_close_to_fp32():
    q, k, v, _ = _inputs(1, 40, 2, 2, 8, seed=5)
    ref = la.linear_attention(q, k, v, feature_map="elu_plus_one", normalizer="divisive",
                              form="parallel")
    got = la.linear_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                              v.astype(jnp.bfloat16), feature_map="elu_plus_one",
                              normalizer="divisive", impl="interpret", chunk_size=16)
    assert got.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)))
    assert err < 0.05 * float(jnp.max(jnp.abs(ref))), err


def test_pallas_impl_on_cpu_raises_clearly():
    q, k, v, _ = _inputs(1, 4, 1, 1, 4)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="impl='interpret' or impl='xla'"):
            la.linear_attention(q, k, v, impl="pallas")
    with pytest.raises(ValueError, match="impl='bogus'"):
        la.linear_attention(q, k, v, impl="bogus")
