"""``ModelGateway``: what every route of a front worker calls.

Management goes to the ``Engine`` as it is (it holds the one model state: in this process, or in
the runner service) and comes back as the API's messages and lists. Inference is prepared here
and computed there:

    request -> handle (the engine resolves the name; cached per worker)
            -> items (tokenized / decoded here, with the model's own preprocessing)
            -> rows (the engine's ``infer``: batched with other requests per model and task)
            -> Matryoshka truncation, normalization, the response schema

Both API generations share these methods: the seed's ``/infer_image`` and the current
``/embed_image`` differ only in what a classifier answers (``ImageOutput``). What each task takes
is its entry in ``tasks.TASKS``, what its rows become ``front.outputs.OUTPUTS``: the gateway
itself names no modality. A task module's routes (``tasks.TaskGateway``) use ``handle``,
``preprocessor``, ``rows`` and ``serve`` and make their own response.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import numpy as np

from ingrain_bento import schemas as s
from ingrain_bento.boundary import Engine, ModelHandle, ServedModel
from ingrain_bento.errors import BadRequest, IngrainError, StaleModel
from ingrain_bento.families.base import Preprocessor, TextPrep
from ingrain_bento.fetch import SafeFetcher
from ingrain_bento.front.inputs import InputPreparer
from ingrain_bento.front.outputs import OUTPUTS
from ingrain_bento.metrics import RequestMetrics
from ingrain_bento.settings import Settings
from ingrain_bento.tasks import CLASSIFY, EMBED_IMAGE, EMBED_SPARSE, EMBED_TEXT, RERANK, TASKS, elapsed_ms, refuse

__all__ = ["ImageOutput", "ModelGateway"]

# What an image route answers for a model that classifies: the seed's /infer_image gives class
# probabilities (logits with normalize=false), the current /embed_image its features.
ImageOutput = Literal["probabilities", "features"]
log = logging.getLogger("ingrain_bento.front")
HandleKey = tuple[str, Any, Any]


class ModelGateway:
    def __init__(self, engine: Engine, settings: Settings, metrics: RequestMetrics | None = None,
                 *, own_process: bool = False) -> None:
        """``own_process``: the engine runs in this process (its forwards need torch's threads)."""
        self.metrics = metrics
        self.engine = engine
        self.settings = settings
        self.fetcher = SafeFetcher(allow_private=settings.allow_private_urls)
        self.inputs = InputPreparer(settings, self.fetcher, one_torch_thread=not own_process, metrics=metrics)
        self._handles: dict[HandleKey, ModelHandle] = {}
        self._version: int | None = None  # the engine's model-state version, as last seen
        self._importing: asyncio.Task[None] | None = None  # held so the loop does not drop the task
        self._in_flight = 0  # inference requests in flight in this worker

    async def warm_up(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Once ``ready`` returns (the engine has restored and preloaded its models), open the
        preprocessors of the resident models, so that their first requests pay no cold start in
        this worker; then import the other libraries in the background, not awaited."""
        if ready is not None:
            await ready()
        for info in await self.engine.loaded_models():
            try:
                await self.inputs.preprocessor(await self.engine.describe(info.id, library=info.library))
            except Exception:
                log.exception("front.warm_up failed for model=%s", info.id)
        self._importing = asyncio.create_task(self.inputs.import_libraries())

    async def close(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()
        await self.inputs.close()
        await self.fetcher.aclose()

    async def _forget(self) -> None:
        """The engine's model state moved: handles and preprocessors are asked for again."""
        self._handles.clear()
        await self.inputs.clear()
        await self.engine.forget()

    async def _sync_version(self, version: int) -> None:
        """Forget when the model-state generation moves forward; an older one is a runner that has
        not caught up yet (several runners answer in turn): nothing to forget."""
        if self._version is None or version > self._version:
            if self._version is not None:
                await self._forget()
            self._version = version

    # ---- management ----------------------------------------------------------------------

    async def load(self, request: s.ModelRequest, library: str | None = None) -> s.MessageResponse:
        result = await self.engine.load(request, library)
        state = "loaded successfully" if result.loaded else "already loaded"
        return s.MessageResponse(message=f"Model {result.model_id} {state}.")

    async def unload(self, request: s.ModelRequest) -> s.MessageResponse:
        model_id = await self.engine.unload(request)
        await self._forget()
        return s.MessageResponse(message=f"Model {model_id} unloaded successfully.")

    async def delete(self, request: s.ModelRequest) -> s.MessageResponse:
        model_id = await self.engine.delete(request)
        await self._forget()
        return s.MessageResponse(message=f"Model {model_id} deleted successfully.")

    async def download_custom(self, request: s.CustomModelRequest) -> s.MessageResponse:
        name = await self.engine.download_custom(request)
        return s.MessageResponse(message=f"Custom model {name} downloaded successfully.")

    async def loaded_models(self) -> s.ModelListResponse:
        return self._listing(await self.engine.loaded_models())

    async def repository_models(self) -> s.ModelListResponse:
        return self._listing(await self.engine.repository_models())

    def _listing(self, models: list[s.ModelInfo]) -> s.ModelListResponse:
        """The engine's listing, with ``front_weights`` on each model whose weights this worker holds."""
        held = self.inputs.front_weights()
        return s.ModelListResponse(models=[
            model.model_copy(update={"front_weights": held[model.store_tag]}) if model.store_tag in held else model
            for model in models])

    async def served_models(self) -> list[ServedModel]:
        return await self.engine.served_models()

    async def embedding_size(self, name: str, pretrained: str | None) -> s.EmbeddingSizeResponse:
        return s.EmbeddingSizeResponse(embedding_size=await self.engine.embedding_size(name, pretrained))

    async def classification_labels(self, name: str, pretrained: str | None) -> s.LabelsResponse:
        return s.LabelsResponse(labels=await self.engine.classification_labels(name, pretrained))

    async def ingrain_metrics(self) -> dict[str, Any]:
        return await self.engine.ingrain_metrics()

    # ---- a model's tokenizer and prompts, as the front holds them ----------------------------

    async def _preprocessor(self, name: str) -> Preprocessor:
        return await self.inputs.preprocessor(await self.handle(s.ModelRequest(name=name)))

    async def preprocessor(self, handle: ModelHandle) -> Preprocessor:
        """The model's tokenizer and transforms as this worker holds them."""
        return await self.inputs.preprocessor(handle)

    async def default_model(self, task: str) -> str:
        """The model a body that names none means (TEI's): ``INGRAIN_DEFAULT_MODEL`` when it can do
        ``task``, else the only resident model that can; the setting still (its refusal says what
        it does) or a 400 naming the setting when there is neither."""
        name = self.settings.default_model
        if name:
            try:
                if task in (await self.handle(s.ModelRequest(name=name))).capabilities:
                    return name
            except IngrainError:
                return name  # not known here: the request's own answer says so
        able = [m.id for m in (await self.loaded_models()).models if task in m.capabilities]
        if len(able) == 1:
            return able[0]
        if name:
            return name
        found = f"{len(able)} resident models can ({', '.join(able)})" if able else "no resident model can"
        raise BadRequest(f"This request names no model and {found} {TASKS[task].does}: set INGRAIN_DEFAULT_MODEL, "
                         "or keep exactly one such model loaded.")

    async def prompt_names(self, name: str) -> list[str]:
        """The named prompts of the model ``name`` (its ``prompt_name`` values)."""
        return list((await self._preprocessor(name)).prompts)

    async def tokens(self, name: str, texts: list[str], add_special_tokens: bool, prep: TextPrep
                     ) -> list[list[s.Token]]:
        """Each text's tokens, as the model's own tokenizer makes them."""
        preprocessor = await self._preprocessor(name)
        rows = await asyncio.to_thread(preprocessor.tokens, texts, add_special_tokens, prep)
        return [[s.Token(id=i, text=text, special=special, start=start, stop=stop)
                 for i, text, special, start, stop in row] for row in rows]

    async def decode(self, name: str, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        preprocessor = await self._preprocessor(name)
        return await asyncio.to_thread(preprocessor.decode, ids, skip_special_tokens)

    # ---- inference -----------------------------------------------------------------------

    async def handle(self, request: Any) -> ModelHandle:
        """The model a request names (``name``, ``pretrained``, ``library``), cached per worker."""
        key = (request.name, request.pretrained, request.library)
        handle = self._handles.get(key)
        if handle is None:
            handle = await self.engine.describe(request.name, request.pretrained, request.library)
            self._handles[key] = handle
        return handle

    async def rows(self, request: Any, handle: ModelHandle, task: str) -> np.ndarray:
        """Prepare this request's inputs for ``task`` and have the engine compute their rows."""
        if task not in handle.capabilities:
            raise refuse(handle.ref.display_id, task, handle.capabilities)
        spec = TASKS[task]
        if spec.items is not None:
            items = list(spec.items(request))
        else:
            items = await self.inputs.prepare(spec.inputs, handle, request, alone=self._in_flight == 1)
        reply = await self.engine.infer(handle.ref, task, handle.tag, [items])
        await self._sync_version(reply.version)
        (rows,) = reply.results
        if isinstance(rows, IngrainError):
            raise rows
        return rows

    async def serve(self, request: Any, route: str, compute: Callable[[ModelHandle], Awaitable[Any]]) -> Any:
        """``compute`` for the request's model: counted in the metrics, sent again once when the
        model was stored anew under this worker's cached handle."""
        started, ok, model = time.perf_counter(), False, request.name
        self._in_flight += 1
        try:
            for attempt in (1, 2):
                handle = await self.handle(request)
                model = handle.ref.display_id
                try:
                    result = await compute(handle)
                    ok = True
                    return result
                except StaleModel:
                    if attempt == 2:
                        raise
                    await self._forget()
            raise AssertionError("unreachable")
        finally:
            self._in_flight -= 1
            if self.metrics is not None:
                self.metrics.record_request(model, route, ok, time.perf_counter() - started)

    async def _serve(self, request: Any, route: str, tasks: Sequence[str]) -> list[Any]:
        """Each task's output (``front.outputs.OUTPUTS`` of its rows), for one request."""

        async def compute(handle: ModelHandle) -> list[Any]:
            rows = [await self.rows(request, handle, task) for task in tasks]
            return [OUTPUTS[task](part, request) for task, part in zip(tasks, rows, strict=True)]

        result: list[Any] = await self.serve(request, route, compute)
        return result

    async def _image_task(self, request: s.InferenceRequest, output: ImageOutput) -> str:
        """The seed's /infer_image gives a classifier's probabilities, /embed_image its features."""
        handle = await self.handle(request)
        if output == "probabilities" and CLASSIFY in handle.capabilities:
            if request.n_dims is not None:
                raise BadRequest("n_dims applies to embeddings; /infer_image on a classifier returns class "
                                 "probabilities (use /embed_image for its features).")
            return CLASSIFY
        return EMBED_IMAGE

    async def embed_text(self, request: s.InferenceRequest) -> s.EmbeddingsResponse:
        started = time.perf_counter()
        (embeddings,) = await self._serve(request, "embed_text", [EMBED_TEXT])
        return s.EmbeddingsResponse.model_construct(embeddings=embeddings, processing_time_ms=elapsed_ms(started))

    async def embed_image(self, request: s.InferenceRequest, output: ImageOutput) -> s.EmbeddingsResponse:
        started = time.perf_counter()
        (embeddings,) = await self._serve(request, "embed_image", [await self._image_task(request, output)])
        return s.EmbeddingsResponse.model_construct(embeddings=embeddings, processing_time_ms=elapsed_ms(started))

    async def embed(self, request: s.InferenceRequest, output: ImageOutput) -> s.TextImageEmbeddingsResponse:
        started = time.perf_counter()
        tasks = [EMBED_TEXT] if request.text is not None else []
        if request.image is not None:
            tasks.append(await self._image_task(request, output))
        outputs = await self._serve(request, "embed", tasks)
        text_rows = outputs[0] if request.text is not None else None
        image_rows = outputs[-1] if request.image is not None else None
        return s.TextImageEmbeddingsResponse.model_construct(text_embeddings=text_rows, image_embeddings=image_rows,
                                                             processing_time_ms=elapsed_ms(started))

    async def classify_image(self, request: s.InferenceRequest) -> s.ProbabilitiesResponse:
        """Softmax probabilities, whatever ``normalize`` says (the seed's /infer_image honours it)."""
        started = time.perf_counter()
        (probabilities,) = await self._serve(request.model_copy(update={"normalize": True}), "classify_image",
                                             [CLASSIFY])
        return s.ProbabilitiesResponse.model_construct(probabilities=probabilities,
                                                       processing_time_ms=elapsed_ms(started))

    async def embed_sparse(self, request: s.SparseRequest) -> s.SparseEmbeddingsResponse:
        started = time.perf_counter()
        (vectors,) = await self._serve(request, "embed_sparse", [EMBED_SPARSE])
        return s.SparseEmbeddingsResponse.model_construct(
            embeddings=[s.SparseEmbedding.model_construct(indices=i, values=v) for i, v in vectors],
            processing_time_ms=elapsed_ms(started))

    async def rerank(self, request: s.RerankRequest) -> s.RerankResponse:
        """The documents by relevance to the query, best first, cut to ``top_n``."""
        (ranked,) = await self._serve(request, "rerank", [RERANK])
        documents = request.document_texts
        return s.RerankResponse(id=str(uuid.uuid4()), results=[
            s.RerankResult(index=index, relevance_score=score,
                           document=s.RerankDocument(text=documents[index]) if request.return_documents else None)
            for index, score in ranked])
