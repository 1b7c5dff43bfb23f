"""tfds builders for the synthetic datasets: ``array_record`` files, no TensorFlow.

Each builder takes a :class:`KnobsConfig` wrapping the dataset's config dataclass; the config's
name is a hash of the knobs (and :data:`GENERATOR_VERSION`), so every distinct set of knobs is
prepared into its own directory ``<data_dir>/<dataset>/<hash>/<version>`` and a changed knob
rebuilds. Images are stored as PNG bytes (tfds can only encode numpy images with TensorFlow)
and decoded to uint8 arrays on read. Example ``i`` of a split is stored at position ``i``
(``disable_shuffling``), so a stored record equals ``generate_example(config, split, i)``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from efficient_mllm.data import common, digit_grid_vqa, mqar, shapes_vqa

__all__ = [
    "BUILDERS",
    "GENERATOR_VERSION",
    "DigitGridVqa",
    "KnobsConfig",
    "Mqar",
    "ShapesVqa",
    "make_builder",
    "to_tfds_example",
]

# Bump when a generator's output changes, so that prepared caches are rebuilt.
GENERATOR_VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class KnobsConfig(tfds.core.BuilderConfig):
    """A tfds builder config carrying a dataset config dataclass in ``knobs``."""

    knobs: Any = None

    @classmethod
    def of(cls, knobs: Any) -> KnobsConfig:
        d = common.knob_dict(knobs)
        h = common.stable_hash({"knobs": d, "generator": GENERATOR_VERSION})
        return cls(
            name=f"k{h:016x}",
            version=GENERATOR_VERSION,
            description=json.dumps(d, sort_keys=True),
            knobs=knobs,
        )


def to_tfds_example(record: dict[str, Any]) -> dict[str, Any]:
    """A generator record in the form the builders' features accept (PNG bytes, JSON scene)."""
    out = {
        "answer": record["answer"],
        "question_type": np.int32(record["question_type"]),
        "scene": json.dumps(record["scene"], sort_keys=True),
    }
    if "image" in record:
        out["image"] = common.png_bytes(record["image"])
        out["question"] = record["question"]
    else:
        out["tokens"] = record["tokens"]
        out["targets"] = record["targets"]
    return out


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(GENERATOR_VERSION)
    # tfds derives this from the package through `importlib_resources` (not installed); set the
    # same value directly.
    code_path = epath.Path(__file__)
    _MODULE: Any = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=self._features(),
            description=(self._MODULE.__doc__ or "").split("\n")[0],
            disable_shuffling=True,
        )

    def _features(self) -> tfds.features.FeaturesDict:
        S = self.builder_config.knobs.image_size
        return tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(S, S, 3), encoding_format="png"),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "question_type": tfds.features.Scalar(dtype=np.int32),
                "scene": tfds.features.Text(),
            }
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config.knobs
        return {s: self._generate_examples(s) for s in common.SPLITS if cfg.num_examples(s) > 0}

    def _generate_examples(self, split: str):
        cfg = self.builder_config.knobs
        for i in range(cfg.num_examples(split)):
            yield i, to_tfds_example(self._MODULE.generate_example(cfg, split, i))


class ShapesVqa(_SyntheticBuilder):
    """Rendered shapes scenes with templated single-word-answer questions."""

    _MODULE = shapes_vqa


class DigitGridVqa(_SyntheticBuilder):
    """scikit-learn handwritten digits on a grid with templated questions."""

    _MODULE = digit_grid_vqa


class Mqar(_SyntheticBuilder):
    """Multi-query associative recall token sequences."""

    _MODULE = mqar

    def _features(self) -> tfds.features.FeaturesDict:
        L = self.builder_config.knobs.seq_len
        return tfds.features.FeaturesDict(
            {
                "tokens": tfds.features.Tensor(shape=(L,), dtype=np.int32),
                "targets": tfds.features.Tensor(shape=(L,), dtype=np.uint8),
                "answer": tfds.features.Text(),
                "question_type": tfds.features.Scalar(dtype=np.int32),
                "scene": tfds.features.Text(),
            }
        )


BUILDERS = {
    "shapes_vqa": (ShapesVqa, shapes_vqa.ShapesVQAConfig),
    "digit_grid_vqa": (DigitGridVqa, digit_grid_vqa.DigitGridConfig),
    "mqar": (Mqar, mqar.MQARConfig),
}


def make_builder(name: str, data_dir: str, knobs: Any) -> tfds.core.GeneratorBasedBuilder:
    """The tfds builder of dataset ``name`` for the config dataclass ``knobs``."""
    if name not in BUILDERS:
        raise ValueError(f"name must be one of {sorted(BUILDERS)}, got {name!r}")
    cls, config_cls = BUILDERS[name]
    if not isinstance(knobs, config_cls):
        raise ValueError(
            f"knobs must be a {config_cls.__name__} for {name!r}, got {type(knobs).__name__}"
        )
    return cls(config=KnobsConfig.of(knobs), data_dir=data_dir, file_format="array_record")
