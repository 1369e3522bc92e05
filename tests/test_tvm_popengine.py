"""The AVX-512 popcount engine of the hand-written TIR kernels (runtimes/tvm/amx.py: ``pop_channels``): bit-exact against the NumPy reference of BinaryConv2dPacked (bits and float output) and of
the fused chain; the selection rule; whole graphs compiled with them equal the reference and the TE kernels.

The kernels run where the host has AVX-512 VPOPCNTDQ (Ice Lake and later, Zen 4 and later); elsewhere the
tests are skipped (the engines are then never selected)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")

from bnnc.runtimes.tvm import amx
from bnnc.runtimes.tvm import kernels as K
from bnnc.runtimes.tvm.target import cpu_target

from bnnc.ops import deploy as ref
from tests.test_tvm_amx import _case, _chain_case

HOST = cpu_target(2)
pytestmark = pytest.mark.skipif(not amx.target_has_popcnt512(HOST),
                                reason="host without AVX-512 VPOPCNTDQ: the popcount engines are not used here")

CASES = [
    # n, c, h, w, o, k, s, pads, dil, output, engine, (mb, og) or None
    (1, 64, 8, 8, 64, 3, 1, (1, 1, 1, 1), 1, "bits", "pop_channels", None),
    (2, 70, 9, 7, 37, 3, 1, (1, 1, 1, 1), 1, "bits", "pop_channels", None),    # batch 2, Cout % 32 != 0
    (1, 100, 10, 9, 50, 3, 1, (0, 1, 1, 0), 2, "bits", "pop_channels", None),  # dilation 2, asymmetric pads
    (1, 33, 6, 6, 33, 1, 1, (0, 0, 0, 0), 1, "bits", "pop_channels", None),    # 1x1, odd word count
    (1, 64, 12, 12, 96, 5, 1, (2, 2, 2, 2), 1, "bits", "pop_channels", None),  # 5x5
    (1, 256, 7, 7, 512, 3, 1, (1, 1, 1, 1), 1, "bits", "pop_channels", None),  # channel groups over tasks
    (1, 64, 20, 20, 64, 3, 1, (1, 1, 1, 1), 1, "bits", "pop_channels", (32, 32)),  # blocks of whole rows
    (2, 70, 9, 7, 37, 3, 2, (1, 1, 1, 1), 1, "bits", "pop_channels", None),    # stride 2 (phase planes)
    (1, 64, 23, 21, 64, 3, 2, (1, 1, 1, 1), 1, "bits", "pop_channels", (12, 32)),  # stride 2, row blocks
    (1, 100, 10, 9, 50, 3, 1, (0, 1, 1, 0), 2, "float", "pop_channels", None),
    (2, 96, 7, 7, 40, 3, 1, (0, 0, 0, 0), 1, "float", "pop_channels", None),   # pad 0, Cout % 32 != 0
    (1, 64, 20, 20, 64, 3, 1, (1, 1, 1, 1), 1, "float", "pop_channels", (32, 32)),
    (2, 130, 11, 10, 70, 3, 2, (1, 1, 1, 1), 1, "float", "pop_channels", None),  # batch 2, stride 2
    (1, 64, 8, 8, 64, 3, 1, (1, 1, 1, 1), 1, "float", "pop_channels", None),
    (1, 64, 20, 20, 64, 3, 1, (1, 1, 1, 1), 1, "float", "pop_channels", (48, 32)),  # mb rounded to whole rows
    (1, 33, 6, 6, 33, 1, 2, (0, 0, 0, 0), 1, "float", "pop_channels", None),     # 1x1 stride 2
    (1, 64, 37, 35, 96, 3, 1, (1, 1, 1, 1), 1, "float", "pop_channels", None),   # 3 pieces per row, partial last
]


def _ids(c):
    return "-".join(str(v) for v in c).replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_engine_matches_reference_and_te_kernels(case):
    *c, engine, blk = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    args, attrs = _case(rng, *c)
    want = ref.binary_conv2d_packed(*args, **attrs)
    a = {k: v for k, v in attrs.items() if k not in ("in_channels", "output")}
    mb, og = blk if blk else (None, None)
    f = amx.binary_conv2d_amx_primfunc(args[0].shape, args[1].shape, args[2].shape, output=attrs["output"],
                                       engine=engine, mb=mb, og=og, **a)
    got = K.build_kernel(f, HOST)(args[0], K.pop_weights(args[1], engine), *args[2:])
    te = K.build_kernel(K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape,
                                                        output=attrs["output"], target=HOST, **a), HOST)(*args)
    view = np.uint32 if attrs["output"] == "float" else want.dtype
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got.view(view), want.view(view))
    assert np.array_equal(got.view(view), te.view(view))


def test_bits_thresholds_tie():
    """P1 = P0·D at one position per channel: the comparison is an equality there (>= gives 1)."""
    rng = np.random.default_rng(5)
    args, attrs = _case(rng, 1, 64, 9, 9, 64, 3, 1, (1, 1, 1, 1), 1, "bits", ties=True)
    want = ref.binary_conv2d_packed(*args, **attrs)
    a = {k: v for k, v in attrs.items() if k not in ("in_channels", "output")}
    f = K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape, output="bits",
                                        weight_layout="pop_channels", target=HOST, **a)
    got = K.build_kernel(f, HOST)(args[0], K.pop_weights(args[1], "pop_channels"), *args[2:])
    assert np.array_equal(got, want)


@pytest.mark.parametrize("case", [(1, 64, 9, 9, 64, 3, 1, (1, 1, 1, 1), 1, "bits", False),
                                  (2, 70, 9, 7, 37, 3, 2, (1, 1, 1, 1), 1, "bits", False),
                                  (1, 64, 9, 9, 64, 3, 1, (1, 1, 1, 1), 1, "bits", True),
                                  (1, 256, 7, 7, 512, 3, 1, (1, 1, 1, 1), 1, "bits", False)], ids=_ids)
def test_bits_table_given_at_compile_time(case):
    """``e_table`` with bits output: ``amx_bits_table`` of E, P0, P1 (the AMX kernel's) is ceil(P1/|P0|) −
    sign(P0)·(E − Kbits) per (row class, column class) and channel, then the signs; padded channels sign 0,
    threshold 1. ``pop_bits_table`` (the popcount engine's, which decides the bits in its register tile) makes
    the same decision for every popcount 0..Kbits, and the engine with it gives the reference bits, as when the
    kernel tabulates them on each call. Ties, P0 = 0 and thresholds at the int32 ends included."""
    *c, ties = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    args, attrs = _case(rng, *c, ties=ties)
    a = {k: v for k, v in attrs.items() if k not in ("in_channels", "output")}
    want = ref.binary_conv2d_packed(*args, **attrs)
    e, p0, p1 = args[2], args[5].astype(np.int64), args[6].astype(np.int64)
    tab = amx.amx_bits_table(e, args[5], args[6], args[1].shape, wbits=False)
    o, nrc = e.shape[0], e.shape[1] * e.shape[2]
    kbits = 9 * 32 * args[1].shape[3]
    assert tab.shape == (nrc + 1, 32 * -(-o // 32)) and tab.dtype == np.int32
    assert np.array_equal(tab[nrc, :o], np.sign(p0)) and not tab[nrc, o:].any() and (tab[:nrc, o:] == 1).all()
    r, ch = 1, 5
    thr = -(-p1[ch] // abs(p0[ch])) if p0[ch] else p1[ch]
    want_t = np.clip(thr - np.sign(p0[ch]) * (int(e[ch].reshape(-1)[r]) - kbits), -(2**31) + 1, 2**31 - 1)
    assert tab[r, ch] == want_t
    f = K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape, output="bits",
                                        weight_layout="pop_channels", target=HOST, e_table=True, **a)
    ptab = amx.pop_bits_table(e, args[5], args[6], args[1].shape)
    assert ptab.shape == tab.shape and ptab.dtype == np.int32
    pc = np.arange(kbits + 1, dtype=np.int64)[:, None, None]
    dot_form = tab[-1].astype(np.int64) * (kbits - 2 * pc) >= tab[:-1].astype(np.int64)  # [pc, class, channel]
    pop_form = (pc <= ptab[:-1].astype(np.int64)) != (ptab[-1] != 0)
    assert np.array_equal(dot_form, pop_form)
    assert not pop_form[:, :, o:].any()  # padded channels: bit 0
    zero = np.zeros_like(args[5])  # P0, P1 are not read with the table
    got = K.build_kernel(f, HOST)(args[0], K.pop_weights(args[1], "pop_channels"), ptab, *args[3:5], zero, zero)
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="P0 and P1"):
        amx.amx_bits_table(e, args[5][:3], args[6], args[1].shape)


CHAIN_CASES = [
    # n, c, h, w, o, stride, want_float, with_threshold, engine
    (1, 64, 9, 11, 64, 1, True, True, "pop_channels"),
    (2, 70, 9, 7, 40, 1, True, False, "pop_channels"),   # batch 2, O % 32 != 0
    (1, 128, 5, 5, 96, 1, False, True, "pop_channels"),  # packed bits only
    (2, 70, 9, 7, 40, 2, True, True, "pop_channels"),    # stride 2
    (1, 64, 20, 20, 64, 1, False, False, "pop_channels"),  # several pixel blocks: rows split between tasks
]


@pytest.mark.parametrize("case", CHAIN_CASES, ids=_ids)
def test_engine_fused_chain_matches_numpy(case):
    """conv(float) → chain (every step kind, operands of every broadcast shape) → PackSign in the engine's
    epilogue: floats and bits bit-identical to NumPy float32 on values of a 1/4 grid (many ties at the
    thresholds), and the float result written over the residual operand (``inplace``) the same."""
    from tests.test_tvm_runtime import _run_outs

    n, c, h, w, o, s, want_float, with_t, engine = case
    rng = np.random.default_rng(sum(case[:6]))
    args, attrs, extras, steps, conv, v, thr, bits_ref = _chain_case(rng, n, c, h, w, o, s, with_t)
    a = {k: v for k, v in attrs.items() if k not in ("in_channels", "output")}
    yshape = conv.shape
    table = amx.amx_e_table(args[2], args[1].shape, wbits=False)
    wk = K.pop_weights(args[1], engine)
    outs = ([(yshape, "float32")] if want_float else []) + [(bits_ref.shape, "uint32")]
    for inplace in ([None, 0] if want_float else [None]):
        f = K.binary_conv2d_packed_chain_primfunc(args[0].shape, args[1].shape, args[2].shape, **a,
                                                  extra_shapes=[e.shape for e in extras], steps=steps,
                                                  want_float=want_float, pack=True, with_threshold=with_t,
                                                  weight_layout=engine, target=HOST, e_table=True,
                                                  inplace=inplace)
        fused = tvm.compile(tvm.IRModule({"main": f}), target=HOST)
        ex = [e.copy() for e in extras]
        if inplace is None:
            got = _run_outs(fused, [args[0], wk, table, *args[3:], *ex] + ([thr] if with_t else []), outs)
        else:  # the float result over operand 0: read back from it
            dev = tvm.cpu()
            ins = [tvm.runtime.tensor(np.ascontiguousarray(t), dev)
                   for t in [args[0], wk, table, *args[3:], *ex] + ([thr] if with_t else [])]
            yb = tvm.runtime.tensor(np.zeros(bits_ref.shape, np.uint32), dev)
            fused(*ins, yb)
            got = [ins[7].numpy(), yb.numpy()]
        if want_float:
            assert np.array_equal(got[0].view(np.uint32), v.view(np.uint32)), inplace
        assert np.array_equal(got[-1], bits_ref), inplace


def test_selection_rule(monkeypatch):
    sel = lambda xs, ws, use, s=(1, 1), target=HOST, cin=None: amx.pop_engine(  # noqa: E731
        xs, ws, strides=s, pads=(1, 1, 1, 1), dilations=(1, 1), target=target, use=use, in_channels=cin)
    zen4 = {"kind": "llvm", "mcpu": "znver4"}
    for use in ("bits", "float"):
        assert sel((1, 7, 7, 16), (512, 3, 3, 16), use, target=zen4) == "pop_channels"
        assert sel((1, 14, 14, 8), (256, 3, 3, 8), use, target=zen4) == "pop_channels"
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), "bits", target=zen4) == "pop_channels"
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), "float", target=zen4) == "pop_channels"
    assert sel((1, 56, 56, 2), (128, 3, 3, 2), "float", s=(2, 2), target=zen4) == "pop_channels"
    assert sel((1, 56, 56, 2), (128, 3, 3, 2), "bits", s=(2, 2), target=zen4) == "pop_channels"
    assert sel((1, 28, 28, 4), (256, 3, 3, 4), "float", s=(2, 2), target=zen4) == "pop_channels"  # 14x14 out
    assert sel((1, 14, 14, 8), (256, 3, 3, 8), "chain", target=zen4) == "pop_channels"
    assert sel((1, 14, 14, 8), (512, 3, 3, 8), "chain", s=(2, 2), target=zen4) == "pop_channels"  # 7x7 out
    assert sel((1, 7, 7, 16), (512, 3, 3, 16), "chain", target=zen4) is None  # stride-1 7x7: TE
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), "chain", target=zen4) is None
    assert sel((1, 56, 56, 2), (128, 3, 3, 2), "chain", s=(2, 2), target=zen4) is None
    assert sel((1, 32, 32, 1), (16, 3, 3, 1), "bits", target=zen4) is None   # fewer than 32 output channels
    assert sel((1, 32, 32, 1), (32, 3, 3, 1), "bits", target=zen4, cin=16) is None  # taps packed to a word (TE)
    assert sel((1, 32, 32, 1), (32, 3, 3, 1), "bits", target=zen4, cin=32) == "pop_channels"
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), "bits", target={"kind": "llvm", "mcpu": "znver3"}) is None
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), "bits", target="arm") is None
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), "bits", target="x86") is None  # a family names no CPU
    monkeypatch.setenv("BNNC_TVM_POP", "0")
    assert sel((1, 56, 56, 2), (64, 3, 3, 2), "bits", target=zen4) is None
    with pytest.raises(ValueError, match="use"):
        amx.pop_engine((1, 8, 8, 2), (64, 3, 3, 2), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1),
                       target=zen4, use="other")


def test_engine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="engine"):
        amx.binary_conv2d_amx_chain_primfunc((1, 8, 8, 2), (64, 3, 3, 2), (64, 3, 3), out_channels=64,
                                             kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1),
                                             dilations=(1, 1), engine="avx2")
    with pytest.raises(ValueError, match="packed weights"):
        amx.binary_conv2d_amx_chain_primfunc((1, 8, 8, 2), (64, 3, 3, 2), (64, 3, 3), out_channels=64,
                                             kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1),
                                             dilations=(1, 1), engine="pop_channels", wbits=True)
    with pytest.raises(ValueError, match="pop_channels"):
        K.binary_conv2d_packed_primfunc((1, 8, 8, 2), (64, 3, 3, 2), (64, 3, 3), out_channels=64,
                                        kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1),
                                        output="bits", weight_layout="pop_pixels", target=HOST)  # retired engine
    with pytest.raises(ValueError, match="layout"):
        K.pop_weights(np.zeros((64, 3, 3, 2), np.uint32), "blocked")


@pytest.mark.parametrize("stride", [1, 2])
def test_graph_takes_engines_and_matches_te(stride, monkeypatch):
    """A residual block compiled for this host: its convs take the popcount engines the rule names (the
    14x14-class plane of the fused chain: channels in the lanes) and every output — packed bits, the chain's
    float value, the block's output — equals the TE kernels' translation (BNNC_TVM_POP=0) and NumPy bit for
    bit."""
    from bnnc.runtimes.tvm.graph import compile_model

    from tests.test_tvm_amx import _translated
    from tests.test_tvm_runtime import _residual_block, _with_output

    monkeypatch.setenv("BNNC_TVM_AMX", "0")  # on an AMX host too: the engines take the convs AMX would
    rng = np.random.default_rng(31 + stride)
    model, x, want = _residual_block(rng, h=10, w=12, stride=stride)  # 120 output positions
    t = _translated(model)
    kinds = [ch["kernel"] for ch in t.fused_chains if ch["in_conv"]]
    assert kinds == ["pop_channels", "pop_channels"]  # (stride 2: a 5x6 output plane, strided: the engine's too)
    for out, elem in (("pk1", onnx.TensorProto.UINT32), ("v", onnx.TensorProto.FLOAT),
                      ("y", onnx.TensorProto.FLOAT)):
        m = _with_output(model, out, elem)
        got = compile_model(m, batch_size=2).run(x)
        assert np.array_equal(got.view(np.uint32), want[out].view(np.uint32)), out
        monkeypatch.setenv("BNNC_TVM_POP", "0")
        te = compile_model(m, batch_size=2).run(x)
        monkeypatch.delenv("BNNC_TVM_POP")
        assert np.array_equal(got.view(np.uint32), te.view(np.uint32)), out
