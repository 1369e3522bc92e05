"""Affine binary sets (AdaBin, deploy.md §3): activations p·s + q and weights r_o·s_w + t_o lower to
XOR-popcount convs plus the S_a window-sum term and per-border-class constants, with no float fallback.

The expectation is always computed independently: a float64 PyTorch convolution of the affine levels, or the
export form on ONNX Runtime (the reference) against the deploy form on the NumPy executor, comparing every
binary decision (each next quantizer's bits) and the logits."""

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnnc
from bnnc.activations import Maxout
from bnnc.export import to_onnx
from bnnc.ops import deploy as K
from bnnc.passes._graph import FallbackWarning
from bnnc.passes.lower_binary_conv import AFFINE_KEY, PADDING_KEY, SA_SOURCE_SUFFIX, constant_table, constant_term
from bnnc.passes.pipeline import form_of, to_deploy
from bnnc.runtimes.numpy_ref import NumpyDeployRunner
from bnnc.runtimes.reference import OrtReferenceRunner

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "adabin_resnet20_cifar10" / "model.th"


# ------------------------------------------------------------------------------------------- helpers

def _attr(node, name):
    a = next(a for a in node.attribute if a.name == name)
    return onnx.helper.get_attribute_value(a)


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    return m


def compare_decisions(export_model, deploy_model, x, tie_band=0.0):
    """Every binary decision of the export form (x ≥ T at each SignBinarize, on ONNX Runtime) against the bits
    the deploy form computes for it (NumPy executor). Returns (compared, differing, differing outside a band of
    ``tie_band``·max|x| around the threshold, reference logits, deploy logits)."""
    quants = [n for n in export_model.graph.node if n.op_type == "SignBinarize"]
    assert quants, "no binary layer"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in export_model.graph.initializer}
    ref_sess = OrtReferenceRunner(_with_outputs(export_model, [q.input[0] for q in quants])).session
    ref_out = ref_sess.run(None, {ref_sess.get_inputs()[0].name: x})
    ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_out))
    bit_names = [f"{q.output[0]}_bits" for q in quants]
    produced = {o for n in deploy_model.graph.node for o in n.output}
    assert set(bit_names) <= produced, sorted(set(bit_names) - produced)
    runner = NumpyDeployRunner(_with_outputs(deploy_model, bit_names))
    got = dict(zip([o.name for o in runner.model.graph.output], runner._sess.run(None, {runner.input_name: x})))
    compared = differing = outside = 0
    for q, name in zip(quants, bit_names):
        xv = ref[q.input[0]]
        c = xv.shape[1]
        t = np.broadcast_to(inits[q.input[1]].reshape(-1), (c,)).reshape(1, c, 1, 1)
        want = xv >= t
        have = K.unpack_sign(got[name], c) > 0
        diff = want != have
        compared += diff.size
        differing += int(diff.sum())
        outside += int((diff & (np.abs(xv - t) > tie_band * np.abs(xv).max())).sum())
    return compared, differing, outside, ref_out[0], got[deploy_model.graph.output[0].name]


def lower(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deploy = to_deploy(model)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert fallbacks == []
    ops = [n.op_type for n in deploy.graph.node]
    assert form_of(deploy) == "deploy" and "SignBinarize" not in ops and "BinaryConv2d" not in ops
    return deploy


def layer_convs(deploy):
    return [n for n in deploy.graph.node if n.op_type == "BinaryConv2dPacked"
            and not _attr(n, "source").decode().endswith(SA_SOURCE_SUFFIX)]


# ----------------------------------------------------------------------------- single layers, float64

class OneLayer(nn.Module):
    def __init__(self, cin, cout, k, stride, pad, aq="adabin", wq="adabin", bn=False):
        super().__init__()
        self.conv = bnnc.nn.BinaryConv2d(cin, cout, k, stride=stride, padding=pad, input_quantizer=aq,
                                         weight_quantizer=wq)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x))


def adabin_layer(rng, cin, cout, k, stride, pad, bn=False, aq="adabin", wq="adabin"):
    net = OneLayer(cin, cout, k, stride, pad, aq, wq, bn)
    with torch.no_grad():
        mean = rng.uniform(-0.6, 0.6, (cout, 1, 1, 1))
        std = rng.uniform(0.05, 1.0, (cout, 1, 1, 1))
        net.conv.weight.copy_(torch.tensor(rng.standard_normal((cout, cin, k, k)) * std + mean))
        if aq == "adabin":
            net.conv.input_quantizer.alpha_a.fill_(float(rng.uniform(0.2, 1.2)))
            net.conv.input_quantizer.beta_a.fill_(float(rng.uniform(-0.9, 0.9)))
        if bn:
            g = rng.standard_normal(cout) * 1.5
            g[::5] = 0.0
            net.bn.weight.copy_(torch.tensor(g))
            net.bn.bias.copy_(torch.tensor(rng.standard_normal(cout)))
            net.bn.running_mean.copy_(torch.tensor(rng.standard_normal(cout) * 3))
            net.bn.running_var.copy_(torch.tensor(rng.uniform(0.2, 5, cout)))
    return net.eval()


def float64_reference(net, x):
    """conv(α(s + β), std·s_w + mean) with zero padding, in float64: the AdaBin formula itself (§1.1, §1.2)."""
    conv, q = net.conv, net.conv.input_quantizer
    x = torch.tensor(x, dtype=torch.float64)
    w = conv.weight.detach().double()
    if q is not None and isinstance(q, bnnc.quantizers.AdaBinActivation):
        a, b = float(q.alpha_a.detach()), float(q.beta_a.detach())
        xa = a * (torch.where(x >= b, 1.0, -1.0).double() + b)
    else:
        xa = torch.where(x >= 0, 1.0, -1.0).double()
    if isinstance(conv.weight_quantizer, bnnc.quantizers.AdaBinWeight):
        mean = w.mean((1, 2, 3), keepdim=True)
        std = ((w - mean) ** 2).mean((1, 2, 3), keepdim=True).sqrt()
        wb = std * torch.where(w - mean >= 0, 1.0, -1.0).double() + mean
    else:  # xnor: mean |W| per output channel
        wb = w.abs().mean((1, 2, 3), keepdim=True) * torch.where(w >= 0, 1.0, -1.0).double()
    y = torch.nn.functional.conv2d(xa, wb, None, conv.stride, conv.padding)
    if isinstance(net.bn, nn.BatchNorm2d):
        y = torch.nn.functional.batch_norm(y, net.bn.running_mean.double(), net.bn.running_var.double(),
                                           net.bn.weight.double(), net.bn.bias.double(), False, 0.0, net.bn.eps)
    return y.detach().numpy()


@pytest.mark.parametrize("cin,cout,hw,k,stride,pad,bn", [
    (37, 9, 7, 3, 1, 1, False), (70, 5, 8, 3, 2, 1, True), (5, 7, 6, 3, 2, 2, True), (33, 4, 5, 1, 1, 0, False),
    (16, 16, 9, 3, 1, 0, True), (3, 6, 5, 1, 2, 1, False)])
def test_affine_conv_matches_float64_formula(rng, cin, cout, hw, k, stride, pad, bn):
    net = adabin_layer(rng, cin, cout, k, stride, pad, bn)
    model = to_onnx(net, (1, cin, hw, hw))
    deploy = lower(model)
    x = rng.standard_normal((3, cin, hw, hw)).astype(np.float32)
    want = float64_reference(net, x)
    got = NumpyDeployRunner(deploy).run(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    ops = [n.op_type for n in deploy.graph.node]
    assert "BatchNormalization" not in ops  # folded into all three terms
    # one layer conv (P0 = g·α·r) and one S_a window sum (one output channel, all +1 weights)
    assert len(layer_convs(deploy)) == 1 and ops.count("BinaryConv2dPacked") == 2
    # padding reaching a window ⇒ a border-dependent constant (a Conv of the all-ones image); else folded in P1
    assert ("Conv" in ops) == (pad > 0)


def test_window_sum_conv_counts_valid_taps(rng):
    """The S_a conv's float output is Σ_V s_a over the valid taps: the float conv of ±1 with a ones kernel."""
    net = adabin_layer(rng, 37, 4, 3, 2, 1)
    deploy = lower(to_onnx(net, (1, 37, 9, 9)))
    sa_node = next(n for n in deploy.graph.node if n.op_type == "BinaryConv2dPacked" and n not in layer_convs(deploy))
    assert _attr(sa_node, "out_channels") == 1
    x = rng.standard_normal((2, 37, 9, 9)).astype(np.float32)
    got = NumpyDeployRunner(_with_outputs(deploy, [sa_node.output[0]])).run_all(x)[sa_node.output[0]]
    beta = float(net.conv.input_quantizer.beta_a.detach())
    s = torch.tensor(np.where(x >= np.float32(beta), 1.0, -1.0))
    want = torch.nn.functional.conv2d(s, torch.ones(1, 37, 3, 3, dtype=torch.float64), stride=2, padding=1).numpy()
    np.testing.assert_array_equal(got, want)


def test_constant_term_table_is_the_padded_conv_of_the_levels(rng):
    """Σ_V q_c·w_b per border class equals the float64 conv of the constant image q with w_b, zero padded."""
    w = rng.standard_normal((6, 5, 3, 3))
    r, b, q = rng.uniform(0.1, 1, 6), rng.uniform(-1, 1, 6), rng.uniform(-1, 1, 5)
    m = constant_term(w, r, b, q)
    table, rc, cc = constant_table(m, (7, 6), [2, 1], [1, 1, 2, 0], [1, 1])
    wb = np.where(w >= 0, 1.0, -1.0) * r[:, None, None, None] + b[:, None, None, None]
    img = torch.tensor(np.broadcast_to(q[None, :, None, None], (1, 5, 7, 6)).copy())
    padded = torch.nn.functional.pad(img, (1, 0, 1, 2))  # left, right, top, bottom
    want = torch.nn.functional.conv2d(padded, torch.tensor(wb), stride=(2, 1))[0].numpy()
    np.testing.assert_allclose(table[:, rc[:, None], cc[None, :]], want, rtol=1e-12, atol=1e-12)


def test_no_window_sum_without_weight_offsets(rng):
    """AdaBin activations with plain (t = 0) weights: no S_a term; 1×1 without padding has a per-channel constant
    only, so the next decision folds into an integer threshold."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = bnnc.nn.BinaryConv2d(8, 13, 1, input_quantizer="adabin", weight_quantizer="xnor")
            self.bn = nn.BatchNorm2d(13)
            self.b = bnnc.nn.BinaryConv2d(13, 5, 3, padding=1, input_quantizer="adabin", weight_quantizer="xnor")

        def forward(self, x):
            return self.b(self.bn(self.a(x)))

    torch.manual_seed(0)
    net = Two()
    with torch.no_grad():
        for qz in (net.a.input_quantizer, net.b.input_quantizer):
            qz.alpha_a.fill_(float(rng.uniform(0.3, 1.1)))
            qz.beta_a.fill_(float(rng.uniform(0.2, 0.8)))
        net.bn.weight.copy_(torch.tensor(rng.standard_normal(13)))
        net.bn.running_mean.copy_(torch.tensor(rng.standard_normal(13)))
    net.eval()
    model = to_onnx(net, (1, 8, 6, 6))
    deploy = lower(model)
    convs = layer_convs(deploy)
    assert [_attr(n, "output").decode() for n in convs] == ["bits", "float"]
    assert len(convs) == [n.op_type for n in deploy.graph.node].count("BinaryConv2dPacked")  # no S_a conv
    x = rng.standard_normal((16, 8, 6, 6)).astype(np.float32)
    compared, differing, _, ref, got = compare_decisions(model, deploy, x)
    assert compared == 16 * (8 + 13) * 36 and differing == 0
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_lowered_convs_record_padding_and_affine_form(rng):
    deploy = lower(to_onnx(adabin_layer(rng, 5, 3, 3, 1, 1), (1, 5, 6, 6)))
    for n in deploy.graph.node:
        if n.op_type == "BinaryConv2dPacked":
            meta = {p.key: p.value for p in n.metadata_props}
            assert meta[PADDING_KEY] == "zero"
    (conv,) = layer_convs(deploy)
    assert {p.key: p.value for p in conv.metadata_props}[AFFINE_KEY] == "1"
    assert _attr(conv, "source").decode() == "conv"


def test_per_channel_activation_scale_falls_back(rng):
    """p must be one number (it scales the popcount); per-channel p stays in float, with a warning."""
    net = adabin_layer(rng, 4, 3, 3, 1, 1)
    model = to_onnx(net, (1, 4, 5, 5))
    quant = next(n for n in model.graph.node if n.op_type == "SignBinarize")
    p = next(i for i in model.graph.initializer if i.name == quant.input[2])
    p.CopyFrom(onnx.numpy_helper.from_array(np.array([0.5, 1.0, 1.5, 2.0], np.float32), p.name))
    with pytest.warns(FallbackWarning, match="per-channel activation scales"):
        deploy = to_deploy(model)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(NumpyDeployRunner(deploy).run(x), OrtReferenceRunner(model).run(x), rtol=1e-5,
                               atol=1e-5)


# -------------------------------------------------------------------------- random AdaBin networks

class AdaBinNet(nn.Module):
    """stem → [AdaBin conv → BN (+ shortcut) → act (→ pool)] → AdaBin conv → BN → head, Bi-Real style when the
    shapes allow a shortcut (as in AdaBin's ResNets)."""

    def __init__(self, c0, c1, c2, k1, stride1, pad1, k2, act, pool, residual, quantizers, classes=5):
        super().__init__()
        aq, wq = quantizers
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1), nn.BatchNorm2d(c0))
        self.b1 = bnnc.nn.BinaryConv2d(c0, c1, k1, stride=stride1, padding=pad1 if k1 > 1 else 0,
                                       input_quantizer=aq, weight_quantizer=wq)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act1 = {None: nn.Identity(), "prelu": nn.PReLU(c1), "maxout": Maxout(c1), "hardtanh": nn.Hardtanh()}[act]
        self.pool1 = nn.MaxPool2d(2) if pool else nn.Identity()
        self.residual = residual and c0 == c1 and stride1 == 1 and k1 == 3 and pad1 == 1
        self.b2 = bnnc.nn.BinaryConv2d(c1, c2, k2, padding=k2 // 2, input_quantizer=aq, weight_quantizer=wq)
        self.bn2 = nn.BatchNorm2d(c2)
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(classes))

    def forward(self, x):
        x = self.stem(x)
        h = self.bn1(self.b1(x))
        if self.residual:
            h = h + x
        h = self.pool1(self.act1(h))
        return self.head(self.bn2(self.b2(h)))


def randomize(net, rng):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                g = rng.standard_normal(c) * 1.5
                g[rng.random(c) < 0.15] = 0.0
                g[rng.random(c) < 0.1] = 1e-8
                m.weight.copy_(torch.tensor(g))
                m.bias.copy_(torch.tensor(rng.standard_normal(c) * 0.5))
                m.running_mean.copy_(torch.tensor(rng.standard_normal(c) * 3))
                m.running_var.copy_(torch.tensor(rng.uniform(0.2, 5, c)))
            elif isinstance(m, bnnc.nn.BinaryConv2d):
                o = m.out_channels
                mean = rng.uniform(-0.5, 0.5, (o, 1, 1, 1)) * rng.choice([0, 1, 1, 1])
                std = rng.uniform(0.02, 1.0, (o, 1, 1, 1))
                m.weight.copy_(torch.tensor(rng.standard_normal(m.weight.shape) * std + mean))
                if isinstance(m.input_quantizer, bnnc.quantizers.AdaBinActivation):
                    m.input_quantizer.alpha_a.fill_(float(rng.uniform(0.1, 1.5)))
                    m.input_quantizer.beta_a.fill_(float(rng.uniform(-1.0, 1.0)))
        for name, p in net.named_parameters():
            if name.startswith("act1."):  # non-negative slopes keep PReLU / Maxout monotone
                p.copy_(torch.tensor(rng.uniform(0.0, 1.5, p.shape), dtype=p.dtype))


ada_strategy = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**16), c0=st.sampled_from([3, 16, 37]), c1=st.sampled_from([5, 16, 33, 37, 70]),
    c2=st.sampled_from([7, 32, 45]), k1=st.sampled_from([1, 3]), stride1=st.sampled_from([1, 2]),
    pad1=st.sampled_from([0, 1, 2]), k2=st.sampled_from([1, 3]),
    act=st.sampled_from([None, "prelu", "maxout", "hardtanh"]), pool=st.booleans(), residual=st.booleans(),
    quantizers=st.sampled_from([("adabin", "adabin")] * 4 + [("adabin", "xnor"), ("sign", "adabin")])))


def check_adabin_network(arch):
    arch = dict(arch)
    seed = arch.pop("seed")
    if arch["residual"]:
        arch.update(c1=arch["c0"], stride1=1, k1=3, pad1=1)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = AdaBinNet(**arch)
    net(torch.zeros(2, 3, 12, 12))  # materialize the lazy head
    randomize(net, rng)
    net.eval()
    model = to_onnx(net, (1, 3, 12, 12))
    deploy = lower(model)
    assert len(layer_convs(deploy)) == 2
    x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    compared, differing, outside, ref, got = compare_decisions(model, deploy, x, tie_band=1e-5)
    # float32 rounding may only move a decision whose pre-activation lies within rounding of the threshold
    assert outside == 0, (differing, compared)
    if differing == 0:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with torch.no_grad():
        np.testing.assert_allclose(ref, net(torch.tensor(x)).numpy(), rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    return differing


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(arch=ada_strategy)
def test_random_adabin_networks_deploy_equals_export(arch):
    assert check_adabin_network(arch) == 0


@pytest.mark.slow
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(arch=ada_strategy)
def test_300_random_adabin_networks_deploy_equals_export(arch):
    check_adabin_network(arch)


# --------------------------------------------------------------------- the published AdaBin ResNet-20

def _fixture_inputs():
    rng = np.random.default_rng(0)
    random = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    structured = np.stack([np.full((3, 32, 32), v, np.float32) for v in (-2.0, 0.0, 0.5, 2.2)]
                          + [np.broadcast_to(((xx // 4) % 2 * 2.0 - 1.0).astype(np.float32), (3, 32, 32))]
                          + [np.broadcast_to((((xx + yy) % 2) * 2.0 - 1.0).astype(np.float32), (3, 32, 32))]
                          + [np.broadcast_to((yy / 31.0 * 4 - 2).astype(np.float32), (3, 32, 32))])
    return np.concatenate([random, structured, 3 * random[:2]])


@pytest.fixture(scope="module")
def adabin_resnet20():
    if not FIXTURE.is_file():
        pytest.skip("needs ../shared/fixtures/adabin_resnet20_cifar10/model.th")
    net = bnnc.import_checkpoint(FIXTURE, model="adabin_resnet20").eval()
    model = to_onnx(net, (1, 3, 32, 32))
    return net, model, lower(model)


def test_adabin_resnet20_folds_every_binary_conv(adabin_resnet20):
    _, model, deploy = adabin_resnet20
    convs = layer_convs(deploy)
    exported = [n.name for n in model.graph.node if n.op_type == "BinaryConv2d"]
    assert len(exported) == 18 and sorted(_attr(n, "source").decode() for n in convs) == sorted(exported)
    assert all(_attr(n, "output") == b"float" for n in convs)  # residual add after each: float epilogue
    # one S_a window sum per conv (each quantizer feeds one conv), 1/Cout of the main popcount work
    assert [n.op_type for n in deploy.graph.node].count("BinaryConv2dPacked") == 36
    assert "BatchNormalization" in [n.op_type for n in model.graph.node if n.input[0].startswith("binary_conv2d")]
    assert all(not n.input[0].startswith("binary_conv2d") for n in deploy.graph.node
               if n.op_type == "BatchNormalization")


def test_adabin_resnet20_deploy_agrees_exactly(adabin_resnet20):
    net, model, deploy = adabin_resnet20
    x = _fixture_inputs()
    compared, differing, _, ref, got = compare_decisions(model, deploy, x)
    assert compared == len(x) * 16 * 32 * 32 * 7 + len(x) * 32 * 16 * 16 * 6 + len(x) * 64 * 8 * 8 * 5
    assert differing == 0
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    with torch.no_grad():
        np.testing.assert_allclose(ref, net(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_adabin_resnet20_deploy_is_small(adabin_resnet20):
    """Packed weights plus small epilogue tables (border tables, constant-term kernels, per-channel scales):
    the binary layers shrink more than 8× (measured 11.6×; 16-channel layers fill half a 32-bit word)."""
    _, model, deploy = adabin_resnet20
    binary = sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer
                 if i.name.endswith("binary_weight"))
    convs = layer_convs(deploy)
    names = {i for n in convs for i in n.input[1:]} | {
        i for n in deploy.graph.node if n.name.endswith(("/sa_mul", "/const_conv")) for i in n.input[1:]}
    packed = sum(onnx.numpy_helper.to_array(i).nbytes for i in deploy.graph.initializer if i.name in names)
    assert binary == 4 * 9 * (16 * 16 * 6 + 16 * 32 + 32 * 32 * 5 + 32 * 64 + 64 * 64 * 5)
    assert packed * 8 <= binary, (packed, binary)


# ---------------------------------------------------------------- explicit ±1 ("one") padding, deploy.md §4

def _with_explicit_pad(model: onnx.ModelProto, value_of) -> onnx.ModelProto:
    """Move the conv's zero padding into a ``Pad`` between the quantizer and the conv, holding the value
    ``value_of(p, q)`` (a binary level: padded positions then hold s = ±1, not 0)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    quant = next(n for n in g.node if n.op_type == "SignBinarize")
    conv = next(n for n in g.node if n.op_type == "BinaryConv2d")
    pads = list(_attr(conv, "pads"))
    next(a for a in conv.attribute if a.name == "pads").ints[:] = [0, 0, 0, 0]
    value = np.float32(value_of(np.float32(inits[quant.input[2]][0]), np.float32(inits[quant.input[3]][0])))
    g.initializer.extend([
        onnx.numpy_helper.from_array(np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64), "pad_amounts"),
        onnx.numpy_helper.from_array(np.array(value, np.float32), "pad_value")])
    conv.input[0] = "padded_bits"
    index = list(g.node).index(conv)
    g.node.insert(index, onnx.helper.make_node("Pad", [quant.output[0], "pad_amounts", "pad_value"], ["padded_bits"],
                                               name="explicit_pad", mode="constant"))
    return m


@pytest.mark.parametrize("level,aq,wq", [(1, "adabin", "adabin"), (-1, "adabin", "adabin"), (1, "sign", "xnor"),
                                         (-1, "sign", "adabin"), (0, "adabin", "adabin")])
def test_explicit_level_padding_is_lowered_and_recorded(rng, level, aq, wq):
    net = adabin_layer(rng, 37, 6, 3, 2, 1, bn=True, aq=aq, wq=wq)
    base = to_onnx(net, (1, 37, 9, 9))
    model = _with_explicit_pad(base, lambda p, q: p * level + q if level else 0.0)  # level 0: zero padding
    deploy = lower(model)
    (conv,) = layer_convs(deploy)
    assert {p.key: p.value for p in conv.metadata_props}[PADDING_KEY] == {1: "one", -1: "minus_one", 0: "zero"}[level]
    assert list(_attr(conv, "pads")) == [1, 1, 1, 1]
    ops = [n.op_type for n in deploy.graph.node]
    assert "Pad" not in ops and ("Conv" in ops) == (level == 0 and aq == "adabin")
    x = rng.standard_normal((3, 37, 9, 9)).astype(np.float32)
    ref = OrtReferenceRunner(model).run(x)
    got = NumpyDeployRunner(deploy).run(x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    if level:  # and it is not the zero-padded layer's answer
        zero = OrtReferenceRunner(base).run(x)
        assert np.abs(zero - ref).max() > 1e-3 * np.abs(ref).max()


def test_pad_with_a_value_that_is_no_level_falls_back(rng):
    net = adabin_layer(rng, 5, 3, 3, 1, 1)
    model = _with_explicit_pad(to_onnx(net, (1, 5, 6, 6)), lambda p, q: 0.37)
    with pytest.warns(FallbackWarning, match="not a binary level"):
        deploy = to_deploy(model)
    x = rng.standard_normal((2, 5, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(NumpyDeployRunner(deploy).run(x), OrtReferenceRunner(model).run(x), rtol=1e-5,
                               atol=1e-5)
