"""ReActNet-A (methods.md §4) and BiMLP-S/M (§7): build, train step, parameter counts from closed forms,
reference names, published-checkpoint layout, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bnnc.runtimes.reference import OrtReferenceRunner

import bnnc
from bnnc.checkpoints import import_checkpoint
from bnnc.errors import ModelFormatError
from bnnc.export import to_onnx

# ---------------------------------------------------------------------------------------------- ReActNet-A

CHANNELS = [32, 64, 128, 128, 256, 256] + [512] * 6 + [1024] * 2  # §4.2


def _blocks():
    """(index, inplanes C, planes P, stride) of the 13 blocks, from §4.2's rule."""
    for i in range(1, len(CHANNELS)):
        c, p = CHANNELS[i - 1], CHANNELS[i]
        yield i, c, p, (2 if c != p and p != 64 else 1)


def reactnet_reference_shapes():
    """The official step-2 state dict layout (§11), without the ``module.`` prefix: name → shape."""
    def bn(p, c):
        return {f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,),
                f"{p}.num_batches_tracked": ()}

    s = {"feature.0.conv1.weight": (32, 3, 3, 3), **bn("feature.0.bn1", 32)}
    for i, c, p, _ in _blocks():
        f = f"feature.{i}"
        s[f"{f}.move11.bias"] = (1, c, 1, 1)
        s[f"{f}.binary_3x3.weights"] = (c * c * 9, 1)
        s.update(bn(f"{f}.bn1", c))
        s[f"{f}.move12.bias"] = (1, c, 1, 1)
        s[f"{f}.prelu1.weight"] = (c,)
        s[f"{f}.move13.bias"] = (1, c, 1, 1)
        s[f"{f}.move21.bias"] = (1, c, 1, 1)
        if p == c:
            s[f"{f}.binary_pw.weights"] = (c * c, 1)
            s.update(bn(f"{f}.bn2", c))
        else:
            s[f"{f}.binary_pw_down1.weights"] = (c * c, 1)
            s[f"{f}.binary_pw_down2.weights"] = (c * c, 1)
            s.update(bn(f"{f}.bn2_1", c))
            s.update(bn(f"{f}.bn2_2", c))
        s[f"{f}.move22.bias"] = (1, p, 1, 1)
        s[f"{f}.prelu2.weight"] = (p,)
        s[f"{f}.move23.bias"] = (1, p, 1, 1)
    s["fc.weight"] = (1000, 1024)
    s["fc.bias"] = (1000,)
    return s


def reactnet_param_count() -> int:
    """Closed form: stem conv + BN, per block 3×3 C² + 1×1 (C·P) weights, BN affine, 7 per-channel vectors
    on C (move11, move12, prelu1, move13, move21 and BN1's two) …, fc."""
    n = 3 * 32 * 9 + 2 * 32
    for _, c, p, _ in _blocks():
        n += 9 * c * c + 2 * c                       # binary_3x3 + bn1
        n += 5 * c                                   # move11, move12, prelu1, move13, move21
        n += c * p + 2 * p                           # binary_pw (C·C or 2·C·C) + bn2 (or bn2_1 + bn2_2)
        n += 3 * p                                   # move22, prelu2, move23
    return n + 1024 * 1000 + 1000


def random_reference_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in reactnet_reference_shapes().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(".weights"):
            sd[k] = torch.randn(shape, generator=g) * 0.05
        elif ".bn" in k and k.endswith(".weight"):
            sd[k] = torch.rand(shape, generator=g) * 0.5 + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.1
    return sd


def reactnet_reference_forward(sd, x):
    """Eval-mode forward of the official code (§4.1–4.2) on a reference state dict: torch.sign
    activations on x + move, HardBinaryConv = conv(·, sign(W))·mean_o|W| on the flattened ``weights``."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-5)

    def bconv(t, name, cout, cin, k, stride):
        w = sd[name + ".weights"].view(cout, cin, k, k)
        y = F.conv2d(t, torch.sign(w), None, stride, k // 2)
        return y * w.abs().mean((1, 2, 3)).view(1, -1, 1, 1)

    x = bn(F.conv2d(x, sd["feature.0.conv1.weight"], None, 2, 1), "feature.0.bn1")
    for i, c, p, s in _blocks():
        f = f"feature.{i}"
        o1 = bn(bconv(torch.sign(x + sd[f + ".move11.bias"]), f + ".binary_3x3", c, c, 3, s), f + ".bn1")
        if s == 2:
            x = F.avg_pool2d(x, 2, 2)
        o1 = F.prelu(x + o1 + sd[f + ".move12.bias"], sd[f + ".prelu1.weight"]) + sd[f + ".move13.bias"]
        t = torch.sign(o1 + sd[f + ".move21.bias"])
        if p == c:
            o2 = bn(bconv(t, f + ".binary_pw", c, c, 1, 1), f + ".bn2") + o1
        else:
            o2 = torch.cat([bn(bconv(t, f + ".binary_pw_down1", c, c, 1, 1), f + ".bn2_1") + o1,
                            bn(bconv(t, f + ".binary_pw_down2", c, c, 1, 1), f + ".bn2_2") + o1], 1)
        x = F.prelu(o2 + sd[f + ".move22.bias"], sd[f + ".prelu2.weight"]) + sd[f + ".move23.bias"]
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def test_reactnet_a_builds_trains_and_counts():
    net = bnnc.models.create("reactnet_a")
    assert sum(p.numel() for p in net.parameters()) == reactnet_param_count()
    net.train()
    y = net(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000)
    y.square().mean().backward()
    w = net.feature[5].binary_3x3.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert net.feature[5].move11.bias.grad.abs().sum() > 0   # RSign bias learns (ApproxSign backward)
    assert net.feature[0].conv1.weight.grad.abs().sum() > 0
    r = bnnc.models.get_recipe("reactnet_a")
    assert r.input_shape == (1, 3, 224, 224) and "69.4" in r.source and "two_step" in r.extra


def _ours(name: str) -> str:
    """Reference name → ours: only the flattened ``binary_*.weights`` differ (4-D ``binary_*.weight``)."""
    return name[:-1] if name.endswith(".weights") else name


def test_reactnet_a_state_dict_has_the_reference_names_and_init():
    net = bnnc.models.create("reactnet_a")
    sd = net.state_dict()
    want = reactnet_reference_shapes()
    assert list(sd) == [_ours(k) for k in want]  # names AND order of the official module tree
    for k, shape in want.items():
        assert sd[_ours(k)].numel() == int(np.prod(shape)), k
        if not k.endswith(".weights"):
            assert tuple(sd[k].shape) == shape, k
    assert tuple(sd["feature.13.binary_3x3.weight"].shape) == (1024, 1024, 3, 3)
    w = sd["feature.7.binary_3x3.weight"]
    assert 0 <= w.min() and w.max() <= 1e-3  # U(0, 1)·1e-3 as HardBinaryConv
    assert torch.all(sd["feature.7.prelu1.weight"] == 0.25)
    blk = net.feature[1]
    assert blk.binary_pw_down1.input_quantizer.target is blk.move21   # one RSign feeds both halves
    assert blk.binary_pw_down2.input_quantizer.target is blk.move21


def test_reactnet_a_published_layout_imports_strictly_and_matches_the_official_forward(tmp_path):
    sd = random_reference_state_dict()
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 127, "state_dict": {"module." + k: v for k, v in sd.items()}, "best_top1_acc": 69.5,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}, path)
    net = import_checkpoint(path, model="reactnet_a")
    back = net.state_dict()
    assert list(back) == [_ours(k) for k in sd]
    assert all(torch.equal(back[_ours(k)].reshape(sd[k].shape), sd[k]) for k in sd)   # round trip, bit for bit
    assert torch.equal(net.feature[3].binary_3x3.weight, sd["feature.3.binary_3x3.weights"].view(128, 128, 3, 3))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reactnet_reference_forward({k: v.double() if v.is_floating_point() else v for k, v in sd.items()},
                                          x.double())
        got = net(x)
    assert (got.double() - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    assert (got.argmax(1) == want.argmax(1)).all()
    # the bnnc checkpoint written by `bnnc import` loads back into the same model
    from bnnc.train import load_checkpoint, save_checkpoint

    save_checkpoint(net, tmp_path / "bnnc.pt")
    again = load_checkpoint(tmp_path / "bnnc.pt")
    with torch.no_grad():
        assert torch.equal(again(x), got)


def test_reactnet_a_wrong_flattened_size_is_named(tmp_path):
    sd = random_reference_state_dict()
    sd["feature.2.binary_pw_down1.weights"] = torch.zeros(64 * 64 + 1, 1)
    del sd["fc.bias"]
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ModelFormatError) as e:
        import_checkpoint(path, model="reactnet_a")
    msg = str(e.value)
    assert "feature.2.binary_pw_down1.weights" in msg and "(4097, 1)" in msg and "fc.bias" in msg


def _export_matches_pytorch(net, shape, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # learned-looking values: BN statistics, RSign thresholds, RPReLU shifts
        for name, p in net.named_parameters():
            if name.endswith(("move11.bias", "move21.bias", "move12.bias", "move22.bias", "move13.bias",
                              "move23.bias")):
                p.copy_(torch.randn_like(p) * 0.1)
            elif name.endswith(".weight") and p.dim() == 4:
                p.copy_(torch.randn_like(p) * 0.05)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    net.eval()
    model = to_onnx(net, shape)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        want = net(x).numpy()
    got = OrtReferenceRunner(model).run(x.numpy())
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    return model


@pytest.mark.slow
def test_reactnet_a_exports_and_matches_reference_ort():
    model = _export_matches_pytorch(bnnc.models.create("reactnet_a"), (1, 3, 64, 64))
    ops = [n.op_type for n in model.graph.node if n.domain == "ai.bnnc"]
    assert ops.count("BinaryConv2d") == 31


# ------------------------------------------------------------------------------------------------- BiMLP


def test_same_pool_pads_match_mindspore():
    from bnnc.models.bimlp import same_pool_pads

    # methods.md §7.3: H = 56, stride 2 → k2 (0,0), k3 (0,1), k5 (1,2), k7 (2,3)
    assert [same_pool_pads(56, k) for k in (2, 3, 5, 7)] == [(0, 0), (0, 1), (1, 2), (2, 3)]
    assert [same_pool_pads(7, k) for k in (2, 3, 5, 7)] == [(0, 1), (1, 1), (2, 2), (3, 3)]


def test_downsample_pools_like_tf_same():
    from bnnc.models.bimlp import Downsample

    ds = Downsample(2, 3).eval()
    x = torch.randn(1, 3, 7, 6)
    a = x.numpy()

    def pool(k):  # TF "same": out = ceil(n/2), windows start at 2·i − pad_before, clipped to the image
        out = np.zeros((1, 3, 4, 3), np.float32)
        for i in range(4):
            for j in range(3):
                t, le = (max((4 - 1) * 2 + k - 7, 0)) // 2, (max((3 - 1) * 2 + k - 6, 0)) // 2
                r0, c0 = 2 * i - t, 2 * j - le
                win = a[:, :, max(r0, 0):min(r0 + k, 7), max(c0, 0):min(c0 + k, 6)]
                out[:, :, i, j] = win.max((2, 3))
        return out

    want = sum(pool(k) for k in (2, 3, 5, 7)) / 4
    # run the pooling part of Downsample on x directly
    ds.proj, ds.norm, ds.act = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        got = ds(x).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_uni_shortcut_tiles_and_averages():
    from bnnc.models.bimlp import uni_shortcut

    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    assert uni_shortcut(x, 24).flatten().tolist() == list(range(8)) * 3
    assert uni_shortcut(x, 2).flatten().tolist() == [1.5, 5.5]
    with pytest.raises(ValueError, match="no BiMLP shortcut"):
        uni_shortcut(x, 5)


def bimlp_param_count(layers, dims=(64, 128, 320, 512), ratio=4, classes=1000) -> int:
    """Closed form from methods.md §7: RPReLU 3C, BN/GroupNorm 2C, binary 1×1 Cin·Cout, depthwise 1×7 7C,
    grouped 2C→C 1×7 14C."""
    def mlp(ci, ch, co):
        return ci + ci * ch + 2 * ch + 2 * ch + 3 * ch + 3 * ch + ch + ch * co + 2 * co + 3 * co

    def patm(c):
        return 6 * c * c + 2 * 14 * c + 6 * c + 2 * 2 * c + 8 * 2 * c + 8 * 3 * c + mlp(c, c // 4, 3 * c)

    def block(c):
        return 2 * c + 2 * c + 2 + 2 * c + 2 * 7 * c + 2 * 2 * c + 2 * 3 * c + patm(c) + mlp(c, ratio * c, c)

    n = 3 * dims[0] * 49 + dims[0] + 2 * dims[0] + 3 * dims[0]        # patch embed
    for i, nb in enumerate(layers):
        n += nb * block(dims[i])
        if i + 1 < len(layers):
            n += dims[i] * dims[i + 1] + dims[i + 1] + 2 * dims[i + 1] + 3 * dims[i + 1]   # downsample
    return n + 2 * dims[-1] + dims[-1] * classes + classes


@pytest.mark.parametrize("name,layers", [("bimlp_s", (2, 2, 4, 2)), ("bimlp_m", (2, 3, 10, 3))])
def test_bimlp_parameter_counts_and_norms(name, layers):
    net = bnnc.models.create(name)
    assert sum(p.numel() for p in net.parameters()) == bimlp_param_count(layers)
    norm = torch.nn.GroupNorm if name == "bimlp_m" else torch.nn.BatchNorm2d
    for key in ("patch_embed.norm", "network.0.1.norm1", "network.4.0.norm2", "network.3.norm", "norm"):
        assert isinstance(net.get_submodule(key), norm), key
    assert isinstance(net.get_submodule("network.4.0.attn.norm_h"), torch.nn.BatchNorm2d)
    assert isinstance(net.get_submodule("network.4.0.mlp.norm1"), torch.nn.BatchNorm2d)


def _train_step(name):
    net = bnnc.models.create(name).train()
    # batch 2: PATM's re-weighting MLP normalizes a pooled [N, C, 1, 1] tensor, which BatchNorm cannot
    # do in training with a single value per channel
    y = net(torch.randn(2, 3, 224, 224))
    assert y.shape == (2, 1000)
    y.square().mean().backward()
    assert net.network[0][0].attn.fc_h.weight.grad.abs().sum() > 0
    assert net.network[6][1].mlp.fc2.weight.grad.abs().sum() > 0
    assert net.patch_embed.proj.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(1, 3, 224, 224))).all()


def test_bimlp_s_trains_at_224():
    _train_step("bimlp_s")


@pytest.mark.slow
def test_bimlp_m_trains_at_224():
    _train_step("bimlp_m")


def test_bimlp_ternary_activations_and_xnorm_weights():
    from bnnc.models.bimlp import XnorMConv2d

    conv = XnorMConv2d(4, 2, (1, 7), padding=(0, 3), groups=2)
    w = conv.weight.detach()
    wb = conv.binarized_weight().detach()
    # XnorM: sign(W)·mean(|W|) over the two input channels of each group, per (out, tap)
    np.testing.assert_allclose(wb.numpy(), (torch.sign(w) * w.abs().mean(1, keepdim=True)).numpy())
    x = torch.tensor([-2.0, -0.7, -0.5, 0.2, 0.5, 0.51, 1.4]).reshape(1, 1, 1, 7).repeat(1, 4, 1, 1)
    assert conv.input_quantizer(x)[0, 0, 0].tolist() == [-1, -1, -0, 0, 0, 1, 1]
    dw = XnorMConv2d(3, 3, (7, 1), padding=(3, 0), groups=3)
    assert torch.equal(dw.binarized_weight(), dw.weight)  # one input per group: W_b = W


def test_bimlp_block_exports_its_ternary_convs_as_two_binary_convs():
    """A WaveBlock of BiMLP-S: every ternary-input binary 1×1 conv exports as two BinaryConv2d (½·s₁ + ½·s₂)
    sharing the weights (issue #7; the whole model and deploy: tests/test_export_rbnn_bimlp.py, slow)."""
    torch.manual_seed(0)
    from bnnc.models.bimlp import WaveBlock

    block = torch.nn.Sequential(WaveBlock(16))
    block.train()
    block(torch.randn(4, 16, 6, 6))
    block.eval()
    model = to_onnx(block, (1, 16, 6, 6))
    convs = [n for n in model.graph.node if n.op_type == "BinaryConv2d"]
    binary = [name for name, m in block.named_modules() if isinstance(m, bnnc.nn.BinaryConv2d)]
    assert sorted(n.name for n in convs) == sorted(f"{b}.term{k}" for b in binary for k in (1, 2))
    x = torch.randn(3, 16, 6, 6)
    with torch.no_grad():
        want = block(x).numpy()
    got = OrtReferenceRunner(model).run(x.numpy())
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
