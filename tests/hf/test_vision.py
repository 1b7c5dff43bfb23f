"""Standalone CLIP / SigLIP vision towers against ``transformers``: hidden states, pooled CLS,
feature-layer selection, export round trip, SigLIP's skipped pooling head."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp
from flax import nnx

from efficient_mllm.hf import load_pretrained
from efficient_mllm.nn.vision import VisionEncoder

from ._parity import FP32_TOL, check_export_roundtrip, save_hf

CONFIGS = {
    "clip_odd": (
        transformers.CLIPVisionConfig,
        transformers.CLIPVisionModel,
        dict(
            hidden_size=40,
            intermediate_size=56,
            num_hidden_layers=2,
            num_attention_heads=5,
            image_size=21,
            patch_size=7,
        ),
    ),
    "siglip": (
        transformers.SiglipVisionConfig,
        transformers.SiglipVisionModel,
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            vision_use_head=False,
        ),
    ),
}


def _hf(name, **extra):
    ccls, mcls, kw = CONFIGS[name]
    torch.manual_seed(0)
    return mcls(ccls(**kw, **extra)).eval(), mcls


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hidden_states_and_export(name, tmp_path):
    hf, mcls = _hf(name)
    pre = load_pretrained(save_hf(hf, tmp_path / "hf"))
    assert isinstance(pre.model, VisionEncoder)
    size = pre.config.image_size[0]
    px = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(px), output_hidden_states=True)
    out = pre.model(jnp.asarray(px.transpose(0, 2, 3, 1)))
    last = ref.last_hidden_state.numpy()
    if pre.config.use_cls:  # CLIP: raw last hidden state, post_layernorm'd CLS = pooled output
        assert np.abs(np.asarray(out.patches) - last[:, 1:]).max() <= FP32_TOL
        assert np.abs(np.asarray(out.cls) - ref.pooler_output.numpy()).max() <= FP32_TOL
    else:  # SigLIP: post_layernorm on every token
        assert np.abs(np.asarray(out.patches) - last).max() <= FP32_TOL
    # feature_layer = HF hidden_states index (1: after the first block), same weights.
    cfg1 = pre.config.replace(feature_layer=1, final_norm="none")
    m1 = nnx.merge(
        nnx.graphdef(nnx.eval_shape(lambda: VisionEncoder(cfg1, rngs=nnx.Rngs(0)))),
        nnx.state(pre.model),
    )
    hs1 = ref.hidden_states[1].numpy()[:, int(pre.config.use_cls) :]
    feats = np.asarray(m1(jnp.asarray(px.transpose(0, 2, 3, 1))).patches)
    assert np.abs(feats - hs1).max() <= FP32_TOL
    check_export_roundtrip(
        pre,
        mcls,
        hf,
        tmp_path / "export",
        lambda m: m(pixel_values=torch.tensor(px)).last_hidden_state,
    )


def test_siglip_head_is_skipped(tmp_path):
    ccls, mcls, kw = CONFIGS["siglip"]
    torch.manual_seed(0)
    with_head = mcls(ccls(**{**kw, "vision_use_head": True})).eval()
    pre = load_pretrained(save_hf(with_head, tmp_path / "hf"))
    px = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = with_head(pixel_values=torch.tensor(px)).last_hidden_state.numpy()
    out = pre.model(jnp.asarray(px.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(out.patches) - ref).max() <= FP32_TOL
    assert pre.family.config_to_hf(pre.config, pre.hf_config)["vision_use_head"] is False


def test_pretrained_tower_options_validate():
    from efficient_mllm.nn.config import VisionConfig
    from efficient_mllm.nn.mllm import MLLMConfig

    base = dict(image_size=8, patch_size=4, width=16, depth=2, heads=2, mlp_dim=32)
    assert VisionConfig(**base, feature_layer=-3).num_layers_run == 0
    assert VisionConfig(**base, feature_layer=-2).num_layers_run == 1
    with pytest.raises(ValueError, match="feature_layer=3"):
        VisionConfig(**base, feature_layer=3)
    with pytest.raises(ValueError, match="final_norm='cls' needs use_cls"):
        VisionConfig(**base, use_cls=False, final_norm="cls")
    with pytest.raises(ValueError, match="final_norm='post'"):
        VisionConfig(**base, final_norm="post")
    lang = dict(vocab_size=16, width=16, depth=2, heads=2, mlp_dim=32)
    with pytest.raises(ValueError, match="feature_select='full' needs"):
        MLLMConfig(language=lang, vision=base, image_token_id=3, feature_select="full",
                   compressor="random(keep=2)")
    with pytest.raises(ValueError, match="feature_select='everything'"):
        MLLMConfig(language=lang, vision=base, image_token_id=3, feature_select="everything")
