"""Portable mode: rewrite the ``ai.bnnc`` deploy form into standard ONNX ops only.

For ONNX Runtime builds (or other ONNX engines) that cannot load a custom-op library. Every deploy op
becomes a small subgraph of opset-18 ops with the same outputs as the NumPy references in
``bnnc.ops.deploy``: exact for packed bits and integers, float outputs rounded as the reference does
(``float(D) * P0`` then ``+ P1``, two separately rounded float32 ops).

* unpack: ``BitShift(RIGHT)`` of each uint32 word by 0..31, ``BitwiseAnd 1`` → 0/1, Reshape, Cast.
* pack: 0/1 as int64, times 2^bit, ``ReduceSum`` over 32 bits, Cast to uint32 (tail bits stay 0).
* BinaryConv2dPacked: with a, w ∈ {0, 1} the bits, ``popcount(a XOR w) = a + w − 2aw``, so over all taps
  (padding reads a = 0 exactly as the kernel's all-zero padded words)
  ``pc = Conv(a, 1 − 2w) + Σw`` — a float32 Conv on small integers, exact below 2^24. Then
  ``D = E[o, RowClass[y], ColClass[x]] − 2·pc`` with two ``Gather``s over the border table, and the
  float epilogue or the int64 comparison ``P0·D ≥ P1`` packed to bits.
* MaxPoolBits: unpack to 0/1 float, ``MaxPool`` (OR) or ``−MaxPool(−x)`` (AND); ONNX MaxPool pads with
  −inf, so padding never contributes, as in the reference.

Export-form ``ai.bnnc`` ops left in a deploy graph (fallbacks) are inlined from their function bodies.
The packed weights of each BinaryConv2dPacked must be constant (an initializer or a Constant node).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from bnnc.ops import DOMAIN
from bnnc.ops import deploy as K

__all__ = ["to_portable", "PortableError"]

OPSET = 18


class PortableError(ValueError):
    """The graph cannot be rewritten into standard ONNX ops."""


class _Builder:
    def __init__(self, graph: onnx.GraphProto):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
        self._names |= {i.name for i in graph.initializer}
        for n in graph.node:
            self._names |= set(n.input) | set(n.output)
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        base, i = hint, 0
        while hint in self._names:
            i += 1
            hint = f"{base}_{i}"
        self._names.add(hint)
        return hint

    def const(self, arr: np.ndarray, hint: str = "c") -> str:
        arr = np.asarray(arr)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._consts:
            return self._consts[key]
        nm = self.name(f"bnnc_portable/{hint}")
        self.inits.append(numpy_helper.from_array(arr, nm))
        self._consts[key] = nm
        return nm

    def op(self, op_type: str, inputs, hint: str, out: str | None = None, **attrs) -> str:
        out = out or self.name(f"{hint}/{op_type}")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(f"{hint}/{op_type}_n"),
                                           **attrs))
        return out

    # ---- bit helpers ------------------------------------------------------------------------------

    def unpack01(self, xp: str, rank: int, hint: str) -> str:
        """uint32 [..., Cw] → uint32 0/1 [..., Cw*32] (all bits, channel-last)."""
        u = self.op("Unsqueeze", [xp, self.const(np.array([-1], np.int64), "axes_last")], hint)
        sh = self.op("BitShift", [u, self.const(np.arange(32, dtype=np.uint32), "shifts32")], hint,
                     direction="RIGHT")
        b = self.op("BitwiseAnd", [sh, self.const(np.array(1, np.uint32), "one_u32")], hint)
        shape = np.array([0] * (rank - 1) + [-1], np.int64)
        return self.op("Reshape", [b, self.const(shape, f"reshape_r{rank}")], hint)

    def channels_first(self, t: str, rank: int, hint: str) -> str:
        if rank <= 2:
            return t
        return self.op("Transpose", [t], hint, perm=[0, rank - 1] + list(range(1, rank - 1)))

    def channels_last(self, t: str, rank: int, hint: str) -> str:
        if rank <= 2:
            return t
        return self.op("Transpose", [t], hint, perm=[0] + list(range(2, rank)) + [1])

    def slice_last(self, t: str, c: int, hint: str) -> str:
        return self.op("Slice", [t, self.const(np.array([0], np.int64), "zero_i64"),
                                 self.const(np.array([c], np.int64), f"end_{c}"),
                                 self.const(np.array([-1], np.int64), "axes_last")], hint)

    def pack(self, bits: str, rank: int, channels: int | None, hint: str, out: str) -> str:
        """bool/0-1 channel-last [..., C] → packed uint32 [..., ceil(C/32)] written to ``out``.

        ``channels=None``: C is only known at run time; the padding to a multiple of 32 is computed in
        the graph."""
        t = self.op("Cast", [bits], hint, to=TensorProto.INT64)
        if channels is None:
            c = self.op("Shape", [t], hint, start=-1)
            m32 = self.const(np.array([32], np.int64), "c32_i64")
            padn = self.op("Mod", [self.op("Sub", [m32, self.op("Mod", [c, m32], hint)], hint), m32], hint)
            pads = self.op("Concat", [self.const(np.zeros(2 * rank - 1, np.int64), f"zeros_{2 * rank - 1}"), padn],
                           hint, axis=0)
            t = self.op("Pad", [t, pads], hint)
        elif channels % 32:
            pads = np.zeros(2 * rank, np.int64)
            pads[2 * rank - 1] = K.num_words(channels) * 32 - channels
            t = self.op("Pad", [t, self.const(pads, f"pad_r{rank}_{pads[-1]}")], hint)
        shape = np.array([0] * (rank - 1) + [-1, 32], np.int64)
        t = self.op("Reshape", [t, self.const(shape, f"pack_shape_r{rank}")], hint)
        t = self.op("Mul", [t, self.const(np.left_shift(np.int64(1), np.arange(32, dtype=np.int64)), "pow2")],
                    hint)
        t = self.op("ReduceSum", [t, self.const(np.array([-1], np.int64), "axes_last")], hint, keepdims=0)
        return self.op("Cast", [t], hint, out=out, to=TensorProto.UINT32)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    ranks: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - best effort only
        inferred = model
    g = inferred.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            ranks[v.name] = len(t.shape.dim)
    for i in g.initializer:
        ranks[i.name] = len(i.dims)
    return ranks


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            a = _attrs(n)
            if "value" in a:
                out[n.output[0]] = numpy_helper.to_array(a["value"])
    return out


def to_portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every ``ai.bnnc`` op rewritten into standard ONNX (opset 18) ops."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if any(f.domain == DOMAIN for f in m.functions):
        m = onnx.inliner.inline_local_functions(m)
    ranks = _ranks(m)
    consts = _constants(m)
    b = _Builder(m.graph)
    new_nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        b.nodes = []
        hint = node.name or node.op_type
        a = _attrs(node)
        if node.op_type == "PackSign":
            _pack_sign(b, node, ranks, hint)
            ranks[node.output[0]] = ranks.get(node.input[0], 4)
        elif node.op_type == "UnpackSign":
            r = ranks.get(node.input[0], 4)
            bits = b.slice_last(b.unpack01(node.input[0], r, hint), int(a["channels"]), hint)
            f = b.op("Cast", [bits], hint, to=TensorProto.FLOAT)
            f = b.op("Sub", [b.op("Mul", [f, b.const(np.array(2, np.float32), "two_f")], hint),
                             b.const(np.array(1, np.float32), "one_f")], hint)
            t = b.channels_first(f, r, hint)
            b.op("Identity", [t], hint, out=node.output[0])
            ranks[node.output[0]] = r
        elif node.op_type == "MaxPoolBits":
            _maxpool_bits(b, node, a, hint)
            ranks[node.output[0]] = 4
        elif node.op_type == "BinaryConv2dPacked":
            _conv(b, node, a, consts, hint)
            ranks[node.output[0]] = 4
        else:
            raise PortableError(f"node {hint!r}: {DOMAIN}::{node.op_type} has no portable rewrite")
        new_nodes.extend(b.nodes)
    g = m.graph
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(b.inits)
    # opsets: standard ONNX ≥ 18, no custom domain left
    imports = [o for o in m.opset_import if o.domain not in (DOMAIN, "", "ai.onnx")]
    std = max([o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] + [OPSET])
    del m.opset_import[:]
    m.opset_import.extend([helper.make_opsetid("", std)] + imports)
    keep = [f for f in m.functions if f.domain != DOMAIN]
    del m.functions[:]
    m.functions.extend(keep)
    if m.ir_version < 8:
        m.ir_version = 8
    return m


def _pack_sign(b: _Builder, node, ranks, hint):
    x = node.input[0]
    r = ranks.get(x, 4)
    if len(node.input) > 1 and node.input[1]:
        shape = np.array([1, -1] + [1] * (r - 2), np.int64)
        t = b.op("Reshape", [node.input[1], b.const(shape, f"thr_shape_r{r}")], hint)
    else:
        t = b.const(np.array(0, np.float32), "zero_f")
    ge = b.op("GreaterOrEqual", [x, t], hint)
    b.pack(b.channels_last(ge, r, hint), r, None, hint, out=node.output[0])


def _maxpool_bits(b: _Builder, node, a, hint):
    c = int(a["channels"])
    bits = b.slice_last(b.unpack01(node.input[0], 4, hint), c, hint)
    f = b.channels_first(b.op("Cast", [bits], hint, to=TensorProto.FLOAT), 4, hint)
    kw = dict(kernel_shape=list(a["kernel_shape"]), strides=list(a.get("strides", [1, 1])),
              pads=list(a.get("pads", [0, 0, 0, 0])))
    mode = a["mode"].decode() if isinstance(a["mode"], bytes) else a["mode"]
    if mode == "or":
        p = b.op("MaxPool", [f], hint, **kw)
    elif mode == "and":
        neg = b.op("Neg", [f], hint)
        p = b.op("Neg", [b.op("MaxPool", [neg], hint, **kw)], hint)
    else:
        raise PortableError(f"MaxPoolBits node {hint!r}: mode must be 'or' or 'and', got {mode!r}")
    bits = b.op("GreaterOrEqual", [p, b.const(np.array(0.5, np.float32), "half_f")], hint)
    b.pack(b.channels_last(bits, 4, hint), 4, c, hint, out=node.output[0])


def _conv(b: _Builder, node, a, consts, hint):
    x, w, e, rc, cc, p0, p1 = node.input
    if w not in consts:
        raise PortableError(f"BinaryConv2dPacked node {hint!r}: packed weights {w!r} must be constant")
    wp = np.asarray(consts[w], np.uint32)
    o, kh, kw, cw = wp.shape
    mode = a["output"].decode() if isinstance(a["output"], bytes) else a["output"]
    # weights as bits over all Cw*32 channels: [O, KH, KW, Cw*32] → OIHW
    wb = K.unpack_bits(wp, cw * 32).astype(np.float32)
    w_conv = np.ascontiguousarray(np.transpose(1.0 - 2.0 * wb, (0, 3, 1, 2))).astype(np.float32)
    s_w = wb.reshape(o, -1).sum(axis=1).astype(np.float32).reshape(1, o, 1, 1)
    a01 = b.op("Cast", [b.unpack01(x, 4, hint)], hint, to=TensorProto.FLOAT)
    a01 = b.channels_first(a01, 4, hint)
    conv = b.op("Conv", [a01, b.const(w_conv, "w_pm")], hint, kernel_shape=[kh, kw],
                strides=list(a.get("strides", [1, 1])), pads=list(a.get("pads", [0, 0, 0, 0])),
                dilations=list(a.get("dilations", [1, 1])))
    pc = b.op("Cast", [b.op("Add", [conv, b.const(s_w, "s_w")], hint)], hint, to=TensorProto.INT32)
    base = b.op("Gather", [b.op("Gather", [e, rc], hint, axis=1), cc], hint, axis=2)  # [O, OH, OW]
    d = b.op("Sub", [base, b.op("Mul", [pc, b.const(np.array(2, np.int32), "two_i32")], hint)], hint)
    shape = b.const(np.array([1, -1, 1, 1], np.int64), "chan_shape")
    if mode == "float":
        df = b.op("Cast", [d], hint, to=TensorProto.FLOAT)
        m = b.op("Mul", [df, b.op("Reshape", [p0, shape], hint)], hint)
        b.op("Add", [m, b.op("Reshape", [p1, shape], hint)], hint, out=node.output[0])
    elif mode == "bits":
        d64 = b.op("Cast", [d], hint, to=TensorProto.INT64)
        dir64 = b.op("Reshape", [b.op("Cast", [p0], hint, to=TensorProto.INT64), shape], hint)
        thr64 = b.op("Reshape", [b.op("Cast", [p1], hint, to=TensorProto.INT64), shape], hint)
        ge = b.op("GreaterOrEqual", [b.op("Mul", [dir64, d64], hint), thr64], hint)
        b.pack(b.channels_last(ge, 4, hint), 4, int(a.get("out_channels", o)), hint, out=node.output[0])
    else:
        raise PortableError(f"BinaryConv2dPacked node {hint!r}: output must be 'float' or 'bits', got {mode!r}")
