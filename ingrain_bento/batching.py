"""Dynamic batching: many small concurrent requests become few large calls.

The runner batches forwards per (model, task) with it (``ModelPool.batcher``); the front
batches tokenization on its tokenizer thread (``InputPreparer.texts``) and coalesces its
requests into runner calls (``RemoteEngine``'s per-model call queues) with the same class.

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

``TokenBudgetBatcher`` forms forwards of texts by their padded tokens instead (a forward costs
what its longest text times its item count costs, and a token of a long text more than one of a
short text): the items queued within the window are sorted by length and a forward takes the
oldest item and the neighbours of similar length that make it cheapest per unit of real work
(``ForwardCost``, learned from the forwards run), up to ``max_batch`` items and ``items x longest
<= max_tokens``. The neighbours come from the oldest queued items, 1.5 budgets' tokens of them
(the forward's reach), and the oldest item is in every forward, so none waits longer than the
queue ahead of it and a bounded amount of newer work, however long it is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, NamedTuple, TypeVar

from ingrain_bento.boundary import join_rows
from ingrain_bento.errors import AtCapacity

log = logging.getLogger("ingrain_bento.batching")

__all__ = ["BatchStats", "Batcher", "BatcherClosed", "ForwardCost", "OneThread", "TokenBudgetBatcher",
           "call_guarded", "in_executor"]


class BatcherClosed(AtCapacity):
    """A submit after ``close()``: the model was unloaded while the request waited."""

Item = TypeVar("Item")
Unit = TypeVar("Unit")  # what a forward answers: a _Chunk (Batcher) or a _Slot (TokenBudgetBatcher)
Forward = Callable[[Sequence[Any]], Awaitable[Any]]  # items -> one row per item (an array, or a list)


class BatchStats(NamedTuple):
    """One forward, for the metrics hook: its items, its time, and (for texts) its real and
    padded tokens (padded: items x the longest)."""

    items: int
    ns: int
    tokens: int | None = None
    padded_tokens: int | None = None


def call_guarded(function: Callable[[Sequence[Any]], Any], items: Sequence[Any]) -> Any:
    """``function(items)``, with a Rust extension's panic (``PanicException``, not an
    ``Exception``) raised as a ``RuntimeError`` that the callers' error handling knows."""
    try:
        return function(items)
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


def in_executor(function: Callable[[Sequence[Any]], Any], thread: OneThread) -> Forward:
    """A blocking forward, run on ``thread`` so the event loop keeps serving meanwhile."""

    async def forward(items: Sequence[Any]) -> Any:
        return await thread.run(call_guarded, function, items)

    return forward


class OneThread(Executor):
    """One worker thread that runs what it is given in order: a device's forwards, one at a time,
    or a worker's tokenizations.

    ``run`` is the event loop's way in: the result comes back on an asyncio future settled by
    ``call_soon_threadsafe``. ``loop.run_in_executor`` would make a ``concurrent.futures.Future``
    as well and chain the two; on uvloop that costs the loop ~35 µs of CPU a call against ~20
    (``ThreadPoolExecutor`` has no such path). ``submit`` serves everything else, in the same
    order. The thread is a daemon: it starts at the first call, and ``shutdown`` ends it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._shut = False

    def run(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``function(*args)`` on the thread; its result (or exception) on the returned future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put(partial(function, *args), (loop, future))
        return future

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._put(partial(fn, *args, **kwargs), future)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more calls; the thread ends after those queued (``cancel_futures`` is not supported:
        a forward already queued has callers waiting for it)."""
        with self._start_lock:
            self._shut = True
            thread = self._thread
            if thread is not None:
                self._jobs.put(None)
        if thread is not None and wait:
            thread.join()

    def _put(self, call: Callable[[], Any], answer: Any) -> None:
        with self._start_lock:  # a call is queued before shutdown's end mark, or refused
            if self._shut:
                raise RuntimeError(f"{self.name} is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put((call, answer))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            _answer(*job)
            del job  # a forward's inputs, not held while the thread waits for the next


def _answer(call: Callable[[], Any], answer: Any) -> None:
    """Run one call of ``OneThread`` and hand its outcome to whoever waits: a concurrent future,
    or (loop, asyncio future)."""
    if isinstance(answer, concurrent.futures.Future):
        if answer.set_running_or_notify_cancel():
            try:
                answer.set_result(call())
            except BaseException as exc:
                answer.set_exception(exc)
        return
    loop, future = answer
    result: Any = None
    error: BaseException | None = None
    try:
        result = call()
    except BaseException as exc:
        error = exc
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # the loop closed while the call ran: nobody is waiting
        pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


@dataclass
class _Chunk(Generic[Item]):
    items: Sequence[Item]
    queued_at: float = field(default_factory=time.monotonic)
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


async def _joined(parts: Sequence[asyncio.Future[Any]]) -> Any:
    """The rows of a request's chunks as one: an array, or a list when the forward returns lists."""
    import numpy as np

    rows = await asyncio.gather(*parts)
    return join_rows(rows) if isinstance(rows[0], np.ndarray) else [row for part in rows for row in part]


def _fail(waiting: Sequence[Any], exc: BaseException) -> None:
    """Fail every chunk (or slot) in ``waiting`` that is not answered yet."""
    for entry in waiting:
        if not entry.future.done():
            entry.future.set_exception(exc)


class Batcher(Generic[Item]):
    def __init__(self, forward: Forward, *, max_batch: int, max_wait_s: float, merge: bool = True,
                 isolate_failures: bool = True, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.merge = merge
        self.isolate_failures = isolate_failures
        self.on_batch = on_batch  # after each forward: the metrics hook
        self._pending: deque[Any] = deque()  # _Chunk here, _Slot in TokenBudgetBatcher
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._busy = False  # a batch is being gathered or run
        self._last_arrival = 0.0
        self._arrival_gap = float("inf")  # moving average of the time between submits
        self._overlap = 0.0  # moving average of whether a submit found work queued or running

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch gathering or running: a request sent now would be a
        batch of its own."""
        return not self._busy and not self._pending

    async def submit(self, items: Sequence[Item]) -> Any:
        """Rows for ``items``, in order, concatenated across chunks (an array, or a list when the
        forward returns lists, as tokenization does)."""
        return await self.enqueue(items)

    def enqueue(self, items: Sequence[Item]) -> asyncio.Future[Any]:
        """Queue ``items`` now; the future gives what ``submit`` returns. A caller with several
        requests queues them all, then awaits each, without a task apiece."""
        self._admit()
        chunks = [_Chunk(items[i:i + self.max_batch]) for i in range(0, len(items), self.max_batch)]
        self._pending.extend(chunks)
        self._wakeup.set()
        if len(chunks) == 1:  # most requests: their one chunk, without a gathering future
            return chunks[0].future
        return asyncio.ensure_future(_joined([chunk.future for chunk in chunks]))

    def _admit(self) -> None:
        """A submit's first step: refused once closed; starts the collector; notes the arrival."""
        if self._closed:
            raise BatcherClosed("The model was unloaded while this request waited: send it again.")
        if self._task is None:
            self._task = asyncio.create_task(self._collect())
        self._note_arrival()

    def _note_arrival(self) -> None:
        """Track the moving averages of the time between submits and of whether they overlap
        (see ``under_load``)."""
        now = time.monotonic()
        if self._last_arrival:
            gap = now - self._last_arrival
            self._arrival_gap = gap if self._arrival_gap == float("inf") else 0.8 * self._arrival_gap + 0.2 * gap
        self._last_arrival = now
        self._overlap = 0.8 * self._overlap + (0.2 if self._busy or self._pending else 0.0)

    @property
    def under_load(self) -> bool:
        """Whether a forward should wait the window for company: submits arrive faster than the
        window, and mostly while others are queued or running. A lone client's submits never
        overlap, however fast its round trip (one shorter than the window would otherwise pay the
        wait on every call, for company that never comes)."""
        return self._arrival_gap < self.max_wait_s and self._overlap > 0.5

    async def _forward_checked(self, items: Sequence[Any]) -> Any:
        rows = await self.forward(items)
        if len(rows) != len(items):
            raise RuntimeError(f"forward returned {len(rows)} rows for {len(items)} items")
        return rows

    async def _forward_or_isolate(self, waiting: Sequence[Unit], items: Sequence[Any],
                                  alone: Callable[[list[Unit]], Awaitable[None]]) -> tuple[Any, int] | None:
        """The forward of ``items`` (those of ``waiting``, chunks or slots) and its nanoseconds; or,
        when it fails, None once each of ``waiting`` is run ``alone`` (``isolate_failures``: one bad
        request does not fail its neighbours) or failed."""
        started = time.perf_counter_ns()
        try:
            rows = await self._forward_checked(items)
        except Exception as exc:
            if len(waiting) == 1 or not self.isolate_failures:
                _fail(waiting, exc)
                return None
            for unit in waiting:
                await alone([unit])
            return None
        return rows, time.perf_counter_ns() - started

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
        # Wait for company only under load: a lone client gets its forward at once instead of
        # paying max_wait on every call.
        deadline = batch[0].queued_at + (self.max_wait_s if self.under_load else 0.0)
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
        if (done := await self._forward_or_isolate(batch, items, self._run)) is None:
            return
        rows, elapsed = done
        offset = 0
        for chunk in batch:
            if not chunk.future.done():
                chunk.future.set_result(rows[offset:offset + len(chunk.items)])
            offset += len(chunk.items)
        self._report(BatchStats(len(items), elapsed))

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(stats)
            except Exception:
                log.exception("batch metrics callback failed")

    async def close(self) -> None:
        """Finish every queued request, then stop; later submits get a 503."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task


# ---- forwards sized by padded tokens ---------------------------------------------------------

class ForwardCost:
    """What a forward costs, learned from the forwards run: seconds ~ a + b x padded tokens + e x
    padded tokens x longest, fit by least squares over the recent forwards (each weighs ``DECAY``
    less per later one). The last term is attention's: a token of a text of L tokens costs more
    the longer L is (all-MiniLM-L6-v2, ONNX Runtime, 2 cores: ~1.5x more at 256 tokens than at
    16). Without it a fit over short and long forwards reads the long ones' higher cost per token
    as a negative fixed cost, and every forward whose padding is not free is split: over forwards
    of up to 2,048 tokens there, -14 tokens without it, +19 with it (the ~2.3 ms a forward costs).
    Forwards much larger than the CPU's cache cost more per token again, which no term here
    models: on a CPU the default token budget keeps them small (``ModelPool.max_batch_tokens``).

    ``overhead_tokens`` = a / b is the fixed cost of one forward in short tokens' worth: a few
    dozen on a CPU (small forwards cost little more per token), thousands on a GPU (fill the
    forward). ``length_weight`` = e / b: a token of a text of L tokens costs 1 + L x length_weight
    short tokens. Both hold their priors until the forwards seen vary enough to fit them."""

    DECAY = 0.97
    PRIOR_TOKENS = 64.0  # until the fit has seen forwards of different sizes
    MAX_LENGTH_WEIGHT = 1 / 16  # a fit that reads more is noise: a token at 256 would cost 17 short ones

    def __init__(self) -> None:
        # Decayed sums over the forwards: count, x = padded tokens, z = padded tokens x longest, y = seconds.
        self._n = self._x = self._z = self._y = 0.0
        self._xx = self._xz = self._zz = self._xy = self._zy = 0.0
        self.overhead_tokens = self.PRIOR_TOKENS
        self.length_weight = 0.0

    def observe(self, padded_tokens: int, seconds: float, longest: int = 0) -> None:
        """One forward: its padded tokens (items x ``longest``), its seconds."""
        d = self.DECAY
        x, z = float(padded_tokens), float(padded_tokens) * longest
        self._n, self._x, self._z, self._y = d * self._n + 1, d * self._x + x, d * self._z + z, d * self._y + seconds
        self._xx, self._xz, self._zz = d * self._xx + x * x, d * self._xz + x * z, d * self._zz + z * z
        self._xy, self._zy = d * self._xy + x * seconds, d * self._zy + z * seconds
        self.overhead_tokens, self.length_weight = self._fit()

    def _fit(self) -> tuple[float, float]:
        """(a / b, e / b) of the least-squares fit; without the length term when the forwards seen
        do not tell it apart (one length only) or it comes out negative; the priors when even that
        cannot be fit (too few forwards, one size only, a cost that falls with size)."""
        n = self._n
        if n < 4:
            return self.PRIOR_TOKENS, 0.0
        mx, mz, my = self._x / n, self._z / n, self._y / n
        cxx, cxz, czz = self._xx - n * mx * mx, self._xz - n * mx * mz, self._zz - n * mz * mz
        cxy, czy = self._xy - n * mx * my, self._zy - n * mz * my
        det = cxx * czz - cxz * cxz
        if n >= 6 and det > 1e-6 * cxx * czz > 0:
            b, e = (czz * cxy - cxz * czy) / det, (cxx * czy - cxz * cxy) / det
            if b > 0 and e >= 0:
                return self._bounded((my - b * mx - e * mz) / b), min(self.MAX_LENGTH_WEIGHT, e / b)
        if cxx <= 1e-9 * max(1.0, self._xx):
            return self.PRIOR_TOKENS, 0.0
        b = cxy / cxx
        if b <= 0:
            return self.PRIOR_TOKENS, 0.0
        return self._bounded((my - b * mx) / b), 0.0

    @staticmethod
    def _bounded(tokens: float) -> float:
        return min(100_000.0, max(1.0, tokens))

    def work(self, tokens: int) -> float:
        """What one text of ``tokens`` costs in a forward, in short tokens' worth."""
        return tokens * (1.0 + self.length_weight * tokens)


@dataclass
class _Request:
    items: Sequence[Any]
    rows: list[Any]
    remaining: int
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Slot:
    request: _Request
    index: int
    tokens: int
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def item(self) -> Any:
        return self.request.items[self.index]

    @property
    def future(self) -> asyncio.Future[Any]:
        return self.request.future


class TokenBudgetBatcher(Batcher[Item]):
    """A ``Batcher`` for texts whose forwards are sized by padded tokens (see the module
    docstring); ``tokens(item)`` is an item's length, ``max_tokens`` the budget of a forward."""

    FREE_PADDING = 1.2  # padded / real tokens a forward may reach without having to pay for itself,
    FREE_PADDING_TOKENS = 4  # ... and padded tokens a text, on average
    REACH_BUDGETS = 1.5  # a forward's texts come from the oldest queued, this many budgets' tokens of them

    def __init__(self, forward: Forward, *, tokens: Callable[[Item], int], max_tokens: int, max_batch: int,
                 max_wait_s: float, merge: bool = True, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        super().__init__(forward, max_batch=max_batch, max_wait_s=max_wait_s, merge=merge, on_batch=on_batch)
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.cost = ForwardCost()

    def enqueue(self, items: Sequence[Item]) -> asyncio.Future[Any]:
        """Queue ``items`` now; the future gives their rows, in order (one array; rows of different
        forwards joined by ``join_rows``)."""
        self._admit()
        request = _Request(items, [None] * len(items), len(items))
        self._pending.extend(_Slot(request, i, self.tokens(item)) for i, item in enumerate(items))
        self._wakeup.set()
        return request.future

    async def _gather_and_run(self) -> None:
        """Wait the window out (under load), then one forward around the oldest item."""
        if self.merge and self.under_load:
            deadline = self._pending[0].queued_at + self.max_wait_s
            while not self._closed and (remaining := deadline - time.monotonic()) > 0:
                if not await self._wait_for_more(remaining):
                    break
        await self._run_slots(self._select())

    def _select(self) -> list[_Slot]:
        """The oldest item, grown by neighbours within reach (``_within_reach``) in length order
        while that lowers the forward's cost per unit of work, (overhead + items x work(longest)) /
        (work of the items) with the learned ``ForwardCost`` (work: a text's tokens, weighed by its
        length), or keeps the forward's padding free: within ``FREE_PADDING`` of its real tokens and
        within ``FREE_PADDING_TOKENS`` a text on average (texts of about one length always share a forward,
        whatever the learned overhead says: it is a noisy fit, and splitting them gains nothing;
        the per-text bound keeps long texts from being padded by a fifth for free, which at 256
        tokens costs more than a forward's overhead)."""
        oldest: _Slot = self._pending.popleft()
        if not self.merge or not self._pending:
            return [oldest]
        pool = sorted(self._within_reach(oldest.tokens), key=lambda slot: slot.tokens)
        lengths = [max(1, slot.tokens) for slot in pool]
        overhead, work = self.cost.overhead_tokens, self.cost.work
        at = bisect_left(lengths, oldest.tokens)
        lo, hi = at, at  # pool[lo:hi] joins the oldest
        count, real, longest = 1, max(1, oldest.tokens), max(1, oldest.tokens)
        value = work(real)  # the work of the chosen texts, unpadded
        while count < self.max_batch:
            best: tuple[float, int] | None = None
            for side, index in ((-1, lo - 1), (1, hi)):
                if 0 <= index < len(pool):
                    top = max(longest, lengths[index])
                    if (count + 1) * top <= self.max_tokens:
                        score = (overhead + (count + 1) * work(top)) / (value + work(lengths[index]))
                        if best is None or score < best[0]:
                            best = (score, side)
            if best is None:
                break
            side = best[1]
            index = lo - 1 if side < 0 else hi
            grown, padded = real + lengths[index], (count + 1) * max(longest, lengths[index])
            free = padded <= min(self.FREE_PADDING * grown, grown + self.FREE_PADDING_TOKENS * (count + 1))
            if best[0] > (overhead + count * work(longest)) / value and not free:
                break
            lo, hi = (lo - 1, hi) if side < 0 else (lo, hi + 1)
            count, real, longest = count + 1, grown, max(longest, lengths[index])
            value += work(lengths[index])
        chosen = pool[lo:hi]
        taken = {id(slot) for slot in chosen}
        self._pending = deque(slot for slot in self._pending if id(slot) not in taken)
        return [oldest, *chosen]

    def _within_reach(self, taken: int) -> list[_Slot]:
        """The queued texts a forward may draw from: the oldest, up to ``REACH_BUDGETS`` forwards'
        budget of tokens with the ``taken`` already chosen. A text is then passed over by a bounded
        amount of newer work before it is the oldest and in the next forward: with the whole queue to
        draw from, the newer texts that fit a forward kept going first, and the longest 5% of a mixed
        workload waited up to twice their median (README "Texts of mixed lengths"). On a GPU the
        budget is larger (MiniLM: 8,192 tokens, a reach of 12,288): a queue of 64 texts averaging up
        to 192 tokens is within reach whole."""
        room = self.REACH_BUDGETS * self.max_tokens - taken
        reach: list[_Slot] = []
        for slot in self._pending:
            room -= slot.tokens
            if room < 0 and reach:
                break
            reach.append(slot)
        return reach

    async def _run_slots(self, slots: list[_Slot]) -> None:
        items = [slot.item for slot in slots]
        longest = max(slot.tokens for slot in slots)
        if (done := await self._forward_or_isolate(slots, items, self._run_slots)) is None:
            return
        rows, elapsed = done
        self.cost.observe(len(slots) * longest, elapsed / 1e9, longest)
        for slot, row in zip(slots, rows, strict=True):
            request = slot.request
            if request.future.done():
                continue
            request.rows[slot.index] = row
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(join_rows([row[None] for row in request.rows]))
        self._report(BatchStats(len(items), elapsed, sum(slot.tokens for slot in slots), len(slots) * longest))
