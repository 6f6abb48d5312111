"""What every engine shares: the graphs a family hands it, and the runner it makes of them.

A family describes each forward of a model as a ``Graph``: a torch module whose inputs and
outputs are plain arrays (token ids, uint8 pixels; rows), with one example input per name and
the axes that vary. The torch engine runs those modules as they are; the ONNX engine runs the
same modules exported once (``engines.onnx``). Either way the family gets a ``Runner``:
``run(graph, inputs) -> outputs``, numpy in and numpy out, and computes the rest of its task
(pooling, post-processing) itself, as its library does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BACKENDS", "Backend", "Graph", "Runner"]

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx", "onnx-int8")


@dataclass
class Graph:
    """One forward of a model, as its family defines it for every engine.

    ``module`` takes the inputs positionally, in ``inputs`` order, and returns one tensor or a
    tuple of them (``outputs`` names them). ``inputs`` maps each name to an example array (its
    dtype is the input's); ``dynamic`` names the axes that vary per input and output
    (``{"input_ids": {0: "batch", 1: "tokens"}}``); every other axis is fixed."""

    module: Any  # torch.nn.Module
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    dynamic: Mapping[str, Mapping[int, str]] = field(default_factory=dict)


class Runner(Protocol):
    """A model's graphs on a device, ready to run."""

    backend: Backend
    device: str  # "cpu", "cuda:0"
    dtype: str  # what the weights are: "float32", "float16", "int8"
    memory_bytes: int  # the weights' bytes, counted against INGRAIN_MAX_MODEL_MEMORY

    def run(self, graph: str, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One forward of ``graph``: its outputs, in order, on the CPU."""

    def release(self) -> None:
        """Drop the weights (and the device memory they held)."""
