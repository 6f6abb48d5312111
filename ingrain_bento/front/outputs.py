"""What a request's rows become in its response, for the first five tasks (``OUTPUTS``; a task
module of ``ingrain_bento.tasks`` makes its own).

Each takes the rows the engine computed for one request's items and the request, and returns
the value its response carries. numpy only: a front worker needs no torch for this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ingrain_bento.errors import BadRequest
from ingrain_bento.tasks import CLASSIFY, EMBED_IMAGE, EMBED_SPARSE, EMBED_TEXT, RERANK

__all__ = ["INT8_SPREAD", "OUTPUTS", "embeddings", "int8_ranges", "probabilities", "quantize", "ranking", "sparse"]

# int8/uint8 map [-INT8_SPREAD / sqrt(d), +INT8_SPREAD / sqrt(d)] of each component of a unit-length
# row of d dimensions onto the 256 levels (clipped outside): a random unit vector's components have
# a standard deviation of 1 / sqrt(d), so this is 4 of them. Fixed per model and n_dims, never taken
# from the rows at hand: the same text gives the same integers in any request, on any replica.
INT8_SPREAD = 4.0


def embeddings(rows: np.ndarray, request: Any) -> np.ndarray:
    """Matryoshka: truncate to ``n_dims`` first, then normalize (``normalize``, default true), so a
    row is unit length (as torch's ``F.normalize``: divided by its norm, at least 1e-12); then the
    ``precision`` asked for (``quantize``). A numpy matrix: the response writes it as it is
    (``front.http.json_response``)."""
    matrix = rows.astype(np.float32, copy=False)
    n_dims = request.n_dims
    if n_dims is not None:
        if n_dims < 1 or n_dims > matrix.shape[1]:
            raise BadRequest(f"n_dims must be between 1 and the model's size {matrix.shape[1]}, not {n_dims}.")
        matrix = matrix[:, :n_dims]
    if request.normalize:
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)
    precision = getattr(request, "precision", "float32")
    if precision in ("int8", "uint8") and not request.normalize:
        raise BadRequest(f"precision {precision} maps unit-length rows onto a fixed range: send normalize: true.")
    return quantize(matrix, precision)


def int8_ranges(dimension: int) -> np.ndarray:
    """The fixed (2, d) range int8/uint8 map onto 256 levels (``INT8_SPREAD``): what
    ``sentence_transformers.quantize_embeddings(..., ranges=...)`` takes."""
    bound = INT8_SPREAD / np.sqrt(dimension)
    return np.array([[-bound] * dimension, [bound] * dimension], dtype=np.float32)


def quantize(matrix: np.ndarray, precision: str) -> np.ndarray:
    """Float rows in the ``precision`` asked for, as ``quantize_embeddings`` computes it: binary and
    ubinary pack the signs (d / 8 integers a row; binary offset by -128), int8 and uint8 floor the
    rows into 256 levels of ``int8_ranges`` (int8 offset by -128)."""
    if precision == "float32":
        return matrix
    if precision in ("binary", "ubinary"):
        packed = np.packbits(matrix > 0, axis=-1)
        return packed if precision == "ubinary" else (packed - 128).astype(np.int8)
    ranges = int8_ranges(matrix.shape[1])
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    levels = np.clip(np.floor((matrix - starts) / steps), 0, 255)
    return levels.astype(np.uint8) if precision == "uint8" else (levels - 128).astype(np.int8)


def _float_only(request: Any, what: str) -> None:
    precision = getattr(request, "precision", "float32")
    if precision != "float32":
        raise BadRequest(f"precision {precision} applies to embeddings, not to {what}.")


def probabilities(logits: np.ndarray, request: Any) -> list[list[float]]:
    """Softmax over the classes, in label order; the logits themselves with ``normalize`` false."""
    _float_only(request, "class probabilities")
    matrix = logits.astype(np.float32, copy=False)
    if request.normalize:
        exp = np.exp(matrix - matrix.max(axis=-1, keepdims=True))
        matrix = exp / exp.sum(axis=-1, keepdims=True)
    result: list[list[float]] = matrix.tolist()
    return result


def ranking(scores: np.ndarray, request: Any) -> list[tuple[int, float]]:
    """(document index, relevance score), best first, cut to ``top_n``: as ``CrossEncoder.rank``
    orders them (a stable sort, so equal scores keep the documents' order)."""
    values = scores.astype(np.float32, copy=False).reshape(len(scores), -1)[:, 0]
    order = np.argsort(-values, kind="stable")
    if request.top_n is not None:
        order = order[:request.top_n]
    return [(int(index), float(values[index])) for index in order]


def sparse(rows: np.ndarray, request: Any) -> list[tuple[list[int], list[float]]]:
    """Each row's non-zero entries, indices ascending; ``top_k`` keeps the largest values."""
    _float_only(request, "sparse embeddings")
    out = []
    for row in rows.astype(np.float32, copy=False):
        indices = np.flatnonzero(row)
        if request.top_k is not None and len(indices) > request.top_k:
            keep = np.argsort(-row[indices], kind="stable")[:request.top_k]
            indices = np.sort(indices[keep])
        out.append((indices.tolist(), row[indices].tolist()))
    return out


# task -> (rows of one request, the request) -> the response's value
OUTPUTS: dict[str, Callable[[np.ndarray, Any], Any]] = {
    EMBED_TEXT: embeddings,
    EMBED_IMAGE: embeddings,
    CLASSIFY: probabilities,
    RERANK: ranking,
    EMBED_SPARSE: sparse,
}
