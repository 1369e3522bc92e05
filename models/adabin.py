"""``adabin_resnet20``: the AdaBin CIFAR-10 ResNet-20 (Tu et al., ECCV 2022; ``shared/spec/methods.md`` §1.4).

Module and parameter names follow the official PyTorch code (huawei-noah/Efficient-Computing
``BinaryNetworks/AdaBin/cifar10/nets/resnet20.py``), so its published checkpoint maps onto this model with
one rename only: the reference's ``convX.binary_a.{alpha_a,beta_a}`` are our ``convX.input_quantizer.*``
(:mod:`bnnc.checkpoints.mapping`).

* Stem: real conv3×3 (3→16, pad 1) → BN(16) → Maxout(16).
* 3 stages × 3 blocks, widths 16/32/64, stride 2 at the first block of stages 2 and 3. Block (one shortcut
  around each binary conv):  h = Maxout1(BN1(conv1(x)) + SC(x));  y = Maxout2(BN2(conv2(h)) + h),
  SC = identity or parameter-free "option A" (x[:, :, ::2, ::2], channels zero-padded by planes/4 each side).
* Binary convs: AdaBin activations α·(sign((x − β)/α) + β) with learnable scalars, AdaBin weights
  W_b = std_o·sign(Ŵ) + mean_o (``bnnc.quantizers``: ``adabin``).
* Head: global average pool → BatchNorm1d(64) → Linear(64 → 10).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bnnc.activations import Maxout
from bnnc.nn import BinaryConv2d

from ._registry import Recipe, register

__all__ = ["ADABIN_CIFAR10_RECIPE", "AdaBinResNet20", "AdaBinBlock", "OptionAShortcut", "adabin_resnet20"]

ADABIN_CIFAR10_RECIPE = Recipe(
    dataset="cifar10",
    input_shape=(1, 3, 32, 32),
    epochs=400,
    batch_size=128,
    optimizer="sgd",
    lr=0.1,
    weight_decay=1e-4,
    schedule="cosine",
    source="AdaBin (Tu et al., ECCV 2022), huawei-noah/Efficient-Computing BinaryNetworks/AdaBin/cifar10 "
           "main.py + train.sh (methods.md §1.7); published ResNet-20 checkpoint: 88.02 % top-1",
    extra={
        "momentum": 0.9,
        "cosine_t_max": 400,
        "eta_min": 0.0,
        "loss": "cross_entropy",
        "weight_schedule": "ede_progressive(t_min=1e-3, t_max=10)",
        "normalize_mean": (0.485, 0.456, 0.406),
        "normalize_std": (0.229, 0.224, 0.225),
        "augment": "random_crop(32, padding=4) + horizontal_flip",
        "val_drop_last": True,
    },
)


class OptionAShortcut(nn.Module):
    """Parameter-free "option A" shortcut: x[:, :, ::2, ::2], then ``pad`` zero channels on both sides."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class AdaBinBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = BinaryConv2d(in_planes, planes, 3, stride=stride, padding=1,
                                  input_quantizer="adabin", weight_quantizer="adabin")
        self.bn1 = nn.BatchNorm2d(planes)
        self.nonlinear1 = Maxout(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, stride=1, padding=1,
                                  input_quantizer="adabin", weight_quantizer="adabin")
        self.bn2 = nn.BatchNorm2d(planes)
        self.nonlinear2 = Maxout(planes)
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcuts need stride 2 and doubled channels")
            self.shortcut = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.nonlinear1(self.bn1(self.conv1(x)) + self.shortcut(x))
        return self.nonlinear2(self.bn2(self.conv2(h)) + h)


class AdaBinResNet20(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), widths=(16, 32, 64), num_classes: int = 10):
        super().__init__()
        c0 = widths[0]
        self.conv1 = nn.Conv2d(3, c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.nonlinear1 = Maxout(c0)
        in_planes = c0
        for i, (n, planes) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                blocks.append(AdaBinBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.bn2 = nn.BatchNorm1d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nonlinear1(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # global average pooling (the reference's avg_pool2d(8))
        return self.linear(self.bn2(out))


@register("adabin_resnet20", ADABIN_CIFAR10_RECIPE)
def adabin_resnet20(num_classes: int = 10, **kwargs) -> nn.Module:
    return AdaBinResNet20(num_classes=num_classes, **kwargs)
