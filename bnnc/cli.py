"""The ``bnnc`` command line: train, export, fold, compile, eval, quickstart, models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """examples:
  bnnc quickstart                                   # train → export → compile → eval, one table
  bnnc train --model fmnist_bnn --epochs 4 --out runs/fm
  bnnc export runs/fm/last.pt -o model.onnx
  bnnc fold model.onnx -o model.deploy.onnx
  bnnc compile model.onnx --target cpu --runtime tvm -o model.bnnc
  bnnc eval model.bnnc --dataset fashion-mnist --split test --json
  bnnc import model.th --model adabin_resnet20 -o adabin.pt
  bnnc bench                                        # ResNet-18 layer shapes vs ORT FP32 and OpenVINO
"""


def _add_data(p):
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name (default: fashion-mnist)")
    p.add_argument("--data-path", help="folder with the dataset files (default: the Debian package's "
                                       "/usr/share/datasets/fashion-mnist, or $BNNC_FASHION_MNIST)")


def _threads(p):
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bnnc", description="Binary neural networks from PyTorch training to "
                                 "bit-packed XNOR-popcount kernels.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    ap.add_argument("--version", action="version", version=f"bnnc {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a zoo model, or run a published recipe (--recipe)",
                       description="Train a model from the zoo with its recipe (flags override it), or run a "
                                   "recipe file (--recipe NAME|FILE; `bnnc train --list-recipes`). Checkpoints "
                                   "(model, optimizer, LR schedule, RNG states, position in the epoch) are written "
                                   "atomically to OUT/last.pt every epoch and every --save-every steps, so "
                                   "--resume continues a killed run to the same weights; metrics go to "
                                   "OUT/metrics.csv and metrics.json. Under torchrun (WORLD_SIZE > 1) it trains "
                                   "with DistributedDataParallel (gloo on CPU, nccl on CUDA).")
    p.add_argument("--recipe", metavar="NAME|FILE", help="a shipped recipe name or a recipe .toml file")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--model", default=None, help="model name without --recipe (see `bnnc models`; default fmnist_bnn)")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's; with --recipe, of every stage)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--out", default=None, help="output folder (default runs/train, or runs/RECIPE with --recipe)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the recipe's, else 0)")
    p.add_argument("--limit", type=int, help="use only the first N images of each split (smoke tests)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (with --recipe)")
    p.add_argument("--save-every", type=int, metavar="N", help="also checkpoint every N optimizer steps (with --recipe)")
    p.add_argument("--amp", action="store_true", default=None, help="bf16 mixed precision (torch.autocast)")
    p.add_argument("--workers", type=int, help="data-loader worker processes (default: the recipe's)")
    p.add_argument("--teacher-checkpoint", metavar="PATH", help="weights of the recipe's distillation teacher")
    p.add_argument("--dataset", default=None, help="dataset name (default: the recipe's)")
    p.add_argument("--data-path", help="folder with the dataset files (default: $BNNC_<DATASET>, else "
                                       "/usr/share/datasets/<dataset>)")
    _threads(p)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (the export form, ai.bnnc ops)",
                       description="Export a bnnc checkpoint to ONNX. The file runs on stock ONNX Runtime "
                                   "(each ai.bnnc op carries its ONNX function body).")
    p.add_argument("checkpoint", help="a bnnc checkpoint (.pt) written by `bnnc train`")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--input-shape", help="input shape, e.g. 1,1,28,28 (default: the model's recipe)")

    p = sub.add_parser("fold", help="run the deploy passes: export form in, deploy form out",
                       description="Fold quantizer scales and BatchNorm into integer thresholds and pack "
                                   "binary weights: writes the deploy form (bit-packed ai.bnnc ops).")
    p.add_argument("model", help="export-form .onnx")
    p.add_argument("-o", "--output", required=True, help="output deploy-form .onnx")

    p = sub.add_parser("compile", help="compile an ONNX model into a runnable artifact",
                       description="Compile an export-form ONNX model for a runtime and target into an "
                                   "artifact folder (manifest.json + model + library) that `bnnc eval` "
                                   "and bnnc.load() accept.")
    p.add_argument("model", help="export-form .onnx (from `bnnc export`)")
    p.add_argument("-o", "--output", help="artifact path (default: MODEL with suffix .bnnc)")
    p.add_argument("--target", default="cpu", help="cpu (default: this machine, runnable here), arm (AArch64 NEON, "
                   "cross-compiled), cuda or cuda:sm_XX (sm_80 default; compiled with nvcc)")
    p.add_argument("--runtime", default="tvm", help="tvm (default, bit-packed kernels), ort (ONNX Runtime + "
                   "bnnc's custom-op library), ort-portable (standard ONNX ops only), reference (stock ONNX "
                   "Runtime on the export form), numpy (deploy-form reference executor)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="batch the model is compiled for (default 1; any batch runs, in calls of the compiled "
                        "size). On CPUs a batch above 8 is built for calls of up to 8 images (fewer for large "
                        "inputs) so activations stay in cache; CUDA builds the whole batch")
    _threads(p)

    p = sub.add_parser("eval", help="evaluate a model: top-1, top-5, loss, n",
                       description="Evaluate an artifact (.bnnc), an ONNX model (compiled on the fly for "
                                   "--runtime) or a bnnc checkpoint (.pt, in PyTorch) on a dataset split.")
    p.add_argument("model", help="model.bnnc, model.onnx or checkpoint.pt")
    p.add_argument("--runtime", default=None, help="for .onnx input: tvm (default), ort, ort-portable, reference "
                                                   "or numpy")
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--compare-to", metavar="SPEC", help="also run a second model and report prediction "
                   "agreement: a runtime name (for .onnx MODEL) or another model path")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--rpc", metavar="HOST:PORT", help="run a TVM artifact on the device serving TVM's RPC at "
                   "HOST:PORT (python -m tvm.exec.rpc_server on the device); its target must match the device")
    p.add_argument("--drop-last", action="store_true", help="evaluate whole batches only, as the seeds' "
                   "MindSpore evaluations do (their numbers are over N - N mod batch images)")
    p.add_argument("--layers", action="store_true", help="instead of accuracy: compare every intermediate value "
                   "of MODEL's runtime with --compare-to (default: reference) on the first --limit images "
                   "(default 64) and name the first layer whose output diverges")
    _add_data(p)
    _threads(p)

    p = sub.add_parser("quickstart", help="the whole path on Fashion-MNIST, offline, in a few minutes",
                       description="Train fmnist_bnn, export it, fold and compile it with TVM, evaluate the "
                                   "test split on PyTorch, reference ONNX Runtime and TVM, and print one table.")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default 4, ≈3–5 min on 2 cores)")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--limit", type=int, help="use only the first N images (smoke test)")
    _add_data(p)
    _threads(p)

    p = sub.add_parser("import", help="import a published PyTorch/MindSpore checkpoint into a bnnc checkpoint",
                       description="Strictly map a foreign checkpoint (.th/.pth/.pth.tar, or MindSpore .ckpt "
                                   "read without MindSpore) onto a zoo model and write a bnnc checkpoint that "
                                   "`bnnc export` and `bnnc eval` accept. Unmatched or misshapen keys are "
                                   "reported by name; no pickled code is ever executed.")
    p.add_argument("checkpoint", help="the published checkpoint")
    p.add_argument("-o", "--output", required=True, help="output bnnc checkpoint (.pt)")
    p.add_argument("--model", default="adabin_resnet20", help="zoo model to load it into (default adabin_resnet20)")
    p.add_argument("--format", choices=["torch", "mindspore"], help="file format (default: detected)")

    p = sub.add_parser("bench", help="benchmark kernels vs ONNX Runtime FP32 and OpenVINO, or a model end to end",
                       description="Per-layer benchmark on ResNet-18 3x3 shapes (batch 1; packing and epilogue "
                                   "included) against ONNX Runtime FP32 Conv and OpenVINO BinaryConvolution "
                                   "(pip install 'bnnc[peers]'), all interleaved in one run; or, given an "
                                   "export-form .onnx, the TVM artifact vs the reference end to end.")
    from . import bench as _bench

    _bench.add_arguments(p)

    p = sub.add_parser("inspect", help="per layer: binary or real, folded form, output mode, BOPs/FLOPs",
                       description="Show, per layer of an export-form model, whether it is binary or real, how "
                                   "the deploy passes fold it (integer threshold, float epilogue, pooling on bits, "
                                   "or float fallback and why), its output mode, and its BOPs/FLOPs at batch 1.")
    p.add_argument("model", help="export-form .onnx (from `bnnc export`)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("report", help="Markdown report of a run folder: model card, curves, accuracy, benchmarks",
                       description="One Markdown page per trained or compiled model under RUN_DIR: model card "
                                   "(recipe and the source of its published number), training curves "
                                   "(metrics.json/.csv or the checkpoint's history), accuracy per runtime "
                                   "(eval*.json from `bnnc eval --json`) and benchmark plots (bench*.json from "
                                   "`bnnc bench --json`). PNG plots are written next to the report.")
    p.add_argument("run_dir", help="run folder (e.g. runs/fm)")
    p.add_argument("-o", "--output", help="report path (default RUN_DIR/report.md)")

    sub.add_parser("models", help="list the registered models", description="List the model zoo.")

    p = sub.add_parser("ops", help="BOPs, FLOPs and OPs = BOPs/64 + FLOPs of a zoo model, per layer",
                       description="Count the operations of a zoo model (PyTorch, forward hooks, batch 1), per "
                                   "conv/dense layer and in total: BOPs = multiply-accumulates of binary layers "
                                   "(BinaryConv2d/BinaryLinear with binarized inputs), FLOPs = those of real "
                                   "layers, OPs = BOPs/64 + FLOPs. A 1w32a layer (binary weights, real inputs) "
                                   "counts as FLOPs. BatchNorm, activations, additions and pooling are not "
                                   "counted.")
    p.add_argument("--model", required=True, help="model name (see `bnnc models`)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="input height and width (default: the model's recipe)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def cmd_train(a):
    import bnnc

    if a.list_recipes:
        from .recipes import list_recipes, load_recipe

        for name in list_recipes():
            r = load_recipe(name)
            pub = f"{r.published.top1:g} % top-1" if r.published else "no published number"
            print(f"{name:36s} {r.model:24s} {r.dataset:14s} {pub}")
        return
    if a.recipe:
        import dataclasses

        from .recipes import load_recipe
        from .train import fit

        if a.model:
            raise bnnc.BnncError("--model and --recipe exclude each other (the recipe names its model)")
        recipe = load_recipe(a.recipe)
        if a.dataset:
            recipe = dataclasses.replace(recipe, dataset=a.dataset)
        r = fit(recipe, out=a.out or f"runs/{recipe.name}", data_path=a.data_path, epochs=a.epochs,
                batch_size=a.batch_size, lr=a.lr, seed=a.seed, limit=a.limit, resume=a.resume,
                save_every=a.save_every, amp=a.amp, workers=a.workers, teacher_checkpoint=a.teacher_checkpoint)
    else:
        if a.resume or a.save_every or a.teacher_checkpoint:
            raise bnnc.BnncError("--resume, --save-every and --teacher-checkpoint need --recipe")
        net = bnnc.models.create(a.model or "fmnist_bnn")
        r = bnnc.train(net, a.dataset, epochs=a.epochs, out=a.out or "runs/train",
                       batch_size=a.batch_size, lr=a.lr, data_path=a.data_path, seed=a.seed or 0, limit=a.limit)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {r['checkpoint']}  test top-1: {r['test_top1']:.4f}")


def cmd_export(a):
    import bnnc

    net = bnnc.load_checkpoint(a.checkpoint)
    shape = tuple(int(s) for s in a.input_shape.split(",")) if a.input_shape else None
    path = bnnc.export(net, a.output, input_shape=shape)
    print(f"wrote {path} ({os.path.getsize(path):,} bytes, export form)")


def cmd_fold(a):
    import bnnc

    bnnc.fold(a.model, a.output)
    print(f"wrote {a.output} ({os.path.getsize(a.output):,} bytes, deploy form)")


def cmd_compile(a):
    import bnnc

    cm = bnnc.compile(a.model, target=a.target, runtime=a.runtime, batch_size=a.batch_size, num_threads=a.threads)
    out = a.output or str(Path(a.model).with_suffix(".bnnc"))
    cm.save(out)
    print(f"wrote {out} (runtime {cm.runtime}, target {cm.target}, {cm.manifest['form']} form)")


def _open_model(path: str, runtime: str | None, threads, rpc: str | None = None):
    import bnnc

    p = Path(path)
    if p.is_dir() or p.suffix == ".bnnc":
        if runtime:
            raise bnnc.BnncError("--runtime applies to .onnx input; an artifact runs on the runtime it was compiled for")
        cm = bnnc.load(p, num_threads=threads, rpc=rpc)
        return cm, cm.runtime
    if rpc:
        raise bnnc.BnncError(f"--rpc needs a compiled artifact, not {path}: `bnnc compile {path} --target arm "
                             "-o model.bnnc` (or --target cpu for an x86-64 device) first")
    if p.suffix in (".pt", ".pth", ".th"):
        return bnnc.load_checkpoint(p), "pytorch"
    rt = runtime or "tvm"
    return bnnc.compile(p, runtime=rt, num_threads=threads), rt


def _eval_layers(a):
    from .divergence import compare_sides, format_layers, sides_from_args
    from .evaluate import format_protocol, open_eval_data

    side_a, side_b = sides_from_args(a.model, a.runtime, a.compare_to)
    data = open_eval_data(a.dataset, a.split, a.data_path)
    n = min(a.limit if a.limit is not None else 64, data.size)
    x, _ = data.arrays(n)
    protocol = dict(dataset=a.dataset, split=a.split, images=int(n), dataset_images=int(data.size), limit=n,
                    batch_size=int(n), drop_last=False, dropped=0, preprocessing=data.preprocessing, world_size=1)
    r = compare_sides(side_a, side_b, x, threads=a.threads)
    r["protocol"] = protocol
    if a.json:
        print(json.dumps(r))
    else:
        print(format_protocol(protocol))
        print(format_layers(r))


def cmd_eval(a):
    import bnnc
    from .evaluate import format_protocol, is_main_process

    if a.layers:
        if a.rpc:
            raise bnnc.BnncError("--layers runs on this machine; it cannot be combined with --rpc")
        return _eval_layers(a)
    model, runtime = _open_model(a.model, a.runtime, a.threads, rpc=a.rpc)
    other, other_name = None, None
    if a.compare_to:
        from .compile import RUNTIMES

        if a.compare_to in RUNTIMES:
            if Path(a.model).suffix != ".onnx":
                raise bnnc.BnncError("--compare-to RUNTIME needs an .onnx MODEL; pass another model path instead")
            other, other_name = _open_model(a.model, a.compare_to, a.threads)
        else:
            other, other_name = _open_model(a.compare_to, None, a.threads)
            other_name = f"{a.compare_to} [{other_name}]"
    r = bnnc.evaluate(model, a.dataset, a.split, batch_size=a.batch_size, data_path=a.data_path, limit=a.limit,
                      progress=not a.json, compare_to=other, drop_last=a.drop_last)
    r = {"model": a.model, "runtime": runtime, "dataset": a.dataset, "split": a.split, **r}
    if a.rpc:
        r["rpc"] = a.rpc
    if other is not None:
        r["compare_to"] = other_name
    if not is_main_process():  # under torchrun every rank holds the gathered result; rank 0 reports it
        return
    if a.json:
        print(json.dumps(r))
    else:
        print(format_protocol(r["protocol"]))
        print(f"{a.model} [{runtime}] {a.dataset}/{a.split}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  "
              f"loss {r['loss']:.4f}  n {r['n']}  ({r['images_per_s']:.0f} images/s)")
        print("per-class top-1: " + "  ".join(f"{c}:{v:.3f}" for c, v in enumerate(r["per_class"]) if v is not None))
        if other is not None:
            print(f"agreement with {other_name}: {r['agreement'] * 100:.2f} % (its top-1 {r['compare_top1']:.4f})")


def cmd_quickstart(a):
    from .quickstart import quickstart

    quickstart(epochs=a.epochs, out=a.out, data_path=a.data_path, limit=a.limit, threads=a.threads)


def cmd_import(a):
    from .checkpoints import convert_checkpoint

    out = convert_checkpoint(a.checkpoint, a.output, a.model, format=a.format)
    print(f"wrote {out} (model {a.model}, from {a.checkpoint})")


def cmd_bench(a):
    from . import bench

    rc = bench.run_from_args(a)
    if rc:
        raise SystemExit(rc)


def cmd_inspect(a):
    from .compile import read_onnx
    from .inspect import format_inspect, inspect_model
    from .passes.pipeline import check_bnnc_ops

    proto, _ = read_onnx(a.model)
    check_bnnc_ops(proto)
    report = inspect_model(proto)
    print(json.dumps(report) if a.json else format_inspect(report))


def cmd_models(a):
    from . import models

    names = models.names()
    width = max(map(len, names))
    for name in names:
        r = models.get_recipe(name)
        recipe = (f"{r.epochs} epochs ({r.optimizer}, lr {r.lr:g})" if r.epochs > 0
                  else "no published training recipe")
        print(f"{name:{width}s}  {r.dataset}, input {'×'.join(map(str, r.input_shape[1:]))}, {recipe}")


def cmd_ops(a):
    from . import models
    from .opcount import count_ops, format_ops

    shape = tuple(models.get_recipe(a.model).input_shape)
    if a.input_size:
        if min(a.input_size) <= 0:
            raise ValueError(f"--input-size must be positive, got {a.input_size[0]} {a.input_size[1]}")
        shape = (1, *shape[1:-2], *a.input_size)
    report = count_ops(models.create(a.model), (1, *shape[1:]))
    report["model"] = a.model
    print(json.dumps(report) if a.json else format_ops(report, a.model))


def cmd_report(a):
    from .report import write_report

    r = write_report(a.run_dir, a.output)
    print(f"wrote {r['report']} ({len(r['pages'])} model page(s), {len(r['plots'])} plot(s))")


COMMANDS = {"report": cmd_report, "train": cmd_train, "export": cmd_export, "fold": cmd_fold, "compile": cmd_compile, "eval": cmd_eval,
            "quickstart": cmd_quickstart, "import": cmd_import, "bench": cmd_bench, "inspect": cmd_inspect,
            "models": cmd_models, "ops": cmd_ops}


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if not a.command:
        ap.print_help()
        return 2
    if getattr(a, "threads", None) and a.command != "bench":
        os.environ["TVM_NUM_THREADS"] = str(a.threads)
        import torch

        torch.set_num_threads(a.threads)
    from .errors import BnncError

    try:
        COMMANDS[a.command](a)
    except (BnncError, FileNotFoundError, ValueError, NotADirectoryError, PermissionError) as e:
        print(f"bnnc {a.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bnnc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
