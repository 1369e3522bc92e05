"""Float chains compiled by TVM round every ONNX op once, as ONNX Runtime and NumPy do: the compiler must not
contract a product and the following add into one FMA (TVM's LLVM backend and nvcc fuse them by default, which
changes ~1/4 of the results by an ulp and can move a value across a sign threshold). Covered: the fused chain
kernels (x86, and AArch64 under qemu), standard Mul/Add/Sub/PRelu/BatchNormalization nodes that Relax fuses into
one loop, and the CUDA code (no ``fma`` in the PTX)."""

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


# --------------------------------------------------------------------------------------------------
# Standard ONNX nodes: Relax fuses Mul + Add (or Sub, PRelu + Add, BatchNormalization) into one loop


def _graph(nodes, inits, c=64, h=16):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, h, h])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _node(op, ins, out, **kw):
    from onnx import helper

    return helper.make_node(op, ins, [out], **kw)


_C = 64
_rng = np.random.default_rng(7)
_A, _B = (_rng.standard_normal((1, _C, 1, 1)).astype(np.float32) for _ in range(2))
_S = (_rng.random(_C).astype(np.float32) + 0.5)
_BN = [_rng.standard_normal(_C).astype(np.float32) for _ in range(3)] + [_S]  # scale, bias, mean, var


@pytest.mark.parametrize("name,nodes,inits,ref", [
    ("mul-add", [_node("Mul", ["x", "a"], "m"), _node("Add", ["m", "b"], "y")], {"a": _A, "b": _B},
     lambda x: x * _A + _B),
    ("add-of-mul", [_node("Mul", ["a", "x"], "m"), _node("Add", ["b", "m"], "y")], {"a": _A, "b": _B},
     lambda x: _B + _A * x),
    ("mul-sub", [_node("Mul", ["x", "a"], "m"), _node("Sub", ["m", "b"], "y")], {"a": _A, "b": _B},
     lambda x: x * _A - _B),
    ("prelu-add", [_node("PRelu", ["x", "a"], "m"), _node("Add", ["m", "b"], "y")],
     {"a": _A.reshape(_C, 1, 1), "b": _B}, lambda x: np.where(x < 0, x * _A, x) + _B),
    ("batchnorm", [_node("BatchNormalization", ["x", "s", "bb", "mu", "var"], "y", epsilon=1e-5)],
     dict(zip(["s", "bb", "mu", "var"], _BN)),
     lambda x: (x - _BN[2].reshape(1, -1, 1, 1)) * (_BN[0] / np.sqrt(_BN[3] + np.float32(1e-5))).astype(
         np.float32).reshape(1, -1, 1, 1) + _BN[1].reshape(1, -1, 1, 1)),
])
def test_fused_standard_nodes_round_each_op(name, nodes, inits, ref):
    """Bit for bit NumPy's op-by-op float32 result (BatchNormalization: the graph's (x − mean)·m + bias form,
    m = scale/√(var + ε) folded in float32)."""
    from bnnc.runtimes.tvm.graph import compile_model

    x = np.random.default_rng(8).standard_normal((1, _C, 16, 16)).astype(np.float32)
    got = compile_model(_graph(nodes, inits)).run(x)
    np.testing.assert_array_equal(got, ref(x))


def test_multiply_te_broadcasts_like_numpy():
    from tvm import te

    a = np.random.default_rng(9).standard_normal((3, 1, 5)).astype(np.float32)
    b = np.random.default_rng(10).standard_normal((4, 1)).astype(np.float32)
    A, B = te.placeholder(a.shape, "float32", "A"), te.placeholder(b.shape, "float32", "B")
    Y = K.multiply_te(A, B)
    assert tuple(int(v) for v in Y.shape) == (3, 4, 5)
    got = K.build_kernel(te.create_prim_func([A, B, Y]))(a, b)
    np.testing.assert_array_equal(got, a * b)


# --------------------------------------------------------------------------------------------------
# AArch64 (cross-compiled, run under qemu-user) and CUDA (PTX)


def _mul_add_te(family):
    from tvm import te

    c, h = 32, 8
    X, A, B = (te.placeholder((1, c, h, h), "float32", n) for n in "XAB")
    M = K.multiply_te(X, A, family)
    Y = te.compute(M.shape, lambda *i: M[i] + B[i], name="y")
    return te.create_prim_func([X, A, B, Y]), (1, c, h, h)


def test_arm_products_are_rounded_before_the_add(tmp_path):
    from bnnc.runtimes.tvm import cross

    if cross.missing_aarch64_tools():
        pytest.skip(f"needs the AArch64 cross toolchain and qemu-user ({', '.join(cross.missing_aarch64_tools())})")
    rng = np.random.default_rng(11)
    c, h = 64, 16
    y, a, b = [rng.standard_normal((1, c, h, h)).astype(np.float32) for _ in range(3)]
    f = K.chain_pack_primfunc([1, c, h, h], [[1, c, h, h], [1, c, h, h]], [("mul", 0), ("add", 1)], want_float=True,
                              pack=False, with_threshold=False, target="arm")
    np.testing.assert_array_equal(cross.QemuKernel(f, workdir=str(tmp_path / "chain"))(y, a, b), y * a + b)
    f, shape = _mul_add_te("arm")
    x, a, b = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    np.testing.assert_array_equal(cross.QemuKernel(f, workdir=str(tmp_path / "mul"))(x, a, b), x * a + b)


def test_cuda_products_are_rounded_before_the_add():
    """nvcc would contract the chain's and the graph's mul + add into ``fma.rn.f32``: the PTX of a chain kernel
    and of a compiled Mul → Add graph (Relax fuses them, dlight schedules the loop) has separately rounded
    ``mul.rn.f32`` and no FMA."""
    import shutil

    import tvm

    from bnnc.runtimes.tvm.graph import compile_model
    from bnnc.runtimes.tvm.target import cuda_target

    if not shutil.which("nvcc"):
        pytest.skip("needs nvcc (the CUDA toolkit)")
    c, h = 64, 16
    chain = K.chain_pack_primfunc([1, c, h, h], [[1, c, h, h], [1, c, h, h]], [("mul", 0), ("add", 1)],
                                  want_float=True, pack=True, with_threshold=False, target="cuda")
    with K.nvcc_env():
        ex = tvm.compile(tvm.IRModule({"main": chain}), target=tvm.target.Target(cuda_target("sm_80")))
    graph = compile_model(_graph([_node("Mul", ["x", "a"], "m"), _node("Add", ["m", "b"], "y")], {"a": _A, "b": _B}),
                          target="cuda:sm_80")
    for src in (K.cuda_source(ex), K.cuda_source(graph.executable)):
        assert "__fmul_rn(" in src
        ptx = K.nvcc_compile(src, "sm_80", "ptx").decode()
        assert "mul.rn.f32" in ptx and "fma.rn.f32" not in ptx
