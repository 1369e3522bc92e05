"""Strict name/shape mapping of foreign checkpoints onto bnnc models.

A source name goes through, in order:

1. ``module.`` prefixes removed (DataParallel; also done by :func:`~bnnc.checkpoints.read_torch`);
2. the model's own renames (:data:`MAPPINGS`, regular expressions), e.g. AdaBin's
   ``convX.binary_a.alpha_a`` → ``convX.input_quantizer.alpha_a``;
3. MindSpore leaf names, only where the plain name has no place in the model and the renamed one lands on a
   normalisation layer: ``gamma``→``weight``, ``beta``→``bias``, ``moving_mean``→``running_mean``,
   ``moving_variance``→``running_var`` (methods.md §10.3).

Values: equal shapes load as they are; otherwise shapes that agree once size-1 axes are dropped (MindSpore's
Maxout (1, C, 1, 1) vs our (C,), scalars saved as (1,) or dims [0]) are reshaped; anything else is a shape
error. Floating values are cast to the model's dtype; integer buffers take integer values only.

Strict: every checkpoint tensor must land on a model entry and every model parameter/buffer must be filled,
except ``num_batches_tracked`` (absent from MindSpore files and from old PyTorch ones; set to 0 — it does not
affect evaluation). All problems are collected and raised together in one
:class:`~bnnc.errors.ModelFormatError` that names every offending key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ModelFormatError

__all__ = ["ModelMapping", "MAPPINGS", "register_mapping", "GENERIC", "MINDSPORE_LEAF_NAMES", "mapping_for", "map_state_dict",
           "load_tensors"]

MINDSPORE_LEAF_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                        "moving_variance": "running_var"}

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class ModelMapping:
    """How a model's reference checkpoints name its tensors.

    ``renames``: (regex, replacement) pairs applied in order with ``re.sub`` to each source name (after the
    ``module.`` prefix is removed). ``optional``: regexes of model entries a checkpoint may leave out (integer
    ones are set to 0, floating ones keep the model's value). ``prefixes``: source prefixes removed."""

    renames: tuple[tuple[str, str], ...] = ()
    optional: tuple[str, ...] = (r"(^|\.)num_batches_tracked$",)
    prefixes: tuple[str, ...] = ("module.",)
    notes: str = ""
    # regexes of model entries the reference stores flattened (see ``_unflatten`` below)
    flattened: tuple[str, ...] = ()

    def rename(self, name: str) -> str:
        for p in self.prefixes:
            while name.startswith(p):
                name = name[len(p):]
        for pattern, repl in self.renames:
            name = re.sub(pattern, repl, name)
        return name

    def is_optional(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.optional)


GENERIC = ModelMapping(notes="names as in the model; MindSpore BN leaf names; module. prefixes")

MAPPINGS: dict[str, ModelMapping] = {
    # EC huawei-noah/Efficient-Computing AdaBin cifar10 resnet20_1w1a (PyTorch, `module.` prefixed) and
    # MindSpore research/cv/AdaBin resnet20: the same module tree; the activation binariser is `binary_a`.
    "adabin_resnet20": ModelMapping(
        renames=((r"(^|\.)binary_a\.", r"\1input_quantizer."),),
        notes="convX.binary_a.{alpha_a,beta_a} -> convX.input_quantizer.*; BN gamma/beta/moving_* (MindSpore); "
              "Maxout (1,C,1,1) -> (C,)",
    ),
}


def register_mapping(name: str, mapping: ModelMapping) -> ModelMapping:
    """Declare how reference checkpoints of registered model ``name`` name their tensors.

    Model files call this next to their ``@register``, so a family's architecture and its checkpoint names
    live together."""
    if name in MAPPINGS and MAPPINGS[name] != mapping:
        raise ValueError(f"checkpoint mapping for {name!r} registered twice")
    MAPPINGS[name] = mapping
    return mapping


# model classes built directly (not through the registry, so without ``bnnc_name``) → registered name
_CLASS_NAMES = {"AdaBinResNet20": "adabin_resnet20"}


def mapping_for(model) -> ModelMapping:
    """The mapping for a registered model name or a model instance (its ``bnnc_name``, else its class)."""
    if isinstance(model, nn.Module):
        model = getattr(model, "bnnc_name", None) or _CLASS_NAMES.get(type(model).__name__)
    return MAPPINGS.get(model or "", GENERIC)


def _squeezed(shape) -> list[int]:
    return [int(d) for d in shape if d != 1]


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    arr = np.asarray(value)
    if arr.dtype.kind in "USO":
        raise TypeError(f"holds {arr.dtype.kind!r}-kind data (strings/objects), not numbers")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _fit(value: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """``value`` shaped and typed like ``target``, or (None, reason)."""
    if tuple(value.shape) != tuple(target.shape):
        if value.numel() != target.numel() or _squeezed(value.shape) != _squeezed(target.shape):
            return None, f"checkpoint shape {tuple(value.shape)} vs model {tuple(target.shape)}"
        value = value.reshape(target.shape)
    if target.dtype.is_floating_point and not value.dtype.is_floating_point:
        return None, f"checkpoint dtype {value.dtype} (integer) vs model {target.dtype}"
    if not target.dtype.is_floating_point and value.dtype.is_floating_point:
        return None, f"checkpoint dtype {value.dtype} (floating) vs model {target.dtype} (integer buffer)"
    return value.to(dtype=target.dtype).clone(), ""


# ---- flattened reference weights (methods.md §5.3, §11) -------------------------------------------------
# Bi-Real's and ReActNet-A's ``HardBinaryConv`` keep their weight as ``weights`` of shape (Cout·Cin·kh·kw, 1)
# and ``view`` it to (Cout, Cin, kh, kw) in forward. A mapping lists such model entries in ``flattened``; a
# checkpoint value for one of them with the same number of elements is reshaped the same way (C order).


def _unflatten(value: torch.Tensor, target: torch.Tensor, name: str, mapping: ModelMapping) -> torch.Tensor:
    if (tuple(value.shape) != tuple(target.shape) and value.numel() == target.numel()
            and any(re.search(p, name) for p in mapping.flattened)):
        return value.reshape(target.shape)
    return value


def _is_norm_leaf(model: nn.Module, key: str) -> bool:
    owner = key.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(owner), _NORMS)
    except AttributeError:
        return False


def map_state_dict(tensors: dict, model: nn.Module, mapping: ModelMapping | None = None,
                   source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map ``tensors`` (``{source name: tensor or array}``) onto ``model``'s state dict names, strictly.

    Returns a complete state dict for ``model``; raises :class:`ModelFormatError` listing every unmatched,
    missing, duplicated or misshapen key at once."""
    if mapping is None:
        mapping = mapping_for(model)
    target = model.state_dict(keep_vars=False)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    misshapen: list[str] = []
    duplicated: list[str] = []
    for src, value in tensors.items():
        name = mapping.rename(src)
        if name not in target:
            owner, _, leaf = name.rpartition(".")
            alt = f"{owner}.{MINDSPORE_LEAF_NAMES[leaf]}" if owner and leaf in MINDSPORE_LEAF_NAMES else None
            if alt is not None and alt in target and _is_norm_leaf(model, alt):
                name = alt
        shown = src if name == src else f"{src} (→ {name})"
        if name not in target:
            unexpected.append(shown)
            continue
        if name in origin:
            duplicated.append(f"{name} (from {origin[name]} and {src})")
            continue
        origin[name] = src
        try:
            t = _as_tensor(value)
        except TypeError as e:
            misshapen.append(f"{shown}: {e}")
            continue
        t = _unflatten(t, target[name], name, mapping)
        fitted, why = _fit(t, target[name])
        if fitted is None:
            misshapen.append(f"{shown}: {why}")
            continue
        out[name] = fitted
    missing = []
    for key, cur in target.items():
        if key in out or key in origin:
            continue
        if mapping.is_optional(key):
            out[key] = torch.zeros_like(cur) if not cur.dtype.is_floating_point else cur.detach().clone()
        else:
            missing.append(key)
    if unexpected or missing or misshapen or duplicated:
        name = getattr(model, "bnnc_name", None) or type(model).__name__
        parts = [f"{source}: checkpoint does not match model {name!r}"]
        if missing:
            parts.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            parts.append(f"unexpected in the checkpoint ({len(unexpected)}): " + ", ".join(unexpected))
        if misshapen:
            parts.append(f"wrong shape or type ({len(misshapen)}): " + "; ".join(misshapen))
        if duplicated:
            parts.append(f"filled twice ({len(duplicated)}): " + "; ".join(duplicated))
        raise ModelFormatError("\n  ".join(parts))
    return out


def load_tensors(model: nn.Module, tensors: dict, mapping: ModelMapping | None = None,
                 source: str = "checkpoint") -> nn.Module:
    """Fill ``model`` from ``tensors`` through :func:`map_state_dict` (strict); returns ``model``."""
    sd = map_state_dict(tensors, model, mapping, source)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # should not happen after map_state_dict; keep the error in bnnc's form
        raise ModelFormatError(f"{source}: {e}") from None
    return model
