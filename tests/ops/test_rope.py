"""RoPE, M-RoPE and 2D RoPE against Hugging Face transformers (torch CPU) and numpy."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm.ops import rope

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, Qwen2VLConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf_qwen2vl

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    },
}


def _llama_config(head_dim, theta, scaling):
    params = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
    return LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4 * 64 if scaling else 64,
        rope_parameters=params,
    )


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inv_freq_and_apply_rope_match_hf(name):
    scaling, theta, h = SCALINGS[name], 50000.0, 32
    cfg = _llama_config(h, theta, scaling)
    if scaling is not None:
        hf_inv, hf_af = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
        np.testing.assert_allclose(rope.rope_inv_freq(h, theta, scaling), hf_inv.numpy(), rtol=1e-6)
        assert rope.rope_attention_factor(scaling, theta) == pytest.approx(hf_af)
    rng = np.random.default_rng(0)
    b, t, n = 2, 11, 3
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, t, n, h)).astype(np.float32)
    pos = rng.integers(0, 700, size=(b, t))
    emb = modeling_llama.LlamaRotaryEmbedding(cfg)
    cos, sin = emb(torch.from_numpy(q), torch.from_numpy(pos))
    hq, hk = modeling_llama.apply_rotary_pos_emb(
        torch.from_numpy(q), torch.from_numpy(k), cos, sin, unsqueeze_dim=2
    )
    mq = rope.apply_rope(jnp.asarray(q), jnp.asarray(pos), theta=theta, scaling=scaling)
    mk = rope.apply_rope(jnp.asarray(k), jnp.asarray(pos), theta=theta, scaling=scaling)
    np.testing.assert_allclose(np.asarray(mq), hq.numpy(), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(mk), hk.numpy(), atol=2e-4, rtol=1e-4)


def test_relative_position_property():
    rng = np.random.default_rng(1)
    h = 16
    q = jnp.asarray(rng.standard_normal((1, 1, 1, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, h)), jnp.float32)

    def score(m, n):
        rq = rope.apply_rope(q, jnp.array([[m]]), theta=100.0)
        rk = rope.apply_rope(k, jnp.array([[n]]), theta=100.0)
        return float(jnp.sum(rq * rk))

    for delta in (0, 3, 17):
        ref = score(delta, 0)
        for base in (5, 40, 333):
            assert score(base + delta, base) == pytest.approx(ref, abs=1e-4)
    # and it does depend on the difference
    assert abs(score(3, 0) - score(4, 0)) > 1e-3


def test_dtype_preserved_and_jittable():
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    pos = jnp.arange(4)[None]
    y = jax.jit(functools.partial(rope.apply_rope, theta=1e4))(x, pos)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(rope.apply_rope(x.astype(jnp.float32), pos), np.float32),
        atol=2e-2,
    )


def _qwen2vl_cos_sin(theta, sections, head_dim, positions):
    cfg = Qwen2VLConfig(
        text_config={
            "hidden_size": head_dim * 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": theta,
                "mrope_section": list(sections),
            },
        }
    )
    emb = hf_qwen2vl.Qwen2VLRotaryEmbedding(cfg.text_config)
    return emb(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))


def test_mrope_matches_hf_qwen2vl():
    rng = np.random.default_rng(2)
    b, t, n, h = 2, 9, 2, 32
    sections = (4, 6, 6)
    x = rng.standard_normal((b, t, n, h)).astype(np.float32)
    pos = rng.integers(0, 50, size=(3, b, t))
    cos, sin = _qwen2vl_cos_sin(1e6, sections, h, pos)
    xt = torch.from_numpy(x)
    ref, _ = hf_qwen2vl.apply_rotary_pos_emb(xt, xt, cos, sin, unsqueeze_dim=2)
    out = rope.apply_mrope(jnp.asarray(x), jnp.asarray(pos), sections=sections, theta=1e6)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=2e-5, rtol=1e-5)


def test_mrope_reduces_to_rope_when_axes_agree():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 7, 2, 16)), jnp.float32)
    p = jnp.asarray(rng.integers(0, 99, size=(2, 7)))
    out = rope.apply_mrope(x, jnp.stack([p, p, p]), sections=(2, 3, 3), theta=1e4)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(rope.apply_rope(x, p, theta=1e4)), atol=1e-6
    )


def _hf_rope_index(input_types, grid):
    """Hugging Face Qwen2-VL get_rope_index on a stand-in ``self`` (spatial merge 1)."""
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=1))
    )
    fake.get_vision_position_ids = functools.partial(
        hf_qwen2vl.Qwen2VLModel.get_vision_position_ids, fake
    )
    tt = torch.from_numpy(np.asarray(input_types))
    n_img = int(
        (np.diff(np.concatenate([np.zeros((tt.shape[0], 1)), input_types], 1), axis=1) == 1).sum()
    )
    grids = torch.tensor([[1, *grid]] * n_img)
    pos, _ = hf_qwen2vl.Qwen2VLModel.get_rope_index(fake, tt, tt, image_grid_thw=grids)
    return pos.numpy()


def test_mrope_positions_match_hf_get_rope_index():
    grid = (2, 3)
    k = 6
    rows = [
        [0] * 3 + [1] * k + [0] * 4,
        [0] * 1 + [1] * k + [0] * 6,
        [1] * k + [0] * 7,
    ]
    width = max(len(r) for r in rows)
    rows = [r + [0] * (width - len(r)) for r in rows]
    types_ = np.array(rows, np.int64)
    pos, nxt = rope.mrope_positions(jnp.asarray(types_), grid)
    ref = _hf_rope_index(types_, grid)
    np.testing.assert_array_equal(np.asarray(pos), ref)
    np.testing.assert_array_equal(np.asarray(nxt), ref.max(axis=(0, 2)) + 1)


def test_mrope_positions_two_images_and_lengths():
    grid = (3, 2)
    k = 6
    row = [0] * 2 + [1] * k + [0] * 3 + [1] * k + [0] * 2
    types_ = np.array([row], np.int64)
    pos, _ = jax.jit(rope.mrope_positions, static_argnums=1)(jnp.asarray(types_), grid)
    np.testing.assert_array_equal(np.asarray(pos), _hf_rope_index(types_, grid))
    # text after the first image starts at 2 + max(3, 2) = 5
    assert int(pos[0, 0, 2 + k]) == 5
    _, nxt_len = rope.mrope_positions(jnp.asarray(types_), grid, lengths=jnp.array([4]))
    # first 4 tokens: text 0, 1; image at s=2, tokens (row 0, col 0..1) -> ids up to (2, 2, 3)
    assert int(nxt_len[0]) == 4


def _np_rope_2d(x, pos, theta):
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h // 2, 2) / (h // 2))
    ang = np.concatenate([pos[..., :1] * inv, pos[..., 1:] * inv], -1)
    ang = np.concatenate([ang, ang], -1)[:, :, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    rot = np.concatenate([-x2, x1], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def test_rope_2d_matches_numpy_and_hf_vision_rope():
    rng = np.random.default_rng(4)
    grid = (3, 4)
    b, n, h = 2, 2, 16
    x = rng.standard_normal((b, 12, n, h)).astype(np.float32)
    pos = np.asarray(rope.rope_2d_positions(grid, batch=b))
    out = np.asarray(rope.apply_rope_2d(jnp.asarray(x), jnp.asarray(pos), theta=100.0))
    np.testing.assert_allclose(out, _np_rope_2d(x.astype(np.float64), pos, 100.0), atol=1e-5)
    vcfg = Qwen2VLConfig(vision_config={"embed_dim": n * h, "num_heads": n}).vision_config
    vcfg.rope_parameters = {"rope_type": "axial", "rope_theta": 100.0}
    emb = hf_qwen2vl.Qwen2VLVisionRotaryEmbedding(vcfg)
    cos, sin = emb(torch.zeros(1), torch.from_numpy(pos[0].copy()))  # [N, 2] (row, col)
    xt = torch.from_numpy(x[0])
    ref, _ = hf_qwen2vl.apply_rotary_pos_emb_vision(xt, xt, cos, sin)
    np.testing.assert_allclose(out[0], ref.numpy(), atol=1e-5)


def test_rope_2d_relative_in_each_axis():
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def score(pq, pk):
        rq = rope.apply_rope_2d(q, jnp.array([[pq]]), theta=100.0)
        rk = rope.apply_rope_2d(k, jnp.array([[pk]]), theta=100.0)
        return float(jnp.sum(rq * rk))

    assert score((5, 7), (2, 3)) == pytest.approx(score((13, 9), (10, 5)), abs=1e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rope.apply_rope(jnp.ones((2, 3, 4)), jnp.zeros((2, 3), int)), "x shape"),
        (lambda: rope.apply_rope(jnp.ones((2, 3, 1, 5)), jnp.zeros((2, 3), int)), "head_dim"),
        (
            lambda: rope.apply_rope(jnp.ones((2, 3, 1, 4)), jnp.zeros((2, 4), int)),
            "positions shape",
        ),
        (
            lambda: rope.apply_mrope(
                jnp.ones((1, 3, 1, 8)), jnp.zeros((3, 1, 3), int), sections=(1, 1, 1)
            ),
            "sections",
        ),
        (
            lambda: rope.apply_mrope(
                jnp.ones((1, 3, 1, 8)), jnp.zeros((3, 1, 3), int), sections=(2, 2)
            ),
            "sections",
        ),
        (
            lambda: rope.apply_mrope(
                jnp.ones((1, 3, 1, 8)), jnp.zeros((1, 3), int), sections=(2, 1, 1)
            ),
            "positions shape",
        ),
        (
            lambda: rope.apply_rope_2d(jnp.ones((1, 3, 1, 6)), jnp.zeros((1, 3, 2), int)),
            "multiple|divisible",
        ),
        (
            lambda: rope.apply_rope_2d(jnp.ones((1, 3, 1, 8)), jnp.zeros((1, 3), int)),
            "positions shape",
        ),
        (lambda: rope.rope_inv_freq(8, scaling={"rope_type": "ntk"}), "rope_type"),
        (lambda: rope.rope_inv_freq(8, scaling={"rope_type": "linear"}), "factor"),
        (
            lambda: rope.rope_inv_freq(8, scaling={"rope_type": "linear", "factor": 2, "bogus": 1}),
            "bogus",
        ),
        (lambda: rope.rope_inv_freq(8, theta=0.5), "theta"),
        (lambda: rope.mrope_positions(jnp.array([[0, 1, 1, 0]]), (2, 2)), "multiple"),
        (lambda: rope.mrope_positions(jnp.array([[0, 1]]), (0, 2)), "grid"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
