"""LLaVA-1.5 (HF ``LlavaForConditionalGeneration``) <-> :class:`~efficient_mllm.nn.mllm.MLLM`.

CLIP (or SigLIP) tower -> hidden state ``vision_feature_layer`` (LLaVA-1.5: -2, the blocks
after it are not run) -> ``vision_feature_select_strategy`` (``default``: drop the CLS token,
``full``: keep it) -> 2-layer GELU MLP projector -> Llama / Qwen2 decoder.

Hugging Face expands the ``<image>`` token of the prompt into ``image_seq_length`` copies; our
MLLM takes *one* placeholder per row and splices the image tokens in its place, with the same
position ids (image token ``i`` at ``p + i``, text continuing at ``p + N``), so logits agree
at the text positions.

Canonical tensor names are those of the published checkpoints (``llava-hf/llava-1.5-7b-hf``):
``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``,
``multi_modal_projector.linear_{1,2}.*``; the names ``transformers`` 5 uses in memory
(``model.language_model.*``, ``lm_head.weight``, ``model.vision_tower.*``) and the ones it saves
(``vision_tower.embeddings...`` without ``vision_model.``) are accepted on load. Not supported
(ValueError): a list of feature layers, projector activations other than ``gelu``, projectors
without bias, and ``default`` selection on a tower without CLS (HF would drop a real patch;
``full`` there is our ``feature_select="default"``).
"""

from __future__ import annotations

import copy

from efficient_mllm.hf import transforms as tf
from efficient_mllm.hf.families import Family, register_family
from efficient_mllm.hf.llama import (
    language_config_from_hf,
    language_config_to_hf,
    language_tensor_maps,
)
from efficient_mllm.hf.vision import (
    skip_vision_buffer,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_tensor_maps,
)
from efficient_mllm.nn.mllm import MLLM, MLLMConfig

__all__ = ["LlavaFamily"]

_RENAMES = (  # transformers-5 in-memory prefixes -> published-checkpoint prefixes
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _image_token_id(hf: dict) -> int:
    tid = hf.get("image_token_id", hf.get("image_token_index"))
    if tid is None:
        raise ValueError("LLaVA config has neither image_token_id nor image_token_index")
    return int(tid)


class LlavaFamily(Family):
    """``model_type="llava"`` <-> :class:`MLLM` (vision + ``mlp2x_gelu`` projector + decoder)."""

    model_types = ("llava",)

    def config_from_hf(self, hf_config, *, param_dtype="float32", dtype=None):
        hf = hf_config
        layer = hf.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(
                f"vision_feature_layer={layer!r}: only a single int layer is supported"
            )
        strategy = hf.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: expected 'default' or 'full'"
            )
        act = hf.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"projector_hidden_act={act!r}: only 'gelu' is supported")
        if not hf.get("multimodal_projector_bias", True):
            raise ValueError("multimodal_projector_bias=False is not supported")
        vision_hf = hf["vision_config"]
        clip = vision_hf.get("model_type") == "clip_vision_model"
        vision = vision_config_from_hf(
            vision_hf,
            param_dtype=param_dtype,
            dtype=dtype,
            feature_layer=layer,
            # LLaVA reads raw hidden states: CLIP's post_layernorm only touches the pooled CLS.
            final_norm="cls" if clip else "none",
        )
        if strategy == "default" and not vision.use_cls:
            raise ValueError(
                "vision_feature_select_strategy='default' drops the first token, but the "
                f"{vision_hf.get('model_type')} tower has no CLS token"
            )
        text_hf = dict(hf["text_config"])
        tie = hf.get("tie_word_embeddings")
        if tie is None:
            tie = text_hf.get("tie_word_embeddings", False)
        text_hf["tie_word_embeddings"] = bool(tie)
        language = language_config_from_hf(text_hf, param_dtype=param_dtype, dtype=dtype)
        return MLLMConfig(
            language=language,
            vision=vision,
            projector="mlp2x_gelu",
            image_token_id=_image_token_id(hf),
            # "full" on a tower without CLS keeps every patch: our "default".
            feature_select=strategy if vision.use_cls else "default",
        )

    def config_to_hf(self, config, original_hf_config=None):
        out = copy.deepcopy(original_hf_config) if original_hf_config else {}
        vis, lang = config.vision, config.language
        out.pop("image_token_id", None)
        text = language_config_to_hf(
            lang,
            out.get("text_config"),
            model_type=(out.get("text_config") or {}).get("model_type", "llama"),
        )
        vkind = (out.get("vision_config") or {}).get(
            "model_type", "clip_vision_model" if vis.use_cls else "siglip_vision_model"
        )
        vision = vision_config_to_hf(vis, out.get("vision_config"), model_type=vkind)
        vision.pop("dtype", None)
        n = vis.num_patches + int(config.feature_select == "full")
        out.update(
            architectures=["LlavaForConditionalGeneration"],
            model_type="llava",
            text_config=text,
            vision_config=vision,
            image_token_index=config.image_token_id,
            vision_feature_layer=vis.feature_layer,
            vision_feature_select_strategy=config.feature_select if vis.use_cls else "full",
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
            tie_word_embeddings=lang.tie_embeddings,
            image_seq_length=n,
            dtype=lang.param_dtype,
        )
        out.pop("torch_dtype", None)
        return out

    def build(self, config, rngs):
        return MLLM(config, rngs=rngs)

    def tensor_maps(self, config):
        if config.compressor is not None or config.pixel_shuffle != 1:
            raise ValueError(
                "LLaVA checkpoints have no compressor / pixel-shuffle parameters: load with the "
                "HF config, then set MLLMConfig.compressor on a copy"
            )
        vis, lang = config.vision, config.language
        maps = language_tensor_maps(
            lang,
            ours=("language",),
            hf_prefix="language_model.model.",
            head="language_model.lm_head.weight",
        )
        maps += vision_tensor_maps(vis, ours=("vision",), hf_prefix="vision_tower.vision_model.")
        p = "multi_modal_projector."
        maps += [
            tf.linear(
                ("projector", "fc1", "kernel"), p + "linear_1.weight", (vis.width,), (lang.width,)
            ),
            tf.copy(("projector", "fc1", "bias"), p + "linear_1.bias"),
            tf.linear(
                ("projector", "fc2", "kernel"), p + "linear_2.weight", (lang.width,), (lang.width,)
            ),
            tf.copy(("projector", "fc2", "bias"), p + "linear_2.bias"),
        ]
        return maps

    def canonical_name(self, name, config):
        for new, old in _RENAMES:
            if name.startswith(new):
                name = old + name[len(new) :]
                break
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name.startswith("vision_tower."):
            rest = name[len("vision_tower.") :].removeprefix("vision_model.")
            return None if skip_vision_buffer(rest) else "vision_tower.vision_model." + rest
        if config.language.tie_embeddings and name == "language_model.lm_head.weight":
            return None
        return name


register_family(LlavaFamily())
