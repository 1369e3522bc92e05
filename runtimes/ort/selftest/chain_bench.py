"""Layer chain bench of the ONNX Runtime custom-op library, per ISA, against ORT FP32 and the TVM backend.

    python -m bnnc.runtimes.ort.selftest.chain_bench [--isa amx avx512 avx2] [--before OLD.so] [--no-tvm]
        [--shapes 56,56,64,64;7,7,512,512] [--repeat 15] [--threads 1] [--out bench/results-<date>-ort.json]

Per ResNet-18 3×3 layer shape (batch 1, stride 1, pad 1), every contender starts from the float32 NCHW
input: ``PackSign → BinaryConv2dPacked(output=float|bits)`` on ONNX Runtime with ``libbnnc_ort.so`` (one
session per ISA, forced with ``BNNC_ORT_ISA``; ``--before`` adds an older build of the library), the same
two-node graph compiled by the TVM backend (timed with the VM's ``time_evaluator``), and ORT's FP32 ``Conv``
(±1 weights). Every ORT session is timed through IOBinding on buffers bound once (no per-call numpy
conversion or output allocation; TVM's ``time_evaluator`` likewise times the function alone). Every output
is checked bit for bit against ``bnnc.ops.deploy`` before timing; the contenders
of one shape are timed interleaved (``bnnc.bench._interleaved``: round-robin blocks, order rotating) and
min / median over the rounds are reported, with ratios taken from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

import numpy as np


def run(shapes, isas, before=None, tvm=True, repeat=15, threads=1, block_s=0.02, log=print):
    from bnnc import bench as B
    from bnnc.runtimes.ort import library_path, resolve_isa

    lib = library_path()
    isas = [i for i in isas if _has(i, lib)]
    rows = []
    for shape in shapes:
        case = B.make_layer_case(shape)
        timers, keep = {}, []
        sess, timers["ort_fp32"] = B._ort_conv(case, threads)
        keep.append(sess)
        for mode in ("float", "bits"):
            for isa in isas:
                sess, timers[f"ort_{isa}_{mode}"] = B._ort_lib_chain(case, mode, threads, lib, isa)
                keep.append(sess)
            if before:
                best = resolve_isa("auto", before)
                sess, timers[f"before_{best}_{mode}"] = B._ort_lib_chain(case, mode, threads, before, best)
                keep.append(sess)
            if tvm:
                tm, t = B._bnnc_chain(case, mode, threads)
                import tvm as _tvm

                got = tm.vm["main"](_tvm.runtime.tensor(case["x"], tm.dev)).numpy()
                want = case["ref_bits" if mode == "bits" else "ref_float"]
                if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                    raise AssertionError(f"TVM {mode}: output differs from bnnc.ops.deploy")
                timers[f"tvm_{mode}"] = t
                keep.append(tm)
        samples = B._interleaved(timers, repeat, block_s, samples=True)
        row = {"shape": shape.label, "h": shape.h, "cin": shape.cin, "cout": shape.cout, "bops": shape.bops,
               "threads": threads, "repeat": repeat,
               "min_ms": {k: min(v) * 1e3 for k, v in samples.items()},
               "median_ms": {k: statistics.median(v) * 1e3 for k, v in samples.items()}}
        med = row["median_ms"]
        row["speedup_vs_ort_fp32"] = {k: med["ort_fp32"] / v for k, v in med.items() if k != "ort_fp32"}
        if tvm:
            row["vs_tvm"] = {k: v / med[f"tvm_{k.rsplit('_', 1)[1]}"] for k, v in med.items()
                             if k.startswith(("ort_", "before_")) and k != "ort_fp32"}
        rows.append(row)
        log(format_row(row))
    return rows


def _has(isa, lib):
    from bnnc.runtimes.ort import resolve_isa

    try:
        return resolve_isa(isa, lib) == isa
    except ValueError:
        return False


def format_row(row) -> str:
    med, mn = row["median_ms"], row["min_ms"]
    out = [f"{row['shape']}  (threads={row['threads']}, {row['repeat']} rounds; ms median / min"
           f"; × ORT FP32; ÷ TVM same output)"]
    for k in med:
        s = f"  {k:22s} {med[k]:7.3f} / {mn[k]:7.3f}"
        if k != "ort_fp32":
            s += f"   {row['speedup_vs_ort_fp32'][k]:5.1f}×"
            if "vs_tvm" in row and k in row["vs_tvm"]:
                s += f"   {row['vs_tvm'][k]:5.2f}"
        out.append(s)
    return "\n".join(out)


def main(argv=None) -> int:
    from bnnc.bench import RESNET18_3X3, LayerShape
    from bnnc.util import atomic_path

    ap = argparse.ArgumentParser(prog="python -m bnnc.runtimes.ort.selftest.chain_bench",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--isa", nargs="+", default=["amx", "avx512", "avx2"])
    ap.add_argument("--before", help="an older libbnnc_ort.so to time beside (its best ISA)")
    ap.add_argument("--no-tvm", action="store_true")
    ap.add_argument("--shapes", help="h,w,cin,cout;... (default: the ResNet-18 3×3 shapes)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON file (default: none)")
    a = ap.parse_args(argv)
    shapes = RESNET18_3X3
    if a.shapes:
        try:
            shapes = tuple(LayerShape(*map(int, s.split(","))) for s in a.shapes.split(";"))
        except (TypeError, ValueError):
            print(f"error: --shapes wants h,w,cin,cout;..., got {a.shapes!r}", file=sys.stderr)
            return 1
    rows = run(shapes, a.isa, before=a.before, tvm=not a.no_tvm, repeat=a.repeat, threads=a.threads)
    if a.out:
        import onnxruntime

        doc = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "onnxruntime": onnxruntime.__version__, "load_average": os.getloadavg(), "rows": rows}
        with atomic_path(a.out) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
