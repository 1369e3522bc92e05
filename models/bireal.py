"""``bireal18``, ``bireal34`` (Bi-Real Net, Liu et al., ECCV 2018) and ``reactnet18`` (ReActNet's Bi-Real based
ResNet-18, Liu et al., ECCV 2020) for ImageNet (``shared/spec/methods.md`` §5.3, §4.3).

Module and parameter names follow the official PyTorch code (liuzechun/Bi-Real-net
``pytorch_implementation/BiReal18_34/birealnet.py``; liuzechun/ReActNet ``resnet/2_step2/birealnet.py``), so
the published checkpoints map with two renames (:mod:`bnnc.checkpoints.mapping`):

* Bi-Real stores each binary conv weight FLATTENED as ``binary_conv.weights`` (Cout·Cin·3·3, 1); it is
  ``binary_conv.weight`` (Cout, Cin, 3, 3) here, reshaped on import (C order, the reference's ``view``).
* ReActNet's RSign is ``move0`` (a learnable bias) followed by sign; here the bias is the threshold of the
  ``rsign`` input quantizer, ``binary_conv.input_quantizer.bias`` (same shape (1, C, 1, 1)), so it exports as
  the ``SignBinarize`` threshold.

Both networks (ResNet-18 layout, one binary 3×3 conv per block, a real shortcut around each):

* Stem: real conv7×7/2 (3→64) → BN → maxpool 3/2 (no activation).
* Stages 64/128/256/512 × [4,4,4,4] blocks (Bi-Real-34: [6,8,12,6]), stride 2 at the first block of stages
  2–4; downsample = AvgPool2d(2, 2) → real conv1×1 → BN.
* Bi-Real block:  y = BN(BinConv3×3(ApproxSign(x))) + DS(x)   (no nonlinearity).
* ReActNet block: y = move2(PReLU(move1(BN(BinConv3×3(RSign(x))) + DS(x)))), i.e. RPReLU after the add.
* Binary weights: mean_o|W|·sign(W) (``magnitude_aware``), init U(0, 1)·1e−3 as the reference.
* Head: global average pool → Linear(512 → num_classes).
"""

from __future__ import annotations

import torch
from torch import nn

from bnnc.activations import LearnableBias
from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.nn import BinaryConv2d
from bnnc.quantizers import RSign

from ._registry import Recipe, register

__all__ = [
    "BIREAL_RECIPE",
    "REACTNET18_RECIPE",
    "BiRealBlock",
    "BiRealResNet",
    "ReActBlock",
    "bireal18",
    "bireal34",
    "imagenet_downsample",
    "reactnet18",
]

_IMAGENET = {"dataset": "imagenet", "input_shape": (1, 3, 224, 224)}
_AUGMENT = "RandomResizedCrop(224, scale=(0.08, 1)) + Lighting(PCA, 0.1) + horizontal flip; eval Resize(256) + CenterCrop(224)"

BIREAL_RECIPE = Recipe(
    **_IMAGENET,
    epochs=256,
    batch_size=512,
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    schedule="linear",
    source="Bi-Real Net (Liu et al., ECCV 2018), liuzechun/Bi-Real-net pytorch_implementation/BiReal18_34 "
           "train.py + README (methods.md §5.4); published top-1 56.4 % (Bi-Real-18), 62.2 % (Bi-Real-34) "
           "(BR README); 57.23 % Bi-Real-18 reproduced by lucifer443/BinaryNeuralNetwork",
    extra={
        "schedule_detail": "lr·(1 − epoch/epochs), linear decay to 0",
        "loss": "cross_entropy(label_smoothing=0.1)",
        "augment": _AUGMENT,
        "init": "from scratch",
        "caffe_recipe": "paper recipe (BR README): init from a real net (ReLU → leaky-clip → clip), SGD m 0.9, "
                        "wd 0; 18-layer 20 epochs, batch 128, lr 0.01 ×0.1 at 10, 15; 34-layer 40 epochs, "
                        "batch 1024, lr 0.08 ×0.1 at 20, 30; then freeze convs and retrain BN 1 epoch",
    },
)

REACTNET18_RECIPE = Recipe(
    **_IMAGENET,
    epochs=128,
    batch_size=512,
    optimizer="adam",
    lr=2.5e-3,
    weight_decay=0.0,
    schedule="linear",
    source="ReActNet (Liu et al., ECCV 2020), liuzechun/ReActNet resnet/{1_step1,2_step2} train.py + run.sh "
           "(methods.md §4.4); published top-1 65.9 % (RA README, 1.63e8 OPs); 66.1 % reproduced by "
           "lucifer443/BinaryNeuralNetwork",
    extra={
        "two_step": {
            "step1": "binary activations, real weights; Adam lr 2.5e-3, weight decay 1e-5 on conv weights only "
                     "(params with ndim 4 or 'conv' in the name), 128 epochs, batch 512",
            "step2": "binary weights and activations initialised from step 1 (load_state_dict(strict=False); "
                     "the ResNet code names the conv weight 'weight' in both steps, so it transfers); "
                     "weight decay 0; otherwise as step 1",
        },
        "alt_schedule": "lr 1e-3, 256 epochs per step",
        "schedule_detail": "LambdaLR lr·(1 − epoch/epochs), stepped at the start of each epoch",
        "loss": "distributional KD only: −Σ softmax(z_teacher)·log softmax(z_student), no hard labels",
        "teacher": "torchvision ResNet-34, pretrained, eval mode, frozen",
        "optimizer_detail": "Adam default betas",
        "augment": _AUGMENT,
    },
)


def imagenet_downsample(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    """Bi-Real / ReActNet shortcut when the shape changes: AvgPool2d(2, stride) → real conv1×1 → BN
    (keys ``downsample.1.weight``, ``downsample.2.*``, as the reference)."""
    return nn.Sequential(
        nn.AvgPool2d(kernel_size=2, stride=stride),
        nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, bias=False),
        nn.BatchNorm2d(planes),
    )


class BiRealBlock(nn.Module):
    """y = BN(BinConv3×3(ApproxSign(x))) + DS(x) (methods.md §5.3)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.binary_conv = BinaryConv2d(inplanes, planes, 3, stride=stride, padding=1,
                                        input_quantizer="approx_sign", weight_quantizer="magnitude_aware")
        self.bn1 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.bn1(self.binary_conv(x)) + residual


class ReActBlock(nn.Module):
    """y = move2(PReLU(move1(BN(BinConv3×3(RSign(x))) + DS(x)))) (methods.md §4.3); RSign's learnable bias
    (the reference's ``move0``) is the ``rsign`` quantizer's ``bias``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.binary_conv = BinaryConv2d(inplanes, planes, 3, stride=stride, padding=1,
                                        input_quantizer=RSign(inplanes), weight_quantizer="magnitude_aware")
        self.bn1 = nn.BatchNorm2d(planes)
        self.move1 = LearnableBias(planes)
        self.prelu = nn.PReLU(planes)
        self.move2 = LearnableBias(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.binary_conv(x)) + residual
        return self.move2(self.prelu(self.move1(out)))


class BiRealResNet(nn.Module):
    """The Bi-Real ResNet skeleton (stem conv7×7/2 → BN → maxpool, four stages, GAP → fc) around ``block``."""

    def __init__(self, block: type[nn.Module], layers=(4, 4, 4, 4), num_classes: int = 1000,
                 widths=(64, 128, 256, 512)):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (n, planes) in enumerate(zip(layers, widths)):
            self.add_module(f"layer{i + 1}", self._make_layer(block, planes, n, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        self.num_stages = len(layers)
        with torch.no_grad():  # the reference's HardBinaryConv init: U(0, 1)·1e−3 (other layers: PyTorch default)
            for m in self.modules():
                if isinstance(m, BinaryConv2d):
                    m.weight.copy_(torch.rand_like(m.weight) * 1e-3)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = imagenet_downsample(self.inplanes, planes, stride)
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [block(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("bireal18", BIREAL_RECIPE)
def bireal18(num_classes: int = 1000) -> nn.Module:
    return BiRealResNet(BiRealBlock, (4, 4, 4, 4), num_classes=num_classes)


@register("bireal34", BIREAL_RECIPE)
def bireal34(num_classes: int = 1000) -> nn.Module:
    return BiRealResNet(BiRealBlock, (6, 8, 12, 6), num_classes=num_classes)


@register("reactnet18", REACTNET18_RECIPE)
def reactnet18(num_classes: int = 1000) -> nn.Module:
    return BiRealResNet(ReActBlock, (4, 4, 4, 4), num_classes=num_classes)


# --------------------------------------------------------------------------------- checkpoint names (§11)

_BIREAL_MAPPING = ModelMapping(
    renames=((r"(^|\.)binary_conv\.weights$", r"\1binary_conv.weight"),),
    flattened=(r"(^|\.)binary_conv\.weight$",),
    notes="official Bi-Real PyTorch: module. prefix; binary_conv.weights (Cout·Cin·9, 1) -> binary_conv.weight "
          "(Cout, Cin, 3, 3), reshaped",
)
register_mapping("bireal18", _BIREAL_MAPPING)
register_mapping("bireal34", _BIREAL_MAPPING)
register_mapping("reactnet18", ModelMapping(
    renames=((r"(^|\.)move0\.bias$", r"\1binary_conv.input_quantizer.bias"),
             (r"(^|\.)binary_conv\.weights$", r"\1binary_conv.weight")),
    flattened=(r"(^|\.)binary_conv\.weight$",),
    notes="official ReActNet resnet/2_step2: module. prefix; layerX.Y.move0.bias (RSign) -> "
          "binary_conv.input_quantizer.bias; 4-D binary_conv.weight as is (a flattened .weights is reshaped)",
))
