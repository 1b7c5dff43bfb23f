"""Answer-token cross-entropy: ``logits[:, :-1]`` predict ``tokens[:, 1:]`` where
``loss_mask[:, 1:]`` is 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["answer_loss_terms", "answer_loss"]


def answer_loss_terms(
    logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array
) -> dict[str, jax.Array]:
    """Sums (not means) over the batch, so microbatches add up exactly.

    Returns ``loss_sum`` (mask-weighted NLL, float32), ``correct`` (mask-weighted argmax hits)
    and ``count`` (sum of the mask).
    """
    if logits.ndim != 3 or tokens.shape != logits.shape[:2] or loss_mask.shape != tokens.shape:
        raise ValueError(
            f"logits {logits.shape}, tokens {tokens.shape}, loss_mask {loss_mask.shape}; "
            "expected logits [B, T, V] with tokens and loss_mask [B, T]"
        )
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    w = loss_mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    loss_sum = jnp.sum(nll * w)
    return {"loss_sum": loss_sum, "correct": jnp.sum(hit * w), "count": jnp.sum(w)}


def answer_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Mean NLL over target tokens and ``{"accuracy", "count"}``."""
    t = answer_loss_terms(logits, tokens, loss_mask)
    n = jnp.maximum(t["count"], 1.0)
    return t["loss_sum"] / n, {"accuracy": t["correct"] / n, "count": t["count"]}
