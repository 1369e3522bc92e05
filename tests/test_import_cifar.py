"""Importing reference checkpoints of the CIFAR zoo, strictly: RBNN's PyTorch files (methods.md §6.5, written
here the way RBNN's ``save_checkpoint`` writes them, with keys listed from the spec's naming, independently of
bnnc's module tree) and FDA-BNN's MindSpore ResNet-20 ``.ckpt`` (§10.3 names, written in the protobuf wire
format by ``conftest.write_ms_ckpt``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnnc
from bnnc.errors import ModelFormatError

from .conftest import write_ms_ckpt

# RBNN get_ab (methods.md §6.1): N = Cin·kh·kw → (a, b)
AB = {144: (12, 12), 288: (16, 18), 576: (24, 24), 1152: (32, 36), 2304: (48, 48), 4608: (64, 72),
      64: (8, 8), 128: (8, 16), 256: (16, 16)}
ROTATION_LEAVES = ("alpha", "rotate", "R1", "R2")


def _bn_keys(p, c):
    return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,)), (f"{p}.running_mean", (c,)), (f"{p}.running_var", (c,)),
            (f"{p}.num_batches_tracked", ())]


def _binarize_conv_keys(p, cin, cout, k):
    a, b = AB[cin * k * k]
    return [(f"{p}.weight", (cout, cin, k, k)), (f"{p}.alpha", (cout, 1, 1)), (f"{p}.rotate", (cout, 1, 1, 1)),
            (f"{p}.R1", (a, a)), (f"{p}.R2", (b, b))]


def rbnn_reference_keys(arch: str) -> list[tuple[str, tuple]]:
    """(name, shape) of every state-dict entry of RBNN's cifar/models_cifar ``arch``, per methods.md §6.4–6.5."""
    if arch == "vgg_small_1w1a":
        keys = [("conv0.weight", (128, 3, 3, 3))] + _bn_keys("bn0", 128)
        chans = [128, 128, 256, 256, 512, 512]
        for i in range(1, 6):
            keys += _binarize_conv_keys(f"conv{i}", chans[i - 1], chans[i], 3) + _bn_keys(f"bn{i}", chans[i])
        return keys + [("fc.weight", (10, 8192)), ("fc.bias", (10,))]
    if arch in ("resnet20_1w1a", "resnet20_bireal_1w1a"):
        blocks, widths, binary_shortcut = (3, 3, 3), (16, 32, 64), False
    elif arch == "resnet18_1w1a":
        blocks, widths, binary_shortcut = (2, 2, 2, 2), (64, 128, 256, 512), True
    else:
        raise ValueError(arch)
    keys = [("conv1.weight", (widths[0], 3, 3, 3))] + _bn_keys("bn1", widths[0])
    cin = widths[0]
    for i, (n, planes) in enumerate(zip(blocks, widths), 1):
        for j in range(n):
            p = f"layer{i}.{j}"
            keys += _binarize_conv_keys(f"{p}.conv1", cin, planes, 3) + _bn_keys(f"{p}.bn1", planes)
            keys += _binarize_conv_keys(f"{p}.conv2", planes, planes, 3) + _bn_keys(f"{p}.bn2", planes)
            if binary_shortcut and i > 1 and j == 0:
                keys += _binarize_conv_keys(f"{p}.shortcut.0", cin, planes, 1) + _bn_keys(f"{p}.shortcut.1", planes)
            cin = planes
    return keys + _bn_keys("bn2", widths[-1]) + [("linear.weight", (10, widths[-1])), ("linear.bias", (10,))]


def rbnn_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in rbnn_reference_keys(arch):
        leaf = name.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            sd[name] = torch.tensor(12345)
        elif leaf in ("R1", "R2"):
            q, _ = torch.linalg.qr(torch.randn(shape, generator=g, dtype=torch.float64))
            sd[name] = q.float()
        elif leaf == "running_var":
            sd[name] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[name] = torch.randn(shape, generator=g)
    return sd


def save_like_rbnn(path, arch, sd, prefix=""):
    """RBNN main.py ``save_checkpoint``: torch.save({'epoch', 'model', 'state_dict', 'best_prec1', 'parameters'})
    ('parameters' = a pickled list of nn.Parameter, a duplicate of the weights)."""
    state = {
        "epoch": 1000,
        "model": arch,
        "state_dict": {prefix + k: v for k, v in sd.items()},
        "best_prec1": 86.5,
        "parameters": [nn.Parameter(v.clone()) for k, v in sd.items()
                       if v.is_floating_point() and k.rsplit(".", 1)[1] not in ("R1", "R2", "running_mean",
                                                                               "running_var")],
    }
    torch.save(state, path)
    return path


def expected_location(key: str) -> str:
    owner, leaf = key.rsplit(".", 1)
    return f"{owner}.weight_quantizer.{leaf}" if leaf in ROTATION_LEAVES else key


def rbnn_conv_direct(raw, p, x, stride=1, padding=1):
    """One RBNN BinarizeConv2d in eval (methods.md §6.1) from the raw reference tensors."""
    xa = x - x.mean((1, 2, 3), keepdim=True)
    xa = xa / xa.flatten(1).std(1).view(-1, 1, 1, 1)
    w = raw[p + ".weight"]
    o = w.shape[0]
    c = w.flatten(1) - w.flatten(1).mean(1, keepdim=True)
    wt = c / c.std(1, keepdim=True)
    r1, r2 = raw[p + ".R1"], raw[p + ".R2"]
    rot = (r1.t() @ wt.view(o, r1.shape[0], r2.shape[0]) @ r2).reshape(o, -1)
    w3 = wt + torch.sin(raw[p + ".rotate"]).abs().view(o, 1) * (rot - wt)
    return F.conv2d(torch.sign(xa), torch.sign(w3).view_as(w), None, stride, padding) * raw[p + ".alpha"].view(1, o, 1, 1)


# ------------------------------------------------------------------------------------------------- RBNN


@pytest.mark.parametrize("arch", ["resnet20_1w1a", "resnet20_bireal_1w1a", "resnet18_1w1a", "vgg_small_1w1a"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_rbnn_checkpoint_imports_strictly(tmp_path, arch, prefix):
    raw = rbnn_state_dict(arch)
    path = save_like_rbnn(tmp_path / "model_best.pth.tar", arch, raw, prefix)
    net = bnnc.import_checkpoint(path, model=f"rbnn_{arch}")
    assert not net.training and net.bnnc_source_format == "torch"
    sd = net.state_dict()
    assert len(sd) == len(raw)
    for k, v in raw.items():
        assert torch.equal(sd[expected_location(k)], v), k
    # the imported tensors are the ones the layer computes with
    p = "conv1" if arch == "vgg_small_1w1a" else "layer1.0.conv1"
    cin = 128 if arch == "vgg_small_1w1a" else (64 if arch == "resnet18_1w1a" else 16)
    x = torch.randn(2, cin, 8, 8)
    with torch.no_grad():
        got = net.get_submodule(p)(x)
    assert torch.allclose(got, rbnn_conv_direct(raw, p, x), atol=1e-5, rtol=1e-5)
    if arch == "resnet18_1w1a":  # the binary 1×1 stride-2 shortcut
        x = torch.randn(2, 64, 8, 8)
        with torch.no_grad():
            got = net.layer2[0].shortcut[0](x)
        assert torch.allclose(got, rbnn_conv_direct(raw, "layer2.0.shortcut.0", x, 2, 0), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(2, 3, 32, 32))).all()


def test_rbnn_checkpoint_of_another_architecture_names_the_bad_keys(tmp_path):
    path = save_like_rbnn(tmp_path / "r20.pth.tar", "resnet20_1w1a", rbnn_state_dict("resnet20_1w1a"))
    with pytest.raises(ModelFormatError) as e:
        bnnc.import_checkpoint(path, model="rbnn_resnet18_1w1a")
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "layer4.0.conv1.weight" in msg
    assert "layer2.0.shortcut.0.weight_quantizer.R1" in msg
    assert "conv1.weight: checkpoint shape (16, 3, 3, 3) vs model (64, 3, 3, 3)" in msg
    # into a model without rotations (IR-Net ResNet-20: same tree, no alpha/rotate/R1/R2)
    with pytest.raises(ModelFormatError, match=r"unexpected in the checkpoint \(72\).*layer1\.0\.conv1\.alpha"):
        bnnc.import_checkpoint(path, model="irnet_resnet20")


def test_rbnn_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    raw = rbnn_state_dict("resnet20_1w1a")
    del raw["layer3.2.conv2.R2"]
    path = save_like_rbnn(tmp_path / "r20.pth.tar", "resnet20_1w1a", raw)
    with pytest.raises(ModelFormatError, match=r"missing from the checkpoint \(1\): layer3\.2\.conv2\.weight_quantizer\.R2"):
        bnnc.import_checkpoint(path, model="rbnn_resnet20_1w1a")


# ---------------------------------------------------------------------------------------------- FDA-BNN

MS_BN = ("gamma", "beta", "moving_mean", "moving_variance")


def fda_ms_arrays(seed=0, prelu_leaf="w") -> dict[str, np.ndarray]:
    """The FDA-BNN ResNet-20 parameters under MindSpore names (methods.md §10.3, src/resnet.py)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def bn(p, c):
        out[f"{p}.gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        out[f"{p}.beta"] = rng.normal(0, 0.3, c).astype(np.float32)
        out[f"{p}.moving_mean"] = rng.normal(0, 0.3, c).astype(np.float32)
        out[f"{p}.moving_variance"] = rng.uniform(0.5, 2.0, c).astype(np.float32)

    out["conv1.weight"] = rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32)
    bn("bn1", 16)
    cin = 16
    for i, planes in enumerate((16, 32, 64), 1):
        for j in range(3):
            p = f"layer{i}.{j}"
            out[f"{p}.conv1.weight"] = rng.normal(0, 0.1, (planes, cin, 3, 3)).astype(np.float32)
            bn(f"{p}.bn1", planes)
            out[f"{p}.conv2.weight"] = rng.normal(0, 0.1, (planes, planes, 3, 3)).astype(np.float32)
            bn(f"{p}.bn2", planes)
            out[f"{p}.relu1.{prelu_leaf}"] = rng.uniform(0.05, 0.5, (1,)).astype(np.float32)
            out[f"{p}.relu2.{prelu_leaf}"] = rng.uniform(0.05, 0.5, (1,)).astype(np.float32)
            cin = planes
    out["linear.weight"] = rng.normal(0, 0.1, (10, 64)).astype(np.float32)
    out["linear.bias"] = rng.normal(0, 0.1, (10,)).astype(np.float32)
    return out


def write_fda_ckpt(path, arrays, optimizer=True):
    entries = [(k, a, "Float32", list(a.shape)) for k, a in arrays.items()]
    if optimizer:  # what ModelCheckpoint adds with a Momentum optimizer
        w = arrays["conv1.weight"]
        entries += [("moments.conv1.weight", np.zeros_like(w), "Float32", list(w.shape)),
                    ("learning_rate", np.array([0.1], np.float32), "Float32", [1]),
                    ("global_step", np.array([7800], np.int32), "Int32", [1])]
    return write_ms_ckpt(path, entries)


def fda_forward_direct(a, x):
    """FDA-BNN ResNet-20 (MindSpore src/resnet.py + src/quan.py, methods.md §2.3) from the raw arrays."""
    t = {k: torch.from_numpy(v).double() for k, v in a.items()}

    def bn(p, h):
        return F.batch_norm(h, t[p + ".moving_mean"], t[p + ".moving_variance"], t[p + ".gamma"], t[p + ".beta"],
                            False, 0.0, 1e-5)

    def quanconv(p, h, stride):
        w = t[p + ".weight"]
        return F.conv2d(torch.sign(h), torch.sign(w) * w.abs().mean(), None, stride, 1)

    def prelu(p, h):
        return torch.where(h >= 0, h, t[p + ".w"] * h)

    out = bn("bn1", F.conv2d(x, t["conv1.weight"], None, 1, 1))
    for i, planes in enumerate((16, 32, 64), 1):
        for j in range(3):
            p = f"layer{i}.{j}"
            stride = 2 if i > 1 and j == 0 else 1
            h = bn(p + ".bn1", prelu(p + ".relu1", quanconv(p + ".conv1", out, stride)))
            h = bn(p + ".bn2", prelu(p + ".relu2", quanconv(p + ".conv2", h, 1)))
            sc = out if stride == 1 else F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            out = h + sc
    out = F.relu(out).mean((2, 3))
    return F.linear(out, t["linear.weight"], t["linear.bias"])


def test_fda_mindspore_checkpoint_imports_strictly_and_computes_the_reference(tmp_path):
    arrays = fda_ms_arrays()
    path = write_fda_ckpt(tmp_path / "fdabnn.ckpt", arrays)
    net = bnnc.import_checkpoint(path, model="fda_resnet20")
    assert net.bnnc_source_format == "mindspore" and not net.training
    sd = net.state_dict()
    leaf = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var",
            "w": "weight"}
    for k, v in arrays.items():
        owner, name = k.rsplit(".", 1)
        ours = f"{owner}.{leaf.get(name, name)}"
        assert torch.equal(sd[ours], torch.from_numpy(v).reshape(sd[ours].shape)), k
    assert net.layer1[0].relu1.weight.shape == (1,)
    # one layer: conv1 of the first block = sign(x) ⊛ sign(W)·mean|W| (one scale for the whole tensor)
    x = torch.randn(2, 16, 8, 8)
    w = torch.from_numpy(arrays["layer1.0.conv1.weight"])
    with torch.no_grad():
        got = net.layer1[0].conv1(x)
    assert torch.allclose(got, F.conv2d(torch.sign(x), torch.sign(w) * w.abs().mean(), None, 1, 1), atol=1e-5)
    # the whole network
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = net.double()(x.double())
    want = fda_forward_direct(arrays, x.double())
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9), (got - want).abs().max()


def test_fda_prelu_declared_name_a_is_accepted(tmp_path):
    arrays = fda_ms_arrays(seed=3, prelu_leaf="a")
    net = bnnc.import_checkpoint(write_fda_ckpt(tmp_path / "fda_a.ckpt", arrays, optimizer=False), model="fda_resnet20")
    assert torch.equal(net.layer3[2].relu2.weight, torch.from_numpy(arrays["layer3.2.relu2.a"]))


def test_fda_checkpoint_wrong_architecture_names_the_bad_keys(tmp_path):
    arrays = fda_ms_arrays()
    path = write_fda_ckpt(tmp_path / "fdabnn.ckpt", arrays)
    # IR-Net ResNet-20: same convs and BNs, but a BN1d head and no PReLUs
    with pytest.raises(ModelFormatError) as e:
        bnnc.import_checkpoint(path, model="irnet_resnet20")
    msg = str(e.value)
    assert "missing from the checkpoint (4): bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var" in msg
    assert "unexpected in the checkpoint (18)" in msg and "layer1.0.relu1.w" in msg
    # a file missing one tensor, and one with a misshapen tensor
    del arrays["layer2.1.bn2.moving_variance"]
    arrays["linear.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(ModelFormatError) as e:
        bnnc.import_checkpoint(write_fda_ckpt(tmp_path / "bad.ckpt", arrays), model="fda_resnet20")
    msg = str(e.value)
    assert "missing from the checkpoint (1): layer2.1.bn2.running_var" in msg
    assert "linear.weight: checkpoint shape (100, 64) vs model (10, 64)" in msg
