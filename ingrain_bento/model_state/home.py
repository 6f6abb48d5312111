"""Where the desired state lives, behind one interface, and how it is changed: compare-and-swap.

A ``StateHome`` reads the record with a token (what the writer must still find there) and writes
a new record only if that token is still current; otherwise it raises ``WriteConflict`` and the
writer reads again (``update``). Two homes:

- ``LocalStateHome`` (this module): one file beside the store, for the runners of one machine.
  The token is the file's SHA-256; the swap holds an exclusive ``flock`` on a lock file beside
  it, and the new record replaces the old with ``os.replace`` (a writer killed mid-write leaves
  the old record).
- ``MemoryStateHome`` (this module): in this process only, for an engine that shares nothing and
  keeps nothing across a restart (``INGRAIN_RESTORE=false`` with one runner, and tests).
- ``S3StateHome`` (``s3.py``): one object in a bucket, for replicas on many machines; the swap
  is S3's conditional write.

``open_home`` picks one from a URL: ``s3://bucket/prefix`` or a local folder.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from pydantic import ValidationError

from ingrain_bento.errors import AtCapacity
from ingrain_bento.model_state.desired import DesiredState
from ingrain_bento.model_state.reports import RunnerReport, report_name

__all__ = ["LocalStateHome", "MemoryStateHome", "StateHome", "StoreUnreachable", "Versioned", "WriteConflict",
           "call", "open_home", "update"]

T = TypeVar("T")
STATE_FILE = "desired-state.json"
REPORTS = "reports"  # beside the record: one report per runner (``reports.py``)
UPDATE_ATTEMPTS = 20  # swaps lost to other writers before a change gives up (each reads again first)


class WriteConflict(Exception):
    """Another writer changed the record since it was read: read again, then retry."""


class StoreUnreachable(AtCapacity):
    """The home of the model state does not answer: a 503 that names it (resident models keep serving)."""


class Versioned(NamedTuple):
    state: DesiredState
    token: str | None  # what a write must still find there; None: no record yet


class StateHome(Protocol):
    """One home of the desired state."""

    location: str  # where it is, for messages and logs ("/srv/store/ingrain-state", "s3://bucket/prefix")
    remote: bool  # its calls go over the network (run them on a thread); else they are small local reads

    def read(self) -> Versioned:
        """The current record (an empty one, token None, before the first write)."""

    def write(self, state: DesiredState, token: str | None) -> str:
        """Write ``state`` if the record is still the one ``token`` names (None: still absent);
        return the new token. Raises ``WriteConflict`` otherwise, ``StoreUnreachable`` when the
        home does not answer."""

    def write_report(self, report: RunnerReport) -> None:
        """Write (replace) one runner's report."""

    def remove_report(self, runner_id: str) -> None:
        """Remove one runner's report (a clean shutdown: it drops out of listings at once)."""

    def read_reports(self) -> list[RunnerReport]:
        """Every runner's last report, stale ones included; an unreadable one is skipped."""


async def call(home: StateHome, method: Callable[..., T], *args: Any) -> T:
    """``method(*args)`` of ``home``: on a thread for a remote home (the network), inline for a local
    one (a small file, or memory: a thread hop would cost more, and wait behind a model load's)."""
    if home.remote:
        return await asyncio.to_thread(method, *args)
    return method(*args)


def update(home: StateHome, change: Callable[[DesiredState], DesiredState]) -> DesiredState:
    """Apply ``change`` to the current record with compare-and-swap: read, change, write if no
    one wrote in between, else read again. Concurrent writers each get their change in, in some
    order, none lost (the last write wins on a field both change). Returns the record written
    (or the current one, when ``change`` changed nothing)."""
    for _ in range(UPDATE_ATTEMPTS):
        current, token = home.read()
        changed = change(current)
        if changed == current:
            return current
        try:
            home.write(changed, token)
        except WriteConflict:
            continue
        return changed
    raise StoreUnreachable(f"The model state at {home.location} kept changing under this write "
                           f"({UPDATE_ATTEMPTS} attempts): try again.")


def parse_state(data: bytes, location: str) -> DesiredState:
    """A record's bytes as a ``DesiredState``; a record that does not parse is refused loudly
    (never silently taken as empty: that would unload every model everywhere)."""
    try:
        return DesiredState.model_validate_json(data)
    except ValidationError as exc:
        raise StoreUnreachable(f"The model state at {location} does not parse ({exc.error_count()} errors): "
                               "fix or remove it.") from None


class LocalStateHome:
    """The desired state as one file in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / STATE_FILE
        self.location = str(folder)
        self.remote = False

    def _read(self) -> tuple[bytes | None, str | None]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def read(self) -> Versioned:
        data, token = self._read()
        return Versioned(DesiredState() if data is None else parse_state(data, self.location), token)

    def write(self, state: DesiredState, token: str | None) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = state.model_dump_json(indent=1).encode()
        with open(self.folder / f"{STATE_FILE}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if self._read()[1] != token:
                raise WriteConflict(self.location)
            _replace(self.path, data)
        return hashlib.sha256(data).hexdigest()

    def write_report(self, report: RunnerReport) -> None:
        folder = self.folder / REPORTS
        folder.mkdir(parents=True, exist_ok=True)
        _replace(folder / report_name(report.id), report.model_dump_json().encode(), durable=False)

    def remove_report(self, runner_id: str) -> None:
        (self.folder / REPORTS / report_name(runner_id)).unlink(missing_ok=True)

    def read_reports(self) -> list[RunnerReport]:
        reports = []
        for path in sorted((self.folder / REPORTS).glob("*.json")):
            try:
                reports.append(RunnerReport.model_validate_json(path.read_bytes()))
            except (OSError, ValidationError):
                continue  # removed meanwhile, or not a report
        return reports


class MemoryStateHome:
    """The desired state in this process's memory (see the module docstring)."""

    location = "memory"
    remote = False

    def __init__(self) -> None:
        # The counts start at the clock, not 0: fronts treat a version below the one they saw as
        # old news, and a restarted process must still move it forward.
        now = int(time.time())
        self._state = DesiredState(generation=now, removals=now)
        self._token = "0"
        self._reports: dict[str, RunnerReport] = {}

    def read(self) -> Versioned:
        return Versioned(self._state, self._token)

    def write(self, state: DesiredState, token: str | None) -> str:
        if self._token != token:
            raise WriteConflict(self.location)
        self._state = state
        self._token = str(int(self._token) + 1)
        return self._token

    def write_report(self, report: RunnerReport) -> None:
        self._reports[report.id] = report

    def remove_report(self, runner_id: str) -> None:
        self._reports.pop(runner_id, None)

    def read_reports(self) -> list[RunnerReport]:
        return list(self._reports.values())


def _replace(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``path`` atomically: a writer killed mid-write leaves the previous file (``durable``:
    on disk before it replaces it; a report, rewritten every few seconds, need not be)."""
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(handle.name, path)


def open_home(location: str) -> StateHome:
    """The home a location names: ``s3://bucket/prefix`` (any S3-compatible store, reached with
    the standard ``AWS_*`` variables), else a local folder."""
    if location.startswith("s3://"):
        from ingrain_bento.model_state.s3 import S3StateHome

        return S3StateHome(location)
    return LocalStateHome(Path(location))
