"""``digit_grid_vqa``: real handwritten digits on a canvas grid, with templated questions.

Digits come from scikit-learn's bundled ``load_digits`` (1797 8x8 images, 0..16 intensities;
the test part of UCI optdigits, written by 13 people), upsampled to the cell size. The images
carry no writer ids, so the splits use disjoint *contiguous index ranges* of the 1797 images:
train ``[0, 1257)``, validation ``[1257, 1527)``, test ``[1527, 1797)`` (each about balanced over
the ten classes). No digit image is shared between splits; writers may be.

Grid positions are 1-based in text ("row 1 column 2") and 0-based in the scene description.
Question types and the rule each answer follows from the scene:

- ``digit_at``: "what digit is at row r column c" -> "0".."9", or "none" for an empty cell.
- ``where_is``: "where is the digit d" (d occurs once) -> "r{row}c{col}", e.g. "r1c2".
- ``count``: "how many times does the digit d appear" -> "0".."64".
- ``compare``: "is the digit at row r column c larger than the digit to its right" (both cells
  filled) -> "yes" if strictly larger else "no".
- ``read``: "read the grid" -> every cell, in a random order, as "row r column c" and its digit
  or "none" ("row 2 column 3 7 row 1 column 1 none ..."): a grounded dense reading of the image
  (as grounded captions are for Kosmos-2 or Shikra). Not asked by default: ``read_fraction``
  mixes it into the train split only, so that a small model trained from scratch learns to find
  a cell from its words and read it. The four question types alone give one weak, multi-hop
  signal per image; models trained on them stay at the language prior (digit_at and where_is
  at chance). The random order makes the coordinate words, not the position in the answer, say
  which cell comes next (a raster-order "3 none 7 ..." answer taught digit_at much less: 72% vs
  97% in the same GPU probe).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import numpy as np

from efficient_mllm.data import common

__all__ = [
    "ASKED_TYPES",
    "MAX_GRID",
    "MAX_QUESTION_TOKENS",
    "POOLS",
    "QUESTION_TYPES",
    "DigitGridConfig",
    "digit_pool",
    "generate_example",
    "load_digit_images",
    "max_row_tokens",
    "vocabulary",
]

QUESTION_TYPES = ("digit_at", "where_is", "count", "compare", "read")
ASKED_TYPES = QUESTION_TYPES[:4]  # the default question_types (``read`` is opt-in)
MAX_GRID = 8
MAX_QUESTION_TOKENS = 16  # "is the digit at row 1 column 2 larger than the digit to its right ?"
POOLS = {"train": (0, 1257), "validation": (1257, 1527), "test": (1527, 1797)}


def max_row_tokens(cfg: DigitGridConfig) -> int:
    """Longest encoded row: ``<bos> <image> question ? answer <eos>`` (a ``read`` answer has
    ``5 * rows * cols`` words after the 4 of "read the grid ?")."""
    longest = 2 + MAX_QUESTION_TOKENS + 2
    if cfg.read_fraction > 0 or "read" in cfg.question_types:
        longest = max(longest, 2 + 4 + 5 * cfg.rows * cfg.cols + 1)
    return longest


@dataclasses.dataclass(frozen=True)
class DigitGridConfig:
    """Knobs of ``digit_grid_vqa``. ``fill`` is the probability that a cell holds a digit;
    ``read_fraction`` the probability that a *train* example asks ``read`` instead of one of
    ``question_types`` (validation and test never do)."""

    image_size: int = 64
    rows: int = 2
    cols: int = 2
    fill: float = 0.75
    clutter: float = 0.0
    question_types: tuple = ASKED_TYPES
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 200
    seed: int = 0
    read_fraction: float = 0.0

    def __post_init__(self):
        common.check_int("image_size", self.image_size, 16, 4096)
        common.check_int("rows", self.rows, 1, MAX_GRID)
        common.check_int("cols", self.cols, 1, MAX_GRID)
        common.check_float("fill", self.fill, 0.0, 1.0)
        common.check_float("clutter", self.clutter, 0.0, 1.0)
        common.check_float("read_fraction", self.read_fraction, 0.0, 1.0)
        object.__setattr__(
            self,
            "question_types",
            common.check_subset("question_types", self.question_types, QUESTION_TYPES),
        )
        for name in ("num_train", "num_validation", "num_test"):
            common.check_int(name, getattr(self, name), 0, 10**8)
        common.check_int("seed", self.seed, 0, 2**32 - 1)
        if self.image_size // max(self.rows, self.cols) < 8:
            raise ValueError(
                f"image_size: {self.image_size} gives cells under 8 pixels for a "
                f"{self.rows}x{self.cols} grid; expected >= {8 * max(self.rows, self.cols)}"
            )
        if self.question_types == ("compare",) and self.cols < 2:
            raise ValueError("question_types: 'compare' needs cols >= 2, got cols=1")

    @property
    def cell_size(self) -> int:
        return self.image_size // max(self.rows, self.cols)

    def num_examples(self, split: str) -> int:
        return getattr(
            self, {"train": "num_train", "validation": "num_validation", "test": "num_test"}[split]
        )


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [1797, 8, 8] in 0..255, labels int64 [1797])`` from scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    images.setflags(write=False)
    labels = d.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def digit_pool(split: str) -> np.ndarray:
    """Indices into ``load_digit_images()`` that ``split`` may use (disjoint between splits)."""
    common.split_id(split)
    lo, hi = POOLS[split]
    return np.arange(lo, hi)


def vocabulary() -> list[str]:
    """Every word the questions and answers of ``digit_grid_vqa`` can use (independent of knobs)."""
    words = (
        "what digit is at row column where the how many times does appear larger than to "
        "its right yes no none ?"
    ).split()
    words += [str(i) for i in range(MAX_GRID * MAX_GRID + 1)]
    words += [f"r{r}c{c}" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
    words += ["read", "grid"]  # last, so the ids of the words above did not move
    return list(dict.fromkeys(words))


def _sample_cells(rng: np.random.Generator, cfg: DigitGridConfig, split: str) -> list[dict]:
    _, labels = load_digit_images()
    lo, hi = POOLS[split]
    filled = rng.random((cfg.rows, cfg.cols)) < cfg.fill
    if not filled.any():
        filled[int(rng.integers(cfg.rows)), int(rng.integers(cfg.cols))] = True
    cell = cfg.cell_size
    oy = (cfg.image_size - cfg.rows * cell) // 2
    ox = (cfg.image_size - cfg.cols * cell) // 2
    cells = []
    for r in range(cfg.rows):
        for c in range(cfg.cols):
            if not filled[r, c]:
                continue
            src = int(rng.integers(lo, hi))
            size = int(rng.integers(max(6, int(0.7 * cell)), cell + 1))
            x0 = ox + c * cell + int(rng.integers(0, cell - size + 1))
            y0 = oy + r * cell + int(rng.integers(0, cell - size + 1))
            cells.append(
                {
                    "row": r,
                    "col": c,
                    "digit": int(labels[src]),
                    "source_index": src,
                    "bbox": [x0, y0, x0 + size, y0 + size],
                }
            )
    return cells


def _render(rng: np.random.Generator, cells: list[dict], cfg: DigitGridConfig) -> np.ndarray:
    from PIL import Image

    images, _ = load_digit_images()
    S = cfg.image_size
    canvas = np.zeros((S, S), np.uint8)
    if cfg.clutter > 0:
        canvas = rng.integers(0, int(110 * cfg.clutter) + 1, size=(S, S), dtype=np.int16).astype(
            np.uint8
        )
    for cell in cells:
        x0, y0, x1, y1 = cell["bbox"]
        digit = Image.fromarray(images[cell["source_index"]]).resize(
            (x1 - x0, y1 - y0), Image.BILINEAR
        )
        region = canvas[y0:y1, x0:x1]
        np.maximum(region, np.asarray(digit), out=region)
    return np.repeat(canvas[:, :, None], 3, axis=2)


def _q_digit_at(rng, cells, cfg):
    r, c = int(rng.integers(cfg.rows)), int(rng.integers(cfg.cols))
    at = [x["digit"] for x in cells if x["row"] == r and x["col"] == c]
    return f"what digit is at row {r + 1} column {c + 1}", str(at[0]) if at else "none"


def _q_where_is(rng, cells, cfg):
    counts = collections.Counter(x["digit"] for x in cells)
    cands = [x for x in cells if counts[x["digit"]] == 1]
    if not cands:
        return None
    x = cands[int(rng.integers(len(cands)))]
    return f"where is the digit {x['digit']}", f"r{x['row'] + 1}c{x['col'] + 1}"


def _q_count(rng, cells, cfg):
    if rng.random() < 0.7:
        d = cells[int(rng.integers(len(cells)))]["digit"]
    else:
        d = int(rng.integers(10))
    return f"how many times does the digit {d} appear", str(sum(x["digit"] == d for x in cells))


def _q_compare(rng, cells, cfg):
    at = {(x["row"], x["col"]): x["digit"] for x in cells}
    pairs = [(r, c) for (r, c) in at if (r, c + 1) in at]
    if not pairs:
        return None
    r, c = pairs[int(rng.integers(len(pairs)))]
    ans = "yes" if at[(r, c)] > at[(r, c + 1)] else "no"
    return f"is the digit at row {r + 1} column {c + 1} larger than the digit to its right", ans


def _q_read(rng, cells, cfg):
    at = {(x["row"], x["col"]): str(x["digit"]) for x in cells}
    cells_rc = [(r, c) for r in range(cfg.rows) for c in range(cfg.cols)]
    order = [cells_rc[i] for i in rng.permutation(len(cells_rc))]
    return "read the grid", " ".join(
        f"row {r + 1} column {c + 1} {at.get((r, c), 'none')}" for r, c in order
    )


_ASK = {
    "digit_at": _q_digit_at,
    "where_is": _q_where_is,
    "count": _q_count,
    "compare": _q_compare,
    "read": _q_read,
}


def generate_example(cfg: DigitGridConfig, split: str, index: int) -> dict[str, Any]:
    """Record ``index`` of ``split``: a pure function of (config, split, index)."""
    common.check_int("index", index, 0)
    types = cfg.question_types
    if split == "train" and cfg.read_fraction > 0:
        # its own stream: the draw does not shift the scene's
        mix = np.random.default_rng([cfg.seed, common.split_id(split), int(index), 0x4EAD])
        if mix.random() < cfg.read_fraction:
            types = ("read",)
    for attempt in range(1000):
        rng = common.example_rng(cfg.seed, split, index, attempt)
        cells = _sample_cells(rng, cfg, split)
        first = int(rng.integers(len(types)))
        order = [types[first]] + [types[i] for i in rng.permutation(len(types)) if i != first]
        for t in order:
            qa = _ASK[t](rng, cells, cfg)
            if qa is not None:
                image = _render(rng, cells, cfg)
                scene = {
                    "image_size": cfg.image_size,
                    "rows": cfg.rows,
                    "cols": cfg.cols,
                    "cell_size": cfg.cell_size,
                    "cells": cells,
                }
                return {
                    "image": image,
                    "question": qa[0],
                    "answer": qa[1],
                    "question_type": QUESTION_TYPES.index(t),
                    "scene": scene,
                }
    raise ValueError(
        f"config: no askable question found in 1000 draws for {cfg}; expected a "
        "higher fill or more question types"
    )
