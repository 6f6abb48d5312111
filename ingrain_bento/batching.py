"""Dynamic batching: many small concurrent requests become few large calls.

The runner batches forwards per (model, task) with it (``ModelPool.batcher``); the front
batches tokenization on its tokenizer thread and coalesces its requests into runner calls
(``RunnerClient``) with the same class.

A ``Batcher`` serves one (model, task) pair. ``submit(items)`` splits a request into
chunks of at most ``max_batch`` items, queues them, and returns the rows in input order.
One collector task per batcher takes the queued chunks, waits for more while the batch is
not full and its oldest chunk has waited less than ``max_wait_s``, runs one forward (an
async callable; ``in_executor`` puts a blocking one on a thread) and hands each caller its
rows. One forward is in flight at a time; what arrives meanwhile forms the next batch. The
wait counts from the oldest chunk's arrival (as Triton's queue delay does): chunks that
queued up during the previous forward have waited already, so the next forward starts at
once. If a merged forward fails, each chunk is retried alone (``isolate_failures``), so one
bad request never fails its batch neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from ingrain_bento.errors import AtCapacity

log = logging.getLogger("ingrain_bento.batching")

__all__ = ["Batcher", "BatcherClosed", "call_guarded", "in_executor"]


class BatcherClosed(AtCapacity):
    """A submit after ``close()``: the model was unloaded while the request waited."""

Item = TypeVar("Item")
Forward = Callable[[Sequence[Any]], Awaitable[Any]]  # items -> one row per item (an array, or a list)


def call_guarded(function: Callable[[Sequence[Any]], Any], items: Sequence[Any]) -> Any:
    """``function(items)``, with a Rust extension's panic (``PanicException``, not an
    ``Exception``) raised as a ``RuntimeError`` that the callers' error handling knows."""
    try:
        return function(items)
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


def in_executor(function: Callable[[Sequence[Any]], Any], executor: Executor) -> Forward:
    """A blocking forward, run on ``executor`` so the event loop keeps serving meanwhile."""

    async def forward(items: Sequence[Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, partial(call_guarded, function, items))

    return forward


@dataclass
class _Chunk(Generic[Item]):
    items: Sequence[Item]
    queued_at: float = field(default_factory=time.monotonic)
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _fail(chunks: list[_Chunk[Any]], exc: BaseException) -> None:
    for chunk in chunks:
        if not chunk.future.done():
            chunk.future.set_exception(exc)


class Batcher(Generic[Item]):
    def __init__(self, forward: Forward, *, max_batch: int, max_wait_s: float, merge: bool = True,
                 isolate_failures: bool = True, on_batch: Callable[[int, int], None] | None = None) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.merge = merge
        self.isolate_failures = isolate_failures
        self.on_batch = on_batch  # (items, forward ns) after each forward: the metrics hook
        self._pending: deque[_Chunk[Item]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._busy = False  # a batch is being gathered or run
        self._last_arrival = 0.0
        self._arrival_gap = float("inf")  # moving average of the time between submits

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch gathering or running: a request sent now would be a
        batch of its own."""
        return not self._busy and not self._pending

    async def submit(self, items: Sequence[Item]) -> Any:
        """Rows for ``items``, in order, concatenated across chunks (an array, or a list when the
        forward returns lists, as tokenization does)."""
        import numpy as np

        if self._closed:
            raise BatcherClosed("The model was unloaded while this request waited: send it again.")
        if self._task is None:
            self._task = asyncio.create_task(self._collect())
        now = time.monotonic()
        if self._last_arrival:
            gap = now - self._last_arrival
            self._arrival_gap = gap if self._arrival_gap == float("inf") else 0.8 * self._arrival_gap + 0.2 * gap
        self._last_arrival = now
        chunks = [_Chunk(items[i:i + self.max_batch]) for i in range(0, len(items), self.max_batch)]
        self._pending.extend(chunks)
        self._wakeup.set()
        rows = await asyncio.gather(*(chunk.future for chunk in chunks))
        if len(rows) == 1:
            return rows[0]
        return np.concatenate(rows) if isinstance(rows[0], np.ndarray) else [row for part in rows for row in part]

    async def _wait_for_more(self, timeout: float) -> bool:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _collect(self) -> None:
        try:
            await self._collect_forever()
        except BaseException as exc:
            # Never leave a caller waiting on a dead collector: fail what is queued, and let
            # the next submit start a fresh collector.
            _fail(list(self._pending), exc if isinstance(exc, Exception) else BatcherClosed("The batcher stopped."))
            self._pending.clear()
            self._task = None
            raise

    async def _collect_forever(self) -> None:
        while True:
            while not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            self._busy = True
            try:
                await self._gather_and_run()
            finally:
                self._busy = False

    async def _gather_and_run(self) -> None:
        """One batch: the oldest chunk, and what joins it within the wait window."""
        batch = [self._pending.popleft()]
        size = len(batch[0].items)
        # Wait for company only while requests arrive faster than the wait window: a lone
        # client gets its forward at once instead of paying max_wait on every call.
        under_load = self._arrival_gap < self.max_wait_s
        deadline = batch[0].queued_at + (self.max_wait_s if under_load else 0.0)
        while self.merge and size < self.max_batch:
            if self._pending:
                if size + len(self._pending[0].items) > self.max_batch:
                    break
                batch.append(self._pending.popleft())
                size += len(batch[-1].items)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed or not await self._wait_for_more(remaining):
                break
        await self._run(batch)

    async def _run(self, batch: list[_Chunk[Item]]) -> None:
        items = [item for chunk in batch for item in chunk.items]
        started = time.perf_counter_ns()
        try:
            rows = await self.forward(items)
            if len(rows) != len(items):
                raise RuntimeError(f"forward returned {len(rows)} rows for {len(items)} items")
        except Exception as exc:
            if len(batch) == 1 or not self.isolate_failures:
                _fail(batch, exc)
                return
            for chunk in batch:  # isolate the failing request from its neighbours
                await self._run([chunk])
            return
        elapsed = time.perf_counter_ns() - started
        offset = 0
        for chunk in batch:
            if not chunk.future.done():
                chunk.future.set_result(rows[offset:offset + len(chunk.items)])
            offset += len(chunk.items)
        if self.on_batch is not None:
            try:
                self.on_batch(len(items), elapsed)
            except Exception:
                log.exception("batch metrics callback failed")

    async def close(self) -> None:
        """Finish every queued request, then stop; later submits get a 503."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
