"""LoRA adapters (nn/lora.py): exact base output at init, ``x (W + s A B) + b`` against numpy
float64 for 1-D and multi-dim Linear layers (fp32 tight, bf16 loose), merging, gradients that
reach only the adapters, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_mllm.nn.language import LanguageConfig, LanguageModel
from efficient_mllm.nn.layers import Linear
from efficient_mllm.nn.lora import LoRALinear, LoRAParam, apply_lora, merge_lora

CFG = LanguageConfig(vocab_size=40, width=24, depth=2, heads=4, kv_heads=2, mlp_dim=40)


def _tokens(b=2, t=7, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 40, (b, t)), jnp.int32)


def _randomize_lora(model, seed=1, std=0.2):
    for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        v[...] = std * jax.random.normal(jax.random.key(seed + i), v[...].shape, v[...].dtype)


def _dims(n):
    return (n,) if isinstance(n, int) else tuple(n)


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def test_init_is_the_base_model_exactly():
    model = LanguageModel(CFG, rngs=nnx.Rngs(0))
    tok = _tokens()
    before = model(tok).logits
    paths = apply_lora(model, rank=4, rngs=nnx.Rngs(1))
    assert paths == [f"blocks.{i}.attn.{t}" for i in range(2) for t in "qkvo"]
    assert isinstance(model.blocks[1].attn.o, LoRALinear)
    np.testing.assert_array_equal(np.asarray(model(tok).logits), np.asarray(before))
    # B starts at zero, A does not; adapters carry the base kernel's logical axes
    q = model.blocks[0].attn.q
    assert not np.any(np.asarray(q.lora_b[...])) and np.any(np.asarray(q.lora_a[...]))
    assert q.lora_a.get_metadata()["out_sharding"] == ("embed", None)
    assert q.lora_b.get_metadata()["out_sharding"] == (None, "heads", "head_dim")


@pytest.mark.parametrize(
    "n_in, n_out, bias, lead",
    [(16, (4, 6), False, (2, 5)), ((4, 6), 16, True, (1, 3)), (7, 5, True, (3,)),
     ((2, 3), (3, 2), False, (2, 1, 4))],
)
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_forward_matches_float64(n_in, n_out, bias, lead, dtype, tol):
    ins, outs = _dims(n_in), _dims(n_out)
    base = Linear(n_in, n_out, axes=(None,) * (len(ins) + len(outs)), use_bias=bias,
                  dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    if bias:
        base.bias[...] = jax.random.normal(jax.random.key(5), base.bias[...].shape)
    lora = LoRALinear(base, rank=3, alpha=6.0, rngs=nnx.Rngs(2))
    _randomize_lora(lora, seed=3, std=0.5)
    x = jax.random.normal(jax.random.key(9), lead + ins)
    y = lora(x)
    assert y.dtype == jnp.dtype(dtype) and y.shape == lead + outs
    k = len(ins)
    w = _np(lora.kernel[...]) + 2.0 * np.tensordot(_np(lora.lora_a[...]), _np(lora.lora_b[...]), 1)
    want = np.tensordot(_np(x), w, axes=(list(range(x.ndim - k, x.ndim)), list(range(k))))
    if bias:
        want = want + _np(lora.bias[...])
    scale = np.abs(want).max()
    np.testing.assert_allclose(_np(y), want, atol=tol * scale, rtol=tol)


def test_merge_gives_the_same_outputs_and_a_plain_model():
    model = LanguageModel(CFG, rngs=nnx.Rngs(0))
    fresh_struct = jax.tree.structure(nnx.to_pure_dict(nnx.state(model)))
    apply_lora(model, ("q", "k", "v", "o", "gate", "up", "down"), rank=3, alpha=5.0,
               layers=(1,), rngs=nnx.Rngs(1))
    assert isinstance(model.blocks[1].mlp.down, LoRALinear)
    assert type(model.blocks[0].attn.q) is Linear  # layer 0 untouched
    _randomize_lora(model)
    tok = _tokens(3, 9)
    adapted = np.asarray(model(tok).logits)
    assert merge_lora(model) == 7
    assert not nnx.to_flat_state(nnx.state(model, LoRAParam))
    assert type(model.blocks[1].attn.q) is Linear and type(model.blocks[1].mlp.up) is Linear
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(model))) == fresh_struct
    np.testing.assert_allclose(np.asarray(model(tok).logits), adapted, atol=2e-5, rtol=1e-5)
    assert merge_lora(model) == 0


def test_gradients_reach_only_the_adapters():
    model = LanguageModel(CFG, rngs=nnx.Rngs(0))
    apply_lora(model, rank=4, rngs=nnx.Rngs(1))
    _randomize_lora(model)
    graph, lora, rest = nnx.split(model, LoRAParam, ...)
    tok = _tokens()

    def loss(lora, rest):
        out = nnx.merge(graph, lora, rest)(tok).logits
        return jnp.mean(jax.nn.log_softmax(out)[..., 0])

    g_lora = jax.grad(loss)(lora, rest)
    flat = nnx.to_flat_state(g_lora)
    assert {p[-1] for p, _ in flat} == {"lora_a", "lora_b"}
    assert len(flat) == 2 * 4 * CFG.depth
    assert all(np.any(np.asarray(v[...])) for _, v in flat)
    # an optimizer step on the adapters leaves every base weight where it was
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(rest))
    b_before = np.asarray(model.blocks[0].attn.q.lora_b[...])
    tx = optax.sgd(0.1)
    upd, _ = tx.update(g_lora, tx.init(g_lora))
    lora2 = optax.apply_updates(lora, upd)
    nnx.update(model, lora2)
    after = nnx.to_pure_dict(nnx.split(model, LoRAParam, ...)[2])
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert not np.allclose(np.asarray(model.blocks[0].attn.q.lora_b[...]), b_before)


def test_bad_arguments_name_them():
    model = LanguageModel(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"targets=.*unknown \['w'\]"):
        apply_lora(model, ("q", "w"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"targets="):
        apply_lora(model, (), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rank=0: expected an int >= 1"):
        apply_lora(model, rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rank=2.5"):
        apply_lora(model, rank=2.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rank=100: expected <= min\(fan_in, fan_out\) = 24"):
        apply_lora(model, rank=100, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"alpha=0"):
        apply_lora(model, alpha=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layers=\(2,\)"):
        apply_lora(model, layers=(2,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected a LanguageModel"):
        apply_lora(Linear(4, 4, axes=(None, None), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    apply_lora(model, "q,v", rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"blocks.0.attn.q already has LoRA"):
        apply_lora(model, ("q",), rank=2, rngs=nnx.Rngs(0))
