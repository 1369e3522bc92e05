"""ONNX Runtime backend (bnnc.runtimes.ort): custom-op library and portable rewrite vs the NumPy references.

Every deploy op is checked bit for bit against bnnc.ops.deploy on random inputs, on each kernel family the
CPU has (forced with BNNC_ORT_ISA), and in portable mode (standard ONNX ops only).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnnc.ops import deploy as K

ort_rt = pytest.importorskip("bnnc.runtimes.ort")

ISAS = ["amx", "avx512", "avx2", "portable"]
CHANNELS = [1, 31, 33, 70]
# (kernel, stride, pad)
GEOMS = [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 2, 0), (3, 1, 0)]


@pytest.fixture(scope="module")
def lib():
    if shutil.which("g++") is None and not __import__("os").environ.get("BNNC_ORT_LIBRARY"):
        pytest.skip("no g++ to build the bnnc ONNX Runtime library")
    return ort_rt.library_path()


@pytest.fixture(params=ISAS)
def isa(request, lib, monkeypatch):
    try:
        got = ort_rt.resolve_isa(request.param, lib)
    except ValueError:
        pytest.skip(f"this CPU/build has no {request.param} kernels")
    assert got == request.param
    monkeypatch.setenv("BNNC_ORT_ISA", request.param)
    return request.param


def _model(node, inputs, inits=(), out_type=TensorProto.UINT32):
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(node.output[0], out_type, None)],
                          [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.bnnc", 1)],
                             ir_version=10)


def _run(model, feeds, mode, lib=None, threads=1):
    r = ort_rt.OrtDeployRunner(model, num_threads=threads, mode=mode, lib=lib)
    return r.run_feeds(feeds)[0]


def _same(got, ref, what):
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype}{got.shape} vs {ref.dtype}{ref.shape}"
    # bitwise comparison (floats included: same rounding, -0.0 vs 0.0 would count)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), f"{what}: values differ"


def _rand_bits(rng, shape):
    return K.pack_bits(rng.random(shape) < 0.5)


# ----------------------------------------------------------------------------------------------------
# single-op graphs


def conv_case(rng, c, o, k, s, p, mode, n=2, h=9, w=11, dil=1, wide_dir=False):
    rc, rv = K.border_classes(h, k, s, p, p, dil)
    cc, cv = K.border_classes(w, k, s, p, p, dil)
    x = _rand_bits(rng, (n, h, w, c))
    wp = _rand_bits(rng, (o, k, k, c))
    kk = k * k * c
    e = rng.integers(-kk, kk + 1, (o, len(rv), len(cv))).astype(np.int32)
    if mode == "float":
        p0 = rng.standard_normal(o).astype(np.float32)
        p1 = (rng.standard_normal(o) * 3).astype(np.float32)
    else:
        p0 = rng.integers(-3, 4, o).astype(np.int32) if wide_dir else rng.integers(-1, 2, o).astype(np.int32)
        p1 = rng.integers(-kk // 2, kk // 2 + 2, o).astype(np.int32)
    attrs = dict(in_channels=c, out_channels=o, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
                 dilations=[dil, dil], output=mode)
    node = helper.make_node("BinaryConv2dPacked", ["X", "W", "E", "RC", "CC", "P0", "P1"], ["Y"], domain="ai.bnnc",
                            source="test", **attrs)
    model = _model(node, [helper.make_tensor_value_info("X", TensorProto.UINT32, None)],
                   [("W", wp), ("E", e), ("RC", rc.astype(np.int32)), ("CC", cc.astype(np.int32)), ("P0", p0),
                    ("P1", p1)], TensorProto.FLOAT if mode == "float" else TensorProto.UINT32)
    ref = K.binary_conv2d_packed(x, wp, e, rc, cc, p0, p1, **attrs)
    return model, {"X": x}, ref


def pack_case(rng, c, rank, with_t):
    shape = (2, c, 5, 7) if rank == 4 else (3, c)
    x = rng.standard_normal(shape).astype(np.float32)
    t = (rng.standard_normal(c) * 0.5).astype(np.float32) if with_t else None
    x.reshape(-1)[::7] = 0.0  # ties with the default threshold
    if with_t:  # exact ties with T
        x[:, :, ...] = np.where(rng.random(shape) < 0.2, t.reshape((1, c) + (1,) * (rank - 2)), x)
    node = helper.make_node("PackSign", ["X", "T"] if with_t else ["X"], ["Y"], domain="ai.bnnc")
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(shape))]
    model = _model(node, inputs, [("T", t)] if with_t else [])
    return model, {"X": x}, K.pack_sign(x, t)


def unpack_case(rng, c, rank):
    shape = (2, 5, 7, c) if rank == 4 else (3, c)
    xp = _rand_bits(rng, shape)
    node = helper.make_node("UnpackSign", ["X"], ["Y"], domain="ai.bnnc", channels=c)
    model = _model(node, [helper.make_tensor_value_info("X", TensorProto.UINT32, [None] * rank)],
                   out_type=TensorProto.FLOAT)
    return model, {"X": xp}, K.unpack_sign(xp, c)


def pool_case(rng, c, k, s, p, mode):
    xp = _rand_bits(rng, (2, 9, 10, c))
    attrs = dict(channels=c, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, mode=mode)
    node = helper.make_node("MaxPoolBits", ["X"], ["Y"], domain="ai.bnnc", **attrs)
    model = _model(node, [helper.make_tensor_value_info("X", TensorProto.UINT32, None)])
    return model, {"X": xp}, K.maxpool_bits(xp, **attrs)


POOLS = [(2, 2, 0), (3, 2, 1), (3, 1, 1)]


def _conv_cases(seed):
    rng = np.random.default_rng(seed)
    for mode in ("bits", "float"):
        for c in CHANNELS:
            o = {1: 33, 31: 1, 33: 70, 70: 31}[c]  # every out-channel count too, crossed with the inputs
            for k, s, p in GEOMS:
                yield f"{mode} c={c} o={o} k={k} s={s} p={p}", conv_case(rng, c, o, k, s, p, mode)
    # dilation, general directions (|P0| > 1) and a wider output
    yield "bits dilation 2", conv_case(rng, 33, 40, 3, 1, 2, "bits", dil=2)
    yield "bits |P0|>1", conv_case(rng, 70, 64, 3, 1, 1, "bits", wide_dir=True)
    yield "float o=64", conv_case(rng, 64, 64, 3, 1, 1, "float", h=8, w=8)
    # rows wider than 16 pixels (the transposed 16×16 float store) and taller than one AMX row block
    yield "float wide rows", conv_case(rng, 64, 40, 3, 1, 1, "float", n=1, h=40, w=35)
    yield "bits wide rows", conv_case(rng, 96, 48, 3, 1, 1, "bits", n=1, h=40, w=35)
    yield "float stride 2 wide", conv_case(rng, 33, 33, 3, 2, 1, "float", n=1, h=21, w=40)


def _other_cases(seed):
    rng = np.random.default_rng(seed)
    for c in CHANNELS:
        for rank in (4, 2):
            for with_t in (False, True):
                yield f"PackSign c={c} rank={rank} T={with_t}", pack_case(rng, c, rank, with_t)
            yield f"UnpackSign c={c} rank={rank}", unpack_case(rng, c, rank)
        for k, s, p in POOLS:
            for mode in ("or", "and"):
                yield f"MaxPoolBits c={c} k={k} s={s} p={p} {mode}", pool_case(rng, c, k, s, p, mode)


def test_conv_library_each_isa(isa, lib):
    for what, (model, feeds, ref) in _conv_cases(1):
        _same(_run(model, feeds, "library", lib), ref, f"[{isa}] {what}")


def test_conv_library_weights_as_inputs_and_repeated_runs(isa, lib):
    """W/E/P0/P1 as graph inputs (prepared per call) and as initializers (prepared once per session,
    then reused for every run): both agree with the reference, run after run."""
    rng = np.random.default_rng(7)
    for mode in ("bits", "float"):
        model, feeds, ref = conv_case(rng, 70, 40, 3, 1, 1, mode, n=1, h=19, w=21)
        g = model.graph
        moved = [i for i in g.initializer if i.name in ("W", "E", "P0", "P1")]
        dyn = onnx.ModelProto()
        dyn.CopyFrom(model)
        del dyn.graph.initializer[:]
        dyn.graph.initializer.extend([i for i in g.initializer if i not in moved])
        dyn.graph.input.extend([helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in moved])
        dyn_feeds = dict(feeds, **{i.name: numpy_helper.to_array(i) for i in moved})
        _same(_run(dyn, dyn_feeds, "library", lib), ref, f"[{isa}] {mode} weights as inputs")
        r = ort_rt.OrtDeployRunner(model, num_threads=1, mode="library", lib=lib)
        for _ in range(2):
            x2 = _rand_bits(rng, feeds["X"].shape[:3] + (70,))
            attrs = {a.name: helper.get_attribute_value(a) for a in g.node[0].attribute if a.name != "source"}
            attrs["output"] = attrs["output"].decode()
            init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
            want = K.binary_conv2d_packed(x2, init["W"], init["E"], init["RC"], init["CC"], init["P0"], init["P1"],
                                          **attrs)
            _same(r.run_feeds({"X": x2})[0], want, f"[{isa}] {mode} repeated run")


def test_other_ops_library(lib):
    for what, (model, feeds, ref) in _other_cases(2):
        _same(_run(model, feeds, "library", lib), ref, what)


def test_conv_library_threads(lib):
    model, feeds, ref = conv_case(np.random.default_rng(3), 64, 70, 3, 1, 1, "bits", n=3, h=12, w=12)
    _same(_run(model, feeds, "library", lib, threads=2), ref, "2 threads")


def test_portable_single_ops():
    for what, (model, feeds, ref) in list(_conv_cases(1)) + list(_other_cases(2)):
        port = ort_rt.to_portable(model)
        assert all(n.domain in ("", "ai.onnx") for n in port.graph.node), what
        assert all(o.domain in ("", "ai.onnx") for o in port.opset_import), what
        _same(_run(model, feeds, "portable"), ref, f"portable {what}")


# ----------------------------------------------------------------------------------------------------
# a small multi-op deploy graph


def multi_op_model(seed=4):
    """PackSign → conv(bits) → MaxPoolBits → conv(float) → Flatten → Gemm, intermediates as outputs."""
    rng = np.random.default_rng(seed)
    n, c, h = 2, 3, 12
    c1, c2, classes = 40, 33, 10
    t = (rng.standard_normal(c) * 0.1).astype(np.float32)
    w1 = _rand_bits(rng, (c1, 3, 3, c))
    rc1, rv1 = K.border_classes(h, 3, 1, 1, 1)
    e1 = rng.integers(-27, 28, (c1, len(rv1), len(rv1))).astype(np.int32)
    d1 = rng.integers(-1, 2, c1).astype(np.int32)
    t1 = rng.integers(-6, 7, c1).astype(np.int32)
    h2 = K.conv_output_size(h, 2, 2, 0, 0)
    w2 = _rand_bits(rng, (c2, 3, 3, c1))
    rc2, rv2 = K.border_classes(h2, 3, 2, 1, 1)
    e2 = rng.integers(-360, 361, (c2, len(rv2), len(rv2))).astype(np.int32)
    m2 = rng.standard_normal(c2).astype(np.float32)
    b2 = rng.standard_normal(c2).astype(np.float32)
    h3 = len(rc2)
    gw = (rng.standard_normal((c2 * h3 * h3, classes)) * 0.1).astype(np.float32)
    gb = rng.standard_normal(classes).astype(np.float32)
    conv = dict(kernel_shape=[3, 3], dilations=[1, 1], domain="ai.bnnc", source="test")
    nodes = [
        helper.make_node("PackSign", ["x", "t"], ["a0"], domain="ai.bnnc"),
        helper.make_node("BinaryConv2dPacked", ["a0", "w1", "e1", "rc1", "rc1", "d1", "t1"], ["a1"], in_channels=c,
                         out_channels=c1, strides=[1, 1], pads=[1, 1, 1, 1], output="bits", **conv),
        helper.make_node("MaxPoolBits", ["a1"], ["a2"], domain="ai.bnnc", channels=c1, kernel_shape=[2, 2],
                         strides=[2, 2], pads=[0, 0, 0, 0], mode="or"),
        helper.make_node("BinaryConv2dPacked", ["a2", "w2", "e2", "rc2", "rc2", "m2", "b2"], ["a3"], in_channels=c1,
                         out_channels=c2, strides=[2, 2], pads=[1, 1, 1, 1], output="float", **conv),
        helper.make_node("Flatten", ["a3"], ["a4"]),
        helper.make_node("Gemm", ["a4", "gw", "gb"], ["y"]),
    ]
    inits = [("t", t), ("w1", w1), ("e1", e1), ("rc1", rc1.astype(np.int32)), ("d1", d1), ("t1", t1), ("w2", w2),
             ("e2", e2), ("rc2", rc2.astype(np.int32)), ("m2", m2), ("b2", b2), ("gw", gw), ("gb", gb)]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)] + [
        helper.make_tensor_value_info(v, ty, None)
        for v, ty in [("a1", TensorProto.UINT32), ("a2", TensorProto.UINT32), ("a3", TensorProto.FLOAT)]]
    g = helper.make_graph(nodes, "multi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c, h, h])],
                          outs, [numpy_helper.from_array(a, nm) for nm, a in inits])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.bnnc", 1)],
                              ir_version=10)
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    return model, x


@pytest.mark.parametrize("mode", ["library", "portable"])
def test_multi_op_graph(mode, lib):
    from bnnc.runtimes.numpy_ref import NumpyDeployRunner

    model, x = multi_op_model()
    ref = NumpyDeployRunner(model).run_all(x)
    r = ort_rt.OrtDeployRunner(model, num_threads=1, mode=mode)
    got = dict(zip(["y", "a1", "a2", "a3"], r.run_feeds({"x": x})))
    for k in ("a1", "a2", "a3"):
        _same(got[k], ref[k], f"{mode} {k}")
    assert np.any(ref["a2"]) and np.any(ref["a2"] != ref["a2"].max())  # not a degenerate graph
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-5)  # Gemm: float sums, order may differ
    np.testing.assert_array_equal(r.run(x), got["y"])


# ----------------------------------------------------------------------------------------------------
# fused element-wise chains (bnnc.runtimes.ort.fuse → ai.bnnc.ort::BinaryConv2dPackedChain)


def chain_case(rng, c, o, k, s, p, n=2, h=19, w=35, order=("res", "add", "prelu", "mul"), pack=None):
    """Float conv → the element-wise ops in `order` (res: Add of a full-shape graph input R, add / mul:
    per-channel [1, O, 1, 1] initializers, prelu: [O, 1, 1] slopes with zeros and negatives, clip: scalar
    bounds), with the
    float32 NumPy reference of the same ops applied one after another. pack="T" / "0": a PackSign of the
    result (thresholds T, some equal to outputs / no threshold) as a second graph output; the reference is
    then (float, bits)."""
    model, feeds, y = conv_case(rng, c, o, k, s, p, "float", n=n, h=h, w=w)
    g = model.graph
    conv_out = g.node[0].output[0]
    cur, v = conv_out, y
    del g.output[:]
    r = (rng.standard_normal(y.shape) * 2).astype(np.float32)
    r.reshape(-1)[::11] = -v.reshape(-1)[::11]  # exact cancellations: v + r == 0
    for i, kind in enumerate(order):
        out = f"t{i}"
        if kind == "res":
            g.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, list(y.shape)))
            g.node.append(helper.make_node("Add", ["R", cur] if i % 2 else [cur, "R"], [out]))
            feeds["R"] = r
            v = (v + r).astype(np.float32)
        elif kind in ("clip", "clip_hi"):  # Hardtanh-like bounds; clip_hi: no lower bound ("" input)
            lo, hi = np.float32(-0.5), np.float32(0.75)
            g.initializer.extend([numpy_helper.from_array(lo, f"lo{i}"), numpy_helper.from_array(hi, f"hi{i}")])
            g.node.append(helper.make_node("Clip", [cur, "" if kind == "clip_hi" else f"lo{i}", f"hi{i}"], [out]))
            v = np.minimum(v if kind == "clip_hi" else np.maximum(v, lo), hi).astype(np.float32)
        else:
            shape = (o, 1, 1) if kind == "prelu" else (1, o, 1, 1)
            cst = rng.standard_normal(shape).astype(np.float32)
            cst.reshape(-1)[::4] = 0.0
            g.initializer.append(numpy_helper.from_array(cst, f"c{i}"))
            op = {"add": "Add", "mul": "Mul", "prelu": "PRelu"}[kind]
            g.node.append(helper.make_node(op, [cur, f"c{i}"], [out]))
            c4 = cst.reshape(1, o, 1, 1)
            if kind == "add":
                v = v + c4
            elif kind == "mul":
                v = v * c4
            else:
                v = np.where(v < 0, v * c4, v)
            v = v.astype(np.float32)
        cur = out
    g.value_info.append(helper.make_tensor_value_info(conv_out, TensorProto.FLOAT, list(y.shape)))
    g.output.append(helper.make_tensor_value_info(cur, TensorProto.FLOAT, list(y.shape)))
    if pack is None:
        return model, feeds, v
    t = None
    if pack == "T":
        t = rng.standard_normal(o).astype(np.float32)
        t[::2] = v[0, ::2, 0, 0]  # exact ties
        g.initializer.append(numpy_helper.from_array(t, "T"))
    g.node.append(helper.make_node("PackSign", [cur, "T"] if t is not None else [cur], ["bits"], domain="ai.bnnc"))
    g.output.append(helper.make_tensor_value_info("bits", TensorProto.UINT32, None))
    return model, feeds, (v, K.pack_sign(v, t))


def _chain_cases(seed):
    rng = np.random.default_rng(seed)
    yield "bi-real (res)", chain_case(rng, 64, 40, 3, 1, 1, order=("res",)), 1
    yield "reactnet (res add prelu add)", chain_case(rng, 70, 64, 3, 1, 1, order=("res", "add", "prelu", "add")), 4
    yield "all kinds, stride 2", chain_case(rng, 33, 70, 3, 2, 1, order=("mul", "res", "prelu", "add")), 4
    yield "1x1, narrow rows", chain_case(rng, 31, 17, 1, 1, 0, h=5, w=7, order=("add", "prelu")), 2
    yield "ir-net (res clip), clip without min", chain_case(rng, 16, 16, 3, 1, 1, order=("res", "clip", "clip_hi")), 3


def test_fused_chain_each_isa(isa, lib):
    for what, (model, feeds, ref), nfused in _chain_cases(11):
        fused, removed = ort_rt.fuse_chains(model)
        assert removed == nfused, what
        assert [(n.domain, n.op_type) for n in fused.graph.node] == [("ai.bnnc.ort", "BinaryConv2dPackedChain")]
        r = ort_rt.OrtDeployRunner(model, num_threads=1, mode="library", lib=lib)
        assert r.fused_nodes == nfused
        _same(r.run_feeds(feeds)[0], ref, f"[{isa}] {what}")
        plain = ort_rt.OrtDeployRunner(model, num_threads=1, mode="library", lib=lib, fuse=False)
        assert plain.fused_nodes == 0
        _same(plain.run_feeds(feeds)[0], ref, f"[{isa}] {what} unfused")


def test_fused_chain_with_packsign_each_isa(isa, lib):
    rng = np.random.default_rng(15)
    cases = [("res + PackSign(T)", chain_case(rng, 64, 40, 3, 1, 1, order=("res",), pack="T"), 2),
             ("reactnet-like + PackSign", chain_case(rng, 33, 70, 3, 2, 1, order=("res", "add", "prelu"), pack="0"), 4),
             ("PackSign only", chain_case(rng, 31, 17, 1, 1, 0, h=5, w=7, order=(), pack="T"), 1)]
    for what, (model, feeds, (ref, ref_bits)), nfused in cases:
        r = ort_rt.OrtDeployRunner(model, num_threads=1, mode="library", lib=lib)
        assert r.fused_nodes == nfused, what
        got, bits = r.run_feeds(feeds)
        _same(got, ref, f"[{isa}] {what}")
        assert np.array_equal(bits, ref_bits), f"[{isa}] {what}: PackSign bits differ"


def _in_place_case(model, feeds):
    """The chain case with its residual R computed in the graph (R = Neg(Rneg)) and the float result read
    through one more node (graph output -Y; both negations exact): R is then an intermediate whose only
    consumer is the fused node, and Y no graph output, so ONNX Runtime gives Y R's buffer (the chain op's
    GetMayInplace) and the kernels must read each residual element before writing Y over it."""
    g = model.graph
    rin = next(i for i in g.input if i.name == "R")
    shape = [d.dim_value for d in rin.type.tensor_type.shape.dim]
    rin.name = "Rneg"
    g.node.insert(0, helper.make_node("Neg", ["Rneg"], ["R"]))
    g.value_info.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, shape))
    yout = g.output[0]
    g.value_info.append(helper.make_tensor_value_info(yout.name, TensorProto.FLOAT, shape))
    g.node.append(helper.make_node("Neg", [yout.name], ["negY"]))
    g.output[0].CopyFrom(helper.make_tensor_value_info("negY", TensorProto.FLOAT, shape))
    feeds = dict(feeds)
    feeds["Rneg"] = -feeds.pop("R")
    return model, feeds


def test_fused_chain_in_place_residual_each_isa(isa, lib):
    rng = np.random.default_rng(16)
    cases = [("bi-real + PackSign(T)", chain_case(rng, 64, 40, 3, 1, 1, order=("res",), pack="T")),
             ("reactnet-like, stride 2 + PackSign", chain_case(rng, 33, 70, 3, 2, 1, order=("res", "add", "prelu"),
                                                             pack="0")),
             ("AMX-sized (auto)", chain_case(rng, 64, 64, 3, 1, 1, n=1, h=32, w=30, order=("res",), pack="0"))]
    for what, (model, feeds, (ref, ref_bits)) in cases:
        model, feeds = _in_place_case(model, feeds)
        r = ort_rt.OrtDeployRunner(model, num_threads=1, mode="library", lib=lib)
        assert [n.op_type for n in ort_rt.fuse_chains(model)[0].graph.node] == ["Neg", "BinaryConv2dPackedChain",
                                                                                 "Neg"]
        for _ in range(2):  # the second run reuses the planned (aliased) buffers
            got, bits = r.run_feeds(feeds)
            _same(-got, ref, f"[{isa}] {what}")
            assert np.array_equal(bits, ref_bits), f"[{isa}] {what}: PackSign bits differ"


def test_fused_chain_threads(lib):
    # large enough (≥ 16 M bit-MACs per image) for the automatic choice to take AMX where the CPU has it
    model, feeds, ref = chain_case(np.random.default_rng(12), 64, 64, 3, 1, 1, n=3, h=32, w=30)
    _same(_run(model, feeds, "library", lib, threads=2), ref, "2 threads")


def test_fuse_chains_stops_where_it_must():
    rng = np.random.default_rng(13)
    model, _, _ = chain_case(rng, 33, 16, 3, 1, 1, order=("add", "res", "mul"))
    g = model.graph
    # t0 also a graph output: the chain stops after the first Add
    m1 = onnx.ModelProto()
    m1.CopyFrom(model)
    m1.graph.output.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, None))
    f1, k1 = ort_rt.fuse_chains(m1)
    assert k1 == 1 and [n.op_type for n in f1.graph.node] == ["BinaryConv2dPackedChain", "Add", "Mul"]
    # a residual that broadcasts (R of shape [N, O, 1, W]) is not fused, nor is anything after it
    m2 = onnx.ModelProto()
    m2.CopyFrom(model)
    r_in = next(i for i in m2.graph.input if i.name == "R")
    r_in.type.tensor_type.shape.dim[2].dim_value = 1
    f2, k2 = ort_rt.fuse_chains(m2)
    assert k2 == 1 and [n.op_type for n in f2.graph.node] == ["BinaryConv2dPackedChain", "Add", "Mul"]
    # a per-channel operand that is not an initializer, or not per channel, ends the chain
    m3 = onnx.ModelProto()
    m3.CopyFrom(model)
    c0 = next(i for i in m3.graph.initializer if i.name == "c0")
    c0.CopyFrom(numpy_helper.from_array(np.ones((1, 16, 1, 35), np.float32), "c0"))
    f3, k3 = ort_rt.fuse_chains(m3)
    assert k3 == 0 and [n.op_type for n in f3.graph.node] == [n.op_type for n in g.node]


def test_chain_errors_are_clear(lib):
    model, feeds, _ = chain_case(np.random.default_rng(14), 33, 16, 3, 1, 1, order=("res", "add"))
    fused, _ = ort_rt.fuse_chains(model)
    node = fused.graph.node[0]
    for a in node.attribute:
        if a.name == "chain":
            a.ints[:] = [1, 9]
    with pytest.raises(Exception, match="unknown chain step 9"):
        ort_rt.OrtDeployRunner(fused, num_threads=1, lib=lib, fuse=False).run_feeds(feeds)
    fused, _ = ort_rt.fuse_chains(model)
    next(i for i in fused.graph.input if i.name == "R").type.tensor_type.ClearField("shape")  # ORT won't check it
    bad = dict(feeds, R=feeds["R"][:, :, :-1])
    with pytest.raises(Exception, match="residual R must have the output's shape"):
        ort_rt.OrtDeployRunner(fused, num_threads=1, lib=lib, fuse=False).run_feeds(bad)


@pytest.mark.slow
@pytest.mark.parametrize("name,removed", [("bireal18", 16 + 15), ("reactnet18", 64 + 15), ("irnet_resnet20", 18 + 18 + 17)])
def test_fused_chains_zoo_models(name, removed, lib, tmp_path):
    """Bi-Real-18 / ReActNet-18 / IR-Net ResNet-20 (random weights, randomized BatchNorm) at 32×32: every
    residual Add (and ReActNet's LearnableBias Adds and PRelus, IR-Net's Hardtanh Clips) folds into the convs,
    and so do the PackSigns of the next blocks (not the last); outputs bit-identical to the unfused graph (the
    Winograd stem, which rounds differently, left out here: tests/test_ort_stem.py)."""
    import torch

    import bnnc
    from bnnc.compile import read_onnx

    torch.manual_seed(0)
    net = bnnc.models.create(name).eval()
    with torch.no_grad():
        for pname, t in net.named_buffers():
            if pname.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif pname.endswith("running_mean"):
                t.uniform_(-0.1, 0.1)
    path = bnnc.export(net, tmp_path / f"{name}.onnx", input_shape=(1, 3, 32, 32))
    deploy = bnnc.fold(read_onnx(str(path))[0])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    fused = ort_rt.OrtDeployRunner(deploy, num_threads=1, mode="library", lib=lib, winograd_stem=False)
    plain = ort_rt.OrtDeployRunner(deploy, num_threads=1, mode="library", lib=lib, fuse=False)
    assert fused.fused_nodes == removed and fused.fused_stems == 0
    _same(fused.run(x), plain.run(x), name)


# ----------------------------------------------------------------------------------------------------
# errors


def _tiny_model():
    return pack_case(np.random.default_rng(5), 3, 2, False)


def test_missing_library_is_a_clear_error(tmp_path):
    model, _, _ = _tiny_model()
    with pytest.raises(ort_rt.OrtLibraryError, match="does not exist"):
        ort_rt.OrtDeployRunner(model, lib=str(tmp_path / "nope.so"))


def test_auto_mode_falls_back_to_portable(tmp_path):
    model, feeds, ref = _tiny_model()
    with pytest.warns(RuntimeWarning, match="portable"):
        r = ort_rt.OrtDeployRunner(model, mode="auto", lib=str(tmp_path / "nope.so"))
    assert r.mode == "portable"
    _same(r.run_feeds(feeds)[0], ref, "auto → portable")


def test_corrupt_library_is_a_clear_error(tmp_path, lib):
    model, _, _ = _tiny_model()
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library at all" * 10)
    with pytest.raises(ort_rt.OrtLibraryError, match="not a 64-bit shared library"):
        ort_rt.OrtDeployRunner(model, lib=str(junk))
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(open(lib, "rb").read()[:4096])
    with pytest.raises(ort_rt.OrtLibraryError, match="truncated"):
        ort_rt.OrtDeployRunner(model, lib=str(truncated))
    import _ctypes  # a valid shared library that is not an ORT custom-op library

    with pytest.raises(ort_rt.OrtLibraryError, match="cannot load"):
        ort_rt.OrtDeployRunner(model, lib=_ctypes.__file__)


def test_bad_isa_request_is_a_clear_error(lib, monkeypatch):
    with pytest.raises(ValueError, match="unknown value"):
        ort_rt.resolve_isa("sse9", lib)
    monkeypatch.setenv("BNNC_ORT_ISA", "sse9")
    model, _, _ = _tiny_model()
    with pytest.raises(ort_rt.OrtLibraryError, match="BNNC_ORT_ISA"):
        ort_rt.OrtDeployRunner(model, lib=lib)


def test_bad_attributes_are_clear_errors(lib):
    model, feeds, _ = conv_case(np.random.default_rng(6), 33, 8, 3, 1, 1, "bits")
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for a in bad.graph.node[0].attribute:
        if a.name == "in_channels":
            a.i = 70  # 3 words, X has 2
    with pytest.raises(Exception, match="in_channels=70"):
        _run(bad, feeds, "library", lib)


# ----------------------------------------------------------------------------------------------------
# timing (reported, not asserted)


def test_report_conv_timing(lib, capsys):
    from bnnc.runtimes.ort.bench import bench

    isas = tuple(i for i in ("amx", "avx512", "avx2") if _has(i, lib))
    res = bench(repeat=10, isas=isas)
    with capsys.disabled():
        print("\nBinaryConv2dPacked N=1 56x56x64->64 3x3 pad 1 bits, 1 thread (median ms): "
              + ", ".join(f"{k}={v * 1e3:.3f}" for k, v in res.items()))
    assert all(v > 0 for v in res.values())


def _has(isa, lib):
    try:
        return ort_rt.resolve_isa(isa, lib) == isa
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------
# native kernel self-test (no ORT): every ISA vs a direct-loop reference; NEON under qemu when available


def _selftest(cross=None):
    import subprocess

    from bnnc.runtimes.ort import build as B

    exe = B.build_selftest(cross=cross, log=lambda *_: None)
    runner = [] if cross is None else [shutil.which(f"qemu-{cross}-static") or shutil.which(f"qemu-{cross}")]
    r = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_native_kernel_selftest(lib):
    out = _selftest()
    assert "OK portable" in out and "FAIL" not in out


def test_neon_kernel_selftest_under_qemu():
    if shutil.which("aarch64-linux-gnu-g++") is None or not (shutil.which("qemu-aarch64-static")
                                                             or shutil.which("qemu-aarch64")):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64(-static)")
    out = _selftest("aarch64")
    assert "OK neon" in out and "FAIL" not in out


def test_library_for_another_arch_is_a_clear_error():
    if shutil.which("aarch64-linux-gnu-g++") is None or __import__("platform").machine() != "x86_64":
        pytest.skip("needs an x86-64 host with aarch64-linux-gnu-g++")
    from bnnc.runtimes.ort import build as B

    other = B.build(cross="aarch64", log=lambda *_: None)
    model, _, _ = _tiny_model()
    with pytest.raises(ort_rt.OrtLibraryError, match="built for aarch64"):
        ort_rt.OrtDeployRunner(model, lib=str(other))


def test_large_batch_runs_in_session_calls(lib):
    """A batch above ``CPU_CALL_BATCH_MAX`` runs as session calls of ``cpu_call_batch`` images (8, 8, 3 here):
    the same outputs as one call of the whole batch, and the NumPy reference, bit for bit."""
    from tests.test_tvm_runtime import _residual_block

    model, x, want = _residual_block(np.random.default_rng(78), n=19, c=16, h=8, w=8, stride=1)
    r = ort_rt.OrtDeployRunner(model, num_threads=1, mode="library", lib=lib)
    sess, sizes = r.session, []

    class Recording:
        def run(self, names, feeds):
            sizes.append(next(iter(feeds.values())).shape[0])
            return sess.run(names, feeds)

    r.session = Recording()
    got = r.run(x)
    assert sizes == [8, 8, 3]
    _same(got, want["y"], "batch in calls")
    _same(got, sess.run(None, {r.input_name: x})[0], "one call")
