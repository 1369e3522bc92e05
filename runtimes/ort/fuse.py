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


def _indexed_copy(model: onnx.ModelProto):
    """A copy of ``model`` and indexes of its graph: (copy, initializers by name, static shapes, graph output
    names, nodes, consumers: value name → indices of the nodes reading it)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = list(g.node)
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in set(n.input):
            if name:
                consumers.setdefault(name, []).append(i)
    return m, {i.name: i for i in g.initializer}, _shapes(g), {o.name for o in g.output}, nodes, consumers


def _rewrite(m: onnx.ModelProto, nodes: list, replace: dict, removed: set, new_inits: list) -> None:
    """Nodes of ``m`` in place: ``nodes`` without ``removed``, ``replace``-d where given; ``new_inits``
    added, initializers no node reads any more dropped; the library's domain imported."""
    g = m.graph
    new_nodes = [replace.get(i, n) for i, n in enumerate(nodes) if i not in removed]
    del g.node[:]
    g.node.extend(new_nodes)
    used = {name for n in new_nodes for name in n.input} | {o.name for o in g.output}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + list(new_inits))
    if not any(o.domain == DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def fuse_chains(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with element-wise chains after float ``BinaryConv2dPacked`` nodes, and a
    ``PackSign`` of the chain's result, fused into ``ai.bnnc.ort::BinaryConv2dPackedChain``; also returns
    the number of ONNX nodes removed."""
    m, inits, shapes, outputs, nodes, consumers = _indexed_copy(model)
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
    _rewrite(m, nodes, replace, removed, const_arrays)
    return m, fused_nodes


STEM_OP = "WinogradConvMaxPool"


def _explicit_pads(node) -> list[int] | None:
    """The [t, l, b, r] pads of a 2-D Conv / MaxPool node with auto_pad NOTSET or VALID, else None."""
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        return [0, 0, 0, 0]
    if auto not in ("NOTSET", ""):
        return None
    p = [int(v) for v in _attr(node, "pads", [0, 0, 0, 0])]
    return p if len(p) == 4 else None


def fuse_stem(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each float stem, ``MaxPool(Conv(x))`` with a stride-2 conv of a 5 to 8 wide
    kernel (constant weights, groups 1, dilation 1, output channels a multiple of 8) whose only consumer is
    a max pool of column stride 2 (floor mode, no indices), replaced by one
    ``ai.bnnc.ort::WinogradConvMaxPool`` node of ``libbnnc_ort.so``: the conv by 1-D Winograd along the rows
    (:mod:`bnnc.runtimes.winograd`, the plan of the TVM kernel), the max pool on rows still in cache.
    Outputs equal the separate nodes' up to float32 rounding (the Winograd sums: about twice the direct
    conv's error). AVX-512 only: callers rewrite only where the library runs its AVX-512 or AMX kernels.
    Also returns the number of stems replaced."""
    from ..winograd import row_parts, transform_weights

    m, inits, shapes, outputs, nodes, consumers = _indexed_copy(model)
    replace, removed, new_inits, count = {}, set(), [], 0
    for ci, node in enumerate(nodes):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        x, wname = node.input[0], node.input[1]
        bname = node.input[2] if len(node.input) > 2 else ""
        xs = shapes.get(x)
        if wname not in inits or (bname and bname not in inits) or xs is None or len(xs) != 4:
            continue
        if any(not isinstance(d, int) or d < 1 for d in xs[1:]):
            continue
        w = numpy_helper.to_array(inits[wname])
        if w.dtype != np.float32 or w.ndim != 4 or w.shape[1] != xs[1] or w.shape[0] % 8:
            continue
        kh, kw = int(w.shape[2]), int(w.shape[3])
        if list(_attr(node, "strides", [1, 1])) != [2, 2] or list(_attr(node, "dilations", [1, 1])) != [1, 1]:
            continue
        if int(_attr(node, "group", 1)) != 1 or not 5 <= kw <= 8:
            continue
        pads = _explicit_pads(node)
        out = node.output[0]
        users = consumers.get(out, [])
        if pads is None or out in outputs or len(users) != 1:
            continue
        pn = nodes[users[0]]
        if pn.op_type != "MaxPool" or pn.domain not in ("", "ai.onnx") or pn.input[0] != out:
            continue
        if len(pn.output) > 1 and pn.output[1]:
            continue
        pk = [int(v) for v in _attr(pn, "kernel_shape", [])]
        pst = [int(v) for v in _attr(pn, "strides", [1, 1])]
        if (len(pk) != 2 or pst[1] != 2 or pk[0] < pst[0] or int(_attr(pn, "ceil_mode", 0))
                or list(_attr(pn, "dilations", [1, 1])) != [1, 1]):
            continue
        ppads = _explicit_pads(pn)
        oh = (xs[2] + pads[0] + pads[2] - kh) // 2 + 1
        ow = (xs[3] + pads[1] + pads[3] - kw) // 2 + 1
        if (ppads is None or oh < 1 or ow < 1 or ow > 1024 or max(ppads[0], ppads[2]) >= pk[0]
                or max(ppads[1], ppads[3]) >= pk[1]):
            continue
        parts, _ = row_parts(ow, kw, 16)
        u = transform_weights(w, parts, 8)
        b = numpy_helper.to_array(inits[bname]).astype(np.float32).reshape(-1) if bname else np.zeros(w.shape[0], np.float32)
        base = node.name or out
        new_inits += [numpy_helper.from_array(u, f"{base}.winograd_u"), numpy_helper.from_array(b, f"{base}.winograd_b")]
        flat = [v for pt in parts for v in (pt["m"], pt["npt"], pt["col"], pt["slot"], pt["ntile"])]
        fused = helper.make_node(
            STEM_OP, [x, f"{base}.winograd_u", f"{base}.winograd_b"], [pn.output[0]], name=f"{base}.winograd",
            domain=DOMAIN, channels=int(w.shape[0]), kernel_shape=[kh, kw], pads=pads,
            pool=pk + pst + ppads, parts=flat,
            at=[float(e) for pt in parts for row in pt["at"] for e in row],
            bt=[float(e) for pt in parts for row in pt["bt"] for e in row])
        replace[ci] = fused
        removed.add(users[0])
        count += 1
    if not count:
        return m, 0
    _rewrite(m, nodes, replace, removed, new_inits)  # the replaced convs' weights and biases go
    return m, count
