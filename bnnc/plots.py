"""PNG plots of benchmarks and trainings (matplotlib, Agg backend: no display needed). Each function writes
one PNG atomically and returns its path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .util import atomic_path

__all__ = ["plot_layer_latency", "plot_layer_speedup", "plot_model_latency", "plot_accuracy_vs_latency",
           "plot_training_curves"]

_COLORS = {"bnnc": "#1f77b4", "bnnc TVM": "#1f77b4", "bnnc ORT library": "#9467bd", "ORT FP32": "#ff7f0e", "OpenVINO": "#2ca02c", "reference": "#7f7f7f"}


def _figure(w=7.0, h=4.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h), dpi=110)
    return plt, fig, ax


def _save(plt, fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _bars(ax, labels, series: dict, ylabel: str, errors: dict | None = None):
    x = np.arange(len(labels))
    present = {k: v for k, v in series.items() if any(e is not None for e in v)}
    width = 0.8 / max(1, len(present))
    for i, (name, vals) in enumerate(present.items()):
        vals = np.array([np.nan if v is None else v for v in vals], float)
        err = None
        if errors and name in errors:
            hi = np.array([np.nan if v is None else v for v in errors[name]], float)
            err = np.vstack([np.zeros_like(vals), np.clip(hi - vals, 0, None)])
            err = np.nan_to_num(err)
        ax.bar(x + (i - (len(present) - 1) / 2) * width, vals, width, label=name, yerr=err, capsize=3,
               color=_COLORS.get(name))
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def plot_layer_latency(rows, path, title: str | None = None) -> Path:
    """Latency per layer shape (p50 bars, p90 whiskers) of bnnc (TVM backend, and the ONNX Runtime custom-op
    library where the rows have it), ORT FP32 and OpenVINO (layer-bench rows)."""
    plt, fig, ax = _figure()
    labels = [f"{r['shape']} ({r['threads']}t)" for r in rows]
    series = {"bnnc TVM": [r["bnnc_ms"] for r in rows], "ORT FP32": [r["ort_fp32_ms"] for r in rows],
              "OpenVINO": [r.get("openvino_ms") for r in rows]}
    p90 = {"bnnc TVM": [r.get("bnnc_p90_ms") for r in rows], "ORT FP32": [r.get("ort_fp32_p90_ms") for r in rows],
           "OpenVINO": [r.get("openvino_p90_ms") for r in rows]}
    if any(r.get("ort_lib_ms") is not None for r in rows):
        series["bnnc ORT library"] = [r.get("ort_lib_ms") for r in rows]
        p90["bnnc ORT library"] = [r.get("ort_lib_p90_ms") for r in rows]
    _bars(ax, labels, series, "latency (ms, batch 1; bar p50, whisker p90)", p90)
    ax.set_title(title or "binary 3×3 conv layer latency")
    return _save(plt, fig, path)


def plot_layer_speedup(rows, path, title: str | None = None) -> Path:
    """Speedup of bnnc per layer shape over ORT FP32 and over OpenVINO (> 1: bnnc is faster)."""
    plt, fig, ax = _figure()
    labels = [f"{r['shape']} ({r['threads']}t)" for r in rows]
    _bars(ax, labels, {"ORT FP32": [r["speedup_vs_ort"] for r in rows],
                       "OpenVINO": [r.get("ratio_vs_openvino") for r in rows]}, "speedup of bnnc (×)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_title(title or "bnnc speedup per layer shape")
    return _save(plt, fig, path)


def plot_model_latency(result: dict, path) -> Path:
    """Latency (p50, p90 whiskers) per batch size of each contender of a model bench."""
    plt, fig, ax = _figure()
    batches = result["batches"]
    labels = [f"batch {b['batch']}" for b in batches]
    names = list(batches[0]["contenders"])
    series = {n: [b["contenders"][n]["p50_ms"] for b in batches] for n in names}
    p90 = {n: [b["contenders"][n]["p90_ms"] for b in batches] for n in names}
    _bars(ax, labels, series, "latency per batch (ms; bar p50, whisker p90)", p90)
    ax.set_title(f"{Path(result['model']).name}, {result['threads']} thread(s)")
    return _save(plt, fig, path)


def plot_accuracy_vs_latency(points, path, title: str = "accuracy vs latency") -> Path:
    """``points``: ``[{"label", "latency_ms", "top1"}]`` → a labelled scatter."""
    plt, fig, ax = _figure(6.0, 4.0)
    for p in points:
        ax.scatter([p["latency_ms"]], [p["top1"] * 100], s=40)
        ax.annotate(p["label"], (p["latency_ms"], p["top1"] * 100), textcoords="offset points", xytext=(5, 4))
    ax.set_xlim(0, max(p["latency_ms"] for p in points) * 1.3 if points else 1)
    ax.margins(y=0.2)
    ax.set_xlabel("latency (ms, batch 1, p50)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _save(plt, fig, path)


def plot_training_curves(history, path, title: str = "training") -> Path:
    """Per-epoch records (``epoch`` and any of ``train_loss``, ``test_loss``, ``train_top1``, ``test_top1``,
    ``lr``): losses on the left axis, accuracies on the right, the learning rate in a second panel if any."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
    has_lr = any("lr" in r for r in history)
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(7, 5.5 if has_lr else 4), dpi=110, sharex=True,
                             squeeze=False)
    ax = axes[0, 0]

    def series(key):
        return [r.get(key, np.nan) if r.get(key) is not None else np.nan for r in history]

    loss_keys = [k for k in ("train_loss", "test_loss", "val_loss") if any(k in r for r in history)]
    acc_keys = [k for k in ("train_top1", "test_top1", "val_top1", "test_top5") if any(k in r for r in history)]
    for k in loss_keys:
        ax.plot(epochs, series(k), marker="o", ms=3, label=k)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if acc_keys:
        ax2 = ax.twinx()
        for k, color in zip(acc_keys, ("tab:green", "tab:red", "tab:olive", "tab:cyan")):
            ax2.plot(epochs, [v * 100 for v in series(k)], "--", marker="s", ms=3, label=k, color=color)
        ax2.set_ylabel("accuracy (%)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="best", fontsize="small")
    elif loss_keys:
        ax.legend()
    ax.set_title(title)
    if has_lr:
        axes[1, 0].plot(epochs, series("lr"), color="tab:purple")
        axes[1, 0].set_ylabel("learning rate")
        axes[1, 0].grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("epoch")
    return _save(plt, fig, path)
