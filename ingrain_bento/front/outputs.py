"""What a request's rows become in its response, per task (``tasks.TASKS`` names one each).

Each takes the rows the engine computed for one request's items and the request, and returns
the value its response carries. numpy only: a front worker needs no torch for this.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ingrain_bento.errors import BadRequest

__all__ = ["embeddings", "probabilities", "ranking", "sparse"]


def embeddings(rows: np.ndarray, request: Any) -> list[list[float]]:
    """Matryoshka: truncate to ``n_dims`` first, then normalize (``normalize``, default true), so a
    row is unit length (as torch's ``F.normalize``: divided by its norm, at least 1e-12)."""
    matrix = rows.astype(np.float32, copy=False)
    n_dims = request.n_dims
    if n_dims is not None:
        if n_dims < 1 or n_dims > matrix.shape[1]:
            raise BadRequest(f"n_dims must be between 1 and the model's size {matrix.shape[1]}, not {n_dims}.")
        matrix = matrix[:, :n_dims]
    if request.normalize:
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)
    result: list[list[float]] = matrix.tolist()
    return result


def probabilities(logits: np.ndarray, request: Any) -> list[list[float]]:
    """Softmax over the classes, in label order; the logits themselves with ``normalize`` false."""
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
    out = []
    for row in rows.astype(np.float32, copy=False):
        indices = np.flatnonzero(row)
        if request.top_k is not None and len(indices) > request.top_k:
            keep = np.argsort(-row[indices], kind="stable")[:request.top_k]
            indices = np.sort(indices[keep])
        out.append((indices.tolist(), row[indices].tolist()))
    return out
