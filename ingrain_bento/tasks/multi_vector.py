"""Multi-vector (late-interaction, ColBERT) embeddings: sentence-transformers' ``MultiVectorEncoder``
models at ``/embed_multi_vector``, and ``/rerank`` on them scored by MaxSim (API.md "More tasks").

A text's embedding is a matrix, one row per kept token, and queries and documents are encoded
apart (``encode_query``: the query prompt, query length and expansion; ``encode_document``: the
document prompt and the skiplist). Each item names its side (``item``: ``q`` or ``d`` before the
text); the family's method (``embed_multi_vector`` of ``families/sentence_transformers``) runs the
library's own ``encode_query`` / ``encode_document`` on each side's texts of a batch and returns
one row per text (``pack``: its token count, then its matrix flattened, as wide as the forward's
longest), so rows of many requests and forwards stack as every other task's do
(``boundary.join_rows`` widens the narrower); the front cuts each back (``unpack``). A rerank item
is a (query, document) pair (``pair_item``), scored with the library's own ``similarity`` (MaxSim).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ingrain_bento import schemas as s
from ingrain_bento.errors import BadRequest
from ingrain_bento.tasks import TEXT, Route, Task, TaskGateway, elapsed_ms, register

__all__ = ["EMBED_MULTI_VECTOR", "MultiVectorRequest", "MultiVectorResponse", "answer", "item",
           "pack", "pair_item", "read_item", "read_pair", "unpack"]

EMBED_MULTI_VECTOR = "embed_multi_vector"
InputType = Literal["query", "document"]
_SIDES: dict[str, InputType] = {"q": "query", "d": "document"}


class MultiVectorRequest(s.ModelTextsRequest):
    """``/embed_multi_vector``: texts, encoded as queries or as documents (the default)."""

    input_type: InputType = "document"


class MultiVectorResponse(s.ApiModel):
    embeddings: list[s.Rows]  # one (tokens, dimension) matrix per text (numpy until the JSON: schemas.Rows)
    processing_time_ms: float


def item(text: str, input_type: InputType) -> str:
    """One text as the runner takes it: its side, then the text."""
    return ("q" if input_type == "query" else "d") + text


def read_item(value: str) -> tuple[InputType, str]:
    if not value or value[0] not in _SIDES:
        raise ValueError("a multi-vector item starts with its side, q or d")
    return _SIDES[value[0]], value[1:]


def pair_item(query: str, document: str) -> str:
    """A (query, document) pair as one rerank item (JSON: any text goes)."""
    return json.dumps([query, document])


def read_pair(value: str) -> tuple[str, str]:
    query, document = json.loads(value)
    return str(query), str(document)


def pack(matrices: Sequence[np.ndarray], max_tokens: int) -> np.ndarray:
    """(tokens_i, d) matrices -> one row each: the matrix's token count, then the matrix flattened,
    zeros after it, as wide as the longest of these matrices needs (not the model's ``max_tokens``:
    rows of different forwards are widened when joined, ``boundary.join_rows``; a 64-text forward of
    short documents of a 512-token model crosses the wire as ~1 MB, not 16 MB)."""
    dimension = matrices[0].shape[1]
    longest = max(matrix.shape[0] for matrix in matrices)
    if longest > max_tokens:
        raise RuntimeError(f"a text gave {longest} token vectors, over the model's {max_tokens}")
    rows = np.zeros((len(matrices), 1 + longest * dimension), dtype=np.float32)
    for index, matrix in enumerate(matrices):
        rows[index, 0] = matrix.shape[0]
        rows[index, 1:1 + matrix.size] = matrix.reshape(-1)
    return rows


def unpack(rows: np.ndarray, dimension: int) -> list[s.Rows]:
    """``pack``'s rows -> each text's (tokens, d) matrix (views of ``rows``)."""
    out: list[s.Rows] = []
    for row in rows.astype(np.float32, copy=False):
        count = int(row[0])
        out.append(row[1:1 + count * dimension].reshape(count, dimension))
    return out


def _items(request: MultiVectorRequest) -> list[str]:
    return [item(text, request.input_type) for text in request.texts]


async def embed(gateway: TaskGateway, request: MultiVectorRequest) -> list[s.Rows]:
    async def compute(handle: Any) -> list[s.Rows]:
        if not handle.embedding_size:
            raise BadRequest(f"{handle.ref.display_id} reports no token embedding size.")
        return unpack(await gateway.rows(request, handle, EMBED_MULTI_VECTOR), handle.embedding_size)

    result: list[s.Rows] = await gateway.serve(request, EMBED_MULTI_VECTOR, compute)
    return result


async def answer(gateway: TaskGateway, request: MultiVectorRequest) -> MultiVectorResponse:
    started = time.perf_counter()
    matrices = await embed(gateway, request)
    return MultiVectorResponse.model_construct(embeddings=matrices,
                                               processing_time_ms=elapsed_ms(started))


register(Task(EMBED_MULTI_VECTOR, TEXT, "own", "embed_multi_vector", "make multi-vector embeddings",
              "/embed_multi_vector", items=_items, routes=(
                  Route("/embed_multi_vector", MultiVectorRequest, answer, "Two documents",
                        {"name": "lightonai/GTE-ModernColBERT-v1", "text": ["Paris is in France.", "Berlin"],
                         "input_type": "document"}),
              )))
