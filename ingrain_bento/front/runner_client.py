"""The front's one way to the runner: coalesced inference calls, errors, and a runner that died.

- **Coalescing.** Per (model, task, store entry), a front worker keeps one inference call in
  flight; requests that arrive meanwhile queue and go together in the next call (a
  ``Batcher`` whose items are requests). The runner then merges the calls of every front
  worker into its forwards, and the cost of a call (~1 ms of CPU on each side) is paid per
  batch, not per request.
- **Errors.** A runner reply that is an error is raised here as the same ``IngrainError``.
- **Faults.** A connection error means a runner that died (or a stale keep-alive connection):
  an idempotent call is sent once more if the runner still answers its readiness probe, any
  other call answers 503 with ``Retry-After``. A runner that does not answer is marked down:
  every call fails fast with that 503 (calls in flight included) until a probe finds it
  ready again, restarted by BentoML with its models restored. A heartbeat probe also notices
  a runner that died while idle. Never a hang, never a reset connection.

In-process (``Service.to_asgi()``, tests) the runner is a plain object: its methods are
called directly and return an error as a response object, which is raised the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ingrain_bento.batching import Batcher
from ingrain_bento.errors import IngrainError, RunnerUnavailable, UpstreamTimeout, from_reply
from ingrain_bento.metrics import RequestMetrics
from ingrain_bento.wire import ModelHandle, RowsReply, pack, split_reply

__all__ = ["RunnerClient"]

log = logging.getLogger("ingrain_bento.front.runner")

HEARTBEAT_S = 2.0  # how often an idle front checks that the runner is there
PROBE_TIMEOUT_S = 2.0
MISSES_BEFORE_DOWN = 2  # a busy runner may miss one probe; two in a row mean it is gone
RETRY_AFTER_S = 2


def _connection_errors() -> tuple[type[BaseException], ...]:
    import aiohttp

    return (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)


def _probe_errors() -> tuple[type[BaseException], ...]:
    return (asyncio.TimeoutError, *_connection_errors())


class RunnerClient:
    def __init__(self, runner: Any, *, max_requests_per_call: int, metrics: RequestMetrics | None = None) -> None:
        self.runner = runner
        self.remote = hasattr(runner, "is_ready")  # a BentoML RemoteProxy, not the in-process object
        self.max_requests_per_call = max_requests_per_call
        self.metrics = metrics
        self.version: int | None = None  # the runner's model-state version, as last seen
        self._coalescers: dict[tuple[Any, str, str], Batcher[Any]] = {}
        self._up = asyncio.Event()
        self._up.set()
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._watch: asyncio.Task[None] | None = None

    @property
    def is_down(self) -> bool:
        return not self._up.is_set()

    # ---- calls ---------------------------------------------------------------------------

    async def call(self, method: str, /, *, idempotent: bool = True, **arguments: Any) -> Any:
        """``runner.<method>(**arguments)``; its error replies raised as ``IngrainError``."""
        from bentoml.exceptions import BentoMLException

        self._start_watch()
        for attempt in (1, 2):
            self._check_up()
            try:
                return self._unwrap(await self._send(method, arguments))
            except BentoMLException as exc:  # a remote runner's error reply
                raise _runner_error(method, exc) from None
            except TimeoutError:
                raise UpstreamTimeout(f"The model runner did not answer {method} in time.") from None
            except _connection_errors() as exc:
                alive = await self._ready()
                if alive and attempt == 1 and idempotent:
                    log.info("runner.retry method=%s after %s", method, type(exc).__name__)
                    if self.metrics is not None:
                        self.metrics.record_runner_retry()
                    continue
                if not alive:
                    self._mark_down(f"{type(exc).__name__} on {method}")
                raise self._unavailable() from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _send(self, method: str, arguments: dict[str, Any]) -> Any:
        """One call, failed at once when the runner is marked down meanwhile (``_mark_down``
        cancels the calls in flight)."""
        if not self.remote:
            return await getattr(self.runner, method)(**arguments)
        call = asyncio.ensure_future(getattr(self.runner, method)(**arguments))
        self._in_flight.add(call)
        try:
            return await call
        except asyncio.CancelledError:
            if call.cancelled() and self.is_down:
                raise self._unavailable() from None
            raise
        finally:
            self._in_flight.discard(call)

    @staticmethod
    def _unwrap(result: Any) -> Any:
        from starlette.responses import Response

        if isinstance(result, Response):  # in-process: the runner's error reply
            raise from_reply(json.loads(bytes(result.body)))
        return result

    # ---- inference -----------------------------------------------------------------------

    async def infer(self, handle: ModelHandle, task: str, items: Sequence[Any]) -> Any:
        """The rows of one request's items, sent with whatever else is queued for that model."""
        key = (handle.ref, task, handle.tag)
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            async def forward(requests: Sequence[Sequence[Any]]) -> list[Any]:
                reply: RowsReply = await self.call("infer", model=asdict(handle.ref), task=task, tag=handle.tag,
                                                   payload=pack(requests))
                self.version = reply["version"]
                return split_reply(reply, [len(request) for request in requests])

            coalescer = Batcher(forward, max_batch=self.max_requests_per_call, max_wait_s=0.0,
                                isolate_failures=False)
            self._coalescers[key] = coalescer
        result = (await coalescer.submit([items]))[0]
        if isinstance(result, IngrainError):
            raise result
        return result

    async def forget(self) -> None:
        """Drop the coalescers (their queued requests finish first)."""
        coalescers, self._coalescers = self._coalescers, {}
        await asyncio.gather(*(c.close() for c in coalescers.values()))

    # ---- is the runner there? ------------------------------------------------------------

    def _check_up(self) -> None:
        if self.is_down:
            raise self._unavailable()

    def _unavailable(self) -> RunnerUnavailable:
        if self.metrics is not None:
            self.metrics.record_runner_unavailable()
        return RunnerUnavailable("The model runner is restarting: send the request again shortly.", RETRY_AFTER_S)

    async def _ready(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        try:
            return bool(await asyncio.wait_for(self.runner.is_ready(timeout=int(timeout)), timeout))
        except _probe_errors():
            return False

    async def wait_ready(self) -> None:
        """Until the runner answers its readiness probe (done restoring and preloading)."""
        while self.remote and not await self._ready():
            await asyncio.sleep(0.5)

    def _mark_down(self, why: str) -> None:
        if not self.is_down:
            log.warning("runner.down %s: answering 503 until it is ready again", why)
            self._up.clear()
            for call in self._in_flight:
                call.cancel()

    def _mark_up(self) -> None:
        if self.is_down:
            log.info("runner.up")
            self._up.set()

    def _start_watch(self) -> None:
        if self.remote and self._watch is None:
            self._watch = asyncio.create_task(self._watch_runner())

    async def _watch_runner(self) -> None:
        """Heartbeat while up (two misses in a row: down), a quick probe loop while down."""
        misses = 0
        while True:
            await asyncio.sleep(HEARTBEAT_S if not self.is_down else 0.5)
            started = time.monotonic()
            if await self._ready():
                misses = 0
                self._mark_up()
                continue
            misses += 1
            if misses >= MISSES_BEFORE_DOWN:
                self._mark_down(f"no readiness answer for {time.monotonic() - started:.1f} s, twice")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.forget()


def _runner_error(method: str, exc: Exception) -> IngrainError:
    """The ``IngrainError`` a remote runner replied with (BentoML raises it as its own exception,
    the reply body as its message); a reply of another shape is a bug in the runner."""
    try:
        reply = json.loads(str(exc))
    except ValueError:
        reply = None
    if isinstance(reply, dict) and "message" in reply:
        return from_reply(reply)
    log.error("runner.error method=%s reply=%s", method, str(exc)[:500])
    return IngrainError(f"The model runner failed on {method}; this is a bug, please report it with the request "
                        "that caused it.")
