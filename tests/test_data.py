"""Dataset loaders read the real IDX format and fail clearly on missing or broken files."""

import gzip

import numpy as np
import pytest

from bnnc.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_dataset, read_idx
from bnnc.errors import DatasetNotFoundError, ModelFormatError

from .conftest import write_idx


def test_read_idx_gz_and_raw(tmp_path, rng):
    a = rng.integers(0, 255, (3, 4, 5)).astype(np.uint8)
    write_idx(tmp_path / "a.idx", a)
    write_idx(tmp_path / "a.idx.gz", a, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path, rng):
    a = rng.integers(0, 255, (3, 4)).astype(np.uint8)
    write_idx(tmp_path / "a.idx", a)
    data = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(data[:-3])
    with pytest.raises(ModelFormatError, match="payload"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(ModelFormatError, match="magic"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(data)[:20])
    with pytest.raises(ModelFormatError):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_loader_normalizes(tiny_fmnist):
    x, y = load_dataset("fashion-mnist", "train", tiny_fmnist)
    raw = read_idx(tiny_fmnist / "train-images-idx3-ubyte.gz")
    assert x.shape == (64, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0], (raw / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, rtol=1e-6,
                               atol=1e-6)
    assert load_dataset("fashion-mnist", "test", tiny_fmnist)[0].shape == (32, 1, 28, 28)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion-mnist", "test", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar-100", "test")
