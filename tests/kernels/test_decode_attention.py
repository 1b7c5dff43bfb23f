"""Decode attention (flash-decoding): the GPU kernel in interpret mode, the TPU kernel in TPU
interpret mode and the XLA reference, each against a numpy float64 reference written here (loops
over sequences and heads, explicit sets of visible keys). Plus bf16 error bounds, split-count
invariance, empty rows (lengths 0, lengths < Tq, empty block lists), errors, and lowering for
CUDA and TPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from efficient_mllm.ops.decode_attention import decode_attention
from pallas_kernels.decode_attention import gpu, tpu


def _np_ref(q, k, v, lengths, idx=None, cnt=None, block_k=None, scale=None, softcap=None):
    """float64: row t of sequence b sits at slot lengths[b] - Tq + t; sees listed keys <= slot."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, nq, h = q.shape
    s, nkv = k.shape[1:3]
    g = nq // nkv
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    out = np.zeros((b, tq, nq, v.shape[3]))
    lse = np.full((b, nq, tq), -np.inf)
    for bi in range(b):
        for kv in range(nkv):
            listed = np.ones(s, bool)
            if idx is not None:
                listed[:] = False
                hh = min(kv, idx.shape[1] - 1)
                for e in range(cnt[bi, min(kv, cnt.shape[1] - 1)]):
                    listed[idx[bi, hh, e] * block_k : (idx[bi, hh, e] + 1) * block_k] = True
            for t in range(tq):
                keys = np.flatnonzero(listed & (np.arange(s) <= lengths[bi] - tq + t))
                if keys.size == 0:
                    continue
                for n in range(kv * g, (kv + 1) * g):
                    logit = k[bi, keys, kv] @ q[bi, t, n] * scale
                    if softcap is not None:
                        logit = softcap * np.tanh(logit / softcap)
                    w = np.exp(logit - logit.max())
                    out[bi, t, n] = w @ v[bi, keys, kv] / w.sum()
                    lse[bi, n, t] = logit.max() + np.log(w.sum())
    return out, lse


def _inputs(seed, b, tq, nq, nkv, h, s, hv=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    mk = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return mk(b, tq, nq, h), mk(b, s, nkv, h), mk(b, s, nkv, hv or h), rng


def _lists(rng, b, heads, s, block_k, m):
    nblk = -(-s // block_k)
    m = min(m, nblk)
    idx = np.stack([[rng.permutation(nblk)[:m] for _ in range(heads)] for _ in range(b)])
    cnt = rng.integers(1, m + 1, size=(b, heads))
    cnt[0, 0] = m
    if b > 1:
        cnt[-1, -1] = 0  # an empty list: those rows see nothing
    return idx.astype(np.int32), cnt.astype(np.int32)


# (B, Tq, Nq, Nkv, H, Hv, S, block_k, lengths, list heads (None = dense), softcap)
CASES = [
    (1, 1, 4, 4, 64, 64, 100, 32, [100], None, None),  # MHA, ragged last block
    (3, 4, 8, 2, 128, 128, 150, 32, [150, 37, 2], None, None),  # GQA 4, a length < Tq
    (3, 1, 16, 2, 64, 64, 77, 16, [77, 0, 50], 2, None),  # GQA 8, per-head lists, length 0
    (1, 4, 8, 1, 128, 64, 200, 64, [130], 1, 20.0),  # MQA, shared list, Hv != H, softcap
    (2, 4, 8, 2, 128, 128, 128, 64, [128, 61], 1, None),  # S = 2 blocks; GPU: 2 tiles per block
]


def _run_case(case, impl, dtype=jnp.float32, num_splits=None, seed=0):
    b, tq, nq, nkv, h, hv, s, bk, lengths, heads, cap = case
    q, k, v, rng = _inputs(seed, b, tq, nq, nkv, h, s, hv, dtype)
    lengths = np.asarray(lengths, np.int32)
    idx = cnt = None
    if heads is not None:
        idx, cnt = _lists(rng, b, heads, s, bk, m=3)
    kw = dict(block_k=bk, softcap=cap)
    if idx is not None:
        kw.update(kv_block_indices=jnp.asarray(idx), kv_block_counts=jnp.asarray(cnt))
    if impl == "xla":
        o, l = decode_attention(q, k, v, jnp.asarray(lengths), impl="xla", **kw)
    elif impl == "gpu":
        o, l = gpu.decode_attention(
            q, k, v, jnp.asarray(lengths), interpret=True, num_splits=num_splits, **kw
        )
    else:
        o, l = tpu.decode_attention(
            q,
            k,
            v,
            jnp.asarray(lengths),
            interpret=pltpu.InterpretParams(),
            num_splits=num_splits,
            **kw,
        )
    ro, rl = _np_ref(q, k, v, lengths, idx, cnt, bk, softcap=cap)
    return np.asarray(o, np.float64), np.asarray(l), ro, rl


def _assert_close(o, l, ro, rl, tol):
    assert o.shape == ro.shape and l.shape == rl.shape and l.dtype == np.float32
    assert not np.isnan(o).any() and not np.isnan(l).any()
    np.testing.assert_array_equal(np.isneginf(l), np.isneginf(rl))
    np.testing.assert_allclose(o, ro, atol=tol, rtol=tol)
    fin = np.isfinite(rl)
    np.testing.assert_allclose(l[fin], rl[fin], atol=tol, rtol=tol)
    empty = np.isneginf(rl)  # [B, Nq, Tq]: those rows must be exactly 0
    assert np.all(o.transpose(0, 2, 1, 3)[empty] == 0)


@pytest.mark.parametrize("impl", ["gpu", "xla"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_fp32_matches_float64(case, impl):
    _assert_close(*_run_case(case, impl, num_splits=3 if impl == "gpu" else None), tol=2e-5)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["dense_h128_gqa4", "lists_h64_gqa8"])
def test_tpu_kernel_interpret(case):
    _assert_close(*_run_case(case, "tpu", num_splits=2), tol=2e-5)


def test_split_count_does_not_change_result():
    outs = [_run_case(CASES[2], "gpu", num_splits=p)[:2] for p in (1, 2, 7)]
    for o, l in outs[1:]:
        np.testing.assert_allclose(o, outs[0][0], atol=1e-6)
        np.testing.assert_allclose(l, outs[0][1], atol=1e-6)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["dense", "lists"])
def test_bf16_error_within_twice_xla_bf16(case):
    """bf16 kernel error vs float64 <= 2x the bf16 XLA reference's error (lse: + 1e-5)."""
    o, l, ro, rl = _run_case(case, "gpu", dtype=jnp.bfloat16)
    ox, lx, _, _ = _run_case(case, "xla", dtype=jnp.bfloat16)
    fin = np.isfinite(rl)
    err_k, err_x = np.abs(o - ro).max(), np.abs(ox - ro).max()
    print(f"bf16 max error: kernel {err_k:.2e}, xla {err_x:.2e}")
    assert err_k <= 2 * err_x, (err_k, err_x)
    lerr_k, lerr_x = np.abs(l[fin] - rl[fin]).max(), np.abs(lx[fin] - rl[fin]).max()
    assert lerr_k <= 2 * lerr_x + 1e-5, (lerr_k, lerr_x)
    np.testing.assert_array_equal(np.isneginf(l), np.isneginf(rl))


def test_traced_lengths_and_lists_under_jit():
    b, tq, nq, nkv, h, s, bk = 2, 2, 4, 2, 64, 70, 16
    q, k, v, rng = _inputs(3, b, tq, nq, nkv, h, s)
    idx, cnt = _lists(rng, b, nkv, s, bk, m=4)
    lengths = np.asarray([70, 33], np.int32)
    f = jax.jit(
        lambda *a: decode_attention(
            *a[:4], kv_block_indices=a[4], kv_block_counts=a[5], block_k=bk, impl="interpret"
        )
    )
    o, l = f(q, k, v, jnp.asarray(lengths), jnp.asarray(idx), jnp.asarray(cnt))
    _assert_close(
        np.asarray(o, np.float64), np.asarray(l), *_np_ref(q, k, v, lengths, idx, cnt, bk), tol=2e-5
    )


def test_public_op_dispatch():
    q, k, v, _ = _inputs(4, 1, 1, 4, 2, 64, 40)
    lengths = jnp.asarray([25], jnp.int32)
    ref = decode_attention(q, k, v, lengths, impl="xla")
    for impl in ("auto", "interpret", "interpret_tpu"):
        o, l = decode_attention(q, k, v, lengths, impl=impl, block_k=16)
        np.testing.assert_allclose(o, ref[0], atol=2e-5)
        np.testing.assert_allclose(l, ref[1], atol=2e-5)
    with pytest.raises(ValueError, match="impl='pallas' needs a GPU or TPU"):
        decode_attention(q, k, v, lengths, impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        decode_attention(q, k, v, lengths, impl="cudnn")


def test_errors_name_the_argument():
    q, k, v, _ = _inputs(5, 2, 1, 4, 2, 64, 40)
    ln = jnp.asarray([40, 3], jnp.int32)
    idx = jnp.zeros((2, 1, 2), jnp.int32)

    def call(fn=gpu.decode_attention, **kw):
        a = dict(q=q, k_cache=k, v_cache=v, lengths=ln)
        a.update({n: kw.pop(n) for n in list(kw) if n in a})
        return fn(a["q"], a["k_cache"], a["v_cache"], a["lengths"], interpret=True, **kw)

    bad = [
        (dict(q=q[0]), "q must be an array of rank 4"),
        (dict(k_cache=k.astype(jnp.int32)), "k_cache must have a floating dtype"),
        (dict(q=jnp.zeros((2, 17, 4, 64))), "1..16 new tokens"),
        (dict(q=jnp.zeros((2, 1, 3, 64))), "multiple of k_cache heads"),
        (dict(v_cache=v[:, :30]), "v_cache"),
        (dict(lengths=jnp.asarray([41, 3], jnp.int32)), r"lengths must lie in \[0, S=40\]"),
        (dict(lengths=jnp.asarray([4.0, 3.0])), "lengths must have an integer dtype"),
        (dict(lengths=jnp.asarray([4], jnp.int32)), r"lengths must be int32 \[batch=2\]"),
        (dict(kv_block_indices=idx), "block_k must be given with kv_block_indices"),
        (
            dict(kv_block_indices=idx, block_k=16, kv_block_counts=jnp.asarray([[3], [0]])),
            r"kv_block_counts must lie in \[0, M=2\]",
        ),
        (dict(kv_block_indices=idx + 3, block_k=16), r"kv_block_indices must lie in \[0, "),
        (dict(kv_block_indices=idx, block_k=16), "must not repeat a block"),
        (
            dict(kv_block_indices=jnp.zeros((2, 3, 2), jnp.int32), block_k=16),
            "kv_block_indices must be int32",
        ),
        (dict(kv_block_counts=jnp.zeros((2, 1), jnp.int32)), "without kv_block_indices"),
        (dict(block_k=48), "power of two"),
        (dict(softcap=-1.0), "softcap must be None or a positive"),
        (dict(num_splits=0), "num_splits must be a positive int"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            call(**kw)
    with pytest.raises(ValueError, match="multiple of 8"):
        call(tpu.decode_attention, block_k=12)


def _export_args(b, tq, nq, nkv, h, s, m, dtype):
    sds = jax.ShapeDtypeStruct
    return (
        sds((b, tq, nq, h), dtype),
        sds((b, s, nkv, h), dtype),
        sds((b, s, nkv, h), dtype),
        sds((b,), jnp.int32),
        sds((b, nkv, m), jnp.int32),
        sds((b, nkv), jnp.int32),
    )


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", [(2, 1, 32, 8, 128, 1000, 256), (3, 4, 8, 2, 64, 300, 32)])
def test_lowering(platform, shape):
    kern = gpu if platform == "cuda" else tpu
    disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    *dims, bk = shape
    args = _export_args(*dims, m=5, dtype=jnp.bfloat16)

    def dense(q, k, v, ln, idx, cnt):
        return kern.decode_attention(q, k, v, ln, block_k=bk)

    def lists(q, k, v, ln, idx, cnt):
        return kern.decode_attention(
            q, k, v, ln, kv_block_indices=idx, kv_block_counts=cnt, block_k=bk, softcap=30.0
        )

    for fn in (dense, lists):
        exp = jax.export.export(
            jax.jit(fn),
            platforms=[platform],
            disabled_checks=disabled if platform == "cuda" else (),
        )(*args)
        text = exp.mlir_module()
        assert ("triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)
