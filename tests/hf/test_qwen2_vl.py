"""Qwen2-VL / Qwen2.5-VL checkpoints against ``transformers`` (torch CPU, no downloads).

Tiny random models saved with ``save_pretrained`` and loaded with ``hf.load_pretrained``.
Configs: Qwen2-VL (LayerNorm / quick-GELU ViT, GQA 2:1, untied head), Qwen2.5-VL with window
attention (RMSNorm / SwiGLU ViT, windows of 3 merged tokens with partial edge windows, one
full-attention block, GQA 3:1, tied head, head_dim 12 in the ViT) and Qwen2.5-VL with an odd
patch size (3), MHA and two full-attention blocks. Inputs: three images of different grids, the
last with two frames (t = 2: per-frame attention segments, temporal position ids); one row with
one image, one row with two; right-padded rows.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_mllm.hf import get_family, load_pretrained
from efficient_mllm.kvcache.generate import generate
from efficient_mllm.nn.qwen2_vl import QwenVLImages, QwenVLModel
from efficient_mllm.ops import rope as rope_ops

from ._parity import BF16_TOL, FP32_TOL, check_export_roundtrip, hf_greedy, right_pad, save_hf

IMG, VSTART, VEND = 5, 7, 8
TOKENS = dict(image_token_id=IMG, video_token_id=6, vision_start_token_id=VSTART,
              vision_end_token_id=VEND)
CONFIGS = {
    "qwen2_vl_gqa2_untied": (
        "qwen2_vl",
        dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=2, mrope=[1, 1, 2]),
        dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2),
    ),
    "qwen2_5_vl_window_gqa3_tied": (
        "qwen2_5_vl",
        dict(vocab_size=77, hidden_size=48, intermediate_size=64, num_attention_heads=6,
             num_key_value_heads=2, mrope=[2, 1, 1], tie_word_embeddings=True),
        dict(depth=3, hidden_size=24, out_hidden_size=48, intermediate_size=40, num_heads=2,
             patch_size=2, window_size=12, fullatt_block_indexes=[1]),
    ),
    "qwen2_5_vl_patch3_mha": (
        "qwen2_5_vl",
        dict(vocab_size=90, hidden_size=40, intermediate_size=56, num_attention_heads=5,
             num_key_value_heads=5, mrope=[1, 2, 1]),
        dict(depth=3, hidden_size=16, out_hidden_size=40, intermediate_size=24, num_heads=1,
             patch_size=3, window_size=12, fullatt_block_indexes=[0, 2]),
    ),
}
GRIDS = ((1, 6, 10), (1, 4, 4), (2, 10, 6))  # (t, h, w) in patches; t = 2: two frames


def _hf_model(name: str, seed: int = 0):
    kind, text, vision = CONFIGS[name]
    text = dict(text)
    sections = text.pop("mrope")
    tie = text.pop("tie_word_embeddings", False)
    text.update(num_hidden_layers=2, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "mrope_section": sections,
                                 "rope_theta": 10000.0})
    vision = dict(vision, temporal_patch_size=2, spatial_merge_size=2, initializer_range=0.1)
    if kind == "qwen2_vl":
        cfg_cls, cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        cfg_cls = transformers.Qwen2_5_VLConfig
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    cfg = cfg_cls(text_config=text, vision_config=vision, tie_word_embeddings=tie, **TOKENS)
    return cls(cfg).eval(), cls


def _pixels(hf, grids=GRIDS, seed=0):
    v = hf.config.vision_config
    dim = 3 * v.temporal_patch_size * v.patch_size**2
    n = sum(t * h * w for t, h, w in grids)
    return torch.tensor(np.random.default_rng(seed).normal(size=(n, dim)), dtype=torch.float32)


def _rows(vocab: int, grids=GRIDS, seed=0):
    """Row 0: text, image 0, text; row 1: text, image 1, text, image 2, text (shorter text)."""
    rng = np.random.default_rng(seed)

    def text(n):
        return list(rng.integers(10, vocab, n))

    def image(g):
        return [VSTART] + [IMG] * (g[0] * g[1] * g[2] // 4) + [VEND]

    return [
        np.array(text(3) + image(grids[0]) + text(6)),
        np.array(text(1) + image(grids[1]) + text(2) + image(grids[2]) + text(2)),
    ]


def _hf_inputs(rows, pixels, grids):
    tokens, lengths = right_pad(rows)
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
    ids = torch.tensor(tokens.astype(np.int64))
    return dict(input_ids=ids, attention_mask=torch.tensor(mask), pixel_values=pixels,
                image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(ids == IMG).long() * torch.tensor(mask))


@nnx.jit(static_argnames=("grids",))
def _forward(model, tokens, lengths, pixels, grids):
    """(logits, merged image tokens, last ViT hidden states), one compilation per config."""
    images = QwenVLImages(pixels, grids)
    vis = model.visual(pixels, grids)
    return model(tokens, images, lengths=lengths).logits, vis.merged, vis.hidden


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    hf, cls = _hf_model(request.param)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param) / "hf")
    pre = load_pretrained(path)
    rows = _rows(pre.config.language.vocab_size)
    pixels = _pixels(hf)
    tokens, lengths = right_pad(rows)
    ours = _forward(pre.model, jnp.asarray(tokens), jnp.asarray(lengths),
                    jnp.asarray(pixels.numpy()), GRIDS)
    return request.param, hf, cls, pre, rows, pixels, [np.asarray(x) for x in ours]


def test_config_and_model(converted):
    name, hf, _, pre, *_ = converted
    assert isinstance(pre.model, QwenVLModel)
    lang, vis = pre.config.language, pre.config.vision
    assert lang.rope_type == "mrope" and lang.qkv_bias
    assert lang.tie_embeddings == hf.config.tie_word_embeddings
    assert (vis.window_size is not None) == name.startswith("qwen2_5")


def test_vision_tower_matches_fp32(converted):
    name, hf, _, pre, _, pixels, (_, merged, hidden) = converted
    with torch.no_grad():
        out = hf.model.visual(pixels, grid_thw=torch.tensor(GRIDS))
    np.testing.assert_allclose(merged, out.pooler_output.numpy(), rtol=0, atol=FP32_TOL)
    ref_hidden = out.last_hidden_state.numpy()
    if pre.config.vision.window_size is not None:  # HF keeps its window-permuted order
        from transformers.vision_utils import get_vision_window_index

        v = hf.config.vision_config
        index, _ = get_vision_window_index(torch.tensor(GRIDS), v.spatial_merge_size,
                                           v.window_size, v.patch_size)
        hidden = hidden.reshape(-1, 4, hidden.shape[-1])[index.numpy()].reshape(hidden.shape)
    np.testing.assert_allclose(hidden, ref_hidden, rtol=0, atol=FP32_TOL)


def test_image_text_logits_match_fp32(converted):
    name, hf, _, pre, rows, pixels, (logits, *_) = converted
    with torch.no_grad():
        ref = hf(**_hf_inputs(rows, pixels, GRIDS)).logits.numpy()
    for b, row in enumerate(rows):
        diff = np.abs(logits[b, : len(row)] - ref[b, : len(row)]).max()
        assert diff <= FP32_TOL, (name, b, diff)


def test_text_only_logits_match_fp32(converted):
    name, hf, _, pre, *_ = converted
    ids = np.random.default_rng(4).integers(10, pre.config.language.vocab_size, (1, 9))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(pre.model(jnp.asarray(ids, jnp.int32)).logits)
    assert np.abs(ours - ref).max() <= FP32_TOL


def test_positions_match_get_rope_index(converted):
    """``ops.rope.mrope_grid_positions`` equals HF ``get_rope_index`` (valid tokens) and its
    next position equals ``max + 1`` (HF's ``rope_deltas + length``)."""
    _, hf, _, pre, rows, pixels, _ = converted
    inputs = _hf_inputs(rows, pixels, GRIDS)
    ref, deltas = hf.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    tokens, lengths = right_pad(rows)
    ours, nxt = rope_ops.mrope_grid_positions(
        jnp.asarray(tokens) == IMG, pre.model.llm_grids(QwenVLImages(pixels.numpy(), GRIDS)),
        lengths=jnp.asarray(lengths),
    )
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(np.asarray(ours)[:, b, :n], ref.numpy()[:, b, :n])
    np.testing.assert_array_equal(np.asarray(nxt), deltas.numpy()[:, 0] + lengths)


def test_export_roundtrip(converted, tmp_path):
    name, hf, cls, pre, rows, pixels, _ = converted
    inputs = _hf_inputs(rows, pixels, GRIDS)
    check_export_roundtrip(pre, cls, hf, tmp_path / "export", lambda m: m(**inputs).logits)


def test_legacy_checkpoint_names(converted, tmp_path):
    """Hub checkpoints written before transformers 4.52 name tensors ``visual.*`` and
    ``model.layers.*``; they load to the same parameters."""
    from safetensors.numpy import save_file

    name, hf, _, pre, *_ = converted
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    legacy = {}
    for k, v in sd.items():
        k = k.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        legacy[k] = v
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    again = load_pretrained(tmp_path, hf_config=pre.hf_config)
    a, b = nnx.state(again.model, nnx.Param), nnx.state(pre.model, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["qwen2_vl_gqa2_untied", "qwen2_5_vl_window_gqa3_tied"])
def test_greedy_generation_matches(name, tmp_path):
    """20 greedy tokens for 2 prompts of different lengths (HF: left padding and
    ``mm_token_type_ids``; ours: right padding) are identical."""
    hf, _ = _hf_model(name, seed=1)
    pre = load_pretrained(save_hf(hf, tmp_path / "hf"))
    grids = ((1, 6, 10), (1, 4, 6))
    rng = np.random.default_rng(5)
    vocab = pre.config.language.vocab_size
    k0, k1 = 15, 6
    rows = [
        np.array([11, VSTART] + [IMG] * k0 + [VEND] + list(rng.integers(10, vocab, 5))),
        np.array(list(rng.integers(10, vocab, 2)) + [VSTART] + [IMG] * k1 + [VEND, 12]),
    ]
    pixels = _pixels(hf, grids, seed=6)
    width = max(len(r) for r in rows)
    mm = torch.tensor(np.stack([np.pad(r, (width - len(r), 0)) == IMG for r in rows]).astype(int))
    ref = hf_greedy(hf, rows, 20, pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                    mm_token_type_ids=mm)
    tokens, lengths = right_pad(rows)
    out = generate(pre.model, jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                   images=QwenVLImages(jnp.asarray(pixels.numpy()), grids), max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_bf16_logits_within_tolerance(tmp_path):
    """bfloat16 parameters and compute on both sides (ViT included): logits of O(1) agree to
    BF16_TOL (measured about 0.03; the implementations round in different places)."""
    hf, _ = _hf_model("qwen2_5_vl_window_gqa3_tied")
    pre = load_pretrained(save_hf(hf.to(torch.bfloat16), tmp_path / "hf"))
    assert pre.config.vision.param_dtype == "bfloat16" and pre.config.language.dtype == "bfloat16"
    rows = _rows(pre.config.language.vocab_size)
    pixels = _pixels(hf)
    with torch.no_grad():
        ref = hf(**_hf_inputs(rows, pixels.bfloat16(), GRIDS)).logits.float().numpy()
    tokens, lengths = right_pad(rows)
    logits = np.asarray(_forward(pre.model, jnp.asarray(tokens), jnp.asarray(lengths),
                                 jnp.asarray(pixels.numpy()), GRIDS)[0])
    for b, row in enumerate(rows):
        assert np.abs(logits[b, : len(row)] - ref[b, : len(row)]).max() <= BF16_TOL


def test_bad_inputs_raise(converted):
    _, hf, _, pre, rows, pixels, _ = converted
    tokens, lengths = right_pad(rows)
    images = QwenVLImages(jnp.asarray(pixels.numpy()), GRIDS)
    fewer = tokens.copy()
    fewer[0, list(fewer[0]).index(IMG)] = 10
    with pytest.raises(ValueError, match="image tokens"):
        pre.model(jnp.asarray(fewer), images, lengths=jnp.asarray(lengths))
    with pytest.raises(ValueError, match="image tokens"):
        pre.model(jnp.asarray(tokens), None, lengths=jnp.asarray(lengths))
    with pytest.raises(ValueError, match="patches shape"):
        pre.model.visual(jnp.asarray(pixels.numpy())[:-1], GRIDS)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        pre.model.visual(jnp.asarray(pixels.numpy()), ((1, 5, 12), (1, 4, 4), (1, 10, 6)))


def test_unsupported_config_raises():
    family = get_family("qwen2_vl")
    hf, _ = _hf_model("qwen2_vl_gqa2_untied")
    cfg = hf.config.to_dict()
    cfg["text_config"]["use_sliding_window"] = True
    with pytest.raises(ValueError, match="use_sliding_window"):
        family.config_from_hf(cfg)
    cfg = hf.config.to_dict()
    cfg["vision_config"]["hidden_act"] = "swish_of_doom"
    with pytest.raises(ValueError, match="hidden_act"):
        family.config_from_hf(cfg)


def test_flat_legacy_config_reads_the_same():
    """A pre-v5 flat config (text keys at the top, ``rope_scaling: {type: mrope}``) gives the
    same config as the nested one."""
    family = get_family("qwen2_vl")
    hf, _ = _hf_model("qwen2_vl_gqa2_untied")
    nested = hf.config.to_dict()
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = dict(text.pop("rope_parameters"))
    flat.update({k: v for k, v in text.items() if k != "model_type"})
    flat["rope_theta"] = rope.pop("rope_theta")
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    assert family.config_from_hf(flat) == family.config_from_hf(nested)
