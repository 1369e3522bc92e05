"""Find the per-channel elementwise region between a binary conv and the next binarization, and evaluate
the export form's own float32 computation of it on every reachable popcount value.

The region may hold BatchNorm, per-channel affine ops, monotone or not activations (PReLU, Maxout's
diamond of Relu/Mul/Sub, Clip…) and max pools. Evaluating the real ONNX nodes with ONNX Runtime on
the grid D = −K…K gives the exact binary decision the reference computes for each D, so the integer
test derived from it agrees with the reference everywhere, ties included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ._graph import attr, const, is_bnnc, is_op

# Elementwise ops whose non-constant input is the region value, evaluated per channel.
UNARY = {"Relu", "LeakyRelu", "Neg", "Identity", "Abs", "Sigmoid", "Tanh", "HardSigmoid", "Elu", "Selu",
         "Softplus", "Softsign", "HardSwish", "Clip", "PRelu", "BatchNormalization", "Cast"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"}


def _per_channel_const(value: ir.Value | None, channels: int) -> bool:
    c = const(value)
    if c is None:
        return value is None  # optional input absent
    shape = c.shape
    if c.size == 1:
        return True
    # broadcastable to [1, C, 1, 1] with C along axis 1 (or [C, 1, 1])
    dims = list(shape)
    while len(dims) < 4:
        dims.insert(0, 1)
    return len(dims) == 4 and dims[0] == 1 and dims[2] == 1 and dims[3] == 1 and dims[1] in (1, channels)


def _elementwise(node: ir.Node, region_values: set, channels: int) -> bool:
    if node.domain != "":
        return False
    live = [v for v in node.inputs if v is not None and id(v) in region_values]
    if len(node.outputs) != 1 or not live:
        return False
    others = [v for v in node.inputs if v is not None and id(v) not in region_values]
    if node.op_type == "BatchNormalization":
        return (node.inputs[0] in live and len(live) == 1 and not attr(node, "training_mode", 0)
                and all(const(v) is not None for v in node.inputs[1:5]))
    if node.op_type in UNARY:
        return node.inputs[0] in live and all(_per_channel_const(v, channels) for v in others)
    if node.op_type in BINARY:
        return all(_per_channel_const(v, channels) for v in others)
    return False


def _plain_maxpool(node: ir.Node) -> bool:
    return (is_op(node, "MaxPool") and len(node.outputs) == 1 and attr(node, "ceil_mode", 0) == 0
            and attr(node, "auto_pad", "NOTSET") == "NOTSET" and attr(node, "storage_order", 0) == 0
            and all(d == 1 for d in attr(node, "dilations", (1, 1))))


@dataclass
class Region:
    """conv output → segment₀ → pool₁ → segment₁ → … → PackSign."""

    segments: list = field(default_factory=list)  # [(entry value, exit value, [nodes])]
    pools: list = field(default_factory=list)  # MaxPool nodes between segments
    pack: ir.Node | None = None

    @property
    def nodes(self) -> list:
        return [n for _, _, ns in self.segments for n in ns] + self.pools


def _segment(entry: ir.Value, channels: int):
    """The maximal elementwise DAG fed by ``entry`` (inputs from the DAG or constants). It must close on a
    single exit value, the only one used outside it. Returns (exit, nodes) or (None, None)."""
    nodes, node_ids, vals = [], set(), {id(entry): entry}
    changed = True
    while changed:
        changed = False
        for val in list(vals.values()):
            for u in val.uses():
                n = u.node
                if id(n) in node_ids:
                    continue
                if not all(x is None or id(x) in vals or const(x) is not None for x in n.inputs):
                    continue
                if not _elementwise(n, set(vals), channels):
                    continue
                nodes.append(n)
                node_ids.add(id(n))
                vals[id(n.outputs[0])] = n.outputs[0]
                changed = True
    open_vals = [v for v in vals.values()
                 if v.is_graph_output() or any(id(u.node) not in node_ids for u in v.uses())]
    if len(open_vals) != 1:
        return None, None
    return open_vals[0], nodes


def find_region(conv_out: ir.Value, channels: int) -> Region | None:
    region = Region()
    v = conv_out
    while True:
        exit_value, nodes = _segment(v, channels)
        if exit_value is None or exit_value.is_graph_output():
            return None
        region.segments.append((v, exit_value, nodes))
        users = list({id(u.node): u.node for u in exit_value.uses()}.values())
        if len(users) != 1:
            return None
        nxt = users[0]
        if is_bnnc(nxt, "PackSign"):
            region.pack = nxt
            return region
        if not _plain_maxpool(nxt):
            return None
        region.pools.append(nxt)
        v = nxt.outputs[0]


def _run_segment(model: ir.Model, entry: ir.Value, exit_value: ir.Value, nodes, x: np.ndarray) -> np.ndarray:
    if not nodes:
        return x
    sub = ir.convenience.extract(model.graph, [entry], [exit_value])
    sub.inputs[0].shape = ir.Shape(list(x.shape))
    sub.outputs[0].shape = None
    sub.opset_imports.clear()
    sub.opset_imports[""] = model.opset_imports.get("", 18)
    proto = ir.serde.serialize_model(ir.Model(sub, ir_version=10))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def evaluate_region(model: ir.Model, region: Region, entry_grid: np.ndarray):
    """Run each segment on the grid (pools are identity for a per-position evaluation).

    Returns the list of values at each segment exit, ``[z_0, …, z_last]``, each [1, O, G, 1] float32.
    """
    zs, x = [], entry_grid
    for entry, exit_value, nodes in region.segments:
        x = _run_segment(model, entry, exit_value, nodes, x)
        zs.append(x)
    return zs


def monotone_direction(values: np.ndarray, decisions: np.ndarray) -> int:
    """+1 if the decision is non-decreasing in the value, −1 if non-increasing, 0 if constant, None if neither."""
    order = np.argsort(values, kind="stable")
    v, d = values[order], decisions[order].astype(np.int8)
    # equal values must give equal decisions (a function of the value)
    same = v[1:] == v[:-1]
    if np.any(same & (d[1:] != d[:-1])):
        return None
    diff = np.diff(d)
    if not diff.any():
        return 0
    if np.all(diff >= 0):
        return 1
    if np.all(diff <= 0):
        return -1
    return None

