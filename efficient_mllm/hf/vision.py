"""CLIP and SigLIP vision towers (HF ``CLIPVisionModel`` / ``SiglipVisionModel``) <->
``VisionEncoder``.

CLIP: CLS token, patch convolution without bias, learned positions, ``pre_layrnorm`` on the
embeddings, quick-GELU MLP; its ``post_layernorm`` only makes the pooled (CLS) output
(``final_norm="cls"``), so ``patches`` are the un-normalised last hidden state, as HF's
``last_hidden_state``. SigLIP: no CLS, patch convolution with bias, ``post_layernorm`` on every
token (``final_norm="all"``). SigLIP's attention-pooling ``head`` is not modelled: its tensors are
skipped on load (logged) and export writes ``vision_use_head=False`` (VLMs read the patch
tokens, never the pooled output).

``vision_config_from_hf`` / ``vision_config_to_hf`` / ``vision_tensor_maps`` are reused by LLaVA.
"""

from __future__ import annotations

import copy
import logging

from efficient_mllm.hf import transforms as tf
from efficient_mllm.hf.families import Family, Path, TensorMap, register_family
from efficient_mllm.nn.config import VisionConfig
from efficient_mllm.nn.vision import VisionEncoder

__all__ = [
    "VisionFamily",
    "vision_config_from_hf",
    "vision_config_to_hf",
    "vision_tensor_maps",
]

log = logging.getLogger(__name__)

VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
_ARCHITECTURES = {
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}


def _kind(hf: dict) -> str:
    kind = hf.get("model_type")
    if kind not in VISION_TYPES:
        raise ValueError(
            f"vision model_type={kind!r} is not supported; expected one of {VISION_TYPES}"
        )
    return kind


def vision_config_from_hf(
    hf: dict,
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    feature_layer: int = -1,
    final_norm: str | None = None,
) -> VisionConfig:
    """A :class:`VisionConfig` from a CLIP / SigLIP vision config dict. ``final_norm`` defaults
    to the standalone model's (``"cls"`` for CLIP, ``"all"`` for SigLIP)."""
    kind = _kind(hf)
    act = hf.get("hidden_act", "quick_gelu" if kind == "clip_vision_model" else "gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
        raise ValueError(f"vision hidden_act={act!r}: expected one of {sorted(_ACTIVATIONS)}")
    clip = kind == "clip_vision_model"
    return VisionConfig(
        image_size=int(hf.get("image_size", 224)),
        patch_size=int(hf.get("patch_size", 32 if clip else 16)),
        width=int(hf.get("hidden_size", 768)),
        depth=int(hf.get("num_hidden_layers", 12)),
        heads=int(hf.get("num_attention_heads", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)),
        channels=int(hf.get("num_channels", 3)),
        use_cls=clip,
        pos_embedding="learned",
        mlp_activation=_ACTIVATIONS[act],
        qkv_bias=True,
        norm_eps=float(hf.get("layer_norm_eps", 1e-5 if clip else 1e-6)),
        patch_bias=not clip,
        pre_norm=clip,
        feature_layer=feature_layer,
        final_norm=final_norm or ("cls" if clip else "all"),
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
    )


def vision_config_to_hf(
    cfg: VisionConfig, original: dict | None = None, *, model_type: str = "clip_vision_model"
) -> dict:
    """An HF vision config dict for ``cfg`` (unmodelled keys of ``original`` kept)."""
    out = copy.deepcopy(original) if original else {}
    kind = out.get("model_type", model_type)
    _kind({"model_type": kind})
    if cfg.image_size[0] != cfg.image_size[1]:
        raise ValueError(f"image_size={cfg.image_size}: HF CLIP / SigLIP need square images")
    act = {v: k for k, v in _ACTIVATIONS.items() if k != "gelu_new"}[cfg.mlp_activation]
    out.update(
        model_type=kind,
        image_size=cfg.image_size[0],
        patch_size=cfg.patch_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_dim,
        num_channels=cfg.channels,
        hidden_act=act,
        layer_norm_eps=cfg.norm_eps,
    )
    if kind == "siglip_vision_model":
        out["vision_use_head"] = False
    return out


def vision_tensor_maps(
    cfg: VisionConfig, *, ours: Path = (), hf_prefix: str = ""
) -> list[TensorMap]:
    """TensorMaps of a ``VisionEncoder`` at state path ``ours`` whose HF tensors are named
    ``{hf_prefix}embeddings...``, ``{hf_prefix}encoder.layers.{i}...`` etc."""
    if cfg.pos_embedding != "learned":
        raise ValueError("HF CLIP / SigLIP towers have learned position embeddings")
    d, n, m = cfg.width, cfg.heads, cfg.mlp_dim
    h = d // n
    e = f"{hf_prefix}embeddings."
    maps = [
        tf.conv_patch(
            (*ours, "patch", "kernel"),
            e + "patch_embedding.weight",
            d,
            cfg.channels,
            cfg.patch_size,
        ),
        tf.copy((*ours, "pos_embedding"), e + "position_embedding.weight"),
    ]
    if cfg.patch_bias:
        maps.append(tf.copy((*ours, "patch", "bias"), e + "patch_embedding.bias"))
    if cfg.use_cls:
        maps.append(tf.copy((*ours, "cls"), e + "class_embedding"))
    if cfg.pre_norm:
        maps += [
            tf.copy((*ours, "pre_norm", "scale"), f"{hf_prefix}pre_layrnorm.weight"),
            tf.copy((*ours, "pre_norm", "bias"), f"{hf_prefix}pre_layrnorm.bias"),
        ]
    for i in range(cfg.depth):
        o = (*ours, "blocks", i)
        p = f"{hf_prefix}encoder.layers.{i}."
        for norm, hf_norm in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2")):
            maps += [
                tf.copy((*o, norm, "scale"), p + f"{hf_norm}.weight"),
                tf.copy((*o, norm, "bias"), p + f"{hf_norm}.bias"),
            ]
        for name in ("q", "k", "v"):
            maps += [
                tf.linear(
                    (*o, "attn", name, "kernel"), p + f"self_attn.{name}_proj.weight", (d,), (n, h)
                ),
                tf.bias((*o, "attn", name, "bias"), p + f"self_attn.{name}_proj.bias", (n, h)),
            ]
        maps += [
            tf.linear((*o, "attn", "o", "kernel"), p + "self_attn.out_proj.weight", (n, h), (d,)),
            tf.copy((*o, "attn", "o", "bias"), p + "self_attn.out_proj.bias"),
            tf.linear((*o, "mlp", "fc1", "kernel"), p + "mlp.fc1.weight", (d,), (m,)),
            tf.copy((*o, "mlp", "fc1", "bias"), p + "mlp.fc1.bias"),
            tf.linear((*o, "mlp", "fc2", "kernel"), p + "mlp.fc2.weight", (m,), (d,)),
            tf.copy((*o, "mlp", "fc2", "bias"), p + "mlp.fc2.bias"),
        ]
    maps += [
        tf.copy((*ours, "norm", "scale"), f"{hf_prefix}post_layernorm.weight"),
        tf.copy((*ours, "norm", "bias"), f"{hf_prefix}post_layernorm.bias"),
    ]
    return maps


def skip_vision_buffer(rest: str) -> bool:
    """Checkpoint entries of a vision tower that are not parameters we model: the
    ``position_ids`` buffer of old CLIP checkpoints and SigLIP's pooling ``head``."""
    if rest.endswith("embeddings.position_ids"):
        return True
    if rest.startswith("head."):
        log.info("skipping SigLIP pooling-head tensor %r (not modelled)", rest)
        return True
    return False


class VisionFamily(Family):
    """Standalone ``clip_vision_model`` / ``siglip_vision_model`` <-> :class:`VisionEncoder`.
    Canonical names are those ``transformers`` 5 writes (no ``vision_model.`` prefix); the
    ``vision_model.``-prefixed names of older checkpoints are accepted on load."""

    model_types = VISION_TYPES

    def config_from_hf(self, hf_config, *, param_dtype="float32", dtype=None):
        return vision_config_from_hf(hf_config, param_dtype=param_dtype, dtype=dtype)

    def config_to_hf(self, config, original_hf_config=None):
        kind = (original_hf_config or {}).get(
            "model_type", "clip_vision_model" if config.use_cls else "siglip_vision_model"
        )
        out = vision_config_to_hf(config, original_hf_config, model_type=kind)
        out["architectures"] = [_ARCHITECTURES[kind]]
        out["dtype"] = config.param_dtype
        return out

    def build(self, config, rngs):
        return VisionEncoder(config, rngs=rngs)

    def tensor_maps(self, config):
        return vision_tensor_maps(config)

    def canonical_name(self, name, config):
        name = name.removeprefix("vision_model.")
        return None if skip_vision_buffer(name) else name


register_family(VisionFamily())
