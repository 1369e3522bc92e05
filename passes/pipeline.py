"""The deploy pipeline: export form in, deploy form out (``bnnc fold`` and ``bnnc.compile`` run it)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, TopologicalSortPass

from bnnc.errors import ModelFormatError, UnsupportedOpError
from bnnc.ops import DOMAIN

from .fold_batchnorm import FoldBatchNormPass
from .fuse_threshold import FuseThresholdPass
from .lower_binary_conv import LowerBinaryConvPass

EXPORT_OPS = {"SignBinarize", "BinaryConv2d"}
DEPLOY_OPS = {"PackSign", "UnpackSign", "BinaryConv2dPacked", "MaxPoolBits"}


def deploy_passes() -> ir.passes.PassManager:
    return ir.passes.PassManager([
        LowerBinaryConvPass(),
        FuseThresholdPass(),
        FoldBatchNormPass(),
        RemoveUnusedNodesPass(),
        RemoveUnusedFunctionsPass(),
        TopologicalSortPass(),
    ])


def form_of(model: onnx.ModelProto | ir.Model) -> str:
    """'export', 'deploy' or 'float' (no ai.bnnc op), from the ops the graph uses."""
    nodes = model.graph.node if isinstance(model, onnx.ModelProto) else list(model.graph)
    ops = {n.op_type for n in nodes if n.domain == DOMAIN}
    if ops & DEPLOY_OPS:
        return "deploy"
    return "export" if ops else "float"


def check_bnnc_ops(model: onnx.ModelProto) -> None:
    """Refuse ``ai.bnnc`` ops this version does not define, naming the node."""
    for n in model.graph.node:
        if n.domain == DOMAIN and n.op_type not in EXPORT_OPS | DEPLOY_OPS:
            raise UnsupportedOpError(
                f"node {n.name or '?'!r} uses unknown op {DOMAIN}::{n.op_type}; this bnnc knows "
                f"{', '.join(sorted(EXPORT_OPS | DEPLOY_OPS))}")


def to_deploy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run the deploy passes on an export-form model and return the deploy form."""
    check_bnnc_ops(model)
    if form_of(model) == "deploy":
        return model
    try:
        ir_model = ir.serde.deserialize_model(model)
    except Exception as e:
        raise ModelFormatError(f"cannot read the ONNX graph: {e}") from None
    result = deploy_passes()(ir_model)
    out = result.model
    out.metadata_props["bnnc.form"] = "deploy"
    proto = ir.serde.serialize_model(out)
    proto.ir_version = model.ir_version
    return proto
