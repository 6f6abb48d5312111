"""``RunnerClient``: how a front worker calls the runner, and what it answers when the runner fails.

The runner here is a fake with the shape of BentoML's dependency proxy (async API methods and
``is_ready``), so each fault can be made to happen on cue.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse

from ingrain_bento.errors import IngrainError, ModelNotFound, RunnerUnavailable
from ingrain_bento.front.runner_client import RunnerClient
from ingrain_bento.refs import ModelRef
from ingrain_bento.wire import ModelHandle, unpack

HANDLE = ModelHandle(ModelRef("timm", "test_vit.r160_in1k", "false"), "timm-test:v1", ("embed_image",), 8)


class Counts:
    def __init__(self) -> None:
        self.retries = self.unavailable = 0

    def record_runner_retry(self) -> None:
        self.retries += 1

    def record_runner_unavailable(self) -> None:
        self.unavailable += 1


class FakeRunner:
    """Answers ``loaded_models`` with ``["ok"]``; ``failures`` are raised first, one per call."""

    def __init__(self, failures: list[BaseException] | None = None, ready: bool = True) -> None:
        self.failures = failures or []
        self.ready = ready
        self.calls: list[str] = []
        self.infer_counts: list[list[int]] = []
        self.release = asyncio.Event()

    async def is_ready(self, timeout: int | None = None) -> bool:
        return self.ready

    async def loaded_models(self) -> list[str]:
        self.calls.append("loaded_models")
        if self.failures:
            raise self.failures.pop(0)
        return ["ok"]

    async def unload(self, request: Any) -> str:
        self.calls.append("unload")
        raise self.failures.pop(0)

    async def hang(self) -> None:
        await asyncio.sleep(3600)

    async def infer(self, model: dict, task: str, tag: str, payload: dict) -> dict:
        self.infer_counts.append(payload["counts"])
        await self.release.wait()
        rows = np.concatenate([np.full((len(items), 2), float(items[0][0, 0, 0])) for items in unpack(payload)])
        return {"rows": rows, "failed": {}, "version": 7}


def run(scenario) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 20))


def error_reply(status: int, message: str, kind: str) -> BentoMLException:
    """What BentoML's client raises for a runner reply that is not 2xx: the body as its message."""
    from http import HTTPStatus

    return BentoMLException(json.dumps({"status": status, "message": message, "type": kind}),
                            error_code=HTTPStatus(status))


def test_a_runner_error_reply_is_raised_as_the_same_ingrain_error():
    async def scenario() -> None:
        client = RunnerClient(FakeRunner([error_reply(404, "no such model", "not_found_error")]),
                              max_requests_per_call=8)
        with pytest.raises(ModelNotFound) as info:
            await client.call("loaded_models")
        assert info.value.message == "no such model" and info.value.status_code == 404
        await client.close()

    run(scenario)


def test_a_reply_of_another_shape_is_a_500_that_says_it_is_a_bug():
    async def scenario() -> None:
        client = RunnerClient(FakeRunner([BentoMLException('{"error": "An unexpected error has occurred"}')]),
                              max_requests_per_call=8)
        with pytest.raises(IngrainError) as info:
            await client.call("loaded_models")
        assert info.value.status_code == 500 and "bug" in info.value.message
        await client.close()

    run(scenario)


def test_an_in_process_runner_returns_its_error_as_a_response_which_is_raised_the_same_way():
    class InProcess:
        async def loaded_models(self) -> JSONResponse:
            return JSONResponse({"status": 409, "message": "clash", "type": "conflict_error"}, status_code=409)

    async def scenario() -> None:
        client = RunnerClient(InProcess(), max_requests_per_call=8)
        with pytest.raises(IngrainError) as info:
            await client.call("loaded_models")
        assert (info.value.status_code, info.value.message) == (409, "clash")

    run(scenario)


def test_a_dropped_connection_to_a_live_runner_is_retried_once_and_counted():
    async def scenario() -> None:
        runner, counts = FakeRunner([aiohttp.ServerDisconnectedError()]), Counts()
        client = RunnerClient(runner, max_requests_per_call=8, metrics=counts)
        assert await client.call("loaded_models") == ["ok"]
        assert runner.calls == ["loaded_models", "loaded_models"] and counts.retries == 1
        await client.close()

    run(scenario)


def test_a_call_that_is_not_idempotent_is_never_sent_twice():
    async def scenario() -> None:
        runner = FakeRunner([aiohttp.ServerDisconnectedError()])
        client = RunnerClient(runner, max_requests_per_call=8)
        with pytest.raises(RunnerUnavailable):
            await client.call("unload", request=None, idempotent=False)
        assert runner.calls == ["unload"] and not client.is_down  # the runner answers its probe
        await client.close()

    run(scenario)


def test_a_dead_runner_gets_503_with_retry_after_at_once_until_it_is_ready_again():
    async def scenario() -> None:
        runner, counts = FakeRunner([aiohttp.ClientOSError()], ready=False), Counts()
        client = RunnerClient(runner, max_requests_per_call=8, metrics=counts)
        with pytest.raises(RunnerUnavailable) as info:
            await client.call("loaded_models")
        assert info.value.status_code == 503 and int(info.value.headers()["Retry-After"]) > 0
        assert client.is_down
        with pytest.raises(RunnerUnavailable):
            await client.call("loaded_models")
        assert runner.calls == ["loaded_models"], "while down, nothing is sent"
        runner.ready = True  # BentoML restarted it
        for _ in range(40):
            if not client.is_down:
                break
            await asyncio.sleep(0.1)
        assert await client.call("loaded_models") == ["ok"] and counts.unavailable == 2
        await client.close()

    run(scenario)


def test_calls_in_flight_fail_fast_when_the_runner_is_found_dead():
    async def scenario() -> None:
        client = RunnerClient(FakeRunner(), max_requests_per_call=8)
        waiting = asyncio.create_task(client.call("hang"))
        await asyncio.sleep(0.05)
        client._mark_down("test")
        with pytest.raises(RunnerUnavailable):
            await asyncio.wait_for(waiting, 1)
        await client.close()

    run(scenario)


def test_requests_queued_behind_a_call_in_flight_go_to_the_runner_together():
    async def scenario() -> list[Any]:
        runner = FakeRunner()
        client = RunnerClient(runner, max_requests_per_call=8)
        requests = [[np.full((4, 4, 3), i, dtype=np.uint8)] for i in range(5)]
        first = asyncio.create_task(client.infer(HANDLE, "embed_image", requests[0]))
        await asyncio.sleep(0.05)  # the first call is in flight
        rest = [asyncio.create_task(client.infer(HANDLE, "embed_image", items)) for items in requests[1:]]
        await asyncio.sleep(0.05)
        runner.release.set()
        rows = await asyncio.gather(first, *rest)
        assert runner.infer_counts == [[1], [1, 1, 1, 1]] and client.version == 7
        await client.close()
        return rows

    rows = run(scenario)
    assert [float(r[0, 0]) for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0], "each request gets its own rows"
