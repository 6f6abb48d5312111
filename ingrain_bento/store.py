"""The BentoML model store: every checkpoint the server has, one self-describing folder each.

Entries are written through ``bentoml.models.create`` (so ``bentoml models list`` shows them,
with ``library``/``name``/``pretrained`` labels) and marked complete only after BentoML has
saved them: a crashed or failed download leaves nothing that lists. A file lock per tag in
``$BENTOML_HOME`` keeps processes sharing one store from pulling the same model twice.

With ``shared`` (``model_state.entries.SharedEntries``), every entry written or deleted is
recorded in the desired model state, and, with ``INGRAIN_SHARED_STORE``, kept in the bucket: a
model missing here is fetched from there before it is downloaded from its source.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import bentoml

from ingrain_bento.backends.base import BACKENDS
from ingrain_bento.bentoml_seam import bentoml_home
from ingrain_bento.errors import Conflict, IngrainError, ModelNotFound, UpstreamFailed
from ingrain_bento.families import api_pretrained, family, parse_ref
from ingrain_bento.refs import ModelRef

__all__ = ["COMPLETE_MARKER", "EntrySharing", "ModelStore", "StoredExport", "StoredModel", "custom_store_name",
           "export_store_name", "staging_dir", "store_name"]

log = logging.getLogger("ingrain_bento.store")

COMPLETE_MARKER = ".ingrain-complete"
LABEL_KEYS = ("library", "name", "pretrained")
EXPORT_OF = "export_of"  # the label of an export entry: the tag (with version) of the model it was made from


@dataclass(frozen=True)
class StoredModel:
    """One complete store entry. ``ref`` is None for a custom checkpoint not yet bound to an
    architecture (open_clip/timm): then ``custom_name`` is its ``pretrained_name``."""

    tag: str
    path: Path
    library: str
    ref: ModelRef | None
    custom_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0

    @property
    def name(self) -> str:
        return self.ref.name if self.ref else str(self.custom_name)

    @property
    def pretrained(self) -> str | bool | None:
        return api_pretrained(self.ref) if self.ref else self.custom_name


@dataclass(frozen=True)
class StoredExport:
    """A model's graphs exported for one backend (``runner.export``): a store entry of its own,
    made from one model entry (``source``, a tag with version) and deleted with it."""

    tag: str
    path: Path
    source: str
    backend: str
    metadata: dict[str, Any] = field(default_factory=dict)


def export_store_name(source_tag: str, backend: str) -> str:
    """Tag name of the ``backend`` export of the model entry ``source_tag`` (``name:version``): a
    model deleted and stored again is a new entry, with exports of its own."""
    digest = hashlib.sha256(f"{source_tag}\n{backend}".encode()).hexdigest()[:10]
    prefix = backend.replace("-", "")
    slug = source_tag.split(":")[0][: 63 - len(prefix) - len(digest) - 2]
    return f"{prefix}-{slug}-{digest}"


def store_name(ref: ModelRef) -> str:
    """A model's BentoML tag name (``[a-z0-9._-]``, at most 63 chars): its family's prefix, a readable
    slug of its display id, and a hash of its identity."""
    identity = f"{ref.library}\n{ref.name}\n{ref.pretrained}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    short = family(ref.library).tag_prefix
    slug = re.sub(r"[^a-z0-9._]+", "-", ref.display_id.lower()).strip("-.")
    return f"{short}-{slug[: 63 - len(short) - len(digest) - 2]}-{digest}"


def custom_store_name(library: str, pretrained_name: str) -> str:
    """Tag name of a custom checkpoint waiting to be bound to an architecture."""
    digest = hashlib.sha256(f"{library}\n{pretrained_name}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9._]+", "-", pretrained_name.lower()).strip("-.")[:38]
    return f"custom-{library.replace('_', '-')[:9]}-{slug}-{digest}"


# Modules BentoML's metadata validator looks up in ``sys.modules`` on every store read
# (``bentoml._internal.utils._validate_metadata_entry``: ``LazyType("scipy.sparse", ...)``). While
# another thread imports one (a model library's first load imports scipy), the lookup finds it
# half-initialized and the read raises AttributeError: a listing during a restore was a 500.
_VALIDATOR_MODULES = ("scipy.sparse", "pandas")


@lru_cache(maxsize=1)
def _import_validator_modules() -> None:
    """Import them once, before any store read, where they are installed."""
    for name in _VALIDATOR_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _hub_says_missing(exc: BaseException) -> str | None:
    """The name of the Hub's own "no such repo / revision" error in ``exc`` or what it was raised
    from (the libraries wrap it), else None. A gated repo exists: not one of these."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (RepositoryNotFoundError, RevisionNotFoundError)) and not isinstance(
                current, GatedRepoError):
            return type(current).__name__
        current = current.__cause__ or current.__context__
    return None


class EntrySharing(Protocol):
    """Where the store reports its entries and fetches other replicas' (``model_state.entries``)."""

    def added(self, tag: str, ref: ModelRef) -> None: ...

    def removed(self, tag: str) -> None: ...

    def shared_tag(self, tag_name: str) -> str | None: ...

    def fetch(self, tag: str) -> bool: ...


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ModelStore:
    """Find, pull, import, bind, list and delete checkpoints in the BentoML model store."""

    def __init__(self, shared: EntrySharing | None = None) -> None:
        _import_validator_modules()
        self.shared = shared

    def _added(self, entry: StoredModel, ref: ModelRef) -> StoredModel:
        if self.shared is not None:
            self.shared.added(entry.tag, ref)
        return entry

    def _from_shared(self, tag_name: str) -> StoredModel | None:
        """The entry another replica stored under ``tag_name``, fetched into this store."""
        if self.shared is None:
            return None
        tag = self.shared.shared_tag(tag_name)
        if tag is None or not self.shared.fetch(tag):
            return None
        return self.by_tag(tag_name)

    @contextmanager
    def _lock(self, tag_name: str) -> Iterator[None]:
        lock_dir = bentoml_home() / "ingrain-locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{tag_name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _entry(model: Any) -> StoredModel | None:
        path = Path(model.path)
        labels = model.info.labels
        if not (path / COMPLETE_MARKER).is_file() or "library" not in labels or EXPORT_OF in labels:
            return None
        library = labels["library"]
        meta = dict(model.info.metadata)
        if meta.get("unbound"):
            ref, custom = None, labels["pretrained"]
        else:
            ref, custom = parse_ref(library, labels["name"], labels["pretrained"] or None), None
        return StoredModel(str(model.tag), path, library, ref, custom, meta, int(meta.get("size_bytes", 0)))

    def by_tag(self, tag_name: str) -> StoredModel | None:
        """The complete entry of a tag (``name`` or ``name:version``), if there is one."""
        try:
            return self._entry(bentoml.models.get(tag_name))
        except bentoml.exceptions.NotFound:
            return None

    def entries(self) -> list[StoredModel]:
        """Every complete entry this server wrote, newest first."""
        found = (self._entry(model) for model in bentoml.models.list())
        return [entry for entry in found if entry is not None]

    def find(self, ref: ModelRef) -> StoredModel | None:
        return self.by_tag(store_name(ref))

    def find_unbound(self, library: str, pretrained_name: str) -> StoredModel | None:
        return self.by_tag(custom_store_name(library, pretrained_name))

    def _create(self, tag_name: str, labels: dict[str, str], write: Callable[[Path], dict[str, Any]],
                extra_metadata: dict[str, Any] | None = None) -> StoredModel:
        """Write one model entry: ``write(folder)`` fills it; any failure leaves nothing behind."""
        self._write(tag_name, labels, write, extra_metadata, module=f"ingrain_bento.{labels['library']}")
        entry = self._entry(bentoml.models.get(tag_name))
        assert entry is not None
        return entry

    def _write(self, tag_name: str, labels: dict[str, str], write: Callable[[Path], dict[str, Any]],
               extra_metadata: dict[str, Any] | None, module: str) -> Any:
        started = time.perf_counter()
        staged: Path | None = None
        try:
            with bentoml.models.create(tag_name, labels=labels, module=module) as model:
                staged = Path(model.path)
                metadata = {**(extra_metadata or {}), **write(staged)}
                metadata["size_bytes"] = _folder_size(staged)
                metadata["weights_bytes"] = sum(p.stat().st_size for p in staged.rglob("*.safetensors"))
                model.info.metadata.update(metadata)
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        stored = bentoml.models.get(tag_name)
        (Path(stored.path) / COMPLETE_MARKER).touch()
        log.info("store.write tag=%s bytes=%d seconds=%.2f", stored.tag, stored.info.metadata.get("size_bytes", 0),
                 time.perf_counter() - started)
        return stored

    # ---- exports --------------------------------------------------------------------------

    @staticmethod
    def _export(model: Any) -> StoredExport | None:
        labels = model.info.labels
        if EXPORT_OF not in labels or not (Path(model.path) / COMPLETE_MARKER).is_file():
            return None
        return StoredExport(str(model.tag), Path(model.path), labels[EXPORT_OF], labels.get("backend", ""),
                            dict(model.info.metadata))

    def find_export(self, entry: StoredModel, backend: str) -> StoredExport | None:
        """The ``backend`` export made from ``entry``, if there is one."""
        try:
            return self._export(bentoml.models.get(export_store_name(entry.tag, backend)))
        except bentoml.exceptions.NotFound:
            return None

    def exports_of(self, tag: str) -> list[StoredExport]:
        """Every export made from the model entry ``tag`` (with version)."""
        found = (self._export(model) for model in bentoml.models.list())
        return [export for export in found if export is not None and export.source == tag]

    def write_export(self, entry: StoredModel, backend: str, folder: Path, report: dict[str, Any]) -> StoredExport:
        """Store the graphs in ``folder`` (or, when ``report`` has a ``failure``, only that) as the
        ``backend`` export of ``entry``."""
        name = export_store_name(entry.tag, backend)
        labels = {EXPORT_OF: entry.tag, "backend": backend, "source": "ingrain-bento"}

        def write(target: Path) -> dict[str, Any]:
            for pattern in BACKENDS[backend].stored_files:
                for graph in folder.glob(pattern):
                    shutil.copy2(graph, target / graph.name)
            return {"report": report}

        with self._lock(name):
            existing = self.find_export(entry, backend)
            if existing is not None:
                return existing
            self._remove_incomplete(name)
            export = self._export(self._write(name, labels, write, None, module="ingrain_bento.onnx"))
        assert export is not None
        return export

    def pull(self, ref: ModelRef) -> StoredModel:
        """The entry for ``ref``, downloading it once through its library when it is missing."""
        existing = self.find(ref)
        if existing is not None:
            return existing
        if ref.pretrained is not None:
            unbound = self.find_unbound(ref.library, ref.pretrained)
            if unbound is not None:
                return self.bind(ref, unbound)
        with self._lock(store_name(ref)):
            existing = self.find(ref)
            if existing is not None:
                return existing
            self._remove_incomplete(store_name(ref))
            shared = self._from_shared(store_name(ref))
            if shared is not None:
                return shared
            entry = self._create(store_name(ref), self._labels(ref), lambda folder: self._fetch(ref, folder))
            return self._added(entry, ref)

    @staticmethod
    def _fetch(ref: ModelRef, folder: Path) -> dict[str, Any]:
        """The library's own download. A model the Hugging Face Hub says does not exist is a 404;
        anything else it raises that is not ours (the Hub unreachable, offline and not in the
        cache, a gated repo) is upstream: a 502 that says what to check. Messages name the error's
        type only, never a server path."""
        try:
            return family(ref.library).fetch(ref, folder)
        except IngrainError:
            raise
        except Exception as exc:
            log.warning("store.fetch model=%s failed: %s", ref.display_id, exc)
            missing = _hub_says_missing(exc)
            if missing is not None:
                raise ModelNotFound(f"{ref.display_id} is not on the Hugging Face Hub ({missing}): check the "
                                    "name.") from None
            raise UpstreamFailed(f"{ref.display_id} could not be fetched through {ref.library} "
                                 f"({type(exc).__name__}): check the name and that the Hugging Face Hub can be "
                                 "reached (or that HF_HUB_CACHE holds it, with HF_HUB_OFFLINE=1).") from None

    def bind(self, ref: ModelRef, unbound: StoredModel) -> StoredModel:
        """Turn a custom checkpoint into a loadable ``(architecture, pretrained_name)`` entry."""
        weights = unbound.path / "custom.safetensors"
        with self._lock(store_name(ref)):
            existing = self.find(ref)
            if existing is not None:
                return existing
            self._remove_incomplete(store_name(ref))
            options = unbound.metadata.get("options", {})
            entry = self._create(
                store_name(ref), self._labels(ref),
                lambda folder: family(ref.library).bind_custom(ref, weights, options, folder),
                {"custom": True, "options": options},
            )
        self._added(entry, ref)
        self.delete_tag(unbound.tag)
        return entry

    def import_custom(self, library: str, pretrained_name: str, write: Callable[[Path], dict[str, Any]],
                      options: dict[str, Any]) -> StoredModel:
        """Store a downloaded custom model; 409 when ``pretrained_name`` is taken. A complete
        model folder is stored under its own name; a bare checkpoint waits, unbound, for the
        load that names its architecture (``bind``)."""
        extra: dict[str, Any]
        if family(library).custom_form == "folder":
            ref = parse_ref(library, pretrained_name)
            tag_name, labels, extra = store_name(ref), self._labels(ref), {"custom": True}
        else:
            ref = ModelRef(library, pretrained_name, pretrained_name)  # its record until bound
            tag_name = custom_store_name(library, pretrained_name)
            labels = {"library": library, "name": pretrained_name, "pretrained": pretrained_name}
            extra = {"custom": True, "unbound": True, "options": options}
        with self._lock(tag_name):
            if self.is_taken(library, pretrained_name):
                raise Conflict(f"A {library} model named {pretrained_name!r} is already stored: "
                               "delete it first or choose another pretrained_name.")
            self._remove_incomplete(tag_name)
            return self._added(self._create(tag_name, labels, write, extra), ref)

    def is_taken(self, library: str, pretrained_name: str) -> bool:
        """Whether a stored model of ``library`` already uses ``pretrained_name``."""
        for entry in self.entries():
            if entry.library == library and pretrained_name in (entry.custom_name, entry.name,
                                                                entry.ref and entry.ref.pretrained):
                return True
        return False

    def delete(self, ref: ModelRef) -> StoredModel:
        """Remove ``ref`` (or the unbound custom checkpoint it names) from the store."""
        entry = self.find(ref)
        if entry is None and ref.pretrained is not None:
            entry = self.find_unbound(ref.library, ref.pretrained)
        if entry is None:
            entry = self.find_unbound(ref.library, ref.name)
        if entry is None:
            raise ModelNotFound(f"{ref.display_id} is not in the model store.")
        self.delete_tag(entry.tag)
        return entry

    def delete_tag(self, tag: str, *, shared: bool = True) -> None:
        """Delete an entry, and the exports made from it; ``shared``: everywhere (recorded, and
        removed from the bucket), else from this store only (a runner following a deletion)."""
        full_tag = str(bentoml.models.get(tag).tag)
        for export in self.exports_of(full_tag):
            with self._lock(export.tag.split(":")[0]):
                bentoml.models.delete(export.tag)
        with self._lock(tag.split(":")[0]):
            bentoml.models.delete(tag)
        if shared and self.shared is not None:
            self.shared.removed(full_tag)

    def _remove_incomplete(self, tag_name: str) -> None:
        """Clear what a crashed writer left under ``tag_name`` (called with its lock held)."""
        try:
            models = bentoml.models.list(tag_name)
        except bentoml.exceptions.NotFound:
            return
        for model in models:
            if not (Path(model.path) / COMPLETE_MARKER).is_file():
                log.warning("store.cleanup incomplete entry %s", model.tag)
                bentoml.models.delete(model.tag)

    @staticmethod
    def _labels(ref: ModelRef) -> dict[str, str]:
        pretrained = "" if ref.pretrained is None else ref.pretrained
        return {"library": ref.library, "name": ref.name, "pretrained": pretrained,
                "id": ref.display_id, "source": "ingrain-bento"}


def staging_dir() -> tempfile.TemporaryDirectory[str]:
    """A scratch folder for downloads before they enter the store."""
    return tempfile.TemporaryDirectory(prefix="ingrain-download-")
