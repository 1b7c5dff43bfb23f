"""Llama and Qwen2 decoders (HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``) <-> ``LanguageModel``.

Supported: GQA, explicit ``head_dim``, RoPE scaling (``linear``, ``llama3``, ``yarn``; both the
``rope_parameters`` dict of transformers 5 and the older ``rope_theta`` + ``rope_scaling``
keys), Llama's ``attention_bias`` (q/k/v/o biases) and ``mlp_bias``, Qwen2's q/k/v biases, tied
or separate embeddings. Not supported (ValueError): an ``hidden_act`` other than ``silu``,
Qwen2's sliding-window layers, ``pretraining_tp > 1`` layouts are irrelevant to the weights and
ignored.

The helpers ``language_config_from_hf`` / ``language_config_to_hf`` / ``language_tensor_maps``
are reused by the multimodal families (LLaVA's text model, the Qwen2-VL decoder).
"""

from __future__ import annotations

import copy
from typing import Any


from efficient_mllm.hf import transforms as tf
from efficient_mllm.hf.families import Family, Path, TensorMap, register_family
from efficient_mllm.nn.language import LanguageConfig, LanguageModel

__all__ = [
    "LlamaFamily",
    "language_config_from_hf",
    "language_config_to_hf",
    "language_tensor_maps",
    "rope_from_hf",
]

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling or None)`` from an HF text config (either key style)."""
    params = hf.get("rope_parameters")
    if params is None:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling")
    else:
        params = dict(params)
        theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = params
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if kind == "default" and set(scaling) <= {"rope_type"}:
            scaling = None
    return theta, scaling


def language_config_from_hf(
    hf: dict, *, param_dtype: str = "float32", dtype: str | None = None, **overrides: Any
) -> LanguageConfig:
    """A :class:`LanguageConfig` from a Llama / Qwen2 text config dict."""
    model_type = hf.get("model_type", "llama")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: only 'silu' (SwiGLU) decoders are supported")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True: Qwen2 sliding-window layers are not supported")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types={layer_types!r}: only 'full_attention' is supported")
    theta, scaling = rope_from_hf(hf)
    heads = int(hf["num_attention_heads"])
    width = int(hf["hidden_size"])
    attn_bias = bool(hf.get("attention_bias", False))
    kw = dict(
        vocab_size=int(hf["vocab_size"]),
        width=width,
        depth=int(hf["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or width // heads),
        mlp_dim=int(hf["intermediate_size"]),
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases and no output bias.
        qkv_bias=True if model_type in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text") else attn_bias,
        out_bias=attn_bias and model_type == "llama",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
    )
    kw.update(overrides)
    return LanguageConfig(**kw)


def language_config_to_hf(
    cfg: LanguageConfig, original: dict | None = None, *, model_type: str = "llama"
) -> dict:
    """An HF text config dict for ``cfg`` (keys of ``original`` we do not model are kept)."""
    out = copy.deepcopy(original) if original else {}
    out.pop("rope_scaling", None)
    out.update(
        model_type=out.get("model_type", model_type),
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        mlp_bias=cfg.mlp_bias,
    )
    if out["model_type"] == "llama":
        if cfg.qkv_bias != cfg.out_bias:
            raise ValueError(
                f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}: HF Llama has one "
                "attention_bias for q/k/v/o"
            )
        out["attention_bias"] = cfg.qkv_bias
    elif not cfg.qkv_bias or cfg.out_bias:
        raise ValueError(
            f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}: {out['model_type']} needs "
            "q/k/v biases and no output bias"
        )
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.scaling or {})}
    if original is not None and "rope_parameters" not in original:
        out["rope_theta"] = cfg.rope_theta
        if cfg.scaling is not None:
            out["rope_scaling"] = dict(cfg.scaling)
    else:
        out.pop("rope_theta", None)
        out["rope_parameters"] = rope
    out["dtype"] = cfg.param_dtype
    out.pop("torch_dtype", None)
    return out


def language_tensor_maps(
    cfg: LanguageConfig,
    *,
    ours: Path = (),
    hf_prefix: str = "model.",
    head: str | None = "lm_head.weight",
) -> list[TensorMap]:
    """TensorMaps of a ``LanguageModel`` at state path ``ours`` whose HF decoder tensors are
    named ``{hf_prefix}layers.{i}...`` and whose untied head is ``head``."""
    d, n, nkv, h = cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim
    maps = [tf.copy((*ours, "embed", "embedding"), f"{hf_prefix}embed_tokens.weight")]
    for i in range(cfg.depth):
        o = (*ours, "blocks", i)
        p = f"{hf_prefix}layers.{i}."
        maps += [
            tf.copy((*o, "attn_norm", "scale"), p + "input_layernorm.weight"),
            tf.copy((*o, "mlp_norm", "scale"), p + "post_attention_layernorm.weight"),
            tf.linear((*o, "attn", "q", "kernel"), p + "self_attn.q_proj.weight", (d,), (n, h)),
            tf.linear((*o, "attn", "k", "kernel"), p + "self_attn.k_proj.weight", (d,), (nkv, h)),
            tf.linear((*o, "attn", "v", "kernel"), p + "self_attn.v_proj.weight", (d,), (nkv, h)),
            tf.linear((*o, "attn", "o", "kernel"), p + "self_attn.o_proj.weight", (n, h), (d,)),
        ]
        if cfg.qkv_bias:
            for name, heads in (("q", n), ("k", nkv), ("v", nkv)):
                maps.append(
                    tf.bias(
                        (*o, "attn", name, "bias"), p + f"self_attn.{name}_proj.bias", (heads, h)
                    )
                )
        if cfg.out_bias:
            maps.append(tf.copy((*o, "attn", "o", "bias"), p + "self_attn.o_proj.bias"))
        for name in ("gate", "up", "down"):
            dims = ((d,), (cfg.mlp_dim,)) if name != "down" else ((cfg.mlp_dim,), (d,))
            maps.append(
                tf.linear((*o, "mlp", name, "kernel"), p + f"mlp.{name}_proj.weight", *dims)
            )
            if cfg.mlp_bias:
                maps.append(tf.copy((*o, "mlp", name, "bias"), p + f"mlp.{name}_proj.bias"))
    maps.append(tf.copy((*ours, "norm", "scale"), f"{hf_prefix}norm.weight"))
    if not cfg.tie_embeddings:
        if head is None:
            raise ValueError("an untied LanguageConfig needs the HF name of the lm_head")
        maps.append(tf.transposed((*ours, "lm_head", "kernel"), head))
    return maps


class LlamaFamily(Family):
    """``model_type`` ``llama`` / ``qwen2`` <-> :class:`LanguageModel`."""

    model_types = ("llama", "qwen2")

    def config_from_hf(self, hf_config, *, param_dtype="float32", dtype=None):
        return language_config_from_hf(hf_config, param_dtype=param_dtype, dtype=dtype)

    def config_to_hf(self, config, original_hf_config=None):
        original = original_hf_config or {}
        out = language_config_to_hf(
            config, original_hf_config, model_type=original.get("model_type", "llama")
        )
        out["architectures"] = [_ARCHITECTURES[out["model_type"]]]
        return out

    def build(self, config, rngs):
        return LanguageModel(config, rngs=rngs)

    def tensor_maps(self, config):
        return language_tensor_maps(config)

    def canonical_name(self, name, config):
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if config.tie_embeddings and name == "lm_head.weight":
            return None  # a tied head saved anyway: the embedding is the source of truth
        return name


register_family(LlamaFamily())
