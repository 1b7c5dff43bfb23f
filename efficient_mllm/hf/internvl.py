"""InternVL (HF ``InternVLForConditionalGeneration``, the ``-hf`` checkpoints such as
``OpenGVLab/InternVL3-1B-hf``) <-> ``nn.internvl.InternVLModel``.

The text model is a Qwen2 or Llama decoder (``hf.llama`` helpers); the LM head is tied when the
top-level ``tie_word_embeddings`` (InternVL's default: True) or the text config's is set. Tensor
names are the transformers 5 names (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``); the older ``language_model.model.*`` / ``vision_tower.*`` layout is
mapped by ``canonical_name``.

Not covered (ValueError): the original remote-code ``internvl_chat`` checkpoints (different
names; convert them with transformers' own script first), ``use_mask_token``, models without
absolute position embeddings, ``vision_feature_select_strategy="full"``, a list of
``vision_feature_layer`` values, non-square vision grids.
"""

from __future__ import annotations

import copy

from efficient_mllm.hf import transforms as tf
from efficient_mllm.hf.families import Family, TensorMap, register_family
from efficient_mllm.hf.llama import (
    language_config_from_hf,
    language_config_to_hf,
    language_tensor_maps,
)
from efficient_mllm.nn.internvit import InternViTConfig
from efficient_mllm.nn.internvl import InternVLConfig, InternVLModel

__all__ = ["InternVLFamily", "internvit_tensor_maps"]

_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "quick_gelu": "quick_gelu", "silu": "silu", "relu": "relu"}
_ACTS_BACK = {v: k for k, v in _ACTS.items() if k != "gelu_new"}
_NORMS = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}


def _pair(value, key: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"vision_config.{key}={value!r}: expected an int or (h, w)")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def vision_config_from_hf(vis: dict, **dtypes) -> InternViTConfig:
    """An :class:`InternViTConfig` from an ``internvl_vision`` config dict."""
    for key, bad in (("use_mask_token", True), ("use_absolute_position_embeddings", False)):
        if vis.get(key, not bad) == bad:
            raise ValueError(f"vision_config.{key}={bad}: not supported")
    act = vis.get("hidden_act", "gelu")
    norm = vis.get("norm_type", "layer_norm")
    if act not in _ACTS or norm not in _NORMS:
        raise ValueError(
            f"vision_config hidden_act={act!r} / norm_type={norm!r}: expected one of "
            f"{sorted(_ACTS)} / {sorted(_NORMS)}"
        )
    ph, pw = _pair(vis.get("patch_size", 14), "patch_size")
    if ph != pw:
        raise ValueError(f"vision_config.patch_size={vis.get('patch_size')!r}: expected square")
    return InternViTConfig(
        image_size=_pair(vis.get("image_size", 448), "image_size"),
        patch_size=ph,
        width=int(vis["hidden_size"]),
        depth=int(vis["num_hidden_layers"]),
        heads=int(vis["num_attention_heads"]),
        mlp_dim=int(vis["intermediate_size"]),
        channels=int(vis.get("num_channels", 3)),
        qkv_bias=bool(vis.get("attention_bias", False)),
        qk_norm=bool(vis.get("use_qk_norm", False)),
        norm=_NORMS[norm],
        norm_eps=float(vis.get("layer_norm_eps", 1e-6)),
        mlp_activation=_ACTS[act],
        use_mean_pooling=bool(vis.get("use_mean_pooling", True)),
        **dtypes,
    )


def internvit_tensor_maps(v: InternViTConfig, *, ours=("vision",),
                          prefix: str = "model.vision_tower.") -> list[TensorMap]:
    """TensorMaps of an :class:`InternViT` at ``ours`` (HF names under ``prefix``)."""
    d, n = v.width, v.heads
    h = d // n
    e = prefix + "embeddings."
    maps = [
        TensorMap(ours=(*ours, "cls"), hf=e + "cls_token",
                  to_ours=lambda w: w.reshape(d), to_hf=lambda x: x.reshape(1, 1, d)),
        TensorMap(ours=(*ours, "pos_embedding"), hf=e + "position_embeddings",
                  to_ours=lambda w: w.reshape(v.num_patches + 1, d),
                  to_hf=lambda x: x.reshape(1, v.num_patches + 1, d)),
        tf.conv_patch((*ours, "patch", "kernel"), e + "patch_embeddings.projection.weight",
                      d, v.channels, v.patch_size),
        tf.copy((*ours, "patch", "bias"), e + "patch_embeddings.projection.bias"),
    ]
    norm_leaves = (("weight", "scale"),) + ((("bias", "bias"),) if v.norm == "layernorm" else ())
    for i in range(v.depth):
        o, q = (*ours, "blocks", i), f"{prefix}encoder.layer.{i}."
        maps += [tf.copy((*o, lam), q + lam) for lam in ("lambda_1", "lambda_2")]
        for ours_norm, hf_norm in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            maps += [tf.copy((*o, ours_norm, leaf), f"{q}{hf_norm}.{hf}")
                     for hf, leaf in norm_leaves]
        for name in ("q", "k", "v"):
            maps.append(tf.linear((*o, "attn", name, "kernel"), f"{q}attention.{name}_proj.weight",
                                  (d,), (n, h)))
            if v.qkv_bias:
                maps.append(tf.bias((*o, "attn", name, "bias"), f"{q}attention.{name}_proj.bias",
                                    (n, h)))
        if v.qk_norm:
            maps += [tf.copy((*o, "attn", "q_norm", "scale"), q + "attention.q_norm.weight"),
                     tf.copy((*o, "attn", "k_norm", "scale"), q + "attention.k_norm.weight")]
        maps += [
            tf.linear((*o, "attn", "proj", "kernel"), q + "attention.projection_layer.weight",
                      (n, h), (d,)),
            tf.copy((*o, "attn", "proj", "bias"), q + "attention.projection_layer.bias"),
            tf.linear((*o, "mlp", "fc1", "kernel"), q + "mlp.fc1.weight", (d,), (v.mlp_dim,)),
            tf.copy((*o, "mlp", "fc1", "bias"), q + "mlp.fc1.bias"),
            tf.linear((*o, "mlp", "fc2", "kernel"), q + "mlp.fc2.weight", (v.mlp_dim,), (d,)),
            tf.copy((*o, "mlp", "fc2", "bias"), q + "mlp.fc2.bias"),
        ]
    if not v.use_mean_pooling:
        maps += [tf.copy((*ours, "norm", "scale"), prefix + "layernorm.weight"),
                 tf.copy((*ours, "norm", "bias"), prefix + "layernorm.bias")]
    return maps


class InternVLFamily(Family):
    """``model_type`` ``internvl`` <-> :class:`InternVLModel`."""

    model_types = ("internvl",)

    def config_from_hf(self, hf_config, *, param_dtype="float32", dtype=None):
        text = dict(hf_config.get("text_config") or {})
        if not text:
            raise ValueError("hf_config has no 'text_config'")
        text.setdefault("model_type", "qwen2")
        if text["model_type"] not in ("qwen2", "llama"):
            raise ValueError(
                f"text_config.model_type={text['model_type']!r}: expected 'qwen2' or 'llama'"
            )
        text["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings", True)) or bool(
            text.get("tie_word_embeddings", False)
        )
        language = language_config_from_hf(text, param_dtype=param_dtype, dtype=dtype)
        vision = vision_config_from_hf(
            hf_config.get("vision_config") or {}, param_dtype=param_dtype,
            dtype=dtype or param_dtype,
        )
        strategy = hf_config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: only 'default' is supported"
            )
        act = hf_config.get("projector_hidden_act", "gelu")
        if act not in _ACTS:
            raise ValueError(f"projector_hidden_act={act!r}: expected one of {sorted(_ACTS)}")
        layer = hf_config.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only a single int is supported")
        tid = hf_config.get("image_token_id", hf_config.get("image_token_index"))
        if tid is None:
            raise ValueError("hf_config has no 'image_token_id'")
        return InternVLConfig(
            language=language, vision=vision, image_token_id=int(tid),
            downsample_ratio=float(hf_config.get("downsample_ratio", 0.5)),
            vision_feature_layer=layer, projector_activation=_ACTS[act],
        )

    def config_to_hf(self, config, original_hf_config=None):
        out = copy.deepcopy(original_hf_config or {})
        lang, v = config.language, config.vision
        text_orig = out.get("text_config") or {"model_type": "qwen2"}
        text = language_config_to_hf(lang, text_orig, model_type=text_orig.get("model_type"))
        if text["model_type"] == "qwen2":
            text.pop("mlp_bias", None)
        text["tie_word_embeddings"] = lang.tie_embeddings
        vis = dict(out.get("vision_config") or {})
        vis.update(
            model_type="internvl_vision", hidden_size=v.width, num_hidden_layers=v.depth,
            num_attention_heads=v.heads, intermediate_size=v.mlp_dim,
            image_size=list(v.image_size), patch_size=[v.patch_size, v.patch_size],
            num_channels=v.channels, attention_bias=v.qkv_bias, use_qk_norm=v.qk_norm,
            norm_type={b: a for a, b in _NORMS.items()}[v.norm], layer_norm_eps=v.norm_eps,
            hidden_act=_ACTS_BACK[v.mlp_activation], use_mean_pooling=v.use_mean_pooling,
            use_mask_token=False, use_absolute_position_embeddings=True,
        )
        out.update(
            model_type="internvl", architectures=["InternVLForConditionalGeneration"],
            text_config=text, vision_config=vis, image_token_id=config.image_token_id,
            downsample_ratio=config.downsample_ratio,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy="default",
            projector_hidden_act=_ACTS_BACK[config.projector_activation],
            tie_word_embeddings=lang.tie_embeddings, image_seq_length=config.tokens_per_image,
        )
        out.pop("torch_dtype", None)
        out["dtype"] = lang.param_dtype
        return out

    def build(self, config, rngs):
        return InternVLModel(config, rngs=rngs)

    def tensor_maps(self, config):
        d_in = config.vision.width * config.shuffle**2
        d = config.language.width
        p, o = "model.multi_modal_projector.", ("projector",)
        projector = [
            tf.copy((*o, "norm", "scale"), p + "layer_norm.weight"),
            tf.copy((*o, "norm", "bias"), p + "layer_norm.bias"),
            tf.linear((*o, "fc1", "kernel"), p + "linear_1.weight", (d_in,), (d,)),
            tf.copy((*o, "fc1", "bias"), p + "linear_1.bias"),
            tf.linear((*o, "fc2", "kernel"), p + "linear_2.weight", (d,), (d,)),
            tf.copy((*o, "fc2", "bias"), p + "linear_2.bias"),
        ]
        return internvit_tensor_maps(config.vision) + projector + language_tensor_maps(
            config.language, ours=("language",), hf_prefix="model.language_model.",
            head="lm_head.weight",
        )

    def canonical_name(self, name, config):
        if name.endswith("rotary_emb.inv_freq"):
            return None
        for old, new in (
            ("language_model.lm_head.", "lm_head."),
            ("language_model.model.", "model.language_model."),
            ("language_model.", "model.language_model."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if config.language.tie_embeddings and name == "lm_head.weight":
            return None
        return name


register_family(InternVLFamily())
