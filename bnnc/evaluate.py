"""Accuracy evaluation of any runnable model (PyTorch module or ``CompiledModel``) on a dataset split.

The evaluation protocol (dataset, split, images, batch size, drop-last, preprocessing) is part of every
result. Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank evaluates a contiguous shard of whole batches and
rank 0 gathers the logits (gloo), so the metrics equal those of one process exactly.
"""

from __future__ import annotations

import atexit
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_dataset

__all__ = ["metrics_from_logits", "predict", "evaluate", "EvalData", "open_eval_data", "format_protocol",
           "world", "is_main_process"]


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict:
    """top-1, top-5, mean cross-entropy loss and n, computed in float64."""
    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if n == 0:
        raise ValueError("no images to evaluate (empty split, --limit 0, or --drop-last with fewer images than "
                         "one batch)")
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(n), labels].mean())
    k = min(5, z.shape[1])
    topk = np.argsort(-z, axis=1, kind="stable")[:, :k]
    hit = topk[:, 0] == labels
    per_class = [float(hit[labels == c].mean()) if np.any(labels == c) else None for c in range(z.shape[1])]
    return {"top1": float(hit.mean()), "top5": float((topk == labels[:, None]).any(1).mean()),
            "loss": loss, "n": int(n), "per_class": per_class}


def _runner(model):
    if isinstance(model, torch.nn.Module):
        model.eval()

        def step(b):
            with torch.no_grad():
                return model(torch.from_numpy(b)).numpy()
        return step
    return model.run


def predict(model, x: np.ndarray, batch_size: int = 256, progress: bool = False, desc: str = "eval") -> np.ndarray:
    """Logits of ``model`` on ``x`` (float32 NCHW), in batches, with an optional progress bar."""
    step = _runner(model)
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        out.append(np.asarray(step(np.ascontiguousarray(x[i:i + batch_size])), np.float32))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------- data


class EvalData:
    """A dataset split addressable by index range: ``batches(start, stop, batch_size)`` yields
    ``(x float32 NCHW, y int64)``. Arrays in memory (Fashion-MNIST) or a ``torch.utils.data.Dataset``."""

    def __init__(self, name: str, split: str, size: int, preprocessing: str, arrays=None, dataset=None):
        self.name, self.split, self.size, self.preprocessing = name, split, size, preprocessing
        self._arrays, self._dataset = arrays, dataset

    def batches(self, start: int, stop: int, batch_size: int):
        if self._arrays is not None:
            x, y = self._arrays
            for i in range(start, stop, batch_size):
                j = min(i + batch_size, stop)
                yield x[i:j], y[i:j]
            return
        from torch.utils.data import DataLoader, Subset

        loader = DataLoader(Subset(self._dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                            num_workers=0)
        for xb, yb in loader:
            yield np.ascontiguousarray(np.asarray(xb, np.float32)), np.asarray(yb, np.int64)

    def arrays(self, n: int):
        """The first ``n`` images and labels as arrays."""
        xs, ys = zip(*self.batches(0, n, max(1, min(n, 256)))) if n else ((), ())
        return (np.concatenate(xs) if xs else np.zeros((0,), np.float32)), (np.concatenate(ys) if ys else
                                                                             np.zeros((0,), np.int64))


def open_eval_data(dataset: str, split: str, data_path=None) -> EvalData:
    """Fashion-MNIST from its IDX files; any other name through ``bnnc.data.build_dataset``."""
    from . import data

    if dataset == "fashion-mnist" or not hasattr(data, "build_dataset"):
        x, y = load_dataset(dataset, split, data_path)
        prep = (f"uint8 / 255, normalized with the training-set mean {FASHION_MNIST_MEAN} and std "
                f"{FASHION_MNIST_STD}; {'×'.join(map(str, x.shape[1:]))}") if dataset == "fashion-mnist" else ""
        return EvalData(dataset, split, len(y), prep, arrays=(x, y))
    ds = data.build_dataset(dataset, split, data_path)
    prep = getattr(ds, "preprocessing", None) or repr(getattr(ds, "transform", None) or "as built by "
                                                      f"bnnc.data.build_dataset({dataset!r}, {split!r})")
    return EvalData(dataset, split, len(ds), str(prep), dataset=ds)


# ----------------------------------------------------------------------------------------------- sharding


def world() -> tuple[int, int]:
    """(rank, world size) from the ``torchrun`` environment (``RANK``/``WORLD_SIZE``); (0, 1) without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return world()[0] == 0


def _init_distributed():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(_close_distributed)
    return dist


def _close_distributed():
    """At exit: wait for every rank, then tear the group down (a rank leaving gloo while a peer is still in a
    collective aborts the process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def shard_range(n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of rank ``rank``: a contiguous run of whole batches, so every batch is the one a
    single process would run (same per-image results, independent of the number of ranks)."""
    nb = -(-n // batch_size)
    b0, b1 = rank * nb // world_size, (rank + 1) * nb // world_size
    return min(b0 * batch_size, n), min(b1 * batch_size, n)


def _gather_rows(dist, arr: np.ndarray, world_size: int) -> np.ndarray:
    """All ranks' row blocks, concatenated in rank order (padded to the longest block for all_gather)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    count = torch.tensor([t.shape[0]], dtype=torch.int64)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(counts, count)
    m = int(max(c.item() for c in counts))
    pad = torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype)
    pad[: t.shape[0]] = t
    parts = [torch.zeros_like(pad) for _ in range(world_size)]
    dist.all_gather(parts, pad)
    return np.concatenate([p[: int(c.item())].numpy() for p, c in zip(parts, counts)])


# ----------------------------------------------------------------------------------------------- evaluate


def format_protocol(p: dict) -> str:
    """One line: what was evaluated and how (printed before the results)."""
    drop = (f"drop-last on ({p['dropped']} images of the last partial batch not evaluated)" if p["drop_last"]
            else "drop-last off")
    lim = f", --limit {p['limit']}" if p.get("limit") else ""
    shard = f", {p['world_size']} ranks (contiguous whole-batch shards)" if p.get("world_size", 1) > 1 else ""
    return (f"protocol: {p['dataset']}/{p['split']}, {p['images']} of {p['dataset_images']} images{lim}, "
            f"batch {p['batch_size']}, {drop}{shard}; preprocessing: {p['preprocessing'] or 'none'}")


def evaluate(model, dataset: str = "fashion-mnist", split: str = "test", *, batch_size: int = 256,
             data_path=None, limit: int | None = None, progress: bool = False, return_logits: bool = False,
             compare_to=None, drop_last: bool = False, distributed: bool | None = None) -> dict:
    """Evaluate a PyTorch module or a ``CompiledModel``: returns ``{"top1", "top5", "loss", "n",
    "per_class", "seconds", "images_per_s", "protocol"}`` (and ``"logits"`` when ``return_logits``). With
    ``compare_to`` (a second model) also ``"agreement"``: the fraction of images on which both predict the
    same class, and ``"compare_top1"``.

    ``drop_last`` evaluates only whole batches (as the seeds' MindSpore evaluations do: their published
    numbers are over ``N − N mod batch`` images). ``distributed`` (default: when ``WORLD_SIZE`` > 1) shards
    the images over the ``torchrun`` ranks; every rank returns the same result.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
    data = open_eval_data(dataset, split, data_path)
    n = data.size if limit is None else max(0, min(int(limit), data.size))
    if drop_last:
        n -= n % batch_size
    rank, world_size = world()
    if distributed is None:
        distributed = world_size > 1
    if not distributed:
        rank, world_size = 0, 1
    start, stop = shard_range(n, batch_size, rank, world_size)
    protocol = dict(dataset=dataset, split=split, images=int(n), dataset_images=int(data.size), limit=limit,
                    batch_size=int(batch_size), drop_last=bool(drop_last),
                    dropped=int((min(limit, data.size) if limit is not None else data.size) - n),
                    preprocessing=data.preprocessing, world_size=int(world_size))
    step = _runner(model)
    other = _runner(compare_to) if compare_to is not None else None
    t0 = time.perf_counter()
    logits, others, labels = [], [], []
    nb = -(-(stop - start) // batch_size)
    for xb, yb in tqdm(data.batches(start, stop, batch_size), total=nb, desc="eval",
                       disable=not progress or rank != 0, leave=False):
        logits.append(np.asarray(step(np.ascontiguousarray(xb)), np.float32))
        if other is not None:
            others.append(np.asarray(other(np.ascontiguousarray(xb)), np.float32))
        labels.append(yb)
    width = logits[0].shape[1] if logits else None
    logits = np.concatenate(logits) if logits else np.zeros((0, width or 0), np.float32)
    others = np.concatenate(others) if others else np.zeros((0, logits.shape[1]), np.float32)
    labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    if world_size > 1:
        dist = _init_distributed()
        w = torch.tensor([width or 0], dtype=torch.int64)  # a rank without images still takes part
        dist.all_reduce(w, op=dist.ReduceOp.MAX)
        logits = logits.reshape(-1, int(w.item()))
        others = others.reshape(-1, int(w.item()))
        logits, labels = _gather_rows(dist, logits, world_size), _gather_rows(dist, labels, world_size)
        if other is not None:
            others = _gather_rows(dist, others, world_size)
    seconds = time.perf_counter() - t0
    result = metrics_from_logits(logits, labels)
    result["seconds"] = seconds
    result["images_per_s"] = len(labels) / seconds if seconds > 0 else None
    result["protocol"] = protocol
    if other is not None:
        result["agreement"] = float((others.argmax(1) == logits.argmax(1)).mean())
        result["compare_top1"] = metrics_from_logits(others, labels)["top1"]
    if return_logits:
        result["logits"] = logits
    return result
