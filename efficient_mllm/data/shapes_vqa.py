"""``shapes_vqa``: procedurally rendered scenes of coloured shapes with templated questions.

Each scene holds ``min_objects..max_objects`` non-overlapping objects, every one a distinct
(colour, shape) pair, so "the red circle" always names one object. The answer to every question
is a single word and depends on a few image regions only. Every record keeps its scene
description, from which the answer follows by the rules documented on each question type:

- ``color``: "what color is the {shape}" (the shape occurs once) -> colour.
- ``shape``: "what shape is the {color} object" (the colour occurs once) -> shape.
- ``count``: "how many {shape}s / {color} objects / objects are there" -> "0".."32".
- ``exist``: "is there a {color} {shape}" -> "yes" / "no".
- ``relative_position``: "is the A left or right of the B" / "is the A above or below the B"
  -> "left"/"right"/"above"/"below", from object centres, asked only when the centres differ by
  at least ``separation(image_size)`` pixels along that axis.
- ``left_of``: "what shape is left of the A" -> shape of the one object whose centre is at
  least ``separation`` pixels left of A's, asked only when exactly one object is and no other
  object's centre is within ``separation`` of A's horizontally.

Split disjointness: a scene (its objects' shapes, colours and boxes) belongs to exactly one split,
chosen by a stable hash of the scene (train 80% of scene space, validation 10%, test 10%); each
split draws from its own seed stream and rejects scenes of other splits. So no scene is shared by
two splits, for any seed.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from efficient_mllm.data import common

__all__ = [
    "COLORS",
    "MAX_OBJECTS",
    "MAX_QUESTION_TOKENS",
    "MIN_OBJECT_PIXELS",
    "PLURALS",
    "QUESTION_TYPES",
    "SHAPES",
    "ShapesVQAConfig",
    "generate_example",
    "max_row_tokens",
    "scene_split",
    "separation",
    "vocabulary",
]

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
}
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 215, 225),
}
QUESTION_TYPES = ("color", "shape", "count", "exist", "relative_position", "left_of")
MAX_OBJECTS = 32
MIN_OBJECT_PIXELS = 8  # below this, a rendered circle, cross and diamond can coincide
MAX_QUESTION_TOKENS = 12  # "is the purple triangle left or right of the yellow diamond ?"
_BUCKETS = {"train": range(8), "validation": range(8, 9), "test": range(9, 10)}
_MAX_ATTEMPTS = 10_000


def max_row_tokens(cfg: ShapesVQAConfig) -> int:
    """Longest encoded row: ``<bos> <image> question ? answer <eos>`` (one-word answers)."""
    return 2 + MAX_QUESTION_TOKENS + 2


@dataclasses.dataclass(frozen=True)
class ShapesVQAConfig:
    """Knobs of ``shapes_vqa``. Object sizes are fractions of the image side."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: float = 0.15
    max_object_size: float = 0.3
    clutter: float = 0.0
    shapes: tuple = SHAPES
    colors: tuple = tuple(COLORS)
    question_types: tuple = QUESTION_TYPES
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 200
    seed: int = 0

    def __post_init__(self):
        s = object.__setattr__
        common.check_int("image_size", self.image_size, 16, 4096)
        common.check_int("min_objects", self.min_objects, 1, MAX_OBJECTS)
        common.check_int("max_objects", self.max_objects, self.min_objects, MAX_OBJECTS)
        common.check_float("min_object_size", self.min_object_size, 0.02, 0.9)
        common.check_float("max_object_size", self.max_object_size, self.min_object_size, 0.9)
        common.check_float("clutter", self.clutter, 0.0, 1.0)
        s(self, "shapes", common.check_subset("shapes", self.shapes, SHAPES))
        s(self, "colors", common.check_subset("colors", self.colors, tuple(COLORS)))
        s(
            self,
            "question_types",
            common.check_subset("question_types", self.question_types, QUESTION_TYPES),
        )
        for name in ("num_train", "num_validation", "num_test"):
            common.check_int(name, getattr(self, name), 0, 10**8)
        common.check_int("seed", self.seed, 0, 2**32 - 1)
        if round(self.min_object_size * self.image_size) < MIN_OBJECT_PIXELS:
            raise ValueError(
                f"min_object_size: {self.min_object_size} x image_size {self.image_size} "
                f"is below {MIN_OBJECT_PIXELS} pixels, where shapes become hard to tell "
                f"apart; expected >= {MIN_OBJECT_PIXELS / self.image_size:.3f}"
            )
        pairs = len(self.shapes) * len(self.colors)
        if self.max_objects > pairs:
            raise ValueError(
                f"max_objects: {self.max_objects} exceeds the {pairs} distinct "
                "(colour, shape) pairs available; expected <= that number"
            )
        area = self.max_objects * (self.min_object_size * self.image_size + 2) ** 2
        if area > 0.5 * self.image_size**2:
            raise ValueError(
                f"max_objects: {self.max_objects} objects of min_object_size "
                f"{self.min_object_size} cannot be placed apart on a {self.image_size}px "
                "image; expected them to cover at most half of it"
            )
        if self.max_objects < 2 and set(self.question_types) <= {"relative_position", "left_of"}:
            raise ValueError(
                f"question_types: {list(self.question_types)} need two objects, "
                f"but max_objects={self.max_objects}"
            )

    def num_examples(self, split: str) -> int:
        return getattr(
            self, {"train": "num_train", "validation": "num_validation", "test": "num_test"}[split]
        )


def separation(image_size: int) -> float:
    """Minimum centre offset (pixels) for a left/right or above/below relation to be asked."""
    return max(2.0, 0.1 * image_size)


def scene_split(objects: list[dict]) -> str:
    """The split a scene belongs to (a stable hash of its objects)."""
    key = sorted((o["shape"], o["color"], *o["bbox"]) for o in objects)
    bucket = common.stable_hash(key) % 10
    return next(s for s, r in _BUCKETS.items() if bucket in r)


def vocabulary() -> list[str]:
    """Every word the questions and answers of ``shapes_vqa`` can use (independent of knobs)."""
    words = (
        "what color is the shape object objects how many are there a left or right of above below "
        "yes no ?"
    ).split()
    words += list(SHAPES) + [PLURALS[s] for s in SHAPES] + list(COLORS)
    words += [str(i) for i in range(MAX_OBJECTS + 1)]
    return list(dict.fromkeys(words))


# ----------------------------------------------------------------------------- scenes


def _sample_objects(rng: np.random.Generator, cfg: ShapesVQAConfig) -> list[dict] | None:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    pairs = [(s, c) for s in cfg.shapes for c in cfg.colors]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    S = cfg.image_size
    lo = max(MIN_OBJECT_PIXELS, round(cfg.min_object_size * S))
    hi = max(lo, round(cfg.max_object_size * S))
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for k in chosen:
        shape, color = pairs[int(k)]
        size = int(rng.integers(lo, hi + 1))
        for _ in range(100):
            x0 = int(rng.integers(0, S - size + 1))
            y0 = int(rng.integers(0, S - size + 1))
            box = (x0, y0, x0 + size, y0 + size)
            if all(
                box[0] >= b[2] + 2 or b[0] >= box[2] + 2 or box[1] >= b[3] + 2 or b[1] >= box[3] + 2
                for b in boxes
            ):
                break
        else:
            return None
        boxes.append(box)
        objects.append(
            {
                "shape": shape,
                "color": color,
                "bbox": list(box),
                "center": [x0 + size / 2, y0 + size / 2],
            }
        )
    return objects


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0 - 1, y1 - y0 - 1
    cx, cy = x0 + w / 2, y0 + h / 2
    if shape == "triangle":
        return [(cx, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    if shape == "diamond":
        return [(cx, y0), (x0 + w, cy), (cx, y0 + h), (x0, cy)]
    if shape == "star":
        ang = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 0.5, 0.21)
        return [(cx + r * w * np.cos(a), cy - r * h * np.sin(a)) for a, r in zip(ang, rad)]
    if shape == "cross":
        t = w / 6
        return [
            (cx - t, y0),
            (cx + t, y0),
            (cx + t, cy - t),
            (x0 + w, cy - t),
            (x0 + w, cy + t),
            (cx + t, cy + t),
            (cx + t, y0 + h),
            (cx - t, y0 + h),
            (cx - t, cy + t),
            (x0, cy + t),
            (x0, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"shape: unknown shape {shape!r}")


def _render(rng: np.random.Generator, objects: list[dict], cfg: ShapesVQAConfig) -> np.ndarray:
    from PIL import Image, ImageDraw

    S, c = cfg.image_size, cfg.clutter
    base = np.full((S, S, 3), 40, np.int16)
    if c > 0:  # grey noise texture (about 64 cells across) plus grey distractor strokes
        block = max(1, S // 64)
        cells = -(-S // block)
        amp = int(70 * c)
        noise = rng.integers(-amp, amp + 1, size=(cells, cells, 1), dtype=np.int16)
        base += np.repeat(np.repeat(noise, block, axis=0), block, axis=1)[:S, :S]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if c > 0:
        n_strokes = round(c * 12 * max(1.0, S / 64))
        pts = rng.integers(0, S, size=(n_strokes, 4))
        greys = rng.integers(70, 170, size=n_strokes)
        width = max(1, S // 128)
        for (a, b, x, y), g in zip(pts.tolist(), greys.tolist()):
            draw.line((a, b, x, y), fill=(g, g, g), width=width)
    for o in objects:
        box = tuple(o["bbox"])
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], box), fill=fill)
    return np.asarray(img)


# ----------------------------------------------------------------------------- questions


def _name(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def _q_color(rng, objs, cfg):
    counts = collections.Counter(o["shape"] for o in objs)
    cands = [o for o in objs if counts[o["shape"]] == 1]
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    return f"what color is the {o['shape']}", o["color"]


def _q_shape(rng, objs, cfg):
    counts = collections.Counter(o["color"] for o in objs)
    cands = [o for o in objs if counts[o["color"]] == 1]
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    return f"what shape is the {o['color']} object", o["shape"]


def _q_count(rng, objs, cfg):
    kind = int(rng.integers(3))
    if kind == 0:
        s = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
        return f"how many {PLURALS[s]} are there", str(sum(o["shape"] == s for o in objs))
    if kind == 1:
        c = cfg.colors[int(rng.integers(len(cfg.colors)))]
        return f"how many {c} objects are there", str(sum(o["color"] == c for o in objs))
    return "how many objects are there", str(len(objs))


def _q_exist(rng, objs, cfg):
    present = {(o["color"], o["shape"]) for o in objs}
    absent = [(c, s) for s in cfg.shapes for c in cfg.colors if (c, s) not in present]
    if absent and rng.random() < 0.5:
        c, s = absent[int(rng.integers(len(absent)))]
        return f"is there a {c} {s}", "no"
    o = objs[int(rng.integers(len(objs)))]
    return f"is there a {_name(o)}", "yes"


def _q_relative_position(rng, objs, cfg):
    sep = separation(cfg.image_size)
    cands = []
    for a in objs:
        for b in objs:
            if a is b:
                continue
            dx, dy = a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]
            if abs(dx) >= sep:
                cands.append((a, b, "h", "left" if dx < 0 else "right"))
            if abs(dy) >= sep:
                cands.append((a, b, "v", "above" if dy < 0 else "below"))
    if not cands:
        return None
    a, b, axis, ans = cands[int(rng.integers(len(cands)))]
    rel = "left or right of" if axis == "h" else "above or below"
    return f"is the {_name(a)} {rel} the {_name(b)}", ans


def _q_left_of(rng, objs, cfg):
    sep = separation(cfg.image_size)
    cands = []
    for x in objs:
        others = [o for o in objs if o is not x]
        left = [o for o in others if o["center"][0] <= x["center"][0] - sep]
        near = [o for o in others if abs(o["center"][0] - x["center"][0]) < sep]
        if len(left) == 1 and not near:
            cands.append((x, left[0]))
    if not cands:
        return None
    x, o = cands[int(rng.integers(len(cands)))]
    return f"what shape is left of the {_name(x)}", o["shape"]


_ASK = {
    "color": _q_color,
    "shape": _q_shape,
    "count": _q_count,
    "exist": _q_exist,
    "relative_position": _q_relative_position,
    "left_of": _q_left_of,
}


def _ask(rng, objs, cfg):
    types = cfg.question_types
    first = int(rng.integers(len(types)))
    rest = [types[i] for i in rng.permutation(len(types)) if i != first]
    for t in [types[first], *rest]:
        qa = _ASK[t](rng, objs, cfg)
        if qa is not None:
            return qa[0], qa[1], QUESTION_TYPES.index(t)
    return None


def generate_example(cfg: ShapesVQAConfig, split: str, index: int) -> dict[str, Any]:
    """Record ``index`` of ``split``: a pure function of (config, split, index)."""
    common.check_int("index", index, 0)
    for attempt in range(_MAX_ATTEMPTS):
        rng = common.example_rng(cfg.seed, split, index, attempt)
        objs = _sample_objects(rng, cfg)
        if objs is None or scene_split(objs) != split:
            continue
        qa = _ask(rng, objs, cfg)
        if qa is None:
            continue
        image = _render(rng, objs, cfg)
        return {
            "image": image,
            "question": qa[0],
            "answer": qa[1],
            "question_type": qa[2],
            "scene": {"image_size": cfg.image_size, "objects": objs},
        }
    raise ValueError(
        f"config: no {split} scene with an askable question found in {_MAX_ATTEMPTS} "
        f"draws for {cfg}; expected looser knobs (more objects, shapes or colours)"
    )
