"""Frozen, validated configs of the attention layer, the transformer block and the ViT.

Configs are keyword-only, hashable (usable as static jit arguments) and round-trip through
plain dicts (``to_dict`` / ``from_dict``) so they can live in ml-collections configs and JSON.
Dtypes are stored as names (``"float32"``, ``"bfloat16"``, ``"float16"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["DTYPES", "AttentionConfig", "BlockConfig", "VisionConfig", "as_dtype"]

DTYPES = ("float32", "bfloat16", "float16")
ROPE_KINDS = ("rope", "mrope", "rope2d", "none")
MLP_KINDS = ("swiglu", "gelu")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")
NORM_KINDS = ("rmsnorm", "layernorm")
POS_EMBEDDINGS = ("learned", "rope2d")


def as_dtype(name: Any):
    """``jnp.dtype`` of a dtype name or object among :data:`DTYPES`."""
    try:
        dt = jnp.dtype(name)
    except TypeError:
        raise ValueError(f"dtype={name!r}: expected one of {DTYPES}") from None
    if dt.name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {DTYPES}")
    return dt


def _pos_int(cls: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{cls}.{name}={value!r}: expected a positive int")


def _choice(cls: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{cls}.{name}={value!r}: expected one of {choices}")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _plain(value: Any) -> Any:
    if isinstance(value, DictMixin):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class DictMixin:
    """``from_dict`` (unknown keys raise) / ``to_dict`` (JSON-friendly) / ``replace`` for the
    frozen config dataclasses."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(
                f"{cls.__name__}.from_dict: expected a mapping, got {type(d).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict: unknown key(s) {unknown}; expected keys among "
                f"{sorted(names)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rope_scaling" and value is not None:
                value = dict(value)
            out[f.name] = _plain(value)
        return out

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(DictMixin):
    """Multi-head attention with GQA and a choice of rotary embedding.

    ``rope``: ``"rope"`` (1D, positions ``[B, T]``), ``"mrope"`` (Qwen2-VL, positions
    ``[3, B, T]``, ``mrope_sections`` in frequency pairs), ``"rope2d"`` (ViT, positions
    ``[B, T, 2]``) or ``"none"``. ``rope_scaling`` is a Hugging Face ``rope_scaling`` dict (stored
    as a tuple of items to stay hashable; ``.scaling`` gives the dict). ``attention`` is a spec
    string of ``registry.ATTENTION`` (``"softmax"``, ``"softmax(impl='xla')"``, ...).
    ``embed_axis`` is the logical axis name of the model width (``"vision_embed"`` in the ViT).
    """

    dim: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    rope: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    mrope_sections: tuple[int, int, int] | None = None
    attention: str = "softmax"
    embed_axis: str = "embed"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        c = type(self).__name__
        _pos_int(c, "dim", self.dim)
        _pos_int(c, "num_heads", self.num_heads)
        if self.num_kv_heads is None:
            _set(self, "num_kv_heads", int(self.num_heads))
        _pos_int(c, "num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{c}.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"{c}.dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim"
                )
            _set(self, "head_dim", self.dim // self.num_heads)
        _pos_int(c, "head_dim", self.head_dim)
        _choice(c, "rope", self.rope, ROPE_KINDS)
        need = {"rope": 2, "mrope": 2, "rope2d": 4, "none": 1}[self.rope]
        if self.head_dim % need:
            raise ValueError(
                f"{c}.head_dim={self.head_dim} must be divisible by {need} for rope={self.rope!r}"
            )
        if not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 1:
            raise ValueError(f"{c}.rope_theta={self.rope_theta!r}: expected a number > 1")
        _set(self, "rope_theta", float(self.rope_theta))
        if self.rope_scaling is not None:
            items = (
                self.rope_scaling.items()
                if isinstance(self.rope_scaling, Mapping)
                else self.rope_scaling
            )
            try:
                scaling = tuple(sorted((str(k), v) for k, v in items))
            except (TypeError, ValueError):
                raise ValueError(
                    f"{c}.rope_scaling={self.rope_scaling!r}: expected a rope_scaling dict"
                ) from None
            _set(self, "rope_scaling", scaling)
            if self.rope not in ("rope", "mrope"):
                raise ValueError(f"{c}.rope_scaling is set but rope={self.rope!r} does not use it")
            from efficient_mllm.ops import rope as rope_ops

            rope_ops.rope_inv_freq(self.head_dim, self.rope_theta, self.scaling)  # validates
        if self.rope == "mrope":
            sections = self.mrope_sections
            if sections is None or len(tuple(sections)) != 3:
                raise ValueError(f"{c}.mrope_sections={sections!r}: rope='mrope' needs (t, h, w)")
            sections = tuple(int(s) for s in sections)
            if min(sections) < 0 or sum(sections) != self.head_dim // 2:
                raise ValueError(
                    f"{c}.mrope_sections={sections}: expected non-negative ints summing to "
                    f"head_dim // 2 = {self.head_dim // 2}"
                )
            _set(self, "mrope_sections", sections)
        elif self.mrope_sections is not None:
            raise ValueError(
                f"{c}.mrope_sections={self.mrope_sections!r} is set but rope={self.rope!r}"
            )
        if not isinstance(self.attention, str) or not self.attention.strip():
            raise ValueError(
                f"{c}.attention={self.attention!r}: expected a registry.ATTENTION spec string"
            )
        if not isinstance(self.embed_axis, str):
            raise ValueError(f"{c}.embed_axis={self.embed_axis!r}: expected a logical axis name")
        _set(self, "dtype", as_dtype(self.dtype).name)
        _set(self, "param_dtype", as_dtype(self.param_dtype).name)

    @property
    def scaling(self) -> dict | None:
        """``rope_scaling`` as a dict (or None)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def attention_config(self) -> AttentionConfig:
        """The attention fields alone (itself for an :class:`AttentionConfig`)."""
        names = [f.name for f in dataclasses.fields(AttentionConfig)]
        return AttentionConfig(**{n: getattr(self, n) for n in names})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig(AttentionConfig):
    """A pre-norm transformer block: the attention fields plus the MLP and the norms.

    ``mlp``: ``"swiglu"`` (gate/up/down, Shazeer 2020, arXiv:2002.05202) or ``"gelu"`` (two
    layers with ``mlp_activation``); ``norm``: ``"rmsnorm"`` (Zhang & Sennrich 2019,
    arXiv:1910.07467) or ``"layernorm"`` (Ba et al. 2016, arXiv:1607.06450).
    """

    mlp_dim: int
    mlp: str = "swiglu"
    mlp_activation: str = "gelu"
    mlp_bias: bool = False
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        c = type(self).__name__
        _pos_int(c, "mlp_dim", self.mlp_dim)
        _choice(c, "mlp", self.mlp, MLP_KINDS)
        _choice(c, "mlp_activation", self.mlp_activation, ACTIVATIONS)
        _choice(c, "norm", self.norm, NORM_KINDS)
        if not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"{c}.norm_eps={self.norm_eps!r}: expected a positive number")
        _set(self, "norm_eps", float(self.norm_eps))


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig(DictMixin):
    """A ViT (Dosovitskiy et al., 2021, arXiv:2010.11929): patch embedding, optional CLS token,
    learned absolute positions or 2D RoPE, ``depth`` pre-LN blocks, final LayerNorm.

    ``image_size`` is an int or ``(height, width)``; both must be multiples of ``patch_size``.

    Options for pretrained encoders (defaults keep the plain ViT): ``patch_bias`` (CLIP's patch
    convolution has none); ``pre_norm``: a LayerNorm on the embeddings before the blocks (CLIP's
    ``pre_layrnorm``); ``feature_layer``: which hidden state the encoder returns, indexed like
    Hugging Face ``hidden_states`` (0 = embeddings, ``k`` = after block ``k``, negative from the
    end; -1 = after the last block; LLaVA-1.5 uses -2), blocks after it are not run;
    ``final_norm``: ``"all"`` applies the final LayerNorm to every returned token, ``"cls"``
    only to the CLS output (CLIP: its ``post_layernorm`` only makes the pooled output),
    ``"none"`` to nothing (the hidden states LLaVA reads from a SigLIP tower).
    """

    image_size: Any
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    channels: int = 3
    use_cls: bool = True
    pos_embedding: str = "learned"
    rope_theta: float = 10000.0
    mlp_activation: str = "gelu"
    qkv_bias: bool = True
    attention: str = "softmax"
    norm_eps: float = 1e-6
    patch_bias: bool = True
    pre_norm: bool = False
    feature_layer: int = -1
    final_norm: str = "all"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        c = type(self).__name__
        size = self.image_size
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            size = (int(size), int(size))
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise ValueError(
                f"{c}.image_size={self.image_size!r}: expected an int or (height, width)"
            )
        for s in size:
            _pos_int(c, "image_size", s)
        _set(self, "image_size", (int(size[0]), int(size[1])))
        for name in ("patch_size", "width", "depth", "heads", "mlp_dim", "channels"):
            _pos_int(c, name, getattr(self, name))
        if any(s % self.patch_size for s in self.image_size):
            raise ValueError(
                f"{c}.image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"{c}.width={self.width} is not divisible by heads={self.heads}")
        _choice(c, "pos_embedding", self.pos_embedding, POS_EMBEDDINGS)
        if self.pos_embedding == "rope2d" and (self.width // self.heads) % 4:
            raise ValueError(
                f"{c}: pos_embedding='rope2d' needs head_dim = width // heads divisible by 4, got "
                f"{self.width // self.heads}"
            )
        _choice(c, "mlp_activation", self.mlp_activation, ACTIVATIONS)
        if not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"{c}.norm_eps={self.norm_eps!r}: expected a positive number")
        fl = self.feature_layer
        if (
            isinstance(fl, bool)
            or not isinstance(fl, (int, np.integer))
            or not -(self.depth + 1) <= fl <= self.depth
        ):
            raise ValueError(
                f"{c}.feature_layer={fl!r}: expected an int in [-{self.depth + 1}, {self.depth}] "
                f"(a hidden-state index of a depth-{self.depth} encoder)"
            )
        _set(self, "feature_layer", int(fl))
        _choice(c, "final_norm", self.final_norm, ("all", "cls", "none"))
        if self.final_norm == "cls" and not self.use_cls:
            raise ValueError(f"{c}.final_norm='cls' needs use_cls=True")
        _set(self, "dtype", as_dtype(self.dtype).name)
        _set(self, "param_dtype", as_dtype(self.param_dtype).name)
        self.block_config()  # validates the block fields (theta, attention spec)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row ``(gh, gw)`` at ``image_size``."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Sequence length inside the encoder (patches plus CLS)."""
        return self.num_patches + int(self.use_cls)

    @property
    def num_layers_run(self) -> int:
        """Blocks the encoder runs: ``feature_layer`` as a count from the embeddings."""
        return self.feature_layer % (self.depth + 1)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def block_config(self) -> BlockConfig:
        """The config of each encoder block: LayerNorm, GELU MLP with biases, non-causal
        attention with q/k/v/o biases, 2D RoPE or none, width on the ``"vision_embed"`` axis."""
        return BlockConfig(
            dim=self.width,
            num_heads=self.heads,
            qkv_bias=self.qkv_bias,
            out_bias=True,
            rope="rope2d" if self.pos_embedding == "rope2d" else "none",
            rope_theta=self.rope_theta,
            attention=self.attention,
            embed_axis="vision_embed",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            mlp_dim=self.mlp_dim,
            mlp="gelu",
            mlp_activation=self.mlp_activation,
            mlp_bias=True,
            norm="layernorm",
            norm_eps=self.norm_eps,
        )
