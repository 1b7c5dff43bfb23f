"""efficient_mllm.data: synthetic and user VQA datasets (tfds ``array_record``, no TensorFlow),
tokenizers, and grain pipelines producing the batches described in ``docs/interfaces.md``.

    >>> from efficient_mllm.data import build_dataset, make_loader
    >>> ds = build_dataset("shapes_vqa", "/tmp/data", image_size=64)
    >>> loader = make_loader(ds["train"], ds.tokenizer, batch_size=32, seq_len=ds.max_length)
    >>> batch = next(iter(loader))

Importing this package registers ``shapes_vqa``, ``digit_grid_vqa``, ``mqar`` and ``vqa_folder``
in ``registry.DATASETS``. ``grain`` and ``tensorflow_datasets`` are imported on first use of
:func:`make_loader` / the builders.
"""

from efficient_mllm.data.datasets import (
    DATASET_NAMES,
    DatasetSplits,
    build_dataset,
    config_for,
    default_data_dir,
    question_types,
    synthetic_tokenizer,
)
from efficient_mllm.data.digit_grid_vqa import DigitGridConfig
from efficient_mllm.data.mqar import MQARConfig
from efficient_mllm.data.shapes_vqa import ShapesVQAConfig
from efficient_mllm.data.tokenizer import (
    SPECIAL_TOKENS,
    HFTokenizer,
    WordTokenizer,
    encode_vqa,
    format_question,
    load_tokenizer,
)

_LAZY = {
    "make_loader": "pipeline",
    "encode_record": "pipeline",
    "normalize_image": "pipeline",
    "split_host_fields": "pipeline",
    "HOST_FIELDS": "pipeline",
}

__all__ = [
    "DATASET_NAMES",
    "HOST_FIELDS",
    "SPECIAL_TOKENS",
    "DatasetSplits",
    "DigitGridConfig",
    "HFTokenizer",
    "MQARConfig",
    "ShapesVQAConfig",
    "WordTokenizer",
    "build_dataset",
    "config_for",
    "default_data_dir",
    "encode_record",
    "encode_vqa",
    "format_question",
    "load_tokenizer",
    "make_loader",
    "normalize_image",
    "question_types",
    "split_host_fields",
    "synthetic_tokenizer",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"efficient_mllm.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'efficient_mllm.data' has no attribute {name!r}")
