"""Datasets: offline loaders that read the files' real formats (no downloads, ever), and their transforms.

``build_dataset(name, split, data_path)`` returns a ``torch.utils.data.Dataset`` of ``(float32 CHW tensor,
int label)`` items, normalized; ``make_loader`` wraps it in a deterministic ``DataLoader``. Formats read:
MNIST / Fashion-MNIST IDX files, CIFAR-10/100 python pickles (through a restricted unpickler) and binary
records, Tiny-ImageNet's folder layout, ImageNet-style class folders (PIL). Transforms are small NumPy/PIL
re-implementations of the torchvision ones the reference trainings use; torchvision is not needed.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .datasets.formats import (  # noqa: F401
    CIFAR10_CLASSES,
    CIFAR_LAYOUTS,
    IMAGE_EXTENSIONS,
    RestrictedUnpickler,
    array_split,
    data_root,
    folder_split,
    load_data_pickle,
    read_cifar,
    read_image_folder,
    read_imagenet,
    read_tiny_imagenet,
)
from .datasets.transforms import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    IMAGENET_STD,
    CenterCrop,
    Compose,
    Lighting,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToArray,
    ToNormalizedTensor,
    cifar_transform,
    imagenet_transform,
)
from .errors import DatasetNotFoundError, ModelFormatError

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
# Per-pixel statistics of the Fashion-MNIST training images (scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# Per-pixel statistics of the MNIST training images (the values every MNIST example uses).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------------------------- IDX (MNIST)

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


_IDX_HINT = {
    "fashion-mnist": "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                     "or pass --data-path DIR",
    "mnist": "pass --data-path DIR (a folder with the four MNIST IDX files) or set BNNC_MNIST",
}


def _find(root: Path, stem: str, name: str = "fashion-mnist") -> Path:
    for fname in (stem, stem + ".gz"):
        if (root / fname).is_file():
            return root / fname
    label = "Fashion-MNIST" if name == "fashion-mnist" else "MNIST"
    raise DatasetNotFoundError(f"{label} file {stem}[.gz] not found in {root}: {_IDX_HINT[name]}")


def _read_idx_split(name: str, split: str, data_path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and int64 labels [N] of an MNIST-format dataset."""
    split = array_split(split)
    root = data_root(name, data_path)
    if not root.is_dir():
        label = "Fashion-MNIST" if name == "fashion-mnist" else "MNIST"
        raise DatasetNotFoundError(f"{label} directory {root} does not exist: {_IDX_HINT[name]}")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte", name))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte", name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ModelFormatError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def load_fashion_mnist(split: str = "train", data_path: str | os.PathLike | None = None):
    """Return ``(images, labels)``: float32 [N, 1, 28, 28] normalized with the training mean/std, int64 [N]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _read_idx_split("fashion-mnist", split, data_path)
    x = (images.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x[:, None], labels


DATASETS = {"fashion-mnist": load_fashion_mnist}


def load_dataset(name: str, split: str = "train", data_path=None):
    """Whole-array loader (``(x, y)`` NumPy arrays) for the small datasets; see ``build_dataset`` for the rest."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}") from None
    return loader(split, data_path)


# -------------------------------------------------------------------------------------------------- datasets

def _sample_rng(key):
    """``dataset[i]`` draws its augmentation seed from torch's global RNG (seeded per worker by DataLoader);
    ``dataset[(i, seed)]`` (what ``make_loader`` passes) uses ``seed``, so a loader is deterministic."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), np.random.default_rng(int(seed))
    return int(key), None


class _BaseDataset(torch.utils.data.Dataset):
    name: str
    classes: list
    transform: Compose
    targets: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def _apply(self, img, rng):
        if rng is None and self.transform.random:
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ()).item()))
        return self.transform(img, rng)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, classes={self.num_classes}, {self.transform})"


class ArrayDataset(_BaseDataset):
    """Images held in memory: uint8 [N, H, W] (grayscale) or [N, H, W, C]; int64 labels [N]."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes, transform: Compose):
        if len(images) != len(labels):
            raise ModelFormatError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.name, self.images, self.targets = name, images, np.asarray(labels, dtype=np.int64)
        self.classes, self.transform = list(classes), transform

    def __getitem__(self, key):
        index, rng = _sample_rng(key)
        return self._apply(self.images[index], rng), int(self.targets[index])


class ImageFileDataset(_BaseDataset):
    """Image files decoded with PIL (converted to RGB) on access; ``samples`` is a list of (path, label)."""

    def __init__(self, name: str, samples: list, classes, transform: Compose):
        self.name, self.samples = name, samples
        self.targets = np.array([label for _, label in samples], dtype=np.int64)
        self.classes, self.transform = list(classes), transform

    def __getitem__(self, key):
        index, rng = _sample_rng(key)
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ModelFormatError(f"{path}: cannot decode image ({e})") from None
        return self._apply(img, rng), label


# ---- the entry point

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet", "imagenet", "folder")


def build_dataset(name: str, split: str = "train", data_path=None, *, augment: bool | None = None,
                  input_size: int | None = None, lighting: bool = False) -> torch.utils.data.Dataset:
    """A dataset of ``(float32 CHW tensor, int label)``, normalized, with ``.num_classes``, ``.name``,
    ``.classes``, ``.targets``.

    ``split``: 'train', 'test' or 'val' (CIFAR/MNIST: 'val' is the test set; ImageNet/Tiny-ImageNet: 'test'
    is the labelled val set). ``augment`` (default: ``split == 'train'``) picks the training transform:
    CIFAR / Tiny-ImageNet RandomCrop(pad 4) + flip, ImageNet / folder RandomResizedCrop + flip, MNIST none.
    ``input_size``: CIFAR 32, Tiny-ImageNet 64, MNIST 28 (other sizes resize the image first), ImageNet /
    folder 224 (eval: resize to size/0.875, center crop). ``lighting``: ReActNet's PCA lighting noise in the
    training transform (RGB datasets; ignored without augmentation).
    Data comes from ``data_path``, else $BNNC_<NAME> (BNNC_CIFAR10, BNNC_TINY_IMAGENET, ...), else
    /usr/share/datasets/<name>.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}")
    if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    train = (split == "train") if augment is None else bool(augment)
    if name in ("fashion-mnist", "mnist"):
        if lighting:
            raise ValueError(f"lighting noise needs RGB images; {name} is grayscale")
        images, labels = _read_idx_split(name, split, data_path)
        mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if name == "fashion-mnist" else (MNIST_MEAN, MNIST_STD)
        size = input_size or 28
        transform = cifar_transform(False, mean, std, size=size, native=28)
        classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
        return ArrayDataset(name, images, labels, classes, transform)
    if name in CIFAR_LAYOUTS:
        images, labels, classes = read_cifar(name, split, data_path)
        transform = cifar_transform(train, size=input_size or 32, lighting=lighting)
        return ArrayDataset(name, images, labels, classes, transform)
    root = data_root(name, data_path)
    if name == "tiny-imagenet":
        samples, classes = read_tiny_imagenet(root, folder_split(split))
        transform = cifar_transform(train, size=input_size or 64, native=64, lighting=lighting)
    elif name == "imagenet":
        samples, classes = read_imagenet(root, folder_split(split))
        transform = imagenet_transform(train, input_size or 224, lighting)
    else:
        samples, classes = read_image_folder(root, array_split(split) if split != "val" else "val")
        transform = imagenet_transform(train, input_size or 224, lighting)
    return ImageFileDataset(name, samples, classes, transform)


# -------------------------------------------------------------------------------------------------- loaders

class SeededSampler(torch.utils.data.Sampler):
    """Yields ``(index, seed)``: the order (shuffled or the ``inner`` sampler's) and each sample's augmentation
    seed are functions of ``(seed, epoch)`` only, so batches are identical with any number of workers.
    ``epoch`` counts passes (``set_epoch`` overrides it, and is forwarded to ``inner``)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, inner=None):
        self.n, self.shuffle, self.seed, self.inner, self.epoch = n, shuffle, int(seed), inner, 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self):
        return len(self.inner) if self.inner is not None else self.n

    def __iter__(self):
        ss = np.random.SeedSequence([self.seed, self.epoch])
        order_seed, aug_seed = (int(s) for s in ss.generate_state(2, np.uint64) >> np.uint64(1))
        self.epoch += 1
        if self.inner is not None:
            order = iter(self.inner)
        elif self.shuffle:
            order = iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(order_seed)).tolist())
        else:
            order = iter(range(self.n))
        aug = np.random.default_rng(aug_seed)
        for index in order:
            yield int(index), int(aug.integers(0, 2 ** 63 - 1))


def _worker_init(worker_id: int):
    # NumPy / random in user code get a per-worker seed derived from DataLoader's (generator-seeded) one.
    import random

    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size: int, *, shuffle: bool, drop_last: bool = False, workers: int = 0,
                seed: int = 0, sampler=None) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` whose batches depend only on ``seed`` and the epoch (not on ``workers``).

    The order comes from ``sampler`` if given (e.g. a ``DistributedSampler``; then ``shuffle`` must be
    False), else a permutation seeded by (seed, epoch) when ``shuffle``. Datasets from ``build_dataset``
    receive a per-sample augmentation seed; other datasets get plain indices.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sampler is not None and shuffle:
        raise ValueError("make_loader: pass shuffle=False with an explicit sampler (it decides the order)")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    seeded = SeededSampler(len(dataset), shuffle=shuffle, seed=seed, inner=sampler)
    if not isinstance(dataset, _BaseDataset):  # plain datasets take integer indices
        seeded = _Indices(seeded)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=seeded, drop_last=drop_last, num_workers=workers,
        generator=torch.Generator().manual_seed(int(seed)), worker_init_fn=_worker_init if workers else None,
        persistent_workers=False)


class _Indices(torch.utils.data.Sampler):
    def __init__(self, seeded: SeededSampler):
        self.seeded = seeded

    def set_epoch(self, epoch):
        self.seeded.set_epoch(epoch)

    def __len__(self):
        return len(self.seeded)

    def __iter__(self):
        return (i for i, _ in self.seeded)
