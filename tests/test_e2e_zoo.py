"""Whole zoo networks end to end: export → deploy passes → TVM / ORT custom ops / ORT portable.

Each network gets random weights and randomized BatchNorm statistics, biases, slopes and thresholds (so
binarization decisions are not trivial), and is checked against its export form on the reference ONNX
Runtime (the ``ai.bnnc`` function bodies, graph optimizations off): the same top-1 prediction on every
image and logits equal to float32 rounding, for random and structured inputs. The fast suite runs small
spatial sizes; ``slow`` runs the rest of the zoo and the ImageNet networks at 224×224.
"""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from bnnc.runtimes.reference import OrtReferenceRunner

import bnnc
from bnnc.export import to_onnx

RUNTIMES = ("tvm", "ort", "ort-portable")
CIFAR = {"irnet_resnet20", "fda_resnet20"}  # built for 32×32 inputs


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, biases, slopes and learnable thresholds (random weights stay)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            u = torch.rand(t.shape, generator=g)
            if leaf == "running_var":
                t.copy_(0.5 + u)
            elif leaf in ("running_mean", "bias"):
                t.copy_(0.2 * (u - 0.5))
            elif leaf in ("alpha_a", "pos_scale", "alpha", "beta", "gamma") or (leaf == "weight" and t.dim() == 1):
                t.copy_(0.5 + u)
            elif leaf in ("beta_a", "neg_scale"):
                t.copy_(0.3 * u)
    return net.eval()


@functools.cache
def exported(name: str, size: int):
    """(export-form model, PyTorch network) of a randomized zoo network at ``size``×``size`` (cached)."""
    torch.manual_seed(0)
    kwargs = {"input_size": size} if name == "real2binary_baseline" else {}
    net = randomize(bnnc.models.create(name, **kwargs))
    return to_onnx(net, (1, 3, size, size)), net


def inputs(size: int, n_random: int = 3, seed: int = 0) -> np.ndarray:
    """Random normal images plus structured ones: constant 0 and ±1, a diagonal ramp, a checkerboard."""
    rng = np.random.default_rng(seed)
    rand = rng.standard_normal((n_random, 3, size, size)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ramp = np.broadcast_to((xx + yy) / (size - 1) - 1.0, (3, size, size))
    checker = np.broadcast_to(np.where((yy + xx) % 2 == 0, 1.5, -1.5), (3, size, size))
    structured = np.stack([np.zeros((3, size, size)), np.ones((3, size, size)), -np.ones((3, size, size)), ramp,
                           checker]).astype(np.float32)
    return np.concatenate([rand, structured])


def assert_same(got: np.ndarray, ref: np.ndarray, what: str, model=None, x=None, runtime: str = "numpy"):
    """Same top-1 and logits within float rounding; a larger difference is accepted only when it comes from a
    float32 near-tie: the first diverging value (export form vs deploy form on ``runtime``, the runtime that
    produced ``got``) is a SignBinarize whose input lies within 1e-6 of its threshold (relative to the layer's
    scale), with a handful of flipped decisions. Such a tie needs a float layer before the sign: AdaBin's
    affine layers compare in float (deploy.md: t ≠ 0), and the float stem's rounding differs between
    runtimes (the Winograd stem: twice the direct conv's error)."""
    assert got.shape == ref.shape, what
    assert np.array_equal(got.argmax(1), ref.argmax(1)), f"{what}: top-1 differs from the export form"
    scale = max(1.0, float(np.abs(ref).max()))
    err = np.abs(got.astype(np.float64) - ref).max(axis=1)
    bad = np.flatnonzero(err > 1e-5 * scale)
    if bad.size == 0:
        return
    assert model is not None, f"{what}: max |diff| {err.max():.3g} (logits up to {scale:.3g})"
    from bnnc.divergence import Side, compare_sides
    from bnnc.passes.pipeline import to_deploy

    ref_side = Side("export", "reference", model)
    r = compare_sides(ref_side, Side("deploy", runtime, to_deploy(model), export=model), x[bad])
    first = r["first"]
    assert first is not None and first["kind"] == "sign" and first["sign_diff"] < 1e-3, (what, first)
    node = next(n for n in model.graph.node if n.output and n.output[0] == first["value"])
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    v = ref_side.values[node.input[0]]
    t = inits.get(node.input[1], ref_side.values.get(node.input[1]))
    gap = np.abs(v - np.asarray(t, np.float32).reshape((1, -1) + (1,) * (v.ndim - 2))).min()
    assert gap <= 1e-6 * max(1.0, float(np.abs(v).max())), (what, first["node"], float(gap))


def check_runtimes(name: str, size: int, runtimes=RUNTIMES, batch_size: int = 2):
    model, net = exported(name, size)
    x = inputs(size)
    ref = OrtReferenceRunner(model).run(x)
    with torch.no_grad():
        torch_out = net(torch.from_numpy(x)).numpy()
    # the reference itself is the PyTorch network (exporter check, independent of the deploy passes)
    assert np.array_equal(torch_out.argmax(1), ref.argmax(1))
    # the logits are not constant: decisions depend on the input
    assert len({tuple(np.round(r, 4)) for r in ref}) == len(ref)
    for rt in runtimes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # AdaBin layers stay in float (named warning)
            cm = bnnc.compile(model, runtime=rt, batch_size=batch_size)
        assert_same(cm.run(x), ref, f"{name} {size}² on {rt}", model, x, runtime=rt)


# ------------------------------------------------------------------------------------------------ fast suite


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", ["bireal18", "reactnet18"])
def test_imagenet_resnet18_bnns_small(name, runtime):
    check_runtimes(name, 32, (runtime,))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cifar_resnet20(runtime):
    check_runtimes("irnet_resnet20", 32, (runtime,))


def test_deploy_form_is_binary():
    """The ResNet-18 BNNs deploy with every binary conv bit-packed (no float fallback left)."""
    from bnnc.ops import DOMAIN

    for name in ("bireal18", "reactnet18"):
        deploy = bnnc.fold(exported(name, 32)[0])
        ops = [n.op_type for n in deploy.graph.node if n.domain == DOMAIN]
        assert "BinaryConv2d" not in ops and "SignBinarize" not in ops
        assert ops.count("BinaryConv2dPacked") == 16  # 4 stages × 2 blocks × 2 binary convs


def test_tvm_float_layers_scheduled_and_shared():
    """Real layers (stem conv, max pool, classifier) compile to bnnc's scheduled CPU kernels, and layers of
    the same shape share one kernel."""
    from bnnc.runtimes.tvm import translate

    deploy = bnnc.fold(exported("bireal18", 32)[0])
    mod, _ = translate(deploy, batch_size=1)
    names = [gv.name_hint for gv in mod.functions]
    assert any(n.startswith("bnnc_conv_") for n in names)
    assert any(n.startswith(("bnnc_maxpool_", "bnnc_conv_maxpool_")) for n in names)  # the stem pool: fused
    assert any(n.startswith("bnnc_dense_") for n in names)
    # a conv fused with its chain (AMX CPUs) is named bnnc_chain_pack_bconv_N / bnnc_chain_bconv_N
    bconv = re.compile(r"bnnc_(?:chain_(?:pack_)?)?bconv_")
    n_bconv_kernels = sum(bool(bconv.match(n)) for n in names)
    n_bconv_calls = len(bconv.findall(mod["main"].script()))
    assert n_bconv_calls == 16 and n_bconv_kernels < 10


@pytest.mark.parametrize("name", ["bireal18", "reactnet18"])
def test_tvm_chains_fused_and_kernels_parallel(name):
    """Every float binary conv's element-wise tail (residual Add, bias Adds, PReLU) is fused with the next
    PackSign into one kernel, no standalone add/where ops remain in the Relax graph, and every bnnc kernel
    has a parallel outer loop (multi-threading)."""
    from bnnc.runtimes.tvm import translate

    deploy = bnnc.fold(exported(name, 32)[0])
    mod, info = translate(deploy, batch_size=1)
    assert info["fused_chains"] == 16  # one per binary conv (the last one without PackSign)
    main = mod["main"].script()
    assert "R.add(" not in main and "R.where(" not in main
    assert main.count("bnnc_chain_pack_") == 15  # one call per binary conv followed by a binary layer
    for gv, f in mod.functions.items():
        if gv.name_hint.startswith("bnnc_"):
            assert "T.parallel" in f.script(), gv.name_hint


# ------------------------------------------------------------------------------------------- scheduled kernels


@pytest.mark.parametrize("shape,o,k,s,p", [
    ((2, 3, 23, 19), 16, 7, 2, 3),  # stem-like, odd sizes, padded columns
    ((1, 5, 9, 40), 12, 3, 1, 1),  # o not a multiple of 8, width over one vector
    ((1, 16, 7, 7), 24, 1, 1, 0),  # 1×1, 7 columns
    ((1, 4, 8, 8), 8, 3, 3, 0),  # stride 3
])
def test_float_conv_kernel_matches_torch(shape, o, k, s, p):
    import tvm
    from bnnc.runtimes.tvm.float_kernels import float_conv2d_primfunc
    from bnnc.runtimes.tvm.target import cpu_target

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((o, shape[1], k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    f, consts, oshape = float_conv2d_primfunc(shape, w, b, [s, s], [p, p, p, p])
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(cpu_target(1)))
    out = tvm.runtime.tensor(np.zeros(oshape, np.float32))
    lib["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(c) for c in consts], out)
    want = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                      torch.from_numpy(b).double(), s, p).numpy()
    assert out.numpy().shape == want.shape
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_float_maxpool_and_dense_kernels():
    import tvm
    from bnnc.runtimes.tvm.float_kernels import float_dense_primfunc, float_maxpool2d_primfunc
    from bnnc.runtimes.tvm.target import cpu_target

    tgt = tvm.target.Target(cpu_target(1))
    rng = np.random.default_rng(1)
    for shape, k, s, p in (((2, 4, 17, 35), 3, 2, 1), ((1, 3, 8, 8), 2, 2, 0), ((1, 2, 5, 5), 3, 1, 1)):
        x = rng.standard_normal(shape).astype(np.float32)
        f, oshape = float_maxpool2d_primfunc(shape, [k, k], [s, s], [p] * 4)
        out = tvm.runtime.tensor(np.zeros(oshape, np.float32))
        tvm.compile(tvm.IRModule({"main": f}), target=tgt)["main"](tvm.runtime.tensor(x), out)
        assert np.array_equal(out.numpy(), torch.nn.functional.max_pool2d(torch.from_numpy(x), k, s, p).numpy())
    for n, kk, j in ((1, 40, 10), (3, 64, 100), (2, 8, 64)):
        a = rng.standard_normal((n, kk)).astype(np.float32)
        bm = rng.standard_normal((kk, j)).astype(np.float32)
        bias = rng.standard_normal(j).astype(np.float32)
        f, consts, oshape = float_dense_primfunc(n, kk, bm, bias)
        out = tvm.runtime.tensor(np.zeros(oshape, np.float32))
        tvm.compile(tvm.IRModule({"main": f}), target=tgt)["main"](
            tvm.runtime.tensor(a), *[tvm.runtime.tensor(c) for c in consts], out)
        want = a.astype(np.float64) @ bm + bias
        np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------ slow suite


@pytest.mark.slow
@pytest.mark.parametrize("name", ["irnet18", "adabin_resnet18_imagenet", "real2binary_baseline", "fda_resnet20",
                                  "reactnet_a"])
def test_zoo_small(name):
    check_runtimes(name, 32 if name in CIFAR else 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bireal18", "reactnet18", "irnet18", "adabin_resnet18_imagenet", "reactnet_a"])
def test_zoo_224(name):
    check_runtimes(name, 224, batch_size=1)
