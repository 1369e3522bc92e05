"""Deploy-form ONNX graph → Relax module → compiled TVM VM.

The translation is done by hand with ``relax.BlockBuilder`` (the TVM ONNX frontend ignores op domains and
cannot see the ``ai.bnnc`` ops). Standard ONNX ops map to ``relax.op.*`` and are legalized by TVM;
``ai.bnnc`` ops become ``call_tir`` calls to the scheduled PrimFuncs of :mod:`.kernels`. Unscheduled
PrimFuncs produced by legalization get a simple parallel schedule (outer spatial loops) before lowering.

Shapes are static: the batch dimension is fixed to ``batch_size`` at compile time; :meth:`TVMModel.run`
accepts any N by splitting it into chunks (the last chunk zero-padded).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import numpy as np
import onnx
import tvm
import tvm_ffi
from onnx import numpy_helper
from tvm import relax, tirx

from bnnc.util import cpu_call_batch

from . import kernels as K
from .float_kernels import (
    float_avgpool2d_primfunc,
    float_conv2d_maxpool_primfunc,
    float_conv2d_primfunc,
    float_dense_primfunc,
    float_maxpool2d_primfunc,
)
from .target import cpu_target, host_family, resolve_target, target_family  # noqa: F401

__all__ = ["compile_model", "TVMModel", "translate", "set_num_threads", "BNNC_DOMAIN"]

BNNC_DOMAIN = "ai.bnnc"
_ONNX_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------------------------------
# Threads


@contextlib.contextmanager
def _quiet_scope_logs():
    """TVM's VM logs one 'Scope Saving/Loaded' warning per kernel on every save and load; keep the
    C-level stderr of that call and re-emit every other line."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            for line in buf.read().decode(errors="replace").splitlines():
                if "Scope Saving" not in line and "Scope Loaded" not in line:
                    print(line, file=sys.stderr)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# TVM sizes its thread pool once, when it is first used, from TVM_NUM_THREADS (else OMP_NUM_THREADS, else
# *half* the logical cores on x86, assuming hyper-threading); config_threadpool can later use fewer workers
# but never more. So the pool is created with every core this process may use, and set_num_threads()
# picks how many of them run. An explicit TVM_NUM_THREADS is respected.
if "TVM_NUM_THREADS" not in os.environ:
    os.environ["TVM_NUM_THREADS"] = str(_available_cores())


def set_num_threads(num_threads: int | None) -> None:
    """Use ``num_threads`` workers of the TVM runtime thread pool for the following runs (parallel loops of
    every kernel). More threads than the pool was created with (TVM_NUM_THREADS, default: all available
    cores) cannot be had: a warning says so."""
    if not num_threads:
        return
    n = int(num_threads)
    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is None:  # pragma: no cover - very old runtimes: a fresh pool reads the environment
        os.environ["TVM_NUM_THREADS"] = str(n)
        return
    f(1, n)  # mode 1 = big cores (all cores on homogeneous machines), n threads
    got = tvm.get_global_func("runtime.NumThreads", allow_missing=True)
    if got is not None and int(got()) < n:
        import warnings

        warnings.warn(f"TVM thread pool has {int(got())} workers, {n} requested (the pool is sized once, by "
                      f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')} when first used)", RuntimeWarning,
                      stacklevel=2)


# --------------------------------------------------------------------------------------------------
# Translation


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        out[a.name] = v
    return out


def _shape(expr) -> list[int]:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        raise ValueError(f"expected a tensor with a static shape, got {sinfo}")
    dims = []
    for d in sinfo.shape.values:
        if not isinstance(d, tvm.tirx.IntImm):
            raise ValueError(f"non-static shape {sinfo.shape}")
        dims.append(int(d))
    return dims


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


# standard ops whose translation always writes a new tensor (never a view of an input): a value they read may
# be overwritten in place afterwards (Translator._dead_after)
_FRESH_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs", "Relu", "PRelu", "LeakyRelu", "Clip",
                        "Sigmoid", "Tanh", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
                        "BatchNormalization", "Gemm", "MatMul", "Slice", "Pad", "Concat"})

# x86: the chain after a float-output popcount conv runs in the conv's epilogue (one kernel); False: the
# conv, then a chain_pack kernel (kept for comparisons)
_POPFUSE = True


def _amx_max_extras() -> int:
    from .amx import _MAX_EXTRAS

    return _MAX_EXTRAS


class _Translator:
    def __init__(self, model: onnx.ModelProto, batch_size: int, family: str = "x86", fuse: bool = True):
        self.model = model
        # fuse the element-wise chain after a float-output binary conv (+ its PackSign) into one kernel
        self.fuse = bool(fuse)
        self.skip: set[int] = set()  # node indices translated as part of a fused chain
        self.deferred: dict[int, dict] = {}  # node index → fused chain emitted in its place
        self.cur = -1
        self.fused_chains: list[dict] = []  # what was fused (for tests and inspection)
        self.family = family  # schedule family of the ai.bnnc kernels: "x86", "arm" or "cuda"
        self.graph = model.graph
        self.batch_size = int(batch_size)
        self.bb = relax.BlockBuilder()
        self.values: dict[str, Any] = {}  # name → relax expr
        self.consts: dict[str, np.ndarray] = {}  # name → numpy value (initializers, Constant nodes)
        self.nfunc = 0
        self.owned: list = []  # Relax vars of kernel outputs (fresh tensors: may be overwritten in place)
        self.kernels: dict[tuple, list] = {}  # (base, structural hash) → [(GlobalVar, PrimFunc)]
        self.orig_batch = None
        # real (float) layers get bnnc's scheduled CPU kernels; CUDA keeps legalization + dlight
        self.cpu_float = family in ("x86", "arm")
        self.float_tiles = dict(vec=8, oc_tile=8) if family == "arm" else dict(vec=16, oc_tile=8)

    # -- helpers -------------------------------------------------------------------------------
    def const(self, name_or_arr, dtype=None):
        arr = self.consts[name_or_arr] if isinstance(name_or_arr, str) else name_or_arr
        arr = np.asarray(arr)
        if dtype is not None:
            arr = arr.astype(dtype)
        return relax.const(np.ascontiguousarray(arr), str(arr.dtype))

    def get(self, name: str):
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            v = self.const(name)
            self.values[name] = v
            return v
        raise ValueError(f"value {name!r} is not defined (missing initializer or producer)")

    def cval(self, name: str, what: str, node) -> np.ndarray:
        if name not in self.consts:
            raise ValueError(f"node {node.name!r} ({node.op_type}): {what} must be a constant/initializer")
        return self.consts[name]

    def emit(self, expr):
        return self.bb.emit(expr)

    def mul(self, x, y):
        """``x * y`` with ONNX's rounding: float32 products are rounded on their own (``kernels.multiply_te``),
        never contracted into an FMA with an add that Relax fuses into the same loop; other dtypes as Relax."""
        if _dtype(x) == "float32" and _dtype(y) == "float32":
            return self.bb.emit_te(K.multiply_te, x, y, self.family, primfunc_name_hint="multiply")
        return self.emit(relax.op.multiply(x, y))

    def call_kernel(self, func, base: str, args, out_shape, out_dtype, inplace=None):
        """``call_tir`` of a (shared) kernel; ``out_shape``/``out_dtype`` may be lists (several outputs).
        ``inplace``: per output, the index of the argument it is written over (-1: a new tensor) —
        ``call_tir_inplace``; only for arguments :meth:`_dead_after` vouches for."""
        # one PrimFunc per distinct kernel: layers of the same shape (a ResNet stage) share their code,
        # which divides the LLVM work of compile time (weights are arguments, not part of the kernel)
        key = (base, tvm_ffi.structural_hash(func))
        gv = None
        for cand, f in self.kernels.get(key, ()):
            if tvm_ffi.structural_equal(f, func):
                gv = cand
                break
        if gv is None:
            name = f"bnnc_{base}_{self.nfunc}"
            gv = self.bb.add_func(func.with_attr("global_symbol", name), name)
            self.kernels.setdefault(key, []).append((gv, func))
            self.nfunc += 1
        def call(sinfo):
            if inplace is None:
                return relax.call_tir(gv, list(args), sinfo)
            return relax.op.call_tir_inplace(gv, list(args), list(inplace), sinfo)

        if isinstance(out_dtype, (list, tuple)):
            sinfo = [relax.TensorType(s, d) for s, d in zip(out_shape, out_dtype)]
            if len(sinfo) == 1:
                outs = [self.emit(call(sinfo[0]))]
            else:
                res = self.emit(call(sinfo))
                outs = [self.emit(relax.TupleGetItem(res, k)) for k in range(len(sinfo))]
            self.owned += outs
            return outs
        out = self.emit(call(relax.TensorType(out_shape, out_dtype)))
        self.owned.append(out)
        return out

    def _dead_after(self, name: str, plan: dict) -> bool:
        """Whether value ``name`` may be overwritten by the kernel of ``plan`` (emitted now): a tensor one of
        our kernels made (not the model input, a constant or a view), bound to no other name, not a graph
        output, and every reader is in ``plan`` or already translated (none in a chain still pending)."""
        var = self.values.get(name)
        if var is None or name in self.graph_outputs or not any(var.same_as(o) for o in self.owned):
            return False
        # another name of the same tensor: only one no node reads any more (the conv output of a fused
        # conv + max pool, whose pool node is skipped)
        if any(v.same_as(var) and n != name and (n in self.graph_outputs
                                                 or any(j not in self.skip for j in self.consumers.get(n, [])))
               for n, v in self.values.items()):
            return False
        pending = set()
        for p in self.deferred.values():
            pending.update(p["nodes"])
            pending.add(p["conv"])
            if p["pack"] is not None:
                pending.add(p["pack"])
        mine = set(plan["nodes"])
        for j in self.consumers.get(name, []):
            if j in mine:
                continue
            nd = self.graph.node[j]
            if j >= self.cur or j in pending:
                return False
            # an earlier reader must have made its own tensor: a view (Reshape, Flatten, ...) of this one
            # would still see the overwrite
            if nd.domain != BNNC_DOMAIN and not ((nd.domain or "") in _ONNX_DOMAINS and nd.op_type in _FRESH_OPS):
                return False
        return True

    # -- driver --------------------------------------------------------------------------------
    def run(self):
        g = self.graph
        init_names = {t.name for t in g.initializer}
        for t in g.initializer:
            self.consts[t.name] = numpy_helper.to_array(t)
        inputs = [i for i in g.input if i.name not in init_names]
        if len(inputs) != 1:
            raise ValueError(f"expected exactly one graph input, got {[i.name for i in inputs]}")
        inp = inputs[0]
        ttype = inp.type.tensor_type
        dims = []
        for k, d in enumerate(ttype.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif k == 0:
                dims.append(-1)
            else:
                raise ValueError(f"input {inp.name!r}: only the batch dimension may be symbolic")
        if not dims:
            raise ValueError("graph input has no shape")
        self.orig_batch = dims[0] if dims[0] > 0 else None
        dims[0] = self.batch_size
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        self.input_name, self.input_shape, self.input_dtype = inp.name, dims, str(np.dtype(dtype))
        self.output_names = [o.name for o in g.output]

        x = relax.Var(inp.name.replace(".", "_") or "x", relax.TensorType(dims, self.input_dtype))
        with self.bb.function("main", [x]):
            with self.bb.dataflow():
                self.values[inp.name] = x
                self.consumers: dict[str, list[int]] = {}
                for k, node in enumerate(g.node):
                    for name in node.input:
                        if name:
                            self.consumers.setdefault(name, []).append(k)
                self.graph_outputs = set(self.output_names)
                self.producer = {name: k for k, node in enumerate(g.node) for name in node.output if name}
                for k, node in enumerate(g.node):
                    self.cur = k
                    if k in self.skip:
                        continue
                    if k in self.deferred:
                        self._emit_chain(self.deferred.pop(k))
                        continue
                    self.node(node)
                outs = [self.get(o) for o in self.output_names]
                out = outs[0] if len(outs) == 1 else relax.Tuple(outs)
                gv = self.bb.emit_output(out)
            self.bb.emit_func_output(gv)
        mod = self.bb.get()
        self.output_shape = _shape(outs[0]) if len(outs) >= 1 else None
        self.output_dtype = _dtype(outs[0])
        return mod

    def node(self, node: onnx.NodeProto):
        dom = node.domain or ""
        if dom == BNNC_DOMAIN:
            fn = getattr(self, f"bnnc_{node.op_type}", None)
        elif dom in _ONNX_DOMAINS:
            fn = getattr(self, f"op_{node.op_type}", None)
        else:
            fn = None
        if fn is None:
            raise ValueError(f"unsupported op: node {node.name!r} has op type {dom + '::' if dom else ''}"
                             f"{node.op_type}")
        try:
            res = fn(node, _attrs(node))
        except ValueError as e:
            msg = str(e)
            if node.op_type not in msg or repr(node.name) not in msg:
                msg = f"node {node.name!r} ({node.op_type}): {msg}"
            raise ValueError(msg) from e
        if not isinstance(res, (list, tuple)):
            res = [res]
        for name, val in zip(node.output, res):
            if name:
                if isinstance(val, np.ndarray):
                    self.consts[name] = val
                else:
                    self.values[name] = val

    def inputs(self, node):
        return [self.get(n) if n else None for n in node.input]

    def opt(self, node, i):
        return node.input[i] if len(node.input) > i and node.input[i] else None

    def all_const(self, node):
        return all((not n) or (n in self.consts and n not in self.values) for n in node.input)

    # -- ai.bnnc export-form ops (float fallback for what the passes leave unlowered) -------------
    def bnnc_SignBinarize(self, node, a):
        x = self.get(node.input[0])
        rank = len(_shape(x))
        view = (1, -1) + (1,) * (rank - 2)
        t, p, q = (self.cval(n, "SignBinarize parameter", node).astype(np.float32).reshape(view)
                   for n in node.input[1:4])
        s = self.emit(relax.op.where(relax.op.greater_equal(x, self.const(t)), self.const(np.ones((), np.float32)),
                                     self.const(-np.ones((), np.float32))))
        return self.emit(relax.op.add(self.mul(s, self.const(p)), self.const(q)))

    def bnnc_BinaryConv2d(self, node, a):
        x = self.get(node.input[0])
        w = self.cval(node.input[1], "binary weights", node)
        r = self.cval(node.input[2], "weight scale", node).astype(np.float32).reshape(1, -1, 1, 1)
        b = self.cval(node.input[3], "weight offset", node).astype(np.float32).reshape(1, -1, 1, 1)
        ws = np.where(w >= 0, 1.0, -1.0).astype(np.float32)
        ks = list(ws.shape[2:])
        st = [int(v) for v in a.get("strides", [1, 1])]
        dil = [int(v) for v in a.get("dilations", [1, 1])]
        pads = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
        groups = int(a.get("group", 1))
        del ks

        def conv(weights):
            return self.emit(relax.op.nn.conv2d(x, self.const(weights), strides=st, padding=pads, dilation=dil,
                                                groups=groups))

        y = self.mul(conv(ws), self.const(r))
        if np.any(b != 0):
            y = self.emit(relax.op.add(y, self.mul(conv(np.ones_like(ws)), self.const(b))))
        return y

    # -- ai.bnnc ops -----------------------------------------------------------------------------
    def bnnc_PackSign(self, node, a):
        x = self.get(node.input[0])
        shp = _shape(x)
        tname = self.opt(node, 1)
        args = [x]
        if tname:
            t = self.const(tname, "float32") if tname in self.consts else self.get(tname)
            args.append(t)
        f = K.pack_sign_primfunc(shp, tname is not None, target=self.family)
        out = [shp[0], K.num_words(shp[1])] if len(shp) == 2 else [shp[0], shp[2], shp[3], K.num_words(shp[1])]
        return self.call_kernel(f, "pack_sign", args, out, "uint32")

    def bnnc_UnpackSign(self, node, a):
        x = self.get(node.input[0])
        shp = _shape(x)
        c = int(a["channels"])
        f = K.unpack_sign_primfunc(shp, c, target=self.family)
        out = [shp[0], c] if len(shp) == 2 else [shp[0], c, shp[1], shp[2]]
        return self.call_kernel(f, "unpack_sign", args=[x], out_shape=out, out_dtype="float32")

    def bnnc_MaxPoolBits(self, node, a):
        x = self.get(node.input[0])
        n, h, w, cw = _shape(x)
        ks = [int(v) for v in a["kernel_shape"]]
        st = [int(v) for v in a.get("strides", ks)]
        pads = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
        mode = a.get("mode", "or")
        f = K.maxpool_bits_primfunc([n, h, w, cw], int(a["channels"]), ks, st, pads, mode, target=self.family)
        oh = K._out_size(h, ks[0], st[0], pads[0], pads[2])
        ow = K._out_size(w, ks[1], st[1], pads[1], pads[3])
        return self.call_kernel(f, "maxpool_bits", [x], [n, oh, ow, cw], "uint32")

    def bnnc_BinaryConv2dPacked(self, node, a):
        output = a.get("output", "float")
        o = int(a["out_channels"])
        ks = [int(v) for v in a["kernel_shape"]]
        st = [int(v) for v in a.get("strides", [1, 1])]
        pads = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
        dil = [int(v) for v in a.get("dilations", [1, 1])]
        pdtype = "float32" if output == "float" else "int32"
        dtypes = ["uint32", "uint32", "int32", "int32", "int32", pdtype, pdtype]
        wname = node.input[1]
        w_const = wname in self.consts and wname not in self.values
        args = []
        for i, (name, dt) in enumerate(zip(node.input, dtypes)):
            if i >= 2 and name in self.consts:
                args.append(self.const(name, dt))
            else:
                v = self.get(name)
                if _dtype(v) != dt:
                    v = self.emit(relax.op.astype(v, dt))
                args.append(v)
        xs = _shape(args[0])
        ws = _shape(args[1])
        es = _shape(args[2])
        cin = int(a["in_channels"]) if "in_channels" in a else None
        e_name, cc_name = node.input[2], node.input[4]
        e_const = e_name in self.consts and e_name not in self.values
        tgt = self.target if hasattr(self, "target") else self.family
        geo = dict(strides=st, pads=pads, dilations=dil)
        layout = "OHWC"
        wnp = None
        if w_const:
            # constant weights: laid out once here (not per call) for the kernel that takes them: AMX tiles (on an
            # AMX target, see runtimes/tvm/amx.py), an AVX-512 popcount engine (amx.pop_engine) or blocked for the
            # channels-in-lanes TE schedule
            layout = K.conv_weight_layout(xs, ws, amx=True, target=tgt, **geo)
            wnp = np.asarray(self.consts[wname]).astype(np.uint32)

        p_const = all(nm in self.consts and nm not in self.values for nm in node.input[5:7])

        def conv_inputs(lay):
            """The conv's arguments for the kernel of layout ``lay`` (K.conv_kernel_args: weights laid out and,
            for the kernels that take it, E's table made here once instead of by a serial loop in each call, 1-8
            µs a layer) and whether E is that table."""
            ar = list(args)
            if wnp is None:
                return ar, False
            ps = [self.consts[nm] for nm in node.input[5:7]] if p_const else [None, None]
            wk, ek, table = K.conv_kernel_args(lay, output, wnp, self.consts[e_name] if e_const else None, *ps)
            if lay != "OHWC":
                ar[1] = self.const(wk)
            if table:
                ar[2] = self.const(ek)
            return ar, table

        def kernel(use):  # (weights not constant: the TE kernels, which take them as given)
            return layout if wnp is None else K.conv_kernel_layout(layout, xs, ws, use=use, target=tgt,
                                                                   in_channels=cin, **geo)

        flayout = kernel("bits" if output == "bits" else "float")  # the conv alone
        fargs, ftable = conv_inputs(flayout)

        def make_f():  # the conv alone (made only where it is emitted: parsing a TIR kernel takes 0.1-0.3 s)
            return K.binary_conv2d_packed_primfunc(xs, ws, es, out_channels=o, kernel_shape=ks, strides=st,
                                                   pads=pads, dilations=dil, output=output, target=self.family,
                                                   weight_layout=flayout, in_channels=cin, e_table=ftable)

        oh, ow = K.conv_geometry(xs[1], xs[2], ks[0], ks[1], st, pads, dil)[3]
        if output == "float":
            oshape, odtype = [xs[0], o, oh, ow], "float32"
        else:
            oshape, odtype = [xs[0], oh, ow, K.num_words(o)], "uint32"
        if output == "float" and self.fuse:
            conv = None
            if layout == "amx" or (_POPFUSE and self.family in ("x86", "cuda")):
                # the chain (+ PackSign) goes into the conv's epilogue (AMX, x86 popcount or CUDA kernel): emitted
                # with it
                clayout = kernel("chain")
                cargs, ctable = (fargs, ftable) if clayout == flayout else conv_inputs(clayout)
                conv = dict(make_f=make_f, fargs=fargs, args=cargs, oshape=oshape, xs=xs, ws=ws, es=es, layout=clayout,
                            attrs=dict(out_channels=o, kernel_shape=ks, strides=st, pads=pads, dilations=dil,
                                       in_channels=cin))
                if self.family == "x86" and clayout not in K.TIR_LAYOUTS and \
                        all(nm in self.consts and nm not in self.values for nm in (e_name, cc_name)):
                    # the TE popcount kernels take E by output column, made here once (not per call)
                    conv["e_columns"] = K.e_by_column(self.consts[e_name], self.consts[cc_name])
                conv["e_table"] = ctable or None  # cargs[2] is already the table
            plan = self._plan_chain(self.cur, node.output[0], conv)
            if plan is not None and plan["fused_conv"] is not None:
                return []
        f = make_f()
        if [int(v) for v in K.output_spec(f)[0]] != [int(v) for v in oshape]:
            raise AssertionError(f"BinaryConv2dPacked {node.name!r}: kernel output {K.output_spec(f)[0]} != {oshape}")
        return self.call_kernel(f, "bconv", fargs, oshape, odtype)

    # -- fused element-wise chain after a float-output binary conv --------------------------------
    def _chain_steps(self, nd, v: str, extras: list):
        """The chain steps of node ``nd`` applied to value ``v`` (its only producer-side input), or None
        when the node cannot join the chain. Operands are appended to ``extras`` as names / arrays."""
        if (nd.domain or "") not in _ONNX_DOMAINS or len(nd.output) != 1:
            return None
        ins = [n for n in nd.input]
        op = nd.op_type

        def operand(name):
            if name in self.consts and name not in self.values:
                arr = np.asarray(self.consts[name])
                if arr.dtype != np.float32 or arr.ndim > 4:
                    return None
                extras.append(arr.reshape(1) if arr.ndim == 0 else arr)
            else:
                extras.append(name)  # a value: shape and dtype are checked when the chain is emitted
            return len(extras) - 1

        if op in ("Add", "Sub", "Mul", "Max", "Min") and len(ins) == 2 and ins.count(v) == 1:
            other = ins[1] if ins[0] == v else ins[0]
            k = operand(other)
            if k is None:
                return None
            kind = {"Add": "add", "Mul": "mul", "Max": "max", "Min": "min"}.get(op)
            if op == "Sub":
                kind = "sub" if ins[0] == v else "rsub"
            return [(kind, k)]
        if op == "PRelu" and len(ins) == 2 and ins[0] == v and ins[1] != v:
            k = operand(ins[1])
            return None if k is None else [("prelu", k)]
        if op == "Relu" and ins == [v]:
            return [("relu",)]
        if op == "Neg" and ins == [v]:
            return [("neg",)]
        if op == "Clip" and ins and ins[0] == v and v not in ins[1:]:
            a = _attrs(nd)
            lo, hi = a.get("min"), a.get("max")
            for i, nm in ((1, "min"), (2, "max")):
                if len(ins) > i and ins[i]:
                    if ins[i] not in self.consts or ins[i] in self.values:
                        return None
                    if nm == "min":
                        lo = self.consts[ins[i]]
                    else:
                        hi = self.consts[ins[i]]
            steps = []
            for kind, bound in (("max", lo), ("min", hi)):
                if bound is not None:
                    b = np.asarray(bound)
                    if b.size != 1 or b.dtype != np.float32:
                        return None
                    extras.append(b.reshape(1))
                    steps.append((kind, len(extras) - 1))
            return steps
        return None

    def _plan_chain(self, conv_idx: int, v: str, conv: dict | None = None):
        """After a float-output conv: find the single-consumer element-wise chain that follows it and the
        PackSign of its result; translate them later as one kernel in place of the chain's last node (with
        ``conv``, the conv's call, not emitted yet: conv + chain + PackSign as one kernel there).
        Returns the plan, or None when there is no chain."""
        g = self.graph
        steps, nodes, extras = [], [], []
        while v not in self.graph_outputs:
            cons = self.consumers.get(v, [])
            if len(cons) != 1 or cons[0] <= conv_idx or cons[0] in self.skip or cons[0] in self.deferred:
                break  # (a node another chain already took stays there)
            j = cons[0]
            n0 = len(extras)
            st = self._chain_steps(g.node[j], v, extras)
            if st is None:
                del extras[n0:]
                break
            steps += st
            nodes.append(j)
            v = g.node[j].output[0]
        if not nodes:
            return None
        if any(isinstance(e, str) and self._later_bconv_output(e) for e in extras):
            # an operand is the float output of a binary conv translated later (a ResNet's downsample
            # shortcut added to the block's conv): that conv takes the chain into its epilogue instead
            return None
        pack = None
        for j in self.consumers.get(v, []):
            nd = g.node[j]
            tname = nd.input[1] if len(nd.input) > 1 and nd.input[1] else None
            if nd.domain == BNNC_DOMAIN and nd.op_type == "PackSign" and nd.input[0] == v and \
                    (tname is None or (tname in self.consts and tname not in self.values)):
                pack = j
                break
        want_float = pack is None or v in self.graph_outputs or any(j != pack for j in self.consumers.get(v, []))
        if conv is not None and not all(self._made_by_plain_ops(e, nodes[-1]) for e in extras
                                        if isinstance(e, str)):
            # an operand made after the conv by another deferred conv or chain (e.g. AdaBin's S_a term): the
            # conv cannot wait for it, so it is emitted now and only the chain is fused
            conv = None
        plan = dict(conv=conv_idx, nodes=nodes, steps=steps, extras=extras, pack=pack, value=v,
                    want_float=want_float, fused_conv=conv)
        self.skip.update(nodes[:-1])
        if pack is not None:
            self.skip.add(pack)
        self.deferred[nodes[-1]] = plan
        return plan

    def _later_bconv_output(self, name: str) -> bool:
        """Whether value ``name`` is the output of a ``BinaryConv2dPacked`` node not translated yet."""
        k = self.producer.get(name)
        if k is None or k <= self.cur or name in self.values:
            return False
        nd = self.graph.node[k]
        return nd.domain == BNNC_DOMAIN and nd.op_type == "BinaryConv2dPacked"

    def _made_by_plain_ops(self, name: str, before: int, depth: int = 8) -> bool:
        """Whether value ``name`` exists by the time node ``before`` is translated without waiting for any
        fused chain: already translated, or made (within ``depth`` producers) by plain standard-domain nodes
        from such values — e.g. the option-A shortcut Slice → Pad of a ResNet's stride-2 block."""
        if name in self.values or name in self.consts:
            return True
        k = self.producer.get(name)
        if depth == 0 or k is None or k >= before or k in self.skip or k in self.deferred:
            return False
        nd = self.graph.node[k]
        if (nd.domain or "") not in _ONNX_DOMAINS:
            return False
        return all(self._made_by_plain_ops(i, k, depth - 1) for i in nd.input if i)

    def _emit_chain(self, plan: dict):
        g = self.graph
        conv_out = g.node[plan["conv"]].output[0]
        ac = plan.get("fused_conv")  # the conv, fused with the chain (AMX, x86 popcount or CUDA kernel)
        if ac is not None:
            shape = list(ac["oshape"])
            y = None
            # (the AMX and popcount-engine kernels take at most _amx_max_extras() chain operands)
            ok = ac["layout"] not in K.TIR_LAYOUTS or len(plan["extras"]) <= _amx_max_extras()
        else:
            y = self.get(conv_out)
            shape = _shape(y)
            ok = _dtype(y) == "float32"
        args, shapes = [y], []
        for e in plan["extras"]:
            if isinstance(e, str):
                val = self.get(e)
                es = _shape(val)
                ok = ok and _dtype(val) == "float32" and K.broadcasts_to(es, shape)
                args.append(val)
                shapes.append(es)
            else:
                ok = ok and K.broadcasts_to(e.shape, shape)
                args.append(self.const(e))
                shapes.append(list(e.shape))
        if not ok:  # an operand that does not broadcast to the conv output (or is not float32): op by op
            if ac is not None:  # the deferred conv alone first
                self.values[conv_out] = self.call_kernel(ac["make_f"](), "bconv", ac["fargs"], ac["oshape"],
                                                         "float32")
            for j in plan["nodes"] + ([plan["pack"]] if plan["pack"] is not None else []):
                self.node(g.node[j])
            return
        pack = plan["pack"]
        with_t = False
        if pack is not None:
            pn = g.node[pack]
            if len(pn.input) > 1 and pn.input[1]:
                with_t = True
                args.append(self.const(pn.input[1], "float32"))
        inplace = None
        if ac is not None:
            if ac["layout"] in K.TIR_LAYOUTS and plan["want_float"]:
                # the float result over a residual operand nothing reads afterwards: one buffer for the
                # residual stream instead of two (amx.binary_conv2d_amx_chain_primfunc, inplace; AMX and
                # popcount engines)
                for k, e in enumerate(plan["extras"]):
                    if isinstance(e, str) and list(shapes[k]) == list(shape) and self._dead_after(e, plan):
                        inplace = k
                        break
            conv_args, es = list(ac["args"]), ac["es"]
            if ac.get("e_columns") is not None:
                conv_args[2] = self.const(ac["e_columns"])
                es = list(ac["e_columns"].shape)
            f = K.binary_conv2d_packed_chain_primfunc(ac["xs"], ac["ws"], es, extra_shapes=shapes,
                                                      steps=plan["steps"], want_float=plan["want_float"],
                                                      pack=pack is not None, with_threshold=with_t,
                                                      weight_layout=ac["layout"], target=self.family,
                                                      inplace=inplace, e_columns=ac.get("e_columns") is not None,
                                                      e_table=ac.get("e_table") is not None, **ac["attrs"])
            args = conv_args + args[1:]
            base = "chain_pack_bconv" if pack is not None else "chain_bconv"  # the chain fused into the conv
        else:
            f = K.chain_pack_primfunc(shape, shapes, plan["steps"], want_float=plan["want_float"],
                                      pack=pack is not None, with_threshold=with_t, target=self.family)
            base = "chain_pack" if pack is not None else "chain"
        oshapes, odtypes = [], []
        if plan["want_float"]:
            oshapes.append(shape)
            odtypes.append("float32")
        if pack is not None:
            oshapes.append([shape[0], shape[2], shape[3], K.num_words(shape[1])])
            odtypes.append("uint32")
        ip = None
        if inplace is not None:  # the float output aliases argument 7 + k (after X, W, E, RC, CC, P0, P1)
            ip = [7 + inplace] + ([-1] if pack is not None else [])
        outs = self.call_kernel(f, base, args, oshapes, odtypes, inplace=ip)
        k = 0
        if plan["want_float"]:
            self.values[plan["value"]] = outs[0]
            k = 1
        if pack is not None:
            self.values[g.node[pack].output[0]] = outs[k]
        self.fused_chains.append(dict(conv=g.node[plan["conv"]].name, ops=[g.node[j].op_type for j in plan["nodes"]],
                                      steps=[s[0] for s in plan["steps"]], pack=pack is not None,
                                      float_out=plan["want_float"], amx=ac is not None and ac["layout"] == "amx",
                                      kernel=ac["layout"] if ac is not None else None,
                                      in_conv=ac is not None, inplace=inplace is not None))

    # -- standard ONNX ops ------------------------------------------------------------------------
    def op_Identity(self, node, a):
        n = node.input[0]
        if n in self.consts and n not in self.values:
            return self.consts[n]
        return self.get(n)

    def op_Constant(self, node, a):
        if "value" in a:
            return np.asarray(a["value"])
        for k, dt in (("value_float", np.float32), ("value_int", np.int64)):
            if k in a:
                return np.asarray(a[k], dt)
        for k, dt in (("value_floats", np.float32), ("value_ints", np.int64)):
            if k in a:
                return np.asarray(a[k], dt)
        raise ValueError(f"node {node.name!r} (Constant): unsupported attribute {list(a)}")

    def _binary(self, node, fn, npfn, emits=False):
        """A binary op: folded with ``npfn`` when both inputs are constants, else ``fn(x, y)`` (a Relax
        expression, emitted here; ``emits``: ``fn`` emits itself)."""
        if self.all_const(node):
            return npfn(self.consts[node.input[0]], self.consts[node.input[1]])
        x, y = self.inputs(node)[:2]
        return fn(x, y) if emits else self.emit(fn(x, y))

    def op_Add(self, node, a):
        return self._binary(node, relax.op.add, np.add)

    def op_Sub(self, node, a):
        return self._binary(node, relax.op.subtract, np.subtract)

    def op_Mul(self, node, a):
        return self._binary(node, self.mul, np.multiply, emits=True)

    def op_Div(self, node, a):
        return self._binary(node, relax.op.divide, np.divide)

    def op_Neg(self, node, a):
        return self.emit(relax.op.negative(self.get(node.input[0])))

    def op_Abs(self, node, a):
        return self.emit(relax.op.abs(self.get(node.input[0])))

    def op_Slice(self, node, a):
        x = self.get(node.input[0])
        rank = len(_shape(x))
        starts = [int(v) for v in self.cval(node.input[1], "Slice starts", node)]
        ends = [int(v) for v in self.cval(node.input[2], "Slice ends", node)]
        axes = ([int(v) for v in self.cval(node.input[3], "Slice axes", node)] if self.opt(node, 3)
                else list(range(len(starts))))
        steps = ([int(v) for v in self.cval(node.input[4], "Slice steps", node)] if self.opt(node, 4)
                 else [1] * len(starts))
        shape = _shape(x)
        axes = [ax % rank for ax in axes]
        # clamp ONNX's INT64_MAX-style ends to the dimension, as the spec does
        ends = [min(e, shape[ax]) if st > 0 else e for e, ax, st in zip(ends, axes, steps)]
        return self.emit(relax.op.strided_slice(x, axes, starts, ends, steps))

    def op_Pad(self, node, a):
        x = self.get(node.input[0])
        if a.get("mode", b"constant") not in (b"constant", "constant"):
            raise ValueError(f"node {node.name!r} (Pad): only constant padding is supported")
        pads = [int(v) for v in self.cval(node.input[1], "Pad pads", node)]
        value = float(self.cval(node.input[2], "Pad value", node).reshape(-1)[0]) if self.opt(node, 2) else 0.0
        if self.opt(node, 3):
            raise ValueError(f"node {node.name!r} (Pad): the axes input is not supported")
        rank = len(_shape(x))
        if min(pads) < 0:
            raise ValueError(f"node {node.name!r} (Pad): negative pads are not supported")
        width = [v for i in range(rank) for v in (pads[i], pads[i + rank])]
        return self.emit(relax.op.nn.pad(x, width, "constant", value))

    def op_Relu(self, node, a):
        return self.emit(relax.op.nn.relu(self.get(node.input[0])))

    def op_Sigmoid(self, node, a):
        return self.emit(relax.op.sigmoid(self.get(node.input[0])))

    def op_Tanh(self, node, a):
        return self.emit(relax.op.tanh(self.get(node.input[0])))

    def op_Softmax(self, node, a):
        return self.emit(relax.op.nn.softmax(self.get(node.input[0]), axis=int(a.get("axis", -1))))

    def op_PRelu(self, node, a):
        x = self.get(node.input[0])
        slope = self.get(node.input[1])
        zero = relax.const(np.zeros((), _dtype(x)))
        return self.emit(relax.op.where(relax.op.less(x, zero), self.mul(x, slope), x))

    def op_LeakyRelu(self, node, a):
        x = self.get(node.input[0])
        alpha = relax.const(np.asarray(a.get("alpha", 0.01), _dtype(x)))
        zero = relax.const(np.zeros((), _dtype(x)))
        return self.emit(relax.op.where(relax.op.less(x, zero), self.mul(x, alpha), x))

    def op_Clip(self, node, a):
        x = self.get(node.input[0])
        dt = _dtype(x)
        lo = a.get("min")
        hi = a.get("max")
        if self.opt(node, 1):
            lo = self.cval(node.input[1], "min", node)
        if self.opt(node, 2):
            hi = self.cval(node.input[2], "max", node)
        y = x
        if lo is not None:
            y = self.emit(relax.op.maximum(y, relax.const(np.asarray(lo, dt).reshape(()))))
        if hi is not None:
            y = self.emit(relax.op.minimum(y, relax.const(np.asarray(hi, dt).reshape(()))))
        return y

    def op_Conv(self, node, a):
        x = self.get(node.input[0])
        xs = _shape(x)
        if len(xs) != 4:
            raise ValueError(f"node {node.name!r} (Conv): only 2-D convolutions are supported")
        wname = node.input[1]
        w = self.get(wname)
        ws = _shape(w)
        ks = [int(v) for v in a.get("kernel_shape", ws[2:])]
        st = [int(v) for v in a.get("strides", [1, 1])]
        dil = [int(v) for v in a.get("dilations", [1, 1])]
        pads = self._pads(node, a, xs[2:], ks, st, dil)
        bname = self.opt(node, 2)
        groups = int(a.get("group", 1))
        if (self.cpu_float and groups == 1 and dil == [1, 1] and _dtype(x) == "float32" and len(ws) == 4
                and wname in self.consts and (not bname or bname in self.consts)):
            fused = self._conv_maxpool(node, x, xs, ks, st, pads, wname, bname)
            if fused is not None:
                return fused
            f, consts, oshape = float_conv2d_primfunc(
                xs, self.consts[wname], self.consts[bname] if bname else None, st, pads, **self.float_tiles)
            y = self.call_kernel(f, "conv", [x] + [self.const(c) for c in consts], oshape, "float32")
        else:
            y = self.emit(relax.op.nn.conv2d(x, w, strides=st, padding=pads, dilation=dil, groups=groups))
            if bname:
                b = self.get(bname)
                y = self.emit(relax.op.add(y, relax.op.reshape(b, [1, -1, 1, 1])))
        if self.fuse:
            # an element-wise chain after the float conv (e.g. IR-Net's stem Clip) and the PackSign of its
            # result: one chain_pack kernel in place of the chain's last node, the conv output read once
            self._plan_chain(self.cur, node.output[0], None)
        return y

    def _conv_maxpool(self, node, x, xs, ks, st, pads, wname, bname):
        """A float conv whose only consumer is a float MaxPool (the ResNet stem) → one fused kernel
        (``float_conv2d_maxpool_primfunc``): the MaxPool node is skipped and its output bound to the
        result. None where the pair does not qualify (then conv and pool are translated separately)."""
        out = node.output[0]
        cons = self.consumers.get(out, [])
        if len(cons) != 1 or out in self.graph_outputs:
            return None
        k = cons[0]
        pn = self.graph.node[k]
        if pn.op_type != "MaxPool" or (pn.domain or "") not in _ONNX_DOMAINS or pn.input[0] != out:
            return None
        if len(pn.output) > 1 and pn.output[1]:
            return None  # the Indices output: the unfused MaxPool reports it
        pa = _attrs(pn)
        pk = [int(v) for v in pa.get("kernel_shape", [])]
        pst = [int(v) for v in pa.get("strides", [1, 1])]
        pdil = [int(v) for v in pa.get("dilations", [1, 1])]
        if len(pk) != 2 or int(pa.get("ceil_mode", 0)) or pdil != [1, 1] or pk[0] < pst[0]:
            return None
        oh = (xs[2] + pads[0] + pads[2] - ks[0]) // st[0] + 1
        ow = (xs[3] + pads[1] + pads[3] - ks[1]) // st[1] + 1
        ppads = self._pads(pn, pa, [oh, ow], pk, pst, [1, 1])
        if oh < 1 or ow < 1 or max(ppads[0], ppads[2]) >= pk[0] or max(ppads[1], ppads[3]) >= pk[1]:
            return None
        w = self.consts[wname]
        ps = self._stem_pack(pn.output[0], int(w.shape[0]))
        f, consts, oshape = float_conv2d_maxpool_primfunc(
            xs, w, self.consts[bname] if bname else None, st, pads, pk, pst, ppads,
            **self.float_tiles, pack=ps is not None)
        args = [x] + [self.const(c) for c in consts]
        if ps is None:
            y = self.call_kernel(f, "conv_maxpool", args, oshape, "float32")
        else:  # also the PackSign of the pooled output (the first binary block's input bits)
            kp, th = ps
            y, bits = self.call_kernel(f, "conv_maxpool", args + [self.const(th)],
                                       [oshape, [oshape[0], oshape[2], oshape[3], oshape[1] // 32]],
                                       ["float32", "uint32"])
            self.skip.add(kp)
            self.values[self.graph.node[kp].output[0]] = bits
        self.skip.add(k)
        self.values[pn.output[0]] = y
        return y  # also bound to the conv output, whose only consumer (the pool) is skipped

    def _stem_pack(self, pooled: str, channels: int):
        """``(node index, thresholds)`` of a ``PackSign`` of value ``pooled`` (the stem's pooled output) with
        a constant threshold (or none: zeros) that the fused stem kernel can do too (channels a multiple of 32,
        the float tiles 8 channels wide), else None."""
        if channels % 32 or self.float_tiles.get("oc_tile", 8) % 8 or not self.fuse:
            return None
        for j in self.consumers.get(pooled, []):
            nd = self.graph.node[j]
            if nd.domain != BNNC_DOMAIN or nd.op_type != "PackSign" or nd.input[0] != pooled:
                continue
            tname = nd.input[1] if len(nd.input) > 1 else ""
            if tname and (tname not in self.consts or tname in self.values):
                continue
            th = np.zeros(channels, np.float32) if not tname else np.asarray(self.consts[tname], np.float32)
            if th.size != channels:
                continue
            return j, th.reshape(channels)
        return None

    def _pads(self, node, a, spatial, ks, st, dil):
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("NOTSET", ""):
            p = [int(v) for v in a.get("pads", [0] * (2 * len(ks)))]
            return p
        if auto == "VALID":
            return [0] * (2 * len(ks))
        begins, ends = [], []
        for size, k, s, d in zip(spatial, ks, st, dil):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            if auto == "SAME_UPPER":
                begins.append(small), ends.append(big)
            else:
                begins.append(big), ends.append(small)
        return begins + ends

    def op_BatchNormalization(self, node, a):
        x = self.get(node.input[0])
        eps = float(a.get("epsilon", 1e-5))
        names = node.input[1:5]
        scale, bias, mean, var = [self.cval(n, "BN parameters", node).astype(np.float32) for n in names]
        nd = len(_shape(x))
        bshape = [1, -1] + [1] * (nd - 2)
        # y = (x - mean) * (scale / sqrt(var + eps)) + bias
        mul = (scale / np.sqrt(var + np.float32(eps))).astype(np.float32)
        y = self.emit(relax.op.subtract(x, self.const(mean.reshape(bshape))))
        y = self.mul(y, self.const(mul.reshape(bshape)))
        return self.emit(relax.op.add(y, self.const(bias.reshape(bshape))))

    def _pool(self, node, a, kind):
        x = self.get(node.input[0])
        xs = _shape(x)
        if len(xs) != 4:
            raise ValueError(f"node {node.name!r} ({node.op_type}): only 2-D pooling is supported")
        ks = [int(v) for v in a["kernel_shape"]]
        st = [int(v) for v in a.get("strides", [1, 1])]
        dil = [int(v) for v in a.get("dilations", [1, 1])]
        pads = self._pads(node, a, xs[2:], ks, st, dil)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            if len(node.output) > 1 and node.output[1]:
                raise ValueError(f"node {node.name!r} (MaxPool): the Indices output is not supported")
            if self.cpu_float and not ceil and dil == [1, 1] and _dtype(x) == "float32":
                f, oshape = float_maxpool2d_primfunc(xs, ks, st, pads, vec=self.float_tiles["vec"])
                return self.call_kernel(f, "maxpool", [x], oshape, "float32")
            return self.emit(relax.op.nn.max_pool2d(x, ks, st, pads, dil, ceil_mode=ceil))
        cip = bool(a.get("count_include_pad", 0))
        if (self.cpu_float and not ceil and dil == [1, 1] and _dtype(x) == "float32"
                and max(pads[0], pads[2]) < ks[0] and max(pads[1], pads[3]) < ks[1]):
            f, oshape = float_avgpool2d_primfunc(xs, ks, st, pads, cip, vec=self.float_tiles["vec"])
            return self.call_kernel(f, "avgpool", [x], oshape, "float32")
        return self.emit(relax.op.nn.avg_pool2d(x, ks, st, pads, dil, ceil_mode=ceil, count_include_pad=cip))

    def op_MaxPool(self, node, a):
        return self._pool(node, a, "max")

    def op_AveragePool(self, node, a):
        return self._pool(node, a, "avg")

    def op_GlobalAveragePool(self, node, a):
        x = self.get(node.input[0])
        nd = len(_shape(x))
        return self.emit(relax.op.mean(x, axis=list(range(2, nd)), keepdims=True))

    def op_GlobalMaxPool(self, node, a):
        x = self.get(node.input[0])
        nd = len(_shape(x))
        return self.emit(relax.op.max(x, axis=list(range(2, nd)), keepdims=True))

    def op_Flatten(self, node, a):
        x = self.get(node.input[0])
        xs = _shape(x)
        ax = int(a.get("axis", 1))
        ax = ax + len(xs) if ax < 0 else ax
        return self.emit(relax.op.reshape(x, [int(np.prod(xs[:ax])), int(np.prod(xs[ax:]))]))

    def op_Reshape(self, node, a):
        x = self.get(node.input[0])
        xs = _shape(x)
        shape = [int(v) for v in self.cval(node.input[1], "the shape input", node).reshape(-1)]
        allowzero = int(a.get("allowzero", 0))
        total = int(np.prod(xs))
        new = [xs[i] if (v == 0 and not allowzero and i < len(xs)) else v for i, v in enumerate(shape)]
        if -1 not in new and int(np.prod(new)) != total and new and xs:
            # a batch dimension baked into the shape constant at export time
            if new[0] in (1, self.orig_batch) and xs[0] == self.batch_size:
                new[0] = self.batch_size
        if -1 in new:
            known = int(np.prod([v for v in new if v != -1]))
            if known == 0 or total % known:
                raise ValueError(f"node {node.name!r} (Reshape): cannot reshape {xs} to {shape}")
            new[new.index(-1)] = total // known
            if new[0] != xs[0] and xs[0] == self.batch_size and shape[0] in (1, self.orig_batch) \
                    and shape.count(-1) == 1 and shape[0] != -1:
                # e.g. [1, -1] exported at batch 1: keep the batch dimension, recompute the rest
                new = [xs[0]] + [v for v in shape[1:]]
                known = int(np.prod([v for v in new if v != -1]))
                new[new.index(-1)] = total // known
        if int(np.prod(new)) != total:
            raise ValueError(f"node {node.name!r} (Reshape): cannot reshape {xs} to {shape}")
        return self.emit(relax.op.reshape(x, new))

    def op_Transpose(self, node, a):
        x = self.get(node.input[0])
        perm = a.get("perm")
        return self.emit(relax.op.permute_dims(x, None if perm is None else [int(p) for p in perm]))

    def op_Squeeze(self, node, a):
        x = self.get(node.input[0])
        axes = a.get("axes")
        if self.opt(node, 1):
            axes = self.cval(node.input[1], "axes", node).reshape(-1).tolist()
        return self.emit(relax.op.squeeze(x, None if axes is None else [int(v) for v in axes]))

    def op_Unsqueeze(self, node, a):
        x = self.get(node.input[0])
        axes = a.get("axes")
        if self.opt(node, 1):
            axes = self.cval(node.input[1], "axes", node).reshape(-1).tolist()
        nd = len(_shape(x)) + len(axes)
        axes = sorted(int(v) % nd for v in axes)
        for ax in axes:
            x = self.emit(relax.op.expand_dims(x, ax))
        return x

    def op_Concat(self, node, a):
        xs = self.inputs(node)
        return self.emit(relax.op.concat(xs, axis=int(a["axis"])))

    def op_MatMul(self, node, a):
        dense = self._dense(node.input[0], node.input[1], None)
        if dense is not None:
            return dense
        x, y = self.inputs(node)[:2]
        return self.emit(relax.op.matmul(x, y))

    def _dense(self, aname, bname, bias):
        """``A @ B (+ bias)`` as a scheduled CPU kernel when A is a 2-D float32 value and B a constant
        matrix (a classifier); None when the generic path must be used."""
        if not self.cpu_float or bname not in self.consts or bname in self.values:
            return None
        A = self.get(aname)
        b = self.consts[bname]
        shp = _shape(A)
        if len(shp) != 2 or b.ndim != 2 or _dtype(A) != "float32" or b.dtype != np.float32:
            return None
        if bias is not None and (bias.dtype != np.float32 or bias.size not in (1, b.shape[1])
                                 or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1)):
            return None
        f, consts, oshape = float_dense_primfunc(shp[0], shp[1], b, None if bias is None else bias.reshape(-1),
                                                 vec=self.float_tiles["vec"])
        return self.call_kernel(f, "dense", [A] + [self.const(c) for c in consts], oshape, "float32")

    def op_Gemm(self, node, a):
        alpha = float(a.get("alpha", 1.0))
        beta = float(a.get("beta", 1.0))
        ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
        bname, cname = node.input[1], self.opt(node, 2)
        if not ta and alpha == 1.0 and bname in self.consts and bname not in self.values and \
                (not cname or (beta == 1.0 and cname in self.consts and cname not in self.values)):
            bval = self.consts[bname]
            self.consts[bname + "@kn"] = np.ascontiguousarray(bval.T if tb else bval)
            dense = self._dense(node.input[0], bname + "@kn", self.consts[cname] if cname else None)
            if dense is not None:
                return dense
        A = self.get(node.input[0])
        if ta:
            A = self.emit(relax.op.permute_dims(A, [1, 0]))
        bname = node.input[1]
        if bname in self.consts and bname not in self.values:
            bval = self.consts[bname]
            B = self.const(np.ascontiguousarray(bval.T if tb else bval))
        else:
            B = self.get(bname)
            if tb:
                B = self.emit(relax.op.permute_dims(B, [1, 0]))
        y = self.emit(relax.op.matmul(A, B))
        dt = _dtype(y)
        if alpha != 1.0:
            y = self.mul(y, relax.const(np.asarray(alpha, dt)))
        cname = self.opt(node, 2)
        if cname and beta != 0.0:
            C = self.get(cname)
            if beta != 1.0:
                C = self.mul(C, relax.const(np.asarray(beta, dt)))
            y = self.emit(relax.op.add(y, C))
        return y

    def op_ReduceMean(self, node, a):
        x = self.get(node.input[0])
        axes = a.get("axes")
        if self.opt(node, 1):
            axes = self.cval(node.input[1], "axes", node).reshape(-1).tolist()
        return self.emit(relax.op.mean(x, axis=None if axes is None else [int(v) for v in axes],
                                       keepdims=bool(a.get("keepdims", 1))))

    def op_Cast(self, node, a):
        x = self.get(node.input[0])
        dt = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(a["to"]))))
        return self.emit(relax.op.astype(x, dt))

    # element-wise and indexing ops of the float parts of BiMLP-style graphs (constant inputs fold in NumPy)
    def op_Greater(self, node, a):
        return self._binary(node, relax.op.greater, np.greater)

    def op_Less(self, node, a):
        return self._binary(node, relax.op.less, np.less)

    def op_Equal(self, node, a):
        return self._binary(node, relax.op.equal, np.equal)

    def op_Where(self, node, a):
        if self.all_const(node):
            return np.where(*[self.consts[n] for n in node.input])
        c, x, y = self.inputs(node)[:3]
        if _dtype(c) != "bool":
            c = self.emit(relax.op.astype(c, "bool"))
        return self.emit(relax.op.where(c, x, y))

    def _unary(self, node, fn, npfn):
        n = node.input[0]
        if n in self.consts and n not in self.values:
            return npfn(self.consts[n])
        return self.emit(fn(self.get(n)))

    def op_Cos(self, node, a):
        return self._unary(node, relax.op.cos, np.cos)

    def op_Sin(self, node, a):
        return self._unary(node, relax.op.sin, np.sin)

    def op_Floor(self, node, a):
        return self._unary(node, relax.op.floor, np.floor)

    def op_Round(self, node, a):
        # ONNX Round is round-half-to-even (np.round); TVM's round lowers to nearbyint (the same in the
        # default rounding mode), checked by tests/test_tvm_runtime.py on exact halves
        return self._unary(node, relax.op.round, np.round)

    def op_Gather(self, node, a):
        axis = int(a.get("axis", 0))
        if self.all_const(node):
            return np.take(self.consts[node.input[0]], self.consts[node.input[1]], axis=axis)
        x = self.get(node.input[0])
        dim = _shape(x)[axis]
        iname = node.input[1]
        if iname in self.consts and iname not in self.values:
            idx = np.asarray(self.consts[iname]).astype(np.int64)
            if idx.size and (idx.min() < -dim or idx.max() >= dim):
                raise ValueError(f"node {node.name!r} (Gather): index out of range for axis of size {dim}")
            idx = np.where(idx < 0, idx + dim, idx)
            if idx.ndim == 0:  # a scalar index removes the axis
                y = self.emit(relax.op.take(x, self.const(idx.reshape(1)), axis=axis, mode="clip"))
                return self.emit(relax.op.squeeze(y, [axis]))
            # indices checked above: "clip" is the identity here (and avoids the fast mode's warning)
            return self.emit(relax.op.take(x, self.const(idx), axis=axis, mode="clip"))
        return self.emit(relax.op.take(x, self.get(iname), axis=axis, mode="wrap"))

    def op_Expand(self, node, a):
        shape = [int(v) for v in self.cval(node.input[1], "Expand shape", node)]
        n = node.input[0]
        if n in self.consts and n not in self.values:
            c = self.consts[n]
            return np.broadcast_to(c, np.broadcast_shapes(c.shape, tuple(shape))).copy()
        x = self.get(n)
        out = list(np.broadcast_shapes(tuple(_shape(x)), tuple(shape)))
        return self.emit(relax.op.broadcast_to(x, out))

    def op_Tile(self, node, a):
        reps = [int(v) for v in self.cval(node.input[1], "Tile repeats", node)]
        n = node.input[0]
        if n in self.consts and n not in self.values:
            return np.tile(self.consts[n], reps)
        return self.emit(relax.op.tile(self.get(n), reps))


def translate(model: onnx.ModelProto, batch_size: int = 1, target=None, fuse: bool = True):
    """ONNX deploy graph → (Relax IRModule, info dict with input/output names, shapes and dtypes).

    ``target`` picks the schedules of the ai.bnnc kernels (host CPU by default, "arm", "cuda", dict).
    ``fuse`` (default on): the element-wise chain after each float-output ``BinaryConv2dPacked`` (residual
    adds, bias adds, PReLU, Clip, ...) and the ``PackSign`` of its result become one kernel that writes the
    float value (where something else reads it) and the packed bits; ``fuse=False`` translates op by op."""
    t = _Translator(model, batch_size, target_family(target), fuse=fuse)
    t.target = target  # the full target (its mcpu decides whether AMX kernels may be used)
    mod = t.run()
    info = dict(input_name=t.input_name, input_shape=list(t.input_shape), input_dtype=t.input_dtype,
                output_name=t.output_names[0], output_shape=list(t.output_shape), output_dtype=t.output_dtype,
                batch_size=int(batch_size), fused_chains=len(t.fused_chains))
    return mod, info


# --------------------------------------------------------------------------------------------------
# Compilation


def _schedule_generic(func, vec: int = 16):
    """Schedule an unscheduled (legalized, fused) PrimFunc for CPUs: inline its elementwise intermediate
    blocks; a block whose loops are all spatial becomes one flat loop, vectorized by ``vec`` lanes where
    the size allows and parallel outside; other blocks get their outer spatial loops parallel."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root") if _has_root(sch) else None
        blocks = sch.get_child_blocks(root) if root is not None else []
    except Exception:
        return func
    for blk in blocks[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:
            continue
    blocks = sch.get_child_blocks(root) if root is not None else []
    for blk in blocks:
        try:
            loops = sch.get_loops(blk)
            if not loops:
                continue
            ivs = sch.get(blk).iter_vars
            if len(ivs) != len(loops):
                continue  # not a plain legalized loop nest
            n_spatial = 0
            # leading loops bound to spatial (data-parallel) iter vars only
            for iv in ivs:
                if int(iv.iter_type) != 0:
                    break
                n_spatial += 1
            if n_spatial == 0:
                continue
            if n_spatial == len(loops):
                flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                total = _extent(sch, flat)
                if total is not None and total >= 4 * vec and total % vec == 0:
                    outer, inner = sch.split(flat, [None, vec])
                    sch.vectorize(inner)
                    sch.parallel(outer)
                else:
                    sch.parallel(flat)
                continue
            lead = loops[: min(n_spatial, 3)]
            fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
            sch.parallel(fused)
        except Exception:
            continue
    return sch.mod["main"]


def _extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _has_root(sch):
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


@tvm.transform.module_pass(opt_level=0, name="BnncScheduleGenericCPU")
def _schedule_generic_pass(mod, _ctx):
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and not (func.attrs and "bnnc.scheduled" in func.attrs):
            new = _schedule_generic(func)
            if new is not func:
                updates[gv] = new
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def _window_reduction_rule():
    """A dlight rule for reductions over a small window (pooling, ≤ 64 terms per output): one thread per
    output, the window summed in registers. dlight's GeneralReduction gives each output its own thread
    block of window-size threads (Bi-Real-18's 2×2 average pools at batch 64 on an H100: 3.4 ms)."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class WindowReduction(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
                return None
            infos = normalize_prim_func(tvm.s_tir.Schedule(func))
            if not infos or not any(b.is_reduction() for b in infos):
                return None
            for b in infos:
                terms = [it.dom for it in b.iters if it.kind == "R"]  # extents: int where constant
                if not all(isinstance(t, int) for t in terms) or math.prod(terms) > 64:
                    return None
            return dl.gpu.Fallback().apply(func, target, tunable)

    return WindowReduction()


def _relax_pipeline(target):
    if target.kind.name == "cuda":
        # legalized standard ops get dlight's default GPU schedules, pooling windows first our own rule (what it
        # schedules is marked tirx.is_scheduled, which the default rules then skip, as they skip the ai.bnnc
        # kernels scheduled in kernels.py)
        from tvm.relax.backend.cuda import pipeline as CP
        from tvm.s_tir import dlight as dl

        legalize = CP.legalize_passes(target)
        at = next(i for i, p in enumerate(legalize) if p.info.name == "ApplyDefaultSchedule")
        legalize.insert(at, dl.ApplyDefaultSchedule(_window_reduction_rule()))

        @tvm.transform.module_pass(opt_level=0, name="BnncCudaPipeline")
        def _cuda(mod, _ctx):
            with target:
                seq = tvm.transform.Sequential(CP.library_dispatch_passes(target) + legalize
                                               + CP.dataflow_lower_passes(target) + CP.finalize_passes(target))
                return seq(mod)

        return _cuda

    from tvm.relax.backend.cpu_generic import pipeline as P

    @tvm.transform.module_pass(opt_level=0, name="BnncRelaxPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                P.library_dispatch_passes(target)
                + P.legalize_passes(target)
                + [_schedule_generic_pass]
                + P.dataflow_lower_passes(target)
                + P.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def _resolve_target(target, num_threads):
    return resolve_target(target, num_threads)


def compile_model(model: onnx.ModelProto | str, target="cpu", batch_size: int = 1,
                  num_threads: int | None = None, fuse: bool = True, call_batch: int | None = None,
                  cuda_graph: bool = True) -> "TVMModel":
    """Compile a deploy-form ONNX model (ai.bnnc + standard ops) with TVM.

    ``target``: ``"cpu"`` (the host, runnable here), ``"arm"`` (AArch64 + NEON, cross-compiled: export it
    with :meth:`TVMModel.export_library` and run it on an AArch64 machine with the TVM runtime),
    ``"cuda"`` / ``"cuda:sm_90"`` (CUDA, device code compiled by nvcc; runs where a GPU is), or a TVM
    target dict / ``tvm.target.Target``.

    ``batch_size``: the batch the model is meant for. The kernels are built for ``call_batch`` images per
    call (default: ``batch_size`` on CUDA, :func:`bnnc.util.cpu_call_batch` on CPUs — a batch above 8 in
    calls of 8 for 32×32 images, of 1 at 224²); :meth:`TVMModel.run` takes any batch in calls of that size
    (the last one zero-padded).

    ``cuda_graph``: on CUDA, replay each call's kernels as one captured CUDA graph (default).
    """
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model))
    tdict = _resolve_target(target, num_threads)
    family = target_family(tdict)
    if family != "cuda":
        set_num_threads(num_threads)
    tgt = tdict if isinstance(tdict, tvm.target.Target) else tvm.target.Target(tdict)
    if call_batch is None:
        call_batch = batch_size
        if family != "cuda" and model.graph.input:
            dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
            if len(dims) > 1 and all(int(d) > 0 for d in dims[1:]):
                call_batch = cpu_call_batch(batch_size, dims)
    if int(call_batch) < 1:
        raise ValueError(f"call_batch must be >= 1, got {call_batch}")
    mod, info = translate(model, int(call_batch), target=tdict, fuse=fuse)
    info["requested_batch"] = int(batch_size)
    if family == "cuda":
        # the kernels of one call are captured once as a CUDA graph and replayed (Relax's RewriteCUDAGraph):
        # no launch per kernel (Bi-Real-18 at batch 1 runs about 60 kernels)
        with K.nvcc_env(), tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": bool(cuda_graph)}):
            ex = tvm.compile(mod, target=tgt, relax_pipeline=_relax_pipeline(tgt))
    else:
        ex = tvm.compile(mod, target=tgt, relax_pipeline=_relax_pipeline(tgt))
    info["target"] = tdict if isinstance(tdict, dict) else str(tdict)
    info["target_family"] = family
    info["num_threads"] = num_threads
    return TVMModel(ex, info)


def _meta_family(info: dict) -> str:
    """Schedule family recorded in a model's metadata (older metadata: derived from its target)."""
    fam = info.get("target_family")
    if fam:
        return str(fam)
    t = info.get("target")
    try:
        return target_family(t if isinstance(t, dict) else None)
    except ValueError:
        return "x86"


def runnable_here(family: str) -> tuple[bool, str]:
    """Whether code of this schedule family can run on this machine, and why not."""
    if family == "cuda":
        if not tvm.runtime.enabled("cuda"):
            from tvm import support as tvm_support

            if str(tvm_support.libinfo().get("USE_CUDA", "OFF")).upper() in ("OFF", "0", "FALSE", ""):
                return False, "this TVM build has no CUDA runtime (needs a CUDA-enabled TVM and a CUDA GPU)"
            return False, ("TVM's CUDA runtime cannot start here: no NVIDIA driver (libcuda) or no CUDA GPU "
                           "on this machine")
        if not tvm.cuda(0).exist:
            return False, "no CUDA GPU on this machine"
        return True, ""
    if family == "arm" and host_family() != "arm":
        return False, ("compiled for AArch64 (cross-compiled); export_library() and load it with the TVM "
                       "runtime on an AArch64 machine")
    if family == "x86" and host_family() == "arm":
        return False, "compiled for x86-64; this machine is AArch64"
    return True, ""


class TVMModel:
    """A compiled network: ``run(x) -> y`` for any batch, ``export_library``/``load`` for deployment."""

    def __init__(self, executable, info: dict, device=None):
        self.executable = executable
        self.info = dict(info)
        self.family = _meta_family(self.info)
        self.runnable, self._why_not = runnable_here(self.family)
        if device is None:
            device = tvm.cuda(0) if self.family == "cuda" and self.runnable else tvm.cpu()
        self.dev = device
        self.vm = None
        self._main = None
        self._inputs: dict = {}
        if self.runnable:
            self.vm = relax.VirtualMachine(executable, self.dev)
            self._main = self.vm["main"]

    # -- metadata --------------------------------------------------------------------------------
    @property
    def input_name(self) -> str:
        return self.info["input_name"]

    @property
    def input_shape(self) -> tuple:
        return tuple(self.info["input_shape"])

    @property
    def output_name(self) -> str:
        return self.info["output_name"]

    @property
    def batch_size(self) -> int:
        return int(self.info["batch_size"])

    def meta(self) -> dict:
        """JSON-serializable metadata needed (with the .so) by :meth:`load`."""
        return json.loads(json.dumps(self.info))

    # -- execution -------------------------------------------------------------------------------
    def _run_batch(self, x: np.ndarray) -> np.ndarray:
        if self._main is None:
            raise RuntimeError(f"this model cannot run here: {self._why_not}")
        # the input goes into a tensor kept between calls (one per shape and dtype): a new one per call costs
        # an allocation and fresh pages (Bi-Real-18 at 224², batch 1: 0.04 of 4.4 ms). On the CPU it is filled
        # and the output read through NumPy views of the tensors (DLPack): Tensor.copyfrom / .numpy() cost
        # 0.02 / 0.02–0.06 ms more per call there (Bi-Real-18, measured after a call of the model)
        cpu = self.dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        key = (x.shape, str(x.dtype))
        slot = self._inputs.get(key)
        if slot is None:
            xt = tvm.runtime.empty(x.shape, str(x.dtype), self.dev)
            slot = self._inputs[key] = (xt, np.from_dlpack(xt) if cpu else None)
        xt, view = slot
        if view is not None:
            np.copyto(view, x)
        else:
            xt.copyfrom(x)
        out = self._main(xt)
        if isinstance(out, (tuple, list)) or hasattr(out, "__getitem__") and not hasattr(out, "numpy"):
            out = out[0]
        return np.from_dlpack(out).copy() if cpu else out.numpy()

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=self.info.get("input_dtype", "float32"))
        shape = self.input_shape
        if x.ndim == len(shape) - 1:
            x = x[None]
        if tuple(x.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"input shape {x.shape} does not match the compiled shape (N,{','.join(map(str, shape[1:]))})")
        b = self.batch_size
        n = x.shape[0]
        outs = []
        for s in range(0, n, b):
            chunk = x[s : s + b]
            m = chunk.shape[0]
            if m < b:
                pad = np.zeros((b - m,) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad], axis=0)
            outs.append(self._run_batch(np.ascontiguousarray(chunk))[:m])
        if not outs:
            return np.zeros((0,) + tuple(self.info["output_shape"][1:]), self.info.get("output_dtype", "float32"))
        return np.concatenate(outs, axis=0)

    __call__ = run

    # -- deployment ------------------------------------------------------------------------------
    def export_library(self, path: str, cc: str | None = None) -> str:
        """Write a shared library. AArch64 models are linked with the cross compiler ``cc``
        (default ``aarch64-linux-gnu-gcc`` when this host is not AArch64); CUDA models embed the
        compiled device code (fatbin) next to the host code."""
        path = str(path)
        kwargs = {}
        if cc is None and self.family == "arm" and host_family() != "arm":
            from .cross import AARCH64_CC

            cc = AARCH64_CC
        if cc is not None:
            from tvm.support import cc as _cc

            kwargs["fcompile"] = _cc.cross_compiler(cc)
        with _quiet_scope_logs():
            self.executable.export_library(path, **kwargs)
        return path

    @classmethod
    def load(cls, path: str, meta: dict, num_threads: int | None = None) -> "TVMModel":
        ok, why = runnable_here(_meta_family(meta))
        if not ok:
            raise RuntimeError(f"cannot load {path} here: {why}")
        set_num_threads(num_threads or meta.get("num_threads"))
        from .amx import check_can_run

        check_can_run(meta.get("target"), path)  # asks Linux for the AMX tile state before any kernel runs
        with _quiet_scope_logs():
            lib = tvm.runtime.load_module(str(path))
        return cls(lib, meta)
