"""``bnnc report RUN_DIR``: one Markdown page per trained or compiled model found under a run folder, with
its model card, training curves, accuracy per runtime (saved ``bnnc eval --json`` outputs) and benchmark
plots (saved ``bnnc bench --json`` outputs). Plots are PNG files written next to the report."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from .errors import BnncError, ModelFormatError
from .util import atomic_path

__all__ = ["find_runs", "read_history", "write_report"]

_CKPTS = ("last.pt", "best.pt")
_METRICS = ("metrics.json", "metrics.csv", "metrics.jsonl")


def _is_artifact(p: Path) -> bool:
    return p.is_dir() and (p / "manifest.json").is_file()


def _artifacts(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if _is_artifact(p))


def _evidence(d: Path) -> bool:
    return (any((d / f).is_file() for f in _CKPTS + _METRICS) or any(d.glob("eval*.json"))
            or any(d.glob("bench*.json")) or bool(_artifacts(d)))


def find_runs(run_dir) -> list[Path]:
    """Folders under ``run_dir`` (itself included) holding a checkpoint, training metrics, eval or bench
    results, or a compiled artifact. Artifact folders belong to the folder that holds them."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} does not exist")
    out = []
    stack = [root]
    while stack:
        d = stack.pop()
        if _evidence(d):
            out.append(d)
        stack += sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and not _is_artifact(p)),
                        reverse=True)
    return sorted(out)


# ----------------------------------------------------------------------------------------------- readers


def _num(v):
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and isinstance(v, str) and "." not in v and "e" not in v.lower() else f


def _read_json(path: Path):
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{path}: not a text file ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{path}: not JSON or JSON lines ({e})") from None


def _load_checkpoint_payload(path: Path) -> dict:
    import torch

    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - report any unreadable file by name
        raise ModelFormatError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict):
        raise ModelFormatError(f"{path}: not a bnnc checkpoint")
    return payload


def read_history(d: Path) -> tuple[list[dict], str | None]:
    """Per-epoch records of a run: ``metrics.json`` (a list, ``{"history": [...]}`` or JSON lines),
    ``metrics.csv``, else the ``history`` a bnnc checkpoint stores. Returns (records, source file)."""
    d = Path(d)
    for name in ("metrics.json", "metrics.jsonl"):
        p = d / name
        if p.is_file():
            data = _read_json(p)
            if isinstance(data, dict):
                data = data.get("history") or data.get("epochs") or data.get("records") or [data]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise ModelFormatError(f"{p}: expected a list of per-epoch records")
            return data, name
    p = d / "metrics.csv"
    if p.is_file():
        with open(p, newline="") as f:
            return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)], "metrics.csv"
    for name in _CKPTS:
        if (d / name).is_file():
            hist = _load_checkpoint_payload(d / name).get("history")
            if hist:
                return list(hist), name
    return [], None


def _model_info(d: Path) -> dict:
    info = {}
    for name in _CKPTS:
        p = d / name
        if p.is_file():
            payload = _load_checkpoint_payload(p)
            sd = payload.get("state_dict") or {}
            info.setdefault("checkpoints", []).append(
                dict(file=name, epoch=payload.get("epoch"),
                     parameters=int(sum(v.numel() for k, v in sd.items() if hasattr(v, "numel")
                                        and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))))))
            info.setdefault("model", payload.get("model"))
    return info


def _evals(d: Path) -> list[dict]:
    out = []
    for p in sorted(d.glob("eval*.json")):
        data = _read_json(p)
        for r in (data if isinstance(data, list) else [data]):
            if not isinstance(r, dict) or "top1" not in r:
                raise ModelFormatError(f"{p}: not a `bnnc eval --json` result (no top1)")
            out.append(dict(r, _file=p.name))
    return out


def _benches(d: Path) -> list[tuple[str, object]]:
    out = []
    for p in sorted(d.glob("bench*.json")):
        data = _read_json(p)
        if isinstance(data, dict) and "rows" in data:
            out.append((p.name, data))
        elif isinstance(data, dict) and "batches" in data:
            out.append((p.name, [data]))
        elif isinstance(data, list) and data and all(isinstance(r, dict) and "batches" in r for r in data):
            out.append((p.name, data))
        else:
            raise ModelFormatError(f"{p}: not a `bnnc bench --json` result (layer rows or model batches)")
    return out


# ----------------------------------------------------------------------------------------------- page


def _f(v, fmt="{:.4f}"):
    return "—" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))


def _slug(d: Path, root: Path) -> str:
    rel = d.relative_to(root).as_posix() if d != root else root.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", rel).strip("_") or "run"


def _model_card(d: Path, info: dict, evals: list) -> list[str]:
    from . import models

    name = info.get("model")
    lines = ["## Model card", "", "| | |", "|---|---|", f"| model | `{name or 'unknown'}` |"]
    if name:
        try:
            r = models.get_recipe(name)
        except ValueError:
            lines.append("| recipe | not in this bnnc's zoo |")
        else:
            lines += [f"| dataset | {r.dataset}, input {tuple(r.input_shape)} |",
                      f"| recipe | {r.epochs} epochs, batch {r.batch_size}, {r.optimizer} lr {r.lr:g}, "
                      f"weight decay {r.weight_decay:g}, {r.schedule} |",
                      f"| published number / source | {r.source or '—'} |"]
    for c in info.get("checkpoints", []):
        lines.append(f"| checkpoint | `{c['file']}` (epoch {_f(c['epoch'], '{}')}, {c['parameters']:,} parameters) |")
    from .compile import file_size

    for a in _artifacts(d):
        try:
            m = json.loads((a / "manifest.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            m = {}
        lines.append(f"| artifact | `{a.name}` (runtime {m.get('runtime', '?')}, target {m.get('target', '?')}, "
                     f"{m.get('form', '?')} form, {file_size(a):,} bytes) |")
    return lines + [""]


def _training(d, history, source, stem, out_dir) -> tuple[list[str], list[Path]]:
    from .plots import plot_training_curves

    if not history:
        return [], []
    png = out_dir / f"{stem}_training.png"
    plot_training_curves(history, png, title=f"training ({source})")
    keys = [k for k in ("epoch", "train_loss", "test_loss", "train_top1", "test_top1", "lr") if
            any(k in r for r in history)]
    lines = ["## Training", "", f"From `{source}`, {len(history)} epochs.", "", f"![training curves]({png.name})", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in history:
        lines.append("| " + " | ".join(_f(r.get(k), "{}" if k == "epoch" else "{:.4g}" if k == "lr" else "{:.4f}")
                                       for k in keys) + " |")
    accs = [(r.get("test_top1"), r.get("epoch", i + 1)) for i, r in enumerate(history) if r.get("test_top1") is not None]
    if accs:
        best = max(accs, key=lambda t: t[0])
        lines += ["", f"Best test top-1 {best[0]:.4f} at epoch {best[1]}; last {accs[-1][0]:.4f}."]
    return lines + [""], [png]


def _accuracy(evals) -> list[str]:
    if not evals:
        return []
    lines = ["## Accuracy per runtime", "",
             "| file | model | runtime | dataset/split | n | top-1 | top-5 | loss | agreement | protocol |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in evals:
        p = r.get("protocol") or {}
        proto = (f"batch {p.get('batch_size')}, drop-last {'on' if p.get('drop_last') else 'off'}, "
                 f"{p.get('images')} of {p.get('dataset_images')} images") if p else "—"
        agree = (f"{r['agreement'] * 100:.2f} % vs {r.get('compare_to', '?')}" if r.get("agreement") is not None
                 else "—")
        lines.append(f"| `{r['_file']}` | `{r.get('model', '?')}` | {r.get('runtime', '?')} | "
                     f"{r.get('dataset', '?')}/{r.get('split', '?')} | {_f(r.get('n'), '{}')} | {_f(r['top1'])} | "
                     f"{_f(r.get('top5'))} | {_f(r.get('loss'))} | {agree} | {proto} |")
    return lines + [""]


def _bench(benches, evals, stem, out_dir) -> tuple[list[str], list[Path]]:
    from . import bench as B

    if not benches:
        return [], []
    lines, pngs = ["## Benchmarks", ""], []
    acc = {r["runtime"]: r["top1"] for r in evals if "runtime" in r}
    for k, (fname, data) in enumerate(benches):
        sub = out_dir / f"{stem}_bench{k}"
        if isinstance(data, dict):
            rows = data["rows"]
            lines += [f"### Layers (`{fname}`)", "",
                      "| shape | threads | bnnc ms p50 | p90 | ORT FP32 ms | OpenVINO ms | speedup vs ORT | vs OpenVINO |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['shape']} | {r['threads']} | {_f(r['bnnc_ms'], '{:.3f}')} | "
                             f"{_f(r.get('bnnc_p90_ms'), '{:.3f}')} | {_f(r['ort_fp32_ms'], '{:.3f}')} | "
                             f"{_f(r.get('openvino_ms'), '{:.3f}')} | {_f(r['speedup_vs_ort'], '{:.1f}×')} | "
                             f"{_f(r.get('ratio_vs_openvino'), '{:.2f}×')} |")
            named = B.write_plots(data, out_dir, prefix=f"{sub.name}_")
            lines += [""] + [f"![{p.stem}]({p.name})" for p in named] + [""]
            pngs += named
        else:
            for r in data:
                lines += [f"### {Path(r['model']).name}, {r['threads']} thread(s) (`{fname}`)", "",
                          "| batch | contender | p50 ms | p90 ms | images/s |", "|---|---|---|---|---|"]
                for b in r["batches"]:
                    for name, c in b["contenders"].items():
                        lines.append(f"| {b['batch']} | {name} | {c['p50_ms']:.3f} | {c['p90_ms']:.3f} | "
                                     f"{c['images_per_s']:.1f} |")
                if r.get("file_bytes"):
                    lines += ["", "File sizes: " + ", ".join(f"{k} {v:,} B" for k, v in r["file_bytes"].items()) + "."]
                if r.get("peak_rss_bytes"):
                    lines += ["", "Peak RSS (fresh process): " + ", ".join(
                        f"{k} {v / 2**20:.1f} MiB" for k, v in r["peak_rss_bytes"].items()) + "."]
            named = B.write_plots(data, out_dir, acc, prefix=f"{sub.name}_")
            lines += [""] + [f"![{p.stem}]({p.name})" for p in named] + [""]
            pngs += named
    return lines, pngs


def _page(d: Path, root: Path, stem: str, out_dir: Path) -> tuple[str, list[Path], str]:
    info = _model_info(d)
    evals = _evals(d)
    history, source = read_history(d)
    title = info.get("model") or d.name
    lines = [f"# {title}", "", f"Run folder: `{d}`", ""]
    lines += _model_card(d, info, evals)
    t, p1 = _training(d, history, source, stem, out_dir)
    a = _accuracy(evals)
    b, p2 = _bench(_benches(d), evals, stem, out_dir)
    lines += t + a + b
    if not (t or a or b):
        lines += ["No training metrics, evaluations or benchmarks in this folder.", ""]
    return "\n".join(lines), p1 + p2, title


def write_report(run_dir, output=None) -> dict:
    """Write the report of ``run_dir`` to ``output`` (default ``RUN_DIR/report.md``): the model's page, or
    with several models an index linking one page per model (``<output stem>_<folder>.md``).
    Returns ``{"report", "pages", "plots"}``."""
    root = Path(run_dir)
    runs = find_runs(root)
    if not runs:
        raise BnncError(f"no trained or compiled model under {root}: expected last.pt/best.pt, metrics.json/.csv, "
                        "eval*.json, bench*.json or a .bnnc artifact")
    output = Path(output) if output else root / "report.md"
    out_dir = output.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    pages, plots = [], []
    if len(runs) == 1:
        text, pngs, _ = _page(runs[0], root, output.stem, out_dir)
        with atomic_path(output) as tmp:
            tmp.write_text(text)
        return {"report": output, "pages": [output], "plots": pngs}
    index = [f"# bnnc report: {root}", "", "| model | folder | page |", "|---|---|---|"]
    for d in runs:
        stem = f"{output.stem}_{_slug(d, root)}"
        text, pngs, title = _page(d, root, stem, out_dir)
        page = out_dir / f"{stem}.md"
        with atomic_path(page) as tmp:
            tmp.write_text(text)
        pages.append(page)
        plots += pngs
        index.append(f"| {title} | `{d}` | [{page.name}]({page.name}) |")
    with atomic_path(output) as tmp:
        tmp.write_text("\n".join(index) + "\n")
    return {"report": output, "pages": pages, "plots": plots}
