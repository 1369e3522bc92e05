"""Import published checkpoints of the seed repositories into bnnc models.

    from bnnc.checkpoints import import_checkpoint, read_torch, read_mindspore
    net = import_checkpoint("model.th", model="adabin_resnet20")      # PyTorch (EC AdaBin), strict
    net = import_checkpoint("adabin.ckpt", model="adabin_resnet20")   # MindSpore, no MindSpore needed
    convert_checkpoint("model.th", "adabin.pt")                       # → a bnnc checkpoint (`bnnc export`)

Readers return ``{name: tensor}``: :func:`read_torch` (``torch.load(weights_only=True)``, wrapped state
dicts and ``module.`` prefixes handled, pickled code refused) and :func:`read_mindspore` (protobuf wire
format decoded in pure Python: concatenated messages, sliced tensors, old/new type names, CRC trailer,
optimizer entries left out). :func:`import_checkpoint` maps the names onto a registered model strictly
(:mod:`bnnc.checkpoints.mapping`) and raises :class:`~bnnc.errors.ModelFormatError` naming every key that
does not fit.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..errors import ModelFormatError
from .mapping import GENERIC, MAPPINGS, ModelMapping, load_tensors, map_state_dict, mapping_for
from .mindspore_reader import is_optimizer_entry, read_mindspore
from .torch_reader import read_torch, strip_prefix, unwrap_state_dict

__all__ = [
    "import_checkpoint",
    "convert_checkpoint",
    "read_checkpoint",
    "detect_format",
    "read_torch",
    "read_mindspore",
    "load_tensors",
    "map_state_dict",
    "mapping_for",
    "is_optimizer_entry",
    "unwrap_state_dict",
    "strip_prefix",
    "ModelMapping",
    "MAPPINGS",
    "GENERIC",
    "FORMATS",
]

FORMATS = ("torch", "mindspore")
_TORCH_SUFFIXES = (".th", ".pt", ".pth", ".tar", ".pkl", ".bin")
# model families whose modules register themselves on import (until models/__init__ imports them)
_MODEL_MODULES = {"adabin_resnet20": "bnnc.models.adabin"}


def detect_format(path) -> str:
    """``"torch"`` (zip or pickle magic) or ``"mindspore"`` (a protobuf ``Checkpoint``: first byte 0x0A),
    by content; by suffix (``.ckpt`` → mindspore, ``.th/.pt/.pth/.pth.tar`` → torch) when the content
    does not say."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if head[:1] == b"\x0a":
        return "mindspore"
    name = path.name.lower()
    if name.endswith(".ckpt"):
        return "mindspore"
    if name.endswith(_TORCH_SUFFIXES):
        return "torch"
    raise ModelFormatError(f"{path}: unknown checkpoint format (neither a PyTorch zip/pickle file nor a "
                           f"MindSpore .ckpt; first bytes {head!r})")


def read_checkpoint(path, format: str | None = None) -> tuple[dict, str]:
    """``({name: tensor or array}, format)`` for a PyTorch or MindSpore checkpoint (``format`` detected
    when None)."""
    fmt = format or detect_format(path)
    if fmt == "torch":
        return read_torch(path), fmt
    if fmt == "mindspore":
        return read_mindspore(path), fmt
    raise ValueError(f"unknown checkpoint format {format!r}; known: {', '.join(FORMATS)}")


def _make_model(model) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    from .. import models

    if model in _MODEL_MODULES:
        importlib.import_module(_MODEL_MODULES[model])
    return models.create(model)


def import_checkpoint(path, model="adabin_resnet20", *, format: str | None = None,
                      mapping: ModelMapping | None = None) -> torch.nn.Module:
    """Load a published checkpoint (PyTorch or MindSpore) into ``model`` (a registered name or a module),
    strictly: every checkpoint tensor must land on a model entry and every parameter/buffer must be filled.

    Returns the model in eval mode, with ``bnnc_source`` (the file) and ``bnnc_source_format`` set.
    Raises :class:`~bnnc.errors.ModelFormatError` naming every unmatched / missing / misshapen key at once,
    or the problem with the file (truncated, corrupted, pickled code, CRC mismatch)."""
    net = _make_model(model)
    tensors, fmt = read_checkpoint(path, format)
    if mapping is None:
        mapping = mapping_for(model if isinstance(model, str) else net)
    load_tensors(net, tensors, mapping, source=str(path))
    net.bnnc_source = str(path)
    net.bnnc_source_format = fmt
    return net.eval()


def convert_checkpoint(path, output, model="adabin_resnet20", *, format: str | None = None) -> Path:
    """Import ``path`` (:func:`import_checkpoint`) and write it as a bnnc checkpoint (the ``bnnc train``
    format, loadable by ``bnnc.load_checkpoint`` / ``bnnc export``). Returns the output path."""
    from ..train import save_checkpoint

    net = import_checkpoint(path, model, format=format)
    save_checkpoint(net, output, source=str(path), source_format=net.bnnc_source_format)
    return Path(output)
