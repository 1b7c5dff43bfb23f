"""The GPU flash-attention kernel (Pallas, Triton lowering) in interpret mode vs the XLA reference.

Every mask type goes through ``dot_product_attention(impl="interpret")`` (spec -> block map +
in-tile predicate -> kernel) and is compared with ``impl="xla"``: output, lse and the gradients
of a loss that uses both. Plus the kernel API directly (random block-sparse layouts), bf16 error
bounds, fully masked rows, errors, and lowering for CUDA.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm.ops import attention as A
from efficient_mllm.ops import masks as M
from pallas_kernels import common
from pallas_kernels.flash_attention import gpu


def _rand(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def _loss(impl, mask, q_offset=None, softcap=None, w=None, u=None):
    def f(q, k, v):
        o, lse = A.dot_product_attention(
            q, k, v, mask=mask, q_offset=q_offset, softcap=softcap, impl=impl, return_lse=True
        )
        o = o.astype(jnp.float32)
        fin = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(o * w) + jnp.sum(fin * u), (o, lse)

    return f


def _check(q, k, v, mask, q_offset=None, softcap=None, tol=2e-5, seed=0):
    rng = np.random.default_rng(seed)
    b, tq, nq, _ = q.shape
    w = _rand(rng, (b, tq, nq, v.shape[3]))
    u = _rand(rng, (b, nq, tq))
    outs = {}
    for impl in ("interpret", "xla"):
        f = _loss(impl, mask, q_offset, softcap, w, u)
        (_, (o, lse)), g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        outs[impl] = (o, lse, g)
    o1, l1, g1 = outs["interpret"]
    o2, l2, g2 = outs["xla"]
    np.testing.assert_allclose(o1, o2, atol=tol, rtol=tol)
    assert np.array_equal(np.isneginf(l1), np.isneginf(l2))
    fin = np.isfinite(np.asarray(l2))
    np.testing.assert_allclose(np.asarray(l1)[fin], np.asarray(l2)[fin], atol=tol, rtol=tol)
    for a, bb, name in zip(g1, g2, "qkv"):
        assert np.all(np.isfinite(a)), name
        scale = float(jnp.max(jnp.abs(bb))) + 1e-6
        np.testing.assert_allclose(a, bb, atol=tol * 10 * scale, rtol=0, err_msg=f"d{name}")
    return o1, l1


def _qkv(seed, b, tq, tk, nq, nkv, d, dtype=jnp.float32, dv=None):
    rng = np.random.default_rng(seed)
    return (
        _rand(rng, (b, tq, nq, d), dtype),
        _rand(rng, (b, tk, nkv, d), dtype),
        _rand(rng, (b, tk, nkv, dv or d), dtype),
    )


def _types(rng, b, t):
    """token types: text, an image run, text, answer, text."""
    out = np.zeros((b, t), np.int32)
    for i in range(b):
        s = rng.integers(3, t // 3)
        out[i, s : s + t // 3] = M.IMAGE
        out[i, s + t // 3 + 5 : s + t // 3 + 12] = M.ANSWER
    return jnp.asarray(out)


MASKS = {
    "none": lambda b, t, rng: None,
    "causal": lambda b, t, rng: M.causal(),
    "window": lambda b, t, rng: M.sliding_window(37),
    "window_bidir": lambda b, t, rng: M.sliding_window(20, 9),
    "segments": lambda b, t, rng: M.segment_ids(
        jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1))
    )
    & M.causal(),
    "padding": lambda b, t, rng: M.causal()
    & M.padding(jnp.asarray(rng.integers(t // 2, t + 1, b)), jnp.asarray(rng.integers(1, t, b))),
    "prefix_lm": lambda b, t, rng: M.prefix_lm(jnp.asarray(rng.integers(0, t, b))),
    "modality": lambda b, t, rng: M.modality_mutual(_types(rng, b, t)),
    "frames": lambda b, t, rng: M.frame_block_causal(
        jnp.asarray(np.where(np.arange(t) < 10, -1, (np.arange(t) - 10) // 23)[None].repeat(b, 0))
    ),
    "or_not": lambda b, t, rng: (M.sliding_window(9) | ~M.causal()) & M.padding(t - 3),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_match_reference(name):
    rng = np.random.default_rng(1)
    b, t = (2, 150) if name in ("causal", "segments", "modality") else (1, 97)
    nq, nkv, d = (4, 1, 32) if b == 1 else (4, 2, 64)
    q, k, v = _qkv(hash(name) % 1000, b, t, t, nq, nkv, d)
    _check(q, k, v, MASKS[name](b, t, rng))


def test_cross_attention_offsets_gqa8_and_softcap():
    # Tq != Tk, per-row q offsets (chunked prefill), GQA 8, value dim != key dim, softcap.
    q, k, v = _qkv(3, 2, 40, 130, 8, 1, 32, dv=16)
    off = jnp.asarray([90, 50], jnp.int32)
    mask = M.causal() & M.padding(jnp.asarray([130, 90]))
    _check(q, k, v, mask, q_offset=off, softcap=7.0)


def test_block_sparse_per_head_and_shared():
    rng = np.random.default_rng(4)
    b, t, nq, nkv, d = 2, 256, 4, 2, 32
    q, k, v = _qkv(4, b, t, t, nq, nkv, d)
    nb = t // 64
    idx = jnp.asarray(rng.integers(0, nb, (b, nq, nb, 3)), jnp.int32)
    num = jnp.asarray(rng.integers(0, 4, (b, nq, nb)), jnp.int32)
    _check(q, k, v, M.block_sparse(64, 64, idx, num) & M.causal())
    shared = jnp.asarray(rng.integers(0, nb, (1, nb, 2)), jnp.int32)
    _check(q, k, v, M.block_sparse(128, 64, shared))


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = _qkv(5, 2, 70, 70, 2, 2, 16)
    mask = M.padding(jnp.asarray([70, 0]), jnp.asarray([30, 70]))  # rows >= 30 / all of b=1 masked
    o, lse = _check(q, k, v, mask)
    assert np.all(np.asarray(o)[0, 30:] == 0) and np.all(np.asarray(o)[1] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, :, 30:]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_error_within_twice_reference(dtype):
    q, k, v = _qkv(6, 2, 128, 128, 4, 2, 64)
    mask = M.causal()
    ref = A.dot_product_attention(q, k, v, mask=mask, impl="xla")
    lo = [x.astype(dtype) for x in (q, k, v)]
    out_k = A.dot_product_attention(*lo, mask=mask, impl="interpret").astype(jnp.float32)
    out_x = A.dot_product_attention(*lo, mask=mask, impl="xla").astype(jnp.float32)
    err_k = float(jnp.max(jnp.abs(out_k - ref)))
    err_x = float(jnp.max(jnp.abs(out_x - ref)))
    assert err_k <= 2 * err_x + 1e-3, (err_k, err_x)
    gk = jax.grad(lambda q: A.dot_product_attention(q, *lo[1:], mask=mask, impl="interpret").astype(jnp.float32).sum())(lo[0])
    gr = jax.grad(lambda q: A.dot_product_attention(q, k, v, mask=mask, impl="xla").sum())(q)
    gx = jax.grad(lambda q: A.dot_product_attention(q, *lo[1:], mask=mask, impl="xla").astype(jnp.float32).sum())(lo[0])
    ek = float(jnp.max(jnp.abs(gk.astype(jnp.float32) - gr)))
    ex = float(jnp.max(jnp.abs(gx.astype(jnp.float32) - gr)))
    assert ek <= 2 * ex + 1e-2, (ek, ex)


def _dense_from_block_map(bm, tq, tk, bq, bk):
    m = np.repeat(np.repeat(np.asarray(bm) != common.EMPTY, bq, axis=2), bk, axis=3)
    return jnp.asarray(m[:, :, :tq, :tk])


def test_kernel_api_random_block_map_jit():
    # An arbitrary block-sparse layout handed straight to the kernel, jitted, batch-varying.
    rng = np.random.default_rng(7)
    b, t, nq, nkv, d, blk = 2, 200, 4, 4, 32, 32
    q, k, v = _qkv(7, b, t, t, nq, nkv, d)
    nb = common.cdiv(t, blk)
    bm = jnp.asarray(rng.choice([0, 2], size=(b, nq, nb, nb), p=[0.7, 0.3]), jnp.int8)
    f = jax.jit(
        functools.partial(gpu.flash_attention, block_q=blk, block_k=blk, interpret=True)
    )
    out, lse = f(q, k, v, block_map=bm)
    ref, rlse = A.dot_product_attention(
        q, k, v, mask=_dense_from_block_map(bm, t, t, blk, blk), impl="xla", return_lse=True
    )
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    assert np.array_equal(np.isneginf(lse), np.isneginf(rlse))


def test_block_plan_lists():
    bm = jnp.asarray([[[[0, 2, 1, 2], [0, 0, 0, 0]]]], jnp.int8)  # [1,1,2,4]
    plan = common.make_block_plan(bm)
    assert plan.kv_index[0, 0, 0].tolist() == [2, 1, 3, 3]  # partial first, then full
    assert plan.kv_count[0, 0].tolist() == [3, 0] and plan.kv_partial[0, 0].tolist() == [1, 0]
    assert plan.kv_full[0, 0, 0].tolist()[:3] == [0, 1, 1]
    assert plan.q_count[0, 0].tolist() == [0, 1, 1, 1]


def test_errors():
    q, k, v = _qkv(8, 1, 64, 64, 2, 2, 16)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        gpu.flash_attention(q, k, v, block_q=48, interpret=True)
    with pytest.raises(ValueError, match="block_map shape"):
        gpu.flash_attention(q, k, v, block_map=jnp.ones((1, 1, 3, 3), jnp.int8), interpret=True)
    with pytest.raises(ValueError, match="without a mask_fn"):
        gpu.flash_attention(q, k, v, row_features=jnp.zeros((1, 1, 64), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="dense boolean mask array"):
        A.dot_product_attention(q, k, v, mask=jnp.ones((64, 64), bool), impl="interpret")
    with pytest.raises(ValueError, match="under '\\|'"):
        idx = jnp.zeros((1, 1, 1), jnp.int32)
        A.dot_product_attention(q, k, v, mask=M.block_sparse(64, 64, idx) | M.causal(), impl="interpret")


def test_lowers_for_cuda_fwd_and_bwd():
    from jax import export

    b, t, nq, nkv, d = 1, 512, 4, 2, 128
    sd = jax.ShapeDtypeStruct

    def fwd(q, k, v):
        return A.dot_product_attention(q, k, v, mask=M.causal() & M.sliding_window(200), impl="interpret")

    def fwd_bwd(q, k, v):
        f = lambda q, k, v: gpu.flash_attention(q, k, v, block_map=None)[0].astype(jnp.float32).sum()
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    avals = [sd((b, t, nq, d), jnp.bfloat16), sd((b, t, nkv, d), jnp.bfloat16), sd((b, t, nkv, d), jnp.bfloat16)]
    chk = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    kmask = lambda q, k, v: gpu.flash_attention(
        q, k, v, **_causal_kernel_kwargs(t, 64, 64)
    )
    for fn in (kmask, fwd_bwd):
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=chk)(*avals)
        assert "__gpu$xla.gpu.triton" in exp.mlir_module()
    del fwd


def _causal_kernel_kwargs(t, bq, bk):
    from efficient_mllm.ops import kernel_masks

    km = kernel_masks.kernel_mask(M.causal(), 1, t, t, bq, bk)
    return dict(
        block_map=km.block_map,
        mask_fn=km.mask_fn,
        row_features=km.row_features,
        col_features=km.col_features,
        block_q=bq,
        block_k=bk,
    )


def test_decode_step_routes_to_decode_kernel_and_matches():
    # One decode step against a cache: impl="interpret" takes the flash-decoding kernel.
    q, k, v = _qkv(9, 3, 1, 150, 8, 2, 32)
    lengths = jnp.asarray([150, 77, 1])
    off = lengths - 1
    mask = M.causal() & M.padding(lengths)
    from efficient_mllm.ops import pallas_attention as P

    r = A._validate(q, k, v, mask, None, None, None, off, "interpret", True)
    assert P._decode_lengths(r).tolist() == [150, 77, 1]
    o1, l1 = A.dot_product_attention(q, k, v, mask=mask, q_offset=off, impl="interpret", return_lse=True)
    o2, l2 = A.dot_product_attention(q, k, v, mask=mask, q_offset=off, impl="xla", return_lse=True)
    np.testing.assert_allclose(o1, o2, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(l1, l2, atol=2e-5, rtol=2e-5)
