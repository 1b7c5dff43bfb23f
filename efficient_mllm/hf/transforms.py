"""Reusable :class:`~efficient_mllm.hf.families.TensorMap` builders for the common layouts.

PyTorch ``nn.Linear`` stores ``weight [out, in]`` and computes ``x @ weight.T``; our
``nn.layers.Linear`` stores ``kernel [*in_dims, *out_dims]``. All transforms are reshapes and
transposes only (bit-exact round trips).
"""

from __future__ import annotations

import math

import numpy as np

from efficient_mllm.hf.families import Path, TensorMap, identity

__all__ = ["bias", "conv_patch", "copy", "linear", "transposed"]


def _check(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"HF tensor {name!r} has shape {tuple(arr.shape)}: expected {shape}")


def linear(ours: Path, hf: str, in_dims: tuple[int, ...], out_dims: tuple[int, ...]) -> TensorMap:
    """``nn.Linear.weight [prod(out), prod(in)]`` <-> our ``kernel [*in_dims, *out_dims]``
    (e.g. ``in_dims=(D,), out_dims=(N, H)`` for a q projection, ``((N, H), (D,))`` for o)."""
    n_in, n_out = math.prod(in_dims), math.prod(out_dims)

    def to_ours(w):
        _check(hf, w, (n_out, n_in))
        return w.T.reshape(*in_dims, *out_dims)

    def to_hf(k):
        return np.ascontiguousarray(k.reshape(n_in, n_out).T)

    return TensorMap(ours=ours, hf=hf, to_ours=to_ours, to_hf=to_hf)


def bias(ours: Path, hf: str, dims: tuple[int, ...]) -> TensorMap:
    """``bias [prod(dims)]`` <-> ours ``[*dims]``."""
    n = math.prod(dims)

    def to_ours(b):
        _check(hf, b, (n,))
        return b.reshape(dims)

    return TensorMap(ours=ours, hf=hf, to_ours=to_ours, to_hf=lambda b: b.reshape(n))


def copy(ours: Path, hf: str) -> TensorMap:
    """Same layout on both sides (norm scales, embeddings, position tables)."""
    return TensorMap(ours=ours, hf=hf, to_ours=identity, to_hf=identity)


def transposed(ours: Path, hf: str) -> TensorMap:
    """A 2-D transpose (an untied ``lm_head.weight [V, D]`` <-> ``kernel [D, V]``)."""
    return TensorMap(
        ours=ours,
        hf=hf,
        to_ours=lambda w: np.ascontiguousarray(w.T),
        to_hf=lambda k: np.ascontiguousarray(k.T),
    )


def conv_patch(ours: Path, hf: str, width: int, channels: int, patch: int) -> TensorMap:
    """Patch-embedding ``Conv2d.weight [D, C, p, p]`` (stride ``p``) <-> our patch ``kernel
    [p * p * C, D]`` (patches flattened as ``(row, col, channel)``, see ``nn.vision``)."""

    def to_ours(w):
        _check(hf, w, (width, channels, patch, patch))
        return w.transpose(2, 3, 1, 0).reshape(patch * patch * channels, width)

    def to_hf(k):
        return np.ascontiguousarray(k.reshape(patch, patch, channels, width).transpose(3, 2, 0, 1))

    return TensorMap(ours=ours, hf=hf, to_ours=to_ours, to_hf=to_hf)
