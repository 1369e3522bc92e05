"""Fuse ``BinaryConv2dPacked(float) → [BatchNorm] → [MaxPool]* → PackSign`` into a conv with packed output.

The next binary decision becomes the integer test ``dir·D ≥ thr`` (deploy.md §5), and each max pool
between BatchNorm and the quantizer becomes a bitwise OR on packed bits (§6): max-then-threshold equals
threshold-then-OR, whatever the sign of the BatchNorm scale, because the threshold is taken after it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnnc.ops import DOMAIN

from . import arith
from ._graph import add_initializer, attr, const, is_bnnc, is_op, only_consumer, replace_value


def _batchnorm_params(node: ir.Node):
    vals = [const(v) for v in node.inputs[1:5]]
    if any(v is None for v in vals) or attr(node, "training_mode", 0):
        return None
    return (*vals, attr(node, "epsilon", 1e-5))


def _plain_maxpool(node: ir.Node) -> bool:
    return (is_op(node, "MaxPool") and len(node.outputs) == 1 and attr(node, "ceil_mode", 0) == 0
            and attr(node, "auto_pad", "NOTSET") == "NOTSET" and attr(node, "storage_order", 0) == 0
            and all(d == 1 for d in attr(node, "dilations", (1, 1))))


class FuseThresholdPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for conv in list(graph):
            if not (is_bnnc(conv, "BinaryConv2dPacked") and attr(conv, "output") == "float"):
                continue
            p1 = const(conv.inputs[6])
            if p1 is None or np.any(p1 != 0):
                continue  # an epilogue already folded: the float32 semantics to match are lost
            chain, bn, pools = [], None, []
            node = only_consumer(conv.outputs[0])
            if is_op(node, "BatchNormalization") and len(node.outputs) == 1 and _batchnorm_params(node):
                bn = node
                chain.append(node)
                node = only_consumer(node.outputs[0])
            while _plain_maxpool(node):
                pools.append(node)
                chain.append(node)
                node = only_consumer(node.outputs[0])
            if not is_bnnc(node, "PackSign"):
                continue
            pack = node
            theta = const(pack.inputs[1]) if len(pack.inputs) > 1 and pack.inputs[1] is not None else 0.0
            if theta is None:
                continue
            cin = attr(conv, "in_channels")
            kh, kw = attr(conv, "kernel_shape")
            direction, thr = arith.integer_threshold(const(conv.inputs[5]), theta, cin * kh * kw,
                                                     _batchnorm_params(bn) if bn else None)
            name = conv.name
            cout = attr(conv, "out_channels")
            bits = ir.Value(name=f"{conv.outputs[0].name}_bits")
            bits.dtype = ir.DataType.UINT32
            fused = ir.Node(DOMAIN, "BinaryConv2dPacked", list(conv.inputs[:5]) + [
                add_initializer(graph, f"{name}.direction", direction),
                add_initializer(graph, f"{name}.threshold", thr),
            ], attributes={**conv.attributes, "output": ir.AttrString("output", "bits")}, outputs=[bits],
                name=name)
            graph.insert_after(pack, fused)
            out = bits
            for pool in pools:
                pooled = ir.Value(name=f"{pool.outputs[0].name}_bits")
                pooled.dtype = ir.DataType.UINT32
                graph.insert_after(pack, node := ir.Node(DOMAIN, "MaxPoolBits", [out], attributes=[
                    ir.AttrInt64("channels", cout),
                    ir.AttrInt64s("kernel_shape", list(attr(pool, "kernel_shape"))),
                    ir.AttrInt64s("strides", list(attr(pool, "strides", (1, 1)))),
                    ir.AttrInt64s("pads", list(attr(pool, "pads", (0, 0, 0, 0)))),
                    ir.AttrString("mode", "or"),
                ], outputs=[pooled], name=f"{pool.name}_bits"))
                out = pooled
            # keep topological order: the new nodes were inserted after `pack` in reverse; sort later
            replace_value(pack.outputs[0], out)
            graph.remove([pack] + chain[::-1] + [conv], safe=True)
            modified = True
        if modified:
            graph.sort()
        return ir.passes.PassResult(model, modified)
