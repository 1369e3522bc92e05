"""Per-method training benchmark on Fashion-MNIST: ``python bench/methods_fmnist.py [--epochs 2] [--train-images N]``.

Trains ``fmnist_bnn`` once per binarization method with the same budget (epochs, batch size, optimizer and
LR schedule of its registered recipe, seed, images), swapping only the quantizers of its binary convs, and
records per method: test top-1 after the budget, the training loss, and wall time per epoch. Writes
``bench/methods-fmnist-<date>.json`` and ``bench/methods-fmnist.md`` (the table, the exact budget and the
machine). Checkpoints go to ``runs/methods-fmnist/<method>/last.pt``.

Methods (activation quantizer / weight quantizer, as each paper pairs them; formulas in methods.md):

    sign    sign STE / xnor          the fmnist_bnn baseline (XNOR-Net mean-|W| scale, straight-through)
    adabin  adabin / adabin          AdaBin §1.1–1.2
    ede     ede / libra_pb           IR-Net §3.1–3.2 (EDE backward on both)
    rbnn    rbnn / rbnn              RBNN §6.1–6.2 (rotations updated on each epoch's first batch)
    fda     fda / fda                FDA-BNN §2 (Fourier surrogate + noise adaptation)
    rsign   rsign / magnitude_aware  ReActNet §4.1 (learnable threshold; HardBinaryConv weights)

The per-epoch schedules of the quantizers (EDE t/k, FDA n/α, RBNN T) run over the budget's epochs, as
the trainer does for any run. Only the quantizers differ: no RPReLU, Maxout or shortcuts are added, so
the table compares binarizers on one architecture, not the papers' full models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = "fmnist_bnn"
BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Method:
    activation: str
    weight: str
    source: str


METHODS: dict[str, Method] = {
    "sign": Method("sign", "xnor", "sign/STE activations, XNOR-Net weights (the fmnist_bnn baseline)"),
    "adabin": Method("adabin", "adabin", "AdaBin (ECCV 2022)"),
    "ede": Method("ede", "libra_pb", "IR-Net (CVPR 2020): EDE + Libra-PB"),
    "rbnn": Method("rbnn", "rbnn", "RBNN (NeurIPS 2020)"),
    "fda": Method("fda", "fda", "FDA-BNN (NeurIPS 2021)"),
    "rsign": Method("rsign", "magnitude_aware", "ReActNet (ECCV 2020): RSign + HardBinaryConv weights"),
}


def _check_methods(methods) -> list[str]:
    methods = list(methods)
    if not methods:
        raise ValueError("no methods to benchmark")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; known: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods listed twice: {methods}")
    return methods


def build_model(method: str):
    """``fmnist_bnn`` with the weight quantizer of ``method`` and its activation quantizer on every binary
    conv (``fmnist_bnn`` takes only ``weight_quantizer=``; the input quantizers are replaced in place,
    before any forward, so lazily sized ones are sized by the trainer's first forward)."""
    import bnnc
    from bnnc.nn import BinaryConv2d
    from bnnc.quantizers import get_activation_quantizer

    m = METHODS[_check_methods([method])[0]]
    net = bnnc.models.create(MODEL, weight_quantizer=m.weight)
    for layer in net.modules():
        if isinstance(layer, BinaryConv2d):
            layer.input_quantizer = get_activation_quantizer(m.activation)
    return net


def machine_info() -> dict:
    """CPU model name and thread counts (``lscpu``; /proc/cpuinfo when lscpu is missing)."""
    import torch

    info = {"cpu": "", "cpus": os.cpu_count(), "threads_per_core": None, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=30).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", "")
        info["cpus"] = int(fields.get("CPU(s)", info["cpus"]))
        tpc = fields.get("Thread(s) per core")
        info["threads_per_core"] = int(tpc) if tpc and tpc.isdigit() else None
    except (OSError, subprocess.SubprocessError, ValueError):
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
    return info


def run_methods(methods=tuple(METHODS), *, epochs: int = 2, train_images: int | None = None,
                batch_size: int | None = None, lr: float | None = None, seed: int = 0, data_path=None,
                runs_dir="runs/methods-fmnist", progress: bool = True) -> dict:
    """Train ``fmnist_bnn`` once per method with one budget; return the benchmark document (a dict).

    ``train_images`` trains on the first N training images; ``bnnc.train(limit=N)`` also cuts the test
    split to its first N images, so the whole test split is evaluated while N ≥ its size (``budget``
    records both counts). Checkpoints: ``runs_dir/<method>/last.pt``.
    """
    import torch

    import bnnc

    methods = _check_methods(methods)
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    if train_images is not None and train_images < 1:
        raise ValueError(f"train_images must be ≥ 1, got {train_images}")
    from bnnc.data import load_dataset

    recipe = bnnc.models.get_recipe(MODEL)

    n_train = len(load_dataset("fashion-mnist", "train", data_path)[1])  # also: a missing dataset fails here
    n_test = len(load_dataset("fashion-mnist", "test", data_path)[1])
    limit = train_images
    used_train = min(limit, n_train) if limit else n_train
    used_test = min(limit, n_test) if limit else n_test
    budget = {"model": MODEL, "dataset": "fashion-mnist", "epochs": epochs,
              "batch_size": batch_size or recipe.batch_size, "optimizer": recipe.optimizer,
              "lr": lr or recipe.lr, "weight_decay": recipe.weight_decay,
              "schedule": f"{recipe.schedule}, stepped per batch over the budget's epochs", "seed": seed,
              "train_images": used_train, "train_images_available": n_train,
              "test_images": used_test, "test_images_available": n_test}
    results = {}
    runs_dir = Path(runs_dir)
    t_all = time.perf_counter()
    for i, name in enumerate(methods):
        m = METHODS[name]
        if progress:
            print(f"[{i + 1}/{len(methods)}] {name}: activations {m.activation}, weights {m.weight}", flush=True)
        torch.manual_seed(seed)  # the same initial conv / BN / linear weights for every method
        net = build_model(name)
        t0 = time.perf_counter()
        r = bnnc.train(net, "fashion-mnist", epochs=epochs, out=runs_dir / name, batch_size=batch_size, lr=lr,
                       data_path=data_path, seed=seed, limit=limit, progress=progress)
        wall = time.perf_counter() - t0
        hist = r["history"]
        last = hist[-1]
        epoch_s = [h["seconds"] for h in hist]
        results[name] = {
            "activation_quantizer": m.activation, "weight_quantizer": m.weight, "source": m.source,
            "test_top1": last["test_top1"], "test_top5": last["test_top5"], "test_loss": last["test_loss"],
            "train_loss": last["train_loss"], "train_top1": last["train_top1"],
            "epoch_seconds": epoch_s, "mean_epoch_seconds": sum(epoch_s) / len(epoch_s),
            "wall_seconds": wall, "steps": last["steps"], "checkpoint": r["checkpoint"], "history": hist,
        }
    return {"benchmark": "methods-fmnist", "date": datetime.date.today().isoformat(),
            "machine": machine_info(), "budget": budget, "total_seconds": time.perf_counter() - t_all,
            "timing": "epoch_seconds: one epoch's training pass plus its test pass (as the trainer logs it)",
            "methods": results}


def format_markdown(doc: dict) -> str:
    """The Markdown report: budget, machine, one row per method."""
    b, mach = doc["budget"], doc["machine"]
    subset = (f"the first {b['train_images']:,} of {b['train_images_available']:,} training images"
              if b["train_images"] < b["train_images_available"] else f"all {b['train_images']:,} training images")
    tpc = f", {mach['threads_per_core']} thread(s) per core" if mach.get("threads_per_core") else ""
    lines = [
        f"# Binarization methods on Fashion-MNIST ({doc['date']})",
        "",
        f"`{b['model']}` trained once per method with the same budget; only the quantizers of its binary "
        "convs differ. Generated by `bench/methods_fmnist.py`.",
        "",
        f"- budget: {b['epochs']} epoch(s) on {subset}, batch {b['batch_size']}, {b['optimizer']} lr {b['lr']:g} "
        f"(weight decay {b['weight_decay']:g}), {b['schedule']}, seed {b['seed']}; test top-1 on "
        f"{b['test_images']:,} of {b['test_images_available']:,} test images after the last epoch",
        f"- machine: {mach['cpu'] or 'unknown CPU'} ({mach['cpus']} CPUs{tpc}), torch {mach['torch']} with "
        f"{mach['torch_threads']} thread(s), Python {mach['python']}",
        f"- s/epoch = one epoch's training pass plus its test pass; total {doc['total_seconds'] / 60:.1f} min",
        *([f"- note: {doc['note']}"] if doc.get("note") else []),
        "",
        "| method | activations | weights | test top-1 | test loss | train loss | train top-1 | s/epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in doc["methods"].items():
        lines.append(f"| {name} | {r['activation_quantizer']} | {r['weight_quantizer']} | {r['test_top1']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['train_loss']:.4f} | {r['train_top1']:.4f} | "
                     f"{r['mean_epoch_seconds']:.1f} |")
    lines += ["", "train loss / top-1: the mean over the last epoch's batches (training mode). Method sources: "
              + "; ".join(f"{n}: {r['source']}" for n, r in doc["methods"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, out_dir=BENCH_DIR) -> tuple[Path, Path]:
    """Write ``methods-fmnist-<date>.json`` and ``methods-fmnist.md`` atomically; return their paths."""
    from bnnc.util import atomic_path

    out_dir = Path(out_dir)
    json_path = out_dir / f"methods-fmnist-{doc['date']}.json"
    md_path = out_dir / "methods-fmnist.md"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    with atomic_path(md_path) as tmp:
        tmp.write_text(format_markdown(doc))
    return json_path, md_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=None,
                    help="train on the first N training images (default all 60,000)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the fmnist_bnn recipe's (128)")
    ap.add_argument("--lr", type=float, default=None, help="default: the fmnist_bnn recipe's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--data-path", default=None, help="folder with the four Fashion-MNIST IDX files")
    ap.add_argument("--runs-dir", default="runs/methods-fmnist", help="where each method's checkpoints go")
    ap.add_argument("--out-dir", default=str(BENCH_DIR), help="where the JSON and Markdown go (default bench/)")
    ap.add_argument("--note", default=None, help="a line about the run conditions, kept in the JSON and Markdown")
    a = ap.parse_args(argv)
    import torch

    from bnnc.errors import BnncError

    if a.threads < 1:
        ap.error("--threads must be ≥ 1")
    torch.set_num_threads(a.threads)
    try:
        doc = run_methods(a.methods, epochs=a.epochs, train_images=a.train_images, batch_size=a.batch_size,
                          lr=a.lr, seed=a.seed, data_path=a.data_path, runs_dir=a.runs_dir)
        if a.note:
            doc["note"] = a.note
        json_path, md_path = write_outputs(doc, a.out_dir)
    except (BnncError, ValueError, FileNotFoundError) as e:
        print(f"methods_fmnist: error: {e}", file=sys.stderr)
        return 1
    print()
    print(format_markdown(doc))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
