"""What was resident, kept in the store so a restarted runner brings it back.

The pool reports its resident models after every load, unload and eviction; this writes them
to ``$BENTOML_HOME/ingrain-state/<name>.json`` (atomically: a runner killed mid-write leaves
the previous list). A runner that starts (after a crash, a SIGKILL, an OOM, or a restart of
the whole service) loads that list again. A clean shutdown does not clear it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ingrain_bento.bentoml_seam import bentoml_home
from ingrain_bento.refs import ModelRef

__all__ = ["ResidentState"]

log = logging.getLogger("ingrain_bento.state")


class ResidentState:
    """The resident list of one runner (``name``: which device and deployment it serves)."""

    def __init__(self, name: str, folder: Path | None = None) -> None:
        folder = folder or bentoml_home() / "ingrain-state"
        self.path = folder / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}.json"

    def save(self, resident: Sequence[tuple[ModelRef, str | None]]) -> None:
        """The resident models, in order, each with the engine its load asked for (None: the
        server's default, whatever it is when they are restored)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = [{"library": r.library, "name": r.name, "pretrained": r.pretrained, "backend": backend}
                   for r, backend in resident]
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
            json.dump({"resident": entries}, handle)
        os.replace(handle.name, self.path)

    def load(self) -> list[tuple[ModelRef, str | None]]:
        """The recorded refs and engines; an unreadable file or entry is logged and skipped."""
        try:
            entries = json.loads(self.path.read_text())["resident"]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError):
            log.warning("state.restore unreadable file=%s", self.path)
            return []
        refs: list[tuple[ModelRef, str | None]] = []
        for entry in entries:
            try:
                refs.append((ModelRef(entry["library"], entry["name"], entry["pretrained"]), entry.get("backend")))
            except (KeyError, TypeError):
                log.warning("state.restore skipped entry=%r", entry)
        return refs
