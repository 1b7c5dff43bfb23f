"""LLaVA-1.5 checkpoints (``LlavaForConditionalGeneration``) against ``transformers``.

HF prompts hold ``N`` copies of the image token, ours one placeholder that the MLLM expands, so
our logits are compared with HF's at the text positions (the placeholder's row is the last image
token's). Configs: CLIP tower with ``vision_feature_layer=-2`` / ``default`` selection and a GQA
Llama; CLIP with ``-1`` / ``full`` selection and a tied Qwen2; SigLIP (no CLS) with ``full`` and
an odd patch grid (3 x 3).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp

from efficient_mllm.hf import load_pretrained
from efficient_mllm.nn.mllm import MLLM

from ._parity import FP32_TOL, check_export_roundtrip, hf_greedy, jit_logits, our_greedy, save_hf

IMG = 95  # image token id (inside every vocabulary below)
CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
)
SIGLIP = dict(
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=30,
    patch_size=10,
    vision_use_head=False,
)
LLAMA = dict(
    vocab_size=100,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    initializer_range=0.1,
)
QWEN2 = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    initializer_range=0.1,
)
CONFIGS = {
    "clip_llama_default_m2": (
        transformers.CLIPVisionConfig,
        CLIP,
        transformers.LlamaConfig,
        LLAMA,
        dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    ),
    "clip_qwen2_full_m1_tied": (
        transformers.CLIPVisionConfig,
        CLIP,
        transformers.Qwen2Config,
        QWEN2,
        dict(
            vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True
        ),
    ),
    "siglip_llama_full_m2": (
        transformers.SiglipVisionConfig,
        SIGLIP,
        transformers.LlamaConfig,
        LLAMA,
        dict(vision_feature_layer=-2, vision_feature_select_strategy="full"),
    ),
}


def _hf_model(name: str, seed: int = 0):
    vcls, vkw, tcls, tkw, kw = CONFIGS[name]
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config=vcls(**vkw), text_config=tcls(**tkw), image_token_id=IMG, **kw
    )
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def _num_image_tokens(name: str) -> int:
    vcls, vkw, _, _, kw = CONFIGS[name]
    n = (vkw["image_size"] // vkw["patch_size"]) ** 2
    has_cls = vcls is transformers.CLIPVisionConfig
    return n + int(kw["vision_feature_select_strategy"] == "full" and has_cls)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    hf = _hf_model(request.param)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param) / "hf")
    return request.param, hf, load_pretrained(path), tmp_path_factory.mktemp("export")


def _prompt(rng, pre: int, post: int, vocab: int, n_img: int):
    """(HF ids with ``n_img`` image tokens, our ids with one placeholder)."""
    a = rng.integers(0, IMG, pre)
    b = rng.integers(0, IMG, post)
    hf = np.concatenate([a, np.full(n_img, IMG), b])
    ours = np.concatenate([a, [IMG], b])
    return hf, ours


def _images(rng, batch: int, size: int) -> np.ndarray:
    return rng.standard_normal((batch, 3, size, size)).astype(np.float32)  # NCHW


def test_image_text_logits_fp32(converted):
    name, hf, pre, _ = converted
    assert isinstance(pre.model, MLLM)
    n = _num_image_tokens(name)
    assert pre.model.num_image_slots() == n
    rng = np.random.default_rng(0)
    pairs = [_prompt(rng, 3, 5, 0, n) for _ in range(2)]
    hf_ids = np.stack([p[0] for p in pairs])
    our_ids = np.stack([p[1] for p in pairs])
    px = _images(rng, 2, pre.config.vision.image_size[0])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(hf_ids), pixel_values=torch.tensor(px)).logits.numpy()
    ours = np.asarray(
        jit_logits(
            pre.model, jnp.asarray(our_ids, jnp.int32), jnp.asarray(px.transpose(0, 2, 3, 1))
        )
    )
    text_rows = np.r_[0:3, 3 + n - 1, 3 + n : 3 + n + 5]  # the placeholder reads the last image row
    assert np.abs(ours - ref[:, text_rows]).max() <= FP32_TOL, name


def test_text_only_logits_fp32(converted):
    name, hf, pre, _ = converted
    ids = np.random.default_rng(1).integers(0, IMG, (2, 10))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jit_logits(pre.model, jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - ref).max() <= FP32_TOL, name


def test_export_roundtrip(converted):
    name, hf, pre, out = converted
    rng = np.random.default_rng(2)
    ids, _ = _prompt(rng, 2, 3, 0, _num_image_tokens(name))
    ids = torch.tensor(ids[None])
    px = torch.tensor(_images(rng, 1, pre.config.vision.image_size[0]))
    check_export_roundtrip(
        pre,
        transformers.LlavaForConditionalGeneration,
        hf,
        out,
        lambda m: m(input_ids=ids, pixel_values=px).logits,
    )


@pytest.mark.parametrize("name", ["clip_llama_default_m2", "siglip_llama_full_m2"])
def test_greedy_generation_with_images(name, tmp_path):
    hf = _hf_model(name, seed=3)
    pre = load_pretrained(save_hf(hf, tmp_path / "hf"))
    n = _num_image_tokens(name)
    rng = np.random.default_rng(4)
    pairs = [_prompt(rng, 2, 4, 0, n), _prompt(rng, 5, 7, 0, n)]
    px = _images(rng, 2, pre.config.vision.image_size[0])
    ref = hf_greedy(hf, [p[0] for p in pairs], 20, pixel_values=torch.tensor(px))
    ours = our_greedy(pre.model, [p[1] for p in pairs], 20, images=px.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ours, ref)


def test_legacy_and_inmemory_names_load(converted, tmp_path):
    """Checkpoints that name tensors as transformers 5 does in memory (``model.language_model``,
    ``lm_head``, ``model.vision_tower`` without ``vision_model``) load to the same model."""
    from safetensors.numpy import load_file, save_file

    name, hf, pre, _ = converted
    src = tmp_path / "src"
    save_hf(hf, src)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("language_model.model.", "model.language_model.")
        k = k.replace("language_model.lm_head.", "lm_head.")
        k = k.replace("vision_tower.vision_model.", "model.vision_tower.")
        k = (
            k.replace("vision_tower.", "model.vision_tower.")
            if k.startswith("vision_tower.")
            else k
        )
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
        renamed[k] = v
    save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})
    again = load_pretrained(src)
    import jax

    a = jax.tree.leaves(__import__("flax").nnx.state(again.model))
    b = jax.tree.leaves(__import__("flax").nnx.state(pre.model))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
