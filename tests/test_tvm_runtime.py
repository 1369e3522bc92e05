"""TVM backend: kernels bit-exact against the NumPy references, target detection, whole-graph compile."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from bnnc.ops import deploy as ref  # noqa: E402
from bnnc.runtimes.tvm import kernels as K  # noqa: E402
from bnnc.runtimes.tvm.target import choose_mcpu, cpu_target  # noqa: E402

DOMAIN = "ai.bnnc"
_CACHE: dict = {}


def _kernel(key, make):
    if key not in _CACHE:
        _CACHE[key] = K.build_kernel(make())
    return _CACHE[key]


def _rand_packed(rng, shape_prefix, channels):
    bits = rng.integers(0, 2, tuple(shape_prefix) + (channels,)).astype(bool)
    return ref.pack_bits(bits)


def _run_outs(mod, ins, outs, dev=None):
    """Call a compiled kernel (``mod``: its function) on NumPy inputs with fresh uninitialised outputs
    ``[(shape, dtype), ...]`` (an element the kernel fails to write shows up as garbage) on ``dev`` (default
    the CPU); returns them."""
    dev = tvm.cpu() if dev is None else dev
    args = [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in ins]
    res = [tvm.runtime.tensor(np.empty(s, d), dev) for s, d in outs]
    mod(*args, *res)
    return [r.numpy() for r in res]


def _conv_inputs(rng, n, c, h, w, o, k, s, p, output):
    xp = _rand_packed(rng, (n, h, w), c)
    wp = _rand_packed(rng, (o, k, k), c)
    rc, rv = ref.border_classes(h, k, s, p, p)
    cc, cv = ref.border_classes(w, k, s, p, p)
    # E as in deploy.md §4: Σ_V s_w·s_a = |V|·C − 2·popcount_V(x XOR w) for valid taps V, while the kernel
    # counts padded taps (x = 0) too, i.e. it adds popcount(w) on every padded tap: E = |V|·C + 2·pc_pad(w).
    wbits = ref.unpack_bits(wp, c)  # o,k,k,c
    e = np.zeros((o, len(rv), len(cv)), np.int32)
    for i, vr in enumerate(rv):
        for j, vc in enumerate(cv):
            valid = vr[:, None] & vc[None, :]
            pad_pc = (wbits & ~valid[None, :, :, None]).sum(axis=(1, 2, 3))
            e[:, i, j] = valid.sum() * c + 2 * pad_pc
    if output == "float":
        p0 = rng.standard_normal(o).astype(np.float32)
        p1 = rng.standard_normal(o).astype(np.float32)
    else:
        p0 = rng.integers(-1, 2, o).astype(np.int32)
        p1 = rng.integers(-6, 7, o).astype(np.int32)
    attrs = dict(in_channels=c, out_channels=o, kernel_shape=(k, k), strides=(s, s), pads=(p, p, p, p),
                 dilations=(1, 1), output=output)
    return (xp, wp, e, rc.astype(np.int32), cc.astype(np.int32), p0, p1), attrs


def _true_dot(xp, wp, c, k, s, p):
    """Σ_V s_w·s_a over valid taps, computed on ±1 floats (checks the E convention used above)."""
    xs = np.where(ref.unpack_bits(xp, c), 1, -1).astype(np.int64)  # n,h,w,c
    ws = np.where(ref.unpack_bits(wp, c), 1, -1).astype(np.int64)  # o,k,k,c
    n, h, w, _ = xs.shape
    xpad = np.zeros((n, h + 2 * p, w + 2 * p, c), np.int64)
    xpad[:, p : p + h, p : p + w] = xs
    oh_ = ref.conv_output_size(h, k, s, p, p)
    ow_ = ref.conv_output_size(w, k, s, p, p)
    out = np.zeros((n, ws.shape[0], oh_, ow_), np.int64)
    for y in range(oh_):
        for x in range(ow_):
            win = xpad[:, y * s : y * s + k, x * s : x * s + k]
            out[:, :, y, x] = np.einsum("nabc,oabc->no", win, ws)
    return out


CONV_CASES = [
    # n, c, h, w, o, k, s, p, output
    (1, 1, 5, 6, 3, 3, 1, 1, "bits"),
    (2, 31, 7, 7, 33, 3, 1, 1, "float"),
    (1, 33, 8, 9, 37, 3, 2, 1, "bits"),
    (1, 37, 9, 8, 70, 1, 1, 0, "float"),
    (2, 70, 6, 6, 64, 3, 2, 0, "bits"),
    (1, 64, 10, 10, 64, 3, 1, 1, "float"),
    (1, 64, 6, 7, 31, 1, 2, 0, "bits"),
    (1, 64, 12, 12, 96, 3, 1, 1, "bits"),
    # few input channels on the pixel-vectorized kernel: taps packed several to a word (x86)
    (2, 16, 21, 23, 40, 3, 1, 1, "bits"),   # 16-bit fields (pairs)
    (1, 5, 20, 20, 32, 3, 2, 1, "float"),   # 8-bit fields, stride 2 (phase planes)
    (1, 2, 22, 22, 8, 5, 1, 2, "bits"),     # 2-bit fields, 5x5: 25 taps in two words
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_binary_conv2d_packed(case):
    n, c, h, w, o, k, s, p, output = case
    rng = np.random.default_rng(hash(case) % 2**32)
    args, attrs = _conv_inputs(rng, n, c, h, w, o, k, s, p, output)
    f = K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape, **attrs)
    got = K.build_kernel(f)(*args)
    want = ref.binary_conv2d_packed(*args, **attrs)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def test_e_convention_matches_true_dot():
    rng = np.random.default_rng(7)
    args, attrs = _conv_inputs(rng, 1, 37, 6, 5, 5, 3, 1, 1, "float")
    args = args[:5] + (np.ones(5, np.float32), np.zeros(5, np.float32))
    f = K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape, **attrs)
    got = K.build_kernel(f)(*args)
    assert np.array_equal(got, _true_dot(args[0], args[1], 37, 3, 1, 1).astype(np.float32))


@pytest.mark.parametrize("shape,with_t", [((2, 33, 5, 6), True), ((1, 64, 4, 17), False), ((3, 70), True),
                                          ((2, 1, 3, 3), False), ((2, 70, 8, 6), True), ((1, 64, 4, 28), False)])
def test_pack_sign(shape, with_t):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::7] = 0.0  # exact ties: bit = x >= t
    t = (rng.standard_normal(shape[1]).astype(np.float32) * 0.5) if with_t else None
    if with_t:
        t[0] = 0.0
    k = K.build_kernel(K.pack_sign_primfunc(shape, with_t))
    got = k(x, t) if with_t else k(x)
    assert np.array_equal(got, ref.pack_sign(x, t))


@pytest.mark.parametrize("shape,channels", [((2, 5, 6, 2), 37), ((3, 3), 70), ((1, 4, 4, 1), 1)])
def test_unpack_sign(shape, channels):
    rng = np.random.default_rng(2)
    xp = _rand_packed(rng, shape[:-1], channels)
    got = K.build_kernel(K.unpack_sign_primfunc(shape, channels))(xp)
    assert np.array_equal(got, ref.unpack_sign(xp, channels))


@pytest.mark.parametrize("mode", ["or", "and"])
@pytest.mark.parametrize("cfg", [((2, 7, 8), 37, (2, 2), (2, 2), (0, 0, 0, 0)),
                                 ((1, 9, 9), 64, (3, 3), (2, 2), (1, 1, 1, 1)),
                                 ((1, 6, 5), 31, (3, 3), (1, 1), (1, 1, 1, 1))])
def test_maxpool_bits(cfg, mode):
    (n, h, w), c, ks, st, pads = cfg
    rng = np.random.default_rng(3)
    xp = _rand_packed(rng, (n, h, w), c)
    attrs = dict(channels=c, kernel_shape=ks, strides=st, pads=pads, mode=mode)
    got = K.build_kernel(K.maxpool_bits_primfunc(xp.shape, **attrs))(xp)
    assert np.array_equal(got, ref.maxpool_bits(xp, **attrs))


# --------------------------------------------------------------------------------------------------
# Target detection

SPR = {"avx2", "fma", "bmi2", "popcnt", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd",
       "avx512_vnni", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "avx512_fp16", "avx512_bf16",
       "amx_tile", "movbe", "sse4_2", "ssse3", "cx16"}
ICX = SPR - {"avx512_fp16", "avx512_bf16", "amx_tile"}
SKX = SPR - {"avx512_vnni", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "avx512_fp16", "avx512_bf16",
             "amx_tile"}
HSW = {"avx2", "fma", "bmi2", "popcnt", "movbe", "sse4_2", "ssse3", "cx16"}
OLD = {"sse2", "ssse3"}


@pytest.mark.parametrize("flags,vendor,want", [
    (SPR, "GenuineIntel", "sapphirerapids"),
    (ICX, "GenuineIntel", "icelake-server"),
    (SKX, "GenuineIntel", "skylake-avx512"),
    (HSW, "GenuineIntel", "haswell"),
    (ICX | {"avx_vnni", "avx512_vp2intersect"}, "AuthenticAMD", "znver5"),
    (ICX, "AuthenticAMD", "znver4"),
    (HSW, "AuthenticAMD", "znver2"),
    (HSW, "SomeOtherVendor", "x86-64-v3"),
    (OLD, "GenuineIntel", "x86-64"),
    (set(), "", "x86-64"),
])
def test_choose_mcpu(flags, vendor, want):
    assert choose_mcpu(flags, vendor, known=lambda name: True) == want


def test_choose_mcpu_skips_unknown_cpu():
    assert choose_mcpu(SPR, "GenuineIntel", known=lambda name: name != "sapphirerapids") == "icelake-server"


def test_cpu_target_is_named():
    t = cpu_target(num_threads=3)
    assert t["kind"] == "llvm" and t["num-cores"] == 3
    assert t.get("mcpu") not in (None, "", "native")
    tvm.target.Target(t)  # accepted by TVM


def test_vector_popcount_emitted():
    t = cpu_target()
    if "avx512_vpopcntdq" not in open("/proc/cpuinfo").read():
        pytest.skip("host has no AVX-512 VPOPCNTDQ")
    f = K.binary_conv2d_packed_primfunc((1, 6, 6, 2), (32, 3, 3, 2), (32, 3, 3), out_channels=32,
                                        kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1),
                                        dilations=(1, 1), output="bits")
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(t))
    asm = lib.mod.inspect_source("asm")
    assert "vpopcntd" in asm


# --------------------------------------------------------------------------------------------------
# Whole graph


def _deploy_model(rng):
    """Conv+BN+Relu+MaxPool → PackSign → BinaryConv2dPacked(bits) → MaxPoolBits → BinaryConv2dPacked(float)
    → Flatten → Gemm, input [N,3,12,12] with a symbolic batch dimension."""
    c0, c1, c2, ncls = 37, 40, 10, 7
    inits = {}

    def init(name, arr):
        inits[name] = arr
        return name

    init("w0", rng.standard_normal((c0, 3, 3, 3)).astype(np.float32))
    init("b0", rng.standard_normal(c0).astype(np.float32))
    init("bn_s", rng.uniform(0.5, 1.5, c0).astype(np.float32))
    init("bn_b", rng.standard_normal(c0).astype(np.float32))
    init("bn_m", rng.standard_normal(c0).astype(np.float32) * 0.1)
    init("bn_v", rng.uniform(0.5, 2.0, c0).astype(np.float32))
    init("thr", (rng.standard_normal(c0) * 0.3).astype(np.float32))
    # binary conv 1: 3x3 pad 1 stride 1 on 6x6 → 6x6, bits
    a1, at1 = _conv_inputs(rng, 1, c0, 6, 6, c1, 3, 1, 1, "bits")
    for nm, arr in zip(["w1", "e1", "rc1", "cc1", "p01", "p11"], a1[1:]):
        init(nm, arr)
    # MaxPoolBits 2x2 → 3x3; binary conv 2: 3x3 pad 1 stride 2 on 3x3 → 2x2, float
    a2, at2 = _conv_inputs(rng, 1, c1, 3, 3, c2, 3, 2, 1, "float")
    for nm, arr in zip(["w2", "e2", "rc2", "cc2", "p02", "p12"], a2[1:]):
        init(nm, arr)
    init("fc_w", rng.standard_normal((ncls, c2 * 4)).astype(np.float32))
    init("fc_b", rng.standard_normal(ncls).astype(np.float32))

    def battrs(at, source):
        return dict(in_channels=at["in_channels"], out_channels=at["out_channels"],
                    kernel_shape=list(at["kernel_shape"]), strides=list(at["strides"]), pads=list(at["pads"]),
                    dilations=list(at["dilations"]), output=at["output"], source=source)

    nodes = [
        oh.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        oh.make_node("BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn0"], name="bn0",
                     epsilon=1e-5),
        oh.make_node("Relu", ["bn0"], ["r0"], name="relu0"),
        oh.make_node("MaxPool", ["r0"], ["mp0"], name="mp0", kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("PackSign", ["mp0", "thr"], ["pk"], name="pack", domain=DOMAIN),
        oh.make_node("BinaryConv2dPacked", ["pk", "w1", "e1", "rc1", "cc1", "p01", "p11"], ["bc1"], name="bconv1",
                     domain=DOMAIN, **battrs(at1, "layer1")),
        oh.make_node("MaxPoolBits", ["bc1"], ["mpb"], name="mpbits", domain=DOMAIN, channels=c1,
                     kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0], mode="or"),
        oh.make_node("BinaryConv2dPacked", ["mpb", "w2", "e2", "rc2", "cc2", "p02", "p12"], ["bc2"], name="bconv2",
                     domain=DOMAIN, **battrs(at2, "layer2")),
        oh.make_node("Flatten", ["bc2"], ["fl"], name="flat", axis=1),
        oh.make_node("Gemm", ["fl", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = oh.make_graph(
        nodes, "bnn_deploy",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 12, 12])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["N", ncls])],
        [nh.from_array(v, k) for k, v in inits.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)],
                          ir_version=10)
    return model, inits, (at1, at2)


def _reference(model, inits, attrs, x):
    """Standard-op prefix with onnxruntime, ai.bnnc ops with the NumPy references, Gemm in NumPy."""
    import onnxruntime as ort

    at1, at2 = attrs
    prefix = oh.make_graph(
        [n for n in model.graph.node if n.name in ("conv0", "bn0", "relu0", "mp0")], "prefix",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 12, 12])],
        [oh.make_tensor_value_info("mp0", TP.FLOAT, None)],
        [nh.from_array(inits[k], k) for k in ("w0", "b0", "bn_s", "bn_b", "bn_m", "bn_v")],
    )
    pm = oh.make_model(prefix, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    sess = ort.InferenceSession(pm.SerializeToString(), providers=["CPUExecutionProvider"])
    mp0 = sess.run(None, {"x": x})[0]
    pk = ref.pack_sign(mp0, inits["thr"])
    g = lambda *names: [inits[n] for n in names]  # noqa: E731
    bc1 = ref.binary_conv2d_packed(pk, *g("w1", "e1", "rc1", "cc1", "p01", "p11"), **at1)
    mpb = ref.maxpool_bits(bc1, channels=at1["out_channels"], kernel_shape=(2, 2), strides=(2, 2),
                           pads=(0, 0, 0, 0), mode="or")
    bc2 = ref.binary_conv2d_packed(mpb, *g("w2", "e2", "rc2", "cc2", "p02", "p12"), **at2)
    y = bc2.reshape(bc2.shape[0], -1) @ inits["fc_w"].T + inits["fc_b"]
    return dict(pk=pk, bc1=bc1, mpb=mpb, bc2=bc2, y=y.astype(np.float32))


def _with_output(model, name, elem):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(oh.make_tensor_value_info(name, elem, None))
    return m


def test_whole_graph(tmp_path):
    from bnnc.runtimes.tvm.graph import TVMModel, compile_model

    rng = np.random.default_rng(11)
    model, inits, attrs = _deploy_model(rng)
    x = rng.standard_normal((5, 3, 12, 12)).astype(np.float32)
    want = _reference(model, inits, attrs, x)

    # packed intermediate (bits) must match exactly
    mid = compile_model(_with_output(model, "mpb", TP.UINT32), batch_size=2)
    got_mid = mid.run(x)
    assert got_mid.dtype == np.uint32 and np.array_equal(got_mid, want["mpb"])

    tm = compile_model(model, batch_size=2, num_threads=2)
    assert tm.input_name == "x" and tuple(tm.input_shape) == (2, 3, 12, 12)
    y = tm.run(x)  # 5 = 2 + 2 + 1 (zero-padded last chunk)
    assert y.shape == (5, 7)
    np.testing.assert_allclose(y, want["y"], rtol=1e-5, atol=1e-5 * np.abs(want["y"]).max())
    # the input tensor kept between calls takes each chunk anew (the images in reverse order: same rows)
    assert np.array_equal(tm.run(x[::-1])[::-1], y) and np.array_equal(tm.run(x[:1]), y[:1])

    so = tmp_path / "model.so"
    tm.export_library(str(so))
    import json

    meta = json.loads(json.dumps(tm.meta()))
    loaded = TVMModel.load(str(so), meta)
    assert np.array_equal(loaded.run(x), y)


def test_unsupported_op_names_node():
    from bnnc.runtimes.tvm.graph import compile_model

    graph = oh.make_graph([oh.make_node("Erf", ["x"], ["y"], name="my_erf")], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [1, 4])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    with pytest.raises(ValueError, match="my_erf.*Erf"):
        compile_model(model)


# --------------------------------------------------------------------------------------------------
# Fused epilogue chain: float conv → residual Add → bias Add → PRelu → bias Add → Clip → PackSign


def _residual_block(rng, n=2, c=64, h=7, w=9, stride=1):
    """x → PackSign(T0) → bconv1(float) → Add(x residual) → Add(b1) → PRelu → Add(b2) → Clip(-1, 1) = v →
    PackSign(T1) = pk1 → bconv2(float, stride) → Add(b3) = y. Values on a 1/4 grid so that the float sums
    are exact and many elements land exactly on their thresholds (ties: ``v >= T`` must give 1)."""
    inits = {}

    def init(name, arr):
        inits[name] = arr
        return name

    q = lambda shape, lo, hi: (rng.integers(lo, hi + 1, shape) / 4).astype(np.float32)  # noqa: E731
    init("t0", q(c, -2, 2))
    a1, at1 = _conv_inputs(rng, 1, c, h, w, c, 3, 1, 1, "float")
    a2, at2 = _conv_inputs(rng, 1, c, h, w, c, 3, stride, 1, "float")
    for pre, a in (("1", a1), ("2", a2)):
        for nm, arr in zip(["w", "e", "rc", "cc"], a[1:5]):
            init(nm + pre, arr)
        init("p0" + pre, rng.choice(np.float32([0.25, -0.25, 0.5]), c).astype(np.float32))
        init("p1" + pre, q(c, -4, 4))
    init("b1", q((1, c, 1, 1), -2, 2))
    init("slope", q((c, 1, 1), 0, 2))
    init("b2", q((1, c, 1, 1), -2, 2))
    init("b3", q((1, c, 1, 1), -2, 2))
    init("lo", np.float32(-1.0))
    init("hi", np.float32(1.0))
    init("t1", rng.choice(np.float32([-1.0, -0.5, 0.0, 0.25, 1.0]), c).astype(np.float32))

    def battrs(at):
        return dict(in_channels=c, out_channels=c, kernel_shape=list(at["kernel_shape"]),
                    strides=list(at["strides"]), pads=list(at["pads"]), dilations=[1, 1], output="float")

    nodes = [
        oh.make_node("PackSign", ["x", "t0"], ["pk0"], name="pack0", domain=DOMAIN),
        oh.make_node("BinaryConv2dPacked", ["pk0", "w1", "e1", "rc1", "cc1", "p01", "p11"], ["c1"], name="bconv1",
                     domain=DOMAIN, **battrs(at1)),
        oh.make_node("Add", ["c1", "x"], ["a1"], name="residual"),
        oh.make_node("Add", ["b1", "a1"], ["a2"], name="move1"),
        oh.make_node("PRelu", ["a2", "slope"], ["pr"], name="prelu"),
        oh.make_node("Add", ["pr", "b2"], ["a3"], name="move2"),
        oh.make_node("Clip", ["a3", "lo", "hi"], ["v"], name="clip"),
        oh.make_node("PackSign", ["v", "t1"], ["pk1"], name="pack1", domain=DOMAIN),
        oh.make_node("BinaryConv2dPacked", ["pk1", "w2", "e2", "rc2", "cc2", "p02", "p12"], ["c2"], name="bconv2",
                     domain=DOMAIN, **battrs(at2)),
        oh.make_node("Add", ["c2", "b3"], ["y"], name="move3"),
    ]
    graph = oh.make_graph(nodes, "residual_block", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", c, h, w])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)],
                          [nh.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)],
                          ir_version=10)
    x = q((n, c, h, w), -6, 6)
    # NumPy reference, op by op in float32
    g = lambda *names: [inits[k] for k in names]  # noqa: E731
    c1 = ref.binary_conv2d_packed(ref.pack_sign(x, inits["t0"]), *g("w1", "e1", "rc1", "cc1", "p01", "p11"), **at1)
    v = c1 + x
    v = inits["b1"] + v
    v = np.where(v < 0, v * inits["slope"], v).astype(np.float32)
    v = np.minimum(np.maximum(v + inits["b2"], np.float32(-1)), np.float32(1))
    pk1 = ref.pack_sign(v, inits["t1"])
    c2 = ref.binary_conv2d_packed(pk1, *g("w2", "e2", "rc2", "cc2", "p02", "p12"), **at2)
    want = dict(v=v, pk1=pk1, y=(c2 + inits["b3"]).astype(np.float32))
    return model, x, want


@pytest.mark.parametrize("stride", [1, 2])
def test_fused_chain_pack_matches_reference(stride):
    """The chain after a float binary conv is one kernel (float value + packed bits), and the bits, the
    float value the residual path reads, and the network output equal the NumPy reference, ties included."""
    from bnnc.runtimes.tvm.graph import compile_model, translate

    rng = np.random.default_rng(5 + stride)
    model, x, want = _residual_block(rng, stride=stride)
    ties = int((want["v"] == model_init(model, "t1").reshape(1, -1, 1, 1)).sum())
    assert ties > 50  # the test exercises v == T (bit 1) on many elements

    mod, info = translate(model, batch_size=2)
    assert info["fused_chains"] == 2  # bconv1's chain (+ PackSign) and bconv2's bias add
    script = mod.script()
    assert script.count("bnnc_chain_pack_") >= 1 and "bnnc_pack_sign_" in script  # pack0 stays
    # no separate add / PRelu / clip kernels left
    assert not any(gv.name_hint.startswith(("add", "fused_", "maximum", "where")) for gv in mod.functions)

    for out, elem in (("pk1", TP.UINT32), ("v", TP.FLOAT), ("y", TP.FLOAT)):
        m = _with_output(model, out, elem)
        got = compile_model(m, batch_size=2).run(x)
        assert got.dtype == want[out].dtype and np.array_equal(got, want[out]), out
    # the unfused translation computes the same
    un = compile_model(_with_output(model, "pk1", TP.UINT32), batch_size=2, fuse=False)
    assert un.info["fused_chains"] == 0 and np.array_equal(un.run(x), want["pk1"])


def model_init(model, name):
    return next(nh.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("shape", [(2, 37, 5, 19), (2, 16, 6, 10)])
def test_chain_pack_kernel_partial_word(shape):
    """C not a multiple of 32 (tail bits 0), broadcast operands of every rank, every step kind."""
    rng = np.random.default_rng(3)
    c = shape[1]
    steps = [("add", 0), ("sub", 1), ("rsub", 2), ("mul", 3), ("max", 4), ("min", 5), ("prelu", 6), ("relu",),
             ("neg",)]
    ex_shapes = [shape, (1, c, 1, 1), (c, 1, 1), (1,), (shape[2], 1), (1,) + tuple(shape[1:]), (c, 1, 1)]
    y = rng.standard_normal(shape).astype(np.float32)
    ex = [rng.standard_normal(s).astype(np.float32) for s in ex_shapes]
    t = rng.standard_normal(c).astype(np.float32)
    v = y + ex[0]
    v = v - ex[1]
    v = ex[2] - v
    v = v * ex[3]
    v = np.maximum(v, ex[4])
    v = np.minimum(v, ex[5])
    v = np.where(v < 0, v * ex[6], v)
    v = -np.maximum(v, np.float32(0))
    v = v.astype(np.float32)
    t[:5] = v[0, :5, 0, 0]  # exact ties
    for want_float in (True, False):
        f = K.chain_pack_primfunc(shape, ex_shapes, steps, want_float=want_float)
        lib = K.build_kernel(f).lib
        dev = tvm.cpu()
        args = [tvm.runtime.tensor(a, dev) for a in [y] + ex + [t]]
        outs = ([tvm.runtime.tensor(np.empty(shape, np.float32), dev)] if want_float else []) + \
            [tvm.runtime.tensor(np.zeros((2,) + tuple(shape[2:]) + (K.num_words(c),), np.uint32), dev)]
        lib(*args, *outs)
        if want_float:
            assert np.array_equal(outs[0].numpy(), v)
        assert np.array_equal(outs[-1].numpy(), ref.pack_sign(v, t))


def test_set_num_threads_resizes_pool():
    """set_num_threads picks the workers of TVM's pool, up to every available core (TVM itself would size
    the pool at half the logical cores on x86 and never grow it)."""
    import os

    from bnnc.runtimes.tvm import set_num_threads

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core")
    num = tvm.get_global_func("runtime.NumThreads")
    try:
        for n in (1, 2, cores, 1):
            set_num_threads(n)
            assert int(num()) == n
    finally:
        set_num_threads(cores)


def test_chain_pack_kernel_aarch64_under_qemu(tmp_path):
    """The NEON schedule of the fused chain (packed bits only, and float only) under qemu-aarch64."""
    from bnnc.runtimes.tvm import cross

    if cross.missing_aarch64_tools():
        pytest.skip(f"missing {cross.missing_aarch64_tools()}")
    rng = np.random.default_rng(8)
    shape = (1, 64, 6, 7)
    steps = [("add", 0), ("add", 1), ("prelu", 2), ("max", 3), ("min", 4)]
    ex_shapes = [shape, (1, 64, 1, 1), (64, 1, 1), (1,), (1,)]
    y = (rng.integers(-8, 9, shape) / 4).astype(np.float32)
    ex = [(rng.integers(-4, 5, s) / 4).astype(np.float32) for s in ex_shapes[:3]]
    ex += [np.float32([-1.0]), np.float32([1.0])]
    t = rng.choice(np.float32([-1.0, 0.0, 0.5, 1.0]), 64).astype(np.float32)
    v = np.minimum(np.maximum(np.where(y + ex[0] + ex[1] < 0, (y + ex[0] + ex[1]) * ex[2], y + ex[0] + ex[1]),
                              ex[3]), ex[4]).astype(np.float32)
    bits = cross.QemuKernel(K.chain_pack_primfunc(shape, ex_shapes, steps, want_float=False, target="arm"),
                            workdir=str(tmp_path / "bits"))(y, *ex, t)
    assert np.array_equal(bits, ref.pack_sign(v, t))
    val = cross.QemuKernel(K.chain_pack_primfunc(shape, ex_shapes, steps, pack=False, target="arm"),
                           workdir=str(tmp_path / "float"))(y, *ex)
    assert np.array_equal(val, v)
