"""What every backend shares: the graphs a family hands it, and the executor it makes of them.

A family describes each forward of a model as a ``Graph``: a torch module whose inputs and
outputs are plain arrays (token ids, uint8 pixels; rows), with one example input per name and
the axes that vary. The torch backend runs those modules as they are; the ONNX backend runs the
same modules exported once (``backends.onnx``). Either way the family gets an ``Executor``:
``run(graph, inputs) -> outputs``, numpy in and numpy out, and computes the rest of its task
(pooling, post-processing) itself, as its library does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BACKENDS", "Backend", "BackendSpec", "Executor", "Graph"]

Backend = str  # a name in ``BACKENDS``


@dataclass(frozen=True)
class BackendSpec:
    """One compute backend, everything the server needs to know of it.

    ``module`` is imported on first use, never before (a front worker imports no backend): it has
    ``open_executor(choice, graphs) -> Executor`` and, for a backend that runs an export of the
    graphs, ``export(backend, graphs, out, source) -> report`` (run in a child process by
    ``runner.export``) and ``EXPORTER_VERSION``."""

    name: str
    module: str
    exports: bool = False  # it runs an export of the graphs, made once and kept in the store
    export_from: str | None = None  # the backend whose export its own is made from (int8 from fp32)
    stored_files: tuple[str, ...] = ()  # the export's files the store keeps (globs)
    auto: bool = False  # ``auto`` may pick it (``backends.AUTO`` says where)
    server_default: bool = False  # ``INGRAIN_BACKEND`` may name it (else: per load only)


# The compute backends: a new one is its module and one line here.
BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", "ingrain_bento.backends.torch", auto=True, server_default=True),
    BackendSpec("onnx", "ingrain_bento.backends.onnx", exports=True, stored_files=("*.onnx",), auto=True,
                server_default=True),
    BackendSpec("onnx-int8", "ingrain_bento.backends.onnx", exports=True, export_from="onnx", stored_files=("*.onnx",)),
)}


@dataclass
class Graph:
    """One forward of a model, as its family defines it for every backend.

    ``module`` takes the inputs positionally, in ``inputs`` order, and returns one tensor or a
    tuple of them (``outputs`` names them). ``inputs`` maps each name to an example array (its
    dtype is the input's); ``dynamic`` names the axes that vary per input and output
    (``{"input_ids": {0: "batch", 1: "tokens"}}``); every other axis is fixed."""

    module: Any  # torch.nn.Module
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    dynamic: Mapping[str, Mapping[int, str]] = field(default_factory=dict)


class Executor(Protocol):
    """A model's graphs on a device, ready to run (what a backend makes of them)."""

    backend: Backend
    device: str  # "cpu", "cuda:0"
    dtype: str  # what the weights are: "float32", "float16", "int8"
    memory_bytes: int  # the weights' bytes, counted against INGRAIN_MAX_MODEL_MEMORY

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One forward of ``graph``: its outputs, in order, on the CPU."""

    def release(self) -> None:
        """Drop the weights (and the device memory they held)."""
