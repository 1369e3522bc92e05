"""Lower ``SignBinarize → BinaryConv2d`` (export form) to ``PackSign → BinaryConv2dPacked`` (deploy form).

Plain binary convs (activation levels ±p, weights r·s_w, ``q = 0``, ``t = 0``) start with the epilogue
Y = fl32(D · p·R) + 0, which is what the export form computes (a conv on ±1 values, exact in float32,
times the weight scale); later passes fold BatchNorm and thresholds into it.

Affine binary sets (deploy.md §3; AdaBin: activations p·s + q, weights r_o·s_w + t_o) expand into
popcount terms over the valid taps V of each window:

    y_o = p·r_o·Σ_V s_a s_w                (the XOR-popcount conv, ``BinaryConv2dPacked``)
        + p·t_o·Σ_V s_a                    (S_a: one popcount per output pixel, shared by all channels: a
                                            one-output-channel ``BinaryConv2dPacked`` with all +1 weights,
                                            broadcast by a per-channel ``Mul``)
        + Σ_V q_c·(r_o·s_w + t_o)          (constant per border class: folded into P1 without padding,
                                            else a standard ``Conv`` of a constant all-ones image)

A BatchNorm that follows is folded into all three terms. The sum is float; the next quantizer (or a
threshold where the pre-activation is a function of D alone, see ``fuse_threshold``) binarizes it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnnc.ops import DOMAIN
from bnnc.ops.deploy import border_classes, num_words

from . import arith
from ._graph import (add_initializer, attr, batch_dim, const, consumers, is_bnnc, is_op, only_consumer,
                     replace_value, spatial_shape, warn_fallback)

#: suffix of the ``source`` attribute of the auxiliary one-channel conv that counts S_a = Σ_V s_a
SA_SOURCE_SUFFIX = " (S_a)"
#: node metadata key recording how padded taps read in the export form ("zero" or "one", deploy.md §4, §7)
PADDING_KEY = "bnnc.padding"
#: node metadata key marking a packed conv whose float epilogue is the lowered affine form (P1 ≠ 0 is not
#: a folded BatchNorm but part of the lowered arithmetic)
AFFINE_KEY = "bnnc.affine"


def _packed_value(name: str, like: ir.Value, hw, channels: int) -> ir.Value:
    v = ir.Value(name=name)
    v.dtype = ir.DataType.UINT32
    v.shape = ir.Shape([batch_dim(like), hw[0], hw[1], num_words(channels)])
    return v


def _float_value(name: str, shape) -> ir.Value:
    v = ir.Value(name=name)
    v.dtype = ir.DataType.FLOAT
    v.shape = ir.Shape(list(shape)) if shape is not None else None
    return v


def pack_sign_node(graph: ir.Graph, quant: ir.Node, cache: dict) -> ir.Value:
    """PackSign replacing ``quant`` (a SignBinarize), created once per quantizer."""
    if id(quant) in cache:
        return cache[id(quant)]
    x, t = quant.inputs[0], quant.inputs[1]
    c, h, w = spatial_shape(x)
    out = _packed_value(f"{quant.outputs[0].name}_bits", x, (h, w), c)
    node = ir.Node(DOMAIN, "PackSign", [x, t], outputs=[out], name=f"{quant.name}_pack")
    graph.insert_after(quant, node)
    cache[id(quant)] = out
    return out


def activation_levels(quant: ir.Node, channels: int):
    """(p, q) of ``SignBinarize``'s levels p·s + q: p one float (it scales the popcount), q per channel [C].
    Returns (None, reason) when p differs between channels."""
    p = np.asarray(const(quant.inputs[2]), np.float64).reshape(-1)
    q = np.asarray(const(quant.inputs[3]), np.float64).reshape(-1)
    if p.size not in (1, channels) or q.size not in (1, channels):
        return None, "the quantizer's affine parameters do not match the channel count"
    if np.any(p != p[0]):
        return None, "per-channel activation scales p_c (the popcount would need per-channel weights)"
    return (float(p[0]), np.broadcast_to(q, (channels,)).copy()), None


def constant_term(w: np.ndarray, r: np.ndarray, b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """M[o, 0, i, j] = Σ_c q_c·(r_o·sign(w[o, c, i, j]) + b_o): the constant term's per-tap kernel.

    Convolving an all-ones image (zero padded like the export form) with M gives Σ_V q_c·w_b over the
    valid taps of every window, i.e. the term q⊗w_b per border class (float64)."""
    ws = np.where(np.asarray(w) >= 0, 1.0, -1.0)
    wb = ws * np.asarray(r, np.float64)[:, None, None, None] + np.asarray(b, np.float64)[:, None, None, None]
    return np.einsum("ocij,c->oij", wb, np.asarray(q, np.float64))[:, None]


def constant_table(m: np.ndarray, in_hw, strides, pads, dilations):
    """Σ over the valid taps of M per border class: ``(table [O, NR, NC], row_class, col_class)``."""
    _, _, kh, kw = m.shape
    rcls, rvalid = border_classes(in_hw[0], kh, strides[0], pads[0], pads[2], dilations[0])
    ccls, cvalid = border_classes(in_hw[1], kw, strides[1], pads[1], pads[3], dilations[1])
    table = np.einsum("oij,ri,cj->orc", m[:, 0], rvalid.astype(np.float64), cvalid.astype(np.float64))
    return table, rcls, ccls


PADDING_NAMES = {0: "zero", 1: "one", -1: "minus_one"}


def _is_level_pad(node: ir.Node | None) -> bool:
    """A constant-mode ``Pad`` with constant pads on the two spatial axes of an NCHW tensor only."""
    if not (is_op(node, "Pad") and attr(node, "mode", "constant") == "constant" and len(node.outputs) == 1):
        return False
    pads = const(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = node.inputs[3] if len(node.inputs) > 3 else None
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if pads is None or axes is not None or (value is not None and const(value) is None):
        return False
    pads = np.asarray(pads).reshape(-1)
    return pads.size == 8 and not pads[[0, 1, 4, 5]].any() and (pads >= 0).all()


def _quantizer_of(conv: ir.Node):
    """(quantizer node, Pad node or None) feeding ``conv``: SignBinarize → [Pad] → BinaryConv2d."""
    src = conv.inputs[0].producer()
    if _is_level_pad(src):
        return src.inputs[0].producer(), src
    return src, None


def _binary_consumer(node: ir.Node, value: ir.Value) -> bool:
    if is_bnnc(node, "BinaryConv2d") and node.inputs[0] is value:
        return True
    return (_is_level_pad(node) and node.inputs[0] is value
            and all(is_bnnc(n, "BinaryConv2d") and n.inputs[0] is node.outputs[0]
                    for n in consumers(node.outputs[0])) and not node.outputs[0].is_graph_output())


def _explicit_padding(pad: ir.Node, levels):
    """([top, left, bottom, right], level) of an explicit Pad holding the quantizer's +1 (level 1) or −1
    (level −1) value p·(±1) + q, or None. A zero value is ordinary zero padding (level 0)."""
    p, q = levels
    pads = np.asarray(const(pad.inputs[1])).reshape(-1)
    hw = [int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])]
    value = float(np.asarray(const(pad.inputs[2])).reshape(-1)[0]) if len(pad.inputs) > 2 and pad.inputs[2] else 0.0
    plus, minus = np.float32(p + q), np.float32(-p + q)
    if np.all(q == q[0]) and p != 0 and value == plus[0]:
        return hw, 1
    if np.all(q == q[0]) and p != 0 and value == minus[0]:
        return hw, -1
    if value == 0.0:
        return hw, 0
    return None


def _following_batchnorm(value: ir.Value):
    """(node, g, h) for an inference BatchNorm that is the only consumer of ``value``, else None."""
    bn = only_consumer(value)
    if not (is_op(bn, "BatchNormalization") and len(bn.outputs) == 1 and not attr(bn, "training_mode", 0)
            and bn.inputs[0] is value):
        return None
    params = [const(v) for v in bn.inputs[1:5]]
    if any(v is None for v in params):
        return None
    g, h = arith.batchnorm_affine(*params, attr(bn, "epsilon", 1e-5))
    return bn, g, h


class LowerBinaryConvPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._packs: dict = {}
        self._sa: dict = {}
        self._ones: dict = {}
        modified = False
        for conv in list(graph):
            if not is_bnnc(conv, "BinaryConv2d"):
                continue
            why = self._check(conv)
            if why:
                warn_fallback(conv, why)
                continue
            self._lower(graph, conv)
            modified = True
        for node in list(graph):
            if is_bnnc(node, "SignBinarize") and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _check(conv: ir.Node) -> str | None:
        quant, pad = _quantizer_of(conv)
        w, r, b = const(conv.inputs[1]), const(conv.inputs[2]), const(conv.inputs[3])
        if not is_bnnc(quant, "SignBinarize"):
            return "its input is not binarized by a SignBinarize (real-valued activations)"
        if any(const(v) is None for v in quant.inputs[1:4]):
            return "the input quantizer's threshold or affine parameters are not constants"
        if not all(_binary_consumer(n, quant.outputs[0]) for n in consumers(quant.outputs[0])):
            return "its binarized input also feeds a non-binary consumer"
        if spatial_shape(quant.inputs[0]) is None:
            return "the input's channel and spatial sizes are not static"
        if w is None or r is None or b is None:
            return "weights, scales or offsets are not constants"
        if attr(conv, "group", 1) != 1:
            return "grouped binary convolutions are not lowered yet"
        c = spatial_shape(quant.inputs[0])[0]
        if w.shape[1] != c:
            return f"weights expect {w.shape[1]} input channels, the input has {c}"
        levels, why = activation_levels(quant, c)
        if why or pad is None:
            return why
        explicit = _explicit_padding(pad, levels)
        if explicit is None:
            return ("an explicit Pad between the quantizer and the conv whose value is not a binary level "
                    "(only constant padding with the +1 or −1 level of the quantizer, or 0, is lowered)")
        if explicit[1] and any(attr(conv, "pads", (0, 0, 0, 0))):
            return "an explicit one/minus-one Pad and the conv's own zero padding together"
        return None

    def _lower(self, graph: ir.Graph, conv: ir.Node) -> None:
        quant, pad = _quantizer_of(conv)
        w = const(conv.inputs[1])
        o = int(w.shape[0])
        r = np.broadcast_to(np.asarray(const(conv.inputs[2]), np.float64).reshape(-1), (o,))
        b = np.broadcast_to(np.asarray(const(conv.inputs[3]), np.float64).reshape(-1), (o,))
        c, h, wd = spatial_shape(quant.inputs[0])
        (p, q), _ = activation_levels(quant, c)
        strides = list(attr(conv, "strides", (1, 1)))
        pads = list(attr(conv, "pads", (0, 0, 0, 0)))
        level = 0
        if pad is not None:  # Pad(level ±1) → conv without padding: a conv with ±1 padding on the bits
            extra, level = _explicit_padding(pad, (p, q))
            pads = [a + b for a, b in zip(pads, extra)]
        dil = list(attr(conv, "dilations", (1, 1)))
        kh, kw = int(w.shape[2]), int(w.shape[3])
        name = conv.name or conv.outputs[0].name
        xb = pack_sign_node(graph, quant, self._packs)
        e, rcls, ccls = arith.border_tables(w, (h, wd), strides, pads, dil, level)
        geometry = [ir.AttrInt64s("kernel_shape", [kh, kw]), ir.AttrInt64s("strides", strides),
                    ir.AttrInt64s("pads", pads), ir.AttrInt64s("dilations", dil), ir.AttrString("output", "float")]
        out_shape = conv.outputs[0].shape
        affine = bool(np.any(q != 0) or np.any(b != 0))
        new_nodes = []

        if not affine:  # plain: Y = fl32(D·p·R), the form FuseThreshold and FoldBatchNorm expect
            p0, p1, end = (p * r).astype(np.float32), np.zeros(o, np.float32), conv.outputs[0]
            sa_coef, m = None, None
        else:
            bn = _following_batchnorm(conv.outputs[0])
            g, hh = (bn[1], bn[2]) if bn else (np.ones(o), np.zeros(o))
            end = bn[0].outputs[0] if bn else conv.outputs[0]
            m = constant_term(w, r, b, q) * g[:, None, None, None]
            if level:  # every tap holds a level: the constant is the same in every window
                table = m.sum(axis=(1, 2, 3))[:, None, None]
            else:
                table, _, _ = constant_table(m, (h, wd), strides, pads, dil)
            p0 = (g * p * r).astype(np.float32)
            sa_coef = g * p * b if np.any(p * b != 0) else None
            if table.shape[1:] == (1, 1):  # no padding reaches a window: the constant is per channel
                p1, m = (hh + table[:, 0, 0]).astype(np.float32), None
            else:
                p1 = hh.astype(np.float32)
                if not np.any(m):
                    m = None

        y = _float_value(f"{end.name}_packed", out_shape.copy() if out_shape is not None else None)
        packed = ir.Node(DOMAIN, "BinaryConv2dPacked", [
            xb,
            add_initializer(graph, f"{name}.weight_bits", arith.pack_conv_weights(w)),
            add_initializer(graph, f"{name}.border_base", e),
            add_initializer(graph, f"{name}.row_class", rcls),
            add_initializer(graph, f"{name}.col_class", ccls),
            add_initializer(graph, f"{name}.p0", p0),
            add_initializer(graph, f"{name}.p1", p1),
        ], attributes=[ir.AttrInt64("in_channels", c), ir.AttrInt64("out_channels", o), *geometry,
                       ir.AttrString("source", conv.name or "")], outputs=[y], name=name)
        packed.metadata_props[PADDING_KEY] = PADDING_NAMES[level]
        if affine:
            packed.metadata_props[AFFINE_KEY] = "1"
        new_nodes.append(packed)

        if sa_coef is not None:  # + p·t_o·S_a, S_a from a one-channel all-(+1) packed conv
            sa = self._window_sum(graph, quant, xb, c, (h, wd), (kh, kw), strides, pads, dil, name, new_nodes,
                                  packed.inputs[3:5], level)
            scaled = _float_value(f"{name}.sa_term", None)
            new_nodes.append(ir.Node("", "Mul", [sa, add_initializer(
                graph, f"{name}.sa_coef", sa_coef.astype(np.float32).reshape(1, o, 1, 1))], outputs=[scaled],
                name=f"{name}/sa_mul"))
            summed = _float_value(f"{name}.with_sa", None)
            new_nodes.append(ir.Node("", "Add", [y, scaled], outputs=[summed], name=f"{name}/sa_add"))
            y = summed
        if m is not None:  # + the border-dependent constant: Conv(all-ones image, M), zero padded
            cmap = _float_value(f"{name}.const_term", None)
            new_nodes.append(ir.Node("", "Conv", [
                self._ones_image(graph, (h, wd)),
                add_initializer(graph, f"{name}.const_kernel", m.astype(np.float32)),
            ], attributes=geometry[:4], outputs=[cmap], name=f"{name}/const_conv"))
            summed = _float_value(f"{name}.with_const", None)
            new_nodes.append(ir.Node("", "Add", [y, cmap], outputs=[summed], name=f"{name}/const_add"))
            y = summed

        anchor = end.producer()
        graph.insert_after(anchor, new_nodes)
        if y.shape is None and end.shape is not None:
            y.shape = end.shape.copy()
        y.dtype = ir.DataType.FLOAT
        replace_value(end, y)
        if anchor is not conv:
            graph.remove(anchor, safe=True)
        graph.remove(conv, safe=True)

    def _window_sum(self, graph, quant, xb, c, hw, ks, strides, pads, dil, name, new_nodes, classes,
                    level) -> ir.Value:
        """S_a = Σ_V s_a as float [N, 1, OH, OW], one per (quantizer, geometry); ``classes`` are the layer
        conv's row and column border classes (the same geometry gives the same classes)."""
        key = (id(quant), tuple(ks), tuple(strides), tuple(pads), tuple(dil), level)
        if key in self._sa:
            return self._sa[key]
        ones = np.ones((1, c) + tuple(ks), np.float32)
        e, _, _ = arith.border_tables(ones, hw, strides, pads, dil, level)
        sa = _float_value(f"{name}.window_sum", None)
        new_nodes.append(ir.Node(DOMAIN, "BinaryConv2dPacked", [
            xb,
            add_initializer(graph, f"{name}.ones_bits", arith.pack_conv_weights(ones)),
            add_initializer(graph, f"{name}.ones_border_base", e),
            *classes,
            add_initializer(graph, f"{name}.ones_p0", np.ones(1, np.float32)),
            add_initializer(graph, f"{name}.ones_p1", np.zeros(1, np.float32)),
        ], attributes=[ir.AttrInt64("in_channels", c), ir.AttrInt64("out_channels", 1),
                       ir.AttrInt64s("kernel_shape", list(ks)), ir.AttrInt64s("strides", strides),
                       ir.AttrInt64s("pads", pads), ir.AttrInt64s("dilations", dil),
                       ir.AttrString("output", "float"), ir.AttrString("source", f"{name}{SA_SOURCE_SUFFIX}")],
            outputs=[sa], name=f"{name}/window_sum"))
        new_nodes[-1].metadata_props[PADDING_KEY] = PADDING_NAMES[level]
        self._sa[key] = sa
        return sa

    def _ones_image(self, graph, hw) -> ir.Value:
        if hw not in self._ones:
            self._ones[hw] = add_initializer(graph, f"ones_{hw[0]}x{hw[1]}", np.ones((1, 1) + tuple(hw), np.float32))
        return self._ones[hw]
