"""The model registry: a name maps to a constructor and the recipe it was designed with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: dataset, optimizer and schedule (data, not code)."""

    dataset: str
    input_shape: tuple[int, ...]
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float = 0.0
    schedule: str = "cosine"
    source: str = ""
    extra: dict = field(default_factory=dict)


_MODELS: dict[str, tuple[Callable[..., torch.nn.Module], Recipe]] = {}


def register(name: str, recipe: Recipe):
    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = (fn, recipe)
        return fn

    return wrap


def names() -> list[str]:
    return sorted(_MODELS)


def _lookup(name: str):
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(names())}") from None


def create(name: str, **kwargs) -> torch.nn.Module:
    fn, recipe = _lookup(name)
    model = fn(**kwargs)
    model.bnnc_name = name
    model.bnnc_recipe = recipe
    # constructor arguments travel with checkpoints so a non-default model reloads as it was built (only plain
    # values: a quantizer object cannot be stored in a weights-only checkpoint)
    model.bnnc_kwargs = {k: v for k, v in kwargs.items() if _plain(v)}
    return model


def _plain(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (str, int, float, bool))


def get_recipe(name: str) -> Recipe:
    return _lookup(name)[1]
