"""Shared fixtures for the compressor tests: random compressor inputs, a contract checker and a
tiny MLLM run end to end (forward + generate) with a given compressor spec.

Helpers are exposed as fixtures (``compress_inputs``, ``check_contract``, ``run_mllm``) so any
test module in this folder can use them without importing this file.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_mllm.compress  # noqa: F401  (registers the compressors)
from efficient_mllm.kvcache.generate import generate
from efficient_mllm.nn.mllm import MLLM, MLLMConfig

VOCAB, IMG_ID = 31, 3
LANG = {"vocab_size": VOCAB, "width": 32, "depth": 2, "heads": 4, "kv_heads": 2, "mlp_dim": 48}
# 32 / 8 -> a 4 x 4 grid of 16 image tokens.
VISION = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 32}
GRID = (4, 4)


def make_inputs(seed: int = 0, b: int = 4, grid=GRID, d: int = 32, dv: int = 8, layers: int = 3):
    """Random compressor inputs for ``b`` rows on a ``grid``: a dict with ``tokens [b, N, d]``,
    ``features [b, N, dv]``, ``cls_attention [b, N]`` (positive, sums to 0.9 per row),
    ``layer_cls_attention [b, layers, N]``, ``text_embeds [b, 6, d]``, ``text_lengths [b]``
    (with padding), ``placeholder [b]`` and ``cls [b, dv]``, all numpy."""
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]

    def attn(*shape):
        a = rng.gamma(0.5, size=(*shape, n)).astype(np.float32)
        return a / a.sum(axis=-1, keepdims=True) * 0.9

    return {
        "tokens": rng.normal(size=(b, n, d)).astype(np.float32),
        "features": rng.normal(size=(b, n, dv)).astype(np.float32),
        "cls_attention": attn(b),
        "layer_cls_attention": attn(b, layers),
        "text_embeds": rng.normal(size=(b, 6, d)).astype(np.float32),
        "text_lengths": rng.integers(2, 7, size=(b,)).astype(np.int32),
        "placeholder": rng.integers(0, 2, size=(b,)).astype(np.int32),
        "cls": rng.normal(size=(b, dv)).astype(np.float32),
    }


@pytest.fixture
def compress_inputs():
    return make_inputs


def accepted(comp) -> set[str] | None:
    """Keyword names ``comp`` accepts (None: any, it takes ``**kwargs``), as MLLM decides."""
    target = comp.__call__ if isinstance(comp, nnx.Module) else comp
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def jit_compressor(comp, grid=GRID, names=None):
    """``f(inputs_dict) -> Compressed``: ``comp`` jitted, called with ``tokens`` positionally,
    the static ``grid`` and the entries of ``inputs`` it accepts (and listed in ``names``)."""
    ok = accepted(comp)
    static = {} if grid is None or (ok is not None and "grid" not in ok) else {"grid": grid}

    @jax.jit
    def f(tokens, kw):
        return comp(tokens, **static, **kw)

    def call(inputs):
        kw = {k: jnp.asarray(v) for k, v in inputs.items() if k != "tokens"}
        kw = {
            k: v for k, v in kw.items() if (ok is None or k in ok) and (names is None or k in names)
        }
        return f(jnp.asarray(inputs["tokens"]), kw)

    return call


def _row(inputs, b):
    return {k: v[b : b + 1] for k, v in inputs.items()}


def contract(comp, inputs, k, *, grid=GRID, names=None, row_invariant=(0, 1, 2, 3)):
    """Checks a compressor's output against the contract and returns it (numpy dict).

    Shapes (``tokens [B, k, D]``, int32 ``keep_idx [B, k]`` in range, strictly ascending among
    valid slots, bool ``valid``), finiteness, jit, and batch invariance: each row in
    ``row_invariant`` compressed alone gives the same indices and tokens as in the batch.
    """
    f = jit_compressor(comp, grid, names)
    out = f(inputs)
    tokens = np.asarray(inputs["tokens"])
    b, n, d = tokens.shape
    assert out.tokens.shape == (b, k, d), out.tokens.shape
    assert out.tokens.dtype == tokens.dtype
    assert out.keep_idx.shape == (b, k) and out.keep_idx.dtype == jnp.int32
    assert out.valid.shape == (b, k) and out.valid.dtype == jnp.bool_
    idx, valid = np.asarray(out.keep_idx), np.asarray(out.valid)
    assert ((idx >= 0) & (idx < n)).all()
    for r in range(b):
        v = idx[r][valid[r]]
        assert (np.diff(v) > 0).all(), f"keep_idx not ascending/unique in row {r}: {idx[r]}"
        # Valid slots come first.
        assert not (~valid[r][:-1] & valid[r][1:]).any()
    assert np.isfinite(np.asarray(out.tokens)).all()
    assert int(np.asarray(out.stats["num_kept"]).sum()) == int(valid.sum())
    for r in row_invariant:
        one = f(_row(inputs, r))
        np.testing.assert_array_equal(np.asarray(one.keep_idx)[0], idx[r])
        np.testing.assert_array_equal(np.asarray(one.valid)[0], valid[r])
        np.testing.assert_allclose(
            np.asarray(one.tokens)[0], np.asarray(out.tokens)[r], rtol=1e-5, atol=1e-5
        )
    return {
        "tokens": np.asarray(out.tokens),
        "keep_idx": idx,
        "valid": valid,
        "position_ids": out.position_ids,
        "stats": out.stats,
    }


@pytest.fixture
def check_contract():
    return contract


@functools.cache
def build_mllm(
    compressor, *, use_cls=True, vision_depth=1, rope_type="rope", pixel_shuffle=1, seed=0
):
    """The tiny MLLM (ViT 32/8 -> 4x4 tokens, width 32; LM width 32, depth 2), cached."""
    lang = dict(LANG)
    if rope_type == "mrope":
        lang.update(rope_type="mrope", mrope_sections=(2, 1, 1))
    vision = {**VISION, "use_cls": use_cls, "depth": vision_depth}
    cfg = MLLMConfig(
        language=lang,
        vision=vision,
        image_token_id=IMG_ID,
        compressor=compressor,
        pixel_shuffle=pixel_shuffle,
    )
    return MLLM(cfg, rngs=nnx.Rngs(seed))


def mllm_batch():
    """Three rows with different placeholder positions and right padding, and images."""
    tok = np.array(
        [[1, IMG_ID, 5, 6, 7, 8], [1, 2, 4, IMG_ID, 9, 0], [IMG_ID, 4, 0, 0, 0, 0]], np.int32
    )
    lengths = np.array([6, 5, 2], np.int32)
    images = np.asarray(jax.random.normal(jax.random.key(0), (3, 32, 32, 3), jnp.float32))
    return tok, lengths, images


@nnx.jit
def _forward(model, tok, images, lengths):
    return model(tok, images, lengths=lengths)


def run_end_to_end(compressor, k=None, *, max_new_tokens=2, **model_kw):
    """Builds the tiny MLLM with ``compressor``, runs a jitted forward and ``generate`` on a
    padded batch of 3 and checks: finite logits ``[B, T, V]``, ``k`` image slots (when given),
    image tokens at the placeholder + their original ids (1D RoPE: ``p + keep_idx``), and
    ``generate`` output shapes. Returns ``(model, forward output, generate output)``."""
    model = build_mllm(compressor, **model_kw)
    tok, lengths, images = mllm_batch()
    out = _forward(model, tok, images, lengths)
    b, t = tok.shape
    assert out.logits.shape == (b, t, VOCAB)
    valid_text = np.arange(t)[None] < lengths[:, None]
    assert np.isfinite(np.asarray(out.logits)[valid_text]).all()
    keep_idx = np.asarray(out.aux["keep_idx"])
    image_valid = np.asarray(out.aux["image_valid"])
    if k is not None:
        assert keep_idx.shape == (b, k), keep_idx.shape
    pos = np.asarray(out.aux["positions"])
    types = np.asarray(out.aux["token_types"])
    for r in range(b):
        p = int(np.nonzero(tok[r] == IMG_ID)[0][0])
        nv = int(image_valid[r].sum())
        assert int(out.aux["num_image_tokens"][r]) == nv
        assert (types[r, p : p + nv] == 1).all()  # ops.masks.IMAGE
        if pos.ndim == 2:
            np.testing.assert_array_equal(pos[r, p : p + nv], p + keep_idx[r, :nv])
    gen = generate(model, tok, images=images, lengths=lengths, max_new_tokens=max_new_tokens)
    assert gen.tokens.shape == (b, max_new_tokens)
    assert ((np.asarray(gen.tokens) >= 0) & (np.asarray(gen.tokens) < VOCAB)).all()
    return model, out, gen


@pytest.fixture
def run_mllm():
    return run_end_to_end
