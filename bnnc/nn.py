"""Binary layers and quantizers for training (PyTorch) that export into the ``ai.bnnc`` op set.

A quantizer is a small module given to a layer by name or as an object (as in larq). It owns its
forward value, its surrogate gradient, and its deploy mapping (``../shared/spec/deploy.md`` §3):
activation quantizers produce s ∈ {−1, +1} with ``s = +1 ⇔ x ≥ threshold``; weight quantizers produce
``w_b[o] = r_o · s_w`` with s_w = sign(w) (sign(0) = +1).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .ops import export as ops

__all__ = [
    "SignSTE",
    "SignWeight",
    "XnorWeight",
    "BinaryConv2d",
    "get_activation_quantizer",
    "get_weight_quantizer",
    "ACTIVATION_QUANTIZERS",
    "WEIGHT_QUANTIZERS",
]


def _exporting() -> bool:
    return torch.compiler.is_exporting()


def _ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, backward through ``surrogate``."""
    return surrogate + (value - surrogate).detach()


class ActivationQuantizer(nn.Module):
    """Base: ``forward`` gives ±1 (training, with surrogate gradient); ``threshold`` is the deploy
    mapping (s = +1 ⇔ x ≥ threshold)."""

    name = "base"

    def threshold(self, channels: int) -> torch.Tensor:
        return torch.zeros(channels)


class SignSTE(ActivationQuantizer):
    """``sign``: s = +1 if x ≥ 0 else −1; backward is the clipped straight-through estimator
    (∂s/∂x = 1 for |x| ≤ 1, else 0), as in BinaryNet and every seed method's baseline."""

    name = "sign"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        s = ops.sign_binarize(x, t)
        if _exporting() or not torch.is_grad_enabled():
            return s
        return _ste(s, x.clamp(-1.0, 1.0))


class WeightQuantizer(nn.Module):
    """Base: ``forward(w)`` gives the binarized weight r_o·sign(w); ``scale(w)`` gives r (per output
    channel) — the deploy mapping."""

    name = "base"

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """sign(w) with the clipped straight-through gradient; the layer multiplies by ``scale`` after
        the conv, the order in which the export form and the kernels compute (so rounding agrees)."""
        return _ste(ops.weight_sign(w), w.clamp(-1.0, 1.0))


class SignWeight(WeightQuantizer):
    """``sign``: w_b = sign(w), clipped STE, no scale."""

    name = "sign"


class XnorWeight(WeightQuantizer):
    """``xnor``: w_b = α_o·sign(w), α_o = mean |w_o| per output channel (XNOR-Net); the gradient
    flows through α as well as through the clipped STE."""

    name = "xnor"

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().mean(dim=tuple(range(1, w.dim())))


ACTIVATION_QUANTIZERS = {"sign": SignSTE}
WEIGHT_QUANTIZERS = {"sign": SignWeight, "xnor": XnorWeight}


def _resolve(spec, table, kind):
    if spec is None or isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        try:
            return table[spec]()
        except KeyError:
            raise ValueError(f"unknown {kind} quantizer {spec!r}; known: {sorted(table)}") from None
    raise TypeError(f"{kind} quantizer must be a name, a module or None, got {type(spec).__name__}")


def get_activation_quantizer(spec):
    return _resolve(spec, ACTIVATION_QUANTIZERS, "input")


def get_weight_quantizer(spec):
    q = _resolve(spec, WEIGHT_QUANTIZERS, "weight")
    if q is None:
        raise ValueError("a binary layer needs a weight quantizer")
    return q


@contextlib.contextmanager
def frozen_for_export(model: nn.Module):
    """Within the block, binary layers export ±1 weights and their scales as constants
    (so the export form carries s_w and r, not the latent weights and the ops computing r)."""
    layers = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    try:
        for m in layers:
            with torch.no_grad():
                w = m.weight.detach()
                m._export_params = (ops.weight_sign(w).clone(), m.weight_quantizer.scale(w).detach().clone())
        yield model
    finally:
        for m in layers:
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
        if self.padding_mode != "zeros":
            raise ValueError("BinaryConv2d supports zero padding only")
        self.input_quantizer = get_activation_quantizer(input_quantizer)
        self.weight_quantizer = get_weight_quantizer(weight_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight
        if _exporting():
            frozen = getattr(self, "_export_params", None)
            if frozen is None:
                raise RuntimeError("export BinaryConv2d through bnnc.export(), which freezes its weight scales")
            ws, scale = frozen
            return ops.binary_conv2d(x, ws, scale, list(self.stride), list(self.padding), list(self.dilation),
                                     self.groups)
        y = nn.functional.conv2d(x, self.weight_quantizer(w), None, self.stride, self.padding, self.dilation,
                                 self.groups)
        return y * self.weight_quantizer.scale(w).reshape(1, -1, 1, 1)
