"""Attention-probe kernels (GPU-style in interpret mode, TPU in TPU interpret mode) against a
numpy float64 softmax written here and against ``compress.probe.attention_probe`` (XLA), plus
Mosaic GPU / TPU lowering through ``jax.export``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from efficient_mllm.compress.probe import attention_probe as xla_probe
from pallas_kernels.attention_probe import attention_probe, gpu, tpu


def np_probs(
    q, k, q_index, q_valid, kv_valid, *, causal=True, scale=None, softcap=None, allow=None
):
    """float64 softmax rows ``[B, Nq, Q, T]`` (0 where a row sees no key)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, nrows, nq, h = q.shape
    t, nkv = k.shape[1], k.shape[2]
    kr = np.repeat(k, nq // nkv, axis=2)  # head n reads kv head n // G
    s = np.einsum("bqnh,btnh->bnqt", q, kr) * (1 / np.sqrt(h) if scale is None else scale)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    ok = q_valid[:, None, :, None] & kv_valid[:, None, None, :]
    if causal:
        ok = ok & (np.arange(t)[None, None, None, :] <= q_index[:, None, :, None])
    if allow is not None:
        ok = ok & allow[:, None]
    s = np.where(ok, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.where(ok, np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
    den = e.sum(-1, keepdims=True)
    return np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)


def expected(p, per_head):
    """(weights, colsum) of the probabilities ``[B, Nq, Q, T]`` as the kernels return them."""
    if per_head:
        return p, p.sum(2)
    w = p.mean(1)
    return w, w.sum(1)


def make(seed, b, nrows, nq, nkv, h, t, dtype=jnp.float32, pad=False):
    """Random inputs; with ``pad``: right padding, an invalid query row, a row that sees no key
    (its index is before the first valid key) and a batch row without any valid key."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, nrows, nq, h)).astype(np.float32) * 1.5
    k = rng.normal(size=(b, t, nkv, h)).astype(np.float32)
    q_index = rng.integers(0, t, size=(b, nrows)).astype(np.int32)
    q_index[:, -1] = t - 1
    q_valid = np.ones((b, nrows), bool)
    kv_valid = np.ones((b, t), bool)
    if pad:
        kv_valid[0, t - t // 3 :] = False  # right padding
        kv_valid[0, :3] = False  # and a few invalid keys at the start
        q_index[0, 0] = 1  # sees only keys 0, 1: both invalid -> zero row
        q_valid[0, -1] = False
        kv_valid[-1] = False  # no key at all in the last batch row
    qj, kj = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
    # numpy sees the values the kernel sees (rounded to ``dtype``).
    qn, kn = np.asarray(qj.astype(jnp.float32)), np.asarray(kj.astype(jnp.float32))
    return (qj, kj, q_index, q_valid, kv_valid), (qn, kn)


# (b, Q, Nq, Nkv, H, T, per_head, padding, kernel kwargs)
CASES = {
    "b1_q1_gqa1_head": (1, 1, 4, 4, 32, 77, True, False, {}),  # one ragged tile of 128
    "b3_q5_gqa4_mean_pad": (3, 5, 8, 2, 32, 150, False, True, dict(block_k=32, num_splits=2)),
    "b3_q16_mqa_head_softcap": (
        3, 16, 4, 1, 16, 45, True, True,
        dict(block_k=16, causal=False, softcap=2.0, scale=0.4),
    ),
}  # fmt: skip


def _call(fn, inputs, per_head, **kw):
    q, k, qi, qv, kvv = inputs
    return fn(q, k, q_index=qi, q_valid=qv, kv_valid=kvv, per_head=per_head, **kw)


def _check(got, want, atol):
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.dtype == np.float32 and g.shape == w.shape, (g.dtype, g.shape, w.shape)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernel_fp32_matches_numpy_and_reference(name):
    b, nrows, nq, nkv, h, t, per_head, pad, kw = CASES[name]
    inputs, (qn, kn) = make(0, b, nrows, nq, nkv, h, t, pad=pad)
    q, k, qi, qv, kvv = inputs
    ref_kw = {n: kw[n] for n in ("causal", "softcap", "scale") if n in kw}
    p = np_probs(qn, kn, qi, qv, kvv, **ref_kw)
    got = _call(functools.partial(gpu.attention_probe, interpret=True), inputs, per_head, **kw)
    _check(got, expected(p, per_head), atol=2e-6)
    ref = _call(xla_probe, inputs, per_head, **ref_kw)
    _check(got, (np.asarray(ref.weights), np.asarray(ref.colsum)), atol=2e-6)
    if pad:  # zero weights (not NaN) for invalid rows and rows without a visible key
        w = np.asarray(got[0])
        assert not w[0, ..., -1, :].any() if not per_head else not w[0, :, -1].any()
        assert not w[-1].any()
        if kw.get("causal", True):  # query 0 of batch row 0 sees only invalid keys
            assert not (w[0, ..., 0, :].any() if not per_head else w[0, :, 0].any())


def test_gpu_kernel_bf16_error_within_2x_of_bf16_reference():
    """bf16 inputs, fp32 accumulation. Against float64 on the *same* bf16-rounded inputs the
    kernel is tight (atol 1e-5); against float64 on the fp32 inputs its error is at most 2x that
    of the XLA reference fed the same bf16 inputs."""
    b, nrows, nq, nkv, h, t, per_head, pad, kw = CASES["b3_q5_gqa4_mean_pad"]
    inputs, (qn, kn) = make(1, b, nrows, nq, nkv, h, t, jnp.bfloat16, pad=pad)
    exact_inputs, (q32, k32) = make(1, b, nrows, nq, nkv, h, t, jnp.float32, pad=pad)
    _, _, qi, qv, kvv = inputs
    got = _call(functools.partial(gpu.attention_probe, interpret=True), inputs, per_head, **kw)
    _check(got, expected(np_probs(qn, kn, qi, qv, kvv), per_head), atol=1e-5)
    truth = expected(np_probs(q32, k32, qi, qv, kvv), per_head)
    ref = _call(xla_probe, inputs, per_head)
    for g, r, w in zip(got, (ref.weights, ref.colsum), truth):
        err_kernel = np.abs(np.asarray(g) - w).max()
        err_ref = np.abs(np.asarray(r) - w).max()
        assert err_kernel <= 2 * err_ref + 1e-6, (err_kernel, err_ref)


def segment_or_global(rows, cols):
    """Extra mask: same segment (feature 0), or a global key (column feature 1 == 1)."""
    return (rows[0] == cols[0]) | (cols[1] == 1)


def _mask_inputs(seed, b, nrows, t):
    rng = np.random.default_rng(seed)
    row_seg = rng.integers(0, 2, size=(1, 1, nrows)).astype(np.int32)  # batch 1: broadcast
    col = np.stack([rng.integers(0, 2, size=(b, t)), rng.random((b, t)) < 0.1], 1).astype(np.int32)
    allow = (row_seg[:, 0, :, None] == col[:, None, 0, :]) | (col[:, None, 1, :] == 1)  # [B, Q, T]
    return row_seg, col, allow


@pytest.mark.parametrize("per_head", [False, True])
def test_gpu_kernel_mask_fn_features(per_head):
    b, nrows, nq, nkv, h, t = 2, 3, 4, 2, 16, 70
    inputs, (qn, kn) = make(2, b, nrows, nq, nkv, h, t, pad=True)
    _, _, qi, qv, kvv = inputs
    row_seg, col, allow = _mask_inputs(3, b, nrows, t)
    got = _call(
        functools.partial(gpu.attention_probe, interpret=True), inputs, per_head,
        mask_fn=segment_or_global, row_features=row_seg, col_features=col, block_k=32,
    )  # fmt: skip
    _check(got, expected(np_probs(qn, kn, qi, qv, kvv, allow=allow), per_head), atol=2e-6)


@pytest.mark.parametrize("per_head", [False, True])
def test_tpu_kernel_interpret_matches_numpy(per_head):
    """Mean: GQA 4, padding, mask_fn features, bf16 (atol 1e-5 on the rounded inputs).
    Per head: batch 1, Q = 1, GQA 1, fp32, non-causal softcap."""
    interp = functools.partial(tpu.attention_probe, interpret=pltpu.InterpretParams())
    if per_head:
        inputs, (qn, kn) = make(4, 1, 1, 2, 2, 32, 300)
        _, _, qi, qv, kvv = inputs
        got = _call(interp, inputs, True, causal=False, softcap=3.0, block_k=128)
        want = np_probs(qn, kn, qi, qv, kvv, causal=False, softcap=3.0)
        _check(got, expected(want, True), atol=2e-6)
    else:
        inputs, (qn, kn) = make(5, 3, 5, 8, 2, 32, 300, jnp.bfloat16, pad=True)
        _, _, qi, qv, kvv = inputs
        row_seg, col, allow = _mask_inputs(6, 3, 5, 300)
        got = _call(
            interp, inputs, False, mask_fn=segment_or_global, row_features=row_seg,
            col_features=col, block_k=128,
        )  # fmt: skip
        _check(got, expected(np_probs(qn, kn, qi, qv, kvv, allow=allow), False), atol=1e-5)


def test_impl_interpret_in_compress_probe_with_key_index():
    """``compress.probe.attention_probe(impl="interpret")`` = ``impl="xla"``, key columns
    gathered after the kernel (same shapes as a case above: the kernel is not recompiled)."""
    b, nrows, nq, nkv, h, t, per_head, pad, kw = CASES["b1_q1_gqa1_head"]
    (q, k, qi, qv, kvv), _ = make(7, b, nrows, nq, nkv, h, t)
    keys = np.random.default_rng(8).integers(0, t, size=(b, 9)).astype(np.int32)
    args = dict(q_index=qi, q_valid=qv, kv_valid=kvv, key_index=keys, per_head=per_head)
    a = xla_probe(q, k, **args)
    c = xla_probe(q, k, impl="interpret", **args)
    for x, y in zip((a.weights, a.colsum, a.num_queries), (c.weights, c.colsum, c.num_queries)):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-6)
    with pytest.raises(ValueError, match="mask"):
        xla_probe(q, k, q_index=qi, mask=np.ones((b, 1, nrows, t), bool), impl="interpret")
    with pytest.raises(ValueError, match="impl"):
        xla_probe(q, k, q_index=qi, impl="cuda")


def test_bad_arguments_raise():
    q = jnp.zeros((2, 3, 4, 16))
    k = jnp.zeros((2, 20, 2, 16))
    qi = jnp.zeros((2, 3), jnp.int32)
    f = functools.partial(gpu.attention_probe, interpret=True)
    with pytest.raises(ValueError, match="multiple"):
        f(q, jnp.zeros((2, 20, 3, 16)), q_index=qi)
    with pytest.raises(ValueError, match="q_index"):
        f(q, k, q_index=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="kv_valid"):
        f(q, k, q_index=qi, kv_valid=jnp.ones((2, 19), bool))
    with pytest.raises(ValueError, match="dtype"):
        f(q, k.astype(jnp.bfloat16), q_index=qi)
    with pytest.raises(ValueError, match="block_k"):
        f(q, k, q_index=qi, block_k=48)
    with pytest.raises(ValueError, match="block_k"):
        tpu.attention_probe(q, k, q_index=qi, block_k=64, interpret=True)
    with pytest.raises(ValueError, match="mask_fn"):
        f(q, k, q_index=qi, col_features=jnp.zeros((1, 1, 20), jnp.int32))
    with pytest.raises(ValueError, match="row_features"):
        f(q, k, q_index=qi, mask_fn=segment_or_global, row_features=jnp.zeros((2, 1, 4), jnp.int32))
    with pytest.raises(ValueError, match="interpret=True"):
        attention_probe(q, k, q_index=qi)  # cpu backend without interpret


def _lower(fn, platform, per_head, dtype, h, **kw):
    b, nrows, nq, nkv, t = 2, 5, 12, 4, 1000  # G = 3 (not a power of two), Q = 5, ragged T

    def f(q, k, qi, qv, kvv, rf, cf):
        return fn(
            q, k, q_index=qi, q_valid=qv, kv_valid=kvv, mask_fn=segment_or_global,
            row_features=rf, col_features=cf, per_head=per_head, softcap=30.0, **kw,
        )  # fmt: skip

    args = [
        jax.ShapeDtypeStruct((b, nrows, nq, h), dtype),
        jax.ShapeDtypeStruct((b, t, nkv, h), dtype),
        jax.ShapeDtypeStruct((b, nrows), jnp.int32),
        jax.ShapeDtypeStruct((b, nrows), bool),
        jax.ShapeDtypeStruct((b, t), bool),
        jax.ShapeDtypeStruct((1, 1, nrows), jnp.int32),
        jax.ShapeDtypeStruct((b, 2, t), jnp.int32),
    ]
    checks = []
    if platform == "cuda":
        checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*args)
    text = exp.mlir_module()
    assert text.count("attention_probe_lse") >= 1 and text.count("attention_probe_probs") >= 1


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowering_cuda_and_tpu(per_head, dtype):
    _lower(gpu.attention_probe, "cuda", per_head, dtype, 64)
    _lower(gpu.attention_probe, "cuda", per_head, dtype, 128, block_k=64, num_splits=3)
    _lower(tpu.attention_probe, "tpu", per_head, dtype, 128)
