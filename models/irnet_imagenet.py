"""``irnet18``: IR-Net ResNet-18 for ImageNet as in lucifer443/BinaryNeuralNetwork (mmcls ``ResArch``
``IRNet-18``; ``shared/spec/methods.md`` §3.1–3.3), with mmcls's ``backbone.`` / ``neck.`` / ``head.`` module
tree so its checkpoints map by name.

* ``backbone``: real conv7×7/2 (3→64) → ``bn1`` → Hardtanh (``stem_act='hardtanh'``) → maxpool 3/2; stages
  64/128/256/512 × [2,2,2,2] ``IRNetBlock``s, stride 2 at the first block of stages 2–4. Block (a shortcut
  around each binary conv, Hardtanh after each add):
      h = Hardtanh(bn1(conv1(x)) + DS(x));   y = Hardtanh(bn2(conv2(h)) + h)
  DS = real conv1×1 stride 2 → BN (``avg_down=False``: keys ``downsample.0``, ``downsample.1``).
* Binary convs: ``ede`` activations (EDE backward, Tmin 0.1 / Tmax 10 schedule) and ``libra_pb`` weights
  (Libra-PB: standardised per output channel, power-of-two scale).
* ``neck``: global average pooling → BatchNorm1d(512) (``neck.bn``, mmcls ``GlobalAveragePoolingBN``);
  ``head``: ``fc`` Linear(512 → num_classes). The config ``configs/baseline/irnet/irnet_r18.py`` instead puts
  that BatchNorm1d in its ``IRClsHead`` as ``head.bn1`` (same computation): its checkpoints map with the
  rename ``head.bn1.`` → ``neck.bn.``.
* Init (mmcls ``init_weights``): every conv kaiming-normal (fan_out, relu), BN weight 1 / bias 0, head fc
  N(0, 0.01²) with bias 0.
"""

from __future__ import annotations

import torch
from torch import nn

from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.nn import BinaryConv2d

from ._registry import Recipe, register

__all__ = [
    "IRNET18_RECIPE",
    "GlobalAveragePoolingBN",
    "IRNetBackbone",
    "IRNetBlock",
    "IRNetImageNet",
    "LinearClsHead",
    "irnet18",
]

IRNET18_RECIPE = Recipe(
    dataset="imagenet",
    input_shape=(1, 3, 224, 224),
    epochs=100,
    batch_size=1024,
    optimizer="sgd",
    lr=0.4,
    weight_decay=1e-4,
    schedule="step",
    source="IR-Net (Qin et al., CVPR 2020) as reproduced by lucifer443/BinaryNeuralNetwork "
           "configs/baseline/irnet/irnet_r18.py + log (methods.md §3.4): 58.58 % top-1; official IR-Net "
           "ResNet-18 58.1 % (htqin/IR-Net README)",
    extra={
        "momentum": 0.9,
        "nesterov": True,
        "milestones": (30, 60, 90),
        "gamma": 0.1,
        "warmup": "linear, 2500 iterations, from 0.25·lr",
        "batch_detail": "8 GPUs × 128",
        "loss": "cross_entropy",
        "ede_schedule": "EDEHook: Tmin 0.1, Tmax 10 over 100 epochs",
        "augment": "RandomResizedCrop(224) + horizontal flip; eval Resize(256) + CenterCrop(224)",
        "seed": 166,
        "official_recipe": "htqin/IR-Net ImageNet/ResNet18/1w1a/config.yaml: batch 64/GPU × 32, SGD nesterov "
                           "m 0.9, lr 0.2 warmed up to 0.8 over 2500 iters, ×0.1 at 18750/37500/56250 iters, "
                           "62500 iters; weight decay 1e-5 or 1e-4 (the file gives both)",
    },
)


def _binary_conv3x3(cin: int, cout: int, stride: int) -> BinaryConv2d:
    return BinaryConv2d(cin, cout, 3, stride=stride, padding=1, input_quantizer="ede", weight_quantizer="libra_pb")


class IRNetBlock(nn.Module):
    """h = Hardtanh(bn1(conv1(x)) + DS(x)); y = Hardtanh(bn2(conv2(h)) + h) (LU ``IRNetBlock``)."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _binary_conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.nonlinear = nn.Hardtanh()
        self.conv2 = _binary_conv3x3(out_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.nonlinear(self.bn1(self.conv1(x)) + residual)
        return self.nonlinear(self.bn2(self.conv2(out)) + out)


class IRNetBackbone(nn.Module):
    """mmcls ``ResArch(arch='IRNet-18', stem_act='hardtanh')``: conv1 → bn1 → Hardtanh → maxpool → layer1–4."""

    def __init__(self, stage_blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_channels: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.stem_act = nn.Hardtanh()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = stem_channels
        for i, (n, cout) in enumerate(zip(stage_blocks, widths)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            blocks = [IRNetBlock(cin, cout, stride, downsample)] + [IRNetBlock(cout, cout) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.num_stages = len(stage_blocks)
        self.feat_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem_act(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class GlobalAveragePoolingBN(nn.Module):
    """mmcls neck ``GlobalAveragePoolingBN``: GAP → flatten → BatchNorm1d (``bn``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.bn = nn.BatchNorm1d(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.flatten(self.gap(x), 1))


class LinearClsHead(nn.Module):
    """mmcls ``LinearClsHead``: ``fc`` only (the loss lives in the trainer)."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class IRNetImageNet(nn.Module):
    """mmcls ``ImageClassifier``: backbone → neck → head; returns logits."""

    def __init__(self, num_classes: int = 1000, stage_blocks=(2, 2, 2, 2)):
        super().__init__()
        self.backbone = IRNetBackbone(stage_blocks)
        self.neck = GlobalAveragePoolingBN(self.backbone.feat_dim)
        self.head = LinearClsHead(num_classes, self.backbone.feat_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # mmcv kaiming_init: normal, fan_out, relu; BinaryConv2d included
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


@register("irnet18", IRNET18_RECIPE)
def irnet18(num_classes: int = 1000) -> nn.Module:
    return IRNetImageNet(num_classes=num_classes)


register_mapping("irnet18", ModelMapping(
    renames=((r"^head\.bn1\.", "neck.bn."),),
    notes="mmcls (lucifer443/BinaryNeuralNetwork) {'meta','state_dict','optimizer'}: backbone./neck./head. keys "
          "as in the model; IRClsHead's head.bn1.* -> neck.bn.*",
))
