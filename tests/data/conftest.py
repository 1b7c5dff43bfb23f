"""Fixtures for the data tests: small datasets prepared once per session."""

import pytest

from efficient_mllm.data import build_dataset

SHAPES_KNOBS = dict(
    image_size=32,
    min_objects=1,
    max_objects=4,
    min_object_size=0.25,
    max_object_size=0.3,
    num_train=96,
    num_validation=40,
    num_test=40,
)
DIGITS_KNOBS = dict(image_size=48, rows=2, cols=3, num_train=64, num_validation=24, num_test=24)
MQAR_KNOBS = dict(
    vocab_size=64,
    seq_len=48,
    num_kv_pairs=6,
    num_queries=4,
    num_train=64,
    num_validation=16,
    num_test=16,
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def shapes_ds(data_dir):
    return build_dataset("shapes_vqa", data_dir, **SHAPES_KNOBS)


@pytest.fixture(scope="session")
def digits_ds(data_dir):
    return build_dataset("digit_grid_vqa", data_dir, **DIGITS_KNOBS)


@pytest.fixture(scope="session")
def mqar_ds(data_dir):
    return build_dataset("mqar", data_dir, **MQAR_KNOBS)
