"""A stored model's export for a backend that runs one (``BackendSpec.exports``: ONNX): made once,
in a child process, and kept in the BentoML store.

``ensure_export`` (the runner's side) finds the export of a store entry for a backend, or makes
it: ``python -m ingrain_bento.runner.export`` opens the stored folder with the family's own
loader, exports and checks its graphs (the backend module's ``export``), times them against torch
on this machine when ``auto`` may pick the backend (``backends.timing``: what ``auto`` picks from),
and writes them with a report; the export is then stored as its own BentoML model, labelled with
the entry it was made from (``bentoml models list`` shows it; deleting the model deletes it). A
model that does not export (custom code, an op the exporter lacks, outputs that differ) gets an
export entry that records why, so later loads and restarts fall back to torch at once, without
trying again.

Why a child process: an export traces the whole model in Python (seconds of GIL) and can take
the memory of a second copy of the weights; in a process of its own it never stalls the runner's
event loop or the forwards of the models already serving, and its memory goes back when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingrain_bento.backends.base import BACKENDS, Backend

__all__ = ["Export", "ensure_export"]

log = logging.getLogger("ingrain_bento.runner.export")

REPORT = "report.json"


@dataclass(frozen=True)
class Export:
    """An export's store folder, or (``folder`` None) why the model has none for that backend."""

    backend: Backend
    folder: Path | None
    failure: str | None = None
    report: dict[str, Any] | None = None


async def ensure_export(store: Any, stored: Any, backend: Backend, timeout_s: float) -> Export:
    """The export of store entry ``stored`` for ``backend`` (``onnx`` or ``onnx-int8``), made now
    when there is none (``onnx-int8`` from the ``onnx`` one: ``BackendSpec.export_from``)."""
    spec = BACKENDS[backend]
    exporter_version = _exporter_version(backend)
    found = await asyncio.to_thread(store.find_export, stored, backend)
    if found is not None:
        export = _from_entry(backend, found)
        if export.failure is None or export.report and export.report.get("exporter") == exporter_version:
            return export
        await asyncio.to_thread(store.delete_tag, found.tag)  # a failure an older exporter recorded: try again
    source: Export | None = None
    if spec.export_from is not None:
        source = await ensure_export(store, stored, spec.export_from, timeout_s)
        if source.folder is None:
            return Export(backend, None, source.failure)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ingrain-export-") as scratch:
        out = Path(scratch)
        report = await _run_child(backend, stored.library, stored.path, out, source.folder if source else None,
                                  timeout_s)
        report["seconds"] = round(time.perf_counter() - started, 3)
        report["exporter"] = exporter_version
        entry = await asyncio.to_thread(store.write_export, stored, backend, out, report)
    exported = _from_entry(backend, entry)
    if exported.failure is None:
        log.info("backend.export model=%s backend=%s bytes=%d seconds=%.2f", stored.tag, backend,
                 sum(graph["bytes"] for graph in report["graphs"].values()), report["seconds"])
    else:
        log.warning("backend.export model=%s backend=%s failed: %s", stored.tag, backend, exported.failure)
    return exported


def _exporter_version(backend: Backend) -> int:
    """Bumped by a backend's module when its exporter changes what it can export: a failure an
    older one recorded is tried again."""
    import importlib

    version: int = importlib.import_module(BACKENDS[backend].module).EXPORTER_VERSION
    return version


def _from_entry(backend: Backend, entry: Any) -> Export:
    report = dict(entry.metadata.get("report", {}))
    failure = report.get("failure")
    return Export(backend, None if failure else entry.path, failure, report)


async def _run_child(backend: Backend, library: str, folder: Path, out: Path, source: Path | None,
                     timeout_s: float) -> dict[str, Any]:
    """Run the export in a child process; its report (``failure`` says why when it failed)."""
    args = [sys.executable, "-m", "ingrain_bento.runner.export", backend, library, str(folder), str(out)]
    if source is not None:
        args += ["--source", str(source)]
    child = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                 stderr=asyncio.subprocess.PIPE, env=os.environ.copy())
    try:
        _, stderr = await asyncio.wait_for(child.communicate(), timeout_s)
    except TimeoutError:
        child.kill()
        await child.wait()
        return {"failure": f"the export took longer than {timeout_s:.0f} s (INGRAIN_EXPORT_TIMEOUT_S)", "graphs": {}}
    report_file = out / REPORT
    if child.returncode != 0 or not report_file.is_file():
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return {"failure": f"the exporter exited with {child.returncode} ({last[0][:300]})", "graphs": {}}
    result: dict[str, Any] = json.loads(report_file.read_text())
    return result


# ---- the child process ------------------------------------------------------------------------

def _export(backend: Backend, library: str, folder: Path, out: Path, source: Path | None) -> dict[str, Any]:
    import importlib

    from ingrain_bento.families import family

    graphs = family(library).graphs(folder)
    report: dict[str, Any] = importlib.import_module(BACKENDS[backend].module).export(backend, graphs, out, source)
    if BACKENDS[backend].auto:
        report["timing"] = _timing(backend, graphs, out)
    return report


def _timing(backend: Backend, graphs: Any, out: Path) -> dict[str, Any]:
    """torch against the new export, on this machine (``backends.timing``): what ``auto`` picks
    from. A timing that fails costs the export nothing: ``auto`` then keeps ``backends.AUTO``."""
    from ingrain_bento.backends.timing import time_backends
    from ingrain_bento.settings import get_settings

    settings = get_settings()
    try:
        return time_backends(graphs, backend, out, settings.torch_threads, settings.onnx_spinning)
    except Exception as exc:
        log.warning("backend.timing backend=%s failed: %s: %s", backend, type(exc).__name__, exc)
        return {"device": "cpu", "failure": f"the timing failed ({type(exc).__name__}: {str(exc)[:300]})"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a stored model's graphs for a backend (run by the server).")
    parser.add_argument("backend", choices=[name for name, spec in BACKENDS.items() if spec.exports])
    parser.add_argument("library")
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=None, help="the export this backend's is made from")
    args = parser.parse_args(argv)
    from ingrain_bento.backends.torch import apply_torch_threads
    from ingrain_bento.settings import get_settings

    apply_torch_threads(get_settings().torch_threads)
    try:
        report = _export(args.backend, args.library, args.folder, args.out, args.source)
    except Exception as exc:  # every reason a model does not export: the server loads it with torch
        for pattern in BACKENDS[args.backend].stored_files:
            for leftover in args.out.glob(pattern):
                leftover.unlink()
        report = {"failure": str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}",
                  "graphs": {}}
    (args.out / REPORT).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
