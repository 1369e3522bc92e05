"""``rbnn_resnet18_imagenet``, ``rbnn_resnet34_imagenet``: RBNN (Lin et al., NeurIPS 2020) ImageNet
ResNets ``resnet18_1w1a`` / ``resnet34_1w1a`` (``shared/spec/methods.md`` §6.1–6.5, lmbxmu/RBNN imagenet/).

* Stem: real conv7×7/2 (3→64) → ``bn1`` → Hardtanh → maxpool 3/2.
* Stages 64/128/256/512 × [2,2,2,2] (ResNet-34: [3,4,6,3]), stride 2 at the first block of stages 2–4.
  Bi-Real-style block, Hardtanh after each add:
      h = Hardtanh(bn1(conv1(x)) + DS(x));   y = Hardtanh(bn2(conv2(h)) + h)
  DS = REAL conv1×1 stride 2 → BN (keys ``downsample.0``, ``downsample.1``).
* Binary convs: ``rbnn`` activations (binarised around the per-sample mean, exported as ReduceMean → Sub → SignBinarize)
  and ``rbnn`` weights (bi-rotation; ``alpha``, ``rotate``, ``R1``, ``R2`` per conv, sized at construction).
* Head: global average pool (the reference's AvgPool2d(7) at 224×224) → ``bn2`` BatchNorm1d(512) → ``fc``.
  The reference also builds ``bn3`` = BatchNorm1d(num_classes) that its forward never uses; it is kept
  (unused) so the released state dicts load strictly.

Checkpoints (§6.5): keys have no ``module.`` prefix; each binary conv ``<p>`` stores ``<p>.{weight, alpha,
rotate, R1, R2}``, here ``<p>.weight`` and ``<p>.weight_quantizer.{alpha, rotate, R1, R2}``.
Init: PyTorch defaults (methods.md does not state the ImageNet init).
"""

from __future__ import annotations

import torch
from torch import nn

from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.nn import BinaryConv2d

from ._registry import Recipe, register

__all__ = ["RBNN_IMAGENET_RECIPE", "RBNNImageNetBlock", "RBNNResNetImageNet", "rbnn_resnet18_imagenet",
           "rbnn_resnet34_imagenet"]

RBNN_IMAGENET_RECIPE = Recipe(
    dataset="imagenet",
    input_shape=(1, 3, 224, 224),
    epochs=150,
    batch_size=512,
    optimizer="sgd",
    lr=0.1,
    weight_decay=1e-4,
    schedule="cosine",
    source="RBNN (Lin et al., NeurIPS 2020), lmbxmu/RBNN readme + imagenet/main.py (methods.md §6.3); published "
           "top-1 59.9 % (ResNet-18, 150 epochs, batch 512), 63.1 % (ResNet-34, 150 epochs) (RB readme)",
    extra={
        "momentum": 0.9,
        "warmup": None,
        "tk_schedule": "t = 10^(log10 Tmin + (log10 Tmax − log10 Tmin)·e/E), Tmin 1e-2, Tmax 10, k = max(1/t, 1)",
        "rotation_update": "every epoch, during the first training mini-batch",
        "test_batch_size": 256,
        "loss": "cross_entropy",
        "loader": "DALI",
        "weight_decay_note": "methods.md §6.3 does not state the ImageNet weight decay; 1e-4 is RBNN's CIFAR value",
        "other_results": "ResNet-18 58.8 % (120 epochs, batch 256), 59.6 % (120 epochs, batch 512); "
                         "ResNet-34 63.5 % (200 epochs)",
    },
)


class RBNNImageNetBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = BinaryConv2d(inplanes, planes, 3, stride=stride, padding=1, input_quantizer="rbnn",
                                  weight_quantizer="rbnn")
        self.bn1 = nn.BatchNorm2d(planes)
        self.nonlinear = nn.Hardtanh()
        self.conv2 = BinaryConv2d(planes, planes, 3, stride=1, padding=1, input_quantizer="rbnn",
                                  weight_quantizer="rbnn")
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.nonlinear(self.bn1(self.conv1(x)) + residual)
        return self.nonlinear(self.bn2(self.conv2(out)) + out)


class RBNNResNetImageNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.nonlinear = nn.Hardtanh()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = widths[0]
        for i, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or cin != planes:
                downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes))
            blocks = [RBNNImageNetBlock(cin, planes, stride, downsample)]
            blocks += [RBNNImageNetBlock(planes, planes) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.bn2 = nn.BatchNorm1d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.bn3 = nn.BatchNorm1d(num_classes)  # built but unused in forward, as in the reference
        with torch.no_grad():  # size each conv's rotation state now (alpha = mean|W| of the initial weights)
            for m in self.modules():
                if isinstance(m, BinaryConv2d):
                    m.weight_quantizer(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.nonlinear(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.bn2(torch.flatten(self.avgpool(x), 1)))


@register("rbnn_resnet18_imagenet", RBNN_IMAGENET_RECIPE)
def rbnn_resnet18_imagenet(num_classes: int = 1000) -> nn.Module:
    return RBNNResNetImageNet((2, 2, 2, 2), num_classes=num_classes)


@register("rbnn_resnet34_imagenet", RBNN_IMAGENET_RECIPE)
def rbnn_resnet34_imagenet(num_classes: int = 1000) -> nn.Module:
    return RBNNResNetImageNet((3, 4, 6, 3), num_classes=num_classes)


_RBNN_MAPPING = ModelMapping(
    renames=((r"(^|\.)(conv\d)\.(alpha|rotate|R1|R2)$", r"\1\2.weight_quantizer.\3"),),
    notes="lmbxmu/RBNN imagenet: no module. prefix; convX.{alpha,rotate,R1,R2} -> convX.weight_quantizer.*",
)
register_mapping("rbnn_resnet18_imagenet", _RBNN_MAPPING)
register_mapping("rbnn_resnet34_imagenet", _RBNN_MAPPING)
