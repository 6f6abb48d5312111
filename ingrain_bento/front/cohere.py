"""Cohere's embed (``/v1/embed``, ``/v2/embed``), so that the ``cohere`` client's ``embed`` (v1
``Client``, v2 ``ClientV2``) works unmodified: an adapter over the gateway, as ``openai.py`` is.

Cohere's request becomes the native one: ``texts`` (or the text parts of ``inputs``) embed as
text, ``images`` (data URIs, or the ``image_url`` parts) through a CLIP model's image tower;
``input_type`` picks the model's prompt (``input_type`` itself when the model names such a
prompt, else ``search_query`` -> ``query``, ``search_document`` -> ``document`` or ``passage``;
none: the text as is); ``truncate`` NONE/START/END is ``truncate: false`` / a left cut / a right
cut; ``output_dimension`` is ``n_dims``. The rows are computed once, in float32, then given in each
of ``embedding_types`` by the native routes' own ``outputs.quantize`` (``base64``: the float32
bytes of each row).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import numpy as np

from ingrain_bento import schemas as s
from ingrain_bento.errors import BadRequest
from ingrain_bento.front.gateway import ModelGateway
from ingrain_bento.front.outputs import quantize

__all__ = ["cohere_embed"]

# input_type -> the prompt names that mean it, in the order tried (after input_type itself)
PROMPTS_FOR_INPUT_TYPE = {"search_query": ("query",), "search_document": ("document", "passage")}
TRUNCATION: dict[str, dict[str, Any]] = {"NONE": {"truncate": False}, "START": {"truncation_direction": "left"},
                                         "END": {}}


def _split(request: s.CohereEmbedRequest) -> tuple[list[str], list[str], list[Literal["text", "image"]]]:
    """The texts, the images, and what each embedding (in order) is."""
    if request.texts is not None:
        return list(request.texts), [], ["text"] * len(request.texts)
    if request.images is not None:
        return [], list(request.images), ["image"] * len(request.images)
    texts: list[str] = []
    images: list[str] = []
    kinds: list[Literal["text", "image"]] = []
    for index, item in enumerate(request.inputs or []):
        if len(item.content) != 1:
            raise BadRequest(f"Input {index} has {len(item.content)} parts: each input here is one text or one image "
                             "(one embedding each).")
        part = item.content[0]
        if part.type == "text" and part.text is not None:
            texts.append(part.text)
            kinds.append("text")
        elif part.type == "image_url" and part.image_url is not None:
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(url)
            kinds.append("image")
        else:
            raise BadRequest(f"Input {index}: a 'text' part needs 'text', an 'image_url' part needs 'image_url'.")
    return texts, images, kinds


async def _prompt_name(gateway: ModelGateway, model: str, input_type: str | None) -> str | None:
    if input_type is None:
        return None
    names = await gateway.prompt_names(model)
    for name in (input_type, *PROMPTS_FOR_INPUT_TYPE.get(input_type, ())):
        if name in names:
            return name
    return None


async def _rows(gateway: ModelGateway, request: s.CohereEmbedRequest, texts: list[str], images: list[str]
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    common = {"name": request.model, "n_dims": request.output_dimension}
    text_rows = image_rows = None
    if texts:
        options = TRUNCATION[request.truncate or "END"]
        prompt_name = await _prompt_name(gateway, request.model, request.input_type)
        request_for_texts = s.build(s.InferenceRequest, text=texts, prompt_name=prompt_name, **common, **options)
        embedded = await gateway.embed_text(request_for_texts)
        text_rows = np.asarray(embedded.embeddings, dtype=np.float32)
    if images:
        request_for_images = s.build(s.InferenceRequest, image=images, **common)
        embedded = await gateway.embed_image(request_for_images, output="features")
        image_rows = np.asarray(embedded.embeddings, dtype=np.float32)
    return text_rows, image_rows


def _typed(rows: np.ndarray, kind: str) -> list[Any]:
    if kind == "base64":
        return [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in rows]
    typed: list[Any] = quantize(rows, "float32" if kind == "float" else kind).tolist()
    return typed


async def cohere_embed(gateway: ModelGateway, request: s.CohereEmbedRequest, version: Literal[1, 2]) -> dict[str, Any]:
    """Cohere's embed response (v1: floats unless ``embedding_types`` is given; v2: by type)."""
    texts, images, kinds = _split(request)
    text_rows, image_rows = await _rows(gateway, request, texts, images)
    order = {"text": iter(text_rows if text_rows is not None else []),
             "image": iter(image_rows if image_rows is not None else [])}
    rows = np.stack([next(order[kind]) for kind in kinds])
    meta = {"api_version": {"version": str(version)},
            "billed_units": {"input_tokens": sum(len(t.split()) for t in texts), "images": len(images)}}
    answer: dict[str, Any] = {"id": str(uuid.uuid4()), "texts": texts, "meta": meta}
    if version == 1 and request.embedding_types is None:
        return {"response_type": "embeddings_floats", "embeddings": rows.tolist(), **answer}
    types = request.embedding_types or ["float"]
    return {"response_type": "embeddings_by_type", "embeddings": {kind: _typed(rows, kind) for kind in types},
            **answer}
