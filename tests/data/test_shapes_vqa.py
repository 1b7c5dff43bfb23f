"""shapes_vqa: determinism, split disjointness, answers correct by construction."""

import collections
import re

import numpy as np
import pytest

from efficient_mllm.data import ShapesVQAConfig, common
from efficient_mllm.data import shapes_vqa as sv

RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 215, 225),
}


def _centre(o):
    x0, y0, x1, y1 = o["bbox"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _singular(word):
    return word[:-2] if word.endswith("sses") else word[:-1]


def check_answer(question, scene):
    """Independent re-derivation of a shapes_vqa answer from the scene description."""
    objs = scene["objects"]
    sep = max(2.0, 0.1 * scene["image_size"])

    def find(color, shape):
        hits = [o for o in objs if o["color"] == color and o["shape"] == shape]
        assert len(hits) == 1, (question, objs)
        return hits[0]

    if m := re.fullmatch(r"what color is the (\w+)", question):
        hits = [o for o in objs if o["shape"] == m[1]]
        assert len(hits) == 1
        return hits[0]["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object", question):
        hits = [o for o in objs if o["color"] == m[1]]
        assert len(hits) == 1
        return hits[0]["shape"]
    if question == "how many objects are there":
        return str(len(objs))
    if m := re.fullmatch(r"how many (\w+) objects are there", question):
        return str(sum(o["color"] == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+) are there", question):
        return str(sum(o["shape"] == _singular(m[1]) for o in objs))
    if m := re.fullmatch(r"is there a (\w+) (\w+)", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objs) else "no"
    if m := re.fullmatch(
        r"is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)", question
    ):
        a, b = find(m[1], m[2]), find(m[4], m[5])
        axis = 0 if m[3].startswith("left") else 1
        d = _centre(a)[axis] - _centre(b)[axis]
        assert abs(d) >= sep
        return ("left", "right")[d > 0] if axis == 0 else ("above", "below")[d > 0]
    if m := re.fullmatch(r"what shape is left of the (\w+) (\w+)", question):
        x = find(m[1], m[2])
        others = [o for o in objs if o is not x]
        left = [o for o in others if _centre(o)[0] <= _centre(x)[0] - sep]
        assert len(left) == 1 and all(abs(_centre(o)[0] - _centre(x)[0]) >= sep for o in others)
        return left[0]["shape"]
    raise AssertionError(f"unrecognised question {question!r}")


def test_answers_correct_by_construction_and_pixels_match_scene():
    cfg = ShapesVQAConfig(
        image_size=96,
        min_objects=2,
        max_objects=6,
        min_object_size=0.1,
        max_object_size=0.2,
        clutter=0.4,
    )
    assert round(0.1 * 96) >= sv.MIN_OBJECT_PIXELS
    types = collections.Counter()
    for i in range(200):
        ex = sv.generate_example(cfg, "train", i)
        assert check_answer(ex["question"], ex["scene"]) == ex["answer"], ex["question"]
        assert len(ex["answer"].split()) == 1
        types[sv.QUESTION_TYPES[ex["question_type"]]] += 1
        pairs = [(o["color"], o["shape"]) for o in ex["scene"]["objects"]]
        assert len(set(pairs)) == len(pairs)
        for o in ex["scene"]["objects"]:  # objects are drawn over the clutter in solid colour
            cx, cy = (int(v) for v in _centre(o))
            assert tuple(ex["image"][cy, cx]) == RGB[o["color"]], o
    assert set(types) == set(sv.QUESTION_TYPES), types


def test_question_type_knob_restricts_types():
    cfg = ShapesVQAConfig(question_types=("left_of", "color"), min_objects=3, max_objects=4)
    seen = {
        sv.QUESTION_TYPES[sv.generate_example(cfg, "test", i)["question_type"]] for i in range(40)
    }
    assert seen <= {"left_of", "color"} and "left_of" in seen


def test_same_seed_same_bytes_different_seed_differs():
    cfg = ShapesVQAConfig(image_size=64, clutter=0.5, seed=3)
    a = [common.png_bytes(sv.generate_example(cfg, "train", i)["image"]) for i in range(5)]
    b = [common.png_bytes(sv.generate_example(cfg, "train", i)["image"]) for i in range(5)]
    c = [
        common.png_bytes(
            sv.generate_example(ShapesVQAConfig(image_size=64, clutter=0.5, seed=4), "train", i)[
                "image"
            ]
        )
        for i in range(5)
    ]
    assert a == b
    assert all(x != y for x, y in zip(a, c))


def test_splits_share_no_scene_or_image():
    # A tiny scene space (one 8px object on 24px: ~12000 scenes) makes chance collisions likely.
    cfg = ShapesVQAConfig(
        image_size=24, min_objects=1, max_objects=1, min_object_size=0.34, max_object_size=0.34
    )
    keys, images = {}, {}
    for split, n in (("train", 400), ("validation", 100), ("test", 100)):
        exs = [sv.generate_example(cfg, split, i) for i in range(n)]
        keys[split] = {
            tuple(sorted((o["shape"], o["color"], *o["bbox"]) for o in e["scene"]["objects"]))
            for e in exs
        }
        images[split] = {e["image"].tobytes() for e in exs}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not keys[a] & keys[b], (a, b)
        assert not images[a] & images[b], (a, b)


def test_clutter_changes_background_only():
    plain = sv.generate_example(ShapesVQAConfig(image_size=64), "train", 0)["image"]
    noisy = sv.generate_example(ShapesVQAConfig(image_size=64, clutter=1.0), "train", 0)["image"]
    assert plain.shape == noisy.shape == (64, 64, 3)
    assert noisy.std() > plain.std() * 0.5 and not np.array_equal(plain, noisy)
    assert len(np.unique(plain.reshape(-1, 3), axis=0)) < len(
        np.unique(noisy.reshape(-1, 3), axis=0)
    )


def test_large_images_for_many_patches():
    ex = sv.generate_example(ShapesVQAConfig(image_size=512, max_objects=8), "validation", 0)
    assert ex["image"].shape == (512, 512, 3)  # 1024 patches of 16x16


@pytest.mark.parametrize(
    "knobs, arg",
    [
        (dict(image_size=8), "image_size"),
        (dict(image_size=32, min_object_size=0.1), "min_object_size"),
        (dict(min_objects=3, max_objects=2), "max_objects"),
        (dict(shapes=("circle", "hexagon")), "shapes"),
        (dict(colors="red"), "colors"),
        (dict(clutter=2.0), "clutter"),
        (dict(max_objects=32, image_size=64), "max_objects"),
        (dict(question_types=("left_of",), max_objects=1), "question_types"),
    ],
)
def test_bad_knobs_raise(knobs, arg):
    with pytest.raises(ValueError, match=arg):
        ShapesVQAConfig(**knobs)
