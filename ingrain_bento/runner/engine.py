"""``RunnerEngine``: the one owner of model state, the ``Engine`` of ``boundary.py``.

It resolves names, manages the store and the resident pool (load, unload, evict, delete,
custom downloads), answers every listing, and runs inference on prepared items: it takes
arrays and returns arrays, and knows nothing of HTTP or of the API's wire formats. It runs in
the front's own process (one front worker, no GPU) or in each runner worker (one per device,
``INGRAIN_RUNNERS``), which every front worker calls.

One model state for every runner of every replica (``runner/sync.py``): each management change
is made here and recorded in the desired state, which every other runner follows; listings
merge what every live runner reports (``ModelInfo.runners``). ``version`` is the desired state's
count of removals (it moves when a model stops being resident or stored, anywhere): it travels
with every inference reply, so fronts know when to drop their cached handles and tokenizers,
whichever runner or replica answers.

A started engine answers at once: what the desired state holds (what was resident before a
restart, what other runners hold) and the preload list are loaded in the background (``start``),
each ``LOADING`` until it is resident; a request for one waits for it (at most
``INGRAIN_LOAD_WAIT_S``, then a 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ingrain_bento import schemas as s
from ingrain_bento.backends import BACKENDS, auto_table, pick_auto
from ingrain_bento.batching import Batcher, BatcherClosed
from ingrain_bento.boundary import InferReply, LoadResult, ModelHandle, ServedModel
from ingrain_bento.errors import BadRequest, Conflict, IngrainError, ModelNotFound, StaleModel
from ingrain_bento.families import api_pretrained, families, family, parse_ref
from ingrain_bento.families.base import check_safetensors
from ingrain_bento.fetch import SafeFetcher
from ingrain_bento.metrics import ModelMetrics
from ingrain_bento.model_state import DesiredState, StateHome, StoreUnreachable, model_key
from ingrain_bento.model_state.entries import S3EntryMirror, SharedEntries
from ingrain_bento.model_state.home import MemoryStateHome
from ingrain_bento.model_state.reports import RunnerReport, runner_entries
from ingrain_bento.refs import DISPLAY_SEPARATOR, ModelRef, split_display_id, validate_name, validate_tag
from ingrain_bento.runner.pool import ModelPool, Resident
from ingrain_bento.runner.sync import ModelStateSync
from ingrain_bento.settings import Settings
from ingrain_bento.store import ModelStore, StoredExport, StoredModel, staging_dir
from ingrain_bento.tasks import RERANK, modalities_of

__all__ = ["RunnerEngine"]

log = logging.getLogger("ingrain_bento.runner")

UNLOAD_RETRIES = 3  # a request that meets an unload uses the model again (a reload) this often


class RunnerEngine:
    def __init__(self, settings: Settings, metrics: ModelMetrics | None = None, home: StateHome | None = None,
                 *, runner_id: str = "local/0", runner_index: int = 0, mirror: S3EntryMirror | None = None) -> None:
        """``home``: where the desired model state lives (None: this process's memory, shared with
        no other runner and kept across no restart); ``mirror``: the shared store's entries."""
        self.settings = settings
        self.metrics = metrics
        self.home = home or MemoryStateHome()
        self.store = ModelStore(SharedEntries(self.home, mirror))
        self.pool = ModelPool(self.store, settings, metrics, on_evict=self._evicted, device_index=runner_index)
        self.sync = ModelStateSync(self.home, self.pool, self.store, runner_id, settings.sync_s, metrics)
        self.fetcher = SafeFetcher(allow_private=settings.allow_private_urls)

    @property
    def version(self) -> int:
        """The desired state's count of removals, as this runner last read or wrote it."""
        return self.sync.version

    async def start(self, preload: Sequence[tuple[ModelRef, str | None]]) -> None:
        """Record the preload list, then load what the desired state holds (what was resident when
        this engine last ran, what other runners hold), one at a time while serving (each is
        ``LOADING`` meanwhile), then follow the desired state; a failure is logged, not fatal."""
        await self.sync.start(preload)

    async def close(self) -> None:
        await self.sync.close()
        await self.pool.close()
        await self.fetcher.aclose()
        if self.metrics is not None:
            self.metrics.flush()

    async def _evicted(self, ref: ModelRef) -> None:
        """A pinned model was evicted to make room: an unload, everywhere."""
        try:
            await self.sync.record(lambda state: state.without_resident(ref))
        except StoreUnreachable as exc:
            log.warning("runner.evict model=%s not recorded: %s", ref.display_id, exc)

    # ---- names ---------------------------------------------------------------------------

    @staticmethod
    def _candidates(name: str, pretrained: str | bool | None, library: str | None) -> list[ModelRef]:
        """The models a name can mean: one per library that parses it."""
        base, tag = split_display_id(name, pretrained)
        validate_name(base)
        if library:
            return [parse_ref(library, base, tag)]
        candidates = []
        for library_name in families():
            try:
                candidates.append(parse_ref(library_name, base, tag))
            except BadRequest:
                continue
        return candidates

    def resolve(self, name: str, pretrained: str | bool | None = None, library: str | None = None,
                *, resident_only: bool = False) -> ModelRef:
        """The one model a request names; 404 when the server does not know it, 409 when ambiguous."""
        base, tag = split_display_id(name, pretrained)
        candidates = self._candidates(name, pretrained, library)
        if library:
            return candidates[0]
        matches = [ref for ref in candidates if self.pool.get(ref) or self.pool.is_loading(ref)]
        if not matches and not resident_only:
            matches = [ref for ref in candidates if self.store.find(ref) is not None]
        if len(matches) > 1:
            libraries = ", ".join(ref.library for ref in matches)
            raise Conflict(f"{name!r} names models of several libraries ({libraries}): send 'library' too.")
        if not matches:
            display = base if tag is None else f"{base}{DISPLAY_SEPARATOR}{tag}"
            where = "loaded" if resident_only else "known to this server"
            raise ModelNotFound(f"Model {display!r} is not {where}: load it first with /load_model "
                                "(or /load_clip_model, /load_sentence_transformer_model, /load_timm_model).")
        return matches[0]

    def _stored_or_resident(self, name: str, pretrained: str | bool | None,
                            library: str | None = None) -> tuple[ModelRef, StoredModel | None, Resident | None]:
        ref = self.resolve(name, pretrained, library)
        resident = self.pool.get(ref)
        return ref, resident.stored if resident else self.store.find(ref), resident

    # ---- management ----------------------------------------------------------------------

    async def load(self, request: s.ModelRequest, library: str | None = None) -> LoadResult:
        """Make a model resident: its display id, and whether this call loaded it."""
        lib = library or request.library
        if lib is None:
            raise BadRequest(f"Send 'library': one of {', '.join(sorted(families()))}.")
        ref = parse_ref(lib, request.name, request.pretrained)
        backend = request.backend

        def resident(state: DesiredState) -> DesiredState:
            recorded = state.models.get(model_key(ref))
            keep = backend is None and recorded is not None and recorded.pinned  # "already loaded": as it is
            return state if keep else state.with_resident(ref, backend)

        async with self.sync.changing():
            loaded = await self.pool.load(ref, backend)
            try:
                await self.sync.record(resident)
            except StoreUnreachable:
                if loaded:  # not recorded, so not kept: nothing changed
                    await self.pool.unload(ref)
                raise
        return LoadResult(ref.display_id, loaded)

    async def unload(self, request: s.ModelRequest) -> str:
        async with self.sync.changing() as current:
            try:
                ref = self.resolve(request.name, request.pretrained, request.library, resident_only=True)
            except ModelNotFound:  # not here, but other runners may hold it
                recorded = [ref for ref in self._candidates(request.name, request.pretrained, request.library)
                            if model_key(ref) in current.models]
                if len(recorded) != 1:
                    raise
                ref = recorded[0]
            await self.sync.record(lambda state: state.without_resident(ref))
            if self.pool.get(ref) is not None:
                await self.pool.unload(ref)
        return ref.display_id

    async def delete(self, request: s.ModelRequest) -> str:
        async with self.sync.changing():
            ref = self._resolve_stored(request)
            started = time.perf_counter()
            if self.pool.get(ref) is not None:
                await self.pool.unload(ref)
            entry = await asyncio.to_thread(self.store.delete, ref)
        log.info("runner.delete model=%s tag=%s bytes=%d seconds=%.2f", ref.display_id, entry.tag, entry.size_bytes,
                 time.perf_counter() - started)
        return ref.display_id

    def _resolve_stored(self, request: s.ModelRequest) -> ModelRef:
        """Like ``resolve``, but also finds custom checkpoints not yet bound to an architecture."""
        try:
            return self.resolve(request.name, request.pretrained, request.library)
        except ModelNotFound:
            base, tag = split_display_id(request.name, request.pretrained)
            for entry in self.store.entries():  # unbound entries: custom checkpoints awaiting an architecture
                if entry.ref is None and entry.custom_name in (base, tag):
                    return ModelRef(entry.library, base, entry.custom_name)
            raise

    def _info(self, entry: StoredModel | None, resident: Resident | None, ref: ModelRef | None,
              state: s.ModelState, reports: list[RunnerReport] | None = None) -> s.ModelInfo:
        if ref is not None:
            ident, name, pretrained, library = ref.display_id, ref.name, api_pretrained(ref), ref.library
        else:
            assert entry is not None  # an unbound custom checkpoint, listed by its store entry
            ident, name, pretrained, library = entry.name, entry.name, entry.pretrained, entry.library
        model = resident.model if resident else None
        meta = entry.metadata if entry else {}
        capabilities = sorted(model.capabilities) if model else meta.get("capabilities", [])
        exports = self.store.exports_of(entry.tag) if entry else []
        return s.ModelInfo(
            id=ident, name=name, pretrained=pretrained, library=library, state=state,
            modalities=modalities_of(capabilities), capabilities=list(capabilities),
            embedding_size=model.embedding_size if model else meta.get("embedding_size"),
            device=model.device if model else None,
            dtype=model.dtype if model else None,
            memory_bytes=model.memory_bytes if model else None,
            last_used=resident.last_used if resident else None,
            store_tag=entry.tag if entry else None,
            backend=model.backend if model else None,
            fallback=model.fallback if model else None,
            exports=sorted(e.backend for e in exports if not e.metadata.get("report", {}).get("failure")),
            auto_pick=self._auto_pick(library, exports),
            prompts=sorted(model.prompts) if model else list(meta.get("prompts", [])),
            runners=[s.RunnerInfo.model_validate(r) for r in runner_entries(reports or [], model_key(ref))]
            if ref is not None else [],
        )

    def _auto_pick(self, library: str, exports: list[StoredExport]) -> s.AutoPickInfo | None:
        """What ``auto`` picks for a model on this runner's device type (before the device is
        picked: the one its figures were measured on), as a load would (``pool.backend_for``);
        None while that needs an export the model does not have yet."""
        reports = {export.backend: dict(export.metadata.get("report", {})) for export in exports}
        device_type = self.pool.device.type if self.pool.has_device else next(
            (report["timing"]["device"] for report in reports.values() if (report.get("timing") or {}).get("device")),
            None)
        if device_type is None:
            return None
        table = auto_table(device_type, library)
        if BACKENDS[table].exports and table not in reports:
            return None
        pick = pick_auto(table, device_type, reports.get(table))
        return s.AutoPickInfo(backend=pick.backend, device=pick.device, why=pick.why, ms=dict(pick.ms))

    @staticmethod
    def _merged_state(key: str, desired: DesiredState | None, reports: list[RunnerReport]) -> s.ModelState:
        """A pinned model (the desired state holds it) is READY when every live runner has it; one
        loaded on demand, when a runner has it. LOADING while one loads it or lacks it (or could
        not load it: ``runners`` says why); else UNAVAILABLE."""
        states = [r.models[key].state for r in reports if key in r.models]
        if desired is not None and key in desired.models:
            return "READY" if len(states) == len(reports) and all(x == "READY" for x in states) else "LOADING"
        return "READY" if "READY" in states else "LOADING" if "LOADING" in states else "UNAVAILABLE"

    async def loaded_models(self) -> list[s.ModelInfo]:
        """Every model that is resident on a live runner (or that the desired state holds)."""
        desired, reports = await self.sync.snapshot()
        refs = {model_key(r.model.ref): r.model.ref for r in self.pool.resident()}
        for report in reports:
            for key, model in report.models.items():
                refs.setdefault(key, model.ref)
        for key, wanted in (desired.models if desired else {}).items():
            if wanted.pinned:
                refs.setdefault(key, wanted.ref)
        infos = []
        for key, ref in refs.items():
            resident = self.pool.get(ref)
            entry = resident.stored if resident else self.store.find(ref)
            infos.append(self._info(entry, resident, ref, self._merged_state(key, desired, reports), reports))
        return infos

    async def repository_models(self) -> list[s.ModelInfo]:
        desired, reports = await self.sync.snapshot()
        infos, seen = [], set()
        for entry in self.store.entries():
            resident = self.pool.get(entry.ref) if entry.ref else None
            state = self._merged_state(model_key(entry.ref), desired, reports) if entry.ref else "UNAVAILABLE"
            infos.append(self._info(entry, resident, entry.ref, state, reports))
            seen.add(entry.ref)
        for ref in self.pool.loading():
            if ref not in seen:
                infos.append(self._info(None, None, ref, "LOADING", reports))
        return infos

    async def served_models(self) -> list[ServedModel]:
        """Every model that can serve now or after a load, sorted by display id."""
        refs = {r.model.ref for r in self.pool.resident()}
        refs.update(entry.ref for entry in self.store.entries() if entry.ref is not None)
        return [ServedModel(ref.display_id, ref.library) for ref in sorted(refs, key=lambda r: r.display_id)]

    async def embedding_size(self, name: str, pretrained: str | None = None) -> int:
        return await asyncio.to_thread(self._embedding_size, name, pretrained)

    def _embedding_size(self, name: str, pretrained: str | None) -> int:
        ref, entry, resident = self._stored_or_resident(name, pretrained)
        size = resident.model.embedding_size if resident else (entry.metadata.get("embedding_size") if entry else None)
        if size is None:
            capabilities = resident.model.capabilities if resident else (entry.metadata if entry else {}).get(
                "capabilities")
            if capabilities and RERANK in capabilities:
                raise BadRequest(f"{ref.display_id} is a reranker: it scores pairs, it has no embedding size.")
            raise ModelNotFound(f"The embedding size of {ref.display_id} is not known until it is loaded.")
        return int(size)

    async def classification_labels(self, name: str, pretrained: str | None = None) -> list[str]:
        return await asyncio.to_thread(self._classification_labels, name, pretrained)

    def _classification_labels(self, name: str, pretrained: str | None) -> list[str]:
        ref, entry, resident = self._stored_or_resident(name, pretrained)
        labels = resident.model.labels if resident else None
        if labels is None and entry is not None:
            labels = family(ref.library).read_labels(entry.path)
        if labels is None:
            raise BadRequest(f"{ref.display_id} is not a classifier: it has no class labels.")
        return labels

    async def download_custom(self, request: s.CustomModelRequest) -> str:
        """Fetch a custom model's files (safetensors only) into the store; its name."""
        async with self.sync.changing():
            return await self._download_custom(request)

    async def _download_custom(self, request: s.CustomModelRequest) -> str:
        entry_family = family(request.library)
        library = entry_family.name
        name = validate_tag(request.pretrained_name, "pretrained_name")
        if await asyncio.to_thread(self.store.is_taken, library, name):
            raise Conflict(f"A {library} model named {name!r} is already stored: delete it first "
                           "or choose another pretrained_name.")
        options = entry_family.check_custom(request)
        files = {path: getattr(request, field) for field, path in entry_family.custom_files.items()}
        started = time.perf_counter()
        with staging_dir() as scratch:
            root = Path(scratch)
            sizes = await asyncio.gather(*(self._download(url, root / path) for path, url in files.items()))
            await asyncio.to_thread(check_safetensors, root / entry_family.custom_files["safetensors_url"])

            def write(folder: Path) -> dict[str, Any]:
                shutil.copytree(root, folder, dirs_exist_ok=True)
                try:
                    return entry_family.describe_custom(folder, options)
                except IngrainError:
                    raise
                except Exception as exc:
                    raise BadRequest(f"The downloaded files do not form a {library} model: {exc}") from None

            await asyncio.to_thread(self.store.import_custom, library, name, write, options)
        log.info("runner.download_custom library=%s name=%s bytes=%d seconds=%.2f", library, name,
                 sum(sizes), time.perf_counter() - started)
        return name

    async def _download(self, url: str, destination: Path) -> int:
        destination.parent.mkdir(parents=True, exist_ok=True)
        return await self.fetcher.download_to(url, destination, max_bytes=self.settings.max_download_bytes,
                                              timeout=self.settings.download_timeout_s,
                                              deadline=self.settings.download_deadline_s)

    async def ingrain_metrics(self) -> dict[str, Any]:
        return self.metrics.ingrain_json() if self.metrics is not None else {"modelStats": []}

    async def forget(self) -> None:
        """Nothing to drop: a front in this process keeps no per-model call queues."""

    # ---- inference -----------------------------------------------------------------------

    def _check_servable(self, ref: ModelRef, library_given: bool = True) -> None:
        """A model that is neither resident nor loading: 400 with auto-loading off, 404 when
        it is not stored either."""
        if self.pool.get(ref) is not None or self.pool.is_loading(ref):
            return
        if not self.settings.autoload:
            raise BadRequest(f"Model {ref.display_id} is not loaded (auto-loading is off): load it first.")
        if library_given and self.store.find(ref) is None:
            raise ModelNotFound(f"Model {ref.display_id} is not known to this server: load it first.")

    async def describe(self, name: str, pretrained: str | bool | None = None,
                       library: str | None = None) -> ModelHandle:
        """The handle a front prepares a model's inputs with (resolving the name as inference does)."""
        ref = self.resolve(name, pretrained, library)
        self._check_servable(ref, library_given=bool(library))
        resident = self.pool.get(ref)
        entry = resident.stored if resident else self.store.find(ref)
        if entry is None:  # still being pulled into the store: wait for that load
            resident = await self.pool.wait_resident(ref, self.settings.load_wait_s)
            entry = resident.stored
        size: int | None
        if resident is not None:
            capabilities, size = tuple(sorted(resident.model.capabilities)), resident.model.embedding_size
        else:
            capabilities, size = tuple(entry.metadata.get("capabilities", ())), entry.metadata.get("embedding_size")
        return ModelHandle(ref, entry.tag, capabilities, size)

    @asynccontextmanager
    async def _serving(self, ref: ModelRef, tag: str) -> AsyncIterator[Resident]:
        self._check_servable(ref)
        async with self.pool.use(ref, self.settings.load_wait_s) as resident:
            if resident.stored.tag != tag:
                raise StaleModel(f"{ref.display_id} was stored again since this request was prepared.")
            yield resident

    async def infer(self, ref: ModelRef, task: str, tag: str, requests: Sequence[Sequence[Any]]) -> InferReply:
        """Rows for each request's items, merged with other requests into few forwards. A request
        that meets an unload uses the model again (a reload, when auto-loading is on)."""
        started = time.perf_counter()
        results: list[Any] = [None] * len(requests)
        pending = list(range(len(requests)))
        for _ in range(UNLOAD_RETRIES):
            try:
                async with self._serving(ref, tag) as resident:
                    batcher = self.pool.batcher(resident, task)
                    done = await asyncio.gather(*(_queued(batcher, requests[i]) for i in pending),
                                                return_exceptions=True)
            except IngrainError as exc:  # the model itself cannot serve: every request gets that error
                done = [exc] * len(pending)
            for index, outcome in zip(pending, done, strict=True):
                results[index] = outcome
            pending = [i for i in pending if isinstance(results[i], BatcherClosed)]
            if not pending:
                break
        return self._reply(ref, results, time.perf_counter() - started)

    def _reply(self, ref: ModelRef, results: list[Any], seconds: float) -> InferReply:
        outcomes: list[Any] = []
        for outcome in results:
            if isinstance(outcome, BaseException) and not isinstance(outcome, IngrainError):
                log.error("runner.infer model=%s failed", ref.display_id, exc_info=outcome)
                outcome = IngrainError(f"Inference failed ({type(outcome).__name__}); this is a bug, please "
                                       "report it with the request that caused it.")
            outcomes.append(outcome)
            if self.metrics is not None:
                self.metrics.record_outcome(ref, not isinstance(outcome, IngrainError), seconds)
        return InferReply(outcomes, self.version)


def _queued(batcher: Batcher[Any], items: Sequence[Any]) -> asyncio.Future[Any]:
    """``items`` queued on ``batcher``: their rows to come, or why they could not be queued. Every
    request of a call is queued before any is awaited, so they share forwards, and gathering
    futures (not coroutines) makes no task apiece."""
    try:
        return batcher.enqueue(items)
    except Exception as exc:
        refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused.set_exception(exc)
        return refused
