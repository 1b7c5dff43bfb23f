"""The TPU linear-attention kernels (Pallas Mosaic TPU) in TPU interpret mode vs the XLA reference.

The reference is ``efficient_mllm.ops.linear_attention`` in its quadratic ``form="parallel"``
(masked ``(Q K^T * D) V`` with segment sums, HIGHEST precision): a different equation from the
kernel's chunk recurrence. Forward, final state and the gradients of q, k, v, g (per token and
constant per head) and the initial state under random cotangents of both outputs; awkward shapes
(T not a chunk multiple, T < chunk, F and dv not multiples of 128, several dv tiles); bf16 error
bounds; a long strongly decaying sequence; the decode step; argument errors; TPU lowering.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from efficient_mllm.ops import linear_attention as la
from pallas_kernels.linear_attention import tpu

INTERPRET = pltpu.InterpretParams()


def _inputs(rng, b, t, h, f, dv, decay, dtype=jnp.float32, with_state=True, g_range=(0.0, 0.3)):
    q = jnp.asarray(rng.normal(size=(b, t, h, f)) * f**-0.5, dtype)
    k = jnp.asarray(rng.normal(size=(b, t, h, f)) * f**-0.5, dtype)
    v = jnp.asarray(rng.normal(size=(b, t, h, dv)), dtype)
    if decay == "token":
        g = -jnp.asarray(rng.uniform(*g_range, size=(b, t, h)), jnp.float32)
    elif decay == "const":
        g = -jnp.asarray(rng.uniform(*g_range, size=(h,)), jnp.float32)
    else:
        g = None
    s0 = jnp.asarray(rng.normal(size=(b, h, f, dv)), jnp.float32) if with_state else None
    return q, k, v, g, s0


def _kernel(scale, chunk_size=128):
    def fn(q, k, v, g, s0):
        return tpu.chunked_linear_attention(
            q,
            k,
            v,
            g,
            scale=scale,
            initial_state=s0,
            return_final_state=True,
            chunk_size=chunk_size,
            interpret=INTERPRET,
        )

    return fn


def _reference(scale):
    def fn(q, k, v, g, s0):
        state = None if s0 is None else la.LinearAttentionState(s0)
        o, s = la.linear_attention(
            q,
            k,
            v,
            log_decay=g,
            scale=scale,
            form="parallel",
            initial_state=state,
            return_state=True,
        )
        return o, s.kv

    return fn


def _vjp(fn, args, do, ds):
    """(o, final state) and the gradients of (q, k, v, g, s0) that are not None."""
    live = [i for i, a in enumerate(args) if a is not None]

    @jax.jit
    def run(*xs):
        def f(*ys):
            full = list(args)
            for i, y in zip(live, ys):
                full[i] = y
            return fn(*full)

        out, back = jax.vjp(f, *xs)
        return out, back((do.astype(out[0].dtype), ds))

    return run(*(args[i] for i in live))


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) / max(1e-6, float(np.max(np.abs(b))))


def _cotangents(rng, v, s_shape):
    do = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
    ds = jnp.asarray(rng.normal(size=s_shape), jnp.float32)
    return do, ds


# ---- fp32 against the reference ----------------------------------------------------------------
CASES = {
    # name: (B, T, H, F, dv, decay, initial state, chunk_size, scale)
    "ragged_T_per_token_state_F_ne_dv": (1, 150, 2, 40, 24, "token", True, 128, 0.7),
    "T_lt_chunk_batch3_F273_dv300_const": (3, 37, 1, 273, 300, "const", False, 64, 1.0),
    "three_chunks_no_decay_state": (2, 260, 1, 128, 64, None, True, 16, 0.5),
    "chunk256_dv256_const_state": (1, 300, 2, 64, 256, "const", True, 256, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case):
    b, t, h, f, dv, decay, with_state, chunk, scale = CASES[case]
    rng = np.random.default_rng(list(CASES).index(case))
    args = _inputs(rng, b, t, h, f, dv, decay, with_state=with_state)
    do, ds = _cotangents(rng, args[2], (b, h, f, dv))
    (o1, s1), g1 = _vjp(_kernel(scale, chunk), args, do, ds)
    (o2, s2), g2 = _vjp(_reference(scale), args, do, ds)
    assert o1.shape == (b, t, h, dv) and o1.dtype == jnp.float32
    assert s1.shape == (b, h, f, dv) and s1.dtype == jnp.float32
    assert _err(o1, o2) <= 2e-5, f"out: {_err(o1, o2)}"
    assert _err(s1, s2) <= 2e-5, f"state: {_err(s1, s2)}"
    names = [n for n, a in zip(("q", "k", "v", "g", "s0"), args) if a is not None]
    for name, a, r in zip(names, g1, g2):
        assert a.shape == r.shape, f"d{name}: {a.shape} vs {r.shape}"
        assert _err(a, r) <= 5e-5, f"d{name}: {_err(a, r)}"


def test_output_only_matches_reference():
    # return_final_state=False, g=None, no state: the primal (no residuals) kernel.
    rng = np.random.default_rng(11)
    q, k, v, _, _ = _inputs(rng, 2, 70, 3, 32, 16, None, with_state=False)
    o = jax.jit(lambda q, k, v: tpu.chunked_linear_attention(q, k, v, interpret=True))(q, k, v)
    ref = la.linear_attention(q, k, v, form="parallel")
    assert _err(o, ref) <= 2e-5


# ---- bf16 ----------------------------------------------------------------------------------------
def test_bf16_error_at_most_2x_bf16_reference():
    """Both against fp32 on the same (bf16-rounded) inputs: the kernel keeps fp32 states."""
    rng = np.random.default_rng(5)
    b, t, h, f, dv = 1, 300, 2, 64, 64
    args = _inputs(rng, b, t, h, f, dv, "token", jnp.bfloat16, g_range=(0.0, 0.1))
    do, ds = _cotangents(rng, args[2], (b, h, f, dv))
    do = do.astype(jnp.bfloat16)
    f32 = [x if x is None else x.astype(jnp.float32) for x in args]
    exact = _vjp(_reference(1.0), f32, do, ds)
    xla16 = _vjp(_reference(1.0), args, do, ds)
    got = _vjp(_kernel(1.0), args, do, ds)
    assert got[0][0].dtype == jnp.bfloat16 and got[0][1].dtype == jnp.float32
    flat = lambda r: list(r[0]) + list(r[1])  # noqa: E731
    for name, a, x, e in zip(
        ("o", "state", "dq", "dk", "dv", "dg", "ds0"), *map(flat, (got, xla16, exact))
    ):
        ek, ex = _err(a, e), _err(x, e)
        assert ek <= 2.0 * ex + 1e-4, f"{name}: kernel err {ek:.2e} vs bf16 XLA err {ex:.2e}"


def _recurrence64(q, k, v, g):
    """float64 numpy recurrence (one batch row / head): outputs and final state."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    s = np.zeros((q.shape[1], v.shape[1]))
    out = np.empty((q.shape[0], v.shape[1]))
    for i in range(q.shape[0]):
        s = np.exp(g[i]) * s + np.outer(k[i], v[i])
        out[i] = q[i] @ s
    return out, s


def test_long_sequence_strong_decay_bf16():
    # 8 chunks with log-decays down to -12 per token: in-chunk cumulative decays reach ~-800
    # (exp underflows to 0 and must stay 0, not 0/0) next to stretches of no decay.
    rng = np.random.default_rng(6)
    b, t, h, f, dv = 1, 1000, 1, 32, 32
    q, k, v, _, _ = _inputs(rng, b, t, h, f, dv, None, jnp.bfloat16, with_state=False)
    g = -rng.uniform(0.0, 12.0, size=(b, t, h))
    g[:, 300:500] = 0.0
    g[:, 700:710] = -1e-3
    g = jnp.asarray(g, jnp.float32)
    do, ds = _cotangents(rng, v, (b, h, f, dv))
    (o, s), grads = _vjp(_kernel(1.0), (q, k, v, g, None), do.astype(jnp.bfloat16), ds)
    for x in (o, s, *grads):
        assert np.all(np.isfinite(np.asarray(x, np.float32)))
    want_o, want_s = _recurrence64(q[0, :, 0], k[0, :, 0], v[0, :, 0], g[0, :, 0])
    assert _err(o[0, :, 0], want_o) <= 1e-2
    assert _err(s[0, 0], want_s) <= 1e-4  # bf16 inputs, fp32 state
    (_, _), ref = _vjp(
        _reference(1.0), [x.astype(jnp.float32) for x in (q, k, v)] + [g, None], do, ds
    )
    for name, a, r in zip("qkvg", grads, ref):
        assert _err(a, r) <= 2e-2, f"d{name}: {_err(a, r)}"


# ---- decode step ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "b,h,f,dv,decay,dtype",
    [
        (2, 3, 40, 24, "token", jnp.float32),
        (1, 2, 273, 640, "const", jnp.float32),  # dv tiles of 128
        (3, 1, 64, 130, None, jnp.bfloat16),
    ],
)
def test_decode_step_matches_reference(b, h, f, dv, decay, dtype):
    rng = np.random.default_rng(b * 100 + f)
    q, k, v, _, s = _inputs(rng, b, 1, h, f, dv, None, dtype)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    g = {
        "token": -jnp.asarray(rng.uniform(0, 2, (b, h)), jnp.float32),
        "const": -jnp.asarray(rng.uniform(0, 2, (h,)), jnp.float32),
        None: None,
    }[decay]
    o, s_new = tpu.linear_attention_step(q, k, v, g, s, scale=0.5, interpret=INTERPRET)
    o_ref, st_ref = la.linear_attention_step(
        q, k, v, la.LinearAttentionState(s), log_decay=g, scale=0.5
    )
    assert o.shape == (b, h, dv) and o.dtype == dtype and s_new.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _err(o, o_ref) <= tol
    assert _err(s_new, st_ref.kv) <= 1e-6


def test_decode_steps_continue_chunked_prefill():
    rng = np.random.default_rng(9)
    b, t, h, f, dv = 1, 40, 2, 16, 8
    q, k, v, g, _ = _inputs(rng, b, t + 3, h, f, dv, "token", with_state=False)
    o_all = la.linear_attention(q, k, v, log_decay=g, form="parallel")
    _, s = tpu.chunked_linear_attention(
        q[:, :t], k[:, :t], v[:, :t], g[:, :t], return_final_state=True, interpret=True
    )
    for i in range(t, t + 3):
        o, s = tpu.linear_attention_step(q[:, i], k[:, i], v[:, i], g[:, i], s, interpret=True)
        assert _err(o, o_all[:, i]) <= 2e-5


# ---- errors --------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    q = jnp.zeros((1, 20, 2, 8))
    v = jnp.zeros((1, 20, 2, 4))
    f = tpu.chunked_linear_attention
    with pytest.raises(ValueError, match="k shape"):
        f(q, jnp.zeros((1, 20, 2, 9)), v)
    with pytest.raises(ValueError, match="v shape"):
        f(q, q, jnp.zeros((1, 21, 2, 4)))
    with pytest.raises(ValueError, match="g shape"):
        f(q, q, v, jnp.zeros((1, 20)))
    with pytest.raises(ValueError, match="initial_state shape"):
        f(q, q, v, initial_state=jnp.zeros((1, 2, 4, 8)))
    with pytest.raises(ValueError, match="chunk_size"):
        f(q, q, v, chunk_size=8)
    with pytest.raises(ValueError, match="q dtype"):
        f(q.astype(jnp.int32), q.astype(jnp.int32), v)
    with pytest.raises(ValueError, match="scale"):
        f(q, q, v, scale="big")
    with pytest.raises(ValueError, match="interpret"):
        f(q, q, v, interpret="yes")
    with pytest.raises(ValueError, match="T >= 1"):
        f(q[:, :0], q[:, :0], v[:, :0])
    s = jnp.zeros((1, 2, 8, 4))
    step = tpu.linear_attention_step
    with pytest.raises(ValueError, match="state shape"):
        step(q[:, 0], q[:, 0], v[:, 0], None, jnp.zeros((1, 2, 4, 8)))
    with pytest.raises(ValueError, match="g shape"):
        step(q[:, 0], q[:, 0], v[:, 0], jnp.zeros((3,)), s)
    with pytest.raises(ValueError, match="v shape"):
        step(q[:, 0], q[:, 0], v[:, :, 0], None, s)
    with pytest.raises(ValueError, match="state dtype"):
        step(q[:, 0], q[:, 0], v[:, 0], None, s.astype(jnp.int32))


# ---- lowering for TPU (runs on CPU) --------------------------------------------------------------
@pytest.mark.parametrize("what", ["fwd", "fwd_bwd", "fwd_bwd_f32_F273", "step"])
def test_exports_for_tpu(what):
    b, t, h, f, dv = 2, 1000, 4, 128, 128
    dtype = jnp.bfloat16
    if what == "fwd_bwd_f32_F273":
        f, dtype = 273, jnp.float32
    if what == "step":
        avals = [
            jax.ShapeDtypeStruct(s, d)
            for s, d in (
                ((b, h, f), dtype),
                ((b, h, f), dtype),
                ((b, h, dv), dtype),
                ((b, h), jnp.float32),
                ((b, h, f, dv), jnp.float32),
            )
        ]
        fn = tpu.linear_attention_step
        calls = 1
    else:
        avals = [
            jax.ShapeDtypeStruct(s, d)
            for s, d in (
                ((b, t, h, f), dtype),
                ((b, t, h, f), dtype),
                ((b, t, h, dv), dtype),
                ((b, t, h), jnp.float32),
                ((b, h, f, dv), jnp.float32),
            )
        ]

        def fwd(q, k, v, g, s0):
            return tpu.chunked_linear_attention(
                q, k, v, g, initial_state=s0, return_final_state=True
            )

        def fwd_bwd(*args):
            def loss(*a):
                o, s = fwd(*a)
                return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

            return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)

        fn, calls = (fwd, 1) if what == "fwd" else (fwd_bwd, 2)
    exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(*avals)
    assert exp.mlir_module().count("tpu_custom_call") == calls
