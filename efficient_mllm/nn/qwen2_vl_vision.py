"""Qwen2-VL / Qwen2.5-VL dynamic-resolution vision tower (Wang et al., 2024, "Qwen2-VL",
arXiv:2409.12191; Bai et al., 2025, "Qwen2.5-VL Technical Report", arXiv:2502.13923).

Input: the flattened patches of all images packed into one sequence, ``[N, C * T * P * P]``
(each patch flattened in ``(channel, frame, row, col)`` order, as the Hugging Face processor
emits them: per image, raster order over ``merge x merge`` blocks and raster order inside each
block), plus the static per-image grid ``grid_thw = ((t, h, w), ...)`` in patches. A linear patch
embedding (the stride-``P`` Conv3d) -> ``depth`` pre-norm blocks with 2D rotary embeddings of
each patch's (row, col) -> the patch merger (norm, then each ``merge x merge`` block of
consecutive tokens concatenated and sent through Linear-GELU-Linear) -> ``[N / merge^2, out_dim]``.

Attention is block-diagonal, expressed as ``segment_ids`` masks for
``ops.attention.dot_product_attention``: full-attention blocks see their own frame of their own
image; Qwen2.5-VL's window blocks (all but ``fullatt_block_indexes``) see only the patches of
the same ``window x window`` tile of merged tokens (``window = window_size // merge //
patch_size``, tiles anchored at the top-left corner, partial tiles at the right/bottom edges).
Hugging Face permutes the tokens so that windows are contiguous and runs variable-length
attention; attention with a segment mask is permutation-equivariant, so this module keeps the
processor's order and needs no permutation.

Qwen2-VL blocks: LayerNorm, GELU-family MLP (``quick_gelu``), LayerNorm merger. Qwen2.5-VL
blocks: RMSNorm, SwiGLU MLP with biases, RMSNorm merger, window attention. Both: fused ``qkv``
projection with bias, output projection with bias, eps ``1e-6``.

For visual-token compressors, ``probe_blocks`` adds the mean-query attention probe of chosen
blocks (:func:`mean_query_probe`: the ViT has no [CLS]; per full-attention frame or per window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm.nn.config import DictMixin, as_dtype
from efficient_mllm.nn.layers import GeluMLP, Linear, SwiGLUMLP, activation, make_norm
from efficient_mllm.ops import masks as masks_lib
from efficient_mllm.ops import rope as rope_ops
from efficient_mllm.ops.attention import dot_product_attention

__all__ = [
    "QwenVisionConfig",
    "QwenVisionOutput",
    "QwenVisionTransformer",
    "check_grid_thw",
    "mean_query_probe",
    "vision_layout",
]


def _pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"QwenVisionConfig.{name}={value!r}: expected a positive int")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenVisionConfig(DictMixin):
    """Hyper-parameters of :class:`QwenVisionTransformer` (frozen, hashable, dict round-trip).

    ``width``: ViT width (HF ``embed_dim`` in Qwen2-VL, ``hidden_size`` in Qwen2.5-VL);
    ``out_dim``: merger output = LLM width. ``norm``: ``"layernorm"`` (Qwen2-VL) or
    ``"rmsnorm"`` (Qwen2.5-VL), used in the blocks and the merger. ``mlp``: ``"gelu"`` (fc1/fc2
    with ``mlp_activation``) or ``"swiglu"`` (gate/up/down with biases, silu).
    ``window_size`` (pixels) with ``fullatt_block_indexes``: Qwen2.5-VL window attention; None
    means every block attends over the whole frame (Qwen2-VL).
    """

    width: int
    depth: int
    heads: int
    mlp_dim: int
    out_dim: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    norm: str = "layernorm"
    mlp: str = "gelu"
    mlp_activation: str = "quick_gelu"
    window_size: int | None = None
    fullatt_block_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    impl: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "width",
            "depth",
            "heads",
            "mlp_dim",
            "out_dim",
            "patch_size",
            "temporal_patch_size",
            "in_channels",
            "spatial_merge_size",
        ):
            _pos_int(name, getattr(self, name))
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ValueError(
                f"QwenVisionConfig.width={self.width}, heads={self.heads}: expected head_dim = "
                "width // heads, an integer divisible by 4 (2D rotary embedding)"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(
                f"QwenVisionConfig.norm={self.norm!r}: expected 'layernorm' or 'rmsnorm'"
            )
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"QwenVisionConfig.mlp={self.mlp!r}: expected 'gelu' or 'swiglu'")
        activation(self.mlp_activation)
        if self.mlp == "swiglu" and self.mlp_activation != "silu":
            raise ValueError(
                f"QwenVisionConfig.mlp_activation={self.mlp_activation!r}: the swiglu MLP uses "
                "'silu'"
            )
        if self.window_size is not None:
            _pos_int("window_size", self.window_size)
            if self.window_size // self.spatial_merge_size // self.patch_size < 1:
                raise ValueError(
                    f"QwenVisionConfig.window_size={self.window_size}: expected at least "
                    f"spatial_merge_size * patch_size = "
                    f"{self.spatial_merge_size * self.patch_size} pixels"
                )
        idx = tuple(int(i) for i in self.fullatt_block_indexes)
        if any(not 0 <= i < self.depth for i in idx):
            raise ValueError(
                f"QwenVisionConfig.fullatt_block_indexes={self.fullatt_block_indexes!r}: expected "
                f"block indices in [0, {self.depth})"
            )
        object.__setattr__(self, "fullatt_block_indexes", idx)
        if not self.rope_theta > 1:
            raise ValueError(f"QwenVisionConfig.rope_theta={self.rope_theta!r}: expected > 1")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        if not self.norm_eps > 0:
            raise ValueError(f"QwenVisionConfig.norm_eps={self.norm_eps!r}: expected > 0")
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        object.__setattr__(self, "dtype", as_dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype).name)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_merged(self) -> int | None:
        """Window side in merged tokens (None without window attention)."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size

    def is_window_block(self, index: int) -> bool:
        return self.window_size is not None and index not in self.fullatt_block_indexes


def check_grid_thw(grid_thw: Any, merge: int) -> tuple[tuple[int, int, int], ...]:
    """``grid_thw`` as a tuple of ``(t, h, w)`` positive ints with ``h, w`` divisible by
    ``merge``; raises ``ValueError`` otherwise (a traced array cannot be a grid: it is static)."""
    if isinstance(grid_thw, jax.core.Tracer):
        raise ValueError(
            "grid_thw is a traced array: it fixes the shapes, so pass it as static Python ints "
            "or a numpy array"
        )
    try:
        rows = [tuple(int(v) for v in row) for row in np.asarray(grid_thw).reshape(-1, 3)]
        ok = np.asarray(grid_thw).ndim == 2
    except (TypeError, ValueError):
        ok = False
    if not ok or not rows:
        raise ValueError(f"grid_thw={grid_thw!r}: expected [num_images, 3] ints (t, h, w)")
    for t, h, w in rows:
        if min(t, h, w) <= 0 or h % merge or w % merge:
            raise ValueError(
                f"grid_thw row {(t, h, w)}: expected positive (t, h, w) with h and w divisible "
                f"by spatial_merge_size={merge}"
            )
    return tuple(rows)


def vision_layout(grid_thw, merge: int, window: int | None = None):
    """Static (numpy) per-patch layout of packed images, in the processor's patch order.

    Returns ``(positions int32 [N, 2], frame_ids int32 [N], window_ids int32 [N] | None)``:
    each patch's (row, col) in its image, the index of its (image, frame) among all frames
    (the full-attention segments), and the index of its window tile among all tiles (with
    ``window`` merged tokens per tile side).
    """
    grid_thw = check_grid_thw(grid_thw, merge)
    pos, frames, windows = [], [], []
    n_frames = n_windows = 0
    for t, h, w in grid_thw:
        hm, wm = h // merge, w // merge
        # Block-major order: merged row, merged col, row in block, col in block.
        bi, bj, ii, jj = np.meshgrid(
            np.arange(hm), np.arange(wm), np.arange(merge), np.arange(merge), indexing="ij"
        )
        rows = (bi * merge + ii).reshape(-1)
        cols = (bj * merge + jj).reshape(-1)
        pos.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
        frames.append(np.repeat(np.arange(t) + n_frames, h * w))
        n_frames += t
        if window is not None:
            nwh, nww = -(-hm // window), -(-wm // window)
            tile = ((bi // window) * nww + bj // window).reshape(-1)
            per_frame = nwh * nww
            windows.append(
                np.concatenate([tile + n_windows + f * per_frame for f in range(t)])
            )
            n_windows += t * per_frame
    positions = np.concatenate(pos).astype(np.int32)
    frame_ids = np.concatenate(frames).astype(np.int32)
    window_ids = None if window is None else np.concatenate(windows).astype(np.int32)
    return positions, frame_ids, window_ids


class VisionAttention(nnx.Module):
    """Non-causal attention with a fused ``qkv`` projection (kernel ``[D, 3, heads, head_dim]``,
    q/k/v stacked in that order, with bias), 2D RoPE and an output projection with bias."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, h = cfg.width, cfg.heads, cfg.head_dim
        kw = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        self.qkv = Linear(
            d, (3, n, h), axes=("vision_embed", None, "heads", "head_dim"), use_bias=True,
            rngs=rngs, **kw,
        )
        self.proj = Linear(
            (n, h), d, axes=("heads", "head_dim", "vision_embed"), use_bias=True, rngs=rngs, **kw
        )

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask) -> jax.Array:
        """``x [B, N, D]``, ``positions [B, N, 2]``, ``mask`` a MaskSpec -> ``[B, N, D]``."""
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = rope_ops.apply_rope_2d(q, positions, theta=self.cfg.rope_theta)  # float32 inside
        k = rope_ops.apply_rope_2d(k, positions, theta=self.cfg.rope_theta)
        out = dot_product_attention(q, k, v, mask=mask, impl=self.cfg.impl)
        return self.proj(out.astype(x.dtype))


class VisionBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm_kw = {"eps": cfg.norm_eps, "axis": "vision_embed", "dtype": dtype,
                   "param_dtype": pdtype}
        self.norm1 = make_norm(cfg.norm, cfg.width, **norm_kw)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = make_norm(cfg.norm, cfg.width, **norm_kw)
        mlp_kw = {"use_bias": True, "embed_axis": "vision_embed", "dtype": dtype,
                  "param_dtype": pdtype, "rngs": rngs}
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLUMLP(cfg.width, cfg.mlp_dim, **mlp_kw)
        else:
            self.mlp = GeluMLP(
                cfg.width, cfg.mlp_dim, activation_name=cfg.mlp_activation, **mlp_kw
            )

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask) -> jax.Array:
        x = x + self.attn(self.norm1(x), positions=positions, mask=mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """``norm`` then each ``merge^2`` consecutive tokens concatenated -> ``fc1`` -> GELU (erf)
    -> ``fc2``: ``[N, D] -> [N / merge^2, out_dim]``."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.unit = cfg.spatial_merge_size**2
        hidden = cfg.width * self.unit
        self.norm = make_norm(
            cfg.norm, cfg.width, eps=1e-6, axis="vision_embed", dtype=dtype, param_dtype=pdtype
        )
        kw = {"use_bias": True, "dtype": dtype, "param_dtype": pdtype, "rngs": rngs}
        self.fc1 = Linear(hidden, hidden, axes=(None, "mlp"), **kw)
        self.fc2 = Linear(hidden, cfg.out_dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        x = x.reshape(*x.shape[:-2], x.shape[-2] // self.unit, self.unit * x.shape[-1])
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


@dataclasses.dataclass(frozen=True)
class QwenVisionOutput:
    """``merged [N / merge^2, out_dim]`` (LLM-ready image tokens, per image in order, raster
    over merged rows/cols), ``hidden [N, D]`` (last block's output, patch order) and ``probes
    [L, N] | None`` (float32 mean-query attention probe of each requested block, see
    :func:`mean_query_probe`)."""

    merged: jax.Array
    hidden: jax.Array
    probes: jax.Array | None = None


jax.tree_util.register_dataclass(
    QwenVisionOutput, data_fields=["merged", "hidden", "probes"], meta_fields=[]
)


def mean_query_probe(
    attn: VisionAttention, x: jax.Array, positions: jax.Array, segments: np.ndarray
) -> jax.Array:
    """Mean-query attention probe of a ViT block per attention segment: float32 ``[N]``.

    ``x [1, N, D]`` is the attention input (after ``norm1``), ``segments [N]`` (static ints) the
    block's attention segments (frames of images for full-attention blocks, windows for
    Qwen2.5-VL's window blocks). For each segment ``s`` the query is the mean of its post-RoPE
    queries ``q_bar_s = mean_{i in s} q_i`` and token ``j`` gets ``mean_heads softmax_{j in s}
    (q_bar_s . k_j / sqrt(head_dim))``: the definition ``nn.vision`` uses for encoders without
    [CLS] (``attention_row(query_index="mean")``), over the keys the block attends to, so the
    scores sum to 1 within each segment. ``O(N * heads * head_dim)``; no ``N x N`` map."""
    seg_np = np.asarray(segments)
    _, seg = np.unique(seg_np, return_inverse=True)
    num = int(seg.max()) + 1
    seg = jnp.asarray(seg.reshape(-1), jnp.int32)
    qkv = attn.qkv(x)
    q = rope_ops.apply_rope_2d(qkv[:, :, 0], positions, theta=attn.cfg.rope_theta)[0]
    k = rope_ops.apply_rope_2d(qkv[:, :, 1], positions, theta=attn.cfg.rope_theta)[0]
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)  # [N, H, d]
    count = jax.ops.segment_sum(jnp.ones(seg.shape, jnp.float32), seg, num)
    q_bar = jax.ops.segment_sum(q, seg, num) / count[:, None, None]
    logits = jnp.einsum("nhd,nhd->nh", q_bar[seg], k) / np.sqrt(q.shape[-1])
    peak = jax.ops.segment_max(logits, seg, num)
    e = jnp.exp(logits - peak[seg])
    probs = e / jax.ops.segment_sum(e, seg, num)[seg]
    return probs.mean(axis=-1)


class QwenVisionTransformer(nnx.Module):
    """The Qwen2-VL / Qwen2.5-VL ViT. Params: ``patch_embed`` (Linear ``[C*T*P*P, D]``, no bias;
    a Conv3d kernel ``[D, C, T, P, P]`` converts with ``reshape(D, -1).T``), ``blocks``,
    ``merger``."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        if isinstance(cfg, dict):
            cfg = QwenVisionConfig.from_dict(cfg)
        if not isinstance(cfg, QwenVisionConfig):
            raise ValueError(f"cfg={cfg!r}: expected a QwenVisionConfig")  # noqa: TRY004
        self.cfg = cfg
        self.patch_embed = Linear(
            cfg.patch_dim,
            cfg.width,
            axes=("patch", "vision_embed"),
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, rngs=rngs)

    def num_tokens(self, grid_thw: Sequence[Sequence[int]]) -> int:
        """Merged output tokens for ``grid_thw`` (static)."""
        m = self.cfg.spatial_merge_size
        return sum(t * h * w for t, h, w in check_grid_thw(grid_thw, m)) // (m * m)

    def __call__(
        self, patches: jax.Array, grid_thw: Any, *, probe_blocks: Sequence[int] = ()
    ) -> QwenVisionOutput:
        """``patches [N, C*T*P*P]`` float, ``grid_thw`` static ``[num_images, 3]`` ->
        :class:`QwenVisionOutput`; ``probe_blocks``: block indices (in ``[0, depth)``) whose
        :func:`mean_query_probe` on their input fills ``probes``, in that order."""
        cfg = self.cfg
        probe_blocks = tuple(probe_blocks)
        if any(
            isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < cfg.depth
            for i in probe_blocks
        ):
            raise ValueError(
                f"probe_blocks={probe_blocks!r}: expected block indices in [0, {cfg.depth})"
            )
        grid_thw = check_grid_thw(grid_thw, cfg.spatial_merge_size)
        n = sum(t * h * w for t, h, w in grid_thw)
        if getattr(patches, "ndim", None) != 2 or tuple(patches.shape) != (n, cfg.patch_dim):
            raise ValueError(
                f"patches shape={tuple(getattr(patches, 'shape', ()))}: expected "
                f"[{n}, {cfg.patch_dim}] (sum of t*h*w over grid_thw={grid_thw}, C*T*P*P)"
            )
        positions, frames, windows = vision_layout(
            grid_thw, cfg.spatial_merge_size, cfg.window_merged
        )
        positions = jnp.asarray(positions)[None]
        full = masks_lib.segment_ids(jnp.asarray(frames)[None])
        windowed = None if windows is None else masks_lib.segment_ids(jnp.asarray(windows)[None])
        x = self.patch_embed(patches.astype(jnp.dtype(cfg.dtype)))[None]
        rows = {}
        for i, block in enumerate(self.blocks):
            mask = windowed if cfg.is_window_block(i) else full
            if i in probe_blocks:
                seg = windows if cfg.is_window_block(i) else frames
                rows[i] = mean_query_probe(block.attn, block.norm1(x), positions, seg)
            x = block(x, positions=positions, mask=mask)
        hidden = x[0]
        probes = jnp.stack([rows[i] for i in probe_blocks]) if probe_blocks else None
        return QwenVisionOutput(merged=self.merger(hidden), hidden=hidden, probes=probes)
