"""InternVL checkpoints against ``transformers`` (torch CPU, no downloads).

Tiny random ``InternVLForConditionalGeneration`` models saved with ``save_pretrained`` and
loaded with ``hf.load_pretrained``. Configs: Qwen2 decoder with GQA 2:1 and the default tied
head, LayerNorm ViT with q/k/v biases; Qwen2 decoder with MHA and an untied head, InternViT-6B
style ViT (q/k RMSNorm, RMSNorm blocks, final LayerNorm without mean pooling, features from the
second-to-last layer); Llama decoder with GQA 3:1. Images are 16 x 16 tiles (patch 4 -> 4 x 4
patches -> 2 x 2 tokens after the pixel shuffle), several per row.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp
from flax import nnx

from efficient_mllm.hf import get_family, load_pretrained
from efficient_mllm.kvcache.generate import generate
from efficient_mllm.nn.internvl import InternVLModel, internvl_pixel_shuffle

from ._parity import BF16_TOL, FP32_TOL, check_export_roundtrip, hf_greedy, right_pad, save_hf

IMG, START, END = 5, 6, 7
CONFIGS = {
    "qwen2_gqa2_tied_ln": dict(
        text=dict(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48,
                  num_attention_heads=4, num_key_value_heads=2),
        vision=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, attention_bias=True),
        top=dict(),
    ),
    "qwen2_mha_untied_qknorm_rms": dict(
        text=dict(model_type="qwen2", vocab_size=83, hidden_size=24, intermediate_size=40,
                  num_attention_heads=3, num_key_value_heads=3),
        vision=dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                    intermediate_size=32, use_qk_norm=True, norm_type="rms_norm",
                    use_mean_pooling=False),
        top=dict(tie_word_embeddings=False, vision_feature_layer=-2),
    ),
    "llama_gqa3_untied": dict(
        text=dict(model_type="llama", vocab_size=70, hidden_size=48, intermediate_size=64,
                  num_attention_heads=6, num_key_value_heads=2),
        vision=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=20),
        top=dict(tie_word_embeddings=False, projector_hidden_act="gelu"),
    ),
}
PER_IMAGE = 4  # (16 / 4 / 2) ** 2 tokens per 16 x 16 tile


def _hf_model(name: str, seed: int = 0):
    spec = CONFIGS[name]
    text = dict(spec["text"], num_hidden_layers=2, initializer_range=0.1)
    vision = dict(spec["vision"], image_size=16, patch_size=4, initializer_range=0.1)
    torch.manual_seed(seed)
    cfg = transformers.InternVLConfig(text_config=text, vision_config=vision,
                                      image_token_id=IMG, image_seq_length=PER_IMAGE,
                                      **spec["top"])
    model = transformers.InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF initialises these to zeros / constants: make them matter
        for name_, p in model.named_parameters():
            if "lambda_" in name_ or "cls_token" in name_ or "position_embeddings" in name_:
                p.normal_(0.0, 0.5)
    return model, transformers.InternVLForConditionalGeneration


def _images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` normalised NHWC tiles (ours); HF takes the NCHW transpose."""
    return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype(np.float32)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.tensor(images.transpose(0, 3, 1, 2).copy())


def _image(k: int = 1) -> list[int]:
    return [START] + [IMG] * (PER_IMAGE * k) + [END]


def _rows(vocab: int, seed: int = 0):
    """Row 0: one image (2 tiles); row 1: two single-tile images, shorter text."""
    rng = np.random.default_rng(seed)

    def text(n):
        return list(rng.integers(10, vocab, n))

    return [np.array(text(2) + _image(2) + text(7)),
            np.array(text(1) + _image() + text(1) + _image() + text(2))]


@nnx.jit
def _forward(model, tokens, lengths, images):
    return model(tokens, images, lengths=lengths).logits, model.encode_images(images)


def _hf_inputs(rows, images):
    tokens, lengths = right_pad(rows)
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
    return dict(input_ids=torch.tensor(tokens.astype(np.int64)),
                attention_mask=torch.tensor(mask), pixel_values=_nchw(images))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    hf, cls = _hf_model(request.param)
    pre = load_pretrained(save_hf(hf, tmp_path_factory.mktemp(request.param) / "hf"))
    rows = _rows(pre.config.language.vocab_size)
    images = _images(4)
    tokens, lengths = right_pad(rows)
    logits, feats = _forward(pre.model, jnp.asarray(tokens), jnp.asarray(lengths),
                             jnp.asarray(images))
    return request.param, hf, cls, pre, rows, images, np.asarray(logits), np.asarray(feats)


def test_config_and_model(converted):
    name, hf, _, pre, *_ = converted
    assert isinstance(pre.model, InternVLModel)
    cfg = pre.config
    assert cfg.language.tie_embeddings == hf.config.tie_word_embeddings
    assert cfg.vision_feature_layer == hf.config.vision_feature_layer
    assert cfg.tokens_per_image == PER_IMAGE
    assert cfg.vision.qk_norm == hf.config.vision_config.use_qk_norm


def test_vision_features_match_fp32(converted):
    """InternViT hidden states (CLS included) and projected image tokens."""
    name, hf, _, pre, _, images, _, feats = converted
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=_nchw(images)).pooler_output.numpy()
        vt = hf.model.vision_tower(pixel_values=_nchw(images), output_hidden_states=True)
    np.testing.assert_allclose(feats, ref, rtol=0, atol=FP32_TOL)
    layer = pre.config.vision_feature_layer
    ref_hidden = (vt.last_hidden_state if layer == -1 else vt.hidden_states[layer]).numpy()
    ours = np.asarray(pre.model.vision(jnp.asarray(images), layer=layer))
    np.testing.assert_allclose(ours, ref_hidden, rtol=0, atol=FP32_TOL)


def test_image_text_logits_match_fp32(converted):
    name, hf, _, pre, rows, images, logits, _ = converted
    with torch.no_grad():
        ref = hf(**_hf_inputs(rows, images)).logits.numpy()
    for b, row in enumerate(rows):
        diff = np.abs(logits[b, : len(row)] - ref[b, : len(row)]).max()
        assert diff <= FP32_TOL, (name, b, diff)


def test_pixel_shuffle_matches_hf():
    x = np.random.default_rng(0).normal(size=(2, 6, 4, 5)).astype(np.float32)
    hf, _ = _hf_model("llama_gqa3_untied")
    ref = hf.model.pixel_shuffle(torch.tensor(x), scale_factor=0.5).numpy()
    np.testing.assert_array_equal(np.asarray(internvl_pixel_shuffle(jnp.asarray(x), 2)), ref)


def test_export_roundtrip(converted, tmp_path):
    name, hf, cls, pre, rows, images, *_ = converted
    inputs = _hf_inputs(rows, images)
    check_export_roundtrip(pre, cls, hf, tmp_path / "export", lambda m: m(**inputs).logits)


def test_legacy_checkpoint_names(converted, tmp_path):
    """The pre-v5 layout (``language_model.model.*``, ``vision_tower.*``, ...) loads to the
    same parameters."""
    from safetensors.numpy import save_file

    name, hf, _, pre, *_ = converted
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    legacy = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        k = k.replace("model.language_model.", "language_model.model.")
        k = k.replace("model.vision_tower.", "vision_tower.")
        k = k.replace("model.multi_modal_projector.", "multi_modal_projector.")
        legacy[k] = v
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    again = load_pretrained(tmp_path, hf_config=pre.hf_config)
    a = nnx.to_flat_state(nnx.state(again.model, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(pre.model, nnx.Param)))
    for path, var in a:
        np.testing.assert_array_equal(np.asarray(var.get_value()),
                                      np.asarray(b[path].get_value()))


@pytest.mark.parametrize("name", ["qwen2_gqa2_tied_ln", "llama_gqa3_untied"])
def test_greedy_generation_matches(name, tmp_path):
    """20 greedy tokens for 2 prompts of different lengths (HF left-padded, ours
    right-padded) are identical."""
    hf, _ = _hf_model(name, seed=1)
    pre = load_pretrained(save_hf(hf, tmp_path / "hf"))
    rng = np.random.default_rng(3)
    vocab = pre.config.language.vocab_size
    rows = [np.array([11] + _image(2) + list(rng.integers(10, vocab, 6))),
            np.array(list(rng.integers(10, vocab, 2)) + _image() + [12])]
    images = _images(3, seed=4)
    ref = hf_greedy(hf, rows, 20, pixel_values=_nchw(images))
    tokens, lengths = right_pad(rows)
    out = generate(pre.model, jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                   images=jnp.asarray(images), max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_bf16_logits_within_tolerance(tmp_path):
    """bfloat16 parameters and compute on both sides: logits of O(1) agree to BF16_TOL
    (measured about 0.02)."""
    hf, _ = _hf_model("qwen2_gqa2_tied_ln")
    pre = load_pretrained(save_hf(hf.to(torch.bfloat16), tmp_path / "hf"))
    assert pre.config.vision.dtype == "bfloat16" and pre.config.language.dtype == "bfloat16"
    rows = _rows(pre.config.language.vocab_size)
    images = _images(4)
    inputs = _hf_inputs(rows, images)
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with torch.no_grad():
        ref = hf(**inputs).logits.float().numpy()
    tokens, lengths = right_pad(rows)
    logits = np.asarray(_forward(pre.model, jnp.asarray(tokens), jnp.asarray(lengths),
                                 jnp.asarray(images))[0])
    for b, row in enumerate(rows):
        assert np.abs(logits[b, : len(row)] - ref[b, : len(row)]).max() <= BF16_TOL


def test_bad_inputs_raise(converted):
    _, _, _, pre, rows, images, *_ = converted
    tokens, lengths = right_pad(rows)
    with pytest.raises(ValueError, match="image tokens"):
        pre.model(jnp.asarray(tokens), jnp.asarray(images[:3]), lengths=jnp.asarray(lengths))
    with pytest.raises(ValueError, match="images shape"):
        pre.model.vision(jnp.zeros((1, 20, 16, 3)))


def test_unsupported_config_raises():
    family = get_family("internvl")
    hf, _ = _hf_model("qwen2_gqa2_tied_ln")
    for key, value, match in (
        ("vision_feature_select_strategy", "full", "select_strategy"),
        ("vision_feature_layer", [-1, -2], "vision_feature_layer"),
    ):
        cfg = hf.config.to_dict()
        cfg[key] = value
        with pytest.raises(ValueError, match=match):
            family.config_from_hf(cfg)
    cfg = hf.config.to_dict()
    cfg["vision_config"]["use_mask_token"] = True
    with pytest.raises(ValueError, match="use_mask_token"):
        family.config_from_hf(cfg)
