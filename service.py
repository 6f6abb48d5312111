"""The Bento: two BentoML services composed with ``bentoml.depends``, and the route table.

- ``IngrainBento`` (the entry service, ``INGRAIN_HTTP_WORKERS`` processes): every route of the
  HTTP API, on one FastAPI app mounted at ``/``; each route is a line into
  ``ingrain_bento.front.gateway.ModelGateway``, which prepares inputs here and computes with an
  ``Engine`` (``ingrain_bento.boundary``).
- ``IngrainRunner`` (``INGRAIN_RUNNERS`` workers, one per GPU when there are any): the models when
  they live apart from the front, each worker with its own copy, all following one desired model
  state (``ingrain_bento.runner.sync``). ``wire.RunnerGate`` serves its calls (raw frames,
  token-checked; it has no BentoML APIs, so nothing of it reads pickle), and so does each worker's
  own socket beside BentoML's (``frame_socket``: the same calls without HTTP, on one machine).

Where the engine runs is ``machine.engine_process``: in the front's own process (no GPU, one
front worker: the default on small CPU machines, where a second process only costs) or in the
runner, called over ``wire``. Both services are always in the Bento, so it deploys either way.

Routes are plain functions that receive the gateway through an async dependency (see
``gateway``): BentoML's class views inject ``self`` with a sync dependency, which FastAPI runs
in its thread pool, one thread hop per request.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any, cast

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from ingrain_bento.settings import ensure_runner_token, get_settings  # noqa: E402

# Generated here when unset, in the `bentoml serve` process before it starts the workers: every
# worker inherits it.
RUNNER_TOKEN = ensure_runner_token()

import bentoml  # noqa: E402
from fastapi import Body, Depends, Query  # noqa: E402
from fastapi.encoders import jsonable_encoder  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.types import ASGIApp  # noqa: E402

from ingrain_bento import schemas as s  # noqa: E402
from ingrain_bento.bentoml_seam import dependency_address, serve_outside_bentoml, worker_index  # noqa: E402
from ingrain_bento.boundary import Engine  # noqa: E402
from ingrain_bento.frame_socket import FrameSocketServer, SocketTransport, socket_path  # noqa: E402
from ingrain_bento.front import tei  # noqa: E402
from ingrain_bento.front.cohere import cohere_embed  # noqa: E402
from ingrain_bento.front.docs import CLIP, PNG, RERANKER, SPLADE, ST, TIMM  # noqa: E402
from ingrain_bento.front.fast_path import FastPath, lean_routes  # noqa: E402
from ingrain_bento.front.gateway import ModelGateway  # noqa: E402
from ingrain_bento.front.http import (  # noqa: E402
    GuardMiddleware,
    WorkerHeaderMiddleware,
    add_fallback_route,
    create_app,
    json_response,
)
from ingrain_bento.front.openai import openai_embeddings, openai_models  # noqa: E402
from ingrain_bento.front.remote_engine import RemoteEngine  # noqa: E402
from ingrain_bento.front.task_routes import add_task_routes  # noqa: E402
from ingrain_bento.logs import configure_logging  # noqa: E402
from ingrain_bento.machine import (  # noqa: E402
    engine_process,
    http_workers,
    runner_count,
    runner_place,
    runner_resources,
)
from ingrain_bento.metrics import (  # noqa: E402
    JSON_METRICS_PATH,
    HttpMetrics,
    MetricsFormatMiddleware,
    ModelMetrics,
    RequestMetrics,
)
from ingrain_bento.model_list import baked_model_tags, preload_list  # noqa: E402
from ingrain_bento.runner.engine import RunnerEngine  # noqa: E402
from ingrain_bento.runner.sync import open_model_state, runner_id  # noqa: E402
from ingrain_bento.tasks import zero_shot  # noqa: E402
from ingrain_bento.wire import RunnerGate  # noqa: E402

SETTINGS = get_settings()
RUNNER_NAME = "ingrain-runner"
# BentoML's OpenTelemetry middleware costs ~10% of an event loop per request even with no
# exporter, and its access log a line per request: both off unless asked for.
OBSERVABILITY: dict[str, Any] = {
    "logging": {"access": {"enabled": SETTINGS.access_log}},
    "tracing": {} if SETTINGS.tracing else {"excluded_urls": ".*"},
}
TIMEOUT_S = 600  # BentoML's traffic timeout, and FastPath's
# BentoML's request series, for what is answered before its layers (the lean path, the runner's calls)
FRONT_HTTP, RUNNER_HTTP = HttpMetrics("ingrain-bento"), HttpMetrics("ingrain-runner")


def new_engine(index: int = 0) -> RunnerEngine:
    """Runner ``index``'s engine, following the desired model state (kept per Bento, version and
    device on this machine alone; in the bucket with ``INGRAIN_SHARED_STORE``)."""
    context = bentoml.server_context
    name = f"{context.bento_name}-{context.bento_version}-{SETTINGS.device or 'auto'}"
    home, mirror = open_model_state(SETTINGS, name, runner_count(SETTINGS))
    return RunnerEngine(SETTINGS, ModelMetrics(), home, runner_id=runner_id(SETTINGS, index), runner_index=index,
                        mirror=mirror)


@bentoml.service(
    name=RUNNER_NAME,
    workers=runner_count(SETTINGS),  # the models live in each worker's memory: one runner per device
    resources=runner_resources(SETTINGS),
    traffic={"timeout": TIMEOUT_S},
    **OBSERVABILITY,
)
class IngrainRunner:
    def __init__(self) -> None:
        configure_logging()
        self.engine: RunnerEngine | None = None
        self.starting: asyncio.Task[None] | None = None
        self.own_socket: FrameSocketServer | None = None

    @bentoml.on_startup
    async def start(self) -> None:
        """Open this worker's own socket for its fronts' calls (``frame_socket``); restore what was
        resident and load the preload list, while already serving; an idle runner when the front
        holds the models itself."""
        path = socket_path(runner_address(), max(0, worker_index() - 1))  # BentoML numbers workers from 1
        if path is not None:
            self.own_socket = FrameSocketServer(runner_engine, RUNNER_TOKEN, metrics=RUNNER_HTTP)
            await self.own_socket.start(path)
        if engine_process(SETTINGS, "local") == "runner":
            self.activate()

    def activate(self) -> RunnerEngine:
        """The engine, started once: at start-up, or by the first call of a front that holds no
        models (services deployed apart on a machine where ``engine_process`` guessed "front")."""
        if self.engine is None:
            self.engine = new_engine(max(0, worker_index() - 1))  # BentoML numbers workers from 1
            self.starting = asyncio.create_task(self.engine.start(preload_list(SETTINGS)))
        return self.engine

    async def __is_ready__(self) -> bool:
        return self.starting is None or self.starting.done()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        if self.own_socket is not None:
            await self.own_socket.close()
        RUNNER_HTTP.flush()
        if self.engine is not None:
            await self.engine.close()


async def runner_engine() -> Engine:
    """The runner worker's engine, for ``RunnerGate``."""
    runner: IngrainRunner = bentoml.get_current_service()
    return runner.activate()


def runner_address() -> str | None:
    """The runner's address BentoML gives this front worker (``BENTOML_RUNNER_MAP``), or None when
    there is no runner process (``Service.to_asgi()``)."""
    return dependency_address(RUNNER_NAME)


app = create_app()


@bentoml.service(
    name="ingrain-bento",
    # The Bento's Python packages: lock/runtime.txt, the versions the tests passed with, pinned
    # (generated from pyproject.toml by lock/refresh.sh; bentofile.yaml holds the rest of the
    # container: base image, Python version).
    image=bentoml.images.Image().requirements_file("lock/runtime.txt"),
    http={"port": SETTINGS.port},
    workers=http_workers(SETTINGS),  # stateless: tokenizers, images, HTTP and JSON (README Performance)
    traffic={"timeout": TIMEOUT_S, "concurrency": 256},
    **OBSERVABILITY,
)
@bentoml.asgi_app(app, path="/")
class IngrainBento:
    runner = bentoml.depends(IngrainRunner)

    def __init__(self) -> None:
        configure_logging()
        address = runner_address()
        self.local_engine: RunnerEngine | None = None
        self.remote_engine: RemoteEngine | None = None
        engine: Engine
        if address is None or engine_process(SETTINGS, runner_place(address)) == "front":
            engine = self.local_engine = new_engine()
        else:
            transport = SocketTransport(address, RUNNER_TOKEN, runners=runner_count(SETTINGS))
            engine = self.remote_engine = RemoteEngine(transport, max_requests_per_call=SETTINGS.max_batch_size,
                                                       metrics=RequestMetrics(), runners=runner_count(SETTINGS))
        self.gateway = ModelGateway(engine, SETTINGS, RequestMetrics(), own_process=self.local_engine is not None)
        self.warming: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start(self) -> None:
        """Restore the models (when they live here) and open their tokenizers, while already serving."""
        if self.local_engine is not None:
            restoring = asyncio.create_task(self.local_engine.start(preload_list(SETTINGS)))
            self.warming = asyncio.create_task(self.gateway.warm_up(lambda: asyncio.shield(restoring)))
        elif self.remote_engine is not None:
            self.warming = asyncio.create_task(self.gateway.warm_up(self.remote_engine.wait_ready))

    async def __is_ready__(self) -> bool:
        return self.warming is None or self.warming.done()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        FRONT_HTTP.flush()
        await self.gateway.close()
        for engine in (self.local_engine, self.remote_engine):
            if engine is not None:
                await engine.close()


current_service = bentoml.get_current_service  # resolved once: bentoml's module resolves its names on each access


async def gateway() -> ModelGateway:
    """The front worker's ``ModelGateway``, for routes (an async dependency: no thread hop)."""
    front: IngrainBento = current_service()
    return front.gateway


Gateway = Annotated[ModelGateway, Depends(gateway)]


def example(value: dict[str, Any], summary: str) -> Any:
    """A route's JSON body, with the example its API page (``/docs``) starts "Try it out" from."""
    return Body(openapi_examples={"example": {"summary": summary, "value": value}})


def query(value: str) -> Any:
    return Query(min_length=1, openapi_examples={"example": {"value": value}})


# ---- inference: seed generation (ingrain 0.0.7) and current (0.2.3) share bodies ----
# First: each request is matched against the routes in order, twice (BentoML's mount, then
# FastAPI's router), so the busiest routes come first.

@app.post("/infer_text", response_model=s.EmbeddingsResponse)
@app.post("/embed_text", response_model=s.EmbeddingsResponse)
async def embed_text(gw: Gateway, request: Annotated[s.TextRequest, example(
        {"name": ST, "text": ["query: hello", "query: world"], "normalize": True}, "Two texts")]) -> Response:
    return json_response(await gw.embed_text(request))


@app.post("/infer_image", response_model=s.EmbeddingsResponse)
async def infer_image(gw: Gateway, request: Annotated[s.ImageRequest, example(
        {"name": CLIP, "image": [PNG]}, "One image (a classifier answers its probabilities)")]) -> Response:
    return json_response(await gw.embed_image(request, output="probabilities"))


@app.post("/embed_image", response_model=s.EmbeddingsResponse)
async def embed_image(gw: Gateway, request: Annotated[s.ImageRequest, example(
        {"name": CLIP, "image": [PNG]}, "One image")]) -> Response:
    return json_response(await gw.embed_image(request, output="features"))


@app.post("/infer", response_model=s.TextImageEmbeddingsResponse)
async def infer(gw: Gateway, request: Annotated[s.TextImageRequest, example(
        {"name": CLIP, "text": ["a red square"], "image": [PNG]}, "A text and an image")]) -> Response:
    return json_response(await gw.embed(request, output="probabilities"))


@app.post("/embed", response_model=s.TextImageEmbeddingsResponse)
async def embed(gw: Gateway, request: Annotated[tei.EmbedBody, example(
        {"name": CLIP, "text": ["a red square"], "image": [PNG]}, "A text and an image")]) -> Response:
    if isinstance(request, s.TEIEmbedRequest):  # TEI's body (README "The TEI protocol")
        return json_response(await tei.embed(gw, SETTINGS, request))
    return json_response(await gw.embed(request, output="features"))


@app.post("/classify_image", response_model=s.ProbabilitiesResponse | zero_shot.ZeroShotResponse)
async def classify_image(gw: Gateway, request: Annotated[zero_shot.ZeroShotRequest, example(
        {"name": TIMM, "image": [PNG]}, "One image")]) -> Response:
    if request.labels is not None:  # a CLIP model, against the labels sent (tasks/zero_shot.py)
        return json_response(await zero_shot.answer(gw, request))
    return json_response(await gw.classify_image(request))


@app.post("/embed_sparse", response_model=s.SparseEmbeddingsResponse)
async def embed_sparse(gw: Gateway, request: Annotated[tei.SparseBody, example(
        {"name": SPLADE, "text": ["what is a sparse embedding?"], "top_k": 64}, "One text, its 64 largest")]
) -> Response:
    if isinstance(request, s.TEISparseRequest):
        return JSONResponse(await tei.sparse(gw, SETTINGS, request))
    return json_response(await gw.embed_sparse(request))


RERANK_EXAMPLE = {"model": RERANKER, "query": "what is the capital of France?", "top_n": 2, "return_documents": True,
                  "documents": ["Paris is the capital of France.", "Berlin is in Germany.",
                                {"text": "France is in Europe."}]}


@app.post("/rerank", response_model=s.RerankResponse, response_model_exclude_none=True)
@app.post("/v1/rerank", response_model=s.RerankResponse, response_model_exclude_none=True)  # Cohere v1, Jina
@app.post("/v2/rerank", response_model=s.RerankResponse, response_model_exclude_none=True)  # Cohere v2
async def rerank(gw: Gateway, request: Annotated[tei.RerankBody, example(RERANK_EXAMPLE, "Three documents")]
                 ) -> Response:
    if isinstance(request, s.TEIRerankRequest):
        return JSONResponse(await tei.rerank(gw, SETTINGS, request))
    return json_response(await gw.rerank(request), exclude_none=True)


# ---- model management (the seed's routes) ----------------------------------------

@app.get("/health", response_model=s.MessageResponse)
async def health() -> Response:
    return json_response(s.MessageResponse(message="The model server is running."))


@app.post("/load_clip_model", response_model=s.MessageResponse)
async def load_clip_model(gw: Gateway, request: Annotated[s.ModelRequest, example(
        {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "A built-in architecture and tag")]) -> Response:
    return json_response(await gw.load(request, "open_clip"))


@app.post("/load_sentence_transformer_model", response_model=s.MessageResponse)
async def load_sentence_transformer_model(gw: Gateway, request: Annotated[s.ModelRequest, example(
        {"name": ST}, "A Hub id")]) -> Response:
    return json_response(await gw.load(request, "sentence_transformers"))


@app.post("/load_timm_model", response_model=s.MessageResponse)
async def load_timm_model(gw: Gateway, request: Annotated[s.ModelRequest, example(
        {"name": TIMM, "pretrained": True}, "timm's pretrained weights")]) -> Response:
    return json_response(await gw.load(request, "timm"))


@app.post("/load_model", response_model=s.MessageResponse)
async def load_model(gw: Gateway, request: Annotated[s.ModelRequest, example(
        {"name": ST, "library": "sentence_transformers", "backend": "onnx"}, "Any library, on an engine")]
) -> Response:
    return json_response(await gw.load(request))


@app.post("/unload_model", response_model=s.MessageResponse)
async def unload_model(gw: Gateway, request: Annotated[s.ModelRequest, example({"name": ST}, "By name")]) -> Response:
    return json_response(await gw.unload(request))


@app.delete("/delete_model", response_model=s.MessageResponse)
async def delete_model(gw: Gateway, request: Annotated[s.ModelRequest, example({"name": ST}, "By name")]) -> Response:
    return json_response(await gw.delete(request))


@app.get("/loaded_models", response_model=s.ModelListResponse)
async def loaded_models(gw: Gateway) -> Response:
    return json_response(await gw.loaded_models())


@app.get("/repository_models", response_model=s.ModelListResponse)
async def repository_models(gw: Gateway) -> Response:
    return json_response(await gw.repository_models())


@app.post("/download_custom_model", response_model=s.MessageResponse)
async def download_custom_model(gw: Gateway, request: Annotated[s.CustomModelRequest, example(
        {"library": "timm", "pretrained_name": "my-timm", "numClasses": 10,
         "safetensorsUrl": "https://example.com/model.safetensors"}, "A timm checkpoint")]) -> Response:
    return json_response(await gw.download_custom(request))


@app.get("/model_embedding_size", response_model=s.EmbeddingSizeResponse)
async def model_embedding_size(gw: Gateway, name: Annotated[str, query(ST)], pretrained: str | None = None) -> Response:
    return json_response(await gw.embedding_size(name, pretrained))


@app.get("/model_classification_labels", response_model=s.LabelsResponse)
async def model_classification_labels(gw: Gateway, name: Annotated[str, query(TIMM)],
                                      pretrained: str | None = None) -> Response:
    return json_response(await gw.classification_labels(name, pretrained))


@app.get(JSON_METRICS_PATH)
async def ingrain_metrics(gw: Gateway) -> Response:
    """The Ingrain JSON form of ``GET /metrics`` (what the ingrain clients read)."""
    return JSONResponse(await gw.ingrain_metrics())


# ---- OpenAI-compatible --------------------------------------------------------------

@app.post("/v1/embeddings", response_model=s.OpenAIEmbeddingResponse)
async def v1_embeddings(gw: Gateway, request: Annotated[s.OpenAIEmbeddingRequest, example(
        {"model": ST, "input": ["hello"], "dimensions": 128}, "One text, 128 dimensions")]) -> Response:
    return json_response(await openai_embeddings(gw, request))


@app.get("/v1/models", response_model=s.OpenAIModelList)
async def v1_models(gw: Gateway) -> Response:
    return json_response(await openai_models(gw))


# ---- Cohere embed ----------------------------------------------------------------------------

COHERE_EXAMPLE = example({"model": ST, "texts": ["hello"], "input_type": "search_query",
                          "embedding_types": ["float", "int8"]}, "One text, floats and int8")


@app.post("/v1/embed")
async def cohere_v1_embed(gw: Gateway, request: Annotated[s.CohereEmbedRequest, COHERE_EXAMPLE]) -> Response:
    return JSONResponse(await cohere_embed(gw, request, version=1))


@app.post("/v2/embed")
async def cohere_v2_embed(gw: Gateway, request: Annotated[s.CohereEmbedRequest, COHERE_EXAMPLE]) -> Response:
    return JSONResponse(await cohere_embed(gw, request, version=2))


# ---- the TEI protocol (its bodies name no model: INGRAIN_DEFAULT_MODEL) ---------------------------

@app.post("/")
async def tei_root(gw: Gateway, body: Annotated[dict[str, Any], example({"inputs": ["hello"]}, "TEI's embed")]
                   ) -> Response:
    return json_response(await tei.root(gw, SETTINGS, body))


@app.post("/similarity")
async def tei_similarity(gw: Gateway, request: Annotated[s.TEISimilarityRequest, example(
        {"inputs": {"source_sentence": "a cat", "sentences": ["a dog", "a kitten"]}}, "Two sentences")]) -> Response:
    return JSONResponse(await tei.similarity(gw, SETTINGS, request))


@app.post("/tokenize")
async def tei_tokenize(gw: Gateway, request: Annotated[s.TEITokenizeRequest, example(
        {"inputs": "hello world"}, "One text")]) -> Response:
    return JSONResponse(jsonable_encoder(await tei.tokenize(gw, SETTINGS, request)))


@app.post("/decode")
async def tei_decode(gw: Gateway, request: Annotated[s.TEIDecodeRequest, example({"ids": [101, 7592, 102]},
                                                                                "Three ids")]) -> Response:
    return JSONResponse(await tei.decode(gw, SETTINGS, request))


@app.get("/info")
async def tei_info(gw: Gateway) -> Response:
    return JSONResponse(await tei.info(gw, SETTINGS))


add_task_routes(app, gateway)  # each task module's own routes (ingrain_bento/tasks/)
add_fallback_route(app)

# mypy does not apply class decorators: to it these names are still the plain classes.
runner_service, front_service = cast(Any, IngrainRunner), cast(Any, IngrainBento)

# The gate serves the front's calls before BentoML's layers (front/fast_path.py says what they cost).
serve_outside_bentoml(runner_service, lambda bentoml_app: RunnerGate(bentoml_app, engine=runner_engine,
                                                                     token=RUNNER_TOKEN, metrics=RUNNER_HTTP))

# A Bento carries the preload list's store entries (only when INGRAIN_PRELOAD is set at build).
runner_service.models.extend(bentoml.models.BentoModel(tag) for tag in baked_model_tags(SETTINGS))



def outside_bentoml(bentoml_app: ASGIApp) -> ASGIApp:
    """The front's layers before BentoML's: the worker header, the API key and body cap, /metrics'
    format, then the lean path of the gateway routes (``front/fast_path.py``), unless tracing or
    the access log asks BentoML's layers to see every request."""
    inner = bentoml_app
    if not (SETTINGS.tracing or SETTINGS.access_log):
        inner = FastPath(bentoml_app, lambda: lean_routes(app, gateway), gateway, TIMEOUT_S, FRONT_HTTP)
    return WorkerHeaderMiddleware(GuardMiddleware(MetricsFormatMiddleware(inner)))


serve_outside_bentoml(front_service, outside_bentoml)
