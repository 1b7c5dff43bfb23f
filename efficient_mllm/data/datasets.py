"""``build_dataset``: prepare a dataset if needed and return its splits; registry entries.

>>> ds = build_dataset("shapes_vqa", "/tmp/data", image_size=128, max_objects=6)
>>> ds["train"][0]          # record: image uint8 [128,128,3], question, answer, ...
>>> ds.question_types, ds.tokenizer, ds.max_length
>>> registry.DATASETS.build("digit_grid_vqa(rows=3, cols=3)", data_dir="/tmp/data")
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import os
from typing import Any

from efficient_mllm import registry
from efficient_mllm.data import common, digit_grid_vqa, mqar, shapes_vqa, vqa_folder
from efficient_mllm.data.tokenizer import WordTokenizer, encode_vqa, format_question

__all__ = [
    "DATASET_NAMES",
    "DatasetSplits",
    "build_dataset",
    "config_for",
    "default_data_dir",
    "question_types",
    "synthetic_tokenizer",
]

DATASET_NAMES = ("shapes_vqa", "digit_grid_vqa", "mqar", "vqa_folder")
_MODULES = {"shapes_vqa": shapes_vqa, "digit_grid_vqa": digit_grid_vqa, "mqar": mqar}
_CONFIGS = {
    "shapes_vqa": shapes_vqa.ShapesVQAConfig,
    "digit_grid_vqa": digit_grid_vqa.DigitGridConfig,
    "mqar": mqar.MQARConfig,
}


def default_data_dir() -> str:
    """``$EFFICIENT_MLLM_DATA_DIR`` or ``~/.cache/efficient_mllm/datasets``."""
    return os.environ.get(
        "EFFICIENT_MLLM_DATA_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "efficient_mllm", "datasets"),
    )


@functools.lru_cache(maxsize=1)
def synthetic_tokenizer() -> WordTokenizer:
    """One fixed word vocabulary covering ``shapes_vqa`` and ``digit_grid_vqa`` (any knobs)."""
    return WordTokenizer(list(dict.fromkeys(shapes_vqa.vocabulary() + digit_grid_vqa.vocabulary())))


def question_types(name: str) -> tuple[str, ...]:
    """Question-type names of a synthetic dataset; ``question_type`` ids index this tuple."""
    if name not in _MODULES:
        raise ValueError(
            f"name must be one of {sorted(_MODULES)}, got {name!r} "
            "(vqa_folder's types come from its annotations: DatasetSplits.question_types)"
        )
    return _MODULES[name].QUESTION_TYPES


def config_for(name: str, **knobs: Any):
    """The config dataclass of synthetic dataset ``name`` with ``knobs`` (checked)."""
    if name not in _CONFIGS:
        raise ValueError(f"name must be one of {sorted(_CONFIGS)}, got {name!r}")
    cls = _CONFIGS[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"knobs: {unknown} are not knobs of {name!r}; expected some of {allowed}")
    cfg = cls(**knobs)
    if not any(cfg.num_examples(s) for s in common.SPLITS):
        raise ValueError(
            "knobs: num_train, num_validation and num_test are all 0; expected at least one > 0"
        )
    return cfg


class DatasetSplits(collections.abc.Mapping):
    """Mapping ``split -> random-access source`` plus what a trainer needs to know.

    Attributes: ``name``; ``config`` (the knobs: a config dataclass, or a dict for vqa_folder);
    ``question_types``; ``tokenizer`` (the task's default tokenizer; ``None`` for ``mqar``, whose
    records are already token ids); ``vocab_size``; ``image_size`` (``None`` if text-only);
    ``max_length`` (longest row in tokens with the default tokenizer: a safe ``seq_len``);
    ``multimodal``; ``builder`` (the tfds builder, or ``None``).
    """

    def __init__(
        self,
        name: str,
        splits: dict[str, Any],
        *,
        config: Any,
        question_types: tuple[str, ...],
        tokenizer: Any,
        vocab_size: int,
        image_size: int | None,
        max_length: int,
        builder: Any = None,
    ):
        self.name = name
        self._splits = dict(splits)
        self.config = config
        self.question_types = tuple(question_types)
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.image_size = image_size
        self.max_length = int(max_length)
        self.builder = builder

    @property
    def multimodal(self) -> bool:
        return self.image_size is not None

    def __getitem__(self, split: str):
        if split not in self._splits:
            raise KeyError(
                f"split {split!r} is not in dataset {self.name!r}; "
                f"available: {sorted(self._splits)}"
            )
        return self._splits[split]

    def __iter__(self):
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self._splits.items())
        return f"DatasetSplits({self.name!r}, {sizes})"


def _build_vqa_folder(
    path: str | None = None, image_size: int = 224, annotations: str | None = None
) -> DatasetSplits:
    if path is None:
        raise ValueError("path: vqa_folder needs path='<folder with images and JSON lines>'")
    sources, qtypes, rows = vqa_folder.load_vqa_folder(
        path, image_size=image_size, annotations=annotations
    )
    tok = WordTokenizer.from_texts(
        [format_question(r["question"]) for r in rows] + [r["answer"] for r in rows]
    )
    max_length = max(len(encode_vqa(tok, r["question"], r["answer"])[0]) for r in rows)
    return DatasetSplits(
        "vqa_folder",
        sources,
        config={"path": os.fspath(path), "image_size": image_size, "annotations": annotations},
        question_types=qtypes,
        tokenizer=tok,
        vocab_size=tok.vocab_size,
        image_size=image_size,
        max_length=max_length,
    )


def build_dataset(
    name: str, data_dir: str | os.PathLike | None = None, **knobs: Any
) -> DatasetSplits:
    """Prepares dataset ``name`` under ``data_dir`` unless already prepared with the same knobs
    (the cache is keyed by a hash of all knobs) and returns its splits.

    ``name``: ``shapes_vqa``, ``digit_grid_vqa``, ``mqar`` (tfds ``array_record``, no TensorFlow)
    or ``vqa_folder`` (knobs ``path``, ``image_size``, ``annotations``; read in place, ``data_dir``
    unused). ``data_dir`` defaults to :func:`default_data_dir`.
    """
    if name == "vqa_folder":
        unknown = sorted(set(knobs) - {"path", "image_size", "annotations"})
        if unknown:
            raise ValueError(
                f"knobs: {unknown} are not knobs of 'vqa_folder'; "
                "expected some of ['path', 'image_size', 'annotations']"
            )
        return _build_vqa_folder(**knobs)
    if name not in _MODULES:
        raise ValueError(f"name must be one of {list(DATASET_NAMES)}, got {name!r}")
    cfg = config_for(name, **knobs)
    import tensorflow_datasets as tfds

    from efficient_mllm.data import builders

    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    builder = builders.make_builder(name, data_dir, cfg)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    splits = {s: builder.as_data_source(split=s) for s in common.SPLITS if cfg.num_examples(s) > 0}
    if name == "mqar":
        return DatasetSplits(
            name,
            splits,
            config=cfg,
            question_types=mqar.QUESTION_TYPES,
            tokenizer=None,
            vocab_size=cfg.vocab_size,
            image_size=None,
            max_length=cfg.seq_len,
            builder=builder,
        )
    tok = synthetic_tokenizer()
    max_length = _MODULES[name].max_row_tokens(cfg)
    return DatasetSplits(
        name,
        splits,
        config=cfg,
        question_types=_MODULES[name].QUESTION_TYPES,
        tokenizer=tok,
        vocab_size=tok.vocab_size,
        image_size=cfg.image_size,
        max_length=max_length,
        builder=builder,
    )


# ----------------------------------------------------------------------------- registry


def _register_synthetic(name: str, paper: str) -> None:
    cls = _CONFIGS[name]

    def factory(**kwargs: Any) -> DatasetSplits:
        data_dir = kwargs.pop("data_dir", None)
        return build_dataset(name, data_dir, **kwargs)

    params = [inspect.Parameter("data_dir", inspect.Parameter.KEYWORD_ONLY, default=None)]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in dataclasses.fields(cls)
    ]
    factory.__signature__ = inspect.Signature(params)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (_MODULES[name].__doc__ or "").strip().split("\n")[0]
    if name not in registry.DATASETS:
        registry.DATASETS.register(name, paper=paper)(factory)


def _vqa_folder_factory(
    *, path: str, image_size: int = 224, annotations: str | None = None, data_dir: str | None = None
) -> DatasetSplits:
    """A folder of images + JSON lines {image, question, answer}, resized to image_size."""
    return _build_vqa_folder(path=path, image_size=image_size, annotations=annotations)


_register_synthetic("shapes_vqa", "")
_register_synthetic("digit_grid_vqa", "")
_register_synthetic(
    "mqar",
    "Arora et al. 2023, Zoology: Measuring and Improving Recall in Efficient "
    "Language Models (arXiv:2312.04927)",
)
if "vqa_folder" not in registry.DATASETS:
    registry.DATASETS.register("vqa_folder")(_vqa_folder_factory)
