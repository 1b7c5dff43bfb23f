"""Decoder-only language model of the Llama / Qwen2 family.

Token embedding -> ``depth`` pre-norm blocks (RMSNorm, GQA attention with 1D RoPE or Qwen2-VL
M-RoPE, SwiGLU MLP) -> final RMSNorm -> LM head (tied to the embedding or separate). The same
``__call__`` serves training (no cache: ``causal() & padding(lengths)``), chunked prefill and
decoding (with a :class:`~efficient_mllm.kvcache.cache.KVCache`).

Layer hooks. ``layer_hook(layer_idx, hidden, state) -> (hidden, state)`` runs before each block
(``layer_idx = 0 .. depth-1``). ``state`` is a :class:`LayerState` carrying the position ids,
the valid-token counts, the extra mask and ``token_index`` (for each current row, its index in
the input sequence). In-LLM compressors (FastV, SparseVLM, MoD routing) drop or reorder tokens by
gathering ``hidden``, ``state.positions`` and ``state.token_index`` consistently (and rebuilding
``state.mask`` / ``state.lengths``); scores come from a probe such as
``compress.probe.block_probe(model.blocks[i], ...)`` (close over the model). A ``block_fn`` wraps
each block instead (mixture-of-depths: only routed tokens enter the block and its cache, the
others keep their hidden state). ``state.extra`` is a dict the hook
owns (statistics, routing weights) and is returned in :class:`LanguageOutput`. When the hook
changed ``token_index``, the final hidden states are scattered back to the input layout (dropped
tokens get zeros) so ``hidden``/``logits`` always index the input sequence. With a cache, each
layer caches the tokens it saw (layers after a drop hold fewer), and ``KVCache.positions``
advances by the input positions, not by the tokens kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import registry
from efficient_mllm.kvcache.cache import KVCache
from efficient_mllm.nn.config import BlockConfig, DictMixin, as_dtype
from efficient_mllm.nn.layers import Embed, Linear, RMSNorm
from efficient_mllm.nn.transformer import TransformerBlock
from efficient_mllm.ops import masks as masks_lib

__all__ = ["LanguageConfig", "LanguageModel", "LanguageOutput", "LayerState", "default_positions"]

ROPE_TYPES = ("rope", "mrope")


def _pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"LanguageConfig.{name}={value!r}: expected a positive int")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LanguageConfig(DictMixin):
    """Hyper-parameters of :class:`LanguageModel` (frozen, hashable, dict round-trip).

    ``head_dim`` defaults to ``width // heads``; ``kv_heads`` (GQA) defaults to ``heads``.
    ``rope_type`` is ``"rope"`` (positions ``[B, T]``) or ``"mrope"`` (positions ``[3, B, T]``,
    ``mrope_sections = (t, h, w)`` frequency pairs summing to ``head_dim // 2``).
    ``rope_scaling`` is a Hugging Face ``rope_scaling`` dict (stored as sorted items).
    ``attention`` is a ``registry.ATTENTION`` spec string. ``dtype`` is the compute dtype,
    ``param_dtype`` the storage dtype of the parameters (names: float32, bfloat16, float16).
    ``out_bias`` / ``mlp_bias``: biases on the attention output and the MLP projections (HF
    Llama's ``attention_bias`` sets q/k/v and out biases, ``mlp_bias`` the MLP's).
    """

    vocab_size: int
    width: int
    depth: int
    heads: int
    kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    rope_type: str = "rope"
    mrope_sections: tuple[int, int, int] | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    attention: str = "softmax"
    layer_attention: tuple[str, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "heads", "mlp_dim"):
            _pos_int(name, getattr(self, name))
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", int(self.heads))
        _pos_int("kv_heads", self.kv_heads)
        if self.heads % self.kv_heads:
            raise ValueError(
                f"LanguageConfig.heads={self.heads} must be a multiple of kv_heads={self.kv_heads}"
            )
        if self.head_dim is None:
            if self.width % self.heads:
                raise ValueError(
                    f"LanguageConfig.width={self.width} is not divisible by heads={self.heads}; "
                    "set head_dim"
                )
            object.__setattr__(self, "head_dim", self.width // self.heads)
        _pos_int("head_dim", self.head_dim)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"LanguageConfig.rope_type={self.rope_type!r}: expected one of {ROPE_TYPES}"
            )
        if self.mrope_sections is not None:
            if isinstance(self.mrope_sections, (str, bytes)) or not hasattr(
                self.mrope_sections, "__len__"
            ):
                raise ValueError(
                    f"LanguageConfig.mrope_sections={self.mrope_sections!r}: expected (t, h, w)"
                )
            object.__setattr__(self, "mrope_sections", tuple(int(s) for s in self.mrope_sections))
        for name in ("qkv_bias", "out_bias", "mlp_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(  # noqa: TRY004
                    f"LanguageConfig.{name}={getattr(self, name)!r}: expected a bool"
                )
        object.__setattr__(self, "dtype", as_dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype).name)
        if not isinstance(self.attention, str):
            raise ValueError(  # noqa: TRY004
                f"LanguageConfig.attention={self.attention!r}: expected a spec string"
            )
        registry.parse_spec(self.attention)
        if isinstance(self.layer_attention, str) or not isinstance(
            self.layer_attention, (tuple, list)
        ):
            raise ValueError(
                f"LanguageConfig.layer_attention={self.layer_attention!r}: expected a tuple of "
                f"spec strings, one per layer ({self.depth}), or () for `attention` everywhere"
            )
        object.__setattr__(self, "layer_attention", tuple(self.layer_attention))
        if self.layer_attention:
            if len(self.layer_attention) != self.depth:
                raise ValueError(
                    f"LanguageConfig.layer_attention has {len(self.layer_attention)} entries: "
                    f"expected one per layer (depth={self.depth})"
                )
            for spec in self.layer_attention:
                if not isinstance(spec, str):
                    raise ValueError(  # noqa: TRY004
                        f"LanguageConfig.layer_attention entry {spec!r}: expected a spec string"
                    )
                registry.parse_spec(spec)
        # The block config validates rope (theta, scaling, sections), norm_eps and head_dim.
        block = self.block_config()
        object.__setattr__(self, "rope_theta", block.rope_theta)
        object.__setattr__(self, "rope_scaling", block.rope_scaling)
        object.__setattr__(self, "norm_eps", block.norm_eps)

    def layer_specs(self) -> tuple[str, ...]:
        """The attention spec of every layer (``layer_attention``, else ``attention``)."""
        return self.layer_attention or (self.attention,) * self.depth

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """Layers whose attention variant keeps a recurrent state instead of keys/values."""
        out = []
        for i, spec in enumerate(self.layer_specs()):
            name, _ = registry.parse_spec(spec)
            if getattr(registry.ATTENTION.get(name).factory, "recurrent", False):
                out.append(i)
        return tuple(out)

    def block_config(self, layer: int | None = None) -> BlockConfig:
        """The config of decoder block ``layer`` (RMSNorm, SwiGLU; biases as ``qkv_bias``,
        ``out_bias``, ``mlp_bias``); ``layer=None`` uses ``attention``."""
        return BlockConfig(
            dim=self.width,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias,
            out_bias=self.out_bias,
            rope=self.rope_type,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            mrope_sections=self.mrope_sections,
            attention=self.attention if layer is None else self.layer_specs()[layer],
            embed_axis="embed",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            mlp_dim=self.mlp_dim,
            mlp="swiglu",
            mlp_bias=self.mlp_bias,
            norm="rmsnorm",
            norm_eps=self.norm_eps,
        )

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def scaling(self) -> dict | None:
        """``rope_scaling`` as a dict (or None)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerState:
    """What a layer hook sees and may change (see the module docstring).

    * ``positions``: ``[B, T]`` (rope) or ``[3, B, T]`` (mrope) ids of the current tokens.
    * ``lengths``: int32 ``[B]`` valid (non-padding) tokens per row among the current ones, or
      None (all valid).
    * ``token_index``: int32 ``[B, T]``, each current token's index in the input sequence.
    * ``mask``: extra ``MaskSpec`` and-ed with ``causal()`` and padding, or None.
    * ``extra``: dict owned by the hook.
    """

    positions: jax.Array
    lengths: jax.Array | None
    token_index: jax.Array
    mask: Any
    extra: dict

    def replace(self, **changes: Any) -> LayerState:
        return dataclasses.replace(self, **changes)


class LanguageOutput(NamedTuple):
    """``logits`` float32 ``[B, T, V]`` (or ``[B, Q, V]`` with ``logits_at``), ``hidden``
    ``[B, T, D]`` (after the final norm), ``cache`` (updated ``KVCache`` or None) and ``state``
    (the final :class:`LayerState`; ``state.extra`` holds what hooks recorded)."""

    logits: jax.Array
    hidden: jax.Array
    cache: KVCache | None
    state: LayerState


LayerHook = Callable[[int, jax.Array, LayerState], "tuple[jax.Array, LayerState]"]
BlockFn = Callable[[int, Callable, jax.Array, LayerState], "tuple[jax.Array, LayerState]"]


def _run_block(block, x: jax.Array, state: LayerState, layer_cache, parts: bool = False):
    """One decoder block on ``x`` (valid tokens first, ``state.lengths`` of them per row):
    causal + padding (+ ``state.mask``) attention; with ``layer_cache`` the tokens' keys/values
    are appended and its length advances by ``state.lengths`` (padding slots are reused).
    With ``parts`` it returns ``((residual, mlp_out), cache)`` of the pre-norm block instead of
    ``residual + mlp_out`` (``residual = x + attn(norm(x))``, ``mlp_out = mlp(norm(residual))``).
    """
    cur_t = x.shape[1]
    spec = masks_lib.causal()
    if layer_cache is None:
        q_offset = None
        if state.lengths is not None:
            spec = spec & masks_lib.padding(state.lengths)
    else:  # the keys of padding tokens are written but never attended (nor absorbed by a
        # recurrent state); later tokens overwrite their slots
        q_offset = layer_cache.length
        spec = spec & masks_lib.padding(q_offset + (cur_t if state.lengths is None else state.lengths))
    if state.mask is not None:
        spec = spec & state.mask
    if parts:
        h, new_cache = block.attn(
            block.attn_norm(x),
            positions=state.positions,
            mask=spec,
            q_offset=q_offset,
            cache=layer_cache,
        )
        residual = x + h
        x = (residual, block.mlp(block.mlp_norm(residual)))
    else:
        x, new_cache = block(
            x, positions=state.positions, mask=spec, q_offset=q_offset, cache=layer_cache
        )
    if layer_cache is not None:
        added = cur_t if state.lengths is None else state.lengths
        new_cache = new_cache.replace(length=layer_cache.length + added)
    return x, new_cache


def default_positions(batch: int, length: int, rope_type: str, start: jax.Array | None = None):
    """Position ids ``start[b] + t`` (``start`` int32 ``[B]``, default 0): ``[B, T]`` for rope,
    the same ids on all three axes ``[3, B, T]`` for mrope."""
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))
    if start is not None:
        pos = pos + start.astype(jnp.int32)[:, None]
    if rope_type == "mrope":
        pos = jnp.broadcast_to(pos[None], (3, batch, length))
    return pos


class LanguageModel(nnx.Module):
    """Llama / Qwen2-style decoder. Params: ``embed`` (``Embed [vocab, embed]``), ``blocks``
    (``TransformerBlock`` list), ``norm`` (final RMSNorm), ``lm_head`` (``Linear [embed, vocab]``,
    None when ``tie_embeddings``)."""

    def __init__(self, cfg: LanguageConfig, *, rngs: nnx.Rngs):
        if isinstance(cfg, Mapping):
            cfg = LanguageConfig.from_dict(cfg)
        if not isinstance(cfg, LanguageConfig):
            raise ValueError(f"cfg={cfg!r}: expected a LanguageConfig")  # noqa: TRY004
        self.cfg = cfg
        dtype, pdtype = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.blocks = nnx.List(
            [TransformerBlock(cfg.block_config(i), rngs=rngs) for i in range(cfg.depth)]
        )
        self.norm = RMSNorm(cfg.width, eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.width,
                cfg.vocab_size,
                axes=("embed", "vocab"),
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
        )

    # -- pieces ------------------------------------------------------------------------------

    def init_cache(self, batch: int, capacity: Any, dtype: Any = None) -> KVCache:
        """An empty cache with one entry per layer: a ``LayerCache`` of ``capacity`` slots (an
        int, or one per layer), or
        a fixed-size ``RecurrentCache`` for linear-attention layers. ``dtype``: key/value
        storage (default the compute dtype)."""
        caps = tuple(capacity) if isinstance(capacity, (tuple, list)) else (capacity,) * len(self.blocks)
        if len(caps) != len(self.blocks):
            raise ValueError(
                f"capacity has {len(caps)} entries: expected an int or one per layer "
                f"({len(self.blocks)})"
            )
        layers = tuple(blk.attn.init_cache(batch, c, dtype) for blk, c in zip(self.blocks, caps))
        return KVCache(layers=layers, positions=jnp.zeros((batch,), jnp.int32))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, T]`` int -> embeddings ``[B, T, D]`` in the compute dtype."""
        return self.embed(tokens)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final-normed ``hidden [..., D]`` -> float32 logits ``[..., V]``."""
        if self.lm_head is None:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def _check_positions(self, positions, batch: int, length: int):
        positions = jnp.asarray(positions)
        want = (3, batch, length) if self.cfg.rope_type == "mrope" else (batch, length)
        if positions.shape != want or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(
                f"positions shape={tuple(positions.shape)} dtype={positions.dtype}: expected int "
                f"{list(want)} for rope_type={self.cfg.rope_type!r}"
            )
        return positions.astype(jnp.int32)

    # -- forward -----------------------------------------------------------------------------

    def __call__(
        self,
        inputs: jax.Array,
        *,
        positions: jax.Array | None = None,
        lengths: jax.Array | None = None,
        mask: Any = None,
        cache: KVCache | None = None,
        layer_hook: LayerHook | None = None,
        block_fn: BlockFn | None = None,
        logits_at: jax.Array | None = None,
    ) -> LanguageOutput:
        """Runs the decoder.

        Args:
          inputs: int tokens ``[B, T]`` or embeddings ``[B, T, D]``.
          positions: ``[B, T]`` (rope) / ``[3, B, T]`` (mrope) ids; default ``start + arange(T)``
            with ``start = cache.positions`` (0 without a cache).
          lengths: int32 ``[B]`` valid tokens per row in ``inputs`` (right padding); None = all.
          mask: extra ``MaskSpec`` and-ed with ``causal()`` and padding (e.g. ``modality_mutual``;
            arrays read at absolute key slots, so with a cache they must cover ``old + T``).
          cache: a ``KVCache``; new keys/values go to slots ``length .. length + T - 1`` of each
            layer, queries use ``q_offset = length`` (per row). Afterwards each layer's length is
            ``old + lengths`` (padding slots are reused by the next call) and
            ``cache.positions`` is one past the largest valid position id.
          layer_hook: ``hook(layer_idx, hidden, state) -> (hidden, state)`` before each block.
          block_fn: ``block_fn(layer_idx, run, hidden, state) -> (hidden, state)`` wraps each
            block: ``run(h, s) -> h_out`` runs block ``layer_idx`` on the tokens ``h``
            (``[B, T', D]``, ``s`` their :class:`LayerState`: positions, valid-first layout with
            ``s.lengths``) and writes exactly their keys/values to the cache (length advances by
            ``s.lengths``); ``run(h, s, parts=True) -> (residual, mlp_out)`` returns the two
            terms of the pre-norm block's output. It must be called once per layer.
            Mixture-of-depths routing uses it: only routed tokens enter the block and the
            layer's cache, the others skip it.
          logits_at: int32 ``[B, Q]`` input indices at which to compute logits (saves the
            ``[B, T, V]`` head); default all positions.
        """
        cfg = self.cfg
        inputs = jnp.asarray(inputs)
        if inputs.ndim == 2 and jnp.issubdtype(inputs.dtype, jnp.integer):
            x = self.embed(inputs)
        elif (
            inputs.ndim == 3
            and jnp.issubdtype(inputs.dtype, jnp.floating)
            and inputs.shape[-1] == cfg.width
        ):
            x = inputs.astype(cfg.compute_dtype)
        else:
            raise ValueError(
                f"inputs dtype={inputs.dtype} shape={tuple(inputs.shape)}: expected int tokens "
                f"[B, T] or float embeddings [B, T, {cfg.width}]"
            )
        b, t = x.shape[:2]
        if lengths is not None:
            lengths = jnp.asarray(lengths)
            if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
                raise ValueError(
                    f"lengths shape={tuple(lengths.shape)} dtype={lengths.dtype}: "
                    f"expected int [{b}]"
                )
            lengths = lengths.astype(jnp.int32)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ValueError(f"cache={type(cache).__name__}: expected a KVCache or None")
            if cache.num_layers != cfg.depth or cache.batch != b:
                raise ValueError(
                    f"cache has {cache.num_layers} layers and batch {cache.batch}: expected "
                    f"{cfg.depth} layers and batch {b}"
                )
        if positions is None:
            positions = default_positions(
                b, t, cfg.rope_type, None if cache is None else cache.positions
            )
        positions = self._check_positions(positions, b, t)
        if mask is not None:
            mask = masks_lib.as_mask(mask)

        token_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        state = LayerState(
            positions=positions, lengths=lengths, token_index=token_index, mask=mask, extra={}
        )
        new_layers = []
        for i, block in enumerate(self.blocks):
            if layer_hook is not None:
                x, state = layer_hook(i, x, state)
            layer_cache = None if cache is None else cache.layers[i]
            written: list = []

            def run(h, s, parts=False, block=block, layer_cache=layer_cache, written=written, i=i):
                if written:
                    raise ValueError(f"block_fn called run() twice at layer {i}: expected once")
                h, c = _run_block(block, h, s, layer_cache, parts)
                written.append(c)
                return h

            if block_fn is None:
                x = run(x, state)
            else:
                x, state = block_fn(i, run, x, state)
                if not written:
                    raise ValueError(f"block_fn did not call run() at layer {i}: expected once")
            if cache is not None:
                new_layers.append(written[0])

        x = self.norm(x)
        if state.token_index is not token_index:
            rows = jnp.arange(b)[:, None]
            x = (
                jnp.zeros((b, t, x.shape[-1]), x.dtype)
                .at[rows, state.token_index]
                .set(x, mode="drop")
            )
        if logits_at is None:
            logits = self.head(x)
        else:
            logits_at = jnp.asarray(logits_at, jnp.int32)
            if logits_at.ndim != 2 or logits_at.shape[0] != b:
                raise ValueError(f"logits_at shape={tuple(logits_at.shape)}: expected int [{b}, Q]")
            logits = self.head(jnp.take_along_axis(x, logits_at[:, :, None], axis=1))

        new_cache = None
        if cache is not None:
            valid = (
                jnp.ones((b, t), bool)
                if lengths is None
                else jnp.arange(t)[None, :] < lengths[:, None]
            )
            pos = positions if positions.ndim == 3 else positions[None]
            last = jnp.max(jnp.where(valid[None], pos, -1), axis=(0, 2))
            next_pos = jnp.where(jnp.any(valid, axis=1), last + 1, cache.positions)
            new_cache = KVCache(layers=tuple(new_layers), positions=next_pos.astype(jnp.int32))
        return LanguageOutput(logits=logits, hidden=x, cache=new_cache, state=state)

    # -- generation helpers ------------------------------------------------------------------

    def prefill(
        self,
        tokens: jax.Array,
        lengths: jax.Array | None,
        cache: KVCache,
        *,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Writes the prompt ``tokens [B, T]`` (``lengths`` valid per row) into ``cache``;
        returns float32 logits ``[B, V]`` at each row's last valid token and the cache."""
        b, t = jnp.shape(tokens)[:2]
        last = (
            jnp.full((b,), t - 1, jnp.int32)
            if lengths is None
            else jnp.maximum(jnp.asarray(lengths, jnp.int32) - 1, 0)
        )
        out = self(
            tokens, positions=positions, lengths=lengths, cache=cache, logits_at=last[:, None]
        )
        return out.logits[:, 0], out.cache

    def decode(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step: ``tokens [B, 1]`` at ``cache.positions`` -> (logits ``[B, V]``, cache)."""
        if jnp.ndim(tokens) != 2 or jnp.shape(tokens)[1] != 1:
            raise ValueError(f"tokens shape={tuple(jnp.shape(tokens))}: expected [B, 1]")
        out = self(tokens, cache=cache)
        return out.logits[:, 0], out.cache
