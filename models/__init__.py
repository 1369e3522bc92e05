"""Model zoo: one registry, ``create(name, **kw)`` and ``names()``; one file per family with its recipe."""

from __future__ import annotations

from ._registry import create, get_recipe, names, register

from . import adabin, fmnist  # noqa: F401  (they register their models)
from . import bireal, irnet_imagenet, rbnn_imagenet, real2binary  # noqa: F401  (ImageNet ResNets)
from . import irnet, rbnn, fda  # noqa: F401,E402  (CIFAR-10 zoo: IR-Net, RBNN, FDA-BNN)
from . import bimlp, reactnet  # noqa: F401

__all__ = ["create", "names", "register", "get_recipe"]
