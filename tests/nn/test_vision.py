"""The ViT encoder: shapes, jit, batch invariance, the CLS-attention probe, 2D RoPE, grads, bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_mllm.nn.config import VisionConfig
from efficient_mllm.nn.vision import VisionEncoder, VisionOutput, patchify

BASE = VisionConfig(image_size=(8, 12), patch_size=4, width=16, depth=2, heads=2, mlp_dim=32)
IMAGES = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 12, 3)), jnp.float32)


@pytest.fixture(scope="module")
def encoders():
    return {
        "cls_learned": VisionEncoder(BASE, rngs=nnx.Rngs(0)),
        "rope2d_nocls": VisionEncoder(
            dataclasses.replace(BASE, use_cls=False, pos_embedding="rope2d"), rngs=nnx.Rngs(1)
        ),
    }


@nnx.jit
def _run(model, images):
    return model(images, return_cls_attention=True)


def test_shapes_and_jit(encoders):
    out = _run(encoders["cls_learned"], IMAGES)
    assert isinstance(out, VisionOutput) and out.grid == (2, 3)
    assert out.patches.shape == (3, 6, 16) and out.cls.shape == (3, 16)
    assert out.cls_attention.shape == (3, 6) and out.cls_attention.dtype == jnp.float32
    total = np.asarray(out.cls_attention).sum(-1)
    assert np.all(total > 0) and np.all(total < 1)  # the CLS->CLS share is left out
    plain = nnx.jit(lambda model, images: model(images))(encoders["cls_learned"], IMAGES)
    assert plain.cls_attention is None
    np.testing.assert_allclose(np.asarray(plain.patches), np.asarray(out.patches), atol=1e-5)
    out2 = _run(encoders["rope2d_nocls"], IMAGES)
    assert out2.cls is None and out2.patches.shape == (3, 6, 16)
    np.testing.assert_allclose(np.asarray(out2.cls_attention).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["cls_learned", "rope2d_nocls"])
def test_batch_invariance(encoders, name):
    full = _run(encoders[name], IMAGES)
    alone = _run(encoders[name], IMAGES[1:2])
    np.testing.assert_allclose(np.asarray(alone.patches[0]), np.asarray(full.patches[1]), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(alone.cls_attention[0]), np.asarray(full.cls_attention[1]), atol=1e-6
    )


def _np_probs(q, k):
    """Full softmax attention map [B, N, T, T] in float64 (no GQA in the ViT)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", ["cls_learned", "rope2d_nocls"])
def test_cls_attention_is_row_of_full_softmax(encoders, name):
    enc = encoders[name]

    @nnx.jit
    def last_layer_qk(model, images):
        x, positions, _ = model.embed(images)
        for block in list(model.blocks)[:-1]:
            x, _ = block(x, positions=positions)
        last = model.blocks[-1]
        return last.attn.qkv(last.attn_norm(x), positions=positions)[:2]

    q, k = last_layer_qk(enc, IMAGES)
    probe = np.asarray(_run(enc, IMAGES).cls_attention)
    if enc.cfg.use_cls:
        expected = _np_probs(q, k).mean(axis=1)[:, 0, 1:]  # CLS query row, patch keys
    else:
        q_bar = np.asarray(q, np.float64).mean(axis=1, keepdims=True)  # mean patch query
        expected = _np_probs(q_bar, k).mean(axis=1)[:, 0]
    np.testing.assert_allclose(probe, expected, atol=1e-5)


def test_rope2d_positions_reach_attention(encoders):
    """2D RoPE in the encoder is the numpy axial rotation of its q/k."""
    enc = encoders["rope2d_nocls"]

    @nnx.jit
    def first_layer_q(model, images):
        x, positions, _ = model.embed(images)
        blk = model.blocks[0]
        h = blk.attn_norm(x)
        return positions, blk.attn.q(h), blk.attn.qkv(h, positions=positions)[0]

    positions, q_raw, q_rot = first_layer_q(enc, IMAGES[:1])
    np.testing.assert_array_equal(
        np.asarray(positions[0]), [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    )
    q_raw = np.asarray(q_raw, np.float64)
    hd = q_raw.shape[-1]
    inv = 1.0 / 10000.0 ** (np.arange(0, hd // 2, 2) / (hd // 2))
    pos = np.asarray(positions, np.float64)
    ang = np.concatenate([pos[..., :1] * inv, pos[..., 1:] * inv], -1)
    ang = np.concatenate([ang, ang], -1)[:, :, None]
    rot = np.concatenate([-q_raw[..., hd // 2 :], q_raw[..., : hd // 2]], -1)
    np.testing.assert_allclose(
        np.asarray(q_rot), q_raw * np.cos(ang) + rot * np.sin(ang), atol=1e-5
    )
    # rope2d encoders accept other image sizes (no learned table)
    other = _run(enc, jnp.zeros((1, 12, 8, 3)))
    assert other.grid == (3, 2) and other.patches.shape == (1, 6, 16)


def test_gradients_reach_every_param(encoders):
    enc = encoders["cls_learned"]

    def loss(model):
        out = model(IMAGES[:2], return_cls_attention=True)
        return jnp.sum(out.patches**2) + jnp.sum(out.cls**2) + jnp.sum(out.cls_attention**2)

    grads = nnx.jit(nnx.grad(loss))(enc)
    flat = nnx.to_flat_state(nnx.state(grads, nnx.Param))
    assert len(flat) > 10
    for path, g in flat:
        assert float(jnp.abs(g.get_value()).sum()) > 0, path


def test_bf16_compute_and_axes():
    enc = VisionEncoder(
        dataclasses.replace(BASE, dtype="bfloat16", pos_embedding="rope2d"), rngs=nnx.Rngs(2)
    )
    out = _run(enc, IMAGES)
    assert out.patches.dtype == jnp.bfloat16 and out.cls_attention.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out.patches))) and bool(
        jnp.all(jnp.isfinite(out.cls_attention))
    )
    state = nnx.state(enc, nnx.Param)
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(state))
    specs = nnx.get_partition_spec(state)
    assert tuple(specs["patch"]["kernel"].get_value()) == ("patch", "vision_embed")
    assert tuple(specs["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()) == ("vision_embed", "mlp")


def test_patchify_matches_conv():
    """patchify + Linear equals a stride-p convolution with the converted kernel."""
    rng = np.random.default_rng(3)
    img = rng.standard_normal((1, 8, 12, 3)).astype(np.float32)
    conv = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)  # [D, C, p, p] (PyTorch layout)
    lin = conv.transpose(2, 3, 1, 0).reshape(4 * 4 * 3, 5)
    got = np.asarray(patchify(jnp.asarray(img), 4)) @ lin
    ref = jax.lax.conv_general_dilated(
        jnp.asarray(img),
        jnp.asarray(conv.transpose(2, 3, 1, 0)),
        (4, 4),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(got, np.asarray(ref).reshape(1, 6, 5), atol=1e-4)


def test_bad_images_raise(encoders):
    enc = encoders["cls_learned"]
    with pytest.raises(ValueError, match="divisible by patch_size"):
        enc(jnp.zeros((1, 10, 12, 3)))
    with pytest.raises(ValueError, match="learned position"):
        enc(jnp.zeros((1, 12, 12, 3)))
    with pytest.raises(ValueError, match="expected \\[B, H, W, 3\\]"):
        enc(jnp.zeros((1, 8, 12)))
    with pytest.raises(ValueError, match="VisionConfig"):
        VisionEncoder(BASE.to_dict(), rngs=nnx.Rngs(0))
