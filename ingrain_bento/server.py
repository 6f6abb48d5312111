"""``ModelServer``: what every route calls. Resolves names, manages models, runs inference.

Routes hand it a parsed request schema and get a response schema back; both API
generations share these methods (the seed's ``/infer_image`` and the current
``/embed_image`` differ only in what a timm model returns, a flag here).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Sequence

from ingrain_bento import schemas as s
from ingrain_bento.errors import BadRequest, Conflict, ModelNotFound, TooLarge
from ingrain_bento.families import family
from ingrain_bento.families.base import IMAGE, TEXT, check_safetensors
from ingrain_bento.fetch import SafeFetcher
from ingrain_bento.media import ImageLoader
from ingrain_bento.metrics import ModelMetrics
from ingrain_bento.pool import IMAGE_EMBEDDING, IMAGE_LOGITS, TEXT_EMBEDDING, TEXT_TOKENS, ModelPool, Resident
from ingrain_bento.refs import DISPLAY_SEPARATOR, Library, ModelRef, parse_library, split_display_id, validate_name, validate_tag
from ingrain_bento.settings import Settings
from ingrain_bento.store import ModelStore, StoredModel, staging_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ingrain_bento.server")

TimmImageOutput = Literal["probabilities", "features"]


class ModelServer:
    def __init__(self, settings: Settings, metrics: ModelMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = ModelStore()
        self.pool = ModelPool(self.store, settings, metrics)
        self.fetcher = SafeFetcher(allow_private=settings.allow_private_urls)
        self.images = ImageLoader(self.fetcher, settings)

    async def preload(self, refs: list[ModelRef]) -> None:
        """Load each listed model (pulling it once); a failure is logged, not fatal."""
        for ref in refs:
            try:
                await self.pool.load(ref)
            except Exception:
                log.exception("server.preload failed model=%s", ref.display_id)

    @staticmethod
    def stored_entries(refs: list[ModelRef]) -> list[StoredModel]:
        """The store entries of ``refs`` that exist (for baking into a Bento)."""
        store = ModelStore()
        return [entry for entry in (store.find(ref) for ref in refs) if entry is not None]

    async def close(self) -> None:
        await self.pool.close()
        await self.fetcher.aclose()

    # ---- names ---------------------------------------------------------------------------

    def _candidates(self, name: str, pretrained: str | bool | None) -> list[ModelRef]:
        refs = []
        for library in Library:
            try:
                refs.append(ModelRef.parse(library, name, pretrained))
            except BadRequest:
                continue
        return refs

    def resolve(self, name: str, pretrained: str | bool | None = None, library: str | None = None,
                *, resident_only: bool = False) -> ModelRef:
        """The one model a request names; 404 when the server does not know it, 409 when ambiguous."""
        base, tag = split_display_id(name, pretrained)
        validate_name(base)
        if library:
            return ModelRef.parse(library, base, tag)
        candidates = self._candidates(base, tag)
        matches = [ref for ref in candidates if self.pool.get(ref) or self.pool.is_loading(ref)]
        if not matches and not resident_only:
            matches = [ref for ref in candidates if self.store.find(ref) is not None]
        if len(matches) > 1:
            libraries = ", ".join(ref.library.value for ref in matches)
            raise Conflict(f"{name!r} names models of several libraries ({libraries}): send 'library' too.")
        if not matches:
            display = base if tag is None else f"{base}{DISPLAY_SEPARATOR}{tag}"
            where = "loaded" if resident_only else "known to this server"
            raise ModelNotFound(f"Model {display!r} is not {where}: load it first with /load_model "
                                "(or /load_clip_model, /load_sentence_transformer_model, /load_timm_model).")
        return matches[0]

    # ---- management ----------------------------------------------------------------------

    async def load(self, request: s.ModelRequest, library: Library | str | None = None) -> s.MessageResponse:
        lib = library or request.library
        if lib is None:
            raise BadRequest("Send 'library': one of open_clip, sentence_transformers, timm.")
        ref = ModelRef.parse(lib, request.name, request.pretrained)
        loaded = await self.pool.load(ref)
        state = "loaded successfully" if loaded else "already loaded"
        return s.MessageResponse(message=f"Model {ref.display_id} {state}.")

    async def unload(self, request: s.ModelRequest) -> s.MessageResponse:
        ref = self.resolve(request.name, request.pretrained, request.library, resident_only=True)
        await self.pool.unload(ref)
        return s.MessageResponse(message=f"Model {ref.display_id} unloaded successfully.")

    async def delete(self, request: s.ModelRequest) -> s.MessageResponse:
        ref = self._resolve_stored(request)
        started = time.perf_counter()
        if self.pool.get(ref) is not None:
            await self.pool.unload(ref)
        entry = await asyncio.to_thread(self.store.delete, ref)
        log.info("server.delete model=%s tag=%s bytes=%d seconds=%.2f", ref.display_id, entry.tag, entry.size_bytes,
                 time.perf_counter() - started)
        return s.MessageResponse(message=f"Model {ref.display_id} deleted successfully.")

    def _resolve_stored(self, request: s.ModelRequest) -> ModelRef:
        """Like ``resolve``, but also finds custom checkpoints not yet bound to an architecture."""
        try:
            return self.resolve(request.name, request.pretrained, request.library)
        except ModelNotFound:
            base, tag = split_display_id(request.name, request.pretrained)
            for entry in self.store.entries():  # unbound entries are open_clip/timm custom checkpoints
                if entry.ref is None and entry.custom_name in (base, tag):
                    return ModelRef(entry.library, validate_name(base), entry.custom_name)
            raise

    def _info(self, entry: StoredModel | None, resident: Resident | None, ref: ModelRef | None,
              state: str) -> s.ModelInfo:
        model = resident.model if resident else None
        meta = entry.metadata if entry else {}
        library = ref.library.value if ref else entry.library.value  # type: ignore[union-attr]
        name = ref.name if ref else entry.name  # type: ignore[union-attr]
        pretrained = ref.api_pretrained if ref else entry.pretrained  # type: ignore[union-attr]
        return s.ModelInfo(
            id=ref.display_id if ref else str(name), name=name, pretrained=pretrained, library=library,
            state=state,  # type: ignore[arg-type]
            modalities=sorted(model.modalities) if model else list(meta.get("modalities", [])),
            embedding_size=model.embedding_size if model else meta.get("embedding_size"),
            device=str(model.device) if model else None,
            dtype=str(model.dtype).removeprefix("torch.") if model else None,
            memory_bytes=model.memory_bytes if model else None,
            last_used=resident.last_used if resident else None,
            store_tag=entry.tag if entry else None,
        )

    def loaded_models(self) -> s.ModelListResponse:
        return s.ModelListResponse(models=[
            self._info(r.stored, r, r.model.ref, "READY") for r in self.pool.resident()
        ])

    def repository_models(self) -> s.ModelListResponse:
        infos, seen = [], set()
        for entry in self.store.entries():
            resident = self.pool.get(entry.ref) if entry.ref else None
            state = "READY" if resident else "LOADING" if entry.ref and self.pool.is_loading(entry.ref) else "UNAVAILABLE"
            infos.append(self._info(entry, resident, entry.ref, state))
            seen.add(entry.ref)
        for ref in self.pool.loading():
            if ref not in seen:
                infos.append(self._info(None, None, ref, "LOADING"))
        return s.ModelListResponse(models=infos)

    def _stored_or_resident(self, name: str, pretrained: str | None) -> tuple[ModelRef, StoredModel | None, Resident | None]:
        ref = self.resolve(name, pretrained)
        resident = self.pool.get(ref)
        return ref, resident.stored if resident else self.store.find(ref), resident

    def embedding_size(self, name: str, pretrained: str | None = None) -> s.EmbeddingSizeResponse:
        ref, entry, resident = self._stored_or_resident(name, pretrained)
        size = resident.model.embedding_size if resident else (entry.metadata.get("embedding_size") if entry else None)
        if size is None:
            raise ModelNotFound(f"The embedding size of {ref.display_id} is not known until it is loaded.")
        return s.EmbeddingSizeResponse(embedding_size=int(size))

    def classification_labels(self, name: str, pretrained: str | None = None) -> s.LabelsResponse:
        ref, entry, resident = self._stored_or_resident(name, pretrained)
        if ref.library is not Library.TIMM:
            raise BadRequest(f"{ref.display_id} is not a classifier: labels exist for timm models only.")
        if resident is not None and resident.model.labels is not None:
            return s.LabelsResponse(labels=resident.model.labels)
        assert entry is not None
        return s.LabelsResponse(labels=family(Library.TIMM).read_labels(entry.path))

    async def download_custom(self, request: s.CustomModelRequest) -> s.MessageResponse:
        library = parse_library(request.library)
        name = validate_tag(request.pretrained_name, "pretrained_name")
        if await asyncio.to_thread(self.store.is_taken, library, name):
            raise Conflict(f"A {library.value} model named {name!r} is already stored: delete it first "
                           "or choose another pretrained_name.")
        files = self._custom_files(library, request)
        options = {key: value for key, value in {
            "num_classes": request.num_classes, "mode": request.mode, "mean": request.mean, "std": request.std,
            "interpolation": request.interpolation, "resize_mode": request.resize_mode}.items() if value is not None}
        started = time.perf_counter()
        with staging_dir() as scratch:
            root = Path(scratch)
            sizes = await asyncio.gather(*(self._download(url, root / rel) for rel, url in files.items()))
            weights = root / ("model.safetensors" if library is Library.SENTENCE_TRANSFORMERS else "custom.safetensors")
            await asyncio.to_thread(check_safetensors, weights)
            if library is Library.SENTENCE_TRANSFORMERS:
                describe = family(library).describe_folder
            else:
                def describe(_: Path) -> dict[str, Any]:
                    return {"modalities": [IMAGE] if library is Library.TIMM else [TEXT, IMAGE]}

            def write(folder: Path) -> dict[str, Any]:
                shutil.copytree(root, folder, dirs_exist_ok=True)
                try:
                    return describe(folder)
                except Exception as exc:
                    raise BadRequest(f"The downloaded files do not form a {library.value} model: {exc}") from None

            await asyncio.to_thread(self.store.import_custom, library, name, write, options)
        log.info("server.download_custom library=%s name=%s bytes=%d seconds=%.2f", library.value, name,
                 sum(sizes), time.perf_counter() - started)
        return s.MessageResponse(message=f"Custom model {name} downloaded successfully.")

    @staticmethod
    def _custom_files(library: Library, request: s.CustomModelRequest) -> dict[str, str]:
        if library is Library.SENTENCE_TRANSFORMERS:
            urls = family(library).CUSTOM_FILES
            missing = [field for field in urls if not getattr(request, field)]
            if missing:
                raise BadRequest(f"sentence_transformers custom models need these URLs too: {', '.join(missing)}.")
            return {rel: getattr(request, field) for field, rel in urls.items()}
        if library is Library.TIMM and request.num_classes is None:
            raise BadRequest("timm custom models need 'num_classes' (the classifier's output size).")
        return {"custom.safetensors": request.safetensors_url}

    async def _download(self, url: str, destination: Path) -> int:
        destination.parent.mkdir(parents=True, exist_ok=True)
        return await self.fetcher.download_to(url, destination, max_bytes=self.settings.max_download_bytes,
                                              timeout=self.settings.download_timeout_s)

    # ---- inference -----------------------------------------------------------------------

    def _inference_ref(self, request: s.InferenceRequest) -> ModelRef:
        ref = self.resolve(request.name, request.pretrained, request.library)
        if self.pool.get(ref) is None and not self.pool.is_loading(ref):
            if not self.settings.autoload:
                raise BadRequest(f"Model {ref.display_id} is not loaded (auto-loading is off): load it first.")
            if request.library and self.store.find(ref) is None:
                raise ModelNotFound(f"Model {ref.display_id} is not known to this server: load it first.")
        return ref

    @asynccontextmanager
    async def _serving(self, request: s.InferenceRequest, route: str) -> AsyncIterator[Resident]:
        """Hold the requested model for one request, and count the request in the metrics."""
        ref = self._inference_ref(request)
        started, ok = time.perf_counter(), False
        try:
            async with self.pool.use(ref) as resident:
                yield resident
            ok = True
        finally:
            if self.metrics is not None:
                self.metrics.record_request(ref, route, ok, time.perf_counter() - started)

    def _check_count(self, items: Sequence[Any], what: str) -> None:
        if len(items) > self.settings.max_items_per_request:
            raise TooLarge(f"{len(items)} {what} in one request, over the cap of "
                           f"{self.settings.max_items_per_request}: split the request.")

    def _check_texts(self, texts: Sequence[str]) -> None:
        self._check_count(texts, "texts")
        cap = self.settings.max_text_chars
        for index, text in enumerate(texts):
            if len(text) > cap:
                raise TooLarge(f"Text {index} has {len(text)} characters, over the cap of {cap}.")

    async def _text_rows(self, resident: Resident, texts: list[str]) -> "torch.Tensor":
        if TEXT not in resident.model.modalities:
            raise BadRequest(f"{resident.model.ref.display_id} is an image model: send 'image', not 'text'.")
        model = resident.model
        prepared = await self.pool.batcher(resident, TEXT_TOKENS).submit(texts) if model.prepares_texts else texts
        return await self.pool.batcher(resident, TEXT_EMBEDDING).submit(prepared)

    async def _image_rows(self, resident: Resident, images: list[str], headers: dict[str, str] | None,
                          task: str) -> "torch.Tensor":
        if IMAGE not in resident.model.modalities:
            raise BadRequest(f"{resident.model.ref.display_id} is a text model: send 'text', not 'image'.")
        decoded = await self.images.load(images, headers)
        pixels = await asyncio.to_thread(resident.model.preprocess_images, decoded)
        return await self.pool.batcher(resident, task).submit(list(pixels))

    @staticmethod
    def _embeddings(rows: "torch.Tensor", n_dims: int | None, normalize: bool) -> list[list[float]]:
        """Matryoshka: truncate to ``n_dims`` first, then normalize, so rows are unit length."""
        import torch.nn.functional as F

        if n_dims is not None:
            if n_dims < 1 or n_dims > rows.shape[1]:
                raise BadRequest(f"n_dims must be between 1 and the model's size {rows.shape[1]}, not {n_dims}.")
            rows = rows[:, :n_dims]
        if normalize:
            rows = F.normalize(rows, dim=-1)
        return rows.tolist()

    @staticmethod
    def _probabilities(logits: "torch.Tensor", softmax: bool = True) -> list[list[float]]:
        return (logits.softmax(dim=-1) if softmax else logits).tolist()

    async def _image_output(self, resident: Resident, request: s.InferenceRequest,
                            timm_output: TimmImageOutput) -> list[list[float]]:
        images = request.images
        self._check_count(images, "images")
        if resident.model.ref.library is Library.TIMM and timm_output == "probabilities":
            if request.n_dims is not None:
                raise BadRequest("n_dims applies to embeddings; /infer_image on a timm model returns class "
                                 "probabilities (use /embed_image for its features).")
            logits = await self._image_rows(resident, images, request.image_download_headers, IMAGE_LOGITS)
            return self._probabilities(logits, softmax=request.normalize)
        rows = await self._image_rows(resident, images, request.image_download_headers, IMAGE_EMBEDDING)
        return self._embeddings(rows, request.n_dims, request.normalize)

    async def embed_text(self, request: s.InferenceRequest) -> s.EmbeddingsResponse:
        started = time.perf_counter()
        self._check_texts(request.texts)
        async with self._serving(request, "embed_text") as resident:
            rows = await self._text_rows(resident, request.texts)
        return s.EmbeddingsResponse.model_construct(
            embeddings=self._embeddings(rows, request.n_dims, request.normalize),
            processing_time_ms=(time.perf_counter() - started) * 1000)

    async def embed_image(self, request: s.InferenceRequest, timm_output: TimmImageOutput) -> s.EmbeddingsResponse:
        started = time.perf_counter()
        async with self._serving(request, "embed_image") as resident:
            rows = await self._image_output(resident, request, timm_output)
        return s.EmbeddingsResponse.model_construct(embeddings=rows,
                                                    processing_time_ms=(time.perf_counter() - started) * 1000)

    async def embed(self, request: s.InferenceRequest, timm_output: TimmImageOutput) -> s.TextImageEmbeddingsResponse:
        started = time.perf_counter()
        self._check_texts(request.texts)
        text_rows = image_rows = None
        async with self._serving(request, "embed") as resident:
            if request.text is not None:
                rows = await self._text_rows(resident, request.texts)
                text_rows = self._embeddings(rows, request.n_dims, request.normalize)
            if request.image is not None:
                image_rows = await self._image_output(resident, request, timm_output)
        return s.TextImageEmbeddingsResponse.model_construct(
            text_embeddings=text_rows, image_embeddings=image_rows,
            processing_time_ms=(time.perf_counter() - started) * 1000)

    async def classify_image(self, request: s.InferenceRequest) -> s.ProbabilitiesResponse:
        started = time.perf_counter()
        self._check_count(request.images, "images")
        async with self._serving(request, "classify_image") as resident:
            if resident.model.ref.library is not Library.TIMM:
                raise BadRequest(f"{resident.model.ref.display_id} is not a classifier: /classify_image serves timm models.")
            logits = await self._image_rows(resident, request.images, request.image_download_headers, IMAGE_LOGITS)
        return s.ProbabilitiesResponse.model_construct(probabilities=self._probabilities(logits),
                                                       processing_time_ms=(time.perf_counter() - started) * 1000)

    # ---- OpenAI-compatible ---------------------------------------------------------------

    async def openai_embeddings(self, request: s.OpenAIEmbeddingRequest) -> s.OpenAIEmbeddingResponse:
        import numpy as np

        texts = s.as_list(request.input)
        inner = s.InferenceRequest(name=request.model, text=texts, n_dims=request.dimensions)
        rows = (await self.embed_text(inner)).embeddings
        data = [
            s.OpenAIEmbedding(index=i, embedding=base64.b64encode(np.asarray(row, dtype=np.float32).tobytes()).decode()
                              if request.encoding_format == "base64" else row)
            for i, row in enumerate(rows)
        ]
        tokens = sum(len(text.split()) for text in texts)  # whitespace words: OpenAI clients only display usage
        return s.OpenAIEmbeddingResponse(data=data, model=request.model,
                                         usage=s.OpenAIUsage(prompt_tokens=tokens, total_tokens=tokens))

    def openai_models(self) -> s.OpenAIModelList:
        refs = {r.model.ref for r in self.pool.resident()}
        refs.update(entry.ref for entry in self.store.entries() if entry.ref is not None)
        return s.OpenAIModelList(data=[s.OpenAIModel(id=ref.display_id, owned_by=ref.library.value)
                                       for ref in sorted(refs, key=lambda r: r.display_id)])
