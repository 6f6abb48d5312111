"""One runner's part in the model state shared by every runner of every replica.

``ModelStateSync`` connects a runner's pool and store to the desired state (``model_state/``):

- **Management writes** (``changing``, ``record``): a load, unload or delete first checks that the
  home answers (else a 503 that names it, before anything changes), changes this runner, then
  records the change with compare-and-swap. Every other runner follows at its next step.
- **Following** (``step``, every ``INGRAIN_SYNC_S``): the ``Reconciler`` brings this runner to the
  record through ``PoolModels`` (load, unload, pin, fetch or drop store entries), then the runner
  writes its report (``model_state/reports.py``). A home that does not answer changes nothing
  here: resident models keep serving, and the runner catches up when it answers again.
- **Listings** (``snapshot``): the record and every live runner's report, this one's taken live.
- **Version**: the record's ``removals``, as this runner last read or wrote it: the model-state
  version the fronts cache against, the same on every replica.

Management writes and steps take one lock, so a step never acts on a record read before a change
this runner is making.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

from ingrain_bento.bentoml_seam import bentoml_home
from ingrain_bento.metrics import ModelMetrics
from ingrain_bento.model_state import DesiredModel, DesiredState, Held, Reconciler, StateHome, model_key, update
from ingrain_bento.model_state.entries import S3EntryMirror
from ingrain_bento.model_state.home import LocalStateHome, MemoryStateHome, StoreUnreachable, call, open_home
from ingrain_bento.model_state.reports import ModelReport, RunnerReport, RunnerState, fresh_reports
from ingrain_bento.refs import ModelRef
from ingrain_bento.runner.pool import ModelPool
from ingrain_bento.settings import Settings
from ingrain_bento.store import ModelStore

__all__ = ["ModelStateSync", "PoolModels", "open_model_state", "runner_id"]

log = logging.getLogger("ingrain_bento.sync")

STALE_AFTER_STEPS = 3  # a runner whose report is older than this many sync periods (at least 10 s) has left


def open_model_state(settings: Settings, name: str, runners: int) -> tuple[StateHome, S3EntryMirror | None]:
    """Where this runner's desired state lives, and the shared store's entries:

    - ``INGRAIN_SHARED_STORE=s3://...``: both in the bucket, for every replica;
    - else a folder beside the store, ``$BENTOML_HOME/ingrain-state/<name>`` (``name``: the Bento,
      its version and the device), for this machine's runners, kept across restarts;
    - else, with ``INGRAIN_RESTORE=false`` and one runner, this process's memory: kept nowhere.
      (With several runners the folder is used anyway: they need it to agree.)
    """
    if settings.shared_store:
        return open_home(settings.shared_store), S3EntryMirror(settings.shared_store)
    if not settings.restore and runners == 1:
        return MemoryStateHome(), None
    return LocalStateHome(bentoml_home() / "ingrain-state" / re.sub(r"[^A-Za-z0-9._-]+", "-", name)), None


def runner_id(settings: Settings, index: int) -> str:
    """``<replica>/<index>``: ``INGRAIN_REPLICA_ID`` (else the host name) and the runner's index."""
    return f"{settings.replica_id or socket.gethostname()}/{index}"


class PoolModels:
    """A runner's pool and store as the ``Reconciler`` drives them (``model_state.RunnerModels``)."""

    def __init__(self, pool: ModelPool, store: ModelStore) -> None:
        self.pool = pool
        self.store = store

    def held(self) -> Mapping[str, Held]:
        held = {model_key(r.model.ref): Held(r.model.ref, r.pinned, r.stored.tag) for r in self.pool.resident()}
        for ref in self.pool.loading():
            held.setdefault(model_key(ref), Held(ref, True))
        return held

    def stored_tags(self) -> set[str]:
        return {entry.tag for entry in self.store.entries()}

    async def load(self, models: Sequence[DesiredModel]) -> Mapping[str, str]:
        failed = await self.pool.restore([(model.ref, model.backend) for model in models])
        return {model_key(ref): f"{type(exc).__name__}: {exc}" for ref, exc in failed.items()}

    async def unload(self, ref: ModelRef) -> None:
        if self.pool.get(ref) is not None:
            await self.pool.unload(ref)

    async def drop_entry(self, tag: str) -> None:
        await asyncio.to_thread(self.store.delete_tag, tag, shared=False)

    async def pin(self, ref: ModelRef) -> None:
        self.pool.pin(ref)

    async def fetch_entry(self, tag: str) -> None:
        if self.store.shared is not None:
            await asyncio.to_thread(self.store.shared.fetch, tag)


class ModelStateSync:
    """See the module docstring. ``runner_id``: ``<replica>/<index>``."""

    def __init__(self, home: StateHome, pool: ModelPool, store: ModelStore, runner_id: str, sync_s: float,
                 metrics: ModelMetrics | None = None) -> None:
        self.home = home
        self.pool = pool
        self.runner_id = runner_id
        self.sync_s = sync_s
        self.metrics = metrics
        self.reconciler = Reconciler(home, PoolModels(pool, store))
        self.generation = 0
        self.version = 0  # the record's removals: what fronts cache against
        self.stale_after_s = max(10.0, STALE_AFTER_STEPS * sync_s)
        self._lock = asyncio.Lock()
        self._loop: asyncio.Task[None] | None = None
        self._unreachable_since: float | None = None

    # ---- management writes ---------------------------------------------------------------------

    @asynccontextmanager
    async def changing(self) -> AsyncIterator[DesiredState]:
        """Hold the lock for one management change; the record as it is now (``StoreUnreachable``,
        a 503 naming the home, when it does not answer: then nothing changes)."""
        async with self._lock:
            current = (await call(self.home, self.home.read)).state
            self._seen(current)
            yield current
            try:  # what the change recorded through the store (entries) moved the generation to;
                # and this runner's report at once, for listings on other runners
                self._seen((await call(self.home, self.home.read)).state)
                await call(self.home, self.home.write_report, self.report())
            except StoreUnreachable:
                pass

    async def record(self, change: Callable[[DesiredState], DesiredState]) -> DesiredState:
        """Write ``change`` to the record (compare-and-swap, see ``model_state.update``)."""
        written = await asyncio.to_thread(update, self.home, change)
        self._seen(written)
        return written

    def _seen(self, state: DesiredState) -> None:
        self.generation = max(self.generation, state.generation)
        self.version = max(self.version, state.removals)

    # ---- following ----------------------------------------------------------------------------

    async def start(self, preload: Sequence[tuple[ModelRef, str | None]], *, forget: bool = False) -> None:
        """The first step, before this runner says it is ready: the preload list recorded (as if
        loaded through the API), then everything the record holds loaded. ``forget``: clear the
        record's models first (``INGRAIN_RESTORE=false`` on a runner that shares its state with no
        other). A home that does not answer leaves the preload list to load here alone."""
        try:
            if forget:
                def without_models(state: DesiredState) -> DesiredState:
                    for model in list(state.models.values()):
                        state = state.without_resident(model.ref)
                    return state

                await self.record(without_models)

            def with_preload(state: DesiredState) -> DesiredState:
                for ref, backend in preload:
                    if model_key(ref) not in state.models:
                        state = state.with_resident(ref, backend)
                return state

            await self.record(with_preload)
            await self.step()
        except StoreUnreachable as exc:
            log.error("sync.start %s: loading the preload list here only", exc)
            await self.pool.restore(list(preload))
        self._loop = asyncio.create_task(self._follow())

    async def step(self) -> None:
        """Reconcile once, then report."""
        async with self._lock:
            await self.reconciler.step()
            if self.reconciler.desired is not None:
                self._seen(self.reconciler.desired)
        if self.metrics is not None:
            self.metrics.record_sync(self.generation, len(self.reconciler.failures))
        await call(self.home, self.home.write_report, self.report())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.sync_s)
            try:
                await self.step()
            except StoreUnreachable as exc:
                if self.metrics is not None:
                    self.metrics.record_sync_unreachable()
                if self._unreachable_since is None:
                    self._unreachable_since = time.monotonic()
                    log.error("sync.unreachable %s", exc)
                continue
            except Exception:
                log.exception("sync.step failed")
                continue
            if self._unreachable_since is not None:
                log.info("sync.reachable again after %.1f s", time.monotonic() - self._unreachable_since)
                self._unreachable_since = None

    # ---- reports ------------------------------------------------------------------------------

    def report(self) -> RunnerReport:
        """What this runner holds now."""
        def entry(ref: ModelRef, state: RunnerState, message: str | None = None) -> ModelReport:
            return ModelReport(library=ref.library, name=ref.name, pretrained=ref.pretrained, state=state,
                               message=message)

        models = {model_key(r.model.ref): entry(r.model.ref, "READY") for r in self.pool.resident()}
        for ref in self.pool.loading():
            models.setdefault(model_key(ref), entry(ref, "LOADING"))
        desired = self.reconciler.desired
        for key, why in self.reconciler.failures.items():
            if desired is not None and key in desired.models and key not in models:
                models[key] = entry(desired.models[key].ref, "FAILED", why)
        device = str(self.pool.device) if self.pool.has_device else "unassigned"
        return RunnerReport(id=self.runner_id, device=device, generation=self.generation, written_at=time.time(),
                            models=models)

    async def snapshot(self) -> tuple[DesiredState | None, list[RunnerReport]]:
        """The record and every live runner's report (this one's live), for a listing; the home
        not answering, no record and this runner's report alone (listings keep answering)."""
        def read() -> tuple[DesiredState, list[RunnerReport]]:
            return self.home.read().state, self.home.read_reports()

        try:
            desired, others = await call(self.home, read)
        except StoreUnreachable:
            return None, [self.report()]
        live = [r for r in fresh_reports(others, self.stale_after_s) if r.id != self.runner_id]
        return desired, sorted([*live, self.report()], key=lambda r: r.id)

    async def close(self) -> None:
        """Stop following, and leave the listings at once."""
        if self._loop is not None:
            self._loop.cancel()
        try:
            await call(self.home, self.home.remove_report, self.runner_id)
        except StoreUnreachable:
            pass
