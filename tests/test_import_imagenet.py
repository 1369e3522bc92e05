"""Published ImageNet checkpoints import strictly (methods.md §11): Bi-Real-18 (flattened ``binary_conv.weights``),
ReActNet-18 (``move0`` = RSign bias) and lucifer443's mmcls IR-Net-18 (``backbone.``/``neck.``/``head.``).

Each reference state dict is built here from the spec's key list and shapes, independently of bnnc's module
tree, saved the way the reference saves it, imported through ``bnnc.import_checkpoint``, and checked twice:
every value lands where the spec says, and the imported model computes the reference network's forward
(written below in functional torch ops on the raw file: torch.sign, the reference weight scales)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bnnc
from bnnc.errors import ModelFormatError

WIDTHS = (64, 128, 256, 512)


def blocks(layers):
    """(key prefix, cin, cout, stride) of every block of a 64/128/256/512 ResNet."""
    cin = 64
    for i, (n, cout) in enumerate(zip(layers, WIDTHS)):
        for j in range(n):
            yield f"layer{i + 1}.{j}.", cin, cout, (2 if i > 0 and j == 0 else 1)
            cin = cout


def _binary_weight(g, *shape):
    """Latent weights of a binary conv, none exactly 0: the references binarize with torch.sign (sign(0) = 0)
    and bnnc with sign(0) = +1 (docs/ops.md), so an exact zero is the one place the two may differ."""
    w = 0.01 * torch.randn(*shape, generator=g)
    return torch.where(w.abs() < 1e-6, torch.full_like(w, 1e-6), w)


def _bn(sd, p, c, g):
    sd[p + "weight"] = 0.5 + torch.rand(c, generator=g)
    sd[p + "bias"] = 0.2 * torch.randn(c, generator=g)
    sd[p + "running_mean"] = 0.2 * torch.randn(c, generator=g)
    sd[p + "running_var"] = 0.5 + torch.rand(c, generator=g)
    sd[p + "num_batches_tracked"] = torch.tensor(1234)


def bireal_reference(layers=(4, 4, 4, 4), react=False, seed=0) -> dict:
    """The official Bi-Real (BR birealnet.py) / ReActNet (RA resnet/2_step2/birealnet.py) state dict,
    ``module.`` prefixed: Bi-Real binary convs FLATTENED ``weights`` (Cout·Cin·9, 1); ReActNet 4-D ``weight``
    and ``move0``/``move1``/``prelu``/``move2`` per block."""
    g = torch.Generator().manual_seed(seed)
    sd = {"conv1.weight": 0.1 * torch.randn(64, 3, 7, 7, generator=g)}
    _bn(sd, "bn1.", 64, g)
    for p, cin, cout, stride in blocks(layers):
        if react:
            sd[p + "move0.bias"] = 0.1 * torch.randn(1, cin, 1, 1, generator=g)
            sd[p + "binary_conv.weight"] = _binary_weight(g, cout, cin, 3, 3)
        else:
            sd[p + "binary_conv.weights"] = _binary_weight(g, cout * cin * 9, 1)
        _bn(sd, p + "bn1.", cout, g)
        if react:
            sd[p + "move1.bias"] = 0.1 * torch.randn(1, cout, 1, 1, generator=g)
            sd[p + "prelu.weight"] = 0.25 + 0.1 * torch.rand(cout, generator=g)
            sd[p + "move2.bias"] = 0.1 * torch.randn(1, cout, 1, 1, generator=g)
        if stride != 1 or cin != cout:
            sd[p + "downsample.1.weight"] = 0.1 * torch.randn(cout, cin, 1, 1, generator=g)
            _bn(sd, p + "downsample.2.", cout, g)
    sd["fc.weight"] = 0.05 * torch.randn(1000, 512, generator=g)
    sd["fc.bias"] = 0.05 * torch.randn(1000, generator=g)
    return {"module." + k: v for k, v in sd.items()}


def save_like_reactnet(sd, path):
    """RA/BR train.py: {'epoch', 'state_dict', 'best_top1_acc', 'optimizer'}."""
    torch.save({"epoch": 255, "state_dict": sd, "best_top1_acc": 56.4,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "betas": (0.9, 0.999), "params": [0, 1]}]}},
               path)
    return path


def _bnf(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, 1e-5)


def bireal_reference_forward(sd, x, layers=(4, 4, 4, 4), react=False):
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    x = F.max_pool2d(_bnf(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1."), 3, 2, 1)
    for p, cin, cout, stride in blocks(layers):
        a = torch.sign(x + sd[p + "move0.bias"] if react else x)
        w = sd[p + "binary_conv.weight"] if react else sd[p + "binary_conv.weights"].view(cout, cin, 3, 3)
        wb = w.abs().mean((1, 2, 3), keepdim=True) * torch.sign(w)
        out = _bnf(F.conv2d(a, wb, stride=stride, padding=1), sd, p + "bn1.")
        if stride != 1 or cin != cout:
            res = _bnf(F.conv2d(F.avg_pool2d(x, 2, stride), sd[p + "downsample.1.weight"]), sd, p + "downsample.2.")
        else:
            res = x
        out = out + res
        if react:
            out = F.prelu(out + sd[p + "move1.bias"], sd[p + "prelu.weight"]) + sd[p + "move2.bias"]
        x = out
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


# ------------------------------------------------------------------------------------------------ Bi-Real


def test_bireal18_official_checkpoint_imports_strictly(tmp_path):
    sd = bireal_reference()
    path = save_like_reactnet(sd, tmp_path / "birealnet18.pth.tar")
    net = bnnc.import_checkpoint(path, model="bireal18")
    got = net.state_dict()
    # the flattened weights land reshaped (C order) on the 4-D conv weight; everything else as named
    w = sd["module.layer3.2.binary_conv.weights"]
    assert torch.equal(got["layer3.2.binary_conv.weight"], w.view(256, 256, 3, 3))
    flat = sd["module.layer2.0.binary_conv.weights"].view(-1)  # element (o, i, ky, kx) at ((o·Cin + i)·3 + ky)·3 + kx
    assert torch.equal(net.layer2[0].binary_conv.weight[5, 7], flat[(5 * 64 + 7) * 9:(5 * 64 + 8) * 9].view(3, 3))
    for k, v in sd.items():
        name = k.removeprefix("module.").replace("binary_conv.weights", "binary_conv.weight")
        assert torch.equal(got[name].reshape(v.shape), v), k
    assert len(got) == len(sd)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _close(net(x), bireal_reference_forward(sd, x))


def test_reactnet18_official_checkpoint_imports_strictly(tmp_path):
    sd = bireal_reference(react=True, seed=3)
    net = bnnc.import_checkpoint(save_like_reactnet(sd, tmp_path / "model_best.pth.tar"), model="reactnet18")
    got = net.state_dict()
    for k, v in sd.items():
        name = k.removeprefix("module.").replace("move0.bias", "binary_conv.input_quantizer.bias")
        assert torch.equal(got[name], v), k
    assert len(got) == len(sd)
    # RSign's bias is the exported threshold: x + b ≥ 0 ⇔ x ≥ −b
    assert torch.equal(net.layer4[3].binary_conv.input_quantizer.deploy(512).threshold,
                       -sd["module.layer4.3.move0.bias"].reshape(-1))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _close(net(x), bireal_reference_forward(sd, x, react=True))


def test_wrong_architecture_fails_naming_the_keys(tmp_path):
    path = save_like_reactnet(bireal_reference((6, 8, 12, 6)), tmp_path / "birealnet34.pth.tar")
    with pytest.raises(ModelFormatError) as e:
        bnnc.import_checkpoint(path, model="bireal18")
    msg = str(e.value)
    # 16 extra blocks ([6,8,12,6] − [4,4,4,4]), each binary_conv.weights + 5 bn1 entries
    assert "unexpected in the checkpoint (96)" in msg and "missing from the checkpoint" not in msg
    assert "layer1.4.binary_conv.weights (→ layer1.4.binary_conv.weight)" in msg  # module. is read off first
    assert "layer3.11.bn1.running_var" in msg
    # a ReActNet file is not a Bi-Real one: its RSign biases have no place in Bi-Real-18
    path = save_like_reactnet(bireal_reference(react=True), tmp_path / "react.pth.tar")
    with pytest.raises(ModelFormatError, match=r"unexpected .*layer1\.0\.move0\.bias"):
        bnnc.import_checkpoint(path, model="bireal18")


def test_flattened_weight_of_the_wrong_size_is_a_shape_error(tmp_path):
    sd = bireal_reference()
    sd["module.layer2.1.binary_conv.weights"] = torch.zeros(128 * 64 * 9, 1)
    path = save_like_reactnet(sd, tmp_path / "bad.pth.tar")
    with pytest.raises(ModelFormatError, match=r"layer2\.1\.binary_conv\.weights .*checkpoint shape "
                                               r"\(73728, 1\) vs model \(128, 128, 3, 3\)"):
        bnnc.import_checkpoint(path, model="bireal18")


# ---------------------------------------------------------------------------------- IR-Net-18 (mmcls)


def irnet_mmcls_reference(head_bn: str = "neck.bn.", seed=0) -> dict:
    """lucifer443/BinaryNeuralNetwork ResArch IRNet-18: backbone.{conv1, bn1, layerX.Y.{conv1,bn1,conv2,bn2},
    layerX.0.downsample.{0 (conv1×1/2), 1 (BN)}}, the neck's / IRClsHead's BatchNorm1d(512), head.fc."""
    g = torch.Generator().manual_seed(seed)
    sd = {"backbone.conv1.weight": 0.1 * torch.randn(64, 3, 7, 7, generator=g)}
    _bn(sd, "backbone.bn1.", 64, g)
    for p, cin, cout, stride in blocks((2, 2, 2, 2)):
        p = "backbone." + p
        sd[p + "conv1.weight"] = _binary_weight(g, cout, cin, 3, 3)
        _bn(sd, p + "bn1.", cout, g)
        sd[p + "conv2.weight"] = _binary_weight(g, cout, cout, 3, 3)
        _bn(sd, p + "bn2.", cout, g)
        if stride != 1:
            sd[p + "downsample.0.weight"] = 0.1 * torch.randn(cout, cin, 1, 1, generator=g)
            _bn(sd, p + "downsample.1.", cout, g)
    _bn(sd, head_bn, 512, g)
    sd["head.fc.weight"] = 0.05 * torch.randn(1000, 512, generator=g)
    sd["head.fc.bias"] = 0.05 * torch.randn(1000, generator=g)
    return sd


def irnet_reference_forward(sd, x, head_bn="neck.bn."):
    def libra_pb(w):  # LU IRConv2d.binary_weight: standardise (unbiased std), sign, 2^round(log2 mean|Ŵ|)
        bw = w - w.view(w.size(0), -1).mean(-1).view(-1, 1, 1, 1)
        bw = bw / bw.view(bw.size(0), -1).std(-1).view(-1, 1, 1, 1)
        sw = torch.pow(2.0, torch.round(torch.log(bw.abs().view(bw.size(0), -1).mean(-1)) / torch.log(
            torch.tensor(2.0)))).view(-1, 1, 1, 1)
        return torch.sign(bw) * sw

    def iconv(x, p, stride):
        return F.conv2d(torch.sign(x), libra_pb(sd[p + ".weight"]), stride=stride, padding=1)

    b = "backbone."
    x = F.max_pool2d(F.hardtanh(_bnf(F.conv2d(x, sd[b + "conv1.weight"], stride=2, padding=3), sd, b + "bn1.")), 3, 2, 1)
    for p, cin, cout, stride in blocks((2, 2, 2, 2)):
        p = b + p
        res = x if stride == 1 else _bnf(F.conv2d(x, sd[p + "downsample.0.weight"], stride=2), sd, p + "downsample.1.")
        h = F.hardtanh(_bnf(iconv(x, p + "conv1", stride), sd, p + "bn1.") + res)
        x = F.hardtanh(_bnf(iconv(h, p + "conv2", 1), sd, p + "bn2.") + h)
    return F.linear(_bnf(x.mean((2, 3)), sd, head_bn), sd["head.fc.weight"], sd["head.fc.bias"])


@pytest.mark.parametrize("head_bn", ["neck.bn.", "head.bn1."])  # GlobalAveragePoolingBN neck / IRClsHead
def test_irnet18_mmcls_checkpoint_imports_strictly(tmp_path, head_bn):
    sd = irnet_mmcls_reference(head_bn)
    path = tmp_path / "epoch_100.pth"
    torch.save({"meta": {"epoch": 100, "mmcls_version": "0.x"}, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0]}]}}, path)
    net = bnnc.import_checkpoint(path, model="irnet18")
    got = net.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k.replace("head.bn1.", "neck.bn.")], v), k
    assert len(got) == len(sd)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _close(net(x), irnet_reference_forward(sd, x, head_bn))


def test_irnet_checkpoint_is_refused_by_bireal_naming_both_sides(tmp_path):
    path = tmp_path / "irnet.pth"
    torch.save({"meta": {}, "state_dict": irnet_mmcls_reference()}, path)
    with pytest.raises(ModelFormatError) as e:
        bnnc.import_checkpoint(path, model="bireal18")
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "layer1.0.binary_conv.weight" in msg
    assert "unexpected in the checkpoint" in msg and "backbone.layer1.0.conv2.weight" in msg
