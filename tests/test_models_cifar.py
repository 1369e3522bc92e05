"""The CIFAR-10 zoo (IR-Net, RBNN, FDA-BNN, AdaBin ResNet-18): shapes, gradients, parameter counts derived in
closed form from the architectures of methods.md §1.5, §2.3, §3.3, §6.4, forwards against functional
re-computations from the state dict, recipes against the published numbers, and the export form on the
reference runtime against PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnc import models
from bnnc.export import to_onnx
from bnnc.runtimes.reference import OrtReferenceRunner

IRNET = ["irnet_resnet20", "irnet_resnet20_1w32a", "irnet_resnet18", "irnet_vgg_small"]
RBNN = ["rbnn_resnet20_1w1a", "rbnn_resnet20_bireal_1w1a", "rbnn_resnet18_1w1a", "rbnn_vgg_small_1w1a"]
OTHERS = ["fda_resnet20", "adabin_resnet18_cifar"]
ALL = IRNET + RBNN + OTHERS
EXPORTABLE = IRNET + OTHERS
FAST_EXPORT = ["irnet_resnet20", "irnet_resnet20_1w32a", "fda_resnet20"]

# published top-1 (methods.md §9) and where it is from
PUBLISHED = {
    "irnet_resnet20": 86.5, "irnet_resnet20_1w32a": 90.8, "irnet_resnet18": 91.5, "irnet_vgg_small": 90.4,
    "rbnn_resnet20_1w1a": 86.5, "rbnn_resnet20_bireal_1w1a": 87.8, "rbnn_resnet18_1w1a": 92.2,
    "rbnn_vgg_small_1w1a": 91.3, "fda_resnet20": 86.61, "adabin_resnet18_cifar": 62.1,
}


# ------------------------------------------------------------------------------------ closed-form counts


def conv(cin, cout, k):
    return cin * cout * k * k


def bn(c):
    return 2 * c


def linear(i, o):
    return i * o + o


def resnet_params(num_blocks, widths, *, shortcut, conv_extra=lambda cout: 0, block_extra=lambda planes: 0,
                  stem_extra=0, head_bn=True, classes=10):
    """Parameters of a CIFAR ResNet: stem conv3×3 + BN, two 3×3 convs + two BNs per block, a 1×1 conv + BN per
    downsampling block when ``shortcut`` is "real"/"binary" (option A has none), head BN1d + Linear.
    ``conv_extra(cout)``: quantizer parameters per binary conv; ``block_extra(planes)``: nonlinearities."""
    total = conv(3, widths[0], 3) + bn(widths[0]) + stem_extra
    cin = widths[0]
    for i, (n, planes) in enumerate(zip(num_blocks, widths)):
        for j in range(n):
            total += conv(cin, planes, 3) + conv(planes, planes, 3) + 2 * bn(planes) + 2 * conv_extra(planes)
            total += block_extra(planes)
            if (i > 0 and j == 0) and shortcut in ("real", "binary"):
                total += conv(cin, planes, 1) + bn(planes)
                if shortcut == "binary":
                    total += conv_extra(planes)
            cin = planes
    return total + (bn(cin) if head_bn else 0) + linear(cin, classes)


def vgg_small_params(conv_extra=lambda cout: 0, classes=10):
    chans = [3, 128, 128, 256, 256, 512, 512]
    total = sum(conv(a, b, 3) + bn(b) for a, b in zip(chans[:-1], chans[1:]))
    return total + sum(conv_extra(c) for c in chans[2:]) + linear(512 * 4 * 4, classes)


R20 = ((3, 3, 3), (16, 32, 64))
R18 = ((2, 2, 2, 2), (64, 128, 256, 512))
rbnn_extra = lambda cout: 2 * cout  # noqa: E731  alpha (Cout,1,1) + rotate (Cout,1,1,1)

EXPECTED_PARAMS = {
    "irnet_resnet20": resnet_params(*R20, shortcut="A"),
    "irnet_resnet20_1w32a": resnet_params(*R20, shortcut="A"),
    "irnet_resnet18": resnet_params(*R18, shortcut="real"),
    "irnet_vgg_small": vgg_small_params(),
    "rbnn_resnet20_1w1a": resnet_params(*R20, shortcut="A", conv_extra=rbnn_extra),
    "rbnn_resnet20_bireal_1w1a": resnet_params(*R20, shortcut="A", conv_extra=rbnn_extra),
    "rbnn_resnet18_1w1a": resnet_params(*R18, shortcut="binary", conv_extra=rbnn_extra),
    "rbnn_vgg_small_1w1a": vgg_small_params(conv_extra=rbnn_extra),
    # one shared PReLU slope per conv (2 per block), no head BN; the noise modules are sized at the first forward
    "fda_resnet20": resnet_params(*R20, shortcut="A", block_extra=lambda p: 2, head_bn=False),
    # alpha_a, beta_a per binary conv; two Maxouts (pos/neg scale per channel) per block and one on the stem
    "adabin_resnet18_cifar": resnet_params(*R18, shortcut="real", conv_extra=lambda c: 2,
                                           block_extra=lambda p: 2 * 2 * p, stem_extra=2 * 64),
}


def test_closed_form_counts_match_published_and_hand_counts():
    # the reference resnet.py header: "ResNet20 | 20 | 0.27M"; the well-known CIFAR ResNet-18 (conv1×1 + BN
    # downsampling, Linear 512→10) has 11 173 962 parameters, + 1 024 for the BN1d(512) head of IR-Net/RBNN
    assert EXPECTED_PARAMS["irnet_resnet20"] == 269_850
    assert round(EXPECTED_PARAMS["irnet_resnet20"] / 1e6, 2) == 0.27
    assert EXPECTED_PARAMS["irnet_resnet18"] == 11_173_962 + 1_024
    # VGG-small by hand: convs 3456 + 147456 + 294912 + 589824 + 1179648 + 2359296, BNs 2·(128+128+256+256+512+512),
    # fc 8192·10 + 10
    assert EXPECTED_PARAMS["irnet_vgg_small"] == 3456 + 147456 + 294912 + 589824 + 1179648 + 2359296 + 3584 + 81930


# ------------------------------------------------------------------------------------------- per model


@pytest.mark.parametrize("name", ALL)
def test_builds_forward_backward_and_parameter_count(name):
    torch.manual_seed(0)
    net = models.create(name)
    assert sum(p.numel() for p in net.parameters()) == EXPECTED_PARAMS[name]
    net.train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 10)
    (y * torch.randn(2, 10)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # every trainable parameter used in the forward receives a gradient (the stem conv and the classifier too)
    assert net.get_submodule("fc" if "vgg" in name else "linear").weight.grad.abs().sum() > 0
    stem = net.get_submodule("conv0" if "vgg" in name else "conv1")
    assert stem.weight.grad is not None and torch.isfinite(stem.weight.grad).all()


@pytest.mark.parametrize("name", ["irnet_resnet20", "rbnn_vgg_small_1w1a", "fda_resnet20", "adabin_resnet18_cifar"])
def test_num_classes(name):
    net = models.create(name, num_classes=100).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", ALL)
def test_recipe(name):
    r = models.get_recipe(name)
    assert r.dataset == "cifar10" and r.input_shape == (1, 3, 32, 32) and r.optimizer == "sgd"
    assert r.extra["published_top1"] == PUBLISHED[name]
    assert f"{PUBLISHED[name]}" in r.source
    family = name.split("_")[0]
    # methods.md §1.7, §2.4, §3.4, §6.3
    want = {"irnet": (400, 128, 0.1, 1e-4), "rbnn": (1000, 256, 0.1, 1e-4), "fda": (400, 128, 0.1, 1e-4),
            "adabin": (400, 128, 0.1, 1e-4)}[family]
    if name == "irnet_vgg_small":
        want = (300, 128, 0.007, 1e-4)
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay) == want


def test_rbnn_rotation_shapes_follow_get_ab():
    """methods.md §6.1: 144→12×12, 288→16×18, 576→24×24, 1152→32×36, 2304→48×48, 4608→64×72;
    1×1 shortcuts 64→8×8, 128→8×16, 256→16×16."""
    table = {144: (12, 12), 288: (16, 18), 576: (24, 24), 1152: (32, 36), 2304: (48, 48), 4608: (64, 72),
             64: (8, 8), 128: (8, 16), 256: (16, 16)}
    seen = set()
    for name in ("rbnn_resnet20_1w1a", "rbnn_resnet18_1w1a", "rbnn_vgg_small_1w1a"):
        net = models.create(name)
        for mod_name, m in net.named_modules():
            q = getattr(m, "weight_quantizer", None)
            if q is None:
                continue
            n = m.weight[0].numel()
            a, b = table[n]
            seen.add(n)
            assert q.R1.shape == (a, a) and q.R2.shape == (b, b), mod_name
            assert torch.allclose(q.R1 @ q.R1.t(), torch.eye(a), atol=1e-5)
            assert q.alpha.shape == (m.out_channels, 1, 1) and q.rotate.shape == (m.out_channels, 1, 1, 1)
            assert torch.allclose(q.alpha.reshape(-1), m.weight.detach().abs().mean((1, 2, 3)))
            assert torch.allclose(q.rotate, torch.full_like(q.rotate, math.pi / 2))
    assert seen == set(table)


def test_rbnn20_init_bn_weights_are_1e_minus_8():
    net = models.create("rbnn_resnet20_1w1a")
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 18
    assert all(torch.all(m.weight == 1e-8) and torch.all(m.bias == 0) for m in bns)
    assert torch.all(net.bn2.weight == 1)  # BN1d keeps PyTorch's init


# ------------------------------------------------------------------- forwards against functional re-computation


def _randomize(net, seed=0):
    """BatchNorm running statistics from a training-mode pass (so activations keep a realistic scale), then
    random BN affine parameters and PReLU slopes, so the eval forward exercises every term."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None  # cumulative average: the running stats become this batch's statistics
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 32, 32, generator=g))
        for m in bns:
            m.momentum = 0.1
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
        for m in net.modules():
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g))
    return net.eval()


def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _libra_pb(w):
    c = w - w.mean((1, 2, 3), keepdim=True)
    wh = c / c.flatten(1).std(1).view(-1, 1, 1, 1)
    s = 2.0 ** torch.round(torch.log2(wh.abs().mean((1, 2, 3)))).view(-1, 1, 1, 1)
    return torch.sign(wh) * s


def _rbnn_conv(sd, p, x, stride, padding):
    xa = x - x.mean((1, 2, 3), keepdim=True)
    xa = xa / xa.flatten(1).std(1).view(-1, 1, 1, 1)
    w = sd[p + ".weight"]
    o = w.shape[0]
    c = w.flatten(1) - w.flatten(1).mean(1, keepdim=True)
    wt = c / c.std(1, keepdim=True)
    r1, r2 = sd[p + ".weight_quantizer.R1"], sd[p + ".weight_quantizer.R2"]
    xw = wt.view(o, r1.shape[0], r2.shape[0])
    rot = (r1.t() @ xw @ r2).reshape(o, -1)
    w3 = wt + torch.sin(sd[p + ".weight_quantizer.rotate"]).abs().view(o, 1) * (rot - wt)
    y = F.conv2d(torch.sign(xa), torch.sign(w3).view_as(w), None, stride, padding)
    return y * sd[p + ".weight_quantizer.alpha"].view(1, o, 1, 1)


def _ref_resnet(sd, x, *, kind, bireal, stem_act, act, head_act, widths, shortcut):
    """IR-Net / RBNN CIFAR ResNets written out from methods.md §3.3 / §6.4 in functional ops on the state dict."""

    def bconv(p, h, stride, padding=1):
        if kind == "rbnn":
            return _rbnn_conv(sd, p, h, stride, padding)
        hb = torch.sign(h) if kind == "ir" else h
        return F.conv2d(hb, _libra_pb(sd[p + ".weight"]), None, stride, padding)

    out = _bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], None, 1, 1))
    out = stem_act(out) if stem_act else out
    layer = 1
    while f"layer{layer}.0.conv1.weight" in sd:
        j = 0
        while f"layer{layer}.{j}.conv1.weight" in sd:
            p = f"layer{layer}.{j}"
            stride = 2 if layer > 1 and j == 0 else 1
            planes = widths[layer - 1]
            if stride == 1:
                sc = out
            elif shortcut == "A":
                sc = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            elif shortcut == "real":
                sc = _bn(sd, p + ".shortcut.1", F.conv2d(out, sd[p + ".shortcut.0.weight"], None, 2))
            else:
                sc = _bn(sd, p + ".shortcut.1", bconv(p + ".shortcut.0", out, 2, 0))
            if bireal:
                h = act(_bn(sd, p + ".bn1", bconv(p + ".conv1", out, stride)) + sc)
                out = act(_bn(sd, p + ".bn2", bconv(p + ".conv2", h, 1)) + h)
            else:
                h = act(_bn(sd, p + ".bn1", bconv(p + ".conv1", out, stride)))
                out = act(_bn(sd, p + ".bn2", bconv(p + ".conv2", h, 1)) + sc)
            j += 1
        layer += 1
    out = _bn(sd, "bn2", F.avg_pool2d(out, out.shape[3]).flatten(1))
    out = head_act(out) if head_act else out
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def _ref_vgg(sd, x, kind):
    def bconv(p, h):
        if kind == "rbnn":
            return _rbnn_conv(sd, p, h, 1, 1)
        return F.conv2d(torch.sign(h), _libra_pb(sd[p + ".weight"]), None, 1, 1)

    ht = F.hardtanh
    x = ht(_bn(sd, "bn0", F.conv2d(x, sd["conv0.weight"], None, 1, 1)))
    x = ht(_bn(sd, "bn1", F.max_pool2d(bconv("conv1", x), 2)))
    x = ht(_bn(sd, "bn2", bconv("conv2", x)))
    x = ht(_bn(sd, "bn3", F.max_pool2d(bconv("conv3", x), 2)))
    x = ht(_bn(sd, "bn4", bconv("conv4", x)))
    x = ht(_bn(sd, "bn5", F.max_pool2d(bconv("conv5", x), 2)))
    return F.linear(x.flatten(1), sd["fc.weight"], sd["fc.bias"])


REFS = {
    "irnet_resnet20": dict(kind="ir", bireal=True, stem_act=F.hardtanh, act=F.hardtanh, head_act=None,
                           widths=R20[1], shortcut="A"),
    "irnet_resnet20_1w32a": dict(kind="ir32", bireal=False, stem_act=None, act=F.relu, head_act=F.relu,
                                 widths=R20[1], shortcut="A"),
    "irnet_resnet18": dict(kind="ir", bireal=False, stem_act=None, act=F.hardtanh, head_act=None, widths=R18[1],
                           shortcut="real"),
    "rbnn_resnet20_1w1a": dict(kind="rbnn", bireal=False, stem_act=F.hardtanh, act=F.hardtanh, head_act=None,
                               widths=R20[1], shortcut="A"),
    "rbnn_resnet20_bireal_1w1a": dict(kind="rbnn", bireal=True, stem_act=F.hardtanh, act=F.hardtanh, head_act=None,
                                      widths=R20[1], shortcut="A"),
    "rbnn_resnet18_1w1a": dict(kind="rbnn", bireal=False, stem_act=None, act=F.hardtanh, head_act=None,
                               widths=R18[1], shortcut="binary"),
}


@pytest.mark.parametrize("name", list(REFS) + ["irnet_vgg_small", "rbnn_vgg_small_1w1a"])
def test_eval_forward_equals_functional_reference(name):
    torch.manual_seed(1)
    net = _randomize(models.create(name))
    sd = {k: v.double() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = net.double()(x.double())
        if "vgg" in name:
            want = _ref_vgg(sd, x.double(), "rbnn" if name.startswith("rbnn") else "ir")
        else:
            want = _ref_resnet(sd, x.double(), **REFS[name])
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9), (got - want).abs().max()


# ------------------------------------------------------------------------------------------------ export


def _check_export(name):
    torch.manual_seed(2)
    net = _randomize(models.create(name))
    model = to_onnx(net, (1, 3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = net(x).numpy()
    got = OrtReferenceRunner(model).run(x.numpy())
    assert got.shape == (3, 10)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
    assert {n.op_type for n in model.graph.node if n.domain == "ai.bnnc"} >= {"BinaryConv2d"}


@pytest.mark.parametrize("name", FAST_EXPORT)
def test_export_matches_pytorch_on_reference_runtime(name):
    _check_export(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_all_exportable_models(name):
    _check_export(name)


@pytest.mark.parametrize("name,layer", [("rbnn_resnet20_1w1a", "layer1.0.conv1"), ("rbnn_vgg_small_1w1a", "conv1")])
def test_rbnn_models_export_with_the_per_sample_mean_threshold(name, layer):
    """RBNN binarizes x − mean over (C, H, W) per sample: ReduceMean → Sub → SignBinarize(T = 0) per binary
    conv (issue #7; export vs PyTorch and deploy: tests/test_export_rbnn_bimlp.py)."""
    net = models.create(name)
    model = to_onnx(net, (1, 3, 32, 32))
    convs = [n for n in model.graph.node if n.op_type == "BinaryConv2d"]
    assert convs[0].name == layer
    assert sum(n.op_type == "ReduceMean" for n in model.graph.node) >= len(convs)


def test_fda_noise_modules_size_at_the_first_training_forward():
    """§2.1–2.2: per binary conv an activation noise module over channels (d = Cin) and a weight one over
    each output channel's weights (d = Cin·9), each W1 (d/64 × d) + W2 (d × d/64) with d/64 at least 1."""

    def noise(d):
        return 2 * d * max(d // 64, 1)

    cins = [16] * 7 + [32] * 6 + [64] * 5  # inputs of the 18 binary convs (conv1 of stages 2, 3 see 16, 32)
    want = sum(noise(c) + noise(9 * c) for c in cins)
    assert want == 70_944
    net = models.create("fda_resnet20").train()
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert sum(p.numel() for p in net.parameters()) == EXPECTED_PARAMS["fda_resnet20"] + want
