"""The runner's own socket (``frame_socket``): a front's calls answered as over HTTP, without it.

Each test serves a small engine on a real Unix socket in a temporary folder (the folder BentoML's
runner socket would be in), on uvloop as the runner does, and calls it with the front's
``SocketTransport``: the same answers and error classes as over HTTP; the token first, or 401 and
the connection closed; a call over HTTP while the socket does not take connections; one runner's
socket per lane; a dropped connection is a ``TransportError``, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvloop

from ingrain_bento import frame_socket
from ingrain_bento import schemas as s
from ingrain_bento.boundary import InferReply
from ingrain_bento.errors import BadRequest, ModelNotFound
from ingrain_bento.frame_socket import FrameSocketServer, SocketTransport, socket_path
from ingrain_bento.front.remote_engine import RemoteEngine
from ingrain_bento.metrics import HttpMetrics
from ingrain_bento.refs import ModelRef
from ingrain_bento.wire import CALLS, TransportError

from fixtures.transport import INFO, TOKEN, FakeEngine, gate_served, raw_calls

REF = ModelRef("sentence_transformers", "m", None)


class Engine(FakeEngine):
    """``FakeEngine`` whose ``unload`` raises a ``BadRequest`` and whose ``infer`` (recorded) answers
    each request with a row of its first value and this engine's ``number``."""

    def __init__(self, number: int = 0) -> None:
        super().__init__()
        self.number = number

    async def unload(self, request: s.ModelRequest) -> str:
        self.calls.append("unload")
        raise BadRequest(f"nothing to unload: {request.name}")

    async def infer(self, ref: ModelRef, task: str, tag: str, requests: list[list[Any]]) -> InferReply:
        self.calls.append("infer")
        await self.release.wait()
        return InferReply([np.array([[float(items[0].flat[0]), self.number]], np.float32) for items in requests], 3)


def run(scenario: Any) -> Any:
    return uvloop.run(asyncio.wait_for(scenario(), 20))


async def serve(engine: Engine, folder: Path, runner: int = 0, metrics: HttpMetrics | None = None
                ) -> FrameSocketServer:
    async def resolve() -> Engine:
        return engine

    server = FrameSocketServer(resolve, TOKEN, metrics)
    path = socket_path(address(folder), runner)
    assert path is not None
    await server.start(path)
    return server


@contextlib.asynccontextmanager
async def connected(engine: Engine, folder: Path, **options: Any
                    ) -> AsyncIterator[tuple[FrameSocketServer, SocketTransport]]:
    """``engine`` served on runner 0's socket in ``folder``, and a front's transport to it."""
    server = await serve(engine, folder)
    transport = SocketTransport(address(folder), TOKEN, **options)
    try:
        yield server, transport
    finally:
        await transport.close()
        await server.close()


def one_text_call() -> bytes:
    """An ``infer`` call's frame: one request of one tokenized text (zeros)."""
    return CALLS["infer"].encode_args({"ref": REF, "task": "embed_text", "tag": "t",
                                       "requests": [[np.zeros((1, 2), np.int32)]]})


def address(folder: Path) -> str:
    """BentoML's runner address in ``folder`` (its socket need not exist: HTTP is not used here)."""
    return f"file://{folder}/bentoml-runner.sock"


def test_the_socket_sits_beside_bentomls_and_only_for_a_unix_socket_address():
    assert socket_path("file:///tmp/bentoml-uds-x/123.sock", 1) == "/tmp/bentoml-uds-x/ingrain-runner-1.sock"
    assert socket_path("http://runner:3000", 0) is None
    assert socket_path(None, 0) is None


def test_calls_answer_as_over_http_and_errors_keep_their_class(tmp_path):
    engine = Engine()

    async def scenario() -> None:
        server = await serve(engine, tmp_path)
        remote = RemoteEngine(SocketTransport(address(tmp_path), TOKEN), max_requests_per_call=8)
        try:
            assert await remote.loaded_models() == [INFO]
            reply = await remote.infer(REF, "embed_text", "t", [[np.full((1, 4), 5, np.int32)],
                                                                 [np.full((1, 4), 9, np.int32)]])
            assert [rows.tolist() for rows in reply.results] == [[[5.0, 0.0]], [[9.0, 0.0]]]
            with pytest.raises(BadRequest, match="nothing to unload: m"):
                await remote.unload(s.ModelRequest(name="m"))
            engine.error = ModelNotFound("no such model")
            with pytest.raises(ModelNotFound, match="no such model"):
                await remote.loaded_models()
            timed = await remote.transport.post("loaded_models", CALLS["loaded_models"].encode_args({}))
            assert timed.status == 404 and timed.runner_ms is not None and 0 <= timed.runner_ms < 1000
            unknown = await remote.transport.post("no-such-call", b"")
            assert unknown.status == 404 and "no-such-call" in json.loads(unknown.body)["message"]
            assert len(server.connections) == 1  # every call on one kept connection
        finally:
            await remote.close()
            await server.close()

    run(scenario)
    assert engine.calls == ["loaded_models", "infer", "unload", "loaded_models", "loaded_models"]


def test_a_call_of_megabytes_crosses_whole_in_whatever_chunks_the_socket_makes(tmp_path):
    """A call carrying 64 images' pixels (9.6 MB) is far more than one read of the socket."""

    class Summing(Engine):
        async def infer(self, ref: ModelRef, task: str, tag: str, requests: list[list[Any]]) -> InferReply:
            return InferReply([np.repeat(items[0].astype(np.float32).reshape(1, -1), 2, axis=0)[:, ::1000]
                               for items in requests], 1)

    pixels = [np.random.default_rng(i).integers(0, 255, (224, 224, 3), dtype=np.uint8) for i in range(64)]

    async def scenario() -> InferReply:
        async with connected(Summing(), tmp_path) as (_, transport):
            body = CALLS["infer"].encode_args({"ref": REF, "task": "embed_image", "tag": "t",
                                               "requests": [[image] for image in pixels]})
            assert len(body) > 9_000_000
            reply = await transport.post("infer", body)
            assert reply.status == 200
            return CALLS["infer"].decode_result(reply.body)

    reply = run(scenario)
    for image, rows in zip(pixels, reply.results, strict=True):
        assert isinstance(rows, np.ndarray)
        assert np.array_equal(rows, np.repeat(image.astype(np.float32).reshape(1, -1), 2, axis=0)[:, ::1000])


def test_calls_are_counted_by_route_and_status_as_over_http(tmp_path):
    metrics = HttpMetrics("ingrain-runner")
    seen: list[tuple[str, int, float]] = []
    metrics.responses.add = seen.append  # type: ignore[method-assign]

    async def scenario() -> None:
        server = await serve(Engine(), tmp_path, metrics=metrics)
        transport = SocketTransport(address(tmp_path), TOKEN)
        try:
            await transport.post("loaded_models", CALLS["loaded_models"].encode_args({}))
            await transport.post("unload", CALLS["unload"].encode_args({"request": s.ModelRequest(name="m")}))
        finally:
            await transport.close()
            await server.close()

    run(scenario)
    assert [(route, status) for route, status, _ in seen] == [("/ingrain/loaded_models", 200), ("/ingrain/unload", 400)]


@pytest.mark.parametrize("first", [("loaded_models", b""), ("token", b"a guess")], ids=["no token", "another token"])
def test_a_connection_without_the_token_first_is_refused_and_closed_and_nothing_runs(tmp_path, first):
    engine = Engine()

    async def scenario() -> list[tuple[int, bytes]]:
        server = await serve(engine, tmp_path)
        try:
            assert server.path is not None
            return await asyncio.to_thread(raw_calls, server.path, [
                first, ("loaded_models", CALLS["loaded_models"].encode_args({}))], 1.0)
        finally:
            await server.close()

    replies = run(scenario)
    assert [status for status, _ in replies] == [401]  # then closed: the call after it is never read
    assert "INGRAIN_RUNNER_TOKEN" in json.loads(replies[0][1])["message"]
    assert engine.calls == []


def test_before_the_token_no_message_over_one_kib_is_read(tmp_path):
    async def scenario() -> list[tuple[int, bytes]]:
        server = await serve(Engine(), tmp_path)
        try:
            assert server.path is not None
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(struct.pack("<I", 1 << 30))  # says a GiB follows, sends none of it
            head = await asyncio.wait_for(reader.readexactly(10), 5)
            length, status, _ = struct.unpack("<IHf", head)
            await reader.readexactly(length - 6)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
            writer.close()
            return [(status, b"")]
        finally:
            await server.close()

    assert run(scenario) == [(401, b"")]


def test_the_token_opens_the_connection_for_calls(tmp_path):
    async def scenario() -> list[tuple[int, bytes]]:
        server = await serve(Engine(), tmp_path)
        try:
            assert server.path is not None
            return await asyncio.to_thread(raw_calls, server.path, [
                ("token", TOKEN.encode()), ("loaded_models", CALLS["loaded_models"].encode_args({}))], 1.0)
        finally:
            await server.close()

    (token_status, _), (status, body) = run(scenario)
    assert (token_status, status) == (200, 200)
    assert CALLS["loaded_models"].decode_result(body) == [INFO]


def test_the_socket_is_this_users_alone_replaces_a_stale_one_and_is_removed_on_close(tmp_path):
    stale = tmp_path / "ingrain-runner-0.sock"
    stale.write_text("left by a killed worker")

    async def scenario() -> None:
        server = await serve(Engine(), tmp_path)
        assert stat.S_ISSOCK(os.stat(stale).st_mode)
        assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600
        await server.close()

    run(scenario)
    assert not stale.exists()


def test_close_answers_the_calls_already_received_first(tmp_path):
    engine = Engine()
    engine.release.clear()

    async def scenario() -> InferReply:
        server = await serve(engine, tmp_path)
        remote = RemoteEngine(SocketTransport(address(tmp_path), TOKEN), max_requests_per_call=8)
        try:
            call = asyncio.ensure_future(remote.infer(REF, "embed_text", "t", [[np.full((1, 2), 4, np.int32)]]))
            while "infer" not in engine.calls:
                await asyncio.sleep(0.01)
            closing = asyncio.ensure_future(server.close())
            await asyncio.sleep(0.05)
            assert not closing.done()
            engine.release.set()
            await closing
            return await call
        finally:
            await remote.close()

    assert run(scenario).results[0].tolist() == [[4.0, 0.0]]


def held_engine() -> Engine:
    """An engine whose ``infer`` calls wait until its ``release`` is set."""
    engine = Engine()
    engine.release.clear()
    return engine


async def until_calls(engine: Engine, count: int) -> None:
    while engine.calls.count("infer") < count:
        await asyncio.sleep(0.01)


def test_a_connection_lost_mid_call_is_a_transport_error_not_a_hang(tmp_path):
    engine = held_engine()

    async def scenario() -> None:
        async with connected(engine, tmp_path) as (server, transport):
            call = asyncio.ensure_future(transport.post("infer", one_text_call()))
            await until_calls(engine, 1)
            for connection in list(server.connections):
                assert connection.transport is not None
                connection.transport.abort()  # as when the runner's process dies
            with pytest.raises(TransportError):
                await call
            engine.release.set()

    run(scenario)


def test_a_call_past_its_timeout_leaves_no_late_reply_for_the_next(tmp_path):
    engine = held_engine()

    async def scenario() -> None:
        async with connected(engine, tmp_path, timeout_s=0.2) as (_, transport):
            with pytest.raises(TimeoutError):
                await transport.post("infer", one_text_call())
            engine.release.set()  # the late reply goes to a closed connection
            reply = await transport.post("loaded_models", CALLS["loaded_models"].encode_args({}))
            assert CALLS["loaded_models"].decode_result(reply.body) == [INFO]

    run(scenario)


def test_a_burst_of_calls_leaves_at_most_max_idle_connections_open(tmp_path):
    engine = held_engine()

    async def scenario() -> tuple[int, int]:
        async with connected(engine, tmp_path) as (server, transport):
            burst = asyncio.gather(*(transport.post("infer", one_text_call()) for _ in range(80)))
            await until_calls(engine, 80)
            opened = len(server.connections)  # every call in flight at once, each on its own connection
            engine.release.set()
            assert {reply.status for reply in await burst} == {200}
            for _ in range(100):  # until the ones closed reach the runner
                await asyncio.sleep(0.01)
                if len(server.connections) == frame_socket.MAX_IDLE:
                    break
            return opened, len(server.connections)

    assert run(scenario) == (80, frame_socket.MAX_IDLE)


def test_each_lane_calls_its_own_runner(tmp_path):
    engines = [Engine(0), Engine(1)]

    async def scenario() -> list[float]:
        servers = [await serve(engine, tmp_path, runner) for runner, engine in enumerate(engines)]
        transport = SocketTransport(address(tmp_path), TOKEN, runners=2)
        infer, body = CALLS["infer"], one_text_call()
        try:
            return [float(infer.decode_result((await transport.post("infer", body, lane)).body).results[0][0, 1])
                    for lane in (0, 1, 1, 0, 3)]
        finally:
            await transport.close()
            for server in servers:
                await server.close()

    assert run(scenario) == [0, 1, 1, 0, 1]


def test_while_the_socket_takes_no_connections_calls_go_over_http(tmp_path, monkeypatch):
    """No runner socket yet (a runner starting, or of an older version): the call goes to BentoML's
    socket over HTTP; once the runner's socket listens, the next call after the retry delay uses it."""
    monkeypatch.setattr(frame_socket, "SOCKET_RETRY_S", 2.0)
    import aiohttp  # noqa: F401  # imported before the clock starts: the first HTTP call's own import is slow

    over_http, on_socket = Engine(), Engine()

    async def scenario() -> None:
        async with gate_served(over_http, address(tmp_path).removeprefix("file://")):
            remote = RemoteEngine(SocketTransport(address(tmp_path), TOKEN), max_requests_per_call=8)
            try:
                assert await remote.loaded_models() == [INFO]
                server = await serve(on_socket, tmp_path)
                assert await remote.loaded_models() == [INFO]  # within the retry delay: HTTP still
                await asyncio.sleep(2.1)
                assert await remote.loaded_models() == [INFO]
                await server.close()
            finally:
                await remote.close()

    run(scenario)
    assert (over_http.calls, on_socket.calls) == (["loaded_models"] * 2, ["loaded_models"])
