"""The boundary between the front and the engine: one typed protocol and the values it carries.

``Engine`` is every call a front worker makes on the model state, as methods. Two things
implement it: ``runner.engine.RunnerEngine`` itself (in the front's own process, or in the runner
service behind ``wire.RunnerGate``) and ``front.remote_engine.RemoteEngine`` (the same calls over
the wire to a runner in another process). The front holds an ``Engine`` and imports nothing from
``runner/``; ``wire`` derives each call's encoding from these signatures.

The values are plain and JSON-shaped (dataclasses, pydantic models, strings, numbers), except
``infer``: its items and rows are numpy arrays, which ``wire`` sends as raw bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ingrain_bento.errors import IngrainError
from ingrain_bento.refs import ModelRef
from ingrain_bento.schemas import CustomModelRequest, ModelInfo, ModelRequest

__all__ = ["Engine", "InferReply", "LoadResult", "ModelHandle", "ServedModel", "join_rows"]


@dataclass(frozen=True)
class ModelHandle:
    """What the engine tells a front about a model it serves: who it is, which store entry (tag
    with version) its tokenizer and transforms come from, and what it can do."""

    ref: ModelRef
    tag: str
    capabilities: tuple[str, ...]
    embedding_size: int | None


@dataclass(frozen=True)
class LoadResult:
    model_id: str  # the display id
    loaded: bool  # False: it was resident already


@dataclass(frozen=True)
class ServedModel:
    """A model that serves now or after a load (``/v1/models``)."""

    model_id: str
    library: str


@dataclass
class InferReply:
    """One row array per request of an ``infer`` call (or the error that request ended with),
    and the engine's model-state version: when it moves, a front drops its cached handles."""

    results: list[np.ndarray | IngrainError]
    version: int


def join_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Row arrays of one model and task (chunks of a request, requests of a call) as one. Rows are
    one width per task, except a task whose results vary in size (multi-vector: a text's token
    count, then its matrix), which packs each forward only as wide as its longest result: narrower
    rows are widened with zeros at the end, which such a task reads past. One part is returned as
    it is (most calls: one request of one chunk)."""
    if len(rows) == 1:
        return rows[0]
    width = max(part.shape[1] for part in rows) if rows[0].ndim == 2 else None
    if width is None or all(part.shape[1] == width for part in rows):
        return np.concatenate(rows)
    return np.concatenate([np.pad(part, ((0, 0), (0, width - part.shape[1]))) for part in rows])


class Engine(Protocol):
    """The model state: names, the store, the resident pool, and inference on prepared items."""

    async def load(self, request: ModelRequest, library: str | None = None) -> LoadResult:
        """Make a model resident (downloading it into the store once)."""

    async def unload(self, request: ModelRequest) -> str:
        """Take a resident model off the device; its display id."""

    async def delete(self, request: ModelRequest) -> str:
        """Unload (if resident) and remove from the store; its display id."""

    async def download_custom(self, request: CustomModelRequest) -> str:
        """Fetch a custom checkpoint into the store; its name."""

    async def loaded_models(self) -> list[ModelInfo]: ...

    async def repository_models(self) -> list[ModelInfo]: ...

    async def served_models(self) -> list[ServedModel]: ...

    async def describe(self, name: str, pretrained: str | bool | None = None,
                       library: str | None = None) -> ModelHandle:
        """The handle a front prepares a model's inputs with (the name resolved as inference does)."""

    async def embedding_size(self, name: str, pretrained: str | None = None) -> int: ...

    async def classification_labels(self, name: str, pretrained: str | None = None) -> list[str]: ...

    async def ingrain_metrics(self) -> dict[str, Any]:
        """Ingrain's JSON statistics (``{"modelStats": [...]}``)."""

    async def forget(self) -> None:
        """The model state moved: drop what this engine keeps per model for a front (a remote
        engine's per-model call queues; nothing for an engine in the front's own process)."""

    async def infer(self, ref: ModelRef, task: str, tag: str, requests: Sequence[Sequence[Any]]) -> InferReply:
        """Rows for each request's prepared items (``task`` is a capability; ``tag`` the store
        entry they were prepared for), merged with other requests into few forwards."""
