"""``bnnc quickstart``: the whole path once, offline — train, export, fold, compile, evaluate, one table."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .compile import file_size


def _latency_ms(run, x1: np.ndarray, repeats: int = 200) -> float:
    """Median wall time of one batch-1 call, in ms (after warm-up)."""
    for _ in range(10):
        run(x1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(x1)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def quickstart(epochs: int = 4, out="runs/quickstart", data_path=None, limit=None, threads=None) -> dict:
    import torch

    import bnnc
    from .data import load_dataset
    from .evaluate import metrics_from_logits, predict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x_test, y_test = load_dataset("fashion-mnist", "test", data_path)  # fail fast if the data is missing
    if limit:
        x_test, y_test = x_test[:limit], y_test[:limit]
    print(f"[1/4] training fmnist_bnn for {epochs} epochs on Fashion-MNIST ({torch.get_num_threads()} threads)")
    net = bnnc.models.create("fmnist_bnn")
    bnnc.train(net, "fashion-mnist", epochs=epochs, out=out, data_path=data_path, limit=limit)
    print("[2/4] exporting to ONNX (export form) and folding (deploy form)")
    onnx_path = bnnc.export(net, out / "model.onnx", input_shape=(1, 1, 28, 28))
    bnnc.fold(onnx_path, out / "model.deploy.onnx")
    print("[3/4] compiling: reference ONNX Runtime, TVM bit-packed kernels")
    compiled = {"reference (ORT)": bnnc.compile(onnx_path, runtime="reference", num_threads=threads),
                "tvm": bnnc.compile(onnx_path, runtime="tvm", num_threads=threads)}
    compiled["tvm"].save(out / "model.bnnc")
    compiled["tvm"] = bnnc.load(out / "model.bnnc", num_threads=threads)
    print(f"[4/4] evaluating {len(y_test)} test images")
    rows = []
    ref_logits = predict(net, x_test, 500)
    ref_pred = ref_logits.argmax(1)
    x1 = x_test[:1]
    with torch.no_grad():
        torch_lat = _latency_ms(lambda b: net(torch.from_numpy(b)), x1)
    rows.append(("pytorch", metrics_from_logits(ref_logits, y_test), 1.0, file_size(onnx_path), torch_lat))
    for name, cm in compiled.items():
        logits = predict(cm, x_test, 500, progress=True, desc=name)
        agree = float((logits.argmax(1) == ref_pred).mean())
        size = file_size(onnx_path) if cm.runtime == "reference" else file_size(out / "model.deploy.onnx")
        rows.append((name, metrics_from_logits(logits, y_test), agree, size, _latency_ms(cm.run, x1)))
    print()
    print(f"fmnist_bnn on Fashion-MNIST test ({len(y_test)} images), batch-1 latency on "
          f"{os.cpu_count()} cores")
    header = f"{'runtime':18s} {'top-1':>7s} {'top-5':>7s} {'loss':>7s} {'agree w/ PyTorch':>17s} " \
             f"{'model file':>16s} {'latency':>10s}"
    print(header)
    print("-" * len(header))
    for name, m, agree, size, lat in rows:
        form = "export ONNX" if name != "tvm" else "deploy ONNX"
        print(f"{name:18s} {m['top1']:7.4f} {m['top5']:7.4f} {m['loss']:7.4f} {agree * 100:16.2f}% "
              f"{size / 1024:7.1f} KiB {form[:6]:>6s} {lat:7.3f} ms")
    print(f"\nmodel size: FP32 export form {file_size(onnx_path):,} B → deploy form {file_size(out / 'model.deploy.onnx'):,} B "
          f"({file_size(onnx_path) / file_size(out / 'model.deploy.onnx'):.1f}× smaller); artifact {out / 'model.bnnc'}")
    return {name: {"metrics": m, "agreement": agree, "size": size, "latency_ms": lat}
            for name, m, agree, size, lat in rows}
