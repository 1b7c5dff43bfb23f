"""Shared pieces of the in-LLM compressor tests: a tiny MLLM, prompts, a greedy reference by
repeated full forward passes, and an independent numpy implementation of a decoder block's
softmax attention (RMSNorm -> q/k projections -> rotate-half RoPE -> causal softmax)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm.nn.mllm import MLLM, MLLMConfig

VOCAB, IMG_ID = 29, 3
LANG = {"vocab_size": VOCAB, "width": 32, "depth": 3, "heads": 4, "kv_heads": 2, "mlp_dim": 48}
# 4 x 4 = 16 image tokens
VISION = {"image_size": 8, "patch_size": 2, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
N_IMG = 16


def make_model(compressor, seed=0, **lang):
    cfg = MLLMConfig(
        language={**LANG, **lang}, vision=VISION, image_token_id=IMG_ID, compressor=compressor
    )
    return MLLM(cfg, rngs=nnx.Rngs(seed))


@functools.cache
def model_for(compressor):
    """One shared model per compressor spec (so its jitted forward compiles once per session);
    tests must not modify it."""
    return make_model(compressor)


def prompts():
    """Four rows, different placeholder positions and prompt lengths (right padding)."""
    tok = np.array(
        [
            [1, IMG_ID, 5, 6, 7, 8, 9],
            [1, 2, IMG_ID, 9, 4, 0, 0],
            [IMG_ID, 4, 11, 0, 0, 0, 0],
            [2, 5, IMG_ID, 7, 0, 0, 0],
        ],
        np.int32,
    )
    return tok, np.array([7, 5, 3, 4], np.int32)


def images(b, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, 8, 8, 3), jnp.float32)


def capture_hook(layers):
    """A user layer hook recording (hidden, positions, lengths) entering the given layers
    (before the in-LLM compressor's own hook at that layer)."""

    def hook(i, h, state):
        if i not in layers:
            return h, state
        extra = {**state.extra, f"h{i}": h, f"pos{i}": state.positions, f"len{i}": state.lengths}
        return h, state.replace(extra=extra)

    return hook


# The one jitted forward of these tests: prompt_lengths rate the image tokens, and every
# layer's input is recorded in ``aux["hook_extra"]`` (h<i>, pos<i>, len<i>).
FORWARD = nnx.jit(
    lambda m, x, im, n, p: m(
        x, im, lengths=n, prompt_lengths=p, layer_hook=capture_hook(tuple(range(LANG["depth"])))
    )
)


def greedy_reference(model, tokens, imgs, lengths, steps, pad_id=0):
    """Greedy continuation by repeated full forward passes (no cache) at a fixed padded shape;
    the prompt (``prompt_lengths``) rates the image tokens, as at prefill."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths).copy()
    prompt = lengths.copy()
    b, t = tokens.shape
    seq = np.full((b, t + steps), pad_id, np.int32)
    seq[:, :t] = tokens
    out = np.zeros((b, steps), np.int32)
    for i in range(steps):
        res = FORWARD(model, jnp.asarray(seq), imgs, jnp.asarray(lengths), jnp.asarray(prompt))
        logits = np.asarray(res.logits)
        nxt = logits[np.arange(b), lengths - 1].argmax(-1)
        out[:, i] = nxt
        seq[np.arange(b), lengths] = nxt
        lengths += 1
    return out


# -- numpy reference of a block's attention ----------------------------------------------------


def np_rope(x, pos, theta=10000.0):
    """Rotate-half RoPE on ``x [B, T, N, H]`` at ``pos [B, T]``."""
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    ang = pos[..., None].astype(np.float64) * inv
    cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None, :]
    rot = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1)
    return x * cos + rot * sin


def np_block_probs(block, hidden, positions, lengths):
    """Full causal + padding softmax of a ``TransformerBlock`` on ``hidden [B, T, D]``:
    float64 ``[B, heads, T, T]``."""
    x = np.asarray(hidden, np.float64)
    scale = np.asarray(block.attn_norm.scale[...], np.float64)
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + block.attn_norm.eps) * scale
    wq = np.asarray(block.attn.q.kernel[...], np.float64)
    wk = np.asarray(block.attn.k.kernel[...], np.float64)
    q = np.einsum("btd,dnh->btnh", x, wq)
    k = np.einsum("btd,dnh->btnh", x, wk)
    pos = np.asarray(positions)
    q, k = np_rope(q, pos), np_rope(k, pos)
    nq, nkv, hd = q.shape[2], k.shape[2], q.shape[3]
    k = np.repeat(k, nq // nkv, axis=2)
    logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(hd)
    b, t = x.shape[:2]
    ar = np.arange(t)
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    allow = (ar[None, :] <= ar[:, None])[None, None] & (
        ar[None, None, None, :] < lengths[:, None, None, None]
    )
    logits = np.where(allow, logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


def forward_capture(model, tokens, imgs, lengths):
    """:data:`FORWARD` on a prompt batch (``prompt_lengths = lengths``)."""
    n = jnp.asarray(lengths)
    return FORWARD(model, jnp.asarray(tokens), imgs, n, n)


def image_span(tokens, lengths, n_img=N_IMG):
    """Per row: placeholder index ``p`` (image tokens at ``p .. p+n_img-1`` of the spliced
    sequence) and the spliced length."""
    p = np.argmax(np.asarray(tokens) == IMG_ID, axis=1)
    return p, np.asarray(lengths) - 1 + n_img


def np_topk_sorted(scores, k):
    """Indices of the ``k`` largest scores (ties: lower index first), ascending."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:k])


def np_block_keys(block, hidden, positions):
    """Rotated keys of a ``TransformerBlock`` on ``hidden [B, T, D]``: ``[B, T, Nkv, H]``."""
    x = np.asarray(hidden, np.float64)
    scale = np.asarray(block.attn_norm.scale[...], np.float64)
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + block.attn_norm.eps) * scale
    k = np.einsum("btd,dnh->btnh", x, np.asarray(block.attn.k.kernel[...], np.float64))
    return np_rope(k, np.asarray(positions))
