"""x86 channels-in-lanes binary conv schedule (small output planes): bit-exact against bnnc.ops.deploy."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")

from bnnc.runtimes.tvm import kernels as K
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from bnnc.ops import deploy as ref

pytestmark = pytest.mark.skipif(K._family(None) != "x86", reason="x86 schedule")


def _inputs(rng, n, c, h, w, o, k, pads, output):
    xp = ref.pack_bits(rng.integers(0, 2, (n, h, w, c)).astype(bool))
    wp = ref.pack_bits(rng.integers(0, 2, (o, k, k, c)).astype(bool))
    pt, pl, pb, pr = pads
    rc, rv = ref.border_classes(h, k, 1, pt, pb)
    cc, cv = ref.border_classes(w, k, 1, pl, pr)
    e = rng.integers(-k * k * c, k * k * c + 1, (o, len(rv), len(cv))).astype(np.int32)
    if output == "float":
        p0 = rng.standard_normal(o).astype(np.float32)
        p1 = rng.standard_normal(o).astype(np.float32)
    else:
        p0 = rng.integers(-1, 2, o).astype(np.int32)
        p1 = rng.integers(-6, 7, o).astype(np.int32)
    attrs = {"in_channels": c, "out_channels": o, "kernel_shape": (k, k), "strides": (1, 1),
             "pads": tuple(pads), "dilations": (1, 1), "output": output}
    return [xp, wp, e, rc.astype(np.int32), cc.astype(np.int32), p0, p1], attrs


CASES = [
    # n, c, h, w, o, k, pads, output — Cout not a multiple of 16/32, Cin tail words, pads 0/1/asymmetric
    (1, 70, 7, 7, 37, 3, (1, 1, 1, 1), "float"),
    (1, 70, 7, 7, 37, 3, (1, 1, 1, 1), "bits"),
    (2, 33, 5, 6, 50, 3, (0, 0, 0, 0), "bits"),
    (1, 100, 6, 5, 17, 3, (0, 1, 1, 0), "float"),
    (1, 31, 9, 9, 65, 1, (0, 0, 0, 0), "bits"),
    (1, 129, 4, 4, 96, 3, (1, 1, 1, 1), "float"),
    (1, 64, 14, 14, 33, 3, (1, 1, 1, 1), "bits"),
]


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "ohwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_chan_vec_matches_reference(case, blocked):
    n, c, h, w, o, k, pads, output = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    args, attrs = _inputs(rng, n, c, h, w, o, k, pads, output)
    assert K.conv_weight_layout(args[0].shape, args[1].shape, **attrs) == "blocked"
    layout = "blocked" if blocked else "OHWC"
    f = K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape, weight_layout=layout, **attrs)
    call = list(args)
    if blocked:
        call[1] = K.block_conv_weights(args[1])
    got = K.build_kernel(f)(*call)
    want = ref.binary_conv2d_packed(*args, **attrs)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def test_layout_rule_and_blocking():
    kw = {"pads": (1, 1, 1, 1), "dilations": (1, 1)}
    assert K.conv_weight_layout((1, 7, 7, 16), (512, 3, 3, 16), strides=(1, 1), **kw) == "blocked"
    assert K.conv_weight_layout((1, 56, 56, 2), (64, 3, 3, 2), strides=(1, 1), **kw) == "OHWC"  # big plane
    assert K.conv_weight_layout((1, 14, 14, 8), (256, 3, 3, 8), strides=(2, 2), **kw) == "OHWC"  # strided
    assert K.conv_weight_layout((1, 7, 7, 16), (512, 3, 3, 16), strides=(1, 1), target="arm", **kw) == "OHWC"
    w = np.arange(37 * 3 * 3 * 2, dtype=np.uint32).reshape(37, 3, 3, 2)
    b = K.block_conv_weights(w)
    assert b.shape == (2, 3, 3, 2, 32)
    assert b[1, 2, 0, 1, 4] == w[36, 2, 0, 1] and b[0, 1, 2, 0, 31] == w[31, 1, 2, 0]
    assert not b[1, ..., 5:].any()  # filters 37..63 are zero
    with pytest.raises(ValueError, match="blocked weights"):
        K.binary_conv2d_packed_primfunc((1, 8, 8, 2), (64, 3, 3, 2), (64, 3, 3), out_channels=64,
                                        kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1),
                                        dilations=(1, 1), output="bits", weight_layout="blocked")


@pytest.mark.parametrize("output", ["float", "bits"])
def test_graph_blocks_constant_weights_once(output, monkeypatch):
    """compile_model blocks a constant W at build time (the kernel's W parameter is the blocked shape)
    and the compiled graph equals the reference."""
    monkeypatch.setenv("BNNC_TVM_AMX", "0")  # on an AMX host this conv would take the AMX kernel
    from bnnc.runtimes.tvm import compile_model
    from bnnc.runtimes.tvm.graph import translate

    n, c, h, w, o, k = 1, 45, 7, 7, 40, 3
    rng = np.random.default_rng(7)
    args, attrs = _inputs(rng, n, c, h, w, o, k, (1, 1, 1, 1), output)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    names = ["W", "E", "RowClass", "ColClass", "P0", "P1"]
    inits = [nh.from_array(np.ascontiguousarray(v), nm) for nm, v in zip(names, args[1:])]
    a = {kk: (list(v) if isinstance(v, tuple) else v) for kk, v in attrs.items()}
    nodes = [oh.make_node("PackSign", ["x"], ["xp"], domain="ai.bnnc"),
             oh.make_node("BinaryConv2dPacked", ["xp"] + names, ["y"], domain="ai.bnnc", **a)]
    yshape = [n, o, h, w] if output == "float" else [n, h, w, K.num_words(o)]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [n, c, h, w])],
                      [oh.make_tensor_value_info("y", TP.FLOAT if output == "float" else TP.UINT32, yshape)], inits)
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.bnnc", 1)])
    mod, _ = translate(model, 1, target="cpu")
    conv = [f for gv, f in mod.functions.items() if "bconv" in gv.name_hint]
    assert len(conv) == 1
    bmap = getattr(conv[0], "buffer_map", None)
    wbuf = bmap[conv[0].params[1]] if bmap is not None else conv[0].params[1]
    assert [int(s) for s in wbuf.shape] == [2, 3, 3, 2, 32]  # blocked: ceil(40/32) blocks of 32 filters
    tm = compile_model(model, target="cpu", batch_size=1, num_threads=1)
    want = ref.binary_conv2d_packed(ref.pack_sign(x), *args[1:], **attrs)
    assert np.array_equal(tm.run(x), want)
