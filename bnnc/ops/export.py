"""Export-form ops of the ``ai.bnnc`` domain (float semantics).

Each op is defined once, here, in three coupled forms:

* a ``torch.library`` custom op (``torch.ops.bnnc.*``): the forward used in training and traced by export;
* an ONNX schema plus an onnxscript function body in standard ONNX ops, attached to every exported model
  as a model-local function, so stock ONNX Runtime runs the export form as the reference;
* the translation that maps the torch op onto the ONNX node during ``torch.onnx.export``.

Semantics (``docs/ops.md``):

``SignBinarize(X, T, P, Q) -> Y``: Y = P[c]·s + Q[c], s = +1 where X ≥ T[c] else −1 (per channel, axis 1).
``BinaryConv2d(X, W, R, B) -> Y``: Y = Conv(X, sign(W))·R[o] + Conv(X, 1)·B[o], sign(w) = +1 if w ≥ 0
    else −1, zero padding: the weights w_b[o] = R[o]·sign(W[o]) + B[o] (deploy.md §3). The conv runs on
    ±1 weights (exact integers in float32 for ±1 inputs), then one multiply by the weight scale, which is
    how XNOR-popcount hardware computes it. The second conv vanishes from the deploy form when B = 0.
"""

from __future__ import annotations

from typing import Sequence

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import FLOAT
from onnxscript import opset18 as op

from . import DOMAIN, OPSET_VERSION

bnnc_opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)

# ---------------------------------------------------------------------------------------------- torch


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def sign_at_least_zero_(d: torch.Tensor) -> torch.Tensor:
    """In place: +1 where d ≥ 0 (±0 included), −1 where d < 0 or NaN, i.e. ``torch.where(d >= 0, 1, −1)``,
    without boolean tensors, which are several times slower than float arithmetic on CPU (issue #7):
    sign(sign(d) + ½), NaN first mapped to −1. With d = x − T, d is ±0 only when x = T (IEEE subtraction is
    exact near zero, with subnormals), so x ≥ T ⇔ d ≥ 0 for finite T."""
    return d.nan_to_num_(nan=-1.0).sign_().add_(0.5).sign_()


@torch.library.custom_op("bnnc::sign_binarize", mutates_args=())
def sign_binarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """+1 where x ≥ threshold (per channel, axis 1) else −1."""
    return sign_at_least_zero_(x - _channel_view(threshold, x)).to(x.dtype)


@sign_binarize.register_fake
def _(x, threshold):
    return torch.empty_like(x)


def weight_sign(w: torch.Tensor) -> torch.Tensor:
    """sign(w) with sign(0) = +1, the convention of bnnc's quantizers (deploy.md §2)."""
    return sign_at_least_zero_(w.clone())


@torch.library.custom_op("bnnc::affine_sign", mutates_args=())
def affine_sign(x: torch.Tensor, threshold: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p[c]·s + q[c] with s = +1 where x ≥ threshold[c] else −1."""
    s = sign_at_least_zero_(x - _channel_view(threshold, x)).to(x.dtype)
    return s * _channel_view(p, x) + _channel_view(q, x)


@affine_sign.register_fake
def _(x, threshold, p, q):
    return torch.empty_like(x)


@torch.library.custom_op("bnnc::binary_conv2d", mutates_args=())
def binary_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """conv2d(x, sign(weight))·scale[o] + conv2d(x, 1)·offset[o], zero padding."""
    ws = weight_sign(weight)
    y = torch.nn.functional.conv2d(x, ws, None, stride, padding, dilation, groups) * scale.reshape(1, -1, 1, 1)
    if torch.any(offset != 0):  # the window sum is the same for every output channel
        ones = torch.ones_like(ws) if groups > 1 else torch.ones_like(ws[:1])
        y = y + torch.nn.functional.conv2d(x, ones, None, stride, padding, dilation, groups) * offset.reshape(1, -1, 1, 1)
    return y


@binary_conv2d.register_fake
def _(x, weight, scale, offset, stride, padding, dilation, groups):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, weight.shape[0], oh, ow))


# ----------------------------------------------------------------------------------------------- ONNX


def _schema(name, inputs, attributes=()):
    return OpSchema(
        name,
        DOMAIN,
        OPSET_VERSION,
        inputs=[OpSchema.FormalParameter(i, "T") for i in inputs],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32 tensors")],
        attributes=list(attributes),
    )


EXPORT_SCHEMAS = {
    "SignBinarize": _schema("SignBinarize", ["X", "T", "P", "Q"]),
    "BinaryConv2d": _schema(
        "BinaryConv2d",
        ["X", "W", "R", "B"],
        [
            OpSchema.Attribute("strides", OpSchema.AttrType.INTS, "stride per spatial axis"),
            OpSchema.Attribute("pads", OpSchema.AttrType.INTS, "zero padding [top, left, bottom, right]"),
            OpSchema.Attribute("dilations", OpSchema.AttrType.INTS, "dilation per spatial axis"),
            OpSchema.Attribute("group", OpSchema.AttrType.INT, "number of groups"),
        ],
    ),
}


@onnxscript.script(bnnc_opset, default_opset=op)
def SignBinarize(X: FLOAT, T: FLOAT, P: FLOAT, Q: FLOAT) -> FLOAT:
    rank = op.Size(op.Shape(X))
    extra = op.Reshape(op.Sub(rank, op.Constant(value_int=2)), op.Constant(value_ints=[1]))
    ones = op.Expand(op.Constant(value_ints=[1]), extra)
    view = op.Concat(op.Constant(value_ints=[1, -1]), ones, axis=0)
    one = op.CastLike(op.Constant(value_float=1.0), X)
    s = op.Where(op.GreaterOrEqual(X, op.Reshape(T, view)), one, op.Neg(one))
    return op.Add(op.Mul(s, op.Reshape(P, view)), op.Reshape(Q, view))


@onnxscript.script(bnnc_opset, default_opset=op)
def BinaryConv2d(X: FLOAT, W: FLOAT, R: FLOAT, B: FLOAT, strides: Sequence[int], pads: Sequence[int],
                 dilations: Sequence[int], group: int) -> FLOAT:
    zero = op.CastLike(op.Constant(value_float=0.0), W)
    one = op.CastLike(op.Constant(value_float=1.0), W)
    ws = op.Where(op.GreaterOrEqual(W, zero), one, op.Neg(one))
    view = op.Constant(value_ints=[1, -1, 1, 1])
    y = op.Mul(op.Conv(X, ws, strides=strides, pads=pads, dilations=dilations, group=group), op.Reshape(R, view))
    window = op.Conv(X, op.Expand(one, op.Shape(W)), strides=strides, pads=pads, dilations=dilations, group=group)
    return op.Add(y, op.Mul(window, op.Reshape(B, view)))


FUNCTIONS = {"SignBinarize": SignBinarize, "BinaryConv2d": BinaryConv2d}

for _s in EXPORT_SCHEMAS.values():
    try:
        onnx.defs.register_schema(_s)
    except Exception:  # already registered (module reloaded)
        pass

_node = {name: onnxscript.values.Op(bnnc_opset, name, s) for name, s in EXPORT_SCHEMAS.items()}


def _translate_sign_binarize(x, threshold):
    return _node["SignBinarize"](x, threshold, op.Constant(value_floats=[1.0]), op.Constant(value_floats=[0.0]))


def _translate_affine_sign(x, threshold, p, q):
    return _node["SignBinarize"](x, threshold, p, q)


def _translate_binary_conv2d(x, weight, scale, offset, stride, padding, dilation, groups):
    pads = [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]
    return _node["BinaryConv2d"](
        x, weight, scale, offset, strides=[int(s) for s in stride], pads=pads,
        dilations=[int(d) for d in dilation], group=int(groups),
    )


TRANSLATION_TABLE = {
    torch.ops.bnnc.sign_binarize.default: _translate_sign_binarize,
    torch.ops.bnnc.affine_sign.default: _translate_affine_sign,
    torch.ops.bnnc.binary_conv2d.default: _translate_binary_conv2d,
}


def attach_functions(model: ir.Model) -> None:
    """Add the ONNX function body of every ``ai.bnnc`` export op used in ``model``."""
    used = {n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN} if hasattr(model.graph, "all_nodes") \
        else {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN}
    for name in sorted(used):
        if name not in FUNCTIONS:
            continue
        f = ir.serde.deserialize_function(FUNCTIONS[name].to_function_proto())
        model.functions[f.identifier()] = f
    model.opset_imports[DOMAIN] = OPSET_VERSION
