"""The KV cache: plain pytrees of static capacity, filled slot by slot per row.

``LayerCache`` holds one decoder layer's keys and values ``[B, S, Nkv, H]`` and the number of
filled slots per row; ``KVCache`` holds one ``LayerCache`` per layer and the RoPE position of the
next token per row.

Slots and positions are separate on purpose. Attention masks (``causal() & padding(...)`` with
``q_offset = length``) work on *slot* indices: the key in slot ``j`` is older than the query
written to slot ``length``. RoPE works on *positions* (``KVCache.positions``). Without
compression the two coincide; a KV press that evicts entries compacts the kept ones into slots
``0..kept-1`` (they keep the rotation they were written with) and sets ``length = kept`` while
``positions`` keeps counting, so decoding continues with the right rotation.

Extension points (for later issues):

* **Per-layer capacity.** ``KVCache.layers`` is a tuple; each layer has its own static capacity
  (``k.shape[1]``), so pyramid-style presses (PyramidKV) allocate fewer slots in deeper layers.
* **Eviction.** A press returns a new ``LayerCache`` (possibly smaller) whose first ``length``
  slots hold the kept entries in temporal order; build it with :meth:`LayerCache.replace`.
* **Quantised storage.** Any registered dataclass exposing ``k``/``v`` (dequantised on read, e.g.
  as properties over int8 codes and scales), ``length``, ``capacity`` and ``append(k, v)`` can
  stand in for ``LayerCache`` inside ``KVCache.layers``; attention only reads ``k``, ``v`` and
  ``length`` and calls ``append``.

Overflow: ``append`` runs under ``jit`` and cannot raise. Writes past the capacity are *dropped*
(scatter with ``mode="drop"``), never clamped onto earlier slots, so overflow cannot corrupt
cached entries; it is rejected before tracing at the API boundary (``generate`` checks statically
that ``prompt_len + max_new_tokens <= capacity``, and :meth:`KVCache.check_fits` does the same
for other callers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KVCache", "LayerCache", "RecurrentCache"]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's cache: ``k``, ``v`` ``[B, S, Nkv, H]`` and ``length`` int32 ``[B]``.

    Slots ``0..length[b]-1`` of row ``b`` are filled; the rest are unused (their content is
    ignored by the attention mask).
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def init(
        cls, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype: Any = jnp.float32
    ) -> LayerCache:
        """An empty cache of ``capacity`` slots per row, zero-filled."""
        batch = _check_positive_int("batch", batch)
        capacity = _check_positive_int("capacity", capacity)
        kv_heads = _check_positive_int("kv_heads", kv_heads)
        head_dim = _check_positive_int("head_dim", head_dim)
        shape = (batch, capacity, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        """Static number of slots per row."""
        return self.k.shape[1]

    def replace(self, **changes: Any) -> LayerCache:
        """A copy with some fields replaced (e.g. ``length`` after padded prefill, or a press)."""
        return dataclasses.replace(self, **changes)

    def append(self, k_new: jax.Array, v_new: jax.Array) -> LayerCache:
        """Writes ``k_new``/``v_new`` ``[B, T, Nkv, H]`` at slots ``length..length+T-1`` of each
        row and returns the cache with ``length + T``.

        Slots past the capacity are dropped (see the module docstring on overflow).
        """
        if k_new.shape != v_new.shape:
            raise ValueError(
                f"k_new and v_new must have the same shape, got {k_new.shape} and {v_new.shape}"
            )
        b, _, n, h = self.k.shape
        if k_new.ndim != 4 or k_new.shape[0] != b or k_new.shape[2:] != (n, h):
            raise ValueError(
                f"k_new must have shape [{b}, T, {n}, {h}] to match the cache, got {k_new.shape}"
            )
        t = k_new.shape[1]
        slots = self.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
        rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
        k = self.k.at[rows, slots].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[rows, slots].set(v_new.astype(self.v.dtype), mode="drop")
        return LayerCache(k=k, v=v, length=self.length + jnp.int32(t))

    def valid(self) -> jax.Array:
        """bool ``[B, S]``: which slots are filled."""
        return jnp.arange(self.capacity)[None, :] < self.length[:, None]

    def nbytes(self) -> int:
        """Allocated bytes of this layer (keys, values and lengths); static."""
        return sum(
            math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in (self.k, self.v, self.length)
        )

    def used_nbytes(self) -> jax.Array:
        """Bytes of the filled key/value slots summed over rows (int32 scalar array)."""
        per_slot = 2 * self.k.shape[2] * self.k.shape[3] * jnp.dtype(self.k.dtype).itemsize
        return jnp.sum(jnp.minimum(self.length, self.capacity)) * per_slot


def _nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecurrentCache:
    """The cache of a recurrent (linear-attention) layer: a fixed-size ``state`` pytree instead
    of per-token keys and values.

    ``state``: the variant's recurrent state (e.g. ``LinearAttentionState``: float32
    ``[B, Ns, F, dv]`` plus the normaliser ``[B, Ns, F]``), updated in place of an append;
    ``length`` int32 ``[B]``: tokens absorbed so far (slots, as for :class:`LayerCache`);
    ``kv``: a :class:`LayerCache` of the recent keys/values for hybrids with a softmax window
    (``linear_swa``), else None; ``capacity``: static token capacity (what ``generate`` checks;
    the state itself does not grow).

    Built by the layer's variant (``Attention.init_cache``); only that variant reads it.
    """

    state: Any
    length: jax.Array
    kv: LayerCache | None = None
    capacity: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    def replace(self, **changes: Any) -> RecurrentCache:
        return dataclasses.replace(self, **changes)

    def nbytes(self) -> int:
        """Allocated bytes: the state, the window cache (if any) and the lengths; static."""
        window = 0 if self.kv is None else self.kv.nbytes() - self.kv.length.size * 4
        return _nbytes(self.state) + window + self.length.size * 4

    def used_nbytes(self) -> jax.Array:
        """The state's bytes for every row that absorbed a token, plus the used window slots."""
        per_row = _nbytes(self.state) // max(self.batch, 1)
        used = jnp.sum(self.length > 0).astype(jnp.int32) * per_row
        return used if self.kv is None else used + self.kv.used_nbytes()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """All layers' caches plus ``positions`` int32 ``[B]``, the RoPE position of the next token."""

    layers: tuple
    positions: jax.Array

    @classmethod
    def init(
        cls,
        config: Any = None,
        *,
        batch: int,
        capacity: int | Sequence[int],
        num_layers: int | None = None,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        dtype: Any = None,
    ) -> KVCache:
        """An empty cache.

        Args:
          config: a model config with ``depth``, ``kv_heads``, ``head_dim`` (and ``dtype``), e.g.
            ``LanguageConfig``, or an object with such a config as ``.language`` (``MLLMConfig``).
            Leave it ``None`` and pass ``num_layers``, ``kv_heads``, ``head_dim`` explicitly.
          batch: rows.
          capacity: slots per row, one int for every layer or one int per layer.
          dtype: storage dtype; default the config's compute ``dtype``, else float32.
        """
        if config is not None:
            config = getattr(config, "language", config)
            for attr in ("depth", "kv_heads", "head_dim"):
                if not hasattr(config, attr):
                    raise ValueError(
                        f"config must have depth, kv_heads and head_dim, got "
                        f"{type(config).__name__} "
                        f"without {attr!r}"
                    )
            recurrent = getattr(config, "recurrent_layers", ())
            if recurrent:
                raise ValueError(
                    f"layers {list(recurrent)} use recurrent (linear) attention, which keeps a "
                    "state instead of keys/values: build the cache with "
                    "model.init_cache(batch, capacity) (LanguageModel; MLLMs: model.language)"
                )
            num_layers = config.depth if num_layers is None else num_layers
            kv_heads = config.kv_heads if kv_heads is None else kv_heads
            head_dim = config.head_dim if head_dim is None else head_dim
            if dtype is None:
                dtype = getattr(config, "dtype", None)
        if num_layers is None or kv_heads is None or head_dim is None:
            raise ValueError(
                "KVCache.init needs a config or all of num_layers, kv_heads, head_dim; got "
                f"num_layers={num_layers!r}, kv_heads={kv_heads!r}, head_dim={head_dim!r}"
            )
        num_layers = _check_positive_int("num_layers", num_layers)
        if isinstance(capacity, (list, tuple)):
            capacities = tuple(capacity)
            if len(capacities) != num_layers:
                raise ValueError(
                    f"capacity has {len(capacities)} entries, expected one per layer ({num_layers})"
                )
        else:
            capacities = (capacity,) * num_layers
        dtype = jnp.float32 if dtype is None else dtype
        layers = tuple(LayerCache.init(batch, c, kv_heads, head_dim, dtype) for c in capacities)
        return cls(layers=layers, positions=jnp.zeros((batch,), jnp.int32))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def capacities(self) -> tuple[int, ...]:
        """Static slots per row of each layer."""
        return tuple(layer.capacity for layer in self.layers)

    @property
    def capacity(self) -> int:
        """The smallest layer capacity: how many tokens every layer can still hold at most."""
        return min(self.capacities)

    def replace(self, **changes: Any) -> KVCache:
        return dataclasses.replace(self, **changes)

    def check_fits(self, num_tokens: int, *, what: str = "num_tokens") -> None:
        """Raises ``ValueError`` unless ``num_tokens`` (static) fit into an empty cache.

        ``jit``-compiled appends cannot raise, so callers check at the API boundary.
        """
        if num_tokens > self.capacity:
            raise ValueError(
                f"{what}={num_tokens} does not fit into the KV cache: capacity is {self.capacity} "
                f"slots per row (per layer: {self.capacities}); allocate a larger cache"
            )

    def nbytes(self) -> int:
        """Allocated bytes over all layers (static Python int)."""
        return sum(layer.nbytes() for layer in self.layers) + math.prod(self.positions.shape) * 4

    def used_nbytes(self) -> jax.Array:
        """Bytes of filled key/value slots over all layers and rows."""
        return sum(layer.used_nbytes() for layer in self.layers)
