"""``RemoteEngine``: how a front worker calls a runner in another process, and what it answers
when the runner fails.

The transport here (``fixtures.transport.GateTransport``) hands each call to a real
``RunnerGate`` in this process (the same frames, token and error replies as over a socket), with
faults injected at the transport seam on cue: a dropped connection, a runner that does not answer
its probe. One test runs the real transport over a Unix socket to a uvicorn-served gate.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingrain_bento import schemas as s
from ingrain_bento.errors import BadRequest, IngrainError, ModelNotFound, RunnerUnavailable, StaleModel
from ingrain_bento.front.remote_engine import RemoteEngine
from ingrain_bento.refs import ModelRef
from ingrain_bento.wire import CALLS, RunnerTransport

from fixtures.transport import INFO, TOKEN, FakeEngine, GateTransport, gate_served

REF = ModelRef("timm", "test_vit.r160_in1k", "false")


class Counts:
    def __init__(self) -> None:
        self.retries = self.unavailable = 0

    def record_runner_retry(self) -> None:
        self.retries += 1

    def record_runner_unavailable(self) -> None:
        self.unavailable += 1


def run(scenario: Any) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_runner_error_reply_is_raised_as_the_same_class():
    async def scenario() -> None:
        engine = FakeEngine()
        engine.error = ModelNotFound("no such model")
        remote = RemoteEngine(GateTransport(engine), max_requests_per_call=8)
        with pytest.raises(ModelNotFound) as info:
            await remote.loaded_models()
        assert info.value.message == "no such model" and info.value.status_code == 404
        await remote.close()

    run(scenario)


def test_a_runner_that_refuses_the_token_is_a_500_that_says_which_setting_differs():
    async def scenario() -> None:
        remote = RemoteEngine(GateTransport(FakeEngine(), token="another"), max_requests_per_call=8)
        with pytest.raises(IngrainError) as info:
            await remote.loaded_models()
        assert info.value.status_code == 500 and "INGRAIN_RUNNER_TOKEN" in info.value.message
        await remote.close()

    run(scenario)


def test_a_dropped_connection_to_a_live_runner_is_retried_once_and_counted():
    async def scenario() -> None:
        counts = Counts()
        transport = GateTransport(FakeEngine(), drops=1)
        remote = RemoteEngine(transport, max_requests_per_call=8, metrics=counts)  # type: ignore[arg-type]
        assert await remote.loaded_models() == [INFO]
        assert transport.sent == ["loaded_models", "loaded_models"] and counts.retries == 1
        await remote.close()

    run(scenario)


def test_a_call_that_is_not_idempotent_is_never_sent_twice():
    async def scenario() -> None:
        transport = GateTransport(FakeEngine(), drops=1)
        remote = RemoteEngine(transport, max_requests_per_call=8)
        with pytest.raises(RunnerUnavailable):
            await remote.unload(s.ModelRequest(name="m"))
        assert transport.sent == ["unload"] and not remote.is_down  # the runner answers its probe
        await remote.close()

    run(scenario)


def test_a_runner_that_does_not_answer_gets_503_with_retry_after_at_once_until_it_answers_again():
    async def scenario() -> None:
        counts = Counts()
        transport = GateTransport(FakeEngine())
        transport.alive = False
        remote = RemoteEngine(transport, max_requests_per_call=8, metrics=counts)  # type: ignore[arg-type]
        with pytest.raises(RunnerUnavailable) as info:
            await remote.loaded_models()
        assert info.value.status_code == 503 and int(info.value.headers()["Retry-After"]) > 0
        assert remote.is_down
        with pytest.raises(RunnerUnavailable):
            await remote.loaded_models()
        assert transport.sent == ["loaded_models"], "while down, nothing is sent"
        transport.alive = True  # BentoML restarted it: it answers /livez (restoring or not)
        for _ in range(40):
            if not remote.is_down:
                break
            await asyncio.sleep(0.1)
        assert await remote.loaded_models() == [INFO] and counts.unavailable == 2
        await remote.close()

    run(scenario)


def test_calls_in_flight_fail_fast_when_the_runner_is_found_dead():
    async def scenario() -> None:
        engine = FakeEngine()
        engine.release.clear()
        remote = RemoteEngine(GateTransport(engine), max_requests_per_call=8)
        waiting = asyncio.create_task(remote.infer(REF, "embed_image", "t", [[np.zeros((2, 2, 3), np.uint8)]]))
        await asyncio.sleep(0.05)
        remote._mark_down("test")
        with pytest.raises(RunnerUnavailable):
            await asyncio.wait_for(waiting, 1)
        await remote.close()

    run(scenario)


@pytest.mark.parametrize(("down_as", "answered"), [("refused", True), ("silent", False)])
def test_a_runner_that_stops_listening_finishes_its_calls_in_flight_a_silent_one_does_not(monkeypatch, down_as,
                                                                                          answered):
    """SIGTERM: the runner stops listening (its probe is refused) and finishes the calls it has; the
    front marks it down (new calls: 503) but leaves those calls to finish. A runner that does not
    answer in time (killed or hung) has its calls in flight cancelled: 503 at once."""
    import ingrain_bento.front.remote_engine as remote_engine

    monkeypatch.setattr(remote_engine, "HEARTBEAT_S", 0.01)

    async def scenario() -> None:
        engine = FakeEngine()
        engine.release.clear()
        transport = GateTransport(engine)
        remote = RemoteEngine(transport, max_requests_per_call=8)
        call = asyncio.create_task(remote.infer(REF, "embed_image", "t", [[np.zeros((2, 2, 3), np.uint8)]]))
        await asyncio.sleep(0.05)  # the call is in flight
        transport.alive, transport.down_as = False, down_as
        for _ in range(100):
            if remote.is_down:
                break
            await asyncio.sleep(0.01)
        assert remote.is_down
        with pytest.raises(RunnerUnavailable):
            await remote.loaded_models()
        engine.release.set()
        if answered:
            assert (await asyncio.wait_for(call, 1)).version == 7
        else:
            with pytest.raises(RunnerUnavailable):
                await asyncio.wait_for(call, 1)
        await remote.close()

    run(scenario)


def test_requests_queued_behind_a_call_in_flight_go_to_the_runner_together():
    async def scenario() -> list[Any]:
        engine = FakeEngine()
        engine.release.clear()
        remote = RemoteEngine(GateTransport(engine), max_requests_per_call=8)
        requests = [[np.full((4, 4, 3), i, dtype=np.uint8)] for i in range(5)]
        first = asyncio.create_task(remote.infer(REF, "embed_image", "t", [requests[0]]))
        await asyncio.sleep(0.05)  # the first call is in flight
        rest = [asyncio.create_task(remote.infer(REF, "embed_image", "t", [items])) for items in requests[1:]]
        await asyncio.sleep(0.05)
        engine.release.set()
        replies = await asyncio.gather(first, *rest)
        assert engine.infer_counts == [[1], [1, 1, 1, 1]] and {reply.version for reply in replies} == {7}
        await remote.close()
        return [reply.results[0] for reply in replies]

    rows = run(scenario)
    assert [float(r[0, 0]) for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0], "each request gets its own rows"


def test_one_requests_error_in_a_shared_call_is_that_requests_alone():
    async def scenario() -> None:
        remote = RemoteEngine(GateTransport(FakeEngine()), max_requests_per_call=8)
        reply = await remote.infer(REF, "embed_image", "stale", [[np.ones((2, 2, 3), np.uint8)]])
        assert isinstance(reply.results[0], StaleModel)
        await remote.close()

    run(scenario)


def test_the_real_transport_over_a_unix_socket_to_a_served_gate(tmp_path: Path):
    """aiohttp to uvicorn, as between the two services: the token, a kept-alive connection, and
    the runner's 400 raised as the same class."""

    class Engine(FakeEngine):
        async def unload(self, request: s.ModelRequest) -> str:
            raise BadRequest("nothing to unload")

    engine = Engine()
    socket = str(tmp_path / "runner.sock")

    async def scenario() -> None:
        async with gate_served(engine, socket):
            await remote_calls(socket)

    async def remote_calls(socket: str) -> None:
        remote = RemoteEngine(RunnerTransport(f"file://{socket}", TOKEN), max_requests_per_call=8)
        try:
            assert await remote.transport.answers("/readyz")
            for _ in range(3):
                assert await remote.loaded_models() == [INFO]
            timed = await remote.transport.post("loaded_models", CALLS["loaded_models"].encode_args({}))
            assert timed.status == 200 and timed.runner_ms is not None and 0 <= timed.runner_ms < 1000
            with pytest.raises(BadRequest, match="nothing to unload"):
                await remote.unload(s.ModelRequest(name="m"))
            reply = await remote.infer(REF, "embed_image", "t", [[np.full((3, 3, 3), 5, np.uint8)]])
            assert reply.results[0].tolist() == [[5.0, 5.0]]
            stranger = RemoteEngine(RunnerTransport(f"file://{socket}", "guess"), max_requests_per_call=8)
            with pytest.raises(IngrainError, match="INGRAIN_RUNNER_TOKEN"):
                await stranger.loaded_models()
            await stranger.close()
        finally:
            await remote.close()

    run(scenario)
    assert engine.calls == ["loaded_models"] * 4
