"""Readers of the datasets' own file layouts: CIFAR-10/100 python pickles (restricted unpickler) and binary
records, Tiny-ImageNet, ImageNet-style class folders. Used by ``bnnc.data.build_dataset``."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from ..errors import DatasetNotFoundError, ModelFormatError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def data_root(name: str, data_path) -> Path:
    """``data_path``, else $BNNC_<NAME> (e.g. BNNC_CIFAR10, BNNC_TINY_IMAGENET), else /usr/share/datasets/<name>."""
    if data_path is not None:
        return Path(data_path).expanduser()
    env = "BNNC_" + name.upper().replace("-", "_")
    return Path(os.environ.get(env, f"/usr/share/datasets/{name}"))


def array_split(split: str) -> str:
    """Datasets with a train/test pair: 'val' means the test set."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
    return "train" if split == "train" else "test"


def folder_split(split: str) -> str:
    """Datasets with a train/val pair (ImageNet, Tiny-ImageNet): 'test' means the labelled val set."""
    return "train" if array_split(split) == "train" else "val"


# ---- CIFAR

CIFAR_LAYOUTS = {  # name: (python dir, python files (train, test), binary dir, binary files, label bytes, classes)
    "cifar10": ("cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
                "cifar-10-batches-bin", ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]), 1, 10),
    "cifar100": ("cifar-100-python", (["train"], ["test"]), "cifar-100-binary", (["train.bin"], ["test.bin"]), 2,
                 100),
}


def _numpy_core(module: str):
    import importlib

    try:
        return importlib.import_module(module.replace("numpy.core", "numpy._core", 1))
    except ImportError:
        return importlib.import_module(module)


# The globals the official CIFAR pickles (Python 2 cPickle) and re-pickled copies (Python 3, protocols 2–5) use.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _PICKLE_GLOBALS[(_mod, "_reconstruct")] = lambda m=_mod: _numpy_core(m)._reconstruct
    _PICKLE_GLOBALS[(_mod, "scalar")] = lambda m=_mod: _numpy_core(m).scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _PICKLE_GLOBALS[(_mod, "_frombuffer")] = lambda m=_mod: _numpy_core(m)._frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for data files: builtin containers, bytes/str/numbers and NumPy arrays only. Any other global
    (``os.system``, ``builtins.eval``, a class...) is refused before it is loaded, so nothing can run."""

    def find_class(self, module, name):
        make = _PICKLE_GLOBALS.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a data pickle")
        return make()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a data pickle")


def load_data_pickle(path: str | os.PathLike):
    """Load a pickled data file (CIFAR python batches) with ``RestrictedUnpickler`` (``encoding='bytes'``, as
    the Python 2 originals need). Errors name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DatasetNotFoundError(f"{path}: cannot read ({e})") from None
    except Exception as e:  # noqa: BLE001 -- truncated or hostile data: UnpicklingError, EOFError, ValueError, ...
        raise ModelFormatError(f"{path}: not a valid data pickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str):
    return d[key.encode()] if key.encode() in d else d.get(key)


def _read_cifar_pickle(path: Path, label_key: str, num_classes: int):
    d = load_data_pickle(path)
    data = _get(d, "data") if isinstance(d, dict) else None
    labels = _get(d, label_key) if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise ModelFormatError(f"{path}: expected a dict with b'data' (uint8 array) and b'{label_key}' keys")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ModelFormatError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise ModelFormatError(f"{path}: {len(data)} images but {labels.size} labels")
    return data, _check_labels(path, labels, num_classes)


def _read_cifar_bin(path: Path, label_bytes: int, num_classes: int):
    raw = np.fromfile(path, dtype=np.uint8)
    rec = label_bytes + 3072
    if raw.size == 0 or raw.size % rec:
        raise ModelFormatError(f"{path}: {raw.size} bytes is not a whole number of {rec}-byte CIFAR records "
                               f"({label_bytes} label byte(s) + 3072 pixels); truncated or not a CIFAR .bin file")
    raw = raw.reshape(-1, rec)
    labels = raw[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: [coarse, fine] → fine
    return raw[:, label_bytes:], _check_labels(path, labels, num_classes)


def _check_labels(path, labels, num_classes):
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ModelFormatError(f"{path}: labels outside 0..{num_classes - 1} (min {labels.min()}, "
                               f"max {labels.max()})")
    return labels


def _find_cifar(name: str, root: Path, split: str):
    pydir, pyfiles, bindir, binfiles, _, _ = CIFAR_LAYOUTS[name]
    index = 0 if split == "train" else 1
    for kind, sub, files in (("python", pydir, pyfiles[index]), ("binary", bindir, binfiles[index])):
        for d in (root / sub, root):
            if any((d / f).is_file() for f in files):
                missing = [f for f in files if not (d / f).is_file()]
                if missing:
                    raise DatasetNotFoundError(f"{name}: {d} has some {kind} batches but not {', '.join(missing)}")
                return kind, [d / f for f in files]
    raise DatasetNotFoundError(
        f"{name} {split} data not found in {root}: expected {pydir}/{{{','.join(pyfiles[index])}}} (python "
        f"version) or {bindir}/{{{','.join(binfiles[index])}}} (binary version), extracted from the official "
        f"archive, under --data-path DIR (or $BNNC_{name.upper()})")


def read_cifar(name: str, split: str = "train", data_path=None):
    """``(images uint8 [N, 32, 32, 3], labels int64 [N], classes)`` from the official python or binary files."""
    if name not in CIFAR_LAYOUTS:
        raise ValueError(f"not a CIFAR dataset: {name!r}")
    split = array_split(split)
    root = data_root(name, data_path)
    if not root.is_dir():
        pydir, bindir = CIFAR_LAYOUTS[name][0], CIFAR_LAYOUTS[name][2]
        raise DatasetNotFoundError(f"{name} directory {root} does not exist: pass --data-path DIR (the folder "
                                   f"holding {pydir} or {bindir}) or set $BNNC_{name.upper()}")
    kind, files = _find_cifar(name, root, split)
    ncls = CIFAR_LAYOUTS[name][5]
    if kind == "python":
        parts = [_read_cifar_pickle(f, "labels" if name == "cifar10" else "fine_labels", ncls) for f in files]
    else:
        parts = [_read_cifar_bin(f, CIFAR_LAYOUTS[name][4], ncls) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # each row is 1024 red, 1024 green, 1024 blue values, row-major: → HWC
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    classes = CIFAR10_CLASSES if name == "cifar10" else _cifar100_names(files[0].parent, kind)
    return images, labels, classes


def _cifar100_names(d: Path, kind: str):
    try:
        if kind == "python" and (d / "meta").is_file():
            names = _get(load_data_pickle(d / "meta"), "fine_label_names")
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        if kind == "binary" and (d / "fine_label_names.txt").is_file():
            return [s for s in (d / "fine_label_names.txt").read_text().split() if s]
    except (ModelFormatError, TypeError, AttributeError, UnicodeDecodeError):
        pass
    return [str(i) for i in range(100)]


# ---- image folders

def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_folders(d: Path, classes=None, nested: str = "") -> tuple[list, list]:
    """``(samples, classes)`` of a ``d/<class>/[nested/]*.<image>`` tree; ``classes`` fixes the label order."""
    if not d.is_dir():
        raise DatasetNotFoundError(f"{d} does not exist: expected class folders {d}/<class>/{nested}*.JPEG")
    found = sorted(p.name for p in d.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ModelFormatError(f"{d}: class folders {unknown[:5]} are not among the {len(classes)} training classes")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        folder = d / c / nested if nested else d / c
        if not folder.is_dir():
            raise DatasetNotFoundError(f"{folder} does not exist: expected images in {d}/<class>/{nested}")
        samples += [(p, index[c]) for p in _images_in(folder)]
    if not samples:
        raise DatasetNotFoundError(f"{d}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in {d}/<class>/{nested}")
    return samples, classes


def read_imagenet(root: Path, split: str, name: str = "imagenet"):
    if not root.is_dir():
        raise DatasetNotFoundError(f"{name} directory {root} does not exist: pass --data-path DIR with "
                                   f"train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, or set $BNNC_{name.upper()}")
    train = root / "train"
    classes = sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else None
    return _class_folders(root / split, classes)


def read_image_folder(root: Path, split: str):
    """``root/<split>/<class>/*`` if that exists ('test' and 'val' stand in for each other), else
    ``root/<class>/*``."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist (pass --data-path DIR)")
    for sub in ((split,) if split == "train" else (split, "val" if split == "test" else "test")):
        if (root / sub).is_dir():
            classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) \
                if (root / "train").is_dir() else None
            return _class_folders(root / sub, classes)
    return _class_folders(root)


def read_tiny_imagenet(root: Path, split: str):
    """Tiny-ImageNet-200: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
    ``val/val_annotations.txt`` (file, wnid, box). Labels follow the sorted wnids (torchvision ImageFolder's
    order on ``train/``, which is what published Tiny-ImageNet models use)."""
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetNotFoundError(f"tiny-imagenet: {wnids_file} not found: pass --data-path DIR (the extracted "
                                   f"tiny-imagenet-200 folder) or set $BNNC_TINY_IMAGENET")
    classes = sorted(set(wnids_file.read_text().split()))
    index = {c: i for i, c in enumerate(classes)}
    if split == "train":
        return _class_folders(root / "train", classes, nested="images")
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetNotFoundError(f"tiny-imagenet: {ann} not found (expected val/images/*.JPEG labelled by "
                                   f"val/val_annotations.txt)")
    samples = []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise ModelFormatError(f"{ann}:{lineno}: expected '<file>\\t<wnid>\\t...' with a wnid from wnids.txt, "
                                   f"got {line[:80]!r}")
        path = root / "val" / "images" / fields[0]
        if not path.is_file():
            raise DatasetNotFoundError(f"{path} (listed in {ann}:{lineno}) does not exist")
        samples.append((path, index[fields[1]]))
    if not samples:
        raise ModelFormatError(f"{ann} lists no images")
    return samples, classes
