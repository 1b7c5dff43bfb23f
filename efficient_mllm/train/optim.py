"""AdamW with linear warm-up, cosine decay and global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = ["make_schedule", "make_optimizer"]


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default) if key in cfg else default


def make_schedule(
    *, lr: float, steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
    ``lr * min_lr_ratio`` at ``steps``."""
    if not lr > 0:
        raise ValueError(f"lr = {lr!r}; expected > 0")
    if steps < 1:
        raise ValueError(f"steps = {steps!r}; expected >= 1")
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps = {warmup_steps!r}; expected 0 <= warmup_steps < steps ({steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio = {min_lr_ratio!r}; expected in [0, 1]")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=steps,
        end_value=lr * min_lr_ratio,
    )


def _decay_mask(params: Any) -> Any:
    """Decay matrices only (no biases, norm scales)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) > 1, params)


def make_optimizer(cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` from a train config (``lr``, ``steps``, ``warmup_steps``,
    ``min_lr_ratio``, ``weight_decay``, ``b1``, ``b2``, ``eps``, ``clip_norm``)."""
    schedule = make_schedule(
        lr=_get(cfg, "lr", 1e-3),
        steps=_get(cfg, "steps", 1000),
        warmup_steps=_get(cfg, "warmup_steps", 0),
        min_lr_ratio=_get(cfg, "min_lr_ratio", 0.0),
    )
    clip = _get(cfg, "clip_norm", 1.0)
    parts = []
    if clip:
        if clip < 0:
            raise ValueError(f"clip_norm = {clip!r}; expected >= 0 (0 disables clipping)")
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=_get(cfg, "b1", 0.9),
            b2=_get(cfg, "b2", 0.95),
            eps=_get(cfg, "eps", 1e-8),
            weight_decay=_get(cfg, "weight_decay", 0.0),
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
