"""``bnnc inspect``: per layer, binary or real, how the passes fold it, its output mode, BOPs and FLOPs.

Counting follows ``../shared/spec/methods.md`` §12: MACs(conv) = N·Cout·Hout·Wout·(Cin/groups)·kh·kw at
batch 1; BOPs are the MACs of binary layers, FLOPs those of real conv/dense layers, and
OPs = BOPs/64 + FLOPs.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .ops import DOMAIN


def _value_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Shapes of every intermediate value at batch 1, by running the export form on zeros."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in known:
                m.graph.output.append(helper.make_empty_tensor_value_info(o))
    inp = m.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {inp.name: np.zeros(dims, np.float32)})
    return {o.name: tuple(v.shape) for o, v in zip(sess.get_outputs(), outs)}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _deploy_view(model: onnx.ModelProto) -> dict[str, dict]:
    """For each export-form BinaryConv2d name: how the deploy form computes it."""
    from .passes.lower_binary_conv import SA_SOURCE_SUFFIX
    from .passes.pipeline import to_deploy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deploy = to_deploy(model)
    fallbacks = {str(w.message).split("'")[1]: str(w.message) for w in caught if "stays in float" in str(w.message)}
    inits = {i.name: i for i in deploy.graph.initializer}
    consumers: dict[str, list] = {}
    for n in deploy.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    view, sa_layers = {}, set()
    for n in deploy.graph.node:
        if n.domain != DOMAIN or n.op_type != "BinaryConv2dPacked":
            continue
        out = _attr(n, "output").decode()
        source = _attr(n, "source").decode() or n.name
        if source.endswith(SA_SOURCE_SUFFIX):  # AdaBin's auxiliary S_a popcount: reported with its layer
            sa_layers.add(source[: -len(SA_SOURCE_SUFFIX)])
            continue
        if out == "bits":
            direction = onnx.numpy_helper.to_array(inits[n.input[5]]) if n.input[5] in inits else None
            const = int((direction == 0).sum()) if direction is not None else 0
            flipped = int((direction < 0).sum()) if direction is not None else 0
            pools = []
            v = n.output[0]
            while len(consumers.get(v, [])) == 1 and consumers[v][0].op_type == "MaxPoolBits":
                pools.append(_attr(consumers[v][0], "mode").decode().upper())
                v = consumers[v][0].output[0]
            form = "XNOR-popcount → integer threshold"
            if flipped or const:
                form += f" ({flipped} flipped, {const} constant ch)"
            if pools:
                form += " → max pool as " + "/".join(pools)
        else:
            form = "XNOR-popcount → float epilogue (scale, BatchNorm folded)"
        view[source] = {"form": form, "output": out}
    for name in sa_layers:  # the S_a conv is named after the first layer of its (quantizer, geometry) group
        if name in view:
            view[name]["form"] += " + S_a window popcount"
    for name, msg in fallbacks.items():
        view.setdefault(name, {"form": "stays float: " + msg.split(": ", 1)[-1], "output": "float"})
    return view


def inspect_model(model: onnx.ModelProto) -> dict:
    """Rows ``{name, op, kind, config, form, output, bops, flops}`` and totals for an export-form model (a layer
    with K activation terms is one row with ``terms`` and ``deploy_bops`` = K·``bops``)."""
    from .passes.pipeline import form_of

    if form_of(model) == "deploy":
        raise ValueError("inspect reads the export form (from `bnnc export`); it folds it to show the deploy form")
    shapes = _value_shapes(model)
    deploy = _deploy_view(model) if form_of(model) == "export" else {}
    inits = {i.name: i for i in model.graph.initializer}
    rows = []
    for n in model.graph.node:
        binary = n.domain == DOMAIN and n.op_type == "BinaryConv2d"
        if not (binary or (n.domain == "" and n.op_type in ("Conv", "Gemm", "MatMul"))):
            continue
        out_shape = shapes.get(n.output[0], ())
        if n.op_type in ("Conv", "BinaryConv2d"):
            w = inits.get(n.input[1])
            o, cin_g, kh, kw = (tuple(w.dims) if w is not None else (out_shape[1], 0, 0, 0))
            macs = int(np.prod(out_shape)) * cin_g * kh * kw
            config = f"{cin_g * _attr(n, 'group', 1)}→{o} {kh}×{kw} s{_attr(n, 'strides', [1])[0]}"
        else:
            w = inits.get(n.input[1])
            k = shapes.get(n.input[0], (0, 0))[-1]
            macs = int(np.prod(out_shape)) * k
            config = f"{k}→{out_shape[-1] if out_shape else '?'} dense"
        name = n.name
        d = deploy.get(name, {})
        rows.append({
            "name": name, "op": n.op_type, "kind": "binary" if binary else "real", "config": config,
            "form": d.get("form", "float (standard ONNX op)"), "output": d.get("output", "float"),
            "bops": macs if binary else 0, "flops": 0 if binary else macs,
        })
    rows = _merge_terms(rows)
    bops = sum(r["bops"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    return {"rows": rows, "bops": bops, "flops": flops, "ops": bops / 64 + flops,
            "deploy_bops": sum(r.get("deploy_bops", r["bops"]) for r in rows)}


_TERM = re.compile(r"^(?P<layer>.+)\.term(?P<k>\d+)$")


def _merge_terms(rows: list[dict]) -> list[dict]:
    """One row per layer: a multi-level activation (BiMLP's ternary a = ½·s₁ + ½·s₂) exports one binary conv
    per term (``<layer>.term1``, ``<layer>.term2``, … sharing the weights, see ``bnnc.export``). The layer's
    BOPs are its MACs once, the convention of the papers and of ``bnnc ops`` (methods.md §12); what the
    deploy form runs, K XNOR-popcount convs, is ``deploy_bops`` and named in the form."""
    out: list[dict] = []
    index: dict[str, int] = {}
    for r in rows:
        m = _TERM.match(r["name"])
        if not m or r["kind"] != "binary":
            out.append(r)
            continue
        layer = m.group("layer")
        if layer not in index:
            index[layer] = len(out)
            out.append(dict(r, name=layer, terms=1, deploy_bops=r["bops"], term_form=r["form"]))
            continue
        merged = out[index[layer]]
        merged["terms"] += 1
        merged["deploy_bops"] += r["bops"]
    for i in index.values():
        r = out[i]
        r["form"] = f"{r['terms']} binary terms (multi-level activation), each {r.pop('term_form')}"
    return out


def _fmt(v: float) -> str:
    return "-" if not v else f"{v / 1e6:.2f}M"


def format_inspect(report: dict) -> str:
    lines = [f"{'layer':24s} {'kind':6s} {'config':16s} {'out':5s} {'BOPs':>9s} {'FLOPs':>9s}  deploy form"]
    lines.append("-" * 110)
    for r in report["rows"]:
        lines.append(f"{r['name'][:24]:24s} {r['kind']:6s} {r['config'][:16]:16s} {r['output']:5s} "
                     f"{_fmt(r['bops']):>9s} {_fmt(r['flops']):>9s}  {r['form']}")
    lines.append(f"total: BOPs {report['bops'] / 1e6:.2f}M, FLOPs {report['flops'] / 1e6:.2f}M, "
                 f"OPs = BOPs/64 + FLOPs = {report['ops'] / 1e6:.3f}M (batch 1)")
    if report.get("deploy_bops", report["bops"]) != report["bops"]:
        lines.append(f"multi-level activations: the deploy form runs {report['deploy_bops'] / 1e6:.2f}M "
                     "binary MACs (one XNOR-popcount conv per term)")
    return "\n".join(lines)
