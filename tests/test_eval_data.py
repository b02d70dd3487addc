"""Fashion-MNIST loader: idx parsing, the missing-package error, model-space conversion."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from tomediff.eval.data import (
    CLASS_NAMES,
    DEFAULT_DATA_DIR,
    DatasetMissingError,
    load_fashion_mnist,
    to_model_space,
    to_uint8,
)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_loader_parses_idx_files_from_another_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    got_images, got_labels = load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64


def test_missing_files_name_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", tmp_path)


def test_model_space_round_trip() -> None:
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    tensor = to_model_space(images)
    assert tensor.shape == (3, 1, 32, 32)
    assert float(tensor.min()) >= -1 and float(tensor.max()) <= 1
    assert float(tensor[:, :, 0].max()) == -1.0  # padding is background (black)
    np.testing.assert_array_equal(to_uint8(tensor[:, :, 2:30, 2:30]), images)


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_dataset_shapes() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert set(np.unique(labels)) == set(range(len(CLASS_NAMES)))
