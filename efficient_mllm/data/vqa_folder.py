"""``vqa_folder``: a user's folder of images plus JSON-lines annotations, read like the others.

Layout: ``<root>/<annotations>`` with one JSON object per line,
``{"image": "relative/or/absolute.png", "question": "...", "answer": "..."}`` and optionally
``"split"`` (``train`` / ``validation`` / ``test``; default ``train``) and ``"question_type"`` (a
name; default ``"default"``). Without ``annotations``, ``train.jsonl`` / ``validation.jsonl`` /
``test.jsonl`` are used if present, else ``annotations.jsonl``. Images are decoded with PIL,
converted to RGB and resized (bilinear) to ``image_size`` when read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from efficient_mllm.data import common

__all__ = ["VqaFolderSource", "load_vqa_folder", "read_annotations"]


def read_annotations(
    path: str | os.PathLike, root: str | os.PathLike, default_split: str = "train"
) -> list[dict]:
    """Parses and checks a JSON-lines annotation file; image paths become absolute."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"annotations: {path}:{lineno} is not valid JSON ({e.msg})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"annotations: {path}:{lineno} is not a JSON object")
            missing = [
                k for k in ("image", "question", "answer") if not isinstance(row.get(k), str)
            ]
            if missing:
                raise ValueError(
                    f"annotations: {path}:{lineno} needs string fields image, question, "
                    f"answer; missing or not strings: {missing}"
                )
            image = (
                row["image"] if os.path.isabs(row["image"]) else os.path.join(root, row["image"])
            )
            if not os.path.isfile(image):
                raise ValueError(
                    f"annotations: {path}:{lineno} names image {row['image']!r}, "
                    f"which does not exist under {str(root)!r}"
                )
            split = row.get("split", default_split)
            common.split_id(split)
            rows.append(
                {
                    "image": image,
                    "question": row["question"],
                    "answer": row["answer"],
                    "split": split,
                    "question_type": str(row.get("question_type", "default")),
                }
            )
    return rows


class VqaFolderSource:
    """Random-access source (``len``, ``[i]``) of records ``{image uint8 [S, S, 3], question,
    answer, question_type, scene}``; usable by :func:`efficient_mllm.data.pipeline.make_loader`."""

    def __init__(self, rows: list[dict], *, image_size: int, question_types: tuple[str, ...]):
        self.image_size = common.check_int("image_size", image_size, 1, 8192)
        self.question_types = tuple(question_types)
        self._rows = list(rows)
        self._type_ids = {t: i for i, t in enumerate(self.question_types)}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        row = self._rows[index]
        with Image.open(row["image"]) as im:
            im = im.convert("RGB")
            if im.size != (self.image_size, self.image_size):
                im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
            image = np.asarray(im, dtype=np.uint8)
        return {
            "image": image,
            "question": row["question"],
            "answer": row["answer"],
            "question_type": self._type_ids[row["question_type"]],
            "scene": {"image_path": row["image"]},
        }

    def __repr__(self) -> str:
        return f"VqaFolderSource({len(self)} records, image_size={self.image_size})"


def load_vqa_folder(
    path: str | os.PathLike, *, image_size: int = 224, annotations: str | None = None
) -> tuple[dict[str, VqaFolderSource], tuple[str, ...], list[dict]]:
    """``(sources per split present, question type names, all rows)`` for the folder ``path``."""
    if not os.path.isdir(path):
        raise ValueError(f"path: {str(path)!r} is not a directory")
    common.check_int("image_size", image_size, 1, 8192)
    rows: list[dict] = []
    if annotations is not None:
        file = annotations if os.path.isabs(annotations) else os.path.join(path, annotations)
        if not os.path.isfile(file):
            raise ValueError(f"annotations: {file!r} does not exist")
        rows = read_annotations(file, path)
    else:
        per_split = [s for s in common.SPLITS if os.path.isfile(os.path.join(path, f"{s}.jsonl"))]
        if per_split:
            for s in per_split:
                rows += [
                    dict(r, split=s)
                    for r in read_annotations(os.path.join(path, f"{s}.jsonl"), path, s)
                ]
        elif os.path.isfile(os.path.join(path, "annotations.jsonl")):
            rows = read_annotations(os.path.join(path, "annotations.jsonl"), path)
        else:
            raise ValueError(
                f"path: {str(path)!r} has no train.jsonl/validation.jsonl/test.jsonl "
                "or annotations.jsonl; pass annotations='file.jsonl'"
            )
    if not rows:
        raise ValueError(f"path: the annotations under {str(path)!r} hold no rows")
    qtypes = tuple(sorted({r["question_type"] for r in rows}))
    sources = {
        s: VqaFolderSource(
            [r for r in rows if r["split"] == s], image_size=image_size, question_types=qtypes
        )
        for s in common.SPLITS
        if any(r["split"] == s for r in rows)
    }
    return sources, qtypes, rows
