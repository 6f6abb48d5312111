"""What a model can be asked to do: one table, ``TASKS``.

A task is a capability a model has (``LoadedModel.capabilities``) and the name of the engine's
forward for it. Its entry says everything the layers around the family need:

- ``modality``: the input it takes, as listings show it (``text``, ``image``);
- ``inputs``: how the front prepares a request's inputs (``texts``, ``images``, or ``pairs`` of a
  query and its documents: ``front.inputs.InputPreparer.prepare``);
- ``method``: the ``LoadedModel`` method that computes a batch of prepared items;
- ``post``: what the rows of one request become in the response (``front.outputs``);
- ``does`` and ``route``: what a message says the model cannot do, and which route serves it.

A new task is an entry here, its family's method, and its route.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ingrain_bento.errors import BadRequest
from ingrain_bento.front import outputs

__all__ = ["CLASSIFY", "EMBED_IMAGE", "EMBED_SPARSE", "EMBED_TEXT", "IMAGE", "RERANK", "TASKS", "TEXT", "Task",
           "modalities_of", "refuse"]

EMBED_TEXT = "embed_text"
EMBED_IMAGE = "embed_image"
CLASSIFY = "classify"
RERANK = "rerank"
EMBED_SPARSE = "embed_sparse"

TEXT: Literal["text"] = "text"
IMAGE: Literal["image"] = "image"


@dataclass(frozen=True)
class Task:
    name: str
    modality: Literal["text", "image"]
    inputs: Literal["texts", "images", "pairs"]
    method: str
    post: Callable[[Any, Any], Any]  # (rows of one request, its request) -> the response's value
    does: str
    route: str


TASKS: dict[str, Task] = {task.name: task for task in (
    Task(EMBED_TEXT, TEXT, "texts", "encode_text", outputs.embeddings, "embed text", "/embed_text"),
    Task(EMBED_IMAGE, IMAGE, "images", "encode_image", outputs.embeddings, "embed images", "/embed_image"),
    Task(CLASSIFY, IMAGE, "images", "classify_image", outputs.probabilities, "classify images", "/classify_image"),
    Task(RERANK, TEXT, "pairs", "rerank", outputs.ranking, "rerank documents", "/rerank"),
    Task(EMBED_SPARSE, TEXT, "texts", "embed_sparse", outputs.sparse, "make sparse embeddings", "/embed_sparse"),
)}


def modalities_of(capabilities: Iterable[str]) -> list[str]:
    """The input modalities (``text``, ``image``) a set of capabilities takes."""
    return sorted({TASKS[name].modality for name in capabilities if name in TASKS})


def refuse(model_id: str, task: str, capabilities: Iterable[str]) -> BadRequest:
    """The 400 for asking a model a task it cannot do, saying what it can do, and where."""
    can = [TASKS[name] for name in sorted(capabilities) if name in TASKS]
    offers = "; ".join(f"{t.does} ({t.route})" for t in can) or "nothing this server serves"
    return BadRequest(f"{model_id} cannot {TASKS[task].does}: it can {offers}.")
