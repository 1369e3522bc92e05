"""Graph rewrite for the ONNX Runtime custom-op library: element-wise chains after float binary convs.

In the deploy form a float-output ``BinaryConv2dPacked`` is usually followed by element-wise ops: the
residual ``Add`` (Bi-Real, ReActNet, IR-Net), per-channel ``Add``/``Mul`` (LearnableBias, scales), ``PRelu``
and ``Clip`` with constant bounds (Hardtanh). On ONNX Runtime each is one more full pass over the activation
(measured on Bi-Real-18: 16 Adds = 9 % of the run; ReActNet-18: 48 Adds + 16 PRelus = 28 %).
:func:`fuse_chains` folds such a chain into one ``ai.bnnc.ort::BinaryConv2dPackedChain`` node of
``libbnnc_ort.so``, which applies the steps to each output row right after the convolution epilogue, while
it is in cache; a ``PackSign`` of the chain's result (the next binary conv's input) becomes the fused node's
second output, packed from the same cached rows. Every step is the same float32 operation in the same order
as the separate node, so outputs are bit-identical. The fused op declares its output may take the residual's
buffer (ORT's ``MayInplace``): along a ResNet's float residual stream, where the residual has no later
consumer, ONNX Runtime then updates one buffer in place instead of streaming a second one through the cache
(Bi-Real-18 at 224²: ~6 % of the run).

A node joins the chain only if the value it extends has no other consumer and is not a graph output; an
``Add`` of a full tensor needs that tensor's static shape (from ``value_info``) to equal the conv output's;
per-channel operands must be initializers broadcasting over the channel axis only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

DOMAIN = "ai.bnnc.ort"
OP = "BinaryConv2dPackedChain"

ADD_RESIDUAL, ADD_CHANNEL, MUL_CHANNEL, PRELU, CLIP = 1, 2, 3, 4, 5


def _shapes(graph) -> dict:
    out = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    for i in graph.initializer:
        out[i.name] = tuple(i.dims)
    return out


def _per_channel(arr: np.ndarray, channels: int) -> np.ndarray | None:
    """``arr`` as [channels] float32 if it broadcasts against [N, channels, H, W] along the channel axis only."""
    if arr.dtype != np.float32 or arr.ndim > 4:
        return None
    shape = (1,) * (4 - arr.ndim) + arr.shape
    if shape[0] != 1 or shape[2] != 1 or shape[3] != 1 or shape[1] not in (1, channels):
        return None
    return np.ascontiguousarray(np.broadcast_to(arr.reshape(-1), (channels,)), dtype=np.float32)


def _clip_bounds(node, inits) -> tuple[float, float] | None:
    """(lo, hi) of a Clip node with constant bounds (opset 11+: scalar initializer inputs or none; opset 6:
    attributes), else None."""
    f32 = np.finfo(np.float32)
    if any(a.name in ("min", "max") for a in node.attribute):
        return float(_attr(node, "min", f32.min)), float(_attr(node, "max", f32.max))
    out = []
    for i, dflt in ((1, -np.inf), (2, np.inf)):
        name = node.input[i] if len(node.input) > i else ""
        if name == "":
            out.append(dflt)
        elif name in inits and inits[name].data_type == onnx.TensorProto.FLOAT and int(np.prod(inits[name].dims)) == 1:
            out.append(float(numpy_helper.to_array(inits[name]).reshape(())))
        else:
            return None
    return out[0], out[1]


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fuse_chains(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with element-wise chains after float ``BinaryConv2dPacked`` nodes, and a
    ``PackSign`` of the chain's result, fused into ``ai.bnnc.ort::BinaryConv2dPackedChain``; also returns
    the number of ONNX nodes removed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    shapes = _shapes(g)
    outputs = {o.name for o in g.output}
    nodes = list(g.node)
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in set(n.input):
            if name:
                consumers.setdefault(name, []).append(i)
    removed: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    const_arrays: list[onnx.TensorProto] = []
    fused_nodes = 0
    for ci, node in enumerate(nodes):
        if node.domain != "ai.bnnc" or node.op_type != "BinaryConv2dPacked" or _attr(node, "output") != b"float":
            continue
        cur = node.output[0]
        yshape = shapes.get(cur)
        channels = int(_attr(node, "out_channels", 0))
        steps, consts, residual, chain_nodes = [], [], None, []
        while True:
            users = consumers.get(cur, [])
            if cur in outputs or len(users) != 1:
                break
            nxt_idx = users[0]
            nxt = nodes[nxt_idx]
            if nxt.domain not in ("", "ai.onnx") or len(nxt.output) != 1:
                break
            step = None
            if nxt.op_type in ("Add", "Mul") and len(nxt.input) == 2 and cur in nxt.input and nxt.input[0] != nxt.input[1]:
                other = nxt.input[1] if nxt.input[0] == cur else nxt.input[0]
                if other in inits:
                    c = _per_channel(numpy_helper.to_array(inits[other]), channels)
                    if c is not None:
                        step = (ADD_CHANNEL if nxt.op_type == "Add" else MUL_CHANNEL, c)
                elif (nxt.op_type == "Add" and residual is None and yshape is not None and len(yshape) == 4
                      and None not in yshape and shapes.get(other) == yshape):
                    step = (ADD_RESIDUAL, other)
            elif nxt.op_type == "PRelu" and len(nxt.input) == 2 and nxt.input[0] == cur and nxt.input[1] in inits:
                c = _per_channel(numpy_helper.to_array(inits[nxt.input[1]]), channels)
                if c is not None:
                    step = (PRELU, c)
            elif nxt.op_type == "Clip" and nxt.input[0] == cur:
                bounds = _clip_bounds(nxt, inits)
                if bounds is not None:
                    step = (CLIP, np.stack([np.full(channels, b, np.float32) for b in bounds]))
            if step is None:
                break
            if step[0] == ADD_RESIDUAL:
                residual = step[1]
            elif step[0] == CLIP:
                consts.extend(step[1])  # two rows: lo, hi
            else:
                consts.append(step[1])
            steps.append(step[0])
            chain_nodes.append(nxt_idx)
            cur = nxt.output[0]
        # a PackSign of the final value (constant or no threshold) becomes the second output
        pack = None
        for ui in consumers.get(cur, []):
            u = nodes[ui]
            if (u.domain == "ai.bnnc" and u.op_type == "PackSign" and u.input[0] == cur and len(u.output) == 1
                    and ui not in removed):
                t = u.input[1] if len(u.input) > 1 else ""
                if t == "" or (t in inits and int(np.prod(inits[t].dims)) == channels
                               and inits[t].data_type == onnx.TensorProto.FLOAT):
                    pack = (ui, t)
                    break
        if not steps and pack is None:
            continue
        base = node.name or node.output[0]
        inputs = list(node.input[:7]) + [residual or ""]
        cname = ""
        if consts:
            cname = f"{base}.chain_consts"
            const_arrays.append(numpy_helper.from_array(np.stack(consts).astype(np.float32), cname))
        inputs.append(cname)
        outputs = [cur]
        if pack is not None:
            inputs.append(pack[1])
            outputs.append(nodes[pack[0]].output[0])
        while inputs and inputs[-1] == "":
            inputs.pop()
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "chain"}
        fused = helper.make_node(OP, inputs, outputs, name=f"{base}.chain", domain=DOMAIN, **attrs)
        fused.attribute.append(helper.make_attribute("chain", steps, attr_type=onnx.AttributeProto.INTS))
        # at the last chain node's place: every input of the chain (the residual too) exists by then
        replace[chain_nodes[-1] if chain_nodes else ci] = fused
        if chain_nodes:
            removed.add(ci)
        removed.update(chain_nodes[:-1])
        if pack is not None:
            removed.add(pack[0])
        fused_nodes += len(chain_nodes) + (pack is not None)
    if not replace:
        return m, 0
    new_nodes = []
    for i, n in enumerate(nodes):
        if i in removed:
            continue
        new_nodes.append(replace.get(i, n))
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(const_arrays)
    if not any(o.domain == DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return m, fused_nodes
