"""The runner's calls on a Unix socket of its own, past the HTTP server: the same frames, a leaner hop.

Under ``bentoml serve`` a front and its runner share a machine, and the address BentoML gives the
runner (``BENTOML_RUNNER_MAP``) is a Unix socket in a folder of its own (``mkdtemp``: only this
user opens it). Each runner worker also listens in that folder, on ``ingrain-runner-<n>.sock``
(``socket_path``), for the calls ``wire.RunnerGate`` answers over HTTP, with no HTTP at all::

    call:   uint32 length | uint8 method length | method (ASCII) | frame (``wire``)
    reply:  uint32 length | uint16 status | float32 the runner's own ms | frame (200) or JSON error

``length`` counts the bytes after it (little-endian). A connection's first call is ``token``, with
the runner token as its body: any other first call, or another token, is answered 401 and the
connection closed, and until then no message over 1 KiB is read. Nothing is pickle. The calls are
answered by ``wire.EngineCalls``, as over HTTP, and counted in the same series.

Why not HTTP: one one-text ``infer`` call, back to back, costs the runner's event loop 0.26-0.32
ms through uvicorn and ``RunnerGate`` and 0.19-0.21 ms here; the front's side 0.21-0.23 ms with
aiohttp and ~0.07 ms here (``bench/front_cost.py``, ``runner_direct``). BentoML's HTTP server is
what the design card keeps, and it still answers everything else.

What stays on HTTP (``wire.RunnerTransport``): the probes (whether a runner is up is what BentoML's
``/livez`` and ``/readyz`` say), services that run apart (a URL address), and any call while a
runner's socket does not take connections (starting, stopping, restarted, a runner of an older
version): ``SocketTransport`` sends that call over HTTP and tries the socket again a second later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import cast

from ingrain_bento.boundary import Engine
from ingrain_bento.metrics import HttpMetrics
from ingrain_bento.wire import (
    CALL_PREFIX,
    CALLS,
    TOKEN_REFUSED,
    CallCodec,
    EngineCalls,
    Reply,
    RunnerTransport,
    TransportError,
)

__all__ = ["FrameSocketServer", "SocketTransport", "socket_path"]

log = logging.getLogger("ingrain_bento.frame_socket")

_LENGTH = struct.Struct("<I")
_CALL_HEAD = struct.Struct("<IB")  # length, method length
_REPLY_HEAD = struct.Struct("<IHf")  # length, status, the runner's ms
_REPLY_FIELDS = _REPLY_HEAD.size - _LENGTH.size  # what a reply's length counts besides its frame
TOKEN_CALL = "token"
MAX_UNTRUSTED_BYTES = 1024  # the largest message read before the token
TOKEN_TIMEOUT_S = 2.0  # a runner that does not answer the token this fast is not taking calls
SOCKET_RETRY_S = 1.0  # after a socket refused a connection: HTTP until then
# Connections not yet accepted that the socket holds (asyncio's default: 100). A burst of calls that
# are not coalesced (listings) opens one each at once; past the backlog they would go over HTTP.
BACKLOG = 2048
MAX_IDLE = 32  # connections kept open per runner for the next calls


def socket_path(address: str | None, runner: int) -> str | None:
    """Runner worker ``runner``'s own socket (numbered from 0), beside the one BentoML gives the
    runner service (a ``file://`` address); None for a URL (services that run apart)."""
    if address is None or not address.startswith("file://"):
        return None
    return str(Path(address.removeprefix("file://")).with_name(f"ingrain-runner-{runner}.sock"))


def _call_message(method: str, body: bytes) -> list[bytes]:
    name = method.encode("ascii")
    return [_CALL_HEAD.pack(1 + len(name) + len(body), len(name)) + name, body]


class _TooLong(ValueError):
    pass


def _message_end(buffer: bytearray, limit: int | None = None) -> int | None:
    """Where the first message of ``buffer`` ends, once it is all there (None until then);
    ``_TooLong`` when it says it is longer than ``limit``."""
    if len(buffer) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack_from(buffer)
    if limit is not None and length > limit:
        raise _TooLong(length)
    end = _LENGTH.size + length
    return end if len(buffer) >= end else None


def _cut(buffer: bytearray, start: int, end: int) -> bytes:
    """``buffer[start:end]`` as bytes, with one copy (a frame of pixels can be megabytes); the
    message, up to ``end``, is then removed from ``buffer``."""
    with memoryview(buffer) as view:
        part = bytes(view[start:end])
    del buffer[:end]
    return part


# ---- the front's side ------------------------------------------------------------------------------

class _FrontConnection(asyncio.Protocol):
    """One connection to a runner's socket, one call at a time (as an HTTP/1.1 connection)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting: asyncio.Future[Reply] | None = None

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := _message_end(self.buffer)) is not None:
            _, status, runner_ms = _REPLY_HEAD.unpack_from(self.buffer)
            body = _cut(self.buffer, _REPLY_HEAD.size, end)
            if self.waiting is not None and not self.waiting.done():
                self.waiting.set_result(Reply(status, body, runner_ms))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(TransportError(f"the runner's socket closed mid-call ({exc or 'EOF'})"))

    async def call(self, method: str, body: bytes) -> Reply:
        assert self.transport is not None
        self.waiting = asyncio.get_running_loop().create_future()
        self.transport.writelines(_call_message(method, body))
        try:
            return await self.waiting
        finally:
            self.waiting = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SocketTransport(RunnerTransport):
    """``RunnerTransport`` whose calls take runner ``lane``'s own socket while it accepts them
    (connections kept per runner, one call at a time each), HTTP otherwise (module docstring)."""

    def __init__(self, address: str, token: str, runners: int = 1, timeout_s: float = 600.0) -> None:
        super().__init__(address, token, timeout_s)
        self.token = token.encode()
        paths = [socket_path(address, runner) for runner in range(runners)]
        self.paths = [path for path in paths if path is not None]
        self._idle: list[list[_FrontConnection]] = [[] for _ in self.paths]
        self._retry_at = [0.0] * len(self.paths)

    async def post(self, method: str, body: bytes, lane: int = 0) -> Reply:
        runner = lane % len(self.paths) if self.paths else 0
        connection = await self._connection(runner) if self.paths else None
        if connection is None:
            return await super().post(method, body, lane)
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await connection.call(method, body)
        except BaseException:  # a timeout, a cancelled call, a lost connection: its reply may still come
            connection.close()
            raise
        idle = self._idle[runner]
        if len(idle) < MAX_IDLE:
            idle.append(connection)
        else:  # what a burst opened beyond what calls keep busy
            connection.close()
        return reply

    async def _connection(self, lane: int) -> _FrontConnection | None:
        """An open connection to runner ``lane``'s socket, or None (the call goes over HTTP)."""
        idle = self._idle[lane]
        while idle:
            kept = idle.pop()
            if kept.is_open:
                return kept
        if time.monotonic() < self._retry_at[lane]:
            return None
        connection: _FrontConnection | None = None
        try:
            _, connection = await asyncio.get_running_loop().create_unix_connection(_FrontConnection,
                                                                                     self.paths[lane])
            async with asyncio.timeout(TOKEN_TIMEOUT_S):
                reply = await connection.call(TOKEN_CALL, self.token)
            if reply.status == 200:
                return connection
            log.warning("runner.socket %s refused the token (%d): calls go over HTTP", self.paths[lane], reply.status)
        except (OSError, TransportError, TimeoutError) as exc:
            log.debug("runner.socket %s: %s; calls go over HTTP for %.0f s", self.paths[lane], exc, SOCKET_RETRY_S)
        if connection is not None:
            connection.close()
        self._retry_at[lane] = time.monotonic() + SOCKET_RETRY_S
        return None

    async def close(self) -> None:
        for idle in self._idle:
            for connection in idle:
                connection.close()
            idle.clear()
        await super().close()


# ---- the runner's side -----------------------------------------------------------------------------

class _RunnerConnection(asyncio.Protocol):
    """A front's connection to this runner's socket: the token first, then calls."""

    def __init__(self, server: FrameSocketServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.trusted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            try:
                end = _message_end(self.buffer, None if self.trusted else MAX_UNTRUSTED_BYTES)
            except _TooLong:
                self.refuse()
                return
            if end is None:
                return
            name_end = min(end, _CALL_HEAD.size + self.buffer[_LENGTH.size]) if end > _LENGTH.size else end
            method = bytes(self.buffer[_CALL_HEAD.size:name_end]).decode("ascii", "replace")
            body = _cut(self.buffer, name_end, end)
            if self.trusted:
                self.server.call_received(self, method, body)
            elif method == TOKEN_CALL and hmac.compare_digest(body, self.server.token):
                self.trusted = True
                self.reply(200, 0.0, b"")
            else:
                self.refuse()
                return

    def reply(self, status: int, runner_ms: float, body: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines([_REPLY_HEAD.pack(_REPLY_FIELDS + len(body), status, runner_ms), body])

    def refuse(self) -> None:
        self.reply(401, 0.0, json.dumps({"message": TOKEN_REFUSED}).encode())
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()


class FrameSocketServer:
    """A runner worker's own socket (module docstring): its calls answered by ``EngineCalls``,
    counted in ``metrics`` by route, as ``RunnerGate`` counts the calls over HTTP."""

    def __init__(self, engine: Callable[[], Awaitable[Engine]], token: str, metrics: HttpMetrics | None = None) -> None:
        self.calls = EngineCalls(engine)
        self.token = token.encode()
        self.metrics = metrics
        self.connections: set[_RunnerConnection] = set()
        self.path: str | None = None
        self._inode = 0
        self._server: asyncio.AbstractServer | None = None
        self._answering: set[asyncio.Task[int]] = set()

    async def start(self, path: str) -> None:
        """Listen on ``path`` (a socket left there by a killed worker is replaced); the socket is
        this user's alone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.get_running_loop().create_unix_server(partial(_RunnerConnection, self), path,
                                                                           backlog=BACKLOG)
        os.chmod(path, 0o600)
        self.path, self._inode = path, os.stat(path).st_ino
        log.info("runner.socket listening on %s", path)

    def call_received(self, connection: _RunnerConnection, method: str, body: bytes) -> None:
        codec = CALLS.get(method)
        if codec is None:
            connection.reply(404, 0.0, json.dumps({"message": f"No runner call {method}."}).encode())
            return
        serve = partial(self._serve, connection, codec, body)
        answering = asyncio.get_running_loop().create_task(
            serve() if self.metrics is None else self.metrics.counted(CALL_PREFIX + method, serve))
        self._answering.add(answering)
        answering.add_done_callback(self._answering.discard)

    async def _serve(self, connection: _RunnerConnection, codec: CallCodec, body: bytes) -> int:
        started = time.perf_counter()
        status, reply = await self.calls.answer(codec, body)
        connection.reply(status, (time.perf_counter() - started) * 1000, reply)
        return status

    async def close(self) -> None:
        """Stop taking connections, answer the calls already received, then close."""
        if self._server is not None:
            self._server.close()
        if self._answering:
            await asyncio.gather(*self._answering, return_exceptions=True)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        with contextlib.suppress(FileNotFoundError):  # unless a worker started since has its own there
            if self.path is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
