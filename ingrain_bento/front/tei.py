"""The TEI protocol (Hugging Face text-embeddings-inference), so that
``huggingface_hub.InferenceClient`` and other TEI clients work unmodified: an adapter over the
gateway, as ``openai.py`` is (API.md "The TEI protocol").

TEI's bodies name no model: each request uses ``INGRAIN_DEFAULT_MODEL``, else the only resident
model that can do the task (``ModelGateway.default_model``). Each body becomes the native request (texts,
prompt, truncation, dimensions) and the answer TEI's shape. ``POST /`` tells its bodies apart as
TEI does (``root``): ``inputs`` as a source sentence and sentences is a similarity, ``query`` and
``texts`` a rerank, ``inputs`` as text an embedding. The routes TEI shares with the native API
(``/embed``, ``/rerank``, ``/embed_sparse``) take either body: ``protocol`` tells them apart by
their fields (``inputs`` without ``name``/``text``/``image`` is TEI's).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from ingrain_bento import schemas as s
from ingrain_bento.errors import BadRequest
from ingrain_bento.families.base import TextPrep
from ingrain_bento.front.gateway import ModelGateway
from ingrain_bento.settings import Settings
from ingrain_bento.tasks import EMBED_SPARSE, EMBED_TEXT, RERANK, classify_text

__all__ = ["EmbedBody", "RerankBody", "SparseBody", "decode", "embed", "info", "protocol", "rerank",
           "root", "similarity", "sparse", "tokenize"]

NATIVE_FIELDS = frozenset({"name", "text", "image", "model", "documents"})


def protocol(body: Any) -> str:
    """``tei`` for a TEI body (no field of the native API's), else ``native``."""
    if isinstance(body, dict) and ("inputs" in body or "texts" in body) and not NATIVE_FIELDS & body.keys():
        return "tei"
    return "native"


EmbedBody = Annotated[Annotated[s.TextImageRequest, Tag("native")] | Annotated[s.TEIEmbedRequest, Tag("tei")],
                      Discriminator(protocol)]
RerankBody = Annotated[Annotated[s.RerankRequest, Tag("native")] | Annotated[s.TEIRerankRequest, Tag("tei")],
                       Discriminator(protocol)]
SparseBody = Annotated[Annotated[s.SparseRequest, Tag("native")] | Annotated[s.TEISparseRequest, Tag("tei")],
                       Discriminator(protocol)]


def _options(body: s.TEIOptions) -> dict[str, Any]:
    return {"truncate": True if body.truncate is None else body.truncate,
            "truncation_direction": body.truncation_direction, "prompt_name": body.prompt_name}


async def embed(gateway: ModelGateway, settings: Settings, body: s.TEIEmbedRequest) -> s.Rows:
    """``[[float]]``, one row per input."""
    name = await gateway.default_model(EMBED_TEXT)
    request = s.build(s.InferenceRequest, name=name, text=s.as_list(body.inputs), normalize=body.normalize,
                      n_dims=body.dimensions, **_options(body))
    return (await gateway.embed_text(request)).embeddings


async def similarity(gateway: ModelGateway, settings: Settings, body: s.TEISimilarityRequest) -> list[float]:
    """The cosine of the source sentence with each sentence."""
    name = await gateway.default_model(EMBED_TEXT)
    texts = [body.inputs.source_sentence, *body.inputs.sentences]
    request = s.build(s.InferenceRequest, name=name, text=texts, normalize=True, **_options(body))
    rows = np.asarray((await gateway.embed_text(request)).embeddings, dtype=np.float32)
    scores: list[float] = (rows[1:] @ rows[0]).tolist()
    return scores


async def rerank(gateway: ModelGateway, settings: Settings, body: s.TEIRerankRequest) -> list[dict[str, Any]]:
    """``[{"index", "score", "text"?}]``, best first. The scores are the model's own activation of
    its logits, as ``CrossEncoder.predict`` gives them (``raw_scores`` is read and not applied)."""
    name = await gateway.default_model(RERANK)
    ranked = await gateway.rerank(s.build(s.RerankRequest, model=name, query=body.query, documents=body.texts))
    return [{"index": r.index, "score": r.relevance_score,
             **({"text": body.texts[r.index]} if body.return_text else {})} for r in ranked.results]


async def sparse(gateway: ModelGateway, settings: Settings, body: s.TEISparseRequest) -> list[list[dict[str, Any]]]:
    """``[[{"index", "value"}]]``, one list per input."""
    name = await gateway.default_model(EMBED_SPARSE)
    request = s.build(s.SparseRequest, name=name, text=s.as_list(body.inputs), **_options(body))
    vectors = (await gateway.embed_sparse(request)).embeddings
    return [[{"index": i, "value": v} for i, v in zip(vector.indices, vector.values, strict=True)]
            for vector in vectors]


async def tokenize(gateway: ModelGateway, settings: Settings, body: s.TEITokenizeRequest) -> list[list[s.Token]]:
    name = await gateway.default_model(EMBED_TEXT)
    prep = TextPrep(prompt_name=body.prompt_name)
    return await gateway.tokens(name, s.as_list(body.inputs), body.add_special_tokens, prep)


async def decode(gateway: ModelGateway, settings: Settings, body: s.TEIDecodeRequest) -> list[str]:
    name = await gateway.default_model(EMBED_TEXT)
    return await gateway.decode(name, _id_rows(body.ids), body.skip_special_tokens)


def _id_rows(ids: list[int] | list[list[int]]) -> list[list[int]]:
    """TEI's ``ids``: one sequence, or several."""
    rows: list[list[int]] = []
    for item in ids:
        if isinstance(item, int):
            return [[i for i in ids if isinstance(i, int)]]
        rows.append(item)
    return rows


async def info(gateway: ModelGateway, settings: Settings) -> dict[str, Any]:
    """TEI's ``/info``, for the model a TEI body means."""
    name = await gateway.default_model(EMBED_TEXT)
    model = next((m for m in (await gateway.loaded_models()).models if name in (m.id, m.name)), None)
    return {"model_id": name, "model_sha": model.store_tag if model else None, "model_dtype": "float32",
            "model_type": {"embedding": {"pooling": "model"}}, "max_concurrent_requests": 256,
            "max_input_length": None, "max_batch_tokens": settings.max_batch_tokens,
            "max_client_batch_size": settings.max_items_per_request, "tokenization_workers": 1,
            "version": "ingrain-bento", "prompts": model.prompts if model else []}


_ROOT_BODIES: list[tuple[type[Any], Any]] = [
    (s.TEISimilarityRequest, similarity), (s.TEIRerankRequest, rerank), (s.TEIEmbedRequest, embed)]


async def root(gateway: ModelGateway, settings: Settings, body: dict[str, Any]) -> Any:
    """``POST /``: a similarity (``inputs`` as a source sentence and sentences), a rerank (``query``
    and ``texts``), a text classification (``inputs`` for a classifier), or an embedding
    (``inputs`` as text)."""
    if isinstance(body.get("inputs"), dict):
        schema, handler = _ROOT_BODIES[0]
    elif "query" in body and "texts" in body:
        schema, handler = _ROOT_BODIES[1]
    elif "inputs" in body and await _classifies(gateway, body):
        return await classify_text.tei_predict(gateway, _parse(classify_text.TEIPredictRequest, body), nested=True)
    elif "inputs" in body:
        schema, handler = _ROOT_BODIES[2]
    else:
        raise BadRequest("POST / takes TEI's bodies: 'inputs' (a text or texts, or a source_sentence and "
                         "sentences), or 'query' and 'texts'.")
    return await handler(gateway, settings, _parse(schema, body))


def _parse(schema: type[Any], body: dict[str, Any]) -> Any:
    try:
        return TypeAdapter(schema).validate_python(body)
    except ValidationError as exc:
        raise BadRequest(s.validation_message([dict(error) for error in exc.errors()])) from None


async def _classifies(gateway: ModelGateway, body: dict[str, Any]) -> bool:
    """Whether ``inputs`` are texts to classify: the body carries huggingface_hub's ``parameters``
    of ``text_classification`` (``feature_extraction`` never sends them), or, as TEI decides by its
    one model, the default model is a classifier."""
    if "parameters" in body:
        return True
    name = gateway.settings.default_model
    return bool(name) and classify_text.CLASSIFY_TEXT in (await gateway.handle(s.ModelRequest(name=name))).capabilities
