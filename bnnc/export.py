"""Export a bnnc PyTorch model to the export form: ONNX with ``ai.bnnc`` ops and their function bodies."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from . import __version__
from .ops import DOMAIN
from .ops import export as export_ops
from .nn import frozen_for_export
from .util import atomic_path

# ONNX Runtime 1.31 reads IR version ≤ 13; onnx 1.23 writes 14 by default.
IR_VERSION = 10
OPSET = 18


def to_onnx(model: torch.nn.Module, input_shape, *, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Trace ``model`` (eval mode) into an export-form ``onnx.ModelProto``. A quantizer the op set cannot
    express raises ``NotExportableError`` naming its layer (``frozen_for_export``)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(tuple(input_shape), dtype=torch.float32)
    dyn = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), frozen_for_export(model):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                model, (x,), dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
                custom_translation_table=export_ops.TRANSLATION_TABLE, dynamic_shapes=dyn,
                input_names=["input"], output_names=["logits"],
            )
    finally:
        model.train(was_training)
    ir_model = program.model
    _name_binary_layers(ir_model)
    export_ops.attach_functions(ir_model)
    ir_model.producer_name = "bnnc"
    ir_model.producer_version = __version__
    ir_model.metadata_props["bnnc.form"] = "export"
    if getattr(model, "bnnc_name", None):
        ir_model.metadata_props["bnnc.model"] = model.bnnc_name
    proto = ir.serde.serialize_model(ir_model)
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


def _name_binary_layers(model: ir.Model) -> None:
    """Name each binary conv node and its constants after the PyTorch module they came from
    (``features.0.binary_weight``, ``features.0.weight_scale``), so any mismatch traces back to a layer.
    A layer whose activation has several terms (BiMLP's ternary levels) exports one conv per term sharing
    the weights: they are named ``<layer>.term1``, ``<layer>.term2``, … in graph order."""
    used = set(model.graph.initializers)
    layers: dict[int, list[ir.Node]] = {}
    for node in model.graph:
        if node.domain == DOMAIN and node.op_type == "BinaryConv2d":
            layers.setdefault(id(node.inputs[1]), []).append(node)

    def rename(value: ir.Value, new: str) -> None:
        if value.is_initializer() and new not in used:
            model.graph.initializers.pop(value.name)
            value.name = new
            model.graph.initializers[new] = value
            used.add(new)

    for nodes in layers.values():
        w = nodes[0].inputs[1].name or ""
        if "lifted_tensor" not in w:
            continue
        prefix = w.rsplit("lifted_tensor", 1)[0]
        layer = prefix.rstrip(".")
        if len(nodes) == 1:
            nodes[0].name = layer or nodes[0].name
            rename(nodes[0].inputs[2], prefix + "weight_scale")
        else:
            for k, node in enumerate(nodes, 1):
                node.name = f"{layer}.term{k}" if layer else node.name
        rename(nodes[0].inputs[1], prefix + "binary_weight")


def save_onnx(proto: onnx.ModelProto, path) -> Path:
    """Write an ONNX model atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def export(model: torch.nn.Module, path, input_shape=None) -> Path:
    """Export ``model`` to ``path`` in the export form (``ai.bnnc`` ops with ONNX function bodies)."""
    if input_shape is None:
        recipe = getattr(model, "bnnc_recipe", None)
        if recipe is None:
            raise ValueError("export: input_shape is required for models without a recipe")
        input_shape = recipe.input_shape
    return save_onnx(to_onnx(model, input_shape), path)

