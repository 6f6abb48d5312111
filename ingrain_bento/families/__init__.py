"""The family registry: one module per library in this package, each registering itself.

``family("timm")`` is the one path from a library name to the code that fetches, loads and
prepares its models. Every module in this package (but ``base``) is imported on first use and
calls ``register``; a fourth library is one new module here, nothing else changes. Family
modules import torch and their library lazily, so discovery is cheap.
"""

from __future__ import annotations

import importlib
import pkgutil

from ingrain_bento.errors import BadRequest
from ingrain_bento.families.base import Family

__all__ = ["Family", "families", "family", "register"]

_REGISTRY: dict[str, Family] = {}
_discovered = False


def register(entry: Family) -> Family:
    """Called once by each family module, at import."""
    _REGISTRY[entry.name] = entry
    return entry


def _discover() -> None:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True


def families() -> dict[str, Family]:
    """Every registered family, by library name."""
    _discover()
    return dict(_REGISTRY)


def family(name: str) -> Family:
    """The family of library ``name``, or a 400 naming the libraries there are."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadRequest(f"Unknown library {name!r}: use one of {', '.join(sorted(_REGISTRY))}.") from None
