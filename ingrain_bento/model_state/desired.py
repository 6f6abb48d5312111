"""The desired model state: one record of what every runner of every replica must hold.

- ``models``: the models that must be resident, each with the engine its load asked for and
  whether it is pinned (loaded through the management API: kept until unloaded) or not (loaded
  on demand by a request: a runner may evict it);
- ``entries``: the store entries that exist (BentoML tag -> the model it holds);
- ``deleted``: the entries that were deleted (tag -> the generation that deleted them), so a
  runner that still has one drops it from its local store;
- ``generation``: moves with every change;
- ``removals``: moves when a model stops being resident or stored, everywhere. It is the
  model-state version the fronts cache against (they drop their handles and tokenizers when it
  moves; ``StaleModel``), so it means the same on every replica. A load does not move it: the
  fronts' caches stay warm.

A ``DesiredState`` is an immutable value: each change returns a new one with the generation
moved, which a home (``home.py``) writes with compare-and-swap. Nothing here reads or writes
anywhere, and nothing imports torch or BentoML.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ingrain_bento.refs import ModelRef

__all__ = ["DesiredModel", "DesiredState", "model_key"]


def model_key(ref: ModelRef) -> str:
    """A model's key in the record: its library and display id (``open_clip/ViT-B-32::laion2b``)."""
    return f"{ref.library}/{ref.display_id}"


class DesiredModel(BaseModel):
    """One model that must be resident."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    library: str
    name: str
    pretrained: str | None = None
    backend: str | None = None  # the engine its load asked for; None: the server's default
    pinned: bool = True  # loaded through the API (kept until unloaded); False: on demand (evictable)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.library, self.name, self.pretrained)


class StoredEntry(BaseModel):
    """One store entry: the model a BentoML tag holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    library: str
    name: str
    pretrained: str | None = None


class DesiredState(BaseModel):
    """The whole record (see the module docstring). Changes return a new state, one generation on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: int = Field(default=0, ge=0)
    removals: int = Field(default=0, ge=0)
    models: dict[str, DesiredModel] = {}
    entries: dict[str, StoredEntry] = {}
    deleted: dict[str, int] = {}

    def _next(self, **changes: object) -> DesiredState:
        return self.model_copy(update={"generation": self.generation + 1, **changes})

    def with_resident(self, ref: ModelRef, backend: str | None, pinned: bool = True) -> DesiredState:
        """``ref`` must be resident, with ``backend``. A model already pinned stays pinned (a
        request's autoload never unpins an API load); the same record again changes nothing."""
        key = model_key(ref)
        current = self.models.get(key)
        wanted = DesiredModel(library=ref.library, name=ref.name, pretrained=ref.pretrained, backend=backend,
                              pinned=pinned or (current is not None and current.pinned))
        if current == wanted:
            return self
        return self._next(models={**self.models, key: wanted})

    def without_resident(self, ref: ModelRef) -> DesiredState:
        """``ref`` must not be resident any more (its store entry stays)."""
        key = model_key(ref)
        if key not in self.models:
            return self
        return self._next(models={k: v for k, v in self.models.items() if k != key}, removals=self.removals + 1)

    def with_entry(self, tag: str, ref: ModelRef) -> DesiredState:
        """The store holds ``ref`` under ``tag`` (a new entry clears an old deletion of the same tag)."""
        entry = StoredEntry(library=ref.library, name=ref.name, pretrained=ref.pretrained)
        if self.entries.get(tag) == entry and tag not in self.deleted:
            return self
        return self._next(entries={**self.entries, tag: entry},
                          deleted={k: v for k, v in self.deleted.items() if k != tag})

    def without_entry(self, tag: str) -> DesiredState:
        """The entry ``tag`` is deleted everywhere, and the model it held is resident nowhere."""
        entry = self.entries.get(tag)
        if entry is None and tag in self.deleted:
            return self
        models = self.models
        if entry is not None:
            gone = model_key(ModelRef(entry.library, entry.name, entry.pretrained))
            models = {k: v for k, v in models.items() if k != gone}
        return self._next(models=models, entries={k: v for k, v in self.entries.items() if k != tag},
                          deleted={**self.deleted, tag: self.generation + 1}, removals=self.removals + 1)
