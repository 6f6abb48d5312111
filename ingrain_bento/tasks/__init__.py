"""What a model can be asked to do: one table, ``TASKS``, and one module per task beside it.

A task is a capability a model has (``LoadedModel.capabilities``) and the name of the family
method that computes it. Its entry says everything the layers around the family need:

- ``modality``: the input it takes, as listings show it (``text``, ``image``);
- ``inputs``: how the front prepares a request's inputs (``texts``, ``images``, or ``pairs`` of a
  query and its documents: ``front.inputs.InputPreparer.prepare``), unless ``items`` makes them
  from the request itself;
- ``method``: the ``LoadedModel`` method that computes a batch of prepared items;
- ``does`` and ``route``: what a message says the model cannot do, and which route serves it;
- ``routes``: the HTTP routes the task's own module serves (``front.task_routes`` adds them).

The five first tasks are entries here, their outputs in ``front.outputs`` and their routes in
``service.py``. Every later task is one module of this package (``classify_text``,
``zero_shot``, ``multi_vector``): its request and response, its output, its routes and its entry,
registered at import (every module here is imported with the package, as families are). Such a
module talks to the front through ``TaskGateway`` alone: this package imports nothing from
``front/``, so the runner, which computes tasks, never imports HTTP code.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ingrain_bento.errors import BadRequest

if TYPE_CHECKING:
    import numpy as np

    from ingrain_bento.boundary import ModelHandle
    from ingrain_bento.families.base import Preprocessor

__all__ = ["CLASSIFY", "EMBED_IMAGE", "EMBED_SPARSE", "EMBED_TEXT", "IMAGE", "RERANK", "TASKS", "TEXT", "Route",
           "Task", "TaskGateway", "elapsed_ms", "modalities_of", "refuse", "register"]

EMBED_TEXT = "embed_text"
EMBED_IMAGE = "embed_image"
CLASSIFY = "classify"
RERANK = "rerank"
EMBED_SPARSE = "embed_sparse"

TEXT: Literal["text"] = "text"
IMAGE: Literal["image"] = "image"


class TaskGateway(Protocol):
    """What a task module's routes may ask of the front worker (``front.gateway.ModelGateway``)."""

    async def handle(self, request: Any) -> ModelHandle:
        """The model a request names (``name``, ``pretrained``, ``library``), resolved by the engine."""

    async def default_model(self, task: str) -> str:
        """The model a body that names none means (TEI's): the setting, else the one able to."""

    async def preprocessor(self, handle: ModelHandle) -> Preprocessor:
        """The model's tokenizer and transforms, as this worker holds them (labels, prompts)."""

    async def rows(self, request: Any, handle: ModelHandle, task: str) -> np.ndarray:
        """The engine's rows for the request's inputs of ``task``, batched with other requests."""

    async def serve(self, request: Any, route: str, compute: Callable[[ModelHandle], Awaitable[Any]]) -> Any:
        """``compute`` for the request's model, counted in the metrics and sent again once when the
        model was stored anew under this worker's cached handle."""


@dataclass(frozen=True)
class Route:
    """One HTTP route of a task module: ``answer(gateway, body)`` returns the JSON-able response."""

    path: str
    body: type[Any]
    answer: Callable[[TaskGateway, Any], Awaitable[Any]]
    summary: str
    example: dict[str, Any]


@dataclass(frozen=True)
class Task:
    name: str
    modality: Literal["text", "image"]
    inputs: Literal["texts", "images", "pairs", "own"]  # "own": ``items`` makes them from the request
    method: str
    does: str
    route: str
    routes: tuple[Route, ...] = ()
    items: Callable[[Any], Sequence[Any]] | None = None


TASKS: dict[str, Task] = {task.name: task for task in (
    Task(EMBED_TEXT, TEXT, "texts", "encode_text", "embed text", "/embed_text"),
    Task(EMBED_IMAGE, IMAGE, "images", "encode_image", "embed images", "/embed_image"),
    Task(CLASSIFY, IMAGE, "images", "classify_image", "classify images", "/classify_image"),
    Task(RERANK, TEXT, "pairs", "rerank", "rerank documents", "/rerank"),
    Task(EMBED_SPARSE, TEXT, "texts", "embed_sparse", "make sparse embeddings", "/embed_sparse"),
)}


def register(task: Task) -> Task:
    """Called once by each task module, at import."""
    TASKS[task.name] = task
    return task


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (``time.perf_counter()``): a response's ``processingTimeMs``."""
    return (time.perf_counter() - started) * 1000


def modalities_of(capabilities: Iterable[str]) -> list[str]:
    """The input modalities (``text``, ``image``) a set of capabilities takes."""
    return sorted({TASKS[name].modality for name in capabilities if name in TASKS})


def refuse(model_id: str, task: str, capabilities: Iterable[str]) -> BadRequest:
    """The 400 for asking a model a task it cannot do, saying what it can do, and where."""
    can = [TASKS[name] for name in sorted(capabilities) if name in TASKS]
    offers = "; ".join(f"{t.does} ({t.route})" for t in can) or "nothing this server serves"
    return BadRequest(f"{model_id} cannot {TASKS[task].does}: it can {offers}.")


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
