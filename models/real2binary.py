"""``real2binary_baseline``: the "strong baseline" of Real-to-Binary (Martinez et al., ICLR 2020) for ImageNet,
as implemented in lucifer443/BinaryNeuralNetwork (``StrongBaselineBlock``; ``shared/spec/methods.md`` §8).

* Stem: real conv7×7/2 (3→64) → BN → PReLU(64) → maxpool 3/2.
* Stages 64/128/256/512 × [2,2,2,2]; each block has two half-blocks, each with its own shortcut:
      y = PReLU( Scale( BinConv3×3( sign( BN(x) ) ) ) ) + DS(x)
  DS = real conv1×1 stride 2 → BN (LU; ``downsample.0``, ``downsample.1``), identity otherwise.
* Scale (XNOR-Net++): learnable α (1, C, 1, 1) · β (1, 1, H, 1) · γ (1, 1, 1, W), all initialised to 1. The
  β/γ sizes are the feature-map sizes, so they depend on the input resolution: 56/28/14/7 for stages 1–4 at
  224×224 (``input_size``; LU hard-codes the 224 values).
* Binary convs: sign activations and sign weights, no weight scale, straight-through backward
  1_{|x| ≤ 1.25} for both (LU's ``STEConv2d``).
* Head: global average pool → fc.

Not included: the full Real-to-Binary network (data-driven scale: GAP → FC C→C/8 → ReLU → FC → sigmoid, and
attention matching with a real teacher; 65.4 % official).
"""

from __future__ import annotations

import torch
from torch import nn

from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.nn import BinaryConv2d
from bnnc.ops import export as ops
from bnnc.quantizers import ActivationDeploy, ActivationQuantizer, WeightQuantizer, ste

from ._registry import Recipe, register

__all__ = [
    "REAL2BINARY_BASELINE_RECIPE",
    "ClippedSign",
    "ClippedSignWeight",
    "StrongBaselineBlock",
    "StrongBaselineResNet",
    "XnorPlusPlusScale",
    "real2binary_baseline",
]

REAL2BINARY_BASELINE_RECIPE = Recipe(
    dataset="imagenet",
    input_shape=(1, 3, 224, 224),
    epochs=75,
    batch_size=256,
    optimizer="adam",
    lr=2e-4,
    weight_decay=0.0,
    schedule="step",
    source="Real-to-Binary strong baseline (Martinez et al., ICLR 2020), as in lucifer443/BinaryNeuralNetwork "
           "configs/baseline/real2binary/strong_baseline_step{1,2}.py (methods.md §8): 60.45 % top-1 (LU); "
           "official 60.9 %",
    extra={
        "two_step": {
            "step1": "binary activations, real weights: Adam lr 1e-3, weight decay 1e-5, 75 epochs, lr steps at "
                     "epochs 40/60/70, linear warm-up (LU reaches 62.68 %)",
            "step2": "binary weights and activations, initialised from step 1: Adam lr 2e-4, weight decay 0, "
                     "75 epochs, same steps",
        },
        "milestones": (40, 60, 70),
        "loss": "cross_entropy",
        "batch_detail": "8 GPUs × 32 (LU configs: _base_/datasets/imagenet_bs32.py, 'schedules for imagenet bs256')",
        "no_weight_decay_on": "norm parameters (paramwise_cfg norm_decay_mult=0)",
        "seed": 166,
    },
)


class ClippedSign(ActivationQuantizer):
    """s = +1 if x ≥ 0 else −1; straight-through backward 1_{|x| ≤ clip} (LU ``RANetWSign(clip=1.25)`` on
    activations). Deploy: threshold 0, p = 1, q = 0."""

    name = "clipped_sign"

    def __init__(self, clip: float = 1.25):
        super().__init__()
        self.clip = float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = ops.sign_binarize(x, torch.zeros(x.shape[1], dtype=x.dtype, device=x.device))
        if torch.compiler.is_exporting() or not torch.is_grad_enabled():
            return s
        return ste(s, x.clamp(-self.clip, self.clip))

    def deploy(self, channels: int) -> ActivationDeploy:
        return ActivationDeploy(torch.zeros(channels), torch.ones(channels), torch.zeros(channels))

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


class ClippedSignWeight(WeightQuantizer):
    """w_b = sign(w), no scale; straight-through backward 1_{|w| ≤ clip}."""

    name = "clipped_sign"

    def __init__(self, clip: float = 1.25):
        super().__init__()
        self.clip = float(clip)

    def forward(self, w: torch.Tensor):
        return ste(ops.weight_sign(w), w.clamp(-self.clip, self.clip)), None, None

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


class XnorPlusPlusScale(nn.Module):
    """XNOR-Net++ scale: x · α_c · β_h · γ_w with ``alpha`` (1, C, 1, 1), ``beta`` (1, 1, H, 1), ``gamma``
    (1, 1, 1, W), all initialised to 1 (LU ``LearnableScale``)."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, 1, height, 1))
        self.gamma = nn.Parameter(torch.ones(1, 1, 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != (self.beta.shape[2], self.gamma.shape[3]):
            raise ValueError(f"XnorPlusPlusScale was built for {self.beta.shape[2]}×{self.gamma.shape[3]} feature "
                             f"maps, got {x.shape[2]}×{x.shape[3]}: build the model with the input size it runs at")
        return x * self.alpha * self.beta * self.gamma


def _binary_conv3x3(cin: int, cout: int, stride: int, clip: float) -> BinaryConv2d:
    return BinaryConv2d(cin, cout, 3, stride=stride, padding=1, input_quantizer=ClippedSign(clip),
                        weight_quantizer=ClippedSignWeight(clip))


class StrongBaselineBlock(nn.Module):
    """Two half-blocks, y = PReLU(Scale(BinConv(sign(BN(x))))) + shortcut, names as LU's block."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, size: int, stride: int = 1,
                 downsample: nn.Module | None = None, clip: float = 1.25):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _binary_conv3x3(in_channels, out_channels, stride, clip)
        self.scale1 = XnorPlusPlusScale(out_channels, size, size)
        self.nonlinear1 = nn.PReLU(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _binary_conv3x3(out_channels, out_channels, 1, clip)
        self.scale2 = XnorPlusPlusScale(out_channels, size, size)
        self.nonlinear2 = nn.PReLU(out_channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.nonlinear1(self.scale1(self.conv1(self.bn1(x)))) + identity
        return self.nonlinear2(self.scale2(self.conv2(self.bn2(out)))) + out


class StrongBaselineResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, input_size: int = 224,
                 widths=(64, 128, 256, 512), clip: float = 1.25):
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 (the feature maps halve five times), got {input_size}")
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = nn.PReLU(widths[0])
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin, size = widths[0], input_size // 4
        for i, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            size //= stride
            downsample = None
            if stride != 1 or cin != planes:
                downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
            blocks = [StrongBaselineBlock(cin, planes, size, stride, downsample, clip)]
            blocks += [StrongBaselineBlock(planes, planes, size, clip=clip) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("real2binary_baseline", REAL2BINARY_BASELINE_RECIPE)
def real2binary_baseline(num_classes: int = 1000, input_size: int = 224) -> nn.Module:
    return StrongBaselineResNet((2, 2, 2, 2), num_classes=num_classes, input_size=input_size)


# LU trains it as an mmcls ImageClassifier (backbone ResArch 'StrongBaseline' with stem_act='prelu', neck GAP
# without parameters, head LinearClsHead): its checkpoints name the same tensors under backbone./head.
register_mapping("real2binary_baseline", ModelMapping(
    renames=((r"^backbone\.stem_act\.", "prelu."), (r"^backbone\.", ""), (r"^head\.fc\.", "fc.")),
    notes="lucifer443/BinaryNeuralNetwork mmcls: backbone.stem_act -> prelu, backbone.* -> *, head.fc -> fc",
))
