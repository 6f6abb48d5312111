"""Compute backends: what runs a model's forwards. One module each: ``torch`` (the library's own
modules, eager) and ``onnx`` (the same graphs exported once, run by ONNX Runtime; ``onnx-int8`` is
its quantized variant), each one line of ``BACKENDS`` (``base.BackendSpec``: how to run it, how to
export for it, what its export stores, whether ``auto`` may pick it). A backend makes an
``Executor`` of a model's graphs. ``runner.export`` makes a stored model's export in a child
process and keeps it in the BentoML store.

``choose_backend`` is the one place that turns a load's ``backend`` (or the server's
``INGRAIN_BACKEND``) into a backend. ``auto`` is measured per model and machine (``timing``): when
a model's export for the backend ``AUTO`` names on a device type is made, torch and that backend
are timed on the model's typical inputs, and ``auto`` loads the faster one (``pick_auto``). Until
then, or on a device type the figures were not measured on, ``AUTO`` decides (README "Backends").
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingrain_bento.backends.base import BACKENDS, Backend, BackendSpec, Executor, Graph
from ingrain_bento.backends.timing import AutoPick, pick_auto

if TYPE_CHECKING:
    import torch

__all__ = ["AUTO", "BACKENDS", "AutoPick", "Backend", "BackendChoice", "BackendSpec", "Executor", "Graph", "auto_table",
           "choose_backend", "pick_auto"]

# (device type, library) -> the backend `auto` times against torch there (and picks until a model is
# timed). Measured on 2 CPU cores (bench/engines.py): ONNX Runtime is faster for every family there.
# No GPU run has measured ONNX Runtime's CUDA provider against torch fp16, so on CUDA `auto` stays
# with torch (and the export's figures, measured on the CPU, do not apply there).
AUTO: Mapping[tuple[str, str], Backend] = {
    ("cpu", "sentence_transformers"): "onnx",
    ("cpu", "open_clip"): "onnx",
    ("cpu", "timm"): "onnx",
}


def auto_table(device_type: str, library: str) -> Backend:
    """The backend ``AUTO`` names for a family on a device type (torch where it names none, or one
    ``auto`` may not pick): the one ``auto`` times against torch."""
    picked = AUTO.get((device_type, library), "torch")
    return picked if BACKENDS[picked].auto else "torch"


def choose_backend(requested: str | None, default: str, device_type: str, library: str,
                   report: Mapping[str, Any] | None = None) -> Backend:
    """The backend a load gets: the request's, else the server default; ``auto``: the faster one
    measured for the model (``report``: the report of its export for ``auto_table``'s backend),
    else ``AUTO``'s."""
    choice = requested or default
    if choice == "auto":
        return pick_auto(auto_table(device_type, library), device_type, report).backend
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r}")
    return choice


@dataclass(frozen=True)
class BackendChoice:
    """What a family's ``load`` builds its executor with."""

    backend: Backend
    device: torch.device
    half: bool  # fp16 weights (torch on CUDA)
    threads: int | None  # intra-op threads (INGRAIN_TORCH_THREADS), for either backend
    export: Path | None = None  # the store folder of the model's export (a backend that runs one)
    spinning: bool = False  # ONNX Runtime's idle threads spin for work (INGRAIN_ONNX_SPINNING)

    def executor(self, graphs: Mapping[str, Graph]) -> Executor:
        """The graphs on this backend (its module's ``open_executor``)."""
        spec = BACKENDS[self.backend]
        if spec.exports and self.export is None:
            raise ValueError(f"the {self.backend} backend needs the model's export")
        executor: Executor = importlib.import_module(spec.module).open_executor(self, graphs)
        return executor
