"""Layer-by-layer comparison of two runtimes (or two models): the first layer whose output diverges.

Every intermediate value of each side's graph is made a graph output and computed on that side's runtime.
Values are compared where both sides have them, in the topological order of the export-form graph (the
deploy passes keep the names of the values that survive; a packed value ``X_bits`` carries the signs of
the export-form ``SignBinarize`` output ``X`` and is compared after ``unpack_sign``). Floats are compared
with a tolerance, binary decisions exactly. The first value that differs names the layer: the earliest
export-form node between it and the last values that still agreed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import BnncError

__all__ = ["Side", "with_all_outputs", "run_values", "compare_sides", "format_layers"]


@dataclass
class Side:
    """One side of the comparison: ``model`` is the graph ``runtime`` runs (export form for ``reference``,
    deploy form for the others); ``export`` is the export form it came from, when known."""

    label: str
    runtime: str
    model: onnx.ModelProto
    export: onnx.ModelProto | None = None
    values: dict = field(default_factory=dict, repr=False)


def _graph_input_names(model: onnx.ModelProto) -> set:
    return {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}


def with_all_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every node output (not initializers or inputs) is a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | _graph_input_names(m)
    typed = {v.name: v for v in list(m.graph.value_info) + list(m.graph.output)}
    for node in m.graph.node:
        for name in node.output:
            if name and name not in have:
                vi = onnx.ValueInfoProto()
                if name in typed:
                    vi.CopyFrom(typed[name])
                else:
                    vi.name = name
                m.graph.output.append(vi)
                have.add(name)
    return m


def _ort_session(model: onnx.ModelProto, threads, *, library: str | None = None, optimize: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not optimize:  # the reference computes exactly what the op bodies say (see runtimes/reference.py)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if library:
        opts.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_values(model: onnx.ModelProto, runtime: str, x: np.ndarray, threads: int | None = None) -> dict:
    """Every value of ``model`` (the graph ``runtime`` runs) on input ``x``: ``{name: ndarray}``."""
    x = np.ascontiguousarray(np.asarray(x, np.float32))
    lib = None
    if runtime == "ort-portable":
        from bnnc.runtimes.ort import to_portable

        model = to_portable(model)
    elif runtime == "ort":
        from bnnc.runtimes.ort import OrtLibraryError, fuse_stem, library_path, runs_winograd_stem

        try:
            lib = library_path()
        except OrtLibraryError as e:
            raise BnncError(f"ONNX Runtime custom-op library: {e}") from None
        if runs_winograd_stem(lib):  # as OrtDeployRunner: the stem runs as the Winograd op
            model = fuse_stem(model)[0]  # (its conv output is then not a value of this side)
    full = with_all_outputs(model)
    in_name = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}][0]
    names = [o.name for o in full.graph.output]
    if runtime in ("reference", "ort-portable", "ort"):
        # the library runtime with ORT's graph optimizations, as OrtDeployRunner runs it (its float convs'
        # rounding then matches); the reference and the portable form op by op
        outs = _ort_session(full, threads, library=lib, optimize=runtime == "ort").run(names, {in_name: x})
    elif runtime == "numpy":
        from bnnc.runtimes.numpy_ref import NumpyDeployRunner

        outs = NumpyDeployRunner(full)._sess.run(names, {in_name: x})
    elif runtime == "tvm":
        from bnnc.runtimes.tvm import compile_model
        import tvm

        tm = compile_model(full, target="cpu", batch_size=len(x), num_threads=threads)
        res = tm.vm["main"](tvm.runtime.tensor(x, tm.dev))
        outs = [res[i].numpy() for i in range(len(names))] if len(names) > 1 else [res.numpy()]
    else:
        raise BnncError(f"--layers cannot run runtime {runtime!r} value by value; use reference, numpy, tvm, ort "
                        "or ort-portable")
    return {n: np.asarray(v) for n, v in zip(names, outs)}


def _producers(model: onnx.ModelProto) -> dict:
    return {o: n for n in model.graph.node for o in n.output if o}


def _layer_name(node: onnx.NodeProto) -> str:
    for a in node.attribute:  # a lowered conv names the export-form node it came from
        if a.name == "source" and a.s:
            return a.s.decode()
    return node.name or node.output[0]


def _lookup(values: dict, name: str, channels: int | None, sign_source: bool):
    """(kind, array) of value ``name`` on one side: 'float'/'int' as computed, or 'sign' (±1 NCHW) for a
    packed value; ``None`` when the side has no such value."""
    from bnnc.ops.deploy import unpack_sign

    v = values.get(name)
    if v is None and sign_source and f"{name}_bits" in values:
        v = values[f"{name}_bits"]
    if v is None:
        return None
    if v.dtype == np.uint32:
        if channels is None:
            return "sign", unpack_sign(v, v.shape[-1] * 32)
        return "sign", unpack_sign(v, channels)
    if np.issubdtype(v.dtype, np.floating):
        return "float", v.astype(np.float64)
    return "int", v


def _compare(a, b, rtol: float, atol: float) -> dict:
    (ka, va), (kb, vb) = a, b
    if "sign" in (ka, kb):
        sa = va if ka == "sign" else np.where(va >= 0, 1.0, -1.0)
        sb = vb if kb == "sign" else np.where(vb >= 0, 1.0, -1.0)
        if sa.shape != sb.shape:
            return dict(kind="sign", ok=False, max_abs_diff=None, sign_diff=None, note=f"shapes {sa.shape} vs {sb.shape}")
        frac = float(np.mean(sa != sb)) if sa.size else 0.0
        return dict(kind="sign", ok=frac == 0.0, max_abs_diff=float(np.max(np.abs(sa - sb))) if sa.size else 0.0,
                    sign_diff=frac, note="")
    if va.shape != vb.shape:
        return dict(kind=ka, ok=False, max_abs_diff=None, sign_diff=None, note=f"shapes {va.shape} vs {vb.shape}")
    if ka == "int" and kb == "int":
        diff = np.abs(va.astype(np.int64) - vb.astype(np.int64))
        return dict(kind="int", ok=not diff.any(), max_abs_diff=float(diff.max()) if diff.size else 0.0,
                    sign_diff=None, note="")
    va, vb = np.asarray(va, np.float64), np.asarray(vb, np.float64)
    diff = np.abs(va - vb)
    scale = max(1.0, float(np.max(np.abs(vb)))) if vb.size else 1.0
    ok = bool(np.all(diff <= atol * scale + rtol * np.abs(vb))) and np.array_equal(np.isnan(va), np.isnan(vb))
    sign_diff = float(np.mean((va >= 0) != (vb >= 0))) if va.size else 0.0
    return dict(kind="float", ok=ok, max_abs_diff=float(np.nanmax(diff)) if diff.size else 0.0,
                sign_diff=sign_diff, note="")


def compare_sides(a: Side, b: Side, x: np.ndarray, *, threads: int | None = None, rtol: float = 1e-3,
                  atol: float = 1e-4) -> dict:
    """Run both sides on ``x`` and compare their values in topological order.

    Returns ``{"rows": [...], "first": row or None, "naming": "export"|"deploy", "images": n}``; a row is
    ``{"value", "node", "op", "kind", "ok", "max_abs_diff", "sign_diff", "note"}`` and ``first``
    additionally has ``"layer"`` (the earliest node that could have caused it) and ``"region"``: the
    export-form nodes between the last agreeing values and this one (``[{"node", "op"}]``).
    A float agrees when ``|a − b| ≤ atol·max(1, max|b|) + rtol·|b|`` everywhere; binary values agree only
    if every sign does.
    """
    a.values = run_values(a.model, a.runtime, x, threads)
    b.values = run_values(b.model, b.runtime, x, threads)
    naming = a.export if a.export is not None else b.export
    kind = "export"
    if naming is None:
        naming, kind = a.model, "deploy"
    producers = _producers(naming)
    inputs = _graph_input_names(naming)
    ancestors: dict[str, frozenset] = {}  # value → names of the nodes it depends on (itself included)

    def anc(name):
        if name in ancestors:
            return ancestors[name]
        if name in inputs or name not in producers:
            return frozenset()
        node = producers[name]
        out = frozenset([id(node)]).union(*[anc(i) for i in node.input if i])
        for o in node.output:
            ancestors[o] = out
        return out

    rows, agreed, first = [], set(), None
    by_id = {id(n): n for n in naming.graph.node}
    order = {id(n): k for k, n in enumerate(naming.graph.node)}
    for node in naming.graph.node:
        for name in node.output:
            if not name:
                continue
            shape_src = a.values.get(name, b.values.get(name))
            channels = int(shape_src.shape[1]) if shape_src is not None and shape_src.dtype != np.uint32 \
                and shape_src.ndim >= 2 else None
            is_sign_src = node.op_type == "SignBinarize"
            va = _lookup(a.values, name, channels, is_sign_src)
            vb = _lookup(b.values, name, channels, is_sign_src)
            if va is None or vb is None:
                continue
            row = dict(value=name, node=_layer_name(node), op=node.op_type, **_compare(va, vb, rtol, atol))
            rows.append(row)
            if row["ok"]:
                agreed |= anc(name)
            elif first is None:
                region = sorted(anc(name) - agreed, key=order.get)
                first = dict(row, region=[dict(node=_layer_name(by_id[i]), op=by_id[i].op_type) for i in region])
                first["layer"] = first["region"][0]["node"] if first["region"] else row["node"]
    return {"rows": rows, "first": first, "naming": kind, "images": int(len(x)), "a": a.label, "b": b.label,
            "rtol": rtol, "atol": atol}


def _g(v, fmt):
    return "—" if v is None else fmt.format(v)


def format_layers(result: dict) -> str:
    """The per-value table and a line naming the first divergence."""
    lines = [f"layer by layer: {result['a']} vs {result['b']} on {result['images']} images "
             f"(values of the {result['naming']}-form graph present on both sides; floats within "
             f"rtol {result['rtol']:g}, atol {result['atol']:g}·max|ref|; binary values exact)",
             f"{'node':36s} {'op':20s} {'value':28s} {'kind':5s} {'max |diff|':>11s} {'signs differ':>13s}  "]
    lines.append("-" * len(lines[-1]))
    for r in result["rows"]:
        mark = "" if r["ok"] else "  <-- differs" + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"{r['node'][:36]:36s} {r['op'][:20]:20s} {r['value'][:28]:28s} {r['kind']:5s} "
                     f"{_g(r['max_abs_diff'], '{:11.3g}'):>11s} {_g(r['sign_diff'], '{:12.4%}'):>13s}{mark}")
    f = result["first"]
    if f is None:
        lines.append(f"no divergence: all {len(result['rows'])} compared values agree")
    else:
        region = ", ".join(f"{r['node']} ({r['op']})" for r in f["region"])
        lines.append(f"first divergence: layer {f['layer']}: value {f['value']} (node {f['node']}, {f['op']}) "
                     f"max |diff| {_g(f['max_abs_diff'], '{:.3g}')}, signs differ "
                     f"{_g(f['sign_diff'], '{:.4%}')}; nodes since the last agreeing values: {region}")
    return "\n".join(lines)


def open_side(path, runtime: str | None = None) -> Side:
    """A side from the command line: an export- or deploy-form ``.onnx`` (on ``runtime``, default ``tvm``)
    or an artifact folder (on the runtime it was compiled for)."""
    from pathlib import Path

    from .compile import RUNTIMES, load, read_onnx
    from .passes.pipeline import check_bnnc_ops, form_of, to_deploy

    p = Path(path)
    if p.is_dir() or p.suffix == ".bnnc":
        if runtime:
            raise BnncError("--runtime applies to .onnx input; an artifact runs on the runtime it was compiled for")
        cm = load(p)
        export = cm.model if form_of(cm.model) == "export" else None
        return Side(f"{path} [{cm.runtime}]", cm.runtime, cm.model, export)
    if p.suffix in (".pt", ".pth", ".th"):
        raise BnncError(f"--layers compares ONNX graphs value by value and {path} is a PyTorch checkpoint: export it "
                        "first (`bnnc export CKPT -o model.onnx`) and compare that model with --runtime reference")
    rt = runtime or "tvm"
    if rt not in RUNTIMES:
        raise BnncError(f"unknown runtime {rt!r}; choose one of {', '.join(RUNTIMES)}")
    proto, _ = read_onnx(p)
    check_bnnc_ops(proto)
    form = form_of(proto)
    if rt == "reference" and form == "deploy":
        raise BnncError(f"{path} is in the deploy form; the reference runtime runs the export form")
    model = proto if rt == "reference" else to_deploy(proto)
    return Side(f"{path} [{rt}]", rt, model, proto if form == "export" else None)


def sides_from_args(model: str, runtime: str | None, compare_to: str | None) -> tuple[Side, Side]:
    """``bnnc eval MODEL [--runtime A] [--compare-to B|MODEL2] --layers``: the two sides. Without
    ``--compare-to`` an export-form ``.onnx`` is compared with the reference runtime. A second ``.onnx``
    runs on MODEL's runtime (on ``tvm`` if that is ``reference`` and the second model is in the deploy
    form); an artifact on the runtime it was compiled for."""
    from pathlib import Path

    from .compile import RUNTIMES

    a = open_side(model, runtime)
    if compare_to is None:
        if a.export is None or Path(model).suffix != ".onnx":
            raise BnncError("--layers needs --compare-to (a runtime for an .onnx MODEL, or another model)")
        compare_to = "reference"
    if compare_to in RUNTIMES:
        if Path(model).suffix != ".onnx":
            raise BnncError("--compare-to RUNTIME needs an .onnx MODEL; pass another model path instead")
        b = open_side(model, compare_to)
    elif Path(compare_to).suffix == ".onnx":  # model vs model: the same runtime, where it runs that form
        from .compile import read_onnx
        from .passes.pipeline import form_of

        rt = a.runtime
        if rt == "reference" and form_of(read_onnx(compare_to)[0]) == "deploy":
            rt = "tvm"
        b = open_side(compare_to, rt)
    else:
        b = open_side(compare_to, None)
    return a, b
