"""``RemoteEngine``: the ``Engine`` of a runner in another process, over ``wire``.

- **Calls.** Each ``Engine`` method is one ``wire`` call; an error reply is raised here as the
  same ``IngrainError`` class the runner raised.
- **Coalescing.** Per (model, task, store entry), a front worker keeps one ``infer`` call in
  flight; requests that arrive meanwhile queue and go together in the next call (a ``Batcher``
  whose items are requests). The runner merges the calls of every front worker into its
  forwards, and a call's cost is paid per batch, not per request. With ``INGRAIN_RUNNERS`` > 1
  there is one such lane per runner, and requests take the lanes in turn: up to that many calls
  in flight, lane *n* on runner *n*'s own socket (``frame_socket``); over HTTP, each on its own
  connection, which the runners' shared socket hands to whichever runner accepts it first (the
  least busy, as a rule): inference spreads over the runners.
- **Faults.** The runner is *down* only when it does not answer at all: a connection error on a
  call, or two missed liveness probes (``/livez``, a heartbeat every 2 s). A runner that answers
  but is still restoring its models is up: it answers management at once and each model as soon
  as it is resident. After a connection error an idempotent call is sent again if the runner
  answers its probe (once per runner worker: with ``INGRAIN_RUNNERS`` > 1 a runner that died
  mid-call has the call retried on another); any other call answers 503 with ``Retry-After``. While down, every call
  (those in flight included) fails fast with that 503 (after a 0.2 s probe, which lets a runner
  that answers again serve at once) until the runner answers again. Never a hang, never a reset
  connection.
- **Stopping.** A runner that refuses connections (after SIGTERM it stops listening, then
  finishes the calls it has) is down too, but its calls in flight are left to finish: they get
  their rows, or fail on their own if the runner is gone. Only a silent runner's are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from ingrain_bento.batching import Batcher
from ingrain_bento.boundary import InferReply, LoadResult, ModelHandle, ServedModel
from ingrain_bento.errors import IngrainError, RunnerUnavailable, UpstreamTimeout, from_reply
from ingrain_bento.metrics import RequestMetrics
from ingrain_bento.refs import ModelRef
from ingrain_bento.schemas import CustomModelRequest, ModelInfo, ModelRequest
from ingrain_bento.wire import CALLS, RUNNER_TOKEN_ENV, RunnerTransport, TransportError

__all__ = ["RemoteEngine"]

log = logging.getLogger("ingrain_bento.front.runner")

HEARTBEAT_S = 2.0  # how often a front checks that the runner answers
PROBE_TIMEOUT_S = 2.0
# While down: a call first asks the runner this briefly (a 503 stays fast; a runner that answers
# again is used at once, not at the next heartbeat), and the watch asks this often.
DOWN_PROBE_S = 0.2
MISSES_BEFORE_DOWN = 2  # a runner busy in a long forward may miss one probe; two in a row: gone
RETRY_AFTER_S = 2

CoalesceKey = tuple[ModelRef, str, str]
Outcome = tuple[Any, int]  # (rows or IngrainError, state version)


class RemoteEngine:
    def __init__(self, transport: RunnerTransport, *, max_requests_per_call: int,
                 metrics: RequestMetrics | None = None, runners: int = 1) -> None:
        """``runners``: the runner workers behind the address (``INGRAIN_RUNNERS``); an idempotent
        call is sent again up to that many times after a dropped connection, each time on a new
        connection, which the runners' shared socket may hand to another runner (a dead runner's own
        socket refuses it: ``frame_socket.SocketTransport`` sends it over HTTP)."""
        self.transport = transport
        self.attempts = runners + 1
        self.max_requests_per_call = max_requests_per_call
        self.metrics = metrics
        self.lanes = runners
        self._coalescers: dict[tuple[CoalesceKey, int], Batcher[Any]] = {}
        self._turn = 0
        self._up = asyncio.Event()
        self._up.set()
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._watch: asyncio.Task[None] | None = None

    @property
    def is_down(self) -> bool:
        return not self._up.is_set()

    # ---- the Engine's calls -----------------------------------------------------------------

    async def load(self, request: ModelRequest, library: str | None = None) -> LoadResult:
        return await self._invoke("load", request=request, library=library)

    async def unload(self, request: ModelRequest) -> str:
        return await self._invoke("unload", request=request)

    async def delete(self, request: ModelRequest) -> str:
        return await self._invoke("delete", request=request)

    async def download_custom(self, request: CustomModelRequest) -> str:
        return await self._invoke("download_custom", request=request)

    async def loaded_models(self) -> list[ModelInfo]:
        return await self._invoke("loaded_models")

    async def repository_models(self) -> list[ModelInfo]:
        return await self._invoke("repository_models")

    async def served_models(self) -> list[ServedModel]:
        return await self._invoke("served_models")

    async def describe(self, name: str, pretrained: str | bool | None = None,
                       library: str | None = None) -> ModelHandle:
        return await self._invoke("describe", name=name, pretrained=pretrained,
                                  library=library)

    async def embedding_size(self, name: str, pretrained: str | None = None) -> int:
        return await self._invoke("embedding_size", name=name, pretrained=pretrained)

    async def classification_labels(self, name: str, pretrained: str | None = None) -> list[str]:
        return await self._invoke("classification_labels", name=name,
                                  pretrained=pretrained)

    async def ingrain_metrics(self) -> dict[str, Any]:
        return await self._invoke("ingrain_metrics")

    async def infer(self, ref: ModelRef, task: str, tag: str, requests: Sequence[Sequence[Any]]) -> InferReply:
        """Each request joins the next call for its model (see Coalescing above)."""
        self._turn = (self._turn + 1) % self.lanes
        coalescer = self._coalescer(((ref, task, tag), self._turn))
        # queued as futures, gathered without a task apiece
        outcomes: list[list[Outcome]] = await asyncio.gather(*(coalescer.enqueue([items]) for items in requests))
        return InferReply([outcome[0][0] for outcome in outcomes], max(outcome[0][1] for outcome in outcomes))

    def _coalescer(self, key: tuple[CoalesceKey, int]) -> Batcher[Any]:
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            (ref, task, tag), lane = key

            async def one_call(requests: Sequence[Sequence[Any]]) -> list[Outcome]:
                reply: InferReply = await self._invoke("infer", lane=lane, ref=ref, task=task, tag=tag,
                                                       requests=requests)
                return [(result, reply.version) for result in reply.results]

            coalescer = self._coalescers[key] = Batcher(one_call, max_batch=self.max_requests_per_call,
                                                        max_wait_s=0.0, isolate_failures=False)
        return coalescer

    async def forget(self) -> None:
        """Drop the coalescers (their queued requests finish first)."""
        coalescers, self._coalescers = self._coalescers, {}
        await asyncio.gather(*(c.close() for c in coalescers.values()))

    # ---- one call, and what a failed connection means ------------------------------------------

    async def _invoke(self, method: str, /, lane: int = 0, **arguments: Any) -> Any:
        """One call of ``method`` (on runner ``lane``'s own socket where there is one: see
        ``frame_socket``), sent again after a dropped connection when that is safe."""
        codec = CALLS[method]
        body = codec.encode_args(arguments)
        self._start_watch()
        for attempt in range(1, self.attempts + 1):
            await self._ensure_up()
            try:
                reply = await self._send(method, body, lane)
            except TimeoutError:
                raise UpstreamTimeout(f"The model runner did not answer {method} in time.") from None
            except TransportError as exc:
                probe = await self.transport.probe(timeout_s=PROBE_TIMEOUT_S)
                alive = probe == "answers"
                if alive and attempt < self.attempts and codec.idempotent:
                    log.info("runner.retry method=%s after %s", method, exc)
                    if self.metrics is not None:
                        self.metrics.record_runner_retry()
                    continue
                if not alive:
                    self._mark_down(f"{exc} on {method}", cancel_in_flight=probe == "silent")
                raise self._unavailable() from None
            if reply.status == 200:
                return codec.decode_result(reply.body)
            raise self._error(method, reply.status, reply.body)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send(self, method: str, body: bytes, lane: int) -> Any:
        """One call, failed at once when the runner is marked down meanwhile (``_mark_down``
        cancels the calls in flight)."""
        call = asyncio.ensure_future(self.transport.post(method, body, lane))
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
    def _error(method: str, status: int, body: bytes) -> IngrainError:
        import json

        if status == 401:
            log.error("runner.refused method=%s: the runner has another %s", method, RUNNER_TOKEN_ENV)
            return IngrainError(f"The model runner refused this front's {RUNNER_TOKEN_ENV}: set the same secret on "
                                "both services.")
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and "error" in reply:
            return from_reply(reply)
        log.error("runner.error method=%s status=%d reply=%s", method, status, body[:500])
        return IngrainError(f"The model runner failed on {method}; this is a bug, please report it with the request "
                            "that caused it.")

    # ---- does the runner answer? ----------------------------------------------------------------

    async def _ensure_up(self) -> None:
        if self.is_down:
            if await self.transport.probe(timeout_s=DOWN_PROBE_S) != "answers":
                raise self._unavailable()
            self._mark_up()

    def _unavailable(self) -> RunnerUnavailable:
        if self.metrics is not None:
            self.metrics.record_runner_unavailable()
        return RunnerUnavailable("The model runner does not answer (it is restarting): send the request again "
                                 "shortly.", RETRY_AFTER_S)

    async def wait_ready(self) -> None:
        """Until the runner is ready (done restoring and preloading): its ``/readyz``."""
        while not await self.transport.answers("/readyz", timeout_s=PROBE_TIMEOUT_S):
            await asyncio.sleep(0.5)

    def _mark_down(self, why: str, *, cancel_in_flight: bool = True) -> None:
        if not self.is_down:
            log.warning("runner.down %s: answering 503 until it answers again", why)
            self._up.clear()
            for call in self._in_flight if cancel_in_flight else ():
                call.cancel()

    def _mark_up(self) -> None:
        if self.is_down:
            log.info("runner.up")
            self._up.set()

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_runner())

    async def _watch_runner(self) -> None:
        """Heartbeat while up (two misses in a row: down), a quick probe loop while down."""
        misses = 0
        while True:
            await asyncio.sleep(HEARTBEAT_S if not self.is_down else DOWN_PROBE_S)
            started = time.monotonic()
            probe = await self.transport.probe(timeout_s=PROBE_TIMEOUT_S if not self.is_down else DOWN_PROBE_S)
            if probe == "answers":
                misses = 0
                self._mark_up()
                continue
            misses += 1
            if misses >= MISSES_BEFORE_DOWN:
                self._mark_down(f"/livez {probe} after {time.monotonic() - started:.1f} s, twice",
                                cancel_in_flight=probe == "silent")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.forget()
        await self.transport.close()
