"""tfds builders: prepared without TensorFlow, records equal the generators, knob-keyed cache."""

import importlib.util
import json
import time

import numpy as np
import pytest

from efficient_mllm import registry
from efficient_mllm.data import (
    DatasetSplits,
    build_dataset,
    config_for,
    digit_grid_vqa,
    mqar,
    question_types,
    shapes_vqa,
)

from .conftest import DIGITS_KNOBS, MQAR_KNOBS, SHAPES_KNOBS


def test_tensorflow_is_not_installed():
    assert importlib.util.find_spec("tensorflow") is None


@pytest.mark.parametrize(
    "fixture, module, knobs",
    [
        ("shapes_ds", shapes_vqa, SHAPES_KNOBS),
        ("digits_ds", digit_grid_vqa, DIGITS_KNOBS),
        ("mqar_ds", mqar, MQAR_KNOBS),
    ],
)
def test_stored_records_equal_generated(request, fixture, module, knobs):
    assert importlib.util.find_spec("tensorflow") is None
    ds = request.getfixturevalue(fixture)
    assert isinstance(ds, DatasetSplits) and set(ds) == {"train", "validation", "test"}
    cfg = config_for(ds.name, **knobs)
    for split in ds:
        assert len(ds[split]) == cfg.num_examples(split)
        for i in (0, len(ds[split]) - 1):
            rec, ref = ds[split][i], module.generate_example(cfg, split, i)
            assert rec["answer"].decode() == ref["answer"]
            assert int(rec["question_type"]) == ref["question_type"]
            assert json.loads(rec["scene"]) == json.loads(json.dumps(ref["scene"]))
            if "image" in ref:
                assert rec["image"].dtype == np.uint8 and np.array_equal(rec["image"], ref["image"])
                assert rec["question"].decode() == ref["question"]
            else:
                assert np.array_equal(rec["tokens"], ref["tokens"])
                assert np.array_equal(rec["targets"], ref["targets"])
    assert ds.question_types == question_types(ds.name)


def test_cache_is_keyed_by_knobs(shapes_ds, data_dir):
    again = build_dataset("shapes_vqa", data_dir, **SHAPES_KNOBS)
    assert again.builder.data_path == shapes_ds.builder.data_path
    changed = build_dataset(
        "shapes_vqa", data_dir, **{**SHAPES_KNOBS, "clutter": 0.5, "num_train": 8}
    )
    assert changed.builder.data_path != shapes_ds.builder.data_path
    assert len(changed["train"]) == 8
    a, b = shapes_ds["train"][0]["image"], changed["train"][0]["image"]
    assert not np.array_equal(a, b)


def test_split_images_disjoint_in_prepared_data(shapes_ds, digits_ds):
    for ds in (shapes_ds, digits_ds):
        seen = {}
        for split in ds:
            seen[split] = {ds[split][i]["image"].tobytes() for i in range(len(ds[split]))}
        assert not seen["train"] & seen["validation"] and not seen["train"] & seen["test"]
        assert not seen["validation"] & seen["test"]
    pools = {
        s: {
            c["source_index"]
            for i in range(len(digits_ds[s]))
            for c in json.loads(digits_ds[s][i]["scene"])["cells"]
        }
        for s in digits_ds
    }
    assert not pools["train"] & pools["validation"] and not pools["train"] & pools["test"]
    assert not pools["validation"] & pools["test"]


def test_build_speed_2000_examples_64px(tmp_path):
    start = time.perf_counter()
    ds = build_dataset(
        "shapes_vqa", tmp_path, image_size=64, num_train=2000, num_validation=0, num_test=0
    )
    elapsed = time.perf_counter() - start
    assert len(ds["train"]) == 2000 and set(ds) == {"train"}
    assert elapsed < 30, f"building 2000 64x64 examples took {elapsed:.1f}s"


def test_registry_builds_datasets(data_dir):
    assert {"shapes_vqa", "digit_grid_vqa", "mqar", "vqa_folder"} <= set(registry.DATASETS.names())
    ds = registry.DATASETS.build(
        "mqar(vocab_size=64, seq_len=48, num_kv_pairs=6, num_queries=4, "
        "num_train=64, num_validation=16, num_test=16)",
        data_dir=str(data_dir),
    )
    assert ds.name == "mqar" and ds.tokenizer is None and ds.vocab_size == 64 and not ds.multimodal
    with pytest.raises(registry.RegistryError, match="num_objects"):
        registry.DATASETS.build("shapes_vqa(num_objects=3)")


def test_build_dataset_rejects_bad_input(data_dir):
    with pytest.raises(ValueError, match="name"):
        build_dataset("imagenet", data_dir)
    with pytest.raises(ValueError, match="knobs"):
        build_dataset("mqar", data_dir, vocab=3)
    with pytest.raises(ValueError, match="knobs"):
        build_dataset("mqar", data_dir, num_train=0, num_validation=0, num_test=0)
    with pytest.raises(ValueError, match="knobs"):
        build_dataset("vqa_folder", path=str(data_dir), size=3)


def test_prepared_files_identical_for_same_seed(tmp_path):
    knobs = dict(
        image_size=32, min_object_size=0.25, num_train=24, num_validation=4, num_test=4, clutter=0.3
    )
    a = build_dataset("shapes_vqa", tmp_path / "a", **knobs)
    b = build_dataset("shapes_vqa", tmp_path / "b", **knobs)
    c = build_dataset("shapes_vqa", tmp_path / "c", **knobs, seed=1)
    names = sorted(p.name for p in a.builder.data_path.iterdir() if "array_record" in p.name)
    assert len(names) == 3
    for name in names:
        blob = (a.builder.data_path / name).read_bytes()
        assert blob == (b.builder.data_path / name).read_bytes(), name
        assert blob != (c.builder.data_path / name).read_bytes(), name
