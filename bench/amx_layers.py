"""AMX-INT8 vs popcount TVM kernels of ``BinaryConv2dPacked`` per ResNet-18 3×3 layer.

1 thread, batch 1; each kernel alone (packed input in, unpack and epilogue included), timed interleaved
(round-robin blocks), median of rounds. Columns: popcount and AMX kernels with bits output, the AMX kernels
with the weights as int8 tiles (``W8``) and as bits expanded tile by tile (``W1``; ``*`` marks the layout
``amx.weight_bits`` picks); the AMX kernel with float output (NCHW), both weight layouts; the residual-block step after a float conv, ``v = conv + residual`` (float out) and
``PackSign(v)`` (bits out), fused into the AMX kernel's epilogue vs unfused (AMX float conv, then the
``chain_pack`` kernel), with the picked layout. Also the picked AMX bits kernel's binary MACs per cycle (at ``--ghz``, default 3.5; AMX-INT8
peak is 1024, the VPOPCNTDQ bound 341).

    .venv/bin/python bench/amx_layers.py [--rounds 9] [--ghz 3.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--number", type=int, default=30, help="calls per timed block")
    ap.add_argument("--ghz", type=float, default=3.5)
    ap.add_argument("--shapes", default="", help="only the shapes whose label starts with one of these "
                                                 "(comma-separated, e.g. 7,14)")
    args = ap.parse_args(argv)

    import tvm
    from bnnc.runtimes.tvm import amx
    from bnnc.runtimes.tvm import kernels as K
    from bnnc.runtimes.tvm.graph import set_num_threads
    from bnnc.runtimes.tvm.target import cpu_target

    from bnnc.bench import LayerShape, make_layer_case
    from bnnc.ops.deploy import pack_sign

    if not amx.enabled():
        print("AMX is not available here (CPU without AMX-INT8, OS refused the tile state, or BNNC_TVM_AMX=0)")
        return 1
    set_num_threads(1)
    tgt = cpu_target(1)
    shapes = [LayerShape(56, 56, 64, 64), LayerShape(28, 28, 128, 128), LayerShape(14, 14, 256, 256),
              LayerShape(7, 7, 512, 512), LayerShape(56, 56, 64, 128, stride=2),
              LayerShape(28, 28, 128, 256, stride=2), LayerShape(14, 14, 256, 512, stride=2)]
    if args.shapes:
        shapes = [s for s in shapes if any(s.label.startswith(p) for p in args.shapes.split(","))]
    print(f"target {tgt}, 1 thread, batch 1, median of {args.rounds} interleaved rounds, ms")
    print(f"{'shape':26s} {'pop bits':>8s} {'bits W8':>8s} {'bits W1':>8s} {'ratio':>6s} {'float W8':>8s} "
          f"{'float W1':>8s} {'fused chain':>11s} {'unfused':>8s} {'bit-MACs/cycle':>14s}")
    dev = tvm.cpu()
    for s in shapes:
        case = make_layer_case(s)
        a = dict(case["attrs"])
        a.pop("in_channels")
        xp = case["ref_packed_x"]
        wshape, eshape = case["wp"].shape, case["e"].shape
        lay = K.conv_weight_layout(xp.shape, wshape, target=tgt, amx=False, **a)
        wb = K.block_conv_weights(case["wp"]) if lay == "blocked" else case["wp"]
        tabs = [case["e"], case["rc"], case["cc"]]
        bits = [case["direction"], case["thr"]]
        flt = [case["scale"], case["bias"]]
        wbits = amx.weight_bits(wshape)
        wa = {(m, b): amx.amx_conv_weights(case["wp"], m, b) for m in ("bits", "float") for b in (False, True)}
        wa_f = wa["float", wbits]
        yref = case["ref_float"]
        res = np.random.default_rng(1).standard_normal(yref.shape).astype(np.float32)
        chain_ref = yref + res
        kp = K.build_kernel(K.binary_conv2d_packed_primfunc(xp.shape, wshape, eshape, output="bits", target=tgt,
                                                            weight_layout=lay, **a), tgt)
        kk = {(m, b): K.build_kernel(amx.binary_conv2d_amx_primfunc(xp.shape, wshape, eshape, output=m, wbits=b,
                                                                    **a), tgt)
              for m in ("bits", "float") for b in (False, True)}
        kf = kk["float", wbits]
        fused = tvm.compile(tvm.IRModule({"main": amx.binary_conv2d_amx_chain_primfunc(
            xp.shape, wshape, eshape, extra_shapes=[res.shape], steps=[("add", 0)], want_float=True, pack=True,
            wbits=wbits, **a)}), target=tgt)
        cp = tvm.compile(tvm.IRModule({"main": K.chain_pack_primfunc(yref.shape, [res.shape], [("add", 0)],
                                                                     with_threshold=False, target=tgt)}),
                         target=tgt)
        pshape = (1, yref.shape[2], yref.shape[3], K.num_words(s.cout))
        T = lambda v: tvm.runtime.tensor(np.ascontiguousarray(v), dev)
        a_p = [T(v) for v in [xp, wb] + tabs + bits] + [T(np.empty(kp.out_shape, kp.out_dtype))]
        aa = {(m, b): [T(v) for v in [xp, wa[m, b]] + tabs + (bits if m == "bits" else flt)]
              + [T(np.empty(kk[m, b].out_shape, kk[m, b].out_dtype))] for m in ("bits", "float") for b in (False, True)}
        a_f = aa["float", wbits]
        a_x = [T(v) for v in [xp, wa_f] + tabs + flt + [res]] + [T(np.empty(yref.shape, np.float32)),
                                                                   T(np.empty(pshape, np.uint32))]
        a_c = [a_f[-1], T(res), T(np.empty(yref.shape, np.float32)), T(np.empty(pshape, np.uint32))]
        checks = [(kp, a_p, case["ref_bits"])] + [(kk[m, b], aa[m, b], case["ref_bits"] if m == "bits" else yref)
                                                  for m in ("bits", "float") for b in (False, True)]
        for k, ar, want in checks:
            k.lib(*ar)
            if not np.array_equal(ar[-1].numpy().view(np.uint32), want.view(np.uint32)):
                print(f"{s.label}: result differs from the reference", file=sys.stderr)
                return 1
        fused(*a_x)
        cp(*a_c)
        want_bits = pack_sign(chain_ref)
        for got in ((a_x[-2], a_x[-1]), (a_c[-2], a_c[-1])):
            if not (np.array_equal(got[0].numpy().view(np.uint32), chain_ref.view(np.uint32))
                    and np.array_equal(got[1].numpy(), want_bits)):
                print(f"{s.label}: fused chain differs from the reference", file=sys.stderr)
                return 1

        def timer(mod, ar):
            ev = mod.time_evaluator("main", dev, number=args.number, repeat=1)
            return lambda: float(ev(*ar).mean)

        def chained():
            tf, tc = timer(kf.lib.mod, a_f), timer(cp.mod, a_c)
            return lambda: tf() + tc()

        timers = [timer(kp.lib.mod, a_p), timer(kk["bits", False].lib.mod, aa["bits", False]),
                  timer(kk["bits", True].lib.mod, aa["bits", True]),
                  timer(kk["float", False].lib.mod, aa["float", False]),
                  timer(kk["float", True].lib.mod, aa["float", True]), timer(fused.mod, a_x), chained()]
        res_t = [[] for _ in timers]
        for r in range(args.rounds):
            order = range(len(timers)) if r % 2 == 0 else reversed(range(len(timers)))
            for j in order:
                res_t[j].append(timers[j]())
        p, b8, b1, f8, f1, fu, un = (statistics.median(v) * 1e3 for v in res_t)
        q = b1 if wbits else b8
        rate = s.bops / (q * 1e-3) / (args.ghz * 1e9)
        mk = lambda v, on: f"{v:7.3f}{'*' if on else ' '}"
        print(f"{s.label:26s} {p:8.3f} {mk(b8, not wbits)} {mk(b1, wbits)} {p / q:6.2f} {mk(f8, not wbits)} "
              f"{mk(f1, wbits)} {fu:11.3f} {un:8.3f} {rate:14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
