"""vqa_folder: a temp folder of PNGs + JSON lines, read through the same pipeline."""

import json

import numpy as np
import pytest
from PIL import Image

from efficient_mllm import registry
from efficient_mllm.data import build_dataset, make_loader

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _make_folder(root, n=12, split_field=True):
    (root / "imgs").mkdir()
    lines = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        size = (20 + i, 30 + 2 * i)  # different sizes: all are resized
        Image.new("RGB", size, COLOURS[name]).save(root / "imgs" / f"{i}.png")
        row = {
            "image": f"imgs/{i}.png",
            "question": "What colour is this picture?",
            "answer": name,
            "question_type": "colour" if i % 2 else "other",
        }
        if split_field:
            row["split"] = "train" if i < 8 else "test"
        lines.append(json.dumps(row))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")


def test_round_trip_through_pipeline(tmp_path):
    _make_folder(tmp_path)
    ds = build_dataset("vqa_folder", path=str(tmp_path), image_size=16)
    assert set(ds) == {"train", "test"} and len(ds["train"]) == 8 and len(ds["test"]) == 4
    assert ds.question_types == ("colour", "other") and ds.multimodal
    rec = ds["train"][1]
    assert rec["image"].shape == (16, 16, 3) and rec["image"].dtype == np.uint8
    assert tuple(rec["image"][8, 8]) == COLOURS[rec["answer"]] and rec["question_type"] == 0
    loader = make_loader(
        ds["train"],
        ds.tokenizer,
        batch_size=4,
        seq_len=ds.max_length,
        shuffle=False,
        shard_index=0,
        shard_count=1,
    )
    seen = 0
    for b in loader:
        assert b["image"].shape == (4, 16, 16, 3)
        for r in range(4):
            i = int(b["index"][r])
            want = list(COLOURS)[i % 3]
            assert b["answer_text"][r] == want
            assert ds.tokenizer.decode(b["tokens"][r][b["loss_mask"][r] == 1]) == want
            expect = np.array(COLOURS[want], np.float32) / 255.0 * 2 - 1
            np.testing.assert_allclose(b["image"][r, 8, 8], expect, atol=1e-6)
            assert b["question_type"][r] == (0 if i % 2 else 1)
            words = ds.tokenizer.decode(b["tokens"][r][: b["prompt_lengths"][r]])
            assert words == "what colour is this picture ?"
        seen += 4
    assert seen == 8


def test_per_split_files_and_registry(tmp_path):
    _make_folder(tmp_path, n=6, split_field=False)
    (tmp_path / "annotations.jsonl").rename(tmp_path / "validation.jsonl")
    ds = registry.DATASETS.build(f"vqa_folder(path={str(tmp_path)!r}, image_size=8)")
    assert set(ds) == {"validation"} and len(ds["validation"]) == 6
    assert ds["validation"][0]["image"].shape == (8, 8, 3)


def test_bad_folders_raise(tmp_path):
    with pytest.raises(ValueError, match="path"):
        build_dataset("vqa_folder", path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="path"):
        build_dataset("vqa_folder", path=str(tmp_path))  # no annotations
    (tmp_path / "annotations.jsonl").write_text(
        json.dumps({"image": "x.png", "question": "q", "answer": "a"})
    )
    with pytest.raises(ValueError, match="annotations.*x.png"):
        build_dataset("vqa_folder", path=str(tmp_path))
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    (tmp_path / "annotations.jsonl").write_text(json.dumps({"image": "x.png", "question": "q"}))
    with pytest.raises(ValueError, match="answer"):
        build_dataset("vqa_folder", path=str(tmp_path))
    (tmp_path / "annotations.jsonl").write_text(
        json.dumps({"image": "x.png", "question": "q", "answer": "a", "split": "dev"})
    )
    with pytest.raises(ValueError, match="split"):
        build_dataset("vqa_folder", path=str(tmp_path))
