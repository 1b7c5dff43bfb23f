"""Qwen2-VL and Qwen2.5-VL (HF ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration``) <-> ``nn.qwen2_vl.QwenVLModel``.

Config: the nested ``text_config`` / ``vision_config`` of transformers 5 and the flat text keys
of older hub ``config.json`` files (``rope_scaling: {"type": "mrope", "mrope_section": ...}``)
are both read; ``config_to_hf`` writes the nested form. Tensor names are the transformers 5
names (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``); the older layout of
hub checkpoints (``visual.*``, ``model.layers.*``) is mapped by ``canonical_name``.

Videos: ``video_token_id`` and (Qwen2.5-VL) ``vision_config.tokens_per_second`` are read into
``QwenVLConfig`` (temporal M-RoPE ids of video tokens, ``nn.qwen2_vl`` module doc). Not covered:
Qwen2's sliding-window decoder layers (``use_sliding_window=True`` raises, as in ``hf.llama``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from efficient_mllm.hf import transforms as tf
from efficient_mllm.hf.families import Family, TensorMap, register_family
from efficient_mllm.hf.llama import (
    language_config_from_hf,
    language_config_to_hf,
    language_tensor_maps,
)
from efficient_mllm.nn.qwen2_vl import QwenVLConfig, QwenVLModel
from efficient_mllm.nn.qwen2_vl_vision import QwenVisionConfig

__all__ = ["Qwen2VLFamily", "qwen_vision_tensor_maps"]

_ARCH = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
         "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
# Top-level keys of the multimodal config (everything else of a flat config is text).
_TOP_LEVEL = ("vision_config", "text_config", "architectures", "image_token_id",
              "video_token_id", "vision_start_token_id", "vision_end_token_id", "model_type",
              "transformers_version", "tie_word_embeddings")
# HF activation names -> nn.layers.activation names.
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
         "gelu_new": "gelu_tanh", "silu": "silu", "relu": "relu"}
_ACTS_BACK = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
              "silu": "silu", "relu": "relu"}


def _int(value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision_config.{key}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def _text_config(hf: dict) -> dict:
    """The text config dict (nested, or the flat top-level keys of older configs)."""
    text = dict(hf.get("text_config") or hf)
    params = text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling")
    if params is None:
        raise ValueError("text_config has no rope_parameters / rope_scaling with mrope_section")
    params = dict(params)
    sections = params.pop("mrope_section", None)
    if sections is None:
        raise ValueError(f"rope_parameters={params!r}: expected an 'mrope_section'")
    if params.get("rope_type", params.get("type")) == "mrope":
        params["rope_type"] = "default"
    params.pop("type", None)
    params.setdefault("rope_theta", text.get("rope_theta", 1000000.0))
    text["rope_parameters"] = params
    text.pop("rope_scaling", None)
    text["_mrope_section"] = tuple(int(s) for s in sections)
    return text


def vision_config_from_hf(vis: dict, model_type: str, out_dim: int, **dtypes) -> QwenVisionConfig:
    """A :class:`QwenVisionConfig` from a Qwen2-VL / Qwen2.5-VL ``vision_config`` dict."""
    act = vis.get("hidden_act", "quick_gelu" if model_type == "qwen2_vl" else "silu")
    if act not in _ACTS:
        raise ValueError(f"vision_config.hidden_act={act!r}: expected one of {sorted(_ACTS)}")
    theta = float((vis.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    common = dict(
        depth=int(vis["depth"]),
        heads=int(vis["num_heads"]),
        patch_size=_int(vis.get("patch_size", 14), "patch_size"),
        temporal_patch_size=_int(vis.get("temporal_patch_size", 2), "temporal_patch_size"),
        in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        mlp_activation=_ACTS[act],
        rope_theta=theta,
        **dtypes,
    )
    if model_type == "qwen2_vl":
        width = int(vis["embed_dim"])
        return QwenVisionConfig(
            width=width, mlp_dim=int(width * float(vis.get("mlp_ratio", 4))), out_dim=out_dim,
            norm="layernorm", mlp="gelu", **common,
        )
    return QwenVisionConfig(
        width=int(vis["hidden_size"]), mlp_dim=int(vis["intermediate_size"]), out_dim=out_dim,
        norm="rmsnorm", mlp="swiglu", window_size=int(vis.get("window_size", 112)),
        fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))), **common,
    )


def qwen_vision_tensor_maps(v: QwenVisionConfig, *, ours=("visual",),
                            prefix: str = "model.visual.") -> list[TensorMap]:
    """TensorMaps of a :class:`QwenVisionTransformer` at ``ours`` (HF names under ``prefix``)."""
    d, n, h = v.width, v.heads, v.head_dim
    c, t, p = v.in_channels, v.temporal_patch_size, v.patch_size

    def patch_to_ours(w):
        if tuple(w.shape) != (d, c, t, p, p):
            raise ValueError(
                f"HF tensor {prefix}patch_embed.proj.weight has shape {tuple(w.shape)}: "
                f"expected {(d, c, t, p, p)}"
            )
        return np.ascontiguousarray(w.reshape(d, -1).T)

    maps = [TensorMap(
        ours=(*ours, "patch_embed", "kernel"), hf=prefix + "patch_embed.proj.weight",
        to_ours=patch_to_ours,
        to_hf=lambda k: np.ascontiguousarray(k.T).reshape(d, c, t, p, p),
    )]
    norm_leaves = (("weight", "scale"),) + ((("bias", "bias"),) if v.norm == "layernorm" else ())
    for i in range(v.depth):
        o, q = (*ours, "blocks", i), f"{prefix}blocks.{i}."
        for norm in ("norm1", "norm2"):
            maps += [tf.copy((*o, norm, leaf), f"{q}{norm}.{hf}") for hf, leaf in norm_leaves]
        maps += [
            tf.linear((*o, "attn", "qkv", "kernel"), q + "attn.qkv.weight", (d,), (3, n, h)),
            tf.bias((*o, "attn", "qkv", "bias"), q + "attn.qkv.bias", (3, n, h)),
            tf.linear((*o, "attn", "proj", "kernel"), q + "attn.proj.weight", (n, h), (d,)),
            tf.copy((*o, "attn", "proj", "bias"), q + "attn.proj.bias"),
        ]
        if v.mlp == "gelu":
            names = (("fc1", "fc1", (d,), (v.mlp_dim,)), ("fc2", "fc2", (v.mlp_dim,), (d,)))
        else:
            names = (("gate", "gate_proj", (d,), (v.mlp_dim,)),
                     ("up", "up_proj", (d,), (v.mlp_dim,)),
                     ("down", "down_proj", (v.mlp_dim,), (d,)))
        for ours_name, hf_name, din, dout in names:
            maps += [
                tf.linear((*o, "mlp", ours_name, "kernel"), f"{q}mlp.{hf_name}.weight", din, dout),
                tf.copy((*o, "mlp", ours_name, "bias"), f"{q}mlp.{hf_name}.bias"),
            ]
    m = (*ours, "merger")
    hidden = d * v.spatial_merge_size**2
    maps += [tf.copy((*m, "norm", leaf), f"{prefix}merger.ln_q.{hf}") for hf, leaf in norm_leaves]
    maps += [
        tf.linear((*m, "fc1", "kernel"), prefix + "merger.mlp.0.weight", (hidden,), (hidden,)),
        tf.copy((*m, "fc1", "bias"), prefix + "merger.mlp.0.bias"),
        tf.linear((*m, "fc2", "kernel"), prefix + "merger.mlp.2.weight", (hidden,), (v.out_dim,)),
        tf.copy((*m, "fc2", "bias"), prefix + "merger.mlp.2.bias"),
    ]
    return maps


class Qwen2VLFamily(Family):
    """``model_type`` ``qwen2_vl`` / ``qwen2_5_vl`` <-> :class:`QwenVLModel`."""

    model_types = ("qwen2_vl", "qwen2_5_vl")

    def config_from_hf(self, hf_config, *, param_dtype="float32", dtype=None):
        model_type = hf_config.get("model_type")
        if model_type not in self.model_types:
            raise ValueError(f"model_type={model_type!r}: expected one of {self.model_types}")
        text = _text_config(hf_config)
        sections = text.pop("_mrope_section")
        text.setdefault("model_type", f"{model_type}_text")
        tie = bool(hf_config.get("tie_word_embeddings", False)) or bool(
            text.get("tie_word_embeddings", False)
        )
        text["tie_word_embeddings"] = tie
        language = language_config_from_hf(
            text, param_dtype=param_dtype, dtype=dtype, qkv_bias=True, rope_type="mrope",
            mrope_sections=sections,
        )
        vis = hf_config.get("vision_config")
        if vis is None:
            raise ValueError("hf_config has no 'vision_config'")
        vision = vision_config_from_hf(
            vis, model_type, language.width, param_dtype=param_dtype, dtype=dtype or param_dtype
        )
        if vision.out_dim != language.width:
            raise ValueError(
                f"vision_config out size {vision.out_dim} != text hidden_size {language.width}"
            )
        tid = hf_config.get("image_token_id", hf_config.get("image_token_index"))
        if tid is None:
            raise ValueError("hf_config has no 'image_token_id'")
        vid = hf_config.get("video_token_id", hf_config.get("video_token_index"))
        tps = vis.get("tokens_per_second") if model_type == "qwen2_5_vl" else None
        if model_type == "qwen2_5_vl" and tps is None:
            tps = 4  # transformers' Qwen2_5_VLVisionConfig default
        return QwenVLConfig(
            language=language, vision=vision, image_token_id=int(tid),
            video_token_id=None if vid is None else int(vid), tokens_per_second=tps,
        )

    def config_to_hf(self, config, original_hf_config=None):
        original = copy.deepcopy(original_hf_config or {})
        model_type = original.get("model_type", "qwen2_5_vl" if config.vision.mlp == "swiglu"
                                  else "qwen2_vl")
        lang, v = config.language, config.vision
        text_orig = original.get("text_config")
        if text_orig is None:  # older flat layout: the text keys sit at the top level
            text_orig = {k: val for k, val in original.items() if k not in _TOP_LEVEL}
            text_orig["model_type"] = f"{model_type}_text"
        text = language_config_to_hf(lang, text_orig, model_type=f"{model_type}_text")
        text.pop("rope_theta", None)
        text.pop("rope_scaling", None)
        text.pop("mlp_bias", None)
        text["rope_parameters"] = {
            "rope_type": "default", **(lang.scaling or {}), "rope_theta": lang.rope_theta,
            "mrope_section": list(lang.mrope_sections),
        }
        vis = dict(original.get("vision_config") or {})
        vis.update(
            depth=v.depth, num_heads=v.heads, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size, in_channels=v.in_channels,
            spatial_merge_size=v.spatial_merge_size, hidden_act=_ACTS_BACK[v.mlp_activation],
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        )
        if model_type == "qwen2_vl":
            if v.mlp_dim % v.width:
                raise ValueError(
                    f"vision mlp_dim={v.mlp_dim} is not a multiple of width={v.width}: Qwen2-VL "
                    "stores an integer mlp_ratio"
                )
            vis.update(embed_dim=v.width, hidden_size=v.out_dim, mlp_ratio=v.mlp_dim // v.width)
        else:
            vis.update(hidden_size=v.width, out_hidden_size=v.out_dim,
                       intermediate_size=v.mlp_dim, window_size=v.window_size,
                       fullatt_block_indexes=list(v.fullatt_block_indexes))
            if config.tokens_per_second is not None:
                tps = config.tokens_per_second
                vis["tokens_per_second"] = int(tps) if float(tps).is_integer() else tps
        vis["model_type"] = f"{model_type}_vision"
        out = {k: val for k, val in original.items() if k not in text}  # drop flat text keys
        out.update(
            model_type=model_type, architectures=[_ARCH[model_type]], text_config=text,
            vision_config=vis, image_token_id=config.image_token_id,
            tie_word_embeddings=lang.tie_embeddings,
        )
        if config.video_token_id is not None:
            out["video_token_id"] = config.video_token_id
        out.pop("rope_scaling", None)
        out.pop("torch_dtype", None)
        out["dtype"] = lang.param_dtype
        return out

    def build(self, config, rngs):
        return QwenVLModel(config, rngs=rngs)

    def tensor_maps(self, config):
        return qwen_vision_tensor_maps(config.vision) + language_tensor_maps(
            config.language, ours=("language",), hf_prefix="model.language_model.",
            head="lm_head.weight",
        )

    def canonical_name(self, name, config):
        if name.endswith("rotary_emb.inv_freq") or name.endswith("rotary_pos_emb.inv_freq"):
            return None
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model.") and not name.startswith(
            ("model.visual.", "model.language_model.")
        ):
            name = "model.language_model." + name[len("model."):]
        if config.language.tie_embeddings and name == "lm_head.weight":
            return None
        return name


register_family(Qwen2VLFamily())
