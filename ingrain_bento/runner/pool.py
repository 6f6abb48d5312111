"""Resident models: load once, batch per model, evict or refuse at capacity, unload for real.

The pool owns every model that is on the device. A load of a model that is already loading
waits for that load (a storm of loads loads once). A restore (after a restart, and the preload
list) makes every model it will load ``LOADING`` at once and loads them one at a time; a
request meanwhile waits for its model at most ``INGRAIN_LOAD_WAIT_S`` (``wait_resident``), then
gets a 503 with ``Retry-After`` while the load goes on. Capacity is ``MAX_LOADED_MODELS`` plus an
optional byte budget of resident weights; at capacity the policy either unloads the least
recently used *idle* model (``evict``) or answers 503 (``reject``). A model with requests in
flight is never evicted under them; an explicit unload lets queued requests finish first.

Models loaded through the management API (and restored, and followed from the desired model
state) are *pinned*; models loaded on demand by a request are not. Eviction takes an unpinned
model first. A load through the API may still evict a pinned one (as Ingrain server does), and
then the pool tells ``on_evict`` so the eviction is recorded as an unload everywhere; a load that
follows the desired state (``evict_pinned=False``) never does: it fails with the reason instead.

Each load picks its backend (``backends.choose_backend``: the load's ``backend``, else
``INGRAIN_BACKEND``); an ONNX backend needs the model's export, made once (``runner.export``),
and a model that has none loads with torch, ``fallback`` saying why. ``auto``, where the table
(``backends.AUTO``) names a backend that runs an export, is decided per model once that export is
at hand: its report holds torch and that backend timed on this machine (``backends.timing``), and
the faster one loads. A model resident with one backend and asked for with another is a 409:
unload it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingrain_bento.backends import BACKENDS, Backend, BackendChoice, auto_table, choose_backend, pick_auto
from ingrain_bento.backends.torch import apply_torch_threads
from ingrain_bento.batching import Batcher, BatcherClosed, OneThread, TokenBudgetBatcher, in_executor
from ingrain_bento.errors import AtCapacity, Conflict, ModelNotFound, ModelStillLoading
from ingrain_bento.families import family
from ingrain_bento.families.base import LIBRARY_IMPORTS, LoadedModel, freeze_heap
from ingrain_bento.metrics import ModelMetrics
from ingrain_bento.refs import ModelRef
from ingrain_bento.runner.device import pick_device
from ingrain_bento.runner.export import ensure_export
from ingrain_bento.settings import Settings
from ingrain_bento.store import ModelStore, StoredModel

if TYPE_CHECKING:
    import torch

__all__ = ["ModelPool", "Resident"]

log = logging.getLogger("ingrain_bento.pool")

UNLOAD_DRAIN_TIMEOUT_S = 120.0
CPU_TOKENS_PER_ITEM = 32  # an ONNX text forward's default budget on a CPU: MAX_BATCH_SIZE texts of this many tokens
STILL_LOADING_RETRY_S = 5
# What ``backend_for`` answers for ``auto`` while it is not decided yet: the model's export, and the
# timing in its report, decide it as the load runs.
MEASURED_AUTO = "auto"


class _EngineFailed(Exception):
    """A backend other than torch could not open a model (the pool then opens it with torch)."""


@dataclass
class Resident:
    """A model on the device, with its batchers and the requests using it right now."""

    model: LoadedModel
    stored: StoredModel
    # The load's own ``backend`` (None: the server default, resolved again on restore).
    asked: str | None = None
    # The backend it resolved to (``model.backend`` differs after a fallback): what a later load naming
    # another one conflicts with.
    backend: Backend = "torch"
    pinned: bool = True  # loaded through the API or restored (False: on demand by a request; evicted first)
    batchers: dict[str, Batcher[Any]] = field(default_factory=dict)
    in_flight: int = 0
    last_used: float = field(default_factory=time.time)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


class ModelPool:
    def __init__(self, store: ModelStore, settings: Settings, metrics: ModelMetrics | None = None,
                 on_evict: Callable[[ModelRef], Awaitable[None]] | None = None, device_index: int = 0) -> None:
        """``on_evict``: a pinned model was evicted; ``device_index``: which CUDA device (one runner per device)."""
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.on_evict = on_evict
        self.device_index = device_index
        # One forward at a time per device: torch already uses every core (or the GPU) per forward.
        self.forward_executor = OneThread("ingrain-forward")
        self._device: torch.device | None = None
        self._resident: OrderedDict[ModelRef, Resident] = OrderedDict()
        self._loading: dict[ModelRef, tuple[Backend, asyncio.Task[Resident]]] = {}
        self._reserved: dict[ModelRef, int] = {}
        self._capacity_lock = asyncio.Lock()

    @property
    def device(self) -> torch.device:
        if self._device is None:
            apply_torch_threads(self.settings.torch_threads)
            self._device = pick_device(self.settings, self.device_index)
        return self._device

    async def pick_device(self) -> None:
        """Pick the device on a thread: the first pick imports torch (seconds), which on the event
        loop would hold every request of this process meanwhile (a listing during a restore)."""
        if self._device is None:
            await asyncio.to_thread(lambda: self.device)

    @property
    def has_device(self) -> bool:
        """Whether the device is picked yet (picking it imports torch)."""
        return self._device is not None

    @property
    def half(self) -> bool:
        return self.settings.fp16_enabled and self.device.type == "cuda"

    def resident(self) -> list[Resident]:
        return list(self._resident.values())

    def get(self, ref: ModelRef) -> Resident | None:
        return self._resident.get(ref)

    def loading(self) -> list[ModelRef]:
        return list(self._loading)

    def is_loading(self, ref: ModelRef) -> bool:
        return ref in self._loading

    def loading_backend(self, ref: ModelRef) -> Backend | None:
        loading = self._loading.get(ref)
        return loading[0] if loading else None

    def backend_for(self, ref: ModelRef, requested: str | None) -> Backend:
        """The backend a load of ``ref`` asking for ``requested`` (None: the server default) gets;
        ``MEASURED_AUTO`` for an ``auto`` that the model's export and its timing decide."""
        if (requested or self.settings.backend) == "auto" and BACKENDS[auto_table(self.device.type,
                                                                                 ref.library)].exports:
            return MEASURED_AUTO
        return choose_backend(requested, self.settings.backend, self.device.type, ref.library)

    async def load(self, ref: ModelRef, backend: str | None = None, *, evict_pinned: bool = True) -> bool:
        """Make ``ref`` resident and pinned; False when it already was (or another request loaded
        it). A ``backend`` other than the one it is resident (or loading) with is a 409."""
        await self.pick_device()
        wanted = self.backend_for(ref, backend)
        resident = self._resident.get(ref)
        if resident is not None:
            self._check_backend(ref, resident.backend, wanted, backend)
            self._resident.move_to_end(ref)
            resident.pinned = True
            return False
        loading = self._loading.get(ref)
        if loading is not None and loading[0] != MEASURED_AUTO:
            self._check_backend(ref, loading[0], wanted, backend)
        resident = await asyncio.shield(self._start_load(ref, wanted, asked=backend, evict_pinned=evict_pinned))
        if loading is not None:  # a load by ``auto``: known now
            self._check_backend(ref, resident.backend, wanted, backend)
        resident.pinned = True
        return loading is None

    def pin(self, ref: ModelRef) -> None:
        """Keep a model loaded on demand until it is unloaded (the desired state holds it)."""
        resident = self._resident.get(ref)
        if resident is not None:
            resident.pinned = True

    @staticmethod
    def _check_backend(ref: ModelRef, current: Backend, wanted: Backend, asked: str | None) -> None:
        if asked is not None and current != wanted:
            raise Conflict(f"{ref.display_id} is loaded with the {current} backend: unload it first to load it with "
                           f"{wanted}.")

    async def restore(self, refs: Sequence[tuple[ModelRef, str | None]]) -> dict[ModelRef, BaseException]:
        """Load ``refs``, pinned, one at a time, each with the backend its load asked for (None: the
        server's default): what the desired model state holds (after a restart, or what another
        runner loaded) and the preload list. All of them are ``LOADING`` at once, so a request for
        one waits for it (``wait_resident``) instead of finding it unknown. None evicts a pinned
        model; a failure is logged and returned, not raised."""
        await self.pick_device()
        turn = asyncio.Lock()
        loads = {ref: self._start_load(ref, self.backend_for(ref, backend), asked=backend, turn=turn,
                                       delay_s=self.settings.restore_delay_s, evict_pinned=False)
                 for ref, backend in refs if ref not in self._resident}
        failures: dict[ModelRef, BaseException] = {}
        for ref, outcome in zip(loads, await asyncio.gather(*loads.values(), return_exceptions=True), strict=True):
            if isinstance(outcome, BaseException):
                log.error("pool.restore failed to load model=%s: %s", ref.display_id, outcome)
                failures[ref] = outcome
            else:
                outcome.pinned = True
        return failures

    async def wait_resident(self, ref: ModelRef, wait_s: float | None) -> Resident:
        """``ref`` resident, loading it if needed (with the default backend); a 503 with
        ``Retry-After`` when that takes longer than ``wait_s`` (the load goes on: a later request
        finds it resident)."""
        resident = self._resident.get(ref)
        if resident is None:
            await self.pick_device()
            try:
                resident = await asyncio.wait_for(
                    asyncio.shield(self._start_load(ref, self.backend_for(ref, None), pinned=False)), wait_s)
            except TimeoutError:
                raise ModelStillLoading(f"{ref.display_id} is still loading: send the request again shortly.",
                                        STILL_LOADING_RETRY_S) from None
            if self._resident.get(ref) is not resident:
                raise AtCapacity(f"{ref.display_id} was unloaded while this request waited: send it again.")
        return resident

    def _start_load(self, ref: ModelRef, backend: Backend, *, asked: str | None = None,
                    turn: asyncio.Lock | None = None, delay_s: float = 0.0, pinned: bool = True,
                    evict_pinned: bool = True) -> asyncio.Task[Resident]:
        """The one load of ``ref`` in progress, started if there is none (a storm of loads loads
        once); it leaves ``_loading`` when it ends, whoever awaits it. ``turn``: a lock the loads
        of a restore take in turn; ``delay_s``: a pause first (``INGRAIN_RESTORE_DELAY_S``);
        ``pinned``: what the model is once resident; ``evict_pinned``: may make room by evicting
        a pinned model."""
        loading = self._loading.get(ref)
        if loading is not None:
            return loading[1]
        task = asyncio.create_task(self._load(ref, backend, asked, turn, delay_s, pinned, evict_pinned))
        self._loading[ref] = (backend, task)

        def finished(done: asyncio.Task[Resident]) -> None:
            if self._loading.get(ref, (None, None))[1] is done:
                del self._loading[ref]

        task.add_done_callback(finished)
        return task

    async def _load(self, ref: ModelRef, backend: Backend, asked: str | None, turn: asyncio.Lock | None,
                    delay_s: float, pinned: bool, evict_pinned: bool) -> Resident:
        async with turn or contextlib.nullcontext():
            await asyncio.sleep(delay_s)
            return await self._load_now(ref, backend, asked, pinned, evict_pinned)

    async def _load_now(self, ref: ModelRef, backend: Backend, asked: str | None, pinned: bool,
                        evict_pinned: bool) -> Resident:
        started = time.perf_counter()
        stored = await asyncio.to_thread(self.store.pull, ref)
        estimate = int(stored.metadata.get("weights_bytes", stored.size_bytes)) // (2 if self.half else 1)
        picked, choice, fallback = await self._backend_choice(stored, backend)
        await self._make_room(ref, estimate, evict_pinned)
        try:
            model = await self._open(ref, stored, choice)
        except _EngineFailed as exc:  # an export that ONNX Runtime cannot open: torch, and why
            fallback = str(exc)
            model = await self._open(ref, stored, self._choice("torch"))
        finally:
            self._reserved.pop(ref, None)
        model.fallback = fallback
        if fallback:
            log.warning("pool.fallback model=%s backend=%s runs on torch: %s", ref.display_id, picked, fallback)
        resident = Resident(model=model, stored=stored, asked=asked, backend=picked, pinned=pinned)
        self._resident[ref] = resident
        freeze_heap()
        self._report_resident()
        log.info("pool.load model=%s backend=%s device=%s bytes=%d seconds=%.2f", ref.display_id, model.backend,
                 model.device, model.memory_bytes, time.perf_counter() - started)
        return resident

    def _choice(self, backend: Backend, export: Path | None = None) -> BackendChoice:
        return BackendChoice(backend, self.device, self.half, self.settings.torch_threads, export,
                            self.settings.onnx_spinning)

    async def _backend_choice(self, stored: StoredModel,
                              backend: Backend) -> tuple[Backend, BackendChoice, str | None]:
        """The backend ``backend`` resolves to (``MEASURED_AUTO``: the faster one timed with the
        export of ``auto``'s table pick, which is made first), what to open ``stored`` with, and why
        that is not the backend resolved to when it is not."""
        measured = backend == MEASURED_AUTO
        if measured:
            backend = auto_table(self.device.type, stored.library)
        if not BACKENDS[backend].exports:
            return backend, self._choice(backend), None
        export = await ensure_export(self.store, stored, backend, self.settings.export_timeout_s)
        if export.folder is None:
            return backend, self._choice("torch"), f"it has no {backend} export: {export.failure}"
        if measured:
            pick = pick_auto(backend, self.device.type, export.report)
            log.info("pool.auto model=%s picks %s: %s", stored.tag, pick.backend, pick.why)
            if pick.backend != backend:
                return pick.backend, self._choice(pick.backend), None
        return backend, self._choice(backend, export.folder), None

    async def _open(self, ref: ModelRef, stored: StoredModel, choice: BackendChoice) -> LoadedModel:
        def load() -> LoadedModel:
            try:
                with LIBRARY_IMPORTS:
                    return family(ref.library).load(stored.path, ref, choice)
            except Exception as exc:
                if not BACKENDS[choice.backend].exports:
                    raise
                raise _EngineFailed(f"the {choice.backend} backend could not open its export "
                                    f"({type(exc).__name__}: {exc})") from exc

        return await asyncio.to_thread(load)

    def _used_bytes(self) -> int:
        return sum(r.model.memory_bytes for r in self._resident.values()) + sum(self._reserved.values())

    async def _make_room(self, ref: ModelRef, needed_bytes: int, evict_pinned: bool) -> None:
        budget = self.settings.max_model_memory
        if budget is not None and needed_bytes > budget:
            raise AtCapacity(f"{ref.display_id} needs about {needed_bytes} bytes, over the memory budget "
                             f"INGRAIN_MAX_MODEL_MEMORY={budget}.")
        async with self._capacity_lock:
            while (len(self._resident) + len(self._reserved) >= self.settings.max_loaded_models
                   or (budget is not None and self._used_bytes() + needed_bytes > budget)):
                if self.settings.eviction == "reject":
                    raise AtCapacity(
                        f"The server is at capacity ({len(self._resident)} models loaded, MAX_LOADED_MODELS="
                        f"{self.settings.max_loaded_models}): unload a model first."
                    )
                victim = self._victim(evict_pinned)
                if victim is None:
                    if not evict_pinned and any(res.in_flight == 0 for res in self._resident.values()):
                        raise AtCapacity(f"{ref.display_id} does not fit beside the pinned models (MAX_LOADED_MODELS="
                                         f"{self.settings.max_loaded_models}): unload one, or raise the limit.")
                    raise AtCapacity("The server is at capacity and every loaded model is busy: try again shortly.")
                pinned = self._resident[victim].pinned
                log.info("pool.evict model=%s pinned=%s to load %s", victim.display_id, pinned, ref.display_id)
                await self.unload(victim)
                if pinned and self.on_evict is not None:
                    await self.on_evict(victim)
            self._reserved[ref] = needed_bytes

    def _victim(self, evict_pinned: bool) -> ModelRef | None:
        """The least recently used idle model, an unpinned one first."""
        idle = [ref for ref, res in self._resident.items() if res.in_flight == 0]
        unpinned = [ref for ref in idle if not self._resident[ref].pinned]
        if unpinned:
            return unpinned[0]
        return idle[0] if idle and evict_pinned else None

    async def unload(self, ref: ModelRef) -> None:
        """Take ``ref`` off the device; queued requests finish first, then memory is released."""
        resident = self._resident.pop(ref, None)
        if resident is None:
            raise ModelNotFound(f"{ref.display_id} is not loaded.")
        started = time.perf_counter()
        for batcher in resident.batchers.values():
            await batcher.close()
        try:
            await asyncio.wait_for(resident.idle.wait(), UNLOAD_DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.warning("pool.unload model=%s released with requests still in flight", ref.display_id)
        await self.forward_executor.run(resident.model.release)
        self._report_resident()
        log.info("pool.unload model=%s bytes=%d seconds=%.2f", ref.display_id, resident.model.memory_bytes,
                 time.perf_counter() - started)

    @asynccontextmanager
    async def use(self, ref: ModelRef, wait_s: float | None = None) -> AsyncIterator[Resident]:
        """Hold ``ref`` for one request (loading it if needed, see ``wait_resident``); it is not
        evicted meanwhile."""
        resident = await self.wait_resident(ref, wait_s)
        self._resident.move_to_end(ref)
        resident.in_flight += 1
        resident.idle.clear()
        resident.last_used = time.time()
        try:
            yield resident
        finally:
            resident.in_flight -= 1
            if resident.in_flight == 0:
                resident.idle.set()

    def batcher(self, resident: Resident, task: str) -> Batcher[Any]:
        """The batcher of one model for one task (a capability: embed_text, embed_image, classify):
        forwards sized by padded tokens for a task whose items are texts of varying length."""
        if self._resident.get(resident.model.ref) is not resident:
            raise BatcherClosed(f"{resident.model.ref.display_id} was unloaded while this request waited.")
        batcher = resident.batchers.get(task)
        if batcher is None:
            model, ref = resident.model, resident.model.ref
            on_batch = None
            if self.metrics is not None:
                record = self.metrics.record_batch
                on_batch = lambda stats: record(ref, task, model.backend, stats)  # noqa: E731
            forward = in_executor(partial(model.forward, task), self.forward_executor)
            common: dict[str, Any] = {"max_batch": self.settings.max_batch_size, "on_batch": on_batch,
                                      "max_wait_s": self.settings.batch_wait_ms / 1000,
                                      "merge": self.settings.dynamic_batching}
            tokens = model.item_tokens(task)
            if tokens is not None:
                batcher = TokenBudgetBatcher(forward, tokens=tokens, max_tokens=self.max_batch_tokens(model),
                                             **common)
            else:
                batcher = Batcher(forward, **common)
            resident.batchers[task] = batcher
        return batcher

    def max_batch_tokens(self, model: LoadedModel) -> int:
        """``INGRAIN_MAX_BATCH_TOKENS``, else ``MAX_BATCH_SIZE`` x half the model's context: a forward
        of 64 texts of MiniLM's 256 tokens runs as two of 32 (README Performance: memory). Under ONNX
        Runtime on a CPU at most ``MAX_BATCH_SIZE`` x ``CPU_TOKENS_PER_ITEM`` (2,048: 64 short texts,
        8 of 256 tokens): there a long texts' forward costs less per token when small (its attention
        stays in the cache: MiniLM on 2 cores, 5.9k tokens/s at 8 x 256, 5.2k at 64 x 256), smaller
        forwards find texts of closer lengths (less padding), and the longest texts, served a few at
        a time, wait more evenly (README "Texts of mixed lengths"). Torch on a CPU does the opposite
        (MiniLM's shape, sorted texts of ~35 tokens: 204 texts/s in forwards of 16, 224 in forwards of
        32 or 64) and keeps the larger budget."""
        if self.settings.max_batch_tokens is not None:
            return self.settings.max_batch_tokens
        budget = self.settings.max_batch_size * max(1, (model.context_length or 512) // 2)
        if model.device == "cpu" and model.backend == "onnx":
            budget = min(budget, self.settings.max_batch_size * CPU_TOKENS_PER_ITEM)
        return budget

    def _report_resident(self) -> None:
        if self.metrics is not None:
            self.metrics.record_resident({ref.display_id: r.model.memory_bytes for ref, r in self._resident.items()})

    async def close(self) -> None:
        """Release every model (what the desired state holds stays recorded)."""
        for ref in list(self._resident):
            await self.unload(ref)
        self.forward_executor.shutdown(wait=False)
