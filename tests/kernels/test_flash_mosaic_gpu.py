"""Mosaic GPU flash-attention forward (pallas_kernels/flash_attention/mosaic_gpu.py).

CPU-only checks: (1) the kernel lowers to a ``mosaic_gpu_v2`` custom call for CUDA through
``jax.export`` for many configurations (head dims, masks with features, block-sparse maps, GQA,
ragged lengths, tiles, softcap, forward+backward); (2) the same kernel -- barriers, TMA ring,
plan walk, masks, online softmax -- runs in the Mosaic GPU CPU interpreter and matches an XLA
fp32 reference, with gradients through the custom_vjp (Triton backward, interpreted). In the
interpreter the two matmuls are plain dots (it has no transposed / register wgmma operands);
the GPU numerics are checked by experiments/check_flash_mosaic.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from efficient_mllm.ops import attention as A
from efficient_mllm.ops import kernel_masks
from efficient_mllm.ops import masks as M
from pallas_kernels import common
from pallas_kernels.flash_attention import mosaic_gpu as mg

SD = jax.ShapeDtypeStruct
TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _mask_kwargs(mask, b, t, bq, bk, nq):
    if mask is None:
        return {}
    if mask == "sparse":  # random per-head EMPTY / PARTIAL / FULL tiles, no predicate
        nb = (common.cdiv(t, bq), common.cdiv(t, bk))
        bm = np.random.default_rng(1).integers(0, 3, (b, nq) + nb)
        return dict(block_map=jnp.asarray(bm, jnp.int8))
    km = kernel_masks.kernel_mask(mask, b, t, t, bq, bk)
    return dict(
        block_map=km.block_map,
        mask_fn=km.mask_fn,
        row_features=km.row_features,
        col_features=km.col_features,
    )


LOWER = [  # name, b, t, nq, nkv, d, mask, block_q, block_k, stages, softcap, dtype
    ("dense_d64", 2, 256, 4, 4, 64, None, 128, 128, 2, None, jnp.bfloat16),
    ("causal_d128_gqa4_ragged", 1, 300, 8, 2, 128, M.causal(), 128, 128, 2, None, jnp.bfloat16),
    ("window_d64_ragged", 1, 333, 2, 2, 64, M.sliding_window(100), 128, 64, 3, None, jnp.bfloat16),
    ("sparse_d128_gqa2", 1, 256, 2, 1, 128, "sparse", 128, 64, 2, None, jnp.bfloat16),
    ("segments_b2", 2, 256, 2, 2, 64, "segments", 128, 128, 2, None, jnp.float16),
    ("bq256_softcap", 1, 512, 2, 2, 64, M.causal(), 256, 128, 2, 30.0, jnp.bfloat16),
    ("dense_d64_bk256", 1, 512, 2, 1, 64, None, 128, 256, 2, None, jnp.bfloat16),
]


@pytest.mark.parametrize("case", LOWER, ids=[c[0] for c in LOWER])
def test_lowers_to_mosaic_gpu(case):
    name, b, t, nq, nkv, d, mask, bq, bk, st, softcap, dtype = case
    if mask == "segments":
        mask = M.segment_ids(jnp.repeat(jnp.arange(4), t // 4)[None].repeat(b, 0)) & M.causal()

    def fwd(q, k, v):
        kw = _mask_kwargs(mask, b, t, bq, bk, nq)
        return mg.flash_attention_forward(
            q, k, v, block_q=bq, block_k=bk, num_stages=st, softcap=softcap, **kw
        )

    avals = [SD((b, t, nq, d), dtype), SD((b, t, nkv, d), dtype), SD((b, t, nkv, d), dtype)]
    text = export.export(jax.jit(fwd), platforms=["cuda"])(*avals).mlir_module()
    assert text.count("mosaic_gpu_v2") >= 1
    assert "triton" not in text


def test_lowers_forward_and_triton_backward():
    b, t, nq, nkv, d = 1, 256, 4, 2, 64

    def loss(q, k, v):
        kw = _mask_kwargs(M.causal(), b, t, 128, 128, nq)
        o, lse = mg.flash_attention_forward(q, k, v, **kw)
        return o.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum()

    avals = [SD((b, t, nq, d), jnp.bfloat16)] + [SD((b, t, nkv, d), jnp.bfloat16)] * 2
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = export.export(fn, platforms=["cuda"], disabled_checks=[TRITON])(*avals).mlir_module()
    assert "mosaic_gpu_v2" in text and "__gpu$xla.gpu.triton" in text


def test_shared_memory_overflow_is_reported_at_lowering():
    avals = [SD((1, 512, 2, 128), jnp.bfloat16)] * 3
    fn = lambda q, k, v: mg.flash_attention_forward(q, k, v, block_q=256, block_k=256, num_stages=4)
    with pytest.raises(Exception, match="shared memory"):
        export.export(jax.jit(fn), platforms=["cuda"])(*avals)


def _rand(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape), dtype)


@pytest.mark.parametrize(
    "name,b,t,nq,nkv,d,bk",
    [("causal_gqa2_ragged_grad", 1, 150, 4, 2, 64, 64), ("padding_d128_b2", 2, 130, 2, 1, 128, 128)],
)
def test_interpreter_matches_reference(name, b, t, nq, nkv, d, bk):
    """Forward out / lse (incl. fully masked rows) and, for the first case, gradients."""
    rng = np.random.default_rng(0)
    q = _rand(rng, (b, t, nq, d), jnp.bfloat16)
    k = _rand(rng, (b, t, nkv, d), jnp.bfloat16)
    v = _rand(rng, (b, t, nkv, d), jnp.bfloat16)
    if name.startswith("causal"):
        mask = M.causal()
    else:  # kv padding + query padding: rows >= q_len see nothing (out 0, lse -inf)
        mask = M.causal() & M.padding(jnp.asarray([100, 130]), jnp.asarray([90, 127]))
    kw = _mask_kwargs(mask, b, t, 128, bk, nq)
    w = _rand(rng, (b, t, nq, d), jnp.float32)
    u = _rand(rng, (b, nq, t), jnp.float32)

    def loss(fn, q, k, v):
        o, lse = fn(q, k, v)
        o = o.astype(jnp.float32)
        return jnp.sum(o * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * u), (o, lse)

    kern = lambda q, k, v: mg.flash_attention_forward(q, k, v, block_k=bk, interpret=True, **kw)
    ref = lambda q, k, v: A.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        mask=mask, impl="xla", return_lse=True,
    )
    grad = name.endswith("grad")
    if grad:
        (_, (o, lse)), g = jax.value_and_grad(lambda *a: loss(kern, *a), (0, 1, 2), has_aux=True)(q, k, v)
        (_, (ro, rl)), rg = jax.value_and_grad(lambda *a: loss(ref, *a), (0, 1, 2), has_aux=True)(q, k, v)
    else:
        o, lse = kern(q, k, v)
        ro, rl = ref(q, k, v)
    # bf16 output: one rounding of values |o| <= max|v|; lse in fp32.
    np.testing.assert_allclose(np.asarray(o, np.float32), ro, atol=2e-2, rtol=1e-2)
    assert np.array_equal(np.isneginf(lse), np.isneginf(rl))
    fin = np.isfinite(np.asarray(rl))
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(rl)[fin], atol=1e-4, rtol=1e-5)
    if not name.startswith("causal"):
        assert not fin.all()
        np.testing.assert_array_equal(np.asarray(o, np.float32)[np.transpose(~fin, (0, 2, 1))], 0.0)
    if grad:  # bf16 inputs / cotangents: compare to the fp32 reference at bf16 resolution
        for a, r, nm in zip(g, rg, "qkv"):
            a = np.asarray(a, np.float32)
            assert np.all(np.isfinite(a)), nm
            np.testing.assert_allclose(a, r, atol=3e-2 * float(np.abs(r).max()), err_msg=f"d{nm}")


@pytest.mark.parametrize(
    "kwargs,shapes,match",
    [
        (dict(), ((1, 128, 2, 64, jnp.float32),) * 3, "q.dtype"),
        (dict(), ((1, 128, 2, 96, jnp.bfloat16),) * 3, "head_dim"),
        (dict(block_q=64), ((1, 128, 2, 64, jnp.bfloat16),) * 3, "block_q"),
        (dict(block_k=32), ((1, 128, 2, 64, jnp.bfloat16),) * 3, "block_k"),
        (dict(num_stages=1), ((1, 128, 2, 64, jnp.bfloat16),) * 3, "num_stages"),
        (dict(), ((1, 128, 2, 64, jnp.bfloat16),) * 2 + ((1, 128, 2, 128, jnp.bfloat16),), "v head dim"),
        (dict(), ((1, 128, 3, 64, jnp.bfloat16),) + ((1, 128, 2, 64, jnp.bfloat16),) * 2, "multiple"),
    ],
)
def test_unsupported_cases_raise_value_error(kwargs, shapes, match):
    arrs = [jnp.zeros(s[:4], s[4]) for s in shapes]
    with pytest.raises(ValueError, match=match):
        mg.flash_attention_forward(*arrs, **kwargs)


def test_dispatch_picks_mosaic_tiles_or_names_why_not(monkeypatch):
    """``ops.pallas_attention.mosaic_tiles``: the Hopper dispatch rule (Mosaic forward for bf16 /
    fp16, head dim 64 / 128, sparse blocks that 128 x 64|128 tiles divide; Triton otherwise)."""
    from efficient_mllm.ops import masks as M
    from efficient_mllm.ops import pallas_attention as P

    bf = jnp.bfloat16
    assert P.mosaic_tiles(None, bf, 128, 128) == ((128, 128, 2), "")
    assert P.mosaic_tiles(M.causal(), jnp.float16, 64, 64)[0] == (128, 128, 2)
    sparse64 = M.block_sparse(128, 64, np.zeros((1, 2, 1), np.int32))
    assert P.mosaic_tiles(sparse64 & M.causal(), bf, 64, 64)[0] == (128, 64, 2)
    for args, why in [
        ((None, jnp.float32, 64, 64), "dtype float32"),
        ((None, bf, 96, 96), "head dims"),
        ((None, bf, 128, 64), "head dims"),
        ((M.block_sparse(64, 64, np.zeros((1, 2, 1), np.int32)), bf, 64, 64),
         "block-sparse"),
    ]:
        tiles, reason = P.mosaic_tiles(*args)
        assert tiles is None and why in reason, (args, reason)
    monkeypatch.setenv("EFFICIENT_MLLM_GPU_FLASH", "triton")
    assert P.mosaic_tiles(None, bf, 128, 128)[0] is None


def test_dispatch_lowers_mosaic_forward_on_hopper(monkeypatch):
    """``impl='pallas'`` on a (simulated) Hopper GPU lowers the Mosaic forward + Triton backward."""
    from efficient_mllm.ops import pallas_attention as P

    monkeypatch.setattr(P, "_is_hopper", lambda: True)
    monkeypatch.setattr(P, "_backend_for", lambda impl: "gpu")
    q = jax.ShapeDtypeStruct((1, 200, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        r = A._validate(q, k, v, M.causal(), None, None, None, None, "pallas", False)
        return P._run(r, "pallas")[0].astype(jnp.float32).sum()

    text = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                         disabled_checks=[TRITON])(q, kv, kv).mlir_module()
    assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" in text
