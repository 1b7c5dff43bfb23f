"""digit_grid_vqa: disjoint digit pools, answers correct by construction, determinism, the
``read`` question type and the ``read_fraction`` knob."""

import collections
import math
import re

import numpy as np
import pytest
from sklearn.datasets import load_digits

from efficient_mllm.data import DigitGridConfig, build_dataset, encode_vqa, synthetic_tokenizer
from efficient_mllm.data import digit_grid_vqa as dg

READ = dg.QUESTION_TYPES.index("read")
READ_CHUNK = re.compile(r"row (\d+) column (\d+) (\d|none)")


def parse_read(answer):
    """A ``read`` answer as [(row, col, value)] (1-based, value a digit string or "none"),
    parsed word by word: five words a cell, nothing else allowed."""
    words = answer.split(" ")
    assert len(words) % 5 == 0, answer
    out = []
    for k in range(0, len(words), 5):
        m = READ_CHUNK.fullmatch(" ".join(words[k : k + 5]))
        assert m, (answer, k)
        out.append((int(m[1]), int(m[2]), m[3]))
    return out


def check_read(answer, scene):
    """Every cell of the grid exactly once, with its digit or "none"; returns the cell order."""
    at = {(c["row"] + 1, c["col"] + 1): str(c["digit"]) for c in scene["cells"]}
    triples = parse_read(answer)
    order = [(r, c) for r, c, _ in triples]
    grid = [(r, c) for r in range(1, scene["rows"] + 1) for c in range(1, scene["cols"] + 1)]
    assert sorted(order) == grid, answer  # each cell exactly once, nothing outside the grid
    for r, c, v in triples:
        assert v == at.get((r, c), "none"), (r, c, v, answer)
    return order


def check_answer(question, scene):
    """Independent re-derivation of a digit_grid_vqa answer from the scene description."""
    at = {(c["row"] + 1, c["col"] + 1): c["digit"] for c in scene["cells"]}
    if m := re.fullmatch(r"what digit is at row (\d+) column (\d+)", question):
        r, c = int(m[1]), int(m[2])
        assert 1 <= r <= scene["rows"] and 1 <= c <= scene["cols"]
        return str(at[(r, c)]) if (r, c) in at else "none"
    if m := re.fullmatch(r"where is the digit (\d)", question):
        where = [rc for rc, d in at.items() if d == int(m[1])]
        assert len(where) == 1
        return f"r{where[0][0]}c{where[0][1]}"
    if m := re.fullmatch(r"how many times does the digit (\d) appear", question):
        return str(sum(d == int(m[1]) for d in at.values()))
    if m := re.fullmatch(
        r"is the digit at row (\d+) column (\d+) larger than the digit to its right", question
    ):
        r, c = int(m[1]), int(m[2])
        return "yes" if at[(r, c)] > at[(r, c + 1)] else "no"
    raise AssertionError(f"unrecognised question {question!r}")


def test_answers_correct_by_construction_and_labels_are_real():
    cfg = DigitGridConfig(image_size=96, rows=3, cols=4, fill=0.7)
    digits = load_digits()
    types = collections.Counter()
    for i in range(200):
        ex = dg.generate_example(cfg, "validation", i)
        assert check_answer(ex["question"], ex["scene"]) == ex["answer"], ex["question"]
        types[dg.QUESTION_TYPES[ex["question_type"]]] += 1
        for c in ex["scene"]["cells"]:
            assert digits.target[c["source_index"]] == c["digit"]
    # every default (asked) type occurs; ``read`` is opt-in and never asked by default
    assert dg.ASKED_TYPES == dg.QUESTION_TYPES[:4] and "read" not in dg.ASKED_TYPES
    assert cfg.question_types == dg.ASKED_TYPES and cfg.read_fraction == 0.0
    assert set(types) == set(dg.ASKED_TYPES), types


def test_image_shows_digits_only_in_filled_cells():
    cfg = DigitGridConfig(image_size=64, rows=2, cols=2, fill=0.5)
    for i in range(20):
        ex = dg.generate_example(cfg, "train", i)
        img, scene = ex["image"], ex["scene"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        mask = np.zeros((64, 64), bool)
        for c in scene["cells"]:
            x0, y0, x1, y1 = c["bbox"]
            assert img[y0:y1, x0:x1].max() > 100  # ink
            mask[y0:y1, x0:x1] = True
        assert img[~mask].max() == 0  # plain background elsewhere


def test_digit_pools_disjoint_and_respected():
    pools = {s: set(dg.digit_pool(s).tolist()) for s in ("train", "validation", "test")}
    assert not pools["train"] & pools["validation"] and not pools["train"] & pools["test"]
    assert not pools["validation"] & pools["test"]
    assert set().union(*pools.values()) == set(range(1797))
    cfg = DigitGridConfig(rows=3, cols=3)
    for split, pool in pools.items():
        used = {
            c["source_index"]
            for i in range(30)
            for c in dg.generate_example(cfg, split, i)["scene"]["cells"]
        }
        assert used <= pool, split


def test_determinism():
    cfg = DigitGridConfig(clutter=0.3, seed=7)
    a = dg.generate_example(cfg, "test", 5)
    b = dg.generate_example(cfg, "test", 5)
    c = dg.generate_example(DigitGridConfig(clutter=0.3, seed=8), "test", 5)
    assert a["image"].tobytes() == b["image"].tobytes() and a["question"] == b["question"]
    assert a["image"].tobytes() != c["image"].tobytes()


@pytest.mark.parametrize(
    "knobs, arg",
    [
        (dict(rows=9), "rows"),
        (dict(image_size=32, rows=8, cols=8), "image_size"),
        (dict(fill=1.5), "fill"),
        (dict(question_types=("compare",), cols=1), "question_types"),
        (dict(question_types=("where",)), "question_types"),
        (dict(read_fraction=-0.1), "read_fraction"),
        (dict(read_fraction=1.5), "read_fraction"),
    ],
)
def test_bad_knobs_raise(knobs, arg):
    with pytest.raises(ValueError, match=arg):
        DigitGridConfig(**knobs)


# ----------------------------------------------------------------------------- read


def is_read(ex):
    return ex["question_type"] == READ


def test_read_answer_correct_by_construction_non_square():
    cfg = DigitGridConfig(image_size=64, rows=2, cols=4, read_fraction=1.0)
    values = collections.Counter()
    for i in range(100):
        ex = dg.generate_example(cfg, "train", i)
        assert is_read(ex) and ex["question"] == "read the grid", ex["question"]
        assert ex["scene"]["rows"] == 2 and ex["scene"]["cols"] == 4
        check_read(ex["answer"], ex["scene"])
        values.update("none" if v == "none" else "digit" for *_, v in parse_read(ex["answer"]))
    assert values["none"] > 0 and values["digit"] > 0, values  # both kinds of cell were read


def test_read_order_is_random():
    cfg = DigitGridConfig(image_size=64, rows=2, cols=4, read_fraction=1.0)
    raster = [(r, c) for r in range(1, 3) for c in range(1, 5)]
    orders = []
    for i in range(100):
        ex = dg.generate_example(cfg, "train", i)
        orders.append(tuple(check_read(ex["answer"], ex["scene"])))
    assert sum(o == tuple(raster) for o in orders) <= 1  # 1 in 8! = 40320 each
    assert len(set(orders)) >= 95, len(set(orders))
    assert {o[0] for o in orders} == set(raster)  # every cell is read first somewhere
    assert {o[-1] for o in orders} == set(raster)


def test_read_fraction_mixes_read_into_train_only():
    p, n = 0.3, 400
    mixed = DigitGridConfig(read_fraction=p)
    plain = DigitGridConfig()
    reads = 0
    for i in range(n):
        ex = dg.generate_example(mixed, "train", i)
        ref = dg.generate_example(plain, "train", i)
        if is_read(ex):
            reads += 1
            assert ex["question"] == "read the grid"
            check_read(ex["answer"], ex["scene"])
            # the mixing draw has its own stream: the scene is the one without it
            assert ex["scene"] == ref["scene"]
        else:
            assert dg.QUESTION_TYPES[ex["question_type"]] in dg.ASKED_TYPES
            assert ex["image"].tobytes() == ref["image"].tobytes()
            assert (ex["question"], ex["answer"]) == (ref["question"], ref["answer"])
    sd = math.sqrt(n * p * (1 - p))
    assert abs(reads - n * p) <= 4 * sd, reads
    always = DigitGridConfig(read_fraction=1.0)
    for split in ("validation", "test"):
        for i in range(100):
            ex = dg.generate_example(always, split, i)
            ref = dg.generate_example(plain, split, i)
            assert not is_read(ex), (split, i)
            assert ex["image"].tobytes() == ref["image"].tobytes()
            assert (ex["question"], ex["answer"]) == (ref["question"], ref["answer"])


def test_read_fraction_zero_is_the_default():
    knobs = dict(image_size=48, rows=3, cols=3)
    zero, default = DigitGridConfig(read_fraction=0.0, **knobs), DigitGridConfig(**knobs)
    for split in ("train", "validation", "test"):
        for i in range(50):
            a, b = dg.generate_example(zero, split, i), dg.generate_example(default, split, i)
            assert a["image"].tobytes() == b["image"].tobytes()
            assert (a["question"], a["answer"], a["question_type"]) == (
                b["question"],
                b["answer"],
                b["question_type"],
            )
            assert a["scene"] == b["scene"]


# Examples of a dataset prepared before ``read`` existed (rows=3, cols=3, image_size=48; checked
# record by record against its array_record files): the default examples must not move.
GOLDEN = [
    ("train", 0, "what digit is at row 3 column 2", "0", [523, 1159, 928, 1057, 964, 5, 1105, 196]),
    ("train", 1, "what digit is at row 1 column 2", "4", [299, 41, 597, 429, 1103, 792, 28, 374]),
    ("train", 2, "where is the digit 0", "r2c2", [826, 596, 154, 422, 401, 1126, 608]),
    (
        "train",
        3,
        "what digit is at row 1 column 2",
        "none",
        [1251, 821, 113, 90, 157, 1015, 1038, 1032],
    ),
    (
        "validation",
        0,
        "how many times does the digit 1 appear",
        "0",
        [1352, 1291, 1294, 1432, 1287, 1257],
    ),
    (
        "validation",
        2,
        "how many times does the digit 6 appear",
        "2",
        [1466, 1385, 1345, 1502, 1438, 1293],
    ),
]


@pytest.mark.parametrize("split, index, question, answer, sources", GOLDEN)
def test_default_examples_unchanged_by_read(split, index, question, answer, sources):
    cfg = DigitGridConfig(image_size=48, rows=3, cols=3)
    ex = dg.generate_example(cfg, split, index)
    assert (ex["question"], ex["answer"]) == (question, answer)
    assert [c["source_index"] for c in ex["scene"]["cells"]] == sources


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_read_as_asked_type_on_every_split(split):
    cfg = DigitGridConfig(image_size=64, rows=2, cols=4, question_types=("read",))
    assert dg.max_row_tokens(cfg) == 2 + 4 + 5 * 2 * 4 + 1
    for i in range(20):
        ex = dg.generate_example(cfg, split, i)
        assert is_read(ex) and ex["question"] == "read the grid"
        check_read(ex["answer"], ex["scene"])
        assert {c["source_index"] for c in ex["scene"]["cells"]} <= set(dg.digit_pool(split))
    both = DigitGridConfig(question_types=("count", "read"))
    seen = {
        dg.QUESTION_TYPES[dg.generate_example(both, split, i)["question_type"]] for i in range(40)
    }
    assert seen == {"count", "read"}, seen


@pytest.mark.parametrize(
    "knobs",
    [
        dict(image_size=64, rows=2, cols=4, read_fraction=1.0),
        dict(image_size=64, rows=8, cols=8, fill=0.5, read_fraction=1.0),
        dict(image_size=48, rows=3, cols=1, read_fraction=0.5),
    ],
)
def test_read_rows_encode_within_max_row_tokens(knobs):
    cfg = DigitGridConfig(**knobs)
    tok = synthetic_tokenizer()
    bound = dg.max_row_tokens(cfg)
    assert bound == 2 + 4 + 5 * cfg.rows * cfg.cols + 1
    lengths = collections.Counter()
    for i in range(60):
        ex = dg.generate_example(cfg, "train", i)
        ids, prompt_len = encode_vqa(tok, ex["question"], ex["answer"])
        assert tok.unk_id not in ids, ex["answer"]
        assert len(ids) <= bound
        if is_read(ex):
            assert len(ids) == bound  # a full-grid read reaches the bound exactly
            assert prompt_len == 2 + 4  # <bos> <image> read the grid ?
            assert tok.decode(ids[prompt_len:]) == ex["answer"]
        lengths[is_read(ex)] += 1
    assert lengths[True] > 0


def test_max_row_tokens_without_read():
    tok = synthetic_tokenizer()
    for cfg in (DigitGridConfig(), DigitGridConfig(rows=8, cols=8, image_size=64)):
        assert dg.max_row_tokens(cfg) == 2 + dg.MAX_QUESTION_TOKENS + 2
    # the longest question is exactly MAX_QUESTION_TOKENS words (with its "?")
    q = "is the digit at row 1 column 2 larger than the digit to its right"
    ids, prompt_len = encode_vqa(tok, q, "yes")
    assert prompt_len == 2 + dg.MAX_QUESTION_TOKENS and len(ids) == 2 + dg.MAX_QUESTION_TOKENS + 2


def test_build_dataset_max_length_is_max_row_tokens(tmp_path):
    knobs = dict(
        image_size=32, rows=2, cols=3, read_fraction=0.5, num_train=8, num_validation=4, num_test=0
    )
    ds = build_dataset("digit_grid_vqa", tmp_path, **knobs)
    assert ds.max_length == dg.max_row_tokens(ds.config) == 2 + 4 + 5 * 6 + 1
    assert ds.question_types == dg.QUESTION_TYPES
    tok = ds.tokenizer
    longest = 0
    for split in ("train", "validation"):
        for i in range(len(ds[split])):
            rec = ds[split][i]
            ids, _ = encode_vqa(tok, rec["question"].decode(), rec["answer"].decode())
            assert len(ids) <= ds.max_length
            longest = max(longest, len(ids))
            assert split == "train" or rec["question_type"] != READ
    assert longest == ds.max_length  # some train record is a read
