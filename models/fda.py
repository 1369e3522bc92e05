"""``fda_resnet20``: the FDA-BNN CIFAR-10 ResNet-20 of the released 86.61 % MindSpore checkpoint
(Xu et al., NeurIPS 2021; ``shared/spec/methods.md`` §2.3, mindspore-ai/models research/cv/FDA-BNN
``src/resnet.py``, ``src/quan.py``).

* Binary conv (``QuanConv``): W_b = sign(W)·mean(|W|) with ONE scale over the whole tensor (DoReFa),
  A_b = sign(x); here the ``fda`` quantizers (:class:`bnnc.quantizers.FDASign`,
  :class:`bnnc.quantizers.FDAWeight` with ``scale="layer"``), whose forward is exactly that and whose
  backward is FDA's sine-series + noise-adaptation surrogate (the release only has identity STEs).
* Stem: real conv3×3 (3→16, no bias, init N(0, 0.01²)) → BN(16), NO activation.
* Block (one shortcut per block; conv → PReLU → BN order):
  h = BN1(PReLU1(conv1(x)));  y = BN2(PReLU2(conv2(h))) + SC(x); no activation after the addition.
  ``relu1``/``relu2`` are PReLUs with ONE shared slope (init 0.25); SC = identity or option A.
* Head: ReLU → global average pool → Linear(64 → classes) (init N(0, 0.01²), bias 0).

MindSpore names (§10.3) map with the generic BN leaf renames plus ``reluN.w`` (or ``reluN.a``, the
Parameter's declared name) → ``reluN.weight``; the file has no noise-module parameters (α = 0 at the end of
training), so those stay as initialised. The MindSpore ``QuanConv`` initialises its weights to ones (an
inference release); PyTorch's default conv init is used here so the model can be trained.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.nn import BinaryConv2d

from ._registry import Recipe, register
from .adabin import OptionAShortcut
from .irnet import _CIFAR_COMMON

__all__ = ["FDA_CIFAR10_RECIPE", "FDA_MAPPING", "FDABlock", "FDAResNet20", "fda_resnet20"]

FDA_CIFAR10_RECIPE = Recipe(
    dataset="cifar10",
    input_shape=(1, 3, 32, 32),
    epochs=400,
    batch_size=128,
    optimizer="sgd",
    lr=0.1,
    weight_decay=1e-4,
    schedule="cosine",
    source="FDA-BNN (Xu et al., NeurIPS 2021), paper recipe (methods.md §2.4; the LR schedule is not stated, "
           "cosine is the Huawei default); released MindSpore ResNet-20 checkpoint (mindspore-ai/models "
           "research/cv/FDA-BNN): 86.61 % top-1 (8 647/9 984, batch 32 drop_remainder); paper: 86.20 %",
    extra={**_CIFAR_COMMON, "cosine_t_max": 400, "published_top1": 86.61, "paper_top1": 86.20,
           "fda_schedule": "n = 9 + floor(9e/E), alpha = 0.05(1 + cos(pi(e+1)/E)) -> 0, omega = 0.1 (BiBench)",
           "weight_scale": "mean|W| over the whole tensor (DoReFa, the MindSpore release)"},
)


class FDABlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = BinaryConv2d(in_planes, planes, 3, stride=stride, padding=1, input_quantizer="fda",
                                  weight_quantizer="fda")
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, stride=1, padding=1, input_quantizer="fda",
                                  weight_quantizer="fda")
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.PReLU(1, init=0.25)
        self.relu2 = nn.PReLU(1, init=0.25)
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcuts need stride 2 and doubled channels")
            self.shortcut = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.relu1(self.conv1(x)))
        out = self.bn2(self.relu2(self.conv2(out)))
        return out + self.shortcut(x)


class FDAResNet20(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), widths=(16, 32, 64), num_classes: int = 10):
        super().__init__()
        c0 = widths[0]
        self.conv1 = nn.Conv2d(3, c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        in_planes = c0
        for i, (n, planes) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                blocks.append(FDABlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.linear = nn.Linear(in_planes, num_classes)
        nn.init.normal_(self.conv1.weight, 0.0, 0.01)
        nn.init.normal_(self.linear.weight, 0.0, 0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.adaptive_avg_pool2d(F.relu(out), 1).flatten(1)
        return self.linear(out)


FDA_MAPPING = ModelMapping(
    renames=((r"(^|\.)(relu\d+)\.(w|a)$", r"\1\2.weight"),),
    optional=(r"(^|\.)num_batches_tracked$", r"\.noise\.w[12]$"),
    notes="MindSpore BN gamma/beta/moving_* -> weight/bias/running_*; PReLU reluN.w (or .a) -> reluN.weight; "
          "noise-adaptation parameters are not in the release (optional)",
)


@register("fda_resnet20", FDA_CIFAR10_RECIPE)
def fda_resnet20(num_classes: int = 10) -> nn.Module:
    return FDAResNet20(num_classes=num_classes)


register_mapping("fda_resnet20", FDA_MAPPING)
