"""Training loop for bnnc models: recipe defaults, progress bar, atomic checkpoints."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import load_dataset
from .errors import ModelFormatError
from .quantizers import ActivationQuantizer, WeightQuantizer
from .util import atomic_path

CHECKPOINT_FORMAT = "bnnc-checkpoint-1"


def _optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (adam, sgd)")


@torch.no_grad()
def predict_torch(model: torch.nn.Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits of a PyTorch model in eval mode, as float32 numpy."""
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def save_checkpoint(model: torch.nn.Module, path, **meta) -> None:
    """Write ``{"format", "model", "state_dict", ...meta}`` atomically (temp file, then rename)."""
    payload = {"format": CHECKPOINT_FORMAT, "model": getattr(model, "bnnc_name", None),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Load a bnnc checkpoint safely (``weights_only=True``) into ``model`` or a new registered model."""
    from . import models

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, pickle with code, wrong format
        raise ModelFormatError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelFormatError(f"{path}: not a bnnc checkpoint (no '{CHECKPOINT_FORMAT}' header); "
                               "published checkpoints of other repositories are imported with `bnnc import`")
    if model is None:
        name = payload.get("model")
        if not name:
            raise ModelFormatError(f"{path}: checkpoint does not name its model")
        model = models.create(name)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelFormatError(f"{path}: state dict does not match model: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model


def train(model: torch.nn.Module, dataset: str | None = None, *, epochs: int | None = None, out=None,
          batch_size: int | None = None, lr: float | None = None, data_path=None, seed: int = 0,
          limit: int | None = None, progress: bool = True) -> dict:
    """Train ``model`` with its recipe (overridable) and return ``{"history", "checkpoint", "test"}``.

    Checkpoints ``last.pt`` (every epoch) and ``best.pt`` are written atomically under ``out``.
    ``limit`` trains on the first N images only (smoke tests).
    """
    recipe = getattr(model, "bnnc_recipe", None)
    dataset = dataset or (recipe.dataset if recipe else None)
    if dataset is None:
        raise ValueError("train: no dataset given and the model has no recipe")
    epochs = epochs if epochs is not None else (recipe.epochs if recipe else 1)
    batch_size = batch_size or (recipe.batch_size if recipe else 128)
    lr = lr or (recipe.lr if recipe else 1e-3)
    if epochs < 1:
        raise ValueError("epochs must be ≥ 1")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, y_train = load_dataset(dataset, "train", data_path)
    x_test, y_test = load_dataset(dataset, "test", data_path)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
        x_test, y_test = x_test[:limit], y_test[:limit]
    opt = _optimizer(recipe.optimizer if recipe else "adam", model.parameters(), lr,
                     recipe.weight_decay if recipe else 0.0)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss()
    out = Path(out) if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    history, best = [], -1.0
    for epoch in range(epochs):
        model.train()
        for m in model.modules():  # schedules (EDE t/k, FDA n/α, RBNN T) advance once per epoch
            if isinstance(m, (ActivationQuantizer, WeightQuantizer)):
                m.on_epoch(epoch, epochs)
        perm = rng.permutation(len(x_train))
        t0, total, seen = time.time(), 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = perm[step * batch_size:(step + 1) * batch_size]
            xb, yb = torch.from_numpy(x_train[idx]), torch.from_numpy(y_train[idx])
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        logits = predict_torch(model, x_test)
        acc = float((logits.argmax(1) == y_test).mean())
        rec = {"epoch": epoch + 1, "train_loss": total / seen, "test_top1": acc, "seconds": time.time() - t0}
        history.append(rec)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: train loss {rec['train_loss']:.4f}, test top-1 {acc:.4f} "
                  f"({rec['seconds']:.0f} s)", flush=True)
        if out:
            save_checkpoint(model, out / "last.pt", epoch=epoch + 1, history=history)
            if acc > best:
                best = acc
                save_checkpoint(model, out / "best.pt", epoch=epoch + 1, history=history)
    model.eval()
    return {"history": history, "checkpoint": str(out / "last.pt") if out else None,
            "test_top1": history[-1]["test_top1"]}

