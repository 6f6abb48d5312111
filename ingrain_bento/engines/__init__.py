"""Engines: what runs a model's forwards. One module each: ``torch`` (the library's own modules,
eager) and ``onnx`` (the same graphs exported once, run by ONNX Runtime; ``onnx-int8`` is its
quantized variant). ``base`` holds what they share; ``export`` exports a stored model in a child
process and keeps the result in the BentoML store.

``choose_backend`` is the one place that turns a load's ``backend`` (or the server's
``INGRAIN_BACKEND``) into an engine: ``auto`` picks, per family and device, the engine that
bench/engines.py measured faster there (``AUTO``; README "Engines" has the figures).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ingrain_bento.engines.base import BACKENDS, ENGINES, Backend, EngineSpec, Graph, Runner

if TYPE_CHECKING:
    import torch

__all__ = ["AUTO", "BACKENDS", "ENGINES", "Backend", "EngineChoice", "EngineSpec", "Graph", "Runner", "choose_backend"]

# (device type, library) -> the engine `auto` picks. Measured on 2 CPU cores (bench/engines.py): ONNX
# Runtime is faster for every family there. No GPU run has measured ONNX Runtime's CUDA provider
# against torch fp16, so on CUDA `auto` stays with torch.
AUTO: Mapping[tuple[str, str], Backend] = {
    ("cpu", "sentence_transformers"): "onnx",
    ("cpu", "open_clip"): "onnx",
    ("cpu", "timm"): "onnx",
}


def choose_backend(requested: str | None, default: str, device_type: str, library: str) -> Backend:
    """The engine a load gets: the request's, else the server default; ``auto`` from ``AUTO``."""
    choice = requested or default
    if choice == "auto":
        picked = AUTO.get((device_type, library), "torch")
        return picked if ENGINES[picked].auto else "torch"
    if choice not in ENGINES:
        raise ValueError(f"unknown backend {choice!r}")
    return choice


@dataclass(frozen=True)
class EngineChoice:
    """What a family's ``load`` builds its runner with."""

    backend: Backend
    device: torch.device
    half: bool  # fp16 weights (torch on CUDA)
    threads: int | None  # intra-op threads (INGRAIN_TORCH_THREADS), for either engine
    export: Path | None = None  # the store folder of the model's export (a backend that runs one)
    spinning: bool = False  # ONNX Runtime's idle threads spin for work (INGRAIN_ONNX_SPINNING)

    def runner(self, graphs: Mapping[str, Graph]) -> Runner:
        """The graphs on this backend (its module's ``open_runner``)."""
        spec = ENGINES[self.backend]
        if spec.exports and self.export is None:
            raise ValueError(f"the {self.backend} engine needs the model's export")
        runner: Runner = importlib.import_module(spec.module).open_runner(self, graphs)
        return runner
