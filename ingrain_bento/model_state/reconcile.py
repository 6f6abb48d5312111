"""How one runner drives what it holds toward the desired state.

``plan_changes`` compares the record (``desired.py``) with what a runner holds and says what to
do; ``Reconciler.step`` reads the record from its home and does it, through a ``RunnerModels``
(the runner's resident models and local store):

- unload a pinned model the record no longer holds (an unpinned one, loaded on demand by a
  request, stays: this runner may keep or evict it as it likes);
- unload any model, pinned or not, whose store entry was deleted, and drop deleted entries from
  the local store;
- fetch the store entries the record holds and the local store lacks (from the shared store);
- load what the record holds and the runner does not, with the engine the record names (all of
  them at once, so that a request for any of them waits for it rather than finding it unknown);
- pin a model the runner holds unpinned and the record pins.

Unloads come first, so their room is free for the loads, and fetches before loads. A load that fails (the model does not
fit, the files are not there yet) is kept in ``failures`` with its reason, for the listings and
the metrics, and tried again at the next step: a runner never diverges silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

from ingrain_bento.model_state.desired import DesiredModel, DesiredState, model_key
from ingrain_bento.model_state.home import StateHome, call
from ingrain_bento.refs import ModelRef

__all__ = ["Held", "Plan", "Reconciler", "RunnerModels", "plan_changes"]

log = logging.getLogger("ingrain_bento.model_state")


class Held(NamedTuple):
    """One model a runner holds: which, whether pinned, and its store entry's tag."""

    ref: ModelRef
    pinned: bool
    tag: str | None = None


class Plan(NamedTuple):
    unload: list[ModelRef]
    drop: list[str]  # store tags to delete from the local store
    load: list[DesiredModel]
    pin: list[ModelRef]
    fetch: list[str] = []  # store tags to bring into the local store from the shared one

    @property
    def empty(self) -> bool:
        return not (self.unload or self.drop or self.load or self.pin or self.fetch)


class RunnerModels(Protocol):
    """A runner as the reconciler drives it."""

    def held(self) -> Mapping[str, Held]:
        """Model key (``desired.model_key``) -> the model, for every model resident or loading."""

    def stored_tags(self) -> set[str]:
        """The tags of the local store's entries."""

    async def load(self, models: Sequence[DesiredModel]) -> Mapping[str, str]:
        """Make ``models`` resident, each with its engine, pinned as it says; the ones that could
        not be, by model key, with the reason."""

    async def unload(self, ref: ModelRef) -> None: ...

    async def drop_entry(self, tag: str) -> None: ...

    async def pin(self, ref: ModelRef) -> None: ...

    async def fetch_entry(self, tag: str) -> None:
        """Bring the entry ``tag`` into the local store from the shared store (no-op without one)."""


def plan_changes(desired: DesiredState, held: Mapping[str, Held], stored_tags: set[str]) -> Plan:
    """What a runner holding ``held`` (with ``stored_tags`` in its store) must do to match ``desired``."""
    unload = [model.ref for key, model in sorted(held.items())
              if (model.pinned and key not in desired.models) or model.tag in desired.deleted]
    unloading = {model_key(ref) for ref in unload}
    load = [model for key, model in sorted(desired.models.items()) if key not in held or key in unloading]
    pin = [held[key].ref for key, model in sorted(desired.models.items())
           if model.pinned and key in held and not held[key].pinned and key not in unloading]
    fetch = sorted(desired.entries.keys() - stored_tags - desired.deleted.keys())
    return Plan(unload, sorted(stored_tags & desired.deleted.keys()), load, pin, fetch)


class Reconciler:
    """Brings one runner to the desired state, one ``step`` at a time."""

    def __init__(self, home: StateHome, runner: RunnerModels) -> None:
        self.home = home
        self.executor = runner
        self.generation: int | None = None  # the last generation this runner reached (failures aside)
        self.failures: dict[str, str] = {}  # model key -> why this runner could not make it resident
        self.desired: DesiredState | None = None  # the record as the last step read it

    async def step(self) -> Plan:
        """Read the record, then unload, drop, load and pin as ``plan_changes`` says. The home
        unreachable raises ``StoreUnreachable`` before anything changes: what is resident stays.
        A record this runner already reached, with nothing failing and nothing missing, is not
        planned again: an idle runner's step costs one read (no listing of its store)."""
        desired = self.desired = (await call(self.home, self.home.read)).state
        held = self.executor.held()
        if desired.generation == self.generation and not self.failures and desired.models.keys() <= held.keys():
            return Plan([], [], [], [])
        stored = await asyncio.to_thread(self.executor.stored_tags)  # reads every entry's file: not on the loop
        plan = plan_changes(desired, held, stored)
        for ref in plan.unload:
            await self.executor.unload(ref)
        for tag in plan.drop:
            await self.executor.drop_entry(tag)
        for tag in plan.fetch:
            try:
                await self.executor.fetch_entry(tag)
            except Exception as exc:  # a load that needs it fails with its own reason; tried again next step
                log.warning("reconcile.fetch tag=%s failed: %s", tag, exc)
        failed = await self.executor.load(plan.load) if plan.load else {}
        for model in plan.load:  # kept, shown, and tried again at the next step
            key = model_key(model.ref)
            if key in failed:
                self.failures[key] = failed[key]
                log.warning("reconcile.load model=%s failed: %s", key, failed[key])
            else:
                self.failures.pop(key, None)
        for ref in plan.pin:
            await self.executor.pin(ref)
        self.failures = {key: why for key, why in self.failures.items() if key in desired.models}
        self.generation = desired.generation
        if not plan.empty:
            log.info("reconcile.step generation=%d unloaded=%d dropped=%d fetched=%d loaded=%d pinned=%d failed=%d",
                     desired.generation, len(plan.unload), len(plan.drop), len(plan.fetch), len(plan.load),
                     len(plan.pin), len(self.failures))
        return plan
