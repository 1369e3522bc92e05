"""Binary layers for training (PyTorch) that export into the ``ai.bnnc`` op set.

Quantizers live in :mod:`bnnc.quantizers` and are handed to layers by name or as objects.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .ops import export as ops
from .quantizers import (ACTIVATION_QUANTIZERS, WEIGHT_QUANTIZERS, ActivationQuantizer, NotExportableError, SignSTE,
                         SignWeight, WeightQuantizer, XnorWeight, center_per_sample, get_activation_quantizer,
                         get_weight_quantizer)

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
                act = (d.terms(), bool(d.center))
            ws, scale, offset = m.weight_quantizer.deploy(m.weight)
            m._export_params = (_export_plan(act, scale, offset), ws, scale, offset)
        yield model
    finally:
        for _, m in layers:
            m._export_params = None


def _export_plan(act, scale: torch.Tensor, offset: torch.Tensor):
    """None (real activations) or (terms, center, summed_scale) for ``BinaryConv2d._export_forward``, decided
    before tracing. ``summed_scale`` = p·r when the activation has several terms sharing one level p with
    q = 0 and the weights have no offset (their ±1 convs are summed, then scaled once), else None."""
    if act is None:
        return None
    terms, center = act
    summed = None
    if len(terms) > 1:
        p0 = float(terms[0][1].reshape(-1)[0])
        if all(bool((p == p0).all()) and not bool(q.any()) for _, p, q in terms) and not bool(offset.any()):
            summed = (scale.detach().float() * p0).reshape(1, -1, 1, 1).clone()
    return terms, center, summed


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
            return self._export_forward(x, *self._export_params)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        s, r, t = self.weight_quantizer(self.weight)
        if torch.is_grad_enabled():
            # Training: one conv with W_b = s·r + t, the reference codes' form. The same values and
            # gradients as the deploy form below up to float rounding, at the cost of one conv: the scale
            # and offset are applied to the small weight tensor, not to the activations (issue #7).
            view = (-1,) + (1,) * (s.dim() - 1)
            w = s if r is None else s * r.reshape(view)
            return self._conv(x, w if t is None else w + t.reshape(view))
        # Without gradients (eval, checking against the export form): the deploy form's arithmetic,
        # conv(a, s)·r + conv(a, 1)·t, so PyTorch's values match the ai.bnnc BinaryConv2d op bit for bit.
        y = self._conv(x, s)
        if r is not None:
            y = y * r.reshape(1, -1, 1, 1)
        if t is not None:  # Σ over the valid window of the inputs, the same for every output channel
            ones = torch.ones_like(s) if self.groups > 1 else torch.ones_like(s[:1])
            y = y + self._conv(x, ones) * t.reshape(1, -1, 1, 1)
        return y

    def _export_forward(self, x, act, ws, scale, offset):
        """The export form (docs/ops.md): [center →] SignBinarize → BinaryConv2d, one per activation term.

        Several terms (BiMLP's ternary a = ½·s₁ + ½·s₂) become binary convs sharing the weights, summed:
        conv(Σ_k p·s_k, W)·r = (Σ_k conv(s_k, sign W))·(p·r). With one level p shared by all terms and
        channels, q = 0 and no weight offset, each conv keeps plain ±1 activations (R = 1, B = 0, lowered to
        XNOR-popcount) and the integer sum is scaled once: the same float32 rounding as PyTorch's conv on the
        levels times r. Otherwise each term is an ordinary affine binary conv and the outputs are added."""
        geometry = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        if act is None:
            return ops.binary_conv2d(x, ws, scale, offset, *geometry)
        terms, center, summed_scale = act
        if center:
            x = center_per_sample(x)
        if len(terms) == 1:
            return ops.binary_conv2d(ops.affine_sign(x, *terms[0]), ws, scale, offset, *geometry)
        if summed_scale is not None:
            ones, zeros = torch.ones_like(scale), torch.zeros_like(offset)
            total = None
            for t, _, _ in terms:
                y = ops.binary_conv2d(ops.sign_binarize(x, t), ws, ones, zeros, *geometry)
                total = y if total is None else total + y
            return total * summed_scale
        total = None
        for t, p, q in terms:
            y = ops.binary_conv2d(ops.affine_sign(x, t, p, q), ws, scale, offset, *geometry)
            total = y if total is None else total + y
        return total


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
