"""A tiny NNX model with the MLLM call contract, and a deterministic resumable batch iterator,
so the training machinery is tested independently of the real model and datasets."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_mllm import compat

VOCAB, PATCH, IMAGE = 24, 4, 8


class _Block(nnx.Module):
    def __init__(self, dim, hidden, rngs):
        init = nnx.initializers.normal(0.2)
        self.up = compat.logical_param(init(rngs.params(), (dim, hidden)), ("embed", "mlp"))
        self.down = compat.logical_param(init(rngs.params(), (hidden, dim)), ("mlp", "embed"))
        self.scale = compat.logical_param(jnp.ones((dim,)), ("embed",))

    def __call__(self, x):
        h = x * self.scale[...]
        return x + jax.nn.gelu(h @ self.up[...]) @ self.down[...]


class TinyMLLM(nnx.Module):
    """Embedding + mean-pooled patch features + causal running mean + MLP blocks."""

    def __init__(self, *, dim=16, hidden=32, depth=2, vocab=VOCAB, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.2)
        self.embed = compat.logical_param(init(rngs.params(), (vocab, dim)), ("vocab", "embed"))
        self.patch = compat.logical_param(
            init(rngs.params(), (PATCH * PATCH * 3, dim)), ("patch", "embed")
        )
        self.blocks = nnx.List([_Block(dim, hidden, rngs) for _ in range(depth)])
        self.out = compat.logical_param(init(rngs.params(), (dim, vocab)), ("embed", "vocab"))
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))  # non-Param state

    def __call__(self, tokens, images=None, *, lengths=None):
        x = self.embed[...][tokens]
        if images is not None:
            b, h, w, c = images.shape
            p = images.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
            p = p.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, PATCH * PATCH * c)
            x = x + jnp.mean(p @ self.patch[...], axis=1, keepdims=True).astype(x.dtype)
        t = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        x = jnp.cumsum(x, axis=1) / t
        for blk in self.blocks:
            x = blk(x)
        self.calls[...] = self.calls[...] + 1
        return types.SimpleNamespace(logits=x @ self.out[...], aux={})


def make_model(rngs: nnx.Rngs) -> TinyMLLM:
    return TinyMLLM(rngs=rngs)


def make_batch(step: int, batch_size: int = 8, seq: int = 8, seed: int = 0) -> dict:
    """Batch ``step`` of a deterministic task: the answer is the first prompt token + 1."""
    rng = np.random.default_rng([seed, step])
    tokens = rng.integers(5, VOCAB - 1, size=(batch_size, seq)).astype(np.int32)
    lengths = rng.integers(4, seq + 1, size=batch_size).astype(np.int32)
    loss_mask = np.zeros((batch_size, seq), np.float32)
    for i, n in enumerate(lengths):
        tokens[i, n - 1] = tokens[i, 0] + 1
        loss_mask[i, n - 1] = 1.0
        tokens[i, n:] = 0
    image = rng.normal(size=(batch_size, IMAGE, IMAGE, 3)).astype(np.float32)
    return {
        "image": image,
        "tokens": tokens,
        "loss_mask": loss_mask,
        "lengths": lengths,
        "question_type": (tokens[:, 0] % 3).astype(np.int32),
        "prompt_lengths": (lengths - 1).astype(np.int32),
    }


class BatchIterator:
    """Infinite iterator of :func:`make_batch` with ``get_state`` / ``set_state``."""

    def __init__(self, batch_size: int = 8, seq: int = 8, seed: int = 0):
        self.batch_size, self.seq, self.seed, self.step = batch_size, seq, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = make_batch(self.step, self.batch_size, self.seq, self.seed)
        self.step += 1
        return b

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def standin_components(batch_size: int = 8, seq: int = 8):
    """:class:`Components` for a run of the tiny model on the synthetic batches."""
    from efficient_mllm.train.loop import Components

    def eval_batches():
        for i in range(2):
            yield make_batch(10_000 + i, batch_size, seq)

    return Components(make_model, BatchIterator(batch_size, seq), eval_batches, ("a", "b", "c"), None)


def standin_config(**overrides):
    """A locked run config for the tiny model (no dataset / model fields needed)."""
    from efficient_mllm.train.config import apply_overrides, base_config

    c = base_config()
    c.name = "standin"
    c.train.steps = 8
    c.train.batch_size = 8
    c.train.lr = 1e-2
    c.train.warmup_steps = 2
    c.train.log_every = 1
    c.eval.batch_size = 8
    c.eval.during = ("teacher_forced",)
    c.eval.final = ("teacher_forced", "perplexity")
    c.output.progress = False
    c.output.tensorboard = False
    c.lock()
    return apply_overrides(c, overrides)
