"""The float ops the TVM translator maps beside the ai.bnnc kernels (BiMLP's PATM and pooling paths): each
compiled graph equals ONNX's reference evaluator (exactly for comparisons, selections and index ops; within
float32 rounding for sin/cos)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnnc.runtimes.tvm.graph import compile_model


def _model(nodes, out_shape, inits=(), in_shape=(2, 3, 4, 5)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                          initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _check(model, x, exact=True):
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = compile_model(model, "cpu", batch_size=x.shape[0]).run(x)
    assert got.shape == want.shape
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


@pytest.fixture
def x():
    r = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    r[0, 0, 0, :] = [0.5, 1.5, 2.5, -0.5, -2.5]  # exact halves: Round is half-to-even
    return r


def test_greater_where_round(x):
    c = numpy_helper.from_array(np.float32(0.25).reshape(()), "c")
    two = numpy_helper.from_array(np.float32(2.0).reshape(()), "two")
    nodes = [helper.make_node("Greater", ["x", "c"], ["g"]),
             helper.make_node("Mul", ["x", "two"], ["x2"]),
             helper.make_node("Round", ["x2"], ["r"]),
             helper.make_node("Where", ["g", "r", "x"], ["y"])]
    _check(_model(nodes, x.shape, [c, two]), x)


def test_round_is_half_to_even(x):
    _check(_model([helper.make_node("Round", ["x"], ["y"])], x.shape), x)


def test_sin_cos(x):
    nodes = [helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Cos", ["x"], ["c"]),
             helper.make_node("Add", ["s", "c"], ["y"])]
    _check(_model(nodes, x.shape), x, exact=False)


@pytest.mark.parametrize("idx", [np.int64(1), np.int64(-1), np.array([2, 0], np.int64)])
def test_gather_scalar_negative_and_vector_indices(x, idx):
    i = numpy_helper.from_array(np.asarray(idx), "i")
    want_shape = list(np.take(x, np.where(np.asarray(idx) < 0, np.asarray(idx) + 3, idx), axis=1).shape)
    _check(_model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], want_shape, [i]), x)


def test_gather_out_of_range_is_named(x):
    i = numpy_helper.from_array(np.asarray(3, np.int64), "i")
    with pytest.raises(ValueError, match="out of range"):
        compile_model(_model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], [2, 4, 5], [i]), "cpu",
                      batch_size=2)


def test_expand_and_tile(x):
    shp = numpy_helper.from_array(np.array([2, 1, 1, 1, 1], np.int64), "shp")
    reps = numpy_helper.from_array(np.array([1, 2, 1, 1, 3], np.int64), "reps")
    nodes = [helper.make_node("Expand", ["x", "shp"], ["e"]),
             helper.make_node("Tile", ["e", "reps"], ["y"])]
    _check(_model(nodes, [2, 4, 3, 4, 15], [shp, reps]), x)
