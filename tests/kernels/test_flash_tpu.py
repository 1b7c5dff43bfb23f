"""The TPU flash-attention kernel (Pallas Mosaic TPU) in TPU interpret mode vs the XLA reference.

Each case builds a mask three ways: a dense boolean mask written directly in numpy (the
reference's mask), a block map of it, and an in-tile ``mask_fn`` + int32 features for the
kernel. Output, lse and the gradients of q, k, v under random cotangents of both outputs are
compared with ``dot_product_attention(impl="xla", return_lse=True)``. Plus bf16 error bounds,
fully masked rows, the race detector, argument errors and lowering for TPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from efficient_mllm.ops.attention import dot_product_attention
from pallas_kernels import common
from pallas_kernels.flash_attention import tpu

INTERPRET = pltpu.InterpretParams()


# ---- masks: predicates on features (kernel side) ------------------------------------------------
def causal_fn(rows, cols):
    return rows[0] >= cols[0]


@dataclasses.dataclass(frozen=True)
class Window:
    left: int

    def __call__(self, rows, cols):
        d = rows[0] - cols[0]
        return (d >= 0) & (d <= self.left)


def segments_fn(rows, cols):  # features: (position, segment); causal within a segment
    return (rows[1] == cols[1]) & (rows[0] >= cols[0])


def padding_fn(rows, cols):  # features: rows (position,), cols (position, valid)
    return (rows[0] >= cols[0]) & (cols[1] > 0)


def prefix_fn(rows, cols):  # features: rows (position, prefix length), cols (position,)
    return (cols[0] <= rows[0]) | (cols[0] < rows[1])


def hash_fn(rows, cols):  # an arbitrary pointwise predicate on random features
    return (rows[0] + 2 * cols[0]) % 3 != 0


# ---- helpers --------------------------------------------------------------------------------------
def _qkv(rng, b, tq, tk, nq, nkv, d, dtype=jnp.float32, dv=None):
    f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    return f(b, tq, nq, d), f(b, tk, nkv, d), f(b, tk, nkv, dv or d)


def _block_map(dense, bq, bk):
    """EMPTY / PARTIAL / FULL of each tile of a dense [Bm, Nm, Tq, Tk] mask (in-range pairs)."""
    bm_, nm, tq, tk = dense.shape
    nqb, nkb = -(-tq // bq), -(-tk // bk)
    anyp = np.zeros((bm_, nm, nqb * bq, nkb * bk), bool)
    allp = np.ones_like(anyp)
    anyp[..., :tq, :tk] = dense
    allp[..., :tq, :tk] = dense
    anyt = anyp.reshape(bm_, nm, nqb, bq, nkb, bk).any(axis=(3, 5))
    allt = allp.reshape(bm_, nm, nqb, bq, nkb, bk).all(axis=(3, 5))
    out = np.where(allt, common.FULL, np.where(anyt, common.PARTIAL, common.EMPTY))
    return jnp.asarray(out.astype(np.int8))


def _vjp(fn, q, k, v, do, dl):
    @jax.jit
    def run(q, k, v):
        (o, lse), back = jax.vjp(fn, q, k, v)
        return o, lse, back((do.astype(o.dtype), dl))

    return run(q, k, v)


def _kernel(**kw):
    return lambda q, k, v: tpu.flash_attention(q, k, v, interpret=INTERPRET, **kw)


def _reference(dense, softcap=None, scale=None):
    mask = None if dense is None else jnp.asarray(dense)
    return lambda q, k, v: dot_product_attention(
        q, k, v, mask=mask, softcap=softcap, scale=scale, impl="xla", return_lse=True
    )


def _cotangents(rng, q, v):
    b, tq, nq, _ = q.shape
    do = jnp.asarray(rng.normal(size=(b, tq, nq, v.shape[3])), jnp.float32)
    dl = jnp.asarray(rng.normal(size=(b, nq, tq)), jnp.float32)
    return do, dl


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    return float(np.max(np.abs(a[fin] - b[fin]))) / max(1.0, float(np.max(np.abs(b[fin]))))


def _compare(got, want, tol):
    o1, l1, g1 = got
    o2, l2, g2 = want
    assert np.array_equal(np.isneginf(l1), np.isneginf(l2)), "rows with lse=-inf differ"
    assert _err(o1, o2) <= tol, f"out: {_err(o1, o2)}"
    assert _err(l1, l2) <= tol, f"lse: {_err(l1, l2)}"
    for a, b, name in zip(g1, g2, "qkv"):
        assert np.all(np.isfinite(np.asarray(a))), f"d{name} not finite"
        assert _err(a, b) <= tol, f"d{name}: {_err(a, b)}"


def _check(q, k, v, dense, tol=1e-5, softcap=None, scale=None, seed=0, **kw):
    do, dl = _cotangents(np.random.default_rng(seed), q, v)
    got = _vjp(_kernel(softcap=softcap, scale=scale, **kw), q, k, v, do, dl)
    want = _vjp(_reference(dense, softcap, scale), q, k, v, do, dl)
    _compare(got, want, tol)
    return got


def _pos(t):
    return np.arange(t, dtype=np.int32)


# ---- fp32 against the reference ------------------------------------------------------------------
def test_causal_gqa4_ragged_batch2():
    rng = np.random.default_rng(0)
    b, t = 2, 200
    q, k, v = _qkv(rng, b, t, t, 4, 1, 64)
    dense = np.tril(np.ones((t, t), bool))[None, None]
    f = jnp.asarray(_pos(t)[None, None])
    _check(
        q,
        k,
        v,
        dense,
        block_map=_block_map(dense, 128, 128),
        mask_fn=causal_fn,
        row_features=f,
        col_features=f,
    )


def test_sliding_window_softcap_h128_block256():
    rng = np.random.default_rng(1)
    t, w = 300, 70
    q, k, v = _qkv(rng, 1, t, t, 2, 2, 128)
    i, j = np.mgrid[:t, :t]
    dense = ((i - j >= 0) & (i - j <= w))[None, None]
    f = jnp.asarray(_pos(t)[None, None])
    _check(
        q,
        k,
        v,
        dense,
        softcap=5.0,
        block_map=_block_map(dense, 256, 128),
        mask_fn=Window(w),
        row_features=f,
        col_features=f,
        block_q=256,
    )


def test_segments_padding_fully_masked_rows():
    # Segment ids (query rows of segment -1 see no key), key padding per batch row.
    rng = np.random.default_rng(2)
    b, t = 2, 256
    q, k, v = _qkv(rng, b, t, t, 2, 1, 64)
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
    qseg = seg.copy()
    qseg[0, 5:20] = -1
    qseg[1, 130:140] = -1
    i, j = np.mgrid[:t, :t]
    dense = ((qseg[:, :, None] == seg[:, None, :]) & (i >= j)[None])[:, None]
    rows = jnp.asarray(np.stack([np.broadcast_to(_pos(t), (b, t)), qseg], 1))
    cols = jnp.asarray(np.stack([np.broadcast_to(_pos(t), (b, t)), seg], 1))
    o, lse, (dq, _, _) = _check(
        q,
        k,
        v,
        dense,
        block_map=_block_map(dense, 128, 128),
        mask_fn=segments_fn,
        row_features=rows,
        col_features=cols,
    )
    dead = ~dense.any(-1)[:, 0]  # [B, Tq]
    assert dead.sum() == 25
    assert np.all(np.asarray(o)[dead] == 0) and np.all(np.isneginf(np.asarray(lse)[:, 0][dead]))
    assert np.all(np.asarray(dq)[dead] == 0)

    # key padding with a shared (batch-1) plan and per-batch features
    valid = (_pos(t)[None] < np.array([[230], [180]])).astype(np.int32)
    dense = ((i >= j)[None] & (valid[:, None, :] > 0))[:, None]
    cols = jnp.asarray(np.stack([np.broadcast_to(_pos(t), (b, t)), valid], 1))
    _check(
        q,
        k,
        v,
        dense,
        block_map=_block_map(np.tril(np.ones((1, 1, t, t), bool)), 128, 128),
        mask_fn=padding_fn,
        row_features=jnp.asarray(_pos(t)[None, None]),
        col_features=cols,
    )


def test_prefix_lm_block_k256_gqa1():
    rng = np.random.default_rng(3)
    b, t = 2, 260
    q, k, v = _qkv(rng, b, t, t, 2, 2, 64)
    prefix = np.array([40, 150], np.int32)
    i, j = np.mgrid[:t, :t]
    dense = ((j[None] <= i[None]) | (j[None] < prefix[:, None, None]))[:, None]
    rows = jnp.asarray(
        np.stack([np.broadcast_to(_pos(t), (b, t)), np.broadcast_to(prefix[:, None], (b, t))], 1)
    )
    cols = jnp.asarray(_pos(t)[None, None])
    _check(
        q,
        k,
        v,
        dense,
        block_map=_block_map(dense, 128, 256),
        mask_fn=prefix_fn,
        row_features=rows,
        col_features=cols,
        block_k=256,
    )


def test_random_block_map_per_head_cross_attention():
    # Tq != Tk, per-batch and per-head block maps, an all-EMPTY query-block row (count 0).
    rng = np.random.default_rng(4)
    b, tq, tk, nq, nkv = 2, 140, 300, 4, 2
    q, k, v = _qkv(rng, b, tq, tk, nq, nkv, 64)
    nqb, nkb = 2, 3
    bm = rng.choice([common.EMPTY, common.PARTIAL, common.FULL], size=(b, nq, nqb, nkb))
    bm[0, 1, 1, :] = common.EMPTY
    bm[1, 3, 0, :] = common.EMPTY
    rf = rng.integers(0, 5, (1, 1, tq)).astype(np.int32)
    cf = rng.integers(0, 5, (1, 1, tk)).astype(np.int32)
    pred = (rf[0, 0][:, None] + 2 * cf[0, 0][None, :]) % 3 != 0
    tile = np.repeat(np.repeat(bm, 128, axis=2), 128, axis=3)[:, :, :tq, :tk]
    dense = (tile == common.FULL) | ((tile == common.PARTIAL) & pred)
    o, lse, _ = _check(
        q,
        k,
        v,
        dense,
        block_map=jnp.asarray(bm, jnp.int8),
        mask_fn=hash_fn,
        row_features=jnp.asarray(rf),
        col_features=jnp.asarray(cf),
    )
    assert np.all(np.asarray(o)[0, 128:, 1] == 0) and np.all(
        np.isneginf(np.asarray(lse)[0, 1, 128:])
    )


def test_dense_no_mask_ragged_softcap_scale_value_dim():
    # No block map (all FULL), Tq != Tk, value head dim != key head dim, explicit scale.
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 1, 130, 70, 4, 4, 64, dv=192)
    _check(q, k, v, None, softcap=3.0, scale=0.2)


# ---- bf16: error at most ~2x that of the bf16 XLA path (both against fp32) -----------------------
@pytest.mark.parametrize("case", ["causal_gqa4_h128", "random_map"])
def test_bf16_error_bound(case):
    rng = np.random.default_rng(6)
    if case == "causal_gqa4_h128":
        b, t, nq, nkv, d = 1, 256, 4, 1, 128
        dense = np.tril(np.ones((t, t), bool))[None, None]
        f = jnp.asarray(_pos(t)[None, None])
        kw = dict(
            block_map=_block_map(dense, 128, 128), mask_fn=causal_fn, row_features=f, col_features=f
        )
    else:
        b, t, nq, nkv, d = 2, 200, 2, 1, 64
        bm = rng.choice([common.PARTIAL, common.FULL], size=(1, 1, 2, 2))
        rf = rng.integers(0, 5, (1, 1, t)).astype(np.int32)
        cf = rng.integers(0, 5, (1, 1, t)).astype(np.int32)
        pred = (rf[0, 0][:, None] + 2 * cf[0, 0][None, :]) % 3 != 0
        tile = np.repeat(np.repeat(bm, 128, axis=2), 128, axis=3)[:, :, :t, :t]
        dense = (tile == common.FULL) | ((tile == common.PARTIAL) & pred)
        kw = dict(
            block_map=jnp.asarray(bm, jnp.int8),
            mask_fn=hash_fn,
            row_features=jnp.asarray(rf),
            col_features=jnp.asarray(cf),
        )
    q, k, v = _qkv(rng, b, t, t, nq, nkv, d, jnp.bfloat16)
    do, dl = _cotangents(rng, q, v)
    exact = _vjp(_reference(dense), *(x.astype(jnp.float32) for x in (q, k, v)), do, dl)
    xla16 = _vjp(_reference(dense), q, k, v, do, dl)
    got = _vjp(_kernel(**kw), q, k, v, do, dl)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    for name, a, x, e in (
        ("out", got[0], xla16[0], exact[0]),
        ("lse", got[1], xla16[1], exact[1]),
        *zip(("dq", "dk", "dv"), got[2], xla16[2], exact[2]),
    ):
        ek, ex = _err(a, e), _err(x, e)
        assert ek <= 2.0 * ex + 1e-5, f"{name}: kernel err {ek:.2e} vs bf16 XLA err {ex:.2e}"


# ---- the race detector ------------------------------------------------------------------------
def test_no_races_detected():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    rng = np.random.default_rng(7)
    t = 256
    q, k, v = _qkv(rng, 1, t, t, 2, 1, 64)
    dense = np.tril(np.ones((t, t), bool))[None, None]
    f = jnp.asarray(_pos(t)[None, None])
    params = pltpu.InterpretParams(detect_races=True)
    fn = lambda q, k, v: tpu.flash_attention(  # noqa: E731
        q,
        k,
        v,
        block_map=_block_map(dense, 128, 128),
        mask_fn=causal_fn,
        row_features=f,
        col_features=f,
        interpret=params,
    )
    do, dl = _cotangents(rng, q, v)
    got = _vjp(fn, q, k, v, do, dl)
    _compare(got, _vjp(_reference(dense), q, k, v, do, dl), 1e-5)
    state = getattr(ipc, "races", None)  # set by the interpreter when detect_races=True
    assert state is None or not state.races_found


# ---- errors -------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    q = jnp.zeros((1, 200, 2, 64))
    k = v = jnp.zeros((1, 200, 1, 64))
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 128"):
        tpu.flash_attention(q, k, v, block_q=64)
    with pytest.raises(ValueError, match="block_k must be a positive multiple of 128"):
        tpu.flash_attention(q, k, v, block_k=200)
    with pytest.raises(ValueError, match="block_map shape"):
        tpu.flash_attention(q, k, v, block_map=jnp.ones((1, 1, 2, 3), jnp.int8))
    with pytest.raises(ValueError, match="without a mask_fn"):
        tpu.flash_attention(q, k, v, row_features=jnp.zeros((1, 1, 200), jnp.int32))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        tpu.flash_attention(jnp.zeros((1, 200, 3, 64)), *(jnp.zeros((1, 200, 2, 64)),) * 2)
    with pytest.raises(ValueError, match="row_features"):
        tpu.flash_attention(
            q, k, v, mask_fn=causal_fn, row_features=jnp.zeros((1, 1, 7), jnp.int32)
        )
    with pytest.raises(ValueError, match="interpret"):
        tpu.flash_attention(q, k, v, interpret="yes")


# ---- lowering for TPU (runs on CPU) ---------------------------------------------------------------
@pytest.mark.parametrize("with_bwd", [False, True])
def test_exports_for_tpu(with_bwd):
    b, t, nq, nkv, d = 1, 1024, 4, 2, 128
    f = jnp.asarray(_pos(t)[None, None])
    bm = _block_map(np.tril(np.ones((1, 1, t, t), bool)), 128, 128)

    def fwd(q, k, v):
        return tpu.flash_attention(
            q, k, v, block_map=bm, mask_fn=causal_fn, row_features=f, col_features=f, softcap=30.0
        )

    def fwd_bwd(q, k, v):
        def loss(q, k, v):
            o, lse = fwd(q, k, v)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    avals = [jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16) for n in (nq, nkv, nkv)]
    exp = jax.export.export(jax.jit(fwd_bwd if with_bwd else fwd), platforms=["tpu"])(*avals)
    text = exp.mlir_module()
    assert text.count("tpu_custom_call") == (3 if with_bwd else 1)
