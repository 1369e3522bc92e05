"""Quantizers: small modules handed to binary layers by name or as objects (as in larq).

A quantizer owns three things: its forward value, its surrogate gradient, and its deploy mapping onto
an affine image of ±1 (``../shared/spec/deploy.md`` §3).

Activation quantizers (``ActivationQuantizer``):
    ``forward(x)`` → a_b = p·s + q with s = +1 ⇔ x ≥ threshold (per channel), surrogate gradient in training.
    ``deploy(channels)`` → ``ActivationDeploy(threshold, p, q)``, each a float tensor of shape [C];
    raises ``NotExportableError`` when the quantizer is not an affine image of a thresholded sign.

Weight quantizers (``WeightQuantizer``):
    ``forward(w)`` → ``(s, r, t)``: s = ±1 tensor shaped like w (sign(0) = +1) carrying the surrogate
    gradient; r and t per output channel [O] (or None for 1 and 0). The binarized weight is
    w_b[o] = r[o]·s[o] + t[o]; the layer computes conv(a, s)·r + conv(a, 1)·t, the order of the kernels.
    ``deploy(w)`` → the same triple, detached, for export.

Both may implement ``on_epoch(epoch, epochs)``: schedules (EDE t/k, …) the trainer calls at the start
of every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import BnncError
from .ops import export as ops

__all__ = [
    "ActivationDeploy",
    "ActivationQuantizer",
    "WeightQuantizer",
    "NotExportableError",
    "SignSTE",
    "SignWeight",
    "XnorWeight",
    "ACTIVATION_QUANTIZERS",
    "WEIGHT_QUANTIZERS",
    "get_activation_quantizer",
    "get_weight_quantizer",
    "ste",
]


class NotExportableError(BnncError):
    """A quantizer whose semantics the ``ai.bnnc`` op set cannot express (yet)."""


@dataclass
class ActivationDeploy:
    threshold: torch.Tensor  # [C]: s = +1 ⇔ x ≥ threshold
    p: torch.Tensor  # [C]
    q: torch.Tensor  # [C]


def ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, backward through ``surrogate``."""
    return surrogate + (value - surrogate).detach()


def _use_plain_forward() -> bool:
    return torch.compiler.is_exporting() or not torch.is_grad_enabled()


class ActivationQuantizer(nn.Module):
    name = "base"

    def deploy(self, channels: int) -> ActivationDeploy:
        raise NotExportableError(f"{type(self).__name__} does not declare a deploy mapping")

    def on_epoch(self, epoch: int, epochs: int) -> None:
        pass


class WeightQuantizer(nn.Module):
    name = "base"

    def deploy(self, w: torch.Tensor):
        with torch.no_grad():
            s, r, t = self.forward(w.detach())
        o = w.shape[0]
        r = torch.ones(o) if r is None else r.detach().reshape(o).clone()
        t = torch.zeros(o) if t is None else t.detach().reshape(o).clone()
        return ops.weight_sign(s).clone(), r, t

    def on_epoch(self, epoch: int, epochs: int) -> None:
        pass


class SignSTE(ActivationQuantizer):
    """``sign``: s = +1 if x ≥ 0 else −1; backward is the clipped straight-through estimator
    (∂s/∂x = 1 for |x| ≤ 1, else 0), as in BinaryNet and every seed method's baseline."""

    name = "sign"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        s = ops.sign_binarize(x, t)
        if _use_plain_forward():
            return s
        return ste(s, x.clamp(-1.0, 1.0))

    def deploy(self, channels: int) -> ActivationDeploy:
        return ActivationDeploy(torch.zeros(channels), torch.ones(channels), torch.zeros(channels))


class SignWeight(WeightQuantizer):
    """``sign``: w_b = sign(w), clipped straight-through gradient, no scale."""

    name = "sign"

    def forward(self, w: torch.Tensor):
        return ste(ops.weight_sign(w), w.clamp(-1.0, 1.0)), None, None


class XnorWeight(WeightQuantizer):
    """``xnor``: w_b = α_o·sign(w), α_o = mean |w_o| per output channel (XNOR-Net); the gradient
    flows through α as well as through the clipped straight-through estimator."""

    name = "xnor"

    def forward(self, w: torch.Tensor):
        alpha = w.abs().mean(dim=tuple(range(1, w.dim())))
        return ste(ops.weight_sign(w), w.clamp(-1.0, 1.0)), alpha, None


ACTIVATION_QUANTIZERS: dict[str, type] = {"sign": SignSTE}
WEIGHT_QUANTIZERS: dict[str, type] = {"sign": SignWeight, "xnor": XnorWeight}


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
