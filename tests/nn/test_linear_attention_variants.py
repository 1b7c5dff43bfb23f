"""Linear-attention variants in the model: each against a float64 numpy loop of its paper's
recurrence (written independently of ops/linear_attention.py), cached prefill + decode against the
full forward, generation, gradients, per-layer hybrids and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm.kvcache import KVCache, RecurrentCache, generate
from efficient_mllm.nn.attention import Attention
from efficient_mllm.nn.config import AttentionConfig
from efficient_mllm.nn.language import LanguageConfig, LanguageModel
from efficient_mllm.ops import masks

SPECS = [
    "linear",
    "linear(feature_map='relu')",
    "lightning",
    "retnet",
    "based(feature_dim=4)",
    "hedgehog(feature_dim=6)",
    "performer(feature_dim=8)",
    "ssd",
    "linear_swa(window=3, feature_dim=4)",
    "linear_swa(feature_map='hedgehog', feature_dim=6, window=5)",
]


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _softmax(h):
    e = np.exp(h - h.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _phi(m, x, heads_of):
    """float64 features of x [B, T, N, d]; heads_of[n] = the kv head whose map head n uses."""
    fm = m.feature_map
    if fm == "elu_plus_one":
        return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))
    if fm == "relu":
        return np.maximum(x, 0)
    if fm == "silu":
        return x / (1 + np.exp(-x))
    if fm == "identity":
        return x
    if fm == "taylor2":
        p = x @ _np(m.proj.kernel[...])
        p = p * p.shape[-1] ** -0.25
        outer = np.einsum("...i,...j->...ij", p, p).reshape(*p.shape[:-1], -1) / np.sqrt(2)
        return np.concatenate([np.ones_like(p[..., :1]), p, outer], -1)
    if fm == "performer":
        xs = x * x.shape[-1] ** -0.25
        proj = _np(m.random[...])
        return np.exp(xs @ proj - 0.5 * (xs**2).sum(-1, keepdims=True)) / np.sqrt(proj.shape[1])
    w, bias = _np(m.hh_weight[...]), _np(m.hh_bias[...])
    h = np.einsum("btnd,ndm->btnm", x, w[heads_of]) + bias[heads_of]
    return np.concatenate([_softmax(h), _softmax(-h)], -1)


def reference(m, q, k, v, x):
    """float64 [B, T, Nq, H] output of LinearAttention m (causal, no padding)."""
    q, k, v, x = _np(q), _np(k), _np(v), _np(x)
    b, t, nq, hd = q.shape
    nkv = k.shape[2]
    grp = nq // nkv
    fq = _phi(m, q, np.arange(nq) // grp)
    fk = _phi(m, k, np.arange(nkv))
    out = np.zeros((b, t, nq, hd))
    gamma = np.ones((b, t, nq))
    if m.decay == "alibi":
        gamma = gamma * np.exp(-(2.0 ** (-8.0 * (np.arange(nq) + 1) / nq)))
    elif m.decay == "retnet":
        gamma = gamma * (1 - 2.0 ** (-5.0 - np.arange(nq)))
    elif m.decay == "data":
        z = x @ _np(m.dt.kernel[...]) + _np(m.dt.bias[...])
        dt = np.log1p(np.exp(z))  # [B, T, Nkv]
        a = np.exp(_np(m.a_log[...]))
        gamma = np.exp(-a * dt)[:, :, np.arange(nq) // grp]
        fk = fk * dt[..., None]
    scale = hd**-0.5 if m.feature_map in ("identity", "silu") else 1.0
    for bi in range(b):
        for h in range(nq):
            j = h // grp
            if m.window is not None:
                fac = 1 / (1 + np.exp(-_np(m.window_factor[...])[h]))
                for i in range(t):
                    win = range(max(0, i - m.window + 1), i + 1)
                    logit = {s: q[bi, i, h] @ k[bi, s, j] / np.sqrt(hd) for s in win}
                    top = max(logit.values())
                    num, den = np.zeros(hd), 0.0
                    for s in range(i + 1):
                        if s in logit:  # LoLCATs: factor * exp(logit - row max of the window)
                            wgt = fac * np.exp(logit[s] - top)
                        else:
                            wgt = fq[bi, i, h] @ fk[bi, s, j]
                        num, den = num + wgt * v[bi, s, j], den + wgt
                    out[bi, i, h] = num / den
                continue
            state = np.zeros((fq.shape[-1], hd))
            zsum = np.zeros(fq.shape[-1])
            for i in range(t):
                state = gamma[bi, i, h] * state + np.outer(fk[bi, i, j], v[bi, i, j])
                zsum = gamma[bi, i, h] * zsum + fk[bi, i, j]
                o = scale * fq[bi, i, h] @ state
                if m.normalizer == "divisive":
                    o = o / (scale * fq[bi, i, h] @ zsum + m.eps)
                out[bi, i, h] = o
    if m.output == "none":
        return out
    gate = np.einsum("btd,dnh->btnh", x, _np(m.gate.kernel[...]))
    if m.output == "srms_gate":
        flat = out.reshape(b, t, -1)
        flat = flat / np.sqrt((flat**2).mean(-1, keepdims=True) + m.eps)
        return flat.reshape(out.shape) * gate
    w = _np(m.norm_weight[...])
    if m.output == "group_norm_gate":
        mu = out.mean(-1, keepdims=True)
        var = ((out - mu) ** 2).mean(-1, keepdims=True)
        y = (out - mu) / np.sqrt(var + m.eps) * w + _np(m.norm_bias[...])
        return y * gate / (1 + np.exp(-gate))
    y = (out + _np(m.skip[...])[:, None] * v[:, :, np.arange(nq) // grp]) * gate / (1 + np.exp(-gate))
    flat = y.reshape(b, t, -1)
    flat = flat / np.sqrt((flat**2).mean(-1, keepdims=True) + m.eps)
    return flat.reshape(y.shape) * w


def _attention(spec, heads=4, kv_heads=2, head_dim=8, dim=16, seed=0):
    cfg = AttentionConfig(dim=dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                          attention=spec, rope="none")
    return Attention(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(1, 7, 4, 4), (3, 13, 4, 2)])
def test_variant_matches_float64_loop(spec, shape):
    b, t, nq, nkv = shape
    attn = _attention(spec, heads=nq, kv_heads=nkv)
    m = attn.attend
    # Perturb zero-initialised parameters so every term is exercised.
    for var in ("window_factor", "hh_bias", "norm_bias"):
        p = getattr(m, var)
        if p is not None:
            p[...] = 0.3 * jax.random.normal(jax.random.key(7), p.shape)
    x = jax.random.normal(jax.random.key(1), (b, t, 16))
    q, k, v = attn.qkv(x)
    got = m(q, k, v, mask=masks.causal(), x=x)
    want = reference(m, q, k, v, x)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-4, atol=2e-5)


def _lm(spec, layer_attention=(), dtype="float32", seed=0):
    cfg = LanguageConfig(vocab_size=29, width=16, depth=2, heads=4, kv_heads=2, mlp_dim=32,
                         attention=spec, layer_attention=layer_attention, dtype=dtype)
    return LanguageModel(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize(
    "spec", SPECS + ["sliding_window(window=3)", "based(feature_dim=4, impl='interpret')"]
)
def test_padded_prefill_then_decode_matches_full_forward(spec):
    model = _lm(spec)
    tok = jax.random.randint(jax.random.key(3), (2, 12), 1, 29)
    lengths = jnp.array([7, 4], jnp.int32)
    prompt = jnp.where(jnp.arange(9)[None] < lengths[:, None], tok[:, :9], 0)  # right padding
    cache = model.init_cache(2, 16)
    logits, cache = jax.jit(lambda m, *a: m.prefill(*a))(model, prompt, lengths, cache)
    steps = [logits]
    decode = jax.jit(lambda m, t, c: m.decode(t, c))
    for i in range(4):
        nxt = tok[jnp.arange(2), lengths + i][:, None]
        logits, cache = decode(model, nxt, cache)
        steps.append(logits)
    for row in range(2):
        n = int(lengths[row])
        full = model(tok[row : row + 1, : n + 4]).logits[0]
        got = jnp.stack([s[row] for s in steps])
        np.testing.assert_allclose(got, full[n - 1 : n + 4], rtol=1e-4, atol=1e-4)
    assert [type(c).__name__ for c in cache.layers] == [
        "LayerCache" if spec.startswith("sliding") else "RecurrentCache"
    ] * 2


def test_hybrid_stack_generate_matches_greedy_rollout():
    model = _lm("softmax", layer_attention=("based(feature_dim=4)", "sliding_window(window=4)"))
    assert model.cfg.recurrent_layers == (0,)
    tok = jax.random.randint(jax.random.key(5), (2, 6), 1, 29)
    out = generate(model, tok, max_new_tokens=3, lengths=jnp.array([6, 4]))
    for row, n in ((0, 6), (1, 4)):
        seq = tok[row : row + 1, :n]
        for i in range(3):
            nxt = jnp.argmax(model(seq).logits[0, -1])
            assert int(nxt) == int(out.tokens[row, i])
            seq = jnp.concatenate([seq, nxt[None, None].astype(seq.dtype)], 1)


@pytest.mark.parametrize("spec", ["hedgehog(feature_dim=6)", "ssd", "linear_swa(window=3, feature_dim=4)", "lightning"])
def test_gradients_reach_variant_parameters(spec):
    model = _lm(spec)
    tok = jax.random.randint(jax.random.key(2), (2, 9), 1, 29)

    def loss(m):
        return jnp.mean(m(tok).logits ** 2)

    grads = nnx.grad(loss)(model)
    g = grads.blocks[0].attn.attend
    leaves = jax.tree.leaves(nnx.state(g, nnx.Param))
    assert leaves, spec
    for leaf in leaves:
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), spec


@pytest.mark.parametrize("spec", ["linear", "retnet", "linear_swa(window=3, feature_dim=4)"])
def test_bf16_model_is_finite_and_close(spec):
    x = jax.random.randint(jax.random.key(4), (2, 40), 1, 29)
    ref = _lm(spec)(x).logits
    got = _lm(spec, dtype="bfloat16")(x).logits
    assert np.all(np.isfinite(got))
    assert float(jnp.max(jnp.abs(got - ref))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_non_causal_global_form_matches_numpy():
    attn = _attention("linear")
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    q, k, v = attn.qkv(x)
    got = attn.attend(q, k, v, mask=None)
    fq = _phi(attn.attend, _np(q), None)
    fk = _phi(attn.attend, _np(k), None)
    kr, vr = np.repeat(fk, 2, 2), np.repeat(_np(v), 2, 2)
    a = np.einsum("bqnf,bknf->bnqk", fq, kr)
    want = np.einsum("bnqk,bknh->bqnh", a, vr) / (a.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_state_floats():
    lm = _lm("softmax", layer_attention=("linear", "linear_swa(window=3, feature_dim=4)"))
    a0, a1 = lm.blocks[0].attn, lm.blocks[1].attn
    # head_dim 4, 2 kv heads: Nkv * F * dv + Nkv * F (the normaliser)
    assert a0.state_floats(100) == 2 * 4 * 4 + 2 * 4
    assert a1.state_floats(100) == 2 * 21 * 4 + 2 * 21 + 2 * 3 * 2 * 4  # + the window's k/v
    soft = _lm("softmax").blocks[0].attn
    assert soft.state_floats(100) == 2 * 100 * 2 * 4
    assert _lm("sliding_window(window=5)").blocks[0].attn.state_floats(100) == 2 * 5 * 2 * 4
    c = lm.init_cache(3, 10)
    assert isinstance(c.layers[0], RecurrentCache) and c.layers[0].capacity == 10
    assert c.nbytes() > 0 and int(c.used_nbytes()) == 0


def test_errors():
    with pytest.raises(ValueError, match="layer_attention has 1 entries"):
        LanguageConfig(vocab_size=9, width=8, depth=2, heads=2, mlp_dim=8, layer_attention=("linear",))
    with pytest.raises(ValueError, match="init_cache"):
        KVCache.init(_lm("linear").cfg, batch=1, capacity=4)
    attn = _attention("linear")
    q, k, v = attn.qkv(jnp.ones((1, 4, 16)))
    with pytest.raises(ValueError, match="SegmentIds"):
        attn.attend(q, k, v, mask=masks.causal() & masks.segment_ids(jnp.zeros((1, 4), jnp.int32)))
    with pytest.raises(ValueError, match="unknown argument"):
        _attention("linear(window_size=3)")
    with pytest.raises(ValueError, match="window"):
        _attention("lightning(window=4)")
    with pytest.raises(ValueError, match="attention_row"):
        attn.attention_row(jnp.ones((1, 4, 16)))
    with pytest.raises(ValueError, match="init_cache"):
        soft = _attention("softmax")
        soft(jnp.ones((1, 1, 16)), cache=attn.init_cache(1, 4))
