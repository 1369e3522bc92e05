"""Time BinaryConv2dPacked (library) against ONNX Runtime's FP32 Conv of the same shape.

    python -m bnnc.runtimes.ort.bench [--h 56 --c 64 --o 64 --threads 1 --isa auto]

Default: N=1, 56×56×64 → 64, 3×3, stride 1, pad 1, bits output, one intra-op thread. Prints the median
of ``--repeat`` timed runs (after warm-up) per variant.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bnnc.ops import deploy as K


def conv_models(h=56, c=64, o=64, k=3, pad=1, seed=0):
    rng = np.random.default_rng(seed)
    rc, rv = K.border_classes(h, k, 1, pad, pad)
    cc, cv = K.border_classes(h, k, 1, pad, pad)
    wp = K.pack_bits(rng.random((o, k, k, c)) < 0.5)
    e = rng.integers(-k * k * c, k * k * c, (o, len(rv), len(cv))).astype(np.int32)
    p0 = np.ones(o, np.int32)
    p1 = np.zeros(o, np.int32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(wp, "W"), (e, "E"), (rc.astype(np.int32), "RC"), (cc.astype(np.int32), "CC"), (p0, "P0"), (p1, "P1")]]
    node = helper.make_node("BinaryConv2dPacked", ["X", "W", "E", "RC", "CC", "P0", "P1"], ["Y"], domain="ai.bnnc",
                            in_channels=c, out_channels=o, kernel_shape=[k, k], strides=[1, 1], pads=[pad] * 4,
                            dilations=[1, 1], output="bits", source="bench")
    g = helper.make_graph([node], "bconv", [helper.make_tensor_value_info("X", TensorProto.UINT32, [1, h, h, K.num_words(c)])],
                          [helper.make_tensor_value_info("Y", TensorProto.UINT32, None)], inits)
    binary = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.bnnc", 1)],
                               ir_version=10)
    wf = rng.standard_normal((o, c, k, k)).astype(np.float32)
    g2 = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["Y"], kernel_shape=[k, k], pads=[pad] * 4)], "fconv",
                           [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, h, h])],
                           [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                           [numpy_helper.from_array(wf, "W")])
    fp32 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    xb = K.pack_bits(rng.random((1, h, h, c)) < 0.5)
    xf = rng.standard_normal((1, c, h, h)).astype(np.float32)
    return binary, xb, fp32, xf


def _time(sess, feeds, repeat):
    for _ in range(3):
        sess.run(None, feeds)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench(h=56, c=64, o=64, threads=1, repeat=30, isas=("auto",)) -> dict:
    """Median seconds per run: {'fp32_conv': t, 'bnnc_<isa>': t, ...}."""
    import onnxruntime as ort

    from . import library_path, resolve_isa

    binary, xb, fp32, xf = conv_models(h, c, o)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    res = {"fp32_conv": _time(ort.InferenceSession(fp32.SerializeToString(), opts,
                                                   providers=["CPUExecutionProvider"]), {"X": xf}, repeat)}
    lib = library_path()
    old = os.environ.get("BNNC_ORT_ISA")
    try:
        for isa in isas:
            name = resolve_isa(isa, lib)
            os.environ["BNNC_ORT_ISA"] = isa
            o2 = ort.SessionOptions()
            o2.intra_op_num_threads = threads
            o2.inter_op_num_threads = 1
            o2.register_custom_ops_library(lib)
            s = ort.InferenceSession(binary.SerializeToString(), o2, providers=["CPUExecutionProvider"])
            res[f"bnnc_{name}"] = _time(s, {"X": xb}, repeat)
    finally:
        if old is None:
            os.environ.pop("BNNC_ORT_ISA", None)
        else:
            os.environ["BNNC_ORT_ISA"] = old
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bnnc.runtimes.ort.bench")
    ap.add_argument("--h", type=int, default=56)
    ap.add_argument("--c", type=int, default=64)
    ap.add_argument("--o", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--isa", nargs="+", default=["auto"])
    a = ap.parse_args(argv)
    res = bench(a.h, a.c, a.o, a.threads, a.repeat, tuple(a.isa))
    base = res["fp32_conv"]
    for k, v in res.items():
        print(f"{k:16s} {v * 1e3:8.3f} ms   x{base / v:5.1f} vs fp32")


if __name__ == "__main__":
    main()
