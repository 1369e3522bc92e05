"""Datasets: offline loaders that read the files' real formats (no downloads, ever)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .errors import DatasetNotFoundError, ModelFormatError

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
# Per-pixel statistics of the Fashion-MNIST training images (scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ModelFormatError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ModelFormatError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ModelFormatError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != need:
        raise ModelFormatError(f"{path}: IDX payload has {len(raw) - header} bytes, header says {need}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}: install the Debian package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data-path DIR"
    )


def load_fashion_mnist(split: str = "train", data_path: str | os.PathLike | None = None):
    """Return ``(images, labels)``: float32 [N, 1, 28, 28] normalized with the training mean/std, int64 [N]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_path or os.environ.get("BNNC_FASHION_MNIST", FASHION_MNIST_DEFAULT))
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Fashion-MNIST directory {root} does not exist: install the Debian package dataset-fashion-mnist "
            f"or pass --data-path DIR"
        )
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ModelFormatError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    x = (images.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x[:, None], labels.astype(np.int64)


DATASETS = {"fashion-mnist": load_fashion_mnist}


def load_dataset(name: str, split: str = "train", data_path=None):
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}") from None
    return loader(split, data_path)
