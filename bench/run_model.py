"""End-to-end latency of a model, or the zoo's end-to-end suite.

    python bench/run_model.py [MODEL.onnx] [--threads 1 2]     # one export-form model (bnnc.bench.run_model_bench)
    python bench/run_model.py --e2e [--repeat 11] [--out bench/results-<date>-e2e.json]

Without MODEL (and without --e2e), exports an untrained fmnist_bnn (the repo's spine model; latency does
not depend on the weights) to a temporary folder and benchmarks that.

``--e2e`` measures what issues #4 and #6 ask for, every ratio from contenders timed interleaved in one run
(round-robin blocks, the order rotating; median over rounds): Bi-Real-18 and ReActNet-18 (224×224, batch 1)
with bnnc TVM at 1 and 2 threads and with the ONNX Runtime custom-op library, against the same architecture
in FP32 on ONNX Runtime (:func:`bnnc.bench.fp32_twin`, all graph optimizations on); CIFAR ResNet-20
(``irnet_resnet20``) at batch 1 and 128; the wall time of ``bnnc compile`` (a fresh process, imports
included) for a ResNet-18 BNN; and the per-op time of bnnc TVM (the VM's instrumentation) so a missed
target shows where the time goes. Before timing, every bnnc contender's top-1 is checked against the
export form on the reference runtime. The networks have random weights and randomized BatchNorm
statistics (latency does not depend on the values).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))


def _randomized(name: str):
    import torch

    import bnnc

    torch.manual_seed(0)
    net = bnnc.models.create(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, t in list(net.named_parameters()) + list(net.named_buffers()):
            leaf = pname.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif leaf in ("running_mean", "bias"):
                t.copy_(0.2 * (torch.rand(t.shape, generator=g) - 0.5))
    return net.eval()


def export_zoo(name: str, size: int, folder: str) -> str:
    import bnnc

    path = os.path.join(folder, f"{name}_{size}.onnx")
    bnnc.export(_randomized(name), path, input_shape=(1, 3, size, size))
    return path


def measure(timers: dict, repeat: int, block_s: float) -> dict:
    from bnnc.bench import _interleaved, percentile

    rounds = _interleaved(timers, repeat, block_s, samples=True)
    return {n: dict(p50_ms=statistics.median(v) * 1e3, p90_ms=percentile(v, 90) * 1e3) for n, v in rounds.items()}


def tvm_op_profile(tvm_model, x, runs: int = 5, dev=None, sync: bool = False, min_ms: float = 0.001) -> dict:
    """Median ms per kernel symbol (summed over the kernel calls of one call of the model, i.e. of its call
    batch ``tvm_model.info["batch_size"]`` images) via the Relax VM's instrumentation, on ``dev`` (default
    the CPU); ``sync``: synchronize the device around each kernel (GPUs run them asynchronously)."""
    import numpy as np
    import tvm
    from tvm import relax

    dev = tvm.cpu() if dev is None else dev
    per_run = []
    cur: dict = collections.Counter()
    start = {}

    def instrument(func, sym, before, ret, *args):
        if sync:
            dev.sync()
        if before:
            start[sym] = time.perf_counter()
        else:
            cur[re.sub(r"_\d+$", "", str(sym))] += time.perf_counter() - start.pop(sym)
        return 0

    vm = relax.VirtualMachine(tvm_model.executable, dev)
    vm.set_instrument(instrument)
    xt = tvm.runtime.tensor(np.ascontiguousarray(x[: int(tvm_model.info.get("batch_size", len(x)))]), dev)
    for _ in range(runs + 1):
        cur.clear()
        vm["main"](xt)
        per_run.append(dict(cur))
    keys = set().union(*per_run[1:])
    prof = {k: statistics.median(r.get(k, 0.0) for r in per_run[1:]) * 1e3 for k in keys}
    return dict(sorted(((k, round(v, 4)) for k, v in prof.items() if v >= min_ms), key=lambda kv: -kv[1]))


def bench_model(path: str, batch: int, repeat: int, block_s: float, tvm_threads=(1,), ort_lib: bool = True,
                fp32_threads=(1,), profile: bool = True) -> dict:
    import numpy as np
    from bnnc.runtimes.ort import OrtDeployRunner
    from bnnc.runtimes.tvm import set_num_threads

    import bnnc
    from bnnc.bench import _ort_session, _py_timer, fp32_twin
    from bnnc.compile import read_onnx

    export, _ = read_onnx(path)
    deploy = bnnc.fold(export)
    fp32_bytes = fp32_twin(export).SerializeToString()
    shape = [batch] + [int(d.dim_value) for d in export.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = bnnc.compile(export, runtime="reference", num_threads=2).run(x)
    res = dict(model=os.path.basename(path), batch=batch, input_shape=shape, contenders={}, checks={})
    timers = {}
    t0 = time.perf_counter()
    tvm_m = bnnc.compile(deploy, runtime="tvm", batch_size=batch, num_threads=max(tvm_threads))
    res["tvm_compile_s_in_process"] = time.perf_counter() - t0
    res["tvm_call_batch"] = int(tvm_m._executor.info.get("batch_size", batch))  # images per kernel call
    # element-wise chains (residual add, bias, PReLU, Clip) fused with the PackSign after float binary convs
    res["tvm_fused_chains"] = getattr(tvm_m._executor, "info", {}).get("fused_chains")
    y = tvm_m.run(x)
    res["checks"]["bnnc-tvm"] = dict(same_top1=bool(np.array_equal(y.argmax(1), ref.argmax(1))),
                                     max_abs_diff=float(np.abs(y - ref).max()))
    for t in tvm_threads:
        timers[f"bnnc-tvm-{t}t"] = _py_timer(lambda: tvm_m.run(x), setup=lambda t=t: set_num_threads(t))
    if ort_lib:
        lib = OrtDeployRunner(deploy, num_threads=1, mode="library")
        y = lib.run(x)
        res["checks"]["bnnc-ort"] = dict(same_top1=bool(np.array_equal(y.argmax(1), ref.argmax(1))),
                                         max_abs_diff=float(np.abs(y - ref).max()))
        timers["bnnc-ort-1t"] = _py_timer(lambda: lib.run(x))
    for t in fp32_threads:
        s = _ort_session(fp32_bytes, t, optimize=True)
        name = s.get_inputs()[0].name
        timers[f"ort-fp32-{t}t"] = _py_timer(lambda s=s, name=name: s.run(None, {name: x}))
    res["contenders"] = measure(timers, repeat, block_s)
    c = {k: v["p50_ms"] for k, v in res["contenders"].items()}
    ratios = {}
    if "ort-fp32-1t" in c:
        for k in c:
            if k.startswith("bnnc-") and k.endswith("-1t"):
                ratios[f"{k[:-3]} vs ort-fp32 (1 thread)"] = c["ort-fp32-1t"] / c[k]
    if "bnnc-tvm-1t" in c and "bnnc-tvm-2t" in c:
        ratios["bnnc-tvm 2 threads vs 1"] = c["bnnc-tvm-1t"] / c["bnnc-tvm-2t"]
    if "ort-fp32-1t" in c and "ort-fp32-2t" in c:
        ratios["ort-fp32 2 threads vs 1"] = c["ort-fp32-1t"] / c["ort-fp32-2t"]
    res["ratios"] = ratios
    if profile:
        set_num_threads(1)
        res["tvm_op_profile_ms_1t"] = tvm_op_profile(tvm_m._executor, x)  # one call of tvm_call_batch images
    return res


def compile_wall_time(path: str) -> dict:
    """``bnnc compile MODEL --runtime tvm`` in a fresh process: wall seconds, imports included."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "model.bnnc")
        cmd = [sys.executable, "-m", "bnnc.cli", "compile", path, "--runtime", "tvm", "-o", out]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"bnnc compile failed: {r.stderr.strip().splitlines()[-1:]}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import bnnc, bnnc.runtimes.tvm"], check=True)
        imports = time.perf_counter() - t0
    return dict(model=os.path.basename(path), wall_s=wall, python_and_imports_s=imports)


def run_e2e(repeat: int, block_s: float, out: str | None) -> dict:
    import numpy as np  # noqa: F401
    import onnxruntime
    import tvm

    from bnnc import __version__

    result = dict(date=datetime.date.today().isoformat(), bnnc=__version__, tvm=tvm.__version__,
                  onnxruntime=onnxruntime.__version__, machine=platform.processor() or platform.machine(),
                  cores=len(os.sched_getaffinity(0)), loadavg_start=os.getloadavg(), repeat=repeat, runs=[])
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for name, size in (("bireal18", 224), ("reactnet18", 224), ("irnet_resnet20", 32)):
            print(f"exporting {name} at {size}×{size}", flush=True)
            paths[name] = export_zoo(name, size, d)
        result["compile"] = [compile_wall_time(paths[n]) for n in ("bireal18", "reactnet18")]
        print(json.dumps(result["compile"]), flush=True)
        for name in ("bireal18", "reactnet18"):
            r = bench_model(paths[name], 1, repeat, block_s, tvm_threads=(1, 2), fp32_threads=(1, 2))
            result["runs"].append(r)
            print(json.dumps({k: r[k] for k in ("model", "batch", "contenders", "ratios", "checks")}), flush=True)
        for b in (1, 128):
            r = bench_model(paths["irnet_resnet20"], b, repeat, block_s if b == 1 else 4 * block_s)
            result["runs"].append(r)
            print(json.dumps({k: r[k] for k in ("model", "batch", "contenders", "ratios", "checks")}), flush=True)
    result["loadavg_end"] = os.getloadavg()
    if out:
        from bnnc.util import atomic_path

        with atomic_path(out) as tmp:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
        print(f"wrote {out}")
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--e2e", action="store_true", help="the zoo's end-to-end suite (issues #4, #6)")
    ap.add_argument("--block-s", type=float, default=0.1)
    ap.add_argument("--out", help="--e2e: JSON file (default bench/results-<date>-e2e.json)")
    a = ap.parse_args()
    if a.e2e:
        out = a.out or os.path.join(HERE, f"results-{datetime.date.today().isoformat()}-e2e.json")
        run_e2e(a.repeat, a.block_s, out)
        return
    import bnnc
    from bnnc.bench import format_model_result, run_model_bench

    with tempfile.TemporaryDirectory() as d:
        path = a.model
        if path is None:
            import torch

            torch.manual_seed(0)
            net = bnnc.models.create("fmnist_bnn").eval()
            path = str(bnnc.export(net, os.path.join(d, "fmnist_bnn.onnx"), input_shape=(1, 1, 28, 28)))
        for t in a.threads:
            print(format_model_result(run_model_bench(path, threads=t, repeat=a.repeat)), flush=True)


if __name__ == "__main__":
    main()
