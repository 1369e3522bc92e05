"""AMX-INT8 BinaryConv2dPacked kernel (runtimes/tvm/amx.py): bit-exact against the NumPy reference of the op
and the popcount kernels; selection rule; a whole deploy model compiled with AMX."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")

from bnnc.runtimes.tvm import amx
from bnnc.runtimes.tvm import kernels as K
from bnnc.runtimes.tvm.target import cpu_target

from bnnc.ops import deploy as ref

pytestmark = pytest.mark.skipif(not amx.request_permission(),
                                reason="no AMX-INT8 here (CPU without AMX, or the OS refuses the tile state)")

AMX_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}


def _case(rng, n, c, h, w, o, k, s, pads, dil, output, ties=False):
    xp = ref.pack_bits(rng.integers(0, 2, (n, h, w, c)).astype(bool))
    wp = ref.pack_bits(rng.integers(0, 2, (o, k, k, c)).astype(bool))
    pt, pl, pb, pr = pads
    rc, rv = ref.border_classes(h, k, s, pt, pb, dil)
    cc, cv = ref.border_classes(w, k, s, pl, pr, dil)
    kmax = k * k * c
    e = rng.integers(-kmax, kmax + 1, (o, len(rv), len(cv))).astype(np.int32)
    attrs = dict(in_channels=c, out_channels=o, kernel_shape=(k, k), strides=(s, s), pads=tuple(pads),
                 dilations=(dil, dil), output=output)
    rc, cc = rc.astype(np.int32), cc.astype(np.int32)
    if output == "float":
        p0 = rng.standard_normal(o).astype(np.float32)
        p1 = rng.standard_normal(o).astype(np.float32)
    else:
        # any int32 direction (|P0| > 1 exercises the exact ceil division), thresholds near the int32 ends
        p0 = rng.integers(-3, 4, o).astype(np.int32)
        p1 = rng.integers(-kmax, kmax + 1, o).astype(np.int32)
        p1[: max(1, o // 8)] = np.int32(2**31 - 1)
        p1[o // 8: o // 4] = np.int32(-(2**31))
        if ties:  # P1 = P0·D at one output position per channel: the comparison is an equality there
            d = ref.binary_conv2d_packed(xp, wp, e, rc, cc, np.ones(o, np.float32), np.zeros(o, np.float32),
                                         **{**attrs, "output": "float"}).astype(np.int64)
            at = d[0, :, d.shape[2] // 2, d.shape[3] // 2]
            p1 = (p0.astype(np.int64) * at).astype(np.int32)
    return [xp, wp, e, rc, cc, p0, p1], attrs


CASES = [
    # n, c, h, w, o, k, s, pads, dil, output
    (1, 64, 8, 8, 64, 3, 1, (1, 1, 1, 1), 1, "bits"),
    (2, 70, 9, 7, 37, 3, 2, (1, 1, 1, 1), 1, "bits"),       # batch 2, stride 2, Cin bits % 64 != 0
    (1, 100, 10, 9, 50, 3, 1, (0, 1, 1, 0), 2, "float"),    # dilation 2, asymmetric pads
    (1, 33, 6, 6, 33, 1, 1, (0, 0, 0, 0), 1, "bits"),       # 1x1, odd word count
    (1, 96, 7, 7, 40, 3, 1, (0, 0, 0, 0), 1, "float"),      # pad 0, Cout % 32 != 0
    (2, 130, 11, 10, 70, 3, 2, (1, 1, 1, 1), 1, "float"),   # batch 2, stride 2, float
    (1, 64, 12, 12, 96, 5, 1, (2, 2, 2, 2), 1, "bits"),     # 5x5
    (1, 256, 7, 7, 512, 3, 1, (1, 1, 1, 1), 1, "bits"),     # channel groups split over tasks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c).replace(" ", ""))
def test_amx_matches_reference_and_popcount(case):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    args, attrs = _case(rng, *case)
    want = ref.binary_conv2d_packed(*args, **attrs)
    a = {k: v for k, v in attrs.items() if k != "in_channels"}
    f = K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape, target=AMX_TARGET,
                                        weight_layout="amx", **a)
    got = K.build_kernel(f, AMX_TARGET)(args[0], amx.amx_conv_weights(args[1], attrs["output"]), *args[2:])
    pop = K.build_kernel(K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape,
                                                         target=AMX_TARGET, **a), AMX_TARGET)(*args)
    assert got.shape == want.shape and got.dtype == want.dtype
    # bit-identical, float outputs included (compared as bit patterns)
    view = np.uint32 if attrs["output"] == "float" else None
    assert np.array_equal(got.view(view) if view else got, want.view(view) if view else want)
    assert np.array_equal(got.view(view) if view else got, pop.view(view) if view else pop)


BIT_WEIGHT_CASES = [
    # n, c, h, w, o, k, s, pads, dil, output, blocking: bit weights expanded tile by tile (1 x 4 tiles)
    (1, 256, 7, 7, 512, 3, 1, (1, 1, 1, 1), 1, "bits", None),       # ResNet-18's 7x7x512 (channel groups)
    (1, 256, 7, 7, 512, 3, 1, (1, 1, 1, 1), 1, "float", None),
    (2, 70, 9, 7, 37, 3, 2, (1, 1, 1, 1), 1, "bits", None),         # Cin bits % 64 != 0, Cout % 32 != 0
    (2, 70, 9, 7, 37, 3, 2, (1, 1, 1, 1), 1, "float", None),
    (1, 100, 10, 9, 50, 3, 1, (0, 1, 1, 0), 2, "float", None),      # dilation 2, asymmetric pads
    (1, 96, 12, 12, 80, 3, 1, (1, 1, 1, 1), 1, "bits", (64, 32)),   # 3 pixel blocks x 3 channel groups
    (1, 96, 12, 12, 80, 3, 1, (1, 1, 1, 1), 1, "float", (128, 96)),  # 2 pixel blocks of 2 x 64, 6 tiles
    (1, 32, 6, 6, 33, 1, 1, (0, 0, 0, 0), 1, "bits", None),         # 1x1, one word: one tap, one chunk
]


@pytest.mark.parametrize("case", BIT_WEIGHT_CASES, ids=lambda c: "-".join(str(v) for v in c).replace(" ", ""))
def test_amx_bit_weights_match_reference_and_popcount(case):
    """Weights kept as bits (forced on small shapes too) and expanded per tile: bit-identical to the NumPy
    reference and the popcount kernel, for both outputs, every blocking (the look-ahead expansion crosses
    taps, pixel blocks and channel tiles)."""
    *c, blk = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    args, attrs = _case(rng, *c)
    want = ref.binary_conv2d_packed(*args, **attrs)
    a = {k: v for k, v in attrs.items() if k != "in_channels"}
    mb, og = blk if blk else (None, None)
    f = amx.binary_conv2d_amx_primfunc(args[0].shape, args[1].shape, args[2].shape, wbits=True, mb=mb, og=og, **a)
    wa = amx.amx_conv_weights(args[1], attrs["output"], bits=True)
    assert wa.dtype == np.uint64
    got = K.build_kernel(f, AMX_TARGET)(args[0], wa, *args[2:])
    pop = K.build_kernel(K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape,
                                                         target=AMX_TARGET, **a), AMX_TARGET)(*args)
    view = np.uint32 if attrs["output"] == "float" else want.dtype
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got.view(view), want.view(view))
    assert np.array_equal(got.view(view), pop.view(view))


def test_bit_weight_layout_and_rule():
    """Bit masks = the int8 VNNI tiles (already checked above) with +1 → bit 1, -1 and the zero padding →
    bit 0; the same tiles for both outputs; the rule keeps bits above 1 MiB of int8 tiles."""
    rng = np.random.default_rng(3)
    for o, c in ((20, 20), (40, 70), (64, 64)):
        wp = ref.pack_bits(rng.integers(0, 2, (o, 3, 3, c)).astype(bool))
        w8 = amx.amx_conv_weights(wp, "bits", bits=False)  # [ob, taps, nkc, 16 r, 16 n, 4 k]
        w1 = amx.amx_conv_weights(wp, "bits", bits=True)   # [ob, taps, nkc, 16 r] uint64
        assert w1.shape == w8.shape[:4] and w1.dtype == np.uint64
        plus = (w8.reshape(*w8.shape[:4], 64) == 1)
        want = (plus.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=-1, dtype=np.uint64)
        assert np.array_equal(w1, want)
        assert np.array_equal(amx.amx_conv_weights(wp, "float", bits=True), w1)
    assert amx.int8_weight_bytes((512, 3, 3, 16)) == 512 * 9 * 512
    assert amx.weight_bits((512, 3, 3, 16))          # 7x7x512: 2.36 MB
    assert not amx.weight_bits((512, 3, 3, 8))       # 14x14 -> 7x7, 256 -> 512: 1.18 MB (fits L2)
    assert not amx.weight_bits((256, 3, 3, 8))       # 14x14x256: 590 KB
    assert amx.amx_conv_weights(np.zeros((512, 3, 3, 16), np.uint32), "float").dtype == np.uint64
    with pytest.raises(ValueError, match="multiple of 64"):
        amx.binary_conv2d_amx_primfunc((1, 7, 7, 2), (64, 3, 3, 2), (64, 3, 3), out_channels=64, kernel_shape=(3, 3),
                                       strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), output="bits",
                                       wbits=True, mb=32)


@pytest.mark.parametrize("blocking", [dict(mb=32, og=32), dict(mb=96, og=64), dict(mb=128, og=128)])
def test_amx_ties_and_blockings(blocking):
    """Thresholds exactly at P0·D (ties decide +1), for several pixel/channel blockings (block larger than
    the plane included)."""
    rng = np.random.default_rng(5)
    args, attrs = _case(rng, 1, 64, 7, 7, 128, 3, 1, (1, 1, 1, 1), 1, "bits", ties=True)
    want = ref.binary_conv2d_packed(*args, **attrs)
    bits = ref.unpack_bits(want, 128)[0, 3, 3]  # the tie position: every channel with P0 != 0 says +1
    assert bits[args[5] != 0].all()
    wbits = blocking["mb"] % 64 == 0  # bit weights take blocks of 64 pixels
    f = amx.binary_conv2d_amx_primfunc(args[0].shape, args[1].shape, args[2].shape, **attrs, **blocking,
                                       wbits=wbits)
    got = K.build_kernel(f, AMX_TARGET)(args[0], amx.amx_conv_weights(args[1], bits=wbits), *args[2:])
    assert np.array_equal(got, want)


def test_amx_weight_layout_is_vnni():
    """Tile (ob, tap, q), row r, column n, byte k = ±1 of input bit q·64 + 4r + k of channel 16·ob + n;
    the GEMM of an unpacked input row with the tile gives the ±1 dot product; padded bits and filters 0."""
    rng = np.random.default_rng(1)
    o, c = 20, 20  # one word per tap: bits 20..31 are -1 (bit 0), bytes 32..63 of the 64-byte chunk 0
    bits = rng.integers(0, 2, (o, 1, 3, c)).astype(bool)
    wa = amx.amx_conv_weights(ref.pack_bits(bits))
    assert wa.shape == (2, 3, 1, 16, 16, 4) and wa.dtype == np.int8
    pm = np.where(bits, 1, -1)
    for ob in range(2):
        for t in range(3):
            bmat = wa[ob, t, 0].transpose(0, 2, 1).reshape(64, 16)  # [k, n]
            for n in range(16):
                ch = 16 * ob + n
                col = bmat[:, n]
                if ch < o:
                    assert np.array_equal(col[:c], pm[ch, 0, t]) and (col[c:32] == -1).all() and (col[32:] == 0).all()
                else:
                    assert (col == 0).all()


def test_selection_rule(monkeypatch):
    sel = lambda xs, ws, s=(1, 1), target=AMX_TARGET: K.conv_weight_layout(
        xs, ws, strides=s, pads=(1, 1, 1, 1), dilations=(1, 1), target=target, amx=True)
    assert sel((1, 56, 56, 2), (64, 3, 3, 2)) == "amx"
    assert sel((1, 14, 14, 8), (512, 3, 3, 8), s=(2, 2)) == "amx"
    # 7x7x512: 2.36 MB of int8 weights (not in L2); the bit-weight AMX kernel loses to the popcount schedule
    # once packing and the epilogue count, so the small plane stays on popcount (the path is forced below)
    assert sel((1, 7, 7, 16), (512, 3, 3, 16)) == "blocked" and amx.weight_bits((512, 3, 3, 16))
    monkeypatch.setattr(amx, "MIN_INPUT_POSITIONS", 0)
    assert sel((1, 7, 7, 16), (512, 3, 3, 16)) == "amx"
    monkeypatch.undo()
    assert sel((1, 8, 8, 1), (64, 3, 3, 1)) != "amx"      # narrow input
    assert sel((1, 8, 8, 2), (64, 3, 3, 2)) != "amx"      # small plane (ResNet-20's 8x8x64)
    assert sel((1, 10, 10, 2), (64, 3, 3, 2)) == "amx"
    assert sel((1, 56, 56, 2), (64, 1, 1, 2)) != "amx"    # 1x1
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), target={"kind": "llvm", "mcpu": "icelake-server"}) != "amx"
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), target="arm") == "OHWC"
    assert K.conv_weight_layout((1, 56, 56, 2), (64, 3, 3, 2), strides=(1, 1), pads=(1, 1, 1, 1),
                                dilations=(1, 1), target=AMX_TARGET) != "amx"  # default: popcount layouts
    monkeypatch.setenv("BNNC_TVM_AMX", "0")
    assert sel((1, 56, 56, 2), (64, 3, 3, 2)) != "amx"


def test_check_can_run(monkeypatch):
    amx.check_can_run(AMX_TARGET)  # granted here: no error
    monkeypatch.setitem(amx._STATE, "ok", False)
    with pytest.raises(RuntimeError, match="AMX"):
        amx.check_can_run(AMX_TARGET, "m.so")
    amx.check_can_run({"kind": "llvm", "mcpu": "icelake-server"})  # no AMX in such a model


def test_whole_model_with_amx(tmp_path, monkeypatch):
    """The deploy model of test_tvm_runtime compiled for this (AMX) host: its first binary conv takes the
    AMX kernel; packed intermediates and the output equal the reference; export + load runs the same."""
    from bnnc.runtimes.tvm.graph import TVMModel, compile_model

    from tests.test_tvm_runtime import _deploy_model, _reference, _with_output

    if "mcpu" not in cpu_target() or not amx.target_has_amx(None) or not amx.enabled():
        pytest.skip("host target without AMX, or BNNC_TVM_AMX=0")
    monkeypatch.setattr(amx, "MIN_INPUT_POSITIONS", 0)  # the small test planes take AMX too
    rng = np.random.default_rng(11)
    model, inits, attrs = _deploy_model(rng)
    w1 = inits["w1"]
    assert K.conv_weight_layout((2, 6, 6, 2), w1.shape, strides=(1, 1), pads=(1, 1, 1, 1),
                                dilations=(1, 1), target=None, amx=True) == "amx"
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    want = _reference(model, inits, attrs, x)
    for name in ("bc1", "mpb"):
        got = compile_model(_with_output(model, name, onnx.TensorProto.UINT32), batch_size=2).run(x)
        assert np.array_equal(got, want[name])
    tm = compile_model(model, batch_size=2, num_threads=2)
    y = tm.run(x)
    np.testing.assert_allclose(y, want["y"], rtol=1e-5, atol=1e-5 * np.abs(want["y"]).max())
    so = tmp_path / "m.so"
    tm.export_library(str(so))
    assert np.array_equal(TVMModel.load(str(so), tm.meta()).run(x), y)


def _chain_case(rng, n, c, h, w, o, s, with_t):
    """A float 3×3 conv (pads 1) followed by a chain of every step kind, operands of every broadcast shape, and
    its PackSign, on values of a 1/4 grid (exact float sums; many values land exactly on the thresholds):
    (args, attrs, extras, steps, conv, v, thr, bits_ref) with the NumPy float32 results ``conv``, chain value
    ``v`` and its packed bits ``bits_ref``."""
    args, attrs = _case(rng, n, c, h, w, o, 3, s, (1, 1, 1, 1), 1, "float")
    q = lambda shape, lo, hi: (rng.integers(lo, hi + 1, shape) / 4).astype(np.float32)  # noqa: E731
    args[5] = rng.choice(np.float32([0.25, -0.25, 0.5]), o).astype(np.float32)
    args[6] = q(o, -4, 4)
    args[2] = (args[2] // 8).astype(np.int32)  # small sums: the float value stays on the 1/4 grid
    conv = ref.binary_conv2d_packed(*args, **attrs)
    yshape = conv.shape
    extras = [q(yshape, -8, 8), q((1, o, 1, 1), -2, 2), q((o, 1, 1), 0, 2), q((1, 1, 1, yshape[3]), -2, 2),
              np.float32([-1.0]), np.float32([1.0]), q((yshape[2], 1), -1, 1)]
    steps = [("add", 0), ("rsub", 1), ("prelu", 2), ("neg",), ("sub", 3), ("mul", 2), ("relu",), ("add", 6),
             ("max", 4), ("min", 5)]
    v = conv + extras[0]
    v = extras[1] - v
    v = np.where(v < 0, v * extras[2], v).astype(np.float32)
    v = -v
    v = v - extras[3]
    v = v * extras[2]
    v = np.maximum(v, np.float32(0))
    v = v + extras[6]
    v = np.minimum(np.maximum(v, np.float32(-1)), np.float32(1)).astype(np.float32)
    thr = rng.choice(np.float32([-1.0, -0.5, 0.0, 0.25, 1.0]), o).astype(np.float32)
    bits_ref = ref.pack_sign(v, thr if with_t else None)
    assert int((v == (thr if with_t else np.zeros(o, np.float32)).reshape(1, -1, 1, 1)).sum()) > 20  # ties
    return args, attrs, extras, steps, conv, v, thr, bits_ref


CHAIN_CASES = [
    # n, c, h, w, o, stride, want_float, with_threshold, bit weights
    (1, 64, 9, 11, 64, 1, True, True, False),
    (2, 70, 9, 7, 40, 2, True, False, False),    # batch 2, stride 2, O % 32 != 0
    (1, 128, 5, 5, 96, 1, False, True, False),   # packed bits only, rows shorter than a 16-pixel group
    (1, 64, 9, 11, 64, 1, True, True, True),     # bit weights
    (2, 70, 9, 7, 40, 2, True, False, True),     # bit weights, Cin bits % 64 != 0, O % 32 != 0
]


@pytest.mark.parametrize("case,block",
                         [(c, None) for c in CHAIN_CASES] + [(c, True) for c in CHAIN_CASES if not c[-1]],
                         ids=lambda c: "-".join(str(v) for v in c) if isinstance(c, tuple) else f"block={c}")
def test_amx_fused_chain_matches_unfused(case, block):
    """conv(float) → chain (every step kind, operands of every broadcast shape) → PackSign in the AMX
    epilogue: floats and bits bit-identical to the AMX float conv followed by the chain_pack kernel and to
    NumPy float32; values on a 1/4 grid so that many land exactly on the thresholds (v >= T gives 1). Also
    with the epilogue run per 32 × 32 register block (``block_epilogue``, the default for large blocks)."""
    from tests.test_tvm_runtime import _run_outs

    n, c, h, w, o, s, want_float, with_t, wbits = case
    rng = np.random.default_rng(sum(case[:6]))
    args, attrs, extras, steps, conv, v, thr, bits_ref = _chain_case(rng, n, c, h, w, o, s, with_t)
    a = {k: v for k, v in attrs.items() if k != "in_channels"}
    yshape = conv.shape

    f = amx.binary_conv2d_amx_chain_primfunc(args[0].shape, args[1].shape, args[2].shape, **a,
                                             extra_shapes=[e.shape for e in extras], steps=steps,
                                             want_float=want_float, pack=True, with_threshold=with_t,
                                             wbits=wbits, block_epilogue=block)
    fused = tvm.compile(tvm.IRModule({"main": f}), target=AMX_TARGET)
    wf = amx.amx_conv_weights(args[1], "float", bits=wbits)
    pshape = bits_ref.shape
    outs = ([(yshape, "float32")] if want_float else []) + [(pshape, "uint32")]
    got = _run_outs(fused, [args[0], wf, *args[2:], *extras] + ([thr] if with_t else []), outs)
    # unfused: AMX float conv, then the chain_pack kernel
    kc = K.build_kernel(amx.binary_conv2d_amx_primfunc(args[0].shape, args[1].shape, args[2].shape, wbits=wbits,
                                                       **a), AMX_TARGET)
    y = kc(args[0], wf, *args[2:])
    assert np.array_equal(y.view(np.uint32), conv.view(np.uint32))
    cp = tvm.compile(tvm.IRModule({"main": K.chain_pack_primfunc(yshape, [e.shape for e in extras], steps,
                                                                 with_threshold=with_t, target=AMX_TARGET)}),
                     target=AMX_TARGET)
    un = _run_outs(cp, [y, *extras] + ([thr] if with_t else []), [(yshape, "float32"), (pshape, "uint32")])
    assert np.array_equal(un[0].view(np.uint32), v.view(np.uint32)) and np.array_equal(un[1], bits_ref)
    if want_float:
        assert np.array_equal(got[0].view(np.uint32), v.view(np.uint32))
    assert np.array_equal(got[-1], bits_ref)


def test_amx_float_conv_channel_groups_read_their_image_copy():
    """With several channel groups per call the AMX float kernel unpacks the image twice and each task reads
    one copy (by its position in the task loop): every grouping gives the reference conv bit for bit."""
    from tests.test_tvm_runtime import _run_outs

    rng = np.random.default_rng(51)
    args, attrs = _case(rng, 2, 64, 7, 9, 128, 3, 1, (1, 1, 1, 1), 1, "float")
    a = {k: v for k, v in attrs.items() if k != "in_channels"}
    conv = ref.binary_conv2d_packed(*args, **attrs)
    wf = amx.amx_conv_weights(args[1], "float", bits=False)
    # 1, 2 and 4 channel groups; 8, 8 and 4 pixel blocks; the epilogue per task or per register block
    for og, mb, block in ((128, 32, False), (64, 32, False), (32, 64, False), (128, 32, True), (64, 64, True)):
        f = amx.binary_conv2d_amx_chain_primfunc(args[0].shape, args[1].shape, args[2].shape, **a, og=og,
                                                 mb=mb, wbits=False, block_epilogue=block)
        got = _run_outs(tvm.compile(tvm.IRModule({"main": f}), target=AMX_TARGET), [args[0], wf, *args[2:]],
                        [(conv.shape, "float32")])[0]
        assert np.array_equal(got.view(np.uint32), conv.view(np.uint32)), (og, block)


@pytest.mark.parametrize("wbits", [False, True])
def test_amx_e_table_given_at_compile_time(wbits, monkeypatch):
    """``e_table``: the float kernel takes its border table made at compile time (``amx_e_table``) instead of
    tabulating E on each call: the table is E − Kbits by (row class, channel, column class) with zeros past O
    and C, and the kernel's float output is the reference conv bit for bit, as with E."""
    from tests.test_tvm_runtime import _run_outs

    monkeypatch.setattr(amx, "BIT_WEIGHT_MIN_BYTES", 0 if wbits else 1 << 40)
    rng = np.random.default_rng(61)
    args, attrs = _case(rng, 2, 70, 7, 9, 40, 3, 2, (1, 1, 1, 1), 1, "float")  # Cin bits % 64 != 0, O % 32 != 0
    a = {k: v for k, v in attrs.items() if k != "in_channels"}
    e, w = args[2], args[1]
    tab = amx.amx_e_table(e, w.shape)
    # Kbits: the int8 dot's length, 9 taps of 32·Cw = 96 bytes (3 words), 128 with bit weights (the tile's
    # bytes past 96 count too: -1 in both operands)
    kbits = 9 * (128 if wbits else 96)
    assert tab.shape == (e.shape[1], 64, 16) and tab.dtype == np.int32
    assert np.array_equal(tab[:, :40, : e.shape[2]], e.transpose(1, 0, 2) - kbits)
    assert not tab[:, 40:].any() and not tab[:, :, e.shape[2]:].any()
    conv = ref.binary_conv2d_packed(*args, **attrs)
    wf = amx.amx_conv_weights(w, "float")
    f = amx.binary_conv2d_amx_chain_primfunc(args[0].shape, w.shape, e.shape, **a, e_table=True)
    got = _run_outs(tvm.compile(tvm.IRModule({"main": f}), target=AMX_TARGET), [args[0], wf, tab, *args[3:]],
                    [(conv.shape, "float32")])[0]
    assert np.array_equal(got.view(np.uint32), conv.view(np.uint32))
    with pytest.raises(ValueError, match="e_table"):
        amx.binary_conv2d_amx_chain_primfunc(args[0].shape, w.shape, e.shape, **a, e_table=True, wbits=not wbits)
    with pytest.raises(ValueError, match="E must be"):
        amx.amx_e_table(e[:, :, :1].repeat(17, axis=2), w.shape)


@pytest.mark.parametrize("wbits", [False, True])
def test_amx_bits_table_given_at_compile_time(wbits, monkeypatch):
    """``e_table`` with bits output: the kernel takes its thresholds and signs made at compile time
    (``amx_bits_table``) and gives the reference bits, as when it tabulates E, P0, P1 on each call."""
    monkeypatch.setattr(amx, "BIT_WEIGHT_MIN_BYTES", 0 if wbits else 1 << 40)
    rng = np.random.default_rng(62)
    args, attrs = _case(rng, 2, 70, 9, 7, 37, 3, 2, (1, 1, 1, 1), 1, "bits")
    a = {k: v for k, v in attrs.items() if k != "in_channels"}
    want = ref.binary_conv2d_packed(*args, **attrs)
    tab = amx.amx_bits_table(args[2], args[5], args[6], args[1].shape)
    f = amx.binary_conv2d_amx_primfunc(args[0].shape, args[1].shape, args[2].shape, e_table=True, **a)
    zero = np.zeros_like(args[5])  # P0, P1 are not read with the table
    got = K.build_kernel(f, AMX_TARGET)(args[0], amx.amx_conv_weights(args[1], "bits"), tab, *args[3:5], zero, zero)
    assert np.array_equal(got, want)


def test_amx_chain_rejects_bad_operands():
    kw = dict(out_channels=64, kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1))
    with pytest.raises(ValueError, match="does not broadcast"):
        amx.binary_conv2d_amx_chain_primfunc((1, 8, 8, 2), (64, 3, 3, 2), (64, 3, 3), extra_shapes=[(1, 3, 1, 1)],
                                             steps=[("add", 0)], **kw)
    with pytest.raises(ValueError, match="unknown step"):
        amx.binary_conv2d_amx_chain_primfunc((1, 8, 8, 2), (64, 3, 3, 2), (64, 3, 3), extra_shapes=[(1,)],
                                             steps=[("exp", 0)], **kw)
    with pytest.raises(ValueError, match="nothing to produce"):
        amx.binary_conv2d_amx_chain_primfunc((1, 8, 8, 2), (64, 3, 3, 2), (64, 3, 3), want_float=False, **kw)
    with pytest.raises(ValueError, match="output must be"):
        amx.amx_conv_weights(np.zeros((32, 3, 3, 2), np.uint32), "int8")


@pytest.mark.parametrize("stride,bit_weights", [(1, False), (2, False),
                                                (pytest.param(1, True, marks=pytest.mark.slow))])
def test_graph_fuses_chain_into_amx_conv(stride, bit_weights, monkeypatch):
    """Compiled for this AMX host, the residual block's first conv carries its chain (residual Add, bias,
    PRelu, Clip) and the next PackSign in its epilogue (no separate chain kernel); the packed bits, the
    chain's float value and the output equal the unfused translation and the NumPy reference bit for bit."""
    from bnnc.runtimes.tvm.graph import compile_model, translate

    from tests.test_tvm_runtime import _residual_block, _with_output

    if not amx.target_has_amx(None) or not amx.enabled():
        pytest.skip("host target without AMX, or BNNC_TVM_AMX=0")
    monkeypatch.setattr(amx, "MIN_INPUT_POSITIONS", 0)  # the small test planes take AMX too
    if bit_weights:  # the graph keeps the (small) weights as bits, as it does for 7x7x512
        monkeypatch.setattr(amx, "BIT_WEIGHT_MIN_BYTES", 0)
    rng = np.random.default_rng(21 + stride)
    model, x, want = _residual_block(rng, stride=stride)
    t = translate(model, batch_size=2)[0]
    names = [gv.name_hint for gv in t.functions]
    assert any(nm.startswith("bnnc_chain_pack_bconv") for nm in names)
    assert not any(nm.startswith("bnnc_chain_pack_") and "bconv" not in nm for nm in names)
    for out, elem in (("pk1", onnx.TensorProto.UINT32), ("v", onnx.TensorProto.FLOAT),
                      ("y", onnx.TensorProto.FLOAT)):
        m = _with_output(model, out, elem)
        fused = compile_model(m, batch_size=2)
        got = fused.run(x)
        un = compile_model(m, batch_size=2, fuse=False).run(x)
        assert np.array_equal(got.view(np.uint32), want[out].view(np.uint32)), out
        assert np.array_equal(got.view(np.uint32), un.view(np.uint32)), out


@pytest.mark.parametrize("v1_is_output", [False, True, "view"])
def test_residual_written_in_place_only_when_dead(v1_is_output, monkeypatch):
    """Two residual blocks (conv → + residual): the second block's AMX kernel writes its float result over the
    first block's output v1 (call_tir_inplace), which nothing reads afterwards — unless v1 is also a graph
    output, or an earlier Reshape made a view of it that is read later. Never over the model input. Outputs
    equal NumPy's op-by-op result either way."""
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from bnnc.ops import DOMAIN
    from bnnc.runtimes.tvm import graph as G
    from tests.test_tvm_runtime import _conv_inputs

    if not amx.target_has_amx(None) or not amx.enabled():
        pytest.skip("host target without AMX, or BNNC_TVM_AMX=0")
    monkeypatch.setattr(amx, "MIN_INPUT_POSITIONS", 0)
    rng = np.random.default_rng(31)
    c, h = 64, 9
    inits = {}
    for b in ("1", "2"):
        args, at = _conv_inputs(rng, 1, c, h, h, c, 3, 1, 1, "float")
        inits.update({nm + b: a for nm, a in zip(["w", "e", "rc", "cc", "p0", "p1"], args[1:])})
    battrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in at.items()}
    conv = lambda b, xin, out: oh.make_node(  # noqa: E731
        "BinaryConv2dPacked", [xin] + [nm + b for nm in ["w", "e", "rc", "cc", "p0", "p1"]], [out],
        name="bconv" + b, domain=DOMAIN, **battrs)
    nodes = [oh.make_node("PackSign", ["x"], ["pk0"], domain=DOMAIN), conv("1", "pk0", "c1"),
             oh.make_node("Add", ["c1", "x"], ["v1"]), oh.make_node("PackSign", ["v1"], ["pk1"], domain=DOMAIN),
             conv("2", "pk1", "c2"), oh.make_node("Add", ["c2", "v1"], ["y"])]
    outs = [oh.make_tensor_value_info("y", TP.FLOAT, None)]
    if v1_is_output == "view":  # v1 → Reshape (a view) → added to y after the second block
        inits["flat"] = np.int64([2, c, h, h])
        nodes.insert(3, oh.make_node("Reshape", ["v1", "flat"], ["v1r"]))
        nodes[-1].output[0] = "y0"
        nodes.append(oh.make_node("Add", ["y0", "v1r"], ["y"]))
    elif v1_is_output:
        outs.append(oh.make_tensor_value_info("v1", TP.FLOAT, None))
    model = oh.make_model(oh.make_graph(nodes, "two_blocks", [oh.make_tensor_value_info("x", TP.FLOAT, [2, c, h, h])],
                                       outs, [nh.from_array(np.asarray(v), k) for k, v in inits.items()]),
                          opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)], ir_version=10)
    t = _translated(model)
    assert [ch["inplace"] for ch in t.fused_chains] == [False, not v1_is_output]  # block 1 reads x: never
    x = rng.standard_normal((2, c, h, h)).astype(np.float32)
    g = lambda b: [inits[nm + b] for nm in ["w", "e", "rc", "cc", "p0", "p1"]]  # noqa: E731
    v1 = ref.binary_conv2d_packed(ref.pack_sign(x), *g("1"), **at) + x
    y = ref.binary_conv2d_packed(ref.pack_sign(v1), *g("2"), **at) + v1
    if v1_is_output == "view":
        y = y + v1
    x_copy = x.copy()
    got = G.compile_model(model, batch_size=2).run(x)
    assert np.array_equal(got, y) and np.array_equal(x, x_copy)


def _translated(model, batch=2):
    """The x86 translator run on ``model`` for this host's target (what it fused, and how)."""
    from bnnc.runtimes.tvm import graph as G

    t = G._Translator(model, batch, "x86")
    t.target = None
    t.run()
    return t


def _float_conv_nodes(rng, inits, name, cin, cout, k, s, p, x, out):
    """A float Conv (weights and bias as initializers ``name``_w/_b)."""
    from onnx import helper as oh

    inits[name + "_w"] = (0.3 * rng.standard_normal((cout, cin, k, k))).astype(np.float32)
    inits[name + "_b"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    return oh.make_node("Conv", [x, name + "_w", name + "_b"], [out], kernel_shape=[k, k], strides=[s, s],
                        pads=[p] * 4)


def _bnnc_model(nodes, inits, x_shape, outs):
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from bnnc.ops import DOMAIN

    return oh.make_model(oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, list(x_shape))],
                                       [oh.make_tensor_value_info(o, TP.FLOAT, None) for o in outs],
                                       [nh.from_array(np.asarray(v), k) for k, v in inits.items()]),
                         opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)], ir_version=10)


def _bconv_node(rng, inits, b, n, c, h, o, s, xin, out):
    from onnx import helper as oh

    from bnnc.ops import DOMAIN
    from tests.test_tvm_runtime import _conv_inputs

    args, at = _conv_inputs(rng, n, c, h, h, o, 3, s, 1, "float")
    inits.update({nm + b: a for nm, a in zip(["w", "e", "rc", "cc", "p0", "p1"], args[1:])})
    battrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in at.items()}
    return oh.make_node("BinaryConv2dPacked", [xin] + [nm + b for nm in ["w", "e", "rc", "cc", "p0", "p1"]], [out],
                        name="bconv" + b, domain=DOMAIN, **battrs)


def test_stem_pool_output_written_in_place_by_first_block(monkeypatch):
    """Conv → MaxPool (one fused kernel whose result is bound to both the conv's and the pool's output names)
    → residual block: the block's AMX kernel writes over the pool output (the conv's name has no reader left
    once the pool node is fused away). Results equal the unfused translation bit for bit; the input is kept."""
    from onnx import helper as oh

    from bnnc.ops import DOMAIN
    from bnnc.runtimes.tvm import graph as G

    if not amx.target_has_amx(None) or not amx.enabled():
        pytest.skip("host target without AMX, or BNNC_TVM_AMX=0")
    monkeypatch.setattr(amx, "MIN_INPUT_POSITIONS", 0)
    rng = np.random.default_rng(41)
    inits = {}
    nodes = [_float_conv_nodes(rng, inits, "stem", 3, 64, 3, 2, 1, "x", "s"),
             oh.make_node("MaxPool", ["s"], ["v0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             oh.make_node("PackSign", ["v0"], ["pk0"], domain=DOMAIN),
             _bconv_node(rng, inits, "1", 2, 64, 8, 64, 1, "pk0", "c1"),
             oh.make_node("Add", ["c1", "v0"], ["y"])]
    model = _bnnc_model(nodes, inits, (2, 3, 32, 32), ["y"])
    t = _translated(model)
    assert [ch["inplace"] for ch in t.fused_chains] == [True]
    assert "conv_maxpool" in [base for base, _ in t.kernels]
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    x_copy = x.copy()
    got = G.compile_model(model, batch_size=2).run(x)
    want = G.compile_model(model, batch_size=2, fuse=False).run(x)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)) and np.array_equal(x, x_copy)


def test_downsample_shortcut_fused_into_strided_block_conv(monkeypatch):
    """A ResNet downsample block in Bi-Real's node order: the shortcut (AveragePool → 1×1 float Conv) comes
    before the stride-2 binary conv, and both meet in an Add → PackSign. The Add (+ pack) goes into the
    binary conv's AMX epilogue, over the shortcut's tensor, not into a separate chain kernel after the float
    conv. Results (float value and packed bits) equal the unfused translation bit for bit."""
    from onnx import TensorProto as TP
    from onnx import helper as oh

    from bnnc.ops import DOMAIN
    from bnnc.runtimes.tvm import graph as G
    from tests.test_tvm_runtime import _with_output

    if not amx.target_has_amx(None) or not amx.enabled():
        pytest.skip("host target without AMX, or BNNC_TVM_AMX=0")
    monkeypatch.setattr(amx, "MIN_INPUT_POSITIONS", 0)
    rng = np.random.default_rng(43)
    inits = {}
    nodes = [oh.make_node("AveragePool", ["x"], ["xa"], kernel_shape=[2, 2], strides=[2, 2]),
             _float_conv_nodes(rng, inits, "down", 64, 128, 1, 1, 0, "xa", "d"),
             oh.make_node("PackSign", ["x"], ["pk0"], domain=DOMAIN),
             _bconv_node(rng, inits, "1", 2, 64, 16, 128, 2, "pk0", "c1"),
             oh.make_node("Add", ["c1", "d"], ["v"]),
             oh.make_node("PackSign", ["v"], ["pk1"], domain=DOMAIN),
             _bconv_node(rng, inits, "2", 2, 128, 8, 128, 1, "pk1", "c2"),
             oh.make_node("Add", ["c2", "v"], ["y"])]
    model = _bnnc_model(nodes, inits, (2, 64, 16, 16), ["y"])
    t = _translated(model)
    assert [(ch["conv"], ch["inplace"]) for ch in t.fused_chains] == [("bconv1", True), ("bconv2", True)]
    assert "chain_pack" not in [base for base, _ in t.kernels]  # no separate chain kernel
    x = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    for out, elem in (("pk1", TP.UINT32), ("v", TP.FLOAT), ("y", TP.FLOAT)):
        m = _with_output(model, out, elem) if out != "y" else model
        got = G.compile_model(m, batch_size=2).run(x)
        want = G.compile_model(m, batch_size=2, fuse=False).run(x)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), out
