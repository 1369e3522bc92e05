"""``bimlp_s``, ``bimlp_m``: BiMLP (Xu, Chen, Wang, NeurIPS 2022; ``shared/spec/methods.md`` §7, §10.3).

A Wave-MLP whose FC layers are binary 1×1 convs, written after the released MindSpore code
(mindspore-ai/models ``research/cv/BiMLP/src/bimlp.py``, ``quan_conv.py``) with its Cell tree and attribute
names, so a MindSpore ``.ckpt`` maps strictly (BN/GroupNorm ``gamma``/``beta``/``moving_*`` are renamed by
:mod:`bnnc.checkpoints.mapping`; nothing else is).

* Stem ``patch_embed``: real conv 7×7/4 (pad 2, bias) → Norm → RPReLU.
* ``network``: stage blocks at indices 0, 2, 4, 6, ``Downsample`` at 1, 3, 5 (real conv1×1 with bias → Norm
  → RPReLU → mean of four max-pools k = 2, 3, 5, 7, stride 2, MindSpore "same" padding: out = ⌈H/2⌉, total
  pad max((out − 1)·2 + k − H, 0) split floor top / ceil bottom, padded with −∞).
* ``WaveBlock``: x ← x + PATM(norm1(x)); m = norm2(x);
  x ← x + w0·RPReLU(BN(DW1×7(move_h(m))) + move_h(m)) + w1·RPReLU(BN(DW7×1(move_w(m))) + move_w(m))
  + (1 − w0 − w1)·Mlp(m), learnable ``weight`` (w0, w1) init 0.
* ``PATM`` (phase-aware token mixing, mode 'fc') and ``Mlp`` with the "universal shortcut" (tile or group-
  average channels): methods.md §7.2.
* Head: Norm → global average pool → ``head`` Dense(512 → 1000).
* BiMLP-S: layers [2, 2, 4, 2], BatchNorm2d everywhere. BiMLP-M: layers [2, 3, 10, 3], GroupNorm(1, C) for
  norm1/norm2, patch-embed, downsample and the final norm (PATM/Mlp internals stay BatchNorm2d).

Quantizers are the release's (``quan_name_w = quan_name_a = "xnor"``, methods.md §7.1): every QuanConv input
goes through DoReFa with nbit 1, a = rint(clip(x, −1, 1)) ∈ {−1, 0, +1} (``bimlp``: TERNARY, an upstream
oddity kept for fidelity), weights XnorM sign(W)·mean(|W|, axis 1). The 1×1 QuanConvs are
:class:`~bnnc.nn.BinaryConv2d` (``bimlp``/``bimlp``). The grouped 1×7 / 7×1 QuanConvs (``sfc_*`` depthwise,
``tfc_*`` with two inputs per group) scale per (out-channel, tap), which the binary-conv op cannot express
(for the depthwise ones XnorM even gives W_b = W): they are :class:`XnorMConv2d`, real convs on the ternary
input, counted as FLOPs. The ternary activations export as two binary convs sharing the weights
(½·s₁ + ½·s₂, :class:`bnnc.quantizers.BiMLPActivation`); the TVM runtime does not yet translate every float op
of the whole network (``Greater`` among them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bnnc.activations import LearnableBias
from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.nn import BinaryConv2d
from bnnc.quantizers import BiMLPActivation, ste

from ._registry import Recipe, register

__all__ = [
    "BIMLP_RECIPE",
    "PATM",
    "BiMLP",
    "Downsample",
    "Mlp",
    "PReLU",
    "PatchEmbedOverlapping",
    "RPReLU",
    "WaveBlock",
    "XnorMConv2d",
    "bimlp_m",
    "bimlp_s",
    "same_pool_pads",
    "uni_shortcut",
]


def _recipe(published: str) -> Recipe:
    return Recipe(
        dataset="imagenet",
        input_shape=(1, 3, 224, 224),
        epochs=0,
        batch_size=64,
        optimizer="unknown",
        lr=0.0,
        schedule="unknown",
        source=published,
        extra={
            "training_recipe": "not published with the code (methods.md §7.5, §13); only eval.py is released",
            "eval_transform": "Decode → Resize(256, bilinear) → CenterCrop(224) → Normalize(ImageNet mean/std "
                              "×255) → HWC2CHW; batch 64, drop_remainder (49 984 images)",
            "normalize_mean": (0.485, 0.456, 0.406),
            "normalize_std": (0.229, 0.224, 0.225),
            "activations": "ternary rint(clip(x, -1, 1)) as released (bimlp quantizer)",
        },
    )


BIMLP_RECIPE = {
    "bimlp_s": _recipe("BiMLP-S (Xu et al., NeurIPS 2022): no released accuracy or checkpoint; code "
                       "mindspore-ai/models research/cv/BiMLP (methods.md §7)"),
    "bimlp_m": _recipe("BiMLP-M 71.56 % top-1 on ImageNet (mindspore-ai/models research/cv/BiMLP README; "
                       "35 767/49 984 images, methods.md §7.5)"),
}


# ------------------------------------------------------------------------------------------ building blocks


class PReLU(nn.Module):
    """MindSpore ``prelu`` Cell: x for x > 0, w_c·x otherwise, ``w`` of shape (1, C, 1, 1), init 0.25."""

    def __init__(self, channels: int):
        super().__init__()
        self.w = nn.Parameter(torch.full((1, channels, 1, 1), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.w * x)


class RPReLU(nn.Module):
    """BiMLP RPReLU: ``move1`` (bias) → ``act`` (PReLU) → ``move2`` (bias) (MindSpore names)."""

    def __init__(self, channels: int):
        super().__init__()
        self.move1 = LearnableBias(channels)
        self.move2 = LearnableBias(channels)
        self.act = PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.move2(self.act(self.move1(x)))


def _qconv(cin: int, cout: int) -> BinaryConv2d:
    """A 1×1 QuanConv ("xnor"/"xnor", nbit 1, no bias)."""
    return BinaryConv2d(cin, cout, 1, input_quantizer="bimlp", weight_quantizer="bimlp")


class XnorMConv2d(nn.Conv2d):
    """A grouped QuanConv that is not a binary conv in effect: input a = rint(clip(x, −1, 1)) (``bimlp``),
    weights XnorM W_b = sign(W)·mean(|W|, axis 1) (one scale per (out-channel, kh, kw); W_b = W when each
    group has one input channel), identity straight-through gradient for W, zero padding after quantizing."""

    def __init__(self, in_channels, out_channels, kernel_size, padding, groups):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, groups=groups, bias=False)
        self.input_quantizer = BiMLPActivation()

    def binarized_weight(self) -> torch.Tensor:
        w = self.weight
        value = torch.sign(w.detach()) * w.detach().abs().mean(1, keepdim=True)
        return ste(value, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.binarized_weight(), None)


def uni_shortcut(x: torch.Tensor, cout: int) -> torch.Tensor:
    """BiMLP's universal shortcut: identity (Cin = Cout), channel tiling (Cout = r·Cin: channel c' ← c' mod
    Cin), or the mean of consecutive groups of 4 channels (Cin = 4·Cout)."""
    cin = x.shape[1]
    if cout == cin:
        return x
    if cout % cin == 0:
        return x.repeat(1, cout // cin, 1, 1)
    if cin == 4 * cout:
        return (x[:, 0::4] + x[:, 1::4] + x[:, 2::4] + x[:, 3::4]) / 4.0
    raise ValueError(f"no BiMLP shortcut from {cin} to {cout} channels")


class Mlp(nn.Module):
    """Channel MLP with shortcuts (also PATM's ``reweight``):
    h = act2(norm1(fc1(move1(x))) + act1(norm0(S(x))));  y = act3(norm2(fc2(move2(h))) + S(h))."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.move1 = LearnableBias(in_features)
        self.fc1 = _qconv(in_features, hidden_features)
        self.act1 = RPReLU(hidden_features)
        self.act2 = RPReLU(hidden_features)
        self.act3 = RPReLU(out_features)
        self.move2 = LearnableBias(hidden_features)
        self.fc2 = _qconv(hidden_features, out_features)
        self.norm1 = nn.BatchNorm2d(hidden_features)
        self.norm2 = nn.BatchNorm2d(out_features)
        self.norm0 = nn.BatchNorm2d(hidden_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.act1(self.norm0(uni_shortcut(x, self.hidden_features)))
        x = self.act2(self.norm1(self.fc1(self.move1(x))) + inp)
        inp = uni_shortcut(x, self.out_features)
        return self.act3(self.norm2(self.fc2(self.move2(x))) + inp)


class PATM(nn.Module):
    """Phase-aware token mixing, mode 'fc' (methods.md §7.2), MindSpore attribute names."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc_h = _qconv(dim, dim)
        self.fc_w = _qconv(dim, dim)
        self.fc_c = _qconv(dim, dim)
        self.move_fch = LearnableBias(dim)
        self.move_fcw = LearnableBias(dim)
        self.move_fcc = LearnableBias(dim)
        self.fc_h_bn = nn.BatchNorm2d(dim)
        self.fc_w_bn = nn.BatchNorm2d(dim)
        self.fc_h_act = RPReLU(dim)
        self.fc_w_act = RPReLU(dim)
        self.tfc_h = XnorMConv2d(2 * dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.tfc_w = XnorMConv2d(2 * dim, dim, (7, 1), padding=(3, 0), groups=dim)
        self.move_tfch = LearnableBias(2 * dim)
        self.move_tfcw = LearnableBias(2 * dim)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = _qconv(dim, dim)
        self.move_proj = LearnableBias(dim)
        self.move_thetah = LearnableBias(dim)
        self.theta_h_conv = _qconv(dim, dim)
        self.theta_h_bn = nn.BatchNorm2d(dim)
        self.theta_h_act = RPReLU(dim)
        self.move_thetaw = LearnableBias(dim)
        self.theta_w_conv = _qconv(dim, dim)
        self.theta_w_bn = nn.BatchNorm2d(dim)
        self.theta_w_act = RPReLU(dim)
        self.act_c = RPReLU(dim)
        self.act_h = RPReLU(dim)
        self.act_w = RPReLU(dim)
        self.act_proj = RPReLU(dim)
        self.norm_c = nn.BatchNorm2d(dim)
        self.norm_h = nn.BatchNorm2d(dim)
        self.norm_w = nn.BatchNorm2d(dim)
        self.norm_proj = nn.BatchNorm2d(dim)

    @staticmethod
    def _unit(move, conv, bn, act, u):
        v = move(u)
        return act(bn(conv(v)) + v)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        b, c = inp.shape[:2]
        theta_h = self._unit(self.move_thetah, self.theta_h_conv, self.theta_h_bn, self.theta_h_act, inp)
        theta_w = self._unit(self.move_thetaw, self.theta_w_conv, self.theta_w_bn, self.theta_w_act, inp)
        x_h = self._unit(self.move_fch, self.fc_h, self.fc_h_bn, self.fc_h_act, inp)
        x_w = self._unit(self.move_fcw, self.fc_w, self.fc_w_bn, self.fc_w_act, inp)
        x_h = self.move_tfch(torch.cat([x_h * torch.cos(theta_h), x_h * torch.sin(theta_h)], dim=1))
        x_w = self.move_tfcw(torch.cat([x_w * torch.cos(theta_w), x_w * torch.sin(theta_w)], dim=1))
        th = x_h[:, 0::2] + x_h[:, 1::2]
        tw = x_w[:, 0::2] + x_w[:, 1::2]
        h = self.act_h(self.norm_h(self.tfc_h(x_h)) + th / 2.0)
        w = self.act_w(self.norm_w(self.tfc_w(x_w)) + tw / 2.0)
        c_in = self.move_fcc(inp)
        cc = self.act_c(self.norm_c(self.fc_c(c_in)) + c_in)
        a = F.adaptive_avg_pool2d(h + w + cc + inp, 1)
        # reweight output channel 3·k + i → branch i; softmax over the three branches
        a = self.reweight(a).reshape(b, c, 3).permute(2, 0, 1).softmax(dim=0).reshape(3, b, c, 1, 1)
        x = h * a[0] + w * a[1] + cc * a[2] + inp
        x_in = self.move_proj(x)
        return self.act_proj(self.norm_proj(self.proj(x_in)) + x_in)


class WaveBlock(nn.Module):
    """Multi-branch binary MLP block (MindSpore ``WaveBlock``; drop path rate 0)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = PATM(dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.move_h = LearnableBias(dim)
        self.move_w = LearnableBias(dim)
        self.sfc_h = XnorMConv2d(dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.sfc_w = XnorMConv2d(dim, dim, (7, 1), padding=(3, 0), groups=dim)
        self.act1 = RPReLU(dim)
        self.act2 = RPReLU(dim)
        self.norm_h = nn.BatchNorm2d(dim)
        self.norm_w = nn.BatchNorm2d(dim)
        self.weight = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        mid = self.norm2(x)
        a = self.mlp(mid)
        mid_h = self.move_h(mid)
        mid_w = self.move_w(mid)
        b = self.act1(self.norm_h(self.sfc_h(mid_h)) + mid_h)
        c = self.act2(self.norm_w(self.sfc_w(mid_w)) + mid_w)
        return x + (self.weight[0] * b + self.weight[1] * c + (1 - self.weight[0] - self.weight[1]) * a)


class PatchEmbedOverlapping(nn.Module):
    """Stem: real conv 7×7, stride 4, pad 2, bias → Norm → RPReLU."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, 7, stride=4, padding=2, bias=True)
        self.norm = norm_layer(embed_dim)
        self.act = RPReLU(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


def same_pool_pads(size: int, kernel: int, stride: int = 2) -> tuple[int, int]:
    """MindSpore/TF "same" padding (before, after) along one axis: out = ⌈size/stride⌉,
    total = max((out − 1)·stride + kernel − size, 0), before = ⌊total/2⌋."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Downsample(nn.Module):
    """Real conv1×1 (bias) → Norm → RPReLU → mean of max-pools k = 2, 3, 5, 7 (stride 2, "same", −∞ pad)."""

    KERNELS = (2, 3, 5, 7)

    def __init__(self, in_dim: int, out_dim: int, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 1, bias=True)
        self.norm = norm_layer(out_dim)
        self.act = RPReLU(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.proj(x)))
        h, w = x.shape[2], x.shape[3]
        acc = None
        for k in self.KERNELS:
            (t, bot), (le, r) = same_pool_pads(h, k), same_pool_pads(w, k)
            p = F.max_pool2d(F.pad(x, (le, r, t, bot), value=float("-inf")), k, 2)
            acc = p if acc is None else acc + p
        return acc / 4.0


def _group_norm(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, dim)  # MindSpore nn.GroupNorm default eps 1e-5 (= PyTorch's)


class BiMLP(nn.Module):
    def __init__(self, layers, embed_dims=(64, 128, 320, 512), mlp_ratios=(4, 4, 4, 4), norm_layer=nn.BatchNorm2d,
                 num_classes: int = 1000):
        super().__init__()
        self.patch_embed = PatchEmbedOverlapping(3, embed_dims[0], norm_layer)
        network = []
        for i, n in enumerate(layers):
            network.append(nn.Sequential(*[WaveBlock(embed_dims[i], mlp_ratios[i], norm_layer) for _ in range(n)]))
            if i < len(layers) - 1:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], norm_layer))
        self.network = nn.ModuleList(network)
        self.norm = norm_layer(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.network:
            x = stage(x)
        x = F.adaptive_avg_pool2d(self.norm(x), 1).flatten(1)
        return self.head(x)


_MAPPING = ModelMapping(
    notes="MindSpore research/cv/BiMLP Cell names unchanged; BN/GroupNorm gamma/beta/moving_* renamed; "
          "Dense `head` = nn.Linear")
register_mapping("bimlp_s", _MAPPING)
register_mapping("bimlp_m", _MAPPING)


@register("bimlp_s", BIMLP_RECIPE["bimlp_s"])
def bimlp_s(num_classes: int = 1000) -> nn.Module:
    return BiMLP((2, 2, 4, 2), num_classes=num_classes)


@register("bimlp_m", BIMLP_RECIPE["bimlp_m"])
def bimlp_m(num_classes: int = 1000) -> nn.Module:
    return BiMLP((2, 3, 10, 3), norm_layer=_group_norm, num_classes=num_classes)
