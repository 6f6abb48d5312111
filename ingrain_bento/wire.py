"""What crosses between the front and the runner, and how: one plain HTTP request per call.

Every ``Engine`` call (``boundary.py``) is a ``POST /ingrain/<method>`` to the runner's address
(``BENTOML_RUNNER_MAP``: a Unix socket under ``bentoml serve``, the runner's URL when the
services run apart), on a kept-alive connection, with one binary body each way (a *frame*).
On one machine the same frames take each runner worker's own socket instead, without HTTP
(``frame_socket``); this module's HTTP carries what that socket does not::

    uint32 little-endian: header length | header: JSON (UTF-8) | array bytes, each 8-aligned
    header = {"args": {...}, "arrays": {name: [dtype, shape, offset]}}

Arguments and results are JSON, encoded and checked with pydantic from the ``Engine`` method's
own annotations (``CallCodec``); ``infer``'s items and rows are raw numpy arrays (``InferCodec``):
a call carries few large arrays, never a list of small ones (``pack`` joins the items of all the
requests of one call into one array), read back with ``np.frombuffer``. An error reply is JSON
(``IngrainError.as_reply``) with the error's status, and is raised again as the same class.

Nothing is pickle, either way. The runner answers only the front (``RunnerGate``, an ASGI
middleware on the runner service): every call carries ``INGRAIN_RUNNER_TOKEN`` as a bearer token
and one without it is refused (401) before its body is read; a pickle body is refused (415) on
every route, token or not; BentoML's probes (``/livez``, ``/readyz``) stay open. A reply says how
long the runner itself took (``Server-Timing: runner;dur=<ms>``: what the hop costs is the rest,
``bench/cost_model.py``). The token is generated once per ``bentoml serve`` when unset
(``settings.ensure_runner_token``, in the parent process, whose environment every worker
inherits); services that run apart share it as a secret.

Why aiohttp and not httpx for the client: one call over a Unix socket costs ~0.2 ms with aiohttp
and 0.7-1.4 ms with httpx (its own CPU), measured on 2 cores; the front already depends on it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, get_type_hints

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from ingrain_bento.boundary import Engine, InferReply, join_rows
from ingrain_bento.errors import IngrainError, from_reply
from ingrain_bento.metrics import HttpMetrics
from ingrain_bento.refs import ModelRef
from ingrain_bento.settings import RUNNER_TOKEN_ENV

__all__ = [
    "CALLS", "CALL_PREFIX", "FRAME_MEDIA_TYPE", "FRONT_SIDE_CALLS", "PICKLE_MEDIA_TYPE", "RUNNER_TOKEN_ENV",
    "CallCodec", "EngineCalls", "FrameError", "InferCodec", "Reply", "RunnerGate", "RunnerTransport", "TOKEN_REFUSED",
    "TransportError", "decode_frame", "encode_frame", "pack", "unpack",
]

log = logging.getLogger("ingrain_bento.wire")

FRAME_MEDIA_TYPE = "application/x-ingrain-frame"
PICKLE_MEDIA_TYPE = "application/vnd.bentoml+pickle"
CALL_PREFIX = "/ingrain/"
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
TOKEN_REFUSED = f"The runner answers only its front: send {RUNNER_TOKEN_ENV}."  # a call without the token
KEEPALIVE_S = 3.0
_LENGTH = struct.Struct("<I")
_ALIGN = 8
# Arrays a frame may carry: token ids, pixels, rows. Never objects (np.frombuffer refuses them too).
_DTYPES = frozenset({"|u1", "|i1", "<i4", "<i8", "<f2", "<f4", "<f8", "|b1"})


# ---- frames ---------------------------------------------------------------------------------

class FrameError(ValueError):
    """A body that is not a well-formed frame."""


def _padded(size: int) -> int:
    return -size % _ALIGN


def encode_frame(args: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """One body: the JSON ``args`` and the arrays' raw bytes (C order, little-endian)."""
    layout: dict[str, list[Any]] = {}
    chunks: list[bytes | memoryview] = []
    offset = 0
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        layout[name] = [array.dtype.str, list(array.shape), offset]
        chunks.append(array.data)  # the array's own buffer: joined into the body once, not copied before
        pad = _padded(array.nbytes)
        chunks.append(b"\0" * pad)
        offset += array.nbytes + pad
    header = orjson.dumps({"args": args, "arrays": layout}, option=orjson.OPT_NON_STR_KEYS)  # ~1 µs; json ~5
    lead = _LENGTH.pack(len(header)) + header
    return b"".join([lead, b"\0" * _padded(len(lead)), *chunks])


def decode_frame(body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``encode_frame`` undone; the arrays are read-only views into ``body`` (no copy)."""
    try:
        (length,) = _LENGTH.unpack_from(body)
        header = orjson.loads(body[_LENGTH.size:_LENGTH.size + length])
        start = _LENGTH.size + length
        start += _padded(start)
        arrays = {}
        for name, (dtype, shape, offset) in header["arrays"].items():
            if dtype not in _DTYPES:
                raise FrameError(f"array {name!r} has dtype {dtype!r}, not one a frame carries")
            count = math.prod(int(size) for size in shape)  # np.prod costs ~5 µs a call
            kind = np.dtype(dtype)
            if offset < 0 or start + offset + count * kind.itemsize > len(body):
                raise FrameError(f"array {name!r} runs past the end of the body")
            arrays[name] = np.frombuffer(body, dtype=kind, count=count, offset=start + offset).reshape(shape)
        args = header["args"]
        if not isinstance(args, dict):
            raise FrameError("the frame's args are not an object")
        return args, arrays
    except FrameError:
        raise
    except (struct.error, ValueError, TypeError, KeyError) as exc:
        raise FrameError(f"not a frame ({type(exc).__name__}: {exc})") from None


# ---- infer payloads ----------------------------------------------------------------------------

def pack(requests: Sequence[Sequence[Any]]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The items of several requests as JSON args and few arrays: ``counts`` (items per request)
    and either ``texts`` (models that take raw text), ``stacked`` (items of one shape: pixels,
    CLIP tokens) or ``joined`` + ``lengths`` (items joined along their last axis: unpadded token
    rows)."""
    items = [item for request in requests for item in request]
    args: dict[str, Any] = {"counts": [len(request) for request in requests]}
    if all(isinstance(item, str) for item in items):
        return {**args, "texts": items}, {}
    if len({item.shape for item in items}) == 1:
        return args, {"stacked": np.stack(items)}
    return args, {"joined": np.concatenate(items, axis=-1),
                  "lengths": np.asarray([item.shape[-1] for item in items], dtype=np.int64)}


def unpack(args: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[list[Any]]:
    """``pack`` undone: each request's items (views into the one array)."""
    items: Sequence[Any]
    if "texts" in args:
        items = [str(text) for text in args["texts"]]
    elif "stacked" in arrays:
        items = list(arrays["stacked"])
    elif "joined" in arrays and "lengths" in arrays:
        joined, ends = arrays["joined"], np.cumsum(arrays["lengths"]).tolist()
        if ends and ends[-1] != joined.shape[-1]:
            raise FrameError(f"the item lengths add up to {ends[-1]}, the joined array holds {joined.shape[-1]}")
        items = [joined[..., start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    else:
        raise FrameError("an infer call carries no items")
    counts = [int(count) for count in args["counts"]]
    if sum(counts) != len(items) or any(count < 1 for count in counts):
        raise FrameError(f"the payload holds {len(items)} items, its counts say {counts}")
    requests, offset = [], 0
    for count in counts:
        requests.append(list(items[offset:offset + count]))
        offset += count
    return requests


# ---- calls -------------------------------------------------------------------------------------

class CallCodec:
    """How one ``Engine`` method's arguments and result cross, read from its annotations."""

    def __init__(self, name: str, idempotent: bool = True) -> None:
        hints = get_type_hints(getattr(Engine, name))
        self.name = name
        self.idempotent = idempotent  # safe to send again after a dropped connection
        self.result = TypeAdapter(hints.pop("return"))
        self.params = {param: TypeAdapter(hint) for param, hint in hints.items()}

    def encode_args(self, arguments: Mapping[str, Any]) -> bytes:
        return encode_frame({key: self.params[key].dump_python(value, mode="json")
                             for key, value in arguments.items()})

    def decode_args(self, body: bytes) -> dict[str, Any]:
        args, _ = decode_frame(body)
        unknown = set(args) - set(self.params)
        if unknown:
            raise FrameError(f"{self.name} takes no argument {', '.join(sorted(unknown))}")
        try:
            return {key: self.params[key].validate_python(value) for key, value in args.items()}
        except ValidationError as exc:
            raise FrameError(f"bad arguments to {self.name}: {exc}") from None

    def encode_result(self, result: Any) -> bytes:
        return encode_frame({"result": self.result.dump_python(result, mode="json")})

    def decode_result(self, body: bytes) -> Any:
        args, _ = decode_frame(body)
        return self.result.validate_python(args["result"])


class InferCodec(CallCodec):
    """``infer``: the items of every request of the call as arrays (``pack``), the rows of every
    request that succeeded back as one array, the failed ones as error replies."""

    def __init__(self) -> None:
        self.name, self.idempotent = "infer", True  # no TypeAdapters: the arrays are encoded by hand

    def encode_args(self, arguments: Mapping[str, Any]) -> bytes:
        args, arrays = pack(arguments["requests"])
        ref: ModelRef = arguments["ref"]
        return encode_frame({**args, "ref": [ref.library, ref.name, ref.pretrained], "task": arguments["task"],
                             "tag": arguments["tag"]}, arrays)

    def decode_args(self, body: bytes) -> dict[str, Any]:
        args, arrays = decode_frame(body)
        try:
            library, name, pretrained = args["ref"]
            ref = ModelRef(str(library), str(name), None if pretrained is None else str(pretrained))
            return {"ref": ref, "task": str(args["task"]), "tag": str(args["tag"]),
                    "requests": unpack(args, arrays)}
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"bad arguments to infer ({type(exc).__name__}: {exc})") from None

    def encode_result(self, result: InferReply) -> bytes:
        rows = [r for r in result.results if not isinstance(r, IngrainError)]
        failed = {str(i): r.as_reply() for i, r in enumerate(result.results) if isinstance(r, IngrainError)}
        arrays = {"rows": join_rows(rows)} if rows else {}
        return encode_frame({"version": result.version, "failed": failed, "counts": [len(r) for r in rows]}, arrays)

    def decode_result(self, body: bytes) -> InferReply:
        args, arrays = decode_frame(body)
        failed = {int(i): from_reply(reply) for i, reply in args["failed"].items()}
        counts = iter(args["counts"])
        rows = arrays.get("rows")
        results: list[np.ndarray | IngrainError] = []
        offset = 0
        for index in range(len(failed) + len(args["counts"])):
            if index in failed:
                results.append(failed[index])
                continue
            assert rows is not None
            count = next(counts)
            results.append(rows[offset:offset + count])
            offset += count
        return InferReply(results, int(args["version"]))


CALLS: dict[str, CallCodec] = {codec.name: codec for codec in (
    CallCodec("load"), CallCodec("unload", idempotent=False), CallCodec("delete", idempotent=False),
    CallCodec("download_custom", idempotent=False), CallCodec("loaded_models"), CallCodec("repository_models"),
    CallCodec("served_models"), CallCodec("describe"), CallCodec("embedding_size"),
    CallCodec("classification_labels"), CallCodec("ingrain_metrics"), InferCodec(),
)}
# ``Engine`` methods a front answers on its own side of the wire: nothing crosses for them.
FRONT_SIDE_CALLS = frozenset({"forget"})


# ---- the front's side: one kept-alive connection pool to the runner's address -------------------

class TransportError(ConnectionError):
    """The runner's address did not answer (refused, reset, closed mid-call)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    runner_ms: float | None = None  # the runner's own time for the call (its Server-Timing header)


class RunnerTransport:
    """POSTs frames to the runner and probes it, over aiohttp (see the module docstring)."""

    def __init__(self, address: str, token: str, timeout_s: float = 600.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": FRAME_MEDIA_TYPE}
        if address.startswith("file://"):
            self.socket_path: str | None = address.removeprefix("file://")
            self.base_url = "http://ingrain-runner"
        else:
            self.socket_path = None
            self.base_url = "http://" + address.removeprefix("tcp://") if address.startswith("tcp://") else address
        self._session: Any = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            # A kept connection is dropped after KEEPALIVE_S idle, before uvicorn's own 5 s closes it
            # under a call sent on it (aiohttp's default is 15 s).
            connector = (aiohttp.UnixConnector(path=self.socket_path, limit=0, keepalive_timeout=KEEPALIVE_S)
                         if self.socket_path else aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S))
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def post(self, method: str, body: bytes, lane: int = 0) -> Reply:
        """One call; ``TransportError`` when the connection fails, ``TimeoutError`` past the timeout.
        ``lane``: the runner worker a call is meant for (``frame_socket.SocketTransport``); over
        HTTP the runners' shared socket hands each connection to whichever accepts it."""
        import aiohttp

        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client().post(f"{self.base_url}{CALL_PREFIX}{method}", data=body,
                                               headers=self.headers) as response:
                    return Reply(response.status, await response.read(), _runner_ms(response.headers))
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from None

    async def answers(self, path: str = "/livez", timeout_s: float = 2.0) -> bool:
        """Whether the runner answers ``path`` with a 200 in time (its probes need no token)."""
        return await self.probe(path, timeout_s) == "answers"

    async def probe(self, path: str = "/livez", timeout_s: float = 2.0) -> str:
        """``answers``: a 200 in time. ``refused``: nothing accepts the connection (a runner that
        stopped listening: stopping after SIGTERM, or gone). ``silent``: anything else."""
        import aiohttp

        try:
            async with asyncio.timeout(timeout_s):
                async with self._client().get(f"{self.base_url}{path}") as response:
                    await response.read()
                    return "answers" if response.status == 200 else "silent"
        except aiohttp.ClientConnectorError:
            return "refused"
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            return "silent"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _runner_ms(headers: Mapping[str, str]) -> float | None:
    timing = headers.get("server-timing", "")
    _, _, duration = timing.partition("dur=")
    try:
        return float(duration) if timing.startswith("runner;") else None
    except ValueError:
        return None


# ---- the runner's side ----------------------------------------------------------------------------

class EngineCalls:
    """The runner's answer to one call, whichever server received it (``RunnerGate`` over HTTP,
    ``frame_socket.FrameSocketServer`` on its own socket): its arguments decoded, the engine's
    method called, the result encoded; or the error as a JSON reply with its status.

    ``engine`` returns the runner's ``Engine`` (resolved at the first call, not before: BentoML
    builds the service instance after its middlewares; then kept)."""

    def __init__(self, engine: Callable[[], Awaitable[Engine]]) -> None:
        self.engine = engine
        self._engine: Engine | None = None

    async def answer(self, codec: CallCodec, body: bytes) -> tuple[int, bytes]:
        """(200, the result's frame) or (the error's status, its JSON reply)."""
        try:
            arguments = codec.decode_args(body)
            if self._engine is None:
                self._engine = await self.engine()
            result = await getattr(self._engine, codec.name)(**arguments)
            return 200, codec.encode_result(result)
        except IngrainError as exc:
            error = exc
        except FrameError as exc:
            log.error("runner.call %s: a malformed call (%s)", codec.name, exc)
            error = IngrainError(f"The front sent the runner a malformed {codec.name} call; this is a bug.")
        except Exception:
            log.exception("runner.call %s failed", codec.name)
            error = IngrainError(f"The model runner failed on {codec.name}; this is a bug, please report it with "
                                 "the request that caused it.")
        return error.status_code, json.dumps(error.as_reply()).encode()


class RunnerGate:
    """The runner service's ASGI middleware: refuses pickle everywhere and calls without the token
    (before reading their body), and serves ``/ingrain/<method>`` by calling the engine
    (``EngineCalls``)."""

    def __init__(self, app: ASGIApp, engine: Callable[[], Awaitable[Engine]], token: str,
                 metrics: HttpMetrics | None = None) -> None:
        self.app = app
        self.calls = EngineCalls(engine)
        self.expected = f"Bearer {token}".encode()
        self.metrics = metrics  # the calls, as BentoML's layers (which the gate is in front of) counted them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path: str = scope["path"]
        if headers.get(b"content-type", b"").split(b";")[0].strip().lower() == PICKLE_MEDIA_TYPE.encode():
            await _reply_json(send, 415, {"message": "The model runner never reads pickle."})
            return
        if path in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            await _reply_json(send, 401, {"message": TOKEN_REFUSED})
            return
        if not path.startswith(CALL_PREFIX):
            await self.app(scope, receive, send)
            return
        codec = CALLS.get(path.removeprefix(CALL_PREFIX))
        if codec is None or scope["method"] != "POST":
            await _reply_json(send, 404, {"message": f"No runner call {scope['method']} {path}."})
            return
        serve = partial(self._serve, codec, receive, send)
        if self.metrics is None:
            await serve()
        else:
            await self.metrics.counted(path, serve)

    async def _serve(self, codec: CallCodec, receive: Receive, send: Send) -> int:
        """One call: its body read, the engine's answer sent with the runner's own time; its status."""
        started = time.perf_counter()
        body = await _read_body(receive)
        status, reply = await self.calls.answer(codec, body)
        timing = f"runner;dur={(time.perf_counter() - started) * 1000:.3f}".encode()
        media_type = FRAME_MEDIA_TYPE.encode() if status == 200 else b"application/json"
        await _reply(send, status, media_type, reply, [(b"server-timing", timing)])
        return status


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _reply(send: Send, status: int, media_type: bytes, body: bytes,
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _reply_json(send: Send, status: int, content: dict[str, Any]) -> None:
    await _reply(send, status, b"application/json", json.dumps(content).encode())
