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


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10 ResNet-18 (methods.md §1.5; EC BinaryNetworks/AdaBin/cifar10/nets/resnet18.py ``resnet18_1w1a``)
#
# Stem conv3×3 (3→64) → BN → Maxout; stages 64/128/256/512 × [2,2,2,2] of the §1.4 block, whose downsampling
# shortcut is a REAL conv1×1 stride 2 + BN (``shortcut.0``, ``shortcut.1``); head GAP (the reference's
# avg_pool2d(4)) → bn2 BatchNorm1d(512) → linear. PyTorch default init (the reference sets none). Checkpoint
# names as for adabin_resnet20 (``convX.binary_a.*`` → ``convX.input_quantizer.*``).

ADABIN_CIFAR10_R18_RECIPE = Recipe(
    **{k: getattr(ADABIN_CIFAR10_RECIPE, k) for k in ("dataset", "input_shape", "epochs", "batch_size", "optimizer",
                                                      "lr", "weight_decay", "schedule")},
    source="AdaBin (Tu et al., ECCV 2022), huawei-noah/Efficient-Computing BinaryNetworks/AdaBin/cifar10 "
           "main.py + train.sh (methods.md §1.7), model nets/resnet18.py; the EC README lists ResNet-18 "
           "CIFAR-10 at 62.1 % top-1 (sic; looks like a typo, methods.md §9/§13)",
    extra={**ADABIN_CIFAR10_RECIPE.extra, "published_top1": 62.1, "published_top1_note": "EC README, doubtful"},
)


class AdaBinConvShortcutBlock(AdaBinBlock):
    """:class:`AdaBinBlock` whose downsampling shortcut is a real conv1×1 (stride s) + BN instead of option A."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(in_planes, planes, stride)  # convs, BNs, Maxouts (and an option-A shortcut, replaced)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))


class AdaBinResNet18Cifar(nn.Module):
    def __init__(self, num_blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 10):
        super().__init__()
        c0 = widths[0]
        self.conv1 = nn.Conv2d(3, c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.nonlinear1 = Maxout(c0)
        in_planes = c0
        for i, (n, planes) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                blocks.append(AdaBinConvShortcutBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.linear = nn.Linear(in_planes, num_classes)
        self.bn2 = nn.BatchNorm1d(in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nonlinear1(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(self.bn2(out))


@register("adabin_resnet18_cifar", ADABIN_CIFAR10_R18_RECIPE)
def adabin_resnet18_cifar(num_classes: int = 10) -> nn.Module:
    return AdaBinResNet18Cifar(num_classes=num_classes)


def _register_adabin_cifar_r18_mapping():
    from bnnc.checkpoints.mapping import ModelMapping, register_mapping

    register_mapping("adabin_resnet18_cifar", ModelMapping(
        renames=((r"(^|\.)binary_a\.", r"\1input_quantizer."),),
        notes="EC AdaBin cifar10 resnet18_1w1a: module. prefix; convX.binary_a.{alpha_a,beta_a} -> "
              "convX.input_quantizer.*; shortcut.{0,1} real conv1x1 + BN",
    ))


_register_adabin_cifar_r18_mapping()


# ------------------------------------------------------------------------------------------------------------
# ImageNet ResNet-18 / ResNet-34 (methods.md §1.6; EC BinaryNetworks/AdaBin/imagenet/nets/resnet{18,34}.py)
#
# Stem conv7×7/2 → BN → Maxout → maxpool 3/2; stages 64/128/256/512 × [2,2,2,2] (ResNet-34 [3,4,6,3]) of the
# §1.4 block; downsample (avg_down) AvgPool2d(2, 2, ceil_mode, count_include_pad=False) → real conv1×1 → BN;
# head GAP (the reference's AvgPool2d(7) at 224×224) → bn2 BatchNorm1d(512) → fc. The reference also builds
# ``nonlinear2`` (Maxout(512)) and ``bn3`` (BatchNorm1d(num_classes)) that its forward never uses; they are kept
# (unused) so its state dicts load strictly. Init: every conv N(0, 2/(kh·kw·Cout)).

ADABIN_IMAGENET_RECIPE = Recipe(
    dataset="imagenet",
    input_shape=(1, 3, 224, 224),
    epochs=120,
    batch_size=256,
    optimizer="sgd",
    lr=0.1,
    weight_decay=1e-5,
    schedule="cosine",
    source="AdaBin (Tu et al., ECCV 2022), huawei-noah/Efficient-Computing BinaryNetworks/AdaBin/imagenet "
           "main.py (methods.md §1.7); published top-1 63.1 % (ResNet-18), 66.4 % (ResNet-34), 66.4 % "
           "(ResNet-18 with the ReActNet two-step setting) (EC README)",
    extra={
        "momentum": 0.9,
        "loss": "cross_entropy",
        "weight_schedule": "ede_progressive(t_min=1e-3, t_max=10)",
        "augment": "RandomResizedCrop(224) + horizontal flip; eval Resize(256) + CenterCrop(224)",
        "two_step_variant": "ResNet-18* (66.4 %) uses ReActNet's two-step setting (methods.md §4.4); its exact "
                            "run is not published",
    },
)


class AdaBinImageNetBlock(nn.Module):
    """The §1.4 block with a real downsample: h = Maxout1(BN1(conv1(x)) + DS(x)); y = Maxout2(BN2(conv2(h)) + h)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = BinaryConv2d(inplanes, planes, 3, stride=stride, padding=1,
                                  input_quantizer="adabin", weight_quantizer="adabin")
        self.bn1 = nn.BatchNorm2d(planes)
        self.nonlinear1 = Maxout(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, stride=1, padding=1,
                                  input_quantizer="adabin", weight_quantizer="adabin")
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.nonlinear2 = Maxout(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        h = self.nonlinear1(self.bn1(self.conv1(x)) + residual)
        return self.nonlinear2(self.bn2(self.conv2(h)) + h)


class AdaBinResNetImageNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.nonlinear1 = Maxout(widths[0])
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = widths[0]
        for i, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or cin != planes:
                downsample = nn.Sequential(
                    nn.AvgPool2d(stride, stride=stride, ceil_mode=True, count_include_pad=False),
                    nn.Conv2d(cin, planes, kernel_size=1, stride=1, bias=False),
                    nn.BatchNorm2d(planes),
                )
            blocks = [AdaBinImageNetBlock(cin, planes, stride, downsample)]
            blocks += [AdaBinImageNetBlock(planes, planes) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.bn2 = nn.BatchNorm1d(cin)
        self.nonlinear2 = Maxout(cin)  # built but unused in forward, as in the reference
        self.fc = nn.Linear(cin, num_classes)
        self.bn3 = nn.BatchNorm1d(num_classes)  # built but unused in forward, as in the reference
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # BinaryConv2d included, as the reference's AdaBin_Conv2d
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.nonlinear1(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.bn2(torch.flatten(self.avgpool(x), 1)))


@register("adabin_resnet18_imagenet", ADABIN_IMAGENET_RECIPE)
def adabin_resnet18_imagenet(num_classes: int = 1000) -> nn.Module:
    return AdaBinResNetImageNet((2, 2, 2, 2), num_classes=num_classes)


@register("adabin_resnet34_imagenet", ADABIN_IMAGENET_RECIPE)
def adabin_resnet34_imagenet(num_classes: int = 1000) -> nn.Module:
    return AdaBinResNetImageNet((3, 4, 6, 3), num_classes=num_classes)


def _register_adabin_imagenet_mappings():
    from bnnc.checkpoints.mapping import ModelMapping, register_mapping

    for name in ("adabin_resnet18_imagenet", "adabin_resnet34_imagenet"):
        register_mapping(name, ModelMapping(
            renames=((r"(^|\.)binary_a\.", r"\1input_quantizer."),),
            notes="EC AdaBin imagenet: module. prefix; convX.binary_a.{alpha_a,beta_a} -> convX.input_quantizer.*",
        ))


_register_adabin_imagenet_mappings()
