"""Model zoo: one registry, ``create(name, **kw)`` and ``names()``; one file per family with its recipe."""

from __future__ import annotations

from ._registry import create, get_recipe, names, register

from . import adabin, fmnist  # noqa: F401  (they register their models)

__all__ = ["create", "names", "register", "get_recipe"]
