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
from ingrain_bento.refs import ModelRef, split_display_id, validate_name

__all__ = ["Family", "api_pretrained", "families", "family", "parse_ref", "register"]

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


def parse_ref(library: str, name: str, pretrained: str | bool | None = None) -> ModelRef:
    """What a client names, as a ``ModelRef``: ``name::pretrained`` split, the name checked (a
    plain identifier), ``pretrained`` as the family keys it (a 400 for what it cannot take)."""
    entry = family(library)
    name, pretrained = split_display_id(name, pretrained)
    name = validate_name(name)
    return ModelRef(entry.name, name, entry.canonical_pretrained(name, pretrained))


def api_pretrained(ref: ModelRef) -> str | bool | None:
    """``pretrained`` as the API shows it (timm: ``true``/``false``/custom name)."""
    return family(ref.library).api_pretrained(ref.pretrained)
