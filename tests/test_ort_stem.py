"""The ONNX Runtime library's float stem (ai.bnnc.ort::WinogradConvMaxPool, written by
bnnc.runtimes.ort.fuse.fuse_stem): MaxPool(Conv(x)) by 1-D Winograd against float64 NumPy, the rewrite's
conditions, and its use in the deploy runner."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort_rt = pytest.importorskip("bnnc.runtimes.ort")
ort = pytest.importorskip("onnxruntime")

from bnnc.runtimes.ort.fuse import fuse_stem  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    if shutil.which("g++") is None and not os.environ.get("BNNC_ORT_LIBRARY"):
        pytest.skip("no g++ to build the bnnc ONNX Runtime library")
    path = ort_rt.library_path()
    try:
        ort_rt.resolve_isa("avx512", path)
    except ValueError:
        pytest.skip("WinogradConvMaxPool needs AVX-512")
    return path


def _conv_ref(x, w, b, pads):
    pt, pl, pb, pr = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    kh, kw = w.shape[2:]
    oh, ow = (xp.shape[2] - kh) // 2 + 1, (xp.shape[3] - kw) // 2 + 1
    y = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for r in range(kh):
        for s in range(kw):
            y += np.einsum("nchw,oc->nohw", xp[:, :, r:r + 2 * oh - 1:2, s:s + 2 * ow - 1:2], w[:, :, r, s].astype(np.float64))
    return y + b.reshape(1, -1, 1, 1)


def _pool_ref(x, k, s, pads):
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=-np.inf)
    oh, ow = (xp.shape[2] - k[0]) // s[0] + 1, (xp.shape[3] - k[1]) // s[1] + 1
    y = np.full((x.shape[0], x.shape[1], oh, ow), -np.inf)
    for r in range(k[0]):
        for c in range(k[1]):
            y = np.maximum(y, xp[:, :, r:r + (oh - 1) * s[0] + 1:s[0], c:c + (ow - 1) * s[1] + 1:s[1]])
    return y


def _stem_model(shape, w, b, pads, pk, ps, ppads, extra=()):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[2, 2], pads=pads,
                              kernel_shape=list(w.shape[2:])),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=pk, strides=ps, pads=ppads)] + list(extra)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ["y"] + [e.output[0] for e in extra]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], outs,
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _session(model, lib, threads=1):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.register_custom_ops_library(lib)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


STEMS = [
    # (x shape, out channels, kernel, conv pads, pool kernel, pool stride, pool pads, threads)
    ((1, 3, 224, 224), 64, 7, [3, 3, 3, 3], [3, 3], [2, 2], [1, 1, 1, 1], 1),  # the ResNet stem: F(4,4) + F(3,4)
    ((2, 3, 38, 45), 16, 7, [3, 3, 3, 3], [3, 3], [2, 2], [1, 1, 1, 1], 2),  # batch 2, odd sizes, 2 threads
    ((1, 3, 23, 180), 8, 8, [3, 4, 4, 3], [3, 3], [2, 2], [1, 1, 1, 1], 1),  # 8 wide, F(4, 4) + F(2, 4)
    ((1, 3, 17, 21), 8, 5, [2, 2, 2, 2], [2, 2], [2, 2], [0, 0, 0, 0], 1),  # 5 wide (F(1, 3)), pool 2×2
    ((1, 4, 30, 41), 16, 6, [2, 2, 3, 3], [3, 3], [1, 2], [1, 0, 1, 1], 1),  # pool row stride 1, uneven pads
]


@pytest.mark.parametrize("shape,o,k,pads,pk,ps,ppads,threads", STEMS)
def test_winograd_stem_matches_numpy(lib, shape, o, k, pads, pk, ps, ppads, threads):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (0.15 * rng.standard_normal((o, shape[1], k, k))).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    model = _stem_model(shape, w, b, pads, pk, ps, ppads)
    fused, n = fuse_stem(model)
    assert n == 1 and [nd.op_type for nd in fused.graph.node] == ["WinogradConvMaxPool"]
    assert sorted(i.name for i in fused.graph.initializer) == ["c.winograd_b", "c.winograd_u"]  # w, b dropped
    got = _session(fused, lib, threads).run(None, {"x": x})[0]
    want = _pool_ref(_conv_ref(x, w, b, pads), pk, ps, ppads)
    assert got.shape == want.shape
    # float32 Winograd sums: errors of the order of the direct conv's (rms ~1e-6 of the output scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fuse_stem_leaves_other_graphs_alone():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 7, 7)).astype(np.float32)
    b = np.zeros(8, np.float32)
    shape = (1, 3, 32, 32)
    base = _stem_model(shape, w, b, [3] * 4, [3, 3], [2, 2], [1] * 4)
    assert fuse_stem(base)[1] == 1
    # the conv output read by another node too
    extra = [helper.make_node("Relu", ["c"], ["r"])]
    assert fuse_stem(_stem_model(shape, w, b, [3] * 4, [3, 3], [2, 2], [1] * 4, extra))[1] == 0
    # output channels not a multiple of 8, a 3×3 kernel, stride 1, a pool of column stride 1, ceil mode
    assert fuse_stem(_stem_model(shape, w[:6], b[:6], [3] * 4, [3, 3], [2, 2], [1] * 4))[1] == 0
    assert fuse_stem(_stem_model(shape, w[:, :, :3, :3].copy(), b, [1] * 4, [3, 3], [2, 2], [1] * 4))[1] == 0
    stride1 = _stem_model(shape, w, b, [3] * 4, [3, 3], [2, 2], [1] * 4)
    next(a for a in stride1.graph.node[0].attribute if a.name == "strides").ints[:] = [1, 1]
    assert fuse_stem(stride1)[1] == 0
    assert fuse_stem(_stem_model(shape, w, b, [3] * 4, [3, 3], [2, 1], [1] * 4))[1] == 0
    ceil = _stem_model(shape, w, b, [3] * 4, [3, 3], [2, 2], [1] * 4)
    ceil.graph.node[1].attribute.append(helper.make_attribute("ceil_mode", 1))
    assert fuse_stem(ceil)[1] == 0


def test_winograd_stem_refuses_a_bad_plan(lib):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3, 7, 7)).astype(np.float32)
    model, _ = fuse_stem(_stem_model((1, 3, 32, 32), w, np.zeros(8, np.float32), [3] * 4, [3, 3], [2, 2], [1] * 4))
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    u = next(i for i in bad.graph.initializer if i.name.endswith("winograd_u"))
    u.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(u)[:, :2], u.name))  # 2 input channels, x has 3
    with pytest.raises(Exception, match="WinogradConvMaxPool: U must be"):
        _session(bad, lib).run(None, {"x": np.zeros((1, 3, 32, 32), np.float32)})


def test_deploy_runner_fuses_the_stem_of_a_resnet18_bnn(lib):
    """Bi-Real-18 at 64²: the library session replaces the stem (one node for conv + max pool), and the
    logits equal the export form's on ONNX Runtime up to float32 rounding, with the same top-1."""
    import torch

    import bnnc
    from bnnc.runtimes.reference import OrtReferenceRunner

    torch.manual_seed(0)
    net = bnnc.models.create("bireal18").eval()
    path = os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"bireal18_stem_{os.getpid()}.onnx")
    try:
        bnnc.export(net, path, input_shape=(2, 3, 64, 64))
        export = onnx.load(path)
    finally:
        if os.path.exists(path):
            os.remove(path)
    deploy = bnnc.fold(export)
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    r = ort_rt.OrtDeployRunner(deploy, num_threads=1, mode="library", lib=lib)
    assert r.fused_stems == 1
    got, ref = r.run(x), OrtReferenceRunner(export).run(x)
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    off = ort_rt.OrtDeployRunner(deploy, num_threads=1, mode="library", lib=lib, fuse=False)
    no_stem = ort_rt.OrtDeployRunner(deploy, num_threads=1, mode="library", lib=lib, winograd_stem=False)
    assert off.fused_stems == 0 and no_stem.fused_stems == 0 and no_stem.fused_nodes > 0
