"""Accuracy evaluation of any runnable model (PyTorch module or ``CompiledModel``) on a dataset split."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import load_dataset


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict:
    """top-1, top-5, mean cross-entropy loss and n, computed in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = float(-logp[np.arange(n), labels].mean())
    k = min(5, z.shape[1])
    topk = np.argsort(-z, axis=1, kind="stable")[:, :k]
    hit = topk[:, 0] == labels
    per_class = [float(hit[labels == c].mean()) if np.any(labels == c) else None for c in range(z.shape[1])]
    return {"top1": float(hit.mean()), "top5": float((topk == labels[:, None]).any(1).mean()),
            "loss": loss, "n": int(n), "per_class": per_class}


def predict(model, x: np.ndarray, batch_size: int = 256, progress: bool = False, desc: str = "eval") -> np.ndarray:
    """Logits of ``model`` on ``x`` (float32 NCHW), in batches, with an optional progress bar."""
    if isinstance(model, torch.nn.Module):
        model.eval()

        def step(b):
            with torch.no_grad():
                return model(torch.from_numpy(b)).numpy()
    else:
        step = model.run
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        out.append(np.asarray(step(np.ascontiguousarray(x[i:i + batch_size])), np.float32))
    return np.concatenate(out)


def evaluate(model, dataset: str = "fashion-mnist", split: str = "test", *, batch_size: int = 256,
             data_path=None, limit: int | None = None, progress: bool = False, return_logits: bool = False,
             compare_to=None) -> dict:
    """Evaluate a PyTorch module or a ``CompiledModel``: returns ``{"top1", "top5", "loss", "n",
    "per_class", "seconds", "images_per_s"}`` (and ``"logits"`` when ``return_logits``). With
    ``compare_to`` (a second model) also ``"agreement"``: the fraction of images on which both predict the
    same class, and ``"compare_top1"``."""
    x, y = load_dataset(dataset, split, data_path)
    if limit:
        x, y = x[:limit], y[:limit]
    t0 = time.perf_counter()
    logits = predict(model, x, batch_size, progress)
    result = metrics_from_logits(logits, y)
    result["seconds"] = time.perf_counter() - t0
    result["images_per_s"] = len(y) / result["seconds"] if result["seconds"] > 0 else None
    if compare_to is not None:
        other = predict(compare_to, x, batch_size, progress, desc="compare")
        result["agreement"] = float((other.argmax(1) == logits.argmax(1)).mean())
        result["compare_top1"] = metrics_from_logits(other, y)["top1"]
    if return_logits:
        result["logits"] = logits
    return result
