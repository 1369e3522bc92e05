"""Operation counts of a PyTorch model (``shared/spec/methods.md`` §12): BOPs, FLOPs and OPs = BOPs/64 + FLOPs.

Counted with forward hooks during one eval-mode forward pass on zeros of ``input_shape``:

* every conv / dense layer contributes its multiply-accumulates,
  MACs(conv) = N·Cout·Hout·Wout·(Cin/groups)·kh·kw, MACs(dense) = N·out_features·in_features
  (the convention of Bi-Real, ReActNet, Real-to-Binary, AdaBin and BiMLP; lucifer443's ``get_bops.py``);
* a layer is **binary** (its MACs are BOPs) when it is a :class:`bnnc.nn.BinaryConv2d` or
  :class:`bnnc.nn.BinaryLinear` with an input quantizer: binary weights AND binarized inputs, so it runs as
  XNOR-popcount. (BiMLP's released ``bimlp`` activations are ternary; they are counted as binary, as in the
  paper.) Every other conv / dense layer is **real** (its MACs are FLOPs), including 1-bit-weight layers on
  real activations (``input_quantizer=None``, "1w32a"): they cannot use XNOR-popcount;
* BatchNorm, PReLU and other element-wise ops, additions and pooling are not counted (standard practice).

``OPs = BOPs/64 + FLOPs``: 64 XNOR-popcounts per cycle on a 64-bit CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .nn import BinaryConv2d, BinaryLinear

__all__ = ["BOPS_PER_OP", "count_ops", "format_ops"]

BOPS_PER_OP = 64


def _layer_names(model: nn.Module) -> dict[int, str]:
    """Module id → the name to report (a BinaryLinear's inner 1×1 conv is reported as the BinaryLinear)."""
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        if id(m) in names:
            continue
        names[id(m)] = name or type(m).__name__
        if isinstance(m, BinaryLinear):
            names[id(m.conv)] = names[id(m)]
    return names


def _config(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        g = f" g{m.groups}" if m.groups > 1 else ""
        return f"{m.in_channels}→{m.out_channels} {kh}×{kw} s{m.stride[0]}{g}"
    return f"{m.in_features}→{m.out_features} dense"  # nn.Linear, BinaryLinear


def count_ops(model: nn.Module, input_shape) -> dict:
    """Count BOPs, FLOPs and OPs = BOPs/64 + FLOPs of ``model`` for one input of ``input_shape``
    (e.g. ``(1, 3, 224, 224)``; the batch size scales every count).

    Returns ``{"input_shape", "layers": [{"name", "kind" ("binary" | "real"), "type" ("conv" | "dense"),
    "config", "output_shape", "macs", "bops", "flops", "calls"}, ...] (in execution order), "bops", "flops",
    "ops", "binary_layers", "real_layers"}``. Raises ValueError for a bad input shape or a model that does
    not run on it, TypeError for a layer kind it cannot count (Conv1d/3d, transposed convs, Bilinear)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise ValueError(f"input shape must be positive integers (N, C, ...), got {tuple(input_shape)}")
    names = _layer_names(model)
    rows: dict[int, dict] = {}

    def record(module: nn.Module, count_as: nn.Module, out: torch.Tensor, macs: int, binary: bool, kind: str):
        key = id(count_as)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"name": names.get(key, type(count_as).__name__),
                               "kind": "binary" if binary else "real", "type": kind, "config": _config(count_as),
                               "output_shape": list(out.shape), "macs": 0, "bops": 0, "flops": 0, "calls": 0}
        row["macs"] += macs
        row["bops" if binary else "flops"] += macs
        row["calls"] += 1

    def conv_hook(module: nn.Conv2d, inputs, out):
        macs = out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        binary = isinstance(module, BinaryConv2d) and module.input_quantizer is not None
        owner = parents.get(id(module), module)
        record(module, owner, out if owner is module else out.flatten(1), macs, binary,
               "dense" if owner is not module else "conv")

    def linear_hook(module: nn.Linear, inputs, out):
        record(module, module, out, out.numel() * module.in_features, False, "dense")

    parents = {id(m.conv): m for m in model.modules() if isinstance(m, BinaryLinear)}
    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear) and not isinstance(m, BinaryLinear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.Bilinear)):
            for h in handles:
                h.remove()
            raise TypeError(f"count_ops: layer {names[id(m)]!r} ({type(m).__name__}) is not supported "
                             "(conv2d and dense layers only)")
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(shape, dtype=torch.float32, device=param.device if param is not None else "cpu")
        with torch.no_grad():
            try:
                model(x)
            except RuntimeError as e:
                raise ValueError(f"count_ops: the model does not run on input shape {shape}: "
                                 f"{str(e).splitlines()[0]}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = list(rows.values())
    bops = sum(r["bops"] for r in layers)
    flops = sum(r["flops"] for r in layers)
    return {"input_shape": list(shape), "layers": layers, "bops": bops, "flops": flops,
            "ops": bops / BOPS_PER_OP + flops,
            "binary_layers": sum(r["kind"] == "binary" for r in layers),
            "real_layers": sum(r["kind"] == "real" for r in layers)}


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n else "-"


def format_ops(report: dict, model_name: str | None = None) -> str:
    """The ``bnnc ops`` table: one row per conv/dense layer, then the totals."""
    head = f"{'layer':34s} {'kind':6s} {'config':22s} {'output':18s} {'BOPs':>10s} {'FLOPs':>10s}"
    lines = []
    if model_name:
        lines.append(f"{model_name}, input {tuple(report['input_shape'])}")
    lines += [head, "-" * len(head)]
    for r in report["layers"]:
        out = "×".join(str(d) for d in r["output_shape"][1:])
        lines.append(f"{r['name'][:34]:34s} {r['kind']:6s} {r['config'][:22]:22s} {out[:18]:18s} "
                     f"{_m(r['bops']):>10s} {_m(r['flops']):>10s}")
    lines.append(f"total: BOPs {report['bops']:.3e}, FLOPs {report['flops']:.3e}, "
                 f"OPs = BOPs/{BOPS_PER_OP} + FLOPs = {report['ops']:.3e} "
                 f"({report['binary_layers']} binary, {report['real_layers']} real layers; "
                 f"batch {report['input_shape'][0]})")
    return "\n".join(lines)
