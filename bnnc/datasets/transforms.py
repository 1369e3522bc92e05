"""Image transforms without torchvision: small NumPy/PIL re-implementations of the torchvision transforms the
reference trainings use (each docstring names its source). Used by ``bnnc.data.build_dataset``."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# ImageNet channel statistics; spec methods.md "General conventions": the CIFAR codes of the seeds use them too.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels (values in [0, 1]) from AlexNet / fb.resnet.torch, as used by ReActNet's Lighting.
IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]])

# Every transform is a callable ``t(img, rng) -> img`` on a uint8 HWC (or HW) ndarray or a PIL image, with
# ``rng`` a ``numpy.random.Generator``; ``random`` says whether it draws from ``rng``.


def _array(img) -> np.ndarray:
    return np.asarray(img) if isinstance(img, Image.Image) else img


def _pil(img) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(img)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)
        self.random = any(getattr(t, "random", False) for t in self.transforms)

    def __call__(self, img, rng):
        for t in self.transforms:
            img = t(img, rng)
        return img

    def __repr__(self):
        return f"Compose({', '.join(map(repr, self.transforms))})"


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop ``size`` × ``size`` at a uniform random offset.

    Source: torchvision ``RandomCrop(32, padding=4)`` (constant fill 0), the CIFAR augmentation of the seeds'
    trainers (spec methods.md "General conventions")."""
    random = True

    def __init__(self, size: int, padding: int = 4):
        self.size, self.padding = size, padding

    def __call__(self, img, rng):
        a = _array(img)
        p, s = self.padding, self.size
        h, w = a.shape[:2]
        if h + 2 * p < s or w + 2 * p < s:
            raise ValueError(f"RandomCrop: image {a.shape[:2]} + padding {p} is smaller than the crop {s}")
        # offset (i, j) in the padded image; copy the part that overlaps the image into a zero canvas
        y0 = int(rng.integers(0, h + 2 * p - s + 1)) - p
        x0 = int(rng.integers(0, w + 2 * p - s + 1)) - p
        out = np.zeros((s, s) + a.shape[2:], a.dtype)
        ya, yb, xa, xb = max(y0, 0), min(y0 + s, h), max(x0, 0), min(x0 + s, w)
        if yb > ya and xb > xa:
            out[ya - y0:yb - y0, xa - x0:xb - x0] = a[ya:yb, xa:xb]
        return out

    def __repr__(self):
        return f"RandomCrop({self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``. Source: torchvision ``RandomHorizontalFlip(0.5)``."""
    random = True

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img, rng):
        a = _array(img)
        return a[:, ::-1] if rng.random() < self.p else a

    def __repr__(self):
        return f"RandomHorizontalFlip({self.p})"


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with a log-uniform aspect ratio in ``ratio`` and resize it to
    ``size`` × ``size`` (bilinear). Source: torchvision ``RandomResizedCrop(224, scale=(0.08, 1))`` as used by
    ReActNet / Bi-Real Net (spec methods.md §4.4, §5.4): 10 tries, then a central crop with the ratio clamped."""
    random = True

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def box(self, width: int, height: int, rng) -> tuple[int, int, int, int]:
        """``(left, top, w, h)`` of the crop for an image of ``width`` × ``height``."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img, rng):
        img = _pil(img)
        left, top, w, h = self.box(img.width, img.height, rng)
        return np.asarray(img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h)))

    def __repr__(self):
        return f"RandomResizedCrop({self.size}, scale={self.scale})"


class Resize:
    """Resize so the SHORTER side is ``size`` (bilinear, PIL's antialiased filter), or to exactly
    ``(size, size)`` with ``square=True``. Source: torchvision ``Resize(256)`` of the ImageNet eval transform
    (the longer side is ``int(size · long / short)``, truncated, as torchvision computes it)."""
    random = False

    def __init__(self, size: int, square: bool = False):
        self.size, self.square = size, square

    def __call__(self, img, rng):
        img = _pil(img)
        w, h = img.size
        if self.square:
            new = (self.size, self.size)
        elif w <= h:
            new = (self.size, int(self.size * h / w))
        else:
            new = (int(self.size * w / h), self.size)
        return img if new == (w, h) else img.resize(new, Image.BILINEAR)

    def __repr__(self):
        return f"Resize({self.size}{', square=True' if self.square else ''})"


class CenterCrop:
    """Crop ``size`` × ``size`` from the center: top = round((H − size)/2), left = round((W − size)/2).
    Source: torchvision ``CenterCrop(224)`` of the ImageNet eval transform."""
    random = False

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img, rng):
        a = _array(img)
        h, w = a.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(f"CenterCrop({self.size}): image is only {h}×{w}")
        top, left = round((h - self.size) / 2), round((w - self.size) / 2)
        return a[top:top + self.size, left:left + self.size]

    def __repr__(self):
        return f"CenterCrop({self.size})"


class Lighting:
    """AlexNet-style PCA lighting noise: add ``V · (α ⊙ λ)`` to every pixel, α ~ N(0, alphastd²) per image,
    with the ImageNet eigenvalues λ and eigenvectors V (columns).

    ``mode="reactnet"`` (default) is exactly ReActNet's ``utils.Lighting`` (from MetaPruning; spec methods.md
    §4.4 "Lighting(PCA, 0.1)"): applied to the uint8 PIL image after RandomResizedCrop with λ NOT rescaled to
    0..255, then clipped and cast back to uint8 (truncation), so the effect is at most a ±1 step per channel.
    ``mode="float"`` is fb.resnet.torch's form: on [0, 1] values (uint8 input is scaled to [0, 1] first), kept
    as float32 in [0, 1]-scale, which ``ToNormalizedTensor`` then normalizes without rescaling.
    """
    random = True

    def __init__(self, alphastd: float = 0.1, mode: str = "reactnet"):
        if mode not in ("reactnet", "float"):
            raise ValueError(f"Lighting mode must be 'reactnet' or 'float', got {mode!r}")
        self.alphastd, self.mode = alphastd, mode

    def delta(self, rng) -> np.ndarray:
        """The RGB offset of one draw (float32 alpha, as ReActNet draws it)."""
        alpha = (rng.standard_normal(3) * self.alphastd).astype(np.float32)
        return IMAGENET_PCA_EIGVEC @ (alpha * IMAGENET_PCA_EIGVAL)

    def __call__(self, img, rng):
        if self.alphastd == 0:
            return img
        a = _array(img)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"Lighting needs an RGB image, got shape {a.shape}")
        if self.mode == "reactnet":
            out = a + self.delta(rng)
            return np.clip(out, 0, 255).astype(np.uint8) if a.dtype == np.uint8 else out.astype(np.float32)
        unit = a / 255.0 if a.dtype == np.uint8 else a  # float mode works on [0, 1] values
        return (unit + self.delta(rng)).astype(np.float32)

    def __repr__(self):
        return f"Lighting({self.alphastd}, mode={self.mode!r})"


class ToNormalizedTensor:
    """uint8 HWC / HW (0..255) → float32 CHW tensor ``(x/255 − mean)/std`` per channel.
    Source: torchvision ``ToTensor()`` followed by ``Normalize(mean, std)``."""
    random = False

    def __init__(self, mean, std):
        self.mean = torch.tensor(np.atleast_1d(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(np.atleast_1d(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img, rng):
        a = np.ascontiguousarray(_array(img))
        if not a.flags.writeable:  # arrays viewing a PIL image are read-only; torch wants writable memory
            a = a.copy()
        t = torch.from_numpy(a)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        scale = 255.0 if a.dtype == np.uint8 else 1.0
        return t.to(torch.float32, memory_format=torch.contiguous_format).div_(scale).sub_(self.mean).div_(self.std)

    def __repr__(self):
        return f"ToNormalizedTensor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def cifar_transform(train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD, size: int = 32, native: int = 32,
                    lighting: bool = False) -> Compose:
    """Seeds' CIFAR pipeline: train = RandomCrop(size, pad 4) + flip; eval = none; then normalize.
    (Also used for MNIST-style data with ``train=False`` and for Tiny-ImageNet at 64 px.)"""
    ts = [Resize(size, square=True), ToArray()] if size != native else []
    if train:
        ts += [RandomCrop(size, 4)] + ([Lighting(0.1)] if lighting else []) + [RandomHorizontalFlip()]
    return Compose(ts + [ToNormalizedTensor(mean, std)])


def imagenet_transform(train: bool, size: int = 224, lighting: bool = False, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD) -> Compose:
    """ReActNet / Bi-Real Net ImageNet pipeline (spec methods.md §4.4): train = RandomResizedCrop(size,
    0.08–1) [+ Lighting(0.1)] + flip; eval = Resize(size/0.875, i.e. 256 for 224) + CenterCrop(size)."""
    if train:
        ts = [RandomResizedCrop(size)] + ([Lighting(0.1)] if lighting else []) + [RandomHorizontalFlip()]
    else:
        ts = [Resize(round(size / 0.875)), CenterCrop(size)]
    return Compose(ts + [ToNormalizedTensor(mean, std)])


class ToArray:
    random = False

    def __call__(self, img, rng):
        return _array(img)
