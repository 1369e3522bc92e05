"""The float32 CPU kernels of the TVM backend (stem / 1×1 convs, max / average pool, dense) against NumPy
float64, and their use by the graph translator (stem conv + max pool fused) against ONNX's reference."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

tvm = pytest.importorskip("tvm")

from bnnc.runtimes.tvm.float_kernels import (
    float_avgpool2d_primfunc,
    float_conv2d_maxpool_primfunc,
    float_conv2d_primfunc,
    float_dense_primfunc,
    float_maxpool2d_primfunc,
)
from bnnc.runtimes.tvm.graph import compile_model, translate
from bnnc.runtimes.tvm.target import cpu_target


def _run(func, inputs, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(cpu_target(1)))
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs], out)
    return out.numpy()


def _conv_ref(x, w, b, stride, pads):
    """Cross-correlation in float64, one strided slice per tap."""
    (sh, sw), (pt, pl, pb, pr) = stride, pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    kh, kw = w.shape[2:]
    oh = (xp.shape[2] - kh) // sh + 1
    ow = (xp.shape[3] - kw) // sw + 1
    y = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for r in range(kh):
        for s in range(kw):
            patch = xp[:, :, r:r + (oh - 1) * sh + 1:sh, s:s + (ow - 1) * sw + 1:sw]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, r, s].astype(np.float64))
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def _maxpool_ref(x, k, stride, pads):
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = k, stride, pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=-np.inf)
    oh = (xp.shape[2] - kh) // sh + 1
    ow = (xp.shape[3] - kw) // sw + 1
    y = np.full((x.shape[0], x.shape[1], oh, ow), -np.inf, np.float32)
    for r in range(kh):
        for s in range(kw):
            y = np.maximum(y, xp[:, :, r:r + (oh - 1) * sh + 1:sh, s:s + (ow - 1) * sw + 1:sw])
    return y


CONV_CASES = [
    # (x shape, out channels, kernel, stride, pads [t, l, b, r], extra kwargs)
    ((1, 3, 38, 45), 16, 7, 2, [3, 3, 3, 3], {"winograd": False}),  # stem-like, direct: padded phase-split input
    ((2, 3, 23, 19), 12, 7, 2, [3, 3, 3, 3], {"winograd": False}),  # batch 2, 12 channels (tile 8 → 4), rows % 3
    ((1, 3, 38, 45), 16, 7, 2, [3, 3, 3, 3], {}),  # the same by Winograd F(4, 4) (the default for 7×7/2)
    ((2, 3, 23, 19), 12, 7, 2, [3, 3, 3, 3], {}),  # 22 tiles of 4 columns: one vector and a partial one
    ((1, 3, 20, 33), 8, 8, 2, [3, 4, 4, 3], {}),  # Winograd, 8×8 kernel (4 taps in both phases), asymmetric pads
    ((1, 3, 9, 224), 8, 7, 2, [3, 3, 3, 3], {}),  # 112 columns: F(4, 4) on 64, F(3, 4) on 48 (the stem's row)
    ((1, 3, 9, 180), 8, 7, 2, [3, 3, 3, 3], {}),  # 90 columns: F(4, 4) on 64, F(2, 4) on 26 (13 of 16 tiles)
    ((1, 3, 9, 224), 8, 7, 2, [3, 3, 3, 3], {"vec": 8}),  # 8 lanes: three F(4, 4) vectors, then F(2, 4)
    ((1, 3, 21, 70), 8, 6, 2, [2, 2, 3, 3], {"vec": 8}),  # Winograd F(4, 3), 8-lane vectors
    ((1, 2, 9, 14), 4, 7, 2, [3, 3, 3, 3], {"winograd": True, "vec": 4}),  # Winograd at the NEON width
    ((1, 5, 9, 40), 7, 3, 1, [1, 1, 1, 1], {}),  # 3×3 pad 1, 7 channels (tile → 1), 40 = 2 vectors + 8
    ((1, 16, 7, 7), 24, 1, 1, [0, 0, 0, 0], {}),  # 1×1: GEMM over 49 pixels (3 vectors + 1 lane)
    ((2, 20, 28, 28), 40, 1, 1, [0, 0, 0, 0], {}),  # 1×1: 784 pixels = 49 vectors, tiles of 3 + remainder
    ((1, 6, 9, 11), 8, 1, 2, [0, 0, 0, 0], {}),  # 1×1 stride 2 (phase-split, no padding)
    ((1, 4, 10, 11), 8, 3, 1, [0, 0, 0, 0], {}),  # 3×3 no padding: taps read the input directly
    ((1, 4, 8, 8), 8, 3, 3, [0, 1, 2, 0], {}),  # stride 3, asymmetric pads
    ((1, 3, 17, 21), 10, 5, 2, [2, 2, 2, 2], {"vec": 4}),  # the NEON width (Winograd F(4, 3))
    ((1, 3, 17, 21), 10, 5, 2, [2, 2, 2, 2], {"vec": 4, "winograd": False}),  # the same, direct
    ((1, 8, 15, 30), 16, 3, 1, [1, 1, 1, 1], {"vec": 8}),  # the ARM family's tiles (vec 8: one vector per tile)
    ((1, 3, 13, 37), 8, 3, 1, [1, 1, 1, 1], {"row_tile": 4, "col_vecs": 2}),  # explicit tile, both remainders
]


@pytest.mark.parametrize("shape,o,k,s,pads,kw", CONV_CASES)
def test_float_conv_matches_numpy(shape, o, k, s, pads, kw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((o, shape[1], k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    f, consts, oshape = float_conv2d_primfunc(shape, w, b, [s, s], pads, **kw)
    got = _run(f, [x, *consts], oshape)
    want = _conv_ref(x, w, b, (s, s), pads)
    assert got.shape == want.shape
    # float32 sums in another order: relative to the output scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_float_conv_without_bias_and_bad_shapes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    f, consts, oshape = float_conv2d_primfunc(x.shape, w, None, [1, 1], [1, 1, 1, 1])
    np.testing.assert_allclose(_run(f, [x, *consts], oshape), _conv_ref(x, w, None, (1, 1), [1] * 4),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 channels but the weights expect 2"):
        float_conv2d_primfunc((1, 3, 6, 6), w, None, [1, 1], [0] * 4)
    with pytest.raises(ValueError, match="does not fit"):
        float_conv2d_primfunc((1, 2, 2, 2), w, None, [1, 1], [0] * 4)


def test_winograd_stem_error_close_to_direct_float32():
    """On a stem-shaped conv (3 → 16 channels, 7×7/2, pad 3, weights of a trained stem's scale) the
    Winograd kernel's error vs float64 stays within 3× the direct float32 kernel's (rms), ~1e-6 relative."""
    rng = np.random.default_rng(9)
    shape = (1, 3, 64, 96)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (0.15 * rng.standard_normal((16, 3, 7, 7))).astype(np.float32)
    want = _conv_ref(x, w, None, (2, 2), [3] * 4)
    rms = {}
    for wg in (False, True):
        f, consts, oshape = float_conv2d_primfunc(shape, w, None, [2, 2], [3] * 4, winograd=wg)
        rms[wg] = float(np.sqrt(((_run(f, [x, *consts], oshape) - want) ** 2).mean()))
    scale = float(np.sqrt((want ** 2).mean()))
    assert 0 < rms[False] and rms[True] <= 3 * rms[False] and rms[True] < 2e-6 * scale


def test_winograd_conv_refuses_what_it_cannot_compute():
    w = np.zeros((8, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="column stride of 2, a 5 to 8 wide kernel"):
        float_conv2d_primfunc((1, 3, 16, 16), w, None, [2, 2], [1] * 4, winograd=True)
    with pytest.raises(ValueError, match="column stride of 2"):
        float_conv2d_primfunc((1, 3, 16, 16), np.zeros((8, 3, 7, 7), np.float32), None, [1, 1], [3] * 4,
                              winograd=True)


MAXPOOL_CASES = [
    ((1, 4, 112, 112), 3, 2, [1, 1, 1, 1], 16),  # the ResNet stem pool: 56 = 3 vectors + 8 lanes
    ((2, 3, 17, 35), 3, 2, [1, 1, 1, 1], 16),  # batch 2, odd sizes
    ((1, 3, 8, 8), 2, 2, [0, 0, 0, 0], 16),
    ((1, 2, 5, 5), 3, 1, [1, 1, 1, 1], 16),  # stride 1
    ((1, 3, 9, 23), 3, 3, [0, 1, 2, 2], 16),  # stride 3, asymmetric pads
    ((1, 2, 11, 40), 3, 2, [1, 1, 1, 1], 4),  # the NEON width
]


@pytest.mark.parametrize("shape,k,s,pads,vec", MAXPOOL_CASES)
def test_float_maxpool_matches_numpy(shape, k, s, pads, vec):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    f, oshape = float_maxpool2d_primfunc(shape, [k, k], [s, s], pads, vec=vec)
    got = _run(f, [x], oshape)
    want = _maxpool_ref(x, (k, k), (s, s), pads)
    assert got.shape == want.shape
    assert np.array_equal(got, want)  # max is exact


def test_float_maxpool_rejects_pads_as_large_as_the_window():
    with pytest.raises(ValueError, match="must be smaller than the 2×2 window"):
        float_maxpool2d_primfunc((1, 2, 6, 7), [2, 2], [1, 1], [2, 2, 2, 2])


FUSED_CASES = [
    # (x shape, out channels, conv kernel, stride, pad, pool kernel, stride, pad, extra kwargs)
    ((1, 3, 38, 45), 16, 7, 2, 3, 3, 2, 1, {}),  # the ResNet stem, small (Winograd F(4, 4) conv rows)
    ((1, 3, 38, 45), 16, 7, 2, 3, 3, 2, 1, {"winograd": False}),  # the same, direct conv rows
    ((2, 3, 23, 19), 12, 7, 2, 3, 3, 2, 1, {}),  # batch 2, odd sizes, 12 channels
    ((1, 4, 13, 17), 8, 3, 1, 1, 2, 2, 0, {}),  # pool 2×2/2, nothing kept between windows
    ((1, 4, 13, 17), 8, 3, 1, 1, 3, 1, 1, {"row_chunks": 3}),  # pool stride 1, 3 bands of rows
    ((1, 3, 30, 30), 8, 3, 1, 0, 3, 3, 1, {"vec": 4}),  # pool stride 3, the NEON width
]


@pytest.mark.parametrize("shape,o,k,s,p,pk,ps,pp,kw", FUSED_CASES)
def test_float_conv_maxpool_fused_matches_numpy(shape, o, k, s, p, pk, ps, pp, kw):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((o, shape[1], k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    f, consts, oshape = float_conv2d_maxpool_primfunc(shape, w, b, [s, s], [p] * 4, [pk, pk], [ps, ps], [pp] * 4,
                                                      **kw)
    got = _run(f, [x, *consts], oshape)
    want = _maxpool_ref(_conv_ref(x, w, b, (s, s), [p] * 4), (pk, pk), (ps, ps), [pp] * 4)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("n,k,j,with_bias", [(1, 512, 1000, True), (3, 64, 100, True), (2, 40, 7, False)])
def test_float_dense_matches_numpy(n, k, j, with_bias):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((n, k)).astype(np.float32)
    bm = rng.standard_normal((k, j)).astype(np.float32)
    bias = rng.standard_normal(j).astype(np.float32) if with_bias else None
    f, consts, oshape = float_dense_primfunc(n, k, bm, bias)
    got = _run(f, [a, *consts], oshape)
    want = a.astype(np.float64) @ bm.astype(np.float64) + (0 if bias is None else bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _avgpool_ref(x, k, stride, pads, count_include_pad):
    """Window sums of the zero-padded input over the window size or the count of real pixels, float64."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = k, stride, pads
    pad = ((0, 0), (0, 0), (pt, pb), (pl, pr))
    xp = np.pad(x.astype(np.float64), pad)
    ones = np.pad(np.ones(x.shape[2:]), pad[2:])
    oh = (xp.shape[2] - kh) // sh + 1
    ow = (xp.shape[3] - kw) // sw + 1
    tot, cnt = np.zeros((x.shape[0], x.shape[1], oh, ow)), np.zeros((oh, ow))
    for r in range(kh):
        for s in range(kw):
            tot += xp[:, :, r:r + (oh - 1) * sh + 1:sh, s:s + (ow - 1) * sw + 1:sw]
            cnt += ones[r:r + (oh - 1) * sh + 1:sh, s:s + (ow - 1) * sw + 1:sw]
    return tot / (kh * kw if count_include_pad else cnt)


AVGPOOL_CASES = [
    # (x shape, kernel, stride, pads, count_include_pad, vec)
    ((1, 4, 56, 56), 2, 2, [0, 0, 0, 0], 0, 16),  # the downsample-path pool of Bi-Real / ReActNet
    ((2, 3, 7, 7), 2, 2, [0, 0, 0, 0], 1, 16),  # odd size: the last row / column is dropped
    ((2, 3, 17, 35), 3, 2, [1, 1, 1, 1], 0, 16),  # pads, border windows averaged over fewer pixels
    ((2, 3, 17, 35), 3, 2, [1, 1, 1, 1], 1, 16),  # the same counting the padding
    ((1, 3, 9, 23), 3, 3, [0, 1, 2, 2], 0, 16),  # stride 3, asymmetric pads
    ((1, 2, 7, 7), 2, 2, [0, 0, 1, 1], 0, 16),  # pads only at the end
    ((1, 2, 5, 6), 3, 1, [1, 1, 1, 1], 0, 16),  # stride 1
    ((1, 2, 11, 40), 3, 2, [1, 1, 1, 1], 0, 4),  # the NEON width
]


@pytest.mark.parametrize("shape,k,s,pads,cip,vec", AVGPOOL_CASES)
def test_float_avgpool_matches_numpy(shape, k, s, pads, cip, vec):
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    f, oshape = float_avgpool2d_primfunc(shape, [k, k], [s, s], pads, bool(cip), vec=vec)
    got = _run(f, [x], oshape)
    want = _avgpool_ref(x, (k, k), (s, s), pads, cip)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_float_avgpool_rejects_pads_as_large_as_the_window():
    with pytest.raises(ValueError, match="AveragePool: pads .* must be smaller than the 2×2 window"):
        float_avgpool2d_primfunc((1, 2, 6, 7), [2, 2], [2, 2], [0, 2, 0, 0])


# -- graph level: what the translator picks ------------------------------------------------------------

def _graph(nodes, in_shape, out_shape, inits=(), outputs=("y",)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def _kernels(model):
    """The names of the kernels (PrimFuncs) in the translated Relax module, without their numeric suffix."""
    mod, _ = translate(model, batch_size=1)
    return sorted(gv.name_hint.rsplit("_", 1)[0] for gv, f in mod.functions.items()
                  if isinstance(f, tvm.tirx.PrimFunc))


def _stem(shape=(1, 3, 30, 34), o=16, extra=(), outputs=("y",)):
    rng = np.random.default_rng(6)
    w = numpy_helper.from_array(rng.standard_normal((o, shape[1], 7, 7)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[7, 7], strides=[2, 2], pads=[3] * 4),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
             *extra]
    return _graph(nodes, shape, None, [w, b], outputs), rng.standard_normal(shape).astype(np.float32)


def _check_graph(model, x):
    want = ReferenceEvaluator(model).run(None, {"x": x})
    got = compile_model(model, "cpu", batch_size=x.shape[0], num_threads=1).run(x)
    got = got if isinstance(got, (list, tuple)) else [got]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_graph_fuses_stem_conv_and_maxpool():
    model, x = _stem()
    assert _kernels(model) == ["bnnc_conv_maxpool"]  # one kernel, no separate conv or max pool
    _check_graph(model, x)


def test_graph_does_not_fuse_a_conv_with_two_consumers():
    relu = helper.make_node("Relu", ["c"], ["r"])
    model, x = _stem(extra=[relu], outputs=("y", "r"))
    assert _kernels(model) == ["bnnc_conv", "bnnc_maxpool"]
    _check_graph(model, x)


def test_graph_does_not_fuse_a_ceil_mode_pool():
    model, x = _stem()
    model.graph.node[1].attribute.append(helper.make_attribute("ceil_mode", 1))
    assert "bnnc_conv_maxpool" not in _kernels(model)
    _check_graph(model, x)


@pytest.mark.parametrize("cip,pads", [(0, [1, 1, 1, 1]), (1, [1, 1, 1, 1]), (0, [0, 0, 0, 0])])
def test_graph_average_pool_uses_the_scheduled_kernel(cip, pads):
    x = np.random.default_rng(7).standard_normal((2, 5, 13, 18)).astype(np.float32)
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2] if any(pads) else [2, 2],
                            strides=[2, 2], pads=pads, count_include_pad=cip)
    model = _graph([node], x.shape, None)
    assert _kernels(model) == ["bnnc_avgpool"]
    _check_graph(model, x)


def test_graph_fuses_clip_and_pack_after_a_float_conv():
    """IR-Net's stem: Conv → Clip → PackSign (and the clipped value read by the residual path) is the float
    conv, then one chain_pack kernel (the conv output read once). Values on a 1/4 grid: every sum is exact,
    so the bits and the clipped floats equal ONNX's reference evaluator exactly."""
    from bnnc.ops import DOMAIN
    from bnnc.ops.deploy import pack_sign

    rng = np.random.default_rng(8)
    q = lambda shape, lo, hi: (rng.integers(lo, hi + 1, shape) / 4).astype(np.float32)  # noqa: E731
    w = numpy_helper.from_array(q((32, 3, 3, 3), -2, 2), "w")
    b = numpy_helper.from_array(q(32, -2, 2), "b")
    lo, hi = numpy_helper.from_array(np.float32(-1), "lo"), numpy_helper.from_array(np.float32(1), "hi")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Clip", ["c", "lo", "hi"], ["v"]),
             helper.make_node("PackSign", ["v"], ["y"], domain=DOMAIN)]
    model = _graph(nodes, (2, 3, 12, 10), None, [w, b, lo, hi], outputs=("y", "v"))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT32
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    assert _kernels(model) == ["bnnc_chain_pack", "bnnc_conv"]
    x = q((2, 3, 12, 10), -8, 8)
    conv = ReferenceEvaluator(_graph(nodes[:1], x.shape, None, [w, b], outputs=("c",))).run(None, {"x": x})[0]
    v = np.clip(conv, np.float32(-1), np.float32(1))
    assert int((v == 0).sum()) > 10  # ties at the sign threshold
    got = compile_model(model, "cpu", batch_size=2, num_threads=1).run(x)
    assert np.array_equal(got, pack_sign(v))


@pytest.mark.parametrize("shape,o,kw", [((1, 3, 61, 50), 8, {"row_chunks": 1}), ((2, 3, 38, 45), 16, {"row_chunks": 3}),
                                         ((1, 3, 61, 50), 8, {"row_chunks": 5}),
                                         ((2, 3, 38, 45), 16, {"row_chunks": 3, "winograd": False})])
def test_float_conv_maxpool_rows_per_step_bit_identical(shape, o, kw):
    """The stem kernel's pool rows per step (1, 2, the default 3 for stride 2; full steps, a shorter last step,
    bands of unequal length) change the register tiling only: the outputs are the same floats (conv rows by
    Winograd, the default here, or direct)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((o, shape[1], 7, 7)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    outs = []
    for g in (1, 2, None):
        f, consts, oshape = float_conv2d_maxpool_primfunc(shape, w, b, [2, 2], [3] * 4, [3, 3], [2, 2], [1] * 4,
                                                          pool_rows_per_step=g, **kw)
        outs.append(_run(f, [x, *consts], oshape))
    want = _maxpool_ref(_conv_ref(x, w, b, (2, 2), [3] * 4), (3, 3), (2, 2), [1] * 4)
    np.testing.assert_allclose(outs[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for got in outs[1:]:
        assert np.array_equal(got.view(np.uint32), outs[0].view(np.uint32))


@pytest.mark.parametrize("shape,o,kw", [((1, 3, 61, 50), 64, {}),               # 2 words per pixel, 16-lane tail 9
                                         ((2, 3, 38, 45), 32, {"row_chunks": 3}),  # 1 word, batch 2, 3 bands
                                         ((1, 3, 30, 34), 128, {}),                # 4 words (byte stores)
                                         ((1, 2, 41, 40), 64, {"vec": 8})])        # the NEON width
def test_float_conv_maxpool_with_pack_sign(shape, o, kw):
    """``pack=True``: the stem kernel also writes the PackSign bits of its pooled output (bit = y >= TH[c]),
    equal to ``bnnc.ops.deploy.pack_sign`` of the float output it writes (itself unchanged by the pack), also
    where a threshold equals an output value (the tie gives 1) and on both sides of zero thresholds."""
    from bnnc.ops.deploy import pack_sign

    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((o, shape[1], 7, 7)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    args = ([2, 2], [3] * 4, [3, 3], [2, 2], [1] * 4)
    f0, consts, oshape = float_conv2d_maxpool_primfunc(shape, w, b, *args, **kw)
    plain = _run(f0, [x, *consts], oshape)
    f, consts, _ = float_conv2d_maxpool_primfunc(shape, w, b, *args, **kw, pack=True)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(cpu_target(1)))
    bshape = (oshape[0], oshape[2], oshape[3], o // 32)
    for th in (rng.standard_normal(o).astype(np.float32), plain[-1, :, oshape[2] // 2, oshape[3] - 1].copy(),
               np.zeros(o, np.float32)):
        y = tvm.runtime.tensor(np.full(oshape, np.nan, np.float32))
        bits = tvm.runtime.tensor(np.full(bshape, 0xA5A5A5A5, np.uint32))  # every word must be written
        lib["main"](*[tvm.runtime.tensor(a) for a in (x, *consts, th)], y, bits)
        assert np.array_equal(y.numpy().view(np.uint32), plain.view(np.uint32))
        assert np.array_equal(bits.numpy(), pack_sign(plain, th))
    with pytest.raises(ValueError, match="pack needs"):
        float_conv2d_maxpool_primfunc(shape, w[:24], b[:24], *args, pack=True)


def test_graph_fuses_the_pack_sign_after_the_stem_into_it():
    """Conv → MaxPool → PackSign(T) with the pooled value also read elsewhere (a ResNet's first residual): one
    kernel writes both (with T, and without: threshold 0); with 24 channels PackSign stays a kernel of its own.
    The bits equal pack_sign of the fused kernel's float output."""
    from bnnc.ops import DOMAIN
    from bnnc.ops.deploy import pack_sign

    def model(o, no_t=False, outputs=("pk", "y")):
        m, x = _stem(shape=(1, 3, 40, 36), o=o, outputs=outputs,
                     extra=[helper.make_node("PackSign", ["y"] + ([] if no_t else ["t"]), ["pk"], domain=DOMAIN)])
        th = np.random.default_rng(3).standard_normal(o).astype(np.float32)
        if no_t:
            th[:] = 0
        else:
            m.graph.initializer.append(numpy_helper.from_array(th, "t"))
        m.graph.output[outputs.index("pk")].type.tensor_type.elem_type = TensorProto.UINT32
        m.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        return m, x, th

    for no_t in (False, True):
        m, x, th = model(64, no_t)
        assert _kernels(m) == ["bnnc_conv_maxpool"]
        bits = compile_model(m, "cpu", batch_size=1, num_threads=1).run(x)  # run() gives the first output
        y = compile_model(model(64, no_t, outputs=("y", "pk"))[0], "cpu", batch_size=1, num_threads=1).run(x)
        assert np.array_equal(bits, pack_sign(y, th))
    np.testing.assert_allclose(y, ReferenceEvaluator(_stem(shape=(1, 3, 40, 36), o=64)[0]).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5 * np.abs(y).max())
    assert _kernels(model(24)[0]) == ["bnnc_conv_maxpool", "bnnc_pack_sign"]
