"""Deploy passes: folding arithmetic against the float graph, and whole networks export form vs deploy form."""

import warnings

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
from bnnc.passes import arith
from bnnc.passes._graph import FallbackWarning
from bnnc.passes.pipeline import form_of, to_deploy
from bnnc.runtimes.numpy_ref import NumpyDeployRunner
from bnnc.runtimes.reference import OrtReferenceRunner


# ------------------------------------------------------------------------------------------ arithmetic

@pytest.mark.parametrize("cin,h,w,k,stride,pad", [(37, 7, 6, 3, 1, 1), (70, 8, 8, 3, 2, 1), (33, 5, 5, 1, 1, 0),
                                                   (5, 6, 7, 3, 2, 2), (1, 4, 4, 3, 1, 1)])
def test_border_tables_reproduce_zero_padded_conv(rng, cin, h, w, k, stride, pad):
    """Packed conv with border tables == float conv on ±1 inputs with zero padding (deploy.md §4)."""
    x = rng.standard_normal((2, cin, h, w)).astype(np.float32)
    wt = rng.standard_normal((9, cin, k, k)).astype(np.float32)
    s = torch.tensor(np.where(x >= 0, 1.0, -1.0).astype(np.float32))
    ref = torch.nn.functional.conv2d(s, torch.tensor(np.where(wt >= 0, 1.0, -1.0).astype(np.float32)),
                                     stride=stride, padding=pad).numpy()
    e, rc, cc = arith.border_tables(wt, (h, w), [stride] * 2, [pad] * 4, [1, 1])
    got = K.binary_conv2d_packed(K.pack_sign(x), arith.pack_conv_weights(wt), e, rc, cc, np.ones(9, np.float32),
                                 np.zeros(9, np.float32), in_channels=cin, out_channels=9, kernel_shape=[k, k],
                                 strides=[stride] * 2, pads=[pad] * 4, dilations=[1, 1], output="float")
    np.testing.assert_array_equal(got, ref)


def _bn_params(rng, c, gammas):
    return (np.asarray(gammas, np.float32), rng.standard_normal(c).astype(np.float32) * 2,
            rng.standard_normal(c).astype(np.float32) * 5, rng.uniform(0.1, 4, c).astype(np.float32), 1e-5)


def test_integer_threshold_matches_batchnorm_decision(rng):
    """dir·D ≥ thr equals [BN(D·r) ≥ θ] computed by PyTorch's BatchNorm, for every reachable D, with
    positive, negative, zero and tiny gamma (constant channels) and the boundary's neighbours."""
    gammas = [1.3, -0.7, 0.0, 1e-9, -2.5, 0.4, 3.0, -1e-3]
    c, k_max = len(gammas), 9 * 37
    bn = _bn_params(rng, c, gammas)
    r = rng.uniform(0.05, 1.5, c).astype(np.float32)
    theta = rng.standard_normal(c).astype(np.float32) * 0.2
    direction, thr = arith.integer_threshold(r, theta, k_max, bn)
    assert direction[1] == -1 and direction[0] == 1 and direction[2] == 0
    d = np.arange(-k_max, k_max + 1)
    y = torch.tensor((d[None, :] * r[:, None]).astype(np.float32))[None, :, :, None]
    tbn = torch.nn.BatchNorm2d(c, eps=1e-5).eval()
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor(bn[0]))
        tbn.bias.copy_(torch.tensor(bn[1]))
        tbn.running_mean.copy_(torch.tensor(bn[2]))
        tbn.running_var.copy_(torch.tensor(bn[3]))
        z = tbn(y)[0, :, :, 0].numpy()
    float_decision = z >= theta[:, None]
    int_decision = direction[:, None].astype(np.int64) * d[None, :] >= thr[:, None]
    # Independent float implementations may differ only where z is within rounding of θ.
    near_tie = np.abs(z - theta[:, None]) <= 1e-5 * np.maximum(1, np.abs(z))
    assert np.array_equal(float_decision[~near_tie], int_decision[~near_tie])
    # and exactly on the boundary's neighbours for the channels with a boundary
    for ch in np.flatnonzero(direction != 0):
        b = thr[ch] * direction[ch]
        for dd in (b - 1, b, b + 1):
            if -k_max <= dd <= k_max:
                assert (direction[ch] * dd >= thr[ch]) == float_decision[ch, dd + k_max] or near_tie[ch, dd + k_max]


def test_integer_threshold_constant_channels():
    # gamma = 0: BN output is the bias; above θ → always +1, below → always −1
    bn = (np.zeros(2, np.float32), np.array([0.5, -0.5], np.float32), np.zeros(2, np.float32),
          np.ones(2, np.float32), 1e-5)
    direction, thr = arith.integer_threshold(np.ones(2, np.float32), np.zeros(2, np.float32), 10, bn)
    assert list(direction) == [0, 0] and list(thr) == [0, 1]


# ------------------------------------------------------------------------------------- whole networks

class RandomBNN(nn.Module):
    def __init__(self, c0, c1, c2, k1, stride1, pool1, k2, classes=5, pool_before_bn=False, act=None,
                 aq="sign", wq="xnor", residual=False):
        super().__init__()
        self.residual = residual and c0 == c1 and stride1 == 1 and k1 % 2 == 1
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1), nn.BatchNorm2d(c0))
        self.b1 = bnnc.nn.BinaryConv2d(c0, c1, k1, stride=stride1, padding=k1 // 2, input_quantizer=aq,
                                       weight_quantizer=wq)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act1 = {None: nn.Identity(), "prelu": nn.PReLU(c1), "maxout": Maxout(c1), "hardtanh": nn.Hardtanh(),
                     "relu": nn.ReLU()}[act]
        self.pool1 = nn.MaxPool2d(2) if pool1 else nn.Identity()
        self.pool_before_bn = pool_before_bn
        self.b2 = bnnc.nn.BinaryConv2d(c1, c2, k2, padding=k2 // 2, input_quantizer=aq, weight_quantizer=wq)
        self.bn2 = nn.BatchNorm2d(c2)
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(classes))

    def forward(self, x):
        x = self.stem(x)
        if self.residual:  # Bi-Real style shortcut: float epilogue, add, activation, then binarize
            return self.head(self.bn2(self.b2(self.pool1(self.act1(self.bn1(self.b1(x)) + x)))))
        x = self.b1(x)
        x = self.bn1(self.pool1(x)) if self.pool_before_bn else self.pool1(self.act1(self.bn1(x)))
        return self.head(self.bn2(self.b2(x)))


def randomize_batchnorms(model, rng):
    """Random BN statistics with negative, zero and tiny gammas."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                g = rng.standard_normal(c) * 1.5
                g[rng.random(c) < 0.15] = 0.0
                g[rng.random(c) < 0.1] = 1e-8
                m.weight.copy_(torch.tensor(g, dtype=torch.float32))
                m.bias.copy_(torch.tensor(rng.standard_normal(c) * 0.5, dtype=torch.float32))
                m.running_mean.copy_(torch.tensor(rng.standard_normal(c) * 3, dtype=torch.float32))
                m.running_var.copy_(torch.tensor(rng.uniform(0.2, 5, c), dtype=torch.float32))


def randomize_parameters(model, rng):
    """Random values for quantizer parameters (thresholds, α/β…) and activation slopes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("act1."):  # non-negative slopes keep PReLU/Maxout monotone
                p.copy_(torch.tensor(rng.uniform(0.0, 1.5, p.shape), dtype=p.dtype))
            elif "quantizer." in name:
                p.copy_(torch.tensor(rng.uniform(0.05, 0.6, p.shape) * rng.choice([1, 1, -1], p.shape), dtype=p.dtype))


def export_random(seed, **arch):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = RandomBNN(**arch)
    net.train()
    net(torch.zeros(2, 3, 12, 12))  # materialize the lazy head and lazily shaped quantizer parameters
    randomize_batchnorms(net, rng)
    randomize_parameters(net, rng)
    net.eval()
    return net, to_onnx(net, (1, 3, 12, 12)), rng


def assert_deploy_equals_export(export_model, x, expect_bits=True, lowered=True):
    deploy = to_deploy(export_model)
    ops = [n.op_type for n in deploy.graph.node]
    if lowered:
        assert form_of(deploy) == "deploy"
        assert "SignBinarize" not in ops and "BinaryConv2d" not in ops
    outputs = {n.attribute[[a.name for a in n.attribute].index("output")].s.decode()
               for n in deploy.graph.node if n.op_type == "BinaryConv2dPacked"}
    if expect_bits:
        assert outputs == {"bits", "float"}, outputs
    ref = OrtReferenceRunner(export_model).run(x)
    got = NumpyDeployRunner(deploy).run(x)
    # a single flipped binary decision moves the logits by far more than this
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    return deploy


network_strategy = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**16), c0=st.sampled_from([3, 16, 37]), c1=st.sampled_from([5, 33, 37, 40, 70]),
    c2=st.sampled_from([7, 32, 45]), k1=st.sampled_from([1, 3]), stride1=st.sampled_from([1, 2]),
    pool1=st.booleans(), k2=st.sampled_from([1, 3]), act=st.sampled_from([None, "prelu", "maxout", "hardtanh"]),
    quantizers=st.sampled_from([("sign", "xnor"), ("sign", "sign"), ("approx_sign", "magnitude_aware"),
                                ("rsign", "libra_pb"), ("ede", "ede"), ("fda", "fda"), ("adabin", "adabin")]),
    residual=st.booleans(), pool_before_bn=st.booleans()))


def check_random_network(arch):
    arch = dict(arch)
    aq, wq = arch.pop("quantizers")
    seed = arch.pop("seed")
    if arch["residual"]:
        arch.update(c1=arch["c0"], stride1=1, k1=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixed pools fall back to float, with a warning
        net, model, rng = export_random(seed, aq=aq, wq=wq, **arch)
        x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
        assert_deploy_equals_export(model, x, expect_bits=False)
    # and the export form on ORT agrees with PyTorch
    with torch.no_grad():
        np.testing.assert_allclose(OrtReferenceRunner(model).run(x), net(torch.tensor(x)).numpy(), rtol=1e-4,
                                   atol=1e-4)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(arch=network_strategy)
def test_random_networks_deploy_equals_export(arch):
    check_random_network(arch)


@pytest.mark.slow
@pytest.mark.ci
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(arch=network_strategy)
def test_300_random_networks_deploy_equals_export(arch):
    check_random_network(arch)


def test_pool_before_batchnorm_stays_exact_without_fusion():
    """conv → maxpool → BN → sign is not fused into bits (the pool is not an OR there under negative
    gamma); the deploy form must still be exact."""
    _, model, rng = export_random(7, c0=8, c1=37, c2=9, k1=3, stride1=1, pool1=True, k2=3, pool_before_bn=True)
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    deploy = assert_deploy_equals_export(model, x, expect_bits=False)
    assert "MaxPool" in [n.op_type for n in deploy.graph.node]


def test_real_valued_input_falls_back_with_warning():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = bnnc.nn.BinaryConv2d(3, 4, 3, padding=1, input_quantizer=None)

        def forward(self, x):
            return self.conv(x)

    model = to_onnx(Net().eval(), (1, 3, 6, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deploy = to_deploy(model)
    assert any("stays in float" in str(w.message) and "BinaryConv2d" in str(w.message) for w in caught)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(NumpyDeployRunner(deploy).run(x), OrtReferenceRunner(model).run(x), rtol=1e-5, atol=1e-5)


def test_deploy_form_shrinks_binary_weights():
    _, model, _ = export_random(3, c0=16, c1=64, c2=64, k1=3, stride1=1, pool1=False, k2=3)
    deploy = to_deploy(model)
    exp_w = sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer
                if i.name.endswith("binary_weight"))
    dep_w = sum(onnx.numpy_helper.to_array(i).nbytes for i in deploy.graph.initializer
                if i.name.endswith("weight_bits"))
    assert exp_w == 4 * (64 * 16 + 64 * 64) * 9
    assert dep_w == 4 * 64 * 9 * (1 + 2)  # one uint32 word per 32 input channels (16 → 1 word, 64 → 2)


@pytest.mark.parametrize("act", ["prelu", "maxout", "hardtanh", "relu"])
def test_monotone_activations_fold_into_thresholds(act):
    _, model, rng = export_random(11, c0=8, c1=37, c2=9, k1=3, stride1=1, pool1=True, k2=3, act=act)
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    deploy = assert_deploy_equals_export(model, x, expect_bits=True)
    assert "MaxPoolBits" in [n.op_type for n in deploy.graph.node]


def test_max_pool_before_negative_batchnorm_becomes_and():
    net, _, rng = export_random(5, c0=8, c1=33, c2=9, k1=3, stride1=1, pool1=True, k2=3, pool_before_bn=True)
    with torch.no_grad():
        net.bn1.weight.copy_(-net.bn1.weight.abs() - 0.1)  # every channel flips: max → min (AND)
    model = to_onnx(net, (1, 3, 12, 12))
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    deploy = assert_deploy_equals_export(model, x, expect_bits=True)
    modes = [a.s.decode() for n in deploy.graph.node if n.op_type == "MaxPoolBits" for a in n.attribute
             if a.name == "mode"]
    assert modes == ["and"]


@pytest.mark.parametrize("aq,wq", [("sign", "sign"), ("approx_sign", "magnitude_aware"), ("ede", "ede"),
                                   ("rsign", "libra_pb"), ("fda", "fda"), ("adabin", "adabin")])
def test_every_exportable_quantizer_deploys_exactly(aq, wq):
    net, model, rng = export_random(3, c0=8, c1=37, c2=9, k1=3, stride1=2, pool1=False, k2=3, aq=aq, wq=wq)
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(OrtReferenceRunner(model).run(x), net(torch.tensor(x)).numpy(), rtol=1e-4,
                                   atol=1e-4)
    if aq == "adabin":  # affine levels and weight offsets: popcount + S_a + constant terms, float epilogue
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            deploy = assert_deploy_equals_export(model, x, expect_bits=False)
        assert [n.op_type for n in deploy.graph.node].count("BinaryConv2dPacked") == 4  # 2 layers + 2 S_a sums
    else:
        assert_deploy_equals_export(model, x, expect_bits=True)


def test_binary_linear_layers_deploy_exactly_including_ties():
    """Dense layers with even fan-in hit D = 0 (a tie at the threshold) often: still exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 70), nn.BatchNorm1d(70),
                        bnnc.nn.BinaryLinear(70, 33, weight_quantizer="xnor"), nn.BatchNorm1d(33),
                        bnnc.nn.BinaryLinear(33, 10)).eval()
    x = np.random.default_rng(0).standard_normal((64, 3, 4, 4)).astype(np.float32)
    model = to_onnx(net, (1, 3, 4, 4))
    deploy = assert_deploy_equals_export(model, x, expect_bits=False)
    assert [n.op_type for n in deploy.graph.node].count("BinaryConv2dPacked") == 2
    with torch.no_grad():
        np.testing.assert_array_equal(OrtReferenceRunner(model).run(x), net(torch.tensor(x)).numpy())
    got = bnnc.compile(model, runtime="tvm").run(x)
    np.testing.assert_allclose(got, OrtReferenceRunner(model).run(x), rtol=1e-5, atol=1e-5)


def test_deploy_form_keeps_no_dead_initializers():
    _, model, _ = export_random(9, c0=8, c1=37, c2=9, k1=3, stride1=1, pool1=True, k2=3, act="maxout")
    deploy = to_deploy(model)
    used = {i for n in deploy.graph.node for i in n.input}
    assert [i.name for i in deploy.graph.initializer if i.name not in used] == []
