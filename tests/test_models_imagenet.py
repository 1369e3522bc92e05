"""ImageNet ResNet zoo (methods.md §1.6, §3.3, §4.3, §5.3, §6.4, §8): each model builds, trains a step, has the
parameter count of its architecture (closed form derived here from the spec, and torchvision's published
ResNet-18/34 counts for Bi-Real, whose tensors have the same shapes), and exports to the ai.bnnc op set with
PyTorch's eval-mode logits on the reference runtime."""

from __future__ import annotations

import bnnc.models as zoo
import numpy as np
import pytest
import torch
from bnnc.passes.pipeline import to_deploy
from bnnc.runtimes.reference import OrtReferenceRunner
from onnx import numpy_helper
from torch import nn

from bnnc.export import to_onnx

R18, R34 = (2, 2, 2, 2), (3, 4, 6, 3)
BIREAL18, BIREAL34 = (4, 4, 4, 4), (6, 8, 12, 6)
WIDTHS = (64, 128, 256, 512)
NAMES = ["bireal18", "bireal34", "reactnet18", "irnet18", "rbnn_resnet18_imagenet", "rbnn_resnet34_imagenet",
         "adabin_resnet18_imagenet", "adabin_resnet34_imagenet", "real2binary_baseline"]


# ------------------------------------------------------------------------------- closed-form parameter counts


def conv(cin, cout, k):
    return cin * cout * k * k


def bn(c):
    return 2 * c


def stages(layers):
    """(cin, cout, first-of-stage-with-downsample) for every block of a 64/128/256/512 ResNet."""
    cin = 64
    for i, (n, cout) in enumerate(zip(layers, WIDTHS)):
        for j in range(n):
            yield cin, cout, (i > 0 and j == 0)
            cin = cout


def expected_params(name, num_classes=1000):
    stem = conv(3, 64, 7) + bn(64)
    fc = 512 * num_classes + num_classes
    ds = lambda cin, cout: conv(cin, cout, 1) + bn(cout)
    total = stem + fc
    if name in ("bireal18", "bireal34", "reactnet18"):
        for cin, cout, down in stages(BIREAL34 if name == "bireal34" else BIREAL18):
            total += conv(cin, cout, 3) + bn(cout) + (ds(cin, cout) if down else 0)
            if name == "reactnet18":
                total += cin + 3 * cout  # move0 (RSign bias), move1, PReLU slope, move2
        return total
    if name == "irnet18":
        for cin, cout, down in stages(R18):
            total += conv(cin, cout, 3) + conv(cout, cout, 3) + 2 * bn(cout) + (ds(cin, cout) if down else 0)
        return total + bn(512)  # neck BatchNorm1d
    if name.startswith("rbnn"):
        for cin, cout, down in stages(R34 if "34" in name else R18):
            total += conv(cin, cout, 3) + conv(cout, cout, 3) + 2 * bn(cout) + (ds(cin, cout) if down else 0)
            total += 2 * (2 * cout)  # alpha and rotate θ per output channel, for each of the two convs
        return total + bn(512) + bn(num_classes)  # bn2, and the unused bn3
    if name.startswith("adabin"):
        total += 2 * 64  # stem Maxout
        for cin, cout, down in stages(R34 if "34" in name else R18):
            total += conv(cin, cout, 3) + conv(cout, cout, 3) + 2 * bn(cout) + (ds(cin, cout) if down else 0)
            total += 2 * 2 + 2 * (2 * cout)  # α_a, β_a per conv; two Maxouts
        return total + bn(512) + 2 * 512 + bn(num_classes)  # bn2, the unused nonlinear2 and bn3
    if name == "real2binary_baseline":
        total += 64  # stem PReLU
        size = 56
        for cin, cout, down in stages(R18):
            size //= 2 if down else 1
            total += bn(cin) + bn(cout) + conv(cin, cout, 3) + conv(cout, cout, 3) + (ds(cin, cout) if down else 0)
            total += 2 * (cout + 2 * size) + 2 * cout  # two XNOR-Net++ scales (α_c, β_h, γ_w), two PReLUs
        return total
    raise AssertionError(name)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_the_architecture(name):
    net = zoo.create(name)
    assert sum(p.numel() for p in net.parameters()) == expected_params(name)
    assert sum(p.numel() for p in zoo.create(name, num_classes=10).parameters()) == expected_params(name, 10)


def test_bireal_counts_equal_torchvision_resnets():
    # Bi-Real-18/34 have exactly the tensors of ResNet-18/34 (their 3×3 convs are just binarized, the 1×1
    # downsample convs and BNs keep their shapes): torchvision's published 11,689,512 and 21,797,672 parameters.
    assert sum(p.numel() for p in zoo.create("bireal18").parameters()) == 11_689_512
    assert sum(p.numel() for p in zoo.create("bireal34").parameters()) == 21_797_672


def test_recipes_name_their_source_and_published_top1():
    for name in NAMES:
        r = zoo.get_recipe(name)
        assert r.dataset == "imagenet" and r.input_shape == (1, 3, 224, 224)
        assert "%" in r.source and r.epochs > 0 and r.lr > 0, name
    assert "56.4" in zoo.get_recipe("bireal18").source and "62.2" in zoo.get_recipe("bireal34").source
    assert "65.9" in zoo.get_recipe("reactnet18").source
    assert "two_step" in zoo.get_recipe("reactnet18").extra and "teacher" in zoo.get_recipe("reactnet18").extra


# ------------------------------------------------------------------------------------- forward + backward

UNUSED = {  # modules the references build but never call (kept so their state dicts load strictly)
    "adabin_resnet18_imagenet": ("bn3.", "nonlinear2."),
    "adabin_resnet34_imagenet": ("bn3.", "nonlinear2."),
    "rbnn_resnet18_imagenet": ("bn3.",),
    "rbnn_resnet34_imagenet": ("bn3.",),
}


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_at_224(name):
    torch.manual_seed(0)
    net = zoo.create(name, num_classes=10).train()
    x = torch.randn(2, 3, 224, 224)
    y = net(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    torch.nn.functional.cross_entropy(y, torch.tensor([1, 7])).backward()
    unused = UNUSED.get(name, ())
    for pname, p in net.named_parameters():
        if pname.startswith(unused):
            assert p.grad is None, pname
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # the latent weights of binary convs learn through their surrogate gradients
    binary = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and hasattr(m, "weight_quantizer")]
    assert len(binary) == {"bireal34": 32, "rbnn_resnet34_imagenet": 32, "adabin_resnet34_imagenet": 32}.get(name, 16)
    if name.startswith("rbnn"):
        # RBNN (§6.1 step 4): w3 = W̃ + |sin θ|·(stop_grad(W_rot) − W̃), so ∂w3/∂W = 0 at the init θ = π/2;
        # the latent weights only start learning once θ moves (driven by alpha's and the BNs' updates)
        assert all(m.weight.grad.abs().sum() == 0 for m in binary)
        assert all(m.weight_quantizer.alpha.grad.abs().sum() > 0 for m in binary)
    else:
        assert all(m.weight.grad.abs().sum() > 0 for m in binary)


# ------------------------------------------------------------------------------------------------ export


def _randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, biases, slopes and thresholds, so the export is tested away from init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            u = torch.rand(t.shape, generator=g)
            if leaf == "running_var":
                t.copy_(0.5 + u)
            elif leaf in ("running_mean", "bias") or name.endswith(("move0.bias", "input_quantizer.bias")):
                t.copy_(0.2 * (u - 0.5))
            elif leaf in ("alpha_a", "pos_scale", "alpha", "beta", "gamma") or (leaf == "weight" and t.dim() == 1):
                t.copy_(0.5 + u)  # BN/PReLU weights, AdaBin α_a, Maxout slopes, XNOR-Net++ scales
            elif leaf in ("beta_a", "neg_scale"):
                t.copy_(0.3 * u)
    return net.eval()


def _export_matches_pytorch(name, size=64, **kwargs):
    torch.manual_seed(0)
    net = _randomize(zoo.create(name, **kwargs))
    model = to_onnx(net, (1, 3, size, size))
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want = net(x).numpy()
    got = OrtReferenceRunner(model).run(x.numpy())
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    return model


@pytest.mark.parametrize("name", ["bireal18", "reactnet18", "irnet18"])
def test_export_matches_pytorch(name):
    _export_matches_pytorch(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bireal34", "adabin_resnet18_imagenet", "adabin_resnet34_imagenet"])
def test_export_matches_pytorch_slow(name):
    _export_matches_pytorch(name)


@pytest.mark.slow
def test_real2binary_baseline_exports_at_the_size_it_was_built_for():
    _export_matches_pytorch("real2binary_baseline", size=64, input_size=64)


def test_real2binary_scale_refuses_another_input_size():
    net = zoo.create("real2binary_baseline", input_size=64).eval()
    with pytest.raises(ValueError, match="built for 16×16 feature maps, got 56×56"):
        net(torch.zeros(1, 3, 224, 224))


@pytest.mark.parametrize("name", ["rbnn_resnet18_imagenet"])
def test_rbnn_activations_export_with_the_per_sample_mean_threshold(name):
    torch.manual_seed(0)
    net = zoo.create(name).eval()
    model = to_onnx(net, (1, 3, 64, 64))
    convs = [n for n in model.graph.node if n.op_type == "BinaryConv2d"]
    assert convs[0].name == "layer1.0.conv1" and len(convs) == 16
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = net(x).numpy()
    got = OrtReferenceRunner(model).run(x.numpy())
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


# -------------------------------------------------------------------------------- export vs deploy size


def binary_layer_sizes(model, op_type: str) -> tuple[int, int, int]:
    """(number of binary convs, bytes of their weight tensors, bytes of every constant they take) of an ONNX
    model: export form ``BinaryConv2d(X, W, R, B)``, deploy form ``BinaryConv2dPacked(X, W, E, RowClass,
    ColClass, P0, P1)`` (docs/ops.md)."""
    init = {i.name: numpy_helper.to_array(i).nbytes for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == "ai.bnnc" and n.op_type == op_type]
    weights = sum(init[n.input[1]] for n in nodes)
    constants = sum(init.get(i, 0) for n in nodes for i in n.input[1:])
    return len(nodes), weights, constants


def size_report(export_model) -> dict:
    """Whole-file and binary-layer sizes of an export-form model and of its deploy form (issue #3)."""
    deploy_model = to_deploy(export_model)
    n_e, w_e, c_e = binary_layer_sizes(export_model, "BinaryConv2d")
    n_d, w_d, c_d = binary_layer_sizes(deploy_model, "BinaryConv2dPacked")
    assert n_e == n_d
    fe, fd = len(export_model.SerializeToString()), len(deploy_model.SerializeToString())
    return {"binary_layers": n_e, "file_export": fe, "file_deploy": fd, "file_ratio": fe / fd,
            "weights_export": w_e, "weights_deploy": w_d, "weights_ratio": w_e / w_d,
            "binary_constants_export": c_e, "binary_constants_deploy": c_d, "binary_constants_ratio": c_e / c_d}


def test_bireal18_deploy_form_shrinks_binary_weights(capsys):
    torch.manual_seed(0)
    r = size_report(to_onnx(_randomize(zoo.create("bireal18")), (1, 3, 64, 64)))
    with capsys.disabled():
        print(f"\nBi-Real-18: file {r['file_export']:,} B (export) -> {r['file_deploy']:,} B (deploy), "
              f"{r['file_ratio']:.1f}x; binary weights {r['weights_ratio']:.1f}x; all binary-layer constants "
              f"{r['binary_constants_ratio']:.1f}x")
    assert r["binary_layers"] == 16
    # every 3×3 binary conv has Cin a multiple of 32: ±1 float32 → 1 bit exactly, 32×
    assert r["weights_ratio"] == 32.0
    assert r["weights_export"] == 4 * sum(conv(cin, cout, 3) for cin, cout, _ in stages(BIREAL18))
    assert r["binary_constants_ratio"] >= 25.0  # with border tables and folded BatchNorm epilogues
    # the real stem, 1×1 downsamples and fc (≈ 1.2 M float32 parameters) stay float: a smaller file ratio
    assert r["file_ratio"] > 8.0
