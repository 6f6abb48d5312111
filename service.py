"""The Bento: two BentoML services composed with ``bentoml.depends``, and the route table.

- ``IngrainRunner`` (one worker, on the GPU when there is one): the model state. Its APIs are
  called by the front only, over a private socket; each is a line into
  ``ingrain_bento.runner.engine.RunnerEngine``.
- ``IngrainBento`` (the entry service, ``INGRAIN_HTTP_WORKERS`` processes): every route of the
  HTTP API, on one FastAPI app mounted at ``/``; each route is a line into
  ``ingrain_bento.front.gateway.ModelGateway``, which prepares inputs here and computes there.

Routes are plain functions that receive the gateway through an async dependency (see
``gateway``): BentoML's class views inject ``self`` with a sync dependency, which FastAPI runs
in its thread pool, one thread hop per request.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any, cast

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import bentoml  # noqa: E402
from fastapi import Body, Depends, Query  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

from ingrain_bento import schemas as s  # noqa: E402
from ingrain_bento.front.gateway import ModelGateway  # noqa: E402
from ingrain_bento.front.http import (  # noqa: E402
    GuardMiddleware,
    WorkerHeaderMiddleware,
    add_fallback_route,
    create_app,
    json_response,
)
from ingrain_bento.front.openai import openai_embeddings, openai_models  # noqa: E402
from ingrain_bento.logs import configure_logging  # noqa: E402
from ingrain_bento.machine import http_workers, runner_resources  # noqa: E402
from ingrain_bento.metrics import JSON_METRICS_PATH, MetricsFormatMiddleware, ModelMetrics, RequestMetrics  # noqa: E402
from ingrain_bento.model_list import baked_model_tags, preload_list  # noqa: E402
from ingrain_bento.refs import ModelRef  # noqa: E402
from ingrain_bento.runner.engine import RunnerEngine  # noqa: E402
from ingrain_bento.runner.state import ResidentState  # noqa: E402
from ingrain_bento.settings import get_settings  # noqa: E402
from ingrain_bento.wire import answer, fix_media_types  # noqa: E402

SETTINGS = get_settings()
# BentoML's OpenTelemetry middleware costs ~10% of an event loop per request even with no
# exporter, and its access log a line per request: both off unless asked for.
OBSERVABILITY: dict[str, Any] = {
    "logging": {"access": {"enabled": SETTINGS.access_log}},
    "tracing": {} if SETTINGS.tracing else {"excluded_urls": ".*"},
}


@bentoml.service(
    name="ingrain-runner",
    workers=1,  # the models live in this process: one runner per device
    resources=runner_resources(SETTINGS),
    traffic={"timeout": 600},
    # BentoML's dependency client closes its connection pool every 100 requests and every
    # 300 s, even with calls in flight, which fail with ServerDisconnectedError (BentoML
    # issues #5540, #5544, #4971; measured: 35-39% of calls at 64 in flight). One pool for the
    # worker's life instead; tests/test_runner_tier.py counts the retries that would follow.
    runner_connection={"max_requests": 2**62, "max_age": 1e12},
    **OBSERVABILITY,
)
class IngrainRunner:
    def __init__(self) -> None:
        configure_logging()
        context = bentoml.server_context  # which Bento (and version) this runner serves
        state = (ResidentState(f"{context.bento_name}-{context.bento_version}-{SETTINGS.device or 'auto'}")
                 if SETTINGS.restore else None)
        self.engine = RunnerEngine(SETTINGS, ModelMetrics(), state)
        self.starting: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start(self) -> None:
        """Restore what was resident and load the preload list, while already serving."""
        self.starting = asyncio.create_task(self.engine.start(preload_list(SETTINGS)))

    async def __is_ready__(self) -> bool:
        return self.starting is None or self.starting.done()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.engine.close()

    @bentoml.api
    async def infer(self, model: dict[str, Any], task: str, tag: str, payload: Any) -> Any:
        return await answer(self.engine.infer(ModelRef(**model), task, tag, payload))

    @bentoml.api
    async def describe(self, name: str, pretrained: Any = None, library: str | None = None) -> Any:
        return await answer(self._describe(name, pretrained, library))

    async def _describe(self, name: str, pretrained: Any, library: str | None) -> dict[str, Any]:
        return (await self.engine.describe(name, pretrained, library)).as_dict()

    @bentoml.api
    async def load(self, request: s.ModelRequest, library: str | None = None) -> Any:
        return await answer(self.engine.load(request, library))

    @bentoml.api
    async def unload(self, request: s.ModelRequest) -> str:
        return await answer(self.engine.unload(request))

    @bentoml.api
    async def delete(self, request: s.ModelRequest) -> str:
        return await answer(self.engine.delete(request))

    @bentoml.api
    async def download_custom(self, request: s.CustomModelRequest) -> str:
        return await answer(self.engine.download_custom(request))

    @bentoml.api
    async def loaded_models(self) -> list[s.ModelInfo]:
        return self.engine.loaded_models()

    @bentoml.api
    async def repository_models(self) -> list[s.ModelInfo]:
        return self.engine.repository_models()

    @bentoml.api
    async def served_models(self) -> Any:
        return self.engine.served_models()

    @bentoml.api
    async def embedding_size(self, name: str, pretrained: str | None = None) -> Any:
        return await answer(asyncio.to_thread(self.engine.embedding_size, name, pretrained))

    @bentoml.api
    async def classification_labels(self, name: str, pretrained: str | None = None) -> Any:
        return await answer(asyncio.to_thread(self.engine.classification_labels, name, pretrained))

    @bentoml.api
    async def ingrain_metrics(self) -> Any:
        return self.engine.ingrain_metrics()


app = create_app()


@bentoml.service(
    name="ingrain-bento",
    # The Bento's Python packages: pyproject.toml's [project].dependencies, the one list (bentofile.yaml
    # holds the rest of the container: base image, Python version).
    image=bentoml.images.Image().pyproject_toml("pyproject.toml"),
    http={"port": SETTINGS.port},
    workers=http_workers(SETTINGS),  # stateless: tokenizers, images, HTTP and JSON (README Performance)
    traffic={"timeout": 600, "concurrency": 256},
    **OBSERVABILITY,
)
@bentoml.asgi_app(app, path="/")
class IngrainBento:
    runner = bentoml.depends(IngrainRunner)

    def __init__(self) -> None:
        configure_logging()
        self.gateway = ModelGateway(self.runner, SETTINGS, RequestMetrics())
        self.warming: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start(self) -> None:
        """Open the tokenizers of the runner's resident models, while already serving."""
        self.warming = asyncio.create_task(self.gateway.warm_up())

    async def __is_ready__(self) -> bool:
        return self.warming is None or self.warming.done()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.gateway.close()


async def gateway() -> ModelGateway:
    """The front worker's ``ModelGateway``, for routes (an async dependency: no thread hop)."""
    front: IngrainBento = bentoml.get_current_service()
    return front.gateway


Gateway = Annotated[ModelGateway, Depends(gateway)]


# ---- inference: seed generation (ingrain 0.0.7) and current (0.2.3) share bodies ----
# First: each request is matched against the routes in order, twice (BentoML's mount, then
# FastAPI's router), so the busiest routes come first.

@app.post("/infer_text", response_model=s.EmbeddingsResponse)
@app.post("/embed_text", response_model=s.EmbeddingsResponse)
async def embed_text(gw: Gateway, request: s.TextRequest) -> Response:
    return json_response(await gw.embed_text(request))


@app.post("/infer_image", response_model=s.EmbeddingsResponse)
async def infer_image(gw: Gateway, request: s.ImageRequest) -> Response:
    return json_response(await gw.embed_image(request, output="probabilities"))


@app.post("/embed_image", response_model=s.EmbeddingsResponse)
async def embed_image(gw: Gateway, request: s.ImageRequest) -> Response:
    return json_response(await gw.embed_image(request, output="features"))


@app.post("/infer", response_model=s.TextImageEmbeddingsResponse)
async def infer(gw: Gateway, request: s.TextImageRequest) -> Response:
    return json_response(await gw.embed(request, output="probabilities"))


@app.post("/embed", response_model=s.TextImageEmbeddingsResponse)
async def embed(gw: Gateway, request: s.TextImageRequest) -> Response:
    return json_response(await gw.embed(request, output="features"))


@app.post("/classify_image", response_model=s.ProbabilitiesResponse)
async def classify_image(gw: Gateway, request: s.ImageRequest) -> Response:
    return json_response(await gw.classify_image(request))


# ---- model management (the seed's routes) ----------------------------------------

@app.get("/health", response_model=s.MessageResponse)
async def health() -> Response:
    return json_response(s.MessageResponse(message="The model server is running."))


@app.post("/load_clip_model", response_model=s.MessageResponse)
async def load_clip_model(gw: Gateway, request: s.ModelRequest) -> Response:
    return json_response(await gw.load(request, "open_clip"))


@app.post("/load_sentence_transformer_model", response_model=s.MessageResponse)
async def load_sentence_transformer_model(gw: Gateway, request: s.ModelRequest) -> Response:
    return json_response(await gw.load(request, "sentence_transformers"))


@app.post("/load_timm_model", response_model=s.MessageResponse)
async def load_timm_model(gw: Gateway, request: s.ModelRequest) -> Response:
    return json_response(await gw.load(request, "timm"))


@app.post("/load_model", response_model=s.MessageResponse)
async def load_model(gw: Gateway, request: s.ModelRequest) -> Response:
    return json_response(await gw.load(request))


@app.post("/unload_model", response_model=s.MessageResponse)
async def unload_model(gw: Gateway, request: s.ModelRequest) -> Response:
    return json_response(await gw.unload(request))


@app.delete("/delete_model", response_model=s.MessageResponse)
async def delete_model(gw: Gateway, request: s.ModelRequest = Body()) -> Response:
    return json_response(await gw.delete(request))


@app.get("/loaded_models", response_model=s.ModelListResponse)
async def loaded_models(gw: Gateway) -> Response:
    return json_response(await gw.loaded_models())


@app.get("/repository_models", response_model=s.ModelListResponse)
async def repository_models(gw: Gateway) -> Response:
    return json_response(await gw.repository_models())


@app.post("/download_custom_model", response_model=s.MessageResponse)
async def download_custom_model(gw: Gateway, request: s.CustomModelRequest) -> Response:
    return json_response(await gw.download_custom(request))


@app.get("/model_embedding_size", response_model=s.EmbeddingSizeResponse)
async def model_embedding_size(gw: Gateway, name: str = Query(min_length=1), pretrained: str | None = None) -> Response:
    return json_response(await gw.embedding_size(name, pretrained))


@app.get("/model_classification_labels", response_model=s.LabelsResponse)
async def model_classification_labels(gw: Gateway, name: str = Query(min_length=1),
                                      pretrained: str | None = None) -> Response:
    return json_response(await gw.classification_labels(name, pretrained))


@app.get(JSON_METRICS_PATH)
async def ingrain_metrics(gw: Gateway) -> Response:
    """The Ingrain JSON form of ``GET /metrics`` (what the ingrain clients read)."""
    return JSONResponse(await gw.ingrain_metrics())


# ---- OpenAI-compatible --------------------------------------------------------------

@app.post("/v1/embeddings", response_model=s.OpenAIEmbeddingResponse)
async def v1_embeddings(gw: Gateway, request: s.OpenAIEmbeddingRequest) -> Response:
    return json_response(await openai_embeddings(gw, request))


@app.get("/v1/models", response_model=s.OpenAIModelList)
async def v1_models(gw: Gateway) -> Response:
    return json_response(await openai_models(gw))


add_fallback_route(app)

# mypy does not apply class decorators: to it these names are still the plain classes.
runner_service, front_service = cast(Any, IngrainRunner), cast(Any, IngrainBento)

fix_media_types(runner_service)

# A Bento carries the preload list's store entries (only when INGRAIN_PRELOAD is set at build).
runner_service.models.extend(bentoml.models.BentoModel(tag) for tag in baked_model_tags(SETTINGS))

front_service.add_asgi_middleware(MetricsFormatMiddleware)
front_service.add_asgi_middleware(GuardMiddleware)
front_service.add_asgi_middleware(WorkerHeaderMiddleware)
