"""What each live runner holds, as it reports it: the listings' source past one process.

Every runner writes a ``RunnerReport`` to the home of the model state each ``INGRAIN_SYNC_S``
(a heartbeat): its id (``<replica>/<index>``), its device, the generation it reached, and per
model whether it is ``READY``, ``LOADING`` or ``FAILED`` (with why). A listing on any replica
reads every report younger than ``stale_after_s`` and merges them (``runner_entries``): a
replica that stops reporting (stopped, killed, cut off) drops out after that timeout. Reports
are not compare-and-swap: each runner writes only its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ingrain_bento.refs import ModelRef

__all__ = ["ModelReport", "RunnerReport", "RunnerState", "fresh_reports", "report_name", "runner_entries"]

RunnerState = Literal["READY", "LOADING", "FAILED"]


class ModelReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    library: str
    name: str
    pretrained: str | None = None
    state: RunnerState
    message: str | None = None

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.library, self.name, self.pretrained)


class RunnerReport(BaseModel):
    """One runner's heartbeat (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=200)  # "<replica>/<index>"
    device: str
    generation: int = Field(ge=0)  # the desired state's generation this runner reached
    written_at: float  # time.time() of the writer (replicas' clocks are assumed NTP-close)
    models: dict[str, ModelReport] = {}  # model key (``desired.model_key``) -> its state here

    @property
    def failed(self) -> dict[str, str]:
        return {key: model.message or "" for key, model in self.models.items() if model.state == "FAILED"}


def report_name(runner_id: str) -> str:
    """A report's file or object name: the id with anything but ``[A-Za-z0-9._-]`` replaced."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in runner_id) + ".json"


def fresh_reports(reports: Iterable[RunnerReport], stale_after_s: float,
                  now: float | None = None) -> list[RunnerReport]:
    """The reports written in the last ``stale_after_s`` seconds, by runner id."""
    now = time.time() if now is None else now
    return sorted((r for r in reports if now - r.written_at <= stale_after_s), key=lambda r: r.id)


def runner_entries(reports: Iterable[RunnerReport], key: str) -> list[dict[str, str]]:
    """``ModelInfo.runners`` for the model ``key``: one entry per runner that holds it, loads it,
    or failed to (a runner that holds nothing of it is left out)."""
    entries = []
    for report in reports:
        model = report.models.get(key)
        if model is not None:
            entry = {"id": report.id, "device": report.device, "state": model.state}
            if model.message:
                entry["message"] = model.message
            entries.append(entry)
    return entries
