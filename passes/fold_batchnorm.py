"""Fold a BatchNorm that follows ``BinaryConv2dPacked(float)`` into the conv's float epilogue:
Y = P0·D + P1 becomes Y = (g·P0)·D + (g·P1 + h), with BN as z = g·y + h (deploy.md §5)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import arith
from ._graph import add_initializer, attr, const, is_bnnc, is_op, only_consumer, replace_value


class FoldBatchNormPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for conv in list(graph):
            if not (is_bnnc(conv, "BinaryConv2dPacked") and attr(conv, "output") == "float"):
                continue
            bn = only_consumer(conv.outputs[0])
            if not (is_op(bn, "BatchNormalization") and len(bn.outputs) == 1 and not attr(bn, "training_mode", 0)):
                continue
            params = [const(v) for v in bn.inputs[1:5]]
            p0, p1 = const(conv.inputs[5]), const(conv.inputs[6])
            if any(v is None for v in params) or p0 is None or p1 is None:
                continue
            g, h = arith.batchnorm_affine(*params, attr(bn, "epsilon", 1e-5))
            name = conv.name
            conv.replace_input_with(5, add_initializer(graph, f"{name}.p0_bn", (g * p0).astype(np.float32)))
            conv.replace_input_with(6, add_initializer(graph, f"{name}.p1_bn", (g * p1 + h).astype(np.float32)))
            replace_value(bn.outputs[0], conv.outputs[0])
            graph.remove(bn, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
