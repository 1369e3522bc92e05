"""AMX-INT8 vs popcount TVM kernels of ``BinaryConv2dPacked`` per ResNet-18 3×3 layer.

1 thread, batch 1; each kernel alone (packed input in, unpack and epilogue included), timed interleaved
(round-robin blocks), median of rounds. Columns: popcount and AMX kernels with bits output; the AMX kernel
with float output (NCHW); the residual-block step after a float conv, ``v = conv + residual`` (float out) and
``PackSign(v)`` (bits out), fused into the AMX kernel's epilogue vs unfused (AMX float conv, then the
``chain_pack`` kernel). Also the AMX bits kernel's binary MACs per cycle (at ``--ghz``, default 3.5; AMX-INT8
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
    print(f"target {tgt}, 1 thread, batch 1, median of {args.rounds} interleaved rounds, ms")
    print(f"{'shape':26s} {'pop bits':>8s} {'AMX bits':>8s} {'ratio':>6s} {'AMX float':>9s} {'fused chain':>11s} "
          f"{'unfused':>8s} {'bit-MACs/cycle':>14s}")
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
        wa_b, wa_f = amx.amx_conv_weights(case["wp"]), amx.amx_conv_weights(case["wp"], "float")
        yref = case["ref_float"]
        res = np.random.default_rng(1).standard_normal(yref.shape).astype(np.float32)
        chain_ref = yref + res
        kp = K.build_kernel(K.binary_conv2d_packed_primfunc(xp.shape, wshape, eshape, output="bits", target=tgt,
                                                            weight_layout=lay, **a), tgt)
        kb = K.build_kernel(K.binary_conv2d_packed_primfunc(xp.shape, wshape, eshape, output="bits", target=tgt,
                                                            weight_layout="amx", **a), tgt)
        kf = K.build_kernel(K.binary_conv2d_packed_primfunc(xp.shape, wshape, eshape, output="float", target=tgt,
                                                            weight_layout="amx", **a), tgt)
        fused = tvm.compile(tvm.IRModule({"main": amx.binary_conv2d_amx_chain_primfunc(
            xp.shape, wshape, eshape, extra_shapes=[res.shape], steps=[("add", 0)], want_float=True, pack=True,
            **a)}), target=tgt)
        cp = tvm.compile(tvm.IRModule({"main": K.chain_pack_primfunc(yref.shape, [res.shape], [("add", 0)],
                                                                     with_threshold=False, target=tgt)}),
                         target=tgt)
        pshape = (1, yref.shape[2], yref.shape[3], K.num_words(s.cout))
        T = lambda v: tvm.runtime.tensor(np.ascontiguousarray(v), dev)
        a_p = [T(v) for v in [xp, wb] + tabs + bits] + [T(np.empty(kp.out_shape, kp.out_dtype))]
        a_b = [T(v) for v in [xp, wa_b] + tabs + bits] + [T(np.empty(kb.out_shape, kb.out_dtype))]
        a_f = [T(v) for v in [xp, wa_f] + tabs + flt] + [T(np.empty(kf.out_shape, kf.out_dtype))]
        a_x = [T(v) for v in [xp, wa_f] + tabs + flt + [res]] + [T(np.empty(yref.shape, np.float32)),
                                                                   T(np.empty(pshape, np.uint32))]
        a_c = [a_f[-1], T(res), T(np.empty(yref.shape, np.float32)), T(np.empty(pshape, np.uint32))]
        for k, ar, want in ((kp, a_p, case["ref_bits"]), (kb, a_b, case["ref_bits"]), (kf, a_f, yref)):
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

        timers = [timer(kp.lib.mod, a_p), timer(kb.lib.mod, a_b), timer(kf.lib.mod, a_f), timer(fused.mod, a_x),
                  chained()]
        res_t = [[] for _ in timers]
        for r in range(args.rounds):
            order = range(len(timers)) if r % 2 == 0 else reversed(range(len(timers)))
            for j in order:
                res_t[j].append(timers[j]())
        p, q, fl, fu, un = (statistics.median(v) * 1e3 for v in res_t)
        rate = s.bops / (q * 1e-3) / (args.ghz * 1e9)
        print(f"{s.label:26s} {p:8.3f} {q:8.3f} {p / q:6.2f} {fl:9.3f} {fu:11.3f} {un:8.3f} {rate:14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
