"""Layers, configs, the Attention module and the transformer block."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.kvcache.cache import LayerCache
from efficient_mllm.nn import attention as attn_mod
from efficient_mllm.nn.attention import Attention, query_attention_probs
from efficient_mllm.nn.config import AttentionConfig, BlockConfig, VisionConfig
from efficient_mllm.nn.layers import Embed, GeluMLP, LayerNorm, Linear, RMSNorm, SwiGLUMLP
from efficient_mllm.nn.transformer import TransformerBlock
from efficient_mllm.ops import masks
from efficient_mllm.ops import rope as rope_ops


def _np(x):
    return np.asarray(x, np.float64)


def _rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ----------------------------------------------------------------------------------- layers


def test_linear_general_matches_matmul_and_carries_axes():
    lin = Linear(6, (2, 4), axes=("embed", "heads", "head_dim"), use_bias=True, rngs=nnx.Rngs(0))
    lin.bias[...] = _rand((2, 4), 1)
    x = _rand((3, 5, 6))
    y = lin(x)
    assert y.shape == (3, 5, 2, 4)
    ref = _np(x) @ _np(lin.kernel[...]).reshape(6, 8) + _np(lin.bias[...]).reshape(8)
    np.testing.assert_allclose(_np(y).reshape(3, 5, 8), ref, atol=1e-5)
    o = Linear((2, 4), 6, axes=("heads", "head_dim", "embed"), rngs=nnx.Rngs(0))
    assert o(y).shape == (3, 5, 6)
    specs = nnx.get_partition_spec(nnx.state(lin))
    assert tuple(specs["kernel"].get_value()) == ("embed", "heads", "head_dim")
    assert tuple(specs["bias"].get_value()) == ("heads", "head_dim")


def test_linear_param_and_compute_dtypes():
    lin = Linear(4, 3, axes=("embed", "mlp"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert lin.kernel[...].dtype == jnp.float32
    assert lin(jnp.ones((2, 4))).dtype == jnp.bfloat16


def test_linear_bad_input():
    with pytest.raises(ValueError, match="axes"):
        Linear(4, 3, axes=("embed", "bogus"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="axes"):
        Linear(4, 3, axes=("embed",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        Linear(0, 3, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="trailing dims"):
        Linear(4, 3, axes=("embed", "mlp"), rngs=nnx.Rngs(0))(jnp.ones((2, 5)))


def test_norms_match_numpy_and_keep_fp32_statistics():
    x = _rand((2, 3, 8)) * 3 + 1
    rms = RMSNorm(8, eps=1e-5)
    rms.scale[...] = _rand((8,), 2)
    ref = _np(x) / np.sqrt((_np(x) ** 2).mean(-1, keepdims=True) + 1e-5) * _np(rms.scale[...])
    np.testing.assert_allclose(_np(rms(x)), ref, atol=1e-5)
    ln = LayerNorm(8, eps=1e-5)
    ln.scale[...], ln.bias[...] = _rand((8,), 3), _rand((8,), 4)
    xc = _np(x) - _np(x).mean(-1, keepdims=True)
    ref = xc / np.sqrt((xc**2).mean(-1, keepdims=True) + 1e-5) * _np(ln.scale[...]) + _np(
        ln.bias[...]
    )
    np.testing.assert_allclose(_np(ln(x)), ref, atol=1e-5)
    big = jnp.full((1, 8), 300.0, jnp.bfloat16)  # squares overflow nothing in fp32
    out = RMSNorm(8, dtype=jnp.bfloat16)(big)
    assert out.dtype == jnp.bfloat16 and np.allclose(_np(out), 1.0, atol=1e-2)
    with pytest.raises(ValueError, match="last dim"):
        rms(jnp.ones((2, 7)))


def test_mlps_and_embed():
    x = _rand((2, 3, 8))
    sw = SwiGLUMLP(8, 16, rngs=nnx.Rngs(0))
    g, u, d = (_np(m.kernel[...]) for m in (sw.gate, sw.up, sw.down))
    a = _np(x) @ g
    ref = ((a / (1 + np.exp(-a))) * (_np(x) @ u)) @ d
    np.testing.assert_allclose(_np(sw(x)), ref, atol=1e-5)
    ge = GeluMLP(8, 16, activation_name="quick_gelu", rngs=nnx.Rngs(0))
    h = _np(x) @ _np(ge.fc1.kernel[...]) + _np(ge.fc1.bias[...])
    ref = (h / (1 + np.exp(-1.702 * h))) @ _np(ge.fc2.kernel[...]) + _np(ge.fc2.bias[...])
    np.testing.assert_allclose(_np(ge(x)), ref, atol=1e-5)
    specs = nnx.get_partition_spec(nnx.state(sw))
    assert tuple(specs["down"]["kernel"].get_value()) == ("mlp", "embed")
    emb = Embed(11, 8, rngs=nnx.Rngs(0))
    tok = jnp.array([[1, 5, 10]])
    np.testing.assert_allclose(_np(emb(tok)), _np(emb.embedding[...])[[1, 5, 10]][None])
    assert emb.attend(emb(tok)).shape == (1, 3, 11)
    assert tuple(nnx.get_partition_spec(nnx.state(emb))["embedding"].get_value()) == (
        "vocab",
        "embed",
    )
    with pytest.raises(ValueError, match="integer"):
        emb(jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="activation"):
        GeluMLP(8, 16, activation_name="swish9", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------- configs


def test_configs_round_trip_and_hash():
    a = AttentionConfig(
        dim=32,
        num_heads=4,
        num_kv_heads=2,
        rope="mrope",
        mrope_sections=[2, 1, 1],
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    assert a.head_dim == 8 and a.mrope_sections == (2, 1, 1)
    assert AttentionConfig.from_dict(a.to_dict()) == a
    assert a.scaling == {"rope_type": "linear", "factor": 2.0}
    hash(a)
    b = BlockConfig(dim=32, num_heads=4, mlp_dim=64, norm="layernorm", mlp="gelu")
    assert BlockConfig.from_dict(b.to_dict()) == b
    assert b.attention_config == AttentionConfig(dim=32, num_heads=4)
    v = VisionConfig(image_size=(16, 8), patch_size=4, width=32, depth=1, heads=2, mlp_dim=64)
    assert VisionConfig.from_dict(v.to_dict()) == v and v.grid == (4, 2) and v.num_tokens == 9
    assert v.block_config().embed_axis == "vision_embed"
    hash(v)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AttentionConfig(dim=32, num_heads=4, num_kv_heads=3), "multiple"),
        (lambda: AttentionConfig(dim=30, num_heads=4), "divisible"),
        (lambda: AttentionConfig(dim=32, num_heads=4, rope="mrope"), "mrope_sections"),
        (
            lambda: AttentionConfig(dim=32, num_heads=4, rope="mrope", mrope_sections=(1, 1, 1)),
            "head_dim // 2",
        ),
        (lambda: AttentionConfig(dim=32, num_heads=4, rope="alibi"), "rope"),
        (lambda: AttentionConfig(dim=32, num_heads=4, dtype="int8"), "dtype"),
        (
            lambda: AttentionConfig(dim=32, num_heads=4, rope_scaling={"rope_type": "linear"}),
            "factor",
        ),
        (lambda: AttentionConfig.from_dict({"dim": 8, "num_heads": 2, "heads": 2}), "unknown"),
        (lambda: BlockConfig(dim=32, num_heads=4, mlp_dim=64, norm="batchnorm"), "norm"),
        (lambda: BlockConfig(dim=32, num_heads=4, mlp_dim=0), "mlp_dim"),
        (
            lambda: VisionConfig(
                image_size=30, patch_size=4, width=32, depth=1, heads=2, mlp_dim=8
            ),
            "divisible",
        ),
        (
            lambda: VisionConfig(
                image_size=32,
                patch_size=4,
                width=20,
                depth=1,
                heads=2,
                mlp_dim=8,
                pos_embedding="rope2d",
            ),
            "divisible by 4",
        ),
        (
            lambda: VisionConfig(
                image_size=32,
                patch_size=4,
                width=32,
                depth=1,
                heads=2,
                mlp_dim=8,
                pos_embedding="sincos",
            ),
            "pos_embedding",
        ),
    ],
)
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------------- attention


def _np_softmax(logits, axis=-1):
    logits = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=axis, keepdims=True)


def _np_attention(q, k, v, allowed):
    """q [B,T,N,H], k/v [B,S,Nkv,H], allowed bool [B|1, T, S] -> out, probs [B,N,T,S]."""
    n, nkv, h = q.shape[2], k.shape[2], q.shape[3]
    rep = n // nkv
    kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
    logits = np.where(allowed[:, None], logits, -np.inf)
    p = _np_softmax(logits)
    return np.einsum("bnts,bsnh->btnh", p, vv), p


def _attn(rope="rope", **kw):
    extra = {"mrope_sections": (2, 1, 1)} if rope == "mrope" else {}
    cfg = AttentionConfig(
        dim=16, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, rope=rope, **extra, **kw
    )
    return Attention(cfg, rngs=nnx.Rngs(0))


def test_attention_matches_numpy_gqa_causal():
    m = _attn()
    x = _rand((2, 6, 16))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))

    @nnx.jit
    def run(mod, xx):
        y, cache = mod(xx, positions=pos, mask=masks.causal())
        return y, cache, mod.qkv(xx, positions=pos), rope_ops.apply_rope(mod.q(xx), pos)

    y, cache, qkv, ref_q = run(m, x)
    assert cache is None and y.shape == (2, 6, 16)
    q, k, v = (_np(a) for a in qkv)
    np.testing.assert_allclose(q, _np(ref_q), atol=1e-6)
    out, _ = _np_attention(q, k, v, np.tril(np.ones((6, 6), bool))[None])
    ref = np.einsum("btnh,nhd->btd", out, _np(m.o.kernel[...]))
    np.testing.assert_allclose(_np(y), ref, atol=1e-4)


@pytest.mark.parametrize("rope", ["mrope", "rope2d", "none"])
def test_attention_position_variants(rope):
    m = _attn(rope)
    x = _rand((1, 4, 16))
    pos = {
        "mrope": jnp.asarray(np.random.default_rng(0).integers(0, 9, (3, 1, 4))),
        "rope2d": rope_ops.rope_2d_positions((2, 2)),
        "none": None,
    }[rope]
    y, _ = m(x, positions=pos)
    assert y.shape == (1, 4, 16) and bool(jnp.all(jnp.isfinite(y)))
    if rope != "none":
        with pytest.raises(ValueError, match="positions"):
            m(x, positions=None)


def test_attention_with_cache_matches_full_prefill():
    m = _attn()
    b, t, cap = 2, 7, 10
    x = _rand((b, t, 16), 3)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    full, _ = nnx.jit(lambda mod, xx: mod(xx, positions=pos, mask=masks.causal()))(m, x)

    @nnx.jit
    def step(mod, xx, pp, cache):
        old = cache.length
        mask = masks.causal() & masks.padding(kv_lengths=old + xx.shape[1])
        return mod(xx, positions=pp, mask=mask, q_offset=old, cache=cache)

    cache = LayerCache.init(b, cap, 2, 8)
    y1, cache = step(m, x[:, :5], pos[:, :5], cache)
    outs = [y1]
    for i in range(5, t):
        yi, cache = step(m, x[:, i : i + 1], pos[:, i : i + 1], cache)
        outs.append(yi)
    np.testing.assert_allclose(_np(jnp.concatenate(outs, 1)), _np(full), atol=1e-5)
    assert cache.length.tolist() == [t, t]


def test_attention_row_probes_match_full_softmax(monkeypatch):
    m = _attn("rope2d")
    x = _rand((2, 9, 16), 4)
    pos = rope_ops.rope_2d_positions((3, 3), batch=2)
    key_mask = jnp.arange(9)[None, :] < jnp.array([[9], [6]])
    monkeypatch.setattr(attn_mod, "_MEAN_PROBS_CHUNK", 4)  # 9 queries: chunks 4 + 4 + 1 (padded)

    @nnx.jit
    def run(mod, xx):
        rows = {
            str(qi): mod.attention_row(xx, positions=pos, query_index=qi)
            for qi in (4, -1, "mean", "mean_probs")
        }
        rows["masked"] = mod.attention_row(xx, positions=pos, query_index=0, key_mask=key_mask)
        return rows, mod.qkv(xx, positions=pos)

    rows, qkv = run(m, x)
    q, k, _ = (_np(a) for a in qkv)
    _, p = _np_attention(q, k, k, np.ones((1, 9, 9), bool))
    full = p.mean(axis=1)  # [B, T, S]
    np.testing.assert_allclose(_np(rows["4"]), full[:, 4], atol=1e-5)
    np.testing.assert_allclose(_np(rows["-1"]), full[:, 8], atol=1e-5)
    np.testing.assert_allclose(_np(rows["mean_probs"]), full.mean(axis=1), atol=1e-5)
    q_bar = q.mean(axis=1, keepdims=True)
    _, pm = _np_attention(q_bar, k, k, np.ones((1, 1, 9), bool))
    np.testing.assert_allclose(_np(rows["mean"]), pm.mean(1)[:, 0], atol=1e-5)
    row = rows["masked"]
    assert float(jnp.abs(row[1, 6:]).max()) == 0.0
    np.testing.assert_allclose(_np(row.sum(-1)), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="query_index"):
        m.attention_row(x, positions=pos, query_index=9)
    with pytest.raises(ValueError, match="query_index"):
        m.attention_row(x, positions=pos, query_index="max")


def test_query_attention_probs_bad_shapes():
    with pytest.raises(ValueError, match="q shape"):
        query_attention_probs(jnp.ones((1, 1, 2, 4)), jnp.ones((1, 3, 2, 5)))
    with pytest.raises(ValueError, match="multiple"):
        query_attention_probs(jnp.ones((1, 1, 3, 4)), jnp.ones((1, 3, 2, 4)))


_SEEN = {}


def _doubled_softmax(num_heads, gain=2.0):
    """Test variant: softmax attention times ``gain``; records the heads it was built with."""
    from efficient_mllm.ops.attention import dot_product_attention

    _SEEN["num_heads"] = num_heads

    def attend(q, k, v, *, mask=None, q_offset=None):
        return gain * dot_product_attention(q, k, v, mask=mask, q_offset=q_offset)

    return attend


def test_attention_variant_by_name_gets_context(monkeypatch):
    # registered for this test only, so registry listings elsewhere do not see it
    entry = registry.Entry("test_doubled_softmax", _doubled_softmax, status="test")
    monkeypatch.setitem(registry.ATTENTION._entries, entry.name, entry)
    base = _attn()
    doubled = _attn(attention="test_doubled_softmax(gain=3.0)")
    nnx.update(doubled, nnx.state(base, nnx.Param))
    assert _SEEN["num_heads"] == 4
    x = _rand((1, 4, 16))
    pos = jnp.arange(4)[None]
    y0, _ = base(x, positions=pos)
    y1, _ = doubled(x, positions=pos)
    np.testing.assert_allclose(_np(y1), 3 * _np(y0), atol=1e-5)  # o has no bias
    with pytest.raises(registry.RegistryError, match="unknown attention"):
        _attn(attention="no_such_attention")


def test_attention_bad_input():
    m = _attn()
    with pytest.raises(ValueError, match="x shape"):
        m(jnp.ones((1, 4, 15)), positions=jnp.arange(4)[None])
    with pytest.raises(ValueError, match="positions shape"):
        m(jnp.ones((1, 4, 16)), positions=jnp.arange(5)[None])
    with pytest.raises(ValueError, match="AttentionConfig"):
        Attention({"dim": 16}, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("norm, mlp", [("rmsnorm", "swiglu"), ("layernorm", "gelu")])
def test_block_is_prenorm_residual(norm, mlp):
    cfg = BlockConfig(dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32, norm=norm, mlp=mlp)
    blk = TransformerBlock(cfg, rngs=nnx.Rngs(0))
    x = _rand((2, 5, 16))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))

    @nnx.jit
    def run(mod, xx):
        y, _ = mod(xx, positions=pos, mask=masks.causal())
        h = xx + mod.attn(mod.attn_norm(xx), positions=pos, mask=masks.causal())[0]
        return y, h + mod.mlp(mod.mlp_norm(h))

    y, ref = run(blk, x)
    np.testing.assert_allclose(_np(y), _np(ref), atol=1e-5)
    specs = nnx.get_partition_spec(nnx.state(blk))
    assert tuple(specs["attn"]["k"]["kernel"].get_value()) == ("embed", "kv_heads", "head_dim")


def test_block_grads_and_bf16():
    cfg = BlockConfig(dim=16, num_heads=2, mlp_dim=32, qkv_bias=True)
    blk = TransformerBlock(cfg, rngs=nnx.Rngs(0))
    x = _rand((1, 4, 16))
    pos = jnp.arange(4)[None]

    def loss(model):
        return jnp.sum(model(x, positions=pos, mask=masks.causal())[0] ** 2)

    grads = nnx.jit(nnx.grad(loss))(blk)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(float(jnp.abs(g).sum()) > 0 for g in leaves)
    blk16 = TransformerBlock(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
    fwd = nnx.jit(lambda model, xx: model(xx, positions=pos, mask=masks.causal())[0])
    y16 = fwd(blk16, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y16)))
    np.testing.assert_allclose(_np(y16), _np(fwd(blk, x)), atol=0.15, rtol=0.05)
