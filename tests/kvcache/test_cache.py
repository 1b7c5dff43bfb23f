"""KV cache pytree: slot writes per row, overflow handling, byte accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_mllm.kvcache.cache import KVCache, LayerCache
from efficient_mllm.nn.language import LanguageConfig


def _rand(key, shape):
    return np.asarray(jax.random.normal(jax.random.key(key), shape), np.float32)


def test_append_writes_slots_per_row():
    b, s, n, h = 3, 12, 2, 4
    cache = LayerCache.init(b, s, n, h, jnp.float32)
    ref_k = np.zeros((b, s, n, h), np.float32)
    ref_v = np.zeros((b, s, n, h), np.float32)
    # Different starting lengths per row (as after a padded prefill).
    start = np.array([0, 3, 5], np.int32)
    cache = cache.replace(length=jnp.asarray(start))
    append = jax.jit(lambda c, k, v: c.append(k, v))
    length = start.copy()
    for step, t in enumerate((2, 1, 3)):
        k, v = _rand(10 + step, (b, t, n, h)), _rand(20 + step, (b, t, n, h))
        cache = append(cache, jnp.asarray(k), jnp.asarray(v))
        for r in range(b):
            ref_k[r, length[r] : length[r] + t] = k[r]
            ref_v[r, length[r] : length[r] + t] = v[r]
        length += t
    np.testing.assert_array_equal(np.asarray(cache.length), length)
    np.testing.assert_array_equal(np.asarray(cache.k), ref_k)
    np.testing.assert_array_equal(np.asarray(cache.v), ref_v)
    np.testing.assert_array_equal(np.asarray(cache.valid()), np.arange(s)[None] < length[:, None])


def test_append_casts_to_storage_dtype():
    cache = LayerCache.init(1, 4, 1, 2, jnp.bfloat16)
    out = cache.append(jnp.ones((1, 2, 1, 2), jnp.float32), jnp.ones((1, 2, 1, 2), jnp.float32))
    assert out.k.dtype == jnp.bfloat16 and out.v.dtype == jnp.bfloat16


def test_overflow_is_dropped_not_clamped():
    cache = LayerCache.init(1, 4, 1, 1, jnp.float32)
    cache = cache.append(jnp.ones((1, 3, 1, 1)), jnp.ones((1, 3, 1, 1)))
    cache = cache.append(jnp.full((1, 3, 1, 1), 7.0), jnp.full((1, 3, 1, 1), 7.0))
    # Slot 3 gets the first new entry; the two that do not fit are dropped, earlier slots intact.
    np.testing.assert_array_equal(np.asarray(cache.k[0, :, 0, 0]), [1, 1, 1, 7])
    assert int(cache.length[0]) == 6  # the overflow is visible in the length


def test_overflow_raises_at_the_api_boundary():
    cfg = LanguageConfig(vocab_size=8, width=8, depth=2, heads=2, mlp_dim=8)
    cache = KVCache.init(cfg, batch=1, capacity=(8, 5))
    cache.check_fits(5)
    with pytest.raises(ValueError, match="capacity is 5"):
        cache.check_fits(6, what="prompt")


def test_append_shape_errors():
    cache = LayerCache.init(2, 4, 2, 3)
    with pytest.raises(ValueError, match="k_new must have shape"):
        cache.append(jnp.zeros((2, 1, 1, 3)), jnp.zeros((2, 1, 1, 3)))
    with pytest.raises(ValueError, match="same shape"):
        cache.append(jnp.zeros((2, 1, 2, 3)), jnp.zeros((2, 2, 2, 3)))
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        LayerCache.init(2, 0, 2, 3)


def test_kvcache_init_and_nbytes():
    cfg = LanguageConfig(
        vocab_size=8, width=16, depth=3, heads=4, kv_heads=2, mlp_dim=8, dtype="bfloat16"
    )
    cache = KVCache.init(cfg, batch=2, capacity=(6, 4, 2))
    assert cache.capacities == (6, 4, 2) and cache.capacity == 2 and cache.num_layers == 3
    assert cache.layers[0].k.shape == (2, 6, 2, 4) and cache.layers[0].k.dtype == jnp.bfloat16
    per_slot = 2 * 2 * 4 * 2  # k and v, kv_heads, head_dim, bf16 bytes
    expected = 2 * (6 + 4 + 2) * per_slot + 3 * 2 * 4 + 2 * 4  # + lengths + positions
    assert cache.nbytes() == expected
    assert cache.nbytes() == sum(x.nbytes for x in jax.tree.leaves(cache))
    layers = tuple(x.replace(length=jnp.array([1, 2], jnp.int32)) for x in cache.layers)
    assert int(cache.replace(layers=layers).used_nbytes()) == 3 * 3 * per_slot
    explicit = KVCache.init(batch=1, capacity=4, num_layers=2, kv_heads=1, head_dim=8)
    assert explicit.layers[1].k.shape == (1, 4, 1, 8) and explicit.layers[1].k.dtype == jnp.float32
    with pytest.raises(ValueError, match="one per layer"):
        KVCache.init(cfg, batch=1, capacity=(4, 4))
    with pytest.raises(ValueError, match="needs a config"):
        KVCache.init(batch=1, capacity=4, num_layers=2)


def test_kvcache_is_a_pytree_through_jit():
    cache = KVCache.init(batch=2, capacity=3, num_layers=2, kv_heads=1, head_dim=2)

    @jax.jit
    def step(c):
        layers = tuple(x.append(jnp.ones((2, 1, 1, 2)), jnp.ones((2, 1, 1, 2))) for x in c.layers)
        return c.replace(layers=layers, positions=c.positions + 1)

    out = step(step(cache))
    assert [int(x) for x in out.layers[1].length] == [2, 2]
    assert [int(x) for x in out.positions] == [2, 2]
