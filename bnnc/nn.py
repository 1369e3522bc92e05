"""Binary layers for training (PyTorch) that export into the ``ai.bnnc`` op set.

Quantizers live in :mod:`bnnc.quantizers` and are handed to layers by name or as objects.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .ops import export as ops
from .quantizers import (ACTIVATION_QUANTIZERS, WEIGHT_QUANTIZERS, ActivationQuantizer, NotExportableError, SignSTE,
                         SignWeight, WeightQuantizer, XnorWeight, get_activation_quantizer, get_weight_quantizer)

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "frozen_for_export",
    "SignSTE",
    "SignWeight",
    "XnorWeight",
    "ActivationQuantizer",
    "WeightQuantizer",
    "ACTIVATION_QUANTIZERS",
    "WEIGHT_QUANTIZERS",
    "get_activation_quantizer",
    "get_weight_quantizer",
]


@contextlib.contextmanager
def frozen_for_export(model: nn.Module):
    """Within the block, binary layers export ±1 weights and their scales as constants
    (so the export form carries s_w and r, not the latent weights and the ops computing r)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryConv2d)]
    try:
        for name, m in layers:
            act = None
            if m.input_quantizer is not None:
                try:
                    d = m.input_quantizer.deploy(m.in_channels)
                except NotExportableError as e:
                    raise NotExportableError(f"layer {name!r}: input quantizer {type(m.input_quantizer).__name__}: {e}") from None
                act = tuple(v.detach().float().reshape(-1).clone() for v in (d.threshold, d.p, d.q))
            m._export_params = (act, *m.weight_quantizer.deploy(m.weight))
        yield model
    finally:
        for _, m in layers:
            m._export_params = None


class BinaryConv2d(nn.Conv2d):
    """A conv whose input and weights are binarized before an ordinary zero-padded convolution.

    Padding is applied after binarization (padded positions are 0), as in every reference code.
    ``input_quantizer=None`` keeps activations real (1-bit weights, 32-bit activations).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, input_quantizer="sign", weight_quantizer="sign"):
        if bias:
            raise ValueError("BinaryConv2d(bias=True) is not supported yet: fold the bias into the BatchNorm that follows")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        if isinstance(self.padding, str):
            raise ValueError("BinaryConv2d needs explicit integer padding, not a padding mode string")
        self.input_quantizer = get_activation_quantizer(input_quantizer)
        self.weight_quantizer = get_weight_quantizer(weight_quantizer)
        self._export_params = None

    def _conv(self, x, w):
        return nn.functional.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            if self._export_params is None:
                raise RuntimeError("export BinaryConv2d through bnnc.export(), which freezes its quantizers")
            act, ws, scale, offset = self._export_params
            if act is not None:
                x = ops.affine_sign(x, *act)
            return ops.binary_conv2d(x, ws, scale, offset, list(self.stride), list(self.padding),
                                     list(self.dilation), self.groups)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        s, r, t = self.weight_quantizer(self.weight)
        y = self._conv(x, s)
        if r is not None:
            y = y * r.reshape(1, -1, 1, 1)
        if t is not None:  # Σ over the valid window of the inputs, the same for every output channel
            ones = torch.ones_like(s) if self.groups > 1 else torch.ones_like(s[:1])
            y = y + self._conv(x, ones) * t.reshape(1, -1, 1, 1)
        return y


class BinaryLinear(nn.Linear):
    """A fully connected layer on binarized inputs and weights (``input_quantizer=None``: real inputs).

    It computes, and exports as, a 1×1 ``BinaryConv2d`` on [N, C, 1, 1], so dense layers share the
    packed conv kernels: y = (Σ_c s_w·a_b)·r + (Σ_c a_b)·t.
    """

    def __init__(self, in_features, out_features, bias=False, input_quantizer="sign", weight_quantizer="sign"):
        if bias:
            raise ValueError("BinaryLinear(bias=True) is not supported yet: fold the bias into the BatchNorm that follows")
        super().__init__(in_features, out_features, bias=False)
        self.conv = BinaryConv2d(in_features, out_features, 1, input_quantizer=input_quantizer,
                                 weight_quantizer=weight_quantizer)
        del self.weight
        self.register_parameter("weight", None)

    @property
    def input_quantizer(self):
        return self.conv.input_quantizer

    @property
    def weight_quantizer(self):
        return self.conv.weight_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"BinaryLinear expects [N, {self.in_features}] input, got {list(x.shape)}")
        return self.conv(x.reshape(x.shape[0], x.shape[1], 1, 1)).reshape(x.shape[0], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"
