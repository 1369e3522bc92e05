"""Helpers shared by the passes: constants, attributes, value creation on ``onnx_ir`` graphs."""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir

from bnnc.ops import DOMAIN


class FallbackWarning(UserWarning):
    """A pattern the passes cannot lower exactly; the node keeps its float (export-form) semantics."""


def warn_fallback(node: ir.Node, why: str) -> None:
    warnings.warn(f"node {node.name!r} ({node.op_type}) stays in float: {why}", FallbackWarning, stacklevel=3)


def is_op(node: ir.Node | None, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain == domain


def is_bnnc(node: ir.Node | None, op_type: str) -> bool:
    return is_op(node, op_type, DOMAIN)


def const(value: ir.Value | None) -> np.ndarray | None:
    """NumPy value of an initializer or Constant output, else None."""
    if value is None:
        return None
    t = ir.convenience.get_const_tensor(value)
    return None if t is None else t.numpy()


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def only_consumer(value: ir.Value) -> ir.Node | None:
    """The single node that uses ``value`` (and it is not a graph output), else None."""
    users = {u.node for u in value.uses()}
    if len(users) != 1 or value.is_graph_output():
        return None
    return next(iter(users))


def consumers(value: ir.Value) -> list[ir.Node]:
    seen, out = set(), []
    for u in value.uses():
        if id(u.node) not in seen:
            seen.add(id(u.node))
            out.append(u.node)
    return out


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer with a name unique in the graph."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    v.shape = ir.Shape(array.shape)
    v.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(v)
    return v


def spatial_shape(value: ir.Value) -> tuple[int, int, int] | None:
    """(C, H, W) of an NCHW value with static C, H, W, else None."""
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    dims = [shape[i] for i in (1, 2, 3)]
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def batch_dim(value: ir.Value):
    shape = value.shape
    return shape[0] if shape is not None and len(shape) > 0 else None


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` (graph outputs included) at ``new``, which takes over ``old``'s name."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = f"{name}__replaced"
    new.name = name
