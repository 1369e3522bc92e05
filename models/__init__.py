"""Model zoo: one registry, ``create(name, **kw)`` and ``names()``; one file per family with its recipe."""

from __future__ import annotations

from ._registry import create, get_recipe, names, register

from . import fmnist  # noqa: F401  (registers its models)

__all__ = ["create", "names", "register", "get_recipe"]
