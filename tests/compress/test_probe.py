"""The attention probe equals the corresponding rows of the full softmax map (numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ._in_llm_helpers import np_block_probs
from flax import nnx

from efficient_mllm.compress.probe import attention_probe, block_probe
from efficient_mllm.nn.language import LanguageConfig, LanguageModel
from efficient_mllm.ops import masks


def _np_full(q, k, lengths, window=None):
    """Full causal (+ padding, + sliding window) softmax of q [B,T,N,H] vs k [B,T,Nkv,H]."""
    b, t, nq, h = q.shape
    k = np.repeat(k, nq // k.shape[2], axis=2)
    logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
    ar = np.arange(t)
    allow = (ar[None, :] <= ar[:, None])[None, None] & (ar < lengths[:, None])[:, None, None, :]
    if window is not None:
        allow = allow & (ar[:, None] - ar[None, :] <= window)[None, None]
    logits = np.where(allow, logits, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows may see no key (unused below)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)  # [B, N, T, T]


def test_attention_probe_matches_full_softmax_rows():
    rng = np.random.default_rng(0)
    b, t, nq, nkv, h = 2, 9, 4, 2, 8
    q_all = rng.normal(size=(b, t, nq, h)).astype(np.float32)
    k = rng.normal(size=(b, t, nkv, h)).astype(np.float32)
    lengths = np.array([9, 6])
    full = _np_full(q_all, k, lengths)
    rows = np.array([[2, 5, 8], [0, 3, 5]])
    valid = np.array([[True, True, True], [True, False, True]])
    keys = np.array([[1, 2, 3, 4], [0, 1, 4, 5]])
    q = np.take_along_axis(q_all, rows[:, :, None, None], axis=1)
    kv_valid = np.arange(t)[None] < lengths[:, None]
    probe = jax.jit(attention_probe, static_argnames=("per_head",))
    out = probe(q, k, q_index=rows, q_valid=valid, kv_valid=kv_valid, key_index=keys, per_head=True)
    ref = np.stack([full[i][:, rows[i]][:, :, keys[i]] for i in range(b)])  # [B, N, Q, K]
    ref = ref * valid[:, None, :, None]
    np.testing.assert_allclose(out.weights, ref, atol=1e-6)
    np.testing.assert_allclose(out.colsum, ref.sum(2), atol=1e-6)
    mean = probe(q, k, q_index=rows, q_valid=valid, kv_valid=kv_valid, key_index=keys)
    np.testing.assert_allclose(mean.weights, ref.mean(1), atol=1e-6)
    np.testing.assert_allclose(mean.mean, ref.mean(1).sum(1) / valid.sum(1)[:, None], atol=1e-6)
    assert mean.num_queries.tolist() == [3, 2]
    # All keys (no key_index), and an extra mask spec evaluated at the gathered rows.
    spec = masks.sliding_window(2)
    win = probe(q, k, q_index=rows, q_valid=valid, kv_valid=kv_valid, mask=spec)
    full_w = _np_full(q_all, k, lengths, window=2).mean(1)
    ref_w = np.stack([full_w[i][rows[i]] for i in range(b)]) * valid[:, :, None]
    np.testing.assert_allclose(win.weights, ref_w, atol=1e-6)


def test_block_probe_matches_numpy_block_attention_gqa_and_padding():
    cfg = LanguageConfig(vocab_size=17, width=32, depth=1, heads=4, kv_heads=2, mlp_dim=32)
    lm = LanguageModel(cfg, rngs=nnx.Rngs(3))
    block = lm.blocks[0]
    b, t = 2, 10
    hidden = jax.random.normal(jax.random.key(1), (b, t, 32))
    pos = jnp.array([np.arange(t), np.arange(t) + 5], jnp.int32)  # offset ids: RoPE matters
    lengths = np.array([10, 7])
    rows = jnp.array([[9, 4], [6, 2]], jnp.int32)
    keys = jnp.array([[0, 1, 2], [3, 4, 5]], jnp.int32)
    kv_valid = jnp.arange(t)[None] < jnp.asarray(lengths)[:, None]
    out = block_probe(block, hidden, positions=pos, q_index=rows, kv_valid=kv_valid, key_index=keys)
    full = np_block_probs(block, hidden, pos, lengths).mean(1)  # [B, T, T]
    r, kk = np.asarray(rows), np.asarray(keys)
    ref = np.stack([full[i][r[i]][:, kk[i]] for i in range(b)])
    np.testing.assert_allclose(out.weights, ref, atol=2e-5)
    np.testing.assert_allclose(out.colsum, ref.sum(1), atol=2e-5)


def test_probe_rejects_bad_shapes():
    q = jnp.zeros((1, 2, 4, 8))
    k = jnp.zeros((1, 5, 3, 8))
    with pytest.raises(ValueError, match="multiple"):
        attention_probe(q, k, q_index=jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="q_index"):
        attention_probe(q, jnp.zeros((1, 5, 2, 8)), q_index=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="kv_valid"):
        attention_probe(
            q,
            jnp.zeros((1, 5, 2, 8)),
            q_index=jnp.zeros((1, 2), jnp.int32),
            kv_valid=jnp.ones((1, 4), bool),
        )
