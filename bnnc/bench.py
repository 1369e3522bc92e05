"""Benchmarks: bnnc's bit-packed TVM kernels vs ONNX Runtime FP32 and OpenVINO's BinaryConvolution.

Two entry points:

* :func:`run_layer_bench` — one 3×3 binary convolution layer per shape (default: the four 3×3 shapes of
  ResNet-18, batch 1, stride 1, pad 1). Contenders, all fed the same float32 NCHW input:

  - **bnnc** — ``PackSign`` of the float input, then ``BinaryConv2dPacked`` with its epilogue (``bits``:
    integer threshold, packed output; ``float``: per-channel scale and bias, float32 NCHW output). Timed
    two ways: as the sum of the separately compiled kernels (TVM ``time_evaluator``, no Python in the
    loop), and as one Relax module of the chain (a two-node deploy-form ONNX graph compiled by
    :func:`bnnc.runtimes.tvm.compile_model`, timed with the VM's ``time_evaluator``). The float-output
    chain is the headline number ("bnnc ms"): it produces what ORT and OpenVINO produce.
  - **ORT FP32** — a one-node ONNX ``Conv`` of the same shape (±1 weights, no bias) on ONNX Runtime's CPU
    provider, ``intra_op_num_threads=threads``.
  - **OpenVINO** — opset1 ``BinaryConvolution`` (``mode="xnor-popcount"``, ``pad_value=0``: padded taps
    contribute 0, the bnnc semantics) fed by a 2-level ``FakeQuantize`` (the input binarization OpenVINO's
    CPU plugin packs) and followed by the float epilogue (per-channel Multiply + Add, fused as post-ops),
    ``INFERENCE_NUM_THREADS=threads``. Only the float output can be timed (see :func:`_ov_binconv`).
    Without the ``openvino`` package the row says why and carries no number.

  The contenders of one shape are measured interleaved (round-robin blocks, median over rounds), so their
  ratios come from the same machine state. Every contender's output is checked against the NumPy
  reference (:mod:`bnnc.ops.deploy`) before timing.

* :func:`run_model_bench` — a whole model: ``bnnc.compile(path, runtime="tvm")`` vs the export form on
  ONNX Runtime (``runtime="reference"``), batch 1, median latency of ``CompiledModel.run``.

Throughput is reported in GBOPs/s with 1 BOP = one binary multiply-accumulate (one bit of
``popcount(a XOR w)`` accumulated): a layer has Cin·KH·KW·Cout·OH·OW BOPs. The popcount bound
(:func:`popcount_bound`) is the core's xor+popcount+add rate in bit-MACs per cycle.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LayerShape",
    "RESNET18_3X3",
    "run_layer_bench",
    "format_layer_table",
    "run_model_bench",
    "format_model_result",
    "popcount_bound",
    "cpu_frequency",
    "make_layer_case",
    "bnnc_layer_kernels",
]


@dataclass(frozen=True)
class LayerShape:
    """A square-kernel 2-D convolution at batch 1: input H×W×Cin → Cout."""

    h: int
    w: int
    cin: int
    cout: int
    k: int = 3
    stride: int = 1
    pad: int = 1

    @property
    def label(self) -> str:
        sp = f"{self.h}²" if self.h == self.w else f"{self.h}×{self.w}"
        extra = "" if (self.k, self.stride, self.pad) == (3, 1, 1) else f" k{self.k}s{self.stride}p{self.pad}"
        return f"{sp}×{self.cin}→{self.cout}{extra}"

    @property
    def out_hw(self) -> tuple[int, int]:
        f = lambda s: (s + 2 * self.pad - self.k) // self.stride + 1  # noqa: E731
        return f(self.h), f(self.w)

    @property
    def bops(self) -> int:
        """Binary MACs of the layer: Cin·K·K·Cout·OH·OW (padded taps included, as the kernel counts them)."""
        oh, ow = self.out_hw
        return self.cin * self.k * self.k * self.cout * oh * ow


RESNET18_3X3 = (
    LayerShape(56, 56, 64, 64),
    LayerShape(28, 28, 128, 128),
    LayerShape(14, 14, 256, 256),
    LayerShape(7, 7, 512, 512),
)


# --------------------------------------------------------------------------------------------------
# Test case of one layer (float input, weights, the deploy-form constants)


def make_layer_case(shape: LayerShape, seed: int = 0) -> dict:
    """Random input and weights plus everything the deploy form needs (packed weights, border tables,
    both epilogues), and the NumPy reference outputs."""
    from bnnc.ops.deploy import binary_conv2d_packed, pack_sign
    from bnnc.passes.arith import border_tables, pack_conv_weights

    rng = np.random.default_rng(seed)
    s = shape
    x = rng.standard_normal((1, s.cin, s.h, s.w)).astype(np.float32)
    w = rng.standard_normal((s.cout, s.cin, s.k, s.k)).astype(np.float32)
    strides, pads, dil = (s.stride, s.stride), (s.pad, s.pad, s.pad, s.pad), (1, 1)
    e, rc, cc = border_tables(w, (s.h, s.w), strides, pads, dil)
    kmax = s.cin * s.k * s.k
    direction = rng.choice(np.array([1, 1, 1, -1], np.int32), s.cout).astype(np.int32)
    thr = rng.integers(-kmax // 8, kmax // 8 + 1, s.cout).astype(np.int32)
    scale = (rng.random(s.cout).astype(np.float32) * 0.1 + 0.01).astype(np.float32)
    bias = rng.standard_normal(s.cout).astype(np.float32)
    case = dict(shape=s, x=x, w=w, wsign=np.where(w >= 0, 1.0, -1.0).astype(np.float32),
                wp=pack_conv_weights(w), e=e, rc=rc.astype(np.int32), cc=cc.astype(np.int32),
                direction=direction, thr=thr, scale=scale, bias=bias,
                attrs=dict(in_channels=s.cin, out_channels=s.cout, kernel_shape=(s.k, s.k), strides=strides,
                           pads=pads, dilations=dil))
    xp = pack_sign(x)
    case["ref_packed_x"] = xp
    case["ref_bits"] = binary_conv2d_packed(xp, case["wp"], e, rc, cc, direction, thr, output="bits",
                                            **case["attrs"])
    case["ref_float"] = binary_conv2d_packed(xp, case["wp"], e, rc, cc, scale, bias, output="float",
                                             **case["attrs"])
    # Σ_V s_w·s_a itself (P0 = 1, P1 = 0): what OpenVINO's BinaryConvolution outputs
    case["ref_dot"] = binary_conv2d_packed(xp, case["wp"], e, rc, cc, np.ones(s.cout, np.float32),
                                           np.zeros(s.cout, np.float32), output="float", **case["attrs"])
    return case


# --------------------------------------------------------------------------------------------------
# Timers. A timer is ``f(number) -> seconds per call`` over ``number`` back-to-back calls.


def _tvm_timer(module, fname, dev, args):
    cache = {}

    def t(number: int) -> float:
        if number not in cache:
            cache[number] = module.time_evaluator(fname, dev, number=number, repeat=1)
        return float(cache[number](*args).mean)

    return t


def _py_timer(call, setup=None):
    """A timer of ``call()`` in a Python loop; ``setup`` (untimed) runs first in each block. Python's garbage
    collector is off while the loop runs, as in ``timeit``, so a collection of the heap (large in a process that
    imported torch) cannot land in one contender's block."""

    def t(number: int) -> float:
        if setup is not None:
            setup()
        was_on = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(number):
                call()
            return (time.perf_counter() - t0) / number
        finally:
            if was_on:
                gc.enable()

    return t


def _sum_timer(*timers):
    """Sequential kernels timed separately: the sum of their per-call times."""

    def t(number: int) -> float:
        return sum(f(number) for f in timers)

    return t


def _interleaved(timers: dict, repeat: int, block_s: float, samples: bool = False) -> dict:
    """Median seconds per call of each timer, measured round-robin: each of ``repeat`` rounds runs one
    block (about ``block_s`` seconds) of every timer, the order rotating between rounds. With ``samples``
    the per-round values themselves (seconds per call, one per round), for percentiles."""
    numbers = {}
    for name, f in timers.items():
        f(1)  # warm-up (first call allocates, JITs, spins up thread pools)
        one = max(f(3), 1e-7)
        numbers[name] = max(1, min(100000, int(block_s / one)))
    per_round = {name: [] for name in timers}
    names = list(timers)
    for r in range(max(1, repeat)):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            per_round[name].append(timers[name](numbers[name]))
    if samples:
        return per_round
    return {name: statistics.median(v) for name, v in per_round.items()}


def percentile(values, q: float) -> float:
    """The q-th percentile (0–100, linear interpolation) of per-round times."""
    return float(np.percentile(np.asarray(values, np.float64), q))


# --------------------------------------------------------------------------------------------------
# Contenders


def bnnc_layer_kernels(case: dict, target=None) -> dict:
    """The TVM kernels the bench times, compiled for the host: ``{"pack", "conv_bits", "conv_float"}``,
    each a :class:`bnnc.runtimes.tvm.kernels.Kernel` (callable on NumPy arrays; ``.lib`` is the compiled
    executable) plus ``args`` (the constant inputs of each conv, in call order after X) and ``layout`` /
    ``layout_float`` (the conv kernel the compiled graph selects for each output: ``"amx"``, an AVX-512
    popcount engine ``"pop_channels"``, ``"blocked"`` or ``"OHWC"``)."""
    from bnnc.runtimes.tvm import kernels as K

    s = case["shape"]
    attrs = dict(case["attrs"])
    cin = attrs.pop("in_channels")
    xshape = [1, s.cin, s.h, s.w]
    pshape = [1, s.h, s.w, K.num_words(s.cin)]
    out = {"pack": K.build_kernel(K.pack_sign_primfunc(xshape, False, target=target), target)}
    # the kernel and weight layout the compiled graph uses (runtimes/tvm/graph.py: AMX tiles on an AMX CPU, an
    # AVX-512 popcount engine, or blocked once at compile time for small output planes), and its E form
    base = K.conv_weight_layout(pshape, case["wp"].shape, target=target, amx=True, **attrs)
    geo = {k: attrs[k] for k in ("strides", "pads", "dilations")}
    tgt = target if target is not None else "cpu"
    args = {}
    for mode in ("bits", "float"):
        layout = K.conv_kernel_layout(base, pshape, case["wp"].shape, use=mode, target=tgt, in_channels=cin, **geo)
        tail = [case["direction"], case["thr"]] if mode == "bits" else [case["scale"], case["bias"]]
        w, e, table = K.conv_kernel_args(layout, mode, case["wp"], case["e"], *tail)
        f = K.binary_conv2d_packed_primfunc(pshape, case["wp"].shape, case["e"].shape, output=mode, target=target,
                                            weight_layout=layout, e_table=table, **attrs)
        out[f"conv_{mode}"] = K.build_kernel(f, target)
        args[mode] = [w, e, case["rc"], case["cc"], *tail]
        out["layout" if mode == "bits" else "layout_float"] = layout
    out["args"] = args
    return out


def _deploy_chain_model(case: dict, mode: str):
    """PackSign → BinaryConv2dPacked(mode): a two-node deploy-form ONNX graph."""
    from onnx import TensorProto, helper, numpy_helper

    s = case["shape"]
    a = case["attrs"]
    p0, p1 = (case["direction"], case["thr"]) if mode == "bits" else (case["scale"], case["bias"])
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), n) for n, v in
             (("W", case["wp"]), ("E", case["e"]), ("RowClass", case["rc"]), ("ColClass", case["cc"]),
              ("P0", p0), ("P1", p1))]
    nodes = [
        helper.make_node("PackSign", ["x"], ["xp"], domain="ai.bnnc", name="pack"),
        helper.make_node("BinaryConv2dPacked", ["xp", "W", "E", "RowClass", "ColClass", "P0", "P1"], ["y"],
                         domain="ai.bnnc", name="conv", in_channels=s.cin, out_channels=s.cout,
                         kernel_shape=list(a["kernel_shape"]), strides=list(a["strides"]), pads=list(a["pads"]),
                         dilations=list(a["dilations"]), output=mode, source="bench"),
    ]
    oh, ow = s.out_hw
    if mode == "bits":
        yinfo = helper.make_tensor_value_info("y", TensorProto.UINT32, [1, oh, ow, (s.cout + 31) // 32])
    else:
        yinfo = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s.cout, oh, ow])
    g = helper.make_graph(nodes, "bench_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                [1, s.cin, s.h, s.w])],
                          [yinfo], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.bnnc", 1)],
                             producer_name="bnnc.bench")


def _bnnc_chain(case: dict, mode: str, threads: int):
    import tvm

    from bnnc.runtimes.tvm import compile_model

    tm = compile_model(_deploy_chain_model(case, mode), target="cpu", batch_size=1, num_threads=threads)
    x = tvm.runtime.tensor(case["x"], tm.dev)
    return tm, _tvm_timer(tm.vm, "main", tm.dev, [x])


def _ort_bound_timer(sess, x, like):
    """A timer of ``sess`` run through IOBinding on OrtValues bound once (input ``x``, an output buffer
    shaped as ``like``): ORT's own time without the per-call numpy conversion and output allocation of
    ``InferenceSession.run`` (10–20 µs per call), as TVM's ``time_evaluator`` times the compiled function
    alone. Returns the objects to keep alive (the output OrtValue last) and the timer."""
    import onnxruntime as ort

    io = sess.io_binding()
    xv = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x))
    yv = ort.OrtValue.ortvalue_from_numpy(np.empty_like(like))
    io.bind_ortvalue_input(sess.get_inputs()[0].name, xv)
    io.bind_ortvalue_output(sess.get_outputs()[0].name, yv)
    sess.run_with_iobinding(io)
    return [io, xv, yv], _py_timer(lambda: sess.run_with_iobinding(io))


def _ort_lib_chain(case: dict, mode: str, threads: int, lib: str | None = None, isa: str = "auto"):
    """``PackSign → BinaryConv2dPacked(output=mode)`` on ONNX Runtime with the bnnc custom-op library (``lib``,
    default: :func:`bnnc.runtimes.ort.library_path`; kernels ``isa``, forced through ``BNNC_ORT_ISA``),
    checked bit for bit against ``bnnc.ops.deploy`` (also through IOBinding). Returns (objects to keep alive,
    timer)."""
    from bnnc.runtimes.ort import library_path

    model = _deploy_chain_model(case, mode)
    model.ir_version = min(model.ir_version, 10)  # onnx writes a newer IR than ORT reads; nothing IR-11+ is used
    old = os.environ.get("BNNC_ORT_ISA")
    os.environ["BNNC_ORT_ISA"] = isa
    try:
        sess = _ort_session(model.SerializeToString(), threads, library=lib or library_path())
    finally:
        if old is None:
            os.environ.pop("BNNC_ORT_ISA", None)
        else:
            os.environ["BNNC_ORT_ISA"] = old
    want = case["ref_bits" if mode == "bits" else "ref_float"]
    got = sess.run(None, {"x": case["x"]})[0]
    if got.shape != want.shape or not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
        raise AssertionError(f"ORT library ({isa}) {mode}: output differs from bnnc.ops.deploy")
    keep, timer = _ort_bound_timer(sess, case["x"], got)
    if not np.array_equal(keep[-1].numpy().view(np.uint32), want.view(np.uint32)):
        raise AssertionError(f"ORT library ({isa}) {mode}: output through IOBinding differs from bnnc.ops.deploy")
    return (sess, keep), timer


def ort_lib_status() -> tuple[bool, str]:
    """(available, the ISA its kernels run here, or why the ORT custom-op library is not available)."""
    try:
        import importlib

        importlib.import_module("onnxruntime")
        from bnnc.runtimes.ort import library_path, resolve_isa

        lib = library_path(build=False)
        return True, resolve_isa("auto", lib)
    except Exception as e:  # noqa: BLE001 - report the reason verbatim
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _ort_conv(case: dict, threads: int):
    from onnx import TensorProto, helper, numpy_helper

    s = case["shape"]
    oh, ow = s.out_hw
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[s.k, s.k], strides=[s.stride] * 2,
                            pads=[s.pad] * 4)
    g = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1, s.cin, s.h, s.w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s.cout, oh, ow])],
                          [numpy_helper.from_array(case["wsign"], "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = _ort_session(m.SerializeToString(), threads)
    keep, timer = _ort_bound_timer(sess, case["x"], sess.run(None, {"x": case["x"]})[0])
    return (sess, keep), timer


def openvino_status() -> tuple[bool, str]:
    """(available, version or the reason it is not)."""
    try:
        import openvino as ov
    except Exception as e:  # noqa: BLE001 - report any import failure verbatim
        return False, f"openvino not installed ({type(e).__name__}: {e}); pip install 'bnnc[peers]'"
    return True, str(ov.__version__)


def _ov_u1_weights(wsign_bits: np.ndarray):
    """u1 weight constant for OpenVINO's CPU plugin. ``ov.op.Constant`` packs a list of 0/1 values
    MSB-first within each byte, while the CPU plugin's binary convolution reads the bits LSB-first, so
    each group of 8 is reversed (checked against the NumPy reference in :func:`_ov_binconv`)."""
    import openvino as ov

    flat = wsign_bits.astype(np.uint8).reshape(-1)
    pad = (-flat.size) % 8
    grouped = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, 8)[:, ::-1].reshape(-1)[: flat.size]
    return ov.op.Constant(ov.Type.u1, ov.Shape(list(wsign_bits.shape)), grouped.tolist())


def _ov_binconv(case: dict, threads: int):
    """OpenVINO: FakeQuantize(levels=2) → BinaryConvolution → per-channel Multiply + Add (float output).

    Only the float epilogue is measured: with a binarizing FakeQuantize after the convolution (the bits
    epilogue, fused by the CPU plugin into a u1 output), OpenVINO 2026.4's CPU plugin segfaults unless
    the bits feed another BinaryConvolution, so a standalone bits-output layer cannot be timed."""
    import openvino as ov
    import openvino.opset1 as o1

    s = case["shape"]
    c1 = lambda v: o1.constant(np.asarray(v, np.float32).reshape(1, -1, 1, 1))  # noqa: E731
    p = o1.parameter([1, s.cin, s.h, s.w], np.float32, name="x")
    zero, one = c1(np.zeros(s.cin)), c1(np.ones(s.cin))
    xb = o1.fake_quantize(p, zero, zero, zero, one, 2)  # bit = x > 0 (x ≥ 0 on data without exact zeros)
    y = o1.binary_convolution(xb, _ov_u1_weights(case["w"] >= 0), [s.stride] * 2, [s.pad] * 2, [s.pad] * 2,
                              [1, 1], "xnor-popcount", 0.0)
    y = o1.add(o1.multiply(y, c1(case["scale"])), c1(case["bias"]))
    model = ov.Model([y], [p], "bench_binconv")
    core = ov.Core()
    cm = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1,
                                           "PERFORMANCE_HINT": "LATENCY"})
    req = cm.create_infer_request()
    req.set_input_tensor(ov.Tensor(case["x"]))
    return _OVRunner(core, cm, req), _py_timer(req.infer)


class _OVRunner:
    """Keeps the Core and CompiledModel alive as long as their InferRequest (else it crashes)."""

    def __init__(self, core, cm, req):
        self.core, self.cm, self.req = core, cm, req

    def infer(self):
        return self.req.infer()

    def get_output_tensor(self):
        return self.req.get_output_tensor()


def _float_conv_ref(case):
    import torch

    s = case["shape"]
    y = torch.nn.functional.conv2d(torch.from_numpy(case["x"]).double(), torch.from_numpy(case["wsign"]).double(),
                                   stride=s.stride, padding=s.pad)
    return y.numpy().astype(np.float32)


def _check(name, got, want, exact=True):
    got, want = np.asarray(got), np.asarray(want)
    ok = got.shape == want.shape and (np.array_equal(got, want) if exact else
                                      np.allclose(got, want, rtol=1e-4, atol=1e-3))
    if not ok:
        bad = "shape " + str(got.shape) if got.shape != want.shape else f"{np.mean(got != want):.2%} differ"
        raise AssertionError(f"bench contender {name} does not match the NumPy reference ({bad})")


# --------------------------------------------------------------------------------------------------
# Popcount bound


_FREQ_C = r"""
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(void){
  double best=0; long n=20000000;
  for(int r=0;r<5;r++){
    double t0=now();
    for(long i=0;i<n;i++){
      __asm__ volatile(
        "imul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\t"
        "imul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\t"
        "imul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\t"
        "imul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\t"
        "imul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\timul %%rax,%%rax\n\t" ::: "rax");
    }
    double f=60.0*n/(now()-t0); if(f>best) best=f;
  }
  printf("%.6e\n",best); return 0;
}
"""

# xor + popcount + add on 512-bit vectors, 8 independent accumulators, operands loaded from L1
# (the shape of the inner loop of the conv kernel: a broadcast input word against weight vectors).
_PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(void){
  static unsigned w[64*16] __attribute__((aligned(64))); static unsigned x[64];
  for(int i=0;i<64*16;i++) w[i]=i*2654435761u; for(int i=0;i<64;i++) x[i]=i*40503u+7;
  __m512i a0=_mm512_setzero_si512(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0;
  double best=0; long n=2000000;
  for(int r=0;r<5;r++){
    double t0=now();
    for(long i=0;i<n;i++){
      for(int j=0;j<64;j+=8){
        __m512i v=_mm512_set1_epi32(x[j>>3]); const unsigned*p=w+(j*16);
#define S(k,a) a=_mm512_add_epi32(a,_mm512_popcnt_epi32(_mm512_xor_si512(v,_mm512_load_si512((const void*)(p+16*k)))));
        S(0,a0) S(1,a1) S(2,a2) S(3,a3) S(4,a4) S(5,a5) S(6,a6) S(7,a7)
      }
      __asm__ volatile("" : "+v"(a0),"+v"(a1),"+v"(a2),"+v"(a3),"+v"(a4),"+v"(a5),"+v"(a6),"+v"(a7));
    }
    double dt=now()-t0, b=(double)n*64*512/dt; if(b>best) best=b;
  }
  __m512i s=_mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0,a1),_mm512_add_epi32(a2,a3)),
                             _mm512_add_epi32(_mm512_add_epi32(a4,a5),_mm512_add_epi32(a6,a7)));
  printf("%.6e %d\n",best,_mm512_reduce_add_epi32(s)&1); return 0;
}
"""


def _run_c(src: str, flags=()) -> str | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        c, exe = os.path.join(d, "m.c"), os.path.join(d, "m")
        with open(c, "w") as f:
            f.write(src)
        try:
            r = subprocess.run([cc, "-O2", *flags, c, "-o", exe], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                return None
            r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None


def cpu_frequency() -> tuple[float | None, str]:
    """(Hz, how it was obtained): measured with a chain of dependent ``imul r64`` (3-cycle latency on
    every x86-64 core of the last decade; a chain of ``add reg, imm`` is not usable: Golden Cove and later
    fold immediate adds at rename) (x86-64, needs a C compiler), else the ``cpu MHz`` of /proc/cpuinfo, else None."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        out = _run_c(_FREQ_C)
        if out:
            try:
                return float(out.split()[0]), "measured (chain of dependent imul, 3 cycles each)"
            except ValueError:
                pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":")[1]) * 1e6, "/proc/cpuinfo 'cpu MHz'"
    except OSError:
        pass
    return None, "unknown (no C compiler and no 'cpu MHz' in /proc/cpuinfo)"


def popcount_bound(measure_peak: bool = True) -> dict:
    """The core's xor+popcount+add rate in bit-MACs per cycle.

    ``theory``: from the documented execution ports. With AVX-512 VPOPCNTDQ (Ice Lake and later,
    Zen 4): per 512-bit vector the three ops (vpxord, vpopcntd, vpaddd) are 3 vector-ALU µops on the two
    512-bit ports (p0, p5; vpopcnt on p5 only), so 2/3 vector per cycle = 341.3 bit-MACs/cycle.
    Without it: scalar 64-bit ``popcnt`` (1/cycle) → 64 bit-MACs/cycle. ``measured``: the same
    xor+popcnt+add loop in C with AVX-512 intrinsics (operands loaded from L1), when a C compiler is
    present; bit-MACs/s divided by the measured frequency.
    """
    from bnnc.runtimes.tvm.target import cpu_info

    flags, vendor = cpu_info()
    hz, src = cpu_frequency()
    if "avx512_vpopcntdq" in flags:
        isa, theory = "AVX-512 VPOPCNTDQ (xor, vpopcntd, vpaddd on ports 0/5)", 512 * 2 / 3
    elif "popcnt" in flags:
        isa, theory = "scalar POPCNT r64 (1/cycle)", 64.0
    else:
        isa, theory = "unknown ISA", None
    res = dict(freq_hz=hz, freq_source=src, isa=isa, theory_bitmacs_per_cycle=theory,
               measured_bitmacs_per_s=None, measured_bitmacs_per_cycle=None)
    if measure_peak and "avx512_vpopcntdq" in flags:
        out = _run_c(_PEAK_C, ["-mavx512f", "-mavx512vpopcntdq"])
        if out:
            rate = float(out.split()[0])
            res["measured_bitmacs_per_s"] = rate
            res["measured_bitmacs_per_cycle"] = rate / hz if hz else None
    return res


# --------------------------------------------------------------------------------------------------
# Layer bench


def run_layer_bench(shapes=RESNET18_3X3, threads: int = 1, repeat: int = 15, include_openvino: bool = True,
                    block_s: float = 0.02, bound: dict | None = None, chain: bool = True,
                    verbose: bool = False, include_ort_lib: bool = True) -> list[dict]:
    """Time one binary conv layer per shape on every contender; returns one dict per shape.

    Keys (times in ms, medians of ``repeat`` interleaved rounds of ~``block_s`` s each):
    ``shape`` (label), ``threads``, ``bops``;
    ``bnnc_ms`` — the headline: PackSign + BinaryConv2dPacked with the float epilogue as one Relax module
    (float32 NCHW out, the same output as ORT and OpenVINO; the kernel sum when ``chain=False``);
    ``bnnc_chain_float_ms``, ``bnnc_chain_bits_ms`` (one Relax module each); ``bnnc_sum_float_ms``,
    ``bnnc_sum_bits_ms`` (pack + conv timed separately); ``pack_ms``, ``conv_float_ms``, ``conv_bits_ms``;
    ``ort_fp32_ms``; ``openvino_ms`` (float output) and ``openvino_note`` (version, or why there is no
    number); ``ort_lib_ms`` / ``ort_lib_bits_ms``: the same two-node graph (float / bits out) on ONNX Runtime
    with the bnnc custom-op library, ``ort_lib_speedup_vs_ort`` (ORT FP32 ms / ort_lib_ms),
    ``ort_lib_vs_bnnc`` (ort_lib_ms / bnnc_ms: the library's time in units of the TVM backend's) and
    ``ort_lib_note`` (the ISA its kernels run, or why there is no number; ``include_ort_lib=False``: not
    requested); every ONNX Runtime contender is timed through IOBinding on buffers bound once;
    ``speedup_vs_ort`` (ORT ms / bnnc ms), ``ratio_vs_openvino`` (OpenVINO ms / bnnc ms: > 1 means bnnc is
    faster); ``gbops`` (BOPs / bnnc_ms, in 1e9/s); ``bitmacs_per_cycle`` (the bits conv
    kernel alone, per thread) and ``frac_of_bound`` (of the theoretical popcount bound) when the clock
    is known; ``bnnc_p90_ms``, ``ort_fp32_p90_ms``, ``openvino_p90_ms``: the 90th percentile over rounds.
    """
    import tvm

    from bnnc.runtimes.tvm import set_num_threads

    threads = int(threads)
    set_num_threads(threads)
    ov_ok, ov_note = openvino_status() if include_openvino else (False, "not requested")
    lib_ok, lib_note = ort_lib_status() if include_ort_lib else (False, "not requested")
    if bound is None:
        bound = popcount_bound(measure_peak=False)
    rows = []
    dev = tvm.cpu()
    for shape in shapes:
        case = make_layer_case(shape)
        kern = bnnc_layer_kernels(case)
        # correctness of what is timed
        xp = kern["pack"](case["x"])
        _check("PackSign", xp, case["ref_packed_x"])
        _check("BinaryConv2dPacked(bits)", kern["conv_bits"](xp, *kern["args"]["bits"]), case["ref_bits"])
        _check("BinaryConv2dPacked(float)", kern["conv_float"](xp, *kern["args"]["float"]), case["ref_float"])

        def targs(mode, out_key):
            k = kern[out_key]
            out = tvm.runtime.tensor(np.empty(k.out_shape, k.out_dtype), dev)
            return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in kern["args"][mode]] + [out]

        x_t = tvm.runtime.tensor(case["x"], dev)
        xp_t = tvm.runtime.tensor(xp, dev)
        pack_t = _tvm_timer(kern["pack"].lib.jit() if hasattr(kern["pack"].lib, "jit") else kern["pack"].lib,
                            "main", dev, [x_t, tvm.runtime.tensor(np.empty_like(xp), dev)])

        def jit(k):
            return k.lib.jit() if hasattr(k.lib, "jit") else k.lib

        conv_bits_t = _tvm_timer(jit(kern["conv_bits"]), "main", dev, [xp_t] + targs("bits", "conv_bits"))
        conv_float_t = _tvm_timer(jit(kern["conv_float"]), "main", dev, [xp_t] + targs("float", "conv_float"))
        timers = {"pack": pack_t, "conv_bits": conv_bits_t, "conv_float": conv_float_t}
        if chain:
            for mode in ("bits", "float"):
                tm, t = _bnnc_chain(case, mode, threads)
                _check(f"bnnc chain ({mode})", tm.run(case["x"]), case[f"ref_{mode}"])
                timers[f"chain_{mode}"] = t
        (sess, keep_fp32), ort_t = _ort_conv(case, threads)
        _check("ORT Conv", sess.run(None, {"x": case["x"]})[0], _float_conv_ref(case), exact=False)
        timers["ort"] = ort_t
        keep_lib = []
        if lib_ok:
            for mode in ("float", "bits"):  # checked bit for bit inside
                kept, timers[f"ortlib_{mode}"] = _ort_lib_chain(case, mode, threads)
                keep_lib.append(kept)
        note = ov_note
        if ov_ok:
            try:
                req, t = _ov_binconv(case, threads)
                req.infer()
                _check("OpenVINO BinaryConvolution", req.get_output_tensor().data.copy(), case["ref_float"],
                       exact=False)
                timers["ov"] = t
                note = f"openvino {ov_note}"
            except Exception as e:  # noqa: BLE001 - the column says why
                note = f"OpenVINO failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                timers.pop("ov", None)
        rounds = _interleaved(timers, repeat, block_s, samples=True)
        ms = {k: statistics.median(v) * 1e3 for k, v in rounds.items()}
        p90 = {k: percentile(v, 90) * 1e3 for k, v in rounds.items()}
        row = dict(shape=shape.label, threads=threads, bops=shape.bops,
                   pack_ms=ms["pack"], conv_bits_ms=ms["conv_bits"], conv_float_ms=ms["conv_float"],
                   bnnc_sum_bits_ms=ms["pack"] + ms["conv_bits"], bnnc_sum_float_ms=ms["pack"] + ms["conv_float"],
                   bnnc_chain_bits_ms=ms.get("chain_bits"), bnnc_chain_float_ms=ms.get("chain_float"),
                   ort_fp32_ms=ms["ort"], openvino_ms=ms.get("ov"),
                   openvino_note=note)
        row["bnnc_ms"] = row["bnnc_chain_float_ms"] if chain else row["bnnc_sum_float_ms"]
        row["bnnc_p90_ms"] = p90["chain_float"] if chain else p90["pack"] + p90["conv_float"]
        row["ort_fp32_p90_ms"] = p90["ort"]
        row["openvino_p90_ms"] = p90.get("ov")
        row["speedup_vs_ort"] = row["ort_fp32_ms"] / row["bnnc_ms"]
        row["ratio_vs_openvino"] = row["openvino_ms"] / row["bnnc_ms"] if row["openvino_ms"] else None
        row["ort_lib_ms"], row["ort_lib_bits_ms"] = ms.get("ortlib_float"), ms.get("ortlib_bits")
        row["ort_lib_p90_ms"] = p90.get("ortlib_float")
        row["ort_lib_note"] = lib_note
        row["ort_lib_speedup_vs_ort"] = row["ort_fp32_ms"] / row["ort_lib_ms"] if row["ort_lib_ms"] else None
        row["ort_lib_vs_bnnc"] = row["ort_lib_ms"] / row["bnnc_ms"] if row["ort_lib_ms"] else None
        row["gbops"] = shape.bops / (row["bnnc_ms"] * 1e-3) / 1e9
        hz, th = bound.get("freq_hz"), bound.get("theory_bitmacs_per_cycle")
        # the conv alone (bits) against the bound: the pack and epilogue are not popcount work; with the AMX
        # kernel (int8 tiles, not popcount) the rate may exceed the popcount bound
        row["conv_kernel"] = kern["layout"]
        row["conv_kernel_float"] = kern["layout_float"]
        row["bitmacs_per_cycle"] = (shape.bops / (row["conv_bits_ms"] * 1e-3) / hz / threads) if hz else None
        row["frac_of_bound"] = row["bitmacs_per_cycle"] / th if (hz and th) else None
        rows.append(row)
        if verbose:
            print(format_layer_table([row], header=not rows[:-1]), flush=True)
    return rows


def _f(v, fmt="{:.3f}"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def format_layer_table(rows, header: bool = True, bound: dict | None = None) -> str:
    """Markdown table of :func:`run_layer_bench` rows (the columns of bench/README.md)."""
    lines = []
    if header:
        lines += ["| shape | threads | bnnc ms | ORT FP32 ms | OpenVINO ms | speedup vs ORT | ratio vs OpenVINO "
                  "| GBOPs/s | bnnc bits-out ms | kernels: pack + conv(float) / conv(bits) ms "
                  "| conv bit-MACs/cycle (of bound) | ORT library ms (vs ORT FP32, ÷ bnnc TVM) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bmc = "—" if r["bitmacs_per_cycle"] is None else (
            f"{r['bitmacs_per_cycle']:.0f}" + (f" ({r['frac_of_bound']:.0%})" if r["frac_of_bound"] else "")
            + (" AMX" if r.get("conv_kernel") == "amx" else ""))
        ov = _f(r["openvino_ms"]) if r["openvino_ms"] is not None else f"n/a: {r['openvino_note']}"
        lib = (f"{_f(r['ort_lib_ms'])} ({_f(r['ort_lib_speedup_vs_ort'], '{:.1f}×')}, "
               f"{_f(r['ort_lib_vs_bnnc'], '{:.2f}')}; {r['ort_lib_note']})" if r.get("ort_lib_ms") is not None
               else f"n/a: {r.get('ort_lib_note', 'not measured')}")
        lines.append(
            f"| {r['shape']} | {r['threads']} | {_f(r['bnnc_ms'])} | {_f(r['ort_fp32_ms'])} | {ov} "
            f"| {_f(r['speedup_vs_ort'], '{:.1f}×')} | {_f(r['ratio_vs_openvino'], '{:.2f}×')} "
            f"| {_f(r['gbops'], '{:.0f}')} | {_f(r['bnnc_chain_bits_ms'])} "
            f"| {_f(r['pack_ms'])} + {_f(r['conv_float_ms'])} / {_f(r['conv_bits_ms'])} | {bmc} | {lib} |")
    if bound is not None:
        hz = bound.get("freq_hz")
        lines.append("")
        lines.append(f"Popcount bound: {bound['isa']}: {_f(bound['theory_bitmacs_per_cycle'], '{:.1f}')} "
                     f"bit-MACs/cycle/core (theory)"
                     + (f", {bound['measured_bitmacs_per_cycle']:.1f} measured (C intrinsics loop)"
                        if bound.get("measured_bitmacs_per_cycle") else "")
                     + f"; clock {_f(hz / 1e9 if hz else None, '{:.2f}')} GHz, {bound['freq_source']}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Model bench


def fp32_twin(export_model):
    """The same architecture in FP32 standard ONNX: every ``SignBinarize`` becomes an ``Identity`` (real
    activations) and every ``BinaryConv2d`` a plain ``Conv`` on its weights — what an FP32 user of ONNX
    Runtime would run (timing only: its outputs are not the binary network's)."""
    import onnx
    from onnx import helper

    from bnnc.ops import DOMAIN

    m = onnx.ModelProto()
    m.CopyFrom(export_model)
    nodes = []
    for n in m.graph.node:
        if n.domain == DOMAIN and n.op_type == "SignBinarize":
            nodes.append(helper.make_node("Identity", [n.input[0]], list(n.output), name=n.name))
        elif n.domain == DOMAIN and n.op_type == "BinaryConv2d":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute
                     if a.name in ("strides", "pads", "dilations", "group")}
            nodes.append(helper.make_node("Conv", list(n.input[:2]), list(n.output), name=n.name, **attrs))
        elif n.domain == DOMAIN:
            raise ValueError(f"node {n.name!r}: {n.op_type} has no FP32 twin (give an export-form model)")
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.functions[:]
    ops = [o for o in m.opset_import if o.domain != DOMAIN]
    del m.opset_import[:]
    m.opset_import.extend(ops)
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _ort_session(model_bytes: bytes, threads: int, optimize: bool = True, library: str | None = None):
    """A CPU ONNX Runtime session on ``threads`` intra-op threads (sequential execution, the default), with
    the custom-op ``library`` registered when given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if library:
        opts.register_custom_ops_library(library)
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


_RSS_CHILD = r"""
import resource, sys, json
kind, path, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import numpy as np, onnxruntime, tvm, bnnc
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak()
if kind != "baseline":
    if kind == "tvm":
        m = bnnc.load(path, num_threads=threads); shape = m.input_spec["shape"]; run = m.run
    else:
        o = onnxruntime.SessionOptions(); o.intra_op_num_threads = threads; o.log_severity_level = 3
        if kind == "reference":
            o.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = onnxruntime.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        i = s.get_inputs()[0]; shape = i.shape
        run = lambda x: s.run(None, {i.name: x})
    x = np.zeros([batch] + [int(d) for d in shape[1:]], np.float32)
    for _ in range(3):
        run(x)
print(json.dumps({"peak": peak(), "after_imports": base}))
"""


def peak_rss(kind: str, path, batch: int = 1, threads: int = 1) -> dict:
    """Peak resident memory (``getrusage`` high-water mark, bytes) of a fresh process that imports bnnc, loads
    one contender (``tvm``: an artifact folder; ``reference``/``fp32``: an ONNX file) and runs 3 batches;
    ``kind="baseline"`` only imports. Returns ``{"peak", "after_imports"}``."""
    import json
    import sys

    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, kind, str(path), str(batch), str(threads)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads), TVM_NUM_THREADS=str(threads)))
    if r.returncode != 0:
        raise RuntimeError(f"memory probe for {kind} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


MODEL_CONTENDERS = ("bnnc-tvm", "ort-fp32", "reference")


def run_model_bench(onnx_path, threads: int = 1, repeat: int = 15, block_s: float = 0.05,
                    batch_sizes=(1,), memory: bool = False) -> dict:
    """End-to-end latency of one export-form model at each batch size, three contenders interleaved:

    * ``bnnc-tvm`` — ``bnnc.compile(path, runtime="tvm", batch_size=b)`` (bit-packed kernels);
    * ``ort-fp32`` — the same architecture in FP32 (:func:`fp32_twin`) on ONNX Runtime, all graph
      optimizations on: what the network costs unbinarized;
    * ``reference`` — the export form on ONNX Runtime (``runtime="reference"``, optimizations off).

    Per contender and batch: ``p50_ms``, ``p90_ms`` (over rounds), ``images_per_s`` (batch / p50).
    ``file_bytes``: export form, deploy form, FP32 twin, TVM artifact folder. With ``memory``,
    ``peak_rss_bytes`` per contender at the first batch size, from a fresh process each (:func:`peak_rss`;
    ``baseline`` is the process after its imports). The batch-1 headline keys of earlier versions
    (``bnnc_tvm_ms``, ``ort_reference_ms``, ``speedup``, …) are the first batch size's p50s.
    """
    import bnnc
    from bnnc.compile import file_size, read_onnx

    export, data = read_onnx(onnx_path)
    fp32_bytes = fp32_twin(export).SerializeToString()
    deploy_bytes = bnnc.fold(export).SerializeToString()
    ref_m = bnnc.compile(export, runtime="reference", num_threads=threads)
    fp32 = _ort_session(fp32_bytes, threads, optimize=True)
    fp32_in = fp32.get_inputs()[0].name
    spec = ref_m.input_spec
    result = dict(model=str(onnx_path), threads=int(threads), batches=[])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmpd:
        for k, b in enumerate(batch_sizes):
            t0 = time.perf_counter()
            tvm_m = bnnc.compile(export, runtime="tvm", num_threads=threads, batch_size=int(b))
            compile_s = time.perf_counter() - t0
            shape = [int(b)] + [int(d) for d in spec["shape"][1:]]
            x = rng.standard_normal(shape).astype(np.float32)
            y_tvm, y_ref = tvm_m.run(x), ref_m.run(x)
            timers = {"bnnc-tvm": _py_timer(lambda: tvm_m.run(x)),
                      "ort-fp32": _py_timer(lambda: fp32.run(None, {fp32_in: x})),
                      "reference": _py_timer(lambda: ref_m.run(x))}
            rounds = _interleaved(timers, repeat, block_s, samples=True)
            cont = {n: dict(p50_ms=statistics.median(v) * 1e3, p90_ms=percentile(v, 90) * 1e3) for n, v in
                    rounds.items()}
            for c in cont.values():
                c["images_per_s"] = b / (c["p50_ms"] * 1e-3)
            result["batches"].append(dict(
                batch=int(b), compile_s=compile_s, contenders=cont,
                same_argmax=bool(np.array_equal(np.argmax(y_tvm.reshape(len(x), -1), 1),
                                                np.argmax(y_ref.reshape(len(x), -1), 1))),
                max_abs_diff=float(np.max(np.abs(np.asarray(y_tvm, np.float64) - np.asarray(y_ref, np.float64))))))
            if k == 0:
                art = Path(tmpd) / "model.bnnc"
                tvm_m.save(art)
                result["file_bytes"] = {"export": len(data), "deploy": len(deploy_bytes), "fp32": len(fp32_bytes),
                                        "tvm_artifact": file_size(art)}
                if memory:
                    (Path(tmpd) / "fp32.onnx").write_bytes(fp32_bytes)
                    (Path(tmpd) / "ref.onnx").write_bytes(data)
                    probes = {"baseline": ("baseline", ""), "bnnc-tvm": ("tvm", art),
                              "ort-fp32": ("fp32", Path(tmpd) / "fp32.onnx"),
                              "reference": ("reference", Path(tmpd) / "ref.onnx")}
                    result["peak_rss_bytes"] = {n: peak_rss(kind, p, int(b), threads)["peak"]
                                                for n, (kind, p) in probes.items()}
                    result["memory_batch"] = int(b)
    first = result["batches"][0]
    c = first["contenders"]
    result.update(input_shape=[first["batch"]] + [int(d) for d in spec["shape"][1:]],
                  bnnc_tvm_ms=c["bnnc-tvm"]["p50_ms"], ort_reference_ms=c["reference"]["p50_ms"],
                  ort_fp32_ms=c["ort-fp32"]["p50_ms"], speedup=c["reference"]["p50_ms"] / c["bnnc-tvm"]["p50_ms"],
                  speedup_vs_fp32=c["ort-fp32"]["p50_ms"] / c["bnnc-tvm"]["p50_ms"], compile_s=first["compile_s"],
                  same_argmax=all(b["same_argmax"] for b in result["batches"]),
                  max_abs_diff=max(b["max_abs_diff"] for b in result["batches"]))
    return result


def format_model_result(r: dict) -> str:
    lines = [f"{os.path.basename(r['model'])} ({r['threads']} thread(s)): bnnc tvm {r['bnnc_tvm_ms']:.3f} ms, "
             f"ORT FP32 (same architecture) {r['ort_fp32_ms']:.3f} ms, ONNX Runtime export form "
             f"{r['ort_reference_ms']:.3f} ms at batch {r['input_shape'][0]}: {r['speedup_vs_fp32']:.1f}× vs FP32, "
             f"speedup {r['speedup']:.1f}× vs export form "
             f"(same argmax: {r['same_argmax']}, max |diff| {r['max_abs_diff']:.2e}; compile {r['compile_s']:.1f} s)"]
    lines.append(f"{'batch':>5s}  {'contender':10s} {'p50 ms':>9s} {'p90 ms':>9s} {'images/s':>10s}")
    for b in r["batches"]:
        for name, c in b["contenders"].items():
            lines.append(f"{b['batch']:5d}  {name:10s} {c['p50_ms']:9.3f} {c['p90_ms']:9.3f} {c['images_per_s']:10.1f}")
    fb = r.get("file_bytes")
    if fb:
        lines.append("file size: " + ", ".join(f"{k} {v:,} B" for k, v in fb.items()))
    mem = r.get("peak_rss_bytes")
    if mem:
        base = mem.get("baseline", 0)
        lines.append(f"peak RSS (fresh process, batch {r.get('memory_batch', 1)}): " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB" + (f" (+{(v - base) / 2**20:.1f})" if k != "baseline" else "")
            for k, v in mem.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line (``python -m bnnc.bench``; also wired as ``bnnc bench``)


# --------------------------------------------------------------------------------- training overhead

TRAIN_QUANTIZERS = (("sign", "sign"), ("approx_sign", "magnitude_aware"), ("ede", "ede"), ("rsign", "libra_pb"),
                    ("adabin", "adabin"), ("fda", "fda"), ("rbnn", "rbnn"))


def _resnet20(aq=None, wq=None):
    """AdaBin's CIFAR ResNet-20 with the given quantizers, or with real convs (FP32) when ``aq`` is None."""
    from torch import nn

    from . import models
    from .nn import BinaryConv2d
    from .quantizers import get_activation_quantizer, get_weight_quantizer

    net = models.create("adabin_resnet20")
    for name, m in list(net.named_modules()):
        for child_name, child in list(m.named_children()):
            if not isinstance(child, BinaryConv2d):
                continue
            if aq is None:
                setattr(m, child_name, nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                                 child.stride, child.padding, bias=False))
            else:
                child.input_quantizer = get_activation_quantizer(aq)
                child.weight_quantizer = get_weight_quantizer(wq)
    return net


def run_train_overhead_bench(quantizers=TRAIN_QUANTIZERS, batch: int = 32, steps: int = 6, rounds: int = 3,
                             threads: int | None = None, progress: bool = False) -> list[dict]:
    """Training step time (forward, backward, SGD step) of CIFAR ResNet-20 with each quantizer pair, as a
    ratio to the same network in FP32, interleaved in one run: ``rounds`` rounds, each timing ``steps``
    steps of every network in turn (rotating the order).

    Per network: ``step_ms`` / ``ratio_vs_fp32`` from the median round, ``best_ms`` / ``best_ratio`` from the
    fastest round (extra load from other processes only adds time, so on a shared machine the best round is
    the steadier estimate), and ``cpu_ms`` / ``cpu_ratio``: the process CPU time of the fastest round (CPU time
    barely grows when other processes take the cores; with several threads it includes OpenMP spin-waits)."""
    import torch
    from tqdm.auto import tqdm

    if batch < 1 or steps < 1 or rounds < 1:
        raise ValueError(f"batch, steps and rounds must be ≥ 1, got {batch}, {steps}, {rounds}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    nets = {"fp32": _resnet20()}
    for aq, wq in quantizers:
        nets[f"{aq}/{wq}"] = _resnet20(aq, wq)
    opts = {k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for k, n in nets.items()}
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(k):
        n, o = nets[k], opts[k]
        loss = loss_fn(n(x), y)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    for k, n in nets.items():  # warm-up (also materializes lazily shaped quantizer parameters)
        n.train()
        for q in n.modules():
            if hasattr(q, "on_epoch") and q is not n:
                q.on_epoch(0, 10)
        step(k)
    times = {k: [] for k in nets}
    cpu = {k: [] for k in nets}
    order = list(nets)
    for r in tqdm(range(rounds), desc="train bench rounds", disable=not progress, leave=False):
        for k in order[r % len(order):] + order[:r % len(order)]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(k)
            times[k].append((time.perf_counter() - t0) / steps)
            cpu[k].append((time.process_time() - c0) / steps)
    base, best, cbase = statistics.median(times["fp32"]), min(times["fp32"]), min(cpu["fp32"])
    rows = []
    for k, v in times.items():
        med, low, c = statistics.median(v), min(v), min(cpu[k])
        rows.append({"quantizers": k, "step_ms": med * 1e3, "ratio_vs_fp32": med / base, "best_ms": low * 1e3,
                     "best_ratio": low / best, "cpu_ms": c * 1e3, "cpu_ratio": c / cbase, "batch": batch,
                     "threads": torch.get_num_threads(), "rounds": rounds, "steps": steps})
    return rows


def format_train_overhead(rows) -> str:
    head = (f"{'quantizers (act/weight)':28s} {'median ms':>9s} {'× FP32':>7s} {'best ms':>9s} {'× FP32':>7s} "
            f"{'CPU ms':>9s} {'× FP32':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['quantizers']:28s} {r['step_ms']:9.1f} {r['ratio_vs_fp32']:7.2f} {r['best_ms']:9.1f} "
                     f"{r['best_ratio']:7.2f} {r['cpu_ms']:9.1f} {r['cpu_ratio']:7.2f}")
    if rows:
        r = rows[0]
        lines.append(f"batch {r['batch']}, {r['threads']} thread(s), {r['rounds']} interleaved rounds of "
                     f"{r['steps']} steps; median / fastest round, and process CPU time of the fastest")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="bnnc bench", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


LAYER_SETS = {"resnet18": RESNET18_3X3}


def add_arguments(ap) -> None:
    ap.add_argument("model", nargs="?", help="export-form .onnx: end-to-end bench (default: the layer bench)")
    ap.add_argument("--layers", choices=sorted(LAYER_SETS), help="the layer bench on a network's binary conv "
                    "shapes (default without MODEL: resnet18)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default 1)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="batch sizes of the model bench "
                    "(default 1)")
    ap.add_argument("--repeat", type=int, default=15, help="interleaved rounds per contender (default 15)")
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO column")
    ap.add_argument("--no-ort-lib", action="store_true",
                    help="skip the column of the ONNX Runtime custom-op library (libbnnc_ort.so, built at install "
                         "or by `python -m bnnc.runtimes.ort.build`)")
    ap.add_argument("--no-memory", action="store_true", help="model bench: skip the peak-RSS probes (one fresh "
                    "process per contender)")
    ap.add_argument("--shapes", help="layer shapes H,W,Cin,Cout[;...] (default: ResNet-18 3x3 layers)")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    ap.add_argument("--plot", metavar="DIR", help="write PNG plots there: latency and speedup per layer shape, "
                    "or latency per batch size (and accuracy vs latency with --accuracy) for a model")
    ap.add_argument("--accuracy", nargs="+", metavar="RUNTIME=TOP1|EVAL.json", help="model bench: top-1 per "
                    "runtime (tvm, reference) for the accuracy-vs-latency plot, as RUNTIME=0.9006 or a file "
                    "written by `bnnc eval --json`")
    ap.add_argument("--train", action="store_true", help="training-step overhead of each quantizer on CIFAR "
                                                         "ResNet-20 vs the same network in FP32")


_RUNTIME_TO_CONTENDER = {"tvm": "bnnc-tvm", "reference": "reference"}


def parse_accuracies(specs) -> dict:
    """``["tvm=0.9", "eval.json", …]`` → ``{runtime: top1}`` (a JSON file is one `bnnc eval --json` object)."""
    import json

    out = {}
    for spec in specs or ():
        if "=" in spec and not os.path.exists(spec):
            k, v = spec.split("=", 1)
            try:
                out[k.strip()] = float(v)
            except ValueError:
                raise ValueError(f"--accuracy {spec!r}: expected RUNTIME=TOP1 with a number, e.g. tvm=0.9006") from None
            continue
        try:
            with open(spec) as f:
                r = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"--accuracy file {spec} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"--accuracy file {spec} is not JSON ({e})") from None
        if not isinstance(r, dict) or "top1" not in r or "runtime" not in r:
            raise ValueError(f"--accuracy file {spec} is not a `bnnc eval --json` result (no runtime/top1)")
        out[str(r["runtime"])] = float(r["top1"])
    return out


def write_plots(result, plot_dir, accuracies: dict | None = None, prefix: str = "") -> list:
    """PNG plots of a layer bench (``{"rows": …}``) or of model bench results (a list), file names starting
    with ``prefix``; returns the paths."""
    from . import plots

    d = Path(plot_dir)
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(result, dict) and "rows" in result:
        return [plots.plot_layer_latency(result["rows"], d / f"{prefix}layer_latency.png"),
                plots.plot_layer_speedup(result["rows"], d / f"{prefix}layer_speedup.png")]
    paths = []
    for r in result:
        stem = f"{prefix}{Path(r['model']).stem}_t{r['threads']}"
        paths.append(plots.plot_model_latency(r, d / f"{stem}_latency.png"))
        pts = [dict(label=rt, latency_ms=r["batches"][0]["contenders"][_RUNTIME_TO_CONTENDER[rt]]["p50_ms"], top1=a)
               for rt, a in (accuracies or {}).items() if rt in _RUNTIME_TO_CONTENDER]
        if pts:
            paths.append(plots.plot_accuracy_vs_latency(pts, d / f"{stem}_accuracy_vs_latency.png",
                                                        title=f"{Path(r['model']).name}: top-1 vs latency"))
    return paths


def run_from_args(args) -> int:
    import json

    if getattr(args, "train", False):
        rows = run_train_overhead_bench(threads=args.threads[0], rounds=max(3, min(args.repeat, 7)), progress=True)
        print(json.dumps(rows) if args.json else format_train_overhead(rows), flush=True)
        return 0
    if any(b < 1 for b in args.batch_sizes) or any(t < 1 for t in args.threads):
        raise ValueError("--batch-sizes and --threads must be ≥ 1")
    if args.model:
        if args.layers:
            raise ValueError("give either MODEL (end-to-end bench) or --layers NAME (layer bench), not both")
        accuracies = parse_accuracies(args.accuracy)
        results = []
        for t in args.threads:
            r = run_model_bench(args.model, threads=t, repeat=args.repeat, batch_sizes=args.batch_sizes,
                                memory=not args.no_memory)
            results.append(r)
            print(json.dumps(r) if args.json else format_model_result(r), flush=True)
        if args.plot:
            for p in write_plots(results, args.plot, accuracies):
                if not args.json:
                    print(f"wrote {p}")
        return 0
    shapes = LAYER_SETS[args.layers or "resnet18"]
    if args.shapes:
        shapes = tuple(LayerShape(*[int(v) for v in s.split(",")]) for s in args.shapes.split(";") if s.strip())
    bound = popcount_bound()
    allrows = []
    for t in args.threads:
        allrows += run_layer_bench(shapes, threads=t, repeat=args.repeat, include_openvino=not args.no_openvino,
                                   bound=bound, include_ort_lib=not args.no_ort_lib)
    if args.json:
        print(json.dumps({"bound": bound, "rows": allrows}, indent=1))
    else:
        print(format_layer_table(allrows, bound=bound))
    if args.plot:
        for p in write_plots({"rows": allrows}, args.plot):
            if not args.json:
                print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
