"""Learnable per-channel nonlinearities of the seed BNN methods (``../shared/spec/methods.md``).

All act on axis 1 (channels) of an input of any rank ≥ 2 ([N, C] or [N, C, H, W]).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Maxout", "LearnableBias", "RPReLU"]


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


class Maxout(nn.Module):
    """AdaBin "Maxout" (methods.md §1.3): f(x) = p_c·ReLU(x) − q_c·ReLU(−x) per channel c,
    learnable ``pos_scale`` p (init 1.0) and ``neg_scale`` q (init 0.25), each of shape (C,) as in the
    PyTorch reference (MindSpore stores (1, C, 1, 1): squeeze when importing).
    Equivalently PReLU with a learnable positive slope: f(x) = p·x for x ≥ 0, q·x for x < 0."""

    def __init__(self, channels: int, pos_init: float = 1.0, neg_init: float = 0.25):
        super().__init__()
        self.channels = channels
        self.pos_scale = nn.Parameter(torch.full((channels,), float(pos_init)))
        self.neg_scale = nn.Parameter(torch.full((channels,), float(neg_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_view(self.pos_scale, x) * torch.relu(x) - _channel_view(self.neg_scale, x) * torch.relu(-x)

    def extra_repr(self) -> str:
        return f"{self.channels}"


class LearnableBias(nn.Module):
    """ReActNet/BiMLP "move" (methods.md §4.1, §7.2): f(x) = x + b_c, learnable ``bias`` b of shape
    (1, C, 1, 1) (the reference's shape, so checkpoints load unchanged), init 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _channel_view(self.bias, x)

    def extra_repr(self) -> str:
        return f"{self.channels}"


class RPReLU(nn.Module):
    """ReActNet RPReLU (methods.md §4.1): f(x) = PReLU_c(x + b1_c) + b2_c, i.e. with γ = −b1, ζ = b2:

        f(x) = x − γ + ζ        for x > γ
        f(x) = β_c·(x − γ) + ζ  otherwise   (β = per-channel PReLU slope, init 0.25; b1, b2 init 0).

    Submodules ``bias1`` (LearnableBias), ``prelu`` (nn.PReLU, ``weight`` of shape (C,)), ``bias2``
    (LearnableBias), as in lucifer443/BinaryNeuralNetwork's ``RPReLU``."""

    def __init__(self, channels: int, slope_init: float = 0.25):
        super().__init__()
        self.channels = channels
        self.bias1 = LearnableBias(channels)
        self.prelu = nn.PReLU(channels, init=slope_init)
        self.bias2 = LearnableBias(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias2(self.prelu(self.bias1(x)))

    def extra_repr(self) -> str:
        return f"{self.channels}"
