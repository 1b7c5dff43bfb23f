"""dot_product_attention vs a float64 numpy reference; gradients; dispatch and errors."""

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from efficient_mllm import registry
from efficient_mllm.ops import attention, masks
from efficient_mllm.ops.attention import dot_product_attention

from .test_masks import ANSWER, IMAGE, TEXT, random_spec, ref_dense


def ref_attention(q, k, v, allowed, bias=None, scale=None, softcap=None):
    """Plain float64 attention: loops over batch, query heads and rows; explicit softmax."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, tq, nq, h = q.shape
    tk, nkv, hv = k.shape[1], k.shape[2], v.shape[3]
    g = nq // nkv
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    allowed = np.broadcast_to(allowed, (b_, nq, tq, tk))
    bias = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (b_, nq, tq, tk))
    out = np.zeros((b_, tq, nq, hv))
    lse = np.full((b_, nq, tq), -np.inf)
    for b in range(b_):
        for n in range(nq):
            kh = n // g  # the kv head shared by this query head's group
            s = scale * (q[b, :, n, :] @ k[b, :, kh, :].T)
            if bias is not None:
                s = s + bias[b, n]
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            for i in range(tq):
                sel = allowed[b, n, i]
                if not sel.any():
                    continue
                x = s[i, sel]
                m = x.max()
                e = np.exp(x - m)
                out[b, i, n] = (e / e.sum()) @ v[b, sel, kh]
                lse[b, n, i] = m + np.log(e.sum())
    return out, lse


def _rand(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def _jit_attn(mask_is_spec, q_offset_static, **kw):
    """Jitted attention taking (q, k, v, mask, bias, q_offset array); static ints closed over."""

    def f(q, k, v, mask, bias, off):
        off = q_offset_static if off is None else off
        return dot_product_attention(
            q, k, v, mask=mask, bias=bias, q_offset=off, return_lse=True, **kw
        )

    return jax.jit(f)


@settings(deadline=None, max_examples=20)
@given(
    batch=st.integers(1, 3),
    q_len=st.integers(1, 40),
    kv_len=st.integers(1, 40),
    nkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 12, 32]),
    off_kind=st.sampled_from(["none", "int", "array"]),
    mask_kind=st.sampled_from(["none", "spec", "array"]),
    use_bias=st.booleans(),
    softcap=st.sampled_from([None, 2.0]),
    scale=st.sampled_from([None, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(
    batch, q_len, kv_len, nkv, group, head_dim, off_kind, mask_kind, use_bias, softcap, scale, seed
):
    rng = np.random.default_rng(seed)
    nq = nkv * group
    q = _rand(rng, (batch, q_len, nq, head_dim))
    k = _rand(rng, (batch, kv_len, nkv, head_dim))
    v = _rand(rng, (batch, kv_len, nkv, head_dim + 4))  # value head dim may differ
    if off_kind == "none":
        q_offset, offs = None, np.zeros(batch, int)
    elif off_kind == "int":
        q_offset = int(rng.integers(0, 8))
        offs = np.full(batch, q_offset)
    else:
        offs = rng.integers(0, 8, (batch,))
        q_offset = jnp.asarray(offs, jnp.int32)
    total = max(kv_len, q_len + 8)
    if mask_kind == "spec":
        mask, tree = random_spec(rng, batch, q_len, kv_len, total, nq)
        allowed = ref_dense(tree, batch, mask.num_heads or 1, q_len, kv_len, offs)
    elif mask_kind == "array":
        shape = (int(rng.choice([1, batch])), int(rng.choice([1, nq])), q_len, kv_len)
        allowed = rng.random(shape) < 0.6
        mask = jnp.asarray(allowed)
    else:
        mask, allowed = None, np.ones((1, 1, q_len, kv_len), bool)
    bias = None
    if use_bias:
        shape = [batch, nq, q_len, kv_len]
        for ax in rng.choice(4, size=int(rng.integers(0, 3)), replace=False):
            shape[ax] = 1
        bias = _rand(rng, tuple(shape))

    f = _jit_attn(
        True,
        q_offset if not hasattr(q_offset, "shape") else None,
        softcap=softcap,
        scale=scale,
        impl="xla",
    )
    out, lse = f(q, k, v, mask, bias, q_offset if hasattr(q_offset, "shape") else None)
    want, want_lse = ref_attention(q, k, v, allowed, bias, scale, softcap)
    assert out.shape == (batch, q_len, nq, head_dim + 4) and out.dtype == jnp.float32
    assert lse.shape == (batch, nq, q_len) and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    assert not np.isnan(np.asarray(out)).any()


@settings(deadline=None, max_examples=4)
@given(
    batch=st.integers(1, 2),
    q_len=st.integers(1, 33),
    kv_len=st.integers(1, 33),
    group=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_bfloat16_inputs(batch, q_len, kv_len, group, seed):
    """bf16 inputs: logits/softmax in float32, output bf16.

    Tolerance: against float64 attention on the same bf16-valued inputs, the error is at most one
    bf16 ulp of the reference value (2**-8 * |ref|, i.e. twice the output rounding) + 1e-5.
    """
    rng = np.random.default_rng(seed)
    q = _rand(rng, (batch, q_len, 2 * group, 16), jnp.bfloat16)
    k = _rand(rng, (batch, kv_len, 2, 16), jnp.bfloat16)
    v = _rand(rng, (batch, kv_len, 2, 16), jnp.bfloat16)
    kvl = rng.integers(0, kv_len + 1, (batch,)).astype(np.int32)
    spec = masks.causal() & masks.padding(kvl)
    out, lse = jax.jit(partial(dot_product_attention, impl="xla", return_lse=True))(
        q, k, v, mask=spec
    )
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    allowed = (np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None])[None, None] & (
        np.arange(kv_len)[None, None, None, :] < kvl[:, None, None, None]
    )
    want, want_lse = ref_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), allowed
    )
    err = np.abs(np.asarray(out, np.float64) - want)
    assert (err <= 2.0**-8 * np.abs(want) + 1e-5).all(), err.max()
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], rtol=1e-5, atol=1e-5)


def _fully_masked_case(dtype):
    rng = np.random.default_rng(0)
    q = _rand(rng, (2, 5, 4, 8), dtype)
    k = _rand(rng, (2, 6, 2, 8), dtype)
    v = _rand(rng, (2, 6, 2, 8), dtype)
    bias = _rand(rng, (1, 4, 5, 6), dtype)
    # row 1 has no valid key at all; rows >= 3 of batch 0 are padded queries.
    spec = masks.causal() & masks.padding(np.array([6, 0]), q_lengths=np.array([3, 5]))
    return q, k, v, bias, spec


def test_fully_masked_rows_zero_output_and_finite_grads():
    q, k, v, bias, spec = _fully_masked_case(jnp.float32)
    out, lse = dot_product_attention(
        q, k, v, mask=spec, bias=bias, softcap=3.0, return_lse=True, impl="xla"
    )
    assert (np.asarray(out)[1] == 0).all() and (np.asarray(out)[0, 3:] == 0).all()
    assert np.isneginf(np.asarray(lse)[1]).all() and np.isneginf(np.asarray(lse)[0, :, 3:]).all()
    assert np.isfinite(np.asarray(lse)[0, :, :3]).all()

    def loss(q, k, v, bias):
        o, l = dot_product_attention(
            q, k, v, mask=spec, bias=bias, softcap=3.0, return_lse=True, impl="xla"
        )
        return jnp.sum(o**2) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    gq = np.asarray(grads[0])
    assert (gq[1] == 0).all() and (gq[0, 3:] == 0).all()
    assert np.abs(gq[0, :3]).sum() > 0


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        q = _rand(rng, (2, 4, 4, 8), jnp.float64)
        k = _rand(rng, (2, 5, 2, 8), jnp.float64)
        v = _rand(rng, (2, 5, 2, 8), jnp.float64)
        bias = _rand(rng, (2, 1, 4, 5), jnp.float64)
        spec = (masks.sliding_window(2, 1) | masks.prefix_lm(np.array([2, 0]))) & masks.padding(
            np.array([5, 3]), np.array([4, 2])
        )

        def f(q, k, v, bias):
            o, l = dot_product_attention(
                q, k, v, mask=spec, bias=bias, softcap=2.5, q_offset=1, return_lse=True, impl="xla"
            )
            assert o.dtype == jnp.float64
            return o, jnp.where(jnp.isfinite(l), l, 0.0)

        check_grads(jax.jit(f), (q, k, v, bias), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        # GQA grouping with a per-batch q_offset and an explicit per-head boolean mask.
        m = jnp.asarray(rng.random((2, 4, 4, 5)) < 0.7)
        g = lambda q, k, v: dot_product_attention(
            q, k, v, mask=m & masks.causal(), q_offset=jnp.array([1, 0]), impl="xla"
        )
        check_grads(jax.jit(g), (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def _dependence(fn, v_or_k_index, q, k, v):
    """dep[b, i, j] = sum |d out[b, i] / d x[b, j]| with x = k (index 1) or v (index 2)."""
    jac = jax.jit(jax.jacrev(fn, argnums=v_or_k_index))(q, k, v)  # [B,T,N,H, B,T,Nkv,H]
    jac = np.abs(np.asarray(jac))
    b = q.shape[0]
    return np.stack([jac[i, :, :, :, i].sum(axis=(1, 2, 4)) for i in range(b)])


def test_modality_mutual_never_depends_on_later_answers():
    types = np.array(
        [[TEXT, IMAGE, IMAGE, IMAGE, TEXT, TEXT, ANSWER, ANSWER, TEXT, IMAGE, TEXT, ANSWER]],
        np.int32,
    )
    t = types.shape[1]
    rng = np.random.default_rng(3)
    q, k, v = (_rand(rng, (1, t, 2, 8)) for _ in range(3))
    spec = masks.modality_mutual(types)

    def one(q, k, v):
        return dot_product_attention(q, k, v, mask=spec, impl="xla")

    def two(q, k, v):  # two stacked layers: dependence must not leak through intermediate tokens
        h = one(q, k, v)
        return dot_product_attention(h, h[:, :, :2], h[:, :, :2], mask=spec, impl="xla")

    tt = types[0]
    later_answer = (tt[None, :] == ANSWER) & (np.arange(t)[None, :] > np.arange(t)[:, None])
    image_to_later_prompt = (
        (tt[:, None] == IMAGE)
        & (tt[None, :] == TEXT)
        & (np.arange(t)[None, :] > np.arange(t)[:, None])
    )
    image_to_later_prompt[1:4, 8:] = False  # text of the next turn is past an answer
    image_to_later_prompt[9, :] = tt == TEXT  # second-turn image: only the text after it
    image_to_later_prompt[9, :10] = False
    for fn in (one, two):
        for idx in (1, 2):
            dep = _dependence(fn, idx, q, k, v)[0]
            assert (dep[later_answer] == 0).all(), (fn.__name__, idx)
            assert (dep[image_to_later_prompt] > 0).all(), (fn.__name__, idx)


def test_gqa_does_not_materialise_repeated_kv():
    q = jnp.zeros((1, 5, 8, 16))
    k = jnp.zeros((1, 37, 1, 16))
    jaxpr = jax.make_jaxpr(partial(dot_product_attention, impl="xla"))(q, k, k)
    big = 37 * 8 * 16
    for eqn in jaxpr.jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            assert not (37 in shape and 16 in shape and np.prod(shape) >= big), (
                eqn.primitive,
                shape,
            )


def test_q_offset_decode_equals_full_prefill_rows():
    """A decode step (queries after cached keys) reproduces the matching rows of full prefill."""
    rng = np.random.default_rng(4)
    b, t, steps = 2, 9, 3
    q, k, v = _rand(rng, (b, t, 4, 8)), _rand(rng, (b, t, 2, 8)), _rand(rng, (b, t, 2, 8))
    lengths = np.array([9, 7])
    full = dot_product_attention(q, k, v, mask=masks.causal() & masks.padding(lengths), impl="xla")
    old = lengths - steps
    rows = np.stack([np.arange(o, o + steps) for o in old])  # per-row absolute positions
    q_new = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
    dec = dot_product_attention(
        q_new,
        k,
        v,
        mask=masks.causal() & masks.padding(old + steps),
        q_offset=jnp.asarray(old, jnp.int32),
        impl="xla",
    )
    want = jnp.take_along_axis(full, rows[:, :, None, None], axis=1)
    np.testing.assert_allclose(np.asarray(dec), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_registry_softmax_entry():
    entry = registry.ATTENTION.get("softmax")
    assert "Vaswani" in entry.paper
    attend = registry.ATTENTION.build("softmax(impl='xla', softcap=5.0, scale=0.2)")
    rng = np.random.default_rng(5)
    q, k, v = _rand(rng, (1, 6, 2, 8)), _rand(rng, (1, 6, 1, 8)), _rand(rng, (1, 6, 1, 8))
    got = attend(q, k, v, mask=masks.causal(), q_offset=0)
    want = dot_product_attention(q, k, v, mask=masks.causal(), softcap=5.0, scale=0.2, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert registry.ATTENTION.build("softmax")(q, k, v).shape == (1, 6, 2, 8)
    with pytest.raises(ValueError, match="impl must be one of"):
        registry.ATTENTION.build("softmax(impl='triton')")


def test_auto_falls_back_to_xla_and_logs_once(caplog):
    attention._LOGGED.clear()
    rng = np.random.default_rng(6)
    q = _rand(rng, (1, 4, 2, 8))
    with caplog.at_level(logging.INFO, logger="efficient_mllm.attention"):
        a = dot_product_attention(q, q, q, mask=masks.causal())
        dot_product_attention(q, q, q, mask=masks.causal())
    b = dot_product_attention(q, q, q, mask=masks.causal(), impl="xla")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    recs = [r for r in caplog.records if r.name == "efficient_mllm.attention"]
    # one message per skipped candidate (cudnn, then pallas), each logged once
    assert len(recs) == 2 and "cudnn" in recs[0].getMessage() and "pallas" in recs[1].getMessage()


def test_cudnn_plan_mapping(monkeypatch):
    """What impl='cudnn' would pass to jax.nn.dot_product_attention (GPU info faked)."""
    monkeypatch.setattr(attention, "_gpu_info", lambda: (True, 9.0))
    q = jnp.zeros((2, 8, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((2, 8, 2, 64), jnp.bfloat16)

    def plan(**kw):
        k = kw.pop("k", kv)
        r = attention._validate(
            q,
            k,
            k,
            kw.pop("mask", None),
            kw.pop("bias", None),
            None,
            kw.pop("softcap", None),
            kw.pop("q_offset", None),
            "cudnn",
            kw.pop("return_lse", False),
        )
        return attention._cudnn_plan(r)

    kw, reason = plan(
        mask=masks.causal() & masks.padding(np.array([8, 5])) & masks.sliding_window(3)
    )
    assert reason is None and kw["is_causal"] and kw["local_window_size"] == (3, 0)
    np.testing.assert_array_equal(kw["key_value_seq_lengths"], [8, 5])
    np.testing.assert_array_equal(kw["query_seq_lengths"], [8, 8])
    assert plan()[1] is None and plan(mask=masks.padding(np.array([3, 4])), q_offset=5)[1] is None
    for bad, word in [
        ({"softcap": 30.0}, "softcap"),
        ({"return_lse": True}, "lse"),
        ({"mask": masks.causal(), "q_offset": 2}, "q_offset"),
        ({"mask": masks.sliding_window(2, 2)}, "SlidingWindow"),
        ({"mask": masks.modality_mutual(np.zeros((2, 8), np.int32))}, "ModalityMutual"),
        ({"mask": jnp.ones((2, 1, 8, 8), bool)}, "boolean mask"),
        ({"mask": masks.causal() | masks.padding(np.array([2, 2]))}, "Causal() | Padding"),
        ({"mask": masks.causal(), "k": jnp.zeros((2, 6, 2, 64), jnp.bfloat16)}, "Tq == Tk"),
    ]:
        assert word in plan(**bad)[1], (bad, plan(**bad)[1])
    r = attention._validate(
        q.astype(jnp.float32), kv, kv, None, None, None, None, None, "cudnn", False
    )
    assert "bfloat16" in attention._cudnn_plan(r)[1]


def test_bad_inputs():
    q = jnp.zeros((2, 5, 4, 8))
    kv = jnp.zeros((2, 6, 2, 8))
    cases = [
        ({"q": jnp.zeros((5, 4, 8))}, "q must have rank 4"),
        (
            {"k": jnp.zeros((2, 6, 3, 8)), "v": jnp.zeros((2, 6, 3, 8))},
            r"multiple of kv heads \(3\)",
        ),
        ({"k": jnp.zeros((2, 6, 2, 16))}, "head dim of q \\(8\\) and k \\(16\\)"),
        ({"v": jnp.zeros((2, 7, 2, 8))}, "k .* and v .* must agree"),
        ({"k": jnp.zeros((3, 6, 2, 8)), "v": jnp.zeros((3, 6, 2, 8))}, "batch sizes differ"),
        ({"q": jnp.zeros((2, 5, 4, 8), jnp.int32)}, "floating dtype"),
        ({"mask": jnp.ones((2, 1, 5, 7), bool)}, "does not broadcast"),
        ({"mask": jnp.ones((2, 3, 5, 6), bool)}, "mask has 3 heads"),
        ({"mask": jnp.ones((5, 6), jnp.float32)}, "dtype bool"),
        (
            {"mask": masks.segment_ids(np.zeros((2, 4), np.int32), np.zeros((2, 6), np.int32))},
            "q_segments",
        ),
        ({"bias": jnp.zeros((2, 4, 5, 5))}, "bias of shape"),
        ({"q_offset": jnp.zeros((3,), jnp.int32)}, "q_offset"),
        ({"q_offset": 1.5}, "q_offset"),
        ({"softcap": -1.0}, "softcap must be positive"),
        ({"scale": "0.1"}, "scale must be None or a real scalar"),
        ({"impl": "flash"}, "impl must be one of"),
        (
            {"impl": "cudnn"},
            "impl='cudnn' cannot run this call: cuDNN attention needs an NVIDIA GPU",
        ),
        ({"impl": "pallas"}, "impl='pallas' needs a GPU or TPU backend"),
        ({"impl": "interpret", "bias": jnp.zeros((1, 1, 5, 6))}, "take no additive bias"),
        ({"return_lse": 1}, "return_lse must be a bool"),
    ]
    for kw, msg in cases:
        args = {"q": q, "k": kv, "v": kv}
        for name in ("q", "k", "v"):
            if name in kw:
                args[name] = kw.pop(name)
        with pytest.raises(ValueError, match=msg):
            dot_product_attention(args["q"], args["k"], args["v"], **kw)
