"""Helpers shared by the dataset generators: splits, seeding, PNG bytes, argument checks.

Every generator produces *records*: dicts with ``image`` uint8 ``[H, W, 3]``, ``question`` str,
``answer`` str, ``question_type`` int (index into the dataset's ``QUESTION_TYPES``) and ``scene``
(a JSON-able description); text-only records (``mqar``) have ``tokens`` int32 ``[L]`` and
``targets`` uint8 ``[L]`` instead of image and question.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "SPLITS",
    "as_tuple",
    "check_float",
    "check_int",
    "check_subset",
    "decode_png",
    "example_rng",
    "knob_dict",
    "png_bytes",
    "split_id",
    "stable_hash",
]

SPLITS = ("train", "validation", "test")


def split_id(split: str) -> int:
    """0, 1, 2 for train, validation, test."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def example_rng(seed: int, split: str, index: int, attempt: int = 0) -> np.random.Generator:
    """Independent generator per (seed, split, example index, attempt): splits use disjoint
    seed streams and example ``i`` does not depend on how many examples are generated."""
    return np.random.default_rng([int(seed), split_id(split), int(index), int(attempt), 0x5EED])


def stable_hash(obj: Any) -> int:
    """64-bit hash of a JSON-able object, stable across processes and Python versions."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG encoding of a uint8 ``[H, W, 3]`` array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def check_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def as_tuple(name: str, value: Any) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple of names, got {value!r}")
    return tuple(value)


def check_subset(name: str, value: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    value = as_tuple(name, value)
    bad = [v for v in value if v not in allowed]
    if bad or not value or len(set(value)) != len(value):
        raise ValueError(
            f"{name} must be a non-empty list of distinct names from {list(allowed)}, "
            f"got {list(value)}"
        )
    return value


def knob_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
