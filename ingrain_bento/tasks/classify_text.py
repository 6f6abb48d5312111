"""Text classification: a Hugging Face sequence classifier with ``id2label`` (sentiment, topic,
NLI, moderation), served at ``/classify_text``, TEI's ``/predict`` and Infinity's ``/classify``
(API.md "More tasks").

The family computes the model's logits (sentence-transformers' ``CrossEncoder`` opens the
classifier, its activation left out: ``TextClassifier`` in ``families/sentence_transformers``).
The scores are computed here, in the front, from those logits: a softmax over the labels, or a
sigmoid per label for a multi-label model (``problem_type: multi_label_classification``), as
``transformers``' text-classification pipeline applies them; TEI's ``raw_scores`` keeps the
logits. Labels are the model's ``id2label``, read by the front's weightless copy of the model.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ingrain_bento import schemas as s
from ingrain_bento.errors import BadRequest
from ingrain_bento.tasks import TEXT, Route, Task, TaskGateway, elapsed_ms, register

__all__ = ["CLASSIFY_TEXT", "ClassifyTextRequest", "ClassifyTextResponse", "InfinityClassifyRequest", "Prediction",
           "TEIPredictRequest", "classify", "predictions", "tei_predict"]

CLASSIFY_TEXT = "classify_text"


class ClassifyTextRequest(s.ModelTextsRequest):
    """``/classify_text``: texts, and ``top_k`` (the best labels of each, all by default)."""

    top_k: int | None = Field(None, ge=1)
    raw_scores: bool = False  # the logits themselves, no softmax or sigmoid (TEI's raw_scores)
    truncate: bool = True


class Prediction(s.ApiModel):
    label: str
    score: float


class ClassifyTextResponse(s.ApiModel):
    predictions: list[list[Prediction]]
    processing_time_ms: float


class TEIPredictRequest(BaseModel):
    """TEI's ``/predict`` (and ``POST /`` for a classifier): ``inputs`` a text or texts (TEI's text
    pairs are for NLI models: send them joined, as the model's tokenizer would not be told apart)."""

    inputs: s.Texts
    raw_scores: bool = False
    truncate: bool | None = None
    parameters: dict[str, Any] | None = None  # huggingface_hub's text_classification: top_k, function_to_apply


class InfinityClassifyRequest(BaseModel):
    """Infinity's ``/classify``: ``model`` and ``input`` texts."""

    model: s.NonEmptyName
    input: s.Texts
    raw_scores: bool = False


def scores(logits: np.ndarray, multi_label: bool, raw: bool) -> np.ndarray:
    """The pipeline's activation of a classifier's logits: sigmoid for a multi-label model, else a
    softmax over the labels (float64 on the way, as the pipeline computes in numpy)."""
    matrix = logits.astype(np.float64)
    if raw:
        return matrix
    if multi_label:
        return 1.0 / (1.0 + np.exp(-matrix))
    shifted = np.exp(matrix - matrix.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def predictions(logits: np.ndarray, labels: list[str], multi_label: bool, top_k: int | None,
                raw: bool = False) -> list[list[Prediction]]:
    """Each text's labels with their scores, best first (a stable sort: ties keep label order)."""
    if logits.shape[-1] != len(labels):
        raise RuntimeError(f"the model gave {logits.shape[-1]} scores for {len(labels)} labels")
    values = scores(logits, multi_label, raw)
    out = []
    for row in values:
        order = np.argsort(-row, kind="stable")[:top_k]
        out.append([Prediction(label=labels[i], score=float(row[i])) for i in order])
    return out


async def classify(gateway: TaskGateway, request: ClassifyTextRequest) -> list[list[Prediction]]:
    """Each text's predictions, from the model's logits."""

    async def compute(handle: Any) -> list[list[Prediction]]:
        logits = await gateway.rows(request, handle, CLASSIFY_TEXT)
        preprocessor = await gateway.preprocessor(handle)
        if not preprocessor.labels:
            raise BadRequest(f"{handle.ref.display_id} names no labels (id2label) to classify with.")
        return predictions(logits, preprocessor.labels, preprocessor.multi_label, request.top_k, request.raw_scores)

    result: list[list[Prediction]] = await gateway.serve(request, CLASSIFY_TEXT, compute)
    return result


async def answer(gateway: TaskGateway, request: ClassifyTextRequest) -> ClassifyTextResponse:
    started = time.perf_counter()
    rows = await classify(gateway, request)
    return ClassifyTextResponse.model_construct(predictions=rows,
                                                processing_time_ms=elapsed_ms(started))


def _pairs(rows: list[list[Prediction]]) -> list[list[dict[str, Any]]]:
    return [[{"label": p.label, "score": p.score} for p in row] for row in rows]


async def tei_predict(gateway: TaskGateway, body: TEIPredictRequest, nested: bool = False) -> Any:
    """TEI's answer: ``[{"label", "score"}]`` for one text, one such list per text for several
    (``nested``: always a list per text, as ``POST /`` answers ``text_classification``)."""
    top_k = (body.parameters or {}).get("top_k")
    request = s.build(ClassifyTextRequest, name=await gateway.default_model(CLASSIFY_TEXT), text=body.inputs,
                      raw_scores=body.raw_scores, truncate=True if body.truncate is None else body.truncate,
                      top_k=top_k)
    rows = _pairs(await classify(gateway, request))
    return rows if nested or isinstance(body.inputs, list) else rows[0]


async def infinity_answer(gateway: TaskGateway, body: InfinityClassifyRequest) -> dict[str, Any]:
    """Infinity's shape: ``{"object": "classify", "data": [[{"score", "label"}]], "model", "usage", ...}``."""
    request = s.build(ClassifyTextRequest, name=body.model, text=body.input, raw_scores=body.raw_scores)
    rows = _pairs(await classify(gateway, request))
    return {"object": "classify", "data": rows, "model": body.model, "usage": {"prompt_tokens": 0, "total_tokens": 0},
            "id": f"infinity-{uuid.uuid4()}", "created": int(time.time())}


EXAMPLE = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"

register(Task(CLASSIFY_TEXT, TEXT, "texts", "classify_text", "classify text", "/classify_text", routes=(
    Route("/classify_text", ClassifyTextRequest, answer, "Two texts, their best label",
          {"name": EXAMPLE, "text": ["I loved it", "I hated it"], "top_k": 1}),
    Route("/predict", TEIPredictRequest, tei_predict, "TEI's predict: one text", {"inputs": "I loved it"}),
    Route("/classify", InfinityClassifyRequest, infinity_answer, "Infinity's classify: one text",
          {"model": EXAMPLE, "input": ["I loved it"]}),
)))
