"""A network mixing every exportable quantizer exports to the ai.bnnc op set with PyTorch's logits."""

import numpy as np
import pytest
import torch
from torch import nn

import bnnc
from bnnc.activations import Maxout, RPReLU
from bnnc.export import to_onnx
from bnnc.quantizers import NotExportableError
from bnnc.runtimes.reference import OrtReferenceRunner


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        pairs = [("sign", "sign"), ("approx_sign", "magnitude_aware"), ("ede", "ede"), ("rsign", "libra_pb"),
                 ("adabin", "adabin"), ("fda", "fda"), ("sign", "xnor"), ("sign", "rbnn")]
        layers, c = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)], 16
        for i, (aq, wq) in enumerate(pairs):
            out = 16 + 3 * (i % 3)
            layers += [bnnc.nn.BinaryConv2d(c, out, 3, padding=1, input_quantizer=aq, weight_quantizer=wq),
                       nn.BatchNorm2d(out), [Maxout(out), RPReLU(out), nn.PReLU(out)][i % 3]]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), bnnc.nn.BinaryLinear(c * 64, 10, weight_quantizer="xnor"))

    def forward(self, x):
        return self.head(self.features(x))


def test_mixed_quantizer_network_exports_with_pytorch_logits():
    torch.manual_seed(0)
    net = Mixed()
    net.train()
    for m in net.modules():
        if hasattr(m, "on_epoch") and m is not net:
            m.on_epoch(3, 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x = torch.randn(8, 3, 8, 8)
    for _ in range(3):  # a few steps so learned thresholds, α/β and rotations leave their initial values
        loss = torch.nn.functional.cross_entropy(net(x), torch.arange(8) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    model = to_onnx(net, (1, 3, 8, 8))
    xt = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        want = net(xt).numpy()
    got = OrtReferenceRunner(model).run(xt.numpy())
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("aq", ["rbnn", "bimlp"])
def test_rbnn_and_bimlp_activations_export(aq):
    """Since issue #7 every seed method exports (tests/test_export_rbnn_bimlp.py has the details)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), bnnc.nn.BinaryConv2d(4, 4, 1, input_quantizer=aq))
    net.train()
    net(torch.randn(2, 3, 4, 4))
    model = to_onnx(net.eval(), (1, 3, 4, 4))
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        want = net(x).numpy()
    assert np.abs(OrtReferenceRunner(model).run(x.numpy()) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_quantizer_without_a_deploy_mapping_is_a_clear_error_naming_the_layer():
    class Custom(bnnc.quantizers.ActivationQuantizer):
        def forward(self, x):
            return x.sign()

    net = nn.Sequential(nn.Conv2d(3, 4, 1), bnnc.nn.BinaryConv2d(4, 4, 1, input_quantizer=Custom()))
    with pytest.raises(NotExportableError, match="layer '1'"):
        to_onnx(net.eval(), (1, 3, 4, 4))
