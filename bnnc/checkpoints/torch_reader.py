"""PyTorch checkpoints of the seed repositories (``shared/spec/methods.md`` §11), read safely.

Only ``torch.load(weights_only=True)`` is used: tensors, plain containers and numbers load, anything that
would run code while unpickling (custom classes, ``nn.Module`` objects, ``__reduce__`` payloads) is refused
before it runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from ..errors import ModelFormatError

__all__ = ["read_torch", "unwrap_state_dict", "strip_prefix", "WRAPPER_KEYS"]

#: Keys under which the seed repositories nest the weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict", "network", "params")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap_state_dict(obj, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: the object itself when it maps names to tensors, else its
    ``state_dict`` / ``model`` / ``net`` … entry (recursively). Non-tensor entries of the state dict
    (epoch counters and the like stored beside the weights) are dropped."""
    for _ in range(4):
        if not isinstance(obj, dict):
            raise ModelFormatError(f"{where}: holds a {type(obj).__name__}, not a dict of tensors")
        if _is_state_dict(obj):
            return dict(obj)
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            keys = ", ".join(repr(k) for k in list(obj)[:12])
            raise ModelFormatError(f"{where}: no state dict found (top-level keys: {keys}; expected tensors "
                                   f"or one of {', '.join(WRAPPER_KEYS)})")
        obj = obj[inner]
    raise ModelFormatError(f"{where}: state dict nested too deeply")


def strip_prefix(sd: dict, prefix: str = "module.") -> dict:
    """Remove a ``DataParallel`` ``module.`` prefix (repeatedly: ``module.module.``) from every key having it."""
    out = {}
    for k, v in sd.items():
        while k.startswith(prefix):
            k = k[len(prefix):]
        if k in out:
            raise ModelFormatError(f"key {k!r} appears both with and without the {prefix!r} prefix")
        out[k] = v
    return out


def read_torch(path) -> dict[str, torch.Tensor]:
    """Read a PyTorch checkpoint (``.th``, ``.pt``, ``.pth``, ``.pth.tar``; zip or legacy format, saved on
    CPU or CUDA) into ``{name: CPU tensor}``: wrapped state dicts unwrapped, ``module.`` prefixes removed.

    Refuses (:class:`~bnnc.errors.ModelFormatError` naming the file) checkpoints that need code to unpickle,
    and truncated or corrupted files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelFormatError(f"{path}: empty file, not a PyTorch checkpoint")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only load failed" in msg or "GLOBAL" in msg:
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f"it references {found.group(1)}" if found else msg.splitlines()[0][:200] if msg else "?"
            raise ModelFormatError(
                f"{path}: refused: the checkpoint contains pickled code or objects other than tensors ({what}); "
                "bnnc loads only plain tensors and containers (torch.load weights_only=True) and ran none of "
                "it. If you trust the file, re-save its state_dict() from the training code.") from None
        raise ModelFormatError(f"{path}: corrupted PyTorch checkpoint ({msg[:300]})") from None
    except Exception as e:  # truncated zip, bad magic number, EOF, …
        raise ModelFormatError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupted "
                               f"({type(e).__name__}: {str(e)[:300]})") from None
    sd = unwrap_state_dict(obj, str(path))
    sd = strip_prefix(sd, "module.")
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}
