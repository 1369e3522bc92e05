"""``reactnet_a``: ReActNet-A, the MobileNetV1-based binary network (Liu et al., ECCV 2020;
``shared/spec/methods.md`` §4.1–4.2, §4.4, §11).

Module and parameter names follow the official code (liuzechun/ReActNet ``mobilenet/2_step2/reactnet.py``),
so its published step-2 checkpoints load strictly (``module.`` prefix and the flattened binary weights aside):

* ``feature.0``: real conv3×3/2 (3→32, pad 1) → BN, no activation (``conv1``, ``bn1``).
* ``feature.i`` (i = 1…13), channels [32, 64, 128, 128, 256, 256, 512×6, 1024, 1024], stride 2 where the
  width changes (except 32→64):  o1 = RPReLU₁(AvgPool₂(x) or x  +  BN1(BinConv3×3(RSign₁₁(x))))
  with RPReLU₁ = move12 → prelu1 → move13;  t = RSign₂₁(o1);
  P = C: o2 = BN2(BinConv1×1(t)) + o1;  P = 2C: o2 = [BN2_1(BinConv1×1(t)) + o1, BN2_2(BinConv1×1(t)) + o1];
  y = move23(prelu2(move22(o2))).
* Head: global average pool → ``fc`` Linear(1024 → 1000).

Binary convs (all 26 in the blocks): RSign activations (``rsign``: sign(x + b), ApproxSign backward) and
``magnitude_aware`` weights (mean_o|W|·sign(W), scale detached, clamp(−1, 1) straight-through: the
reference's ``HardBinaryConv``). The RSign biases are the block's ``move11`` / ``move21`` modules, as in the
reference; the binary convs use them through :class:`SharedQuantizer` (one bias ``move21`` feeds both
``binary_pw_down1`` and ``binary_pw_down2``, as in the reference). The reference stores binary-conv weights
flattened, ``binary_*.weights`` of shape (Cout·Cin·k·k, 1); ours are the usual 4-D ``binary_*.weight`` and the
checkpoint mapping renames and reshapes them (the only difference from the reference names). Init as the
reference: binary weights U(0, 1)·1e−3, PReLU slopes 0.25, biases 0, PyTorch defaults elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from bnnc.activations import LearnableBias
from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.nn import BinaryConv2d
from bnnc.quantizers import ActivationQuantizer, RSign

from ._registry import Recipe, register

__all__ = [
    "REACTNET_A_RECIPE",
    "STAGE_OUT_CHANNELS",
    "HardBinaryConv2d",
    "ReActBlock",
    "ReActNetA",
    "SharedQuantizer",
    "reactnet_a",
]

STAGE_OUT_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)

REACTNET_A_RECIPE = Recipe(
    dataset="imagenet",
    input_shape=(1, 3, 224, 224),
    epochs=128,
    batch_size=256,
    optimizer="adam",
    lr=1.25e-3,
    weight_decay=0.0,
    schedule="linear",
    source="ReActNet-A 69.4 % top-1 on ImageNet (Liu et al., ECCV 2020, abstract; 69.5 % in the "
           "liuzechun/ReActNet README), 0.87e8 OPs; recipe from liuzechun/ReActNet mobilenet/{1_step1,2_step2}/"
           "run.sh + train.py (methods.md §4.4)",
    extra={
        "two_step": {
            "step1": {"activations": "binary (rsign)", "weights": "real", "weight_decay": 1e-5, "epochs": 128,
                      "lr": 1.25e-3},
            "step2": {"activations": "binary (rsign)", "weights": "binary (magnitude_aware)", "weight_decay": 0.0,
                      "epochs": 128, "lr": 1.25e-3, "init": "step 1 checkpoint, load_state_dict(strict=False); "
                      "in the MobileNet code the binary-conv weights are NOT transferred (step 1 names them "
                      "`weight`, step 2 `weights`) and restart from U(0,1)·1e-3"},
        },
        "loss": "distributional KD only: −Σ softmax(z_teacher)·log softmax(z_student), teacher torchvision "
                "ResNet-34 (pretrained, frozen, eval mode); no hard labels",
        "adam_betas": (0.9, 0.999),
        "weight_decay_on": "parameters with ndim == 4 or 'conv' in the name (others 0)",
        "lr_schedule": "LambdaLR lr·(1 − epoch/epochs), stepped at the start of every epoch",
        "alt_schedule": {"lr": 5e-4, "epochs": 256},
        "augment": "RandomResizedCrop(224, scale=(0.08, 1)) + Lighting(PCA, 0.1) + horizontal flip",
        "eval_transform": "Resize(256) + CenterCrop(224)",
        "normalize_mean": (0.485, 0.456, 0.406),
        "normalize_std": (0.229, 0.224, 0.225),
        "published_ops": 0.87e8,
        "reproduction": "lucifer443/BinaryNeuralNetwork: 71.2 (step 1) → 70.0 % (step 2), batch 512, Adam 1e-3, "
                        "256 epochs per step",
    },
)


class SharedQuantizer(ActivationQuantizer):
    """An input quantizer that uses a quantizer module registered elsewhere (a block's ``move11``), so its
    parameters live once, under the reference's name, while the binary conv still owns its binarization
    (export, op counts). Holds the target without registering it as a submodule."""

    def __init__(self, target: ActivationQuantizer):
        super().__init__()
        object.__setattr__(self, "_target", target)

    @property
    def target(self) -> ActivationQuantizer:
        return self._target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._target(x)

    def deploy(self, channels: int):
        return self._target.deploy(channels)

    def extra_repr(self) -> str:
        return f"shares {type(self._target).__name__}"


class HardBinaryConv2d(BinaryConv2d):
    """The reference ``HardBinaryConv`` as a :class:`~bnnc.nn.BinaryConv2d`: ``rsign`` inputs (by default),
    ``magnitude_aware`` weights, latent weights initialised U(0, 1)·1e−3. The reference stores the weight
    flattened as ``weights`` (Cout·Cin·k·k, 1); the checkpoint mapping reshapes it into ``weight``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, *,
                 input_quantizer="rsign", weight_quantizer="magnitude_aware"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         input_quantizer=input_quantizer, weight_quantizer=weight_quantizer)
        with torch.no_grad():
            self.weight.copy_(torch.rand(self.weight.shape) * 1e-3)


class FirstConv(nn.Module):
    """``feature.0``: real conv3×3 (pad 1, no bias) → BN, no activation."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, oup, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(oup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


class ReActBlock(nn.Module):
    """The ReActNet-A block (reference ``BasicBlock``): a binary 3×3 (depthwise position of MobileNet, but
    dense C→C) and a binary 1×1 (C→C, or two C→C halves concatenated when P = 2C), each with a real
    shortcut, RSign before and RPReLU (move → PReLU → move) after."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        if planes not in (inplanes, 2 * inplanes):
            raise ValueError(f"ReActNet block needs planes = inplanes or 2·inplanes, got {inplanes}→{planes}")
        if stride not in (1, 2):
            raise ValueError(f"ReActNet block stride must be 1 or 2, got {stride}")
        self.inplanes, self.planes, self.stride = inplanes, planes, stride
        self.move11 = RSign(inplanes)
        self.binary_3x3 = HardBinaryConv2d(inplanes, inplanes, 3, stride=stride, padding=1,
                                           input_quantizer=SharedQuantizer(self.move11))
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.move12 = LearnableBias(inplanes)
        self.prelu1 = nn.PReLU(inplanes)
        self.move13 = LearnableBias(inplanes)
        self.move21 = RSign(inplanes)
        if planes == inplanes:
            self.binary_pw = HardBinaryConv2d(inplanes, planes, 1, input_quantizer=SharedQuantizer(self.move21))
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            self.binary_pw_down1 = HardBinaryConv2d(inplanes, inplanes, 1,
                                                    input_quantizer=SharedQuantizer(self.move21))
            self.binary_pw_down2 = HardBinaryConv2d(inplanes, inplanes, 1,
                                                    input_quantizer=SharedQuantizer(self.move21))
            self.bn2_1 = nn.BatchNorm2d(inplanes)
            self.bn2_2 = nn.BatchNorm2d(inplanes)
        self.move22 = LearnableBias(planes)
        self.prelu2 = nn.PReLU(planes)
        self.move23 = LearnableBias(planes)
        self.pooling = nn.AvgPool2d(2, 2) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.bn1(self.binary_3x3(x))
        if self.pooling is not None:
            x = self.pooling(x)
        out1 = self.move13(self.prelu1(self.move12(x + out1)))
        if self.planes == self.inplanes:
            out2 = self.bn2(self.binary_pw(out1)) + out1
        else:
            out2 = torch.cat([self.bn2_1(self.binary_pw_down1(out1)) + out1,
                              self.bn2_2(self.binary_pw_down2(out1)) + out1], dim=1)
        return self.move23(self.prelu2(self.move22(out2)))


class ReActNetA(nn.Module):
    def __init__(self, num_classes: int = 1000, channels=STAGE_OUT_CHANNELS):
        super().__init__()
        self.feature = nn.ModuleList()
        for i, c in enumerate(channels):
            if i == 0:
                self.feature.append(FirstConv(3, c, 2))
            else:
                prev = channels[i - 1]
                stride = 2 if (prev != c and c != 64) else 1
                self.feature.append(ReActBlock(prev, c, stride))
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.feature:
            x = block(x)
        return self.fc(self.pool1(x).flatten(1))


register_mapping("reactnet_a", ModelMapping(
    renames=((r"(^|\.)(binary_3x3|binary_pw|binary_pw_down1|binary_pw_down2)\.weights$", r"\1\2.weight"),),
    flattened=(r"(^|\.)(binary_3x3|binary_pw|binary_pw_down1|binary_pw_down2)\.weight$",),
    notes="official liuzechun/ReActNet mobilenet/2_step2: module. prefix; binary_*.weights (Cout·Cin·k·k, 1) -> "
          "binary_*.weight (Cout, Cin, k, k), reshaped; all other names unchanged"))


@register("reactnet_a", REACTNET_A_RECIPE)
def reactnet_a(num_classes: int = 1000) -> nn.Module:
    return ReActNetA(num_classes=num_classes)
