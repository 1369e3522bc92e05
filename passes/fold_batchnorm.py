"""Fold a BatchNorm that follows ``BinaryConv2dPacked(float)`` into the conv's float epilogue:
Y = P0·D + P1 becomes Y = (g·P0)·D + (g·P1 + h), with BN as z = g·y + h (deploy.md §5).

Written as an ``onnxscript.rewriter`` pattern → replacement rule: the rewriter does the matching (the conv
output used by the BatchNorm only, nothing else), the replacement and the bookkeeping."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewritePass, RewriteRuleClassBase, RewriteRuleSet

from bnnc.ops import DOMAIN

from . import arith
from ._graph import attr, const

#: suffix of the ``source`` of the auxiliary window-sum conv (kept in sync with lower_binary_conv)
_SA_SUFFIX = " (S_a)"


class FoldBatchNormIntoPackedConv(RewriteRuleClassBase):
    """``BatchNormalization(BinaryConv2dPacked(output="float"))`` → ``BinaryConv2dPacked`` with g·P0, g·P1 + h."""

    def pattern(self, op, x, w, e, rc, cc, p0, p1, scale, bias, mean, var):
        y = op.BinaryConv2dPacked(x, w, e, rc, cc, p0, p1, _domain=DOMAIN, _allow_other_attributes=True,
                                  _outputs=["conv_out"])
        return op.BatchNormalization(y, scale, bias, mean, var, _allow_other_attributes=True, _outputs=["bn_out"])

    def check(self, context, conv_out, bn_out, p0, p1, scale, bias, mean, var, **_) -> MatchResult:
        result = MatchResult()
        conv, bn = conv_out.producer(), bn_out.producer()
        if attr(conv, "output") != "float":
            return result.fail("the conv already outputs bits")
        if attr(conv, "source", "").endswith(_SA_SUFFIX):
            return result.fail("a window sum, not a layer output")
        if attr(bn, "training_mode", 0) or len(bn.outputs) != 1:
            return result.fail("BatchNormalization in training mode")
        if any(const(v) is None for v in (p0, p1, scale, bias, mean, var)):
            return result.fail("epilogue or BatchNorm parameters are not constants")
        return result

    def rewrite(self, op, x, w, e, rc, cc, p0, p1, scale, bias, mean, var, conv_out, bn_out):
        conv, bn = conv_out.producer(), bn_out.producer()
        g, h = arith.batchnorm_affine(const(scale), const(bias), const(mean), const(var), attr(bn, "epsilon", 1e-5))
        name = conv.name or conv_out.name
        new_p0 = op.initializer(ir.tensor((g * const(p0)).astype(np.float32)), name=f"{name}.p0_bn")
        new_p1 = op.initializer(ir.tensor((g * const(p1) + h).astype(np.float32)), name=f"{name}.p1_bn")
        out = op.BinaryConv2dPacked(x, w, e, rc, cc, new_p0, new_p1, _domain=DOMAIN, **dict(conv.attributes))
        node = out.producer()
        node.name = name
        node.metadata_props.update(conv.metadata_props)
        return out


class FoldBatchNormPass(RewritePass):
    def __init__(self):
        super().__init__(RewriteRuleSet([FoldBatchNormIntoPackedConv.rule()]))
