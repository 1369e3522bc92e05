"""Latency of bnnc's CUDA artifacts on the local GPU, against the same network in FP32 PyTorch on that GPU.

    python bench/cuda_model.py MODEL [MODEL ...] [--torch] [--batch 1 64] [--out F.json]

MODEL is an export-form ONNX file or ``zoo:NAME:SIZE`` (the zoo network NAME with random weights, exported
here at SIZE×SIZE; the FP32 peer needs this form).

For each export-form model and batch: compiles it with ``bnnc.compile(target="cuda:sm_XX")`` for the local
GPU's architecture, checks that its top-1 on random inputs equals the export form's on the reference runtime
(ONNX Runtime on the CPU), then times ``main`` of the Relax VM on a device-resident input (CUDA-synchronized,
median of ``--repeat`` blocks) and ``CompiledModel.run`` on a NumPy input (host↔device copies included).
``--no-graph-too`` adds the same model compiled with ``cuda_graph=False`` (kernels launched one by one) and
its per-kernel times.
``--torch`` also times the zoo network (``bnnc.models.create(NAME)``) in FP32 eager PyTorch on
the GPU (cuDNN autotuned): the training-time network, sign functions included, i.e. what a user runs before
bnnc. Random weights: latency does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_ms(call, sync, repeat: int, number: int) -> float:
    call()
    sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            call()
        sync()
        out.append((time.perf_counter() - t0) / number * 1e3)
    return statistics.median(out)


def bench_bnnc(path: str, batch: int, repeat: int, number: int, no_graph_too: bool = False) -> dict:
    import numpy as np
    import tvm
    from bnnc.runtimes.tvm.target import _local_cuda_arch

    import bnnc

    arch = _local_cuda_arch()
    if arch is None:
        raise SystemExit("no CUDA GPU visible to TVM")
    t0 = time.perf_counter()
    cm = bnnc.compile(path, target=f"cuda:{arch}", batch_size=batch)
    compile_s = time.perf_counter() - t0
    tm = cm._executor
    shape = (batch,) + tuple(tm.input_shape[1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = cm.run(x)
    ref = bnnc.compile(path, runtime="reference").run(x)
    same = bool(np.array_equal(y.argmax(1), ref.argmax(1)))
    xt = tvm.runtime.tensor(x, tm.dev)
    dev_ms = _median_ms(lambda: tm._main(xt), tm.dev.sync, repeat, number)
    host_ms = _median_ms(lambda: cm.run(x), lambda: None, repeat, number)
    res = dict(arch=arch, compile_s=round(compile_s, 2), same_top1=same,
               max_abs_diff=float(np.abs(y - ref).max()), device_ms=round(dev_ms, 4), with_copies_ms=round(host_ms, 4))
    if no_graph_too:
        from bnnc.runtimes.tvm.graph import compile_model

        tg = compile_model(cm.model, target=f"cuda:{arch}", batch_size=batch, cuda_graph=False)
        res["same_without_cuda_graph"] = bool(np.array_equal(tg.run(x), y))
        res["device_ms_without_cuda_graph"] = round(_median_ms(lambda: tg._main(xt), tm.dev.sync, repeat, number), 4)
        from run_model import tvm_op_profile

        res["kernels_ms"] = tvm_op_profile(tg, x, dev=tm.dev, sync=True, min_ms=0.002)
    return res


def bench_torch(name: str, size: int, batch: int, repeat: int, number: int) -> dict:
    import torch

    import bnnc

    torch.backends.cudnn.benchmark = True
    net = bnnc.models.create(name).eval().cuda()
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.inference_mode():
        eager = _median_ms(lambda: net(x), torch.cuda.synchronize, repeat, number)
    # the same network captured once as a CUDA graph: no Python or launch overhead left
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                net(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            net(x)
        graph = _median_ms(g.replay, torch.cuda.synchronize, repeat, number)
    return dict(torch=torch.__version__, eager_ms=round(eager, 4), cuda_graph_ms=round(graph, 4),
                device_ms=round(min(eager, graph), 4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="export-form ONNX models or zoo:NAME:SIZE")
    ap.add_argument("--torch", action="store_true", help="also time zoo models in FP32 PyTorch on the GPU")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--no-graph-too", action="store_true",
                    help="also time the model compiled without CUDA-graph replay (and profile its kernels)")
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--number", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    import tempfile

    from run_model import export_zoo

    tmp = tempfile.mkdtemp(prefix="bnnc-cuda-bench-")
    res = {}
    for spec in a.models:
        zoo = None
        path = spec
        if spec.startswith("zoo:"):
            _, zoo, size = spec.split(":")
            path = export_zoo(zoo, int(size), tmp)
        for b in a.batch:
            key = f"{os.path.basename(path)}@b{b}"
            r = dict(bnnc=bench_bnnc(path, b, a.repeat, a.number, a.no_graph_too))
            if a.torch and zoo:
                r["fp32_torch"] = bench_torch(zoo, int(size), b, a.repeat, a.number)
                r["speedup"] = round(r["fp32_torch"]["device_ms"] / r["bnnc"]["device_ms"], 2)
            res[key] = r
            print(key, json.dumps(r), flush=True)
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(a.out + ".tmp", a.out)
    return 0 if all(r["bnnc"]["same_top1"] for r in res.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
