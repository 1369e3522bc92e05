"""Lower ``SignBinarize → BinaryConv2d`` (export form) to ``PackSign → BinaryConv2dPacked`` (float epilogue).

The packed conv starts with the epilogue Y = fl32(D · R) + 0, which is exactly what the export form
computes (a conv on ±1 values, exact in float32, times the weight scale); later passes fold BatchNorm
and thresholds into it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnnc.ops import DOMAIN
from bnnc.ops.deploy import num_words

from . import arith
from ._graph import (add_initializer, attr, batch_dim, const, consumers, is_bnnc, replace_value, spatial_shape,
                     warn_fallback)


def _packed_value(name: str, like: ir.Value, hw, channels: int) -> ir.Value:
    v = ir.Value(name=name)
    v.dtype = ir.DataType.UINT32
    v.shape = ir.Shape([batch_dim(like), hw[0], hw[1], num_words(channels)])
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


class LowerBinaryConvPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cache: dict = {}
        modified = False
        for conv in list(graph):
            if not is_bnnc(conv, "BinaryConv2d"):
                continue
            quant = conv.inputs[0].producer()
            w, r, b = const(conv.inputs[1]), const(conv.inputs[2]), const(conv.inputs[3])
            why = None
            if not is_bnnc(quant, "SignBinarize"):
                why = "its input is not binarized by a SignBinarize (real-valued activations)"
            elif any(const(v) is None for v in quant.inputs[1:4]):
                why = "the input quantizer's threshold or affine parameters are not constants"
            elif np.any(const(quant.inputs[2]) != 1) or np.any(const(quant.inputs[3]) != 0):
                why = "affine activation levels p·s + q with p ≠ 1 or q ≠ 0 (AdaBin) are not lowered yet"
            elif b is None or np.any(b != 0):
                why = "weight offsets w_b = r·s + b with b ≠ 0 (AdaBin) are not lowered yet"
            elif not all(is_bnnc(n, "BinaryConv2d") and n.inputs[0] is quant.outputs[0]
                         for n in consumers(quant.outputs[0])):
                why = "its binarized input also feeds a non-binary consumer"
            elif spatial_shape(quant.inputs[0]) is None:
                why = "the input's channel and spatial sizes are not static"
            elif w is None or r is None:
                why = "weights or scales are not constants"
            elif attr(conv, "group", 1) != 1:
                why = "grouped binary convolutions are not lowered yet"
            if why:
                warn_fallback(conv, why)
                continue
            c, h, wd = spatial_shape(quant.inputs[0])
            strides = list(attr(conv, "strides", (1, 1)))
            pads = list(attr(conv, "pads", (0, 0, 0, 0)))
            dil = list(attr(conv, "dilations", (1, 1)))
            e, rcls, ccls = arith.border_tables(w, (h, wd), strides, pads, dil)
            name = conv.name or conv.outputs[0].name
            inputs = [
                pack_sign_node(graph, quant, cache),
                add_initializer(graph, f"{name}.weight_bits", arith.pack_conv_weights(w)),
                add_initializer(graph, f"{name}.border_base", e),
                add_initializer(graph, f"{name}.row_class", rcls),
                add_initializer(graph, f"{name}.col_class", ccls),
                add_initializer(graph, f"{name}.p0", np.asarray(r, np.float32).reshape(-1)),
                add_initializer(graph, f"{name}.p1", np.zeros(w.shape[0], np.float32)),
            ]
            y = ir.Value(name=f"{conv.outputs[0].name}_packed", shape=conv.outputs[0].shape,
                         type=conv.outputs[0].type)
            packed = ir.Node(DOMAIN, "BinaryConv2dPacked", inputs, attributes=[
                ir.AttrInt64("in_channels", c), ir.AttrInt64("out_channels", int(w.shape[0])),
                ir.AttrInt64s("kernel_shape", list(w.shape[2:])), ir.AttrInt64s("strides", strides),
                ir.AttrInt64s("pads", pads), ir.AttrInt64s("dilations", dil), ir.AttrString("output", "float"),
                ir.AttrString("source", conv.name or ""),
            ], outputs=[y], name=name)
            graph.insert_after(conv, packed)
            replace_value(conv.outputs[0], y)
            graph.remove(conv, safe=True)
            modified = True
        for node in list(graph):
            if is_bnnc(node, "SignBinarize") and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified)
