"""Quantizers and binary layers: forward values and gradients against closed forms."""

import pytest
import torch

import bnnc
from bnnc.nn import BinaryConv2d, SignSTE, XnorWeight


def test_sign_ste_forward_and_clipped_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    s = SignSTE()(x.view(1, -1))
    assert s.tolist() == [[-1, -1, -1, 1, 1, 1, 1]]
    s.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]  # 1 for |x| ≤ 1, the edges included


def test_xnor_weight_scale_and_gradient():
    w = torch.tensor([[0.5, -1.5, 0.25, 0.0]], requires_grad=True)
    q = XnorWeight()
    alpha = q(w)[1]
    assert torch.allclose(alpha, torch.tensor([0.5625]))
    s, r, _ = q(w)
    (s * r.reshape(-1, 1)).sum().backward()
    # d/dw [α·Σ sign(w)] = α·1_{|w|≤1} (STE) + Σ sign(w) · ∂|w|/∂w / n (through α = mean|w|);
    # sign(0) = +1 in the forward, while ∂|w|/∂w = 0 at w = 0
    sgn = torch.tensor([1.0, -1.0, 1.0, 1.0])
    dabs = torch.tensor([1.0, -1.0, 1.0, 0.0])
    expected = 0.5625 * torch.tensor([1.0, 0.0, 1.0, 1.0]) + sgn.sum() * dabs / 4
    assert torch.allclose(w.grad[0], expected)


def test_binary_conv_equals_float_conv_of_binarized_tensors(rng):
    conv = BinaryConv2d(5, 7, 3, stride=2, padding=1, weight_quantizer="xnor")
    x = torch.tensor(rng.standard_normal((2, 5, 9, 9)), dtype=torch.float32)
    w = conv.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3))
    ref = torch.nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1),
                                     stride=2, padding=1)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="unknown input quantizer"):
        BinaryConv2d(3, 4, 3, input_quantizer="nope")
    with pytest.raises(ValueError, match="bias"):
        BinaryConv2d(3, 4, 3, bias=True)
    with pytest.raises(ValueError, match="unknown model"):
        bnnc.models.create("resnet9000")
    assert "fmnist_bnn" in bnnc.models.names()


def test_binary_linear_equals_dense_on_binarized_tensors(rng):
    lin = bnnc.nn.BinaryLinear(37, 5, weight_quantizer="xnor")
    x = torch.tensor(rng.standard_normal((4, 37)), dtype=torch.float32)
    w = lin.conv.weight.detach().reshape(5, 37)
    ref = torch.where(x >= 0, 1.0, -1.0) @ (torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)).T
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        lin(torch.zeros(2, 37, 1))
