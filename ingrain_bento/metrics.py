"""Per-model metrics, in two forms on one ``GET /metrics``:

- Prometheus series (``prometheus_client``, so BentoML's own ``/metrics`` exposes them beside
  its request metrics, in its multiprocess mode). Every process of one ``bentoml serve``
  writes to the same multiprocess folder, so any front worker's ``/metrics`` sums them: the
  front's ``RequestMetrics`` (requests and latency per route, runner-call retries, models whose
  weights a front worker had to load) and the
  runner's ``ModelMetrics`` (items, batch sizes, forward time, resident models and bytes,
  runner starts);
- the Ingrain JSON ``{"modelStats": [...]}`` (Triton's statistics shape) that the ``ingrain``
  clients' ``metrics()`` parse, kept by the runner's ``ModelMetrics`` and fetched from it.
  ``MetricsFormatMiddleware`` routes a request that does not ask for Prometheus text to
  ``/ingrain_metrics``, which answers this form.

prometheus_client is imported when a metrics object is built (in the worker), never at module
import: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` after importing the service module.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ingrain_bento.batching import BatchStats
from ingrain_bento.refs import ModelRef

__all__ = ["JSON_METRICS_PATH", "PROMETHEUS_ACCEPT", "Deferred", "HttpMetrics", "MetricsFormatMiddleware",
           "ModelMetrics", "RequestMetrics"]

PROMETHEUS_ACCEPT = (b"text/plain", b"application/openmetrics-text")
JSON_METRICS_PATH = "/ingrain_metrics"


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_ingrain(self) -> dict[str, str]:
        return {"count": str(self.count), "ns": str(self.ns)}


@dataclass
class _ModelStats:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    batches: dict[int, _Duration] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _series() -> SimpleNamespace:
    """The Prometheus series, registered once per process (a registry refuses duplicates)."""
    import prometheus_client as prom

    return SimpleNamespace(
        requests=prom.Counter("ingrain_requests", "Inference requests", ["model", "route", "status"]),
        runner_retries=prom.Counter("ingrain_runner_retries", "Runner calls sent again after a connection error"),
        runner_unavailable=prom.Counter("ingrain_runner_unavailable", "Requests answered 503, runner down"),
        runner_starts=prom.Counter("ingrain_runner_starts", "Runner processes started (restarts included)"),
        # Not per model: a labelled series exists only once a model increments it, and this one
        # should read 0 from the start. The listings name the model (``ModelInfo.front_weights``).
        front_weights=prom.Counter("ingrain_front_weights_loaded", "Times a front worker loaded a model's weights "
                                   "because its weightless open failed"),
        items=prom.Counter("ingrain_items", "Texts and images embedded or classified", ["model", "task", "backend"]),
        latency=prom.Histogram("ingrain_request_latency_seconds", "Inference request latency", ["model", "route"]),
        batch_size=prom.Histogram("ingrain_batch_size", "Items per forward pass", ["model", "task", "backend"],
                                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
        forward_seconds=prom.Histogram("ingrain_forward_seconds", "Forward pass time", ["model", "task", "backend"]),
        tokens=prom.Counter("ingrain_tokens", "Real tokens of the texts in forward passes", ["model", "task"]),
        padded_tokens=prom.Counter("ingrain_padded_tokens", "Tokens forward passes computed (items x longest)",
                                   ["model", "task"]),
        resident_models=prom.Gauge("ingrain_resident_models", "Models on the device", multiprocess_mode="livesum"),
        resident_bytes=prom.Gauge("ingrain_resident_bytes", "Bytes of resident weights", ["model"],
                                  multiprocess_mode="livesum"),
        desired_failed=prom.Gauge("ingrain_desired_models_failed", "Models of the desired model state that a runner "
                                  "could not make resident (summed over runners)", multiprocess_mode="livesum"),
        generation=prom.Gauge("ingrain_model_state_generation", "The desired model state's generation a runner "
                              "reached", multiprocess_mode="livemin"),
        sync_unreachable=prom.Counter("ingrain_model_state_unreachable", "Sync steps that could not reach the home "
                                      "of the model state (INGRAIN_SHARED_STORE)"),
        # BentoML's bentoml_service_request_* for the requests its layers no longer see (HttpMetrics)
        http_requests=prom.Counter("ingrain_http_requests", "HTTP requests answered outside BentoML's layers "
                                   "(the front's lean path, the runner's calls)", ["service", "route", "code"]),
        http_seconds=prom.Histogram("ingrain_http_request_duration_seconds", "Their time, read to answered",
                                    ["service", "route"]),
        http_in_progress=prom.Gauge("ingrain_http_requests_in_progress", "Of them, in progress (as of the last "
                                    "flush)", ["service"], multiprocess_mode="livesum"),
    )


class Deferred:
    """Records kept in this process and handed to ``write`` at most once a ``FLUSH_S`` (a record
    after a quiet spell at once, the rest by a timer on the event loop): under load, a few
    Prometheus writes a second instead of several per request (each is a locked write to the
    multiprocess files). Nothing is dropped; ``flush`` writes what is left when a worker stops."""

    FLUSH_S = 1.0

    def __init__(self, write: Callable[[list[Any]], None]) -> None:
        self._write = write
        self._pending: list[Any] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushed_at = 0.0

    def add(self, record: Any) -> None:
        self._pending.append(record)
        if self._timer is not None:
            return
        wait = self._flushed_at + self.FLUSH_S - time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            wait = 0.0  # no loop to come back on
        if wait <= 0:
            self.flush()
        else:
            self._timer = loop.call_later(wait, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flushed_at = time.monotonic()
        pending, self._pending = self._pending, []
        self._write(pending)


class RequestMetrics:
    """What a front worker counts: each inference request by model and route (written once a
    second: ``Deferred``), and its runner calls."""

    def __init__(self) -> None:
        self.series = _series()
        self.requests = Deferred(self._write_requests)

    def record_request(self, model: str, route: str, ok: bool, seconds: float) -> None:
        self.requests.add((model, route, ok, seconds))

    def flush(self) -> None:
        self.requests.flush()

    def _write_requests(self, records: list[tuple[str, str, bool, float]]) -> None:
        counts: Counter[tuple[str, str, bool]] = Counter()
        for model, route, ok, seconds in records:
            counts[model, route, ok] += 1
            self.series.latency.labels(model, route).observe(seconds)
        for (model, route, ok), count in counts.items():
            self.series.requests.labels(model, route, "ok" if ok else "error").inc(count)

    def record_runner_retry(self) -> None:
        self.series.runner_retries.inc()

    def record_runner_unavailable(self) -> None:
        self.series.runner_unavailable.inc()

    def record_front_weights(self) -> None:
        """This worker loaded a model's weights: its weightless open failed (``Preprocessor.front_weights``)."""
        self.series.front_weights.inc()


class HttpMetrics:
    """BentoML's request series (count by status, time, in progress) for the requests answered
    before its layers (``front.fast_path.FastPath``, ``wire.RunnerGate``), as
    ``ingrain_http_*{service}``, written once a second (``Deferred``)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.in_progress = 0
        self.responses = Deferred(self._write)

    async def counted(self, route: str, answer: Callable[[], Awaitable[int]]) -> int:
        """Run ``answer`` (it answers one request of ``route`` and returns the status it sent) as
        one request in progress, then counted with its status and time (500 if it raised)."""
        started = time.perf_counter()
        self.in_progress += 1
        code = 500
        try:
            code = await answer()
        finally:
            self.in_progress -= 1
            self.responses.add((route, code, time.perf_counter() - started))
        return code

    def flush(self) -> None:
        self.responses.flush()

    def _write(self, records: list[tuple[str, int, float]]) -> None:
        series = _series()
        counts: Counter[tuple[str, int]] = Counter()
        for route, code, seconds in records:
            counts[route, code] += 1
            series.http_seconds.labels(self.service, route).observe(seconds)
        for (route, code), count in counts.items():
            series.http_requests.labels(self.service, route, str(code)).inc(count)
        series.http_in_progress.labels(self.service).set(self.in_progress)


class ModelMetrics:
    """What the runner counts per model: Ingrain's JSON statistics and the model series."""

    def __init__(self) -> None:
        self._stats: dict[str, _ModelStats] = {}
        self._reported: set[str] = set()
        self.series = _series()
        self.series.runner_starts.inc()
        self.forwards = Deferred(self._write_forwards)  # ~12 µs of writes a forward, once a second instead

    def _model(self, ref: ModelRef) -> _ModelStats:
        return self._stats.setdefault(ref.display_id, _ModelStats())

    def record_outcome(self, ref: ModelRef, ok: bool, seconds: float) -> None:
        """One request's part of a runner call (Ingrain's success/fail counts and time)."""
        stats = self._model(ref)
        (stats.success if ok else stats.fail).add(int(seconds * 1e9))
        if ok:
            stats.last_inference_ms = int(time.time() * 1000)

    def record_batch(self, ref: ModelRef, task: str, backend: str, batch: BatchStats) -> None:
        """One forward: Ingrain's statistics at once, the series by ``Deferred``."""
        size, ns = batch.items, batch.ns
        self.forwards.add((ref.display_id, task, backend, batch))
        stats = self._model(ref)
        stats.inference_count += size
        stats.execution_count += 1
        stats.compute_infer.add(ns)
        stats.batches.setdefault(size, _Duration()).add(ns)

    def flush(self) -> None:
        self.forwards.flush()

    def _write_forwards(self, records: list[tuple[str, str, str, BatchStats]]) -> None:
        by_model: dict[tuple[str, str, str], list[BatchStats]] = {}
        for model, task, backend, batch in records:
            by_model.setdefault((model, task, backend), []).append(batch)
        for (model, task, backend), batches in by_model.items():
            self.series.items.labels(model, task, backend).inc(sum(batch.items for batch in batches))
            sizes = self.series.batch_size.labels(model, task, backend)
            seconds = self.series.forward_seconds.labels(model, task, backend)
            for batch in batches:
                sizes.observe(batch.items)
                seconds.observe(batch.ns / 1e9)
            counted = [batch for batch in batches if batch.tokens is not None and batch.padded_tokens is not None]
            if counted:
                self.series.tokens.labels(model, task).inc(sum(batch.tokens or 0 for batch in counted))
                self.series.padded_tokens.labels(model, task).inc(sum(batch.padded_tokens or 0 for batch in counted))

    def record_resident(self, sizes: dict[str, int]) -> None:
        """Bytes per resident model; a model that left reads 0 (multiprocess mode cannot remove
        a label, and a stale value would count it as resident still)."""
        self.series.resident_models.set(len(sizes))
        for model in self._reported - sizes.keys():
            self.series.resident_bytes.labels(model).set(0)
        for model, size in sizes.items():
            self.series.resident_bytes.labels(model).set(size)
        self._reported = set(sizes)

    def record_sync(self, generation: int, failed: int) -> None:
        """A runner's sync step: the generation it reached, and how many desired models it could not load."""
        self.series.generation.set(generation)
        self.series.desired_failed.set(failed)

    def record_sync_unreachable(self) -> None:
        self.series.sync_unreachable.inc()

    def ingrain_json(self) -> dict[str, Any]:
        """Ingrain's ``{"modelStats": [...]}``: counts and ns as strings, as Ingrain sends them."""
        empty = _Duration().as_ingrain()
        model_stats = []
        for name, stats in sorted(self._stats.items()):
            model_stats.append({
                "name": name,
                "version": "1",
                "lastInference": str(stats.last_inference_ms),
                "inferenceCount": str(stats.inference_count),
                "executionCount": str(stats.execution_count),
                "inferenceStats": {
                    "success": stats.success.as_ingrain(), "fail": stats.fail.as_ingrain(),
                    "queue": empty, "compute_input": empty,
                    "compute_infer": stats.compute_infer.as_ingrain(), "compute_output": empty,
                },
                "batchStats": [
                    {"batchSize": str(size), "computeInput": empty, "computeInfer": duration.as_ingrain(),
                     "computeOutput": empty}
                    for size, duration in sorted(stats.batches.items())
                ],
            })
        return {"modelStats": model_stats}


class MetricsFormatMiddleware:
    """``GET /metrics`` without a Prometheus ``Accept`` goes to the Ingrain JSON route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            accept = dict(scope["headers"]).get(b"accept", b"")
            if not any(kind in accept for kind in PROMETHEUS_ACCEPT):
                scope = {**scope, "path": JSON_METRICS_PATH, "raw_path": JSON_METRICS_PATH.encode()}
        await self.app(scope, receive, send)
