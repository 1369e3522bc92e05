"""x86 popcount binary conv with the element-wise chain (+ the next PackSign) in its epilogue (issue #6).

Fused kernel == float conv kernel followed by the chain_pack kernel == NumPy float32 reference, bit for
bit (floats and bits), with many values exactly on their thresholds (``v >= T`` gives 1)."""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")

from bnnc.runtimes.tvm import kernels as K

from bnnc.ops import deploy as ref

pytestmark = pytest.mark.skipif(K._family(None) != "x86", reason="x86 schedules")


@pytest.fixture(autouse=True)
def _no_amx(monkeypatch):
    monkeypatch.setenv("BNNC_TVM_AMX", "0")  # the popcount kernels on every layer, AMX host or not


def _conv_case(rng, n, c, h, w, o, s):
    from tests.test_tvm_runtime import _conv_inputs

    args, attrs = _conv_inputs(rng, n, c, h, w, o, 3, s, 1, "float")
    args = list(args)
    q = lambda shape, lo, hi: (rng.integers(lo, hi + 1, shape) / 4).astype(np.float32)
    args[2] = (args[2] // 8).astype(np.int32)  # small sums: conv values on the 1/4 grid (exact float sums)
    args[5] = rng.choice(np.float32([0.25, -0.25, 0.5]), o).astype(np.float32)
    args[6] = q(o, -4, 4)
    return args, attrs, q


CASES = [
    # n, c, h, w, o, stride, want_float, with_threshold — schedule (by conv_weight_layout)
    (2, 33, 21, 23, 64, 1, True, True),    # pixel-vectorized, stride 1, whole words
    (2, 40, 20, 21, 40, 2, True, False),   # pixel-vectorized, stride 2, O % 32 != 0 (partial last word)
    (2, 16, 32, 32, 16, 1, False, True),   # pixel-vectorized, O < 32 (one partial word), bits only
    (2, 70, 9, 7, 50, 1, True, True),      # channels in lanes (small plane), O % 32 != 0
    (2, 64, 8, 8, 64, 1, False, True),     # channels in lanes, bits only
    (2, 20, 6, 10, 20, 1, True, False),    # channels in lanes, O < 32
    # few input channels: several taps per word (4-bit fields: 8 taps, 8-bit: 4, 16-bit: 2)
    (2, 3, 17, 19, 32, 1, True, True),     # pixel-vectorized (blocked weights), 4-bit fields
    (3, 8, 16, 16, 32, 1, True, False),    # 8-bit fields; image by image (16x16 rows)
    (2, 16, 32, 32, 32, 2, True, True),    # 16-bit fields, stride 2 (phase planes), image by image
]


# the cases whose batch runs image by image (pixel-vectorized, whole rows of >= 256 flat positions, whole
# words or one partial word)
PER_IMAGE = {(2, 16, 32, 32, 16, 1), (3, 8, 16, 16, 32, 1), (2, 16, 32, 32, 32, 2)}


def chain_reference(case):
    """A conv + chain + PackSign case (``CASES`` row) and its NumPy reference: ``(args, attrs, conv kwargs,
    extras, steps, v, thr, bits)`` — the residual add, bias, PReLU and Clip of a ResNet block plus every
    other step kind and broadcast shape, many values exactly on their thresholds."""
    n, c, h, w, o, s, want_float, with_t = case
    rng = np.random.default_rng(sum(case[:6]))
    args, attrs, q = _conv_case(rng, n, c, h, w, o, s)
    a = {k: v for k, v in attrs.items() if k not in ("in_channels", "output")}
    conv = ref.binary_conv2d_packed(*args, **attrs)
    ys = conv.shape
    extras = [q(ys, -8, 8), q((1, o, 1, 1), -2, 2), q((o, 1, 1), 0, 2), np.float32([-1.0]), np.float32([1.0]),
              q((1, 1, 1, ys[3]), -1, 1), q((ys[2], 1), -1, 1)]
    steps = [("add", 0), ("add", 1), ("prelu", 2), ("sub", 5), ("rsub", 6), ("neg",), ("mul", 2), ("relu",),
             ("min", 1), ("add", 6), ("max", 3), ("min", 4)]
    v = conv + extras[0]
    v = v + extras[1]
    v = np.where(v < 0, v * extras[2], v).astype(np.float32)
    v = -(extras[6] - (v - extras[5]))
    v = np.maximum(v * extras[2], np.float32(0))
    v = np.minimum(v, extras[1]) + extras[6]
    v = np.minimum(np.maximum(v, np.float32(-1)), np.float32(1)).astype(np.float32)
    thr = rng.choice(np.float32([-1.0, -0.5, 0.0, 0.25, 1.0]), o).astype(np.float32)
    t_eff = thr if with_t else np.zeros(o, np.float32)
    bits_ref = ref.pack_sign(v, thr if with_t else None)
    assert int((v == t_eff.reshape(1, -1, 1, 1)).sum()) > 20  # ties at the threshold are exercised
    return args, attrs, a, extras, steps, v, thr, bits_ref


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
@pytest.mark.parametrize("compiled", [False, True], ids=["e-classes", "e-columns+in-channels"])
def test_fused_conv_chain_matches_unfused_and_reference(case, compiled):
    """``compiled``: as the graph translator calls it, E given by output column (``e_by_column``; a batch then
    runs image by image where the plane is large enough) and the input channel count given (<= 16 channels:
    several taps per word)."""
    from tests.test_tvm_runtime import _run_outs

    n, c, h, w, o, s, want_float, with_t = case
    args, attrs, a, extras, steps, v, thr, bits_ref = chain_reference(case)
    ys = v.shape
    tail = [thr] if with_t else []
    conv = ref.binary_conv2d_packed(*args, **attrs)

    layout = K.conv_weight_layout(args[0].shape, args[1].shape, **a)
    wk = K.block_conv_weights(args[1]) if layout == "blocked" else args[1]
    e_arg = K.e_by_column(args[2], args[4]) if compiled else args[2]
    f = K.binary_conv2d_packed_chain_primfunc(args[0].shape, args[1].shape, e_arg.shape, **a,
                                              extra_shapes=[e.shape for e in extras], steps=steps,
                                              want_float=want_float, pack=True, with_threshold=with_t,
                                              weight_layout=layout, e_columns=compiled,
                                              in_channels=c if compiled else None)
    script = f.script()
    # the paths under test are taken: taps packed into shared words; accumulators per image ([rows, RL])
    assert ('T.sblock("zt")' in script) == (compiled and c <= 16)
    per_image = re.search(r'pc = T.sblock_alloc_buffer\(\((\d+), (\d+), (\d+), (\d+)\)', script) is not None
    assert per_image == (compiled and case[:6] in PER_IMAGE)
    outs = ([(ys, "float32")] if want_float else []) + [(bits_ref.shape, "uint32")]
    got = _run_outs(K.build_kernel(f).lib, [args[0], wk, e_arg, *args[3:], *extras] + tail, outs)
    # unfused: the float conv kernel, then the chain_pack kernel
    y = K.build_kernel(K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape, **attrs,
                                                        weight_layout=layout))(args[0], wk, *args[2:])
    assert np.array_equal(y.view(np.uint32), conv.view(np.uint32))
    cp = K.chain_pack_primfunc(ys, [e.shape for e in extras], steps, with_threshold=with_t)
    un = _run_outs(K.build_kernel(cp).lib, [y, *extras] + tail, [(ys, "float32"), (bits_ref.shape, "uint32")])
    assert np.array_equal(un[0].view(np.uint32), v.view(np.uint32)) and np.array_equal(un[1], bits_ref)
    if want_float:
        assert np.array_equal(got[0].view(np.uint32), v.view(np.uint32))
    assert np.array_equal(got[-1], bits_ref)


def test_chain_kernel_rejects_bad_input():
    kw = {"out_channels": 32, "kernel_shape": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1),
          "dilations": (1, 1)}
    shapes = ((1, 8, 8, 1), (32, 3, 3, 1), (32, 3, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        K.binary_conv2d_packed_chain_primfunc(*shapes, extra_shapes=[(1, 3, 1, 1)], steps=[("add", 0)], **kw)
    with pytest.raises(ValueError, match="unknown step"):
        K.binary_conv2d_packed_chain_primfunc(*shapes, extra_shapes=[(1,)], steps=[("exp", 0)], **kw)
    with pytest.raises(ValueError, match="missing operand"):
        K.binary_conv2d_packed_chain_primfunc(*shapes, extra_shapes=[(1,)], steps=[("add", 1)], **kw)
    with pytest.raises(ValueError, match="nothing to produce"):
        K.binary_conv2d_packed_chain_primfunc(*shapes, want_float=False, **kw)
    with pytest.raises(ValueError, match="x86 and CUDA schedules only"):
        K.binary_conv2d_packed_chain_primfunc(*shapes, steps=[("relu",)], target="arm", **kw)
    with pytest.raises(ValueError, match="out_channels"):
        K.binary_conv2d_packed_chain_primfunc(*shapes, steps=[("relu",)], **{**kw, "out_channels": 16})


@pytest.mark.parametrize("geom", [(64, 7, 9, 1), (40, 21, 23, 2)], ids=["chanvec-s1", "pixelvec-s2-c40"])
def test_graph_fuses_chain_into_popcount_conv(geom):
    """The residual block (conv → residual Add → bias → PRelu → bias → Clip → PackSign → conv(stride) → bias)
    compiled without AMX: each float conv carries its chain (the first one also the PackSign) in its
    epilogue, no separate chain kernel is left, and the packed bits, the chain's float value and the
    output equal the NumPy reference, the conv + chain_pack translation and the op-by-op one, bit for bit."""
    from bnnc.runtimes.tvm import graph as G
    from onnx import TensorProto as TP

    from tests.test_tvm_runtime import _residual_block, _with_output, model_init

    c, h, w, stride = geom
    rng = np.random.default_rng(40 + c + stride)
    model, x, want = _residual_block(rng, n=2, c=c, h=h, w=w, stride=stride)
    assert int((want["v"] == model_init(model, "t1").reshape(1, -1, 1, 1)).sum()) > 30  # ties
    mod, _ = G.translate(model, batch_size=2)
    names = [gv.name_hint for gv in mod.functions]
    assert any(nm.startswith("bnnc_chain_pack_bconv") for nm in names)
    assert any(nm.startswith("bnnc_chain_bconv") for nm in names)  # bconv2 + bias add (the graph output)
    assert not any(nm.startswith(("bnnc_chain_pack_", "bnnc_chain_")) and "bconv" not in nm for nm in names)
    assert not any(nm.startswith("bnnc_bconv") for nm in names)
    for out, elem in (("pk1", TP.UINT32), ("v", TP.FLOAT), ("y", TP.FLOAT)):
        m = _with_output(model, out, elem)
        got = G.compile_model(m, batch_size=2).run(x)
        assert got.dtype == want[out].dtype and np.array_equal(got.view(np.uint32), want[out].view(np.uint32)), out
        if out == "y":
            try:
                G._POPFUSE = False  # conv, then the chain_pack kernel
                sep = G.compile_model(m, batch_size=2)
            finally:
                G._POPFUSE = True
            assert sep.info["fused_chains"] == 2
            assert np.array_equal(sep.run(x).view(np.uint32), got.view(np.uint32))
            un = G.compile_model(m, batch_size=2, fuse=False)
            assert np.array_equal(un.run(x).view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("c,h", [(16, 12), (32, 8)])
def test_option_a_shortcut_block_is_fused(c, h):
    """A ResNet's stride-2 block with the option-A shortcut (Slice every 2nd pixel → Pad zero channels), whose
    Slice/Pad come after the conv in the graph (as exported): the conv waits for them and carries the
    residual Add, Clip and PackSign in its epilogue — bit-identical to the NumPy reference and to the
    op-by-op translation."""
    from bnnc.ops import DOMAIN
    from bnnc.runtimes.tvm import graph as G
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from tests.test_tvm_runtime import _conv_inputs

    rng = np.random.default_rng(c + h)
    o = 2 * c
    args, at = _conv_inputs(rng, 1, c, h, h, o, 3, 2, 1, "float")
    q = lambda shape, lo, hi: (rng.integers(lo, hi + 1, shape) / 4).astype(np.float32)  # noqa: E731
    inits = dict(zip(["w", "e", "rc", "cc", "p0", "p1"], args[1:]))
    inits.update(lo=np.float32(-1), hi=np.float32(1), st=np.int64([0, 0]), en=np.int64([h, h]),
                 ax=np.int64([2, 3]), sp=np.int64([2, 2]), pads=np.int64([0, c // 2, 0, 0, 0, c // 2, 0, 0]))
    battrs = dict(in_channels=c, out_channels=o, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                  dilations=[1, 1], output="float")
    nodes = [
        oh.make_node("PackSign", ["x"], ["pk0"], name="pack0", domain=DOMAIN),
        oh.make_node("BinaryConv2dPacked", ["pk0", "w", "e", "rc", "cc", "p0", "p1"], ["c1"], name="bconv",
                     domain=DOMAIN, **battrs),
        oh.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["sl"], name="sub"),
        oh.make_node("Pad", ["sl", "pads"], ["sc"], name="chpad"),
        oh.make_node("Add", ["c1", "sc"], ["a1"], name="residual"),
        oh.make_node("Clip", ["a1", "lo", "hi"], ["v"], name="clip"),
        oh.make_node("PackSign", ["v"], ["y"], name="pack1", domain=DOMAIN),
    ]
    graph = oh.make_graph(nodes, "option_a", [oh.make_tensor_value_info("x", TP.FLOAT, [2, c, h, h])],
                          [oh.make_tensor_value_info("y", TP.UINT32, None), oh.make_tensor_value_info("v", TP.FLOAT, None)],
                          [nh.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)], ir_version=10)
    x = q((2, c, h, h), -6, 6)
    conv = ref.binary_conv2d_packed(ref.pack_sign(x), *args[1:], **at)
    sc = np.pad(x[:, :, ::2, ::2], ((0, 0), (c // 2, c // 2), (0, 0), (0, 0)))
    v = np.minimum(np.maximum(conv + sc, np.float32(-1)), np.float32(1))
    mod, _ = G.translate(model, batch_size=2)
    names = [gv.name_hint for gv in mod.functions]
    assert any(nm.startswith("bnnc_chain_pack_bconv") for nm in names)
    assert not any(nm.startswith("bnnc_bconv") for nm in names)  # no conv left on its own
    assert not any(nm.startswith("bnnc_chain") and "bconv" not in nm for nm in names)  # no chain on its own
    out = G.compile_model(model, batch_size=2).run(x)
    assert np.array_equal(out, ref.pack_sign(v))
    un = G.compile_model(model, batch_size=2, fuse=False).run(x)
    assert np.array_equal(un, out)


def test_large_batch_runs_in_cache_sized_calls():
    """A CPU batch above CPU_CALL_BATCH_MAX is compiled for calls of ``cpu_call_batch`` images (fewer for large
    inputs), and ``run`` on the whole batch (two full calls and a zero-padded one here) gives the NumPy
    reference bit for bit, as the model built for the whole batch in one call does."""
    from bnnc.runtimes.tvm import graph as G
    from bnnc.util import cpu_call_batch

    from tests.test_tvm_runtime import _residual_block

    assert cpu_call_batch(128, (128, 3, 32, 32)) == 8
    assert cpu_call_batch(128, (128, 3, 224, 224)) == 1  # 600 KB images: one per call
    assert cpu_call_batch(6, (6, 3, 224, 224)) == 6  # batches up to 8: one call, as asked
    rng = np.random.default_rng(77)
    model, x, want = _residual_block(rng, n=19, c=16, h=8, w=8, stride=1)
    tm = G.compile_model(model, batch_size=19)
    assert tm.info["batch_size"] == 8 and tm.info["requested_batch"] == 19
    got = tm.run(x)
    assert np.array_equal(got.view(np.uint32), want["y"].view(np.uint32))
    whole = G.compile_model(model, batch_size=19, call_batch=19)
    assert whole.info["batch_size"] == 19
    assert np.array_equal(whole.run(x).view(np.uint32), got.view(np.uint32))
