"""Zero-shot image classification with CLIP: ``/classify_image`` with ``labels`` (and optional
``templates``) on an open_clip model (API.md "More tasks").

open_clip's own recipe (``open_clip.zero_shot_classifier.build_zero_shot_classifier`` and its
zero-shot evaluation): each label is written into every template, the texts are embedded and
each embedding normalized, a label's embeddings averaged over its templates and normalized
again; an image's logits are its normalized embedding times ``logit_scale.exp()``, dotted with
each label's; the probabilities their softmax.

The family's method (``zero_shot_classify``) gives each image's normalized embedding already
scaled by the model's ``logit_scale``; the label classifier is made here from ``embed_text`` rows,
once per (model entry, labels, templates): a bounded cache, shared by the requests of this
worker, so a request with labels seen before costs its images alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from ingrain_bento import schemas as s
from ingrain_bento.errors import BadRequest
from ingrain_bento.tasks import EMBED_TEXT, IMAGE, Task, TaskGateway, elapsed_ms, register

__all__ = ["CLASSIFIER_CACHE_SIZE", "DEFAULT_TEMPLATES", "MAX_LABEL_TEXTS", "ZERO_SHOT", "ClassifierCache",
           "ZeroShotRequest", "ZeroShotResponse", "answer", "classifier_from_rows"]

ZERO_SHOT = "zero_shot_classify"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
MAX_LABEL_TEXTS = 10_000  # labels x templates: the texts one classifier embeds
CLASSIFIER_CACHE_SIZE = 64  # label sets per worker

Label = Annotated[str, Field(min_length=1, max_length=1000)]
Template = Annotated[str, Field(max_length=1000)]


class ZeroShotRequest(s.ImageRequest):
    """``/classify_image`` with ``labels``: the images, the labels, and the templates to write each
    label into (``{}`` marks where; ``"a photo of a {}."`` by default)."""

    labels: Annotated[list[Label], Field(max_length=10_000)] | None = None
    templates: Annotated[list[Template], Field(min_length=1, max_length=100)] | None = None

    @field_validator("labels")
    @classmethod
    def _some_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("the label list is empty: send the labels to classify the images into")
        return value

    @field_validator("templates")
    @classmethod
    def _marked(cls, value: list[str] | None) -> list[str] | None:
        for template in value or []:
            if "{}" not in template:
                raise ValueError(f"the template {template!r} has no '{{}}' to write a label into "
                                 "(e.g. 'a photo of a {}.')")
        return value


    @model_validator(mode="after")
    def _templates_need_labels(self) -> ZeroShotRequest:
        if self.templates is not None and self.labels is None:
            raise ValueError("templates apply with labels: send 'labels' too (or no templates)")
        return self


class ZeroShotResponse(s.ApiModel):
    probabilities: list[list[float]]
    labels: list[str]
    processing_time_ms: float


def classifier_from_rows(rows: np.ndarray, labels: int, templates: int) -> np.ndarray:
    """(labels x templates, d) text embeddings -> (labels, d): as ``build_zero_shot_classifier``."""
    matrix = rows.astype(np.float32).reshape(labels, templates, -1)
    matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)
    mean = matrix.mean(axis=1)
    result: np.ndarray = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    return result


Key = tuple[str, tuple[str, ...], tuple[str, ...]]


class ClassifierCache:
    """The label classifiers of one worker, least recently used first out. Concurrent requests with
    the same labels wait for one computation. (An ``OrderedDict``: fifteen lines, where a cache
    library would be a new dependency.)"""

    def __init__(self, size: int = CLASSIFIER_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[Key, asyncio.Future[np.ndarray]] = OrderedDict()
        self.computed = 0  # classifiers made (the tests' and the bench's check that a hit costs none)

    async def get(self, key: Key, make: Any) -> np.ndarray:
        entry = self._entries.get(key)
        if entry is None or (entry.done() and entry.exception() is not None):
            entry = asyncio.ensure_future(make())
            self._entries[key] = entry
            self.computed += 1
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return await asyncio.shield(entry)


CACHE = ClassifierCache()


async def _classifier(gateway: TaskGateway, handle: Any, request: ZeroShotRequest, labels: list[str],
                      templates: tuple[str, ...]) -> np.ndarray:
    async def make() -> np.ndarray:
        texts = [template.replace("{}", label) for label in labels for template in templates]
        text_request = s.InferenceRequest.model_construct(name=request.name, pretrained=request.pretrained,
                                                          library=request.library, text=texts)
        rows = await gateway.rows(text_request, handle, EMBED_TEXT)
        return classifier_from_rows(rows, len(labels), len(templates))

    return await CACHE.get((handle.tag, tuple(labels), templates), make)


async def classify(gateway: TaskGateway, request: ZeroShotRequest) -> list[list[float]]:
    """Each image's probabilities over the labels, in label order."""
    labels = request.labels or []
    templates = tuple(request.templates or DEFAULT_TEMPLATES)
    if len(labels) * len(templates) > MAX_LABEL_TEXTS:
        raise BadRequest(f"{len(labels)} labels x {len(templates)} templates is over {MAX_LABEL_TEXTS} texts: send "
                         "fewer labels or templates.")

    async def compute(handle: Any) -> list[list[float]]:
        if ZERO_SHOT not in handle.capabilities:
            raise BadRequest(f"{handle.ref.display_id} does not classify against labels sent with the request "
                             "(that takes a CLIP model, with text and image towers): send no 'labels' to use its "
                             "own classes, or name an open_clip model.")
        classifier = await _classifier(gateway, handle, request, labels, templates)
        features = await gateway.rows(request, handle, ZERO_SHOT)
        logits = features.astype(np.float32) @ classifier.T
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities: list[list[float]] = (shifted / shifted.sum(axis=-1, keepdims=True)).tolist()
        return probabilities

    result: list[list[float]] = await gateway.serve(request, "classify_image", compute)
    return result


async def answer(gateway: TaskGateway, request: ZeroShotRequest) -> ZeroShotResponse:
    started = time.perf_counter()
    probabilities = await classify(gateway, request)
    return ZeroShotResponse.model_construct(probabilities=probabilities, labels=list(request.labels or []),
                                            processing_time_ms=elapsed_ms(started))


# Its route is /classify_image, shared with timm's own classes: ``service.py`` sends a body with
# ``labels`` here.
register(Task(ZERO_SHOT, IMAGE, "images", "zero_shot_classify", "classify images against labels",
              "/classify_image (with labels)"))
