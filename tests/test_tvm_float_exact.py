"""Float chains compiled by TVM round every ONNX op once, as ONNX Runtime and NumPy do: LLVM must not contract a
product and the following add into one FMA (TVM's LLVM backend fuses them by default, which changes ~1/4 of the
results by an ulp and can move a value across a sign threshold)."""

from __future__ import annotations

import numpy as np
import pytest

from bnnc.runtimes.tvm import kernels as K


@pytest.mark.parametrize("steps,ops", [
    ([("mul", 0), ("add", 1)], lambda y, a, b: y * a + b),
    ([("prelu", 0), ("add", 1)], lambda y, a, b: np.where(y < 0, y * a, y) + b),
    ([("mul", 0), ("sub", 1)], lambda y, a, b: y * a - b),
    ([("mul", 0), ("rsub", 1)], lambda y, a, b: b - y * a),
])
def test_chain_products_are_rounded_before_the_add(steps, ops):
    c, h = 64, 16
    rng = np.random.default_rng(0)
    y, a, b = [rng.standard_normal((1, c, h, h)).astype(np.float32) for _ in range(3)]
    want = ops(y, a, b)
    f = K.chain_pack_primfunc([1, c, h, h], [[1, c, h, h], [1, c, h, h]], steps, want_float=True, pack=False,
                              with_threshold=False)
    got = K.build_kernel(f)(y, a, b)
    np.testing.assert_array_equal(got, want)


def test_chain_then_pack_decides_like_numpy():
    """v = y·a + b packed at threshold 0, with b = −float32(y·a) for half the values: exact zeros that an FMA
    would turn into ±tiny residuals (flipping v ≥ 0 for the negative ones)."""
    c, h = 32, 8
    rng = np.random.default_rng(1)
    y, a = [rng.standard_normal((1, c, h, h)).astype(np.float32) for _ in range(2)]
    b = rng.standard_normal((1, c, h, h)).astype(np.float32)
    tie = rng.random((1, c, h, h)) < 0.5
    b[tie] = -(y * a)[tie]
    v = y * a + b
    from bnnc.ops.deploy import pack_sign

    want = pack_sign(v)
    f = K.chain_pack_primfunc([1, c, h, h], [[1, c, h, h], [1, c, h, h]], [("mul", 0), ("add", 1)],
                              want_float=False, pack=True, with_threshold=False)
    got = K.build_kernel(f)(y, a, b)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("amx", [False, True])
def test_conv_with_fused_chain_rounds_each_op(monkeypatch, amx):
    """The chain inside the conv's epilogue (popcount and AMX kernels): v = conv·a + b with random (off-grid)
    operands equals NumPy's op-by-op float32 result bit for bit."""
    from bnnc.ops import deploy as ref
    from bnnc.runtimes.tvm import amx as A
    from tests.test_tvm_runtime import _conv_inputs

    if amx and not (A.target_has_amx(None) and A.enabled()):
        pytest.skip("no AMX here")
    monkeypatch.setenv("BNNC_TVM_AMX", "1" if amx else "0")
    monkeypatch.setattr(A, "MIN_INPUT_POSITIONS", 0)
    rng = np.random.default_rng(3)
    args, attrs = _conv_inputs(rng, 1, 64, 12, 12, 64, 3, 1, 1, "float")
    args = list(args)
    a = {k: v for k, v in attrs.items() if k not in ("in_channels", "output")}
    conv = ref.binary_conv2d_packed(*args, **attrs)
    sa, sb = rng.standard_normal((1, 64, 1, 1)).astype(np.float32), rng.standard_normal(conv.shape).astype(np.float32)
    want = conv * sa + sb
    xs, ws, es = args[0].shape, args[1].shape, args[2].shape
    layout = K.conv_weight_layout(xs, ws, strides=a["strides"], pads=a["pads"], dilations=a["dilations"], amx=True)
    assert (layout == "amx") == amx
    wargs = list(args)
    if layout == "amx":
        wargs[1] = A.amx_conv_weights(np.asarray(args[1], np.uint32), "float")
    elif layout == "blocked":
        wargs[1] = K.block_conv_weights(np.asarray(args[1], np.uint32))
    f = K.binary_conv2d_packed_chain_primfunc(xs, ws, es, extra_shapes=[sa.shape, sb.shape], steps=[("mul", 0), ("add", 1)],
                                              want_float=True, pack=False, with_threshold=False, weight_layout=layout,
                                              **a)
    got = K.build_kernel(f)(*wargs, sa, sb)
    np.testing.assert_array_equal(got, want)
