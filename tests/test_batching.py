"""``Batcher``: per-model dynamic batching.

``await batcher.submit(items)`` returns one row per item, in order. Concurrent requests
are merged into one forward of at most ``max_batch`` items; a large request is split into
chunks; a failing forward is retried request by request so one bad request never fails
its neighbours; ``close()`` drains the queue and refuses new work.

The forward here is a fake: it returns ``[[float(x)] for x in items]`` and records the
size of every call, so each test can say exactly which forwards ran.
"""

from __future__ import annotations

import asyncio
import threading
import time
from functools import partial

import numpy as np
import pytest

from ingrain_bento.batching import Batcher, ForwardCost, OneThread, TokenBudgetBatcher, call_guarded, in_executor
from ingrain_bento.errors import AtCapacity

POISON = -1


class FakeForward:
    """Rows ``[[float(x)]]`` per item after ``delay_s``; raises on ``POISON``; records call sizes."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.calls: list[list[int]] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each call, time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, items):
        started = time.monotonic()
        with self._lock:
            self.calls.append(list(items))
        time.sleep(self.delay_s)
        self.spans.append((started, time.monotonic()))
        if POISON in items:
            raise ValueError(f"poisoned batch of {len(items)}")
        return np.array([[float(x)] for x in items])

    @property
    def sizes(self) -> list[int]:
        return [len(call) for call in self.calls]


def values(rows: np.ndarray) -> list[float]:
    return rows[:, 0].tolist()


def run(scenario, *, timeout: float = 5.0, make=Batcher, **batcher_args):
    """Run ``await scenario(batcher, forward)`` with a fresh batcher (``make(forward, **batcher_args)``)
    on a ``OneThread``, as the runner's forwards run."""
    forward = FakeForward(batcher_args.pop("delay_s", 0.02))
    batcher_args.setdefault("max_batch", 64)
    batcher_args.setdefault("max_wait_s", 0.005)

    async def main():
        with OneThread("test-forward") as executor:
            batcher = make(in_executor(forward, executor), **batcher_args)
            try:
                return await asyncio.wait_for(scenario(batcher, forward), timeout)
            finally:
                await asyncio.wait_for(batcher.close(), timeout)

    return asyncio.run(main()), forward


# ---- one request -------------------------------------------------------------------------

def test_a_single_request_gets_its_rows_in_order():
    result, forward = run(lambda b, f: b.submit([3, 1, 2]))
    assert isinstance(result, np.ndarray)
    assert values(result) == [3.0, 1.0, 2.0]
    assert forward.sizes == [3]


def test_a_lone_client_does_not_wait_for_company():
    async def scenario(batcher, forward):
        started = time.monotonic()
        await batcher.submit([1])
        return time.monotonic() - started

    elapsed, _ = run(scenario, max_wait_s=2.0)
    assert elapsed < 1.0


def test_a_lone_client_faster_than_the_window_does_not_wait_either():
    """Its requests come one after another, each sent when the last is answered: faster than the
    window, but never beside another request, so no forward waits for company."""

    async def scenario(batcher, forward):
        elapsed = []
        for i in range(6):
            started = time.monotonic()
            await batcher.submit([i])
            elapsed.append(time.monotonic() - started)
        return elapsed

    elapsed, forward = run(scenario, max_wait_s=0.5, delay_s=0.0)
    assert max(elapsed) < 0.25, elapsed
    assert forward.calls == [[i] for i in range(6)]


def test_a_request_larger_than_max_batch_is_split_and_reassembled():
    result, forward = run(lambda b, f: b.submit(list(range(10))), max_batch=4)
    assert values(result) == [float(x) for x in range(10)]
    assert forward.sizes == [4, 4, 2]
    assert forward.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_forward_that_returns_lists_gets_its_chunks_joined_as_a_list():
    """Tokenization batches through the same machinery and returns one list entry per text."""

    async def main():
        with OneThread("test-forward") as executor:
            batcher = Batcher(in_executor(lambda items: [f"tokens of {x}" for x in items], executor), max_batch=4,
                              max_wait_s=0.001)
            try:
                return await batcher.submit(list(range(10)))
            finally:
                await batcher.close()

    assert asyncio.run(main()) == [f"tokens of {x}" for x in range(10)]


# ---- merging -----------------------------------------------------------------------------

def test_concurrent_single_item_requests_are_merged():
    async def scenario(batcher, forward):
        return await asyncio.gather(*(batcher.submit([i]) for i in range(20)))

    results, forward = run(scenario)
    assert [values(rows) for rows in results] == [[float(i)] for i in range(20)]
    assert len(forward.calls) < 20
    assert sum(forward.sizes) == 20


def test_staggered_requests_pile_up_behind_a_running_forward():
    async def submit_later(batcher, i):
        await asyncio.sleep(0.002 * i)
        return await batcher.submit([i])

    async def scenario(batcher, forward):
        return await asyncio.gather(*(submit_later(batcher, i) for i in range(30)))

    results, forward = run(scenario, delay_s=0.02)
    assert [values(rows) for rows in results] == [[float(i)] for i in range(30)]
    assert len(forward.calls) <= 15
    assert max(forward.sizes) > 1


def test_under_load_a_forming_batch_waits_up_to_max_wait_for_more():
    """While requests arrive faster than ``max_wait_s``, and beside others, a forming batch waits
    that long for company."""

    async def scenario(batcher, forward):
        await asyncio.gather(*(batcher.submit([i]) for i in range(10, 20)))  # back to back: "under load"
        first = asyncio.create_task(batcher.submit([3]))
        await asyncio.sleep(0.03)  # well inside max_wait_s
        second = asyncio.create_task(batcher.submit([4]))
        return values(await first), values(await second)

    (first, second), forward = run(scenario, max_wait_s=0.3)
    assert (first, second) == ([3.0], [4.0])
    assert forward.calls == [list(range(10, 20)), [3, 4]]


def test_requests_that_queued_during_a_forward_do_not_wait_again():
    """``max_wait_s`` counts from a request's arrival: one that already waited through a forward
    longer than that goes into the next forward at once (the forward thread never idles)."""

    async def scenario(batcher, forward):
        first = asyncio.gather(batcher.submit([1]), batcher.submit([2]))  # fills max_batch: runs at once
        await asyncio.sleep(0.01)
        third = await batcher.submit([3])  # arrives under load, waits through the 0.6 s forward
        await first
        return values(third)

    third, forward = run(scenario, max_batch=2, max_wait_s=0.5, delay_s=0.6)
    assert third == [3.0] and forward.calls == [[1, 2], [3]]
    (_, first_end), (second_start, _) = forward.spans
    assert second_start - first_end < 0.25, "the next forward waited max_wait_s again after the first"


def test_merged_batches_never_exceed_max_batch():
    sizes = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]

    async def scenario(batcher, forward):
        requests = []
        start = 0
        for size in sizes:
            requests.append(list(range(start, start + size)))
            start += size
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        return requests, results

    (requests, results), forward = run(scenario, max_batch=6)
    for request, rows in zip(requests, results, strict=True):
        assert values(rows) == [float(x) for x in request]
    assert max(forward.sizes) <= 6
    assert sum(forward.sizes) == sum(sizes)
    assert len(forward.calls) < len(sizes)


def test_merge_false_runs_each_request_alone():
    async def scenario(batcher, forward):
        return await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(5)))

    results, forward = run(scenario, merge=False)
    assert [values(rows) for rows in results] == [[float(i), float(i + 100)] for i in range(5)]
    assert forward.calls == [[i, i + 100] for i in range(5)]


def test_on_batch_sees_every_forward_with_its_size_and_duration():
    seen = []

    async def scenario(batcher, forward):
        await asyncio.gather(*(batcher.submit([i]) for i in range(5)))
        await batcher.submit(list(range(7)))

    _, forward = run(scenario, max_batch=4, on_batch=lambda stats: seen.append((stats.items, stats.ns)))
    assert [size for size, _ in seen] == forward.sizes
    assert sum(size for size, _ in seen) == 12
    assert all(ns >= forward.delay_s * 1e9 for _, ns in seen)


# ---- failures ----------------------------------------------------------------------------

def test_a_poisoned_request_fails_alone_and_its_neighbours_succeed():
    async def scenario(batcher, forward):
        return await asyncio.gather(batcher.submit([1, 2]), batcher.submit([POISON]), batcher.submit([3]),
                                    return_exceptions=True)

    (left, poisoned, right), forward = run(scenario)
    assert values(left) == [1.0, 2.0]
    assert values(right) == [3.0]
    assert isinstance(poisoned, ValueError)
    assert forward.calls[0] == [1, 2, POISON, 3]  # they really shared a batch
    assert sorted(forward.calls[1:]) == sorted([[1, 2], [POISON], [3]])  # then each ran alone


def test_a_failing_forward_fails_the_request_and_the_batcher_keeps_serving():
    async def scenario(batcher, forward):
        with pytest.raises(ValueError, match="poisoned"):
            await batcher.submit([POISON])
        return await batcher.submit([5])

    result, forward = run(scenario)
    assert values(result) == [5.0]


def test_a_poisoned_chunk_fails_the_whole_split_request():
    async def scenario(batcher, forward):
        with pytest.raises(ValueError):
            await batcher.submit([1, 2, 3, POISON, 5])
        return await batcher.submit([6, 7, 8])

    result, forward = run(scenario, max_batch=2)
    assert values(result) == [6.0, 7.0, 8.0]


# ---- close -------------------------------------------------------------------------------

def test_close_finishes_queued_requests_then_refuses_new_ones():
    async def scenario(batcher, forward):
        pending = [asyncio.create_task(batcher.submit([i])) for i in range(6)]
        await asyncio.sleep(0)  # let every request reach the queue
        await batcher.close()
        assert sorted(x for call in forward.calls for x in call) == list(range(6))  # all ran before close returned
        results = [values(rows) for rows in await asyncio.wait_for(asyncio.gather(*pending), 1)]
        with pytest.raises(AtCapacity) as info:
            await batcher.submit([99])
        assert info.value.status_code == 503
        return results

    results, forward = run(scenario, max_batch=4)
    assert results == [[float(i)] for i in range(6)]
    assert 99 not in [x for call in forward.calls for x in call]


def test_close_of_an_unused_batcher_returns_at_once():
    async def scenario(batcher, forward):
        await batcher.close()
        with pytest.raises(AtCapacity):
            await batcher.submit([1])

    _, forward = run(scenario, timeout=1.0)
    assert forward.calls == []


def test_close_while_a_batch_waits_for_company_does_not_hang():
    async def scenario(batcher, forward):
        await asyncio.gather(batcher.submit([1]), batcher.submit([2]))  # under load: next batch waits
        waiting = asyncio.create_task(batcher.submit([3]))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        await batcher.close()
        return values(await waiting), time.monotonic() - started

    (result, elapsed), _ = run(scenario, max_wait_s=3.0)
    assert result == [3.0]
    assert elapsed < 2.0


def test_a_failing_on_batch_callback_does_not_hang_or_fail_requests():
    def broken_metrics(stats):
        raise RuntimeError("metrics broke")

    async def main():
        with OneThread("test-forward") as executor:
            batcher = Batcher(in_executor(FakeForward(0.0), executor), max_batch=4, max_wait_s=0.001,
                              on_batch=broken_metrics)
            outcomes = [values(await asyncio.wait_for(batcher.submit([item]), 0.5)) for item in (1, 2)]
            await asyncio.wait_for(batcher.close(), 1.0)  # the collector survived the callback
            return outcomes

    assert asyncio.run(main()) == [[1.0], [2.0]]


# ---- an async forward without isolation (the front's coalescing of runner calls) ----------

def test_without_isolation_a_failed_call_fails_every_request_in_it_once():
    calls: list[list[int]] = []

    async def runner_call(items):
        calls.append(list(items))
        await asyncio.sleep(0.01)
        raise ConnectionError("runner gone")

    async def main():
        batcher = Batcher(runner_call, max_batch=64, max_wait_s=0.0, isolate_failures=False)
        first = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0)  # the first call is in flight: the next three queue behind it
        rest = [asyncio.create_task(batcher.submit([i])) for i in (2, 3, 4)]
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        await batcher.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    assert calls == [[1], [2, 3, 4]], "one call in flight, the queued requests sent together, none alone again"


# ---- idle: what a caller may do instead of queueing -----------------------------------------

def test_idle_is_true_only_while_nothing_is_queued_gathering_or_running():
    async def scenario(batcher, forward):
        seen = [batcher.idle]
        first = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0)  # queued, or already picked up by the collector
        seen.append(batcher.idle)
        await asyncio.sleep(0.01)  # its forward runs (20 ms)
        seen.append(batcher.idle)
        await first
        await asyncio.sleep(0)
        seen.append(batcher.idle)
        return seen

    seen, forward = run(scenario, delay_s=0.02)
    assert seen == [True, False, False, True]
    assert forward.calls == [[1]]


def test_call_guarded_turns_a_panic_into_a_runtime_error():
    class PanicException(BaseException):  # what a Rust extension raises: not an Exception
        pass

    def panics(items):
        raise PanicException("tokenizer panicked")

    with pytest.raises(RuntimeError, match="PanicException: tokenizer panicked"):
        call_guarded(panics, ["x"])
    with pytest.raises(ValueError):
        call_guarded(lambda items: int("nope"), ["x"])


def test_one_thread_runs_its_calls_in_order_on_one_thread_from_the_loop_and_from_anywhere():
    """``OneThread``: a device's forwards one at a time. ``run`` answers the event loop on an
    asyncio future, ``submit`` (and so ``run_in_executor``) a concurrent one, in one order."""
    one = OneThread("test-one")
    ran: list[tuple[str, str]] = []

    def record(name: str) -> str:
        time.sleep(0.005)
        ran.append((name, threading.current_thread().name))
        return name.upper()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        answers = await asyncio.gather(one.run(record, "a"), loop.run_in_executor(one, record, "b"),
                                       one.run(record, "c"))
        assert answers == ["A", "B", "C"]
        with pytest.raises(ValueError, match="nope"):
            await one.run(int, "nope")
        forward = in_executor(lambda items: [x * 2 for x in items], one)
        assert await forward([1, 2]) == [2, 4]

    asyncio.run(main())
    assert [name for name, _ in ran] == ["a", "b", "c"]
    assert {thread for _, thread in ran} == {"test-one"}
    assert one.submit(record, "d").result(timeout=5) == "D"
    one.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        one.submit(record, "e")


def test_one_thread_turns_a_panic_of_a_forward_into_an_error_the_caller_gets():
    class PanicException(BaseException):
        pass

    def panics(items):
        raise PanicException("boom")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="PanicException: boom"):
            await in_executor(panics, one)(["x"])
        assert await one.run(len, "abc") == 3  # the thread lives on

    one = OneThread("test-panic")
    asyncio.run(main())
    one.shutdown()


# ---- forwards sized by padded tokens (texts) ----------------------------------------------------
# Here an item is its own length in tokens (``tokens=int``), and the fake forward's row is that length.

def run_budget(scenario, *, timeout: float = 10.0, tokens=int, **batcher_args):
    batcher_args.setdefault("max_tokens", 4096)
    return run(scenario, timeout=timeout, make=partial(TokenBudgetBatcher, tokens=tokens), **batcher_args)


def test_texts_queued_together_are_grouped_by_length_and_each_gets_its_own_row():
    lengths = [10, 200, 12, 190, 11, 205, 9, 198]

    async def scenario(batcher, forward):
        blocker = asyncio.create_task(batcher.submit([50]))  # in flight while the others queue
        await asyncio.sleep(0.005)
        rows = await asyncio.gather(*(batcher.submit([n]) for n in lengths))
        await blocker
        return [values(r) for r in rows]

    rows, forward = run_budget(scenario, delay_s=0.03)
    assert rows == [[float(n)] for n in lengths]
    groups = [sorted(call) for call in forward.calls[1:]]
    assert sorted(groups) == [[9, 10, 11, 12], [190, 198, 200, 205]], forward.calls


def test_a_poisoned_text_fails_alone_and_the_texts_it_shared_a_forward_with_succeed():
    async def scenario(batcher, forward):
        blocker = asyncio.create_task(batcher.submit([50]))  # in flight while the others queue
        await asyncio.sleep(0.005)
        answers = await asyncio.gather(batcher.submit([1, 2]), batcher.submit([POISON]), batcher.submit([3]),
                                       return_exceptions=True)
        await blocker
        return answers

    (left, poisoned, right), forward = run_budget(scenario, tokens=lambda item: 10)  # one length: one forward
    assert values(left) == [1.0, 2.0]
    assert values(right) == [3.0]
    assert isinstance(poisoned, ValueError)
    assert sorted(forward.calls[1]) == sorted([1, 2, POISON, 3])  # they really shared a forward
    assert sorted(forward.calls[2:]) == [[POISON], [1], [2], [3]]  # then each text ran alone


def test_no_forward_goes_over_the_token_budget_and_a_big_request_is_split_by_it():
    lengths = [100] * 20 + [30] * 40

    async def scenario(batcher, forward):
        return values(await batcher.submit(lengths))

    rows, forward = run_budget(scenario, max_tokens=600, max_batch=64)
    assert rows == [float(n) for n in lengths], "in order, whatever the grouping"
    assert all(len(call) * max(call) <= 600 for call in forward.calls), forward.calls
    assert sum(len(call) for call in forward.calls) == 60


def test_a_long_text_under_a_stream_of_short_ones_is_served_in_its_turn():
    """The oldest queued item is in every forward: a long text waits for the items ahead of it,
    never for the short ones that keep arriving after it."""
    served: dict[str, float] = {}

    async def scenario(batcher, forward):
        stop = asyncio.Event()

        async def short_stream():
            while not stop.is_set():
                await asyncio.gather(*(batcher.submit([8]) for _ in range(8)))

        streams = [asyncio.create_task(short_stream()) for _ in range(4)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await batcher.submit([250])
        served["long"] = time.monotonic() - started
        stop.set()
        await asyncio.gather(*streams)

    _, forward = run_budget(scenario, delay_s=0.01, max_tokens=512)
    assert served["long"] < 0.1, served  # a few forwards of 10 ms, not the stream's length
    assert any(call == [250] for call in forward.calls), "it ran alone: short texts are not padded to it"


def test_texts_queued_before_a_burst_are_not_passed_over_by_it():
    """A forward draws the oldest text's neighbours from the oldest queued texts, 1.5 budgets'
    tokens of them: the three long texts queued before forty short ones run before any of those,
    though the short ones would have filled the first forward more cheaply."""

    async def scenario(batcher, forward):
        blocker = asyncio.create_task(batcher.submit([50]))  # in flight while the others queue
        await asyncio.sleep(0.005)
        await asyncio.gather(batcher.submit([10]), *(batcher.submit([200]) for _ in range(3)),
                             *(batcher.submit([11]) for _ in range(40)))
        await blocker

    _, forward = run_budget(scenario, max_tokens=400, delay_s=0.01)
    first_short = next(i for i, call in enumerate(forward.calls) if 11 in call)
    last_long = max(i for i, call in enumerate(forward.calls) if 200 in call)
    assert last_long < first_short, forward.calls
    assert all(len(call) * max(call) <= 400 for call in forward.calls), forward.calls


def test_the_forward_cost_model_learns_the_fixed_cost_of_a_forward():
    cost = ForwardCost()
    assert cost.overhead_tokens == ForwardCost.PRIOR_TOKENS
    for padded in (100, 400, 1600, 3200, 200, 800):
        cost.observe(padded, 0.004 + padded * 1e-5)  # 4 ms fixed, 10 us a token: 400 tokens' worth
    assert abs(cost.overhead_tokens - 400) < 1


def test_the_forward_cost_model_weighs_the_tokens_of_long_texts_more():
    """Attention makes a token of a long text cost more: a fit without that term reads the long
    forwards' cost per token as a negative fixed cost."""
    cost = ForwardCost()
    for items, longest in [(64, 16), (8, 256), (32, 64), (4, 256), (16, 128), (64, 32), (2, 200), (10, 100)] * 2:
        padded = items * longest
        cost.observe(padded, 0.002 + padded * 1e-5 + padded * longest * 4e-8, longest)
    assert abs(cost.overhead_tokens - 200) < 1
    assert abs(cost.length_weight - 0.004) < 1e-6
    assert cost.work(256) == pytest.approx(256 * (1 + 0.004 * 256))


def test_long_texts_are_not_padded_by_a_fifth_for_free_short_ones_still_share():
    """Free padding is within 1.2x and within a few tokens a text: texts of 256 and 220 tokens are
    not merged for free (the cost rule alone decides), texts of 9 to 12 tokens share a forward."""

    async def scenario(batcher, forward):
        blocker = asyncio.create_task(batcher.submit([50]))  # in flight while the others queue
        await asyncio.sleep(0.005)
        await asyncio.gather(*(batcher.submit([n]) for n in [256] * 4 + [220] * 4))
        await asyncio.gather(*(batcher.submit([n]) for n in [9, 10, 11, 12] * 8))
        await blocker

    _, forward = run_budget(scenario, max_tokens=8192, delay_s=0.01)
    assert sorted(sorted(call) for call in forward.calls[1:3]) == [[220] * 4, [256] * 4], forward.calls
    assert sorted(forward.calls[3]) == sorted([9, 10, 11, 12] * 8), forward.calls


def test_on_batch_sees_the_real_and_padded_tokens_of_each_forward():
    seen = []

    async def scenario(batcher, forward):
        blocker = asyncio.create_task(batcher.submit([5]))
        await asyncio.sleep(0.005)
        await asyncio.gather(*(batcher.submit([n]) for n in (10, 12)))
        await blocker

    run_budget(scenario, on_batch=seen.append)
    assert [(s.tokens, s.padded_tokens) for s in seen] == [(5, 5), (22, 24)]
