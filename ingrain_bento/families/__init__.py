"""One module per library; ``family(library)`` imports it on first use (torch is heavy)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ingrain_bento.refs import Library


def family(library: Library) -> ModuleType:
    """The family module that fetches, binds and loads models of ``library``."""
    return importlib.import_module(f"ingrain_bento.families.{library.value}")
