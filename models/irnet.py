"""IR-Net CIFAR-10 models (Qin et al., CVPR 2020; ``shared/spec/methods.md`` §3), and the CIFAR ResNet /
VGG-small skeletons they share with RBNN (:mod:`bnnc.models.rbnn`).

Module and parameter names follow the official code (htqin/IR-Net ``CIFAR-10/…``), so a published state
dict loads with no renames at all (IR-Net's ``k``/``t`` are plain tensors, not saved): ``conv1``, ``bn1``,
``layer{i}.{j}.{conv1,bn1,conv2,bn2}``, ``layer{i}.0.shortcut.{0,1}`` (conv downsampling), ``bn2`` (BN1d
of the head), ``linear``; VGG-small ``conv0..5``, ``bn0..5``, ``fc``.

* ``irnet_resnet20`` (IR ``ResNet20/1w1a/resnet.py``): stem real conv3×3 (3→16) → BN → Hardtanh; 3×3
  Bi-Real-style blocks (a shortcut around each binary conv): h = Hardtanh(BN1(conv1(x)) + SC(x)),
  y = Hardtanh(BN2(conv2(h)) + h), SC = option A; head global average pool → BN1d(64) → Linear.
  Quantizers: activations ``ede``, weights ``libra_pb``, both with the EDE schedule Tmin = 1e−3, Tmax = 10
  (the 1w1a trainer). Init kaiming_normal for Conv/Linear.
* ``irnet_resnet20_1w32a`` (IR ``ResNet20/1w32a/resnet.py``): real activations (``input_quantizer=None``),
  ``libra_pb`` weights (Tmin 0.1). The reference 1w32a net is NOT the 1w1a topology: it is the standard
  ResNet block with ReLU, h = ReLU(BN1(conv1(x))), y = ReLU(BN2(conv2(h)) + SC(x)), stem conv → BN with no
  activation, head GAP → BN1d(64) → ReLU → Linear. Parameter names are the same.
* ``irnet_resnet18`` (IR ``ResNet18/resnet.py``): widths 64/128/256/512 × [2, 2, 2, 2]; stem conv3×3
  (3→64) → BN, no activation; standard block h = Hardtanh(BN1(conv1(x))), y = Hardtanh(BN2(conv2(h)) +
  SC(x)), SC = REAL conv1×1 stride 2 + BN when the shape changes; head GAP (the reference's avg_pool2d(4))
  → BN1d(512) → Linear. (The reference ends with LogSoftmax; it does not change the prediction and is left
  out: the model returns logits, as every bnnc model.) PyTorch default init; EDE Tmin 0.1.
* ``irnet_vgg_small`` (IR ``VGG-Small/vgg.py``): conv0 real 3×3 (3→128) → BN0 → Hardtanh;
  conv1 B(128→128) → maxpool 2 → BN1 → Hardtanh; conv2 B(128→256) → BN2 → Hardtanh;
  conv3 B(256→256) → maxpool → BN3 → Hardtanh; conv4 B(256→512) → BN4 → Hardtanh;
  conv5 B(512→512) → maxpool → BN5 → Hardtanh; flatten (8 192) → fc (→ 10). Init N(0, 2/(k²·Cout)) for
  convs, BN weight 1 / bias 0, fc N(0, 0.01²) / bias 0. EDE Tmin 0.1.

The skeletons take a ``quantizers`` factory returning a fresh ``(input_quantizer, weight_quantizer)`` pair
per binary conv (names or objects, as :class:`bnnc.nn.BinaryConv2d` takes them).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.nn import BinaryConv2d
from bnnc.quantizers import EDESign, LibraPBWeight
from bnnc.schedules import EDESchedule

from ._registry import Recipe, register
from .adabin import OptionAShortcut

__all__ = ["CifarBlock", "CifarResNet", "CifarVGGSmall", "IRNET_CIFAR10_RECIPE", "irnet_resnet20",
           "irnet_resnet20_1w32a", "irnet_resnet18", "irnet_vgg_small", "ACTIVATIONS"]

Quantizers = Callable[[], tuple]

#: the block / stem / head nonlinearities of the reference codes (parameter-free)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"hardtanh": F.hardtanh, "relu": F.relu}

_CIFAR_COMMON = {
    "momentum": 0.9,
    "eta_min": 0.0,
    "loss": "cross_entropy",
    "normalize_mean": (0.485, 0.456, 0.406),
    "normalize_std": (0.229, 0.224, 0.225),
    "augment": "random_crop(32, padding=4) + horizontal_flip",
}

IRNET_CIFAR10_RECIPE = Recipe(
    dataset="cifar10",
    input_shape=(1, 3, 32, 32),
    epochs=400,
    batch_size=128,
    optimizer="sgd",
    lr=0.1,
    weight_decay=1e-4,
    schedule="cosine",
    source="IR-Net (Qin et al., CVPR 2020), htqin/IR-Net CIFAR-10/ResNet20/1w1a (resnet.py, trainer.py; "
           "methods.md §3.3-3.4); published ResNet-20 1w1a: 86.5 % top-1 (IR README)",
    extra={**_CIFAR_COMMON, "cosine_t_max": 400, "published_top1": 86.5,
           "ede_schedule": "log_up(t_min=1e-3, t_max=10), k = max(1/t, 1), per epoch"},
)


def _activation(name: str | None):
    if name is None:
        return None
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def _bconv(quantizers: Quantizers, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> BinaryConv2d:
    act, weight = quantizers()
    return BinaryConv2d(cin, cout, k, stride=stride, padding=padding, input_quantizer=act, weight_quantizer=weight)


class CifarBlock(nn.Module):
    """Two 3×3 binary convs, each followed by BatchNorm.

    ``block="standard"``: h = act(BN1(conv1(x))); y = act(BN2(conv2(h)) + SC(x)).
    ``block="bireal"``:   h = act(BN1(conv1(x)) + SC(x)); y = act(BN2(conv2(h)) + h).
    ``shortcut`` (used when the shape changes): ``"A"`` (parameter-free option A), ``"real"`` (conv1×1 +
    BN) or ``"binary"`` (binary conv1×1 + BN, RBNN ResNet-18); identity otherwise."""

    def __init__(self, in_planes: int, planes: int, stride: int, quantizers: Quantizers, block: str = "standard",
                 shortcut: str = "A", act: str = "hardtanh"):
        super().__init__()
        if block not in ("standard", "bireal"):
            raise ValueError(f"block must be 'standard' or 'bireal', got {block!r}")
        self.block = block
        self.act = _activation(act)
        self.conv1 = _bconv(quantizers, in_planes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _bconv(quantizers, planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcuts need stride 2 and doubled channels")
            self.shortcut = OptionAShortcut(planes // 4)
        elif shortcut == "real":
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        elif shortcut == "binary":
            self.shortcut = nn.Sequential(_bconv(quantizers, in_planes, planes, 1, stride, 0), nn.BatchNorm2d(planes))
        else:
            raise ValueError(f"shortcut must be 'A', 'real' or 'binary', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block == "bireal":
            h = self.act(self.bn1(self.conv1(x)) + self.shortcut(x))
            return self.act(self.bn2(self.conv2(h)) + h)
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(h)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: real stem conv3×3 (3→widths[0]) → BN → ``stem_act``; stages of :class:`CifarBlock`
    (stride 2 at the first block of every stage after the first); head global average pool → BN1d →
    ``head_act`` → Linear. ``init``: ``"kaiming"`` (kaiming_normal Conv/Linear), ``"kaiming_bn1e-8"`` (the
    same plus every BN2d weight 1e−8, bias 0: RBNN ResNet-20) or ``"default"`` (PyTorch's)."""

    def __init__(self, num_blocks, widths, quantizers: Quantizers, *, block: str = "standard", shortcut: str = "A",
                 act: str = "hardtanh", stem_act: str | None = "hardtanh", head_act: str | None = None,
                 init: str = "kaiming", num_classes: int = 10):
        super().__init__()
        if len(num_blocks) != len(widths):
            raise ValueError(f"num_blocks {tuple(num_blocks)} and widths {tuple(widths)} differ in length")
        c0 = widths[0]
        self.stem_act, self.head_act = _activation(stem_act), _activation(head_act)
        self.conv1 = nn.Conv2d(3, c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        in_planes = c0
        for i, (n, planes) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBlock(in_planes, planes, stride, quantizers, block, shortcut, act))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.bn2 = nn.BatchNorm1d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        if init in ("kaiming", "kaiming_bn1e-8"):
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight)
                if init == "kaiming_bn1e-8" and isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1e-8)
                    nn.init.zeros_(m.bias)
        elif init != "default":
            raise ValueError(f"init must be 'kaiming', 'kaiming_bn1e-8' or 'default', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        if self.stem_act is not None:
            out = self.stem_act(out)
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # the references' avg_pool2d over the whole map
        out = self.bn2(out)
        if self.head_act is not None:
            out = self.head_act(out)
        return self.linear(out)


class CifarVGGSmall(nn.Module):
    """VGG-small (IR-Net / RBNN ``vgg_small_1w1a``): see the module docstring; input 32×32."""

    def __init__(self, quantizers: Quantizers, num_classes: int = 10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 128, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = _bconv(quantizers, 128, 128, 3, 1, 1)
        self.pooling = nn.MaxPool2d(2, 2)
        self.bn1 = nn.BatchNorm2d(128)
        self.nonlinear = nn.Hardtanh()
        self.conv2 = _bconv(quantizers, 128, 256, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(256)
        self.conv3 = _bconv(quantizers, 256, 256, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(256)
        self.conv4 = _bconv(quantizers, 256, 512, 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(512)
        self.conv5 = _bconv(quantizers, 512, 512, 3, 1, 1)
        self.bn5 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * 4 * 4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.nonlinear(self.bn0(self.conv0(x)))
        x = self.nonlinear(self.bn1(self.pooling(self.conv1(x))))
        x = self.nonlinear(self.bn2(self.conv2(x)))
        x = self.nonlinear(self.bn3(self.pooling(self.conv3(x))))
        x = self.nonlinear(self.bn4(self.conv4(x)))
        x = self.nonlinear(self.bn5(self.pooling(self.conv5(x))))
        return self.fc(x.flatten(1))


# ---------------------------------------------------------------------------------------------- IR-Net zoo


def _ir_quantizers(tmin: float, binary_activations: bool = True) -> Quantizers:
    def make():
        act = EDESign(EDESchedule(tmin, 10.0)) if binary_activations else None
        return act, LibraPBWeight(EDESchedule(tmin, 10.0))

    return make


_IR_MAPPING = ModelMapping(notes="IR-Net names as in the model (IRConv2d k/t are not saved); module. prefixes; "
                                 "MindSpore BN leaf names")


def _recipe(source: str, published: float, tmin: float, **changes) -> Recipe:
    extra = {**IRNET_CIFAR10_RECIPE.extra, "published_top1": published,
             "ede_schedule": f"log_up(t_min={tmin:g}, t_max=10), k = max(1/t, 1), per epoch"}
    extra.update(changes.pop("extra", {}))
    fields = {k: getattr(IRNET_CIFAR10_RECIPE, k) for k in ("dataset", "input_shape", "epochs", "batch_size",
                                                            "optimizer", "lr", "weight_decay", "schedule")}
    fields.update(changes)
    extra["cosine_t_max"] = fields["epochs"]
    return Recipe(**fields, source=source, extra=extra)


@register("irnet_resnet20", IRNET_CIFAR10_RECIPE)
def irnet_resnet20(num_classes: int = 10) -> nn.Module:
    return CifarResNet((3, 3, 3), (16, 32, 64), _ir_quantizers(1e-3), block="bireal", shortcut="A",
                       stem_act="hardtanh", init="kaiming", num_classes=num_classes)


@register("irnet_resnet20_1w32a", _recipe(
        "IR-Net, htqin/IR-Net CIFAR-10/ResNet20/1w32a (resnet.py, trainer.py; methods.md §3.4); published "
        "ResNet-20 1w32a: 90.8 % top-1 (IR README)", 90.8, 0.1))
def irnet_resnet20_1w32a(num_classes: int = 10) -> nn.Module:
    return CifarResNet((3, 3, 3), (16, 32, 64), _ir_quantizers(0.1, binary_activations=False), block="standard",
                       shortcut="A", act="relu", stem_act=None, head_act="relu", init="kaiming",
                       num_classes=num_classes)


@register("irnet_resnet18", _recipe(
        "IR-Net, htqin/IR-Net CIFAR-10/ResNet18/resnet.py (methods.md §3.3-3.4: CIFAR trainer recipe); "
        "published ResNet-18: 91.5 % top-1 (IR README)", 91.5, 0.1))
def irnet_resnet18(num_classes: int = 10) -> nn.Module:
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), _ir_quantizers(0.1), block="standard", shortcut="real",
                       stem_act=None, init="default", num_classes=num_classes)


@register("irnet_vgg_small", _recipe(
        "IR-Net, htqin/IR-Net CIFAR-10/VGG-Small (vgg.py, main.py; methods.md §3.3-3.4: lr 0.007, 300 epochs); "
        "published VGG-small: 90.4 % top-1 (IR README)", 90.4, 0.1, epochs=300, lr=0.007))
def irnet_vgg_small(num_classes: int = 10) -> nn.Module:
    return CifarVGGSmall(_ir_quantizers(0.1), num_classes=num_classes)


for _name in ("irnet_resnet20", "irnet_resnet20_1w32a", "irnet_resnet18", "irnet_vgg_small"):
    register_mapping(_name, _IR_MAPPING)
