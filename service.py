"""The BentoML service: routes only, each a few lines into ``ingrain_bento.server``.

Every route lives on one FastAPI app mounted at ``/`` (BentoML's ``@bentoml.api`` routes are
POST-only and shape errors as a list); BentoML keeps ``/livez``, ``/readyz`` and ``/metrics``.
The service class owns the ``ModelServer`` and its lifecycle; routes are plain functions that
receive it through an async dependency (see ``model_server``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import bentoml  # noqa: E402
from fastapi import Body, Depends, Query  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

from ingrain_bento import schemas as s  # noqa: E402
from ingrain_bento.http import (  # noqa: E402
    GuardMiddleware, add_fallback_route, configure_logging, create_app, json_response)
from ingrain_bento.metrics import JSON_METRICS_PATH, MetricsFormatMiddleware, ModelMetrics  # noqa: E402
from ingrain_bento.model_list import read_model_list  # noqa: E402
from ingrain_bento.refs import Library  # noqa: E402
from ingrain_bento.server import ModelServer  # noqa: E402
from ingrain_bento.settings import get_settings  # noqa: E402

app = create_app()
PRELOAD = read_model_list(get_settings().preload) if get_settings().preload else []


@bentoml.service(
    name="ingrain-bento",
    http={"port": get_settings().port},
    workers=1,  # models live in the worker's memory: one worker per device, scale with replicas
    traffic={"timeout": 600, "concurrency": 256},
    # One access-log line per request costs measurable CPU at high request rates; management
    # actions are always logged by ingrain_bento. INGRAIN_ACCESS_LOG=true turns it back on.
    logging={"access": {"enabled": get_settings().access_log}},
    # BentoML's OpenTelemetry middleware costs ~10% of the event loop per request even with no
    # exporter; it runs only when INGRAIN_TRACING=true (then configure BentoML's tracing exporter).
    tracing={} if get_settings().tracing else {"excluded_urls": ".*"},
)
@bentoml.asgi_app(app, path="/")
class IngrainBento:
    def __init__(self) -> None:
        configure_logging()
        self.server = ModelServer(get_settings(), ModelMetrics())
        self.preloading: asyncio.Task[None] | None = None

    def __is_ready__(self) -> bool:
        """``/readyz`` is 503 until the preload list is resident."""
        return self.preloading is None or self.preloading.done()

    @bentoml.on_startup
    async def start_preload(self) -> None:
        if PRELOAD:
            self.preloading = asyncio.create_task(self.server.preload(PRELOAD))

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.server.close()


async def model_server() -> ModelServer:
    """The service's ``ModelServer``, for routes. Not BentoML's class views (``self`` on each
    route): those inject ``self`` with a sync dependency, which FastAPI runs in its thread pool,
    one thread hop per request (~8% of the event loop's GIL time under load, py-spy)."""
    return bentoml.get_current_service().server


Server = Annotated[ModelServer, Depends(model_server)]


# ---- inference: seed generation (ingrain 0.0.7) and current (0.2.3) share bodies ----
# First: each request is matched against the routes in order, twice (BentoML's mount, then
# FastAPI's router), so the busiest routes come first.

@app.post("/infer_text", response_model=s.EmbeddingsResponse)
@app.post("/embed_text", response_model=s.EmbeddingsResponse)
async def embed_text(server: Server, request: s.TextRequest) -> Response:
    return json_response(await server.embed_text(request))


@app.post("/infer_image", response_model=s.EmbeddingsResponse)
async def infer_image(server: Server, request: s.ImageRequest) -> Response:
    return json_response(await server.embed_image(request, timm_output="probabilities"))


@app.post("/embed_image", response_model=s.EmbeddingsResponse)
async def embed_image(server: Server, request: s.ImageRequest) -> Response:
    return json_response(await server.embed_image(request, timm_output="features"))


@app.post("/infer", response_model=s.TextImageEmbeddingsResponse)
async def infer(server: Server, request: s.TextImageRequest) -> Response:
    return json_response(await server.embed(request, timm_output="probabilities"))


@app.post("/embed", response_model=s.TextImageEmbeddingsResponse)
async def embed(server: Server, request: s.TextImageRequest) -> Response:
    return json_response(await server.embed(request, timm_output="features"))


@app.post("/classify_image", response_model=s.ProbabilitiesResponse)
async def classify_image(server: Server, request: s.ImageRequest) -> Response:
    return json_response(await server.classify_image(request))


# ---- model management (the seed's routes) ----------------------------------------

@app.get("/health", response_model=s.MessageResponse)
async def health() -> Response:
    return json_response(s.MessageResponse(message="The model server is running."))


@app.post("/load_clip_model", response_model=s.MessageResponse)
async def load_clip_model(server: Server, request: s.ModelRequest) -> Response:
    return json_response(await server.load(request, Library.OPEN_CLIP))


@app.post("/load_sentence_transformer_model", response_model=s.MessageResponse)
async def load_sentence_transformer_model(server: Server, request: s.ModelRequest) -> Response:
    return json_response(await server.load(request, Library.SENTENCE_TRANSFORMERS))


@app.post("/load_timm_model", response_model=s.MessageResponse)
async def load_timm_model(server: Server, request: s.ModelRequest) -> Response:
    return json_response(await server.load(request, Library.TIMM))


@app.post("/load_model", response_model=s.MessageResponse)
async def load_model(server: Server, request: s.ModelRequest) -> Response:
    return json_response(await server.load(request))


@app.post("/unload_model", response_model=s.MessageResponse)
async def unload_model(server: Server, request: s.ModelRequest) -> Response:
    return json_response(await server.unload(request))


@app.delete("/delete_model", response_model=s.MessageResponse)
async def delete_model(server: Server, request: s.ModelRequest = Body()) -> Response:
    return json_response(await server.delete(request))


@app.get("/loaded_models", response_model=s.ModelListResponse)
async def loaded_models(server: Server) -> Response:
    return json_response(server.loaded_models())


@app.get("/repository_models", response_model=s.ModelListResponse)
async def repository_models(server: Server) -> Response:
    return json_response(server.repository_models())


@app.post("/download_custom_model", response_model=s.MessageResponse)
async def download_custom_model(server: Server, request: s.CustomModelRequest) -> Response:
    return json_response(await server.download_custom(request))


@app.get("/model_embedding_size", response_model=s.EmbeddingSizeResponse)
async def model_embedding_size(server: Server, name: str = Query(min_length=1),
                               pretrained: str | None = None) -> Response:
    return json_response(server.embedding_size(name, pretrained))


@app.get("/model_classification_labels", response_model=s.LabelsResponse)
async def model_classification_labels(server: Server, name: str = Query(min_length=1),
                                      pretrained: str | None = None) -> Response:
    return json_response(server.classification_labels(name, pretrained))


@app.get(JSON_METRICS_PATH)
async def ingrain_metrics(server: Server) -> Response:
    """The Ingrain JSON form of ``GET /metrics`` (what the ingrain clients read)."""
    return JSONResponse(server.metrics.ingrain_json())


# ---- OpenAI-compatible --------------------------------------------------------------

@app.post("/v1/embeddings", response_model=s.OpenAIEmbeddingResponse)
async def openai_embeddings(server: Server, request: s.OpenAIEmbeddingRequest) -> Response:
    return json_response(await server.openai_embeddings(request))


@app.get("/v1/models", response_model=s.OpenAIModelList)
async def openai_models(server: Server) -> Response:
    return json_response(server.openai_models())


add_fallback_route(app)

# The service's models are what `bentoml build` bakes into a Bento (BentoML's own mechanism);
# a Bento serves them from its own model store, with no network.
IngrainBento.models.extend(bentoml.models.BentoModel(entry.tag) for entry in ModelServer.stored_entries(PRELOAD))

IngrainBento.add_asgi_middleware(MetricsFormatMiddleware)
IngrainBento.add_asgi_middleware(GuardMiddleware)
